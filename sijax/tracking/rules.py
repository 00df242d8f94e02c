"""One rule per primitive: how a (value at z, slope) pair goes through it.

A rule has the signature `rule(ctx, eqn, invals) -> list of outvals`, where each inval
is either a constant array or a `Lin` (value at z, slope). The interpreter only calls a
rule when at least one operand is `Lin`; equations on constants alone are evaluated with
the primitive itself.

* Linear rules (add, dot with a constant, conv with a constant, reshape, pad, gather,
  ...) are exact through forward-mode differentiation: for a map that is affine in its
  line-dependent operands, `jax.jvp` returns exactly its value at z and its slope.
* Piecewise rules (max, min, abs, sign, comparisons, reduce_max, argmax, max pooling)
  take a discrete decision and shrink the piece with `ctx.keep_nonneg` to where it
  holds.

docs/method.md §4 lists what is (and is not) piecewise linear.
"""

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import source_info_util

from sijax.tracking.affine import Lin

Rule = Callable[..., list]


def is_lin(x) -> bool:
    """Whether an interpreter value depends on the line."""
    return isinstance(x, Lin)


def bind(eqn, invals: Sequence) -> list:
    """Evaluates one equation on plain arrays with its own primitive; returns a list."""
    prim = eqn.primitive
    params = prim.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # older jax returned (subfuns, params)
        subfuns, params = params
    # Keep the user's source line on the re-traced equation (for later error messages).
    with source_info_util.user_context(eqn.source_info.traceback):
        out = prim.bind(*subfuns, *invals, **params)
    return list(out) if prim.multiple_results else [out]


def as_pair(x, shape, dtype) -> tuple[jax.Array, jax.Array]:
    """(value, slope) of an operand broadcast to `shape` (slope 0 for a constant)."""
    if is_lin(x):
        return jnp.broadcast_to(x.value, shape), jnp.broadcast_to(x.slope, shape)
    v = jnp.broadcast_to(jnp.asarray(x, dtype), shape)
    return v, jnp.zeros(shape, dtype)


def _out_aval(eqn, i: int = 0):
    return eqn.outvars[i].aval


# --------------------------------------------------------------------------- linear


def with_operands(eqn, invals: Sequence, idx: Sequence[int]) -> Callable:
    """The equation as a function of its operands at `idx`, the others fixed."""

    def fun(*values):
        args = list(invals)
        for i, v in zip(idx, values, strict=True):
            args[i] = v
        return bind(eqn, args)

    return fun


def linear_rule(ctx, eqn, invals) -> list:
    """Any map that is affine in its line-dependent operands (constants closed over)."""
    idx = [i for i, x in enumerate(invals) if is_lin(x)]
    fun = with_operands(eqn, invals, idx)
    primals = tuple(invals[i].value for i in idx)
    tangents = tuple(invals[i].slope for i in idx)
    values, slopes = jax.jvp(fun, primals, tangents)
    return [Lin(v, s) for v, s in zip(values, slopes, strict=True)]


def not_piecewise_linear(eqn, varying: Sequence[bool]) -> str | None:
    """Why ``eqn`` is not piecewise linear along the line when the operands marked in
    ``varying`` vary with it (None: it is, as far as its kind of primitive goes).

    The one verdict of both trackers for products, quotients, conversions and integer
    powers: the walking rules mark every line-dependent operand, breakpoint
    propagation only the affine ones (a piecewise-constant factor such as
    ``sign(u)`` times an affine value is piecewise linear).
    """
    name = eqn.primitive.name
    if name in ("mul", "dot_general", "conv_general_dilated") and sum(varying) > 1:
        return "it multiplies two line-dependent operands"
    if name == "div" and varying[1]:
        return "it divides by a line-dependent operand"
    if name == "convert_element_type" and not jnp.issubdtype(
        eqn.params["new_dtype"], jnp.floating
    ):
        return "it rounds a line-dependent value to an integer or boolean"
    if name == "integer_pow" and eqn.params["y"] != 1:
        return f"x ** {eqn.params['y']} is not piecewise linear"
    return None


