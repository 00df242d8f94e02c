"""Every linear piece of f along a line by batched breakpoint propagation ("ExactLine").

Tracking notes, section 2(b); Sotoudeh and Thakur, "Computing linear restrictions of
neural networks", NeurIPS 2019. Instead of walking the line piece by piece (one
value-and-slope pass per piece, `search.enumerate_pieces`), f's jaxpr is evaluated once
on a sorted batch of points z_0 < ... < z_K of the stretch, with the invariant that
every value computed so far is affine on each segment [z_k, z_{k+1}]:

  * a linear equation (add, dot, conv, reshape, ...) runs once on the whole batch of
    points (`jax.vmap` of the primitive: one large matrix product or convolution);
  * at a piecewise equation (max, min, clamp, abs, sign, comparisons, reduce_max,
    argmax, max pooling) the points where its decision changes inside a segment are
    found as linear roots between neighbours, inserted, and every still-live value is
    obtained at the new points by linear interpolation between the neighbours (exact:
    all of them are affine there); then the primitive is applied.

No slopes are carried and no point is evaluated twice. The evaluator is host-driven:
consecutive equations that need no new point are fused into one compiled run
(`_plan_run`), piecewise equations are handled one by one with a host sync to fetch
their roots. The point axis is padded to a power of two (at least `MIN_CAP`) so that
each run compiles once per buffer size, not once per point count.

Values. A line-dependent value holds, at every point, its limit from the right
(`right`, the affine form of the segment that starts there) and from the left (`left`,
the segment that ends there). For a continuous value (everything a ReLU network
computes) both are the same array, computed once. Discontinuities come from a
line-dependent `select_n` predicate or a piecewise-constant factor (`h * sign(u)`);
such values keep both arrays, and everything downstream costs two evaluations.
Booleans, integers and `sign` outputs are piecewise constant: their value on segment k
is `right[k] == left[k + 1]`; a product of such a value with an affine one is fine, a
product of two affine values raises `NotPiecewiseLinearError`, as in the walking
tracker (whose classification of primitives, `rules.LINEAR` and the call table of
`control`, is reused here).

Decisions on a segment are taken at its midpoint; a breakpoint is a strict sign change
of an argument between the right value at z_k and the left value at z_{k+1}.

Near-ties. A root closer than tau = tie_tol * max(1, |t|) to a point already in the
batch (or to a root accepted just before it, scanning left to right) is not inserted,
as the walking tracker never returns a piece shorter than its tie tolerance. Values on
such a segment are then off by at most tau * |slope| (1e-10 relative by default), and a
breakpoint may sit up to tau from where walking puts it. Pieces shorter than tau at the
very ends of the stretch (a root within tau of z_min or z_max) are merged here; walking
may keep them.

Windows. Memory is points x live intermediates. When a stretch needs more than
`max_points` points it is split in half and each half enumerated on its own; a window
boundary that falls inside a piece is removed afterwards (the fingerprints of all
decisions on both sides agree), so the pieces do not depend on the windows.

Control flow: calls (pjit, closed_call, custom_jvp_call such as jax.nn.relu,
custom_vjp_call, remat) are inlined; `scan` and `while` are unrolled on the host (a new
point created in an iteration interpolates the carry, the stacked outputs so far and
every live outer value); `cond` and `while` need a line-independent predicate. Not
jittable: the result has a data-dependent size (host numpy arrays).
"""

import math
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from sijax.errors import NotPiecewiseLinearError, SijaxError
from sijax.tracking.control import CALLS, _sub_jaxpr
from sijax.tracking.interpreter import (
    DEFAULT_TIE_TOL,
    _hash_weights,
    _validate,
    _where,
    make_line_jaxpr,
)
from sijax.tracking.rules import (
    _COMPARE,
    LINEAR,
    _to_last,
    _windows,
    bind,
    not_piecewise_linear,
)

ENDS = -1  # origin of z_min and z_max
WINDOW = -2  # origin of a window boundary where some decision changes


class LineDependentControlError(SijaxError, NotImplementedError):
    """`cond` or `while` whose predicate depends on the line (the walking tracker,
    `enumerate_pieces`, supports these)."""


class LinePieces(NamedTuple):
    """Every linear piece of f on [z_min, z_max]: piece k is [z[k], z[k + 1]].

    Host (numpy) arrays of data-dependent size.
    """

    z: (
        np.ndarray
    )  # (K + 1,) strictly increasing breakpoints; z[0] = z_min, z[K] = z_max
    summary: Any  # pytree, each leaf (K, ...): summary(f at the midpoint of piece k)
    fingerprint: np.ndarray  # (K,) weighted sum of every decision of f on the piece
    #   (with all_fingerprints=False only the first and the last; the others NaN)
    origin: np.ndarray  # (K + 1,) int: index in `events` of the decision that
    #   created z[k]; ENDS for z_min and z_max, WINDOW for a window boundary
    events: tuple[str, ...]  # one description per piecewise equation evaluated
    points: int  # points pushed through f, all windows (split attempts included)
    windows: int  # windows the stretch was enumerated in

    @property
    def lo(self) -> np.ndarray:
        return self.z[:-1]

    @property
    def hi(self) -> np.ndarray:
        return self.z[1:]

    @property
    def count(self) -> int:
        return len(self.z) - 1


class _Overflow(Exception):
    """A window needs more than max_points points."""


class _PV:
    """A line-dependent value at the points: (cap, ...) arrays, leading axis = points.

    `affine`: affine on each segment (floating); otherwise constant on each segment.
    Mutable: inserting points replaces the arrays of every live value in place.
    """

    __slots__ = ("right", "left", "affine", "__weakref__")

    def __init__(self, right, left, affine: bool):
        self.right, self.left, self.affine = right, left, affine

    @property
    def continuous(self) -> bool:
        return self.left is self.right


def _is_pv(x) -> bool:
    return isinstance(x, _PV)


MIN_CAP = 32  # smallest point buffer: fewer buckets to compile, little waste


def _bucket(n: int) -> int:
    """Capacity of the point buffer for n points: a power of two >= MIN_CAP."""
    return max(MIN_CAP, 1 << (n - 1).bit_length())


# ------------------------------------------------------------------ jitted helpers


def _per_point(w, ndim):
    return w.reshape(w.shape + (1,) * (ndim - 1))


