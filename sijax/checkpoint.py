"""Saving and loading diffusion models (Orbax), and the loaded model type.

A model directory (what ``sijax train`` exports to ``WORKDIR/model`` and what is
committed under ``sijax/checkpoints/NAME``) holds

    config.json   the TrainConfig (architecture, schedule, recipe), a summary and
                  the SHA-256 of every file under state/ ("state_sha256"); for a
                  model trained on data also "data" (path, count, SHA-256 of the
                  file list), "preprocessing" (what turns a file into the
                  network's input) and "detect" (the calibrated threshold)
    state/        Orbax checkpoint of the eval-mode network state: parameters and
                  batch-norm running statistics, stored float32
    noise/KIND/   (trained on data) the noise models estimated from the normal
                  images: pixel, stationary, lowrank

Orbax stores the arrays without checksums: a flipped bit in a chunk loads silently as
a different weight (and so a different model, reconstruction and p-value), and a
truncated chunk fails deep inside its reader. ``load_model`` therefore checks the
files against ``state_sha256`` before Orbax reads them (directories saved before
the checksums existed load unchecked).

``load_model`` also accepts a training workdir (it then reads ``WORKDIR/model``).
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sijax.config import TrainConfig
from sijax.diffusion.sampler import reconstruct
from sijax.diffusion.schedule import Schedule
from sijax.diffusion.unet import UNet, UNetConfig
from sijax.digest import file_sha256
from sijax.errors import CheckpointError, InputError

CHECKPOINTS_DIR = os.path.join(os.path.dirname(__file__), "checkpoints")


def _ocp():
    # Orbax is imported lazily: it is slow to import and only needed for files.
    import orbax.checkpoint as ocp

    return ocp


def init_unet(cfg: UNetConfig, key: jax.Array, param_dtype=jnp.float32):
    """A freshly initialised U-Net split into (graphdef, state)."""
    model = UNet(cfg, rngs=nnx.Rngs(params=key), param_dtype=param_dtype)
    return nnx.split(model)


def apply_unet(graphdef, state, x: jax.Array, t: jax.Array) -> jax.Array:
    """Pure eval-mode U-Net: (B, H, W, C), (B,) -> (B, H, W, C) (running BN stats)."""
    return nnx.merge(graphdef, state)(x, t, train=False)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model directory says beyond the network (static, hashable).

    Attributes:
        directory: where the model was loaded from (None if built in memory).
        preprocessing: the ``sijax.data.Preprocessing`` that turns an image file
            into the network's input (None: the model was trained on N(0, 1)
            images, and files are read as they are).
        threshold: the detection threshold calibrated on held-out normal images
            (or, for a detector other than DAL trained on N(0, 1) images, on fresh
            N(0, 1) images; None: the DAL default 0.8).
        noise_model: default noise model kind of ``--sigma model`` (None: none
            stored).
        image_fit: what an image-level detector fitted on the normal images
            (``Detector.fit``; JSON, stored as config.json "image_fit"), or None.
    """

    directory: str | None = None
    preprocessing: Any = None
    threshold: float | None = None
    noise_model: str | None = None
    image_fit: Any = None


