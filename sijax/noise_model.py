"""Noise models estimated from normal images: the Sigma of the DAL test on real data.

The test (docs/method.md §2) models a test image as X = s + eps, eps ~ N(0, Sigma), and
a
reference X_ref with covariance Sigma_ref. On real images Sigma is unknown: it is
estimated once from N normal images x_1..x_N (N, H, W, C) and stored with the model.
The reference is then the *template*, the mean image xbar = (1/N) sum_m x_m, whose
noise has covariance Sigma / N. The test of a region M asks whether
mean_M(X) - mean_M(xbar) departs from 0 by more than normal variation would:

    z = eta^T (X - xbar) / sqrt(eta^T (Sigma + Sigma / N) eta),

passed to :func:`sijax.dal_test` as ``x_ref=nm.mean``, ``sigma=nm.covariance()``,
``sigma_ref=nm.template_covariance()``.

Three estimators, by ``kind`` (see ``docs/noise_models.md`` for when to use which):

* ``"pixel"``: per-pixel sample variances (independent pixels), O(N n).
* ``"stationary"``: one spatial autocovariance kernel (with the full cross-channel
  C x C matrix per lag) averaged over positions and images, tapered beyond
  ``max_lag``, and projected
  onto PSD kernels on the (2H - 1, 2W - 1) lag grid; O(N n log n).
* ``"lowrank"``: the top ``rank`` principal components of the centred images plus a
  per-pixel residual variance shrunk towards its mean; O(N^2 n) (Gram matrix).

Every estimate gets a small variance floor (a fraction ``floor`` of the mean pixel
variance); pixels whose sample variance is below it (a constant border) are reported
with a :class:`NoiseModelWarning`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from sijax.digest import file_sha256
from sijax.errors import CheckpointError, InputError, NoiseModelWarning
from sijax.selective.statistics import (
    Covariance,
    DiagonalCovariance,
    LowRankDiagonalCovariance,
    StationaryCovariance,
    circulant_spectrum,
)

__all__ = [
    "KINDS",
    "NoiseModel",
    "NoiseModelWarning",
    "check_noise_model",
    "estimate_noise_model",
    "load_noise_model",
    "save_noise_model",
]

KINDS: tuple[str, ...] = ("pixel", "stationary", "lowrank")

FORMAT = "sijax-noise-model-1"
ARRAYS_FILE = "noise_model.npz"
META_FILE = "noise_model.json"
# Images per FFT block of the stationary estimator and pixels per block of the
# low-rank residual: bounds the working memory to about one copy of the images.
_IMAGE_BLOCK = 16
_PIXEL_BLOCK = 8192
# The randomized range finder (N > n only; Halko, Martinsson and Tropp 2011,
# algorithm 4.4): 2 k + 10 columns and 10 products with R^T R, so the top k
# directions converge like (lambda_{2k+11} / lambda_k)^11.
_OVERSAMPLE = 10
_POWER_ITERATIONS = 10


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseModel:
    """The template and noise covariance of normal images.

    Normal images are modelled as x = mean + eps, eps ~ N(0, Sigma) (flattened
    row-major over (H, W, C)). Build it with :func:`estimate_noise_model`; store it
    with :func:`save_noise_model`.

    Attributes:
      kind: "pixel", "stationary" or "lowrank".
      mean: (H, W, C) float64, the template (mean of the normal images).
      n_images: N, the number of normal images it was estimated from.
      variance: (H, W, C) float64 per-pixel variances ("pixel"; else None).
      kernel: (2H - 1, 2W - 1, C, C) float64 autocovariance kernel,
        ``kernel[H - 1 + di, W - 1 + dj, c, c']`` = Cov(x[i, j, c],
        x[i + di, j + dj, c']) ("stationary"; else None).
      basis: (n, k) float64 orthonormal principal directions U ("lowrank").
      scales: (k,) float64 variances s along them ("lowrank").
      residual: (n,) float64 residual variances d ("lowrank").
      max_lag: (Lh, Lw) lags kept as estimated before the taper ("stationary").
      shrinkage: the weight of the mean in the residual variances ("lowrank").
      floor: the absolute variance floor that was applied (float64).
      n_floored: how many pixels fell below the floor (their sample variance, or for
        "lowrank" their residual variance); a :class:`NoiseModelWarning` said so.
    """

    kind: str
    mean: np.ndarray  # (H, W, C)
    n_images: int
    variance: np.ndarray | None = None  # (H, W, C)
    kernel: np.ndarray | None = None  # (2H - 1, 2W - 1, C, C)
    basis: np.ndarray | None = None  # (n, k)
    scales: np.ndarray | None = None  # (k,)
    residual: np.ndarray | None = None  # (n,)
    max_lag: tuple[int, int] | None = None
    shrinkage: float | None = None
    floor: float = 0.0
    n_floored: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"kind={self.kind!r} must be one of {KINDS}")
        mean = np.asarray(self.mean)
        if mean.ndim != 3:
            raise InputError(f"mean must be (H, W, C), got mean.shape={mean.shape}")
        if int(self.n_images) < 2:
            raise InputError(f"n_images={self.n_images} must be >= 2")
        h, w, c = mean.shape
        n = h * w * c
        need = {
            "pixel": {"variance": (h, w, c)},
            "stationary": {"kernel": (2 * h - 1, 2 * w - 1, c, c)},
            "lowrank": {"basis": None, "scales": None, "residual": (n,)},
        }[self.kind]
        for name in ("variance", "kernel", "basis", "scales", "residual"):
            a = getattr(self, name)
            if name not in need:
                if a is not None:
                    raise InputError(f"a {self.kind!r} noise model has no {name}")
                continue
            if a is None:
                raise InputError(f"a {self.kind!r} noise model needs {name}")
            want = need[name]
            if want is not None and np.shape(a) != want:
                raise InputError(f"{name}.shape={np.shape(a)} must be {want}")
        if self.kind == "lowrank":
            k = np.shape(self.scales)
            if np.ndim(self.basis) != 2 or np.shape(self.basis) != (n, *k):
                raise InputError(
                    f"basis.shape={np.shape(self.basis)} and scales.shape={k} must be"
                    f" ({n}, k) and (k,)"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(int(s) for s in np.shape(self.mean))

    @property
    def rank(self) -> int | None:
        """k, the number of principal components ("lowrank"; else None)."""
        return None if self.scales is None else int(np.shape(self.scales)[0])

    def covariance(self) -> Covariance:
        """Sigma, the covariance of one normal image (n = H W C, flat row-major)."""
        return self._covariance(1.0)

    def template_covariance(self) -> Covariance:
        """Sigma / N, the covariance of the template ``mean`` (the x_ref of the test).

        The template averages N independent normal images, so its noise has 1/N of
        their covariance (the sampling error of the estimated Sigma is neglected).
        """
        return self._covariance(1.0 / self.n_images)

    def _covariance(self, factor: float) -> Covariance:
        if self.kind == "pixel":
            return DiagonalCovariance(factor * np.asarray(self.variance).reshape(-1))
        if self.kind == "stationary":
            return StationaryCovariance(factor * self.kernel, self.image_shape)
        return LowRankDiagonalCovariance(
            self.basis, factor * self.scales, factor * self.residual
        )


# ----------------------------------------------------------------------- calibration


def check_noise_model(nm: NoiseModel, images, sizes=(1, 2, 3, 4), *,
                      seed: int = 0) -> list[dict]:
    """Does ``nm`` give region means their real variance? The cheap check before
    trusting a p-value on real data (docs/noise_models.md, "What you must check").

    For each side s in ``sizes``, one s x s square (all channels) at a random place
    in each of the held-out normal ``images``, and its standardised mean difference
    from the template

        z = eta^T (x - template) / sqrt(eta^T (Sigma + Sigma / N) eta),

    which is N(0, 1) for a fixed square when the noise model is right. A variance
    of z above 1 means the model understates how much normal regions vary, and the
    test will reject normal images too often (by about the rate |z| > 1.96 shows,
    against 0.05). The squares are chosen without looking at the images, so this
    checks the noise model alone, not the selection.

    Args:
      nm: a noise model (``load_noise_model`` or ``estimate_noise_model``).
      images: (M, H, W, C) normal images NOT used to estimate ``nm``, preprocessed
        as the model's inputs.
      sizes: square sides (each at most min(H, W)).
      seed: the positions of the squares.

    Returns:
      one dict per side: size, images, var_z with its 99% chi-square interval
      (var_z_interval_99), mean_z, and rate_196 (the fraction with |z| > 1.96,
      0.05 for a right model) with its 99% Clopper-Pearson interval.

    Raises:
      InputError: images of another shape than the model's, NaN/Inf, fewer than
        two images, or a side outside [1, min(H, W)].
    """
    import jax
    import jax.numpy as jnp
    from scipy import stats

    from sijax.experiments.summary import clopper_pearson

    x = np.asarray(images, np.float64)
    if x.ndim == 3 and nm.image_shape[2] == 1:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != nm.image_shape:
        raise InputError(f"images of shape {x.shape} do not match the noise model's "
                         f"(M, {', '.join(map(str, nm.image_shape))})")
    if len(x) < 2:
        raise InputError("the check needs at least two held-out normal images")
    if not np.all(np.isfinite(x)):
        raise InputError("the images contain NaN or Inf")
    h, w, _ = nm.image_shape
    cov, cov_t = nm.covariance(), nm.template_covariance()
    quad = jax.jit(jax.vmap(lambda e: e @ (cov.matvec(e) + cov_t.matvec(e))))
    d = (x - np.asarray(nm.mean)[None]).reshape(len(x), -1)
    rng = np.random.default_rng(seed)
    out = []
    for side in sizes:
        if not 1 <= side <= min(h, w):
            raise InputError(f"square side {side} must be in [1, {min(h, w)}]")
        rows = rng.integers(0, h - side + 1, len(x))
        cols = rng.integers(0, w - side + 1, len(x))
        masks = np.zeros(x.shape)
        for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
            masks[k, r:r + side, c:c + side] = 1
        etas = masks.reshape(len(x), -1)
        etas /= etas.sum(1, keepdims=True)
        var = np.asarray(quad(jnp.asarray(etas)))
        z = np.einsum("ki,ki->k", etas, d) / np.sqrt(var)
        m = len(z)
        v = float(z.var(ddof=1))
        hits = int(np.sum(np.abs(z) > 1.96))
        out.append({
            "size": int(side), "images": m, "var_z": v,
            "var_z_interval_99": [float(v * (m - 1) / stats.chi2.ppf(q, m - 1))
                                  for q in (0.995, 0.005)],
            "mean_z": float(z.mean()), "rate_196": hits / m,
            "rate_196_interval_99": [float(b) for b in clopper_pearson(hits, m, 0.99)],
        })
    return out


# ------------------------------------------------------------------------ estimation


def _check_images(images) -> np.ndarray:
    try:
        x = np.asarray(images)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"images must be an (N, H, W, C) array: {e}") from None
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    ):
        raise InputError(f"images must be real numbers, got dtype {x.dtype}")
    if x.ndim != 4:
        hint = (
            "; stack gray images with a channel axis, images[..., None]"
            if x.ndim == 3
            else ""
        )
        raise InputError(
            f"images must be (N, H, W, C), got images.shape={x.shape}{hint}"
        )
    if x.shape[0] < 2:
        raise InputError(
            f"a noise model needs at least 2 normal images, got {x.shape[0]}"
            " (and many more for a good estimate: see docs/noise_models.md)"
        )
    if min(x.shape[1:]) < 1:
        raise InputError(f"images must have H, W, C >= 1, got images.shape={x.shape}")
    x = x.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise InputError(
            f"images hold {int(np.sum(~finite))} NaN/Inf values (first: image"
            f" {bad[0]}, pixel {tuple(int(i) for i in bad[1:])})"
        )
    return x


_FLOOR_EFFECT = {
    "pixel": "they get the floor as their variance, so a region made of them is"
    " tested against that tiny variance",
    "stationary": "the stationary model gives them the variance shared by all"
    " pixels, which they do not have (stationarity fails there)",
    "lowrank": "their residual variance comes from the shrinkage towards the mean"
    " (or from the floor), not from their data",
}


def _warn_floor(count: int, total: int, floor: float, kind: str) -> None:
    if count:
        warnings.warn(
            f"{count} of {total} pixels vary less than the variance floor {floor:.3g}"
            " across the normal images (a constant border or saturated pixels?):"
            f" {_FLOOR_EFFECT[kind]}. Crop them away or keep the detector off them"
            " if they are not part of the object",
            NoiseModelWarning,
            stacklevel=3,
        )


def estimate_noise_model(
    images,
    kind: str,
    *,
    rank: int | None = None,
    max_lag: int | None = None,
    shrinkage: float | None = None,
    floor: float = 1e-6,
) -> NoiseModel:
    """Estimates the template and noise covariance from normal images.

    Args:
      images: (N, H, W, C) real array of normal (anomaly-free) images, N >= 2,
        converted to float64. Gray images need their channel axis (C = 1).
      kind: "pixel" (per-pixel variances), "stationary" (one spatial
        autocovariance kernel) or "lowrank" (principal components plus per-pixel
        residual variances).
      rank: "lowrank" only: the number k of principal components, 1 <= k < N and
        k < n (default min(10, (N - 1) // 2): at k = N - 1 the components take
        all the variation and leave no residual).
      max_lag: "stationary" only: the spatial lag L up to which the kernel is
        taken as estimated (default: a quarter of the smaller side,
        max(1, min(H, W) // 4)); a half-cosine taper takes the estimate from 1 at
        L to 0 at 2 L + 1 (both capped at the image size), and longer lags are 0
        before the PSD projection. Larger L follows longer correlations but adds
        the noise of lags seen at few positions.
      shrinkage: "lowrank" only: the weight lambda in [0, 1] of the mean residual
        variance, d = (1 - lambda) d_j + lambda mean(d) (default: estimated from
        the data, see below).
      floor: the variance floor as a fraction of the mean pixel variance; pixels
        below it are raised to it with a :class:`NoiseModelWarning`.

    The estimators (centred images r_m = x_m - xbar, divisor N - 1 so that each is
    unbiased before the taper, shrinkage and floor):

    * "pixel": v_p = sum_m r_m[p]^2 / (N - 1).
    * "stationary": k[d, c, c'] = sum_m sum_p r_m[p, c] r_m[p + d, c'] /
      ((N - 1) (H - |di|) (W - |dj|)) over all positions p where both pixels
      exist (FFT on the zero-padded (2H - 1, 2W - 1) grid); tapered; then made PSD:
      on that grid every lag |d| < (H, W) has its own index, so the image's
      block-Toeplitz covariance is a principal submatrix of the block-circulant
      matrix of the kernel, whose eigenvalues are those of the C x C Hermitian
      Fourier matrices K^(f). Clipping their negative eigenvalues to 0 and
      transforming back gives a kernel whose circulant is PSD, hence whose
      Toeplitz covariance is PSD (Cauchy interlacing); the floor is added to lag
      0 so that Sigma >= floor I. The result is checked with
      :func:`~sijax.selective.statistics.circulant_spectrum`.
    * "lowrank": the top k eigenpairs (lambda_i, v_i) of the N x N Gram matrix
      R R^T (R = (N, n) centred images; a randomized range finder when N > n), so
      that U = R^T v / sqrt(lambda) and s = lambda / (N - 1); the residual
      variances d_j = v_j - sum_i s_i U_ji^2 are shrunk towards their mean with
      the James-Stein / Ledoit-Wolf weight lambda = sum_j Var(d_j) /
      sum_j (d_j - mean d)^2 (clipped to [0, 1]), Var(d_j) estimated from the
      spread of the squared residuals. No (n, n) matrix is formed.

    Returns:
      :class:`NoiseModel`.

    Raises:
      InputError: fewer than 2 images, NaN/Inf, not (N, H, W, C), an unknown kind,
        an option that does not apply to ``kind``, rank >= N, identical images.
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r} must be one of {KINDS}")
    for name, value, owner in (
        ("rank", rank, "lowrank"),
        ("max_lag", max_lag, "stationary"),
        ("shrinkage", shrinkage, "lowrank"),
    ):
        if value is not None and kind != owner:
            raise InputError(f"{name} applies to kind={owner!r} only, not {kind!r}")
    if not (np.isfinite(floor) and 0 < floor < 1):
        raise InputError(f"floor={floor} must be in (0, 1) (a fraction of the mean)")
    x = _check_images(images)
    n_img = x.shape[0]
    mean = x.mean(axis=0)
    r = x  # a float64 copy of the images: centred in place, no second copy
    r -= mean  # (N, H, W, C)
    del x
    var = np.einsum("mhwc,mhwc->hwc", r, r) / (n_img - 1)  # (H, W, C)
    scale = float(var.mean())
    if not scale > 0:
        raise InputError(
            "the normal images are all identical: no variation to estimate a noise"
            " model from"
        )
    floor_v = floor * scale
    n_low = int(np.sum(var < floor_v))
    _warn_floor(n_low, var.size, floor_v, kind)
    common = dict(mean=mean, n_images=n_img, floor=floor_v, n_floored=n_low)
    if kind == "pixel":
        return NoiseModel("pixel", variance=np.maximum(var, floor_v), **common)
    if kind == "stationary":
        kernel, lags = _stationary_kernel(r, max_lag, floor_v)
        return NoiseModel("stationary", kernel=kernel, max_lag=lags, **common)
    basis, scales, residual, lam = _low_rank(r, var, rank, shrinkage)
    n_res = int(np.sum(residual < floor_v))
    if n_res > n_low:
        _warn_floor(n_res, residual.size, floor_v, kind)
    residual = np.maximum(residual, floor_v)
    common["n_floored"] = max(n_low, n_res)
    return NoiseModel(
        "lowrank",
        basis=basis,
        scales=scales,
        residual=residual,
        shrinkage=lam,
        **common,
    )


def _taper(lags: np.ndarray, cap: int) -> np.ndarray:
    """1 up to ``cap``, a half cosine down to 0 at 2 cap + 1, 0 beyond.

    Lags up to ``cap`` keep their estimate; the smooth roll-off (instead of a cut)
    keeps the kernel's spectrum from ringing, so that the PSD projection changes
    little.
    """
    a = np.abs(lags).astype(np.float64)
    t = 0.5 * (1 + np.cos(np.pi * (a - cap) / (cap + 1)))
    return np.where(a <= cap, 1.0, np.where(a < 2 * cap + 1, t, 0.0))


def _circle_lags(size: int, extent: int) -> np.ndarray:
    """The lag held by each index of a circle of ``size`` >= 2 extent - 1."""
    i = np.arange(size)
    return np.where(i < extent, i, i - size)


def _symmetrize(k: np.ndarray) -> np.ndarray:
    """(k[d] + k[-d]^T) / 2 for a kernel on the circle (lag d at index d mod P)."""
    ih, iw = (
        (-np.arange(k.shape[0])) % k.shape[0],
        (-np.arange(k.shape[1])) % k.shape[1],
    )
    neg = k[ih][:, iw]
    return 0.5 * (k + np.swapaxes(neg, 2, 3))


def _unbiased_kernel(r: np.ndarray) -> np.ndarray:
    """Unbiased autocovariance of centred images (N, H, W, C) at every lag.

    Returns:
      (2H - 1, 2W - 1, C, C) float64 on the circle (lag d at index d mod P):
      sum_m sum_p r_m[p, c] r_m[p + d, c'] / ((N - 1) (H - |di|) (W - |dj|)).
    """
    n_img, h, w, c = r.shape
    grid = (2 * h - 1, 2 * w - 1)
    # Cross-spectrum summed over the images, a block of images at a time:
    # S[f, c, c'] = sum_m conj(R_m[f, c]) R_m[f, c'], so that its inverse transform is
    # A[d, c, c'] = sum_m sum_p r_m[p, c] r_m[p + d, c'] (no wrap on this grid).
    spec = np.zeros((grid[0], grid[1] // 2 + 1, c, c), np.complex128)
    for start in range(0, n_img, _IMAGE_BLOCK):
        f = np.fft.rfft2(r[start : start + _IMAGE_BLOCK], s=grid, axes=(1, 2))
        spec += np.einsum("mabc,mabd->abcd", f.conj(), f)
    acf = np.fft.irfft2(spec, s=grid, axes=(0, 1))
    lag_h, lag_w = _circle_lags(grid[0], h), _circle_lags(grid[1], w)
    count = np.outer(h - np.abs(lag_h), w - np.abs(lag_w)).astype(np.float64)
    return acf / ((n_img - 1) * count)[:, :, None, None]


def _stationary_kernel(r: np.ndarray, max_lag, floor_v: float):
    """PSD autocovariance kernel (2H-1, 2W-1, C, C) of centred images (N, H, W, C)."""
    _, h, w, c = r.shape
    if max_lag is None:
        lh = lw = max(1, min(h, w) // 4)
    else:
        if int(max_lag) != max_lag or max_lag < 0:
            raise InputError(f"max_lag={max_lag} must be an integer >= 0")
        lh = lw = int(max_lag)
    lh, lw = min(lh, h - 1), min(lw, w - 1)
    grid = (2 * h - 1, 2 * w - 1)
    lag_h, lag_w = _circle_lags(grid[0], h), _circle_lags(grid[1], w)
    taper = np.outer(_taper(lag_h, lh), _taper(lag_w, lw))
    k = _symmetrize(_unbiased_kernel(r) * taper[:, :, None, None])
    # Project onto PSD kernels: clip the negative part of every Hermitian C x C
    # Fourier matrix of the circulant on this grid.
    kf = np.fft.fft2(k, axes=(0, 1))
    kf = 0.5 * (kf + np.conj(np.swapaxes(kf, 2, 3)))
    lam, vec = np.linalg.eigh(kf)
    kf = np.einsum("abij,abj,abkj->abik", vec, np.maximum(lam, 0.0), vec.conj())
    k = np.fft.ifft2(kf, axes=(0, 1)).real
    k = _symmetrize(k)
    k[0, 0] += floor_v * np.eye(c)
    kernel = np.fft.fftshift(k, axes=(0, 1))  # lag 0 at (H - 1, W - 1)
    lowest = float(np.min(circulant_spectrum(kernel, (h, w, c))))
    if lowest < 0.5 * floor_v:  # rounding only: the projection guarantees >= floor
        raise RuntimeError(
            f"stationary kernel projection failed: circulant eigenvalue {lowest:.3g}"
            f" < floor {floor_v:.3g}"
        )
    return kernel, (lh, lw)


def _low_rank(r: np.ndarray, var: np.ndarray, rank, shrinkage):
    """Top-k principal components and shrunk residual variances of (N, H, W, C)."""
    n_img = r.shape[0]
    n = int(np.prod(r.shape[1:]))
    if rank is None:
        rank = min(10, max(1, (n_img - 1) // 2), n - 1)
    if int(rank) != rank or not 1 <= rank < n_img or rank >= n:
        raise InputError(
            f"rank={rank} must be an integer with 1 <= rank < N = {n_img} (the"
            f" centred images span at most N - 1 directions) and rank < n = {n}"
        )
    rank = int(rank)
    if shrinkage is not None and not (np.isfinite(shrinkage) and 0 <= shrinkage <= 1):
        raise InputError(f"shrinkage={shrinkage} must be in [0, 1]")
    z = r.reshape(n_img, n)
    if n_img <= n:
        gram = z @ z.T  # (N, N)
        lam, v = np.linalg.eigh(gram)
        lam, v = lam[::-1][:rank], v[:, ::-1][:, :rank]
        tiny = 1e-12 * max(float(lam[0]), 1e-300)
        if lam[-1] <= tiny:
            raise InputError(
                f"rank={rank} exceeds the number of independent directions in the"
                f" centred images ({int(np.sum(lam > tiny))}): use a smaller rank"
            )
        basis = (z.T @ v) / np.sqrt(lam)  # (n, k), orthonormal columns
    else:
        basis, lam = _randomized_pca(z, rank)
    scales = lam / (n_img - 1)
    # Residuals e = z - (z U) U^T, a block of pixels at a time (no second copy of z).
    proj = z @ basis  # (N, k)
    d_raw = np.empty(n)
    d_var = np.empty(n)
    for start in range(0, n, _PIXEL_BLOCK):
        cols = slice(start, start + _PIXEL_BLOCK)
        e2 = (z[:, cols] - proj @ basis[cols].T) ** 2  # (N, block)
        d_raw[cols] = e2.sum(axis=0) / (n_img - 1)
        # Var of the mean of e^2 over the images: the noise in d_j.
        d_var[cols] = e2.var(axis=0, ddof=1) / n_img
    target = float(d_raw.mean())
    if shrinkage is None:
        spread = float(np.sum((d_raw - target) ** 2))
        lam_s = 1.0 if spread <= 0 else float(np.clip(d_var.sum() / spread, 0, 1))
    else:
        lam_s = float(shrinkage)
    residual = (1 - lam_s) * d_raw + lam_s * target
    return basis, scales, residual, lam_s


def _randomized_pca(z: np.ndarray, rank: int):
    """Top-k right singular vectors (n, k) and squared singular values of z (N, n)."""
    n = z.shape[1]
    cols = min(2 * rank + _OVERSAMPLE, n)
    rng = np.random.default_rng(0)  # deterministic: the estimate is a function
    q, _ = np.linalg.qr(z.T @ (z @ rng.standard_normal((n, cols))))
    for _ in range(_POWER_ITERATIONS):
        q, _ = np.linalg.qr(z.T @ (z @ q))
    _, sv, wt = np.linalg.svd(z @ q, full_matrices=False)  # (N, cols) -> small
    return q @ wt[:rank].T, sv[:rank] ** 2


# --------------------------------------------------------------------- save and load

_ARRAY_FIELDS = ("mean", "variance", "kernel", "basis", "scales", "residual")



def save_noise_model(directory: str | os.PathLike, nm: NoiseModel) -> str:
    """Writes ``directory/noise_model.npz`` (arrays) and ``noise_model.json``.

    The JSON holds the kind, the scalar parameters and the SHA-256 of the npz, which
    :func:`load_noise_model` checks. Both files are written to temporary names and
    renamed, the JSON last, so an interrupted save leaves no valid-looking model.

    Returns:
      The absolute directory.
    """
    if not isinstance(nm, NoiseModel):
        raise InputError(f"expected a NoiseModel, got {type(nm).__name__}")
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    arrays = {
        name: np.asarray(getattr(nm, name), np.float64)
        for name in _ARRAY_FIELDS
        if getattr(nm, name) is not None
    }
    path = os.path.join(directory, ARRAYS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    meta = {
        "format": FORMAT,
        "kind": nm.kind,
        "image_shape": list(nm.image_shape),
        "n_images": int(nm.n_images),
        "rank": nm.rank,
        "max_lag": None if nm.max_lag is None else list(nm.max_lag),
        "shrinkage": nm.shrinkage,
        "floor": float(nm.floor),
        "n_floored": int(nm.n_floored),
        "arrays": sorted(arrays),
        "sha256": file_sha256(path),
    }
    tmp = os.path.join(directory, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, META_FILE))
    return directory


def load_noise_model(directory: str | os.PathLike) -> NoiseModel:
    """Reads a noise model written by :func:`save_noise_model`.

    Raises:
      CheckpointError: a missing directory or file, a damaged JSON, an npz whose
        SHA-256 differs from the saved one, or contents that do not form a valid
        noise model.
    """
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, META_FILE)
    path = os.path.join(directory, ARRAYS_FILE)
    for p in (meta_path, path):
        if not os.path.isfile(p):
            raise CheckpointError(f"noise model file not found: {p}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        kind, want = meta["kind"], meta["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt {META_FILE} in {directory}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    if file_sha256(path) != want:
        raise CheckpointError(
            f"corrupt noise model: {path} differs from its saved SHA-256; it changed"
            " after it was saved: restore it or estimate the model again"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.array(data[name]) for name in meta["arrays"]}
        return NoiseModel(
            kind,
            n_images=int(meta["n_images"]),
            max_lag=None if meta["max_lag"] is None else tuple(meta["max_lag"]),
            shrinkage=meta["shrinkage"],
            floor=float(meta["floor"]),
            n_floored=int(meta["n_floored"]),
            **arrays,
        )
    except (InputError, ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"invalid noise model in {directory}: {e}") from None
