"""ONNX import: an ONNX graph as a pure, piecewise-linear-trackable JAX function.

``load(path)`` parses an ONNX model (the operator set that si4onnx supports for the
DAL models: Conv, Relu, BatchNormalization, pooling, Resize, Concat, element-wise
arithmetic, Gemm/MatMul, shape operators, ...) into an :class:`OnnxFunction`: a JAX
pytree whose children are the float weights and whose static auxiliary data is the
parsed graph, callable as ``fn(*inputs)``. Every operator is written with plain
``jax.numpy``/``lax`` operations that :func:`sijax.track` follows (matrix products,
slices, pads, concatenations, reduce-windows, max), so an imported network can be
tested with the DAL test exactly like a native one. Layout is NCHW, as in ONNX, at
the function's inputs and outputs; inside, convolution outputs stay channels-last
(:class:`_ChannelsLast`).

The ``onnx`` package is an optional dependency (``pip install sijax[onnx]``); it is
imported inside :func:`load` only, so ``import sijax`` works without it.

Example::

    fn = sijax.onnx.load("unet.onnx")            # float64 weights (needs x64)
    y = jax.jit(lambda f, x: f(x))(fn, x)        # fn crosses jit as an argument
    piece = sijax.track(lambda x: fn(x))(a, b, z)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.diffusion.conv import conv2d
from sijax.errors import InputError

__all__ = ["OnnxFunction", "UnsupportedOperatorError", "load", "SUPPORTED_OPS"]


class UnsupportedOperatorError(InputError):
    """The ONNX graph uses an operator (or an operator option) sijax cannot import.

    Attributes:
      op_type: the ONNX operator type, e.g. ``"Softmax"``.
      node_name: the name of the offending node ('' when the node has none).
    """

    def __init__(self, op_type: str, node_name: str, detail: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        where = f"node {node_name!r}" if node_name else "an unnamed node"
        msg = f"unsupported ONNX operator {op_type!r} at {where}"
        if detail:
            msg += f": {detail}"
        else:
            msg += f" (supported: {', '.join(sorted(SUPPORTED_OPS))})"
        super().__init__(msg)


# ----------------------------------------------------------------- static graph


class _Const:
    """A hashable NumPy constant (static data of the pytree)."""

    __slots__ = ("array", "_key")

    def __init__(self, array: np.ndarray):
        array = np.array(array, order="C")  # (ascontiguousarray makes 0-d 1-d)
        array.setflags(write=False)
        self.array = array
        self._key = (array.dtype.str, array.shape, array.tobytes())

    def __eq__(self, other):
        return isinstance(other, _Const) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"_Const(shape={self.array.shape}, dtype={self.array.dtype})"


class _Node:
    """One ONNX node: op type, name, input/output value names, attributes."""

    __slots__ = ("op_type", "name", "inputs", "outputs", "attrs", "_key")

    def __init__(self, op_type, name, inputs, outputs, attrs):
        self.op_type = op_type
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.attrs = tuple(sorted(attrs.items()))
        self._key = (op_type, name, self.inputs, self.outputs, self.attrs)

    def attr(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    def __eq__(self, other):
        return isinstance(other, _Node) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


class _Graph:
    """The parsed graph: the static (hashable) part of an :class:`OnnxFunction`."""

    def __init__(
        self,
        nodes,
        input_names,
        input_shapes,
        output_names,
        declared_output_shapes,
        static,
        opset,
        dtype,
    ):
        self.nodes = tuple(nodes)
        self.input_names = tuple(input_names)
        self.input_shapes = tuple(input_shapes)
        self.output_names = tuple(output_names)
        self.declared_output_shapes = tuple(declared_output_shapes)
        self.static = tuple(sorted(static.items()))  # name -> _Const
        self.opset = int(opset)
        self.dtype = jnp.dtype(dtype).name
        self._key = (
            self.nodes,
            self.input_names,
            self.input_shapes,
            self.output_names,
            self.declared_output_shapes,
            self.static,
            self.opset,
            self.dtype,
        )
        self._hash = hash(self._key)

    def __eq__(self, other):
        if self is other:
            return True
        return (
            isinstance(other, _Graph)
            and self._hash == other._hash
            and self._key == other._key
        )

    def __hash__(self):
        return self._hash


# ---------------------------------------------------------------- the function


@jax.tree_util.register_pytree_node_class
class OnnxFunction:
    """An ONNX graph as a pure JAX function; a pytree (weights) with a static graph.

    Call it as ``fn(*inputs)`` with NCHW arrays of the graph's input shapes; floating
    inputs are cast to :attr:`dtype`. It returns one array for a single-output graph
    and a tuple otherwise. Pass it through ``jax.jit``/``jax.vmap`` as an argument:
    the weights are traced, the graph is static.

    Attributes:
      weights: dict name -> jnp array, the float initializers and constants that the
        computation consumes (cast to the load dtype).
      input_names, output_names: tuples of str.
      input_shapes: tuple of shape tuples (None for a symbolic dimension).
      output_shapes: tuple of shape tuples, computed with ``jax.eval_shape`` when
        the input shapes are all known, else as declared in the file.
      dtype: float dtype of the weights and of the computation.
      opset: the default-domain opset of the model.
    """

    def __init__(self, graph: _Graph, weights: dict[str, jax.Array]):
        self._graph = graph
        self.weights = dict(weights)

    # pytree protocol
    def tree_flatten(self):
        names = tuple(sorted(self.weights))
        return tuple(self.weights[n] for n in names), (self._graph, names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        graph, names = aux
        return cls(graph, dict(zip(names, children, strict=True)))

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._graph.input_names

    @property
    def input_shapes(self) -> tuple[tuple, ...]:
        return self._graph.input_shapes

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._graph.output_names

    @property
    def output_shapes(self) -> tuple[tuple, ...]:
        if all(None not in s for s in self.input_shapes):
            args = [jax.ShapeDtypeStruct(s, self.dtype) for s in self.input_shapes]
            outs = jax.eval_shape(lambda *xs: self._run(xs), *args)
            return tuple(tuple(o.shape) for o in outs)
        return self._graph.declared_output_shapes

    @property
    def dtype(self):
        return jnp.dtype(self._graph.dtype)

    @property
    def opset(self) -> int:
        return self._graph.opset

    @property
    def op_types(self) -> tuple[str, ...]:
        """The operator types of the graph's nodes, in order."""
        return tuple(n.op_type for n in self._graph.nodes)

    def __repr__(self):
        ins = dict(zip(self.input_names, self.input_shapes, strict=True))
        return (
            f"OnnxFunction(inputs={ins}"
            f", outputs={list(self.output_names)}, nodes={len(self._graph.nodes)}"
            f", weights={len(self.weights)}, dtype={self.dtype.name})"
        )

    def __call__(self, *inputs):
        outs = self._run(inputs)
        return outs[0] if len(outs) == 1 else outs

    def _run(self, inputs) -> tuple[jax.Array, ...]:
        g = self._graph
        if len(inputs) != len(g.input_names):
            raise InputError(
                f"the graph takes {len(g.input_names)} inputs {g.input_names}, "
                f"got {len(inputs)}"
            )
        env: dict[str, Any] = {name: c.array for name, c in g.static}
        env.update(self.weights)
        for name, shape, x in zip(g.input_names, g.input_shapes, inputs, strict=True):
            x = jnp.asarray(x)
            if len(shape) != x.ndim or any(
                d is not None and d != s for d, s in zip(shape, x.shape, strict=True)
            ):
                raise InputError(
                    f"input {name!r} has shape {tuple(x.shape)}, the graph expects "
                    f"{tuple('?' if d is None else d for d in shape)}"
                )
            if jnp.issubdtype(x.dtype, jnp.floating):
                x = x.astype(self.dtype)
            env[name] = x
        static = dict(g.static)
        for node in g.nodes:
            ins = []
            for name in node.inputs:
                if name == "":
                    ins.append(None)
                elif name in env:
                    ins.append(env[name])
                else:
                    raise InputError(
                        f"node {node.name!r} ({node.op_type}) reads {name!r}, which no "
                        "earlier node, input or initializer defines"
                    )
            ctx = _Ctx(node, static, g.opset, self.dtype)
            outs = _apply(ctx, ins)
            if not isinstance(outs, tuple):
                outs = (outs,)
            for name, val in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = val
        return tuple(jnp.asarray(_nchw(env[n])) for n in g.output_names)


