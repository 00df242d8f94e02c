"""Real images end to end: a bundled data set, ``sijax train --data``, ``sijax test``
with the stored noise model, ``sijax evaluate`` (resumable) and large images by
tiles."""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the bundled digits need the [data] extra")

from sijax.checkpoint import load_model  # noqa: E402
from sijax.cli import main  # noqa: E402
from sijax.data import build_dataset, open_dataset  # noqa: E402
from sijax.detect.dal import DALConfig  # noqa: E402
from sijax.errors import InputError  # noqa: E402
from sijax.evaluation.evaluate import evaluate  # noqa: E402
from sijax.evaluation.images import model_input, resolve_reference  # noqa: E402
from sijax.evaluation.tiles import tile_origins  # noqa: E402
from sijax.train import train  # noqa: E402


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on 66 digits (6 held out) for 12 epochs."""
    root = tmp_path_factory.mktemp("real")
    data = build_dataset("digits", root / "digits", n_train=66, n_test_good=6,
                         n_test_defect=3, seed=1)
    workdir = root / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # digits have constant border pixels
        rc = main(["train", "--data", data, "--config", "tiny", "--set", "epochs=12",
                   "--set", "batch_size=16", "--workdir", str(workdir),
                   "--no-progress"])
    assert rc == 0
    return data, workdir


def test_train_on_data_records_source_preprocessing_threshold_noise(trained):
    data, workdir = trained
    meta = json.loads((workdir / "model" / "config.json").read_text())
    assert meta["data"]["path"] == os.path.abspath(data)
    assert len(meta["data"]["sha256"]) == 64
    assert meta["config"]["n_train"] == 59  # 66 minus round(10%) = 7 held out
    prep = meta["preprocessing"]
    assert prep["size"] == 8 and prep["channels"] == 1
    assert 0.0 < meta["detect"]["threshold"] < 50.0
    assert sorted(os.listdir(workdir / "model" / "noise")) == [
        "lowrank", "pixel", "stationary"]
    rows = [json.loads(line) for line in open(workdir / "losses.jsonl")]
    assert "val_loss" in rows[-1] and np.isfinite(rows[-1]["val_loss"])
    model = load_model(workdir)
    assert model.info.threshold == meta["detect"]["threshold"]
    assert model.preprocessing.mean == tuple(prep["mean"])
    # The data changed since the run started: resuming refuses it.
    other = build_dataset("digits", workdir.parent / "other", n_train=66,
                          n_test_good=6, n_test_defect=3, seed=2)
    cfg = model.config
    with pytest.raises(InputError, match="training data differ"):
        train(cfg, workdir, data=other, resume=True, progress=False)


def test_one_file_gives_one_input_whatever_its_format(trained, tmp_path):
    from PIL import Image

    data, workdir = trained
    model = load_model(workdir)
    path = os.path.join(data, "test", "good", sorted(os.listdir(
        os.path.join(data, "test", "good")))[0])
    u8 = np.asarray(Image.open(path))
    np.save(tmp_path / "u8.npy", u8)
    Image.fromarray(u8.astype(np.uint16) * 257).save(tmp_path / "u16.png")
    from sijax.data.images import read_raw

    want = model_input(model, read_raw(path), path)
    for other in ("u8.npy", "u16.png"):
        got = model_input(model, read_raw(tmp_path / other), other)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_cli_test_uses_the_stored_noise_model_and_threshold(trained, capsys,
                                                            tmp_path):
    data, workdir = trained
    spot = os.path.join(data, "test", "spot")
    image = os.path.join(spot, sorted(os.listdir(spot))[0])
    rc, out, err = run(capsys, "test", "--checkpoint", str(workdir), "--image",
                       image, "--out", str(tmp_path / "t"), "--no-progress",
                       "--search", "exhaustive")
    assert rc == 0, err
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["sigma"] == "model:lowrank"
    assert report["reference"] == "template"
    model = load_model(workdir)
    assert report["config"]["threshold"] == model.info.threshold
    # Another stored kind, and a model with none: a clear error.
    rc, _, err = run(capsys, "test", "--checkpoint", str(workdir), "--image", image,
                     "--sigma", "model:nope", "--out", str(tmp_path / "t2"))
    assert rc == 2 and "no noise model 'nope'" in err
    rc, _, err = run(capsys, "test", "--checkpoint", "tiny_8", "--image", image,
                     "--out", str(tmp_path / "t3"))
    assert rc == 2 and "--sigma is required" in err


def test_evaluate_resumes_without_redoing_or_losing_an_image(trained, tmp_path):
    data, workdir = trained
    model = load_model(workdir)
    ds = open_dataset(data)
    ref = resolve_reference(model, "model:pixel")
    config = DALConfig(threshold=model.info.threshold, termination="decision")
    out = str(tmp_path / "ev")
    kw = dict(config=config, checkpoint=str(workdir), reports=False,
              progress=False, max_per_kind=2)
    evaluate(model, ds, ref, out, max_batches=3, **kw)
    first = [json.loads(line) for line in open(os.path.join(out, "images.jsonl"))]
    assert len(first) == 3
    with pytest.raises(InputError, match="--resume"):
        evaluate(model, ds, ref, out, **kw)
    # A call refused for want of --resume leaves the stored settings alone (it once
    # overwrote them, and a resume with its settings then mixed two runs).
    with pytest.raises(InputError, match="--resume"):
        evaluate(model, ds, ref, out, seed=5, **kw)
    with pytest.raises(InputError, match="other settings"):
        evaluate(model, ds, ref, out, resume=True, seed=5, **kw)
    summary = evaluate(model, ds, ref, out, resume=True, **kw)
    recs = [json.loads(line) for line in open(os.path.join(out, "images.jsonl"))]
    assert recs[:3] == first  # kept, not redone
    assert sorted(r["index"] for r in recs) == list(range(8))  # 4 kinds x 2
    for r in recs:
        assert {"path", "kind", "region_size", "p_value", "inf_p", "sup_p",
                "naive_p_value", "status"} <= set(r)
    assert summary["images"] == 8
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        assert key in summary and 0.0 <= summary[key] <= 1.0
    assert set(summary["kinds"]) == {"good", "missing", "scratch", "spot"}
    assert os.path.isfile(os.path.join(out, "overview.png"))
    # Changed settings are refused on resume.
    with pytest.raises(InputError, match="other settings"):
        evaluate(model, ds, ref, out, resume=True, seed=5, **kw)
    # So are other weights or other pixels behind the same paths (a model
    # retrained in its workdir, an image replaced): once mixed in silently.
    other = model.replace(state=jax.tree.map(lambda a: a * 1.01, model.state))
    with pytest.raises(InputError, match="weights_sha256"):
        evaluate(other, ds, ref, out, resume=True, **kw)
    changed = shutil.copytree(data, tmp_path / "copy")
    ds2 = open_dataset(changed)
    evaluate(model, ds2, ref, str(tmp_path / "ev2"), max_batches=1, **kw)
    first = ds2.test[0].source
    os.replace(ds2.test[1].source, first)  # same names and count, other pixels
    shutil.copy(ds2.train[0].source, ds2.test[1].source)
    with pytest.raises(InputError, match="data_sha256"):
        evaluate(model, open_dataset(changed), ref, str(tmp_path / "ev2"),
                 resume=True, **kw)


def test_a_run_refused_for_the_lock_leaves_the_settings_of_the_running_one(
        trained, tmp_path):
    """Another evaluation or tiled test writing ``out`` holds its lock (here taken
    by the test) and may have no record yet: a second run is refused, and without
    writing its settings over the running one's (the resume of the first would then
    be refused, and one with the second's settings would mix the two)."""
    from sijax.evaluation.tiles import run_tiled_test
    from sijax.experiments.files import exclusive

    data, workdir = trained
    model = load_model(workdir)
    ref = resolve_reference(model, "model:pixel")
    config = DALConfig(threshold=model.info.threshold, termination="decision")
    image = np.zeros((12, 12, 1))
    for name, start in [
            ("evaluation.json", lambda out: evaluate(
                model, open_dataset(data), ref, out, config=config, reports=False,
                progress=False, max_per_kind=1)),
            ("tiles_run.json", lambda out: run_tiled_test(
                model, image, ref, config=config, out_dir=out))]:
        out = str(tmp_path / name)
        os.makedirs(out)
        with open(os.path.join(out, name), "w") as f:
            f.write('{"seed": 7}')  # the running run's settings
        with exclusive(out, "sijax test"):
            with pytest.raises(InputError, match="being written by another"):
                start(out)
        with open(os.path.join(out, name)) as f:
            assert f.read() == '{"seed": 7}', name


