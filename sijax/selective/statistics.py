"""Test statistics (eta), covariances and the line through the data (docs/method.md
§2-4).

Model (docs/method.md §2): the test image X = s + eps, eps ~ N(0, Sigma), and optionally
a reference X_ref = s_ref + eps_ref, eps_ref ~ N(0, Sigma_ref), independent of X. Both
are flattened in row-major (C) order, ``x.reshape(-1)``; for an (H, W, C) image the flat
index is ``(h W + w) C + c``. The joint vector is x~ = (X; X_ref) with covariance
Sigma~ = blockdiag(Sigma, Sigma_ref).

Statistic (docs/method.md §3): T = eta^T x~ for one of

* ``"reference"`` (default): eta = (1_M / |M|; -1_M / |M|),
  T = mean_M(X) - mean_M(X_ref);
* ``"background"``: eta = 1_M / |M| - 1_{not M} / |not M| on X only;
* ``"neighbour"``: eta = 1_M / |M| - 1_N / |N| on X only, N = (M dilated by a
  (2r+1) x (2r+1) window) minus M;
* a user-supplied eta (``eta=``): an array shaped like X, or a pair (eta_X, eta_ref).

With a 2-D (H, W) mask and a colour image, the region holds every channel of its pixels
and |M| counts pixel-channel elements. The standardised statistic and the line are

    z_obs = eta^T x~ / sqrt(eta^T Sigma~ eta),
    b~ = Sigma~ eta / sqrt(eta^T Sigma~ eta),   a~ = x~ - z_obs b~,   x~(z) = a~ + b~ z,

so that x~(z_obs) = x~ and eta^T x~(z) / sqrt(eta^T Sigma~ eta) = z. Only the X block
of the line goes through the network (the reference never does), so
:class:`LineStatistic` returns ``a = X - z_obs b_X`` and
``b = Sigma eta_X / sqrt(eta^T Sigma~ eta)``, both shaped like X. (The reference block
moves along the line too, but the region M does not depend on it.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.errors import InputError

__all__ = [
    "AR1Covariance",
    "Covariance",
    "DenseCovariance",
    "DiagonalCovariance",
    "HYPOTHESES",
    "LineStatistic",
    "LowRankDiagonalCovariance",
    "OperatorCovariance",
    "ScalarCovariance",
    "StatStatus",
    "StationaryCovariance",
    "as_covariance",
    "circulant_spectrum",
    "covariance_matrix",
    "dilate",
    "line_statistic",
    "region_eta",
]

HYPOTHESES: tuple[str, ...] = ("reference", "background", "neighbour", "custom")


class StatStatus:
    """Status codes of :class:`LineStatistic` (int32 in ``status``)."""

    OK = 0
    EMPTY_REGION = 1  # |M| = 0: no hypothesis, the trial is skipped (docs/method.md §3)
    EMPTY_COMPARISON = 2  # background / neighbourhood set is empty
    DEGENERATE_VARIANCE = 3  # eta^T Sigma~ eta <= 0 (or numerically 0)
    NONFINITE = 4  # NaN or Inf in x or x_ref
    NONFINITE_MODEL = 5  # NaN or Inf in the score map: the model's output (detection)

    MESSAGES = {
        0: "ok",
        1: "empty region: the detected region M has no pixels (no hypothesis to test)",
        2: "empty comparison set: the background or neighbourhood of M has no pixels",
        3: "degenerate variance: eta^T Sigma eta <= 0, the covariance is singular along"
        " eta or not positive",
        4: "non-finite input: x or x_ref holds NaN or Inf",
        5: "non-finite detection: the score map holds NaN or Inf, so the model's"
        " reconstruction does (corrupt or diverged weights?)",
    }


# ------------------------------------------------------------------------- covariances


def _matvec_dot(m, v):
    return jnp.dot(m, v, precision=lax.Precision.HIGHEST)


@jax.tree_util.register_pytree_node_class
class Covariance:
    """A covariance of the flattened image, known through its matrix-vector product.

    Subclasses implement :meth:`matvec` on a flat (n,) vector and set ``n`` (or leave it
    None when any size is fine). They are pytrees, so they can be passed into ``jit``.
    """

    n: int | None = None

    def matvec(self, v: jax.Array) -> jax.Array:
        """Sigma v for a flat (n,) float64 vector."""
        raise NotImplementedError

    def diagonal(self, n: int) -> jax.Array | None:
        """(n,) diagonal of Sigma when cheap to get, else None."""
        return None

    def validate(self, n: int) -> None:
        """Host-side checks of a concrete covariance for n elements (InputError)."""
        if self.n is not None and self.n != n:
            raise InputError(
                f"covariance is for n={self.n} elements but the image has n={n}"
            )

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls()


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


@jax.tree_util.register_pytree_node_class
class ScalarCovariance(Covariance):
    """Sigma = variance * I (``"iid"`` is variance 1)."""

    def __init__(self, variance=1.0):
        self.variance = variance

    def matvec(self, v):
        return self.variance * v

    def diagonal(self, n):
        return jnp.full((n,), self.variance, jnp.float64)

    def validate(self, n):
        if _concrete(self.variance):
            v = np.asarray(self.variance, np.float64)
            if v.shape != () or not np.isfinite(v) or v <= 0:
                raise InputError(
                    f"scalar covariance must be a finite variance > 0, got {v}"
                )

    def tree_flatten(self):
        return (self.variance,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class DiagonalCovariance(Covariance):
    """Sigma = diag(variance), one variance per element (independent pixels)."""

    def __init__(self, variance):
        self.variance = variance  # (n,)
        self.n = int(np.shape(variance)[0])

    def matvec(self, v):
        return self.variance * v

    def diagonal(self, n):
        return jnp.asarray(self.variance, jnp.float64)

    def validate(self, n):
        super().validate(n)
        if _concrete(self.variance):
            v = np.asarray(self.variance, np.float64)
            if not np.all(np.isfinite(v)):
                raise InputError("per-pixel variances must be finite (found NaN/Inf)")
            if np.any(v <= 0):
                bad = int(np.argmin(v))
                raise InputError(
                    f"per-pixel variances must be > 0; element {bad} is {v[bad]!r}"
                    f" ({int(np.sum(v < 0))} negative, {int(np.sum(v == 0))} zero)"
                )

    def tree_flatten(self):
        return (self.variance,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class DenseCovariance(Covariance):
    """A dense (n, n) symmetric positive semi-definite matrix (small images only)."""

    def __init__(self, matrix):
        self.matrix = matrix  # (n, n)
        self.n = int(np.shape(matrix)[0])

    def matvec(self, v):
        return _matvec_dot(self.matrix, v)

    def diagonal(self, n):
        return jnp.diagonal(jnp.asarray(self.matrix, jnp.float64))

    def validate(self, n, max_eig_check: int = 2048):
        super().validate(n)
        if not _concrete(self.matrix):
            return
        m = np.asarray(self.matrix, np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise InputError(f"dense covariance must be square, got {m.shape=}")
        if not np.all(np.isfinite(m)):
            raise InputError("dense covariance holds NaN or Inf")
        scale = float(np.max(np.abs(m))) if m.size else 0.0
        asym = float(np.max(np.abs(m - m.T))) if m.size else 0.0
        if asym > 1e-10 * max(scale, 1e-300):
            raise InputError(
                f"dense covariance is not symmetric: max |S - S^T| = {asym:.3g}"
                f" (max |S| = {scale:.3g})"
            )
        d = np.diagonal(m)
        if np.any(d <= 0):
            bad = int(np.argmin(d))
            raise InputError(
                "dense covariance has a non-positive variance:"
                f" S[{bad},{bad}] = {float(d[bad]):.3g}"
            )
        if m.shape[0] <= max_eig_check:
            lam_min = float(np.linalg.eigvalsh(m)[0])
            if lam_min < -1e-10 * scale:
                raise InputError(
                    "dense covariance is not positive semi-definite: smallest"
                    f" eigenvalue {lam_min:.3g}"
                )

    def tree_flatten(self):
        return (self.matrix,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def _ar1_filter(v: jax.Array, rho) -> jax.Array:
    """f_i = v_i + rho f_{i-1} (f_{-1} = 0) by an associative scan, O(n) work."""

    def combine(e1, e2):
        a1, b1 = e1
        a2, b2 = e2
        return a1 * a2, a2 * b1 + b2

    a = jnp.full(v.shape, rho, v.dtype)
    return lax.associative_scan(combine, (a, v))[1]


@jax.tree_util.register_pytree_node_class
class AR1Covariance(Covariance):
    """The paper's "corr" covariance Sigma_ij = variance * rho^|i - j| (rho = 0.5).

    Indices are the row-major flat indices (docs/method.md §2), so horizontal neighbours
    correlate rho and the last pixel of a row correlates rho with the first of the next.
    The matvec is exact and O(n): with the two first-order recursive filters
    f_i = v_i + rho f_{i-1} (left to right) and g_i = v_i + rho g_{i+1} (right to left),
    sum_j rho^|i-j| v_j = f_i + g_i - v_i. Both are linear recurrences, evaluated with
    ``lax.associative_scan``.
    """

    def __init__(self, n: int | None = None, rho=0.5, variance=1.0):
        self.n = None if n is None else int(n)
        self.rho = rho
        self.variance = variance

    def matvec(self, v):
        f = _ar1_filter(v, self.rho)
        g = _ar1_filter(v[::-1], self.rho)[::-1]
        return self.variance * (f + g - v)

    def diagonal(self, n):
        return jnp.full((n,), self.variance, jnp.float64)

    def validate(self, n):
        super().validate(n)
        if _concrete(self.rho, self.variance):
            rho = np.asarray(self.rho, np.float64)
            var = np.asarray(self.variance, np.float64)
            if not (np.isfinite(rho) and abs(rho) < 1):
                raise InputError(
                    f"AR(1) correlation must satisfy |rho| < 1, got {rho!r}"
                )
            if not (np.isfinite(var) and var > 0):
                raise InputError(f"AR(1) variance must be finite and > 0, got {var!r}")

    def tree_flatten(self):
        return (self.rho, self.variance), self.n

    @classmethod
    def tree_unflatten(cls, n, children):
        return cls(n, *children)


@jax.tree_util.register_pytree_node_class
class OperatorCovariance(Covariance):
    """Sigma given only by a matvec callable ``fn(v) -> Sigma v`` on flat (n,) vectors.

    The callable is static (part of the pytree structure): use a function defined once,
    and pass arrays it needs through ``params`` (then ``fn(params, v)`` is called).
    """

    def __init__(self, fn: Callable, n: int | None = None, params=None):
        self.fn = fn
        self.n = None if n is None else int(n)
        self.params = params

    def matvec(self, v):
        if self.params is None:
            return self.fn(v)
        return self.fn(self.params, v)

    def validate(self, n):
        super().validate(n)
        if not _concrete(*jax.tree_util.tree_leaves(self.params)):
            return
        # Two random probes: Sigma u must be finite, symmetric and positive along u.
        rng = np.random.default_rng(0)
        u = jnp.asarray(rng.standard_normal(n))
        w = jnp.asarray(rng.standard_normal(n))
        su, sw = self.matvec(u), self.matvec(w)
        if not _concrete(su, sw):  # called inside a trace: no value checks
            return
        su, sw = np.asarray(su, np.float64), np.asarray(sw, np.float64)
        if su.shape != (n,):
            raise InputError(f"covariance matvec must map (n,) to (n,), got {su.shape}")
        if not (np.all(np.isfinite(su)) and np.all(np.isfinite(sw))):
            raise InputError("covariance matvec returned NaN or Inf")
        uw, wu = float(np.dot(np.asarray(u), sw)), float(np.dot(np.asarray(w), su))
        scale = float(np.linalg.norm(u) * max(np.linalg.norm(su), np.linalg.norm(sw)))
        if abs(uw - wu) > 1e-8 * max(scale, 1e-300):
            raise InputError(
                f"covariance operator is not symmetric: u^T S w = {uw:.6g} but"
                f" w^T S u = {wu:.6g}"
            )
        if float(np.dot(np.asarray(u), su)) <= 0:
            raise InputError("covariance operator is not positive: u^T S u <= 0")

    def tree_flatten(self):
        return (self.params,), (self.fn, self.n)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], aux[1], children[0])


def _lag_grid(image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """FFT grid (2H - 1, 2W - 1): every lag |di| < H, |dj| < W on its own index."""
    h, w = image_shape[:2]
    return 2 * h - 1, 2 * w - 1


def _place_lags(kernel, grid: tuple[int, int]):
    """Kernel (2Lh+1, 2Lw+1, C, C) onto a (Ph, Pw, C, C) circle: lag d at d mod P.

    Needs P >= H + L per axis so that, for pixels of an H x W image, a lag that is
    not in the kernel never lands on one that is (no wrap-around).
    """
    xp = jnp if isinstance(kernel, jax.Array) else np
    lh, lw = (kernel.shape[0] - 1) // 2, (kernel.shape[1] - 1) // 2
    pad = ((0, grid[0] - kernel.shape[0]), (0, grid[1] - kernel.shape[1]))
    placed = xp.pad(kernel, pad + ((0, 0), (0, 0)))
    return xp.roll(placed, (-lh, -lw), axis=(0, 1))


def circulant_spectrum(kernel, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Eigenvalues of the block-circulant embedding of a stationary kernel (host).

    The kernel's lags are placed on the (2H - 1, 2W - 1) circle (lag d at d mod P),
    which wraps no lag onto another, so the block-Toeplitz covariance of the image
    is a principal submatrix of that block-circulant matrix. The circulant's
    eigenvalues are those of the C x C Hermitian matrices K^(f), one per frequency;
    when all are >= 0 the circulant is PSD and so is the Toeplitz covariance
    (Cauchy interlacing). The converse does not hold: this is a sufficient check.

    Args:
      kernel: (2Lh+1, 2Lw+1, C, C) float64, ``kernel[Lh + di, Lw + dj, c, c']`` =
        Cov(x[i, j, c], x[i + di, j + dj, c']), with Lh < H, Lw < W.
      image_shape: (H, W, C).

    Returns:
      (2H - 1, 2W - 1, C) float64 eigenvalues, ascending per frequency.
    """
    k = np.asarray(kernel, np.float64)
    g = _place_lags(k, _lag_grid(image_shape))
    spec = np.fft.fft2(g, axes=(0, 1))
    spec = 0.5 * (spec + np.conj(np.swapaxes(spec, -1, -2)))  # Hermitian to rounding
    return np.linalg.eigvalsh(spec)