# ------------------------------------------------------------------------ layout


class _ChannelsLast:
    """An NCHW tensor of the graph held channels-last, as ``data`` (N, H, W, C).

    Convolutions compute channels-last (:func:`sijax.diffusion.conv.conv2d`) and
    return this; element-wise operators, batch-norm, pooling, Resize and Concat keep
    it, and any other operator gets the NCHW array (one transpose, :func:`_apply`). So a
    U-Net's chain of convolutions, activations, pooling, upsampling and skip
    concatenations runs without the transposes that an NCHW result of every
    convolution would put before and after it. ``shape`` is the logical (NCHW)
    shape, for the operators that only read it.
    """

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    @property
    def shape(self) -> tuple:
        n, h, w, c = self.data.shape
        return (n, c, h, w)

    @property
    def ndim(self) -> int:
        return 4


# Position in the NHWC data of each NCHW axis; also the NHWC -> NCHW permutation.
_NHWC_AXIS = (0, 3, 1, 2)


def _nchw(x):
    return jnp.transpose(x.data, _NHWC_AXIS) if isinstance(x, _ChannelsLast) else x


def _spatial_layout(x):
    """(data, wrap, full) of an input with spatial axes, in either layout.

    ``full(spatial, fill)`` places per-spatial-axis values among the data's axes
    (``fill`` for batch and channel), ``wrap`` gives a result the input's layout.
    """
    if isinstance(x, _ChannelsLast):
        return x.data, _ChannelsLast, lambda spatial, fill: (fill, *spatial, fill)
    return jnp.asarray(x), lambda y: y, lambda spatial, fill: (fill, fill, *spatial)


