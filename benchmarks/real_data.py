"""Does the DAL test hold its level on real images? (issue 25 item 6)

Builds the bundled digits set (scikit-learn's handwritten digits, 8x8, with
synthetic scratch / spot / missing defects), trains the paper's U-Net on its normal
images, and runs ``sijax evaluate`` once per stored noise model (pixel, stationary,
lowrank): the rejection rate of the selective and the naive test on held-out good
images (the real-data type I error, 99% Clopper-Pearson intervals) and on each
defect kind (power), with pixel AUROC, AUPRO and image AUROC. Every step is a
``sijax`` command, resumable (rerun the script after a kill); ``--write`` copies the
summaries to benchmarks/results/real_digits/ and rewrites the "Real images" section
of benchmarks/README.md.

    python benchmarks/real_data.py --workdir /work/runs/real --write

Needs the [data] extra. At the defaults (threshold at the 0.95 quantile: about 560
of the 900 good images have a region) it takes several hours of two cores, more than
one session: ``--save-state`` packs the data, the model and the evaluations so far
into results/real_digits/state.tar.gz, and a later run with the same ``--workdir``
on a fresh machine unpacks it and resumes where it stopped (to save the state of a
run that was killed, without running on: ``python -c "import sys;
sys.path.insert(0, 'benchmarks'); import real_data;
real_data.save_state('/work/runs/real')"``).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _readme import replace_section  # noqa: E402

KINDS = ("pixel", "stationary", "lowrank")
STATE = os.path.join(HERE, "results", "real_digits", "state.tar.gz")


def sh(*args) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-test-good", type=int, default=900)
    ap.add_argument("--n-test-defect", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threshold-quantile", type=float, default=0.95,
                    help="detection threshold: this quantile of the held-out normal "
                    "images' score maps (lower: more images with a region, more tests)")
    ap.add_argument("--noise-models", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: report (with --write, --save-state) the "
                    "evaluations as they stand, an unfinished one marked partial")
    ap.add_argument("--save-state", action="store_true",
                    help=f"pack the data, the model and every evaluation so far into "
                    f"{os.path.relpath(STATE, os.path.dirname(HERE))} (to commit), "
                    "so that a later run on a fresh machine resumes instead of "
                    "starting over")
    a = ap.parse_args()
    if not os.path.isdir(a.workdir) and os.path.isfile(STATE):
        restore_state(a.workdir)
    data = os.path.join(a.workdir, "digits")
    run = os.path.join(a.workdir, "digits_v5_8")
    if not os.path.isdir(data):
        sh("sijax", "data", "digits", "--out", data, "--n-train", str(a.n_train),
           "--n-test-good", str(a.n_test_good), "--n-test-defect",
           str(a.n_test_defect))
    if not os.path.isdir(os.path.join(run, "model")):
        resume = ["--resume"] if os.path.isdir(os.path.join(run, "ckpt")) else []
        sh("sijax", "train", "--data", data, "--config", "dal_v5", "--set", "size=8",
           "--set", f"epochs={a.epochs}",
           "--set", f"threshold_quantile={a.threshold_quantile}",
           "--workdir", run, "--no-progress", *resume)
    rows = {}
    for kind in a.noise_models:
        out = os.path.join(a.workdir, f"eval_{kind}")
        if a.report_only:
            if os.path.isfile(os.path.join(out, "summary.json")):
                with open(os.path.join(out, "summary.json")) as f:
                    rows[kind] = json.load(f)
            continue
        sh("sijax", "evaluate", "--checkpoint", run, "--data", data, "--out", out,
           "--sigma", f"model:{kind}", "--termination", "decision", "--no-reports",
           "--workers", str(a.workers), "--no-progress",
           *(["--resume"] if os.path.exists(os.path.join(out, "images.jsonl"))
             else []))
        with open(os.path.join(out, "summary.json")) as f:
            rows[kind] = json.load(f)
    if a.save_state:
        save_state(a.workdir)
    if a.write:
        write(a, data, run, rows)


def noise_checks(data: str, run: str) -> dict:
    """check_noise_model of every stored noise model on the good test images."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import sijax
    from sijax.data import open_dataset
    from sijax.evaluation.evaluate import evaluation_items
    from sijax.evaluation.images import model_input
    from sijax.noise_model import check_noise_model, load_noise_model

    model = sijax.load_model(run)
    ds = open_dataset(data)
    x = np.stack([np.asarray(model_input(model, ds.read(it), it.name))
                  for it in evaluation_items(ds, ["good"])])
    return {kind: check_noise_model(
        load_noise_model(os.path.join(run, "model", "noise", kind)), x)
        for kind in KINDS}


def _state_members(workdir: str):
    """The data, the model (not the training checkpoints) and the evaluations."""
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name)
        if name == "digits" or name.startswith("eval_"):
            yield name
        elif name == "digits_v5_8":
            for sub in sorted(os.listdir(path)):
                if sub != "ckpt":
                    yield os.path.join(name, sub)


def save_state(workdir: str) -> None:
    """Packs what a resumed run needs into STATE (a few MB, mostly the model)."""
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    with tarfile.open(STATE, "w:gz") as tar:
        for member in _state_members(workdir):
            tar.add(os.path.join(workdir, member), arcname=member)
    print(f"saved the run's state to {STATE} ({os.path.getsize(STATE) / 1e6:.1f} MB)")


