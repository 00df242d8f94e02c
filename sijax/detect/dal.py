"""The DAL test end to end (docs/method.md §2-6).

Detect a region with the diffusion reconstruction, give it an exact selective p-value.

One image goes through three pure stages, all jit-compiled together:

1. detection: D(X) with fixed noises, score = |mean filter(D(X) - X)|,
   M = score > lambda;
2. the statistic: z_obs = eta^T x~ / sqrt(eta^T Sigma~ eta) and the line X(z) = a + b z
   (:func:`sijax.selective.statistics.line_statistic`);
3. the search for Zset = {z : M(a + b z) = M_obs} with the piece oracle built from the
   tracker (:func:`sijax.tracking.track`) following the very same detection function.

:func:`dal_test` runs one image and returns a host-side :class:`TestResult`;
:func:`dal_test_batch` vmaps the same compiled core over many images for evaluations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sijax.detect.score import region, score_map
from sijax.diffusion.sampler import Noises
from sijax.diffusion.sampler import draw_noises as _draw_noises
from sijax.errors import InputError, SearchError
from sijax.selective.confidence import check_level, confidence_interval_list
from sijax.selective.intervals import to_list
from sijax.selective.multiple import adjust_p_values, check_adjustment
from sijax.selective.pvalues import check_alternative, naive_p_value
from sijax.selective.search import (
    POLICIES,
    TERMINATIONS,
    Progress,
    SearchStatus,
    reporting,
    search,
    search_host,
)
from sijax.selective.statistics import (
    HYPOTHESES,
    StatStatus,
    as_covariance,
    line_statistic,
)
from sijax.status import Status
from sijax.tracking import LineCache, memo_init, track, track_memo
from sijax.tracking.interpreter import DEFAULT_TIE_TOL


class Engine(str, enum.Enum):
    """How the DAL test finds the pieces of the line (:attr:`DALConfig.engine`).

    A ``str`` enum: ``DALConfig(engine="propagate")`` (and ``--set
    engine=propagate``) is checked and converted once, in ``DALConfig``, and
    ``config.engine == "walk"`` keeps working.

    Members:
      WALK: one value-and-slope pass per piece inside one compiled search (jit,
        vmap, lanes, sharding).
      PROPAGATE: stretches of the line enumerated by batched breakpoint
        propagation, the search driven from the host; one image at a time.
      AUTO: the one measured faster for the call (:func:`resolve_engine`).
    """

    WALK = "walk"
    PROPAGATE = "propagate"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value


# The engines' names, for argument parsers.
ENGINES: tuple[str, ...] = tuple(e.value for e in Engine)

__all__ = [
    "ComponentResult",
    "DALConfig",
    "Engine",
    "Numbers",
    "TestResult",
    "BatchResult",
    "Status",
    "compile_batch",
    "dal_test",
    "dal_test_batch",
    "default_lanes",
    "resolve_engine",
    "detect_region",
    "detect_and_line",
    "detector",
    "draw_noises",
    "label_components",
    "observed_line",
    "prepare_inputs",
    "split_config",
]


@dataclasses.dataclass(frozen=True)
class DALConfig:
    """Options of the DAL test; the defaults are the paper's v5 settings
    (docs/method.md §5-6).

    Attributes:
      t_start: noise level t' the image is diffused to (must equal ``steps[0]``).
      steps: DDIM steps from t' down to 0 (the last step returns x0_hat).
      eta: DDIM eta (1: fresh noise at every step, as the paper).
      filter_size: side of the mean filter of the reconstruction error.
      threshold: lambda; the region is {score > lambda} (strict).
      hypothesis: "reference" (two-sample, default), "background" or "neighbour".
      radius: r of the neighbour test.
      alternative: "abs" (P(|Z| >= |z|), default), "two-sided", "less", "greater".
      search: "parametric" (default), "exhaustive" or "over_conditioning".
      termination: "precision" (default) or "decision", for "parametric".
      precision: "precision" stops once sup_p - inf_p < precision.
      alpha: level used by "decision" (and reported rejections).
      max_pieces: cap on pieces evaluated per image.
      margin: "exhaustive" covers [-margin - |z_obs|, margin + |z_obs|].
      memo: reuse the sampler steps whose piece still holds while walking the line
        (:func:`sijax.tracking.track_memo`); same pieces and p-values, less work.
      engine: how the pieces are found (an :class:`Engine`; its name, a string, is
        converted). "walk" (default): one value-and-slope pass
        per piece inside one compiled search (jit, vmap, lanes, sharding).
        "propagate": stretches of the line enumerated
        by batched breakpoint propagation (:class:`sijax.tracking.LineCache`,
        driven from the host by :func:`sijax.selective.search.search_host`): the
        same pieces (breakpoints within the tie tolerance) for about one forward
        pass each, on batches of points; one image at a time (also in
        :func:`dal_test_batch`). With "exhaustive"
        its two end pieces stop at the ends of the range instead of running on to
        their breakpoints (which changes the p-value by the N(0, 1) mass beyond
        ``margin`` + |z_obs|, below 1e-23 of it).
      confidence: level 1 - a of the selective confidence interval of the tested
        contrast (:attr:`TestResult.confidence_interval`), e.g. 0.95; None
        (default): none is computed. The interval inverts the truncated normal over
        Zset (:mod:`sijax.selective.confidence`); it is exact when the search
        covered every z that matters for its ends ("over_conditioning", or
        ``exact_interval``: ``TestResult.confidence_exact``); otherwise the widest
        interval any Zset consistent with the search gives is reported.
      exact_interval: with ``confidence`` and the "parametric" search (default
        True): after the p-value's stopping rule, search on until the unsearched
        part can move neither end of the interval by more than 1e-3
        (1 + |end - z_obs|) sd (docs/method.md §5), so that the interval is exact.
        False: stop at the p-value's rule (cheaper; a conservative interval).
      components: also test each connected component of the detected mask on its
        own (:attr:`TestResult.components`, docs/method.md §5): its own contrast
        (the hypothesis applied to the component alone), its own line, and the
        whole mask as the selection event, so each p-value is exact; the
        component p-values are adjusted within the image. :func:`dal_test` only.
      connectivity: 8 (default: pixels touching at a corner are connected) or 4
        (edges only) for ``components``.
      adjustment: "holm" (default; family-wise error over the components) or "bh"
        (Benjamini-Hochberg; false discovery rate) for ``components``.
      devices: with the "propagate" engine, how many of the backend's devices share
        the search of one line (1, the default: the default device; 0: all of
        them): every stretch of the line is cut into one segment per device,
        enumerated at the same time and joined, giving the same pieces as one
        device (:func:`sijax.tracking.enumerate_line`). The "walk" engine shares
        batches instead (:func:`dal_test_batch`) and accepts only 1.
      processes: with the "propagate" engine on a CPU, how many worker processes
        share the search of one line (1, the default: this process alone): every
        window is cut into one segment per process, each enumerated on its own
        single-threaded CPU device, and joined, giving the same pieces as one
        process (:mod:`sijax.detect.line_workers`). Unlike ``devices`` (threads
        of this process, which wait for each other's host work), the processes
        run in parallel throughout; they are spawned at the first test (each loads
        the model and compiles its programs) and kept for the next ones.
    """

    t_start: int = 460
    steps: tuple[int, ...] = (460, 345, 230, 115, 0)
    eta: float = 1.0
    filter_size: int = 3
    threshold: float = 0.8
    hypothesis: str = "reference"
    radius: int = 1
    alternative: str = "abs"
    search: str = "parametric"
    termination: str = "precision"
    precision: float = 1e-3
    alpha: float = 0.05
    max_pieces: int = 20_000
    margin: float = 10.0
    memo: bool = True
    engine: Engine = Engine.AUTO
    confidence: float | None = None
    exact_interval: bool = True
    components: bool = False
    connectivity: int = 8
    adjustment: str = "holm"
    devices: int = 1
    processes: int = 1

    def __post_init__(self):
        if self.confidence is not None:
            object.__setattr__(self, "confidence", check_level(self.confidence))
        if self.connectivity not in (4, 8):
            raise InputError(f"connectivity={self.connectivity} must be 4 or 8")
        check_adjustment(self.adjustment)
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if not self.steps or self.steps[0] != self.t_start:
            raise InputError(
                f"steps[0] must equal t_start: steps={self.steps}, "
                f"t_start={self.t_start}"
            )
        if self.hypothesis not in HYPOTHESES[:3]:
            raise InputError(
                f"hypothesis={self.hypothesis!r} must be one of {HYPOTHESES[:3]}"
            )
        if self.engine not in ENGINES:
            raise InputError(f"engine={self.engine!r} must be one of {ENGINES}")
        object.__setattr__(self, "engine", Engine(self.engine))
        if not isinstance(self.devices, int) or self.devices < 0:
            raise InputError(f"devices={self.devices!r} must be an integer >= 0")
        if not isinstance(self.processes, int) or self.processes < 1:
            raise InputError(f"processes={self.processes!r} must be an integer >= 1")
        if self.processes != 1 and self.devices != 1:
            raise InputError(
                f"devices={self.devices} and processes={self.processes}: share a"
                " line's search over devices (threads) or over processes, not both"
            )
        if self.processes != 1 and self.engine is Engine.WALK:
            raise InputError(
                f"processes={self.processes} shares one line's search over worker"
                " processes, which only the 'propagate' engine does; set"
                " engine='propagate'"
            )
        if self.devices != 1 and self.engine is Engine.WALK:
            raise InputError(
                f"devices={self.devices} shares one line's search over devices, which"
                " only the 'propagate' engine does; set engine='propagate' (the walk"
                " engine shares a batch of images: dal_test_batch)"
            )
        if self.search not in POLICIES:
            raise InputError(f"search={self.search!r} must be one of {POLICIES}")
        if self.termination not in TERMINATIONS:
            raise InputError(
                f"termination={self.termination!r} must be one of {TERMINATIONS}"
            )
        check_alternative(self.alternative)
        if self.filter_size < 1 or self.filter_size % 2 == 0:
            raise InputError(
                f"filter_size={self.filter_size} must be a positive odd integer"
            )
        if not 0.0 < self.alpha < 1.0 or not self.precision > 0.0:
            raise InputError(
                "need 0 < alpha < 1 and precision > 0, got "
                f"alpha={self.alpha}, precision={self.precision}"
            )
        if self.max_pieces < 1:
            raise InputError(f"max_pieces={self.max_pieces} must be >= 1")
        if not 0.0 <= self.threshold < math.inf:
            raise InputError(
                f"threshold={self.threshold} must be a finite number >= 0: the score"
                " sum_c |filter(D(X) - X)_c| is never negative, so a negative"
                " threshold would put every pixel in the region"
            )


def draw_noises(key: jax.Array, model_or_shape, config: DALConfig = DALConfig()):
    """All sampler noises of one test, drawn once from ``key``.

    Args:
      key: a PRNG key, used once.
      model_or_shape: a model (a detector with noises of its own, e.g. a
        DiffusionModel trained with ``--detector anoddpm``, draws those) or an
        image shape (H, W, C) (the DAL sampler's noises).
      config: gives the number of DDIM steps of the DAL sampler.

    Returns:
      The DAL sampler's Noises(eps0 (H, W, C), eps (S, H, W, C)), or the pytree of
      the model's detector, in the default float dtype.
    """
    if hasattr(model_or_shape, "image_shape"):
        own = getattr(model_or_shape, "draw_noises", None)
        if own is not None:
            return own(key, config)
        model_or_shape = model_or_shape.image_shape
    return _draw_noises(key, tuple(model_or_shape), len(config.steps))


def detector(model, noises: Noises, config: DALConfig, threshold=None):
    """The detection function of one test (docs/method.md §6), for fixed noises.

    Args:
      model: any :class:`sijax.detect.models.Reconstructor`; its ``score_fn``, if
        it has one (not None), replaces the paper's score map.
      noises: from :func:`draw_noises` (no batch axis).
      config: gives the steps, eta, the filter size and the threshold.
      threshold: overrides ``config.threshold``; may be traced.

    Returns:
      A pure function x (H, W, C) -> (reconstruction (H, W, C), score (H, W),
      mask (H, W) bool), piecewise linear in x: :func:`sijax.track` follows it.
    """
    threshold = config.threshold if threshold is None else threshold
    score_fn = getattr(model, "score_fn", None)

    def detect(x):
        rec = model.reconstruction(x, noises, steps=config.steps, eta=config.eta)
        if score_fn is None:
            score = score_map(x, rec, filter_size=config.filter_size)
        else:
            score = score_fn(x, rec)
            if score.shape != x.shape[:2]:
                raise InputError(
                    f"{type(model).__name__}.score_fn gave a score map of shape "
                    f"{score.shape}; the image is {x.shape[:2]} (H, W)"
                )
        return rec, score, region(score, threshold)

    return detect


def _real_pixels(name: str, x) -> jax.Array:
    """``x`` as float64, refusing what a cast would silently change: complex
    values (the imaginary part dropped), booleans (a mask passed for an image)."""
    try:
        x = jnp.asarray(x)
    except TypeError as e:
        raise InputError(f"{name} must be an array of real numbers: {e}") from None
    real = jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype,
                                                                  jnp.floating)
    if not real or x.dtype == jnp.bool_:
        raise InputError(f"{name} must hold real numbers; got dtype={x.dtype}")
    return x.astype(jnp.float64)


def _check_image(name: str, x, shape) -> jax.Array:
    x = _real_pixels(name, x)
    if x.ndim == 2 and len(shape) == 3 and shape[2] == 1:
        x = x[:, :, None]
    if x.shape != tuple(shape):
        raise InputError(
            f"{name}.shape={x.shape} does not match the model's image shape "
            f"{tuple(shape)}"
        )
    if not bool(jnp.all(jnp.isfinite(x))):
        raise InputError(f"{name} holds NaN or Inf pixels")
    return x


def detect_region(model, x, noises: Noises, config: DALConfig = DALConfig()):
    """Score map and detected region of one image (docs/method.md §6).

    Args:
      model: a :class:`sijax.checkpoint.DiffusionModel` (float64 on the test path).
      x: (H, W, C) image (or (H, W) for one channel).
      noises: from :func:`draw_noises`.
      config: detection options.

    Returns:
      (score_map (H, W) float64, mask (H, W) bool).
    """
    _check_model(model, test=False)
    x = _check_image("x", x, model.image_shape)
    _check_noises(noises, model, config)
    static, nums = split_config(config)
    _, score, mask = _detect_jit(model, x, noises, nums, static)
    return score, mask


class Numbers(NamedTuple):
    """The float options of a :class:`DALConfig` as float64 () arrays, passed
    traced so that changing them does not recompile (:func:`split_config`)."""

    threshold: jax.Array
    precision: jax.Array
    alpha: jax.Array
    margin: jax.Array
    confidence: jax.Array  # the level (0.95 when none is asked for)


def split_config(config: DALConfig) -> tuple[DALConfig, Numbers]:
    """(structural config with the float options zeroed, the float options).

    The structural config is the static (hashable) argument of the compiled
    stages, the :class:`Numbers` their traced one: tests that differ only in
    threshold, precision, alpha, margin or confidence level share one compiled
    program. Whether the search goes on for the interval's ends is static
    (``exact_interval``, True only when a level is set).
    """
    values = dataclasses.asdict(config)
    if config.confidence is None:
        values["confidence"] = 0.95
    nums = Numbers(*(jnp.asarray(values[f], jnp.float64) for f in Numbers._fields))
    # The interval itself, the components' labels and adjustment are host-side.
    static = dataclasses.replace(
        config, threshold=0.0, precision=1.0, alpha=0.5, margin=0.0, confidence=None,
        exact_interval=config.exact_interval and config.confidence is not None,
        components=False, connectivity=8, adjustment="holm",
    )  # fmt: skip
    return static, nums


@functools.partial(jax.jit, static_argnames=("config",))
def _detect_jit(model, x, noises, nums, config):
    return detector(model, noises, config, nums.threshold)(x)


class _Core(NamedTuple):
    """Device-side result of one test (a leading axis under vmap)."""

    reconstruction: jax.Array  # (H, W, C)
    score_map: jax.Array  # (H, W)
    mask: jax.Array  # (H, W) bool
    stat_status: jax.Array  # () int32, StatStatus
    z_obs: jax.Array  # ()
    stat: jax.Array  # () raw eta^T x~
    sd: jax.Array  # () sqrt(eta^T Sigma~ eta)
    naive_p: jax.Array  # ()
    search: Any  # SearchResult


def _mask_fn(params, config):
    """x -> detected mask, for the oracle's fixed model, noises and threshold."""
    model, noises, _, _, _, threshold = params
    detect = detector(model, noises, config, threshold)
    return lambda x: detect(x)[2]


def _piece_oracle(params, z, direction, memo=None, *, config):
    """Piece of the detection pipeline at z and whether its mask is the observed one.

    With a ``memo`` (``config.memo``), the step memo of :func:`track_memo` goes in and
    out as well.
    """
    _, _, a, b, mask_obs, _ = params
    mask_fn = _mask_fn(params, config)
    if memo is None:
        piece = track(mask_fn)(a, b, z, direction)
        return piece.lo, piece.hi, jnp.all(piece.out == mask_obs)
    piece, memo = track_memo(mask_fn)(a, b, z, direction, memo)
    return piece.lo, piece.hi, jnp.all(piece.out == mask_obs), memo


def _oracle_memo(params, config):
    """The empty step memo of the oracle's line, or None without ``config.memo``."""
    if not config.memo:
        return None
    return memo_init(_mask_fn(params, config), params[2], params[3])


def detect_and_line(model, x, x_ref, noises, cov, cov_ref, nums, config):
    """Detection, then the statistic and line of the detected region (docs/method.md
    §3-4).

    Pure and traceable: the inputs are those :func:`prepare_inputs` returns, with the
    config split by :func:`split_config` (``nums``, ``config``); the permutation test
    and the compiled stages here share it.

    Returns:
      (reconstruction, score map, mask, :class:`LineStatistic`).
    """
    rec, score, mask = detector(model, noises, config, nums.threshold)(x)
    line = line_statistic(
        x,
        x_ref,
        mask,
        sigma=cov,
        sigma_ref=cov_ref,
        hypothesis=config.hypothesis,
        radius=config.radius,
    )
    # A NaN score is below every threshold: without this the region would just be
    # empty and the image skipped as if nothing were anomalous.
    bad = ~jnp.all(jnp.isfinite(score)) & (line.status != StatStatus.NONFINITE)
    line = line._replace(
        status=jnp.where(bad, StatStatus.NONFINITE_MODEL, line.status).astype(
            line.status.dtype
        ),
        z_obs=jnp.where(bad, jnp.nan, line.z_obs),
    )
    return rec, score, mask, line


def _core(
    model,
    x,
    x_ref,
    noises,
    cov,
    cov_ref,
    nums: Numbers,
    config: DALConfig,
    report_every: int = 0,
) -> _Core:
    rec, score, mask, line = detect_and_line(
        model, x, x_ref, noises, cov, cov_ref, nums, config
    )
    res = _search_line(model, noises, line, mask, nums, config, report_every)
    return _with_search(rec, score, mask, line, res, config)


def _search_line(model, noises, line, mask, nums, config, report_every=0):
    """The search for Zset = {z : M(a + b z) = ``mask``} along ``line``."""
    ok = line.status == StatStatus.OK
    params = (model, noises, line.a, line.b, mask, nums.threshold)
    return search(
        functools.partial(_piece_oracle, config=config),
        params,
        jnp.where(ok, line.z_obs, jnp.nan),
        memo=_oracle_memo(params, config),
        report_every=report_every,
        **_search_options(config, nums),
    )


def _component_line(x, x_ref, cov, cov_ref, part, config):
    """The statistic and line of one component's own contrast (docs/method.md §5)."""
    return line_statistic(
        x, x_ref, part, sigma=cov, sigma_ref=cov_ref,
        hypothesis=config.hypothesis, radius=config.radius,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("config",))
def _component_jit(model, x, x_ref, noises, cov, cov_ref, nums, part, mask, config):
    """One component's test ("walk"): its line, and the search for the *whole*
    observed mask along it. Compiled once for every component of every image of a
    shape (the component is an input)."""
    line = _component_line(x, x_ref, cov, cov_ref, part, config)
    return line, _search_line(model, noises, line, mask, nums, config)


_component_line_jit = jax.jit(_component_line, static_argnames=("config",))


def _search_options(config: DALConfig, nums: Numbers) -> dict:
    """The options of both searches (compiled and host-driven)."""
    return dict(
        policy=config.search,
        termination=config.termination,
        alternative=config.alternative,
        precision=nums.precision,
        alpha=nums.alpha,
        max_pieces=config.max_pieces,
        margin=nums.margin,
        level=nums.confidence if config.exact_interval else None,
    )


def _with_search(rec, score, mask, line, res, config: DALConfig) -> _Core:
    z = jnp.where(line.status == StatStatus.OK, line.z_obs, 0.0)
    return _Core(
        rec,
        score,
        mask,
        line.status,
        line.z_obs,
        line.stat,
        line.sd,
        naive_p_value(z, config.alternative),
        res,
    )


_core_jit = jax.jit(_core, static_argnames=("config", "report_every"))


@functools.cache
def _line_mask(steps: tuple[int, ...], eta: float, filter_size: int):
    """params -> x -> mask as one function per detector setting, so that the
    propagation engine traces and compiles it once (its cache is per function)."""
    config = DALConfig(t_start=steps[0], steps=steps, eta=eta, filter_size=filter_size)

    def mask(params, x):
        model, noises, threshold = params
        return detector(model, noises, config, threshold)(x)[2]

    return mask


_front_jit = jax.jit(detect_and_line, static_argnames=("config",))


def _core_host(model, x, x_ref, noises, cov, cov_ref, nums, config, progress=None):
    """_core with the "propagate" engine: detection compiled, the search on the host."""
    rec, score, mask, line = _front_jit(
        model, x, x_ref, noises, cov, cov_ref, nums, config
    )
    res = _search_line_host(model, noises, line, mask, nums, config, progress)
    return _with_search(rec, score, mask, line, res, config)


# Most points of one window of the propagate engine (LineCache's max_points).
LINE_MAX_POINTS = 1024


def _search_line_host(model, noises, line, mask, nums, config, progress=None):
    """_search_line with the "propagate" engine: the search driven from the host."""
    ok = int(line.status) == StatStatus.OK
    z = float(line.z_obs) if ok else math.nan
    r = math.inf
    if config.search == "exhaustive" and ok:
        r = float(nums.margin) + abs(z)
    detector_key = (config.steps, config.eta, config.filter_size)
    segments = None
    if config.processes > 1:
        from sijax.detect.line_workers import line_workers

        segments = line_workers(model, config.processes).segments(
            detector_key, noises, nums.threshold, line.a, line.b, mask,
            max_points=LINE_MAX_POINTS, tie_tol=DEFAULT_TIE_TOL,
        )  # fmt: skip
    cache = LineCache(
        _line_mask(*detector_key),
        line.a,
        line.b,
        params=(model, noises, nums.threshold),
        summary=lambda m: jnp.all(m == mask),
        z_range=(-r, r),
        max_points=LINE_MAX_POINTS,
        devices=line_devices(config.devices),
        segments=segments,
    )

    def source(zq, direction):
        lo, hi, accept = cache.piece(zq, direction)
        return lo, hi, bool(accept)

    return search_host(
        source,
        z,
        progress=progress,
        report_every=REPORT_EVERY,
        **_search_options(config, nums),
    )


# Pixels from which "auto" propagates: per piece, propagation took 10.8 against
# 21.5 ms walking at 16x16 and 40.5 against 70.2 ms at 32x32 on one core
# (benchmarks/README.md, "Breakpoint propagation"); at 8x8 the two are about even
# and walking compiles in less time.
AUTO_PROPAGATE_PIXELS = 256


def resolve_engine(config: DALConfig, model, image_shape, *, lockstep: bool = False):
    """``config`` with ``engine="auto"`` replaced by the engine to use.

    "propagate" when the line is shared over devices or processes
    (``devices != 1``, ``processes != 1``), or on a
    CPU for a model serving the DAL detector on images of at least
    AUTO_PROPAGATE_PIXELS pixels; "walk" otherwise: small images, the other
    detectors (measured with the walking tracker only), accelerators (not
    measured), and batches that walk in lockstep lanes or per device
    (``lockstep``).
    """
    if config.engine is not Engine.AUTO:
        return config
    detector_name = getattr(getattr(model, "config", None), "detector", "dal")
    cpu = jax.default_backend() == "cpu"
    big = math.prod(tuple(image_shape)[:2]) >= AUTO_PROPAGATE_PIXELS
    fast = config.devices != 1 or config.processes != 1 or (
        detector_name == "dal" and big and cpu and not lockstep
    )
    return dataclasses.replace(
        config, engine=Engine.PROPAGATE if fast else Engine.WALK
    )


def line_devices(n: int):
    """The devices that share one line's search (:attr:`DALConfig.devices`): None
    for one (the default device), else the first n of the backend's (0: all)."""
    if n == 1:
        return None
    devices = jax.local_devices()
    if n > len(devices):
        raise InputError(
            f"devices={n}, but the {devices[0].platform} backend has {len(devices)};"
            " on a CPU, `sijax test --devices N` (or jax.config.update("
            "'jax_num_cpu_devices', N) before JAX starts) makes N"
        )
    return devices[: n or len(devices)]


# Pieces between two progress reports of dal_test(progress=...): a host callback
# costs far less than one piece (tens of ms at 16x16).
REPORT_EVERY = 10


@functools.partial(jax.jit, static_argnames=("config", "lanes", "report_every"))
def _core_batch(model, xs, x_refs, noises, cov, cov_ref, nums, config, lanes=None,
                report_every=0):  # fmt: skip
    """_core over a batch: ``lanes`` images advance together (vmap), the rest in turn.

    The batch (B, ...) is viewed as (lanes, B // lanes, ...): the lanes are vmapped
    (and stay sharded when B is sharded over devices in contiguous blocks), and each
    lane runs its images one after another with ``lax.map``. A vmapped search runs in
    lockstep until its slowest lane is done, so lanes = B costs B x the most pieces
    of any image, lanes = 1 the sum of the pieces. Only a single lane reports
    progress (``report_every``).
    """
    b = xs.shape[0]
    lanes = b if lanes is None else lanes

    def lane(xs_l, refs_l, nz_l, cfg, every=0):
        return jax.lax.map(
            lambda args: _core(model, *args, cov, cov_ref, nums, cfg, every),
            (xs_l, refs_l, nz_l),
        )

    if lanes == 1:
        # No vmap over a single lane, so that the step memo's lax.cond (skip the
        # sampler steps that still hold) stays a branch.
        out = jax.tree.map(
            lambda a: a[None], lane(xs, x_refs, noises, config, report_every)
        )
    else:
        # Lockstep lanes: a batched predicate turns the memo's branch into a select
        # that computes both sides (and JAX's batching of it broadcasts the weights,
        # which some convolutions do not support), so the memo is off; for the same
        # reason a progress report would be sent at every piece, so there is none.
        split = functools.partial(
            jax.tree.map, lambda a: a.reshape(lanes, b // lanes, *a.shape[1:])
        )
        cfg = dataclasses.replace(config, memo=False)
        out = jax.vmap(functools.partial(lane, cfg=cfg))(
            split(xs), split(x_refs), split(noises)
        )
    return jax.tree.map(lambda a: a.reshape(b, *a.shape[2:]), out)


def _batch_mesh(xs):
    """(mesh, axis name) when the batch axis of ``xs`` is split over several devices."""
    sharding = getattr(xs, "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    axis = sharding.spec[0]
    if not isinstance(axis, str) or sharding.mesh.shape[axis] == 1:
        return None
    return sharding.mesh, axis


@functools.partial(
    jax.jit, static_argnames=("config", "lanes", "mesh", "axis", "report_every")
)
def _core_sharded(model, xs, x_refs, noises, cov, cov_ref, nums, config, lanes, mesh,
                  axis, report_every=0):  # fmt: skip
    """_core_batch on each device's block of the batch, the devices independent.

    Under `shard_map` every device runs its own search loop (``lanes`` lanes of its
    block), so a device does not wait for a slower image on another one, as it would
    if the devices' lanes were one vmapped lockstep loop.
    """
    batch, rep = PartitionSpec(axis), PartitionSpec()

    def local(model, xs, x_refs, noises, cov, cov_ref, nums):
        return _core_batch(
            model, xs, x_refs, noises, cov, cov_ref, nums, config, lanes=lanes,
            report_every=report_every,
        )  # fmt: skip

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rep, batch, batch, batch, rep, rep, rep),
        out_specs=batch,
        check_vma=False,
    )(model, xs, x_refs, noises, cov, cov_ref, nums)


def default_lanes(batch: int, devices: int = 1) -> int:
    """Images advanced in lockstep by :func:`dal_test_batch` when not given.

    On a GPU/TPU all of them (parallel hardware); on a CPU one per device that the
    batch is split over (``devices``; the rest run in turn, so no image waits for a
    slower one in its lane). A batch that is not split runs in one lane even where
    there are several CPU devices.
    """
    if jax.default_backend() in ("gpu", "tpu"):
        return batch
    return math.gcd(batch, devices)


class TestResult(NamedTuple):
    """Outcome of the DAL test for one image (host-side values).

    Attributes:
      stat: standardised statistic z_obs (NaN without a region).
      p_value: selective p-value (of the searched part when the search stopped early).
      inf_p, sup_p: bounds on the exact selective p-value given the unsearched part.
      naive_p_value: the biased z-test p-value, same alternative.
      alternative: which p-value ("abs": P(|Z| >= |z_obs| | Z in Zset), docs/method.md
      §5).
      truncated_intervals: Zset found, list of (lo, hi) in z units.
      searched_intervals: the searched part of the line, list of (lo, hi).
      search_count: pieces evaluated.
      mask: (H, W) bool detected region.
      score_map: (H, W) float64.
      reconstruction: (H, W, C) float64 D(X).
      status: :class:`sijax.status.Status` OK, NO_REGION or MAX_PIECES (a str
        enum: equal to "ok", "no region", "max_pieces"; see also ``message``).
      message: a sentence explaining a status other than "ok".
      raw_stat, sd: eta^T x~ and sqrt(eta^T Sigma~ eta).
      alpha, precision: the config's level and search precision, which say how to
        read the p-value (:meth:`p_text`).
      confidence: the level of ``confidence_interval`` (None: not computed).
      confidence_interval: (lo, hi), the selective confidence interval of the
        tested contrast eta^T E[x~] (the mean difference, in image units: the
        z-unit interval of :mod:`sijax.selective.confidence` times ``sd``); the
        widest interval any Zset consistent with the search gives (valid, possibly
        conservative when the search stopped early). None: not asked for or no
        region.
      confidence_exact: whether its ends are exact (within 1e-3 relative): the
        search covered every z that matters for them (``DALConfig.exact_interval``
        searches until they are).
      confidence_inner: (lo', hi'): the exact ends lie in [lo, lo'] and [hi', hi].
      components: with ``DALConfig.components``, a :class:`ComponentResult` per
        connected component of ``mask`` (empty without a region); None otherwise.
    """

    stat: float
    p_value: float
    inf_p: float
    sup_p: float
    naive_p_value: float
    alternative: str
    truncated_intervals: list
    searched_intervals: list
    search_count: int
    mask: np.ndarray
    score_map: np.ndarray
    reconstruction: np.ndarray
    status: Status
    message: str
    raw_stat: float
    sd: float
    alpha: float = math.nan
    precision: float = math.nan
    confidence: float | None = None
    confidence_interval: tuple[float, float] | None = None
    confidence_exact: bool | None = None
    confidence_inner: tuple[float, float] | None = None
    components: list | None = None

    @property
    def p_exact(self) -> bool:
        """Whether ``p_value`` is known to the precision: sup_p - inf_p < precision
        (always, for a search that left nothing unknown)."""
        if not math.isfinite(self.p_value):
            return False
        width = self.sup_p - self.inf_p
        return width <= 0.0 or width < self.precision

    @property
    def decided(self) -> bool | None:
        """True when p < alpha is certain (sup_p < alpha), False when p >= alpha is
        (inf_p >= alpha), None when the bounds straddle alpha or there is no p."""
        if not math.isfinite(self.p_value) or math.isnan(self.alpha):
            return None
        if self.sup_p < self.alpha:
            return True
        if self.inf_p >= self.alpha:
            return False
        return None

    def p_text(self) -> str:
        """The selective p-value as it is known, for printing (docs/method.md §5).

        A point value only when the search pinned it down to the precision; else
        its side of alpha when the search decided it ("p < 0.05 (decided, ...)"),
        or the bounds ("p in [a, b]"): never a point inside wider bounds as if it
        were the p-value.
        """
        if not math.isfinite(self.p_value):
            return "p n/a (no region)"
        bounds = f"p in [{_fmt_p(self.inf_p)}, {_fmt_p(self.sup_p)}]"
        if self.p_exact:
            return f"p = {_fmt_p(self.p_value)}"
        decided = self.decided
        if decided is None:
            return bounds + " (the search stopped before deciding)"
        side = "<" if decided else ">="
        return f"p {side} {self.alpha:g} (decided; {bounds})"

    def confidence_text(self) -> str | None:
        """The confidence interval for printing (None when not computed)."""
        if self.confidence is None or self.confidence_interval is None:
            return None
        lo, hi = self.confidence_interval
        text = f"{self.confidence:.0%} CI [{lo:.4g}, {hi:.4g}]"
        if not self.confidence_exact:
            lo_in, hi_in = self.confidence_inner
            text += (
                f" (conservative: the search stopped early; the exact ends lie in "
                f"[{lo:.4g}, {lo_in:.4g}] and [{hi_in:.4g}, {hi:.4g}])"
            )
        return text

    def to_json(self) -> dict:
        """Every scalar and interval field as plain JSON values (arrays left out),
        with the p-value and the interval as they should be read (``p_text``,
        ``decided``, ``confidence_text``)."""
        out = {}
        for k, v in self._asdict().items():
            if isinstance(v, np.ndarray):
                continue
            out[k] = str(v) if isinstance(v, Status) else v
        if self.components is not None:
            out["components"] = [c.to_json() for c in self.components]
        out["region_size"] = int(self.mask.sum())
        out["p_text"] = self.p_text()
        out["p_exact"] = self.p_exact
        out["decided"] = self.decided
        out["confidence_text"] = self.confidence_text()
        return out


def _fmt_p(p: float) -> str:
    return f"{p:.4g}" if p >= 1e-3 or p == 0.0 else f"{p:.3e}"


class BatchResult(NamedTuple):
    """Device arrays of :func:`dal_test_batch` (leading axis: images).

    ``status`` holds :attr:`sijax.status.Status.code` integers (OK 0, NO_REGION 1,
    MAX_PIECES 2, ERROR 3: see ``search_status`` and ``stat_status``);
    :meth:`Status.from_code` names them.

    With ``DALConfig.confidence`` set, ``confidence_interval`` (B, 2) and
    ``confidence_exact`` (B,) are host arrays as in :class:`TestResult` (image
    units; NaN and False without a region); otherwise None.
    """

    stat: jax.Array  # (B,)
    p_value: jax.Array  # (B,)
    inf_p: jax.Array  # (B,)
    sup_p: jax.Array  # (B,)
    naive_p_value: jax.Array  # (B,)
    search_count: jax.Array  # (B,) int32
    truncated: Any  # Intervals with (B, K, 2) bounds
    mask: jax.Array  # (B, H, W)
    status: jax.Array  # (B,) int32 Status.code
    stat_status: jax.Array  # (B,) int32
    search_status: jax.Array  # (B,) int32
    confidence_interval: Any = None  # (B, 2) float64 numpy, or None
    confidence_exact: Any = None  # (B,) bool numpy, or None
    sd: Any = None  # (B,) sqrt(eta^T Sigma~ eta): image units = z units x sd


def error_message(stat_status, search_status) -> str:
    """Why a test ended with :attr:`Status.ERROR`, from its two status codes."""
    if int(stat_status) != StatStatus.OK:
        return StatStatus.MESSAGES[int(stat_status)]
    return "search failed: " + SearchStatus.MESSAGES[int(search_status)]


def _status_code(core: _Core) -> jax.Array:
    no_region = (core.stat_status == StatStatus.EMPTY_REGION) | (
        core.stat_status == StatStatus.EMPTY_COMPARISON
    )
    s = core.search.status
    error = Status.ERROR.code
    return jnp.where(
        no_region,
        Status.NO_REGION.code,
        jnp.where(
            core.stat_status != StatStatus.OK,
            error,
            jnp.where(
                s == SearchStatus.OK,
                Status.OK.code,
                jnp.where(s == SearchStatus.MAX_PIECES, Status.MAX_PIECES.code, error),
            ),
        ),
    ).astype(jnp.int32)


def _check_model(model, test: bool = True) -> None:
    """A model with a region (and, for a ``test``, a piecewise-linear one)."""
    if not (hasattr(model, "reconstruction") and hasattr(model, "image_shape")):
        raise InputError(
            f"a {type(model).__name__} is not a model: the DAL test needs "
            "image_shape and reconstruction(x, noises, *, steps, eta) (a "
            "DiffusionModel from sijax.load_model, or a sijax.ReconstructionModel)"
        )
    check = getattr(model, "check_region", None)
    if check is not None:
        check(test)
    # A DiffusionModel loaded with dtype=float32 failed deep inside a convolution
    # ("requires arguments to have the same dtypes").
    state = getattr(model, "state", None)
    dtypes = {a.dtype for a in jax.tree.leaves(state)
              if jnp.issubdtype(a.dtype, jnp.floating)}
    want = jnp.result_type(float)
    if dtypes - {want}:
        raise InputError(
            f"the model's weights are {sorted(str(d) for d in dtypes)} but the "
            f"images are {want}: load it with sijax.load_model(path) (float64, the "
            "test path) or convert it with model.astype(jnp.float64)")


def _check_images(name: str, xs, shape) -> jax.Array:
    """A batch (B, H, W, C) of finite images of the model's shape, float64."""
    xs = _real_pixels(name, xs)
    if xs.ndim != 4 or xs.shape[1:] != tuple(shape):
        raise InputError(f"{name}.shape={xs.shape} must be (B, *{tuple(shape)})")
    if not bool(jnp.all(jnp.isfinite(xs))):
        raise InputError(f"{name} holds NaN or Inf pixels")
    return xs


def prepare_inputs(
    model, x, x_ref, sigma, sigma_ref, config, *, noises, batched: bool = False
):
    """The inputs of a DAL test, checked once at the public entry.

    :func:`dal_test` (one image) and :func:`dal_test_batch` (``batched``) call it;
    the compiled stages behind them check nothing again. Finiteness is checked
    here because :func:`sijax.selective.statistics.line_statistic` can only check
    concrete arrays, and under jit its inputs are traced.

    Args:
      model: a :class:`sijax.detect.models.Reconstructor`.
      x: (H, W, C) image (or (H, W) for one channel); (B, H, W, C) if ``batched``.
      x_ref: the reference, shaped like ``x``, or None (zeros: only the
        "background" and "neighbour" hypotheses do without one).
      sigma, sigma_ref: covariances of X and X_ref (``sigma_ref`` None: ``sigma``).
      config: :class:`DALConfig`.
      noises: the sampler noises, checked against the image shape and the steps
        (with a leading batch axis if ``batched``); None: not checked.
      batched: ``x`` and ``x_ref`` carry a leading batch axis.

    Returns:
      (x, x_ref, cov, cov_ref): float64 images and
      :class:`sijax.selective.statistics.Covariance` objects.

    Raises:
      InputError: not a DALConfig or a model, a wrong shape, NaN/Inf pixels, a
        missing reference, noises of the wrong shape, an invalid covariance.
    """
    if not isinstance(config, DALConfig):
        raise InputError(f"config must be a DALConfig, got {type(config).__name__}")
    _check_model(model)
    shape = tuple(model.image_shape)
    names = ("xs", "x_refs") if batched else ("x", "x_ref")
    check = _check_images if batched else _check_image
    x = check(names[0], x, shape)
    if x_ref is None:
        if config.hypothesis == "reference":
            raise InputError(
                f"the reference test needs {names[1]} (or choose "
                "hypothesis='background' or 'neighbour')"
            )
        x_ref = jnp.zeros_like(x)
    else:
        x_ref = check(names[1], x_ref, shape)
        if x_ref.shape != x.shape:
            raise InputError(
                f"{names[1]}.shape={x_ref.shape} must equal {names[0]}.shape={x.shape}"
            )
    _check_noises(noises, model, config, batched)
    cov = as_covariance(sigma, shape)
    cov_ref = as_covariance(sigma if sigma_ref is None else sigma_ref, shape)
    return x, x_ref, cov, cov_ref


def _check_noises(noises, model, config, batched: bool = False):
    """The noises have the structure and (trailing) shapes ``draw_noises`` gives."""
    if noises is None:
        raise InputError("noises=None: a test needs its sampler noises; draw them "
                         "with sijax.draw_noises(key, model, config)")
    want = jax.eval_shape(lambda k: draw_noises(k, model, config), jax.random.key(0))
    lead = 1 if batched else 0
    try:
        got = jax.tree.map(lambda w, a: tuple(np.shape(a)[lead:]), want, noises)
    except (ValueError, TypeError):
        got = None
    shapes = jax.tree.map(lambda w: tuple(w.shape), want)
    if got is None or jax.tree.leaves(got) != jax.tree.leaves(shapes):
        have = jax.tree.map(lambda a: tuple(np.shape(a)[lead:]), noises)
        raise InputError(f"noises have shapes {_shapes_text(have)}, expected "
                         f"{_shapes_text(shapes)} (draw them with "
                         "sijax.draw_noises(key, model, config))")
    # Else reported as a non-finite score map, blamed on the weights.
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(noises)):
        raise InputError("noises hold NaN or Inf values (draw them with "
                         "sijax.draw_noises(key, model, config))")


def _shapes_text(tree) -> str:
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, tuple))
    return str(tuple(leaves)) if len(leaves) > 1 else str(leaves[0])


