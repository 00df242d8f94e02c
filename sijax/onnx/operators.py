"""The operator table and the element-wise and shape operators of the ONNX import.

Each operator is written with plain ``jax.numpy``/``lax`` operations that
:func:`sijax.track` follows; constant (NumPy) operands are folded with NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.errors import InputError, UnsupportedOperatorError
from sijax.onnx.graph import Node, is_static


class Ctx:
    """What an operator implementation may consult besides its inputs."""

    def __init__(self, node: Node, static: dict, opset: int, dtype):
        self.node = node
        self.static = static
        self.opset = opset
        self.dtype = dtype

    def attr(self, name, default=None):
        return self.node.attr(name, default)

    def fail(self, detail: str):
        return UnsupportedOperatorError(self.node.op_type, self.node.name, detail)

    def const(self, value, k: int, what: str) -> np.ndarray | None:
        """Input ``k`` as a NumPy constant (None if the input is absent)."""
        if value is None:
            return None
        name = self.node.inputs[k]
        if name in self.static:
            return self.static[name].array
        if isinstance(value, np.ndarray):
            return value
        raise self.fail(f"{what} (input {k}, {name!r}) must be a constant")


OPS: dict[str, Callable] = {}


def implements(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return register


def broadcast_ranks(*xs):
    """Prepends unit axes so that all operands have one rank (ONNX broadcasting).

    Explicit, because sijax runs with ``jax_numpy_rank_promotion="raise"``.
    """
    rank = max(np.ndim(x) for x in xs)
    return [
        x
        if np.ndim(x) == rank
        else x.reshape((1,) * (rank - np.ndim(x)) + tuple(np.shape(x)))
        for x in xs
    ]


def _binary(fn_np, fn_jnp):
    def apply(ctx, a, b):
        a, b = broadcast_ranks(a, b)
        if is_static(a, b):
            return np.asarray(fn_np(a, b))
        return fn_jnp(a, b)

    return apply


OPS["Add"] = _binary(np.add, jnp.add)
OPS["Sub"] = _binary(np.subtract, jnp.subtract)
OPS["Mul"] = _binary(np.multiply, jnp.multiply)


@implements("Div")
def _div(ctx, a, b):
    a, b = broadcast_ranks(a, b)
    if is_static(a, b):
        if np.issubdtype(np.result_type(a, b), np.integer):
            return np.asarray(np.trunc(a / b).astype(np.result_type(a, b)))
        return np.asarray(a / b)
    return jnp.divide(a, b)


@implements("Identity")
def _identity(ctx, x):
    return x


@implements("Relu")
def _relu(ctx, x):
    # max(x, 0) rather than jax.nn.relu: a plain max primitive for the tracker.
    return jnp.maximum(x, jnp.zeros((), jnp.result_type(x)))


@implements("LeakyRelu")
def _leaky_relu(ctx, x):
    alpha = ctx.attr("alpha", 0.01)
    return jnp.maximum(x, 0.0) + alpha * jnp.minimum(x, 0.0)


@implements("Abs")
def _abs(ctx, x):
    return np.abs(x) if is_static(x) else jnp.abs(x)


@implements("Neg")
def _neg(ctx, x):
    return np.negative(x) if is_static(x) else jnp.negative(x)


# Not piecewise linear: imported so that a plain forward pass works; the tracker
# rejects them by name (NotPiecewiseLinearError) if they see the line.
@implements("Sigmoid")
def _sigmoid(ctx, x):
    return jax.nn.sigmoid(x)


@implements("Tanh")
def _tanh(ctx, x):
    return jnp.tanh(x)


@implements("Exp")
def _exp(ctx, x):
    return jnp.exp(x)


@implements("Cast")
def _cast(ctx, x):
    import onnx

    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ctx.attr("to")))
    if np.issubdtype(to, np.floating):
        to = ctx.dtype  # floats compute in the load dtype
    if is_static(x):
        return np.asarray(x).astype(to)
    return jnp.asarray(x).astype(to)


@implements("Shape")
def _shape(ctx, x):
    shape = np.asarray(np.shape(x), np.int64)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return shape[start:end]


@implements("ConstantOfShape")
def _constant_of_shape(ctx, shape):
    shape = ctx.const(shape, 0, "shape")
    value = ctx.attr("value")
    fill = value.array.reshape(()) if value is not None else np.float32(0.0)
    dt = ctx.dtype if np.issubdtype(fill.dtype, np.floating) else fill.dtype
    return np.full(tuple(int(s) for s in shape), fill, dtype=dt)


def _axes(axes, rank):
    return tuple(sorted(int(a) % rank for a in np.atleast_1d(axes)))


@implements("Unsqueeze")
def _unsqueeze(ctx, x, axes=None):
    axes = ctx.const(axes, 1, "axes") if axes is not None else ctx.attr("axes")
    if axes is None:
        raise ctx.fail("Unsqueeze needs axes")
    rank = np.ndim(x) + len(np.atleast_1d(axes))
    shape = list(np.shape(x))
    for a in _axes(axes, rank):
        shape.insert(a, 1)
    return x.reshape(tuple(shape))


@implements("Squeeze")
def _squeeze(ctx, x, axes=None):
    axes = ctx.const(axes, 1, "axes") if axes is not None else ctx.attr("axes")
    shape = np.shape(x)
    if axes is None:
        axes = tuple(i for i, s in enumerate(shape) if s == 1)
    axes = _axes(axes, len(shape)) if len(np.atleast_1d(axes)) else ()
    for a in axes:
        if shape[a] != 1:
            raise ctx.fail(f"cannot squeeze axis {a} of size {shape[a]}")
    return x.reshape(tuple(s for i, s in enumerate(shape) if i not in axes))


@implements("Flatten")
def _flatten(ctx, x):
    axis = ctx.attr("axis", 1) % (np.ndim(x) + 1) if np.ndim(x) else 0
    shape = np.shape(x)
    return x.reshape((math.prod(shape[:axis]), math.prod(shape[axis:])))


@implements("Reshape")
def _reshape(ctx, x, shape):
    shape = [int(s) for s in ctx.const(shape, 1, "shape")]
    if not ctx.attr("allowzero", 0):
        shape = [np.shape(x)[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(tuple(shape))


@implements("Transpose")
def _transpose(ctx, x):
    perm = ctx.attr("perm") or tuple(reversed(range(np.ndim(x))))
    return np.transpose(x, perm) if is_static(x) else jnp.transpose(x, perm)


@implements("Concat")
def _concat(ctx, *xs):
    xs = [x for x in xs if x is not None]
    axis = ctx.attr("axis")
    if is_static(*xs):
        return np.concatenate(xs, axis=axis)
    dt = jnp.result_type(*xs)
    return jnp.concatenate([jnp.asarray(x, dt) for x in xs], axis=axis)


@implements("Gather")
def _gather(ctx, x, indices):
    indices = ctx.const(indices, 1, "indices").astype(np.int64)
    axis = ctx.attr("axis", 0) % np.ndim(x)
    n = np.shape(x)[axis]
    if np.any((indices < -n) | (indices >= n)):
        raise InputError(
            f"Gather node {ctx.node.name!r}: indices out of range "
            f"for an axis of size {n}"
        )
    indices = np.where(indices < 0, indices + n, indices)
    if is_static(x):
        return np.take(x, indices, axis=axis)
    return jnp.take(x, indices, axis=axis)


def _slice_axis(x, axis, start, end, step):
    """ONNX Slice semantics on one axis (clamped starts/ends, any non-zero step)."""
    n = np.shape(x)[axis]
    if step == 0:
        raise InputError("Slice step must be non-zero")
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, -1), n - 1), min(max(end, -1), n - 1)
    idx = np.arange(start, end, step)
    if step > 0 and len(idx) == 0:
        idx = np.arange(0)
    if is_static(x):
        return np.take(x, idx, axis=axis)
    if step > 0 and len(idx) > 0:
        return lax.slice_in_dim(x, int(idx[0]), int(idx[-1]) + 1, step, axis)
    return jnp.take(x, idx, axis=axis)


@implements("Slice")
def _slice(ctx, x, starts=None, ends=None, axes=None, steps=None):
    if ctx.opset < 10:
        starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes")
        steps = None
    else:
        starts = ctx.const(starts, 1, "starts")
        ends = ctx.const(ends, 2, "ends")
        axes = ctx.const(axes, 3, "axes")
        steps = ctx.const(steps, 4, "steps")
    rank = np.ndim(x)
    axes = range(len(starts)) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    big = np.iinfo(np.int64).max
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        e = min(int(e), big // 2) if int(e) > 0 else max(int(e), -big // 2)
        x = _slice_axis(x, a, int(s), e, int(st))
    return x


@implements("Pad")
def _pad(ctx, x, pads=None, value=None, axes=None):
    rank = np.ndim(x)
    if ctx.opset < 11:
        pads, value = ctx.attr("pads"), ctx.attr("value", 0.0)
    else:
        pads = ctx.const(pads, 1, "pads")
        value = ctx.const(value, 2, "constant_value")
        axes = ctx.const(axes, 3, "axes")
        value = (
            0.0
            if value is None or np.size(value) == 0
            else float(np.reshape(value, ()))
        )
    pads = [int(p) for p in pads]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    k = len(axes)
    width = [(0, 0)] * rank
    for i, a in enumerate(axes):
        width[a] = (pads[i], pads[i + k])
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        cfg = [(lo, hi, 0) for lo, hi in width]
        x = jnp.asarray(x)
        return lax.pad(x, jnp.asarray(value, x.dtype), cfg)
    if any(lo < 0 or hi < 0 for lo, hi in width):
        raise ctx.fail(f"negative pads with mode {mode!r}")
    if mode in ("reflect", "edge"):
        return jnp.pad(x, width, mode=mode)
    raise ctx.fail(f"Pad mode {mode!r}")


@implements("Expand")
def _expand(ctx, x, shape):
    shape = np.asarray(ctx.const(shape, 1, "shape"), np.int64)
    x, shape = broadcast_ranks(x, np.ones(tuple(int(s) for s in shape)))
    out = np.broadcast_shapes(np.shape(x), np.shape(shape))
    return np.broadcast_to(x, out) if is_static(x) else jnp.broadcast_to(x, out)


def split_sizes(ctx, n: int, split) -> list[int]:
    """The part sizes of a Split of an axis of size ``n``.

    From the ``split`` input (opset 13+) or attribute (before 13); else
    ``num_outputs`` (opset 18) or the number of outputs, in equal parts of
    ``ceil(n / parts)`` with a smaller last part (opset 18's rule).
    """
    if ctx.opset < 13:
        sizes = ctx.attr("split")
    else:
        sizes = ctx.const(split, 1, "split")
    parts = len(ctx.node.outputs)
    if sizes is None or np.size(sizes) == 0:
        num = ctx.attr("num_outputs")
        if num is not None and int(num) != parts:
            raise InputError(
                f"Split node {ctx.node.name!r}: num_outputs={num} but {parts} outputs"
            )
        chunk = -(-n // parts)
        sizes = [chunk] * (parts - 1) + [n - chunk * (parts - 1)]
    sizes = [int(s) for s in np.atleast_1d(sizes)]
    if len(sizes) != parts or sum(sizes) != n or min(sizes) < 0:
        raise InputError(
            f"Split node {ctx.node.name!r}: parts {sizes} for {parts} outputs of "
            f"an axis of size {n}"
        )
    return sizes


def split_parts(x, axis: int, sizes) -> tuple:
    """``x`` cut into consecutive slices of ``sizes`` along ``axis``."""
    bounds = np.cumsum([0, *sizes])
    if is_static(x):
        return tuple(np.split(x, bounds[1:-1], axis=axis))
    return tuple(
        lax.slice_in_dim(x, int(lo), int(hi), 1, axis)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    )


@implements("Split")
def _split(ctx, x, split=None):
    axis = ctx.attr("axis", 0) % np.ndim(x)
    return split_parts(x, axis, split_sizes(ctx, np.shape(x)[axis], split))


def _normal_draw(ctx, shape, default_dtype=None) -> np.ndarray:
    """The draw of RandomNormal(Like): ``mean + scale * z``, a NumPy constant.

    ``z`` is NumPy's legacy ``RandomState(seed).standard_normal`` (the stream of
    ``onnx.reference.ReferenceEvaluator``), rounded to the ``dtype`` attribute when
    it is given (RandomNormal's default: float32). It is sijax's own draw:
    onnxruntime and PyTorch produce other numbers from the same seed. A seed is
    required, so that the imported function stays a deterministic, pure function
    of its inputs; for the tracker the draw is a constant (it does not depend on
    the line).
    """
    import onnx

    seed = ctx.attr("seed")
    if seed is None:
        raise ctx.fail(
            "a random draw without a seed (sijax imports a graph as a pure "
            "function: set the seed attribute)"
        )
    if not 0 <= int(seed) < 2**32:
        raise ctx.fail(f"seed={seed} (must lie in [0, 2**32))")
    z = np.random.RandomState(int(seed)).standard_normal(tuple(int(s) for s in shape))
    dt = ctx.attr("dtype", default_dtype)
    if dt is not None:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dt))
        if not np.issubdtype(dt, np.floating):
            raise ctx.fail(f"dtype {dt} (the draw is a float tensor)")
        z = z.astype(dt)
    z = z.astype(ctx.dtype)
    return z * np.asarray(ctx.attr("scale", 1.0), ctx.dtype) + np.asarray(
        ctx.attr("mean", 0.0), ctx.dtype
    )


@implements("RandomNormalLike")
def _random_normal_like(ctx, x):
    return _normal_draw(ctx, np.shape(x))


@implements("RandomNormal")
def _random_normal(ctx):
    shape = ctx.attr("shape")
    if shape is None:
        raise ctx.fail("RandomNormal needs a shape")
    return _normal_draw(ctx, shape, default_dtype=1)  # TensorProto.FLOAT


# ----------------------------------------------------- reductions and constants


@implements("ReduceSum")
def _reduce_sum(ctx, x, axes=None):
    """Sum over ``axes`` (an input from opset 13, an attribute before), linear."""
    if ctx.opset < 13:
        axes = ctx.attr("axes")
    else:
        axes = ctx.const(axes, 1, "axes")
    keep = bool(ctx.attr("keepdims", 1))
    if axes is None or np.size(axes) == 0:
        if ctx.opset >= 13 and ctx.attr("noop_with_empty_axes", 0):
            return x
        axes = tuple(range(np.ndim(x)))
    else:
        axes = _axes(axes, np.ndim(x))
    if is_static(x):
        return np.sum(x, axis=axes, keepdims=keep)
    return jnp.sum(x, axis=axes, keepdims=keep)


@implements("EyeLike")
def _eye_like(ctx, x):
    """An identity of ``x``'s (2-D) shape, shifted by ``k``: a constant."""
    if np.ndim(x) != 2:
        raise ctx.fail(f"EyeLike of a rank-{np.ndim(x)} tensor (must be 2-D)")
    import onnx

    dt = ctx.attr("dtype")
    dt = np.dtype(x.dtype) if dt is None else np.dtype(
        onnx.helper.tensor_dtype_to_np_dtype(dt)
    )  # fmt: skip
    if np.issubdtype(dt, np.floating):
        dt = ctx.dtype
    n, m = np.shape(x)
    return np.eye(n, m, k=int(ctx.attr("k", 0)), dtype=dt)


@implements("Reciprocal")
def _reciprocal(ctx, x):
    # On the data path 1 / x is not piecewise linear: the tracker refuses the
    # division by name (NotPiecewiseLinearError).
    return np.reciprocal(x) if is_static(x) else jnp.reciprocal(x)


# Equal / Greater: folded with NumPy on constants and shapes. Otherwise (a
# float weight, or the data) with ``jax.numpy``: on the data path the tracker
# takes the comparison as a decision, constant on each piece, and ends the piece
# where it flips (as the region's threshold), so the test conditions on it; a
# Cast of it is then a constant factor. (si4onnx compares the intercepts and the
# slopes of its affine forms instead, which is not the comparison.)
OPS["Equal"] = _binary(np.equal, jnp.equal)
OPS["Greater"] = _binary(np.greater, jnp.greater)


@implements("Softmax")
def _softmax(ctx, x):
    """Softmax over ``axis`` (opset 13), or over the trailing axes flattened from
    ``axis`` on (before 13). On the data path the tracker refuses its exp by name
    (NotPiecewiseLinearError)."""
    rank = np.ndim(x)
    if ctx.opset >= 13:
        axes = (ctx.attr("axis", -1) % rank,)
    else:
        axes = tuple(range(ctx.attr("axis", 1) % rank, rank))
    if is_static(x):
        e = np.exp(x - np.max(x, axis=axes, keepdims=True))
        return e / np.sum(e, axis=axes, keepdims=True)
    return jax.nn.softmax(x, axis=axes)