@partial(jax.jit, static_argnames=("affine", "continuous"))
def _interp(right, left, il, ir, w, is_new, *, affine, continuous):
    """Values at a new point set: copies at old points, interpolation at new ones."""
    r_l = right[il]
    if affine:
        w = _per_point(w.astype(right.dtype), right.ndim)
        other = right[ir] if continuous else left[ir]
        mid = r_l + w * (other - r_l)
    else:  # constant on the segment: its right value at the left neighbour
        mid = r_l
    new = _per_point(is_new, right.ndim)
    out_r = jnp.where(new, mid, r_l)
    if continuous:  # (a jit returns distinct buffers: the caller shares this one)
        return out_r, None
    return out_r, jnp.where(new, mid, left[il])


def _segments(z, n):
    """(cap - 1,) left ends, lengths and validity of the segments."""
    valid = jnp.arange(z.shape[0] - 1) < n - 1
    return z[:-1], z[1:] - z[:-1], valid


def _difference(z, xr, xl, yr, yl):
    """u = x - y as (cap - 1, E) right values at z_k and left values at z_{k+1}."""
    cap = z.shape[0]
    full = (cap, *jnp.broadcast_shapes(xr.shape, yr.shape)[1:])
    ur = jnp.broadcast_to(xr, full) - jnp.broadcast_to(yr, full)
    ul = jnp.broadcast_to(xl, full) - jnp.broadcast_to(yl, full)
    return ur[:-1].reshape(cap - 1, -1), ul[1:].reshape(cap - 1, -1)


def _strict_change(r0, l1):
    return ((r0 < 0) & (l1 > 0)) | ((r0 > 0) & (l1 < 0))


@jax.jit
def _difference_has(z, n, xr, xl, yr, yl):
    """Which segments hold a strict sign change of some element of u = x - y
    (x, y: (cap or 1, *shape) right and left values; 1: a constant): (cap - 1,)
    bools and their count.

    One fused read of the operands; the roots themselves are computed only in the
    segments that have one (`_difference_roots`).
    """
    r0, l1 = _difference(z, xr, xl, yr, yl)
    valid = jnp.arange(z.shape[0] - 1) < n - 1
    has = valid & jnp.any(_strict_change(r0, l1), axis=1)
    return has, jnp.sum(has)


@jax.jit
def _difference_roots(z, n, xr, xl, yr, yl, idx):
    """The roots of u in the segments `idx` (k,): (k, E), NaN where none."""
    r0, l1 = _difference(z, xr, xl, yr, yl)
    r0, l1 = r0[idx], l1[idx]
    cross = _strict_change(r0, l1)
    frac = r0 / jnp.where(cross, r0 - l1, 1)
    z0, dz = z[idx][:, None], (z[idx + 1] - z[idx])[:, None]
    return jnp.where(cross, z0 + dz * jnp.clip(frac, 0, 1), jnp.nan)


@jax.jit
def _take_rows(t, idx):
    return t[idx]


@partial(jax.jit, static_argnames="ends")
def _sign_fp(fp, salt, n, xr, xl, yr, yl, *, ends=False):
    """Adds the signs of x - y at the segment midpoints to the fingerprint; with
    `ends`, only to the first and the last segment (rows 0 and n - 2)."""
    rows = jnp.stack([0, jnp.maximum(n - 2, 0)]) if ends else jnp.arange(len(fp) - 1)

    def at(a, r):  # rows of a (cap, ...) value, or its only row (a constant)
        return a[jnp.minimum(r, a.shape[0] - 1)]

    mid = (at(xr, rows) - at(yr, rows) + at(xl, rows + 1) - at(yl, rows + 1)) / 2
    w = _hash_weights(mid.shape[1:], salt, fp.dtype)
    s = jnp.sum((jnp.sign(mid) * w[None]).reshape(len(rows), -1), axis=1)
    return fp.at[rows].set(fp[rows] + s)


@jax.jit
def _envelope_kinks(z, n, r, left):
    """First change of the winner of a max over the last axis inside each segment.

    r, l: (cap, M, W) right and left values of the entries (-inf entries never win).
    The winner at the left end is the largest right value, ties to the largest left
    value (the larger slope); the first entry to overtake it gives the kink.
    Returns ((cap - 1, M) kinks or NaN, (cap - 1,) whether a segment has one, count).
    """
    z0, dz, valid = _segments(z, n)
    r0, l1 = r[:-1], left[1:]
    dead = jnp.isneginf(r0) | jnp.isneginf(l1)
    r0 = jnp.where(dead, -jnp.inf, r0)
    l1 = jnp.where(dead, -jnp.inf, l1)
    tie = r0 == jnp.max(r0, axis=-1, keepdims=True)
    win = jnp.argmax(jnp.where(tie, l1, -jnp.inf), axis=-1)[..., None]
    rw = jnp.take_along_axis(r0, win, axis=-1)
    lw = jnp.take_along_axis(l1, win, axis=-1)
    dr, dl = rw - r0, lw - l1
    cand = ~dead & jnp.isfinite(rw) & jnp.isfinite(lw) & (dr > 0) & (dl < 0)
    frac = jnp.min(jnp.where(cand, dr / jnp.where(cand, dr - dl, 1), jnp.inf), -1)
    has = valid[:, None] & jnp.isfinite(frac)
    t = z0[:, None] + dz[:, None] * jnp.clip(jnp.where(has, frac, 0), 0, 1)
    t = jnp.where(has, t, jnp.nan)
    return t, jnp.any(has, axis=1), jnp.sum(has)


@jax.jit
def _midpoint(r, left):
    return (r[:-1] + left[1:]) / 2


@jax.jit
def _spread(seg, n):
    """Per-segment values (cap - 1, ...) to (right, left) per point (cap, ...)."""
    k = jnp.arange(seg.shape[0] + 1)
    right = seg[jnp.clip(k, 0, jnp.maximum(n - 2, 0))]
    left = seg[jnp.clip(k - 1, 0, jnp.maximum(n - 2, 0))]
    return right, left


@jax.jit
def _fp_add(fp, decision, salt):
    """Adds one decision per segment ((cap - 1, ...) numbers) to the fingerprint."""
    w = _hash_weights(decision.shape[1:], salt, fp.dtype)
    d = decision.astype(fp.dtype) * w[None]
    return fp.at[:-1].add(jnp.sum(d.reshape(d.shape[0], -1), axis=1))


# ------------------------------------------------------------------------- context