def dal_test(
    model,
    x,
    x_ref=None,
    *,
    sigma,
    noises: Noises,
    sigma_ref=None,
    config: DALConfig = DALConfig(),
    throw: bool = False,
    progress: Progress | None = None,
) -> TestResult:
    """Selective p-value of the region the diffusion model detects in ``x``.

    Args:
      model: :class:`sijax.checkpoint.DiffusionModel` (float64 on the test path) or
        any :class:`sijax.detect.models.Reconstructor`, e.g. a
        :class:`sijax.detect.models.ReconstructionModel`.
      x: (H, W, C) test image (or (H, W)).
      x_ref: reference image of the same shape (needed for the reference test).
      sigma: covariance of X: a variance, per-pixel variances, an (n, n) matrix,
        "iid", "corr" or a :class:`sijax.selective.statistics.Covariance`.
      noises: sampler noises from :func:`draw_noises` (fixed along the line).
      sigma_ref: covariance of X_ref (default: ``sigma``).
      config: :class:`DALConfig`.
      throw: raise :class:`sijax.errors.SearchError` instead of returning a
        "max_pieces" status.
      progress: optional ``fn(pieces, lo, hi, inf_p, sup_p)``, called every
        ``REPORT_EVERY`` pieces and at the end of the search with the searched range
        [lo, hi] and the current p-value bounds (a progress bar, a log). The
        result does not depend on it.

    Returns:
      :class:`TestResult`. An empty region gives status "no region", not an error.

    Raises:
      InputError: bad shapes, NaN/Inf, an invalid or singular covariance.
      SearchError: the search failed (its oracle stalled, the piece at z_obs did
        not reproduce the region), or hit ``max_pieces`` with ``throw``.
      NotPiecewiseLinearError: the model is not piecewise linear.
    """
    x, x_ref, cov, cov_ref = prepare_inputs(
        model, x, x_ref, sigma, sigma_ref, config, noises=noises
    )
    config = resolve_engine(config, model, x.shape)
    static, nums = split_config(config)
    if config.engine is Engine.PROPAGATE:
        core = jax.device_get(
            _core_host(model, x, x_ref, noises, cov, cov_ref, nums, static, progress)
        )
    else:
        core = _walk(model, x, x_ref, noises, cov, cov_ref, nums, static, progress)
    status = Status.from_code(_status_code(core))
    res = core.search
    if status is Status.ERROR:
        # the statistic's failures are the input's (NaN, a singular covariance);
        # the rest are the search's
        bad_input = int(core.stat_status) != StatStatus.OK
        error = InputError if bad_input else SearchError
        raise error(error_message(core.stat_status, res.status))
    message = {
        Status.OK: "",
        Status.NO_REGION: StatStatus.MESSAGES[int(core.stat_status)],
        Status.MAX_PIECES: SearchStatus.MESSAGES[SearchStatus.MAX_PIECES],
    }[status]
    if status is Status.MAX_PIECES and throw:
        raise SearchError(message)
    has = status is not Status.NO_REGION
    nan = float("nan")
    return TestResult(
        stat=float(core.z_obs) if has else nan,
        p_value=float(res.p_value) if has else nan,
        inf_p=float(res.inf_p) if has else nan,
        sup_p=float(res.sup_p) if has else nan,
        naive_p_value=float(core.naive_p) if has else nan,
        alternative=config.alternative,
        truncated_intervals=to_list(res.truncated) if has else [],
        searched_intervals=to_list(res.searched) if has else [],
        search_count=int(res.search_count) if has else 0,
        mask=np.asarray(core.mask),
        score_map=np.asarray(core.score_map),
        reconstruction=np.asarray(core.reconstruction),
        status=status,
        message=message,
        raw_stat=float(core.stat) if has else nan,
        sd=float(core.sd) if has else nan,
        alpha=config.alpha,
        precision=config.precision,
        **_confidence_fields(core, config, has),
        components=(
            None if not config.components
            else _components(model, x, x_ref, noises, cov, cov_ref, nums, static,
                             config, core) if has else []
        ),  # fmt: skip
    )


