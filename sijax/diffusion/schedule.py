"""The linear noise schedule of the DDPM (docs/method.md §6)."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sijax.errors import InputError


class Schedule(NamedTuple):
    """A discrete diffusion schedule with T steps indexed 0..T-1.

    Attributes:
        betas: (T,) float64, beta_t.
        alpha_bar: (T,) float64, alpha_bar(t) = prod_{k<=t} (1 - beta_k).
    """

    betas: jnp.ndarray
    alpha_bar: jnp.ndarray

    @property
    def T(self) -> int:  # noqa: N802  (the paper's name)
        return self.betas.shape[0]


def linear_schedule(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02  # noqa: N803
) -> Schedule:
    """Linear beta from ``beta_start`` to ``beta_end`` over ``T`` steps (docs/method.md
    §6).

    The products are taken in NumPy float64 so that the constants do not depend on
    whether x64 is switched on; they are returned as NumPy arrays, which jax functions
    accept as constants.

    Returns:
        Schedule with betas and alpha_bar of shape (T,), float64.
    """
    if T < 1 or not 0.0 < beta_start <= beta_end < 1.0:
        raise InputError(f"bad schedule: {T=} {beta_start=} {beta_end=}")
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    return Schedule(betas=betas, alpha_bar=np.cumprod(1.0 - betas))


def alpha_bar(schedule: Schedule, t):
    """alpha_bar(t) with the convention alpha_bar(-1) = 1 (docs/method.md §6).

    Args:
        schedule: the schedule.
        t: int or integer array with values in -1..T-1 (Python ints give NumPy
            float64, traced values give a jnp array).

    Returns:
        alpha_bar(t), same shape as ``t``.
    """
    ab = schedule.alpha_bar
    if isinstance(t, (int, np.integer)) or isinstance(t, np.ndarray):
        t = np.asarray(t)
        return np.where(t < 0, 1.0, np.asarray(ab)[np.clip(t, 0, None)])
    ab = jnp.asarray(ab)
    return jnp.where(t < 0, 1.0, ab[jnp.clip(t, 0, None)])
