"""Study: the first p-value of a fresh process, walking against propagation.

A user who tests one image waits for the interpreter, the imports, the model, every
compilation and the search. Each row here is one fresh process (one
single-threaded XLA CPU device) that tests one N(0, 1) image against an N(0, 1)
reference (sigma = 1, the committed ``dal_v5_<size>``, sampler noises of key 0) with
one engine and then tests the same image again: "first" is the first test
(compilation included), "again" the warm one, "start" the seconds from the
interpreter's start to the first test (imports, model, noises). The persistent
compilation cache is off (``--cache off``), or a directory that the first process
of each (size, engine) fills and the others read (``--cache DIR``; delete it for an
empty start). Not a test; the pieces and p-values of both engines are printed to
compare.

    taskset -c 1 python benchmarks/study_first_pvalue.py --sizes 16 --seeds 1 \\
        --termination precision --out benchmarks/results/first_pvalue/study.jsonl
"""

import argparse
import json
import os
import subprocess
import sys
import time

from bench_tracking import _environment

_CHILD = r"""
import json, os, sys, time
t0 = float(sys.argv[1])
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import sijax
from sijax.compile_cache import enable_compilation_cache
enable_compilation_cache()
size, seed = int(sys.argv[2]), int(sys.argv[3])
engine, termination = sys.argv[4], sys.argv[5]
model = sijax.load_model(f"dal_v5_{size}")
noises = sijax.draw_noises(jax.random.PRNGKey(0), model)
rng = np.random.default_rng(seed)
x, ref = rng.standard_normal((2, size, size, 1))
cfg = sijax.DALConfig(termination=termination, engine=engine, processes=1)
row = dict(start=time.time() - t0)
for name in ("first", "again"):
    t = time.perf_counter()
    res = sijax.dal_test(model, x, ref, sigma=1.0, noises=noises, config=cfg)
    row[name] = time.perf_counter() - t
row.update(pieces=int(res.search_count), p=float(res.p_value), status=res.status)
print(json.dumps(row))
"""

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _run(size: int, seed: int, engine: str, termination: str, cache: str) -> dict:
    env = dict(os.environ, SIJAX_COMPILE_CACHE=cache, XLA_FLAGS=ONE_THREAD)
    cmd = [sys.executable, "-c", _CHILD, repr(time.time()), str(size), str(seed),
           engine, termination]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"size {size} seed {seed} {engine} failed:\n"
                         f"{done.stderr[-2000:]}")  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--engines", nargs="+", default=["walk", "propagate"])
    ap.add_argument("--termination", default="precision",
                    choices=["precision", "decision"])  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1,
                    help="processes per setting, alternating the engines")
    ap.add_argument("--cache", default="off",
                    help="'off' or a cache directory shared by the processes")
    ap.add_argument("--out", help="append one JSON line per process here")
    args = ap.parse_args(argv)
    env = _environment()
    print(json.dumps(env))
    for size in args.sizes:
        for seed in args.seeds:
            for rep in range(args.repeats):
                for engine in args.engines:
                    row = dict(size=size, seed=seed, engine=engine, repeat=rep,
                               termination=args.termination, cache=args.cache,
                               **_run(size, seed, engine, args.termination,
                                      args.cache),
                               commit=env.get("commit"),
                               load=os.getloadavg())  # fmt: skip
                    print(json.dumps(row), flush=True)
                    if args.out:
                        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
                        with open(args.out, "a") as fh:
                            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
