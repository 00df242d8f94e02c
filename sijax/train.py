"""Training of the noise predictor (spec section 6), resumable and reproducible.

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
from sijax.errors import CheckpointError, InputError, ensure_output_dir

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
        seconds_per_step: wall time per step of this call, compile time excluded.
    """

    model: DiffusionModel
    state: TrainState
    losses: np.ndarray
    seconds_per_step: float


def _keys(seed: int):
    root = jax.random.key(seed)
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(("data", "init", "order", "step"))}


def init_state(cfg: TrainConfig) -> tuple[Any, TrainState, Any]:
    """The U-Net graphdef, the initial TrainState, and the optimiser."""
    graphdef, params, batch_stats = nnx.split(
        nnx.merge(*init_unet(cfg.unet_config(), _keys(cfg.seed)["init"], DTYPE)),
        nnx.Param, nnx.BatchStat)
    opt = optax.adam(cfg.lr)
    state = TrainState(jnp.asarray(0, jnp.int32), params, batch_stats, opt.init(params))
    return graphdef, state, opt


def training_data(cfg: TrainConfig) -> jax.Array:
    """The cfg.n_train iid N(0, 1) images, (n, H, W, C) float32."""
    return normal_images(_keys(cfg.seed)["data"], cfg.n_train, cfg.image_shape, DTYPE)


@functools.lru_cache(maxsize=8)
def make_train_chunk(cfg: TrainConfig) -> Callable:
    """Builds ``chunk(state, data, steps) -> (state, losses)``, jitted once.

    Cached per config, so repeated or resumed runs in one process compile once.

    ``steps`` is the (D,) vector of absolute step numbers to run (those >= the total
    are no-ops with NaN loss); batch, t and noise
    of each step are functions of (seed, step) only.
    """
    graphdef, _, opt = init_state(cfg)
    keys = _keys(cfg.seed)
    schedule = cfg.schedule()
    n, bs, spe = cfg.n_train, cfg.batch_size, cfg.steps_per_epoch

    def loss_fn(params, batch_stats, x0, t, eps):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        loss = noise_prediction_loss(lambda x, tt: model(x, tt, train=True),
                                     schedule, x0, t, eps)
        return loss, nnx.state(model, nnx.BatchStat)

    def one_step(state: TrainState, inputs):
        step, data = inputs
        epoch, k = step // spe, step % spe
        order = jax.random.permutation(jax.random.fold_in(keys["order"], epoch), n)
        x0 = data[jax.lax.dynamic_slice_in_dim(order, k * bs, bs)]
        kt, ke = jax.random.split(jax.random.fold_in(keys["step"], step))
        t = jax.random.randint(kt, (bs,), 0, cfg.T)
        eps = jax.random.normal(ke, x0.shape, DTYPE)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x0, t, eps)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), loss

    total = cfg.total_steps

    @jax.jit
    def chunk(state: TrainState, data: jax.Array, steps: jax.Array):
        def body(s, step):
            new, loss = one_step(s, (step, data))
            # Steps past the end (padding of the last chunk) leave the state as is,
            # so every chunk has the same length and compiles once.
            active = step < total
            new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s)
            return new, jnp.where(active, loss, jnp.nan)

        return jax.lax.scan(body, state, steps)

    return chunk


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


def _read_losses(path: str, upto: int) -> list[tuple[int, float]]:
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a line cut by a kill
                if rec["step"] <= upto:
                    rows.append((rec["step"], rec["loss"]))
    return rows


def train(cfg: TrainConfig, workdir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True,
          on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Trains (or resumes training) the noise predictor of ``cfg`` in ``workdir``.

    Writes ``workdir/config.json``, checkpoints in ``workdir/ckpt/``, a loss log
    ``workdir/losses.jsonl`` (one line per dispatched chunk), and at the end the
    eval-mode model in ``workdir/model`` (load it with ``sijax.checkpoint.load_model``).

    Args:
        cfg: the configuration (with ``resume``, it must equal the stored one).
        workdir: run directory.
        resume: continue from the latest checkpoint in ``workdir``.
        progress: show a tqdm bar with the loss.
        on_checkpoint: called with the step after each checkpoint is written
            (tests use it to simulate a kill).

    Raises:
        InputError: existing run without ``resume``, or a config that differs from
            the stored one.
    """
    workdir = ensure_output_dir(os.path.abspath(os.fspath(workdir)))
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.isfile(cfg_path):
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
    else:
        with open(cfg_path + ".tmp", "w") as f:
            f.write(cfg.to_json())
        os.replace(cfg_path + ".tmp", cfg_path)

    graphdef, state, _ = init_state(cfg)
    ckpts = _Checkpoints(workdir)
    start = 0
    if resume:
        start, state = ckpts.restore_latest(state)
    loss_path = os.path.join(workdir, "losses.jsonl")
    losses = _read_losses(loss_path, start)
    with open(loss_path, "w") as f:  # drop lines after the restored step
        f.writelines(json.dumps({"step": s, "loss": v}) + "\n" for s, v in losses)

    data = training_data(cfg)
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
                    state, data, jnp.arange(step, step + d, dtype=jnp.int32))
                mean_loss = float(jnp.nanmean(chunk_losses))
                dt = time.perf_counter() - t0
                if step > start:  # the first chunk pays for compilation
                    run_time, timed_steps = run_time + dt, timed_steps + end - step
                step = end
                losses.append((step, mean_loss))
                log.write(json.dumps({"step": step, "loss": mean_loss}) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(end - bar.n)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                if step % save_every == 0 or step == total:
                    ckpts.save(step, state)
                    if on_checkpoint is not None:
                        on_checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
        ckpts.close()
    sec = run_time / timed_steps if timed_steps else float("nan")
    loss_arr = np.asarray(losses, dtype=np.float64).reshape(-1, 2)
    net_state = nnx.merge_state(state.params, state.batch_stats)
    tail = loss_arr[-max(1, len(loss_arr) // 10):, 1]
    summary = {"steps": int(step), "final_loss": float(tail.mean()),
               "final_loss_window_steps": int(len(tail) * d),
               "seconds_per_step": sec, "backend": jax.default_backend()}
    save_model(os.path.join(workdir, "model"), cfg, net_state, summary=summary)
    model = DiffusionModel(config=cfg, graphdef=graphdef,
                           state=cast_state(net_state, DTYPE))
    return TrainResult(model, state, loss_arr, sec)
