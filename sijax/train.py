"""Training of the noise predictor (docs/method.md §6), resumable and reproducible.

Every source of randomness is derived from ``(cfg.seed, step)``: the training images
from the seed, the data order of each epoch from ``fold_in(data_key, epoch)``, and
each step's t and noise from ``fold_in(step_key, step)``. Steps run ``cfg.
steps_per_dispatch`` at a time inside one jitted ``lax.scan`` whose chunk boundaries
depend only on the absolute step, and checkpoints are written only at chunk
boundaries. A run resumed from a checkpoint therefore repeats exactly the same
computations as an uninterrupted run, and on the same machine ends with bit-identical
parameters.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sijax.checkpoint import (
    DiffusionModel,
    cast_state,
    init_unet,
    save_model,
    state_checksums,
    verify_state,
)
from sijax.config import TrainConfig
from sijax.data.synthetic import normal_images
from sijax.diffusion.loss import noise_prediction_loss
from sijax.errors import (
    CheckpointError,
    InputError,
    InputWarning,
    ensure_output_dir,
)

DTYPE = jnp.float32  # training precision; the test path casts to float64 at load


class TrainState(NamedTuple):
    """What a training checkpoint holds.

    Attributes:
        step: () int32, optimiser steps done.
        params: nnx.State of the parameters (float32).
        batch_stats: nnx.State of the batch-norm running statistics (float32).
        opt_state: Adam state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


class TrainResult(NamedTuple):
    """Outcome of :func:`train`.

    Attributes:
        model: the trained model in eval mode (float32 state).
        state: final TrainState.
        losses: (K, 2) float64 rows (step, mean loss of the chunk ending there).
        seconds_per_step: wall time per step of this call, compile time excluded;
            NaN when every step ran in the first, compiling chunk (not measured).
    """

    model: DiffusionModel
    state: TrainState
    losses: np.ndarray
    seconds_per_step: float


def _keys(seed: int):
    root = jax.random.key(seed)
    # Appended names only: the keys of the first four must not change (committed
    # checkpoints are reproduced from them).
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(("data", "init", "order", "step", "flip",
                                      "val", "calibrate"))}


def init_state(cfg: TrainConfig) -> tuple[Any, TrainState, Any]:
    """The U-Net graphdef, the initial TrainState, and the optimiser."""
    graphdef, params, batch_stats = nnx.split(
        nnx.merge(*init_unet(cfg.unet_config(), _keys(cfg.seed)["init"], DTYPE)),
        nnx.Param, nnx.BatchStat)
    opt = optax.adam(cfg.lr)
    state = TrainState(jnp.asarray(0, jnp.int32), params, batch_stats, opt.init(params))
    return graphdef, state, opt


class TrainingData(NamedTuple):
    """The images a model is trained on, as the network sees them.

    Attributes:
        train: (N, H, W, C) float32 training images (preprocessed).
        val: (V, H, W, C) float32 held-out normal images (V may be 0): the
            validation loss and the threshold calibration.
        preprocessing: the ``sijax.data.Preprocessing`` that maps a file to these
            values (None for the synthetic N(0, 1) images).
        source: {"path", "count", "sha256"} of the data (None for synthetic).
    """

    train: np.ndarray
    val: np.ndarray
    preprocessing: Any
    source: dict | None


