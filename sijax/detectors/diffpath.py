"""DiffPath: an image-level out-of-distribution score from the DDIM inversion path
(Heng, Thiery and Soh, NeurIPS 2024; docs/detectors/diffpath.md).

The test image x is carried to noise by the deterministic DDIM ODE run forwards
(eta = 0) over ``steps`` times t_0 = 0 < t_1 < ... < t_{N-1} (t_i = floor(i T / N)):

    e_i     = eps_theta(x^(i), t_i)                                   (the path's eps)
    x0_hat  = (x^(i) - sqrt(1 - ab_{t_i}) e_i) / sqrt(ab_{t_i})
    x^(i+1) = sqrt(ab_next) x0_hat + sqrt(1 - ab_next) e_i,  ab_next = ab_{t_{i+1}}

with x^(0) = x and ab_{t_N} = 0 (so x^(N) = e_{N-1} is the noise the image is mapped
to). The eps along the path is the path's rate of change, and its finite difference
d_i = N (e_{i+1} - e_i) (i < N - 1) its curvature. The statistics of one image are
the moments of both summed over the path and the pixels,

    first  = (sum e, sum e^2, sum e^3),   second = (sum d, sum d^2, sum d^3),

("both", the paper's DiffPath-6D, stacks the two; "curvature" is its DiffPath-1D,
sqrt(sum d^2)). A density is fitted to the statistics of normal images
(:func:`fit`); the OOD score of an image is the negative log-density of its
statistics (:meth:`PathDensity.score`).

The detector has no region: ``reconstruction`` is None, so the DAL test and
``detect_region`` refuse it (:meth:`sijax.checkpoint.DiffusionModel.check_region`).
Its statistics are not piecewise linear in x (squares and cubes), which does not
matter here: there is no selective p-value to compute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.detectors.base import Detector
from sijax.diffusion.schedule import Schedule, alpha_bar
from sijax.errors import InputError

__all__ = [
    "DETECTOR",
    "DENSITIES",
    "STATISTICS",
    "InversionPath",
    "Options",
    "PathDensity",
    "ddim_inversion",
    "draw_noises",
    "fit",
    "fit_statistics",
    "image_score",
    "inversion_steps",
    "model_statistics",
    "path_statistics",
    "preset",
    "statistic_names",
]

STATISTICS = ("first", "second", "both", "curvature")
DENSITIES = ("gaussian", "gmm", "kde")


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of DiffPath (defaults: the paper's DiffPath-6D path, with a single
    Gaussian as the density).

    Attributes:
        steps: N, the DDIM inversion steps from t = 0 to T (10 in the paper); >= 2
            (the curvature needs two eps).
        statistic: which path statistics: "first" (moments 1-3 of eps), "second"
            (moments 1-3 of its rate of change d), "both" (the six, DiffPath-6D),
            "curvature" (sqrt(sum d^2), DiffPath-1D).
        density: the density fitted to the normal images' standardised statistics:
            "gaussian" (one full-covariance Gaussian), "gmm" (a Gaussian mixture fitted
            by EM; the paper's 6-D density) or "kde" (Gaussian kernels, the paper's
            1-D density).
        components: mixture components of "gmm".
        bandwidth: kernel width of "kde" in standardised units; 0 chooses Scott's
            rule n^(-1 / (k + 4)).
        ridge: added to the diagonal of every covariance (standardised units): keeps
            it invertible when the statistics are (nearly) collinear.
    """

    steps: int = 10
    statistic: str = "both"
    density: str = "gaussian"
    components: int = 3
    bandwidth: float = 0.0
    ridge: float = 1e-3

    def __post_init__(self):
        if not _is_int(self.steps) or self.steps < 2:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 2 (the "
                             "curvature needs two points of the path)")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic={self.statistic!r} must be one of "
                             f"{STATISTICS}")
        if self.density not in DENSITIES:
            raise ValueError(f"density={self.density!r} must be one of {DENSITIES}")
        if not _is_int(self.components) or self.components < 1:
            raise ValueError(f"components={self.components!r} must be an integer >= 1")
        if not np.isfinite(self.bandwidth) or self.bandwidth < 0:
            raise ValueError(f"bandwidth={self.bandwidth!r} must be >= 0 (0: Scott's "
                             "rule)")
        if not np.isfinite(self.ridge) or self.ridge < 0:
            raise ValueError(f"ridge={self.ridge!r} must be a finite number >= 0")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "components", int(self.components))
        object.__setattr__(self, "bandwidth", float(self.bandwidth))
        object.__setattr__(self, "ridge", float(self.ridge))


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def statistic_names(statistic: str) -> tuple[str, ...]:
    """Names of the entries of :func:`path_statistics` for ``statistic``."""
    first = ("sum_eps", "sum_eps2", "sum_eps3")
    second = ("sum_deps", "sum_deps2", "sum_deps3")
    return {"first": first, "second": second, "both": first + second,
            "curvature": ("norm_deps",)}[statistic]