def _nhwc_data(x):
    """A rank-4 NCHW operand (array or :class:`_ChannelsLast`) as NHWC data."""
    if isinstance(x, _ChannelsLast):
        return x.data
    if _is_static(x):
        return np.transpose(x, (0, 2, 3, 1))
    return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


_UNARY = ("Relu", "LeakyRelu", "Abs", "Neg", "Sigmoid", "Tanh", "Exp", "Identity")
_BINARY = ("Add", "Sub", "Mul", "Div")
_LAYOUT_AWARE = ("Conv", "AveragePool", "MaxPool", "Resize")  # take either layout


def _apply(ctx, ins):
    """Runs ``ctx.node`` on ``ins``, keeping channels-last tensors where it can."""
    op = ctx.node.op_type
    if op in _LAYOUT_AWARE or not any(isinstance(x, _ChannelsLast) for x in ins):
        return _OPS[op](ctx, *ins)
    if op in _UNARY:
        return _ChannelsLast(_OPS[op](ctx, ins[0].data))
    if op in _BINARY and all(x is not None and np.ndim(x) <= 4 for x in ins):
        # ONNX broadcasting to rank 4, then the NCHW operands' axes reordered.
        ins = [_nhwc_data(x) for x in _broadcast_ranks(*ins)]
        return _ChannelsLast(_OPS[op](ctx, *ins))
    if op == "Shape":
        return _OPS[op](ctx, *ins)
    if op == "BatchNormalization":
        x, *stats = ins
        return _ChannelsLast(_batch_norm(ctx, x.data, *stats, channel_axis=3))
    if op == "Concat":
        axis = ctx.attr("axis") % 4
        xs = [_nhwc_data(x) for x in ins if x is not None]
        dt = jnp.result_type(*xs)
        return _ChannelsLast(
            jnp.concatenate([jnp.asarray(x, dt) for x in xs], axis=_NHWC_AXIS[axis])
        )
    return _OPS[op](ctx, *(_nchw(x) for x in ins))


# --------------------------------------------------------------------- loading


def _attr_value(attr, numpy_helper):
    import onnx

    t = onnx.AttributeProto
    kind = attr.type
    if kind == t.FLOAT:
        return float(attr.f)
    if kind == t.INT:
        return int(attr.i)
    if kind == t.STRING:
        return attr.s.decode("utf-8", "replace")
    if kind == t.TENSOR:
        return _Const(numpy_helper.to_array(attr.t))
    if kind == t.FLOATS:
        return tuple(float(v) for v in attr.floats)
    if kind == t.INTS:
        return tuple(int(v) for v in attr.ints)
    if kind == t.STRINGS:
        return tuple(s.decode("utf-8", "replace") for s in attr.strings)
    return ("<unsupported attribute>", int(kind))


def _shape_of(value_info) -> tuple:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