def training_data(cfg: TrainConfig, data=None) -> TrainingData:
    """The training images of ``cfg``: iid N(0, 1) without ``data``, else ``data``.

    Args:
        cfg: the configuration (size, seed, val_fraction).
        data: None (cfg.n_train iid N(0, 1) images, the paper's), a path (a folder
            of images, an .npy/.npz stack, or an MVTec AD category root, whose
            ``train/good`` is used; see ``sijax.data.open_dataset``) or an array
            (N, H, W) / (N, H, W, C) of raw images (integers are scaled by their
            bit depth, floats taken as they are).

    With data, a :class:`sijax.data.Preprocessing` is fitted (resize to cfg.size,
    per-channel standardisation by the statistics of these images), and a
    ``cfg.val_fraction`` share, drawn with cfg.seed, is held out.

    Raises:
        InputError: unreadable data, fewer than 2 images, or fewer training images
            than one batch.
    """
    if data is None:
        x = normal_images(_keys(cfg.seed)["data"], cfg.n_train, cfg.image_shape, DTYPE)
        return TrainingData(np.asarray(x), np.zeros((0, *cfg.image_shape),
                                                    np.float32), None, None)
    from sijax.data import Preprocessing, data_source, open_dataset

    if isinstance(data, (str, os.PathLike)):
        raw = open_dataset(data).train_raws()  # each (H, W, C); sizes may vary
        source = data_source(data)
    else:
        raw = np.asarray(data)
        if raw.ndim == 3:
            raw = raw[..., None]
        source = {"path": "<array>", "count": int(raw.shape[0]),
                  "sha256": hashlib.sha256(np.ascontiguousarray(raw).tobytes()
                                           ).hexdigest()}
        if raw.ndim != 4:
            raise InputError(f"need images (N, H, W[, C]); got shape={raw.shape}")
    if len(raw) < 2:
        raise InputError(f"need at least 2 training images; got {len(raw)}")
    prep = Preprocessing.fit(raw, size=cfg.size)
    x = np.stack([prep.apply(r) for r in raw]).astype(np.float32)
    n = len(x)
    n_val = int(round(cfg.val_fraction * n)) if n >= 10 else 0
    order = np.random.default_rng(cfg.seed).permutation(n)
    val, train = x[order[:n_val]], x[order[n_val:]]
    if len(train) < cfg.batch_size:
        raise InputError(
            f"{len(train)} training images (of {n}, {n_val} held out) are fewer than "
            f"one batch (batch_size={cfg.batch_size}): --set batch_size=N or more "
            "images")
    return TrainingData(train, val, prep, source)


def data_config(cfg: TrainConfig, data: TrainingData) -> TrainConfig:
    """``cfg`` with the image count and channels of ``data`` (a no-op without)."""
    if data.source is None:
        return cfg
    return dataclasses.replace(cfg, n_train=len(data.train),
                               in_channels=int(data.train.shape[-1]))


def detector_loss(cfg: TrainConfig):
    """(loss, options) of ``cfg``'s detector: ``loss`` None means the DDPM's noise
    prediction (the DAL paper's and most detectors' objective)."""
    from sijax.detectors import get_detector

    return get_detector(cfg.detector).loss, cfg.options()


@functools.lru_cache(maxsize=8)
def make_train_chunk(cfg: TrainConfig) -> Callable:
    """Builds ``chunk(state, data, steps) -> (state, losses)``: one compiled step
    dispatched per entry of ``steps``.

    Cached per config, so repeated or resumed runs in one process compile once.

    ``steps`` is the (D,) vector of absolute step numbers to run (those >= the total
    are no-ops with NaN loss); batch, t and noise
    of each step are functions of (seed, step) only.
    """
    graphdef, _, opt = init_state(cfg)
    keys = _keys(cfg.seed)
    schedule = cfg.schedule()
    n, bs, spe = cfg.n_train, cfg.batch_size, cfg.steps_per_epoch

    own_loss, options = detector_loss(cfg)

    def loss_fn(params, batch_stats, x0, t, eps, key):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        apply = lambda x, tt: model(x, tt, train=True)  # noqa: E731
        if own_loss is None:
            loss = noise_prediction_loss(apply, schedule, x0, t, eps)
        else:
            loss = own_loss(apply, schedule, x0, key, options)
        return loss, nnx.state(model, nnx.BatchStat)

    def one_step(state: TrainState, inputs):
        step, data = inputs
        epoch, k = step // spe, step % spe
        order = jax.random.permutation(jax.random.fold_in(keys["order"], epoch), n)
        x0 = data[jax.lax.dynamic_slice_in_dim(order, k * bs, bs)]
        if cfg.flips:
            fh, fv = jax.random.bernoulli(
                jax.random.fold_in(keys["flip"], step), 0.5, (2, bs, 1, 1, 1))
            x0 = jnp.where(fh, x0[:, :, ::-1], x0)
            x0 = jnp.where(fv, x0[:, ::-1], x0)
        key = jax.random.fold_in(keys["step"], step)
        kt, ke = jax.random.split(key)
        t = jax.random.randint(kt, (bs,), 0, cfg.T)
        eps = jax.random.normal(ke, x0.shape, DTYPE)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x0, t, eps, key)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), loss

    total = cfg.total_steps

    @jax.jit
    def step_fn(s: TrainState, data: jax.Array, step: jax.Array):
        new, loss = one_step(s, (step, data))
        # Steps past the end (padding of the last chunk) leave the state as is.
        active = step < total
        new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s)
        return new, jnp.where(active, loss, jnp.nan)

    def chunk(state: TrainState, data: jax.Array, steps: jax.Array):
        # One dispatch per step, not a compiled loop over the steps: on XLA's CPU
        # backend (jax 0.10.2) the kernel-gradient convolutions inside a
        # scan/while body run about 30x slower than at the top level of a
        # program (a dal_v5 step at 32x32: 13 s in a scan of length 1 against
        # 0.55 s alone; docs/design.md, "Training, checkpoints, configuration").
        # Dispatches are asynchronous, so the steps still queue without waiting
        # for the host.
        losses = []
        for step in jnp.asarray(steps):
            state, loss = step_fn(state, data, step)
            losses.append(loss)
        return state, jnp.stack(losses)

    return chunk


