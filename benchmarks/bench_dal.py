"""Time per p-value and pieces searched of the DAL test, per search policy.

Committed models (dal_v5_8, dal_v5_16), reference test, iid sigma = 1, images from
`sijax.data.examples.make_example` (a +3 square of side d // 3). Compile time is
reported apart (first call); the timed calls use new images of the same shape.

    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \
        intra_op_parallelism_threads=1" python benchmarks/bench_dal.py --sizes 8 16
"""

import argparse
import json
import os
import platform
import subprocess
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

import sijax  # noqa: E402
from sijax.data.examples import make_example  # noqa: E402
from sijax.detect.run import DEFAULT_CHECKPOINTS  # noqa: E402

POLICIES = {
    "over_conditioning": dict(search="over_conditioning"),
    "decision": dict(search="parametric", termination="decision"),
    "precision": dict(search="parametric", termination="precision"),
    "exhaustive": dict(search="exhaustive"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--json", default=None, help="append records to this file")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, jax {jax.__version__}, {jax.devices()[0]}, "
          f"{platform.processor() or platform.machine()}, "
          f"affinity {sorted(os.sched_getaffinity(0))}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| size | policy | compile+first (s) | s / p-value | pieces | ms / piece |"
          " p-values |")
    print("|---|---|---|---|---|---|---|")
    for d in args.sizes:
        model = sijax.load_model(os.path.join(DEFAULT_CHECKPOINTS, f"dal_v5_{d}"))
        for name in args.policies:
            cfg = sijax.DALConfig(**POLICIES[name], max_pieces=50_000)
            runs = []
            for i in range(args.images + 1):
                x, xr = make_example(d, seed=1000 + i)
                nz = sijax.draw_noises(jax.random.key(i), model.image_shape)
                t0 = time.perf_counter()
                r = sijax.dal_test(model, x, xr, sigma=1.0, noises=nz, config=cfg)
                runs.append((time.perf_counter() - t0, r))
            first = runs[0][0]
            timed = [(s, r) for s, r in runs[1:] if r.status != "no region"]
            if not timed:
                print(f"| {d} | {name} | {first:.1f} | - | - | - | no region |")
                continue
            sec = float(np.median([s for s, _ in timed]))
            pieces = float(np.median([r.search_count for _, r in timed]))
            ms = 1e3 * sum(s for s, _ in timed) / sum(r.search_count for _, r in timed)
            ps = ", ".join(f"{r.p_value:.4g}" for _, r in timed)
            row = f"| {d} | {name} | {first:.1f} | {sec:.2f} | {pieces:.0f} | {ms:.1f}"
            print(f"{row} | {ps} |", flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(dict(size=d, policy=name, commit=commit,
                                             compile_first_s=first, seconds=sec,
                                             pieces=pieces, ms_per_piece=ms)) + "\n")


if __name__ == "__main__":
    main()