@jax.tree_util.register_pytree_node_class
class StationaryCovariance(Covariance):
    """A translation-invariant covariance of an (H, W, C) image (block-Toeplitz).

    Cov(x[i, j, c], x[i + di, j + dj, c']) = k[di, dj, c, c'] for |di| <= Lh,
    |dj| <= Lw (zero beyond), with the full cross-channel C x C kernel. The pixels
    outside the image do not exist: Sigma is the exact linear correlation with the
    kernel (block-Toeplitz), not a circulant that wraps the image around. A valid
    kernel satisfies k[-d] = k[d]^T.

    The matvec is exact and O(n log n): Sigma v = the linear correlation of the
    (H, W, C) image v with the kernel, computed by FFT on a zero-padded
    (H + Lh, W + Lw) grid, large enough that no lag wraps onto another; no
    (n, n) matrix is formed. For pixel (i, j, c),
    (Sigma v)[i, j, c] = sum_{di, dj, c'} k[di, dj, c, c'] v[i + di, j + dj, c'].

    Args:
      kernel: (2Lh+1, 2Lw+1, C, C) float64, ``kernel[Lh + di, Lw + dj, c, c']``,
        with Lh < H and Lw < W (the lag 0 at the centre).
      image_shape: (H, W, C) of the image (static).
      check_psd: :meth:`validate` checks the sufficient PSD condition of
        :func:`circulant_spectrum` (raises when it fails). Switch it off only for a
        kernel known to be PSD by other means.
    """

    def __init__(self, kernel, image_shape: tuple[int, ...], check_psd: bool = True):
        self.kernel = kernel
        shape = tuple(int(s) for s in image_shape)
        if len(shape) == 2:
            shape = (*shape, 1)
        self.image_shape = shape
        self.check_psd = bool(check_psd)
        self.n = int(np.prod(shape))

    @property
    def lags(self) -> tuple[int, int]:
        """(Lh, Lw), the largest lags the kernel holds."""
        return (np.shape(self.kernel)[0] - 1) // 2, (np.shape(self.kernel)[1] - 1) // 2

    def matvec(self, v):
        h, w, c = self.image_shape
        lh, lw = self.lags
        grid = (h + lh, w + lw)
        k = jnp.asarray(self.kernel, jnp.float64)
        # The correlation y[i] = sum_d k[d] v[i + d] is the convolution of v with
        # g[e] = k[-e] (kernel flipped in space), per channel pair c, c'.
        g = _place_lags(k[::-1, ::-1], grid)
        vh = jnp.fft.rfft2(v.reshape(h, w, c), s=grid, axes=(0, 1))
        gh = jnp.fft.rfft2(g, axes=(0, 1))
        yh = jnp.einsum("abcd,abd->abc", gh, vh, precision=lax.Precision.HIGHEST)
        y = jnp.fft.irfft2(yh, s=grid, axes=(0, 1))[:h, :w]
        return y.reshape(-1).astype(v.dtype)

    def diagonal(self, n):
        lh, lw = self.lags
        k0 = jnp.diagonal(jnp.asarray(self.kernel, jnp.float64)[lh, lw])  # (C,)
        h, w, _ = self.image_shape
        return jnp.tile(k0, h * w)

    def validate(self, n):
        super().validate(n)
        h, w, c = self.image_shape
        kshape = tuple(np.shape(self.kernel))
        if (
            len(kshape) != 4
            or kshape[2:] != (c, c)
            or kshape[0] % 2 == 0
            or kshape[1] % 2 == 0
            or kshape[0] > 2 * h - 1
            or kshape[1] > 2 * w - 1
        ):
            raise InputError(
                f"stationary kernel must be (2Lh+1, 2Lw+1, C, C) with Lh < H, Lw < W"
                f" for image_shape={self.image_shape}, got kernel.shape={kshape}"
            )
        if not _concrete(self.kernel):
            return
        k = np.asarray(self.kernel, np.float64)
        if not np.all(np.isfinite(k)):
            raise InputError("stationary kernel holds NaN or Inf")
        lh, lw = self.lags
        k0 = np.diagonal(k[lh, lw])
        if np.any(k0 <= 0):
            raise InputError(
                f"stationary kernel must have variances k[0, 0, c, c] > 0, got {k0}"
            )
        scale = float(np.max(np.abs(k)))
        asym = float(np.max(np.abs(k - np.swapaxes(k[::-1, ::-1], 2, 3))))
        if asym > 1e-10 * scale:
            raise InputError(
                "stationary kernel is not symmetric: k[-d] must equal k[d]^T"
                f" (max difference {asym:.3g}, max |k| = {scale:.3g})"
            )
        if self.check_psd:
            lam = float(np.min(circulant_spectrum(k, self.image_shape)))
            if lam < -1e-10 * scale * k.shape[0] * k.shape[1]:
                raise InputError(
                    "stationary kernel fails the PSD check: its block-circulant"
                    f" embedding has eigenvalue {lam:.3g} < 0. Estimate it with"
                    " sijax.noise_model.estimate_noise_model (which projects it),"
                    " or pass check_psd=False if it is PSD for another reason"
                )

    def tree_flatten(self):
        return (self.kernel,), (self.image_shape, self.check_psd)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)