def preset(size: int = 8):
    """DiffPath's training recipe: the DDPM noise predictor (no loss of its own) on
    the linear schedule (T = 1000, beta 1e-4 .. 0.02), U-Net widths (32, 64, 128),
    batch 32, Adam 1e-3, 100 epochs.

        sijax train --detector diffpath --data DIR --set size=8 --workdir W

    Expected result: on N(0, 1) images (no ``--data``) the noise-prediction MSE
    falls to about 0.29 within 400 steps (measured: 0.71 over the first 10 steps,
    0.285 over steps 300-400 with 320 images), towards the Bayes risk
    mean_t alpha_bar_t = 0.2755; on structured images it ends lower (0.23 after 160
    steps of a (4, 8, 16) network on smooth 8x8 fields), since their noise is easier
    to tell from the image.
    """
    from sijax.config import TrainConfig

    return TrainConfig(name="diffpath", size=size, channels=(32, 64, 128),
                       n_train=1000, batch_size=32, epochs=100, lr=1e-3,
                       schedule_kind="linear", detector="diffpath")


def draw_noises(key: jax.Array, image_shape, options: Options) -> dict:
    """DDIM inversion is deterministic: no noise at all (an empty pytree).

    ``sijax.draw_noises(key, model)`` returns it, and it batches (``jax.vmap``) and
    passes the noise-shape checks like any other detector's noises.
    """
    del key, image_shape, options
    return {}


def inversion_steps(T: int, steps: int) -> np.ndarray:  # noqa: N803  (the paper's T)
    """The N = ``steps`` times of the path, t_i = floor(i T / N), i = 0..N-1
    (improved-diffusion's "ddimN" spacing for T = 1000).

    Raises:
        InputError: more steps than the schedule has times.
    """
    if not 1 <= steps <= T:
        raise InputError(f"steps={steps} must lie in 1..T={T} (the schedule's times)")
    return (np.arange(steps, dtype=np.int64) * T) // steps


class InversionPath(NamedTuple):
    """The DDIM inversion path of one image.

    Attributes:
        x_t: (N, H, W, C) the states x^(0) = x, ..., x^(N-1) where eps is evaluated.
        eps: (N, H, W, C) e_i = eps_theta(x^(i), t_i).
        x_T: (H, W, C) the end point x^(N) (= e_{N-1}, since ab_{t_N} = 0).
    """

    x_t: jax.Array
    eps: jax.Array
    x_T: jax.Array  # noqa: N815  (the paper's name)


def ddim_inversion(eps_fn, x: jax.Array, *, schedule: Schedule,
                   steps: int) -> InversionPath:
    """Deterministic DDIM (eta = 0) from x at t = 0 to T, as one ``lax.scan``.

    Per step i: e_i = eps_fn(x^(i), t_i),
    x^(i+1) = sqrt(ab_next) (x^(i) - sqrt(1 - ab_{t_i}) e_i) / sqrt(ab_{t_i})
    + sqrt(1 - ab_next) e_i, with ab_next = ab_{t_{i+1}} and 0 after the last step
    (DDIM eq. 13 run forwards; the paper's diffusion path).

    Args:
        eps_fn: one-image noise predictor ``eps_fn(x_t (H, W, C), t) -> (H, W, C)``.
        x: (H, W, C) image (the model's input).
        schedule: concrete schedule (NumPy alpha_bar).
        steps: N.

    Returns:
        :class:`InversionPath`.
    """
    t = inversion_steps(schedule.T, steps)
    ab_t = np.asarray(alpha_bar(schedule, t), np.float64)
    ab_next = np.append(ab_t[1:], 0.0)
    dt = x.dtype
    per_step = (jnp.asarray(t, dt),
                jnp.asarray(np.sqrt(ab_t), dt),
                jnp.asarray(np.sqrt(1.0 - ab_t), dt),
                jnp.asarray(np.sqrt(ab_next), dt),
                jnp.asarray(np.sqrt(1.0 - ab_next), dt))

    def step(x_i, consts):
        t_i, sq_ab, sq_1m_ab, sq_ab_next, sq_1m_ab_next = consts
        e_i = eps_fn(x_i, t_i)
        x0_hat = (x_i - sq_1m_ab * e_i) / sq_ab
        return sq_ab_next * x0_hat + sq_1m_ab_next * e_i, (x_i, e_i)

    x_T, (x_t, eps) = jax.lax.scan(step, x, per_step)  # noqa: N806
    return InversionPath(x_t=x_t, eps=eps, x_T=x_T)