class _Line:
    """The point batch of one window, every live value on it, and the decisions."""

    def __init__(self, z_lo: float, z_hi: float, dtype, tie_tol: float, max_points,
                 ends_only: bool = False):  # fmt: skip
        cap = _bucket(2)  # padding rows repeat the last point
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

    def new(self, right, left=None, *, affine: bool) -> _PV:
        pv = _PV(right, right if left is None else left, affine)
        self.live.add(pv)
        return pv

    def fail(self, eqn, why: str, error=NotPiecewiseLinearError):
        where = _where([eqn, *reversed(self.stack)])
        raise error(
            f"primitive '{eqn.primitive.name}' is not piecewise linear along the line: "
            f"{why}{where}. Replace it by a piecewise-linear approximation "
            "(spec section 4) or make its operands independent of the line."
        )

    def event(self, eqn) -> int:
        where = _where([eqn, *reversed(self.stack)])
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
            raise _Overflow
        all_z = np.concatenate([z, ts])
        is_new = np.concatenate([np.zeros(n, bool), np.ones(m, bool)])
        left_of = np.concatenate([np.arange(n), pos - 1])
        order = np.argsort(all_z, kind="stable")
        cap = _bucket(n + m)
        pad = cap - n - m
        il = np.concatenate([left_of[order], np.full(pad, n - 1)])
        new = np.concatenate([is_new[order], np.zeros(pad, bool)])
        ir = np.where(new, il + 1, il)
        znew = np.concatenate([all_z[order], np.full(pad, z[-1])])
        w = np.where(new, (znew - z[il]) / np.where(new, z[ir] - z[il], 1.0), 0.0)
        origin = np.where(new, event, self.origin[il])
        args = [jnp.asarray(v) for v in (il, ir, w, new)]
        t0 = time.perf_counter()
        for pv in list(self.live):
            right, left = _interp(
                pv.right,
                pv.left,
                *args,
                affine=pv.affine,
                continuous=pv.continuous,
            )
            pv.right, pv.left = right, (right if left is None else left)
        self.fp = self.fp[args[0]]
        _tick("interpolate", t0, [pv.right for pv in self.live])
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
            padded = np.full(_bucket(len(idx)), idx[0])
            padded[: len(idx)] = idx
            t = np.asarray(rows(jnp.asarray(padded)))[: len(idx)].ravel()
            found.append(t[~np.isnan(t)])
        if not found:
            return False
        return self.insert(np.concatenate(found), event)

    # -- evaluation -------------------------------------------------------------
    def eval(self, jaxpr, args: list) -> list:
        if isinstance(jaxpr, jex_core.ClosedJaxpr):
            return eval_jaxpr(self, jaxpr.jaxpr, jaxpr.consts, args)
        return eval_jaxpr(self, jaxpr, [], args)


# ----------------------------------------------------------------------- pointwise


def _args(invals, side: str) -> list:
    return [getattr(x, side) if _is_pv(x) else x for x in invals]


_BATCHED: dict = {}
JIT_AFTER = 2  # calls of one equation run eagerly before it gets compiled


def _vmapped(eqn, invals):
    """`eqn` on a batch of points (axis 0 of line-dependent operands).

    The first `JIT_AFTER` calls of an equation trace `vmap` eagerly (~1 ms of Python
    per equation, but primitives compile once per shape for every program); later
    calls (scan iterations, windows, repeated lines) go through a `jit` compiled once
    per equation, operand kinds and bucket: one dispatch per equation.
    """
    axes = tuple(0 if _is_pv(x) else None for x in invals)
    key = (id(eqn), axes)
    hit = _BATCHED.get(key)
    if hit is None or hit[0] is not eqn:  # keeps eqn alive, so its id stays unique
        fun = jax.vmap(lambda *xs: bind(eqn, xs), in_axes=axes)
        hit = _BATCHED[key] = [eqn, fun, 0]
    hit[2] += 1
    if hit[2] == JIT_AFTER + 1:
        hit[1] = jax.jit(hit[1])
    return hit[1]


def pointwise(line: _Line, eqn, invals) -> list:
    """Applies the primitive at every point (to right and left values)."""
    pvs = [x for x in invals if _is_pv(x)]
    affine = any(x.affine for x in pvs)
    fun = _vmapped(eqn, invals)
    right = fun(*_args(invals, "right"))
    if all(x.continuous for x in pvs):
        left = right
    else:
        left = fun(*_args(invals, "left"))
    return [
        line.new(r, lf, affine=affine and jnp.issubdtype(r.dtype, jnp.floating))
        for r, lf in zip(right, left, strict=True)
    ]


def segmentwise(line: _Line, eqn, invals) -> list:
    """A piecewise-constant output (comparison, sign, argmax) from midpoint values."""
    mids = []
    for x in invals:
        if _is_pv(x):
            mids.append(_midpoint(x.right, x.left) if x.affine else x.right[:-1])
        else:
            mids.append(x)
    n = jnp.asarray(line.n)
    outs = []
    for seg in _vmapped(eqn, invals)(*mids):
        right, left = _spread(seg, n)
        outs.append(line.new(right, left, affine=False))
    return outs


def _broadcast(line: _Line, x, shape, dtype) -> tuple:
    """(right, left) of an operand broadcast to (cap, *shape)."""
    if _is_pv(x):
        full = (line.cap, *shape)
        r = jnp.broadcast_to(x.right, full)
        return r, (r if x.continuous else jnp.broadcast_to(x.left, full))
    v = jnp.broadcast_to(jnp.asarray(x, dtype), (line.cap, *shape))
    return v, v


def _lead(line: _Line, x, ndim: int) -> tuple:
    """(right, left) with a leading point axis (of size 1 for a constant)."""
    if _is_pv(x):
        return x.right, x.left
    # On the host: a small eager device op here would queue behind running work.
    v = np.asarray(x, line.dtype)
    v = v.reshape((1,) * (ndim + 1)) if v.ndim == 0 else v[None]
    return v, v


def _pair_roots(line: _Line, x, y, ndim: int):
    """A root finder (see `_Line.insert_roots`) of x - y."""
    args = (line.z_dev, line.n, *_lead(line, x, ndim), *_lead(line, y, ndim))
    has, count = _difference_has(*args)
    return has, count, partial(_difference_roots, *args)


def _tick(key: str, t0: float, arrays) -> float:
    """Adds the seconds since t0 to PROFILE[key] (synchronised); returns now."""
    if PROFILE is None:
        return t0
    jax.block_until_ready(arrays)
    now = time.perf_counter()
    PROFILE[key] = PROFILE.get(key, 0.0) + now - t0
    return now


