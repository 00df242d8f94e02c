"""Channels-last tensors inside an imported graph (NCHW at its inputs and outputs)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sijax.onnx.graph import is_static


class ChannelsLast:
    """An NCHW tensor of the graph held channels-last, as ``data`` (N, H, W, C).

    Convolutions compute channels-last (:func:`sijax.diffusion.conv.conv2d`) and
    return this; element-wise operators, batch-norm, pooling, Resize and Concat keep
    it, and any other operator gets the NCHW array (one transpose, :func:`apply`). So a
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
NHWC_AXIS = (0, 3, 1, 2)


def nchw(x):
    return jnp.transpose(x.data, NHWC_AXIS) if isinstance(x, ChannelsLast) else x


def spatial_layout(x):
    """(data, wrap, full) of an input with spatial axes, in either layout.

    ``full(spatial, fill)`` places per-spatial-axis values among the data's axes
    (``fill`` for batch and channel), ``wrap`` gives a result the input's layout.
    """
    if isinstance(x, ChannelsLast):
        return x.data, ChannelsLast, lambda spatial, fill: (fill, *spatial, fill)
    return jnp.asarray(x), lambda y: y, lambda spatial, fill: (fill, fill, *spatial)


def nhwc_data(x):
    """A rank-4 NCHW operand (array or :class:`ChannelsLast`) as NHWC data."""
    if isinstance(x, ChannelsLast):
        return x.data
    if is_static(x):
        return np.transpose(x, (0, 2, 3, 1))
    return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))
