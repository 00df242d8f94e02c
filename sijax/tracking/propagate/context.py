"""The context of one line: the points, the values on them, inserting points."""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from sijax.errors import (
    NotPiecewiseLinearError,
)
from sijax.tracking.interpreter import (
    source_line,
)
from sijax.tracking.propagate.segments import interp, take_rows
from sijax.tracking.propagate.timing import tick
from sijax.tracking.propagate.values import ENDS, PV, Overflow, bucket


class Line:
    """The point batch of one window, every live value on it, and the decisions."""

    def __init__(self, z_lo: float, z_hi: float, dtype, tie_tol: float, max_points,
                 ends_only: bool = False):  # fmt: skip
        cap = bucket(2)  # padding rows repeat the last point
        self.ends_only = ends_only  # fingerprints of the end segments only
        self.z = np.full(cap, z_hi, np.float64)
        self.z[0] = z_lo
        self.n = 2
        self.origin = np.full(cap, ENDS, np.int64)
        self.dtype = dtype
        self.fp = jnp.zeros(cap, dtype)
        self.tie_tol, self.max_points = tie_tol, max_points
        # Point sets so far: values computed at version v are brought to the
        # current points when read (`refresh`), one gather per version.
        self.version = 0
        self._points = {0: self.z[:2].copy()}
        self._maps: dict = {}  # version -> device (il, ir, w, new) to the current
        self.events: list[str] = []
        self.stack: list = []  # open equations, for messages
        self.path: list[str] = []  # e.g. scan[3], for event descriptions
        self._z_dev = None

    @property
    def cap(self) -> int:
        return len(self.z)

    @property
    def z_dev(self) -> jax.Array:
        if self._z_dev is None:
            self._z_dev = jnp.asarray(self.z, self.dtype)
        return self._z_dev

    def new(self, right, left=None, *, affine: bool) -> PV:
        return PV(right, right if left is None else left, affine, self)

    def refresh(self, pv: PV) -> None:
        """Brings `pv` from the points of its version to the current ones: copies at
        the points it has, interpolation between its neighbours at the others."""
        t0 = time.perf_counter()
        args = self._maps.get(pv._version)
        if args is None:
            old, z = self._points[pv._version], self.z
            il = np.clip(np.searchsorted(old, z, side="right") - 1, 0, len(old) - 1)
            new = old[il] != z  # strictly between old[il] and old[il + 1]
            ir = np.where(new, np.minimum(il + 1, len(old) - 1), il)
            gap = np.where(new, old[ir] - old[il], 1.0)
            w = np.where(new, (z - old[il]) / gap, 0.0)
            args = self._maps[pv._version] = jax.device_put((il, ir, w, new))
        right, left = interp(pv._right, pv._left, *args, affine=pv.affine,
                             continuous=pv.continuous)  # fmt: skip
        pv._right, pv._left = right, (right if left is None else left)
        pv._version = self.version
        tick("interpolate", t0, right)

    def fail(self, eqn, why: str, error=NotPiecewiseLinearError):
        where = source_line([eqn, *reversed(self.stack)])
        raise error(
            f"primitive '{eqn.primitive.name}' is not piecewise linear along the line: "
            f"{why}{where}. Replace it by a piecewise-linear approximation "
            "(docs/method.md §4) or make its operands independent of the line."
        )

    def event(self, eqn) -> int:
        where = source_line([eqn, *reversed(self.stack)])
        self.events.append("/".join([*self.path, eqn.primitive.name]) + where)
        return len(self.events) - 1

    # -- points -----------------------------------------------------------------
    def insert(self, ts: np.ndarray, event: int) -> bool:
        """Inserts the roots `ts` (near-ties dropped); returns whether any was new."""
        ts = np.unique(ts[np.isfinite(ts)])
        z = self.z[: self.n]
        ts = ts[(ts > z[0]) & (ts < z[-1])]
        if not len(ts):
            return False
        tau = self.tie_tol * np.maximum(1.0, np.abs(ts))
        pos = np.searchsorted(z, ts)
        near = np.minimum(ts - z[pos - 1], z[pos] - ts) < tau
        ts, tau, pos = ts[~near], tau[~near], pos[~near]
        keep = np.zeros(len(ts), bool)
        last = -np.inf
        for i, t in enumerate(ts):  # greedy, left to right
            if t - last >= tau[i]:
                keep[i], last = True, t
        ts, pos = ts[keep], pos[keep]
        if not len(ts):
            return False
        n, m = self.n, len(ts)
        if n + m > self.max_points:
            raise Overflow
        all_z = np.concatenate([z, ts])
        is_new = np.concatenate([np.zeros(n, bool), np.ones(m, bool)])
        left_of = np.concatenate([np.arange(n), pos - 1])
        order = np.argsort(all_z, kind="stable")
        cap = bucket(n + m)
        pad = cap - n - m
        il = np.concatenate([left_of[order], np.full(pad, n - 1)])
        new = np.concatenate([is_new[order], np.zeros(pad, bool)])
        znew = np.concatenate([all_z[order], np.full(pad, z[-1])])
        origin = np.where(new, event, self.origin[il])
        self.fp = take_rows(self.fp, jax.device_put(il))
        self.z, self.n, self.origin, self._z_dev = znew, n + m, origin, None
        self.version += 1
        self._points[self.version] = znew[: n + m]
        self._maps = {}
        return True

    def insert_roots(self, finders, event: int) -> bool:
        """Inserts the roots of each finder: (has (cap - 1,), count, rows) where
        `rows(idx)` gives the candidates (NaN: none) in the segments idx, (k, ...)."""
        found = []
        for has, count, rows in finders:
            if not int(count):
                continue
            idx = np.flatnonzero(np.asarray(has))
            padded = np.full(bucket(len(idx)), idx[0])
            padded[: len(idx)] = idx
            t = np.asarray(rows(jnp.asarray(padded)))[: len(idx)].ravel()
            found.append(t[~np.isnan(t)])
        if not found:
            return False
        return self.insert(np.concatenate(found), event)

    # -- evaluation -------------------------------------------------------------
    def eval(self, jaxpr, args: list) -> list:
        # imported here: the evaluator imports this module (its rules get a Line)
        from sijax.tracking.propagate.evaluator import eval_jaxpr

        if isinstance(jaxpr, jex_core.ClosedJaxpr):
            return eval_jaxpr(self, jaxpr.jaxpr, jaxpr.consts, args)
        return eval_jaxpr(self, jaxpr, [], args)
