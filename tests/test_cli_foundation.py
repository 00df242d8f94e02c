"""The CLI of the foundation: train/sample/reconstruct, and clean errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sijax.cli import COMMANDS, main
from sijax.config import TrainConfig, apply_overrides
from sijax.configs import get_config
from sijax.data.examples import EXAMPLES_DIR
from sijax.detect.dal import DALConfig
from sijax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_command_table():
    assert {"train", "sample", "reconstruct"} <= set(COMMANDS)


def test_overrides_and_presets():
    cfg = apply_overrides(get_config("dal_v5"),
                          ["size=16", "epochs=3", "channels=8,16", "lr=1e-3"])
    assert (cfg.size, cfg.epochs, cfg.channels, cfg.lr) == (16, 3, (8, 16), 1e-3)
    assert get_config("dal_v5", size=64).size == 64
    assert get_config("tiny").channels == (4, 8, 16)
    with pytest.raises(InputError, match="valid presets: dal_v5, tiny"):
        get_config("nope")
    with pytest.raises(InputError, match="valid keys: .*epochs"):
        apply_overrides(cfg, ["epoch=3"])
    with pytest.raises(InputError, match="cannot parse"):
        apply_overrides(cfg, ["epochs=many"])
    with pytest.raises(InputError, match="multiple of 2"):
        apply_overrides(cfg, ["size=9"])
    with pytest.raises(InputError, match="key=value"):
        apply_overrides(cfg, ["epochs"])
    assert TrainConfig.from_dict(
        __import__("json").loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("argv,match", [
    (["train", "--config", "nope", "--workdir", "W"], "unknown preset 'nope'"),
    (["train", "--config", "tiny", "--set", "bogus=1", "--workdir", "W"],
     "unknown config key 'bogus'; valid keys:"),
    (["train", "--workdir", "W"], "--config is required"),
    (["reconstruct", "--checkpoint", "/no/such/dir", "--image", "x.npy", "--out",
      "o"], "checkpoint directory not found"),
    # An --out that cannot be written fails before any work ("F" is a plain file).
    (["demo", "--out", "F/o"], "cannot write to the output directory"),
    (["sample", "--checkpoint", "tiny_8", "--out", "F/o"], "cannot write to the"),
    (["reconstruct", "--checkpoint", "tiny_8", "--image", "x.npy", "--out", "F/o"],
     "cannot write to the"),
    (["experiment", "fpr", "--sizes", "8", "--checkpoint", "tiny_8", "--trials", "1",
      "--out", "F/o"], "cannot write to the"),
    (["train", "--config", "tiny", "--workdir", "F/o"], "cannot write to the"),
    # Files that are not .npy arrays, and a directory, as image or covariance.
    (["test", "--checkpoint", "tiny_8", "--image", "G.npy", "--sigma", "1",
      "--hypothesis", "background", "--out", "o"], "not a NumPy .npy file"),
    (["test", "--checkpoint", "tiny_8", "--image", "EX", "--sigma", "G.npy", "--out",
      "o"], "cannot read --sigma"),
    (["test", "--checkpoint", "tiny_8", "--image", "EX", "--sigma", "D", "--out",
      "o"], "is a directory, not an .npy file"),
    # No reference image for the reference test: say so in the CLI's options.
    (["test", "--checkpoint", "tiny_8", "--image", "EX", "--sigma", "1", "--out",
      "o"], "--sigma 1 with the reference test (the default --hypothesis) needs "
     "--reference IMAGE, a normal image; or --hypothesis background|neighbour"),
    (["evaluate", "--checkpoint", "tiny_8", "--data", "D", "--sigma", "iid",
      "--out", "o"], "--sigma iid with the reference test"),
])
def test_errors_print_cleanly(capsys, tmp_path, argv, match):
    (tmp_path / "F").write_text("a file, not a directory")
    (tmp_path / "G.npy").write_bytes(b"not an array")
    (tmp_path / "D").mkdir()
    named = ("W", "x.npy", "o", "F/o", "G.npy", "D")
    argv = [str(tmp_path / a) if a in named else a for a in argv]
    argv = [os.path.join(EXAMPLES_DIR, "demo_8.npy") if a == "EX" else a for a in argv]
    rc, out, err = run_main(capsys, *argv)
    assert rc == 2
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in err


def test_bad_images(capsys, tmp_path):
    def recon(arr, name="x.npy"):
        path = tmp_path / name
        np.save(path, arr)
        return run_main(capsys, "reconstruct", "--checkpoint", "tiny_8", "--image",
                        str(path), "--out", str(tmp_path / "o"))

    rc, _, err = recon(np.zeros((16, 16, 1)))
    assert rc == 2 and "16x16 but the model expects 8x8" in err
    rc, _, err = recon(np.zeros((8, 8, 3)))
    assert rc == 2 and "3 channel(s) but the model expects 1" in err
    x = np.zeros((8, 8, 1))
    x[2, 3, 0] = np.nan
    x[4, 4, 0] = np.inf
    rc, _, err = recon(x)
    assert rc == 2 and "2 NaN/Inf pixel value(s), first at (2, 3, 0)" in err
    (tmp_path / "y.png").write_bytes(b"not a png")
    rc, _, err = run_main(capsys, "reconstruct", "--checkpoint", "tiny_8", "--image",
                          str(tmp_path / "y.png"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "cannot read image" in err
    rc, _, err = run_main(capsys, "reconstruct", "--checkpoint", "tiny_8", "--image",
                          str(tmp_path / "missing.npy"), "--out", str(tmp_path))
    assert rc == 2 and "image file not found" in err


def test_reconstruct_writes_png_and_npy(capsys, tmp_path):
    from PIL import Image

    x = np.random.default_rng(0).normal(size=(8, 8, 1))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    rc, stdout, _ = run_main(capsys, "reconstruct", "--checkpoint", "tiny_8",
                             "--image", str(tmp_path / "x.npy"), "--out", str(out))
    assert rc == 0 and "wrote 6 files" in stdout
    x_hat, err = np.load(out / "reconstruction.npy"), np.load(out / "error.npy")
    assert x_hat.shape == err.shape == (8, 8, 1) and x_hat.dtype == np.float64
    np.testing.assert_allclose(err, x_hat - x, atol=1e-15)
    for name in ("reconstruction", "error", "input"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (8, 8) and im.mode == "L"
    # A PNG input (8-bit grey, read as pixel / 255) works the same way.
    Image.fromarray(np.uint8(np.arange(64).reshape(8, 8))).save(tmp_path / "g.png")
    rc, _, _ = run_main(capsys, "reconstruct", "--checkpoint", "tiny_8", "--image",
                        str(tmp_path / "g.png"), "--out", str(tmp_path / "out2"))
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "out2" / "input.npy")[:, :, 0],
                               np.arange(64).reshape(8, 8) / 255.0)


def test_sample(capsys, tmp_path):
    rc, stdout, _ = run_main(capsys, "sample", "--checkpoint", "tiny_8", "-n", "2",
                             "--steps", "10", "--out", str(tmp_path))
    assert rc == 0
    s = np.load(tmp_path / "samples.npy")
    assert s.shape == (2, 8, 8, 1) and np.all(np.isfinite(s))
    assert (tmp_path / "sample_001.png").is_file()


def test_subprocess_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "sijax.cli", "train", "--config", "dal_v6",
         "--workdir", str(tmp_path)], capture_output=True, text=True, env=env,
        timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: unknown preset 'dal_v6'; valid presets: "
                                "dal_v5, tiny")


def test_dal_options_reach_the_config():
    from sijax.cli import _dal_config, build_parser

    a = build_parser().parse_args(
        ["demo", "--engine", "propagate", "--termination", "decision",
         "--set", "max_pieces=50"])
    cfg = _dal_config(a)
    assert (cfg.engine, cfg.termination) == ("propagate", "decision")
    assert cfg.max_pieces == 50
    assert _dal_config(build_parser().parse_args(["demo"])).engine == "auto"


def test_devices_option_reaches_the_config():
    """`sijax test --devices N` / `--processes N` switch the propagate engine on
    with N devices / worker processes; an explicit walk engine is refused, as are
    both together; on a CPU the default is one device."""
    from sijax.cli import _dal_config, _shared_line, build_parser

    def config(*argv):
        a = build_parser().parse_args(["test", "--checkpoint", "c", "--image", "i",
                                       *argv])  # fmt: skip
        return _shared_line(a, _dal_config(a))

    assert (config().engine, config().devices) == ("auto", 1)
    assert (config("--devices", "2").engine, config("--devices", "2").devices) == (
        "propagate", 2)  # fmt: skip
    with pytest.raises(InputError, match="only the 'propagate' engine"):
        config("--devices", "2", "--engine", "walk")
    two = config("--processes", "2")
    assert (two.engine, two.processes, two.devices) == ("propagate", 2, 1)
    assert config("--processes", "1").processes == 1
    with pytest.raises(InputError, match="only the 'propagate' engine"):
        config("--processes", "2", "--engine", "walk")
    with pytest.raises(InputError, match="choose one"):
        config("--processes", "2", "--devices", "2")
    with pytest.raises(InputError, match="processes must be"):
        config("--processes", "0")


def test_processes_default_to_two_from_32x32_on_a_cpu(monkeypatch):
    """`sijax test` without --processes/--devices: two worker processes share the
    line of a native model's image from 32x32 on a CPU with two usable cores (the
    measured gain), one process below 32x32, on one core, with the walk engine or
    when the user chose."""
    import argparse

    from sijax import cli
    from sijax.checkpoint import load_model
    from sijax.experiments import pool

    model = load_model("tiny_8")
    a = argparse.Namespace(processes=None, devices=None)
    auto = DALConfig()
    monkeypatch.setattr(pool, "usable_cores", lambda: 16)
    big = cli._auto_processes(a, model, auto, (32, 32, 1))
    assert (big.engine, big.processes) == ("propagate", 2)
    assert cli._auto_processes(a, model, auto, (16, 16, 1)) is auto
    walk = DALConfig(engine="walk")
    assert cli._auto_processes(a, model, walk, (32, 32, 1)) is walk
    chose = argparse.Namespace(processes=1, devices=None)
    assert cli._auto_processes(chose, model, auto, (32, 32, 1)) is auto
    monkeypatch.setattr(pool, "usable_cores", lambda: 1)
    assert cli._auto_processes(a, model, auto, (64, 64, 1)) is auto


@pytest.mark.slow
def test_devices_share_the_line_from_the_command_line(capsys, tmp_path):
    """`sijax test --devices 2` (conftest: four CPU devices) and `--processes 2`
    give the one-device p-value and pieces (the default run checks the same
    through dal_test)."""
    image = os.path.join(EXAMPLES_DIR, "demo_8.npy")
    p = []
    for extra in ([], ["--devices", "2"], ["--processes", "2"]):
        rc, out, err = run_main(
            capsys, "test", "--checkpoint", "tiny_8", "--image", image, "--reference",
            image.replace(".npy", "_ref.npy"), "--sigma", "1", "--engine",
            "propagate", "--no-progress", "--out",
            str(tmp_path / "-".join(["out", *extra])), *extra,
        )  # fmt: skip
        assert rc == 0, err
        with open(tmp_path / "-".join(["out", *extra]) / "report.json") as f:
            p.append(json.load(f))
    assert p[1]["config"]["devices"] == p[2]["config"]["processes"] == 2
    r = [q["result"] for q in p]
    for i in (1, 2):
        assert r[i]["p_value"] == pytest.approx(r[0]["p_value"], abs=1e-12)
        assert r[i]["search_count"] == r[0]["search_count"]


def test_search_bar_shows_pieces_range_and_bounds(capsys):
    from sijax.detect.run import search_bar

    with search_bar(False) as report:
        assert report is None
    assert capsys.readouterr().err == ""  # no bar before the first report either
    with search_bar() as report:
        assert capsys.readouterr().err == ""
        report(10, -0.5, 2.25, 0.01, 0.3)
        report(17, -0.75, 2.5, 0.02, 0.04)
    err = capsys.readouterr().err
    assert "search: " in err and "17piece" in err
    assert "z in [-0.750, 2.500], p in [0.02, 0.04]" in err


def test_demo_examples_are_committed_and_reproducible():
    """Every demo size has its committed example (as make_example makes it) and a
    committed model of that size."""
    from sijax.checkpoint import CHECKPOINTS_DIR
    from sijax.data.examples import SIZES, load_example, make_example

    for d in SIZES:
        x, x_ref = load_example(d)
        want_x, want_ref = make_example(d, seed=d)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(x_ref, want_ref)
        model_dir = os.path.join(CHECKPOINTS_DIR, f"dal_v5_{d}")
        assert os.path.isfile(os.path.join(model_dir, "config.json"))


def test_parser_builds_without_cpu_affinity(monkeypatch, capsys):
    """Where os has no sched_getaffinity (macOS) the defaults fall back to the core
    count instead of failing every command at parser construction."""
    from sijax import cli

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert cli._usable_cores() == (os.cpu_count() or 1)
    with pytest.raises(SystemExit) as e:
        main(["experiment", "--help"])
    assert e.value.code == 0 and "--cpu-devices" in capsys.readouterr().out
