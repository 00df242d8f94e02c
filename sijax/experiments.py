"""The paper's experiments (spec section 7) as pure functions of explicit settings.

An experiment is a grid of :class:`Setting` cells (size, covariance, signal, noise
family, activation, search). One *trial* is one image pair tested by every requested
method; it is a function of ``(setting, index)`` only (:func:`trial_data`), so any
trial can be reproduced on its own, whatever the batch it ran in. Trials run in batches
of images sharded over all JAX devices (:func:`device_mesh`, :func:`run_batch`), their
records are appended to ``trials.jsonl`` as they finish (a killed run loses nothing and
``resume=True`` continues), and :func:`summarize` turns them into rejection rates with
99% Clopper-Pearson intervals, written as ``summary.json``, ``summary.md`` and PNG plots
by :func:`run_experiment`.

Methods (spec section 5): ``selective`` (the DAL test: parametric search, or exhaustive
for the ``pieces`` experiment), ``oc`` (over-conditioning), ``naive`` (z-test on the
same region), ``bonferroni`` (naive p-value times 2^n) and ``permutation`` (pooled
test/reference pixels, :func:`sijax.detect.permutation.permutation_test`). Rejection
means p < alpha; with termination "decision" the selective test rejects when its upper
bound sup_p < alpha (the search stops once the side of alpha is known).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import math
import os
import pickle
import platform
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from sijax import compile_cache
from sijax.detect.dal import (
    ENGINES,
    REPORT_EVERY,
    DALConfig,
    dal_test_batch,
    error_message,
)
from sijax.diffusion.sampler import Noises
from sijax.errors import InputError, ensure_output_dir
from sijax.selective.search import new_pieces

__all__ = [
    "EXPERIMENTS",
    "METHODS",
    "NOISE_FAMILIES",
    "ExperimentSpec",
    "Setting",
    "SummaryRecord",
    "clopper_pearson",
    "default_spec",
    "device_mesh",
    "noise_parameter",
    "run_batch",
    "run_experiment",
    "sample_noise",
    "summarize",
    "trial_data",
    "wasserstein1_to_normal",
    "with_activation",
]

EXPERIMENTS = ("fpr", "power", "pieces", "robustness", "pwl")
METHODS = ("selective", "oc", "naive", "bonferroni", "permutation")
NOISE_FAMILIES = ("skewnorm", "exponnorm", "gennorm_lo", "gennorm_hi", "t")
CONFIDENCE = 0.99
TRIALS_FILE = "trials.jsonl"
LOCK_FILE = ".lock"

# Status codes of BatchResult.status (sijax.detect.dal).
_OK, _NO_REGION, _MAX_PIECES, _ERROR = 0, 1, 2, 3


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One cell of an experiment grid.

    Attributes:
      size: image side d (n = d * d pixels).
      covariance: "iid" (Sigma = I) or "corr" (Sigma_ij = 0.5^|i-j|); both the test
        image and the reference get it, and the test assumes it.
      delta: signal added to one floor(d/3) square of the test image (0: the null).
      noise: "gaussian" or a :data:`NOISE_FAMILIES` entry (standardised innovations).
      distance: Wasserstein-1 distance of the noise family to N(0, 1).
      activation: U-Net activation ("relu", "pwl_silu", "pwl_gelu").
      checkpoint: model directory or committed name.
      search: "parametric" or "exhaustive" (search of the selective method).
      termination: "decision" or "precision" (for "parametric").
      alpha: level.
      max_pieces: cap on the pieces of one search.
      seed: base seed of the data.
      hypothesis: what the region's mean is compared with (``DALConfig.hypothesis``):
        "reference" (v5, the default), "background" (the v1 in-image test, of the
        paper's v1-era figures) or "neighbour". The images do not depend on it.
    """

    size: int
    covariance: str = "iid"
    delta: float = 0.0
    noise: str = "gaussian"
    distance: float = 0.0
    activation: str = "relu"
    checkpoint: str = ""
    search: str = "parametric"
    termination: str = "decision"
    alpha: float = 0.05
    max_pieces: int = 20_000
    seed: int = 0
    hypothesis: str = "reference"

    @property
    def key(self) -> str:
        """Identifies the trials of this setting in ``trials.jsonl``.

        The default hypothesis is left out, so that the keys of runs made before
        the field existed (the committed results) still name their trials.
        """
        fields = dataclasses.asdict(self)
        if self.hypothesis == "reference":
            del fields["hypothesis"]
        return json.dumps(fields, sort_keys=True)

    @property
    def data_seed(self) -> int:
        """Seed of the images: depends on what the images are, not on how they are
        tested, so methods, searches and activations see the same images."""
        fields = (
            self.seed,
            self.size,
            self.covariance,
            self.delta,
            self.noise,
            self.distance,
        )
        return zlib.crc32(repr(fields).encode())

    def label(self) -> str:
        parts = [f"d={self.size}", self.covariance]
        if self.delta:
            parts.append(f"delta={self.delta:g}")
        if self.noise != "gaussian":
            parts.append(f"{self.noise} W1={self.distance:g}")
        if self.activation != "relu":
            parts.append(self.activation)
        if self.hypothesis != "reference":
            parts.append(self.hypothesis)
        return " ".join(parts)

    @property
    def selective_p_exact(self) -> bool:
        """Whether the selective p-values are exact (to the search precision), not
        only on the right side of alpha as with a "decision" search."""
        return self.search == "exhaustive" or self.termination == "precision"

    def dal_config(self, method: str) -> DALConfig:
        """The DAL test options behind ``method`` ("selective" or "oc")."""
        if method == "oc":
            return DALConfig(
                search="over_conditioning", alpha=self.alpha, hypothesis=self.hypothesis
            )
        return DALConfig(
            search=self.search,
            termination=self.termination,
            alpha=self.alpha,
            max_pieces=self.max_pieces,
            hypothesis=self.hypothesis,
        )


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """A whole experiment: the grid, the methods and the number of valid trials.

    Attributes:
      experiment: one of :data:`EXPERIMENTS`.
      sizes, covariances, deltas, noises, distances, activations: grid axes.
      methods: subset of :data:`METHODS`.
      trials: valid trials (non-empty regions) wanted per setting.
      checkpoints: model per size ({size: dir}); sizes without one use the
        committed ``dal_v5_{size}``.
      termination, alpha, max_pieces, seed, hypothesis: see :class:`Setting`.
      engine: ``DALConfig.engine`` of the searches ("walk": the batch in one
        compiled call, sharded over the devices; "propagate": the images one after
        another on the default device). Same pieces and results.
      batch: images per compiled call (rounded up to a multiple of the devices).
      permutations: B of the permutation method.
      max_factor: stop a setting after ``max_factor * trials`` attempts.
    """

    experiment: str
    sizes: tuple[int, ...] = (8, 16)
    covariances: tuple[str, ...] = ("iid", "corr")
    methods: tuple[str, ...] = ("selective", "oc", "naive", "bonferroni")
    trials: int = 1000
    deltas: tuple[float, ...] = (0.0,)
    noises: tuple[str, ...] = ("gaussian",)
    distances: tuple[float, ...] = (0.0,)
    activations: tuple[str, ...] = ("relu",)
    checkpoints: tuple[tuple[int, str], ...] = ()
    termination: str = "decision"
    alpha: float = 0.05
    max_pieces: int = 20_000
    seed: int = 0
    hypothesis: str = "reference"
    engine: str = "walk"
    batch: int = 8
    permutations: int = 1000
    max_factor: int = 20

    def __post_init__(self):
        for name in (
            "sizes",
            "covariances",
            "methods",
            "deltas",
            "noises",
            "distances",
            "activations",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.checkpoints, dict):
            object.__setattr__(
                self, "checkpoints", tuple(sorted(self.checkpoints.items()))
            )
        if self.experiment not in EXPERIMENTS:
            raise InputError(f"{self.experiment=} must be one of {EXPERIMENTS}")
        bad = sorted(set(self.methods) - set(METHODS))
        if bad or not self.methods:
            raise InputError(f"unknown methods {bad}; valid: {METHODS}")
        bad = sorted(set(self.covariances) - {"iid", "corr"})
        if bad or not self.covariances:
            raise InputError(f"unknown covariances {bad}; use iid and/or corr")
        bad = sorted(set(self.noises) - {"gaussian", *NOISE_FAMILIES})
        if bad:
            raise InputError(f"unknown noises {bad}; valid: {NOISE_FAMILIES}")
        if self.trials < 1 or self.batch < 1 or self.permutations < 1:
            raise InputError(f"need trials, batch, permutations >= 1: {self}")
        if not 0.0 < self.alpha < 1.0:
            raise InputError(f"need 0 < alpha < 1, got {self.alpha}")
        if self.engine not in ENGINES:
            raise InputError(f"engine={self.engine!r} must be one of {ENGINES}")
        if any(s < 1 for s in self.sizes) or not self.sizes:
            raise InputError(f"bad sizes {self.sizes}")
        DALConfig(hypothesis=self.hypothesis)  # InputError for an unknown one
        if self.hypothesis != "reference" and "permutation" in self.methods:
            raise InputError(
                "the permutation baseline pools test and reference pixels: it needs "
                f"hypothesis 'reference', got {self.hypothesis!r}"
            )

    def checkpoint(self, size: int) -> str:
        return dict(self.checkpoints).get(size, f"dal_v5_{size}")

    def settings(self) -> list[Setting]:
        """The grid, in a fixed order."""
        search = "exhaustive" if self.experiment == "pieces" else "parametric"
        out = []
        for size in self.sizes:
            for act in self.activations:
                for cov in self.covariances:
                    for noise in self.noises:
                        dists = (0.0,) if noise == "gaussian" else self.distances
                        for dist in dists:
                            for delta in self.deltas:
                                out.append(
                                    Setting(
                                        size=size,
                                        covariance=cov,
                                        delta=float(delta),
                                        noise=noise,
                                        distance=float(dist),
                                        activation=act,
                                        checkpoint=self.checkpoint(size),
                                        search=search,
                                        termination=self.termination,
                                        alpha=self.alpha,
                                        max_pieces=self.max_pieces,
                                        seed=self.seed,
                                        hypothesis=self.hypothesis,
                                    )
                                )
        return out


