"""si4onnx's post-processing operators, as piecewise-linear ``jax.numpy`` maps.

Each operator maps the selected network output (an NCHW or NCL array, batch first, as
si4onnx 0.1.13 passes it) to a new score map. si4onnx computes every operator twice
(its value and an interval ``forward_si``); here one ``__call__`` serves the forward
pass and the tracker (:func:`sijax.track` cuts the piece where ``abs`` changes sign),
so the two cannot disagree.

Operators are frozen dataclasses: hashable, so a pipeline is part of the static key
of the compiled search and two models with the same pipeline share one compile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Abs",
    "AverageFilter",
    "GaussianFilter",
    "InputDiff",
    "L1Norm",
    "Neg",
    "Operator",
]


class Operator:
    """Base class of the operators: ``op(x, input_x) -> score`` (input_x is the
    tested network input, used by :class:`InputDiff` only)."""

    def __call__(self, x: jax.Array, input_x: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class InputDiff(Operator):
    """x - input: the reconstruction error against the tested input (si4onnx's
    ``InputDiff``; the network output and that input have one shape)."""

    def __call__(self, x, input_x):
        if x.shape != input_x.shape:
            raise ValueError(
                f"InputDiff: output shape {x.shape} != input shape {input_x.shape}"
            )
        return x - input_x


@dataclasses.dataclass(frozen=True)
class Neg(Operator):
    """-x."""

    def __call__(self, x, input_x):
        return -x


@dataclasses.dataclass(frozen=True)
class Abs(Operator):
    """|x| (piecewise linear: the tracker cuts where an element changes sign)."""

    def __call__(self, x, input_x):
        return jnp.abs(x)


def _depthwise(x: jax.Array, kernel: np.ndarray, pad: int) -> jax.Array:
    """Per-channel correlation with ``kernel`` ((k,) or (k, k)), zero padding ``pad``
    on every side, as torch's ``conv{1,2}d(..., padding=pad, groups=C)``."""
    if x.ndim not in (3, 4):
        raise ValueError(f"filters take 3-D (N, C, L) or 4-D inputs, got {x.shape=}")
    c = x.shape[1]
    w = jnp.asarray(np.broadcast_to(kernel, (c, 1) + kernel.shape), x.dtype)
    spatial = "H" if x.ndim == 3 else "HW"
    dn = lax.conv_dimension_numbers(
        x.shape, w.shape, ("NC" + spatial, "OI" + spatial, "NC" + spatial)
    )
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=(1,) * (x.ndim - 2),
        padding=[(pad, pad)] * (x.ndim - 2),
        dimension_numbers=dn,
        feature_group_count=c,
        precision=lax.Precision.HIGHEST,
    )


@dataclasses.dataclass(frozen=True)
class AverageFilter(Operator):
    """Mean over a ``kernel_size`` window (1-D or 2-D), zero padding
    ``kernel_size // 2``, divided by the full window size everywhere (as si4onnx)."""

    kernel_size: int = 3

    def __call__(self, x, input_x):
        k = int(self.kernel_size)
        if x.ndim == 3:
            kernel = np.ones((k,)) / k
        elif x.ndim == 4:
            kernel = np.ones((k, k)) / (k**2)
        else:
            raise ValueError("Unsupported shape")
        return _depthwise(x, kernel, k // 2)


def _torch_sum32(v: np.ndarray) -> np.float32:
    """A float32 sum in the order of PyTorch's vectorised CPU reduction (8 lanes,
    the tail added into the first lanes, then the lanes in order): the kernel's
    normaliser rounds like si4onnx's (a plain float32 sum can differ by one ulp)."""
    v = np.asarray(v, np.float32).ravel()
    lanes = np.zeros(8, np.float32)
    n = len(v) // 8 * 8
    for i in range(0, n, 8):
        lanes = (lanes + v[i : i + 8]).astype(np.float32)
    for j, x in enumerate(v[n:]):
        lanes[j] = np.float32(lanes[j] + x)
    total = np.float32(0.0)
    for x in lanes:
        total = np.float32(total + x)
    return total


def gaussian_kernel(kernel_size: int, sigma: float, ndim: int) -> np.ndarray:
    """si4onnx's Gaussian kernel, float64 values of a float32 computation.

    si4onnx builds it from an integer grid ``arange(-k // 2 + 1, k // 2 + 1)``
    divided by a Python float, which PyTorch evaluates in float32, then casts to
    float64; the same float32 steps are repeated here (exp correctly rounded to
    float32, PyTorch's summation order) so that the kernels agree bit for bit on
    the sizes tested.
    """
    k = int(kernel_size)
    t = np.arange(-k // 2 + 1, k // 2 + 1)
    if ndim == 1:
        sq = (t**2).astype(np.float32)
    else:
        sq = (t[None, :] ** 2 + t[:, None] ** 2).astype(np.float32)
    arg = (-sq / np.float32(2 * sigma**2)).astype(np.float32)
    w = np.exp(arg.astype(np.float64)).astype(np.float32)
    w = (w / _torch_sum32(w)).astype(np.float32)
    return w.astype(np.float64)


@dataclasses.dataclass(frozen=True)
class GaussianFilter(Operator):
    """Gaussian smoothing, ``kernel_size`` taps of standard deviation ``sigma``,
    zero padding ``kernel_size // 2`` (1-D input: a 1-D kernel)."""

    kernel_size: int = 3
    sigma: float = 1.0

    def __call__(self, x, input_x):
        ndim = 1 if x.ndim == 3 else 2
        return _depthwise(
            x,
            gaussian_kernel(self.kernel_size, self.sigma, ndim),
            self.kernel_size // 2,
        )


@dataclasses.dataclass(frozen=True)
class L1Norm(Operator):
    """Sum of |x| over the channels, repeated on every channel.

    As si4onnx: the channel axis is 1 for a 4-D input and 0 for a 3-D one (si4onnx
    takes a 3-D tensor as unbatched (C, H, W)).
    """

    def __call__(self, x, input_x):
        if x.ndim == 4:
            axis = 1
        elif x.ndim == 3:
            axis = 0
        else:
            raise ValueError(f"Unsupported shape: {x.shape}")
        s = jnp.sum(jnp.abs(x), axis=axis, keepdims=True)
        return jnp.broadcast_to(s, x.shape)