# Input positions that must be compile-time constants (shapes, axes, indices).
_STATIC_SLOTS = {
    "Reshape": {1},
    "Resize": {1, 2, 3},
    "Pad": {1, 2, 3},
    "Slice": {1, 2, 3, 4},
    "Unsqueeze": {1},
    "Squeeze": {1},
    "Gather": {1},
    "Expand": {1},
    "ConstantOfShape": {0},
    "Clip": set(),
}


def _read_model(model):
    """(ModelProto, description) from a path, bytes or a ModelProto.

    Raises:
      InputError: missing file, unparsable bytes, or a model without a graph.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        if isinstance(model, onnx.ModelProto):
            proto, where = model, "the given ModelProto"
        elif isinstance(model, (bytes, bytearray, memoryview)):
            proto = onnx.load_model_from_string(bytes(model))
            where = "the given bytes"
        elif isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise InputError(f"ONNX file not found: {path}")
            proto = onnx.load(path)
            where = path
        else:
            raise InputError(
                "load() takes a path, bytes or an onnx.ModelProto, got "
                f"{type(model).__name__}"
            )
    except InputError:
        raise
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        raise InputError(
            f"not a readable ONNX model: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not proto.HasField("graph") or not proto.graph.output or not proto.graph.node:
        raise InputError(
            f"{where} is not a valid ONNX model (no graph, nodes or outputs)"
        )
    return proto, where


def _check_model(proto, where: str) -> None:
    """The ONNX checker, its failures as InputError (after the operator scan, so
    that an unknown operator reports as UnsupportedOperatorError)."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001  (the checker raises several types)
        raise InputError(
            f"{where} is not a valid ONNX model: {type(e).__name__}: {str(e)[:300]}"
        ) from None


def load(model, dtype=jnp.float64) -> OnnxFunction:
    """Parses an ONNX model into an :class:`OnnxFunction`.

    Integer tensors (shapes, axes, indices) and float tensors consumed only as
    shapes/scales become static constants; the other float initializers and
    ``Constant`` outputs become the weights, cast to ``dtype``. Operator support
    is checked for every node here, so an unsupported graph fails at load time.

    Args:
      model: path of a ``.onnx`` file, its bytes, or an ``onnx.ModelProto``.
      dtype: float dtype of the weights and of the computation; float64 (the
        default, the test path) needs ``jax_enable_x64``.

    Returns:
      The :class:`OnnxFunction`.

    Raises:
      InputError: missing or corrupt file; float64 requested while x64 is off.
      UnsupportedOperatorError: an operator (or a non-default domain) that sijax
        cannot import; names the op type and the node.
    """
    try:
        import onnx  # noqa: F401
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(
            "sijax.onnx needs the 'onnx' package: pip install 'sijax[onnx]'"
        ) from None
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(f"{dtype=} must be a float dtype")
    if dtype == jnp.float64 and jnp.result_type(float) != jnp.float64:
        raise InputError(
            "sijax.onnx.load(dtype=float64) needs x64: call "
            "jax.config.update('jax_enable_x64', True) first"
        )
    proto, where = _read_model(model)
    graph = proto.graph
    opset = 0
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    if opset == 0:
        raise InputError("the model imports no default-domain ONNX opset")

    nodes = []
    for i, n in enumerate(graph.node):
        name = n.name or f"{n.op_type}_{i}"
        if n.domain not in ("", "ai.onnx"):
            raise UnsupportedOperatorError(
                n.op_type, name, f"operator domain {n.domain!r} is not supported"
            )
        if n.op_type not in _OPS:
            raise UnsupportedOperatorError(n.op_type, name)
        attrs = {a.name: _attr_value(a, numpy_helper) for a in n.attribute}
        nodes.append(_Node(n.op_type, name, n.input, n.output, attrs))
    _check_model(proto, where)

    # Which values are read as compile-time constants and which as data.
    read_static, read_dynamic = set(), set()
    for n in nodes:
        slots = _STATIC_SLOTS.get(n.op_type, set())
        for k, name in enumerate(n.inputs):
            (read_static if k in slots else read_dynamic).add(name)
    read_dynamic.update(o.name for o in graph.output)

    consts: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in graph.initializer
    }
    # Constant nodes are folded into the constant table (their node is dropped).
    kept = []
    for n in nodes:
        if n.op_type == "Constant":
            consts[n.outputs[0]] = _constant_value(n)
        else:
            kept.append(n)
    nodes = kept

    static, weights = {}, {}
    for name, arr in consts.items():
        arr = np.asarray(arr)
        is_float = np.issubdtype(arr.dtype, np.floating)
        if is_float:
            arr = arr.astype(dtype)
        if not is_float or name in read_static:
            static[name] = _Const(arr)
        if is_float and (name in read_dynamic or name not in read_static):
            weights[name] = jnp.asarray(arr, dtype)

    inputs = [v for v in graph.input if v.name not in consts]
    fn_graph = _Graph(
        nodes,
        [v.name for v in inputs],
        [_shape_of(v) for v in inputs],
        [v.name for v in graph.output],
        [_shape_of(v) for v in graph.output],
        static,
        opset,
        dtype,
    )
    return OnnxFunction(fn_graph, weights)