def _check(ctx, eqn, invals) -> None:
    why = not_piecewise_linear(eqn, [is_lin(x) for x in invals])
    if why:
        ctx.fail(eqn, why)


def bilinear_rule(ctx, eqn, invals) -> list:
    """mul, dot_general, conv: linear when at most one operand depends on the line."""
    _check(ctx, eqn, invals)
    if eqn.primitive.name in STACKED:
        return _stacked_product(eqn, invals)
    return linear_rule(ctx, eqn, invals)


# Products whose value and slope go through one product with twice the rows. Not
# conv_general_dilated: under an outer vmap (lanes) its batching rule folds the lanes
# into feature groups, which fails for a 1x1 conv with one output channel; and value
# and slope concatenated as twice the batch of one convolution measured no faster
# than two (16x16: 26.9 vs 26.4 ms per tracked piece, 32x32: 81.6 vs 84.9).
STACKED = ("dot_general",)


def _stacked_product(eqn, invals) -> list:
    """Value and slope of a dot_general with a constant as ONE product.

    The product is linear in its line-dependent operand, so value and slope are the
    same map applied to two arrays. `vmap` over the pair folds the pair axis into a
    free (row or batch) dimension of that operand: one matrix product with twice the
    rows, which the CPU runs faster than two (better blocking at these small sizes).
    """
    i = next(k for k, x in enumerate(invals) if is_lin(x))

    def apply(u):
        args = list(invals)
        args[i] = u
        return bind(eqn, args)[0]

    out = jax.vmap(apply)(jnp.stack([invals[i].value, invals[i].slope]))
    return [Lin(out[0], out[1])]


def div_rule(ctx, eqn, invals) -> list:
    """x / c is linear in x; c(t) in the denominator is not."""
    _check(ctx, eqn, invals)
    return linear_rule(ctx, eqn, invals)


def identity_rule(ctx, eqn, invals) -> list:
    """stop_gradient, optimization_barrier: the value passes through unchanged.

    (jvp would zero the slope of stop_gradient, which is wrong here: we track values.)
    """
    return list(invals)


def convert_rule(ctx, eqn, invals) -> list:
    """convert_element_type: linear between floating dtypes only."""
    _check(ctx, eqn, invals)
    return linear_rule(ctx, eqn, invals)


def integer_pow_rule(ctx, eqn, invals) -> list:
    """x ** 1 is the only piecewise-linear integer power."""
    _check(ctx, eqn, invals)
    return list(invals)


def debug_callback_rule(ctx, eqn, invals) -> list:
    """jax.debug.print / callback: shows the values at z."""
    return bind(eqn, [x.value if is_lin(x) else x for x in invals])


# --------------------------------------------------------------------------- piecewise


def _sign_of_difference(ctx, eqn, x, y):
    """Sign of u = x - y on the piece, with the piece cut where u changes sign."""
    shape = _out_aval(eqn).shape
    dtype = (x if is_lin(x) else y).value.dtype
    xv, xs = as_pair(x, shape, dtype)
    yv, ys = as_pair(y, shape, dtype)
    sigma = ctx.decide(xv - yv, xs - ys)
    return sigma, (xv, xs), (yv, ys)


def max_rule(ctx, eqn, invals) -> list:
    """max(x, y) = x where x - y > 0 on the piece, else y."""
    sigma, (xv, xs), (yv, ys) = _sign_of_difference(ctx, eqn, *invals)
    take_x = sigma >= 0
    return [Lin(jnp.where(take_x, xv, yv), jnp.where(take_x, xs, ys))]


