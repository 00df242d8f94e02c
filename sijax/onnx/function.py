"""The imported graph as a pure JAX function: :class:`OnnxFunction`, a pytree whose
children are the float weights and whose static data is the parsed graph."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sijax.errors import InputError
from sijax.onnx.dispatch import apply
from sijax.onnx.graph import Graph
from sijax.onnx.layout import nchw
from sijax.onnx.operators import Ctx


@jax.tree_util.register_pytree_node_class
class OnnxFunction:
    """An ONNX graph as a pure JAX function; a pytree (weights) with a static graph.

    Calling convention: ``fn(*inputs, **named)`` takes the graph's inputs (those
    not given by an initializer) in the order of :attr:`input_names`, positionally,
    by name, or the first ones positionally and the rest by name; each is an NCHW
    array of its input shape, floating inputs cast to :attr:`dtype`. It returns one
    array for a single-output graph and otherwise a tuple in the order of
    :attr:`output_names`. Pass it through ``jax.jit``/``jax.vmap`` as an argument:
    the weights are traced, the graph is static. To track a graph of several inputs
    along a line in one of them, close over the others:
    ``sijax.track(lambda x: fn(x, mask))``.

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

    def __init__(self, graph: Graph, weights: dict[str, jax.Array]):
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

    def __call__(self, *inputs, **named):
        outs = self._run(self._bind(inputs, named))
        return outs[0] if len(outs) == 1 else outs

    def _bind(self, inputs, named) -> tuple:
        """The inputs in graph order from positional and named arguments."""
        names = self._graph.input_names
        if len(inputs) > len(names):
            raise InputError(
                f"the graph takes {len(names)} inputs {names}, got {len(inputs)}"
            )
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise InputError(f"the graph has no inputs {unknown}; its inputs: {names}")
        twice = [n for n in names[: len(inputs)] if n in named]
        if twice:
            raise InputError(f"inputs {twice} given both by position and by name")
        missing = [n for n in names[len(inputs) :] if n not in named]
        if missing:
            raise InputError(f"missing graph inputs {missing}; its inputs: {names}")
        return tuple(inputs) + tuple(named[n] for n in names[len(inputs) :])

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
            ctx = Ctx(node, static, g.opset, self.dtype)
            outs = apply(ctx, ins)
            if not isinstance(outs, tuple):
                outs = (outs,)
            for name, val in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = val
        return tuple(jnp.asarray(nchw(env[n])) for n in g.output_names)
