"""High-level reconstruction and sampling with a loaded model (used by the CLI).

The numerics are in :mod:`sijax.diffusion.sampler`; this module draws the noises from
a seed, validates inputs and writes the outputs.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.data.images import save_image, validate_image
from sijax.diffusion.sampler import DAL_STEPS, draw_noises, reconstruct, sample


class Reconstruction(NamedTuple):
    """One image and its reconstruction (all (H, W, C) float64).

    Attributes:
        x: the input image X.
        x_hat: D(X).
        error: e = D(X) - X, the raw reconstruction error (docs/method.md §6; the
            filtered score map is computed by ``sijax.detect``).
    """

    x: np.ndarray
    x_hat: np.ndarray
    error: np.ndarray


def reconstruct_image(model, x, *, seed: int = 0, steps=DAL_STEPS,
                      eta: float = 1.0) -> Reconstruction:
    """D(x) for one image with noises drawn from ``jax.random.key(seed)``.

    Args:
        model: a ``sijax.checkpoint.DiffusionModel``.
        x: (H, W, C) image matching ``model.image_shape``, finite.
        seed: seed of the noises (eps0 and one per step).
        steps: DDIM steps.
        eta: DDIM eta.

    Raises:
        InputError: wrong shape or channels, NaN/Inf pixels.
    """
    x = validate_image(x, model.image_shape)
    dtype = jax.tree.leaves(model.state)[0].dtype
    noises = draw_noises(jax.random.key(seed), x.shape, len(steps), dtype)
    fn = jax.jit(lambda x, n: reconstruct(model.denoiser(), x, n,
                                          schedule=model.schedule, steps=steps,
                                          eta=eta))
    x_hat = np.asarray(fn(jnp.asarray(x, dtype), noises), dtype=np.float64)
    return Reconstruction(x=x, x_hat=x_hat, error=x_hat - x)


def save_reconstruction(out_dir: str | os.PathLike, rec: Reconstruction) -> list[str]:
    """Writes ``reconstruction.{png,npy}`` and ``error.{png,npy}`` (and the input).

    Returns:
        The written paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, arr in (("input", rec.x), ("reconstruction", rec.x_hat),
                      ("error", rec.error)):
        for ext in ("npy", "png"):
            path = os.path.join(os.fspath(out_dir), f"{name}.{ext}")
            save_image(path, arr)
            paths.append(path)
    return paths


def sample_images(model, n: int, *, seed: int = 0, steps=None,
                  eta: float = 1.0) -> np.ndarray:
    """n images generated from pure noise (DDPM over all T steps by default).

    Returns:
        (n, H, W, C) float64.
    """
    dtype = jax.tree.leaves(model.state)[0].dtype
    keys = jax.random.split(jax.random.key(seed), n)
    fn = jax.jit(jax.vmap(lambda k: sample(model.denoiser(), k, model.image_shape,
                                           schedule=model.schedule, steps=steps,
                                           eta=eta, dtype=dtype)))
    return np.asarray(fn(keys), dtype=np.float64)