def _elementwise_rule(pairs, discrete: bool):
    """A rule whose decisions are the signs of `pairs(invals)` = [(x, y), ...]."""

    def rule(line: _Line, eqn, invals) -> list:
        event = line.event(eqn)
        ndim = len(eqn.outvars[0].aval.shape)
        t0 = time.perf_counter()
        line.insert_roots(
            [_pair_roots(line, x, y, ndim) for x, y in pairs(invals)], event
        )
        t0 = _tick("insert", t0, line.fp)
        for x, y in pairs(invals):  # after insertion: the values are updated in place
            args = (*_lead(line, x, ndim), *_lead(line, y, ndim))
            line.fp = _sign_fp(line.fp, event, line.n, *args, ends=line.ends_only)
        t0 = _tick("fingerprint", t0, line.fp)
        out = (segmentwise if discrete else pointwise)(line, eqn, invals)
        _tick("apply", t0, [o.right for o in out])
        return out

    return rule


def _envelope_rule(entries, discrete: bool):
    """reduce_max-like rules: `entries(line, eqn, invals)` gives (right, left) arrays
    (cap, M, W) of the candidates (negated for a min)."""

    def rule(line: _Line, eqn, invals) -> list:
        event = line.event(eqn)
        while True:  # one kink per segment and element per round
            r, lf = entries(line, eqn, invals)
            t, has, count = _envelope_kinks(line.z_dev, line.n, r, lf)
            if not line.insert_roots([(has, count, partial(_take_rows, t))], event):
                break
        r, lf = entries(line, eqn, invals)
        win = jnp.argmax(_midpoint(r, lf), axis=-1)
        line.fp = _fp_add(line.fp, win, event)
        return (segmentwise if discrete else pointwise)(line, eqn, invals)

    return rule


def _both(x, fun):
    r = fun(x.right)
    return r, (r if x.continuous else fun(x.left))


def _reduce_entries(line, eqn, invals):
    (x,) = invals
    sign = -1 if eqn.primitive.name in ("reduce_min", "argmin") else 1
    axes = tuple(eqn.params["axes"])
    r, lf = _both(x, jax.vmap(lambda v: _to_last(v, axes)))
    return _flat_entries(sign * r), _flat_entries(sign * lf)


def _flat_entries(e):
    return e.reshape(e.shape[0], -1, e.shape[-1])


def _window_entries(line, eqn, invals):
    x = invals[0]
    name = eqn.primitive.name
    if name == "reduce_window":
        init = jnp.asarray(invals[1], line.dtype)
        ops = _window_ops(eqn)
        sign = -1 if ops == ["min"] else 1
    else:
        sign = -1 if name == "reduce_window_min" else 1
        init = None
    fill = init if init is not None else (jnp.inf if sign < 0 else -jnp.inf)

    def windows(v):
        e = _windows(v, fill, eqn.params)
        if init is not None:  # the initial value is one more (constant) entry
            e = jnp.concatenate([e, jnp.broadcast_to(init, e.shape[:-1] + (1,))], -1)
        return e

    r, lf = _both(x, jax.vmap(windows))
    return _flat_entries(sign * r), _flat_entries(sign * lf)


def _window_ops(eqn) -> list[str]:
    body = eqn.params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    return [e.primitive.name for e in body.eqns]


_reduce_window_max = _envelope_rule(_window_entries, discrete=False)


def reduce_window_rule(line: _Line, eqn, invals) -> list:
    """Generic reduce_window (non-literal init): a single add, max or min."""
    ops = _window_ops(eqn)
    if len(invals) != 2 or ops not in (["add"], ["max"], ["min"]):
        line.fail(eqn, f"a window reduction by {ops} is not supported")
    if _is_pv(invals[1]):
        line.fail(eqn, "its initial value depends on the line")
    if ops == ["add"]:
        return pointwise(line, eqn, invals)
    return _reduce_window_max(line, eqn, invals)


# ------------------------------------------------------------------ linear checks


def linear_rule(line, eqn, invals) -> list:
    return pointwise(line, eqn, invals)


def _refuse(line, eqn, invals) -> None:
    """Fails where `rules.not_piecewise_linear` says so (affine operands vary)."""
    why = not_piecewise_linear(eqn, [_is_pv(x) and x.affine for x in invals])
    if why:
        line.fail(eqn, why)


def checked_rule(line, eqn, invals) -> list:
    """mul, dot, conv, div, convert: applied pointwise where piecewise linear."""
    _refuse(line, eqn, invals)
    return pointwise(line, eqn, invals)


def integer_pow_rule(line, eqn, invals) -> list:
    _refuse(line, eqn, invals)
    return list(invals)


def identity_rule(line, eqn, invals) -> list:
    return list(invals)


# -------------------------------------------------------------------- control flow


def call_rule(line, eqn, invals) -> list:
    return line.eval(_sub_jaxpr(eqn), invals)


def _index(line: _Line, x, i: int):
    """x[i] along the scanned axis (axis 1 of a line-dependent value)."""
    if not _is_pv(x):
        return x[i]
    r, lf = _both(x, lambda v: v[:, i])
    return line.new(r, lf, affine=x.affine)


def _stack(line: _Line, values: list, aval):
    """Stacks one output over the iterations of a scan (axis 1 for the points)."""
    if not any(map(_is_pv, values)):
        return jnp.stack([jnp.asarray(v) for v in values])
    pvs = [v for v in values if _is_pv(v)]
    affine = any(v.affine for v in pvs)
    shape = aval.shape[1:]
    pairs = [_broadcast(line, v, shape, aval.dtype) for v in values]
    right = jnp.stack([p[0] for p in pairs], axis=1)
    if all(v.continuous for v in pvs):  # constants are continuous too
        return line.new(right, affine=affine)
    left = jnp.stack([p[1] for p in pairs], axis=1)
    return line.new(right, left, affine=affine)


def scan_rule(line: _Line, eqn, invals) -> list:
    """lax.scan, unrolled on the host: every iteration runs on the whole batch."""
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    consts = list(invals[:n_consts])
    carry = list(invals[n_consts : n_consts + n_carry])
    xs = list(invals[n_consts + n_carry :])
    steps = []
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    for i in order:
        line.path.append(f"scan[{i}]")
        try:
            x_i = [_index(line, x, i) for x in xs]
            outs = line.eval(p["jaxpr"], consts + carry + x_i)
        finally:
            line.path.pop()
        carry, ys = outs[:n_carry], outs[n_carry:]
        steps.append(ys)
    if p["reverse"]:
        steps.reverse()
    y_avals = [v.aval for v in eqn.outvars[n_carry:]]
    ys = [_stack(line, [s[j] for s in steps], aval) for j, aval in enumerate(y_avals)]
    return carry + ys