def _constant_value(node: _Node) -> np.ndarray:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        v = node.attr(key)
        if v is None:
            continue
        if isinstance(v, _Const):
            return np.array(v.array)
        if key.startswith("value_float"):
            return np.asarray(v, np.float32)
        return np.asarray(v, np.int64)
    raise UnsupportedOperatorError(
        "Constant",
        node.name,
        "only value, value_float(s) and value_int(s) constants are supported",
    )


# ------------------------------------------------------------------- operators


class _Ctx:
    """What an operator implementation may consult besides its inputs."""

    def __init__(self, node: _Node, static: dict, opset: int, dtype):
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


_OPS: dict[str, Callable] = {}


def _op(*names):
    def register(fn):
        for name in names:
            _OPS[name] = fn
        return fn

    return register


SUPPORTED_OPS = frozenset()  # filled in at the end of the module


def _is_static(*xs) -> bool:
    return all(x is None or isinstance(x, (np.ndarray, np.generic)) for x in xs)


def _broadcast_ranks(*xs):
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
        a, b = _broadcast_ranks(a, b)
        if _is_static(a, b):
            return np.asarray(fn_np(a, b))
        return fn_jnp(a, b)

    return apply


_OPS["Add"] = _binary(np.add, jnp.add)
_OPS["Sub"] = _binary(np.subtract, jnp.subtract)
_OPS["Mul"] = _binary(np.multiply, jnp.multiply)


@_op("Div")
def _div(ctx, a, b):
    a, b = _broadcast_ranks(a, b)
    if _is_static(a, b):
        if np.issubdtype(np.result_type(a, b), np.integer):
            return np.asarray(np.trunc(a / b).astype(np.result_type(a, b)))
        return np.asarray(a / b)
    return jnp.divide(a, b)


@_op("Identity")
def _identity(ctx, x):
    return x


@_op("Relu")
def _relu(ctx, x):
    # max(x, 0) rather than jax.nn.relu: a plain max primitive for the tracker.
    return jnp.maximum(x, jnp.zeros((), jnp.result_type(x)))


@_op("LeakyRelu")
def _leaky_relu(ctx, x):
    alpha = ctx.attr("alpha", 0.01)
    return jnp.maximum(x, 0.0) + alpha * jnp.minimum(x, 0.0)


@_op("Abs")
def _abs(ctx, x):
    return np.abs(x) if _is_static(x) else jnp.abs(x)


@_op("Neg")
def _neg(ctx, x):
    return np.negative(x) if _is_static(x) else jnp.negative(x)


# Not piecewise linear: imported so that a plain forward pass works; the tracker
# rejects them by name (NotPiecewiseLinearError) if they see the line.
@_op("Sigmoid")
def _sigmoid(ctx, x):
    return jax.nn.sigmoid(x)


@_op("Tanh")
def _tanh(ctx, x):
    return jnp.tanh(x)


@_op("Exp")
def _exp(ctx, x):
    return jnp.exp(x)


@_op("Cast")
def _cast(ctx, x):
    import onnx

    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ctx.attr("to")))
    if np.issubdtype(to, np.floating):
        to = ctx.dtype  # floats compute in the load dtype
    if _is_static(x):
        return np.asarray(x).astype(to)
    return jnp.asarray(x).astype(to)


@_op("Shape")
def _shape(ctx, x):
    shape = np.asarray(np.shape(x), np.int64)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return shape[start:end]


