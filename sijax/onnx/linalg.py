"""Linear algebra operators of the ONNX import: Gemm, MatMul, Conv, batch-norm
(matrix products at precision "highest": TF32 would break exactness)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.diffusion.conv import conv2d
from sijax.errors import InputError
from sijax.onnx.layout import ChannelsLast, nchw, nhwc_data
from sijax.onnx.operators import broadcast_ranks, implements

HIGHEST = lax.Precision.HIGHEST


@implements("Gemm")
def _gemm(ctx, a, b, c=None):
    if ctx.attr("transA", 0):
        a = a.T
    if ctx.attr("transB", 0):
        b = b.T
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    y = jnp.matmul(a, b, precision=HIGHEST)
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y, c = broadcast_ranks(y, c)
        y = y + (c if beta == 1.0 else beta * c)
    return y


@implements("MatMul")
def _matmul(ctx, a, b):
    if np.ndim(a) >= 2 and np.ndim(b) >= 2:
        rank = max(np.ndim(a), np.ndim(b))
        a = jnp.reshape(a, (1,) * (rank - np.ndim(a)) + tuple(np.shape(a)))
        b = jnp.reshape(b, (1,) * (rank - np.ndim(b)) + tuple(np.shape(b)))
    return jnp.matmul(a, b, precision=HIGHEST)


def conv_pads(ctx, in_sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
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


@implements("Conv")
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
    pads = conv_pads(ctx, np.shape(x)[2:], kernel, strides, dilations)
    w = jnp.asarray(w)
    if nd == 2 and group == 1:
        hwio = jnp.transpose(w, (2, 3, 1, 0))
        y = conv2d(nhwc_data(x), hwio, pads, strides, dilations, HIGHEST)
        if bias is not None:
            y = y + jnp.reshape(bias, (1, 1, 1, -1))
        return ChannelsLast(y)
    x = jnp.asarray(nchw(x))
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
        precision=HIGHEST,
    )
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1) + (1,) * nd)
    return y


@implements("BatchNormalization")
def batch_norm(ctx, x, scale, bias, mean, var, channel_axis=1):
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