def label_components(mask, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a region mask (host-side).

    Args:
      mask: (H, W) bool.
      connectivity: 8 (pixels that share an edge or a corner are connected) or 4
        (an edge only).

    Returns:
      (labels (H, W) int32: 0 outside the mask, 1..n on the components, numbered in
      row-major order of their first pixel; n).
    """
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise InputError(f"{connectivity=} must be 4 or 8")
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise InputError(f"mask must be (H, W), got {mask.shape=}")
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, n = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32), int(n)


class ComponentResult(NamedTuple):
    """The selective test of one connected component of the detected mask
    (:attr:`TestResult.components`, docs/method.md §5); host-side values.

    Its contrast is the hypothesis applied to the component alone (reference:
    mean over the component of X - X_ref); its line is that contrast's, and Zset
    is {z : the detected mask of X(z) equals the whole observed mask}.

    Attributes:
      label: 1..n, row-major order of the components' first pixels.
      mask: (H, W) bool, the component.
      size: its pixels.
      stat, raw_stat, sd: z, eta^T x~ and sqrt(eta^T Sigma~ eta) of its contrast.
      p_value, inf_p, sup_p: its selective p-value and bounds (as in TestResult).
      naive_p_value: the z-test that ignores the selection.
      adjusted_p: p_value adjusted within the image by ``adjustment``.
      adjustment: "holm" or "bh" (``DALConfig.adjustment``).
      truncated_intervals, searched_intervals, search_count: its search.
      status: :class:`Status` of its test (OK or MAX_PIECES).
      confidence_interval, confidence_exact, confidence_inner: its selective
        confidence interval (image units) when ``DALConfig.confidence`` is set.
    """

    label: int
    mask: np.ndarray
    size: int
    stat: float
    raw_stat: float
    sd: float
    p_value: float
    inf_p: float
    sup_p: float
    naive_p_value: float
    adjusted_p: float
    adjustment: str
    truncated_intervals: list
    searched_intervals: list
    search_count: int
    status: Status
    confidence_interval: tuple[float, float] | None = None
    confidence_exact: bool | None = None
    confidence_inner: tuple[float, float] | None = None

    def centroid(self) -> tuple[float, float]:
        """(row, column) of the component's centre of mass."""
        rows, cols = np.nonzero(self.mask)
        return float(rows.mean()), float(cols.mean())

    def to_json(self) -> dict:
        """The scalar fields, the bounding box [r0, c0, r1, c1] (inclusive) and the
        centroid as plain JSON values (the mask left out)."""
        out = {k: v for k, v in self._asdict().items() if k != "mask"}
        out["status"] = str(self.status)
        rows, cols = np.nonzero(self.mask)
        out["bbox"] = [int(rows.min()), int(cols.min()), int(rows.max()),
                       int(cols.max())]  # fmt: skip
        out["centroid"] = list(self.centroid())
        return out


def _components(model, x, x_ref, noises, cov, cov_ref, nums, static, config, core):
    """The test of each connected component of the observed mask (host loop over
    the components; one compiled search serves them all), adjusted within the
    image."""
    mask = np.asarray(core.mask)
    labels, n = label_components(mask, config.connectivity)
    mask_obs = jnp.asarray(mask)
    out = []
    for k in range(1, n + 1):
        part = labels == k
        if config.engine is Engine.PROPAGATE:
            line = _component_line_jit(x, x_ref, cov, cov_ref, jnp.asarray(part),
                                       static)  # fmt: skip
            res = _search_line_host(model, noises, line, mask_obs, nums, static)
        else:
            line, res = _component_jit(model, x, x_ref, noises, cov, cov_ref, nums,
                                       jnp.asarray(part), mask_obs, static)  # fmt: skip
        one = jax.device_get(
            _with_search(core.reconstruction, core.score_map, mask, line, res, config)
        )
        status = Status.from_code(_status_code(one))
        if status is Status.ERROR:
            bad_input = int(one.stat_status) != StatStatus.OK
            error = InputError if bad_input else SearchError
            raise error(f"component {k}: " + error_message(one.stat_status,
                                                            one.search.status))
        r = one.search
        ci = _confidence_fields(one, config, True)
        ci.pop("confidence")
        out.append(ComponentResult(
            label=k, mask=part, size=int(part.sum()), stat=float(one.z_obs),
            raw_stat=float(one.stat), sd=float(one.sd), p_value=float(r.p_value),
            inf_p=float(r.inf_p), sup_p=float(r.sup_p),
            naive_p_value=float(one.naive_p), adjusted_p=math.nan,
            adjustment=config.adjustment,
            truncated_intervals=to_list(r.truncated),
            searched_intervals=to_list(r.searched),
            search_count=int(r.search_count), status=status, **ci,
        ))  # fmt: skip
    adjusted = adjust_p_values([c.p_value for c in out], config.adjustment)
    return [c._replace(adjusted_p=float(a)) for c, a in zip(out, adjusted, strict=True)]


def _confidence_fields(core: _Core, config: DALConfig, has: bool) -> dict:
    """The confidence interval of one host-side core in image units (raw = z sd),
    as TestResult fields."""
    if config.confidence is None or not has:
        return dict(confidence=config.confidence)
    res = core.search
    # Over-conditioning defines Zset as the piece at z_obs: nothing is unknown.
    searched = None if config.search == "over_conditioning" else to_list(res.searched)
    ci = confidence_interval_list(
        float(core.z_obs), to_list(res.truncated), searched, config.confidence
    )
    sd = float(core.sd)
    return dict(
        confidence=config.confidence,
        confidence_interval=(ci.lo * sd, ci.hi * sd),
        confidence_exact=ci.exact,
        confidence_inner=(ci.lo_inner * sd, ci.hi_inner * sd),
    )


def _walk(model, x, x_ref, noises, cov, cov_ref, nums, static, progress):
    """The host copy of _core_jit's result ("walk" engine), reporting progress."""
    with reporting(progress) if progress else contextlib.nullcontext():
        core = jax.device_get(
            _core_jit(
                model,
                x,
                x_ref,
                noises,
                cov,
                cov_ref,
                nums,
                static,
                report_every=REPORT_EVERY if progress else 0,
            )
        )
        if progress:
            jax.effects_barrier()  # every report has arrived
    return core


def dal_test_batch(
    model,
    xs,
    x_refs=None,
    *,
    sigma,
    noises: Noises,
    sigma_ref=None,
    config: DALConfig = DALConfig(),
    lanes: int | None = None,
    progress: Progress | None = None,
) -> BatchResult:
    """:func:`dal_test` over a batch of images in one compiled call.

    Args:
      xs: (B, H, W, C) test images; x_refs: (B, H, W, C) references.
      noises: Noises with a leading batch axis (``jax.vmap(draw_noises)`` over keys).
      sigma, sigma_ref, config: as :func:`dal_test` (shared by all images).
      lanes: images searched in lockstep (vmapped); must divide B. Default
        :func:`default_lanes`: B on a GPU/TPU, one per device the batch is split
        over on a CPU. The results do not depend on it (up to the last bits of
        XLA's matrix products). When
        ``xs`` is split over several devices along its batch axis (a
        ``NamedSharding``), each device runs its own block with lanes / devices
        lanes, independently of the others (``shard_map``).
      config: with ``engine="propagate"`` the images are tested one after another
        on the default device (``lanes`` and the sharding of ``xs`` are ignored).
      progress: optional ``fn(pieces, lo, hi, inf_p, sup_p)`` as in :func:`dal_test`,
        called by every image's search (the images' reports interleave and do not
        say which image; ``sijax.selective.search.new_pieces(pieces,
        REPORT_EVERY)`` turns a report into the pieces it adds). Only with one lane
        per device (the CPU default): lockstep lanes send no reports. The call then
        waits for the results.

    Returns:
      :class:`BatchResult` of device arrays.
    """
    if config.components:
        raise InputError(
            "components=True is computed by dal_test (one image) only; test the "
            "images one by one"
        )
    xs, x_refs, cov, cov_ref = prepare_inputs(
        model, xs, x_refs, sigma, sigma_ref, config, noises=noises, batched=True
    )
    mesh = _batch_mesh(xs)
    config = resolve_engine(
        config, model, xs.shape[1:], lockstep=lanes is not None or mesh is not None
    )
    static, nums = split_config(config)
    b = xs.shape[0]
    if config.engine is Engine.PROPAGATE:
        core = _cores_host(
            model, xs, x_refs, noises, cov, cov_ref, nums, static, progress
        )
        return _batch_result(core, config)
    n_dev = 1 if mesh is None else mesh[0].shape[mesh[1]]
    lanes = default_lanes(b, n_dev) if lanes is None else int(lanes)
    if lanes < 1 or b % lanes:
        raise InputError(f"{lanes=} must be a positive divisor of the batch size {b}")
    if lanes % n_dev:
        raise InputError(f"{lanes=} must be a multiple of the {n_dev} devices")
    per_device = lanes // n_dev
    # Lockstep lanes cannot report (see _core_batch): their program stays the same.
    every = REPORT_EVERY if progress and per_device == 1 else 0
    with reporting(progress) if progress else contextlib.nullcontext():
        if mesh is None:
            core = _core_batch(
                model, xs, x_refs, noises, cov, cov_ref, nums, static, lanes=lanes,
                report_every=every,
            )  # fmt: skip
        else:
            core = _core_sharded(
                model, xs, x_refs, noises, cov, cov_ref, nums, static, per_device,
                *mesh, report_every=every,
            )  # fmt: skip
        if progress:
            jax.block_until_ready(core)
            jax.effects_barrier()  # every report has arrived
    return _batch_result(core, config)


def compile_batch(
    model,
    xs,
    x_refs=None,
    *,
    sigma,
    noises: Noises,
    sigma_ref=None,
    config: DALConfig = DALConfig(),
    lanes: int | None = None,
) -> jax.stages.Compiled:
    """The compiled program of :func:`dal_test_batch` ("walk" engine, one device),
    for its memory and cost analyses; arguments as :func:`dal_test_batch`.

    ``lanes`` None: all images in lockstep (the GPU default).
    """
    xs, x_refs, cov, cov_ref = prepare_inputs(
        model, xs, x_refs, sigma, sigma_ref, config, noises=noises, batched=True
    )
    static, nums = split_config(config)
    return _core_batch.lower(
        model, xs, x_refs, noises, cov, cov_ref, nums, static, lanes=lanes
    ).compile()


def observed_line(
    model,
    x,
    x_ref=None,
    *,
    sigma,
    noises: Noises,
    sigma_ref=None,
    config: DALConfig = DALConfig(),
):
    """The detection and the line of one test, without the search (docs/method.md §3-4).

    Arguments as :func:`dal_test`.

    Returns:
      (reconstruction (H, W, C), score map (H, W), mask (H, W) bool,
      :class:`sijax.selective.statistics.LineStatistic` with the line a + b z, z_obs
      and the statistic's status), device arrays.
    """
    x, x_ref, cov, cov_ref = prepare_inputs(
        model, x, x_ref, sigma, sigma_ref, config, noises=noises
    )
    static, nums = split_config(config)
    return _front_jit(model, x, x_ref, noises, cov, cov_ref, nums, static)


def _cores_host(model, xs, x_refs, noises, cov, cov_ref, nums, config, progress):
    """_core_host for each image in turn (on the default device), stacked."""
    xs, x_refs, noises = jax.device_get((xs, x_refs, noises))
    cores = [
        _core_host(
            model, xs[i], x_refs[i], jax.tree.map(lambda a, i=i: a[i], noises),
            cov, cov_ref, nums, config, progress,
        )  # fmt: skip
        for i in range(xs.shape[0])
    ]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *cores)


