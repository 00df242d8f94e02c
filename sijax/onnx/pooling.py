"""Pooling operators of the ONNX import (average, global average, max)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.onnx.layout import spatial_layout
from sijax.onnx.linalg import conv_pads
from sijax.onnx.operators import implements


def _pool_geometry(ctx, x):
    nd = np.ndim(x) - 2
    kernel = tuple(ctx.attr("kernel_shape"))
    strides = ctx.attr("strides") or (1,) * nd
    dilations = ctx.attr("dilations") or (1,) * nd
    if ctx.attr("ceil_mode", 0):
        raise ctx.fail("ceil_mode=1")
    pads = conv_pads(ctx, np.shape(x)[2:], kernel, strides, dilations)
    return nd, kernel, tuple(strides), tuple(dilations), pads


@implements("AveragePool")
def _average_pool(ctx, x):
    nd, kernel, strides, dil, pads = _pool_geometry(ctx, x)
    if any(d != 1 for d in dil):
        raise ctx.fail("dilated average pooling")
    data, wrap, full = spatial_layout(x)
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


@implements("GlobalAveragePool")
def _global_average_pool(ctx, x):
    axes = tuple(range(2, np.ndim(x)))
    return jnp.mean(x, axis=axes, keepdims=True)


@implements("MaxPool")
def _max_pool(ctx, x):
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        raise ctx.fail("the Indices output of MaxPool")
    nd, kernel, strides, dil, pads = _pool_geometry(ctx, x)
    data, wrap, full = spatial_layout(x)
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