def _moments(a: jax.Array) -> jax.Array:
    """(sum a, sum a^2, sum a^3) over every entry, (3,)."""
    return jnp.stack([jnp.sum(a), jnp.sum(a * a), jnp.sum(a * a * a)])


def path_statistics(eps_fn, x: jax.Array, *, schedule: Schedule,
                    options: Options) -> jax.Array:
    """The statistics of the inversion path of one image, (k,) (module docstring).

    With the eps path e (N, H, W, C) and its rate of change d_i = N (e_{i+1} - e_i):
    "first" (3,) = moments of e, "second" (3,) = moments of d, "both" (6,) = the two
    (the paper's 6-D statistic), "curvature" (1,) = sqrt(sum d^2) (its 1-D one).

    Args:
        eps_fn: one-image noise predictor.
        x: (H, W, C) image.
        schedule: concrete schedule.
        options: :class:`Options` (``steps``, ``statistic``).

    Returns:
        (k,) statistics, dtype of x.
    """
    eps = ddim_inversion(eps_fn, x, schedule=schedule, steps=options.steps).eps
    d = options.steps * (eps[1:] - eps[:-1])  # deps/dt with dt = 1/N
    if options.statistic == "first":
        return _moments(eps)
    if options.statistic == "second":
        return _moments(d)
    if options.statistic == "both":
        return jnp.concatenate([_moments(eps), _moments(d)])
    return jnp.sqrt(jnp.sum(d * d))[None]


def image_score(eps_fn, x: jax.Array, noises, *, schedule: Schedule,
                options: Options) -> jax.Array:
    """A score of one image without a fitted density, () (higher: more anomalous).

    The mean squared eps along the path, sum_i ||e_i||^2 / (N H W C): about 1 where
    the model maps the image to noise of unit variance, larger where it has to
    explain away structure it never saw. This is only a fallback for ranking images
    when no normal images are at hand: the paper's score, the negative
    log-density of :func:`path_statistics` under a density fitted on normal
    images (:func:`fit`, :meth:`PathDensity.score`), is preferred; it also catches
    images whose paths are too smooth.

    Args:
        eps_fn: one-image noise predictor.
        x: (H, W, C) image.
        noises: from :func:`draw_noises` (empty; unused).
        schedule: concrete schedule.
        options: :class:`Options` (``steps``).

    Returns:
        () score, dtype of x.
    """
    del noises
    eps = ddim_inversion(eps_fn, x, schedule=schedule, steps=options.steps).eps
    return jnp.mean(eps * eps)


# ------------------------------------------------------------- many images, fitting


def _resolve_options(model, options: Options | None) -> Options:
    """``options``, or the model's own (a DiffPath model), or the defaults (a model
    trained for another detector: DiffPath needs only a noise predictor)."""
    if options is not None:
        if not isinstance(options, Options):
            raise InputError(f"options must be diffpath Options, got "
                             f"{type(options).__name__}")
        return options
    return model.options if model.config.detector == "diffpath" else Options()


@functools.partial(jax.jit, static_argnames=("options",))
def _batch_statistics(model, xs: jax.Array, options: Options) -> jax.Array:
    eps_fn, schedule = model.denoiser(), model.schedule
    return jax.vmap(lambda x: path_statistics(eps_fn, x, schedule=schedule,
                                              options=options))(xs)