@jax.tree_util.register_pytree_node_class
class LowRankDiagonalCovariance(Covariance):
    """Sigma = U diag(s) U^T + diag(d): a few shared modes plus independent pixels.

    The matvec U (s * (U^T v)) + d * v is exact and O(n k); no (n, n) matrix.

    Args:
      basis: U, (n, k) float64 (need not be orthonormal).
      scales: s, (k,) float64, >= 0 (the variances along U's columns).
      residual: d, (n,) float64, > 0 (keeps Sigma positive definite).
    """

    def __init__(self, basis, scales, residual):
        self.basis = basis  # (n, k)
        self.scales = scales  # (k,)
        self.residual = residual  # (n,)
        self.n = int(np.shape(residual)[0])

    def matvec(self, v):
        u = jnp.asarray(self.basis, jnp.float64)
        coef = _matvec_dot(u.T, v) * self.scales
        return _matvec_dot(u, coef) + self.residual * v

    def diagonal(self, n):
        u = jnp.asarray(self.basis, jnp.float64)
        return (
            jnp.sum(u * u * jnp.asarray(self.scales)[None, :], axis=1) + self.residual
        )

    def validate(self, n):
        super().validate(n)
        ushape, sshape = tuple(np.shape(self.basis)), tuple(np.shape(self.scales))
        if len(ushape) != 2 or ushape[0] != n or sshape != ushape[1:]:
            raise InputError(
                f"low-rank covariance needs basis (n, k) and scales (k,) with n={n},"
                f" got basis.shape={ushape}, scales.shape={sshape}"
            )
        if not _concrete(self.basis, self.scales, self.residual):
            return
        u, s, d = (
            np.asarray(a, np.float64) for a in (self.basis, self.scales, self.residual)
        )
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(s))):
            raise InputError("low-rank covariance: basis or scales hold NaN or Inf")
        if not np.all(np.isfinite(d)):
            raise InputError("low-rank covariance: residual variances hold NaN/Inf")
        if np.any(s < 0):
            raise InputError(f"low-rank covariance: scales must be >= 0, got {s}")
        if np.any(d <= 0):
            bad = int(np.argmin(d))
            raise InputError(
                f"low-rank covariance: residual variances must be > 0; element {bad}"
                f" is {d[bad]!r} ({int(np.sum(d <= 0))} not positive)"
            )

    def tree_flatten(self):
        return (self.basis, self.scales, self.residual), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def as_covariance(sigma, shape: tuple[int, ...]) -> Covariance:
    """Interpret a user covariance for an image of ``shape`` (n = prod(shape)).

    Accepted forms:

    * a :class:`Covariance` instance;
    * ``"iid"`` (Sigma = I) or ``"corr"`` (Sigma_ij = 0.5^|i-j|,
      :class:`AR1Covariance`);
    * a scalar s: Sigma = s I (s is a *variance*);
    * an array shaped like the image (for an (H, W, 1) image also (H, W)), or (n,):
      per-element variances (diagonal Sigma);
    * an (n, n) array: a dense matrix;
    * a callable ``fn(v) -> Sigma v`` on flat (n,) vectors.

    Raises:
      InputError: for anything else, or a concrete covariance that is not valid
        (negative or zero variances, non-symmetric or indefinite matrix, NaN/Inf).
    """
    n = int(np.prod(shape))
    if isinstance(sigma, Covariance):
        cov = sigma
    elif isinstance(sigma, str):
        if sigma == "iid":
            cov = ScalarCovariance(1.0)
        elif sigma == "corr":
            cov = AR1Covariance(n, 0.5, 1.0)
        else:
            raise InputError(f"unknown covariance {sigma=}; use 'iid' or 'corr'")
    elif sigma is None:
        raise InputError("a covariance is required (sigma=None)")
    elif callable(sigma) and not hasattr(sigma, "shape"):
        cov = OperatorCovariance(sigma, n)
    else:
        s_shape = tuple(np.shape(sigma))
        if s_shape == ():
            cov = ScalarCovariance(jnp.asarray(sigma, jnp.float64))
        elif s_shape in (tuple(shape), (n,)) or (
            # (H, W) variances of a one-channel (H, W, 1) image, as images load
            len(shape) == 3 and shape[-1] == 1 and s_shape == tuple(shape[:2])
        ):
            cov = DiagonalCovariance(jnp.asarray(sigma, jnp.float64).reshape(n))
        elif s_shape == (n, n):
            cov = DenseCovariance(jnp.asarray(sigma, jnp.float64))
        else:
            raise InputError(
                f"covariance shape {s_shape} fits neither the image {tuple(shape)} "
                f"(per-pixel variances), ({n},) nor ({n}, {n}) (dense)"
            )
    cov.validate(n)
    return cov