def cond_rule(line: _Line, eqn, invals) -> list:
    index, ops = invals[0], invals[1:]
    if _is_pv(index):
        line.fail(
            eqn,
            "its branch index depends on the line (use enumerate_pieces)",
            LineDependentControlError,
        )
    return line.eval(eqn.params["branches"][int(index)], list(ops))


def while_rule(line: _Line, eqn, invals) -> list:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = list(invals[:nc]), list(invals[nc : nc + nb])
    carry = list(invals[nc + nb :])
    i = 0
    while True:
        (pred,) = line.eval(p["cond_jaxpr"], cconsts + carry)
        if _is_pv(pred):
            line.fail(
                eqn,
                "its trip count depends on the line (use enumerate_pieces)",
                LineDependentControlError,
            )
        if not bool(pred):
            return carry
        line.path.append(f"while[{i}]")
        try:
            carry = line.eval(p["body_jaxpr"], bconsts + carry)
        finally:
            line.path.pop()
        i += 1


# ----------------------------------------------------------------------- the table


def _pair_max(invals):
    return [(invals[0], invals[1])]


def _pair_abs(invals):
    return [(invals[0], 0.0)]


def _pair_clamp(invals):
    lo, x, hi = invals
    return [(x, lo), (x, hi)]


RULES: dict[str, Callable] = {name: linear_rule for name in LINEAR}
RULES.update(
    {
        "mul": checked_rule,
        "dot_general": checked_rule,
        "conv_general_dilated": checked_rule,
        "div": checked_rule,
        "convert_element_type": checked_rule,
        "integer_pow": integer_pow_rule,
        "stop_gradient": identity_rule,
        "optimization_barrier": identity_rule,
        "debug_callback": linear_rule,
        "max": _elementwise_rule(_pair_max, discrete=False),
        "min": _elementwise_rule(_pair_max, discrete=False),
        "clamp": _elementwise_rule(_pair_clamp, discrete=False),
        "abs": _elementwise_rule(_pair_abs, discrete=False),
        "sign": _elementwise_rule(_pair_abs, discrete=True),
        "reduce_max": _envelope_rule(_reduce_entries, discrete=False),
        "reduce_min": _envelope_rule(_reduce_entries, discrete=False),
        "argmax": _envelope_rule(_reduce_entries, discrete=True),
        "argmin": _envelope_rule(_reduce_entries, discrete=True),
        "reduce_window_max": _reduce_window_max,
        "reduce_window_min": _reduce_window_max,
        "reduce_window": reduce_window_rule,
        **{name: _elementwise_rule(_pair_max, discrete=True) for name in _COMPARE},
        **{name: call_rule for name in CALLS},
        "scan": scan_rule,
        "cond": cond_rule,
        "while": while_rule,
    }
)


# ----------------------------------------------------------------------- evaluator


class _Liveness(NamedTuple):
    dead: list  # per equation: the variables whose last use it is
    last: dict  # variable -> index of its last use (len(eqns) for outputs)


_LIVENESS: dict = {}


def _liveness(jaxpr) -> _Liveness:
    key = id(jaxpr)
    hit = _LIVENESS.get(key)
    if hit is not None and hit[0] is jaxpr:  # keeps jaxpr alive: ids stay unique
        return hit[1]
    last: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                last[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            last[v] = len(jaxpr.eqns)
    dead: list[list] = [[] for _ in jaxpr.eqns]
    for v, i in last.items():
        if i < len(jaxpr.eqns):
            dead[i].append(v)
    out = _Liveness(dead, last)
    _LIVENESS[key] = (jaxpr, out)
    return out


# ------------------------------------------------------------------- fused runs
#
# Consecutive equations that need no new point (linear ones, and anything on
# constants or piecewise-constant values only) run as one compiled function on the
# whole batch: XLA fuses them (a 3x3 convolution written as pad, nine slices, a
# concatenation and a matrix product becomes one pass), and each run costs one
# dispatch. Which equations qualify depends on which operands are line-dependent, so
# a run is planned symbolically from the kinds of the values in the environment.

CONST, DISCRETE, AFFINE = 0, 1, 2
_CONTROL = frozenset({"scan", "cond", "while"})
_NOT_IN_RUNS = frozenset({"debug_callback"})


def _kind_of(x) -> int:
    if not _is_pv(x):
        return CONST
    return AFFINE if x.affine else DISCRETE


def _linear_ok(eqn, kinds: list[int]) -> bool:
    """Whether an equation with affine operands is affine (the checks of the rules)."""
    name = eqn.primitive.name
    if name in LINEAR or name in ("stop_gradient", "optimization_barrier"):
        return True
    if name in ("mul", "dot_general", "conv_general_dilated"):
        return sum(k == AFFINE for k in kinds) <= 1
    if name == "div":
        return kinds[1] != AFFINE
    if name == "convert_element_type":
        return jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)
    if name == "integer_pow":
        return eqn.params["y"] == 1
    return False


def _out_kinds(eqn, kinds: list[int]) -> list[int] | None:
    """Kinds of the outputs if the equation can join a run, else None."""
    name = eqn.primitive.name
    if name in _NOT_IN_RUNS:
        return None
    top = max(kinds, default=CONST)
    if top == CONST:
        return [CONST] * len(eqn.outvars)
    if top == DISCRETE:  # piecewise-constant operands: any primitive, pointwise
        return [DISCRETE] * len(eqn.outvars)
    if name in CALLS:
        sub = _sub_jaxpr(eqn)
        sub = getattr(sub, "jaxpr", sub)
        outs = _plan_kinds(sub, [CONST] * len(sub.constvars) + kinds)
        # Under vmap every output of the call has the point axis.
        return None if outs is None else [max(k, DISCRETE) for k in outs]
    if name in _CONTROL or not _linear_ok(eqn, kinds):
        return None
    return [
        AFFINE if jnp.issubdtype(v.aval.dtype, jnp.floating) else DISCRETE
        for v in eqn.outvars
    ]


def _plan_kinds(jaxpr, in_kinds: list[int]) -> list[int] | None:
    """Output kinds of a whole (call) jaxpr if every equation can join a run."""
    kinds = dict(zip([*jaxpr.constvars, *jaxpr.invars], in_kinds, strict=True))
    for eqn in jaxpr.eqns:
        ks = [
            CONST if isinstance(v, jex_core.Literal) else kinds[v] for v in eqn.invars
        ]
        outs = _out_kinds(eqn, ks)
        if outs is None:
            return None
        kinds.update(zip(eqn.outvars, outs, strict=True))
    return [
        CONST if isinstance(v, jex_core.Literal) else kinds[v] for v in jaxpr.outvars
    ]


