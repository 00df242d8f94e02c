"""DeCo-Diff: deviation-correction diffusion (Beizaee et al., CVPR 2025), in pixels.

docs/detectors/deco_diff.md gives the method, its equations and every difference from
the paper. In short, with M (H, W) the indicator of the corrupted ("deviated") patches,
n the content put there and abar_t the cosine schedule (T = 10):

* training: x_t = x0 + M (sqrt(abar_t) x0 + sqrt(1 - abar_t) n - x0); the network
  predicts the direction of deviation D = (x_t - x0) / sqrt(1 - abar_t)
  = M (n - c_t x0) with c_t = (1 - sqrt(abar_t)) / sqrt(1 - abar_t), and the loss is
  the mean squared error of D (:func:`loss`); n is patch-shuffled content of the same
  image (and, optionally, Gaussian noise on a share of the patches);
* test: the image itself is x_{t0} (normal regions are never rescaled or noised in
  this process); each step t -> s removes the predicted deviation,
  x0_hat = x_t - sqrt(1 - abar_t) D_hat, x_s = x0_hat + sqrt(1 - abar_s) D_hat
  (abar_{-1} = 1), down to x0_hat at the last step (:func:`reconstruction`);
* map: mean_filter(min(max_c |rec - x|, clip)) / clip (:func:`score`).

Everything at test time is piecewise linear in the image, except the published
geometric-mean map (``published=True``), which is kept for detection only.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.detect.score import mean_filter
from sijax.detectors.base import Detector
from sijax.diffusion.schedule import Schedule, alpha_bar
from sijax.errors import InputError

__all__ = [
    "DETECTOR",
    "Corruption",
    "Noises",
    "Options",
    "correction_steps",
    "corrupt",
    "deviation",
    "draw_noises",
    "loss",
    "patch_sizes",
    "preset",
    "reconstruction",
    "score",
    "testable",
    "training_batch",
]

STARTS = ("image", "noised")


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of DeCo-Diff (defaults: an 8x8 adaptation of the paper's, see
    docs/detectors/deco_diff.md).

    Attributes:
        t0: the step at which the test image is taken as x_{t0} (0..T-1).
        stride: the correction visits t0, t0 - stride, ... >= 0 (the authors'
            evaluation is t0 = 8, stride = 2 of T = 10).
        start: "image" (the paper's deterministic form: x_{t0} = x) or "noised"
            (x_{t0} = sqrt(abar_t0) x + sqrt(1 - abar_t0) eps with the drawn eps:
            the whole image treated as deviated).
        patch_min, patch_max: the side of the corrupted patches is drawn uniformly
            among the common divisors of H and W in [patch_min, patch_max].
        ratio_min, ratio_max: the share r of corrupted patches is drawn from
            U(ratio_min, ratio_max); n - floor(n (1 - r)) of the n patches are
            corrupted.
        shuffle_min, shuffle_max: the share of patches whose new content is
            patch-shuffled image content (the others get N(0, 1) noise) is drawn
            from U(shuffle_min, shuffle_max); 1, 1 (default): shuffled content
            only; the authors' is 0, 0.3.
        clip: the per-pixel error max_c |rec - x| is clipped at ``clip`` and
            divided by it (the map lies in [0, 1]).
        filter_size: odd side of the mean filter of the clipped error.
        published: the published map, the geometric mean of the pixel map and a
            coarse map (not piecewise linear: detection only, no p-value).
        coarse_factor: block side of the coarse map (stands in for the paper's
            latent grid; must divide H and W).
        coarse_clip: clip of the coarse map (channel-mean |rec - x| averaged over
            blocks), which is divided by it.
    """

    t0: int = 5
    stride: int = 1
    start: str = "image"
    patch_min: int = 1
    patch_max: int = 4
    ratio_min: float = 0.0
    ratio_max: float = 0.7
    shuffle_min: float = 1.0
    shuffle_max: float = 1.0
    clip: float = 1.0
    filter_size: int = 3
    published: bool = False
    coarse_factor: int = 2
    coarse_clip: float = 0.5

    def __post_init__(self):
        if self.t0 < 0:
            raise ValueError(f"t0={self.t0} must be >= 0")
        if self.stride < 1:
            raise ValueError(f"stride={self.stride} must be >= 1")
        if self.start not in STARTS:
            raise ValueError(f"start={self.start!r} must be one of {STARTS}")
        if not 1 <= self.patch_min <= self.patch_max:
            raise ValueError(f"need 1 <= patch_min <= patch_max, got "
                             f"patch_min={self.patch_min}, patch_max={self.patch_max}")
        for lo, hi in (("ratio_min", "ratio_max"), ("shuffle_min", "shuffle_max")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0.0 <= a <= b <= 1.0:
                raise ValueError(f"need 0 <= {lo} <= {hi} <= 1, got {lo}={a}, "
                                 f"{hi}={b}")
        if not self.clip > 0.0 or not self.coarse_clip > 0.0:
            raise ValueError(f"clip={self.clip} and coarse_clip={self.coarse_clip} "
                             "must be > 0")
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise ValueError(f"filter_size={self.filter_size} must be a positive odd "
                             "integer")
        if self.coarse_factor < 1:
            raise ValueError(f"coarse_factor={self.coarse_factor} must be >= 1")


def testable(options: Options) -> str | None:
    """Why no p-value can be computed with ``options`` (None: it can)."""
    if options.published:
        return ("published=True selects the paper's geometric mean "
                "sqrt(pixel map x coarse map), a product and a square root of "
                "image-dependent values (not piecewise linear); use published=False "
                "for the DAL test")
    return None


def preset(size: int = 8):
    """U-Net 32/64/128, cosine schedule with T = 10, deviation-correction training.

        sijax train --detector deco_diff --data DIR --workdir W --set size=8

    Batch 32, Adam 1e-3, 100 epochs (1000 N(0, 1) images without ``--data``).
    Expected result on the bundled 8x8 digits (``sijax data digits``: 270 training
    and 30 held-out images, 800 steps): the deviation MSE falls from about 0.6 in
    the first steps to about 0.18 (held-out 0.17). On iid N(0, 1) images a shuffled
    patch is as normal as the original, so the network cannot tell what to correct
    there: train DeCo-Diff on data.
    """
    from sijax.config import TrainConfig

    return TrainConfig(name="deco_diff", size=size, channels=(32, 64, 128),
                       n_train=1000, batch_size=32, epochs=100, lr=1e-3,
                       schedule_kind="cosine", T=10, detector="deco_diff")


# --------------------------------------------------------------------------- training


def patch_sizes(image_shape, options: Options) -> tuple[int, ...]:
    """The patch sides the corruption draws from: the common divisors of H and W in
    [patch_min, patch_max].

    Raises:
        InputError: none of them divides the image.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    sizes = tuple(p for p in range(options.patch_min, options.patch_max + 1)
                  if h % p == 0 and w % p == 0)
    if not sizes:
        raise InputError(f"no patch side in [{options.patch_min}, "
                         f"{options.patch_max}] divides the image {h}x{w}: change "
                         "patch_min / patch_max")
    return sizes


class Corruption(NamedTuple):
    """The structured fake anomaly of one training image.

    Attributes:
        patch: () int32, the side p of the patches.
        ratio: () float, the drawn share r of corrupted patches.
        share: () float, the drawn share of patches with shuffled content.
        mask: (H, W) float, M = 1 on the corrupted patches.
        shuffled: (H, W, C) the image with its p x p patches permuted.
        from_shuffle: (H, W) float, 1 where the content is the shuffled image (0:
            Gaussian noise).
        content: (H, W, C) n = from_shuffle * shuffled + (1 - from_shuffle) * noise,
            the content the corrupted patches move to.
    """

    patch: jax.Array
    ratio: jax.Array
    share: jax.Array
    mask: jax.Array
    shuffled: jax.Array
    from_shuffle: jax.Array
    content: jax.Array


def _to_patches(x: jax.Array, p: int) -> jax.Array:
    """(H, W, C) -> (H/p * W/p, p, p, C), patches in row-major order."""
    h, w, c = x.shape
    return x.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4).reshape(
        -1, p, p, c)


def _from_patches(patches: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """Inverse of :func:`_to_patches`."""
    c = patches.shape[-1]
    return patches.reshape(h // p, w // p, p, p, c).transpose(0, 2, 1, 3, 4).reshape(
        h, w, c)


def _chosen(key: jax.Array, n: int, share: jax.Array) -> jax.Array:
    """(n,) 0/1 flags of n - floor(n (1 - share)) patches chosen at random (the
    authors' count)."""
    k = n - jnp.floor(n * (1.0 - share))
    order = jax.random.permutation(key, n)
    return jnp.zeros((n,), share.dtype).at[order].set(
        (jnp.arange(n) < k).astype(share.dtype))


def _expand(flags: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """(H/p * W/p,) per-patch values -> (H, W) per pixel."""
    grid = flags.reshape(h // p, w // p)
    return jnp.repeat(jnp.repeat(grid, p, axis=0), p, axis=1)


def corrupt(key: jax.Array, x0: jax.Array, options: Options) -> Corruption:
    """Draws the structured fake anomaly of one image (docs/detectors/deco_diff.md,
    "Training").

    A patch side p (uniform over :func:`patch_sizes`), a share r ~ U(ratio_min,
    ratio_max) of corrupted p x p patches, a permutation of the image's p x p
    patches (the shuffled image) and a share ~ U(shuffle_min, shuffle_max) of
    patches whose content is taken from the shuffled image (the rest: N(0, 1)).

    Args:
        key: PRNG key, used once (split inside).
        x0: (H, W, C) normal image.
        options: the detector's options.

    Returns:
        :class:`Corruption`; a function of (key, x0) only.
    """
    h, w, c = x0.shape
    dtype = x0.dtype
    sizes = patch_sizes(x0.shape, options)
    k_size, k_ratio, k_share, k_noise, k_cand = jax.random.split(key, 5)
    j = jax.random.randint(k_size, (), 0, len(sizes))
    ratio = jax.random.uniform(k_ratio, (), dtype, options.ratio_min,
                               options.ratio_max)
    share = jax.random.uniform(k_share, (), dtype, options.shuffle_min,
                               options.shuffle_max)
    noise = jax.random.normal(k_noise, x0.shape, dtype)
    masks, shuffles, froms = [], [], []
    for p in sizes:  # every candidate side, one of them chosen by j below
        k_mask, k_perm, k_from = jax.random.split(jax.random.fold_in(k_cand, p), 3)
        n = (h // p) * (w // p)
        masks.append(_expand(_chosen(k_mask, n, ratio), p, h, w))
        perm = jax.random.permutation(k_perm, n)
        shuffles.append(_from_patches(_to_patches(x0, p)[perm], p, h, w))
        froms.append(_expand(_chosen(k_from, n, share), p, h, w))
    mask, shuffled, from_shuffle = (jnp.stack(v)[j] for v in (masks, shuffles, froms))
    content = jnp.where(from_shuffle[:, :, None] > 0, shuffled, noise)
    return Corruption(jnp.asarray(sizes, jnp.int32)[j], ratio, share, mask, shuffled,
                      from_shuffle, content)


def deviation(x0: jax.Array, mask: jax.Array, content: jax.Array,
              alpha_bar_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The forward state x_t and the direction of deviation D of one image.

    x_t = x0 + M (sqrt(abar_t) x0 + sqrt(1 - abar_t) n - x0) and
    D = M (n - c_t x0), c_t = (1 - sqrt(abar_t)) / sqrt(1 - abar_t), so that
    x_t = x0 + sqrt(1 - abar_t) D: a normal image (M = 0) is its own x_t.

    Args:
        x0: (H, W, C) normal image.
        mask: (H, W) M, 1 on the corrupted patches.
        content: (H, W, C) n.
        alpha_bar_t: () abar_t (< 1).

    Returns:
        (x_t (H, W, C), D (H, W, C)).
    """
    m = mask[:, :, None]
    sq_ab, sq_1m = jnp.sqrt(alpha_bar_t), jnp.sqrt(1.0 - alpha_bar_t)
    d = m * (content - (1.0 - sq_ab) / sq_1m * x0)
    return x0 + sq_1m * d, d


def training_batch(schedule: Schedule, x0: jax.Array, key: jax.Array,
                   options: Options):
    """The network inputs and targets of one training batch.

    Args:
        schedule: the (cosine) schedule.
        x0: (B, H, W, C) normal images.
        key: PRNG key, used once: t ~ U{0..T-1} per image and one corruption per
            image.
        options: the detector's options.

    Returns:
        (x_t (B, H, W, C), t (B,) int32, D (B, H, W, C), Corruption with a batch
        axis).
    """
    b = x0.shape[0]
    k_t, k_c = jax.random.split(key)
    t = jax.random.randint(k_t, (b,), 0, schedule.T)
    cor = jax.vmap(corrupt, in_axes=(0, 0, None))(jax.random.split(k_c, b), x0,
                                                  options)
    ab = jnp.asarray(schedule.alpha_bar, x0.dtype)[t]
    x_t, d = jax.vmap(deviation)(x0, cor.mask, cor.content, ab)
    return x_t, t, d, cor


def loss(apply, schedule: Schedule, x0: jax.Array, key: jax.Array,
         options: Options) -> jax.Array:
    """The deviation-correction loss: mean over batch, pixels and channels of
    (D_theta(x_t, t) - D)^2 (:func:`training_batch`).

    Args:
        apply: the network in training mode, (B, H, W, C), (B,) -> (B, H, W, C).
        schedule, x0, key, options: as :func:`training_batch`.

    Returns:
        () loss.
    """
    x_t, t, d, _ = training_batch(schedule, x0, key, options)
    return jnp.mean(jnp.square(apply(x_t, t) - d))


# --------------------------------------------------------------------------- test


class Noises(NamedTuple):
    """The random tensor of one test.

    Attributes:
        eps: (H, W, C) N(0, 1), used by ``start="noised"`` only.
    """

    eps: jax.Array


def draw_noises(key: jax.Array, image_shape, options: Options) -> Noises:
    """The noise of one test (drawn whatever ``start`` is, so that the pytree does
    not depend on the options), default float dtype."""
    del options
    return Noises(eps=jax.random.normal(key, tuple(image_shape),
                                        jnp.result_type(float)))


def correction_steps(schedule: Schedule, options: Options):
    """The steps of the correction and their constants (concrete NumPy arrays).

    Returns:
        (t (S,) int64: t0, t0 - stride, ... >= 0; sqrt(1 - abar_t) (S,);
        sqrt(1 - abar_s) (S,) with s the next step, 0 after the last).

    Raises:
        InputError: t0 outside 0..T-1.
    """
    if not 0 <= options.t0 < schedule.T:
        raise InputError(f"t0={options.t0} must lie in 0..T-1 = 0..{schedule.T - 1}")
    t = np.arange(options.t0, -1, -options.stride, dtype=np.int64)
    s = np.append(t[1:], -1)
    return (t, np.sqrt(1.0 - alpha_bar(schedule, t)),
            np.sqrt(1.0 - alpha_bar(schedule, s)))


def reconstruction(eps_fn, x: jax.Array, noises: Noises, *, schedule: Schedule,
                   options: Options) -> jax.Array:
    """The corrected (normal) image of one test image (docs/detectors/deco_diff.md,
    "Test").

    x_{t0} = x ("image") or sqrt(abar_t0) x + sqrt(1 - abar_t0) eps ("noised");
    then per step t -> s, with D_hat = eps_fn(x_t, t) the predicted deviation:
    x0_hat = x_t - sqrt(1 - abar_t) D_hat and x_s = x0_hat + sqrt(1 - abar_s) D_hat
    (the deviation's direction kept from t to s; abar_{-1} = 1, so the last step
    returns x0_hat). One ``lax.scan``; piecewise linear in x.

    Args:
        eps_fn: the one-image network ``(x_t (H, W, C), t ()) -> D_hat (H, W, C)``.
        x: (H, W, C) test image.
        noises: from :func:`draw_noises`.
        schedule: the concrete schedule.
        options: the detector's options.

    Returns:
        (H, W, C) reconstruction, dtype of x.
    """
    if noises.eps.shape != x.shape:
        raise InputError(f"{noises.eps.shape=} must equal {x.shape=}")
    t, sq_t, sq_s = correction_steps(schedule, options)
    dt = x.dtype
    if options.start == "noised":
        ab = float(alpha_bar(schedule, int(t[0])))
        x = float(np.sqrt(ab)) * x + float(np.sqrt(1.0 - ab)) * noises.eps.astype(dt)
    xs = (jnp.asarray(t, dt), jnp.asarray(sq_t, dt), jnp.asarray(sq_s, dt))

    def step(x_t, per_step):
        t_k, sq_1m_t, sq_1m_s = per_step
        d_hat = eps_fn(x_t, t_k)
        x0_hat = x_t - sq_1m_t * d_hat
        return x0_hat + sq_1m_s * d_hat, None

    out, _ = jax.lax.scan(step, x, xs)
    return out


def _coarse_map(x: jax.Array, rec: jax.Array, options: Options) -> jax.Array:
    """min(block mean of mean_c |rec - x|, coarse_clip) / coarse_clip, (H, W),
    constant on coarse_factor blocks (the paper's latent map, in pixels)."""
    f = options.coarse_factor
    h, w, _ = x.shape
    if h % f or w % f:
        raise InputError(f"coarse_factor={f} must divide the image {h}x{w}")
    e = jnp.mean(jnp.abs(rec - x), axis=-1)
    blocks = e.reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    coarse = jnp.minimum(blocks, options.coarse_clip) / options.coarse_clip
    return jnp.repeat(jnp.repeat(coarse, f, axis=0), f, axis=1)


def score(x: jax.Array, rec: jax.Array, options: Options) -> jax.Array:
    """The anomaly map of one image, (H, W).

    Piecewise linear (default): mean_filter(min(max_c |rec - x|, clip)) / clip.
    ``published``: sqrt(pixel map * coarse map), the paper's geometric mean with the
    coarse map of :func:`_coarse_map` in place of the latent one (not piecewise
    linear).

    Args:
        x: (H, W, C) image; rec: (H, W, C) its reconstruction.
        options: the detector's options.
    """
    e = jnp.max(jnp.abs(rec - x), axis=-1, keepdims=True)
    clipped = jnp.minimum(e, options.clip)
    pixel = mean_filter(clipped, options.filter_size)[:, :, 0] / options.clip
    if not options.published:
        return pixel
    return jnp.sqrt(pixel * _coarse_map(x, rec, options))


DETECTOR = Detector(
    name="deco_diff",
    title="DeCo-Diff: deviation correction from t0 (cosine schedule, T = 10)",
    options=Options, preset=preset, draw_noises=draw_noises,
    reconstruction=reconstruction, score=score, loss=loss, testable=testable,
)
