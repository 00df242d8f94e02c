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

``--setting synthetic`` is the paper's synthetic setting instead (docs/method.md §7):
each region detector trained on iid N(0, 1) 8x8 images (``sijax train --detector
NAME --set size=8`` without ``--data``), then ``sijax experiment fpr`` (type I error
on null images against an N(0, 1) reference, selective and naive, decision
termination) and ``sijax experiment power`` (a floor(d/3) square shifted by each
``--deltas``) on its model directory, in one process on one XLA CPU device
(``--workers 1 --cpu-devices 1``; ``taskset`` bounds its cores). DiffPath has no
region and gets no test here. Trial counts per detector with ``--trials
NAME=FPR,POWER``; the detectors of ``--oc`` (MDPS by default, whose parametric
p-values take minutes) are tested with over-conditioned p-values (``--methods oc``).
The region threshold is the paper's 0.8 for DAL; every other detector calibrated its
own at training (the 0.99 quantile of its maps on 50 fresh N(0, 1) images, stored
with the model), which ``sijax experiment`` uses; a detector whose map stays below
its threshold has no valid trial, and the table says so:

    nice -n 19 taskset -c 0 python benchmarks/detectors.py --setting synthetic \
        --workdir /work/runs/detectors_synth --write

``--write`` copies the experiments' outputs to benchmarks/results/detectors_synthetic/
and rewrites the "Detectors side by side: synthetic N(0, 1)" section of
benchmarks/README.md.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _readme import replace_section  # noqa: E402

NAMES = ("dal", "deco_diff", "mdps", "anoddpm", "ddad", "diffpath")
REGION = tuple(n for n in NAMES if n != "diffpath")  # detectors with a region test
SYNTHETIC = "Detectors side by side: synthetic N(0, 1)"


def sh(*args) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--detectors", nargs="+", choices=NAMES,
                    help="default: all (synthetic: those with a region)")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test-good", type=int, default=150)
    ap.add_argument("--n-test-defect", type=int, default=20)
    ap.add_argument("--epochs", type=int,
                    help="training epochs of every detector (the presets' own "
                    "differ; one number keeps the comparison fair; default 40, "
                    "synthetic 10)")
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
    ap.add_argument("--workers", type=int,
                    help="worker processes (default 2; synthetic: 1, each with "
                    "one XLA CPU device)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the table of the evaluations as they "
                    "stand (an unfinished one marked partial)")
    ap.add_argument("--note", default="",
                    help="a sentence added to the section's header (e.g. which rows "
                    "come from which run when the workdir gathers several)")
    ap.add_argument("--setting", choices=("real", "synthetic"), default="real",
                    help="real: the bundled digits with sijax evaluate (default); "
                    "synthetic: the paper's N(0, 1) images with sijax experiment "
                    "fpr and power")
    syn = ap.add_argument_group("synthetic setting")
    syn.add_argument("--fpr-trials", type=int, default=100,
                     help="valid null trials per detector")
    syn.add_argument("--power-trials", type=int, default=30,
                     help="valid trials per delta and detector (0: no power run)")
    syn.add_argument("--trials", nargs="+", default=[], metavar="NAME=FPR,POWER",
                     help="other trial counts for some detectors (the slower ones)")
    syn.add_argument("--deltas", nargs="+", type=float, default=[2.0, 4.0])
    syn.add_argument("--oc", nargs="*", default=["mdps"], choices=REGION,
                     help="detectors tested with over-conditioned p-values (one "
                     "piece each: valid, less powerful) instead of the parametric "
                     "search (default: mdps)")
    syn.add_argument("--batch", type=int, default=8,
                     help="images per compiled call of sijax experiment")
    a = ap.parse_args()
    if a.setting == "synthetic":
        synthetic(ap, a)
        return
    a.epochs = 40 if a.epochs is None else a.epochs
    a.workers = 2 if a.workers is None else a.workers
    a.detectors = list(NAMES) if a.detectors is None else a.detectors
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
        "in benchmarks/results/detectors/." + (f" {a.note}" if a.note else ""),
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


# --- The synthetic N(0, 1) setting -------------------------------------------------


def _trial_counts(ap, a) -> dict[str, tuple[int, int]]:
    """{name: (valid fpr trials, valid power trials per delta)} from the options."""
    counts = {n: (a.fpr_trials, a.power_trials) for n in REGION}
    for item in a.trials:
        name, _, nums = item.partition("=")
        try:
            fpr, power = (int(v) for v in nums.split(","))
        except ValueError:
            ap.error(f"--trials {item!r}: expected NAME=FPR,POWER")
        if name not in REGION:
            ap.error(f"--trials {item!r}: {name!r} is not one of {REGION}")
        counts[name] = (fpr, power)
    return counts


