"""2D convolution of channels-last images, in the formulation that is fastest here.

One function, :func:`conv2d`, serves the native U-Net and the ONNX import. It picks
between two formulations by the size of the output image, both linear in the input
(so the tracker follows either with no rule of its own):

- at least ``LAX_CONV_MIN_PIXELS`` output pixels: XLA's own convolution;
- smaller, where XLA's convolution is slow (10-15x slower at 2x2 with 128 -> 256
  channels): one matrix product of the input against all kernel taps at once,
  (pixels, cin) x (cin, taps * cout), then the taps' outputs shifted into place and
  added.

Measured in float64 on one core (benchmarks/README.md, "Convolution"): per tracked
piece of the 5-step dal_v5 pipeline 1.27x faster at 16x16 and 1.35x at 32x32 than
im2col products everywhere (the formulation used before), and the taps beat im2col
on the small layers within the pipeline (23.4 against 28.6 ms per piece at 16x16),
although not always in isolation.
"""

import jax.numpy as jnp
from jax import lax

LAX_CONV_MIN_PIXELS = 64  # output pixels from which XLA's convolution is used


def conv2d(
    x,
    kernel,
    pads,
    strides=(1, 1),
    dilations=(1, 1),
    precision=None,
    lax_min_pixels=LAX_CONV_MIN_PIXELS,
):
    """Cross-correlation of a channels-last batch (as PyTorch's and ONNX's Conv).

    Args:
        x: (N, H, W, cin).
        kernel: (kh, kw, cin, cout), HWIO.
        pads: ((top, bottom), (left, right)) zero padding, non-negative.
        strides, dilations: (sh, sw) and (dh, dw).
        precision: of the products (``lax.Precision``), None for the default.
        lax_min_pixels: output pixels from which XLA's convolution is used (0: always,
            a huge number: never).

    Returns:
        (N, Ho, Wo, cout), without bias.
    """
    kh, kw, cin, cout = kernel.shape
    (sh, sw), (dh, dw) = strides, dilations
    n, h, w, _ = x.shape
    (pt, pb), (pl, pr) = pads
    ho = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    wo = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if ho * wo >= lax_min_pixels:
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(sh, sw),
            padding=((pt, pb), (pl, pr)),
            rhs_dilation=(dh, dw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
    taps = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
    y = jnp.einsum("nhwc,ck->nhwk", x, taps, precision=precision)
    pad = [(0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)]
    y = lax.pad(y, jnp.zeros((), y.dtype), pad)
    out = None
    for i in range(kh):
        for j in range(kw):
            t = (i * kw + j) * cout
            part = lax.slice(
                y,
                (0, i * dh, j * dw, t),
                (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, t + cout),
                (1, sh, sw, 1),
            )
            out = part if out is None else out + part
    return out
