"""MDPS: masked diffusion posterior sampling (Wu et al., IJCAI 2024).

The method and its piecewise-linear form: docs/detectors/mdps.md.

The test image y = x is treated as a noisy observation of a normal image on the
pixels believed normal, and normal images are drawn from the diffusion posterior with
diffusion posterior sampling (DPS, Chung et al., ICLR 2023): each reverse step of a
DDIM/DDPM chain from ``t_start`` down to 0 is followed by a gradient step on the data
consistency ||M (y - x0_hat(x_t))||^2, whose gradient with respect to x_t is taken
through the network with ``jax.vjp`` inside the sampler. Two stages:

1. posterior samples guided on the whole image (M = 1); their averaged, mean-filtered
   error map gives the first-stage mask M1 = {map <= ``mask_threshold``} of pixels
   believed normal;
2. posterior samples guided on M1 only (masked DPS), with the pixels of M1 reset at
   every step to the forward-noised input (masked resampling); the anomaly map is the
   average of the samples' error maps.

Everything is piecewise linear in x with the default (fixed) DPS step size: the
gradient of the squared error is J^T M (x0_hat - y), J = d x0_hat / d x_t, which for a
ReLU network is a piecewise-constant matrix times a piecewise-affine vector. The
published step size divides by ||M (y - x0_hat)|| (``published=True``): detection
only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.detect.score import mean_filter
from sijax.detectors.base import Detector
from sijax.diffusion.sampler import DDIMCoefficients, ddim_coefficients
from sijax.errors import InputError

__all__ = [
    "DETECTOR",
    "Noises",
    "Options",
    "draw_noises",
    "dps_guidance",
    "error_map",
    "posterior_sample",
    "preset",
    "reconstruction",
    "representative",
    "score",
    "testable",
    "timesteps",
]


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of MDPS (defaults: a CPU-sized version of the published recipe).

    Attributes:
        t_start: the step both stages start from (the input diffused to it); the
            published configurations use 200 of T = 1000.
        steps: number of sampler steps from ``t_start`` down to 0, evenly spaced
            (the published configurations use 10).
        eta: DDIM eta of the steps (1: DDPM-like fresh noise, as published).
        zeta: the DPS step size. Default form: x_s -= zeta J^T M (x0_hat - y) (the
            gradient of 0.5 ||M (y - x0_hat)||^2); with ``published`` the step is
            zeta times the gradient of ||M (y - x0_hat)|| (unit-norm residual), so
            the two zetas are in different units.
        samples: posterior samples per stage, each with its own noises; the maps of
            the samples are averaged (in both stages).
        mask_threshold: M1 = {first-stage map <= mask_threshold} are the pixels
            believed normal (guided and resampled in stage 2); the map is in the
            units of the score (a mean-filtered sum over channels of |rec - x|).
        filter_size: side of the mean filter of both maps (odd).
        published: the published DPS step size zeta / ||M (y - x0_hat)|| (not
            piecewise linear: detection only, no p-value).
    """

    t_start: int = 200
    steps: int = 5
    eta: float = 1.0
    zeta: float = 0.1
    samples: int = 2
    mask_threshold: float = 0.5
    filter_size: int = 3
    published: bool = False

    def __post_init__(self):
        for name in ("t_start", "steps", "samples", "filter_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"{name}={value!r} must be an integer")
            object.__setattr__(self, name, int(value))
        if self.t_start < 0:
            raise ValueError(f"t_start={self.t_start} must be >= 0")
        if not 1 <= self.steps <= self.t_start + 1:
            raise ValueError(
                f"steps={self.steps} must lie in 1..t_start + 1 = {self.t_start + 1} "
                "(distinct integer steps from t_start down to 0)")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta} must lie in [0, 1]")
        if not (math.isfinite(self.zeta) and self.zeta >= 0.0):
            raise ValueError(f"zeta={self.zeta} must be a finite number >= 0")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be >= 1")
        if not (math.isfinite(self.mask_threshold) and self.mask_threshold >= 0.0):
            raise ValueError(
                f"mask_threshold={self.mask_threshold} must be a finite number >= 0 "
                "(the first-stage map is never negative)")
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ValueError(
                f"filter_size={self.filter_size} must be a positive odd integer")
        if not isinstance(self.published, bool):
            raise ValueError(f"published={self.published!r} must be a bool")