def _timed(timings: dict, path: str, step: str, *args) -> None:
    """``sh(*args)``, adding its wall seconds to ``timings[step]`` (kept in ``path``
    across calls: a resumed step adds up)."""
    t0 = time.time()
    try:
        sh(*args)
    finally:  # an interrupted call's seconds count too
        t = timings.setdefault(step, {"seconds": 0.0, "calls": 0})
        t["seconds"] += time.time() - t0
        t["calls"] += 1
        with open(path, "w") as f:
            json.dump(timings, f, indent=1)


def synthetic(ap, a) -> None:
    """Trains each region detector on N(0, 1) images and runs ``sijax experiment
    fpr`` and ``power`` on its model (every step resumable)."""
    a.epochs = 10 if a.epochs is None else a.epochs
    a.workers = 1 if a.workers is None else a.workers
    names = list(REGION) if a.detectors is None else a.detectors
    if "diffpath" in names:
        print("diffpath: an image-level score, no region: no region test",
              flush=True)
        names = [n for n in names if n != "diffpath"]
    counts = _trial_counts(ap, a)
    os.makedirs(a.workdir, exist_ok=True)
    if not a.report_only:  # the calls that made the workdir, for the write-up
        with open(os.path.join(a.workdir, "calls.jsonl"), "a") as f:
            f.write(json.dumps({
                "argv": sys.argv[1:],
                "start": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "cpus": sorted(os.sched_getaffinity(0)), "nice": os.nice(0),
            }) + "\n")
    tpath = os.path.join(a.workdir, "timings.json")
    timings = {}
    if os.path.isfile(tpath):
        with open(tpath) as f:
            timings = json.load(f)
    for name in [] if a.report_only else names:
        run = os.path.join(a.workdir, f"train_{name}")
        model = os.path.join(run, "model")
        if not os.path.isdir(model):
            resume = ["--resume"] if os.path.isdir(os.path.join(run, "ckpt")) else []
            _timed(timings, tpath, f"train_{name}", "sijax", "train", "--detector",
                   name, "--set", "size=8", "--set", f"epochs={a.epochs}",
                   "--workdir", run, "--no-progress", *resume)
        methods = ["oc", "naive"] if name in a.oc else ["selective", "naive"]
        fpr, power = counts[name]
        for exp, trials, grid in (
                ("fpr", fpr, []),
                ("power", power, ["--deltas", *(f"{d:g}" for d in a.deltas)])):
            if trials < 1:
                continue
            out = os.path.join(a.workdir, f"{exp}_{name}")
            resume = (["--resume"] if os.path.isfile(os.path.join(out, "trials.jsonl"))
                      else [])
            _timed(timings, tpath, f"{exp}_{name}", "sijax", "experiment", exp,
                   "--out", out, "--sizes", "8", "--covariance", "iid", *grid,
                   "--trials", str(trials), "--methods", *methods, "--checkpoint",
                   model, "--termination", "decision", "--batch", str(a.batch),
                   "--workers", str(a.workers), "--cpu-devices", "1",
                   "--no-progress", *resume)
    rows = {}
    for name in REGION:  # every detector run so far in this workdir
        row = _synthetic_row(a.workdir, name)
        if row is not None:
            rows[name] = row
    if a.write:
        write_synthetic(a, rows, timings)


def _seconds_per_p(out: str) -> float | None:
    """Wall seconds per valid trial (a p-value) of the batches run without
    compilation (all batches if every one compiled): the batches' seconds, empty
    regions' share included, over their valid trials."""
    from sijax.experiments import read_trials

    path = os.path.join(out, "trials.jsonl")
    if not os.path.isfile(path):
        return None
    records = {(r["setting"], r["index"]): r for r in read_trials(path)}.values()
    done = [r for r in records if not r["compile"]] or list(records)
    valid = sum(r["valid"] for r in done)
    return sum(r["seconds"] for r in done) / valid if valid else None


def _synthetic_row(workdir: str, name: str) -> dict | None:
    """What the table shows of one detector, from its experiments' outputs."""
    out = os.path.join(workdir, f"fpr_{name}")
    if not os.path.isfile(os.path.join(out, "summary.json")):
        return None
    row = {"fpr": {}, "power": {}}
    for exp in ("fpr", "power"):
        out = os.path.join(workdir, f"{exp}_{name}")
        if not os.path.isfile(os.path.join(out, "summary.json")):
            continue
        with open(os.path.join(out, "summary.json")) as f:
            for r in json.load(f):
                row[exp].setdefault(r["delta"], {})[r["method"]] = r
        row[f"{exp}_seconds_per_p"] = _seconds_per_p(out)
    with open(os.path.join(workdir, f"train_{name}", "model", "config.json")) as f:
        row["model"] = json.load(f)
    return row