@_op("ConstantOfShape")
def _constant_of_shape(ctx, shape):
    shape = ctx.const(shape, 0, "shape")
    value = ctx.attr("value")
    fill = value.array.reshape(()) if value is not None else np.float32(0.0)
    dt = ctx.dtype if np.issubdtype(fill.dtype, np.floating) else fill.dtype
    return np.full(tuple(int(s) for s in shape), fill, dtype=dt)


def _axes(axes, rank):
    return tuple(sorted(int(a) % rank for a in np.atleast_1d(axes)))


@_op("Unsqueeze")
def _unsqueeze(ctx, x, axes=None):
    axes = ctx.const(axes, 1, "axes") if axes is not None else ctx.attr("axes")
    if axes is None:
        raise ctx.fail("Unsqueeze needs axes")
    rank = np.ndim(x) + len(np.atleast_1d(axes))
    shape = list(np.shape(x))
    for a in _axes(axes, rank):
        shape.insert(a, 1)
    return x.reshape(tuple(shape))


@_op("Squeeze")
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


@_op("Flatten")
def _flatten(ctx, x):
    axis = ctx.attr("axis", 1) % (np.ndim(x) + 1) if np.ndim(x) else 0
    shape = np.shape(x)
    return x.reshape((math.prod(shape[:axis]), math.prod(shape[axis:])))


@_op("Reshape")
def _reshape(ctx, x, shape):
    shape = [int(s) for s in ctx.const(shape, 1, "shape")]
    if not ctx.attr("allowzero", 0):
        shape = [np.shape(x)[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(tuple(shape))


@_op("Transpose")
def _transpose(ctx, x):
    perm = ctx.attr("perm") or tuple(reversed(range(np.ndim(x))))
    return np.transpose(x, perm) if _is_static(x) else jnp.transpose(x, perm)


@_op("Concat")
def _concat(ctx, *xs):
    xs = [x for x in xs if x is not None]
    axis = ctx.attr("axis")
    if _is_static(*xs):
        return np.concatenate(xs, axis=axis)
    dt = jnp.result_type(*xs)
    return jnp.concatenate([jnp.asarray(x, dt) for x in xs], axis=axis)


@_op("Gather")
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
    if _is_static(x):
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
    if _is_static(x):
        return np.take(x, idx, axis=axis)
    if step > 0 and len(idx) > 0:
        return lax.slice_in_dim(x, int(idx[0]), int(idx[-1]) + 1, step, axis)
    return jnp.take(x, idx, axis=axis)


@_op("Slice")
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


@_op("Pad")
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


@_op("Expand")
def _expand(ctx, x, shape):
    shape = np.asarray(ctx.const(shape, 1, "shape"), np.int64)
    x, shape = _broadcast_ranks(x, np.ones(tuple(int(s) for s in shape)))
    out = np.broadcast_shapes(np.shape(x), np.shape(shape))
    return np.broadcast_to(x, out) if _is_static(x) else jnp.broadcast_to(x, out)


# ------------------------------------------------------------- linear algebra


_HIGHEST = lax.Precision.HIGHEST


@_op("Gemm")
def _gemm(ctx, a, b, c=None):
    if ctx.attr("transA", 0):
        a = a.T
    if ctx.attr("transB", 0):
        b = b.T
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    y = jnp.matmul(a, b, precision=_HIGHEST)
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y, c = _broadcast_ranks(y, c)
        y = y + (c if beta == 1.0 else beta * c)
    return y


@_op("MatMul")
def _matmul(ctx, a, b):
    if np.ndim(a) >= 2 and np.ndim(b) >= 2:
        rank = max(np.ndim(a), np.ndim(b))
        a = jnp.reshape(a, (1,) * (rank - np.ndim(a)) + tuple(np.shape(a)))
        b = jnp.reshape(b, (1,) * (rank - np.ndim(b)) + tuple(np.shape(b)))
    return jnp.matmul(a, b, precision=_HIGHEST)


def _conv_pads(ctx, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    auto = ctx.attr("auto_pad", "NOTSET")
    nd = len(in_sizes)
    if auto in ("NOTSET", ""):
        pads = ctx.attr("pads") or (0,) * (2 * nd)
        return [(pads[i], pads[i + nd]) for i in range(nd)]
    if auto == "VALID":
        return [(0, 0)] * nd
    out = []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
        out.append((lo, total - lo))
    return out


@_op("Conv")
def _conv(ctx, x, w, bias=None):
    nd = np.ndim(w) - 2
    if np.ndim(x) != nd + 2:
        raise InputError(
            f"Conv node {ctx.node.name!r}: input rank {np.ndim(x)} "
            f"does not match a {nd}-D kernel"
        )
    kernel = ctx.attr("kernel_shape") or tuple(np.shape(w)[2:])
    strides = ctx.attr("strides") or (1,) * nd
    dilations = ctx.attr("dilations") or (1,) * nd
    group = ctx.attr("group", 1)
    pads = _conv_pads(ctx, np.shape(x)[2:], kernel, strides, dilations)
    w = jnp.asarray(w)
    if nd == 2 and group == 1:
        hwio = jnp.transpose(w, (2, 3, 1, 0))
        y = conv2d(_nhwc_data(x), hwio, pads, strides, dilations, _HIGHEST)
        if bias is not None:
            y = y + jnp.reshape(bias, (1, 1, 1, -1))
        return _ChannelsLast(y)
    x = jnp.asarray(_nchw(x))
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if spatial is None:
        raise ctx.fail(f"{nd}-D convolution")
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=pads,
        rhs_dilation=dilations,
        dimension_numbers=("NC" + spatial, "OI" + spatial, "NC" + spatial),
        feature_group_count=group,
        precision=_HIGHEST,
    )
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1) + (1,) * nd)
    return y


