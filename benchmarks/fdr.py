"""Realised false discovery rate of BH and Storey over selective p-values (issue 27
item 3).

Repetitions of m images with a known share pi0 of null images are formed from the
committed trial records of the 16x16 experiments (dal_v5_16, iid): null p-values from
results/fpr_dal_v5_16 (delta 0), signal p-values from results/power_dal_v5_16 (one
square of side floor(16/3) shifted by delta). Within a row every trial is used at most
once (disjoint groups); rows with different deltas share the null trials. Each
procedure selects at rate q among the m images; the table gives the mean false
discovery proportion over the repetitions with its 99% normal interval, and the
mean share of signal images selected. The selective p-value is the conservative one
(sup_p: the experiments searched with decision termination, which bounds p and
decides it against 0.05 only), the naive one is the plain z-test's. Reading: the
selective p-values keep the FDR below pi0 q in every row; the naive ones exceed it in
every row. The selective power is low because those records bound each p-value only
as far as the decision at 0.05 needed, and BH with m = 10 needs p <= q k / m: a
search for BH over many images should use precision termination (exact p-values).

    python benchmarks/fdr.py --write
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _readme import replace_section  # noqa: E402

from sijax.experiments.fdr import realised_fdr  # noqa: E402


def p_values(folder: str, delta: float, method: str) -> list[float]:
    out = []
    with gzip.open(os.path.join(HERE, "results", folder, "trials.jsonl.gz"), "rt") as f:
        for line in f:
            r = json.loads(line)
            s = json.loads(r["setting"])
            if (not r["valid"] or s["delta"] != delta or s["covariance"] != "iid"
                    or method not in r["methods"]):
                continue
            v = r["methods"][method]
            out.append(v["sup_p"] if method == "selective" else v["p"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    rows = []
    for method in ("selective", "naive"):
        null = p_values("fpr_dal_v5_16", 0.0, method)
        for delta in (1.0, 2.0, 3.0, 4.0):
            signal = p_values("power_dal_v5_16", delta, method)
            for m, pi0 in ((10, 0.5), (5, 0.8)):
                for q in (0.05, 0.1):
                    for proc in ("bh", "storey"):
                        res = realised_fdr(null, signal, m=m, pi0=pi0, q=q,
                                           procedure=proc)
                        rows.append({"method": method, "delta": delta, "pi0": pi0,
                                     "null_trials": len(null),
                                     "signal_trials": len(signal), **res.to_json()})
    dest = os.path.join(HERE, "results", "fdr")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "fdr.json"), "w") as f:
        json.dump(rows, f, indent=1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    lines = ["## False discovery rate over many images (issue 27 item 3)", "",
             f"{time.strftime('%Y-%m-%d')}, commit {commit}, "
             "`python benchmarks/fdr.py --write` (raw rows in "
             "benchmarks/results/fdr/fdr.json). " + __doc__.split("\n\n")[1]
             .replace("\n", " "), "",
             "| p-value | delta | m (null) | q | procedure | repetitions | realised "
             "FDR [99%] | bound pi0 q | power | discoveries |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['delta']:g} | {r['m']} ({r['m0']}) | {r['q']} | "
            f"{r['procedure']} | {r['reps']} | {r['fdr']:.3f} [{r['fdr_lo']:.3f}, "
            f"{r['fdr_hi']:.3f}] | {r['q'] * r['m0'] / r['m']:.3f} | "
            f"{r['power']:.3f} | {r['discoveries']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        replace_section("False discovery rate over many images (issue 27 item 3)",
                        text)


if __name__ == "__main__":
    main()
