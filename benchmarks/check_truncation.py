"""Checks an experiment's truncation sets against direct evaluation (not a timing).

For trials of a `sijax experiment` run (``--run DIR``, its ``trials.jsonl``): the
rejected ones and a random sample of the others, re-run the selective test of the
trial (same images, noises and options, one device) and check every endpoint of the
truncation set that lies inside the searched range: the detector, evaluated
directly (``sijax.detect_region`` on the image at that point of the line, no
tracker), must give the observed region just inside the endpoint and another region
just outside (``--eps`` in z units). A wrong breakpoint, a missed piece or a wrong
accept/reject of a piece next to the observed region shows as a "wrong" endpoint,
however narrow the set is; a dense grid could miss it. A whole interval missed far
from the found ones has no endpoint to check: ``--grid N`` also evaluates the detector
at N evenly spaced points of the searched range (batched, no tracker) and reports
every point whose membership in the truncation set disagrees with the direct region.
It also reports whether the re-run reproduces the recorded sup_p and decision.

    python benchmarks/check_truncation.py --run benchmarks/results/fpr_dal_v5_16 \\
        --covariance iid --sample 30
"""

import argparse
import json
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import sijax  # noqa: E402
from sijax.detect.dal import detector, prepare_inputs  # noqa: E402
from sijax.diffusion.sampler import Noises  # noqa: E402
from sijax.experiments import (  # noqa: E402
    TRIALS_FILE,
    Setting,
    latest_records,
    read_trials,
    trial_data,
)
from sijax.experiments import load_models as _load_models  # noqa: E402
from sijax.selective.statistics import line_statistic  # noqa: E402


def _records(run: str) -> dict:
    """{(setting key, index): record} of a run directory's (gzipped) trials."""
    path = os.path.join(run, TRIALS_FILE)
    if not os.path.exists(path):
        path += ".gz"
    return {
        (key, index): r
        for key, trials in latest_records(read_trials(path)).items()
        for index, r in trials.items()
    }


def grid_disagreements(model, line, noises, cfg, res, n: int, eps: float) -> list:
    """Points of an n-point grid over the searched intervals where the direct region's
    agreement with the observed one differs from membership in the truncation set
    (points within eps of an endpoint are skipped)."""
    searched = np.asarray(res.searched_intervals, float).reshape(-1, 2)
    total = float(np.sum(searched[:, 1] - searched[:, 0]))
    zs = np.concatenate([
        lo + (hi - lo) / k * (np.arange(k) + 0.5)
        for lo, hi in searched
        if (k := max(1, round(n * (hi - lo) / total)))
    ])  # fmt: skip
    ends = np.array([e for iv in res.truncated_intervals for e in iv])
    zs = zs[np.min(np.abs(zs[:, None] - ends[None, :]), axis=1) > eps]
    detect = detector(model, noises, cfg)

    def mask(z):
        return detect(line.a + line.b * z)[2]

    masks = jax.jit(jax.vmap(mask))
    chunk, bad = 32, []
    for start in range(0, len(zs), chunk):
        z = zs[start : start + chunk]
        pad = np.concatenate([z, np.full(chunk - len(z), z[-1])])
        same = np.all(np.asarray(masks(pad)) == res.mask, axis=(1, 2))[: len(z)]
        inside = np.any(
            [(lo <= z) & (z <= hi) for lo, hi in res.truncated_intervals], axis=0
        )
        bad += [round(float(v), 9) for v in z[same != inside]]
    return bad