@_op("BatchNormalization")
def _batch_norm(ctx, x, scale, bias, mean, var, channel_axis=1):
    if ctx.attr("training_mode", 0):
        raise ctx.fail(
            "training_mode=1 (only inference-mode batch-norm is piecewise linear)"
        )
    eps = ctx.attr("epsilon", 1e-5)
    shape = [1] * np.ndim(x)
    shape[channel_axis] = -1
    # Per-channel affine map with constant coefficients.
    s = scale / jnp.sqrt(var + eps)
    return x * jnp.reshape(s, shape) + jnp.reshape(bias - mean * s, shape)


# --------------------------------------------------------------------- pooling


def _pool_geometry(ctx, x):
    nd = np.ndim(x) - 2
    kernel = tuple(ctx.attr("kernel_shape"))
    strides = ctx.attr("strides") or (1,) * nd
    dilations = ctx.attr("dilations") or (1,) * nd
    if ctx.attr("ceil_mode", 0):
        raise ctx.fail("ceil_mode=1")
    pads = _conv_pads(ctx, np.shape(x)[2:], kernel, strides, dilations)
    return nd, kernel, tuple(strides), tuple(dilations), pads


@_op("AveragePool")
def _average_pool(ctx, x):
    nd, kernel, strides, dil, pads = _pool_geometry(ctx, x)
    if any(d != 1 for d in dil):
        raise ctx.fail("dilated average pooling")
    data, wrap, full = _spatial_layout(x)
    summed = lax.reduce_window(
        data,
        jnp.zeros((), data.dtype),
        lax.add,
        full(kernel, 1),
        full(strides, 1),
        full(tuple(pads), (0, 0)),
    )
    if ctx.attr("count_include_pad", 0) or all(p == (0, 0) for p in pads):
        y = summed / math.prod(kernel)
    else:
        # Divisor: the number of real (unpadded) pixels under each window, in NumPy
        # so that it stays a constant under jit.
        valid = np.pad(np.ones(np.shape(x)[2:]), pads)
        win = np.lib.stride_tricks.sliding_window_view(valid, kernel)
        win = win[tuple(slice(None, None, s) for s in strides)]
        count = win.sum(axis=tuple(range(nd, 2 * nd)))
        y = summed / jnp.asarray(count.reshape(full(count.shape, 1)), data.dtype)
    return wrap(y)


@_op("GlobalAveragePool")
def _global_average_pool(ctx, x):
    axes = tuple(range(2, np.ndim(x)))
    return jnp.mean(x, axis=axes, keepdims=True)


@_op("MaxPool")
def _max_pool(ctx, x):
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        raise ctx.fail("the Indices output of MaxPool")
    nd, kernel, strides, dil, pads = _pool_geometry(ctx, x)
    data, wrap, full = _spatial_layout(x)
    return wrap(
        lax.reduce_window(
            data,
            jnp.asarray(-jnp.inf, data.dtype),
            lax.max,
            full(kernel, 1),
            full(strides, 1),
            full(tuple(pads), (0, 0)),
            window_dilation=full(dil, 1),
        )
    )