def model_statistics(model, images, *, options: Options | None = None,
                     batch_size: int = 32) -> np.ndarray:
    """:func:`path_statistics` of many images with a loaded model, (n, k) float64.

    Args:
        model: a :class:`sijax.checkpoint.DiffusionModel` (any noise predictor: the
            paper uses one model for every in-distribution set).
        images: (n, H, W, C) (or (n, H, W) for one channel) model inputs, i.e.
            after the model's preprocessing (``model.preprocessing.apply``).
        options: the statistic and steps; None: the model's options if it was
            trained for DiffPath, else the defaults.
        batch_size: images per compiled call (the last batch is padded, so one
            program serves every batch).

    Raises:
        InputError: images of the wrong shape or with NaN/Inf pixels.
    """
    options = _resolve_options(model, options)
    xs = np.asarray(images, np.float64)
    shape = tuple(model.image_shape)
    if xs.ndim == 3 and shape[2] == 1:
        xs = xs[..., None]
    if xs.ndim != 4 or xs.shape[1:] != shape or xs.shape[0] < 1:
        raise InputError(f"images.shape={np.shape(images)} must be (n, *{shape}) "
                         "with n >= 1")
    if not np.all(np.isfinite(xs)):
        raise InputError("images hold NaN or Inf pixels")
    if batch_size < 1:
        raise InputError(f"{batch_size=} must be >= 1")
    dtype = jax.tree.leaves(model.state)[0].dtype
    n, b = xs.shape[0], min(int(batch_size), xs.shape[0])
    out = []
    for lo in range(0, n, b):
        chunk = xs[lo:lo + b]
        pad = b - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        stats = _batch_statistics(model, jnp.asarray(chunk, dtype), options)
        out.append(np.asarray(stats, np.float64)[:b - pad])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True, eq=False)
class PathDensity:
    """A Gaussian mixture over the standardised path statistics of normal images.

    The statistics s (k,) are standardised, z = (s - center) / scale, and
    p(s) = sum_m w_m N(z; mu_m, S_m) / prod(scale): one component for "gaussian",
    EM's components for "gmm", one kernel per normal image for "kde". NumPy only;
    :meth:`to_dict` / :meth:`from_dict` give a JSON-ready record.

    Attributes:
        statistic: the :attr:`Options.statistic` the density was fitted on.
        steps: the :attr:`Options.steps` it was fitted on.
        kind: "gaussian", "gmm" or "kde".
        center: (k,) mean of the normal statistics.
        scale: (k,) their standard deviation (1 where it is 0).
        weights: (M,) mixture weights, summing to 1.
        means: (M, k) component means (standardised units).
        covariances: (M, k, k) component covariances (standardised units).
    """

    statistic: str
    steps: int
    kind: str
    center: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    def __post_init__(self):
        if self.statistic not in STATISTICS or self.kind not in DENSITIES \
                or not _is_int(self.steps) or self.steps < 2:
            raise InputError(f"bad PathDensity: statistic={self.statistic!r}, "
                             f"kind={self.kind!r}, steps={self.steps!r}")
        arrays = {f: np.array(getattr(self, f), np.float64) for f in
                  ("center", "scale", "weights", "means", "covariances")}
        k = len(statistic_names(self.statistic))
        m = arrays["weights"].shape[0] if arrays["weights"].ndim == 1 else -1
        want = {"center": (k,), "scale": (k,), "weights": (m,), "means": (m, k),
                "covariances": (m, k, k)}
        for name, a in arrays.items():
            if a.shape != want[name] or not np.all(np.isfinite(a)):
                raise InputError(f"PathDensity.{name} must be finite with shape "
                                 f"{want[name]} (k={k}, M={m}); got {a.shape}")
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        if np.any(arrays["scale"] <= 0) or np.any(arrays["weights"] < 0):
            raise InputError(f"bad PathDensity: scale={arrays['scale']} and "
                             f"weights={arrays['weights']} must be positive")
        chol = np.linalg.cholesky(arrays["covariances"])  # raises if not SPD
        object.__setattr__(self, "_chol", chol)

    @property
    def dim(self) -> int:
        """k, the length of the statistics vector."""
        return self.center.shape[0]

    def log_density(self, stats) -> np.ndarray:
        """log p(s) of statistics (k,) or (n, k); () or (n,) float64."""
        s = np.asarray(stats, np.float64)
        if s.shape[-1:] != (self.dim,) or s.ndim not in (1, 2):
            raise InputError(f"stats.shape={s.shape} must be (k,) or (n, k) with "
                             f"k={self.dim} ({self.statistic!r} statistics)")
        z = (s - self.center) / self.scale
        log_p = _mixture_log_pdf(z.reshape(-1, self.dim), self.weights, self.means,
                                 self._chol)
        log_p = log_p - np.sum(np.log(self.scale))
        return log_p[0] if s.ndim == 1 else log_p

    def score(self, stats) -> float:
        """The OOD score of one image, -log p(s) (higher: more anomalous).

        Args:
            stats: (k,) from :func:`path_statistics` with the same options.
        """
        s = np.asarray(stats, np.float64)
        if s.ndim != 1:
            raise InputError(f"score takes one image's statistics (k,); got "
                             f"{s.shape}: use scores for (n, k)")
        return float(-self.log_density(s))

    def scores(self, stats) -> np.ndarray:
        """-log p(s) of many images: (n, k) -> (n,)."""
        s = np.asarray(stats, np.float64)
        if s.ndim != 2:
            raise InputError(f"scores takes (n, k) statistics; got {s.shape}")
        return -self.log_density(s)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (lists of floats)."""
        return {"statistic": self.statistic, "steps": self.steps, "kind": self.kind,
                **{f: getattr(self, f).tolist() for f in
                   ("center", "scale", "weights", "means", "covariances")}}

    @classmethod
    def from_dict(cls, d: dict) -> PathDensity:
        """Inverse of :meth:`to_dict`.

        Raises:
            InputError: missing or unknown keys, bad values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise InputError(f"bad PathDensity record: keys {sorted(d)}, expected "
                             f"{sorted(names)}")
        try:
            return cls(**d)
        except (np.linalg.LinAlgError, ValueError, TypeError, KeyError) as e:
            raise InputError(f"bad PathDensity record: {e}") from None