def testable(options: Options) -> str | None:
    """Why no p-value can be computed with ``options`` (None: it can)."""
    if options.published:
        return ("published=True divides the DPS step by ||M (y - x0_hat)||, a square "
                "root of a sum of squares of the image (not piecewise linear); use "
                "the fixed step size (published=False) for the test")
    return None


def preset(size: int = 8):
    """U-Net 32/64/128, 1000 iid N(0, 1) images, batch 32, Adam 3e-4, 100 epochs.

        sijax train --detector mdps --set size=8 --set epochs=100 --workdir runs/mdps

    The network is the DDPM's noise predictor (linear schedule, T = 1000): the
    noise-prediction MSE falls from about 1.0 to about 0.28 within the first epochs
    (the Bayes risk for N(0, 1) images is mean_t alpha_bar_t = 0.2755).

    Args:
        size: image side, a multiple of 4.
    """
    from sijax.config import TrainConfig

    return TrainConfig(name="mdps", size=size, channels=(32, 64, 128), n_train=1000,
                       batch_size=32, epochs=100, lr=3e-4, schedule_kind="linear",
                       detector="mdps")


class Noises(NamedTuple):
    """Every random tensor of one MDPS detection (S samples, K steps).

    Attributes:
        z1: (S, H, W, C) noise of the forward jump x -> x_{t_start}, stage 1.
        eps1: (S, K, H, W, C) fresh noise of each step, stage 1.
        z2: (S, H, W, C) the same for stage 2; also the noise of the forward-noised
            input that the trusted pixels are reset to at every step.
        eps2: (S, K, H, W, C) fresh noise of each step, stage 2.
    """

    z1: jax.Array
    eps1: jax.Array
    z2: jax.Array
    eps2: jax.Array


def draw_noises(key: jax.Array, image_shape, options: Options) -> Noises:
    """All noises of one test from one key (used once, split in four).

    Args:
        key: PRNG key.
        image_shape: (H, W, C).
        options: give the number of samples S and of steps K.

    Returns:
        :class:`Noises` in the default float dtype.
    """
    dtype = jnp.result_type(float)
    shape = tuple(image_shape)
    s, k = options.samples, options.steps
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return Noises(z1=jax.random.normal(k1, (s, *shape), dtype),
                  eps1=jax.random.normal(k2, (s, k, *shape), dtype),
                  z2=jax.random.normal(k3, (s, *shape), dtype),
                  eps2=jax.random.normal(k4, (s, k, *shape), dtype))


def timesteps(options: Options) -> tuple[int, ...]:
    """The K strictly decreasing steps from ``t_start`` to 0 (rounded linspace)."""
    if options.steps == 1:
        return (options.t_start,)
    grid = np.linspace(options.t_start, 0.0, options.steps)
    return tuple(int(s) for s in np.floor(grid + 0.5))


# --------------------------------------------------------------------------- guidance


