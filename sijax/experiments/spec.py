"""The grid of an experiment: :class:`Setting` (one cell), :class:`ExperimentSpec`
(the whole grid, its methods and trial count) and the paper's presets
(:func:`default_spec`)."""

from __future__ import annotations

import dataclasses
import json
import zlib

from sijax.detect.dal import ENGINES, DALConfig
from sijax.errors import InputError
from sijax.experiments.noise import NOISE_FAMILIES

EXPERIMENTS = ("fpr", "power", "pieces", "robustness", "pwl")
METHODS = ("selective", "oc", "naive", "bonferroni", "permutation")


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

    def dal_config(self, method: str, threshold: float | None = None) -> DALConfig:
        """The DAL test options behind ``method`` ("selective" or "oc"), with the
        region threshold ``threshold`` (None: the default 0.8)."""
        detect = {} if threshold is None else {"threshold": float(threshold)}
        if method == "oc":
            return DALConfig(
                search="over_conditioning", alpha=self.alpha,
                hypothesis=self.hypothesis, **detect
            )
        return DALConfig(
            search=self.search,
            termination=self.termination,
            alpha=self.alpha,
            max_pieces=self.max_pieces,
            hypothesis=self.hypothesis,
            **detect,
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
    """The paper's settings for ``experiment`` (docs/method.md §7), with overrides.

    Sizes default to 8 and 16; every size uses the committed ``dal_v5_{size}``
    (8, 16, 32 and 64 are committed) unless ``checkpoints`` names another.
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