def _mixture_log_pdf(z: np.ndarray, weights: np.ndarray, means: np.ndarray,
                     chol: np.ndarray) -> np.ndarray:
    """log sum_m w_m N(z; mu_m, L_m L_m^T) for z (n, k), (n,)."""
    return _logsumexp(_component_log_pdf(z, weights, means, chol), axis=1)


def _component_log_pdf(z, weights, means, chol) -> np.ndarray:
    """log w_m + log N(z_j; mu_m, L_m L_m^T), (n, M)."""
    n, k = z.shape
    out = np.empty((n, weights.shape[0]))
    for m in range(weights.shape[0]):
        # Solve L u = (z - mu): ||u||^2 is the Mahalanobis distance.
        u = np.linalg.solve(chol[m], (z - means[m]).T)
        log_det = 2.0 * np.sum(np.log(np.diag(chol[m])))
        with np.errstate(divide="ignore"):
            log_w = np.log(weights[m])
        out[:, m] = log_w - 0.5 * (np.sum(u * u, axis=0) + log_det
                                   + k * np.log(2.0 * np.pi))
    return out


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def fit_statistics(stats, options: Options = Options(), *, seed: int = 0,
                   max_iter: int = 200, tol: float = 1e-8) -> PathDensity:
    """Fits the density of :attr:`Options.density` to normal images' statistics.

    The statistics are standardised by their mean and standard deviation (the
    paper's ``StandardScaler``), then

    * "gaussian": mean 0, covariance = their correlation matrix + ridge I;
    * "gmm": ``components`` Gaussians, k-means++ start drawn with ``seed``, then EM
      (each covariance + ridge I) until the mean log-likelihood gains < ``tol``;
    * "kde": one Gaussian N(z_j, h^2 I) per image, h = ``bandwidth`` (0: Scott's
      rule h = n^(-1 / (k + 4))), plus the ridge.

    Args:
        stats: (n, k) from :func:`model_statistics` (or :func:`path_statistics`).
        options: the density settings and the statistic the stats came from.
        seed: the k-means++ start of "gmm".
        max_iter, tol: EM's limits.

    Returns:
        :class:`PathDensity`.

    Raises:
        InputError: stats not (n, k) for this statistic, NaN/Inf, too few images
            (2, and ``components`` for "gmm").
    """
    s = np.asarray(stats, np.float64)
    k = len(statistic_names(options.statistic))
    if s.ndim != 2 or s.shape[1] != k:
        raise InputError(f"stats.shape={s.shape} must be (n, {k}) for the "
                         f"{options.statistic!r} statistic")
    n = s.shape[0]
    need = max(2, options.components if options.density == "gmm" else 2)
    if n < need:
        raise InputError(f"{n} images are too few to fit a {options.density!r} "
                         f"density (need {need})")
    if not np.all(np.isfinite(s)):
        raise InputError("stats hold NaN or Inf")
    center = s.mean(axis=0)
    scale = s.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (s - center) / scale
    ridge = options.ridge * np.eye(k)
    if options.density == "gaussian":
        weights, means = np.ones(1), np.zeros((1, k))
        covariances = (z.T @ z / n + ridge)[None]
    elif options.density == "kde":
        h = options.bandwidth or n ** (-1.0 / (k + 4))
        weights, means = np.full(n, 1.0 / n), z
        covariances = np.broadcast_to(h * h * np.eye(k) + ridge, (n, k, k))
    else:
        weights, means, covariances = _em(z, options.components, ridge,
                                          np.random.default_rng(seed), max_iter, tol)
    return PathDensity(statistic=options.statistic, steps=options.steps,
                       kind=options.density, center=center, scale=scale,
                       weights=weights, means=means, covariances=covariances)