def default_spec(experiment: str, **overrides) -> ExperimentSpec:
    """The paper's settings for ``experiment`` (spec section 7), with overrides.

    Sizes default to 8 and 16; every size uses the committed ``dal_v5_{size}``
    (8, 16 and 32 are committed) unless ``checkpoints`` names another; 64 needs one.
    Defaults: fpr iid+corr, 1000 trials; power d=16, delta 1..4; pieces d=8, 16, 100
    trials, exhaustive; robustness d=16 iid, five families at
    W1 = 0.01..0.04; pwl d=8 with pwl_silu and pwl_gelu.
    """
    base = {
        "fpr": dict(),
        "power": dict(sizes=(16,), covariances=("iid",), deltas=(1.0, 2.0, 3.0, 4.0)),
        "pieces": dict(
            covariances=("iid",), methods=("selective", "naive"), trials=100
        ),
        "robustness": dict(
            sizes=(16,),
            covariances=("iid",),
            methods=("selective", "naive"),
            noises=NOISE_FAMILIES,
            distances=(0.01, 0.02, 0.03, 0.04),
        ),
        "pwl": dict(sizes=(8,), activations=("pwl_silu", "pwl_gelu")),
    }
    if experiment not in base:
        raise InputError(f"{experiment=} must be one of {EXPERIMENTS}")
    kw = {**base[experiment], **{k: v for k, v in overrides.items() if v is not None}}
    return ExperimentSpec(experiment=experiment, **kw)


# ------------------------------------------------------------------ non-Gaussian noise


_FAMILY = {
    # name: (scipy name, parameter bracket, how the parameter moves away from normal)
    "skewnorm": ("skewnorm", (0.0, 30.0)),
    "exponnorm": ("exponnorm", (1e-3, 10.0)),
    "gennorm_lo": ("gennorm", (2.0, 0.6)),  # beta < 2: heavier tails than normal
    "gennorm_hi": ("gennorm", (2.0, 20.0)),  # beta > 2: lighter tails
    "t": ("t", (1e4, 2.2)),
}


def _standardised(family: str, param: float):
    """scipy frozen distribution of ``family`` shifted and scaled to mean 0, var 1."""
    from scipy import stats

    dist = getattr(stats, _FAMILY[family][0])(param)
    mean, var = (float(v) for v in dist.stats(moments="mv"))
    sd = math.sqrt(var)
    return getattr(stats, _FAMILY[family][0])(param, loc=-mean / sd, scale=1.0 / sd)