VAL_IMAGES = 256  # at most this many held-out images enter the validation loss


@functools.lru_cache(maxsize=8)
def make_val_loss(cfg: TrainConfig) -> Callable:
    """``val_loss(state, x0) -> loss``: the noise-prediction loss of held-out images
    in eval mode (running batch-norm statistics), with a fixed t per image (evenly
    spread over 0..T-1) and a fixed noise (from cfg.seed), so that the numbers of
    one run are comparable between checkpoints. Jitted once per config."""
    graphdef, _, _ = init_state(cfg)
    schedule, key = cfg.schedule(), _keys(cfg.seed)["val"]
    own_loss, options = detector_loss(cfg)

    @jax.jit
    def val_loss(state: TrainState, x0: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
        apply = lambda x, tt: model(x, tt, train=False)  # noqa: E731
        if own_loss is not None:
            return own_loss(apply, schedule, x0, key, options)
        t = (jnp.arange(x0.shape[0]) * cfg.T) // x0.shape[0]
        eps = jax.random.normal(key, x0.shape, x0.dtype)
        return noise_prediction_loss(apply, schedule, x0, t, eps)

    return val_loss


# Fewer held-out images than this give the calibrated threshold a warning.
FEW_HELD_OUT = 5


def calibrate_threshold(model: DiffusionModel, images: np.ndarray,
                        quantile: float, draws: int = 3) -> float:
    """The ``quantile`` of the score maps of normal ``images`` (V, H, W, C).

    Each image is reconstructed with ``draws`` noise draws (keys 0..draws-1, the
    keys ``sijax test --seed`` uses), with the default DAL detector. A threshold
    fixed from held-out normal images, before any test image is seen, leaves the
    test's validity untouched; it sets how much of a normal image is flagged
    (about 1 - quantile of its pixels).
    """
    from sijax.detect.dal import DALConfig, detect_region, draw_noises

    config = DALConfig()
    scores = []
    dtype = jax.tree.leaves(model.state)[0].dtype
    noises = [draw_noises(jax.random.key(k), model, config)
              for k in range(draws)]
    for x in images:
        for nz in noises:
            score, _ = detect_region(model, x.astype(dtype), nz, config)
            scores.append(np.asarray(score).ravel())
    return float(np.quantile(np.concatenate(scores), quantile))


class _Checkpoints:
    """Periodic Orbax training checkpoints in ``WORKDIR/ckpt/<step>``.

    Orbax finalises each step by an atomic rename, so a killed run leaves only
    complete checkpoints (at most the steps since the last save are lost). The
    SHA-256 of each step's files goes to ``WORKDIR/ckpt_sha256.json``; a resume
    takes the newest step whose files match and that restores, and moves a damaged
    one aside to ``WORKDIR/ckpt_damaged/<step>`` with a warning (the older step gives
    the same run: training is deterministic from any step).
    """

    def __init__(self, workdir: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.workdir = workdir
        self.sums_path = os.path.join(workdir, "ckpt_sha256.json")
        self.mngr = ocp.CheckpointManager(
            os.path.join(workdir, "ckpt"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=2, enable_async_checkpointing=False))

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.workdir, "ckpt", str(step))

    def _sums(self) -> dict:
        try:
            with open(self.sums_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # none yet, or cut by a kill: restore unchecked

    def save(self, step: int, state: TrainState):
        self.mngr.save(step, args=self._ocp.args.StandardSave(state._asdict()),
                       force=True)
        self.mngr.wait_until_finished()
        kept = {str(k) for k in self.mngr.all_steps()}  # Orbax pruned the rest
        sums = {k: v for k, v in self._sums().items() if k in kept}
        sums[str(step)] = state_checksums(self._step_dir(step))
        with open(self.sums_path + ".tmp", "w") as f:
            json.dump(sums, f)
        os.replace(self.sums_path + ".tmp", self.sums_path)

    def restore(self, step: int, template: TrainState) -> TrainState:
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct,
                                template._asdict())
        restored = self.mngr.restore(
            step, args=self._ocp.args.StandardRestore(abstract))
        return TrainState(**restored)

    def restore_latest(self, template: TrainState) -> tuple[int, TrainState]:
        """(step, state) of the newest usable checkpoint; (0, template) if none."""
        steps = sorted(self.mngr.all_steps(), reverse=True)
        sums, damaged = self._sums(), []
        for step in steps:
            try:
                if str(step) in sums:
                    verify_state(self._step_dir(step), sums[str(step)])
                state = self.restore(step, template)
            except Exception as e:  # noqa: BLE001  (Orbax raises many types)
                damaged.append(step)
                warnings.warn(f"training checkpoint at step {step} is damaged "
                              f"({type(e).__name__}: {str(e)[:300]}); trying the "
                              "one before", stacklevel=3)
                continue
            break
        else:
            if steps:
                raise CheckpointError(
                    f"no usable training checkpoint in {self.workdir}/ckpt (steps "
                    f"{steps} are damaged); remove ckpt/ to train from the start")
            return 0, template
        if damaged:  # out of Orbax's way (later saves must be its newest steps)
            warnings.warn(f"moved the damaged steps {damaged} to "
                          f"{self.workdir}/ckpt_damaged/", stacklevel=3)
            os.makedirs(os.path.join(self.workdir, "ckpt_damaged"), exist_ok=True)
            for s in damaged:
                os.replace(self._step_dir(s),
                           os.path.join(self.workdir, "ckpt_damaged", str(s)))
            self.mngr.reload()
        return step, state

    def close(self):
        self.mngr.close()


def _read_log(path: str, upto: int) -> list[dict]:
    """The records of ``losses.jsonl`` up to step ``upto`` (a cut last line ends it)."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a line cut by a kill
                if rec["step"] <= upto:
                    rows.append(rec)
    return rows


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _check_stored(workdir: str, cfg: TrainConfig, data: TrainingData,
                  resume: bool) -> None:
    """A new run records its config (and data) in ``workdir``; a resumed one must
    match them."""
    cfg_path = os.path.join(workdir, "config.json")
    data_path = os.path.join(workdir, "data.json")
    if not os.path.isfile(cfg_path):
        with open(cfg_path + ".tmp", "w") as f:
            f.write(cfg.to_json())
        os.replace(cfg_path + ".tmp", cfg_path)
        if data.source is not None:
            _write_json(data_path, {"source": data.source,
                                    "preprocessing": data.preprocessing.to_dict()})
        return
    with open(cfg_path) as f:
        stored = TrainConfig.from_dict(json.load(f))
    if not resume:
        raise InputError(f"{workdir} already holds a run; pass --resume to "
                         "continue it or choose a new --workdir")
    if stored != cfg:
        diff = {k: (getattr(stored, k), getattr(cfg, k))
                for k in dataclasses.asdict(cfg)
                if getattr(stored, k) != getattr(cfg, k)}
        raise InputError(f"config differs from the run in {workdir} "
                         f"(stored, given): {diff}")
    had = None
    if os.path.isfile(data_path):
        with open(data_path) as f:
            had = json.load(f)["source"]
    now = data.source
    if (had is None) != (now is None) or (had and had["sha256"] != now["sha256"]):
        raise InputError(
            f"the training data differ from the run in {workdir}: stored "
            f"{had and {k: had[k] for k in ('path', 'count')}}, given "
            f"{now and {k: now[k] for k in ('path', 'count')}}; resume with the "
            "same --data, or choose a new --workdir")


def train(cfg: TrainConfig, workdir: str | os.PathLike, *, data=None,
          resume: bool = False, progress: bool = True,
          on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Trains (or resumes training) the noise predictor of ``cfg`` in ``workdir``.

    Writes ``workdir/config.json``, checkpoints in ``workdir/ckpt/``, a loss log
    ``workdir/losses.jsonl`` (one line per dispatched chunk; with data also
    ``val_loss`` at each checkpoint), and at the end the eval-mode model in
    ``workdir/model`` (load it with ``sijax.checkpoint.load_model``).

    With ``data`` (see :func:`training_data`) the model directory also records the
    data source (path, count, SHA-256), the preprocessing every command applies to
    an image file, the detection threshold calibrated on the held-out images
    (``cfg.threshold_quantile`` of their score maps), and noise models estimated
    from all the normal images (``noise/<kind>/``: "pixel", "stationary" and
    "lowrank"; ``cfg.noise_model`` is the default of ``sijax test --sigma model``).

    Args:
        cfg: the configuration (with ``resume``, it must equal the stored one; with
            data, ``n_train`` and ``in_channels`` are taken from the data).
        workdir: run directory.
        data: None (iid N(0, 1) images), a path or an array of images.
        resume: continue from the latest checkpoint in ``workdir``.
        progress: show a tqdm bar with the loss.
        on_checkpoint: called with the step after each checkpoint is written
            (tests use it to simulate a kill).

    Raises:
        InputError: existing run without ``resume``, a config or data that differ
            from the stored ones, unreadable data.
    """
    workdir = ensure_output_dir(os.path.abspath(os.fspath(workdir)))
    images = training_data(cfg, data)
    cfg = data_config(cfg, images)
    _check_stored(workdir, cfg, images, resume)

    graphdef, state, _ = init_state(cfg)
    ckpts = _Checkpoints(workdir)
    start = 0
    if resume:
        start, state = ckpts.restore_latest(state)
    loss_path = os.path.join(workdir, "losses.jsonl")
    log_rows = _read_log(loss_path, start)
    with open(loss_path, "w") as f:  # drop lines after the restored step
        f.writelines(json.dumps(r) + "\n" for r in log_rows)

    train_x = jnp.asarray(images.train)
    val_x = jnp.asarray(images.val[:VAL_IMAGES])
    val_loss = make_val_loss(cfg) if len(val_x) else None
    chunk = make_train_chunk(cfg)
    d, total = cfg.steps_per_dispatch, cfg.total_steps
    save_every = -(-cfg.save_every // d) * d
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {cfg.name}",
                   unit="step", dynamic_ncols=True)
    step, run_time, timed_steps = start, 0.0, 0
    try:
        with open(loss_path, "a") as log:
            while step < total:
                end = min(step + d, total)
                t0 = time.perf_counter()
                state, chunk_losses = chunk(
                    state, train_x, jnp.arange(step, step + d, dtype=jnp.int32))
                mean_loss = float(jnp.nanmean(chunk_losses))
                dt = time.perf_counter() - t0
                if step > start:  # the first chunk pays for compilation
                    run_time, timed_steps = run_time + dt, timed_steps + end - step
                step = end
                row = {"step": step, "loss": mean_loss}
                saving = step % save_every == 0 or step == total
                if saving and val_loss is not None:
                    row["val_loss"] = float(val_loss(state, val_x))
                log_rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(end - bar.n)
                    shown = {"loss": f"{mean_loss:.4f}"}
                    vals = [r["val_loss"] for r in log_rows if "val_loss" in r]
                    if vals:
                        shown["val"] = f"{vals[-1]:.4f}"
                    bar.set_postfix(shown)
                if saving:
                    ckpts.save(step, state)
                    if on_checkpoint is not None:
                        on_checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
        ckpts.close()
    sec = run_time / timed_steps if timed_steps else float("nan")
    loss_arr = np.asarray([(r["step"], r["loss"]) for r in log_rows],
                          dtype=np.float64).reshape(-1, 2)
    net_state = nnx.merge_state(state.params, state.batch_stats)
    tail = loss_arr[-max(1, len(loss_arr) // 10):, 1]
    summary = {"steps": int(step), "final_loss": float(tail.mean()),
               "final_loss_window_steps": int(len(tail) * d),
               "backend": jax.default_backend()}
    if timed_steps:  # else not measured; NaN would make config.json invalid JSON
        summary["seconds_per_step"] = sec
    vals = [r["val_loss"] for r in log_rows if "val_loss" in r]
    if vals:
        summary["final_val_loss"] = vals[-1]
    model = DiffusionModel(config=cfg, graphdef=graphdef,
                           state=cast_state(net_state, DTYPE))
    model_dir = os.path.join(workdir, "model")
    extra = None
    if images.source is not None:
        extra = _data_facts(cfg, model, images)
    elif cfg.detector != "dal" and model.detector.has_region:
        extra = {"detect": _synthetic_threshold(cfg, model)}
    save_model(model_dir, cfg, net_state, summary=summary, extra=extra)
    if images.source is not None:
        save_noise_models(model_dir, cfg, images)
    return TrainResult(model, state, loss_arr, sec)


def _data_facts(cfg: TrainConfig, model: DiffusionModel, images: TrainingData):
    """What config.json records of a data-trained model: the data, the
    preprocessing and the calibrated threshold."""
    facts = {"data": images.source,
             "preprocessing": images.preprocessing.to_dict()}
    fit = model.detector.fit
    if fit is not None:
        # Image-level detectors: fitted on the held-out normal images (all the
        # normal images when none are held out).
        normal = images.val if len(images.val) else images.train
        x64 = jnp.result_type(float) == jnp.float64
        facts["image_fit"] = fit(model.astype(jnp.float64 if x64 else jnp.float32),
                                 np.asarray(normal))
    if len(images.val) and model.detector.has_region:
        x64 = jnp.result_type(float) == jnp.float64
        threshold = calibrate_threshold(
            model.astype(jnp.float64 if x64 else jnp.float32), images.val,
            cfg.threshold_quantile)
        facts["detect"] = {"threshold": threshold,
                           "quantile": cfg.threshold_quantile,
                           "images": len(images.val)}
        if len(images.val) < FEW_HELD_OUT:
            warnings.warn(InputWarning(
                f"the threshold {threshold:.4g} is the {cfg.threshold_quantile} "
                f"quantile of the score maps of {len(images.val)} held-out image(s) "
                "only: it may sit far from where it would on other normal images "
                "(hold out more with --set val_fraction=F, or give sijax test "
                "--threshold)"), stacklevel=3)
    elif model.detector.has_region:
        warnings.warn(InputWarning(
            "no held-out images (fewer than 10, or val_fraction=0): the model keeps "
            "the default threshold 0.8, which was chosen for N(0, 1) images; pass "
            "--threshold to sijax test"), stacklevel=3)
    return facts


SYNTHETIC_CALIBRATION_IMAGES = 50  # fresh N(0, 1) images a synthetic threshold uses


def _synthetic_threshold(cfg: TrainConfig, model: DiffusionModel) -> dict:
    """The detection threshold of a detector other than the DAL one trained on
    N(0, 1) images: ``cfg.threshold_quantile`` of its score maps on fresh N(0, 1)
    images (drawn from the seed's own "calibrate" key, never trained on).

    The paper's 0.8 was chosen for the DAL detector's map; the other detectors'
    maps live on other scales (DeCo-Diff's clipped error, MDPS's averaged
    posterior error), and at 0.8 they may flag nothing. The DAL detector keeps
    0.8, so the paper's experiments stay the paper's."""
    x = normal_images(_keys(cfg.seed)["calibrate"], SYNTHETIC_CALIBRATION_IMAGES,
                      cfg.image_shape, DTYPE)
    x64 = jnp.result_type(float) == jnp.float64
    threshold = calibrate_threshold(
        model.astype(jnp.float64 if x64 else jnp.float32), np.asarray(x),
        cfg.threshold_quantile)
    return {"threshold": threshold, "quantile": cfg.threshold_quantile,
            "images": SYNTHETIC_CALIBRATION_IMAGES, "source": "N(0, 1)"}


def save_noise_models(model_dir: str, cfg: TrainConfig,
                      images: TrainingData) -> None:
    """Estimates the three noise models from all the normal images (training and
    held-out, preprocessed) and writes them to ``model_dir/noise/<kind>/``."""
    from sijax.noise_model import estimate_noise_model, save_noise_model

    x = np.concatenate([images.train, images.val]).astype(np.float64)
    for kind in ("pixel", "stationary", "lowrank"):
        # At most half the images' directions go to the components, so that the
        # residual variances are estimated from data (with rank N - 1 the
        # components span every centred image and the residual is zero).
        rank = min(cfg.noise_rank, max(1, (len(x) - 1) // 2))
        options = {"rank": rank} if kind == "lowrank" else {}
        nm = estimate_noise_model(x, kind, **options)
        save_noise_model(os.path.join(model_dir, "noise", kind), nm)
