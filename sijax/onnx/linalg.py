"""Linear algebra operators of the ONNX import: Gemm, MatMul, Conv, ConvTranspose,
batch-norm (matrix products at precision "highest": TF32 would break exactness)."""

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
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad={auto!r}")
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


def _conv_transpose_pads(ctx, in_sizes, full, strides) -> list[tuple[int, int]]:
    """(begin, end) pads of each spatial axis: the amounts cropped from the ``full``
    output (negative: zeros added), as the ONNX ConvTranspose specification gives
    them (explicit pads, or derived from ``output_shape`` / ``auto_pad``)."""
    nd = len(in_sizes)
    auto = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(f"auto_pad={auto!r}")
    out_shape = ctx.attr("output_shape")
    if out_shape is not None:
        out_shape = tuple(out_shape)[-nd:]  # some exporters give N and C as well
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = tuple(n * s for n, s in zip(in_sizes, strides, strict=True))
    elif auto == "VALID":
        return [(0, 0)] * nd
    else:
        pads = ctx.attr("pads") or (0,) * (2 * nd)
        if len(pads) != 2 * nd:
            raise InputError(
                f"ConvTranspose node {ctx.node.name!r}: {len(pads)} pads for "
                f"{nd} spatial axes"
            )
        return [(int(pads[i]), int(pads[i + nd])) for i in range(nd)]
    if len(out_shape) != nd:
        raise InputError(
            f"ConvTranspose node {ctx.node.name!r}: output_shape={out_shape} "
            f"for {nd} spatial axes"
        )
    pads = []
    for f, o in zip(full, out_shape, strict=True):
        total = f - int(o)
        # The specification's split (the extra one at the end for SAME_UPPER).
        half = total // 2
        pads.append(
            (half, total - half) if auto == "SAME_UPPER" else (total - half, half)
        )
    return pads


@implements("ConvTranspose")
def _conv_transpose(ctx, x, w, bias=None):
    """ONNX ConvTranspose (the gradient of Conv with respect to its input).

    Computed as the convolution of the input dilated by the strides (zeros between
    its pixels, ``lhs_dilation``) with the spatially flipped kernel whose input and
    output channels are swapped within each group, padded by ``d (k - 1) - pad``
    (plus ``output_padding`` at the end): one ``conv_general_dilated``, linear in the
    input, that the tracker follows like a Conv. Output size per axis:
    ``s (n - 1) + output_padding + d (k - 1) + 1 - pad_begin - pad_end``.
    """
    nd = np.ndim(w) - 2
    if nd not in (1, 2, 3):
        raise ctx.fail(f"{nd}-D transposed convolution")
    if np.ndim(x) != nd + 2:
        raise InputError(
            f"ConvTranspose node {ctx.node.name!r}: input rank {np.ndim(x)} "
            f"does not match a {nd}-D kernel"
        )
    cin, m_group, *kernel = np.shape(w)
    group = int(ctx.attr("group", 1))
    if np.shape(x)[1] != cin or group < 1 or cin % group:
        raise InputError(
            f"ConvTranspose node {ctx.node.name!r}: {np.shape(x)[1]} input channels, "
            f"kernel {tuple(np.shape(w))} and group={group} do not fit"
        )
    kernel_shape = ctx.attr("kernel_shape")
    if kernel_shape is not None and tuple(kernel_shape) != tuple(kernel):
        raise ctx.fail(
            f"kernel_shape={kernel_shape} differs from the weight's {tuple(kernel)}"
        )
    strides = tuple(ctx.attr("strides") or (1,) * nd)
    dilations = tuple(ctx.attr("dilations") or (1,) * nd)
    out_pad = tuple(ctx.attr("output_padding") or (0,) * nd)
    if not len(strides) == len(dilations) == len(out_pad) == nd:
        raise InputError(
            f"ConvTranspose node {ctx.node.name!r}: strides, dilations and "
            f"output_padding need {nd} values each"
        )
    in_sizes = np.shape(x)[2:]
    reach = [d * (k - 1) for k, d in zip(kernel, dilations, strict=True)]
    full = [
        s * (n - 1) + r + 1 + op
        for n, s, r, op in zip(in_sizes, strides, reach, out_pad, strict=True)
    ]
    pads = _conv_transpose_pads(ctx, in_sizes, full, strides)
    if any(f - lo - hi < 1 for f, (lo, hi) in zip(full, pads, strict=True)):
        raise InputError(
            f"ConvTranspose node {ctx.node.name!r}: pads {pads} leave no output "
            f"of an input of spatial size {tuple(in_sizes)}"
        )
    conv_pads = [
        (r - lo, r - hi + op)
        for r, (lo, hi), op in zip(reach, pads, out_pad, strict=True)
    ]
    # Padding of the convolution where it is positive, cropping after it otherwise.
    grow = [(max(lo, 0), max(hi, 0)) for lo, hi in conv_pads]
    crop = [(min(lo, 0), min(hi, 0), 0) for lo, hi in conv_pads]
    # (C, M/g, k...) -> (M, C/g, k...) with the taps reversed: a Conv kernel (OI...).
    w = jnp.asarray(w).reshape((group, cin // group, m_group, *kernel))
    oi = jnp.swapaxes(w, 1, 2).reshape((group * m_group, cin // group, *kernel))
    oi = jnp.flip(oi, axis=tuple(range(2, nd + 2)))
    if nd == 2:  # channels-last, as Conv computes
        x, oi = nhwc_data(x), jnp.transpose(oi, (2, 3, 1, 0))
        dims, wrap = ("NHWC", "HWIO", "NHWC"), ChannelsLast
        crop, channels = [(0, 0, 0), *crop, (0, 0, 0)], (1, 1, 1, -1)
    else:
        spatial = "DHW"[-nd:]
        x = jnp.asarray(nchw(x))
        dims, wrap = ("NC" + spatial, "OI" + spatial, "NC" + spatial), lambda y: y
        crop, channels = [(0, 0, 0), (0, 0, 0), *crop], (1, -1) + (1,) * nd
    y = lax.conv_general_dilated(
        x,
        oi,
        window_strides=(1,) * nd,
        padding=grow,
        lhs_dilation=strides,
        rhs_dilation=dilations,
        dimension_numbers=dims,
        feature_group_count=group,
        precision=HIGHEST,
    )
    if any(c != (0, 0, 0) for c in crop):
        y = lax.pad(y, jnp.zeros((), y.dtype), crop)
    if bias is not None:
        y = y + jnp.reshape(bias, channels)
    return wrap(y)


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
