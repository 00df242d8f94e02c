"""Coverage of the selective confidence interval (issue 27 item 1).

For each setting (image side, covariance, signal delta) the synthetic trials of
``sijax experiment`` (:func:`sijax.experiments.trials.trial_data`: N(0, Sigma)
noise plus delta on one floor(d/3) square, an independent reference) run the DAL
test (reference hypothesis, committed dal_v5_<d> model) with
``DALConfig(confidence=LEVEL)``. A trial with a region counts; it is covered when
the interval holds the tested contrast of its region,

    theta = mean over M of E[X] - mean over M of E[X_ref] = delta |M & square| / |M|,

the quantity the interval is for (selective coverage: given the region). The naive
interval raw +- z_(1-a/2) sd, which ignores the selection, is scored on the same
trials. Reported per setting: the number of trials, both coverages with 99%
Clopper-Pearson intervals, the fraction of exact intervals (else the widest
consistent interval was reported, see sijax/selective/confidence.py) and median
widths.

Resumable (the records go to OUT/trials.jsonl, one line per trial; a rerun skips
the trials it has). ``--write`` copies trials.jsonl, summary.json and summary.md to
benchmarks/results/coverage/ and rewrites the "Coverage of the selective confidence
interval" section of benchmarks/README.md. The full run (1000 trials per setting,
about a day of two CPU cores at 16x16):

    python benchmarks/coverage.py --trials 1000 --out /work/runs/coverage --write

A small run (what the committed results are unless the README says otherwise):

    python benchmarks/coverage.py --sizes 8 --deltas 0 2 --trials 30 --write
"""

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _readme import replace_section  # noqa: E402

from sijax.experiments.trials import planted_mean  # noqa: E402

RESULTS = os.path.join(HERE, "results", "coverage")
HEADING = "Coverage of the selective confidence interval (issue 27)"