class _Run(NamedTuple):
    end: int  # equations [start, end) of the jaxpr
    in_vars: list
    out_vars: list
    out_kinds: list[int]
    fun: Callable  # jitted: arrays of in_vars -> arrays of out_vars
    elements: int  # largest value the run computes, elements per point


_RUNS: dict = {}


def _plan_run(jaxpr, start: int, env: dict, live: _Liveness) -> _Run | None:
    """The longest run of equations from `start` that needs no new point."""
    kinds: dict = {}
    in_vars: list = []
    end = start
    for eqn in jaxpr.eqns[start:]:
        ks = []
        for v in eqn.invars:
            if isinstance(v, jex_core.Literal):
                ks.append(CONST)
            elif v in kinds:
                ks.append(kinds[v])
            else:
                kinds[v] = _kind_of(env[v])
                in_vars.append(v)
                ks.append(kinds[v])
        outs = _out_kinds(eqn, ks)
        if outs is None:
            break
        kinds.update(zip(eqn.outvars, outs, strict=True))
        end += 1
    if end == start:
        return None
    key = (id(jaxpr), start, end, tuple(kinds[v] for v in in_vars))
    hit = _RUNS.get(key)
    if hit is not None and hit[0] is jaxpr:
        return hit[1]
    defined = [v for e in jaxpr.eqns[start:end] for v in e.outvars]
    out_vars = [v for v in defined if live.last.get(v, -1) >= end]
    eqns = jaxpr.eqns[start:end]
    in_batched = [kinds[v] != CONST for v in in_vars]

    def run(*args):
        tenv = dict(zip(in_vars, args, strict=True))
        batched = dict(zip(in_vars, in_batched, strict=True))
        for eqn in eqns:
            vals, axes = [], []
            for v in eqn.invars:
                if isinstance(v, jex_core.Literal):
                    vals.append(v.val)
                    axes.append(None)
                else:
                    vals.append(tenv[v])
                    axes.append(0 if batched[v] else None)
            if any(a is not None for a in axes):
                outs = jax.vmap(lambda *xs, e=eqn: bind(e, xs), in_axes=axes)(*vals)
            else:
                outs = bind(eqn, vals)
            b = any(a is not None for a in axes)
            for v, o in zip(eqn.outvars, outs, strict=True):
                tenv[v], batched[v] = o, b
        return [tenv[v] for v in out_vars]

    elements = max(
        (math.prod(v.aval.shape) for e in eqns for v in e.outvars), default=1
    )
    plan = _Run(end, in_vars, out_vars, [kinds[v] for v in out_vars], jax.jit(run),
                elements)  # fmt: skip
    _RUNS[key] = (jaxpr, plan)
    return plan


# Rows per call of a fused run: about CHUNK_ELEMENTS elements of its largest value
# (2 MB in float64), a power of two from MIN_ROWS to MAX_ROWS. Measured per piece of
# the DAL test (decision search, 1000 / 400 pieces, one core) with the same number
# of rows in every run: 16x16 11.6 / 10.6 / 11.1 / 12.1 ms with 8 / 16 / 32 / 64
# rows, 32x32 38.7 / 40.0 / 44.3 / 52.6 ms; with this rule 10.1 and 40.1 ms.
CHUNK_ELEMENTS = 2**18
MIN_ROWS, MAX_ROWS = 8, 64


