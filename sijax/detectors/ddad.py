"""DDAD (Mousakhan, Brox and Tayyub, 2023): denoising conditioned on the test image
(docs/detectors/ddad.md).

The image is diffused to t0 and denoised by DDIM steps whose noise estimate is
pulled towards the target image y, here the test image itself (y = x), so that
normal content is restored faithfully and anomalies are not. With the noises drawn
up front, x_{t0} = sqrt(ab_{t0}) x + sqrt(1 - ab_{t0}) eps_0 and per step t -> s
(t0, t0 - stride, ..., >= 0, then s = -1):

    e       = eps_theta(x_t, t)
    y_t     = sqrt(ab_t) y + sqrt(1 - ab_t) e                  (the target at t)
    eps_hat = e - w sqrt(1 - ab_t) (y_t - x_t)                  (conditioned noise)
    x0_hat  = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)
    x_s     = sqrt(ab_s) x0_hat + c1 eps_k + c2 eps_hat,

c1 = eta sqrt((1 - ab_t / ab_s)(1 - ab_s) / (1 - ab_t)), c2 = sqrt(1 - ab_s - c1^2);
the reconstruction is x0_hat of the last step. y enters linearly and eps_theta is a
ReLU network, so the reconstruction is piecewise linear in x. The map is the
pixel distance only, s = mean_filter(sum_c |rec - x|_c) (the paper adds a feature
distance from a pretrained network, which sijax does not have); ``published=True``
gives the published pixel term: channel-mean |rec - x| scaled by its maximum and
Gaussian-blurred (detection only).

Training: the DDPM noise-prediction loss (``loss`` None).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sijax.detect.score import mean_filter
from sijax.detectors.base import Detector
from sijax.diffusion.sampler import Noises, ddim_coefficients
from sijax.diffusion.sampler import draw_noises as sampler_noises
from sijax.diffusion.schedule import alpha_bar
from sijax.errors import InputError

__all__ = ["DETECTOR", "Options", "draw_noises", "gaussian_blur", "preset",
           "reconstruction", "score", "steps_of", "testable"]

# The paper's images are 256 x 256 and its blur has sigma = 4 pixels there.
REFERENCE_SIDE = 256
PUBLISHED_SIGMA = 4.0


@dataclasses.dataclass(frozen=True)
class Options:
    """DDAD's settings.

    Attributes:
        t0: the step the image is diffused to before denoising (250 of T = 1000,
            the published setting); must be below the schedule's T.
        stride: steps between successive DDIM steps t0, t0 - stride, ... (the
            published "skip" 25: 11 network calls from 250).
        w: conditioning weight (the paper tunes it per category; 3 is one of its
            values); 0 gives plain DDIM reconstruction.
        eta: DDIM eta (0: deterministic DDIM, the paper's equations; > 0 adds
            fresh Gaussian noise at every step, as the published code's eta = 1).
        filter_size: side of the mean filter of the pixel distance.
        published: the published pixel term of the map (max-normalised,
            Gaussian-blurred): not piecewise linear, detection only.
    """

    t0: int = 250
    stride: int = 25
    w: float = 3.0
    eta: float = 0.0
    filter_size: int = 3
    published: bool = False

    def __post_init__(self):
        if self.t0 < 0:
            raise ValueError(f"t0={self.t0} must be >= 0")
        if self.stride < 1:
            raise ValueError(f"stride={self.stride} must be >= 1")
        if not (math.isfinite(self.w) and self.w >= 0.0):
            raise ValueError(f"w={self.w} must be a finite number >= 0")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta} must lie in [0, 1]")
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ValueError(
                f"filter_size={self.filter_size} must be a positive odd integer")


def steps_of(options: Options) -> tuple[int, ...]:
    """The DDIM steps: (t0, t0 - stride, ..., >= 0)."""
    return tuple(range(options.t0, -1, -options.stride))


def draw_noises(key: jax.Array, image_shape, options: Options) -> Noises:
    """Every noise of one reconstruction, from one key.

    Returns:
        Noises(eps0 (H, W, C): the forward jump's, eps (S, H, W, C): one per DDIM
        step, used when eta > 0), standard Gaussian in the default float dtype.
    """
    return sampler_noises(key, tuple(image_shape), len(steps_of(options)))


def reconstruction(eps_fn, x: jax.Array, noises: Noises, *, schedule,
                   options: Options) -> jax.Array:
    """The DDIM reconstruction conditioned on y = x (module docstring).

    Args:
        eps_fn: one-image noise predictor ``eps_fn(x_t (H, W, C), t) -> (H, W, C)``.
        x: (H, W, C) test image (also the target y).
        noises: from :func:`draw_noises` with the same options.
        schedule: concrete schedule (NumPy alpha_bar).
        options: :class:`Options`.

    Returns:
        (H, W, C) reconstruction, piecewise linear in ``x``.

    Raises:
        InputError: t0 outside the schedule, or noises of the wrong shape.
    """
    if options.t0 >= schedule.T:
        raise InputError(f"t0={options.t0} must be below the schedule's "
                         f"T={schedule.T}")
    steps = steps_of(options)
    if noises.eps0.shape != x.shape or noises.eps.shape != (len(steps), *x.shape):
        raise InputError(f"noises of shapes {noises.eps0.shape}, {noises.eps.shape} "
                         f"do not fit the image {x.shape} and {len(steps)} steps")
    co = ddim_coefficients(schedule, steps, options.eta)
    ab0 = float(alpha_bar(schedule, options.t0))
    x_t = np.sqrt(ab0) * x + np.sqrt(1.0 - ab0) * noises.eps0
    y, w, dt = x, options.w, x.dtype
    per_step = (jnp.asarray(co.t, dt),
                jnp.asarray(np.sqrt(co.ab_t), dt),
                jnp.asarray(np.sqrt(1.0 - co.ab_t), dt),
                jnp.asarray(np.sqrt(co.ab_s), dt),
                jnp.asarray(co.c1, dt),
                jnp.asarray(co.c2, dt),
                noises.eps)

    def step(x_t, inputs):
        t, sq_ab_t, sq_1m_ab_t, sq_ab_s, c1, c2, eps_k = inputs
        e = eps_fn(x_t, t)
        y_t = sq_ab_t * y + sq_1m_ab_t * e
        eps_hat = e - w * sq_1m_ab_t * (y_t - x_t)
        x0_hat = (x_t - sq_1m_ab_t * eps_hat) / sq_ab_t
        return sq_ab_s * x0_hat + c1 * eps_k + c2 * eps_hat, None

    rec, _ = jax.lax.scan(step, x_t, per_step)
    return rec


def gaussian_blur(m: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of an (H, W) map, kernel side 2 int(4 sigma + 0.5)
    + 1 and reflected borders (the published map's filter)."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return m
    u = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (u / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), m.dtype)
    h, w = m.shape
    padded = jnp.pad(m, radius, mode="reflect" if min(h, w) > radius else "edge")
    rows = sum(k[i] * padded[i:i + h, :] for i in range(2 * radius + 1))
    return sum(k[i] * rows[:, i:i + w] for i in range(2 * radius + 1))


def score(x: jax.Array, rec: jax.Array, options: Options) -> jax.Array:
    """The anomaly map (H, W).

    Default (piecewise linear): mean_filter(sum_c |rec - x|_c). ``published``: the
    published pixel term, D = mean_c |rec - x|_c scaled to a maximum of 1 (the
    published combination rescales it by max(D_feature) / max(D), here with no
    feature term), then a Gaussian blur with sigma = 4 pixels at side 256, scaled
    to the image side.
    """
    e = jnp.abs(rec - x)
    if not options.published:
        return mean_filter(jnp.sum(e, axis=-1, keepdims=True), options.filter_size)[
            ..., 0]
    d = jnp.mean(e, axis=-1)
    d = d / jnp.maximum(jnp.max(d), jnp.finfo(d.dtype).tiny)
    sigma = PUBLISHED_SIGMA * max(x.shape[0], x.shape[1]) / REFERENCE_SIDE
    return gaussian_blur(d, sigma)


def testable(options: Options) -> str | None:
    """Why these options give no p-value (None: they do)."""
    if options.published:
        return ("published=True selects the published map, which divides the pixel "
                "distance by its maximum: not piecewise linear in the image")
    return None


def preset(size: int = 8):
    """DDAD's recipe: U-Net 32/64/128, linear schedule T = 1000, noise prediction.

        sijax train --detector ddad --data DIR --workdir runs/ddad \\
            --set size=8 --set epochs=100

    Batch 32, Adam 1e-3, 100 epochs (800 steps on the 270 training images of the
    bundled digits set, ``sijax data digits``). Expected result: the
    noise-prediction MSE falls from about 1 to about 0.2 within the first 20
    epochs on the standardised 8 x 8 digits (measured on CPU), and slowly below.
    """
    from sijax.config import TrainConfig

    return TrainConfig(name="ddad", size=size, channels=(32, 64, 128),
                       n_train=1000, batch_size=32, epochs=100, lr=1e-3,
                       detector="ddad")


DETECTOR = Detector(
    name="ddad", title="DDAD: DDIM denoising conditioned on the test image",
    options=Options, preset=preset, draw_noises=draw_noises,
    reconstruction=reconstruction, score=score, testable=testable,
)