def _ci(r: dict) -> str:
    if not r or not r["trials"]:
        return "-"
    return f"{r['rate']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"


def synthetic_table(rows: dict, deltas) -> list[str]:
    """The markdown table of the synthetic setting (one row per detector)."""
    lines = [
        "| detector | threshold | train s (compile excluded) "
        "| null trials: valid / run | type I, selective [99%] | type I, naive [99%] | "
        + " | ".join(f"power delta={d:g}: selective / naive (valid)" for d in deltas)
        + " | pieces per p (mean / max) | s per p (null / power) |",
        "|---|---|---|---|---|---|" + "---|" * len(deltas) + "---|---|",
    ]
    for name, row in rows.items():
        null = row["fpr"].get(0.0, {})
        oc = "oc" in null
        sel = null.get("oc" if oc else "selective", {})
        naive = null.get("naive", {})
        summ = row["model"].get("summary", {})
        train_s = (f"{summ['steps'] * summ['seconds_per_step']:.0f}"
                   if "seconds_per_step" in summ else "-")
        run = (f"{sel['trials']} / {sel['trials'] + sel['skipped']}" if sel
               else "-")
        power = []
        for d in deltas:
            p = row["power"].get(float(d), {})
            ps, pn = p.get("oc" if oc else "selective"), p.get("naive")
            power.append(
                "-" if not ps or not pn else
                f"{ps['rate']:.2f} / {pn['rate']:.2f} ({ps['trials']})"
                if ps["trials"] else f"no region in {ps['skipped']} trials")
        pieces = ("1 (over-conditioned)" if oc else
                  f"{sel['pieces_mean']:.0f} / {sel['pieces_max']}"
                  if sel and sel["trials"] else "-")
        capped = sel.get("capped", 0) if sel else 0
        if capped:
            pieces += f", {capped} capped"
        secs = "-" if row.get("fpr_seconds_per_p") is None else (
            f"{row['fpr_seconds_per_p']:.2f}")
        if row.get("power_seconds_per_p") is not None:
            secs += f" / {row['power_seconds_per_p']:.2f}"
        lines.append(
            f"| {name}{' (oc)' if oc else ''} | {_threshold(row['model'])} | "
            f"{train_s} | {run} | {_ci(sel)} | "
            f"{_ci(naive)} | {' | '.join(power)} | {pieces} | "
            f"{secs} |")
    return lines


def _threshold(model_config: dict) -> str:
    """The region threshold a model's trials used (its calibrated one, else 0.8)."""
    detect = model_config.get("detect")
    if detect is None:
        return "0.8 (paper)"
    return f"{detect['threshold']:.3g} (q {detect['quantile']:g})"


