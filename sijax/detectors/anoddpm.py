"""AnoDDPM (Wyatt et al., CVPRW 2022): partial diffusion with simplex noise
(docs/detectors/anoddpm.md).

The test image is diffused only part of the way, to t = lambda, with multi-scale
simplex noise instead of Gaussian noise, and the reverse chain brings it back to
t = 0; what the network cannot explain as noise of that kind (an anomaly) is not
restored. With the noises drawn up front:

    x_lambda = sqrt(ab_lambda) x + sqrt(1 - ab_lambda) n_0,
    eps_hat  = eps_theta(x_t, t),
    x0_hat   = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t),
    x_s      = sqrt(ab_s) x0_hat + c1 n_k + c2 eps_hat,

over the steps lambda, lambda - stride, ..., >= 0 (then x0_hat of the last step),
with c1 = eta sqrt((1 - ab_t / ab_s)(1 - ab_s) / (1 - ab_t)) and
c2 = sqrt(1 - ab_s - c1^2) (:func:`sijax.diffusion.sampler.ddim`). With stride 1
and eta 1 this is the DDPM ancestral chain of the paper (posterior variance
beta~_t), each step's fresh noise n_k simplex noise as well. The map is
s = mean_filter(sum_c |rec - x|_c), piecewise linear in x; the paper's squared
error sum_c (rec - x)_c^2 is ``published=True`` (detection only).

Training replaces the Gaussian noise of the DDPM loss by simplex noise:
E || eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) n, t) - n ||^2, n simplex (``noise=
"gaussian"`` restores the DDPM loss, and Gaussian noise at test time).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sijax.detect.score import mean_filter
from sijax.detectors.base import Detector
from sijax.detectors.simplex import simplex_noise
from sijax.diffusion.loss import noise_prediction_loss
from sijax.diffusion.sampler import Noises, ddim
from sijax.diffusion.schedule import alpha_bar
from sijax.errors import InputError

__all__ = ["DETECTOR", "Options", "draw_noises", "loss", "noise", "preset",
           "reconstruction", "score", "steps_of", "testable", "wavelength"]

NOISES = ("simplex", "gaussian")
# The paper's images are 256 x 256: `frequency` is the first octave's wavelength
# there, and scales with the image side.
REFERENCE_SIDE = 256


@dataclasses.dataclass(frozen=True)
class Options:
    """AnoDDPM's settings (defaults: the paper's, except the strided chain and
    the mean filter).

    Attributes:
        t_lambda: lambda, the step the image is diffused to (250 of T = 1000 in the
            paper); must be below the schedule's T.
        stride: steps between successive denoising steps: lambda, lambda - stride,
            ... (1: the paper's full ancestral chain, lambda + 1 network calls;
            the default 25 keeps the test cheap: 11 calls from 250).
        eta: DDIM eta of the reverse chain (1: ancestral, fresh noise every step;
            0: deterministic DDIM after the forward jump).
        noise: "simplex" (the paper's) or "gaussian": the noise of the forward
            jump, of every reverse step and of the training loss.
        octaves: number of simplex scales (6 in the paper).
        persistence: amplitude ratio of successive octaves (0.8 in the paper).
        frequency: wavelength in pixels of the coarsest octave on a 256-pixel image
            (the paper's "frequency" 64); it scales with the image side
            (2 pixels at 8 x 8), and halves with every octave.
        filter_size: side of the mean filter of the map (1: none, as the paper;
            the default 3 steadies the map of small images, as the DAL paper's).
        published: the paper's map, the unfiltered squared error (not piecewise
            linear: detection only, a p-value raises NotPiecewiseLinearError).
    """

    t_lambda: int = 250
    stride: int = 25
    eta: float = 1.0
    noise: str = "simplex"
    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 64.0
    filter_size: int = 3
    published: bool = False

    def __post_init__(self):
        if self.t_lambda < 0:
            raise ValueError(f"t_lambda={self.t_lambda} must be >= 0")
        if self.stride < 1:
            raise ValueError(f"stride={self.stride} must be >= 1")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta={self.eta} must lie in [0, 1]")
        if self.noise not in NOISES:
            raise ValueError(f"noise={self.noise!r} must be one of {NOISES}")
        if self.octaves < 1:
            raise ValueError(f"octaves={self.octaves} must be >= 1")
        if not self.persistence > 0.0:
            raise ValueError(f"persistence={self.persistence} must be > 0")
        if not self.frequency > 0.0:
            raise ValueError(f"frequency={self.frequency} must be > 0")
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ValueError(
                f"filter_size={self.filter_size} must be a positive odd integer")


def steps_of(options: Options) -> tuple[int, ...]:
    """The reverse chain's steps: (lambda, lambda - stride, ..., >= 0)."""
    return tuple(range(options.t_lambda, -1, -options.stride))


def wavelength(options: Options, image_shape) -> float:
    """The coarsest octave's wavelength in pixels: frequency * side / 256."""
    return options.frequency * max(image_shape[0], image_shape[1]) / REFERENCE_SIDE


def noise(key: jax.Array, shape: tuple[int, ...], options: Options,
          dtype=None) -> jax.Array:
    """One draw of the method's noise of ``shape`` (..., H, W, C): multi-scale
    simplex noise (unit variance per pixel) or standard Gaussian noise."""
    dtype = dtype or jnp.result_type(float)
    if options.noise == "gaussian":
        return jax.random.normal(key, shape, dtype)
    return simplex_noise(key, shape, octaves=options.octaves,
                         persistence=options.persistence,
                         wavelength=wavelength(options, shape[-3:]), dtype=dtype)


def draw_noises(key: jax.Array, image_shape, options: Options) -> Noises:
    """Every noise of one reconstruction, from one key.

    Returns:
        Noises(eps0 (H, W, C): the forward jump's, eps (S, H, W, C): one per
        reverse step, S = len(steps_of(options))); simplex or Gaussian as
        ``options.noise`` says, in the default float dtype.
    """
    shape = tuple(image_shape)
    k0, k1 = jax.random.split(key)
    return Noises(eps0=noise(k0, shape, options),
                  eps=noise(k1, (len(steps_of(options)), *shape), options))


def reconstruction(eps_fn, x: jax.Array, noises: Noises, *, schedule,
                   options: Options) -> jax.Array:
    """Partial diffusion to lambda and the reverse chain back (module docstring).

    Args:
        eps_fn: one-image noise predictor ``eps_fn(x_t (H, W, C), t) -> (H, W, C)``.
        x: (H, W, C) test image.
        noises: from :func:`draw_noises` with the same options.
        schedule: concrete schedule (NumPy alpha_bar).
        options: :class:`Options`.

    Returns:
        (H, W, C) reconstruction, piecewise linear in ``x``.

    Raises:
        InputError: t_lambda outside the schedule, or noises of the wrong shape.
    """
    if options.t_lambda >= schedule.T:
        raise InputError(f"t_lambda={options.t_lambda} must be below the schedule's "
                         f"T={schedule.T}")
    if noises.eps0.shape != x.shape:
        raise InputError(f"{noises.eps0.shape=} must equal {x.shape=}")
    ab = float(alpha_bar(schedule, options.t_lambda))
    x_t = np.sqrt(ab) * x + np.sqrt(1.0 - ab) * noises.eps0
    return ddim(eps_fn, x_t, noises.eps, schedule=schedule, steps=steps_of(options),
                eta=options.eta)


def score(x: jax.Array, rec: jax.Array, options: Options) -> jax.Array:
    """The anomaly map (H, W): mean_filter(sum_c |rec - x|_c), piecewise linear;
    with ``published`` the paper's sum_c (rec - x)_c^2 (unfiltered, whatever
    ``filter_size`` says)."""
    e = rec - x
    if options.published:
        return jnp.sum(jnp.square(e), axis=-1)
    return mean_filter(jnp.sum(jnp.abs(e), axis=-1, keepdims=True),
                       options.filter_size)[..., 0]


def loss(apply, schedule, x0: jax.Array, key: jax.Array,
         options: Options) -> jax.Array:
    """The paper's training loss: noise prediction with simplex noise.

    t ~ U{0..T-1} per image, n the method's noise (:func:`noise`, one independent
    draw per image), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n, loss
    mean || apply(x_t, t) - n ||^2.

    Args:
        apply: the network in training mode, (B, H, W, C), (B,) -> (B, H, W, C).
        schedule: the training schedule.
        x0: (B, H, W, C) clean images.
        key: PRNG key of this step (used once: split into t and the noise).
        options: :class:`Options` (``noise`` chooses simplex or Gaussian).

    Returns:
        Scalar loss.
    """
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.T)
    n = noise(k_n, x0.shape, options, x0.dtype)
    return noise_prediction_loss(apply, schedule, x0, t, n)


def testable(options: Options) -> str | None:
    """Why these options give no p-value (None: they do)."""
    if options.published:
        return ("published=True selects the paper's squared-error map "
                "sum_c (rec - x)_c^2, which is not piecewise linear in the image")
    return None


def preset(size: int = 8):
    """AnoDDPM's recipe: U-Net 32/64/128, linear schedule T = 1000, simplex noise.

        sijax train --detector anoddpm --data DIR --workdir runs/anoddpm \\
            --set size=8 --set epochs=100

    Batch 32, Adam 1e-3, 100 epochs (800 steps on the 270 training images of the
    bundled digits set, ``sijax data digits``). Expected result: the simplex
    noise-prediction MSE falls from about 1 to about 0.2 within the first 20
    epochs on the standardised 8 x 8 digits, and to about 0.17 by epoch 40
    (measured on CPU).
    """
    from sijax.config import TrainConfig

    return TrainConfig(name="anoddpm", size=size, channels=(32, 64, 128),
                       n_train=1000, batch_size=32, epochs=100, lr=1e-3,
                       detector="anoddpm")


DETECTOR = Detector(
    name="anoddpm",
    title="AnoDDPM: partial diffusion to t = lambda with multi-scale simplex noise",
    options=Options, preset=preset, draw_noises=draw_noises,
    reconstruction=reconstruction, score=score, loss=loss, testable=testable,
)
