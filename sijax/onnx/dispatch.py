"""Runs one node: the operator table filled by the operator modules, and the
layout rules (which operators keep channels-last tensors)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sijax.onnx import linalg, pooling, resize  # noqa: F401  (they fill OPS)
from sijax.onnx.graph import constant_value
from sijax.onnx.layout import NHWC_AXIS, ChannelsLast, nchw, nhwc_data
from sijax.onnx.linalg import batch_norm
from sijax.onnx.operators import OPS, broadcast_ranks, split_parts, split_sizes

_UNARY = ("Relu", "LeakyRelu", "Abs", "Neg", "Sigmoid", "Tanh", "Exp", "Identity")
_BINARY = ("Add", "Sub", "Mul", "Div")
# Operators that take either layout.
_LAYOUT_AWARE = ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "Resize")
_SHAPE_ONLY = ("Shape", "RandomNormalLike")  # read only the (logical) shape


def apply(ctx, ins):
    """Runs ``ctx.node`` on ``ins``, keeping channels-last tensors where it can."""
    op = ctx.node.op_type
    if op in _LAYOUT_AWARE or not any(isinstance(x, ChannelsLast) for x in ins):
        return OPS[op](ctx, *ins)
    if op in _UNARY:
        return ChannelsLast(OPS[op](ctx, ins[0].data))
    if op in _BINARY and all(x is not None and np.ndim(x) <= 4 for x in ins):
        # ONNX broadcasting to rank 4, then the NCHW operands' axes reordered.
        ins = [nhwc_data(x) for x in broadcast_ranks(*ins)]
        return ChannelsLast(OPS[op](ctx, *ins))
    if op in _SHAPE_ONLY:
        return OPS[op](ctx, *ins)
    if op == "Split" and isinstance(ins[0], ChannelsLast):
        x, split = ins[0], (ins[1] if len(ins) > 1 else None)
        axis = ctx.attr("axis", 0) % 4
        sizes = split_sizes(ctx, x.shape[axis], split)
        return tuple(
            ChannelsLast(p) for p in split_parts(x.data, NHWC_AXIS[axis], sizes)
        )
    if op == "BatchNormalization":
        x, *stats = ins
        return ChannelsLast(batch_norm(ctx, x.data, *stats, channel_axis=3))
    if op == "Concat":
        axis = ctx.attr("axis") % 4
        xs = [nhwc_data(x) for x in ins if x is not None]
        dt = jnp.result_type(*xs)
        return ChannelsLast(
            jnp.concatenate([jnp.asarray(x, dt) for x in xs], axis=NHWC_AXIS[axis])
        )
    return OPS[op](ctx, *(nchw(x) for x in ins))


SUPPORTED_OPS = frozenset(OPS) | {"Constant"}
OPS["Constant"] = lambda ctx: constant_value(ctx.node)  # folded at load time