def test_images_of_varied_sizes_train_and_evaluate(trained, tmp_path):
    """A training image and a defect image (with its mask) of other sizes: each is
    resampled to the model's size, the mask with it."""
    from PIL import Image

    from sijax.train import TrainConfig, training_data

    data, workdir = trained
    root = shutil.copytree(data, tmp_path / "varied")
    ds = open_dataset(root)
    big = np.kron(ds.read(ds.train[0])[..., 0], np.ones((2, 3), np.uint8))
    Image.fromarray(big).save(ds.train[0].source)  # 16x24
    item = next(it for it in ds.test if it.kind == "spot")
    Image.fromarray(np.kron(ds.read(item)[..., 0], np.ones((3, 3), np.uint8))
                    ).save(item.source)  # fmt: skip
    mask = np.kron(ds.read_mask(item).astype(np.uint8) * 255, np.ones((3, 3),
                                                                     np.uint8))
    Image.fromarray(mask).save(item.mask)  # 24x24
    ds = open_dataset(root)
    assert ds.size_of(ds.train[0]) == (16, 24) and ds.size_of(item) == (24, 24)
    cfg = TrainConfig(size=8, val_fraction=0.0)
    td = training_data(cfg, str(root))
    assert td.train.shape == (66, 8, 8, 1)
    model = load_model(workdir)
    ref = resolve_reference(model, "model:pixel")
    out = str(tmp_path / "ev")
    summary = evaluate(model, ds, ref, out, config=DALConfig(
        threshold=model.info.threshold, termination="decision"),
        checkpoint=str(workdir), reports=False, progress=False, max_per_kind=1)
    recs = {r["name"]: r for r in map(json.loads, open(os.path.join(out,
                                                                   "images.jsonl")))}
    assert recs[os.path.join("spot", os.path.basename(item.source))]["status"] in (
        "ok", "no region")
    assert summary["images"] == 4 and 0.0 <= summary["pixel_auroc"] <= 1.0
    # The 24x24 image was warned about once, and its record keeps the warning.
    spot = recs[os.path.join("spot", os.path.basename(item.source))]
    assert len(spot["warnings"]) == 1 and "is 24x24 but the training" in (
        spot["warnings"][0])
    assert summary["images_with_warnings"] == 1
    assert "1 images with input warnings" in open(os.path.join(out,
                                                               "summary.md")).read()