def covariance_matrix(cov: Covariance, n: int) -> jax.Array:
    """Dense (n, n) matrix of any covariance, column by column (tests, small n)."""
    eye = jnp.eye(n, dtype=jnp.float64)
    return jax.vmap(cov.matvec, in_axes=1, out_axes=1)(eye)


# --------------------------------------------------------------------------- regions


def dilate(mask: jax.Array, radius: int) -> jax.Array:
    """Binary dilation of a (H, W) or (H, W, C) mask by a (2r+1) x (2r+1) window.

    Spatial dimensions only; pixels outside the image count as not in the mask.
    """
    r = int(radius)
    window = (2 * r + 1, 2 * r + 1) + (1,) * (mask.ndim - 2)
    pad = ((r, r), (r, r)) + ((0, 0),) * (mask.ndim - 2)
    out = lax.reduce_window(
        mask.astype(jnp.float32),
        jnp.zeros((), jnp.float32),
        lax.max,
        window,
        (1,) * mask.ndim,
        pad,
    )
    return out > 0


def region_eta(
    mask: jax.Array, hypothesis: str = "reference", *, radius: int = 1
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """eta for a region mask (docs/method.md §3), before standardisation.

    Args:
      mask: bool, shaped like the image (already broadcast over channels).
      hypothesis: "reference", "background" or "neighbour".
      radius: r of the neighbour test.

    Returns:
      (eta_x, eta_ref, status): eta_x shaped like ``mask``; eta_ref the reference block
      (None unless "reference"); status an int32 :class:`StatStatus` code (eta is all
      zeros when it is not OK).
    """
    m = mask.astype(jnp.float64)
    size = jnp.sum(m)
    inside = m / jnp.maximum(size, 1.0)
    status = jnp.where(size > 0, StatStatus.OK, StatStatus.EMPTY_REGION)
    if hypothesis == "reference":
        return inside, -inside, status.astype(jnp.int32)
    if hypothesis == "background":
        other = 1.0 - m
    elif hypothesis == "neighbour":
        if int(radius) < 1:
            raise InputError(f"neighbour radius must be >= 1, got {radius=}")
        other = (dilate(mask, radius) & ~mask).astype(jnp.float64)
    else:
        raise InputError(f"{hypothesis=} must be one of {HYPOTHESES[:3]} here")
    n_other = jnp.sum(other)
    eta = inside - other / jnp.maximum(n_other, 1.0)
    status = jnp.where(
        status != StatStatus.OK,
        status,
        jnp.where(n_other > 0, StatStatus.OK, StatStatus.EMPTY_COMPARISON),
    ).astype(jnp.int32)
    eta = jnp.where(status == StatStatus.OK, eta, 0.0)
    return eta, None, status


# ------------------------------------------------------------------------- statistic


class LineStatistic(NamedTuple):
    """The standardised statistic and the line through X (docs/method.md §3-4).

    Attributes:
      z_obs: () float64, eta^T x~ / sqrt(eta^T Sigma~ eta) (NaN unless status is OK).
      stat: () float64, the raw statistic T = eta^T x~.
      sd: () float64, sqrt(eta^T Sigma~ eta), the standard deviation of T.
      a: X-shaped float64, the line origin a = X - z_obs b (X block of a~).
      b: X-shaped float64, the direction b = Sigma eta_X / sd (X block of b~); X(z) =
        a + b z reproduces X at z = z_obs.
      eta: X-shaped float64, the X block of eta.
      eta_ref: X-shaped float64, the reference block of eta (zeros without reference).
      status: () int32, a :class:`StatStatus` code.
    """

    z_obs: jax.Array  # ()
    stat: jax.Array  # ()
    sd: jax.Array  # ()
    a: jax.Array  # x.shape
    b: jax.Array  # x.shape
    eta: jax.Array  # x.shape
    eta_ref: jax.Array  # x.shape
    status: jax.Array  # () int32


def _flat_matvec(cov: Covariance, v: jax.Array) -> jax.Array:
    return cov.matvec(v.reshape(-1)).reshape(v.shape)


def _check_array(name: str, v, ndim=(2, 3)) -> jax.Array:
    arr = jnp.asarray(v)
    if arr.ndim not in ndim:
        raise InputError(
            f"{name} must be (H, W) or (H, W, C), got {name}.shape={arr.shape}"
        )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.float64)
    if _concrete(arr) and not bool(jnp.all(jnp.isfinite(arr))):
        raise InputError(f"{name} holds NaN or Inf")
    return arr