def _place_after(previous: str, heading: str) -> bool:
    """Puts an empty ``## heading`` right after the ``## previous`` section of
    benchmarks/README.md when it is not there yet (``replace_section`` would append
    it at the end); returns whether another section follows it."""
    from _readme import README

    with open(README) as f:
        text = f.read()
    if not re.search(rf"^## {re.escape(heading)}\n", text, re.M):
        m = re.search(rf"^## {re.escape(previous)}\n.*?(?=^## |\Z)", text,
                      re.S | re.M)
        if m is not None:
            rest = text[m.end():]
            text = (text[:m.end()].rstrip("\n") + f"\n\n## {heading}\n"
                    + ("\n" + rest if rest else ""))
            with open(README, "w") as f:
                f.write(text)
    m = re.search(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    return m is not None and m.end() < len(text)


def _calls(workdir: str) -> str:
    """The calls of this script recorded in ``workdir``, as markdown."""
    path = os.path.join(workdir, "calls.jsonl")
    calls = []
    if os.path.isfile(path):
        with open(path) as f:
            calls = [json.loads(line) for line in f if line.strip()]
    if not calls:
        return f"`python benchmarks/detectors.py {' '.join(sys.argv[1:])}`"
    return "calls: " + "; ".join(
        f"`python benchmarks/detectors.py {' '.join(c['argv'])}` ({c['start']}"
        + (f", on cpu {', '.join(map(str, c['cpus']))} at nice {c['nice']}"
           if "cpus" in c else "") + ")"
        for c in calls)


def write_synthetic(a, rows: dict, timings: dict) -> None:
    """Copies the experiments' outputs to benchmarks/results/detectors_synthetic/
    and rewrites the synthetic section of benchmarks/README.md."""
    dest = os.path.join(HERE, "results", "detectors_synthetic")
    os.makedirs(dest, exist_ok=True)
    for name in rows:
        for exp in ("fpr", "power"):
            src = os.path.join(a.workdir, f"{exp}_{name}")
            if not os.path.isdir(src):
                continue
            to = os.path.join(dest, f"{exp}_{name}")
            os.makedirs(to, exist_ok=True)
            for f in sorted(os.listdir(src)):
                if f.endswith((".json", ".md", ".png")):
                    shutil.copy(os.path.join(src, f), os.path.join(to, f))
            with open(os.path.join(to, "trials.jsonl.gz"), "wb") as f:
                subprocess.run(["gzip", "-nc", os.path.join(src, "trials.jsonl")],
                               stdout=f, check=True)
        shutil.copy(os.path.join(a.workdir, f"train_{name}", "model", "config.json"),
                    os.path.join(dest, f"{name}_model_config.json"))
    with open(os.path.join(dest, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    if os.path.isfile(os.path.join(a.workdir, "calls.jsonl")):
        shutil.copy(os.path.join(a.workdir, "calls.jsonl"), dest)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    wall = {name: sum(t["seconds"] for k, t in timings.items()
                      if k.split("_", 1)[1] == name) for name in rows}
    oc = [n for n in rows if "oc" in rows[n]["fpr"].get(0.0, {})]
    none = [n for n in rows
            if not any(r["trials"] for r in rows[n]["fpr"].get(0.0, {}).values())]
    # sijax is installed editable: a run that spans commits uses each in turn.
    ran, batches = set(), set()
    for name in rows:
        for exp in ("fpr", "power"):
            meta = os.path.join(a.workdir, f"{exp}_{name}", "experiment.json")
            if os.path.isfile(meta):
                with open(meta) as f:
                    meta = json.load(f)
                ran.add(meta.get("commit", "?"))
                batches.add(str(meta["spec"]["batch"]))
    epochs = sorted({str(r["model"]["config"]["epochs"]) for r in rows.values()})
    history = subprocess.run(["git", "log", "--format=%h", "-n", "500"], cwd=HERE,
                             capture_output=True, text=True).stdout.split()
    ran = sorted(ran, key=lambda c: -history.index(c) if c in history else 1)
    lines = [
        f"## {SYNTHETIC}",
        "",
        f"{time.strftime('%Y-%m-%d')}, commit {commit} at writing (the experiments' "
        f"summaries last written at {', '.join(ran)}: see their "
        "experiment.json), "
        f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores; load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at writing), "
        f"{_calls(a.workdir)}"
        + ("; table written by `--report-only --write`" if a.report_only else "")
        + ". The paper's "
        "synthetic setting (docs/method.md §7) for each region detector: trained "
        "on 1000 iid N(0, 1) 8x8 images with its own preset and one epoch count "
        "for all (`sijax train --detector NAME --set size=8 --set "
        f"epochs={'/'.join(epochs)}`"
        "; DAL too, not the committed dal_v5_8), then `sijax experiment fpr` (null "
        "images against an N(0, 1) reference, Sigma = I; the region threshold: the "
        "paper's 0.8 for DAL, for the others the one each calibrated at training, "
        "the 0.99 quantile of its maps on 50 fresh N(0, 1) images, since their maps "
        "lie on other scales: at 0.8 DeCo-Diff, MDPS and DDAD flagged no region in "
        "160 null trials) and `sijax experiment power` (a 2x2 = "
        "floor(d/3) square shifted by delta) with `--checkpoint MODEL_DIR "
        "--termination decision --batch "
        f"{'/'.join(sorted(batches))} --cpu-devices 1` and each call's "
        "`--workers` (one process per worker, one single-threaded XLA CPU device "
        "each). "
        "Rates among trials "
        "with a detected region (valid trials; the counts are in the table: "
        "run = valid + empty regions met before the last valid one); 99% "
        "Clopper-Pearson intervals. s per p: wall seconds of the compiled batches "
        "(compilation excluded) over their valid trials, in the null trials and "
        "in the power trials (all deltas). DiffPath has no region: "
        "no region test."
        + (f" {', '.join(oc)}: over-conditioned p-values (`--methods oc naive`: "
           "one piece each, valid but less powerful)"
           + (", because a parametric MDPS p-value took 592 s on a digits image "
              "(Detectors side by side)" if "mdps" in oc else "") + "."
           if oc else "")
        + (f" {', '.join(none)}: no region in any null trial at its threshold, "
           "so no type I error to estimate." if none else "")
        + " Raw outputs (summaries, trials, model configs, wall times per step) in "
        "benchmarks/results/detectors_synthetic/.",
        "",
        *synthetic_table(rows, a.deltas),
        "",
        "Wall time per detector (training and both experiments, every call of "
        "this script added up): "
        + "; ".join(f"{n} {wall[n] / 60:.1f} min" for n in rows)
        + f"; total {sum(wall.values()) / 60:.1f} min.",
    ]
    follows = _place_after("Detectors side by side", SYNTHETIC)
    replace_section(SYNTHETIC, "\n".join(lines) + "\n" + ("\n" if follows else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
