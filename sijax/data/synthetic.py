"""Synthetic training data of the paper: iid N(0, 1) images (docs/method.md §6)."""

import jax
import jax.numpy as jnp


def normal_images(key: jax.Array, n: int, image_shape: tuple[int, int, int],
                  dtype=jnp.float32) -> jax.Array:
    """n iid N(0, 1) images.

    Args:
        key: PRNG key (used once).
        n: number of images.
        image_shape: (H, W, C).
        dtype: float dtype.

    Returns:
        (n, H, W, C) array.
    """
    return jax.random.normal(key, (n, *image_shape), dtype=dtype)