# ---------------------------------------------------------------------- resize


def _source_coords(mode: str, out_n: int, in_n: int, scale: float) -> np.ndarray:
    """Source coordinate of every output index (ONNX Resize, float64)."""
    i = np.arange(out_n, dtype=np.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out_n > 1 else np.zeros(out_n)
    if mode == "align_corners":
        return i * (in_n - 1) / (out_n - 1) if out_n > 1 else np.zeros(out_n)
    if mode == "asymmetric":
        return i / scale
    raise ValueError(mode)


def _resize_matrix(ctx, mode, out_n, in_n, scale) -> np.ndarray:
    """(out_n, in_n) interpolation matrix of one axis."""
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
    try:
        src = _source_coords(ctm, out_n, in_n, scale)
    except ValueError:
        raise ctx.fail(f"coordinate_transformation_mode={ctm!r}") from None
    m = np.zeros((out_n, in_n))
    rows = np.arange(out_n)
    if mode == "nearest":
        nm = ctx.attr("nearest_mode", "round_prefer_floor")
        if nm == "round_prefer_floor":
            idx = np.ceil(src - 0.5)
        elif nm == "round_prefer_ceil":
            idx = np.floor(src + 0.5)
        elif nm == "floor":
            idx = np.floor(src)
        elif nm == "ceil":
            idx = np.ceil(src)
        else:
            raise ctx.fail(f"nearest_mode={nm!r}")
        m[rows, np.clip(idx, 0, in_n - 1).astype(int)] = 1.0
        return m
    # linear: neighbours floor(src) and floor(src) + 1, clamped to the edge.
    lo = np.floor(src)
    w = src - lo
    i0 = np.clip(lo, 0, in_n - 1).astype(int)
    i1 = np.clip(lo + 1, 0, in_n - 1).astype(int)
    np.add.at(m, (rows, i0), 1.0 - w)
    np.add.at(m, (rows, i1), w)
    return m


@_op("Resize")
def _resize(ctx, x, roi=None, scales=None, sizes=None):
    if ctx.opset < 11:  # Resize-10: (X, scales)
        scales, roi = ctx.const(roi, 1, "scales"), None
    else:
        scales = ctx.const(scales, 2, "scales")
        sizes = ctx.const(sizes, 3, "sizes")
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise ctx.fail(
            f"mode={mode!r} (only nearest and linear are piecewise "
            "linear and supported)"
        )
    if ctx.attr("antialias", 0):
        raise ctx.fail("antialias=1")
    if (
        ctx.attr("axes") is not None
        or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch"
    ):
        raise ctx.fail("the axes / keep_aspect_ratio_policy options")
    in_shape = np.shape(x)
    rank = len(in_shape)
    if sizes is not None and np.size(sizes) > 0:
        out_shape = tuple(int(s) for s in sizes)
        scale = [o / i for o, i in zip(out_shape, in_shape, strict=True)]
    elif scales is not None and np.size(scales) > 0:
        scale = [float(s) for s in scales]
        out_shape = tuple(
            int(math.floor(n * s)) for n, s in zip(in_shape, scale, strict=True)
        )
    else:
        raise ctx.fail("Resize needs scales or sizes")
    if len(out_shape) != rank:
        raise ctx.fail(f"scales/sizes of length {len(out_shape)} for rank {rank}")
    y, wrap, _ = _spatial_layout(x)
    for axis in range(rank):
        if out_shape[axis] == in_shape[axis] and scale[axis] == 1.0:
            continue
        if axis < 2 and rank > 2:
            raise ctx.fail("resizing the batch or channel axis")
        m = _resize_matrix(ctx, mode, out_shape[axis], in_shape[axis], scale[axis])
        if wrap is _ChannelsLast:
            axis = _NHWC_AXIS[axis]
        y = jnp.moveaxis(
            jnp.tensordot(
                jnp.asarray(m, y.dtype), y, axes=((1,), (axis,)), precision=_HIGHEST
            ),
            0,
            axis,
        )
    return wrap(y)


SUPPORTED_OPS = frozenset(_OPS) | {"Constant"}
_OPS["Constant"] = lambda ctx: _constant_value(ctx.node)  # folded at load time