def run_setting(model, setting, a, done: dict, out_path: str) -> None:
    """Trials of ``setting`` until ``a.trials`` have a region (or 20x as many were
    tried), appended to ``out_path``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sijax.detect.dal import DALConfig, dal_test_batch, resolve_engine
    from sijax.diffusion.sampler import Noises
    from sijax.experiments.files import provenance
    from sijax.selective.confidence import naive_interval
    from sijax.status import Status

    config = DALConfig(
        confidence=a.level,
        termination=a.termination,
        search=a.search,
        max_pieces=a.max_pieces,
    )
    shape = tuple(model.image_shape)
    made_by = provenance(resolve_engine(config, model, shape).engine)
    key = setting.key
    mine = done.setdefault(key, {})
    index = 0
    while sum(r["valid"] for r in mine.values()) < a.trials and index < 20 * a.trials:
        todo = []
        while len(todo) < a.batch and index < 20 * a.trials:
            if index not in mine:
                todo.append(index)
            index += 1
        if not todo:
            continue
        pairs = [planted_mean(setting, i, shape) for i in todo]
        pad = pairs + [pairs[-1]] * (a.batch - len(pairs))
        stack = {
            f: np.stack([getattr(d, f) for _, d in pad])
            for f in ("x", "x_ref", "eps0", "eps")
        }
        t0 = time.perf_counter()
        res = dal_test_batch(
            model, stack["x"], stack["x_ref"], sigma=setting.covariance,
            noises=Noises(jnp.asarray(stack["eps0"]), jnp.asarray(stack["eps"])),
            config=config,
        )  # fmt: skip
        res = jax.device_get(res._replace(truncated=None))
        seconds = (time.perf_counter() - t0) / len(todo)
        rows = []
        for j, i in enumerate(todo):
            status = Status.from_code(res.status[j])
            if status is Status.ERROR:
                raise RuntimeError(f"{key}, trial {i}: the test failed")
            rec = {"setting": key, "index": i, "status": str(status),
                   "valid": status.valid, "seconds": seconds, **made_by}  # fmt: skip
            if status.valid:
                mask = np.asarray(res.mask[j])
                theta = float(pairs[j][0][..., 0][mask].mean())
                z = float(res.stat[j])
                sd = float(res.sd[j])
                lo, hi = (float(v) for v in res.confidence_interval[j])
                n_lo, n_hi = (v * sd for v in naive_interval(z, a.level))
                rec.update(
                    region_size=int(mask.sum()), z=z, sd=sd, theta=theta,
                    lo=lo, hi=hi, exact=bool(res.confidence_exact[j]),
                    covered=lo <= theta <= hi, naive_lo=n_lo, naive_hi=n_hi,
                    naive_covered=n_lo <= theta <= n_hi,
                    p=float(res.p_value[j]), inf_p=float(res.inf_p[j]),
                    sup_p=float(res.sup_p[j]), pieces=int(res.search_count[j]),
                )  # fmt: skip
            mine[i] = rec
            rows.append(rec)
        with open(out_path, "a") as f:
            for rec in rows:
                f.write(json.dumps(rec) + "\n")
        valid = sum(r["valid"] for r in mine.values())
        print(f"{setting.label()}: {valid}/{a.trials} with a region, "
              f"{len(mine)} tried, {seconds:.2f} s/trial", flush=True)  # fmt: skip


def summarize(records: list[dict], level: float) -> list[dict]:
    import numpy as np

    from sijax.experiments.summary import clopper_pearson

    out = []
    for key in dict.fromkeys(r["setting"] for r in records):
        rows = [r for r in records if r["setting"] == key and r["valid"]]
        n = len(rows)
        cov = sum(r["covered"] for r in rows)
        naive = sum(r["naive_covered"] for r in rows)
        width = [r["hi"] - r["lo"] for r in rows]
        n_width = [r["naive_hi"] - r["naive_lo"] for r in rows]
        out.append({
            "setting": json.loads(key),
            "level": level,
            "tried": sum(r["setting"] == key for r in records),
            "trials": n,
            "coverage": cov / n if n else None,
            "coverage_99": clopper_pearson(cov, n),
            "naive_coverage": naive / n if n else None,
            "naive_coverage_99": clopper_pearson(naive, n),
            "exact": sum(r["exact"] for r in rows) / n if n else None,
            "median_width": float(np.median(width)) if n else None,
            "median_naive_width": float(np.median(n_width)) if n else None,
            "seconds_per_trial": float(np.mean([r["seconds"] for r in rows]))
            if n else None,
        })  # fmt: skip
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        f"- level {meta['level']}; DAL test, reference hypothesis, search "
        f"'{meta['search']}', termination '{meta['termination']}'; committed "
        "dal_v5_<d> models; 99% Clopper-Pearson intervals of the coverage",
        f"- machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}",
        f"- command: `{meta['command']}`",
        "",
        "| d | cov | delta | trials (tried) | selective coverage | 99% CI | naive "
        "coverage | 99% CI | exact | median width sel. / naive | s/trial |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        st = s["setting"]
        if not s["trials"]:
            lines.append(f"| {st['size']} | {st['covariance']} | {st['delta']:g} | "
                         f"0 ({s['tried']}) | - | - | - | - | - | - | - |")
            continue
        lo, hi = s["coverage_99"]
        nlo, nhi = s["naive_coverage_99"]
        lines.append(
            f"| {st['size']} | {st['covariance']} | {st['delta']:g} | {s['trials']} "
            f"({s['tried']}) | {s['coverage']:.3f} | [{lo:.3f}, {hi:.3f}] | "
            f"{s['naive_coverage']:.3f} | [{nlo:.3f}, {nhi:.3f}] | {s['exact']:.2f} | "
            f"{s['median_width']:.3g} / {s['median_naive_width']:.3g} | "
            f"{s['seconds_per_trial']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--covariances", nargs="+", default=["iid", "corr"])
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--trials", type=int, default=1000,
                    help="trials with a region per setting")
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--search", default="parametric")
    ap.add_argument("--termination", default="precision")
    ap.add_argument("--max-pieces", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="/tmp/sijax-coverage")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    from sijax.experiments.files import git_commit, machine, records_by_setting
    from sijax.experiments.spec import Setting
    from sijax.experiments.trials import load_models

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "trials.jsonl")
    done = records_by_setting(path)
    settings = [
        Setting(size=d, covariance=c, delta=delta,
                checkpoint=f"dal_v5_{d}",
                search=a.search, termination=a.termination,
                max_pieces=a.max_pieces)
        for d in a.sizes for c in a.covariances for delta in a.deltas
    ]  # fmt: skip
    models = load_models(settings)
    t0 = time.time()
    for s in settings:
        run_setting(models[(s.checkpoint, s.activation)], s, a, done, path)
    # Every setting in OUT (earlier calls' too), so several calls build one table.
    records = [r for rs in done.values() for r in rs.values()]
    summary = summarize(records, a.level)
    meta = {
        "level": a.level, "search": a.search, "termination": a.termination,
        "machine": machine(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/coverage.py " + " ".join(sys.argv[1:]),
        "wall_seconds_this_call": time.time() - t0,
    }  # fmt: skip
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump({"meta": meta, "settings": summary}, f, indent=1)
    text = markdown(summary, meta)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(f"# {HEADING}\n\n" + text)
    print(text)
    if a.write:
        os.makedirs(RESULTS, exist_ok=True)
        for name in ("trials.jsonl", "summary.json", "summary.md"):
            shutil.copy(os.path.join(a.out, name), os.path.join(RESULTS, name))
        replace_section(HEADING, f"## {HEADING}\n\n" + README_TEXT + "\n" + text)


README_TEXT = """\
`benchmarks/coverage.py`: does the selective confidence interval of the region's
mean difference (`DALConfig(confidence=0.95)`, docs/method.md §5) cover the tested
contrast theta = mean over M of the planted signal at its level, given the region?
Synthetic trials of `sijax experiment` (delta on a floor(d/3) square, reference
test). Since commit 05f5e0e the search goes on until the ends are exact
(`exact_interval`, the default with `confidence`); before it, and where the search
cannot (a Zset of more than 32 intervals, max_pieces), the interval is the widest any
Zset consistent with the search allows (column "exact": the fraction with exact
ends), whose coverage may exceed the level. It must never fall below it. The naive
interval raw +- 1.96 sd ignores the selection. Raw records and summaries:
[results/coverage](results/coverage/).
"""


if __name__ == "__main__":
    main()
