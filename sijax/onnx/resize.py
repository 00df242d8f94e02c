"""The Resize operator of the ONNX import (nearest and linear, as interpolation
matrices applied axis by axis)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sijax.onnx.layout import NHWC_AXIS, ChannelsLast, spatial_layout
from sijax.onnx.linalg import HIGHEST
from sijax.onnx.operators import implements


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


@implements("Resize")
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
    y, wrap, _ = spatial_layout(x)
    for axis in range(rank):
        if out_shape[axis] == in_shape[axis] and scale[axis] == 1.0:
            continue
        if axis < 2 and rank > 2:
            raise ctx.fail("resizing the batch or channel axis")
        m = _resize_matrix(ctx, mode, out_shape[axis], in_shape[axis], scale[axis])
        if wrap is ChannelsLast:
            axis = NHWC_AXIS[axis]
        y = jnp.moveaxis(
            jnp.tensordot(
                jnp.asarray(m, y.dtype), y, axes=((1,), (axis,)), precision=HIGHEST
            ),
            0,
            axis,
        )
    return wrap(y)