@struct.dataclass
class DiffusionModel:
    """A trained noise predictor in eval mode: a pytree (state) with static config.

    Attributes:
        config: the TrainConfig it was trained with (static).
        graphdef: the Flax NNX graph definition (static).
        state: parameters and batch-norm running statistics (pytree of arrays,
            float64 after :func:`load_model`).
        info: what its directory records besides (preprocessing, threshold, noise
            models); static.
    """

    config: TrainConfig = struct.field(pytree_node=False)
    graphdef: Any = struct.field(pytree_node=False)
    state: Any
    info: ModelInfo = struct.field(pytree_node=False, default=ModelInfo())

    @property
    def preprocessing(self):
        """The recorded ``sijax.data.Preprocessing``, or None (N(0, 1) models)."""
        return self.info.preprocessing

    def noise_model(self, kind: str | None = None):
        """The stored noise model ``kind`` (default: the model's default kind).

        Raises:
            InputError: the model stores no noise models (trained without data,
                or built in memory) or none of that kind.
            CheckpointError: a damaged noise model file.
        """
        from sijax.noise_model import load_noise_model

        kind = kind or self.info.noise_model
        root = None if self.info.directory is None else os.path.join(
            self.info.directory, "noise")
        if root is None or kind is None or not os.path.isdir(root):
            raise InputError(
                "this model stores no noise model (it was not trained on data with "
                "sijax train --data): give --sigma as a variance, iid, corr or a "
                ".npy file")
        path = os.path.join(root, kind)
        if not os.path.isdir(path):
            raise InputError(f"no noise model {kind!r} in {root}; stored: "
                             f"{sorted(os.listdir(root))}")
        return load_noise_model(path)

    @property
    def unet_config(self) -> UNetConfig:
        return self.config.unet_config()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model was trained on."""
        return self.config.image_shape

    @property
    def schedule(self) -> Schedule:
        return self.config.schedule()

    def apply(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """Batched eps_hat: x (B, H, W, C), t (B,) -> (B, H, W, C)."""
        return apply_unet(self.graphdef, self.state, x, t)

    def denoiser(self):
        """The one-image noise predictor ``eps_fn(x_t, t) -> eps_hat``.

        ``x_t`` is (H, W, C) and ``t`` a scalar (int or float); the result has the
        shape and dtype of ``x_t``. A pure closure over this model's state:
        jit/vmap friendly and piecewise linear in ``x_t`` (eval-mode network).
        """
        graphdef, state = self.graphdef, self.state

        def eps_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
            t = jnp.reshape(jnp.asarray(t), (1,))
            return apply_unet(graphdef, state, x_t[None], t)[0]

        return eps_fn

    @property
    def detector(self):
        """The :class:`sijax.detectors.Detector` this network serves."""
        from sijax.detectors import get_detector

        return get_detector(self.config.detector)

    @property
    def options(self):
        """The detector's options (``TrainConfig.options()``)."""
        return self.config.options()

    def with_options(self, **options) -> "DiffusionModel":
        """The same network with some detector options changed (e.g. a later
        start step), validated by the detector's options dataclass."""
        from sijax.detectors import options_from_items, options_items

        merged = {**dict(self.config.detector_options), **options}
        full = dict(options_items(options_from_items(self.detector, merged.items())))
        items = tuple((k, full[k]) for k in sorted(merged))
        return self.replace(config=dataclasses.replace(self.config,
                                                       detector_options=items))

    def draw_noises(self, key: jax.Array, config=None):
        """Every random tensor one test of this detector needs, from ``key``.

        Args:
            key: PRNG key, used once.
            config: a DALConfig (its ``steps`` size the DAL detector's noises;
                other detectors take their settings from :attr:`options`).
        """
        from sijax.diffusion.sampler import draw_noises as sampler_noises

        if self.config.detector == "dal":
            steps = 5 if config is None else len(config.steps)
            return sampler_noises(key, self.image_shape, steps)
        return self.detector.draw_noises(key, self.image_shape, self.options)

    def check_region(self, test: bool = True) -> None:
        """Raises unless the detector gives a region and, for a ``test``, is
        piecewise linear with its options (the DAL test calls this).

        Raises:
            InputError: an image-level detector (DiffPath): no region to test.
            NotPiecewiseLinearError: options that select a published form
                the tracker cannot follow (detection works, a p-value does not).
        """
        from sijax.errors import NotPiecewiseLinearError

        det = self.detector
        if det.reconstruction is None and det.name != "dal":
            raise InputError(
                f"the {det.name} detector scores whole images: it has no region "
                "to detect or test (sijax evaluate reports its image AUROC)")
        reason = det.testable(self.options) if test else None
        if reason:
            raise NotPiecewiseLinearError(
                f"no p-value with these {det.name} options: {reason}")

    @property
    def score_fn(self):
        """``score_fn(x, rec) -> (H, W)`` of the detector, or None (the paper's
        filtered absolute error with ``DALConfig.filter_size``)."""
        score, options = self.detector.score, self.options
        if score is None:
            return None
        return lambda x, rec: score(x, rec, options)

    def reconstruction(self, x: jax.Array, noises, *, steps, eta: float) -> jax.Array:
        """D(x) of one (H, W, C) image with fixed ``noises`` (the detector protocol).

        The DAL detector: :func:`sijax.diffusion.sampler.reconstruct` with
        ``steps`` and ``eta``; another detector: its own reconstruction with its
        options (``steps`` and ``eta`` are the DAL sampler's and not used). Any
        object with ``image_shape`` and this method can be tested by
        :func:`sijax.dal_test`.
        """
        if self.config.detector == "dal":
            return reconstruct(self.denoiser(), x, noises, schedule=self.schedule,
                               steps=steps, eta=eta)
        self.check_region(test=False)
        return self.detector.reconstruction(self.denoiser(), x, noises,
                                            schedule=self.schedule,
                                            options=self.options)

    def image_score(self, x: jax.Array, noises) -> jax.Array:
        """The detector's whole-image anomaly score of one (H, W, C) image, ().

        Image-level detectors (DiffPath) define it: with what the detector fitted
        on the normal training images (stored with a model trained on data) the
        fitted score, else its unfitted fallback. For region detectors the image
        score (the maximum of the map) is computed by :mod:`sijax.evaluation`.

        Raises:
            InputError: the detector has no image-level score.
        """
        det = self.detector
        if det.image_score is None:
            raise InputError(f"the {det.name} detector has no image-level score")
        if self.info.image_fit is not None and det.fitted_score is not None:
            return det.fitted_score(self, thawed(self.info.image_fit), x)
        return det.image_score(self.denoiser(), x, noises, schedule=self.schedule,
                               options=self.options)

    def weights_sha256(self) -> str:
        """SHA-256 of the state's arrays (paths, shapes, dtypes, bytes): which
        weights produced a result, recorded by experiments."""
        digest = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.state):
            a = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{jax.tree_util.keystr(path)} {a.shape} {a.dtype}".encode())
            digest.update(a.tobytes())
        return digest.hexdigest()

    def astype(self, dtype) -> "DiffusionModel":
        return self.replace(state=cast_state(self.state, dtype))