def _batch_confidence(core: _Core, config: DALConfig) -> dict:
    """confidence_interval / confidence_exact of a batch, on the host."""
    if config.confidence is None:
        return {}
    host = jax.device_get(
        (core.z_obs, core.sd, core.search.truncated, core.search.searched,
         jax.vmap(_status_code)(core))
    )  # fmt: skip
    z, sd, truncated, searched, status = host
    b = z.shape[0]
    ci = np.full((b, 2), np.nan)
    exact = np.zeros((b,), bool)
    for i in range(b):
        if not Status.from_code(status[i]).valid:
            continue
        one = jax.tree.map(lambda a, i=i: a[i], (truncated, searched))
        wide = None if config.search == "over_conditioning" else to_list(one[1])
        res = confidence_interval_list(
            float(z[i]), to_list(one[0]), wide, config.confidence
        )
        ci[i] = res.lo * sd[i], res.hi * sd[i]
        exact[i] = res.exact
    return dict(confidence_interval=ci, confidence_exact=exact)


def _batch_result(core: _Core, config: DALConfig) -> BatchResult:
    return BatchResult(
        stat=core.z_obs,
        p_value=core.search.p_value,
        inf_p=core.search.inf_p,
        sup_p=core.search.sup_p,
        naive_p_value=core.naive_p,
        search_count=core.search.search_count,
        truncated=core.search.truncated,
        mask=core.mask,
        status=jax.vmap(_status_code)(core),
        stat_status=core.stat_status,
        search_status=core.search.status,
        sd=core.sd,
        **_batch_confidence(core, config),
    )
