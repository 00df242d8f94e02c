"""One trial, one batch: the images of trial ``(setting, index)``
(:func:`trial_data`), the models of the settings, and :func:`run_batch`, which tests
a batch of trials with every method, sharded over the devices of a
:func:`device_mesh`.

Methods (docs/method.md §5): ``selective`` (the DAL test: parametric search, or
exhaustive
for the ``pieces`` experiment), ``oc`` (over-conditioning), ``naive`` (z-test on the
same region), ``bonferroni`` (naive p-value times 2^n) and ``permutation`` (pooled
test/reference pixels, :func:`sijax.detect.permutation.permutation_test`). Rejection
means p < alpha; with termination "decision" the selective test rejects when its upper
bound sup_p < alpha (the search stops once the side of alpha is known).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.detect.dal import (
    DALConfig,
    dal_test_batch,
    draw_noises,
    error_message,
    resolve_engine,
)
from sijax.diffusion.sampler import Noises
from sijax.errors import InputError
from sijax.experiments.files import provenance
from sijax.experiments.noise import sample_noise
from sijax.experiments.spec import Setting
from sijax.status import Status


class TrialData(NamedTuple):
    """Inputs of one trial (host arrays)."""

    x: np.ndarray  # (H, W, C) test image
    x_ref: np.ndarray  # (H, W, C) reference image
    eps0: np.ndarray  # (H, W, C) sampler noise of the forward jump
    eps: np.ndarray  # (S, H, W, C) sampler noises of the DDIM steps
    key: int  # seed of the trial's permutations


def planted_mean(setting: Setting, index: int, shape) -> tuple[np.ndarray, Any]:
    """E[X] of trial ``index`` (delta on its square) and the trial's data, rebuilt
    from :func:`trial_data`'s random stream (noise, reference noise, then the
    square's corner) and checked against its image (for interval coverage and
    per-component truth).

    Raises:
      RuntimeError: the stream no longer matches trial_data's.
    """
    rng = np.random.default_rng([setting.data_seed, index])
    kw = dict(
        covariance=setting.covariance, noise=setting.noise, distance=setting.distance
    )
    noise = sample_noise(rng, shape, **kw)
    sample_noise(rng, shape, **kw)
    side = max(1, setting.size // 3)
    r0, c0 = rng.integers(0, setting.size - side + 1, size=2)
    mean = np.zeros(shape)
    mean[r0 : r0 + side, c0 : c0 + side] = setting.delta
    data = trial_data(setting, index, shape[2])
    if not np.allclose(noise + mean, data.x):
        raise RuntimeError("planted_mean no longer follows trial_data's stream")
    return mean, data


def trial_data(
    setting: Setting,
    index: int,
    channels: int = 1,
    num_steps: int = len(DALConfig().steps),
) -> TrialData:
    """The images and sampler noises of trial ``index`` of ``setting``.

    A pure function of its arguments (numpy PCG64 seeded with
    ``(setting.data_seed, index)``): the test image is noise plus ``delta`` on one
    floor(d/3) square at a uniformly random position (docs/method.md §7), the reference
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


def load_models(settings: Sequence[Setting]) -> dict[tuple[str, str], Any]:
    """{(checkpoint, activation): model} of ``settings``, each checkpoint loaded once.

    Raises:
      InputError: a checkpoint is for another image size than its setting.
    """
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


def device_mesh(devices=None):
    """A 1-D mesh ("batch",) over ``devices`` (default: all devices of all hosts)."""
    from jax.sharding import Mesh

    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("batch",))


def shard(mesh, array: np.ndarray):
    """Global array with its leading (batch) axis split over ``mesh``; every process
    builds it from the same host data and places only its addressable shards."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def gather(tree):
    """Host copies of (possibly multi-host sharded) result arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


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
      JSON-ready dicts: setting key, index, status (its ``Status.code``: 0 ok, 1 no
      region, 2 max_pieces), valid, region size, z, seconds, the region threshold
      (:func:`model_threshold`), the commit and engine that made it
      (:func:`sijax.experiments.files.provenance`), and per method p, reject
      (and inf_p, sup_p, pieces for "selective").

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
    noises = Noises(eps0=arrays["eps0"], eps=arrays["eps"])
    if _detector(model) != "dal":
        # Another detector draws its own noises, from the trial's key.
        noises = jax.vmap(lambda s: draw_noises(jax.random.key(s), model))(
            jnp.asarray([d.key for d in padded], jnp.uint32))
    if mesh is not None:
        arrays = {k: shard(mesh, v) for k, v in arrays.items()}
        noises = jax.tree.map(lambda v: shard(mesh, v), noises)
    threshold = model_threshold(model)
    runs = [m for m in ("selective", "oc") if m in methods]
    if not runs:  # naive/bonferroni/permutation need the region and z: cheapest run
        runs = ["oc"]
    out, seconds, fresh = {}, 0.0, False
    for m in runs:
        cfg = dataclasses.replace(setting.dal_config(m, threshold), engine=engine)
        if m == runs[0]:  # as dal_test_batch resolves it (no lanes given)
            made_by = provenance(
                resolve_engine(cfg, model, shape, lockstep=mesh is not None).engine
            )
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
        out[m] = gather(res._replace(truncated=None))
        seconds += time.perf_counter() - t0
    first = out[runs[0]]
    n_pix = int(np.prod(shape))
    records = []
    for j, index in enumerate(indices):
        for res in out.values():  # an error is not a skipped trial: it would bias
            if Status.from_code(res.status[j]) is Status.ERROR:  # the estimates
                why = error_message(res.stat_status[j], res.search_status[j])
                raise InputError(f"{setting.key}, trial {index}: {why}")
        status = int(first.status[j])
        valid = Status.from_code(status).valid
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
            "threshold": threshold,
            **made_by,
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
                    "capped": Status.from_code(s.status[j]) is Status.MAX_PIECES,
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


def model_threshold(model) -> float:
    """The region threshold a model's trials use: the one calibrated when it was
    trained (``model.info.threshold``: data-trained models, and the detectors
    other than the DAL one trained on N(0, 1)), else the default 0.8."""
    info = getattr(model, "info", None)
    calibrated = getattr(info, "threshold", None)
    return DALConfig().threshold if calibrated is None else float(calibrated)


def _detector(model) -> str:
    """The detector of a model ("dal" for models that do not say)."""
    return getattr(getattr(model, "config", None), "detector", "dal")


def _permutation(model, setting: Setting, data: TrialData, permutations: int) -> dict:
    from sijax.detect.permutation import permutation_test

    res = permutation_test(
        model,
        data.x,
        data.x_ref,
        sigma=setting.covariance,
        noises=(Noises(eps0=jnp.asarray(data.eps0), eps=jnp.asarray(data.eps))
                if _detector(model) == "dal"
                else draw_noises(jax.random.key(data.key), model)),
        key=jax.random.key(data.key),
        num_permutations=permutations,
        config=DALConfig(alpha=setting.alpha, threshold=model_threshold(model)),
    )
    p = float(res.p_value)
    return {
        "p": p,
        "num_valid": int(res.num_valid),
        "num_skipped": int(res.num_skipped),
        "reject": bool(np.isfinite(p) and p < setting.alpha),
    }