def _em(z: np.ndarray, m: int, ridge: np.ndarray, rng: np.random.Generator,
        max_iter: int, tol: float):
    """EM for a Gaussian mixture with full covariances (+ ridge); k-means++ start."""
    n, k = z.shape
    centers = [z[rng.integers(n)]]
    for _ in range(1, m):
        d2 = np.min(np.stack([np.sum((z - c) ** 2, axis=1) for c in centers]), axis=0)
        total = d2.sum()
        p = d2 / total if total > 0 else np.full(n, 1.0 / n)
        centers.append(z[rng.choice(n, p=p)])
    centers = np.stack(centers)
    nearest = np.argmin(np.sum((z[:, None] - centers[None]) ** 2, axis=2), axis=1)
    resp = np.eye(m)[nearest]  # hard assignments start the first M-step
    previous = -np.inf
    for _ in range(max_iter):
        nk = resp.sum(axis=0) + 1e-12
        weights = nk / n
        means = resp.T @ z / nk[:, None]
        covariances = np.stack([
            (resp[:, j, None] * (z - means[j])).T @ (z - means[j]) / nk[j] + ridge
            for j in range(m)])
        log_pk = _component_log_pdf(z, weights, means, np.linalg.cholesky(covariances))
        log_p = _logsumexp(log_pk, axis=1)
        resp = np.exp(log_pk - log_p[:, None])
        mean_log_p = float(np.mean(log_p))
        if mean_log_p - previous < tol:
            break
        previous = mean_log_p
    return weights, means, covariances


def fit(model, images, *, options: Options | None = None, batch_size: int = 32,
        seed: int = 0) -> PathDensity:
    """The density of the path statistics of normal ``images`` under ``model``.

    ``fit(model, normal).score(stats)`` is the paper's OOD score of an image with
    statistics ``stats`` (:func:`path_statistics`, or a row of
    :func:`model_statistics` with the same options).

    Args:
        model: a :class:`sijax.checkpoint.DiffusionModel`.
        images: (n, H, W, C) normal images as model inputs (preprocessed).
        options: as :func:`model_statistics` (also the density's settings).
        batch_size: as :func:`model_statistics`.
        seed: as :func:`fit_statistics`.

    Returns:
        :class:`PathDensity`.
    """
    options = _resolve_options(model, options)
    stats = model_statistics(model, images, options=options, batch_size=batch_size)
    return fit_statistics(stats, options, seed=seed)


def fit_dict(model, images) -> dict:
    """:func:`fit` as the JSON stored with a model trained on data (config.json
    "image_fit"; ``sijax train`` calls it on the held-out normal images)."""
    return fit(model, images).to_dict()


def fitted_score(model, fitted: dict, x) -> float:
    """The paper's score of one (H, W, C) image under the stored density."""
    stats = model_statistics(model, np.asarray(x)[None])
    return PathDensity.from_dict(fitted).score(stats[0])


DETECTOR = Detector(
    name="diffpath",
    title="DiffPath: image-level OOD score from the DDIM inversion path (no region)",
    options=Options, preset=preset, draw_noises=draw_noises, reconstruction=None,
    score=None, loss=None, image_score=image_score, fit=fit_dict,
    fitted_score=fitted_score,
)