def wasserstein1_to_normal(dist, *, quadrature: bool = False) -> float:
    """W1(dist, N(0, 1)) = integral |F(x) - Phi(x)| dx.

    Args:
      dist: a frozen scipy distribution (with a vectorised ``cdf``).
      quadrature: adaptive quadrature (slow, the reference) instead of the trapezoid
        rule on 40001 sinh-spaced points covering [-1e4, 1e4] (dense near 0).
    """
    from scipy import integrate, stats

    if quadrature:

        def gap(x):
            return abs(float(dist.cdf(x)) - float(stats.norm.cdf(x)))

        total = 0.0
        for lo, hi in ((-np.inf, -4.0), (-4.0, 0.0), (0.0, 4.0), (4.0, np.inf)):
            total += integrate.quad(gap, lo, hi, limit=400, epsabs=1e-10)[0]
        return total
    x = np.sinh(np.linspace(-np.arcsinh(1e4), np.arcsinh(1e4), 40001))
    return float(integrate.trapezoid(np.abs(_cdf(dist, x) - stats.norm.cdf(x)), x))


def _cdf(dist, x: np.ndarray) -> np.ndarray:
    """dist.cdf(x); the skew-normal through Owen's T (scipy's generic cdf is slow):
    F(y) = Phi(y) - 2 T(y, a) for the standard skew-normal with shape a."""
    from scipy import special

    if dist.dist.name == "skewnorm":
        (a,) = dist.args
        y = (x - dist.kwds["loc"]) / dist.kwds["scale"]
        return special.ndtr(y) - 2.0 * special.owens_t(y, a)
    return dist.cdf(x)


@functools.cache
def noise_parameter(family: str, distance: float) -> float:
    """Shape parameter of ``family`` whose standardised law is at W1 ``distance``
    from N(0, 1) (v5 Appendix I), by root finding on :func:`wasserstein1_to_normal`.

    Raises:
      InputError: unknown family, or a distance the family cannot reach.
    """
    from scipy import optimize

    if family not in _FAMILY:
        raise InputError(f"{family=} must be one of {NOISE_FAMILIES}")
    near, far = _FAMILY[family][1]

    def excess(p):
        return wasserstein1_to_normal(_standardised(family, p)) - distance

    lo, hi = excess(near), excess(far)
    if not lo < 0.0 < hi:
        raise InputError(
            f"{family} reaches W1 in [{lo + distance:.4f}, {hi + distance:.4f}] on "
            f"its parameter range; {distance=} is outside"
        )
    return float(optimize.brentq(excess, near, far, xtol=1e-10, rtol=1e-10))


def sample_noise(
    rng: np.random.Generator,
    shape,
    *,
    covariance: str = "iid",
    noise: str = "gaussian",
    distance: float = 0.0,
) -> np.ndarray:
    """Noise eps of one image: mean 0, covariance I ("iid") or 0.5^|i-j| ("corr").

    Innovations are N(0, 1) or the standardised ``noise`` family at W1 ``distance``;
    "corr" runs them through the AR(1) recursion e_i = 0.5 e_{i-1} + sqrt(0.75) u_i
    (e_0 = u_0) over the row-major flattened pixels, which gives Sigma_ij = 0.5^|i-j|
    exactly for any unit-variance innovations.

    Returns:
      float64 array of ``shape``.
    """
    n = int(np.prod(shape))
    if noise == "gaussian":
        u = rng.standard_normal(n)
    else:
        u = _standardised(noise, noise_parameter(noise, distance)).rvs(
            size=n, random_state=rng
        )
    if covariance == "corr":
        e = np.empty(n)
        e[0] = u[0]
        c = math.sqrt(0.75)
        for i in range(1, n):
            e[i] = 0.5 * e[i - 1] + c * u[i]
        u = e
    elif covariance != "iid":
        raise InputError(f"{covariance=} must be 'iid' or 'corr'")
    return np.asarray(u, np.float64).reshape(shape)


class TrialData(NamedTuple):
    """Inputs of one trial (host arrays)."""

    x: np.ndarray  # (H, W, C) test image
    x_ref: np.ndarray  # (H, W, C) reference image
    eps0: np.ndarray  # (H, W, C) sampler noise of the forward jump
    eps: np.ndarray  # (S, H, W, C) sampler noises of the DDIM steps
    key: int  # seed of the trial's permutations


def trial_data(
    setting: Setting,
    index: int,
    channels: int = 1,
    num_steps: int = len(DALConfig().steps),
) -> TrialData:
    """The images and sampler noises of trial ``index`` of ``setting``.

    A pure function of its arguments (numpy PCG64 seeded with
    ``(setting.data_seed, index)``): the test image is noise plus ``delta`` on one
    floor(d/3) square at a uniformly random position (spec section 7), the reference
    is independent noise of the same law.
    """
    rng = np.random.default_rng([setting.data_seed, index])
    shape = (setting.size, setting.size, channels)
    kw = dict(
        covariance=setting.covariance, noise=setting.noise, distance=setting.distance
    )
    x = sample_noise(rng, shape, **kw)
    x_ref = sample_noise(rng, shape, **kw)
    side = max(1, setting.size // 3)
    r0, c0 = rng.integers(0, setting.size - side + 1, size=2)
    x[r0 : r0 + side, c0 : c0 + side] += setting.delta
    eps0 = rng.standard_normal(shape)
    eps = rng.standard_normal((num_steps, *shape))
    return TrialData(x, x_ref, eps0, eps, int(rng.integers(0, 2**31 - 1)))


# ------------------------------------------------------------------------- models


def with_activation(model, activation: str):
    """``model`` with its U-Net's ReLUs replaced by ``activation`` (same weights).

    Used by the ``pwl`` experiment: the committed ReLU weights run through the 8-knot
    piecewise-linear SiLU/GELU (not retrained), for both detection and the test.
    """
    from flax import nnx

    from sijax.diffusion.unet import UNet

    if activation == "relu":
        return model
    cfg = dataclasses.replace(model.unet_config, activation=activation)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))))
    return model.replace(graphdef=graphdef)


def _load_models(settings: Sequence[Setting]) -> dict[tuple[str, str], Any]:
    from sijax.checkpoint import load_model

    loaded, models = {}, {}
    for s in settings:
        if s.checkpoint not in loaded:
            loaded[s.checkpoint] = load_model(s.checkpoint)
        base = loaded[s.checkpoint]
        if base.image_shape[:2] != (s.size, s.size):
            raise InputError(
                f"checkpoint {s.checkpoint} is for {base.image_shape[:2]} images, the "
                f"setting needs size {s.size}; pass --checkpoint for this size"
            )
        models[(s.checkpoint, s.activation)] = with_activation(base, s.activation)
    return models


