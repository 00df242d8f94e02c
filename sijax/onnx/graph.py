"""The static graph of an imported ONNX model: hashable constants and nodes, the
parsed graph (the static auxiliary data of an :class:`sijax.onnx.OnnxFunction`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sijax.errors import UnsupportedOperatorError


class Const:
    """A hashable NumPy constant (static data of the pytree)."""

    __slots__ = ("array", "_key")

    def __init__(self, array: np.ndarray):
        array = np.array(array, order="C")  # (ascontiguousarray makes 0-d 1-d)
        array.setflags(write=False)
        self.array = array
        self._key = (array.dtype.str, array.shape, array.tobytes())

    def __eq__(self, other):
        return isinstance(other, Const) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"Const(shape={self.array.shape}, dtype={self.array.dtype})"


class Node:
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
        return isinstance(other, Node) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


class Graph:
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
        self.static = tuple(sorted(static.items()))  # name -> Const
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
            isinstance(other, Graph)
            and self._hash == other._hash
            and self._key == other._key
        )

    def __hash__(self):
        return self._hash


def constant_value(node: Node) -> np.ndarray:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        v = node.attr(key)
        if v is None:
            continue
        if isinstance(v, Const):
            return np.array(v.array)
        if key.startswith("value_float"):
            return np.asarray(v, np.float32)
        return np.asarray(v, np.int64)
    raise UnsupportedOperatorError(
        "Constant",
        node.name,
        "only value, value_float(s) and value_int(s) constants are supported",
    )


def is_static(*xs) -> bool:
    """Whether every operand is a NumPy constant (or absent): folded at trace time."""
    return all(x is None or isinstance(x, (np.ndarray, np.generic)) for x in xs)
