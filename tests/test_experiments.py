"""Reduced runs of every `sijax experiment` (issue 5) on the committed tiny model.

Checks the output files, resume after a partial run, sharded == unsharded batches on
the 4 fake CPU devices of conftest, and the statistics against independent oracles
(scipy for tail probabilities and binomial intervals, quadrature for W1, NumPy for the
piecewise-linear activations), not exact rates. All runs share one batch size, one
``max_pieces`` and one device mesh so that the compiled programs are reused.
"""

import dataclasses
import gzip
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from scipy import stats

from sijax import cli
from sijax import experiments as ex
from sijax.checkpoint import load_model
from sijax.detect.dal import detect_region
from sijax.diffusion.sampler import Noises
from sijax.diffusion.unet import PWL_KNOTS, activation_fn
from sijax.errors import InputError
from sijax.selective.statistics import HYPOTHESES

BATCH = 4  # one image per fake device
COMMON = dict(sizes=(8,), checkpoints={8: "tiny_8"}, batch=BATCH, max_pieces=2000)


@pytest.fixture(scope="module")
def models():
    base = load_model("tiny_8")
    return {
        ("tiny_8", "relu"): base,
        ("tiny_8", "pwl_silu"): ex.with_activation(base, "pwl_silu"),
    }


def _fpr_argv(out):
    """The reduced fpr run's command line (iid and corr, 6 valid trials)."""
    return [
        "experiment", "fpr", "--sizes", "8", "--covariance", "iid", "corr",
        "--trials", "6", "--methods", "selective", "oc", "naive", "bonferroni",
        "--checkpoint", "tiny_8", "--batch", str(BATCH), "--max-pieces", "2000",
        "--out", out, "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fpr_run(tmp_path_factory):
    """The reduced fpr run through the command line."""
    out = str(tmp_path_factory.mktemp("fpr"))
    assert cli.main(_fpr_argv(out)) == 0
    return out


def _records(out):
    return ex.read_trials(os.path.join(out, ex.TRIALS_FILE))


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _check_rows(rows, target):
    for r in rows:
        assert r["trials"] == target, r
        assert 0.0 <= r["rate"] <= 1.0
        assert r["ci_lo"] <= r["rate"] <= r["ci_hi"]
        assert r["rejections"] == round(r["rate"] * r["trials"])
        lo, hi = ex.clopper_pearson(r["rejections"], r["trials"])
        assert (r["ci_lo"], r["ci_hi"]) == pytest.approx((lo, hi))


def _check_methods(rec, n_pix, alpha=0.05):
    """Each method's p-value against its definition (scipy oracles)."""
    m = rec["methods"]
    z = rec["z"]
    naive = 2.0 * stats.norm.sf(abs(z))
    if "naive" in m:
        assert m["naive"]["p"] == pytest.approx(naive, rel=1e-9, abs=1e-300)
    if "bonferroni" in m:
        log_p = min(0.0, n_pix * math.log(2.0) + stats.norm.logsf(abs(z)) + math.log(2))
        assert m["bonferroni"]["p"] == pytest.approx(math.exp(log_p), rel=1e-9)
    if "selective" in m:
        s = m["selective"]
        assert s["inf_p"] - 1e-12 <= s["p"] <= s["sup_p"] + 1e-12
        assert s["reject"] == (s["sup_p"] < alpha)
        assert s["pieces"] >= 1
    for name in ("oc", "naive", "bonferroni"):
        if name in m:
            assert 0.0 <= m[name]["p"] <= 1.0
            assert m[name]["reject"] == (m[name]["p"] < alpha)


# ------------------------------------------------------------------------- fpr


def test_fpr_run_writes_every_output(fpr_run):
    files = set(os.listdir(fpr_run))
    assert {
        "trials.jsonl",
        "summary.json",
        "summary.md",
        "experiment.json",
        "type1_error.png",
        "qq_null.png",
    } <= files
    assert all(_is_png(os.path.join(fpr_run, f)) for f in files if f.endswith(".png"))
    rows = _summary(fpr_run)
    assert {(r["method"], r["covariance"]) for r in rows} == {
        (m, c)
        for m in ("selective", "oc", "naive", "bonferroni")
        for c in ("iid", "corr")
    }
    keys = {
        "method",
        "size",
        "covariance",
        "delta",
        "trials",
        "skipped",
        "rejections",
        "rate",
        "ci_lo",
        "ci_hi",
        "seconds",
    }
    assert all(keys <= set(r) for r in rows)
    _check_rows(rows, 6)
    # Uniformity of the exact null p-values; none for decision-run selective ones.
    records = ex.latest_records(ex.read_trials(os.path.join(fpr_run, "trials.jsonl")))
    for r in rows:
        if r["method"] in ("selective", "bonferroni"):
            assert r["ks_p"] is None, r
            continue
        (key,) = [k for k in records if json.loads(k)["covariance"] == r["covariance"]]
        valid = [t for _, t in sorted(records[key].items()) if t["valid"]]
        p = [t["methods"][r["method"]]["p"] for t in valid[: r["trials"]]]
        assert r["ks_p"] == pytest.approx(stats.kstest(p, "uniform").pvalue)
    with open(os.path.join(fpr_run, "summary.md")) as f:
        md = f.read()
    assert "termination 'decision'" in md and md.count("\n| selective |") == 2
    with open(os.path.join(fpr_run, "experiment.json")) as f:
        meta = json.load(f)
    assert meta["models"]["tiny_8 (relu)"]["epochs"] == 300
    # which weights made the trials: those of the committed tiny_8
    assert meta["models"]["tiny_8 (relu)"]["weights_sha256"] == (
        load_model("tiny_8").weights_sha256()
    )


def test_fpr_records_follow_the_definitions(fpr_run):
    recs = _records(fpr_run)
    # every record says what made it: the checkout's commit and the engine that ran
    assert {(r["commit"], r["engine"]) for r in recs} == {(ex.git_commit(), "walk")}
    valid = [r for r in recs if r["valid"]]
    assert len(valid) >= 12 and all(r["status"] in (0, 2) for r in valid)
    for r in valid:
        _check_methods(r, 64)
    skipped = [r for r in recs if not r["valid"]]
    assert all(r["status"] == 1 and r["methods"] == {} for r in skipped)
    # summary counts: the first 6 valid trials by index of each setting
    rows = _summary(fpr_run)
    by_key = ex.latest_records(recs)
    for r in rows:
        setting = ex.Setting(
            size=8, covariance=r["covariance"], checkpoint="tiny_8", max_pieces=2000
        )
        trials = by_key[setting.key]
        used = [trials[i] for i in sorted(trials) if trials[i]["valid"]][:6]
        k = sum(u["methods"][r["method"]]["reject"] for u in used)
        assert k == r["rejections"]


def test_background_hypothesis_reaches_every_method(models, tmp_path):
    """`--hypothesis background` (the v1 in-image test behind the paper's v1-era
    figures): z is the region against the rest of the same image (NumPy oracle on the
    detected region), on the images of the reference runs; the setting says so in its
    key, and a reference setting keeps the key of runs made before the option."""
    out = str(tmp_path / "bg")
    argv = ["experiment", "fpr", "--sizes", "8", "--covariance", "iid", "--trials",
            "2", "--methods", "selective", "naive", "--checkpoint", "tiny_8",
            "--batch", str(BATCH), "--max-pieces", "2000", "--hypothesis",
            "background", "--out", out, "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    bg = ex.Setting(size=8, checkpoint="tiny_8", max_pieces=2000,
                    hypothesis="background")  # fmt: skip
    ref = dataclasses.replace(bg, hypothesis="reference")
    assert bg.data_seed == ref.data_seed and bg.key != ref.key
    assert json.loads(bg.key)["hypothesis"] == "background"
    assert "hypothesis" not in json.loads(ref.key)
    recs = _records(out)
    assert {r["setting"] for r in recs} == {bg.key}
    valid = [r for r in recs if r["valid"]]
    assert len(valid) >= 2
    model = models[("tiny_8", "relu")]
    for r in valid:
        _check_methods(r, 64)
        d = ex.trial_data(bg, r["index"])
        noises = Noises(eps0=d.eps0, eps=d.eps)
        _, mask = detect_region(model, d.x, noises)
        m = np.asarray(mask)
        x = d.x[..., 0]
        z = (x[m].mean() - x[~m].mean()) / math.sqrt(1 / m.sum() + 1 / (~m).sum())
        assert r["region_size"] == m.sum()
        assert r["z"] == pytest.approx(z, rel=1e-9)
    with open(os.path.join(out, "summary.md")) as f:
        assert "hypothesis 'background'" in f.read()
    assert all(row["hypothesis"] == "background" for row in _summary(out))
    with pytest.raises(InputError, match="permutation"):
        ex.default_spec("fpr", hypothesis="background", methods=("permutation",))
    with pytest.raises(InputError, match="hypothesis"):
        ex.default_spec("fpr", hypothesis="in-image")


def test_committed_trials_keep_their_setting_keys():
    """Trials committed before `hypothesis` existed are still found by their setting
    (resume and re-summarising depend on the key)."""
    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
    with gzip.open(os.path.join(root, "power_dal_v5_16", "trials.jsonl.gz"), "rt") as f:
        key = json.loads(f.readline())["setting"]
    assert ex.Setting(**json.loads(key)).key == key


def test_existing_output_needs_resume(fpr_run, capsys):
    argv = [
        "experiment",
        "fpr",
        "--sizes",
        "8",
        "--covariance",
        "iid",
        "--trials",
        "6",
        "--checkpoint",
        "tiny_8",
        "--out",
        fpr_run,
        "--no-progress",
    ]
    assert cli.main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_choices_match_the_library():
    assert cli.EXPERIMENTS == ex.EXPERIMENTS
    assert cli.METHODS == ex.METHODS
    assert cli.NOISE_FAMILIES == ex.NOISE_FAMILIES
    assert cli.HYPOTHESES == HYPOTHESES[:3]  # "custom" needs an eta: library only


# ----------------------------------------------------------------------- resume


def _check_same_results(recs_a: dict, recs_b: dict, rows_a, rows_b) -> None:
    """Two runs of one spec: the same trials, outcomes, p-values and summary rows
    (as in summary.json)."""
    assert set(recs_a) == set(recs_b)
    for k, r in recs_a.items():
        q = recs_b[k]
        assert (r["valid"], r["status"], r["region_size"]) == (
            q["valid"], q["status"], q["region_size"],
        )  # fmt: skip
        for m in r["methods"]:
            assert r["methods"][m]["reject"] == q["methods"][m]["reject"]
            np.testing.assert_allclose(
                r["methods"][m]["p"], q["methods"][m]["p"], rtol=1e-9
            )

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(rows_a) == strip(rows_b)


def test_partial_run_then_resume_equals_one_run(tmp_path, models):
    spec = ex.default_spec(
        "fpr", covariances=("iid",), trials=5, methods=("selective", "naive"), **COMMON
    )
    full = str(tmp_path / "full")
    rows_full = ex.run_experiment(spec, full, models=models, progress=False)
    part = str(tmp_path / "part")
    # "killed" after one batch, and with a torn last line as a killed writer leaves
    ex.run_experiment(spec, part, models=models, progress=False, max_batches=1)
    n_first = len(_records(part))
    assert n_first == BATCH
    with open(os.path.join(part, ex.TRIALS_FILE), "a") as f:
        f.write('{"setting": "torn')
    with pytest.raises(InputError, match="resume"):
        ex.run_experiment(spec, part, models=models, progress=False)
    # resumed on one device with the other engine: the same pieces and results
    rows_part = ex.run_experiment(
        dataclasses.replace(spec, engine="propagate"), part, models=models,
        progress=False, resume=True, mesh=False,
    )  # fmt: skip
    recs_full = {r["index"]: r for r in _records(full)}
    recs_part = {r["index"]: r for r in _records(part)}
    assert len(_records(part)) == len(recs_part)  # nothing ran twice
    # committed results are gzipped: read_trials reads those the same way
    gz = str(tmp_path / "trials.jsonl.gz")
    with open(os.path.join(part, ex.TRIALS_FILE), "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    assert ex.read_trials(gz) == _records(part)
    _check_same_results(
        recs_full, recs_part, [r.to_json() for r in rows_full],
        [r.to_json() for r in rows_part],
    )  # fmt: skip
    # resuming a finished run runs nothing; max_batches=0 only rewrites the summary
    os.remove(os.path.join(part, "summary.json"))
    ex.run_experiment(
        spec, part, models=models, progress=False, resume=True, max_batches=0
    )
    assert len(_records(part)) == len(recs_part)
    assert _summary(part) == [r.to_json() for r in rows_part]


@pytest.mark.slow
def test_worker_processes_record_what_one_process_does(tmp_path, models, capsys):
    """workers=2: two spawned processes run whole batches side by side (here with
    the propagate engine, which drives its searches from Python); the parent
    schedules and writes, and shows the workers' search progress on its bar. Same
    records and summary as one process walking, also for a model that is not the
    checkpoint its setting names (the workers get the scheduler's models)."""
    spec = ex.default_spec(
        "fpr", covariances=("iid", "corr"), trials=3, methods=("selective", "naive"),
        **COMMON,
    )  # fmt: skip
    base = models[("tiny_8", "relu")]
    models = {("tiny_8", "relu"): jax.tree.map(lambda w: 1.1 * w, base)}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rows_one = ex.run_experiment(spec, one, models=models, progress=False)
    with pytest.raises(InputError, match="workers"):
        ex.run_experiment(spec, two, models=models, progress=False, workers=0)
    with pytest.raises(InputError, match="no model for"):
        ex.run_experiment(spec, two, models={}, progress=False)
    capsys.readouterr()
    rows_two = ex.run_experiment(
        dataclasses.replace(spec, engine="propagate"), two, models=models,
        workers=2,
    )  # fmt: skip
    assert re.search(r"batch: \d+ pieces", capsys.readouterr().err)
    recs_one = {(r["setting"], r["index"]): r for r in _records(one)}
    recs_two = {(r["setting"], r["index"]): r for r in _records(two)}
    assert len(recs_two) == len(_records(two))  # nothing ran twice
    assert {r["engine"] for r in recs_one.values()} == {"walk"}
    assert {r["engine"] for r in recs_two.values()} == {"propagate"}
    _check_same_results(
        recs_one, recs_two, [r.to_json() for r in rows_one],
        [r.to_json() for r in rows_two],
    )  # fmt: skip


@pytest.mark.slow
def test_processes_joined_by_jax_distributed_record_what_one_process_does(
    fpr_run, tmp_path
):
    """Multi-host through `--distributed`, on one machine: two processes with one
    CPU device each join over localhost (jax.distributed, Gloo collectives), shard
    each batch over the two-device mesh and gather the results; process 0 alone
    writes. Same records and summary as the one-process run on four fake devices."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "two_hosts")
    argv = _fpr_argv(out) + [
        "--cpu-devices", "1", "--distributed",
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
    ]  # fmt: skip
    code = "import sys; from sijax.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, XLA_FLAGS="")  # one device per process, not conftest's 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *argv, "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "2 devices, 2 processes" in logs[0]
    assert "wrote summary.json" not in logs[1]  # one writer
    one = {(r["setting"], r["index"]): r for r in _records(fpr_run)}
    two = {(r["setting"], r["index"]): r for r in _records(out)}
    assert len(two) == len(_records(out))  # nothing ran twice
    _check_same_results(one, two, _summary(fpr_run), _summary(out))


def test_cluster_flags_need_distributed(tmp_path, capsys):
    argv = _fpr_argv(str(tmp_path / "out")) + ["--process-id", "1"]
    assert cli.main(argv) == 2
    assert "need --distributed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_an_error_stops_the_workers_without_waiting_for_their_batches():
    """A failed batch (or Ctrl-C) in the scheduler must surface at once, not after
    the other workers' batches (minutes each), and leave no worker behind."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"), ex.worker_pool(2) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(4)}
        for _ in range(2):
            pool.submit(time.sleep, 600)
        raise RuntimeError("boom")
    assert time.monotonic() - t0 < 60
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_leave_when_their_parent_is_killed():
    """A killed scheduler (SIGKILL: no cleanup) must not leave workers computing."""
    code = (
        "import multiprocessing as mp, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from sijax.experiments import pool\n"
        "pool = ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'),\n"
        "    initializer=pool._worker_init, initargs=('',))\n"
        "print(pool.submit(__import__('os').getpid).result(), flush=True)\n"
        "pool.submit(time.sleep, 600)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, 9)
    parent.wait()
    for _ in range(100):  # the watchdog polls every second
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        pytest.fail("the worker outlived its parent by 10 s")


def test_cli_passes_workers_and_engine(tmp_path, monkeypatch):
    seen = {}

    def fake_run(spec, out, **kw):
        seen.update(kw, engine=spec.engine)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write("")
        return []

    monkeypatch.setattr(ex, "run_experiment", fake_run)
    argv = ["experiment", "fpr", "--sizes", "8", "--checkpoint", "tiny_8", "--out",
            str(tmp_path), "--workers", "2", "--engine", "propagate", "--no-progress"]
    assert cli.main(argv) == 0
    assert (seen["workers"], seen["engine"]) == (2, "propagate")
    # Without --workers: walking runs in this process; propagation (one image at a
    # time from Python) gets a process per usable core on a CPU.
    cores = cli._usable_cores()
    for engine, workers in (("walk", 1), ("propagate", cores)):
        assert cli.main(argv[:-5] + ["--engine", engine, "--no-progress"]) == 0
        assert (seen["workers"], seen["engine"]) == (workers, engine)
    assert cli._auto_workers("propagate", "gpu", 1) == 1  # one process drives it
    assert cli._auto_workers("propagate", "cpu", 2) == 1  # multi-host: no pools


def test_one_run_at_a_time_writes_a_directory(tmp_path, models):
    """A second run on a directory in use is refused (it would redo the same trials)."""
    spec = ex.default_spec("fpr", covariances=("iid",), trials=2, **COMMON)
    out = str(tmp_path)
    with ex.exclusive(out):  # stands for a run in progress (own open file, own flock)
        with pytest.raises(InputError, match=r"another sijax experiment \(pid \d+ on"):
            ex.run_experiment(spec, out, models=models, resume=True, max_batches=0)
    assert not os.path.exists(os.path.join(out, "summary.json"))
    # released when the holder ends (also when its process dies: flock)
    ex.run_experiment(spec, out, models=models, resume=True, max_batches=0)
    assert os.path.exists(os.path.join(out, "summary.json"))


def test_a_test_error_stops_the_run_instead_of_skipping_the_trial(tmp_path, models):
    """A model whose output is NaN gives status 3 (error), not "no region": the run
    stops with the reason rather than counting the trials as skipped."""
    broken = jax.tree.map(lambda w: w * np.nan, models[("tiny_8", "relu")])
    spec = ex.default_spec("fpr", covariances=("iid",), trials=2, methods=("oc",),
                           **COMMON)  # fmt: skip
    with pytest.raises(InputError, match=r"trial 0: non-finite detection"):
        ex.run_experiment(spec, str(tmp_path), models={("tiny_8", "relu"): broken},
                          progress=False)  # fmt: skip
    assert ex.read_trials(os.path.join(str(tmp_path), ex.TRIALS_FILE)) == []


# -------------------------------------------------------------------- sharding


def test_sharded_batch_equals_unsharded(models):
    assert jax.device_count() == 4
    model = models[("tiny_8", "relu")]
    setting = ex.Setting(size=8, checkpoint="tiny_8", max_pieces=2000)
    idx = [10, 11, 12, 13]
    mesh = ex.device_mesh()
    sharded = ex.run_batch(
        model, setting, idx, ("selective", "naive"), batch=BATCH, mesh=mesh
    )
    plain = ex.run_batch(
        model, setting, idx, ("selective", "naive"), batch=BATCH, mesh=None
    )
    assert any(r["valid"] for r in plain)
    for a, b in zip(sharded, plain, strict=True):
        assert (a["index"], a["valid"], a["status"]) == (
            b["index"],
            b["valid"],
            b["status"],
        )
        for m in a["methods"]:
            assert a["methods"][m]["reject"] == b["methods"][m]["reject"]
            for f in ("p", "inf_p", "sup_p", "pieces"):
                if f in a["methods"][m]:
                    np.testing.assert_allclose(
                        a["methods"][m][f], b["methods"][m][f], rtol=1e-9
                    )


def test_sharded_inputs_are_split_over_the_devices():
    mesh = ex.device_mesh()
    arr = ex.shard(mesh, np.arange(8.0).reshape(8, 1))
    assert len(arr.addressable_shards) == 4
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 1)}
    np.testing.assert_array_equal(np.asarray(arr), np.arange(8.0).reshape(8, 1))
    # dal_test_batch runs such a batch per device (shard_map), a plain one as one
    from sijax.detect.dal import _batch_mesh

    assert _batch_mesh(arr) == (mesh, "batch")
    assert _batch_mesh(np.arange(8.0)) is None
    assert _batch_mesh(jax.numpy.arange(8.0)) is None


def test_cli_splits_the_cpu_into_devices():
    """`sijax experiment --cpu-devices N`: N single-threaded XLA CPU devices, unless
    XLA_FLAGS already sets a device count (as this test session's conftest does)."""
    code = (
        "import os, jax; from sijax.cli import _use_cpu_devices; _use_cpu_devices(3); "
        "print(jax.device_count(), 'intra_op_parallelism_threads=1' in "
        "os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert out == ["3", "True"]
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert out == ["2", "False"]


# ----------------------------------------------------------- the other experiments


def test_power_run(tmp_path, models, capsys):
    spec = ex.default_spec(
        "power",
        covariances=("iid",),
        deltas=(4.0,),
        trials=4,
        methods=("selective", "naive"),
        **COMMON,
    )
    out = str(tmp_path)
    rows = ex.run_experiment(spec, out, models=models)
    # The bar shows the pieces of the running batch (reported by its 4 devices'
    # searches) before the running estimates.
    err = capsys.readouterr().err
    assert re.search(r"batch: [1-9]\d* pieces", err), err[-500:]
    assert {r.delta for r in rows} == {4.0}
    _check_rows([r.to_json() for r in rows], 4)
    assert _is_png(os.path.join(out, "power.png"))
    assert not os.path.exists(os.path.join(out, "qq_null.png"))  # no null setting
    for r in _records(out):
        if r["valid"]:
            _check_methods(r, 64)


def test_pieces_run(tmp_path, models):
    spec = ex.default_spec("pieces", trials=3, **COMMON)
    out = str(tmp_path)
    rows = ex.run_experiment(spec, out, models=models, progress=False)
    sel = [r for r in rows if r.method == "selective"]
    assert len(sel) == 1 and sel[0].search == "exhaustive"
    r = sel[0]
    assert 1 <= r.pieces_median <= r.pieces_max and r.pieces_mean <= r.pieces_max
    assert r.seconds > 0
    assert _is_png(os.path.join(out, "pieces.png"))
    for rec in _records(out):
        if rec["valid"]:
            s = rec["methods"]["selective"]
            assert s["inf_p"] == pytest.approx(s["sup_p"], abs=1e-9)  # exact p


def test_robustness_run(tmp_path, models):
    spec = ex.default_spec(
        "robustness",
        sizes=(8,),
        noises=("t",),
        distances=(0.03,),
        trials=3,
        **{k: v for k, v in COMMON.items() if k != "sizes"},
    )
    out = str(tmp_path)
    rows = ex.run_experiment(spec, out, models=models, progress=False)
    assert {(r.noise, r.distance) for r in rows} == {("t", 0.03)}
    _check_rows([r.to_json() for r in rows], 3)
    assert _is_png(os.path.join(out, "robustness.png"))


@pytest.mark.slow
def test_pwl_run(tmp_path, models):
    spec = ex.default_spec(
        "pwl",
        activations=("pwl_silu",),
        covariances=("iid",),
        trials=3,
        methods=("selective", "naive"),
        **COMMON,
    )
    out = str(tmp_path)
    rows = ex.run_experiment(spec, out, models=models, progress=False)
    assert {r.activation for r in rows} == {"pwl_silu"}
    _check_rows([r.to_json() for r in rows], 3)
    assert _is_png(os.path.join(out, "type1_error.png"))
    for r in _records(out):
        if r["valid"]:
            _check_methods(r, 64)


def test_permutation_method(tmp_path, models):
    spec = ex.default_spec(
        "fpr",
        covariances=("iid",),
        trials=1,
        methods=("naive", "permutation"),
        permutations=32,
        **COMMON,
    )
    out = str(tmp_path)
    rows = ex.run_experiment(spec, out, models=models, progress=False)
    perm = [r for r in rows if r.method == "permutation"]
    assert len(perm) == 1 and perm[0].trials <= 1
    for rec in _records(out):
        if rec["valid"]:
            p = rec["methods"]["permutation"]
            assert p["num_valid"] + p["num_skipped"] == 32
            if p["num_valid"]:
                assert 0.0 <= p["p"] <= 1.0
                assert p["p"] * p["num_valid"] == pytest.approx(
                    round(p["p"] * p["num_valid"])
                )


# ------------------------------------------------------------ data and statistics


def test_trials_are_reproducible_on_their_own():
    s = ex.Setting(size=8, covariance="corr")
    a, b = ex.trial_data(s, 5), ex.trial_data(s, 5)
    for f in ("x", "x_ref", "eps0", "eps"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.eps.shape == (5, 8, 8, 1)
    assert not np.array_equal(a.x, ex.trial_data(s, 6).x)
    assert not np.array_equal(a.x, a.x_ref)
    # how the images are tested does not change them
    same = ex.Setting(
        size=8,
        covariance="corr",
        search="exhaustive",
        termination="precision",
        activation="pwl_gelu",
        checkpoint="c",
    )
    np.testing.assert_array_equal(ex.trial_data(same, 5).x, a.x)
    assert ex.Setting(size=8, covariance="iid").data_seed != s.data_seed


def test_signal_is_one_square_of_side_d_over_3():
    s = ex.Setting(size=12, delta=1.5)
    x = ex.trial_data(s, 3).x
    # oracle: the same stream without the signal (test image drawn first)
    rng = np.random.default_rng([s.data_seed, 3])
    d = x - ex.sample_noise(rng, (12, 12, 1))
    rows, cols = np.nonzero(d[..., 0])
    assert len(rows) == 16 and np.allclose(d[rows, cols, 0], 1.5)
    assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3


@pytest.mark.parametrize("covariance", ["iid", "corr"])
def test_noise_has_the_assumed_covariance(covariance):
    rng = np.random.default_rng(0)
    e = np.stack(
        [
            ex.sample_noise(rng, (4, 4, 1), covariance=covariance).ravel()
            for _ in range(20000)
        ]
    )
    cov = np.cov(e.T)
    i = np.arange(16)
    want = np.eye(16) if covariance == "iid" else 0.5 ** np.abs(i[:, None] - i[None])
    np.testing.assert_allclose(cov, want, atol=0.04)


@pytest.mark.parametrize("family", ex.NOISE_FAMILIES)
def test_noise_families_sit_at_the_asked_distance(family):
    p = ex.noise_parameter(family, 0.03)
    dist = ex.noise._standardised(family, p)
    assert ex.wasserstein1_to_normal(dist) == pytest.approx(0.03, abs=1e-9)
    if family != "skewnorm":  # scipy's generic skew-normal cdf takes minutes
        assert ex.wasserstein1_to_normal(dist, quadrature=True) == pytest.approx(
            0.03, abs=1e-6
        )
    # standardised: mean 0, variance 1 (sample check), and not normal
    x = ex.sample_noise(
        np.random.default_rng(1), (200_000,), noise=family, distance=0.03
    )
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1.0) < 0.02
    # the empirical W1 to N(0,1) matches (sorted-sample coupling)
    q = stats.norm.ppf((np.arange(len(x)) + 0.5) / len(x))
    assert np.mean(np.abs(np.sort(x) - q)) == pytest.approx(0.03, abs=0.006)


def test_unreachable_distance_is_refused():
    with pytest.raises(InputError, match="outside"):
        ex.noise_parameter("gennorm_hi", 5.0)


def test_clopper_pearson_matches_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (52, 1000)]:
        ci = stats.binomtest(k, n).proportion_ci(0.99, method="exact")
        assert ex.clopper_pearson(k, n) == pytest.approx((ci.low, ci.high))


@pytest.mark.parametrize("name", ["pwl_silu", "pwl_gelu"])
def test_pwl_activation_interpolates_with_fixed_tails(name):
    knots = np.asarray(PWL_KNOTS[name])
    assert len(knots) == 8 and np.all(np.diff(knots) > 0)
    f = {
        "pwl_silu": lambda x: x / (1 + np.exp(-x)),
        "pwl_gelu": lambda x: (
            0.5 * x * (1 + __import__("scipy").special.erf(x / np.sqrt(2)))
        ),
    }[name]
    x = np.linspace(-20, 20, 40001)
    got = np.asarray(jax.jit(activation_fn(name))(x))
    # oracle: np.interp through the knots, flat on the left, slope 1 on the right
    want = np.interp(x, knots, f(knots))
    right = x > knots[-1]
    want[right] = f(knots[-1]) + (x[right] - knots[-1])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.max(np.abs(got - f(x))[np.abs(x) < 10]) < 0.03


def test_with_activation_keeps_the_weights(models):
    base, pwl = models[("tiny_8", "relu")], models[("tiny_8", "pwl_silu")]
    assert ex.with_activation(base, "relu") is base
    assert pwl.state is base.state
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 1))
    t = np.array([200])
    apply = jax.jit(lambda m: m.apply(x, t))
    a, b = np.asarray(apply(base)), np.asarray(apply(pwl))
    assert not np.allclose(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5


def test_bad_specs_are_refused():
    with pytest.raises(InputError):
        ex.default_spec("nope")
    with pytest.raises(InputError):
        ex.default_spec("fpr", methods=("magic",))
    with pytest.raises(InputError):
        ex.default_spec("fpr", covariances=("banded",))
    with pytest.raises(InputError, match="size"):
        ex.run_experiment(
            ex.default_spec("fpr", sizes=(16,), trials=1, checkpoints={16: "tiny_8"}),
            "/nonexistent/never",
            progress=False,
        )


# ---------------------------------------------------------------------- slow


@pytest.mark.slow
def test_selective_holds_the_level_and_naive_does_not(tmp_path, models):
    """300 valid null trials on the tiny model: selective inside the 99% interval
    around alpha, naive above selective (the selection bias)."""
    spec = ex.default_spec(
        "fpr",
        covariances=("iid",),
        trials=300,
        methods=("selective", "naive"),
        **COMMON,
    )
    rows = {
        r.method: r
        for r in ex.run_experiment(spec, str(tmp_path), models=models, progress=False)
    }
    lo, hi = stats.binom.interval(0.99, 300, 0.05)
    assert lo <= rows["selective"].rejections <= hi, rows["selective"]
    assert rows["naive"].rate > rows["selective"].rate


def test_git_commit_names_the_head_and_a_changed_package():
    """The commit stamped on records and summaries: HEAD's short hash, "+dirty"
    when tracked files of sijax/ differ from it (records made by uncommitted code
    must not pass for the commit's); "unknown" outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(ex.__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=root).stdout.strip()  # fmt: skip
        except OSError:  # no git at all
            return ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:  # installed from an archive: no checkout to name
        assert ex.git_commit() == "unknown"
        return
    changed = git("status", "--porcelain", "--untracked-files=no", "--", root)
    assert ex.git_commit() == head + ("+dirty" if changed else "")


def test_records_of_another_checkout_resume_the_same_setting(tmp_path):
    # A benchmark run from a worktree keyed its trials by that checkout's absolute
    # checkpoint path; resumed from another checkout they must name the same setting
    # (else its trials start again from index 0: the same images twice).
    from sijax.experiments.files import portable_key, records_by_setting
    from sijax.experiments.spec import Setting

    here = Setting(size=8, covariance="iid", delta=0.0, checkpoint="dal_v5_8")
    elsewhere = json.loads(here.key)
    elsewhere["checkpoint"] = "/some/worktree/sijax/checkpoints/dal_v5_8"
    own = json.loads(here.key)
    own["checkpoint"] = str(tmp_path / "my_model")  # not a committed model: kept
    path = tmp_path / "trials.jsonl"
    rows = [{"setting": json.dumps(elsewhere), "index": 0, "z": 1.0},
            {"setting": here.key, "index": 0, "z": 2.0},
            {"setting": here.key, "index": 1, "z": 3.0},
            {"setting": json.dumps(own), "index": 0, "z": 4.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = records_by_setting(str(path))
    assert set(done) == {here.key, json.dumps(own)}
    assert {i: r["z"] for i, r in done[here.key].items()} == {0: 1.0, 1: 3.0}
    assert portable_key(json.dumps(own)) == json.dumps(own)