def dps_guidance(eps_fn, x_t: jax.Array, t, y: jax.Array, weights: jax.Array, *,
                 sq_ab: float, sq_1m_ab: float, published: bool = False):
    """The denoised estimate and the DPS gradient at one step (Chung et al., eq. 16).

    x0_hat(x_t) = (x_t - sqrt(1 - ab_t) eps(x_t, t)) / sqrt(ab_t) (Tweedie), and

        g = J^T M (x0_hat - y) = grad_{x_t} 0.5 ||M (y - x0_hat)||^2,
        J = d x0_hat / d x_t,

    computed as ``jax.vjp`` of x0_hat at x_t applied to the weighted residual (no
    square is formed, so the whole step stays piecewise linear in x_t and y). With
    ``published``: g / ||M (y - x0_hat)|| = grad_{x_t} ||M (y - x0_hat)||.

    Args:
        eps_fn: one-image noise predictor ``eps_fn(x_t (H, W, C), t) -> (H, W, C)``.
        x_t: (H, W, C) current sample.
        t: the step (scalar).
        y: (H, W, C) the observation (the test image).
        weights: (H, W, C) the guidance mask M (0/1 floats).
        sq_ab, sq_1m_ab: sqrt(ab_t), sqrt(1 - ab_t).
        published: normalise by the residual's norm.

    Returns:
        (x0_hat, eps_hat, g), each (H, W, C).
    """

    def denoise(u):
        e = eps_fn(u, t)
        return (u - sq_1m_ab * e) / sq_ab, e

    def with_gradient(u):
        x0_hat, pull, e_hat = jax.vjp(denoise, u, has_aux=True)
        r = weights * (x0_hat - y)
        (g,) = pull(r)
        if published:
            norm = jnp.sqrt(jnp.sum(r * r))
            g = g / jnp.maximum(norm, jnp.finfo(g.dtype).tiny)
        return x0_hat, e_hat, g

    return with_gradient(x_t)


def posterior_sample(eps_fn, y: jax.Array, z: jax.Array, eps: jax.Array, *,
                     coefficients: DDIMCoefficients, zeta: float, weights: jax.Array,
                     keep: jax.Array | None = None, published: bool = False):
    """One DPS chain from t_start = ``coefficients.t[0]`` to 0, as one ``lax.scan``.

    x_{t_start} = sqrt(ab) y + sqrt(1 - ab) z; then for each step t -> s:

        x_t <- where(keep, sqrt(ab_t) y + sqrt(1 - ab_t) z, x_t)    (masked resampling)
        x0_hat, eps_hat, g = dps_guidance(x_t)
        x_s = sqrt(ab_s) x0_hat + c1 eps_k + c2 eps_hat - zeta g       (DDIM + DPS)

    The last step goes to s = -1 (ab_s = 1, c1 = c2 = 0): x0_hat - zeta g.

    Args:
        eps_fn: one-image noise predictor.
        y: (H, W, C) observation (the test image).
        z: (H, W, C) forward noise (start, and the resampled pixels).
        eps: (K, H, W, C) fresh noise per step.
        coefficients: :func:`sijax.diffusion.sampler.ddim_coefficients` of the K
            steps.
        zeta: DPS step size.
        weights: (H, W, C) guidance mask M.
        keep: (H, W, C) bool, the pixels reset to the forward-noised y at every
            step; None: none.
        published: the normalised DPS step (not piecewise linear).

    Returns:
        (H, W, C) the posterior sample.
    """
    co = coefficients
    dt = y.dtype
    if eps.shape != (len(co.t), *y.shape):
        raise InputError(f"{eps.shape=} must be (K, *y.shape) with K={len(co.t)}")
    sq_ab0 = float(np.sqrt(co.ab_t[0]))
    x_start = sq_ab0 * y + float(np.sqrt(1.0 - co.ab_t[0])) * z
    xs = (jnp.asarray(co.t, dt), jnp.asarray(np.sqrt(co.ab_t), dt),
          jnp.asarray(np.sqrt(1.0 - co.ab_t), dt), jnp.asarray(np.sqrt(co.ab_s), dt),
          jnp.asarray(co.c1, dt), jnp.asarray(co.c2, dt), eps)
    zeta = jnp.asarray(zeta, dt)

    def step(x_t, per_step):
        t, sq_ab_t, sq_1m_ab_t, sq_ab_s, c1, c2, eps_k = per_step
        if keep is not None:
            x_t = jnp.where(keep, sq_ab_t * y + sq_1m_ab_t * z, x_t)
        x0_hat, e_hat, g = dps_guidance(eps_fn, x_t, t, y, weights, sq_ab=sq_ab_t,
                                        sq_1m_ab=sq_1m_ab_t, published=published)
        return sq_ab_s * x0_hat + c1 * eps_k + c2 * e_hat - zeta * g, None

    x0, _ = lax.scan(step, x_start, xs)
    return x0


# --------------------------------------------------------------------------- maps


