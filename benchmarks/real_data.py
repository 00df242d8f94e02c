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

Needs the [data] extra. Takes about an hour of two cores at the defaults.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _readme import replace_section  # noqa: E402

KINDS = ("pixel", "stationary", "lowrank")


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
    ap.add_argument("--noise-models", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    data = os.path.join(a.workdir, "digits")
    run = os.path.join(a.workdir, "digits_v5_8")
    if not os.path.isdir(data):
        sh("sijax", "data", "digits", "--out", data, "--n-train", str(a.n_train),
           "--n-test-good", str(a.n_test_good), "--n-test-defect",
           str(a.n_test_defect))
    if not os.path.isdir(os.path.join(run, "model")):
        resume = ["--resume"] if os.path.isdir(os.path.join(run, "ckpt")) else []
        sh("sijax", "train", "--data", data, "--config", "dal_v5", "--set", "size=8",
           "--set", f"epochs={a.epochs}", "--workdir", run, "--no-progress", *resume)
    rows = {}
    for kind in a.noise_models:
        out = os.path.join(a.workdir, f"eval_{kind}")
        t0 = time.time()
        sh("sijax", "evaluate", "--checkpoint", run, "--data", data, "--out", out,
           "--sigma", f"model:{kind}", "--termination", "decision", "--no-reports",
           "--workers", str(a.workers), "--no-progress",
           *(["--resume"] if os.path.exists(os.path.join(out, "images.jsonl"))
             else []))
        with open(os.path.join(out, "summary.json")) as f:
            rows[kind] = json.load(f)
        rows[kind]["wall_seconds_last_call"] = time.time() - t0
    if a.write:
        write(a, data, run, rows)


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
        f"{time.strftime('%Y-%m-%d')}, commit {commit}, {platform.processor() or 'cpu'}"
        f" ({os.cpu_count()} cores), `python benchmarks/real_data.py --workdir "
        f"{a.workdir} --write`. Data: `sijax data digits` (scikit-learn's digits, "
        f"8x8; {meta['data']['n_train']} training images, of which "
        f"{meta['summary'].get('steps', '?')} steps of training on "
        f"{meta['config']['n_train']} and the rest held out), "
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
        lines.append(
            f"| {kind} | {g.get('with_region')} / {g.get('images')} | "
            f"{_rate(g['selective'])} | {_rate(g['naive'])} | {power} | "
            f"{s.get('pixel_auroc', float('nan')):.3f} | "
            f"{s.get('aupro', float('nan')):.3f} | "
            f"{s.get('image_auroc', float('nan')):.3f} | "
            f"{g.get('mean_seconds') or float('nan'):.2f} |")
    lines += ["", "Raw outputs: `benchmarks/results/real_digits/` (per noise model: "
              "summary.json, summary.md, evaluation.json, overview.png, "
              "images.jsonl.gz).", ""]
    replace_section("Real images (issue 25 item 6)", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