# ------------------------------------------------------------------------- sharding


def device_mesh(devices=None):
    """A 1-D mesh ("batch",) over ``devices`` (default: all devices of all hosts)."""
    from jax.sharding import Mesh

    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("batch",))


def _shard(mesh, array: np.ndarray):
    """Global array with its leading (batch) axis split over ``mesh``; every process
    builds it from the same host data and places only its addressable shards."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def _gather(tree):
    """Host copies of (possibly multi-host sharded) result arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


# -------------------------------------------------------------------------- trials


def _bonferroni(z: float, n: int) -> float:
    from sijax.selective.pvalues import bonferroni_p_value

    return float(bonferroni_p_value(jnp.asarray(z, jnp.float64), n, "abs"))


def run_batch(
    model,
    setting: Setting,
    indices: Sequence[int],
    methods: Sequence[str],
    *,
    batch: int,
    mesh=None,
    permutations: int = 1000,
    compiled: set | None = None,
    progress: Callable | None = None,
    engine: str = "walk",
) -> list[dict]:
    """Runs trials ``indices`` of ``setting`` with every method; one record each.

    Args:
      model: the model of the setting (activation already applied).
      setting: the grid cell.
      indices: trial indices (at most ``batch``); the batch is padded to ``batch``
        (a multiple of the mesh size) with copies of the last trial, so one program
        serves every call.
      methods: subset of :data:`METHODS`.
      batch: compiled batch size.
      mesh: a :func:`device_mesh` to shard the batch over, or None (one device).
      permutations: B of the permutation method.
      compiled: (config, shape) keys already compiled in this process; updated. A
        record's ``compile`` flag says whether its seconds include compilation.
      progress: reporter of the selective searches (``dal_test_batch``'s).
      engine: ``DALConfig.engine`` of the searches.

    Returns:
      JSON-ready dicts: setting key, index, status (0 ok, 1 no region, 2 max_pieces),
      valid, region size, z, seconds, and per method p, reject (and inf_p, sup_p,
      pieces for "selective").

    Raises:
      InputError: a test ended in error (status 3: a NaN score map, a singular
        variance, a failed search), which is not a skipped trial.
    """
    indices = list(indices)
    if not 0 < len(indices) <= batch:
        raise InputError(f"need 1..{batch} indices, got {len(indices)}")
    compiled = set() if compiled is None else compiled
    shape = tuple(model.image_shape)
    data = [trial_data(setting, i, shape[2]) for i in indices]
    padded = data + [data[-1]] * (batch - len(data))
    arrays = {
        f: np.stack([getattr(d, f) for d in padded])
        for f in ("x", "x_ref", "eps0", "eps")
    }
    if mesh is not None:
        arrays = {k: _shard(mesh, v) for k, v in arrays.items()}
    noises = Noises(eps0=arrays["eps0"], eps=arrays["eps"])
    runs = [m for m in ("selective", "oc") if m in methods]
    if not runs:  # naive/bonferroni/permutation need the region and z: cheapest run
        runs = ["oc"]
    out, seconds, fresh = {}, 0.0, False
    for m in runs:
        cfg = dataclasses.replace(setting.dal_config(m), engine=engine)
        tag = (cfg, setting.covariance, batch, mesh is not None, id(model.graphdef))
        fresh |= tag not in compiled
        compiled.add(tag)
        t0 = time.perf_counter()
        res = dal_test_batch(
            model,
            arrays["x"],
            arrays["x_ref"],
            sigma=setting.covariance,
            noises=noises,
            config=cfg,
            progress=progress if m == "selective" else None,
        )
        out[m] = _gather(res._replace(truncated=None))
        seconds += time.perf_counter() - t0
    first = out[runs[0]]
    n_pix = int(np.prod(shape))
    records = []
    for j, index in enumerate(indices):
        for res in out.values():  # an error is not a skipped trial: it would bias
            if int(res.status[j]) == _ERROR:  # the estimates
                why = error_message(res.stat_status[j], res.search_status[j])
                raise InputError(f"{setting.key}, trial {index}: {why}")
        status = int(first.status[j])
        valid = status in (_OK, _MAX_PIECES)
        z = float(first.stat[j])
        rec = {
            "setting": setting.key,
            "index": int(index),
            "status": status,
            "valid": valid,
            "region_size": int(np.sum(first.mask[j])),
            "z": z if valid else None,
            "seconds": seconds / len(indices),
            "compile": fresh,
            "methods": {},
        }
        if valid:
            alpha = setting.alpha
            if "selective" in out:
                s = out["selective"]
                sup = float(s.sup_p[j])
                rec["status"] = int(s.status[j])
                rec["methods"]["selective"] = {
                    "p": float(s.p_value[j]),
                    "inf_p": float(s.inf_p[j]),
                    "sup_p": sup,
                    "pieces": int(s.search_count[j]),
                    "capped": int(s.status[j]) == _MAX_PIECES,
                    # Only a certain rejection counts (sup_p bounds the exact p).
                    "reject": sup < alpha,
                }
            if "oc" in methods:
                p = float(out["oc"].p_value[j])
                rec["methods"]["oc"] = {"p": p, "reject": p < alpha}
            naive = float(first.naive_p_value[j])
            if "naive" in methods:
                rec["methods"]["naive"] = {"p": naive, "reject": naive < alpha}
            if "bonferroni" in methods:
                p = _bonferroni(z, n_pix)
                rec["methods"]["bonferroni"] = {"p": p, "reject": p < alpha}
            if "permutation" in methods:
                t0 = time.perf_counter()
                rec["methods"]["permutation"] = _permutation(
                    model, setting, data[j], permutations
                )
                rec["seconds"] += time.perf_counter() - t0
        records.append(rec)
    return records


def _permutation(model, setting: Setting, data: TrialData, permutations: int) -> dict:
    from sijax.detect.permutation import permutation_test

    res = permutation_test(
        model,
        data.x,
        data.x_ref,
        sigma=setting.covariance,
        noises=Noises(eps0=jnp.asarray(data.eps0), eps=jnp.asarray(data.eps)),
        key=jax.random.key(data.key),
        num_permutations=permutations,
        config=DALConfig(alpha=setting.alpha),
    )
    p = float(res.p_value)
    return {
        "p": p,
        "num_valid": int(res.num_valid),
        "num_skipped": int(res.num_skipped),
        "reject": bool(np.isfinite(p) and p < setting.alpha),
    }