def min_rule(ctx, eqn, invals) -> list:
    """min(x, y) = x where x - y < 0 on the piece, else y."""
    sigma, (xv, xs), (yv, ys) = _sign_of_difference(ctx, eqn, *invals)
    take_x = sigma <= 0
    return [Lin(jnp.where(take_x, xv, yv), jnp.where(take_x, xs, ys))]


def clamp_rule(ctx, eqn, invals) -> list:
    """clamp(lo, x, hi) = min(max(x, lo), hi)."""
    lo, x, hi = invals
    (y,) = max_rule(ctx, eqn, [x, lo])
    return min_rule(ctx, eqn, [y, hi])


def abs_rule(ctx, eqn, invals) -> list:
    """|x| = sign(x) * x with the sign fixed on the piece."""
    (x,) = invals
    sigma = ctx.decide(x.value, x.slope)
    flip = jnp.where(sigma < 0, -1, 1).astype(x.value.dtype)
    return [Lin(flip * x.value, flip * x.slope)]


def sign_rule(ctx, eqn, invals) -> list:
    """sign(x) is a constant on the piece."""
    (x,) = invals
    return [ctx.decide(x.value, x.slope).astype(x.value.dtype)]


# The comparison primitives, each x OP y as a test of the sign of x - y.
COMPARE = {
    "gt": lambda s: s > 0,
    "ge": lambda s: s >= 0,
    "lt": lambda s: s < 0,
    "le": lambda s: s <= 0,
    "eq": lambda s: s == 0,
    "ne": lambda s: s != 0,
}


def compare_rule(ctx, eqn, invals) -> list:
    """x OP y is a constant boolean on the piece; it ends where x - y crosses 0."""
    sigma, _, _ = _sign_of_difference(ctx, eqn, *invals)
    return [COMPARE[eqn.primitive.name](sigma)]


def to_last(v: jax.Array, axes: Sequence[int]) -> jax.Array:
    """Moves `axes` to the end and flattens them into one."""
    keep = [i for i in range(v.ndim) if i not in axes]
    v = jnp.transpose(v, keep + list(axes))
    return v.reshape(v.shape[: len(keep)] + (-1,))


def _reduce_max(ctx, eqn, x: Lin, axes: Sequence[int], negate: bool):
    """Winner of a max (or min) over `axes`: (value, slope, flat winner index)."""
    v, s = to_last(x.value, axes), to_last(x.slope, axes)
    if negate:
        v, s = -v, -s
    win, wv, ws = ctx.argmax_last(v, s)
    if negate:
        wv, ws = -wv, -ws
    return wv, ws, win


def reduce_max_rule(ctx, eqn, invals) -> list:
    """reduce_max / reduce_min: the winning element is fixed on the piece."""
    (x,) = invals
    negate = eqn.primitive.name == "reduce_min"
    wv, ws, _ = _reduce_max(ctx, eqn, x, eqn.params["axes"], negate)
    return [Lin(wv, ws)]


def argmax_rule(ctx, eqn, invals) -> list:
    """argmax / argmin: the winning index is a constant on the piece (first on ties)."""
    (x,) = invals
    negate = eqn.primitive.name == "argmin"
    _, _, win = _reduce_max(ctx, eqn, x, eqn.params["axes"], negate)
    return [win.astype(eqn.params["index_dtype"])]


def reduce_windows(x: jax.Array, fill, params) -> jax.Array:
    """All windows of a reduce_window as a trailing axis: (*out_shape, window_size)."""
    wd = params["window_dimensions"]
    strides = params["window_strides"]
    base = params["base_dilation"]
    wdil = params["window_dilation"]
    pads = zip(params["padding"], base, strict=True)
    pad_cfg = [(lo, hi, b - 1) for (lo, hi), b in pads]
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), pad_cfg)
    out_shape = [
        (n - (w - 1) * d - 1) // st + 1
        for n, w, d, st in zip(xp.shape, wd, wdil, strides, strict=True)
    ]
    slices = []
    for offset in itertools.product(*(range(w) for w in wd)):
        start = [o * d for o, d in zip(offset, wdil, strict=True)]
        limit = [
            st0 + (n - 1) * st + 1
            for st0, n, st in zip(start, out_shape, strides, strict=True)
        ]
        slices.append(lax.slice(xp, start, limit, strides))
    return jnp.stack(slices, axis=-1)