def error_map(x: jax.Array, recs: jax.Array, filter_size: int = 3) -> jax.Array:
    """The averaged anomaly map of S posterior samples.

    A(x) = mean_filter( (1/S) sum_i sum_c |rec_i - x|_c ).

    Args:
        x: (H, W, C) image.
        recs: (S, H, W, C) posterior samples.
        filter_size: odd side of the mean filter.

    Returns:
        (H, W) map.
    """
    e = jnp.mean(jnp.sum(jnp.abs(recs - x[None]), axis=-1), axis=0)
    return mean_filter(e[..., None], filter_size)[..., 0]


def representative(x: jax.Array, recs: jax.Array) -> jax.Array:
    """One (H, W, C) image standing for S posterior samples, whose error is theirs.

    rec = x + s (1/S) sum_i |rec_i - x| with s = +1 where the mean deviation
    (1/S) sum_i (rec_i - x) is >= 0 and -1 elsewhere. For S = 1 it is the sample
    itself; for any S, sum_c |rec - x| is the average of the samples' sum_c |rec_i -
    x|, so :func:`score` of it is :func:`error_map` of the samples.
    """
    d = recs - x[None]
    sign = jnp.where(jnp.mean(d, axis=0) >= 0, 1.0, -1.0).astype(x.dtype)
    return x + sign * jnp.mean(jnp.abs(d), axis=0)


def score(x: jax.Array, rec: jax.Array, options: Options) -> jax.Array:
    """The anomaly map mean_filter(sum_c |rec - x|_c), (H, W)."""
    return error_map(x, rec[None], options.filter_size)


# --------------------------------------------------------------------------- detector


def _check_noises(noises: Noises, shape, options: Options) -> None:
    s, k = options.samples, options.steps
    want = {"z1": (s, *shape), "eps1": (s, k, *shape), "z2": (s, *shape),
            "eps2": (s, k, *shape)}
    for name, w in want.items():
        got = tuple(getattr(noises, name).shape)
        if got != w:
            raise InputError(f"noises.{name}.shape={got} must be {w} (samples={s}, "
                             f"steps={k}); draw them with the model's options")


def reconstruction(eps_fn, x: jax.Array, noises: Noises, *, schedule,
                   options: Options, return_mask: bool = False):
    """The MDPS reconstruction of one image (docs/detectors/mdps.md).

    Stage 1: S posterior samples guided on the whole image (M = 1); the first map
    A1 = :func:`error_map` of them and M1 = {A1 <= mask_threshold}. Stage 2: S
    posterior samples guided on M1 with the pixels of M1 resampled from the
    forward-noised input at every step. Returns :func:`representative` of the
    stage-2 samples, so that :func:`score` of it is their averaged map.

    Args:
        eps_fn: one-image noise predictor.
        x: (H, W, C) image (also the observation y).
        noises: from :func:`draw_noises` with these options.
        schedule: the model's concrete schedule.
        options: :class:`Options`.
        return_mask: also return M1, (H, W) bool.

    Returns:
        (H, W, C) reconstruction (and M1 with ``return_mask``).
    """
    _check_noises(noises, x.shape, options)
    co = ddim_coefficients(schedule, timesteps(options), options.eta)
    sample = functools.partial(posterior_sample, eps_fn, x, coefficients=co,
                               zeta=options.zeta, published=options.published)
    ones = jnp.ones_like(x)
    recs1 = jax.vmap(lambda z, e: sample(z, e, weights=ones))(noises.z1, noises.eps1)
    trusted = error_map(x, recs1, options.filter_size) <= options.mask_threshold
    keep = jnp.broadcast_to(trusted[..., None], x.shape)
    weights = keep.astype(x.dtype)
    recs2 = jax.vmap(lambda z, e: sample(z, e, weights=weights, keep=keep))(
        noises.z2, noises.eps2)
    rec = representative(x, recs2)
    return (rec, trusted) if return_mask else rec


DETECTOR = Detector(
    name="mdps",
    title="MDPS: masked diffusion posterior sampling (DPS guided by the image)",
    options=Options, preset=preset, draw_noises=draw_noises,
    reconstruction=reconstruction, score=score, testable=testable,
)