def cast_state(state, dtype):
    """Casts every floating leaf of a state pytree to ``dtype``."""
    # On the host: an eager cast on the device compiles one program per leaf shape
    # (30 at model load, about 1 s of a first p-value).
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a).astype(dtype))
        if jnp.issubdtype(a.dtype, jnp.floating) else a,
        state,
    )


def _to_numpy_tree(state, dtype=np.float32):
    pure = nnx.to_pure_dict(state)
    return jax.tree.map(lambda a: np.asarray(a, dtype=dtype), pure)


def save_model(
    directory: str | os.PathLike,
    config: TrainConfig,
    state,
    *,
    summary: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Writes a model directory (config.json + float32 Orbax state).

    Orbax writes into a temporary directory and renames it when complete, so an
    interrupted save leaves no half-written ``state``.

    Args:
        directory: target directory (created; must not already hold a state).
        config: the model's TrainConfig.
        state: nnx.State of the U-Net (params and batch stats).
        summary: extra JSON-serialisable facts (final loss, steps, ...).
        extra: more top-level entries of config.json ("data", "preprocessing",
            "detect").

    Returns:
        The absolute directory.
    """
    ocp = _ocp()
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    meta = {
        "config": dataclasses.asdict(config),
        "summary": summary or {},
        "format": "sijax-model-1",
        **(extra or {}),
    }
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "state"), _to_numpy_tree(state), force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    meta["state_sha256"] = state_checksums(os.path.join(directory, "state"))
    tmp = os.path.join(directory, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, "config.json"))
    return directory


def state_checksums(state_path: str) -> dict[str, str]:
    """{path relative to ``state_path``: SHA-256 hex} of every file under it."""
    sums = {}
    for root, _, files in os.walk(state_path):
        for name in files:
            path = os.path.join(root, name)
            sums[os.path.relpath(path, state_path)] = file_sha256(path)
    return dict(sorted(sums.items()))


def verify_state(state_path: str, want: dict[str, str]) -> None:
    """Raises CheckpointError unless every file of ``want`` (from
    :func:`state_checksums`) is under ``state_path`` with that SHA-256."""
    got = state_checksums(state_path)
    missing = sorted(set(want) - set(got))
    changed = sorted(k for k in want if k in got and got[k] != want[k])
    parts = []
    if changed:
        parts.append(f"{len(changed)} file(s) differ from their saved SHA-256 "
                     f"(first: {changed[0]})")  # fmt: skip
    if missing:
        parts.append(f"{len(missing)} file(s) missing (first: {missing[0]})")
    if parts:
        raise CheckpointError(
            f"corrupt model state in {state_path}: {'; '.join(parts)}; it changed "
            "after it was saved: restore the directory from its source"
        )


def _resolve(directory: str) -> str:
    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(
        os.path.join(directory, "state")
    ):
        return directory
    sub = os.path.join(directory, "model")
    if os.path.isdir(sub):
        return sub
    named = os.path.join(CHECKPOINTS_DIR, os.fspath(directory))
    if (
        not os.path.isabs(directory)
        and os.path.isdir(named)
        and not os.path.exists(directory)
    ):
        return named
    return directory


def load_model(directory: str | os.PathLike, dtype=jnp.float64) -> DiffusionModel:
    """Loads a model directory as an eval-mode :class:`DiffusionModel`.

    Args:
        directory: a model directory, a training workdir (uses ``WORKDIR/model``),
            or the name of a committed checkpoint (``"dal_v5_8"``, ``"dal_v5_16"``,
            ``"dal_v5_32"``, ``"tiny_8"``).
        dtype: float dtype of the loaded state; float64 (the default, the test
            path) needs ``jax_enable_x64``.

    Raises:
        CheckpointError: missing directory, missing/corrupt config.json or state
            (a state file whose SHA-256 differs from the one saved in config.json).
        InputError: float64 requested while x64 is off.
    """
    x64 = jnp.result_type(float) == jnp.float64  # honours jax.enable_x64 contexts
    if jnp.dtype(dtype) == jnp.float64 and not x64:
        raise InputError(
            "load_model(dtype=float64) needs x64: call "
            "jax.config.update('jax_enable_x64', True) first"
        )
    # Absolute: Orbax refuses a relative path (as "corrupt state" below).
    given = os.fspath(directory)
    directory = os.path.abspath(_resolve(given))
    if not os.path.isdir(directory):
        committed = sorted(
            n for n in os.listdir(CHECKPOINTS_DIR)
            if os.path.isfile(os.path.join(CHECKPOINTS_DIR, n, "config.json")))
        raise CheckpointError(
            f"checkpoint directory not found: {directory}"
            + ("" if os.sep in given else
               f"; nor is {given!r} a committed model ({', '.join(committed)})"))
    cfg_path = os.path.join(directory, "config.json")
    state_path = os.path.join(directory, "state")
    if not os.path.isfile(cfg_path) or not os.path.isdir(state_path):
        raise CheckpointError(
            f"{directory} is not a sijax model directory: expected config.json and "
            "state/ (or a training workdir with model/)"
        )
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        config = TrainConfig.from_dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"corrupt config.json in {directory}: {e}") from None
    if "state_sha256" in meta:
        verify_state(state_path, meta["state_sha256"])
    # Abstract template: shapes and dtypes only, no random initialisation.
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: UNet(config.unet_config(), rngs=nnx.Rngs(0)))
    )
    template = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), nnx.to_pure_dict(state)
    )
    try:
        ocp = _ocp()
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(state_path, template)
        restored = jax.tree.map(np.asarray, restored)
        for (path, want), got in zip(
            jax.tree_util.tree_leaves_with_path(template),
            jax.tree.leaves(restored),
            strict=True,
        ):
            if got.shape != want.shape:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} has shape "
                    f"{got.shape}, the config needs {want.shape}"
                )
        nnx.replace_by_pure_dict(state, restored)
    except Exception as e:  # noqa: BLE001  (Orbax raises many types on bad files)
        raise CheckpointError(
            f"corrupt or incompatible model state in {state_path}: "
            f"{type(e).__name__}: {str(e)[:300]}"
        ) from None
    for leaf in jax.tree.leaves(state):
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise CheckpointError(f"model state in {state_path} has NaN/Inf values")
    return DiffusionModel(
        config=config, graphdef=graphdef, state=cast_state(state, dtype),
        info=_model_info(directory, meta, config),
    )


def _model_info(directory: str, meta: dict, config: TrainConfig) -> ModelInfo:
    # config.json itself has no checksum: an edited or damaged entry is caught
    # here rather than as a confusing error in the first test.
    try:
        prep = None
        if "preprocessing" in meta:
            from sijax.data import Preprocessing

            prep = Preprocessing.from_dict(meta["preprocessing"])
            if prep.image_shape != config.image_shape:
                raise ValueError(
                    f"the preprocessing gives {prep.image_shape} images but the "
                    f"model's config is for {config.image_shape}")
        threshold = meta.get("detect", {}).get("threshold")
        if threshold is not None and not (
                isinstance(threshold, int | float) and np.isfinite(threshold)
                and threshold >= 0):
            raise ValueError(f"detect.threshold={threshold!r} must be a finite "
                             "number >= 0")
        noise = None
        if os.path.isdir(os.path.join(directory, "noise")):
            noise = meta["config"].get("noise_model", "lowrank")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"corrupt config.json in {directory}: {type(e).__name__}: {e}") from None
    image_fit = meta.get("image_fit")
    image_fit = None if image_fit is None else _frozen(image_fit)
    return ModelInfo(directory=directory, preprocessing=prep,
                     threshold=None if threshold is None else float(threshold),
                     noise_model=noise, image_fit=image_fit)


def _frozen(obj):
    """JSON as hashable tuples (ModelInfo is static: it is hashed under jit);
    :func:`thawed` gives back the dicts and lists."""
    if isinstance(obj, dict):
        return ("__dict__", tuple((k, _frozen(v)) for k, v in sorted(obj.items())))
    if isinstance(obj, list):
        return tuple(_frozen(v) for v in obj)
    return obj


def thawed(obj):
    """The JSON that :func:`_frozen` froze."""
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__dict__":
        return {k: thawed(v) for k, v in obj[1]}
    if isinstance(obj, tuple):
        return [thawed(v) for v in obj]
    return obj


def read_summary(directory: str | os.PathLike) -> dict:
    """The ``summary`` recorded in a model directory's config.json."""
    with open(os.path.join(_resolve(os.fspath(directory)), "config.json")) as f:
        return json.load(f).get("summary", {})