def reduce_window_max_rule(ctx, eqn, invals) -> list:
    """Max pooling: a reduce_max over the gathered windows (padding holds -inf)."""
    (x,) = invals
    negate = eqn.primitive.name == "reduce_window_min"
    fill = jnp.inf if negate else -jnp.inf
    v = reduce_windows(x.value, fill, eqn.params)
    s = reduce_windows(x.slope, 0.0, eqn.params)
    if negate:
        v, s = -v, -s
    _, wv, ws = ctx.argmax_last(v, s)
    if negate:
        wv, ws = -wv, -ws
    return [Lin(wv, ws)]


def reduce_window_rule(ctx, eqn, invals) -> list:
    """Generic reduce_window (an init value that is not a literal, e.g. jnp.zeros):
    supported when the reduction is a single add, max or min."""
    body = eqn.params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    ops = [e.primitive.name for e in body.eqns]
    if len(invals) != 2 or ops not in (["add"], ["max"], ["min"]):
        ctx.fail(eqn, f"a window reduction by {ops} is not supported")
    x, init = invals
    if is_lin(init):
        ctx.fail(eqn, "its initial value depends on the line")
    init = jnp.asarray(init, x.value.dtype)
    v = reduce_windows(x.value, init, eqn.params)
    s = reduce_windows(x.slope, 0.0, eqn.params)
    if ops == ["add"]:
        return [Lin(jnp.sum(v, axis=-1) + init, jnp.sum(s, axis=-1))]
    # The initial value takes part in the max/min like one more (constant) entry.
    v = jnp.concatenate([v, jnp.broadcast_to(init, v.shape[:-1] + (1,))], axis=-1)
    s = jnp.concatenate([s, jnp.zeros(s.shape[:-1] + (1,), s.dtype)], axis=-1)
    sign = -1 if ops == ["min"] else 1
    _, wv, ws = ctx.argmax_last(sign * v, sign * s)
    return [Lin(sign * wv, sign * ws)]


# --------------------------------------------------------------------------- table

LINEAR = (
    "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim",
    "concatenate", "pad", "slice", "squeeze", "expand_dims", "rev", "gather",
    "dynamic_slice", "dynamic_update_slice", "scatter-add", "scatter_add", "scatter",
    "reduce_sum", "reduce_window_sum", "cumsum", "select_n", "copy", "copy_p",
    "reduce_precision", "real", "split", "stack", "unstack", "device_put",
    "sharding_constraint", "mesh_cast", "reshard", "pvary", "name",
)  # fmt: skip

RULES: dict[str, Rule] = {name: linear_rule for name in LINEAR}
RULES.update(
    {
        "mul": bilinear_rule,
        "dot_general": bilinear_rule,
        "conv_general_dilated": bilinear_rule,
        "div": div_rule,
        "convert_element_type": convert_rule,
        "integer_pow": integer_pow_rule,
        "stop_gradient": identity_rule,
        "optimization_barrier": identity_rule,
        "debug_callback": debug_callback_rule,
        "max": max_rule,
        "min": min_rule,
        "clamp": clamp_rule,
        "abs": abs_rule,
        "sign": sign_rule,
        "reduce_max": reduce_max_rule,
        "reduce_min": reduce_max_rule,
        "argmax": argmax_rule,
        "argmin": argmax_rule,
        "reduce_window_max": reduce_window_max_rule,
        "reduce_window_min": reduce_window_max_rule,
        "reduce_window": reduce_window_rule,
        **{name: compare_rule for name in COMPARE},
    }
)
