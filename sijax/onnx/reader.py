"""Loading: an ONNX file (or ModelProto, or bytes) parsed into an
:class:`OnnxFunction` (the ``onnx`` package is imported here only, when loading)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from sijax.errors import InputError, UnsupportedOperatorError
from sijax.onnx.dispatch import OPS
from sijax.onnx.function import OnnxFunction
from sijax.onnx.graph import Const, Graph, Node, constant_value


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
        return Const(numpy_helper.to_array(attr.t))
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
    "Split": {1},
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
        if n.op_type not in OPS:
            raise UnsupportedOperatorError(n.op_type, name)
        attrs = {a.name: _attr_value(a, numpy_helper) for a in n.attribute}
        nodes.append(Node(n.op_type, name, n.input, n.output, attrs))
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
            consts[n.outputs[0]] = constant_value(n)
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
            static[name] = Const(arr)
        if is_float and (name in read_dynamic or name not in read_static):
            weights[name] = jnp.asarray(arr, dtype)

    inputs = [v for v in graph.input if v.name not in consts]
    fn_graph = Graph(
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
