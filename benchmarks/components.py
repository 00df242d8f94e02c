"""Per-component tests against the whole-region test (issue 27 item 2).

For each setting (image side, covariance, signal delta) the synthetic trials of
``sijax experiment`` (:func:`sijax.experiments.trials.trial_data`: N(0, Sigma)
noise plus delta on one floor(d/3) square, an independent reference) run the DAL
test with ``DALConfig(components=True)`` (reference hypothesis, termination
"precision", Holm within the image unless --adjustment bh). A trial with a region
counts. A component C is *null* when the planted signal does not touch it
(mean over C of E[X] - E[X_ref] = 0, its H0 holds) and *signal* otherwise; the
whole region is null when no component touches the square. Reported per setting:

- whole region: rejection rate p < alpha among null regions (type I error) and
  among signal regions (power);
- components: type I error of the unadjusted p among null components, of the
  adjusted p among null components, the family-wise error (an image with some null
  component rejected after adjustment) among images, and the power (adjusted
  p < alpha) among signal components; images detected by the components (some
  adjusted p < alpha) against those detected by the whole-region test;
- components per image, with 99% Clopper-Pearson intervals of the rates.

Resumable (one line per trial in OUT/trials.jsonl; a rerun skips the trials it
has). ``--write`` copies trials.jsonl, summary.json and summary.md to
benchmarks/results/components/ and rewrites the "Per-component tests" section of
benchmarks/README.md. The full run (1000 trials per setting; hours to a day of two
CPU cores at 8x8 with dal_v5_8, where one search is ~600 pieces of ~20 ms):

    python benchmarks/components.py --trials 1000 --out /work/runs/components --write

A small run (what the committed results are unless the README says otherwise):

    python benchmarks/components.py --checkpoint tiny_8 --deltas 0 4 --trials 30 \\
        --write
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

RESULTS = os.path.join(HERE, "results", "components")
HEADING = "Per-component tests (issue 27)"


def run_setting(model, setting, a, done: dict, out_path: str) -> None:
    """Trials of ``setting`` until ``a.trials`` have a region (or 20x as many were
    tried), appended to ``out_path`` one by one."""
    import jax.numpy as jnp
    import numpy as np

    from sijax.detect.dal import DALConfig, dal_test, resolve_engine
    from sijax.diffusion.sampler import Noises
    from sijax.experiments.files import provenance

    config = DALConfig(
        components=True,
        adjustment=a.adjustment,
        connectivity=a.connectivity,
        termination="precision",
        alpha=a.alpha,
        max_pieces=a.max_pieces,
    )
    shape = tuple(model.image_shape)
    made_by = provenance(resolve_engine(config, model, shape).engine)
    key = setting.key
    mine = done.setdefault(key, {})
    index = 0
    while sum(r["valid"] for r in mine.values()) < a.trials and index < 20 * a.trials:
        i, index = index, index + 1
        if i in mine:
            continue
        mean, data = planted_mean(setting, i, shape)
        t0 = time.perf_counter()
        res = dal_test(
            model, data.x, data.x_ref, sigma=setting.covariance,
            noises=Noises(jnp.asarray(data.eps0), jnp.asarray(data.eps)),
            config=config,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        rec = {"setting": key, "index": i, "status": str(res.status),
               "valid": res.status == "ok", "seconds": seconds,
               **made_by}  # fmt: skip
        if rec["valid"]:
            signal = mean[..., 0] != 0
            rec.update(
                region_size=int(res.mask.sum()), z=res.stat, p=res.p_value,
                null=not bool(np.any(signal & res.mask)),
                pieces=res.search_count,
                components=[
                    {"size": c.size, "z": c.stat, "p": c.p_value,
                     "adjusted": c.adjusted_p, "status": str(c.status),
                     "null": not bool(np.any(signal & c.mask)),
                     "pieces": c.search_count}
                    for c in res.components
                ],
            )  # fmt: skip
        mine[i] = rec
        with open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    valid = sum(r["valid"] for r in mine.values())
    print(f"{setting.label()}: {valid}/{a.trials} with a region, {len(mine)} tried",
          flush=True)  # fmt: skip


def _rate(k: int, n: int) -> dict:
    from sijax.experiments.summary import clopper_pearson

    return {"k": k, "n": n, "rate": k / n if n else None, "ci99": clopper_pearson(k, n)}


def summarize(records: list[dict], alpha: float) -> list[dict]:
    import numpy as np

    out = []
    for key in dict.fromkeys(r["setting"] for r in records):
        rows = [r for r in records if r["setting"] == key and r["valid"]]
        comps = [c for r in rows for c in r["components"]]
        null_c = [c for c in comps if c["null"]]
        sig_c = [c for c in comps if not c["null"]]
        null_r = [r for r in rows if r["null"]]
        sig_r = [r for r in rows if not r["null"]]

        def adj_hit(r, which):
            return any(c["adjusted"] < alpha for c in r["components"] if which(c))

        out.append({
            "setting": json.loads(key),
            "tried": sum(r["setting"] == key for r in records),
            "trials": len(rows),
            "components_per_image": float(np.mean([len(r["components"]) for r in rows]))
            if rows else None,
            "whole_type1": _rate(sum(r["p"] < alpha for r in null_r), len(null_r)),
            "whole_power": _rate(sum(r["p"] < alpha for r in sig_r), len(sig_r)),
            "comp_type1": _rate(sum(c["p"] < alpha for c in null_c), len(null_c)),
            "comp_type1_adjusted": _rate(
                sum(c["adjusted"] < alpha for c in null_c), len(null_c)),
            "comp_fwer": _rate(
                sum(adj_hit(r, lambda c: c["null"]) for r in rows), len(rows)),
            "comp_power": _rate(sum(c["adjusted"] < alpha for c in sig_c), len(sig_c)),
            "images_by_components": _rate(
                sum(adj_hit(r, lambda c: True) for r in sig_r), len(sig_r)),
            "seconds_per_trial": float(np.mean([r["seconds"] for r in rows]))
            if rows else None,
        })  # fmt: skip
    return out


def _cell(r: dict) -> str:
    if not r["n"]:
        return "-"
    lo, hi = r["ci99"]
    return f"{r['rate']:.3f} ({r['k']}/{r['n']}) [{lo:.2f}, {hi:.2f}]"


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        f"- alpha {meta['alpha']}; DAL test with components (connectivity "
        f"{meta['connectivity']}, {meta['adjustment']} within the image), reference "
        f"hypothesis, parametric search, termination 'precision'; model "
        f"{meta['checkpoint']}; rates with (hits/count) and 99% Clopper-Pearson "
        "intervals",
        f"- machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}",
        f"- command: `{meta['command']}`",
        "",
        "| d | cov | delta | trials (tried) | comp./image | whole: type I | "
        "whole: power | comp.: type I (raw p) | comp.: type I (adjusted) | "
        "comp.: FWER per image | comp.: power (adjusted) | images found by comp. | "
        "s/trial |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        st = s["setting"]
        if not s["trials"]:
            lines.append(f"| {st['size']} | {st['covariance']} | {st['delta']:g} | "
                         f"0 ({s['tried']}) |" + " - |" * 9)  # fmt: skip
            continue
        cells = [_cell(s[k]) for k in (
            "whole_type1", "whole_power", "comp_type1", "comp_type1_adjusted",
            "comp_fwer", "comp_power", "images_by_components")]  # fmt: skip
        lines.append(
            f"| {st['size']} | {st['covariance']} | {st['delta']:g} | {s['trials']} "
            f"({s['tried']}) | {s['components_per_image']:.2f} | " + " | ".join(cells)
            + f" | {s['seconds_per_trial']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8])
    ap.add_argument("--covariances", nargs="+", default=["iid"])
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.0, 2.0, 4.0])
    ap.add_argument("--trials", type=int, default=1000,
                    help="trials with a region per setting")
    ap.add_argument("--checkpoint", help="model (default: committed dal_v5_<d>)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--adjustment", default="holm", choices=("holm", "bh"))
    ap.add_argument("--connectivity", type=int, default=8, choices=(4, 8))
    ap.add_argument("--max-pieces", type=int, default=20_000)
    ap.add_argument("--out", default="/tmp/sijax-components")
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

    def checkpoint(d):  # a committed name stays a name: keys portable across checkouts
        return a.checkpoint or f"dal_v5_{d}"

    settings = [
        Setting(size=d, covariance=c, delta=delta, checkpoint=checkpoint(d),
                termination="precision", alpha=a.alpha, max_pieces=a.max_pieces)
        for d in a.sizes for c in a.covariances for delta in a.deltas
    ]  # fmt: skip
    models = load_models(settings)
    t0 = time.time()
    for s in settings:
        run_setting(models[(s.checkpoint, s.activation)], s, a, done, path)
    # Every setting in OUT (earlier calls' too), so several calls build one table.
    records = [r for rs in done.values() for r in rs.values()]
    summary = summarize(records, a.alpha)
    meta = {
        "alpha": a.alpha, "adjustment": a.adjustment, "connectivity": a.connectivity,
        "checkpoint": a.checkpoint or "dal_v5_<d>",
        "machine": machine(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/components.py " + " ".join(sys.argv[1:]),
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
`benchmarks/components.py`: each connected component of the detected region tested
on its own contrast, conditioning on the whole region (`DALConfig(components=True)`,
docs/method.md §5), with the p-values adjusted within the image, against the
whole-region test. Synthetic trials of `sijax experiment` (delta on one floor(d/3)
square, reference test). A component (region) is null when the planted square does
not touch it. Per-component type I errors must stay at alpha (raw p) or below
(adjusted); the whole-region test cannot say which component carries the signal.
Raw records and summaries: [results/components](results/components/). The committed
table is a small run (tiny_8, 30 trials per setting: its intervals are wide; the
first setting's s/trial includes compilation); the full run is
`python benchmarks/components.py --trials 1000 --out /work/runs/components --write`
(dal_v5_8, delta 0/2/4; about a day of two CPU cores).
"""


if __name__ == "__main__":
    main()
