"""Noise schedules: the DDPM's linear one (docs/method.md §6) and the cosine one."""

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


SCHEDULES = ("linear", "cosine")


def cosine_schedule(T: int = 1000, s: float = 0.008,  # noqa: N803
                    max_beta: float = 0.999) -> Schedule:
    """Nichol and Dhariwal's cosine schedule (Improved DDPM, eq. 17) over T steps.

    alpha_bar(t) = f(t + 1) / f(0) with f(u) = cos((u / T + s) / (1 + s) * pi / 2)^2,
    so that step t = T - 1 ends at pure noise; betas capped at ``max_beta``.

    Returns:
        Schedule with betas and alpha_bar of shape (T,), float64.
    """
    if T < 1 or not s > 0.0:
        raise InputError(f"bad cosine schedule: {T=} {s=}")
    u = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((u + s) / (1.0 + s) * np.pi / 2.0) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
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