def line_statistic(
    x: jax.Array,
    x_ref: jax.Array | None,
    mask: jax.Array | None,
    *,
    sigma,
    sigma_ref=None,
    hypothesis: str = "reference",
    radius: int = 1,
    eta=None,
    empty: str = "status",
) -> LineStatistic:
    """Standardised statistic z_obs and the line X(z) = a + b z (docs/method.md §3-4).

    Works on concrete arrays and under ``jit``/``vmap`` (then the value checks become
    status codes; shape checks still raise).

    Args:
      x: (H, W) or (H, W, C) test image.
      x_ref: reference image of the same shape, or None (needed for "reference").
      mask: region M, bool (H, W) (all channels) or shaped like ``x``; may be None with
        ``eta``.
      sigma: covariance of X, any form :func:`as_covariance` accepts (a scalar is the
        variance).
      sigma_ref: covariance of X_ref (default: ``sigma``, as in the paper).
      hypothesis: "reference" (default), "background", "neighbour" or "custom".
      radius: r of the neighbour test.
      eta: user-supplied eta (implies "custom"): an array shaped like ``x`` (X only),
        or a pair (eta_X, eta_ref).
      empty: what an empty region does: "status" (default; returns status EMPTY_REGION,
        the end-to-end test reports "no region") or "raise" (InputError).

    Returns:
      :class:`LineStatistic`.

    Raises:
      InputError: shape mismatch, NaN/Inf, unknown hypothesis, invalid covariance,
        eta^T Sigma~ eta <= 0, or (with ``empty="raise"``, or any non-OK status other
        than an empty region / comparison set on concrete inputs) a degenerate test.
    """
    if empty not in ("status", "raise"):
        raise InputError(f"{empty=} must be 'status' or 'raise'")
    x = _check_array("x", x).astype(jnp.float64)
    shape = x.shape
    if eta is not None:
        hypothesis = "custom"
    if hypothesis not in HYPOTHESES:
        raise InputError(f"{hypothesis=} must be one of {HYPOTHESES}")
    use_ref = hypothesis == "reference" or (
        hypothesis == "custom" and isinstance(eta, (tuple, list))
    )
    if use_ref:
        if x_ref is None:
            raise InputError(
                f"{hypothesis=} needs a reference image x_ref (or use"
                " hypothesis='background' / 'neighbour')"
            )
        x_ref = _check_array("x_ref", x_ref).astype(jnp.float64)
        if x_ref.shape != shape:
            raise InputError(f"{x_ref.shape=} must equal {x.shape=}")
    cov = as_covariance(sigma, shape)
    cov_ref = as_covariance(sigma if sigma_ref is None else sigma_ref, shape)

    if hypothesis == "custom":
        if isinstance(eta, (tuple, list)):
            if len(eta) != 2:
                raise InputError("eta as a sequence must be the pair (eta_x, eta_ref)")
            eta_x, eta_r = (jnp.asarray(e, jnp.float64) for e in eta)
        else:
            eta_x, eta_r = jnp.asarray(eta, jnp.float64), None
        for name, e in (("eta", eta_x), ("eta_ref", eta_r)):
            if e is not None and e.shape != shape:
                raise InputError(f"{name}.shape={e.shape} must equal {x.shape=}")
        status = jnp.asarray(StatStatus.OK, jnp.int32)
    else:
        if mask is None:
            raise InputError(f"{hypothesis=} needs a region mask")
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise InputError(f"mask must be boolean, got {mask.dtype=}")
        if mask.shape != shape:
            if mask.ndim == 2 and len(shape) == 3 and mask.shape == shape[:2]:
                mask = jnp.broadcast_to(mask[:, :, None], shape)
            else:
                raise InputError(
                    f"{mask.shape=} must be {x.shape=} or its (H, W) = {shape[:2]}"
                )
        eta_x, eta_r, status = region_eta(mask, hypothesis, radius=radius)

    finite = jnp.all(jnp.isfinite(x))
    t = jnp.sum(eta_x * x)
    s_x = _flat_matvec(cov, eta_x)
    v = jnp.sum(eta_x * s_x)
    if eta_r is not None:
        finite = finite & jnp.all(jnp.isfinite(x_ref))
        t = t + jnp.sum(eta_r * x_ref)
        v = v + jnp.sum(eta_r * _flat_matvec(cov_ref, eta_r))
        norm2 = jnp.sum(eta_x * eta_x) + jnp.sum(eta_r * eta_r)
        sv2 = jnp.sum(s_x * s_x) + jnp.sum(_flat_matvec(cov_ref, eta_r) ** 2)
    else:
        norm2 = jnp.sum(eta_x * eta_x)
        sv2 = jnp.sum(s_x * s_x)
    # eta^T S eta <= |eta| |S eta| (Cauchy-Schwarz): far below it means S is singular
    # along eta (numerically zero variance), which makes z meaningless.
    degenerate = ~(v > 1e-12 * jnp.sqrt(norm2 * sv2)) | ~jnp.isfinite(v)
    status = jnp.where(
        status != StatStatus.OK,
        status,
        jnp.where(
            ~finite,
            StatStatus.NONFINITE,
            jnp.where(degenerate, StatStatus.DEGENERATE_VARIANCE, StatStatus.OK),
        ),
    ).astype(jnp.int32)
    ok = status == StatStatus.OK
    sd = jnp.sqrt(jnp.where(ok, v, 1.0))
    z = jnp.where(ok, t / sd, jnp.nan)
    b = jnp.where(ok, s_x / sd, 0.0)
    a = jnp.where(ok, x - jnp.where(ok, z, 0.0) * b, x)
    out = LineStatistic(
        z_obs=z,
        stat=t,
        sd=jnp.where(ok, sd, jnp.nan),
        a=a,
        b=b,
        eta=eta_x,
        eta_ref=jnp.zeros_like(eta_x) if eta_r is None else eta_r,
        status=status,
    )
    if _concrete(status):
        code = int(status)
        skip = (StatStatus.EMPTY_REGION, StatStatus.EMPTY_COMPARISON)
        if code != StatStatus.OK and (empty == "raise" or code not in skip):
            raise InputError(StatStatus.MESSAGES[code])
    return out
