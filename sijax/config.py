"""Configuration dataclasses: frozen, flat, overridable by name.

``TrainConfig`` describes one diffusion model and how it is trained (docs/method.md §6).
Presets live in ``sijax/configs/``; the CLI applies ``--set key=value`` overrides with
:func:`apply_overrides`.
"""

import dataclasses
import json
import types
import typing
from collections.abc import Sequence

from sijax.diffusion.schedule import (
    SCHEDULES,
    Schedule,
    cosine_schedule,
    linear_schedule,
)
from sijax.diffusion.unet import UNetConfig
from sijax.errors import InputError

NOISE_MODELS = ("pixel", "stationary", "lowrank")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A diffusion model and its training recipe (defaults: the paper's, docs/method.md
    §6).

    Attributes:
        name: preset name, recorded in the checkpoint.
        size: image side d (images are d x d x in_channels).
        in_channels: image channels C.
        channels: U-Net widths; the last is the bottleneck.
        temb_dim: time-embedding size.
        T, beta_start, beta_end: the linear noise schedule.
        n_train: number of training images: iid N(0, 1) images when training
            without data; with data (``train(data=...)``) the number of images left
            for training after the validation split (set by ``train``).
        batch_size: images per step (the last partial batch of an epoch is dropped).
        epochs: passes over the training set.
        lr: Adam learning rate.
        seed: derives the data, the initialisation, and every step's t and noise.
        steps_per_dispatch: optimiser steps per compiled call (a ``lax.scan``).
        save_every: checkpoint period in steps (rounded up to a multiple of
            ``steps_per_dispatch``); the last step is always saved.
        flips: augment the training data with random horizontal and vertical
            flips (a function of (seed, step), so resumed runs stay exact).
        val_fraction: share of the data images held out for the validation loss
            (logged at each checkpoint) and the threshold calibration; unused
            without data.
        threshold_quantile: with data, the detection threshold stored with the
            model is this quantile of the score maps of the held-out images;
            without data, for a detector other than "dal", of its maps on fresh
            N(0, 1) images (the DAL detector keeps the paper's 0.8).
        noise_model: with data, the noise model ``sijax test --sigma model``
            uses by default ("pixel", "stationary" or "lowrank"; all three are
            stored).
        noise_rank: rank of the "lowrank" noise model.
        schedule_kind: "linear" (beta_start..beta_end, the DDPM's) or "cosine"
            (Nichol and Dhariwal's, T steps; beta_start/beta_end unused).
        detector: the detection method the network serves ("dal", the paper's;
            ``sijax.detectors.DETECTORS`` lists them); it chooses the training loss,
            the reconstruction and the score map.
        detector_options: the detector's settings as sorted (name, value) pairs
            (its options dataclass's defaults where absent); ``--set NAME=VALUE``
            with a name of the options sets one.
    """

    name: str = "dal_v5"
    size: int = 8
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 256)
    temb_dim: int = 100
    T: int = 1000  # noqa: N815  (the paper's name)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    n_train: int = 1000
    batch_size: int = 32
    epochs: int = 1000
    lr: float = 3e-4
    seed: int = 0
    steps_per_dispatch: int = 10
    save_every: int = 500
    flips: bool = False
    val_fraction: float = 0.1
    threshold_quantile: float = 0.99
    noise_model: str = "lowrank"
    noise_rank: int = 32
    schedule_kind: str = "linear"
    detector: str = "dal"
    detector_options: tuple[tuple[str, typing.Any], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        unet = self.unet_config()  # validates the widths
        if self.size < 1 or self.size % unet.size_multiple:
            raise InputError(
                f"size={self.size} must be a positive multiple of "
                f"{unet.size_multiple} (2 ** (len(channels) - 1))")
        for key in ("n_train", "batch_size", "epochs", "steps_per_dispatch",
                    "save_every", "T"):
            if getattr(self, key) < 1:
                raise InputError(f"{key}={getattr(self, key)} must be >= 1")
        if self.batch_size > self.n_train:
            raise InputError(f"{self.batch_size=} exceeds {self.n_train=}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 < self.threshold_quantile < 1.0:
            raise InputError(
                f"threshold_quantile={self.threshold_quantile} must be in (0, 1)")
        if self.noise_model not in NOISE_MODELS:
            raise InputError(
                f"noise_model={self.noise_model!r} must be one of {NOISE_MODELS}")
        if self.noise_rank < 1:
            raise InputError(f"noise_rank={self.noise_rank} must be >= 1")
        if self.schedule_kind not in SCHEDULES:
            raise InputError(
                f"schedule_kind={self.schedule_kind!r} must be one of {SCHEDULES}")
        # Normalised through the detector's options (validated, JSON lists back to
        # tuples, sorted), so equal settings give equal, hashable configs.
        object.__setattr__(self, "detector_options", _tuples(self.detector_options))
        from sijax.detectors import get_detector, options_from_items, options_items

        det = get_detector(self.detector)
        given = dict(self.detector_options)
        full = options_items(options_from_items(det, self.detector_options))
        object.__setattr__(self, "detector_options",
                           tuple((k, v) for k, v in full if k in given))

    def options(self):
        """The detector's options dataclass (defaults where not set)."""
        from sijax.detectors import get_detector, options_from_items

        return options_from_items(get_detector(self.detector), self.detector_options)

    def unet_config(self) -> UNetConfig:
        return UNetConfig(channels=self.channels, in_channels=self.in_channels,
                          temb_dim=self.temb_dim)

    def schedule(self) -> Schedule:
        if self.schedule_kind == "cosine":
            return cosine_schedule(self.T)
        return linear_schedule(self.T, self.beta_start, self.beta_end)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.in_channels)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown config keys {unknown}; valid: {sorted(names)}")
        return cls(**d)


def _tuples(x):
    """JSON lists back to (nested) tuples, pairs sorted by name."""
    if isinstance(x, (list, tuple)):
        pairs = tuple(tuple(_tuples(v) for v in p) if isinstance(p, (list, tuple))
                      else p for p in x)
        return tuple(sorted(pairs, key=lambda p: str(p[0]))) if all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
            for p in pairs) else pairs
    return x


def parse_value(key: str, raw: str, typ):
    """Parses ``raw`` as the type annotation ``typ`` of a config field.

    An optional field (``float | None``, ``Optional[int]``) takes "none" (any case)
    for None, else its other type.
    """
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        inner = [t for t in typing.get_args(typ) if t is not type(None)]
        if type(None) in typing.get_args(typ) and raw.lower() in ("none", "null"):
            return None
        if len(inner) != 1:
            raise InputError(f"cannot parse --set {key}={raw!r} as {typ}")
        return parse_value(key, raw, inner[0])
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError(raw)
        if typing.get_origin(typ) is tuple:
            inner = typing.get_args(typ)[0]
            parts = [p for p in raw.strip("()[] ").replace(" ", "").split(",") if p]
            return tuple(inner(p) for p in parts)
        if typ is int:
            return int(raw)
        return typ(raw)
    except ValueError:
        raise InputError(f"cannot parse --set {key}={raw!r} as {typ}") from None


def apply_overrides(cfg, overrides: Sequence[str]):
    """Returns ``cfg`` with ``key=value`` overrides applied (``--set`` in the CLI).

    Args:
        cfg: a frozen config dataclass.
        overrides: strings ``"key=value"``; tuples as ``"4,8,16"``.

    Raises:
        InputError: malformed item, unknown key (the message lists the valid keys),
            unparsable or invalid value.
    """
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes, options = {}, {}
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in fields and _is_option(cfg, changes, key):
            options[key] = raw.strip()
            continue
        if key not in fields:
            raise InputError(
                f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        changes[key] = parse_value(key, raw.strip(), hints[key])
    if options:
        # Parsed by the options dataclass (TrainConfig.__post_init__ validates).
        from sijax.detectors import get_detector, options_from_items, options_items

        det = get_detector(changes.get("detector", cfg.detector))
        merged = {**dict(getattr(cfg, "detector_options", ())), **options}
        parsed = dict(options_items(options_from_items(det, merged.items())))
        changes["detector_options"] = tuple((k, parsed[k]) for k in sorted(merged))
    return dataclasses.replace(cfg, **changes)


def _is_option(cfg, changes: dict, key: str) -> bool:
    """Whether ``key`` names an option of ``cfg``'s detector (TrainConfig only)."""
    if not hasattr(cfg, "detector_options"):
        return False
    from sijax.detectors import get_detector

    det = get_detector(changes.get("detector", cfg.detector))
    return key in {f.name for f in dataclasses.fields(det.options)}
