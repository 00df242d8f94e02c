"""The noise-prediction loss of DDPM training (docs/method.md §6)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sijax.diffusion.schedule import Schedule


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array,
             eps: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, batched.

    Args:
        schedule: the noise schedule.
        x0: (B, H, W, C) clean images.
        t: (B,) integer steps in 0..T-1.
        eps: (B, H, W, C) standard normal noise.

    Returns:
        (B, H, W, C) x_t in the dtype of ``x0``.
    """
    ab = jnp.asarray(schedule.alpha_bar, dtype=x0.dtype)[t][:, None, None, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def noise_prediction_loss(eps_model: Callable, schedule: Schedule, x0: jax.Array,
                          t: jax.Array, eps: jax.Array) -> jax.Array:
    """Mean squared error between eps and eps_model(x_t, t).

    Args:
        eps_model: batched network, (B, H, W, C), (B,) -> (B, H, W, C).
        schedule, x0, t, eps: as in :func:`q_sample`.

    Returns:
        Scalar loss: mean over batch, pixels and channels.
    """
    eps_hat = eps_model(q_sample(schedule, x0, t, eps), t)
    return jnp.mean(jnp.square(eps_hat - eps))
