"""The jaxpr interpreter behind `track`: values at z, slopes, and the piece around z.

`track(f)(a, b, z, direction)` traces f once to a jaxpr and walks its equations. The
input is `Lin(a + b z, b)`; closed-over constants (network weights) stay plain arrays.
Each equation with a line-dependent operand goes through the rule of its primitive
(`rules.RULES`, `control.CONTROL_RULES`); an equation on constants only is evaluated
with the primitive itself. The piece [lo, hi] starts as (-inf, inf) and every discrete
decision shrinks it (docs/method.md §4).

Ties (direction). A decision is the sign of some affine u(t) = v + s (t - z). It is
taken at t = z + direction * tau with tau = tie_tol * max(1, |z|), i.e. just to the
chosen side of z, so:
  * on a breakpoint (v == 0, s != 0) the piece returned is the one on the side of
    `direction`: [z, hi] for +1, [lo, z] for -1;
  * a crossing closer to z than tau counts as being at z. Walking right from a piece's
    hi (or left from its lo) therefore always advances by at least tau, never stalls,
    and never returns a sliver made of rounding error. The price: inside [z, z + tau]
    the affine form may be off by tau * |s| (1e-10 relative by default), far below the
    search's own resolution (sicore steps 1e-6 .. 1e-11 past a breakpoint).
Affine forms are exact on the whole closed piece (max, abs are continuous); a boolean is
constant on the open piece and at z.

Batching. Every rule is a pure function of jnp arrays, and the value and the slope of a
`Lin` always have the same shape, so the whole pass vmaps over lines, start points and
directions (one trace). Linear rules go through `jax.jvp`, except products with a
constant (dot_general, e.g. the tap products of small convolutions), whose value and
slope are stacked into one product with twice the rows (`rules._stacked_product`;
15% less time per piece at 16x16, measured when all convolutions were products).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from sijax.errors import InputError, NotPiecewiseLinearError
from sijax.kernels import decide as decide_kernel
from sijax.tracking.affine import Affine, Lin, Piece
from sijax.tracking.control import (
    CALLS,
    CONTROL_RULES,
    StepMemo,
    _reusable_steps,
    _shift,
    flags_of,
    flatten,
    sub_jaxpr,
    unflatten,
)
from sijax.tracking.rules import RULES, bind, is_lin

ALL_RULES = {**RULES, **CONTROL_RULES}

DEFAULT_TIE_TOL = 1e-10


def source_line(eqns) -> str:
    """The user's source line of the innermost equation that has one, or ''.

    Equations inside a nested jit (jax.nn.silu, jnp functions) carry no user frame;
    the call equation that contains them does.
    """
    for eqn in eqns:
        try:
            text = source_info_util.summarize(eqn.source_info)
        except Exception:  # noqa: BLE001 - best effort only; never hide the real error
            continue
        if text:
            return f" at {text}"
    return ""


def hash_weights(shape, salt: int, dtype) -> jax.Array:
    """Deterministic pseudo-random weights in (0, 1) for the decision fingerprint."""
    n = 1
    for d in shape:
        n *= d
    i = jnp.arange(n, dtype=dtype).reshape(shape)
    return jnp.abs(jnp.sin(i * 12.9898 + (salt + 1) * 78.233) * 43758.5453) % 1.0 + 0.1


class Context:
    """The piece being built: constants (z, direction, tau) and state (lo, hi, fp).

    `fp` is an optional fingerprint of all decisions (a weighted sum of signs and winner
    indices) that the tests use to check that a piece ends where some decision changes.
    """

    def __init__(
        self, z, direction, tau, state, fingerprint: bool, shared=None, memo=None
    ):
        self.z, self.direction, self.tau = z, direction, tau
        self.lo, self.hi, self.fp = state
        self.fingerprint = fingerprint
        # Shared by all children: a decision counter and the stack of open equations.
        self.shared = shared if shared is not None else {"count": 0, "stack": []}
        # Step memo of the top-level scans, or of the segments of a flat program
        # (`track_memo`): the entries read (None: nothing cached yet) and written, in
        # the order met. Only the root context memoises; loop bodies and branches run
        # plainly.
        self.memo = memo
        self.memo_out: list = []

    # -- state ------------------------------------------------------------------
    @property
    def state(self) -> tuple:
        return (self.lo, self.hi, self.fp)

    def set_state(self, state) -> None:
        self.lo, self.hi, self.fp = state

    def child(self, state) -> "Context":
        """A context for a loop body or branch, starting from `state`."""
        return Context(
            self.z, self.direction, self.tau, state, self.fingerprint, self.shared
        )

    def memo_entry(self):
        """(memoising, the cached entry of the next top-level scan or None)."""
        if self.memo is None:
            return False, None
        slot = len(self.memo_out)
        return True, (self.memo[slot] if slot < len(self.memo) else None)

    def eval(self, jaxpr, args) -> list:
        """Interprets a (closed or open) sub-jaxpr on interpreter values."""
        if isinstance(jaxpr, jex_core.ClosedJaxpr):
            return eval_jaxpr(self, jaxpr.jaxpr, jaxpr.consts, args)
        return eval_jaxpr(self, jaxpr, [], args)

    def fail(self, eqn, why: str):
        where = source_line([eqn, *reversed(self.shared["stack"])])
        raise NotPiecewiseLinearError(
            f"primitive '{eqn.primitive.name}' is not piecewise linear along the line: "
            f"{why}{where}. Replace it by a piecewise-linear approximation "
            "(docs/method.md §4) or make its operands independent of the line."
        )

    # -- decisions ---------------------------------------------------------------
    def _record(self, x: jax.Array) -> None:
        if not self.fingerprint:
            return
        self.shared["count"] += 1
        w = hash_weights(x.shape, self.shared["count"], self.fp.dtype)
        self.fp = self.fp + jnp.sum(x.astype(self.fp.dtype) * w)

    def keep_nonneg(self, v: jax.Array, s: jax.Array) -> None:
        """Shrinks the piece to where every u = v + s (t - z) stays >= 0.

        Callers guarantee u >= 0 at z + direction * tau; the crossing t* = z - v / s is
        clamped to z so that lo <= z <= hi even for crossings within tau of z.
        """
        safe = jnp.where(s == 0, jnp.ones_like(s), s)
        t_star = self.z - v / safe
        hi = jnp.where(s < 0, jnp.maximum(t_star, self.z), jnp.inf)
        lo = jnp.where(s > 0, jnp.minimum(t_star, self.z), -jnp.inf)
        if hi.ndim:
            hi, lo = jnp.min(hi), jnp.max(lo)
        self.hi = jnp.minimum(self.hi, hi.astype(self.hi.dtype))
        self.lo = jnp.maximum(self.lo, lo.astype(self.lo.dtype))

    def decide(self, v: jax.Array, s: jax.Array) -> jax.Array:
        """Sign (-1, 0 or +1, dtype of v) of u = v + s (t - z) on the piece.

        The sign is taken at z + direction * tau; the piece is cut where u crosses 0.
        """
        # sijax/kernels/decide.py: the jnp reference, or the fused Pallas kernel.
        sigma, lo, hi = decide_kernel.decide(v, s, self.z, self.direction, self.tau)
        self.hi = jnp.minimum(self.hi, hi.astype(self.hi.dtype))
        self.lo = jnp.maximum(self.lo, lo.astype(self.lo.dtype))
        self._record(sigma)
        return sigma

    def argmax_last(self, v: jax.Array, s: jax.Array):
        """Winner along the last axis (first index on exact ties), fixed on the piece.

        Returns:
          (index (...) int32, winner value (...), winner slope (...)).
        """
        key = v + (self.direction * self.tau).astype(v.dtype) * s
        win = jnp.argmax(key, axis=-1).astype(jnp.int32)
        wv = jnp.take_along_axis(v, win[..., None], axis=-1)
        ws = jnp.take_along_axis(s, win[..., None], axis=-1)
        # The winner minus every other entry must stay >= 0; -inf padding has slope 0.
        dv = jnp.where(jnp.isneginf(v), jnp.inf, wv - v)
        self.keep_nonneg(dv, ws - s)
        self._record(win)
        return win, wv[..., 0], ws[..., 0]


def eval_jaxpr(ctx: Context, jaxpr, consts, args) -> list:
    """Interprets `jaxpr` on interpreter values (constants and `Lin`)."""
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    _eval_eqns(ctx, jaxpr.eqns, env)
    return [_read(env, v) for v in jaxpr.outvars]


def _read(env: dict, var):
    if isinstance(var, jex_core.Literal):
        return var.val
    return env[var]


def _eval_eqns(ctx: Context, eqns, env: dict) -> None:
    """Runs equations in order, reading and writing `env` (var -> value)."""
    for eqn in eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if not any(map(is_lin, invals)):
            outvals = bind(eqn, invals)
        else:
            rule = ALL_RULES.get(eqn.primitive.name)
            if rule is None:
                ctx.fail(eqn, "it has a line-dependent operand and no tracking rule")
            ctx.shared["stack"].append(eqn)
            try:
                outvals = rule(ctx, eqn, invals)
            finally:
                ctx.shared["stack"].pop()
        for var, val in zip(eqn.outvars, outvals, strict=True):
            env[var] = val


# Segments of a flat program (no sampler scan) that the memo keeps, at most.
SEGMENTS = 16


def _reaches_scan(jaxpr) -> bool:
    """Whether a top-level scan (the step memo's unit) is met, calls inlined."""
    return any(
        e.primitive.name == "scan"
        or (e.primitive.name in CALLS and _reaches_scan(sub_jaxpr(e).jaxpr))
        for e in jaxpr.eqns
    )


def _segments(jaxpr, args, n_max: int):
    """The line-dependent equations cut into up to n_max runs of about equal products.

    Returns (constant equations, [(equations, live vars after the run)]): a var is
    live after run s when a later run or the output reads it.
    """
    dep = {v for v, a in zip(jaxpr.invars, args, strict=True) if is_lin(a)}
    const_eqns, lin_eqns = [], []
    for e in jaxpr.eqns:
        if any(not isinstance(v, jex_core.Literal) and v in dep for v in e.invars):
            dep.update(e.outvars)
            lin_eqns.append(e)
        else:
            const_eqns.append(e)
    products = [
        e.primitive.name in ("dot_general", "conv_general_dilated") for e in lin_eqns
    ]
    total = max(sum(products), 1)
    n = min(n_max, total)
    runs, done = [[] for _ in range(n)], 0
    for e, is_product in zip(lin_eqns, products, strict=True):
        runs[min(done * n // total, n - 1)].append(e)
        done += is_product
    runs = [r for r in runs if r]

    def names(vs):
        return {v for v in vs if not isinstance(v, jex_core.Literal)}

    order = {v: i for i, v in enumerate(v for r in runs for e in r for v in e.outvars)}
    defined, upto = set(), []
    for r in runs:
        defined |= {v for e in r for v in e.outvars}
        upto.append(set(defined))
    read_later, live = names(jaxpr.outvars), [None] * len(runs)
    for k in range(len(runs) - 1, -1, -1):
        live[k] = sorted(read_later & upto[k], key=order.__getitem__)
        read_later |= {v for e in runs[k] for v in names(e.invars)}
    return const_eqns, list(zip(runs, live, strict=True))


def _eval_segments(ctx: Context, jaxpr, consts, args) -> list:
    """`eval_jaxpr` of a flat root program with the memo kept per segment.

    The step memo's unit is a sampler step; a program without a scan (an ONNX graph,
    the sampler unrolled) is cut into segments instead (`_segments`). The memo keeps,
    per segment, the affine forms of the values live after it and the piece of
    everything up to it; a query recomputes from the first segment whose piece does
    not hold at z (`lax.cond`), exactly as the step memo does for steps.
    """
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    const_eqns, runs = _segments(jaxpr, args, SEGMENTS)
    _eval_eqns(ctx, const_eqns, env)
    slot = len(ctx.memo_out)
    cached = ctx.memo[slot : slot + len(runs)] or None
    if cached is not None:
        k_star = _reusable_steps(
            ctx,
            jnp.concatenate([m.lo for m in cached]),
            jnp.concatenate([m.hi for m in cached]),
        )
    z, state, flat, names, flags = ctx.z, ctx.state, [], [], []
    for k, (eqns, live) in enumerate(runs):
        record: dict = {}

        def compute(state, carry, eqns=eqns, live=live, names=names, flags=flags,
                    record=record):  # fmt: skip
            child = ctx.child(state)
            local = dict(env)
            local.update(zip(names, unflatten(carry, flags), strict=True))
            _eval_eqns(child, eqns, local)
            out = [local[v] for v in live]
            record["flags"] = flags_of(out)
            return child.state, flatten(out)

        jax.eval_shape(compute, state, flat)
        out_flags = record["flags"]

        def fresh(state, carry, compute=compute):
            st, new = compute(state, carry)
            one = [x[None] for x in (z, *st)]
            return st, new, StepMemo(*one, [x[None] for x in new], [])

        def reuse(state, carry, out_flags=out_flags, k=k):
            m = cached[k]
            lo, hi = jnp.maximum(state[0], m.lo[0]), jnp.minimum(state[1], m.hi[0])
            st = (lo, hi, m.fp[0])
            return st, _shift([x[0] for x in m.carry], out_flags, m.z[0], z), m

        if cached is None:
            state, flat, entry = fresh(state, flat)
        else:
            state, flat, entry = lax.cond(k < k_star, reuse, fresh, state, flat)
        ctx.memo_out.append(entry)
        names, flags = live, out_flags
    ctx.set_state(state)
    env.update(zip(names, unflatten(flat, flags), strict=True))
    return [_read(env, v) for v in jaxpr.outvars]


def validate_line(a, b, z, direction):
    """Checks the line a + b z and the query (z, direction) of a tracker.

    Raises:
      InputError: a and b differ in shape or are not floating, z is not a scalar,
        or direction is not +1 or -1.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"a and b must have the same shape; got {a.shape=} {b.shape=}")
    if jnp.ndim(z) != 0:
        raise InputError(f"z must be a scalar; got shape {jnp.shape(z)}")
    if not isinstance(direction, jax.core.Tracer):
        d = np.asarray(direction)
        if d.ndim != 0 or d not in (-1, 1):
            raise InputError(f"direction must be +1 or -1; got {direction!r}")
    dtype = jnp.result_type(a, b, jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):  # pragma: no cover
        raise InputError(f"a and b must be floating; got {dtype=}")
    return a.astype(dtype), b.astype(dtype)


def make_line_jaxpr(f: Callable, shape, dtype):
    """Traces f on an abstract x of the line's shape; returns (jaxpr, out treedef)."""
    closed, out_shape = jax.make_jaxpr(f, return_shape=True)(
        jax.ShapeDtypeStruct(shape, dtype)
    )
    return closed, jax.tree.structure(out_shape)


def _run(closed, treedef, a, b, z, direction, tie_tol, fingerprint, memo):
    dtype = a.dtype
    z = jnp.asarray(z, dtype)
    direction = jnp.asarray(direction, dtype)
    tau = jnp.asarray(tie_tol, dtype) * jnp.maximum(1.0, jnp.abs(z))
    inf = jnp.asarray(jnp.inf, dtype)
    state = (-inf, inf, jnp.zeros((), dtype))
    ctx = Context(z, direction, tau, state, fingerprint, memo=memo)
    args = [Lin(a + b * z, b)]
    if memo is not None and not _reaches_scan(closed.jaxpr):
        outs = _eval_segments(ctx, closed.jaxpr, closed.consts, args)
    else:
        outs = eval_jaxpr(ctx, closed.jaxpr, closed.consts, args)
    leaves = []
    for x, aval in zip(outs, closed.out_avals, strict=True):
        if is_lin(x):
            leaves.append(Affine(x.value - x.slope * z, x.slope))
        else:
            x = jnp.broadcast_to(jnp.asarray(x, aval.dtype), aval.shape)
            if jnp.issubdtype(aval.dtype, jnp.floating):
                leaves.append(Affine(x, jnp.zeros_like(x)))
            else:
                leaves.append(x)
    out = jax.tree.unflatten(treedef, leaves)
    return Piece(out, ctx.lo, ctx.hi), ctx.fp, tuple(ctx.memo_out)


def track_jaxpr(
    closed, treedef, a, b, z, direction=1, *, tie_tol=DEFAULT_TIE_TOL, fingerprint=False
):
    """`track` on an already traced jaxpr. Returns (Piece, fingerprint scalar)."""
    piece, fp, _ = _run(closed, treedef, a, b, z, direction, tie_tol, fingerprint, None)
    return piece, fp


def track(f: Callable, *, tie_tol: float = DEFAULT_TIE_TOL) -> Callable[..., Piece]:
    """Exact piecewise-linear tracking of f along the line x(t) = a + b t.

    `track(f)(a, b, z, direction=1)` returns the `Piece` of f containing z: the affine
    form of every floating output and the largest interval [lo, hi] around z on which
    every discrete choice of f (ReLU and abs signs, max winners, comparisons) is fixed.
    On a breakpoint the piece on the side of `direction` is returned, so a search walks
    right with `track(f)(a, b, piece.hi, +1)` and left with `(a, b, piece.lo, -1)`.

    Works under `jit` and `vmap` (over a, b, z, direction) and traces f once per call
    trace. Closed-over constants of f (network weights) are fine.

    Args:
      f: function of one array x of the shape of `a`; any pytree output. Must be
        piecewise linear in x (docs/method.md §4).
      tie_tol: relative tie tolerance tau / max(1, |z|) (see module docstring).

    Returns:
      A function `(a, b, z, direction=1) -> Piece` with a, b: (...) floating arrays of
      one shape, z: () scalar, direction: () +1 or -1.

    Raises:
      NotPiecewiseLinearError: a primitive that is not piecewise linear (exp, logistic,
        a product of two line-dependent operands, ...) sees a line-dependent operand;
        the message names the primitive and the user's source line.
    """

    def tracked(a, b, z, direction=1) -> Piece:
        a, b = validate_line(a, b, z, direction)
        closed, treedef = make_line_jaxpr(f, a.shape, a.dtype)
        piece, _ = track_jaxpr(closed, treedef, a, b, z, direction, tie_tol=tie_tol)
        return piece

    return tracked


def memo_init(f: Callable, a, b, *, tie_tol: float = DEFAULT_TIE_TOL):
    """The empty step memo of `track_memo(f)` on the line a + b t (nothing cached)."""
    a, b = validate_line(a, b, 0.0, 1)
    closed, treedef = make_line_jaxpr(f, a.shape, a.dtype)
    shapes = jax.eval_shape(
        lambda a, b: _run(closed, treedef, a, b, 0.0, 1, tie_tol, False, ())[2], a, b
    )
    return tuple(StepMemo.empty(e) for e in shapes)


def track_memo(f: Callable, *, tie_tol: float = DEFAULT_TIE_TOL):
    """`track` that skips the sampler steps whose piece still holds.

    `track_memo(f)(a, b, z, direction, memo) -> (piece, memo)` returns the same piece
    as `track(f)(a, b, z, direction)` (affine forms equal to rounding) and a new memo.
    For every top-level `lax.scan` of f (a sampler's steps) the memo keeps, per step,
    the affine forms of the step's outputs and the piece [lo_k, hi_k] of everything up
    to and including that step. Where z lies inside [lo_k, hi_k] and more than the tie
    tolerance away from its end on the side of `direction`, no decision up to step k
    changes, so steps 0..k are not evaluated: their outputs are their affine forms at
    z. A walk along the line recomputes only from the step whose units flip; across a
    breakpoint the values are continuous and only the later steps' slopes change.
    A program without a scan (an imported ONNX graph, a sampler unrolled in Python) is
    cut into up to `SEGMENTS` runs of equations with about equal matrix products
    instead, and the memo keeps the values live after each run the same way.

    The memo is only valid for the same line (a, b) and the same constants of f: start
    each line with `memo_init(f, a, b)`. Use it unbatched: under `vmap` over z the
    skip becomes a select that computes every step (no gain), and JAX's batching of
    that branch broadcasts the constants (network weights), which some convolutions
    do not support; `dal_test_batch` therefore turns the memo off for lockstep lanes.
    """

    def tracked(a, b, z, direction, memo):
        a, b = validate_line(a, b, z, direction)
        closed, treedef = make_line_jaxpr(f, a.shape, a.dtype)
        piece, _, memo = _run(closed, treedef, a, b, z, direction, tie_tol, False, memo)
        return piece, memo

    return tracked


def evaluate(piece: Piece, t) -> Any:
    """The outputs of a piece at t: alpha + beta t for Affine leaves, others as is."""
    return jax.tree.map(
        lambda x: x.at(t) if isinstance(x, Affine) else x,
        piece.out,
        is_leaf=lambda x: isinstance(x, Affine),
    )
