"""The driver: enumerate_line over windows, and LineCache for the search."""

import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.errors import (
    InputError,
    SearchError,
)
from sijax.tracking.interpreter import (
    DEFAULT_TIE_TOL,
    make_line_jaxpr,
    validate_line,
)
from sijax.tracking.propagate.context import Line
from sijax.tracking.propagate.evaluator import eval_jaxpr
from sijax.tracking.propagate.segments import midpoint, per_point
from sijax.tracking.propagate.values import WINDOW, LinePieces, Overflow, is_pv


class _Window(NamedTuple):
    z: np.ndarray  # (n,)
    origin: np.ndarray  # (n,)
    fingerprint: np.ndarray  # (n - 1,)
    summary: Any  # leaves (n - 1, ...)
    events: list


def _midpoint_outputs(line: Line, outs, avals) -> list:
    """The outputs at the midpoints of the buffer's cap - 1 segments (those past
    the n - 1 real ones repeat the last point): shapes fixed by the buffer size, so
    the summary compiles once per bucket, not once per point count."""
    leaves = []
    for x, aval in zip(outs, avals, strict=True):
        if is_pv(x):
            leaves.append(midpoint(x.right, x.left) if x.affine else x.right[:-1])
        else:
            x = jnp.broadcast_to(jnp.asarray(x, aval.dtype), aval.shape)
            leaves.append(jnp.broadcast_to(x, (line.cap - 1, *aval.shape)))
    return leaves