def check_trial(model, setting: Setting, index: int, eps: float, grid: int = 0) -> dict:
    """Endpoint (and grid) check of one trial's truncation set (module docstring)."""
    data = trial_data(setting, index, model.image_shape[2])
    noises = Noises(eps0=data.eps0, eps=data.eps)
    cfg = setting.dal_config("selective")
    res = sijax.dal_test(
        model, data.x, data.x_ref, sigma=setting.covariance, noises=noises, config=cfg
    )
    x, x_ref, cov, cov_ref = prepare_inputs(
        model, data.x, data.x_ref, setting.covariance, None, cfg, noises=noises
    )
    line = line_statistic(
        x,
        x_ref,
        res.mask,
        sigma=cov,
        sigma_ref=cov_ref,
        hypothesis=cfg.hypothesis,
        radius=cfg.radius,
    )
    (s_lo, s_hi), *_ = res.searched_intervals
    wrong, endpoints = [], 0
    for lo, hi in res.truncated_intervals:
        for e, inward in ((lo, 1.0), (hi, -1.0)):
            if not s_lo < e < s_hi:
                continue  # an end of the searched range, not a change of region
            endpoints += 1
            for side, want in ((inward, True), (-inward, False)):
                z = e + side * eps
                _, mask = sijax.detect_region(model, line.a + line.b * z, noises, cfg)
                if bool(np.array_equal(np.asarray(mask), res.mask)) != want:
                    wrong.append(round(float(z), 9))
    out = {
        "index": index,
        "z": res.stat,
        "sup_p": res.sup_p,
        "reject": res.sup_p < setting.alpha,
        "pieces": res.search_count,
        "intervals": len(res.truncated_intervals),
        "endpoints": endpoints,
        "wrong": wrong,
        "searched": [round(float(v), 6) for v in res.searched_intervals[0]],
        "truncation": [
            [round(float(v), 6) for v in iv] for iv in res.truncated_intervals
        ],
    }
    if grid:
        out["grid"] = grid
        out["grid_wrong"] = grid_disagreements(model, line, noises, cfg, res, grid, eps)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a sijax experiment output directory")
    ap.add_argument("--covariance", default="iid")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--delta", type=float, default=0.0)
    ap.add_argument("--sample", type=int, default=30, help="non-rejected trials")
    ap.add_argument("--no-rejected", action="store_true")
    ap.add_argument("--eps", type=float, default=1e-7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grid", type=int, default=0, help="also check N grid points")
    ap.add_argument("--indices", type=int, nargs="*", help="check these trials only")
    args = ap.parse_args()
    records = _records(args.run)
    settings = {}
    for key, _ in records:
        s = Setting(**json.loads(key))
        if (
            s.covariance == args.covariance
            and s.delta == args.delta
            and (args.size is None or s.size == args.size)
        ):
            settings[key] = s
    if len(settings) != 1:
        raise SystemExit(f"{len(settings)} settings match; pass --size / --delta")
    ((key, setting),) = settings.items()
    trials = {i: r for (k, i), r in records.items() if k == key and r["valid"]}
    rejected = sorted(i for i, r in trials.items()
                      if r["methods"]["selective"]["reject"])  # fmt: skip
    others = sorted(set(trials) - set(rejected))
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(others, min(args.sample, len(others)), replace=False))
    chosen = ([] if args.no_rejected else rejected) + [int(i) for i in sample]
    if args.indices:
        chosen = [i for i in args.indices if i in trials]
        if len(chosen) < len(args.indices):
            print(f"not valid trials of this setting, skipped: "
                  f"{sorted(set(args.indices) - set(chosen))}")  # fmt: skip
    print(f"{setting.label()}: {len(trials)} valid trials, {len(rejected)} rejected; "
          f"checking {len(chosen)}", flush=True)  # fmt: skip
    (model,) = _load_models([setting]).values()
    t0 = time.perf_counter()
    total = {"trials": 0, "endpoints": 0, "wrong": 0, "decision_changed": 0}
    if args.grid:
        total["grid_wrong"] = 0
    for index in chosen:
        out = check_trial(model, setting, index, args.eps, args.grid)
        recorded = trials[index]["methods"]["selective"]
        out["recorded_sup_p"] = recorded["sup_p"]
        print(json.dumps(out), flush=True)
        total["trials"] += 1
        total["endpoints"] += out["endpoints"]
        total["wrong"] += len(out["wrong"])
        total["decision_changed"] += out["reject"] != recorded["reject"]
        if args.grid:
            total["grid_wrong"] += len(out["grid_wrong"])
    total["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(total))


if __name__ == "__main__":
    main()