# ------------------------------------------------------------------------- summary


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE):
    """Exact (Clopper-Pearson) binomial interval for k successes in n trials."""
    from scipy import stats

    if n == 0:
        return float("nan"), float("nan")
    a = (1.0 - confidence) / 2.0
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


@dataclasses.dataclass(frozen=True)
class SummaryRecord:
    """One row of ``summary.json``: a method on one setting.

    ``trials`` counts valid trials (non-empty regions) used, ``skipped`` the empty
    regions among the attempts that led to them; ``rate`` = rejections / trials with
    its 99% Clopper-Pearson interval [ci_lo, ci_hi]; ``seconds`` is the mean wall time
    per trial of the compiled batches (compilation excluded when possible), pieces
    statistics are those of the selective search. ``ks_p`` is the Kolmogorov-Smirnov
    p-value of the method's p-values against U(0, 1) on a null setting (delta 0),
    where they are exact p-values: over-conditioning, naive, and the selective test
    unless its search stopped at a decision (then only its rejections are exact);
    NaN otherwise.
    """

    experiment: str
    method: str
    size: int
    n: int
    covariance: str
    delta: float
    noise: str
    distance: float
    activation: str
    search: str
    termination: str
    alpha: float
    hypothesis: str
    target: int
    trials: int
    skipped: int
    capped: int
    rejections: int
    rate: float
    ci_lo: float
    ci_hi: float
    seconds: float
    pieces_mean: float
    pieces_median: float
    pieces_max: int
    ks_p: float = float("nan")

    def to_json(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }


def latest_records(records: Iterable[dict]) -> dict[str, dict[int, dict]]:
    """{setting key: {index: record}}, the last record of each trial winning."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["setting"], {})[int(r["index"])] = r
    return out


def _used(trials: dict[int, dict], target: int, methods) -> tuple[list, int]:
    """The first ``target`` valid trials by index that have every method, and the
    number of empty regions met before the last of them."""
    used, skipped = [], 0
    for i in sorted(trials):
        r = trials[i]
        if len(used) >= target:
            break
        if not r["valid"]:
            skipped += 1
        elif all(m in r["methods"] for m in methods):
            used.append(r)
    return used, skipped


def summarize(spec: ExperimentSpec, records: Iterable[dict]) -> list[SummaryRecord]:
    """Rates with 99% Clopper-Pearson intervals per (setting, method)."""
    by_key = latest_records(records)
    rows = []
    for s in spec.settings():
        used, skipped = _used(by_key.get(s.key, {}), spec.trials, spec.methods)
        done = [r for r in used if not r["compile"]] or used
        secs = float(np.mean([r["seconds"] for r in done])) if done else float("nan")
        pieces = [
            r["methods"]["selective"]["pieces"]
            for r in used
            if "selective" in r["methods"]
        ]
        capped = sum(
            r["methods"]["selective"]["capped"]
            for r in used
            if "selective" in r["methods"]
        )
        for m in spec.methods:
            res = [r["methods"][m] for r in used]
            if m == "permutation":  # no valid permutation: no p-value
                res = [v for v in res if v["num_valid"] > 0]
            k = sum(bool(v["reject"]) for v in res)
            lo, hi = clopper_pearson(k, len(res))
            exact = m in ("oc", "naive") or (m == "selective" and s.selective_p_exact)
            ks = float("nan")
            if exact and s.delta == 0.0 and len(res) >= 2:
                ks = float(scipy.stats.kstest([v["p"] for v in res], "uniform").pvalue)
            rows.append(
                SummaryRecord(
                    experiment=spec.experiment,
                    method=m,
                    size=s.size,
                    n=s.size * s.size,
                    covariance=s.covariance,
                    delta=s.delta,
                    noise=s.noise,
                    distance=s.distance,
                    activation=s.activation,
                    search=s.search,
                    termination=s.termination,
                    alpha=s.alpha,
                    hypothesis=s.hypothesis,
                    target=spec.trials,
                    trials=len(res),
                    skipped=skipped,
                    capped=capped if m == "selective" else 0,
                    rejections=k,
                    rate=k / len(res) if res else float("nan"),
                    ci_lo=lo,
                    ci_hi=hi,
                    seconds=secs,
                    pieces_mean=float(np.mean(pieces)) if pieces else float("nan"),
                    pieces_median=float(np.median(pieces)) if pieces else float("nan"),
                    pieces_max=int(max(pieces)) if pieces else 0,
                    ks_p=ks,
                )
            )
    return rows


def null_p_values(spec: ExperimentSpec, records: Iterable[dict]) -> dict:
    """{(setting label, method): sorted p-values} of the null (delta 0) settings."""
    by_key = latest_records(records)
    out = {}
    for s in spec.settings():
        if s.delta != 0.0:
            continue
        used, _ = _used(by_key.get(s.key, {}), spec.trials, spec.methods)
        for m in spec.methods:
            if m == "bonferroni":
                continue
            p = [r["methods"][m]["p"] for r in used]
            p = np.sort([v for v in p if v is not None and np.isfinite(v)])
            if len(p):
                out[(s.label(), m)] = p
    return out


# ---------------------------------------------------------------------- files, plots


def read_trials(path: str) -> list[dict]:
    """Records of ``trials.jsonl`` (or a gzipped ``trials.jsonl.gz``, as committed
    results are); a torn last line (a killed writer) is ignored."""
    if not os.path.exists(path):
        return []
    out = []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _append(path: str, records: Sequence[dict]):
    # Start on a fresh line if a killed writer left a torn one.
    torn = os.path.exists(path) and os.path.getsize(path) > 0
    if torn:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        if torn:
            f.write("\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
                timeout=10,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _meta(spec: ExperimentSpec, models) -> dict:
    mods = {}
    for (ckpt, act), m in models.items():
        mods[f"{ckpt} ({act})"] = {
            "preset": m.config.name,
            "size": m.config.size,
            "epochs": m.config.epochs,
            "channels": list(m.config.channels),
            "weights_sha256": m.weights_sha256(),
        }
    return {
        "experiment": spec.experiment,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items()},
        "models": mods,
        "termination_note": (
            f"hypothesis '{spec.hypothesis}'; "
            f"selective test with search '{spec.settings()[0].search}'"
            + (
                f", termination '{spec.termination}'"
                if spec.experiment != "pieces"
                else ""
            )
            + (
                "; 'decision' stops once p is known to be on one side of alpha: "
                "rejections are exact, p-values away from alpha are bounds only"
                if not any(s.selective_p_exact for s in spec.settings())
                else ""
            )
        ),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus; "
        f"jax {jax.__version__} {jax.default_backend()}, "
        f"{jax.device_count()} devices, {jax.process_count()} processes",
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary_markdown(rows: Sequence[SummaryRecord], meta: dict) -> str:
    """The summary table with the facts needed to read it."""
    spec = meta["spec"]
    lines = [
        f"# sijax experiment {meta['experiment']}",
        "",
        "- models: "
        + "; ".join(
            f"{k}: {v['preset']} d={v['size']}, {v['epochs']} epochs"
            for k, v in meta["models"].items()
        ),
        f"- {meta['termination_note']}; alpha {spec['alpha']}; "
        f"99% Clopper-Pearson intervals",
        f"- machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}",
        "",
        "| method | d | cov | delta | noise | act | trials (target) | skipped | "
        "rejections | rate | 99% CI | KS p (null) | s/trial | pieces mean/median/max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        noise = r.noise if r.noise == "gaussian" else f"{r.noise} W1={r.distance:g}"
        pieces = (
            "-"
            if r.method != "selective"
            else f"{_fmt(r.pieces_mean, 1)}/{_fmt(r.pieces_median, 0)}/{r.pieces_max}"
        )
        capped = f" ({r.capped} capped)" if r.capped else ""
        lines.append(
            f"| {r.method} | {r.size} | {r.covariance} | {r.delta:g} | {noise} | "
            f"{r.activation} | {r.trials} ({r.target}) | {r.skipped} | "
            f"{r.rejections}{capped} | {_fmt(r.rate)} | "
            f"[{_fmt(r.ci_lo)}, {_fmt(r.ci_hi)}] | {_fmt(r.ks_p)} | "
            f"{_fmt(r.seconds, 2)} | {pieces} |"
        )
    return "\n".join(lines) + "\n"


def _errorbar(ax, xs, rows, label, marker="o", shift=1.0):
    xs = np.asarray(xs, float) * shift  # methods side by side, not on top
    y = np.array([r.rate for r in rows], float)
    lo = np.array([r.ci_lo for r in rows], float)
    hi = np.array([r.ci_hi for r in rows], float)
    ax.errorbar(xs, y, yerr=[y - lo, hi - y], marker=marker, capsize=3, label=label)


def _panels(n):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols,
        cols,
        figsize=(4.5 * cols, 3.6 * ((n + cols - 1) // cols)),
        squeeze=False,
    )
    return fig, list(axes.ravel())


def write_plots(
    out_dir: str, spec: ExperimentSpec, rows: Sequence[SummaryRecord], null_p: dict
) -> list[str]:
    """PNG plots of the experiment; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in rows if r.trials > 0]
    if not rows:
        return paths
    title = (
        f"{spec.experiment}: termination {spec.termination}"
        if spec.experiment != "pieces"
        else "pieces: exhaustive search"
    )

    def save(fig, name):
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def groups(key):
        out = {}
        for r in rows:
            out.setdefault(key(r), []).append(r)
        return out

    null = [r for r in rows if r.delta == 0.0]
    if spec.experiment in ("fpr", "pwl") and null:
        # Type I error against n, one panel per (activation, covariance).
        panels = groups(lambda r: (r.activation, r.covariance))
        fig, axes = _panels(len(panels))
        for ax, ((act, cov), rs) in zip(axes, panels.items(), strict=False):
            for k, m in enumerate(spec.methods):
                mr = sorted((r for r in rs if r.method == m), key=lambda r: r.n)
                _errorbar(ax, [r.n for r in mr], mr, m, shift=1.04**k)
            ax.axhline(spec.alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_xscale("log", base=2)
            ns = [r.n for r in rs]
            ax.set_xlim(min(ns) / 1.5, max(ns) * 1.5)
            ax.set_xlabel("n (pixels)")
            ax.set_ylabel("type I error")
            ax.set_title(f"{cov}" + ("" if act == "relu" else f", {act}"))
            ax.legend(fontsize=7)
        save(fig, "type1_error.png")
    if spec.experiment in ("power", "pwl") and any(r.delta for r in rows):
        panels = groups(lambda r: (r.size, r.covariance, r.activation))
        fig, axes = _panels(len(panels))
        for ax, ((size, cov, act), rs) in zip(axes, panels.items(), strict=False):
            for k, m in enumerate(spec.methods):
                mr = sorted((r for r in rs if r.method == m), key=lambda r: r.delta)
                _errorbar(ax, [r.delta + 0.04 * k for r in mr], mr, m)
            ax.axhline(spec.alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_xlabel("delta")
            ax.set_ylabel("power")
            ax.set_ylim(0, 1)
            ax.set_title(f"d={size} {cov}" + ("" if act == "relu" else f" {act}"))
            ax.legend(fontsize=7)
        save(fig, "power.png")
    if spec.experiment == "pieces":
        fig, axes = _panels(2)
        for cov, rs in groups(lambda r: r.covariance).items():
            rs = sorted((r for r in rs if r.method == "selective"), key=lambda r: r.n)
            ns = [r.n for r in rs]
            axes[0].plot(ns, [r.pieces_mean for r in rs], "o-", label=f"{cov} mean")
            axes[0].plot(ns, [r.pieces_max for r in rs], "x:", label=f"{cov} max")
            axes[1].plot(ns, [r.seconds for r in rs], "o-", label=cov)
        for ax, lab in zip(
            axes, ("pieces per image", "seconds per image"), strict=True
        ):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n (pixels)")
            ax.set_ylabel(lab)
            ax.legend(fontsize=7)
        save(fig, "pieces.png")
    if spec.experiment == "robustness":
        fams = [f for f in spec.noises if f != "gaussian"]
        fig, axes = _panels(len(spec.methods))
        for ax, m in zip(axes, spec.methods, strict=False):
            for fam in fams:
                rs = sorted(
                    (r for r in rows if r.method == m and r.noise == fam),
                    key=lambda r: r.distance,
                )
                if rs:
                    _errorbar(ax, [r.distance for r in rs], rs, fam)
            ax.axhline(spec.alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_xlabel("Wasserstein-1 distance to N(0, 1)")
            ax.set_ylabel("type I error")
            ax.set_title(m)
            ax.legend(fontsize=7)
        save(fig, "robustness.png")
    if null_p:
        labels = sorted({k[0] for k in null_p})
        fig, axes = _panels(len(labels))
        # A "decision" search stops once p is known to be on one side of alpha: its
        # selective p-values are those of the searched part only, not draws of the
        # null distribution, so a QQ-plot of them would mislead.
        bounds_only = not any(s.selective_p_exact for s in spec.settings())
        for ax, lab in zip(axes, labels, strict=False):
            for (l2, m), p in null_p.items():
                if l2 != lab or (m == "selective" and bounds_only):
                    continue
                q = (np.arange(1, len(p) + 1) - 0.5) / len(p)
                ax.plot(q, p, ".", ms=2, label=f"{m} ({len(p)})")
            if bounds_only and (lab, "selective") in null_p:
                ax.text(
                    0.98,
                    0.02,
                    "selective not shown: termination 'decision' gives exact\n"
                    "rejections, not p-values (use --termination precision)",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=7,
                )
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set_xlabel("Uniform(0, 1) quantile")
            ax.set_ylabel("null p-value")
            ax.set_title(lab)
            ax.legend(fontsize=7, markerscale=4)
        save(fig, "qq_null.png")
    return paths


# ---------------------------------------------------------------------- the driver


def _progress_text(rows: Sequence[SummaryRecord], setting: Setting) -> str:
    here = [
        r
        for r in rows
        if (r.size, r.covariance, r.delta, r.noise, r.distance, r.activation)
        == (
            setting.size,
            setting.covariance,
            setting.delta,
            setting.noise,
            setting.distance,
            setting.activation,
        )
    ]
    rates = " ".join(f"{r.method}={r.rate:.3f}" for r in here if r.trials)
    return f"{setting.label()}: {rates}"


def _write_summary(out_dir, spec, rows, records, models):
    """summary.json, experiment.json, summary.md and the plots."""
    meta = _meta(spec, models)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump([r.to_json() for r in rows], f, indent=1)
    with open(os.path.join(out_dir, "experiment.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(rows, meta))
    write_plots(out_dir, spec, rows, null_p_values(spec, records))


@contextlib.contextmanager
def _exclusive(out_dir: str):
    """Holds ``out_dir/.lock`` so that one run at a time writes an output directory.

    Two runs appending to one trials file would compute the same trial indices twice
    and interleave their records. The lock is an advisory ``flock`` (released by the
    kernel when its process dies, so a killed run leaves no stale lock); the file
    names its holder for the error message. Where ``fcntl`` is missing (Windows) no
    lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    path = os.path.join(out_dir, LOCK_FILE)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(
                f"{out_dir} is being written by another sijax experiment ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the flock


class _SearchPostfix:
    """Shows the pieces searched so far in the running batch on the trial bar.

    A batch of 16x16 images runs for minutes between two updates of the trial count;
    its searches' progress reports (interleaved, see ``dal_test_batch``) are summed
    with ``search.new_pieces`` and shown before the running estimates, at most twice a
    second.
    """

    def __init__(self, bar):
        self.bar, self.text, self.pieces, self.shown = bar, "", 0, 0.0

    def start(self) -> None:
        self.pieces = 0

    def report(self, pieces, lo, hi, inf_p, sup_p) -> None:
        self.pieces += new_pieces(pieces, REPORT_EVERY)
        now = time.monotonic()
        if now - self.shown >= 0.5:
            self.shown = now
            text = f"batch: {self.pieces} pieces"
            if self.text:
                text = f"{text} | {self.text}"
            self.bar.set_postfix_str(text[:120])


# One process of a worker pool (run_experiment(workers=N)): its models and the
# compilations it has done, kept between the batches it is given.
_WORKER: dict = {"models": {}, "compiled": set(), "reports": None}

# XLA_FLAGS of a single-threaded CPU device (`--cpu-devices`, and each worker): the
# searches of the propagate engine are driven from Python, so threads of one
# process would wait for each other; XLA's own threads gain little on these
# small products.
SINGLE_THREAD_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


def _worker_init(flags: str, reports=None, models: bytes = b"") -> None:
    """Worker set-up; `reports`: a queue for the searches' progress reports;
    `models`: the scheduler's {(checkpoint, activation): model}, pickled."""
    os.environ["XLA_FLAGS"] = flags
    _WORKER["reports"] = reports
    # A worker is one CPU device, also on a GPU machine (where several processes
    # would each claim most of the GPU's memory).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    if compile_cache.ENV in os.environ:  # the parent's cache (or "off"), inherited
        compile_cache.enable_compilation_cache()
    # Unpickled only now: arrays made before x64 is on would be float32.
    _WORKER["models"] = pickle.loads(models) if models else {}
    # A parent killed outright (SIGTERM, SIGKILL) cannot shut the pool down: its
    # workers would compute on as orphans. Each one leaves when its parent is gone.
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_batch(setting: Setting, indices, methods, batch, permutations, engine):
    """run_batch in a worker process, on the scheduler's models."""
    reports = _WORKER["reports"]
    model = _WORKER["models"][(setting.checkpoint, setting.activation)]
    return run_batch(
        model, setting, indices, methods, batch=batch,
        permutations=permutations, compiled=_WORKER["compiled"], engine=engine,
        progress=None if reports is None else (lambda *r: reports.put(r)),
    )  # fmt: skip


class _Now:
    """A finished batch, with the interface of a Future (one process, no pool)."""

    def __init__(self, records):
        self.records = records

    def result(self):
        return self.records


@contextlib.contextmanager
def _worker_pool(workers: int, report: Callable | None = None, models=None):
    """None for one process, else a pool of `workers` spawned processes, each
    given `models` (a copy); their searches' progress reports go to `report` (from
    a thread of this process)."""
    if workers == 1:
        yield None
        return
    if jax.process_count() > 1:
        raise InputError("workers > 1 is for one host; multi-host runs shard batches")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue() if report is not None else None

    def forward():
        for r in iter(reports.get, None):
            report(*r)

    relay = None if reports is None else threading.Thread(target=forward, daemon=True)
    if relay is not None:
        relay.start()
    try:
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init,
            initargs=(SINGLE_THREAD_FLAGS, reports, pickle.dumps(models or {})),
        ) as pool:  # fmt: skip
            try:
                yield pool
            except BaseException:
                # A failed batch (or Ctrl-C): leaving the pool would first wait for
                # the other workers' batches, minutes each. Stop them now.
                if hasattr(pool, "terminate_workers"):  # Python >= 3.14
                    pool.terminate_workers()
                    raise
                procs = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)  # forgets procs
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.join(10.0)
                raise
    finally:
        if relay is not None:
            reports.put(None)
            relay.join()


def run_experiment(
    spec: ExperimentSpec,
    out_dir: str,
    *,
    resume: bool = False,
    progress: bool = True,
    mesh=None,
    models=None,
    max_batches: int | None = None,
    summary_every: float = 300.0,
    workers: int = 1,
) -> list[SummaryRecord]:
    """Runs ``spec``, appending trial records to ``out_dir/trials.jsonl``.

    Settings take turns batch by batch (so a partial run has every setting), each
    running its next untried indices until ``spec.trials`` valid trials are recorded
    (or ``spec.max_factor * spec.trials`` attempts). Then writes ``summary.json`` (a
    list of :class:`SummaryRecord` dicts), ``experiment.json`` (spec, models,
    machine, commit), ``summary.md`` and PNG plots. Only process 0 writes files.

    Args:
      spec: the experiment.
      out_dir: output directory.
      resume: continue from the records in ``out_dir`` (required if there are some).
      progress: show a tqdm bar with the running estimates.
      mesh: a :func:`device_mesh` (default: all devices) or False for one device.
      models: {(checkpoint, activation): model} to reuse loaded models.
      max_batches: stop after this many batches (the run can be resumed); 0 only
        rewrites the summary and plots from the records in ``out_dir``.
      summary_every: also rewrite the summary files every this many seconds, so a
        long run that is killed leaves an up-to-date partial summary.
      workers: > 1: that many worker processes on this host (spawned; each loads
        the models and runs whole batches on one single-threaded CPU device, no
        mesh) while this process schedules and writes. For the propagate engine,
        whose searches run one image at a time, one worker per core. The records
        are the same as with one process; batches finish in any order. Each
        worker gets a copy of the models (``models`` or the loaded checkpoints).

    Returns:
      The summary rows.

    Raises:
      InputError: records present without ``resume``; another run writing
        ``out_dir`` (see :func:`_exclusive`); bad settings or models.
    """
    if workers < 1:
        raise InputError(f"workers must be >= 1; got {workers}")
    settings = spec.settings()
    path = os.path.join(out_dir, TRIALS_FILE)
    writer = jax.process_index() == 0
    if os.path.exists(path) and not resume and read_trials(path):
        raise InputError(
            f"{path} already holds trials: pass --resume to continue, "
            "or choose another --out"
        )
    ensure_output_dir(out_dir)
    # One writer per directory: a second run would redo the same trial indices.
    with (
        _exclusive(out_dir) if writer else contextlib.nullcontext(),
        contextlib.ExitStack() as stack,
    ):
        models = _load_models(settings) if models is None else models
        missing = {(s.checkpoint, s.activation) for s in settings} - set(models)
        if missing:
            raise InputError(f"models has no model for {sorted(missing)}")
        if workers > 1:
            mesh = False
        mesh = device_mesh() if mesh is None else (mesh or None)
        ndev = 1 if mesh is None else mesh.size
        batch = -(-spec.batch // ndev) * ndev
        records = read_trials(path)
        by_key = latest_records(records)
        compiled: set = set()

        def state(s):
            trials = by_key.get(s.key, {})
            done = {
                i
                for i, r in trials.items()
                if not r["valid"] or all(m in r["methods"] for m in spec.methods)
            }
            valid = sum(1 for i in done if trials[i]["valid"])
            return done, valid

        bar = None
        if progress and writer:
            from tqdm import tqdm

            bar = tqdm(
                total=spec.trials * len(settings),
                desc=spec.experiment,
                unit="trial",
                dynamic_ncols=True,
            )
            bar.update(sum(min(state(s)[1], spec.trials) for s in settings))
        batches = 0
        last_summary = time.monotonic()
        pending = list(settings)
        searching = _SearchPostfix(bar)
        pool = stack.enter_context(
            _worker_pool(workers, searching.report if bar is not None else None, models)
        )
        running: dict = {}  # future -> (setting, indices)
        turn = 0  # settings take turns

        def submit() -> bool:
            """Starts the next setting's next batch; False when none can start."""
            nonlocal turn, batches
            for _ in range(len(pending)):
                s = pending[turn % len(pending)]
                done, valid = state(s)
                busy = {i for f, (t, idx) in running.items() if t is s for i in idx}
                limit = spec.max_factor * spec.trials
                if valid + len(busy) >= spec.trials or len(done | busy) >= limit:
                    if not busy:
                        pending.remove(s)  # finished: the next setting takes its turn
                    else:
                        turn += 1
                    if not pending:
                        return False
                    continue
                turn += 1
                # Always a full batch of fresh indices: padding would cost the same.
                idx = [i for i in range(limit) if i not in done and i not in busy]
                idx = idx[:batch]
                batches += 1
                if pool is None:
                    searching.start()
                    job = _Now(run_batch(
                        models[(s.checkpoint, s.activation)], s, idx, spec.methods,
                        batch=batch, mesh=mesh, permutations=spec.permutations,
                        compiled=compiled, engine=spec.engine,
                        progress=searching.report if bar is not None else None,
                    ))  # fmt: skip
                else:
                    job = pool.submit(
                        _worker_batch, s, idx, spec.methods, batch,
                        spec.permutations, spec.engine,
                    )  # fmt: skip
                running[job] = (s, idx)
                return True
            return False

        slots = 1 if pool is None else workers
        while True:
            while (
                pending
                and len(running) < slots
                and (max_batches is None or batches < max_batches)
                and submit()
            ):
                pass
            if not running:
                break
            if pool is None:
                finished = list(running)
            else:
                from concurrent.futures import FIRST_COMPLETED, wait

                finished = wait(running, return_when=FIRST_COMPLETED).done
            for job in finished:
                s, _ = running.pop(job)
                new = job.result()
                if pool is not None:  # the pieces since the last batch that ended
                    searching.start()
                valid = state(s)[1]
                if writer:
                    _append(path, new)
                records.extend(new)
                for r in new:
                    by_key.setdefault(r["setting"], {})[r["index"]] = r
                if writer and time.monotonic() - last_summary > summary_every:
                    rows = summarize(spec, records)
                    _write_summary(out_dir, spec, rows, records, models)
                    last_summary = time.monotonic()
                if bar is not None:
                    bar.update(
                        min(valid + sum(r["valid"] for r in new), spec.trials)
                        - min(valid, spec.trials)
                    )
                    searching.text = _progress_text(summarize(spec, records), s)
                    bar.set_postfix_str(searching.text[:120])
        if bar is not None:
            bar.close()
        rows = summarize(spec, records)
        if writer:
            _write_summary(out_dir, spec, rows, records, models)
        return rows