def _chunk_rows(elements: int) -> int:
    rows = 1 << max(0, (CHUNK_ELEMENTS // max(elements, 1)).bit_length() - 1)
    return max(MIN_ROWS, min(MAX_ROWS, rows))


def _chunked(line: _Line, plan: _Run, vals: list, side: str) -> list:
    """plan.fun on the rows of the point buffer, a chunk of rows at a time.

    Rows are independent, so a run compiles once per chunk size whatever the buffer
    size, and its intermediates stay in cache (`_chunk_rows`: 64 rows at once were
    1.7x faster than 512 at 16x16, 16 rows faster again). Chunks holding only
    padding rows are not computed: padding rows repeat the last point.
    """
    args = _args(vals, side)
    cap, chunk = line.cap, _chunk_rows(plan.elements)
    if cap <= chunk:
        return plan.fun(*args)
    used = min(cap, -(-line.n // chunk) * chunk)
    rows = [_is_pv(v) for v in vals]
    parts = [
        plan.fun(
            *[x[i : i + chunk] if r else x for x, r in zip(args, rows, strict=True)]
        )
        for i in range(0, used, chunk)
    ]
    outs = []
    for j, kind in enumerate(plan.out_kinds):
        if kind == CONST:
            outs.append(parts[0][j])
            continue
        pieces = [p[j] for p in parts]
        if used < cap:  # the last computed row is the last point (or a copy of it)
            last = pieces[-1][-1:]
            pieces.append(jnp.broadcast_to(last, (cap - used, *last.shape[1:])))
        outs.append(jnp.concatenate(pieces))
    return outs


def _execute_run(line: _Line, plan: _Run, env: dict) -> None:
    vals = [env[v] for v in plan.in_vars]
    pvs = [x for x in vals if _is_pv(x)]
    if not pvs:
        right = plan.fun(*vals)
    else:
        right = _chunked(line, plan, vals, "right")
    if all(x.continuous for x in pvs):
        left = right
    else:
        left = _chunked(line, plan, vals, "left")
    for v, kind, r, lf in zip(plan.out_vars, plan.out_kinds, right, left, strict=True):
        env[v] = r if kind == CONST else line.new(r, lf, affine=kind == AFFINE)


PROFILE: dict | None = None  # set to {} to collect seconds per kind of step


def _account(key: str, outvals, t0) -> None:
    """Adds the time of one step (synchronised) to PROFILE (benchmarks only)."""
    jax.block_until_ready([o.right if _is_pv(o) else o for o in outvals])
    PROFILE[key] = PROFILE.get(key, 0.0) + time.perf_counter() - t0


def eval_jaxpr(line: _Line, jaxpr, consts, args) -> list:
    """Interprets `jaxpr` on constants and line-dependent values (`_PV`)."""
    env: dict = {}

    def read(var):
        if isinstance(var, jex_core.Literal):
            return var.val
        return env[var]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    live = _liveness(jaxpr)
    i, n_eqns = 0, len(jaxpr.eqns)
    while i < n_eqns:
        t0 = time.perf_counter() if PROFILE is not None else 0.0
        plan = _plan_run(jaxpr, i, env, live)
        if plan is not None:
            _execute_run(line, plan, env)
            if PROFILE is not None:
                _account("runs", [env[v] for v in plan.out_vars], t0)
            for k in range(i, plan.end):
                for var in live.dead[k]:
                    env.pop(var, None)
            i = plan.end
            continue
        eqn = jaxpr.eqns[i]
        invals = [read(v) for v in eqn.invars]
        pvs = [x for x in invals if _is_pv(x)]
        rule = RULES.get(eqn.primitive.name)
        if not any(x.affine for x in pvs) or rule is None:
            # Only a debug callback on non-affine operands, or no rule at all.
            if any(x.affine for x in pvs):
                line.fail(eqn, "it has a line-dependent operand and no tracking rule")
            outvals = pointwise(line, eqn, invals) if pvs else bind(eqn, invals)
        else:
            line.stack.append(eqn)
            try:
                outvals = rule(line, eqn, invals)
            finally:
                line.stack.pop()
        name = eqn.primitive.name
        if PROFILE is not None and name not in CALLS and name not in _CONTROL:
            _account(f"piecewise:{name}", outvals, t0)
        for var, val in zip(eqn.outvars, outvals, strict=True):
            env[var] = val
        del invals, pvs, outvals
        for var in live.dead[i]:
            env.pop(var, None)
        i += 1
    return [read(v) for v in jaxpr.outvars]


# -------------------------------------------------------------------------- driver


class _Window(NamedTuple):
    z: np.ndarray  # (n,)
    origin: np.ndarray  # (n,)
    fingerprint: np.ndarray  # (n - 1,)
    summary: Any  # leaves (n - 1, ...)
    events: list


def _midpoint_outputs(line: _Line, outs, avals) -> list:
    k = line.n - 1
    leaves = []
    for x, aval in zip(outs, avals, strict=True):
        if _is_pv(x):
            v = _midpoint(x.right, x.left) if x.affine else x.right[:-1]
            leaves.append(v[:k])
        else:
            x = jnp.broadcast_to(jnp.asarray(x, aval.dtype), aval.shape)
            leaves.append(jnp.broadcast_to(x, (k, *aval.shape)))
    return leaves


def _run_window(closed, treedef, summarize, a, b, z_lo, z_hi, tie_tol, max_points,
                leaves=(), ends_only=False):  # fmt: skip
    line = _Line(z_lo, z_hi, a.dtype, tie_tol, max_points, ends_only)
    x = line.new(a[None] + b[None] * _per_point(line.z_dev, a.ndim + 1), affine=True)
    outs = eval_jaxpr(line, closed.jaxpr, closed.consts, [*leaves, x])
    del x
    mids = _midpoint_outputs(line, outs, closed.out_avals)
    summ = jax.vmap(summarize)(jax.tree.unflatten(treedef, mids))
    n = line.n
    return _Window(
        z=line.z[:n].copy(),
        origin=line.origin[:n].copy(),
        fingerprint=_ends(np.asarray(line.fp)[: n - 1], ends_only),
        summary=jax.tree.map(np.asarray, summ),
        events=line.events,
    ), n


def _ends(fp: np.ndarray, ends_only: bool) -> np.ndarray:
    if ends_only and len(fp) > 2:  # the others hold only some decisions
        fp = fp.copy()
        fp[1:-1] = np.nan
    return fp


def _same(f1: float, f2: float) -> bool:
    return abs(f1 - f2) <= 1e-6 * max(1.0, abs(f1), abs(f2))


def _join(windows: list[_Window]) -> tuple:
    """Concatenates windows; drops boundaries inside a piece (same fingerprints)."""
    first = windows[0]
    z, origin, fp, summ = first.z, first.origin, first.fingerprint, first.summary
    for w in windows[1:]:
        cut = 1 if _same(fp[-1], w.fingerprint[0]) else 0  # 1: no breakpoint there
        if cut:
            z, origin = z[:-1], origin[:-1]
        else:
            origin = origin.copy()
            origin[-1] = WINDOW
        z = np.concatenate([z, w.z[1:]])
        origin = np.concatenate([origin, w.origin[1:]])
        fp = np.concatenate([fp, w.fingerprint[cut:]])
        summ = jax.tree.map(
            lambda s, t, c=cut: np.concatenate([s, t[c:]]), summ, w.summary
        )
    return z, origin, fp, summ


_JAXPRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _line_jaxpr(f: Callable, shape, dtype, params=None):
    """`make_line_jaxpr`, cached per function (as `jax.jit` caches its traces), so
    that repeated calls reuse the compiled equations. With `params`, f is
    `f(params, x)` and the leaves of `params` are the jaxpr's first inputs, so one
    trace (and one compilation of each run) serves every value of them."""
    leaves, tree = jax.tree.flatten(params)
    avals = tuple((jnp.shape(v), jnp.result_type(v)) for v in leaves)
    key = (tuple(shape), jnp.dtype(dtype), jax.config.jax_enable_x64,
           str(jax.config.jax_default_matmul_precision), tree, avals)  # fmt: skip

    def trace():
        if params is None:
            return make_line_jaxpr(f, shape, dtype)
        x = jax.ShapeDtypeStruct(shape, dtype)
        specs = [jax.ShapeDtypeStruct(*a) for a in avals]
        closed, out_shape = jax.make_jaxpr(
            lambda ls, x: f(jax.tree.unflatten(tree, ls), x), return_shape=True
        )(specs, x)
        return closed, jax.tree.structure(out_shape)

    try:
        per_f = _JAXPRS.setdefault(f, {})
    except TypeError:  # not weakly referenceable: no caching
        return trace()
    if key not in per_f:
        per_f[key] = trace()
    return per_f[key]


def enumerate_line(
    f: Callable,
    a,
    b,
    z_min,
    z_max,
    *,
    params=None,
    summary: Callable[[Any], Any] | None = None,
    max_points: int = 4096,
    tie_tol: float = DEFAULT_TIE_TOL,
    all_fingerprints: bool = True,
) -> LinePieces:
    """Every linear piece of f along a + b t for t in [z_min, z_max] (tracking notes
    2(b)): the same pieces as `enumerate_pieces`, by batched breakpoint propagation.

    Host-driven (not jittable); each primitive of f runs on a batch of points.

    Args:
      f: piecewise-linear function of one array of the shape of `a` (see `track`);
        with `params`, `f(params, x)`.
      a, b: (...) floating, the line x(t) = a + b t.
      z_min, z_max: floats, z_min <= z_max.
      params: optional pytree of arrays that f takes first (weights, noises, ...):
        passed as inputs rather than closed over, so that calls with other values
        reuse the trace and the compiled runs (one compilation per f and shapes).
      summary: `summary(out) -> pytree of arrays` for one output of f (as f returns
        it, plain arrays) taken at the midpoint of each piece, e.g. the mask (for
        boolean and integer leaves that is their value on the piece). Default: ().
      max_points: most points in one window (memory: points x live intermediates);
        a stretch that needs more is enumerated in halves.
      tie_tol: relative tie tolerance (module docstring, "Near-ties").
      all_fingerprints: False: only the first and the last piece get a fingerprint
        (the others NaN), which is all that joining windows needs; saves a pass
        over every ReLU's input.

    Returns:
      `LinePieces` (host arrays).

    Raises:
      NotPiecewiseLinearError: as `track` (a non-PWL primitive or a product of two
        line-dependent operands sees the line); names the primitive and source line.
      LineDependentControlError: `cond` / `while` with a line-dependent predicate.
    """
    if max_points < 3:
        raise ValueError(f"max_points must be >= 3; got {max_points=}")
    a, b = _validate(a, b, 0.0, 1)
    z_min, z_max = float(z_min), float(z_max)
    if not z_min <= z_max:
        raise ValueError(f"need z_min <= z_max; got {z_min=} {z_max=}")
    closed, treedef = _line_jaxpr(f, a.shape, a.dtype, params)
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(params)]
    summarize = summary if summary is not None else (lambda out: ())
    todo = [(z_min, z_max)]
    done: list[_Window] = []
    points = 0
    while todo:
        lo, hi = todo.pop(0)
        try:
            window, n = _run_window(
                closed, treedef, summarize, a, b, lo, hi, tie_tol, max_points,
                leaves, not all_fingerprints,
            )  # fmt: skip
        except _Overflow:
            points += max_points
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                raise RuntimeError(  # pragma: no cover - needs absurd max_points
                    f"enumerate_line: more than {max_points=} points near z={lo}"
                ) from None
            todo[:0] = [(lo, mid), (mid, hi)]
            continue
        points += n
        done.append(window)
    z, origin, fp, summ = _join(done)
    return LinePieces(
        z=z,
        summary=summ,
        fingerprint=fp,
        origin=origin,
        events=tuple(done[0].events),
        points=points,
        windows=len(done),
    )


class LineCache:
    """The pieces of f along a line, served one at a time from stretches that are
    enumerated by propagation (`enumerate_line`) as the queries reach them.

    A host piece oracle for :func:`sijax.selective.search.search_host`: the search
    asks for the piece at z (at a breakpoint, the one on the side of `direction`),
    usually where the previous one ended; the cache answers from the stretch
    enumerated so far and extends it by a window when a query reaches its end. A
    piece cut by a window's end is never served: the next window continues it
    (windows are joined as in `enumerate_line`), so the pieces are those of the
    whole line, the same as `track`'s. The window width adapts to the density of
    breakpoints met so far, aiming at `window_pieces` pieces per window, which
    bounds the pieces computed beyond where the search stops.

    Args:
      f, a, b, params, summary, max_points, tie_tol: as `enumerate_line`.
      z_range: (lo, hi): the pieces at these ends are cut there (no window goes
        beyond them); default the whole line, whose end pieces are never served (a
        piece reaching +-inf cannot be told from a long one).
      width: the first window's width in z (centred on the first query).
      window_pieces: pieces per window aimed at after the first.
    """

    def __init__(self, f, a, b, *, params=None, summary=None,
                 z_range=(-np.inf, np.inf), width: float = 0.25,
                 window_pieces: int = 128, max_points: int = 1024,
                 tie_tol: float = DEFAULT_TIE_TOL):  # fmt: skip
        self._enum = partial(
            enumerate_line, f, a, b, params=params, summary=summary,
            max_points=max_points, tie_tol=tie_tol, all_fingerprints=False,
        )  # fmt: skip
        self.r_lo, self.r_hi = float(z_range[0]), float(z_range[1])
        if not self.r_lo < self.r_hi:
            raise ValueError(f"need z_range[0] < z_range[1]; got {z_range}")
        if not width > 0 or window_pieces < 1:
            raise ValueError(f"need width > 0, window_pieces >= 1; got {width=}")
        self.width, self.window_pieces = float(width), int(window_pieces)
        self.stretch: _Window | None = None
        self.points = 0  # points pushed through f, all windows
        self.windows = 0

    @property
    def count(self) -> int:
        """Pieces enumerated so far (the end pieces may still be cut)."""
        return 0 if self.stretch is None else len(self.stretch.z) - 1

    def _window(self, lo: float, hi: float) -> _Window:
        p = self._enum(lo, hi)
        self.points += p.points
        self.windows += p.windows
        if hi - lo >= 0.99 * self.width:  # not a remnant cut by z_range
            # Next width: aim at window_pieces at the density just met (at most 4x).
            self.width = min(4.0 * (hi - lo), self.window_pieces * (hi - lo) / p.count)
        return _Window(p.z, p.origin, p.fingerprint, p.summary, list(p.events))

    def _extend(self, z: float, right: bool) -> None:
        w = self.width
        if self.stretch is None:
            lo, hi = max(z - 0.5 * w, self.r_lo), min(z + 0.5 * w, self.r_hi)
            self.stretch = self._window(lo, hi)
            return
        zs = self.stretch.z
        if right:
            new = self._window(zs[-1], min(zs[-1] + w, self.r_hi))
            parts = [self.stretch, new]
        else:
            new = self._window(max(zs[0] - w, self.r_lo), zs[0])
            parts = [new, self.stretch]
        z, origin, fp, summ = _join(parts)
        self.stretch = _Window(z, origin, fp, summ, self.stretch.events)

    def piece(self, z: float, direction: int):
        """(lo, hi, summary of the piece) at z on the side of `direction` (+1/-1)."""
        z = float(z)
        if not self.r_lo <= z <= self.r_hi:
            raise ValueError(f"z={z} outside z_range=({self.r_lo}, {self.r_hi})")
        while True:
            if self.stretch is None:
                self._extend(z, True)
                continue
            zs = self.stretch.z
            n = len(zs) - 1
            side = "right" if direction > 0 else "left"
            k = int(np.searchsorted(zs, z, side=side)) - 1
            if k >= n or (k == n - 1 and zs[-1] < self.r_hi):
                self._extend(z, True)
            elif k < 0 or (k == 0 and zs[0] > self.r_lo):
                self._extend(z, False)
            else:
                summ = jax.tree.map(lambda s, k=k: s[k], self.stretch.summary)
                return float(zs[k]), float(zs[k + 1]), summ