def test_tiles_cover_a_large_image_and_adjust_by_holm(trained, capsys, tmp_path):
    from PIL import Image

    assert tile_origins(20, 16, 8) == [(r, c) for r in (0, 8, 12) for c in (0, 8)]
    with pytest.raises(InputError, match="smaller than one tile"):
        tile_origins(7, 20, 8)
    data, workdir = trained
    rng = np.random.default_rng(0)
    big = (rng.random((20, 16)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    rc, out, err = run(capsys, "test", "--checkpoint", str(workdir), "--image",
                       str(tmp_path / "big.png"), "--tiles", "--out",
                       str(tmp_path / "tiles"), "--no-progress", "--termination",
                       "decision")
    assert rc == 0, err
    assert "big.png: 20x16, 6 tiles of 8x8; each tile with a region" in err
    rep = json.loads((tmp_path / "tiles" / "tiles.json").read_text())
    assert len(rep["tiles"]) == 6 and rep["adjustment"] == "holm"
    tested = [t for t in rep["tiles"] if t["adjusted_p"] is not None]
    m = len(tested)
    for t in tested:  # Holm never lowers a p-value and is at most m times it
        assert t["sup_p"] <= t["adjusted_p"] <= min(1.0, m * t["sup_p"]) + 1e-12
        # Printed as known: a decided tile's p is its side of alpha or its bounds,
        # its adjusted p an upper bound, never a point inside the bounds.
        line = next(x for x in out.splitlines() if f"tile {t['tile']} at" in x)
        assert t["p_text"] in line
        assert ("Holm-adjusted <= " in line) != t["p_exact"]
    assert (tmp_path / "tiles" / "tiles.png").is_file()
    # Each tile was recorded as it finished: a killed run resumes where it stopped
    # and gives the same tiles; records without --resume, or a resume with other
    # settings, are refused.
    args = ["test", "--checkpoint", str(workdir), "--image", str(tmp_path / "big.png"),
            "--tiles", "--out", str(tmp_path / "tiles"), "--no-progress",
            "--termination", "decision"]
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "--resume" in err
    jsonl = tmp_path / "tiles" / "tiles.jsonl"
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 6
    jsonl.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # killed mid-write
    rc, _, err = run(capsys, *args, "--resume")
    assert rc == 0, err
    again = json.loads((tmp_path / "tiles" / "tiles.json").read_text())
    strip = ["seconds"]
    assert ([{k: v for k, v in t.items() if k not in strip} for t in again["tiles"]]
            == [{k: v for k, v in t.items() if k not in strip} for t in rep["tiles"]])
    rc, _, err = run(capsys, *args, "--resume", "--seed", "3")
    assert rc == 2 and "other settings" in err and "seed" in err
    rc, _, err = run(capsys, "test", "--checkpoint", str(workdir), "--image",
                     str(tmp_path / "big.png"), "--resume")
    assert rc == 2 and "go with --tiles" in err


def test_a_tiled_test_refuses_pixels_as_stored(model):
    """run_tiled_test takes the image in the model's units: uint8 pixels as read
    from a file (0..255, hundreds of standard deviations) are refused, not tested
    into a region and a tiny p-value in every tile."""
    from sijax.evaluation.tiles import run_tiled_test

    ref = resolve_reference(model, 1.0)
    raw = np.random.default_rng(0).integers(0, 256, (12, 12, 1), dtype=np.uint8)
    with pytest.raises(InputError, match="dtype uint8.*check_native"):
        run_tiled_test(model, raw, ref)


def test_noise_check_reports_every_stored_model_on_held_out_images(trained, capsys,
                                                                   tmp_path):
    data, workdir = trained
    out = tmp_path / "check.json"
    rc, text, err = run(capsys, "noise-check", "--checkpoint", str(workdir),
                        "--data", str(data), "--sizes", "1", "2", "--out", str(out))
    assert rc == 0, err
    rep = json.loads(out.read_text())
    assert set(rep["checks"]) == {"pixel", "stationary", "lowrank"}
    good = len(os.listdir(os.path.join(data, "test", "good")))
    for kind, rows in rep["checks"].items():
        assert [r["size"] for r in rows] == [1, 2] and kind in text
        for r in rows:
            assert r["images"] == good and r["var_z"] > 0
            assert r["var_z_interval_99"][0] < r["var_z"] < r["var_z_interval_99"][1]
    rc, _, err = run(capsys, "noise-check", "--checkpoint", str(workdir), "--data",
                     str(data), "--sizes", "9")
    assert rc == 2 and "side 9" in err
    # The training images themselves (once checked silently: in-sample, the noise
    # models fit whatever the noise).
    rc, _, err = run(capsys, "noise-check", "--checkpoint", str(workdir), "--data",
                     os.path.join(data, "train", "good"))
    assert rc == 2 and "holds the images the model was trained on" in err


def test_input_warnings_show_once_per_kind_and_stay_with_each_record():
    """200 colour images for a grey model once printed 200 near-identical warnings:
    each kind shows once, every image keeps its own."""
    from types import SimpleNamespace

    from sijax.data.datasets import Item
    from sijax.data.preprocess import Preprocessing
    from sijax.errors import InputWarning
    from sijax.evaluation import images as images_mod

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    model = SimpleNamespace(preprocessing=Preprocessing.fit(grey, size=8))
    images_mod._SHOWN.clear()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        notes = [images_mod.noted_input(model, rng.integers(0, 256, (8, 8, 3),
                                                            dtype=np.uint8),
                                        Item(f"/d/{i}.png", None, "test", "good",
                                             None))[1]
                 for i in range(3)]
    assert [len(n) for n in notes] == [1, 1, 1]
    assert all(f"good/{i}.png has 3 channel(s)" in notes[i][0] for i in range(3))
    said = [str(w.message) for w in shown if issubclass(w.category, InputWarning)]
    assert len(said) == 1 and "further images with this warning" in said[0]