def _run_window(closed, treedef, summarize, a, b, z_lo, z_hi, tie_tol, max_points,
                leaves=(), ends_only=False):  # fmt: skip
    line = Line(z_lo, z_hi, a.dtype, tie_tol, max_points, ends_only)
    x = line.new(a[None] + b[None] * per_point(line.z_dev, a.ndim + 1), affine=True)
    outs = eval_jaxpr(line, closed.jaxpr, closed.consts, [*leaves, x])
    del x
    mids = _midpoint_outputs(line, outs, closed.out_avals)
    summ = jax.vmap(summarize)(jax.tree.unflatten(treedef, mids))
    n = line.n
    return _Window(
        z=line.z[:n].copy(),
        origin=line.origin[:n].copy(),
        fingerprint=_ends(np.asarray(line.fp)[: n - 1], ends_only),
        summary=jax.tree.map(lambda s: np.asarray(s)[: n - 1], summ),
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


def _stretch(closed, treedef, summarize, tie_tol, max_points, ends_only, a, b,
             leaves, lo, hi):  # fmt: skip
    """The windows of [lo, hi] (halved while one overflows) and the points used."""
    todo = [(lo, hi)]
    done: list[_Window] = []
    points = 0
    while todo:
        lo, hi = todo.pop(0)
        try:
            window, n = _run_window(
                closed, treedef, summarize, a, b, lo, hi, tie_tol, max_points,
                leaves, ends_only,
            )  # fmt: skip
        except Overflow:
            points += max_points
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                raise SearchError(  # pragma: no cover - needs absurd max_points
                    f"enumerate_line: more than {max_points=} points near z={lo}"
                ) from None
            todo[:0] = [(lo, mid), (mid, hi)]
            continue
        points += n
        done.append(window)
    return done, points


def split_stretch(z_min: float, z_max: float, k: int, tie_tol: float) -> np.ndarray:
    """Cuts [z_min, z_max] into at most k segments of equal length, none shorter
    than a thousand tie tolerances (a shorter stretch is one segment): the k' + 1
    ends, the first z_min and the last z_max exactly."""
    if not np.isfinite(z_max - z_min):
        raise InputError(f"a stretch split into segments must be finite; got "
                         f"[{z_min}, {z_max}]")  # fmt: skip
    tau = tie_tol * max(1.0, abs(z_min), abs(z_max))
    k = int(min(k, max(1, (z_max - z_min) // (1000 * tau))))
    cuts = np.linspace(z_min, z_max, k + 1)
    cuts[0], cuts[-1] = z_min, z_max
    return cuts


def join_pieces(parts: Sequence[LinePieces]) -> LinePieces:
    """Adjacent stretches (each ends where the next starts) as one, joined like
    the windows of one stretch: a cut inside a piece (the same fingerprint on
    both sides) is no breakpoint. The pieces do not depend on where the line was
    cut."""
    windows = [
        _Window(p.z, p.origin, p.fingerprint, p.summary, list(p.events)) for p in parts
    ]
    return _pieces(
        windows, sum(p.points for p in parts), sum(p.windows for p in parts)
    )


def _pieces(windows: list[_Window], points: int, count: int) -> LinePieces:
    """The joined windows as LinePieces (``count``: windows enumerated)."""
    z, origin, fp, summ = _join(windows)
    return LinePieces(
        z=z,
        summary=summ,
        fingerprint=fp,
        origin=origin,
        events=tuple(windows[0].events),
        points=points,
        windows=count,
    )


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
    devices: Sequence[jax.Device] | None = None,
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
      devices: optional devices to share the stretch: it is cut into one segment
        per device (equal lengths), each enumerated on its device in its own
        thread, and the segments joined; the same pieces as on one device (a
        breakpoint within the tie tolerance of a cut may move by up to that
        tolerance, as at a window's end). None: the default device.

    Returns:
      `LinePieces` (host arrays).

    Raises:
      NotPiecewiseLinearError: as `track` (a non-PWL primitive or a product of two
        line-dependent operands sees the line); names the primitive and source line.
      LineDependentControlError: `cond` / `while` with a line-dependent predicate.
    """
    if max_points < 3:
        raise InputError(f"max_points must be >= 3; got {max_points=}")
    a, b = validate_line(a, b, 0.0, 1)
    z_min, z_max = float(z_min), float(z_max)
    if not z_min <= z_max:
        raise InputError(f"need z_min <= z_max; got {z_min=} {z_max=}")
    closed, treedef = _line_jaxpr(f, a.shape, a.dtype, params)
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(params)]
    summarize = summary if summary is not None else (lambda out: ())
    run = partial(
        _stretch, closed, treedef, summarize, tie_tol, max_points,
        not all_fingerprints,
    )  # fmt: skip
    if devices is not None and not list(devices):
        raise InputError("devices must name at least one device")
    cuts = (
        np.array([z_min, z_max])
        if devices is None
        else split_stretch(z_min, z_max, len(devices), tie_tol)
    )
    if len(cuts) == 2:
        done, points = run(a, b, leaves, z_min, z_max)
    else:
        # One segment per device, enumerated at the same time (XLA releases the
        # GIL while it computes) and joined like the halves of an overflowing
        # window: the pieces do not depend on where the line is cut.
        def on(i):
            with jax.default_device(devices[i]):
                put = partial(jax.device_put, device=devices[i])
                return run(put(a), put(b), put(leaves), cuts[i], cuts[i + 1])

        with ThreadPoolExecutor(len(cuts) - 1) as pool:
            parts = list(pool.map(on, range(len(cuts) - 1)))
        done = [w for windows, _ in parts for w in windows]
        points = sum(n for _, n in parts)
    return _pieces(done, points, len(done))


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
      window_pieces: pieces per window aimed at after the first (per device).
      devices: optional devices that share every window (`enumerate_line`'s
        `devices`); the windows are that many times wider.
      segments: optional `(lo, hi) -> LinePieces` that enumerates a window in
        its stead (f, a, b, params and summary then only name the line), with a
        `size` attribute: how many share a window (e.g. worker processes, each
        one segment); the windows are that many times wider.
    """

    def __init__(self, f, a, b, *, params=None, summary=None,
                 z_range=(-np.inf, np.inf), width: float = 0.25,
                 window_pieces: int = 128, max_points: int = 1024,
                 tie_tol: float = DEFAULT_TIE_TOL, devices=None,
                 segments=None):  # fmt: skip
        if segments is not None and devices is not None:
            raise InputError("LineCache: give devices or segments, not both")
        self._enum = segments or partial(
            enumerate_line, f, a, b, params=params, summary=summary,
            max_points=max_points, tie_tol=tie_tol, all_fingerprints=False,
            devices=devices,
        )  # fmt: skip
        share = 1
        if devices is not None:
            share = max(1, len(devices))
        elif segments is not None:
            share = max(1, int(segments.size))
        self.r_lo, self.r_hi = float(z_range[0]), float(z_range[1])
        if not self.r_lo < self.r_hi:
            raise InputError(f"need z_range[0] < z_range[1]; got {z_range}")
        if not width > 0 or window_pieces < 1:
            raise InputError(f"need width > 0, window_pieces >= 1; got {width=}")
        self.width = float(width) * share
        self.window_pieces = int(window_pieces) * share
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
            raise InputError(f"z={z} outside z_range=({self.r_lo}, {self.r_hi})")
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
