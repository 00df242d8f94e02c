"""Model directories: committed checkpoints load; bad ones give CheckpointError."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sijax.checkpoint import (
    CHECKPOINTS_DIR,
    load_model,
    read_summary,
    save_model,
    state_checksums,
)
from sijax.errors import CheckpointError, InputError, SijaxError


@pytest.mark.parametrize("name,size,channels", [
    ("tiny_8", 8, (4, 8, 16)), ("dal_v5_8", 8, (32, 64, 128, 256)),
    ("dal_v5_16", 16, (32, 64, 128, 256)), ("dal_v5_32", 32, (32, 64, 128, 256)),
    ("dal_v5_64", 64, (32, 64, 128, 256))])
def test_committed_checkpoints(name, size, channels):
    model = load_model(name)
    assert model.image_shape == (size, size, 1)
    assert model.config.channels == channels
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(model.state))
    summary = read_summary(name)
    # Trained: the loss is near the Bayes risk mean(alpha_bar) = 0.2755 of N(0,1) data.
    assert summary["final_loss"] < 0.30, summary
    eps = jax.jit(model.denoiser())(jnp.zeros(model.image_shape), 460)
    assert eps.shape == model.image_shape and np.all(np.isfinite(eps))


def test_tiny_model_predicts_noise():
    """The trained tiny model's eps_hat is close to the optimal sqrt(1-ab) x_t."""
    model = load_model("tiny_8")
    ab = model.schedule.alpha_bar[500]
    x_t = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
    eps_hat = model.apply(x_t, jnp.full((16,), 500))
    corr = np.corrcoef(np.ravel(eps_hat), np.ravel(x_t))[0, 1]
    assert corr > 0.9, corr
    assert abs(np.std(eps_hat) / np.std(x_t) - np.sqrt(1 - ab)) < 0.15


def test_relative_paths(tmp_path, monkeypatch):
    """A model directory given relative to the working directory loads (Orbax itself
    refuses relative paths; the README's commands use them)."""
    shutil.copytree(f"{CHECKPOINTS_DIR}/tiny_8", tmp_path / "models" / "m")
    monkeypatch.chdir(tmp_path)
    model = load_model("models/m")
    reference = load_model("tiny_8")
    for a, b in zip(jax.tree.leaves(model.state), jax.tree.leaves(reference.state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_summary("models/m") == read_summary("tiny_8")


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    # A bare name is looked up among the committed models too: say so.
    with pytest.raises(CheckpointError, match="nor is 'dal_v5_9' a committed model "
                       r"\(dal_v5_16, dal_v5_32, dal_v5_64, dal_v5_8, tiny_8\)"):
        load_model("dal_v5_9")
    with pytest.raises(CheckpointError, match="not a sijax model"):
        load_model(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(f"{CHECKPOINTS_DIR}/tiny_8", bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt config.json"):
        load_model(bad)
    # A config that does not match the stored arrays.
    meta = json.loads(open(f"{CHECKPOINTS_DIR}/tiny_8/config.json").read())
    meta["config"]["channels"] = [4, 8, 32]
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt or incompatible"):
        load_model(bad)
    # Damaged array files.
    shutil.rmtree(bad)
    shutil.copytree(f"{CHECKPOINTS_DIR}/tiny_8", bad)
    for f in (bad / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_model(bad)
    assert issubclass(CheckpointError, SijaxError)


def test_a_changed_state_file_is_refused_not_loaded(tmp_path):
    """Orbax keeps no checksums: one flipped bit in an array chunk loaded silently as
    a different weight (seen before the checksums). The SHA-256 of every state file,
    saved in config.json, catches it, and a missing file, before Orbax reads them."""
    for name in ("tiny_8", "dal_v5_8", "dal_v5_16", "dal_v5_32", "dal_v5_64"):
        d = f"{CHECKPOINTS_DIR}/{name}"
        meta = json.loads(open(f"{d}/config.json").read())
        assert meta["state_sha256"] == state_checksums(f"{d}/state")
    bad = tmp_path / "bad"
    shutil.copytree(f"{CHECKPOINTS_DIR}/tiny_8", bad)
    chunk = max((f for f in (bad / "state").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    rel = str(chunk.relative_to(bad / "state"))
    with pytest.raises(CheckpointError, match=f"1 file.* SHA-256 .first: {rel}"):
        load_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(f"{CHECKPOINTS_DIR}/tiny_8", bad)
    (bad / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointError, match="1 file.s. missing .first: manifest"):
        load_model(bad)


def test_save_model_records_checksums(tmp_path):
    model = load_model("tiny_8")
    out = save_model(tmp_path / "m", model.config, model.state)
    meta = json.loads(open(f"{out}/config.json").read())
    assert meta["state_sha256"] == state_checksums(f"{out}/state")
    assert meta["state_sha256"]  # the files Orbax wrote
    again = load_model(out)
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(model.state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.weights_sha256() == model.weights_sha256()
    scaled = model.replace(state=jax.tree.map(lambda a: a * 1.0001, model.state))
    assert scaled.weights_sha256() != model.weights_sha256()


def test_float64_needs_x64():
    with jax.enable_x64(False), pytest.raises(InputError, match="x64"):
        load_model("tiny_8")


def test_an_edited_config_json_is_refused(tmp_path):
    """config.json has no checksum; entries that contradict the model or cannot
    be a threshold are caught at load, not as an odd error in the first test."""
    from sijax.data import Preprocessing

    good = json.loads(open(f"{CHECKPOINTS_DIR}/tiny_8/config.json").read())
    bad = tmp_path / "bad"
    shutil.copytree(f"{CHECKPOINTS_DIR}/tiny_8", bad)
    prep = Preprocessing(size=8, mean=(0.5,), std=(0.2,)).to_dict()
    for edit, match in [
        ({"preprocessing": {**prep, "size": 16}},
         r"preprocessing gives \(16, 16, 1\) images but the model's config is "
         r"for \(8, 8, 1\)"),
        ({"preprocessing": {**prep, "channels": 3, "mean": [0.5] * 3,
                            "std": [0.2] * 3}}, r"\(8, 8, 3\) images"),
        ({"detect": {"threshold": float("nan")}}, "threshold=nan must be a finite"),
        ({"detect": {"threshold": -1.0}}, "threshold=-1.0 must be"),
        ({"detect": {"threshold": "0.8"}}, "threshold='0.8' must be"),
    ]:
        (bad / "config.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(CheckpointError, match="corrupt config.json.*" + match):
            load_model(bad)
    (bad / "config.json").write_text(json.dumps(
        {**good, "preprocessing": prep, "detect": {"threshold": 1.5}}))
    info = load_model(bad).info
    assert info.threshold == 1.5 and info.preprocessing.size == 8
