"""Every detector from the command line on the bundled digits (issue 26's "done
when"): ``sijax train --detector NAME --data DIR`` and ``sijax evaluate``, tiny
networks trained for a few epochs (the numerics are each detector's own tests)."""

import json
import os
import warnings

import pytest

pytest.importorskip("sklearn", reason="the bundled digits need the [data] extra")

from sijax.checkpoint import load_model  # noqa: E402
from sijax.cli import main  # noqa: E402
from sijax.data import build_dataset  # noqa: E402
from sijax.detectors import DETECTORS  # noqa: E402

# The image-level detector runs by default (the region detectors' evaluate path is
# the DAL one, tested in test_real_data.py); the rest with the slow tests (each is a
# training and an evaluation, one to four minutes on a busy 2-core machine).
DEFAULT = ("diffpath",)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return build_dataset("digits", root / "digits", n_train=40, n_test_good=4,
                         n_test_defect=2, seed=2)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow)
    for n in DETECTORS])
def test_train_and_evaluate_from_the_command_line(name, digits, tmp_path, capsys):
    work, out = tmp_path / "run", tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # digits have constant border pixels
        rc = main(["train", "--detector", name, "--data", digits, "--set", "size=8",
                   "--set", "channels=4,8,16", "--set", "epochs=3",
                   "--set", "batch_size=12", "--workdir", str(work), "--no-progress"])
    assert rc == 0
    assert f"({name})" in capsys.readouterr().out
    model = load_model(work)
    assert model.detector.name == name and model.config.detector == name
    with open(work / "model" / "config.json") as f:
        meta = json.load(f)
    assert meta["config"]["detector"] == name
    rc = main(["evaluate", "--checkpoint", str(work), "--data", digits, "--out",
               str(out), "--no-progress", "--no-reports", "--workers", "1",
               "--termination", "decision", "--max-per-kind", "2"])
    assert rc == 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["images"] == 8
    assert 0.0 <= summary["image_auroc"] <= 1.0
    recs = [json.loads(line) for line in open(out / "images.jsonl")]
    if model.detector.has_region:
        assert "image_fit" not in meta and "threshold" in meta["detect"]
        assert "pixel_auroc" in summary and os.path.isfile(out / "overview.png")
        assert {r["status"] for r in recs} <= {"ok", "no region", "max_pieces"}
    else:
        assert "image_fit" in meta and "detect" not in meta
        assert {r["status"] for r in recs} == {"image_level"}
        assert all(isinstance(r["image_score"], float) for r in recs)
        assert os.path.isfile(out / "scores.png")


def test_detector_options_from_set_reach_the_model(monkeypatch):
    """``sijax test --set t_lambda=100`` changes the AnoDDPM option, not the
    DALConfig; DALConfig keys stay with the DALConfig."""
    import argparse

    from sijax import cli
    from sijax.checkpoint import load_model as real_load
    from sijax.detect.dal import DALConfig

    base = real_load("tiny_8")
    cfg = base.config.__class__(**{**base.config.__dict__, "detector": "anoddpm",
                                   "detector_options": ()})
    monkeypatch.setattr("sijax.checkpoint.load_model",
                        lambda path: base.replace(config=cfg))
    a = argparse.Namespace(checkpoint="x", overrides=["t_lambda=100", "threshold=0.5"])
    model = cli._load_for_test(a)
    assert model.options.t_lambda == 100 and a.overrides == ["threshold=0.5"]
    assert cli._dal_config(argparse.Namespace(overrides=a.overrides)) == DALConfig(
        threshold=0.5)


def test_experiment_runs_another_detector_with_its_own_noises(tmp_path):
    """The paper's synthetic sweep (sijax experiment) with a DDAD model: its
    noises come from draw_noises(model) per trial, and experiment.json names it."""
    import dataclasses

    import sijax.experiments as ex

    base = load_model("tiny_8")
    ddad = base.replace(config=dataclasses.replace(base.config, detector="ddad",
        detector_options=(("t0", 800), ("stride", 200), ("w", 0.0))))
    spec = ex.default_spec("fpr", sizes=(8,), checkpoints={8: "tiny_8"},
                           covariances=("iid",), trials=3, batch=2,
                           methods=("selective", "naive"), max_pieces=2000)
    rows = ex.run_experiment(spec, str(tmp_path), models={("tiny_8", "relu"): ddad},
                             progress=False)
    assert {r.trials for r in rows} == {3}
    with open(tmp_path / "experiment.json") as f:
        meta = json.load(f)
    assert {m["detector"] for m in meta["models"].values()} == {"ddad"}
