"""DDIM/DDPM sampling and the DAL reconstruction D(x) (docs/method.md §6).

Everything here is a pure function of (eps_fn, x, noises): all randomness is drawn up
front (:func:`draw_noises`) and passed in as arrays, so the reconstruction is
deterministic and can be tracked along a line. ``eps_fn`` is the
noise predictor for ONE image, ``eps_hat = eps_fn(x_t, t)`` with x_t of shape
(H, W, C) and t a scalar; batch with ``jax.vmap``.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.diffusion.schedule import Schedule, alpha_bar
from sijax.errors import InputError

DAL_STEPS = (460, 345, 230, 115, 0)

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


class Noises(NamedTuple):
    """Every random tensor of one reconstruction.

    Attributes:
        eps0: (H, W, C) noise of the forward jump x -> x_{t'}.
        eps: (S, H, W, C) one per DDIM step; the last is unused (c1 = 0) when the
            last step goes to t = -1.
    """

    eps0: jax.Array
    eps: jax.Array


class DDIMCoefficients(NamedTuple):
    """Per-step constants of DDIM from t to s (all (S,) float64 NumPy arrays).

    Attributes:
        t: current steps; s: next steps (-1 after the last).
        ab_t, ab_s: alpha_bar at t and s.
        c1: eta * sqrt((1 - ab_t/ab_s) (1 - ab_s) / (1 - ab_t)), the fresh-noise scale.
        c2: sqrt(1 - ab_s - c1^2), the scale of eps_hat.
    """

    t: np.ndarray
    s: np.ndarray
    ab_t: np.ndarray
    ab_s: np.ndarray
    c1: np.ndarray
    c2: np.ndarray


def ddim_coefficients(schedule: Schedule, steps: Sequence[int],
                      eta: float = 1.0) -> DDIMCoefficients:
    """Constants of DDIM over ``steps`` (decreasing), ending at t = -1 (docs/method.md
    §6).

    Computed in NumPy float64 from a concrete schedule.

    Raises:
        InputError: steps not strictly decreasing in 0..T-1, or eta outside [0, 1].
    """
    t = np.asarray(tuple(steps), dtype=np.int64)
    if t.ndim != 1 or t.size < 1 or np.any(np.diff(t) >= 0) or t[-1] < 0 \
            or t[0] >= schedule.T:
        raise InputError(f"steps must decrease strictly within 0..T-1: {steps=}")
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"{eta=} must lie in [0, 1]")
    s = np.append(t[1:], -1)
    ab_t = alpha_bar(schedule, t)
    ab_s = alpha_bar(schedule, s)
    c1 = eta * np.sqrt((1.0 - ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t))
    c2 = np.sqrt(np.maximum(1.0 - ab_s - c1**2, 0.0))
    return DDIMCoefficients(t, s, ab_t, ab_s, c1, c2)


def draw_noises(key: jax.Array, image_shape: tuple[int, int, int], steps: int = 5,
                dtype=None) -> Noises:
    """Draws all noises of one reconstruction from one key.

    Args:
        key: PRNG key (used once, split into two).
        image_shape: (H, W, C).
        steps: number of DDIM steps S (len(steps) of :func:`reconstruct`).
        dtype: float dtype; default the default float (float64 with x64).

    Returns:
        Noises with eps0 (H, W, C) and eps (S, H, W, C).
    """
    dtype = dtype or jnp.result_type(float)
    k0, k1 = jax.random.split(key)
    return Noises(eps0=jax.random.normal(k0, image_shape, dtype),
                  eps=jax.random.normal(k1, (steps, *image_shape), dtype))


def ddim(eps_fn: EpsFn, x_t: jax.Array, eps: jax.Array, *, schedule: Schedule,
         steps: Sequence[int], eta: float = 1.0) -> jax.Array:
    """DDIM from x_{steps[0]} down to t = -1, as one ``lax.scan`` (docs/method.md §6).

    Per step t -> s: x0_hat = (x_t - sqrt(1-ab_t) e_hat)/sqrt(ab_t);
    x_s = sqrt(ab_s) x0_hat + c1 eps_k + c2 e_hat, with e_hat = eps_fn(x_t, t).
    The last step goes to s = -1 (ab_s = 1, c1 = c2 = 0) and returns x0_hat.
    With eta = 1 and every step of 0..T-1 this is ancestral DDPM sampling.

    Args:
        eps_fn: one-image noise predictor.
        x_t: (H, W, C) start at t = steps[0].
        eps: (S, H, W, C) fresh noise per step.
        schedule: concrete schedule.
        steps: S strictly decreasing steps.
        eta: 1 for DDPM-like (the DAL setting), 0 for deterministic DDIM.

    Returns:
        (H, W, C) x0_hat.
    """
    co = ddim_coefficients(schedule, steps, eta)
    if eps.shape != (len(co.t), *x_t.shape):
        raise InputError(f"{eps.shape=} must be (S, *x_t.shape) with S={len(co.t)}")
    dt = x_t.dtype
    xs = (jnp.asarray(co.t, dtype=dt),
          jnp.asarray(np.sqrt(co.ab_t), dtype=dt),
          jnp.asarray(np.sqrt(1.0 - co.ab_t), dtype=dt),
          jnp.asarray(np.sqrt(co.ab_s), dtype=dt),
          jnp.asarray(co.c1, dtype=dt),
          jnp.asarray(co.c2, dtype=dt),
          eps)

    def step(x, per_step):
        t, sq_ab_t, sq_1m_ab_t, sq_ab_s, c1, c2, eps_k = per_step
        e_hat = eps_fn(x, t)
        x0_hat = (x - sq_1m_ab_t * e_hat) / sq_ab_t
        return sq_ab_s * x0_hat + c1 * eps_k + c2 * e_hat, None

    x0, _ = jax.lax.scan(step, x_t, xs)
    return x0


def reconstruct(eps_fn: EpsFn, x: jax.Array, noises: Noises, *, schedule: Schedule,
                steps: Sequence[int] = DAL_STEPS, eta: float = 1.0) -> jax.Array:
    """The DAL reconstruction D(x) of one image (docs/method.md §6).

    x_{t'} = sqrt(ab_{t'}) x + sqrt(1 - ab_{t'}) eps0 with t' = steps[0], then
    :func:`ddim` with ``noises.eps``. Pure and deterministic in (eps_fn, x, noises);
    ``jax.jit`` it with ``steps``/``eta`` fixed and ``jax.vmap`` it over images.

    Args:
        eps_fn: one-image noise predictor, e.g. ``DiffusionModel.denoiser()``.
        x: (H, W, C) image.
        noises: from :func:`draw_noises` with ``len(steps)`` steps.
        schedule: concrete schedule (NumPy arrays).
        steps: DDIM steps, default (460, 345, 230, 115, 0).
        eta: DDIM eta (1 in the paper).

    Returns:
        (H, W, C) D(x), dtype of x.
    """
    if noises.eps0.shape != x.shape:
        raise InputError(f"{noises.eps0.shape=} must equal {x.shape=}")
    ab = float(alpha_bar(schedule, int(steps[0])))
    x_t = np.sqrt(ab) * x + np.sqrt(1.0 - ab) * noises.eps0
    return ddim(eps_fn, x_t, noises.eps, schedule=schedule, steps=steps, eta=eta)


def sample(eps_fn: EpsFn, key: jax.Array, image_shape: tuple[int, int, int], *,
           schedule: Schedule, steps: Sequence[int] | None = None,
           eta: float = 1.0, dtype=None) -> jax.Array:
    """Generates one image from pure noise x_T ~ N(0, I).

    Args:
        eps_fn: one-image noise predictor.
        key: PRNG key (used once).
        image_shape: (H, W, C).
        schedule: concrete schedule.
        steps: decreasing steps; default all T-1..0, i.e. DDPM when eta = 1.
        eta: DDIM eta.
        dtype: float dtype (default float).

    Returns:
        (H, W, C) sample.
    """
    steps = tuple(range(schedule.T - 1, -1, -1)) if steps is None else tuple(steps)
    dtype = dtype or jnp.result_type(float)
    k0, k1 = jax.random.split(key)
    x_t = jax.random.normal(k0, image_shape, dtype)
    eps = jax.random.normal(k1, (len(steps), *image_shape), dtype)
    return ddim(eps_fn, x_t, eps, schedule=schedule, steps=steps, eta=eta)
