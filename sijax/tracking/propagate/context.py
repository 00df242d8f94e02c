"""The context of one line: the points, the live values, inserting points."""

import time
import weakref

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
        self.live: weakref.WeakSet = weakref.WeakSet()
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
        pv = PV(right, right if left is None else left, affine)
        self.live.add(pv)
        return pv

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
        ir = np.where(new, il + 1, il)
        znew = np.concatenate([all_z[order], np.full(pad, z[-1])])
        w = np.where(new, (znew - z[il]) / np.where(new, z[ir] - z[il], 1.0), 0.0)
        origin = np.where(new, event, self.origin[il])
        args = jax.device_put((il, ir, w, new))  # one transfer call for the four
        t0 = time.perf_counter()
        for pv in list(self.live):
            right, left = interp(
                pv.right,
                pv.left,
                *args,
                affine=pv.affine,
                continuous=pv.continuous,
            )
            pv.right, pv.left = right, (right if left is None else left)
        self.fp = take_rows(self.fp, args[0])
        tick("interpolate", t0, [pv.right for pv in self.live])
        self.z, self.n, self.origin, self._z_dev = znew, n + m, origin, None
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