def restore_state(workdir: str) -> None:
    """Unpacks STATE into a new ``workdir``: the evaluations record absolute paths,
    so resuming needs the same ``--workdir`` as the run that saved it."""
    with tarfile.open(STATE) as tar:
        tar.extractall(workdir, filter="data")
    with open(os.path.join(workdir, "digits_v5_8", "data.json")) as f:
        recorded = json.load(f)["source"]["path"]
    if os.path.abspath(recorded) != os.path.join(
            os.path.abspath(workdir), "digits"):
        shutil.rmtree(workdir)
        sys.exit(f"{STATE} was saved from a run in {os.path.dirname(recorded)}: "
                 "pass that --workdir to resume it")
    print(f"restored the saved state into {workdir}; resuming")


def _rate(d) -> str:
    if not d["tested"]:
        return "-"
    lo, hi = d["interval_99"]
    return f"{d['rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def write(a, data, run, rows) -> None:
    dest = os.path.join(HERE, "results", "real_digits")
    os.makedirs(dest, exist_ok=True)
    for kind in rows:
        src = os.path.join(a.workdir, f"eval_{kind}")
        for name in ("summary.json", "summary.md", "evaluation.json"):
            shutil.copy(os.path.join(src, name), os.path.join(dest, f"{kind}_{name}"))
        shutil.copy(os.path.join(src, "overview.png"),
                    os.path.join(dest, f"{kind}_overview.png"))
        subprocess.run(["gzip", "-kf", os.path.join(src, "images.jsonl")], check=True)
        shutil.copy(os.path.join(src, "images.jsonl.gz"),
                    os.path.join(dest, f"{kind}_images.jsonl.gz"))
    with open(os.path.join(run, "model", "config.json")) as f:
        meta = json.load(f)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    lines = [
        "## Real images (issue 25 item 6)",
        "",
        f"{time.strftime('%Y-%m-%d')}, written at commit {commit} (the evaluations "
        "may have run over earlier commits with the same test code: "
        "benchmarks/results/real_digits/*_evaluation.json hold their settings), "
        f"{platform.processor() or 'cpu'}"
        f" ({os.cpu_count()} cores; load average at writing "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}: shared with other jobs, "
        "so the seconds per test are not a speed benchmark), "
        f"`python benchmarks/real_data.py --workdir {a.workdir} --write`. "
        "Data: `sijax data digits` (scikit-learn's digits, "
        f"8x8; {meta['data']['n_train']} training images: "
        f"{meta['summary'].get('steps', '?')} steps of training on "
        f"{meta['config']['n_train']}, the rest held out), "
        f"{a.n_test_good} held-out good test images, {a.n_test_defect} per defect "
        f"kind. Model: dal_v5 at 8x8, {meta['config']['epochs']} epochs, final "
        f"loss {meta['summary']['final_loss']:.4f}, validation loss "
        f"{meta['summary'].get('final_val_loss', float('nan')):.4f}; threshold "
        f"{meta['detect']['threshold']:.4f} (the {meta['detect']['quantile']} "
        "quantile of the held-out images' score maps). Each test image is tested "
        "against the template (mean of the normal images) with the covariance of "
        "the named noise model; search parametric with decision termination; "
        "rates among images with a detected region, 99% Clopper-Pearson intervals.",
        "",
        "| noise model | good: with region / images | good: selective | good: naive "
        "| power (selective / naive) | pixel AUROC | AUPRO | image AUROC | "
        "s per test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in rows.items():
        g = s["kinds"].get("good", {})
        defects = [k for k in s["kinds"] if k != "good"]
        power = "; ".join(
            f"{k} {s['kinds'][k]['selective']['rate'] or 0:.2f} / "
            f"{s['kinds'][k]['naive']['rate'] or 0:.2f}" for k in defects)
        total = a.n_test_good + 3 * a.n_test_defect
        done = s["images"] if isinstance(s["images"], int) else len(s["images"])
        partial = "" if done >= total else f" (partial: {done} of {total} images)"
        def num(key, s=s):
            v = s.get(key)
            return "-" if v is None or v != v else f"{v:.3f}"

        lines.append(
            f"| {kind}{partial} | {g.get('with_region')} / {g.get('images')} | "
            f"{_rate(g['selective'])} | {_rate(g['naive'])} | {power or '-'} | "
            f"{num('pixel_auroc')} | {num('aupro')} | {num('image_auroc')} | "
            f"{g.get('mean_seconds') or float('nan'):.2f} |")
    checks = noise_checks(data, run)
    with open(os.path.join(dest, "noise_check.json"), "w") as f:
        json.dump(checks, f, indent=1)
    lines += [
        "",
        "Why, measured without any selection (`sijax.noise_model.check_noise_model` "
        "on the same held-out good images: one s x s square at a random place per "
        "image, z its standardised mean difference from the template, N(0, 1) when "
        "the noise model is right): variance of z [99% interval], and the fraction "
        "with |z| > 1.96 (0.05 when right).",
        "",
        "| noise model | " + " | ".join(
            f"{r['size']}x{r['size']}" for r in checks[KINDS[0]]) + " |",
        "|---|" + "---|" * len(checks[KINDS[0]]),
    ]
    for kind, rows_ in checks.items():
        lines.append(f"| {kind} | " + " | ".join(
            f"{r['var_z']:.2f} [{r['var_z_interval_99'][0]:.2f}, "
            f"{r['var_z_interval_99'][1]:.2f}]; {r['rate_196']:.3f}"
            for r in rows_) + " |")
    lines += ["", "Raw outputs: `benchmarks/results/real_digits/` (per noise model: "
              "summary.json, summary.md, evaluation.json, overview.png, "
              "images.jsonl.gz; noise_check.json).", ""]
    replace_section("Real images (issue 25 item 6)", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
