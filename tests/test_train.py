"""Training (docs/method.md §6): the loss falls, and kill + --resume is exact."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from sijax.checkpoint import load_model
from sijax.config import TrainConfig
from sijax.errors import CheckpointError, InputError
from sijax.train import train

# 64 images, batch 16: 4 steps per epoch, 40 steps, dispatched 4 at a time; the
# last chunk is padded (42 would not divide), checkpoints every 8 steps.
CFG = TrainConfig(name="test", size=8, channels=(4, 8), n_train=64, batch_size=16,
                  epochs=10, lr=3e-3, steps_per_dispatch=3, save_every=8)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, train(CFG, workdir, progress=False)


def test_loss_decreases_and_model_is_exported(full_run):
    workdir, res = full_run
    assert int(res.state.step) == CFG.total_steps == 40
    losses = res.losses[:, 1]
    assert np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.75 * losses[:2].mean(), losses
    model = load_model(workdir)
    assert model.config == CFG
    loaded = jax.tree.leaves(nnx.to_pure_dict(model.state))
    trained = jax.tree.leaves(nnx.to_pure_dict(res.model.state))
    for a, b in zip(loaded, trained, strict=True):
        assert a.dtype == np.float64  # stored float32, cast at load: exact
        np.testing.assert_array_equal(a, np.asarray(b, np.float64))
    with open(workdir / "model" / "config.json") as f:
        assert json.load(f)["summary"]["steps"] == 40
    # The DAL detector on N(0, 1) images keeps the paper's threshold 0.8 (the
    # other detectors calibrate one: tests/test_detector_ddad.py).
    assert model.info.threshold is None


def test_kill_after_checkpoint_then_resume_is_bit_identical(full_run, tmp_path):
    _, ref = full_run
    saved = []

    def kill(step):
        saved.append(step)
        if step == 18:  # dies right after the 2nd checkpoint is on disk
            raise Killed

    with pytest.raises(Killed):
        train(CFG, tmp_path, progress=False, on_checkpoint=kill)
    assert saved == [9, 18]  # save_every 8 rounded up to a multiple of 3
    res = train(CFG, tmp_path, resume=True, progress=False)
    assert int(res.state.step) == 40
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(ref.state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(res.losses, ref.losses)


def test_resume_skips_a_damaged_checkpoint_and_stays_exact(full_run, tmp_path):
    """A flipped bit in the newest training checkpoint (Orbax would restore it as
    another weight) is caught by its SHA-256: the run warns, moves it aside and
    resumes from the step before, with the same result. None usable: an error."""
    _, ref = full_run

    def kill(step):
        if step == 18:
            raise Killed

    with pytest.raises(Killed):
        train(CFG, tmp_path, progress=False, on_checkpoint=kill)
    sums = json.loads((tmp_path / "ckpt_sha256.json").read_text())
    assert sorted(sums, key=int) == ["9", "18"]
    chunk = max((f for f in (tmp_path / "ckpt" / "18").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as caught:
        res = train(CFG, tmp_path, resume=True, progress=False)
    said = [str(w.message) for w in caught]
    assert any(re.search("step 18 is damaged.*SHA-256", m) for m in said), said
    assert any("moved the damaged steps [18]" in m for m in said), said
    assert (tmp_path / "ckpt_damaged" / "18").is_dir()
    for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(ref.state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(res.losses, ref.losses)
    # Every checkpoint damaged: an error that says what to do, not a silent restart.
    for step in json.loads((tmp_path / "ckpt_sha256.json").read_text()):
        for f in (tmp_path / "ckpt" / step).rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="remove ckpt"):
        train(CFG, tmp_path, resume=True, progress=False)


def test_existing_run_and_changed_config_are_rejected(full_run):
    workdir, _ = full_run
    with pytest.raises(InputError, match="--resume"):
        train(CFG, workdir, progress=False)
    with pytest.raises(InputError, match="lr"):
        train(dataclasses.replace(CFG, lr=1e-3), workdir, resume=True, progress=False)
    # Resuming a finished run is a no-op that returns the same state.
    res = train(CFG, workdir, resume=True, progress=False)
    assert int(res.state.step) == 40


def test_resuming_a_finished_run_writes_strict_json(full_run, capsys):
    # No step runs, so none is timed: config.json once held `NaN` (not JSON) as
    # seconds_per_step and the CLI printed "nan ms/step".
    from sijax.cli import main

    workdir, _ = full_run
    assert main(["train", "--workdir", str(workdir), "--resume",
                 "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "ms/step not measured" in stdout and "nan" not in stdout

    def strict(text):
        raise ValueError(f"{text} in config.json is not JSON")

    with open(workdir / "model" / "config.json") as f:
        summary = json.load(f, parse_constant=strict)["summary"]
    assert summary["steps"] == 40 and "seconds_per_step" not in summary


def test_a_threshold_from_few_held_out_images_warns(tmp_path):
    """20 images hold out 2: their score maps' quantile is a noisy threshold."""
    from sijax.errors import InputWarning

    data = np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    cfg = dataclasses.replace(CFG, epochs=1, batch_size=8)
    with pytest.warns(InputWarning, match=r"quantile of the score maps of 2 held-out"):
        train(cfg, tmp_path / "few", data=data, progress=False)
    model = load_model(tmp_path / "few")
    assert model.preprocessing.stored == {"channels": 1, "min_hw": [8, 8],
                                          "max_hw": [8, 8]}
