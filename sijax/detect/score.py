"""Score maps and regions of the DAL detector (docs/method.md §6, "Score and region").

Everything here is piecewise linear in the image, so the tracker can follow it along a
line: a 3x3 mean filter (a linear map), an absolute value and a strict threshold.
"""

import jax
import jax.numpy as jnp
from jax import lax


def mean_filter(e: jax.Array, size: int = 3) -> jax.Array:
    """size x size mean filter with zero padding, divided by size**2 everywhere.

    Args:
      e: (H, W, C) error image.
      size: odd filter width.

    Returns:
      (H, W, C) filtered image; border pixels average in zeros, as in the paper.
    """
    if size == 1:
        return e
    lo = (size - 1) // 2
    hi = size - 1 - lo
    summed = lax.reduce_window(
        e,
        jnp.zeros((), e.dtype),
        lax.add,
        window_dimensions=(size, size, 1),
        window_strides=(1, 1, 1),
        padding=((lo, hi), (lo, hi), (0, 0)),
    )
    return summed / (size * size)


def score_map(
    x: jax.Array, reconstruction: jax.Array, *, filter_size: int = 3
) -> jax.Array:
    """Anomaly score s = sum_c |filter(D(X) - X)_c|.

    Args:
      x: (H, W, C) test image.
      reconstruction: (H, W, C) D(X).
      filter_size: width of the mean filter.

    Returns:
      (H, W) score map.
    """
    return jnp.sum(jnp.abs(mean_filter(reconstruction - x, filter_size)), axis=-1)


def region(score: jax.Array, threshold: float) -> jax.Array:
    """Detected region M = {score > threshold} (strict), an (H, W) bool mask."""
    return score > threshold
