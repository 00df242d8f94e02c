"""The diffusion detectors side by side on real images (issue 26).

For each detector of ``sijax.detectors`` (dal, deco_diff, mdps, anoddpm, ddad,
diffpath): ``sijax train --detector NAME`` on the normal images of the bundled digits
set (scikit-learn's digits, 8x8, synthetic scratch / spot / missing defects; the
[data] extra), then ``sijax evaluate`` against the template with the low-rank noise
model. One table: pixel AUROC, AUPRO, image AUROC, the selective test's rejection
rate on good images (its type I error, 99% Clopper-Pearson interval) and on each
defect kind (power), pieces and seconds per p-value, training time. DiffPath scores
whole images: it gets an image AUROC and no test. Every step is a ``sijax`` command
and resumable: rerun after a kill.

    python benchmarks/detectors.py --workdir /work/runs/detectors --write

``--write`` copies each evaluation's summary to benchmarks/results/detectors/ and
rewrites the "Detectors side by side" section of benchmarks/README.md.
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

NAMES = ("dal", "deco_diff", "mdps", "anoddpm", "ddad", "diffpath")


def sh(*args) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--detectors", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test-good", type=int, default=150)
    ap.add_argument("--n-test-defect", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=40,
                    help="training epochs of every detector (the presets' own "
                    "differ; one number keeps the comparison fair)")
    ap.add_argument("--threshold-quantile", type=float, default=0.95)
    ap.add_argument("--sigma", default="model:lowrank")
    ap.add_argument("--max-per-kind", type=int,
                    help="evaluate at most this many images of each kind (the "
                    "slower detectors); the table says how many were tested")
    ap.add_argument("--search", default="parametric",
                    choices=("parametric", "over_conditioning"),
                    help="search of the selective test (over_conditioning: one "
                    "piece per p-value, valid but less powerful; for detectors "
                    "whose pieces are too costly here); the table says which")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the table of the evaluations as they "
                    "stand (an unfinished one marked partial)")
    a = ap.parse_args()
    data = os.path.join(a.workdir, "digits")
    if not os.path.isdir(data):
        sh("sijax", "data", "digits", "--out", data, "--n-train", str(a.n_train),
           "--n-test-good", str(a.n_test_good), "--n-test-defect",
           str(a.n_test_defect))
    rows = {}
    for name in [] if a.report_only else a.detectors:
        run = os.path.join(a.workdir, f"train_{name}")
        t0 = time.time()
        if not os.path.isdir(os.path.join(run, "model")):
            resume = ["--resume"] if os.path.isdir(os.path.join(run, "ckpt")) else []
            epochs = ["--set", f"epochs={a.epochs}"]
            sh("sijax", "train", "--detector", name, "--data", data, "--set", "size=8",
               *epochs, "--set", f"threshold_quantile={a.threshold_quantile}",
               "--workdir", run, "--no-progress", *resume)
        out = os.path.join(a.workdir, f"eval_{name}")
        sh("sijax", "evaluate", "--checkpoint", run, "--data", data, "--out", out,
           "--sigma", a.sigma, "--termination", "decision", "--no-reports",
           "--search", a.search,
           "--workers", str(a.workers), "--no-progress",
           *([] if a.max_per_kind is None else ["--max-per-kind",
                                                str(a.max_per_kind)]),
           *(["--resume"] if os.path.exists(os.path.join(out, "images.jsonl"))
             else []))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    # Every detector evaluated so far in this workdir (earlier calls included).
    for name in NAMES:
        out = os.path.join(a.workdir, f"eval_{name}")
        if os.path.isfile(os.path.join(out, "summary.json")):
            with open(os.path.join(out, "summary.json")) as f:
                rows[name] = json.load(f)
            with open(os.path.join(a.workdir, f"train_{name}", "model",
                                   "config.json")) as f:
                rows[name]["model"] = json.load(f)
    if a.write:
        write(a, rows)


def _rate(d) -> str:
    if not d or not d.get("tested"):
        return "-"
    lo, hi = d["interval_99"]
    return f"{d['rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def _num(s: dict, key: str) -> str:
    v = s.get(key)
    return "-" if v is None or v != v else f"{v:.3f}"


def write(a, rows) -> None:
    dest = os.path.join(HERE, "results", "detectors")
    os.makedirs(dest, exist_ok=True)
    for name in rows:
        src = os.path.join(a.workdir, f"eval_{name}")
        for f in ("summary.json", "summary.md", "evaluation.json", "overview.png",
                  "scores.png"):
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), os.path.join(dest, f"{name}_{f}"))
        subprocess.run(["gzip", "-kf", os.path.join(src, "images.jsonl")], check=True)
        shutil.copy(os.path.join(src, "images.jsonl.gz"),
                    os.path.join(dest, f"{name}_images.jsonl.gz"))
        shutil.copy(os.path.join(a.workdir, f"train_{name}", "model", "config.json"),
                    os.path.join(dest, f"{name}_model_config.json"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    lines = [
        "## Detectors side by side",
        "",
        f"{time.strftime('%Y-%m-%d')}, commit {commit}, "
        f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores; load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at writing), "
        f"`python benchmarks/detectors.py --workdir {a.workdir} --write`"
        + f" (`--epochs {a.epochs}`: every detector trained that long). Data: "
        f"`sijax data digits` (8x8; {a.n_train} training images, "
        f"{a.n_test_good} good test images, {a.n_test_defect} per defect kind). "
        "Each detector trained with its own preset (`sijax train --detector NAME "
        f"--data DIR --set size=8`), threshold at the {a.threshold_quantile} quantile "
        "of the held-out normal images' score maps; every test image tested against "
        f"the template with `--sigma {a.sigma}`, parametric search with decision "
        "termination (unless the pieces column names another search). Rates among "
        "images with a detected region; 99% Clopper-Pearson intervals. Raw outputs "
        "in benchmarks/results/detectors/.",
        "",
        "| detector | train s (compile excluded) | pixel AUROC | AUPRO | image AUROC "
        "| good: with region / images | type I (selective) | naive "
        "| power (selective / naive) | pieces per p | s per p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        g = s.get("kinds", {}).get("good", {})
        defects = [k for k in s.get("kinds", {}) if k != "good"]
        power = "; ".join(
            f"{k} {s['kinds'][k]['selective']['rate'] or 0:.2f} / "
            f"{s['kinds'][k]['naive']['rate'] or 0:.2f}" for k in defects
            if s["kinds"][k].get("with_region"))
        with open(os.path.join(a.workdir, f"eval_{name}", "evaluation.json")) as f:
            ev = json.load(f)
        planned = ev["images"]
        search = ev["config"]["search"]
        done = s["images"] if isinstance(s["images"], int) else len(s["images"])
        partial = "" if done >= planned else f" (partial: {done} of {planned} images)"
        summ = s["model"].get("summary", {})
        train_s = (summ["steps"] * summ["seconds_per_step"]
                   if "seconds_per_step" in summ else None)
        pieces = g.get("mean_pieces")
        secs = g.get("mean_seconds")
        lines.append(
            f"| {name}{partial} | {'-' if train_s is None else f'{train_s:.0f}'} | "
            f"{_num(s, 'pixel_auroc')} | {_num(s, 'aupro')} | {_num(s, 'image_auroc')}"
            f" | {g.get('with_region', '-')} / {g.get('images', '-')} | "
            f"{_rate(g.get('selective'))} | {_rate(g.get('naive'))} | {power or '-'} |"
            f" {'-' if pieces is None else f'{pieces:.0f}'}"
            f"{'' if search == 'parametric' else f' ({search})'} | "
            f"{'-' if secs is None else f'{secs:.2f}'} |")
    replace_section("Detectors side by side", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
