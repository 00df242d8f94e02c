"""si4onnx 0.1.13 against ``sijax.si4onnx`` on the same calls, side by side.

The calls are cases of tests/data/si4onnx/reference.json (the committed ONNX
networks, inputs and options): the same script line, once with ``import si4onnx``
(in its own virtual environment: it pins numpy < 2) and once with
``import sijax.si4onnx as si4onnx``. Each side runs every case ``--repeats`` times
after one warm-up call; sijax's first call (trace + XLA compile + run) is reported
apart as ``first_s``; ``compile_s`` = first call - median run. Both sides are
pinned to the same one core and one thread.

Usage::

    python benchmarks/si4onnx_api.py --venv /work/venv_si4onnx --repeats 3 \\
        [--cases tiny2d_back_param,unet2d_back_param,...] [--out DIR]

Writes ``DIR/<timestamp>.json`` (default DIR benchmarks/results/si4onnx_api/) with
the per-call seconds of both sides, the p-values, pieces, device, commit and load
average, and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "tests", "data", "si4onnx")
DEFAULT_CASES = (
    "tiny2d_back_param",
    "tiny2d_reference_exh",
    "ae3_back_l1",
    "unet2d_back_param",
    "unet2d_reference_exh",
    "example_back",
    "example_neighbor",
    "example_reference",
)


def _load_reference():
    import numpy as np

    with open(os.path.join(DATA, "reference.json")) as f:
        ref = json.load(f)
    return {c["name"]: c for c in ref["cases"]}, dict(
        np.load(os.path.join(DATA, "reference.npz"))
    )


def _inputs(case, arrays):
    name = case["name"]
    ins = [arrays[f"{name}/in{k}"] for k in range(case["n_inputs"])]
    kind = case["inputs"]
    inp = ins[0] if kind in ("single", "reference") else ins
    if kind.startswith("reference"):
        inp = (inp, arrays[f"{name}/ref"])
    var = case["var"]
    var = arrays[var] if isinstance(var, str) else var
    return inp, var, arrays.get(f"{name}/mask")


def _time_calls(call, repeats: int) -> tuple[float, list[float], object]:
    t0 = time.perf_counter()
    res = call()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = call()
        runs.append(time.perf_counter() - t0)
    return first, runs, res


def worker_si4onnx(names: list[str], repeats: int, out: str) -> None:
    """Inside the si4onnx environment: the cases through si4onnx itself."""
    import onnx
    import si4onnx
    import torch

    sys.path.insert(0, DATA)
    import make_reference as mr

    torch.set_num_threads(1)
    cases, arrays = _load_reference()
    rows = {}
    for name in names:
        case = cases[name]
        proto = onnx.load(os.path.join(DATA, case["model"]))
        model = si4onnx.load(proto, hypothesis=mr._hyp(case["hypothesis"]),
                             **case.get("load", {}))  # fmt: skip
        inp, var, mask = _inputs(case, arrays)
        call = functools.partial(model.inference, mr._to_torch(inp), var, mask=mask,
                                 **case["kwargs"])  # fmt: skip
        first, runs, res = _time_calls(call, repeats)
        rows[name] = dict(first_s=first, runs_s=runs, p_value=float(res.p_value),
                          search_count=int(res.search_count))  # fmt: skip
        print(f"  si4onnx {name}: {statistics.median(runs):.3f}s", flush=True)
    with open(out, "w") as f:
        json.dump(rows, f)


def run_sijax(names: list[str], repeats: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    import sijax.si4onnx as si4onnx

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_si4onnx import _hypothesis

    cases, arrays = _load_reference()
    rows = {}
    for name in names:
        case = cases[name]
        model = si4onnx.load(os.path.join(DATA, case["model"]),
                             _hypothesis(case["hypothesis"]),
                             **case.get("load", {}))  # fmt: skip
        inp, var, mask = _inputs(case, arrays)
        call = functools.partial(model.inference, inp, var, mask=mask, **case["kwargs"])
        first, runs, res = _time_calls(call, repeats)
        med = statistics.median(runs)
        rows[name] = dict(first_s=first, runs_s=runs,
                          compile_s=max(first - med, 0.0), p_value=res.p_value,
                          search_count=res.search_count)  # fmt: skip
        print(f"  sijax {name}: {med:.3f}s (first {first:.1f}s)", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default="/work/venv_si4onnx")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--cpu", type=int, help="pin both sides to this cpu "
                   "(default: the last one this process may use)")  # fmt: skip
    p.add_argument("--out", default=os.path.join(HERE, "results", "si4onnx_api"))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    if args.worker:
        worker_si4onnx(names, args.repeats, args.worker[1])
        return

    cpu = args.cpu if args.cpu is not None else sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, [cpu])
    os.environ["XLA_FLAGS"] = (
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = os.path.join(args.out, f".si4onnx-{stamp}.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    load0 = os.getloadavg()
    print(f"si4onnx ({args.venv}) on cpu {cpu} ...", flush=True)
    subprocess.run(
        [os.path.join(args.venv, "bin", "python"), os.path.abspath(__file__),
         "--cases", ",".join(names), "--repeats", str(args.repeats),
         "--worker", "si4onnx", tmp],
        check=True, env=env, cwd=HERE,
    )  # fmt: skip
    with open(tmp) as f:
        si4 = json.load(f)
    os.remove(tmp)
    print("sijax.si4onnx ...", flush=True)
    sj = run_sijax(names, args.repeats)

    import jax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    record = dict(
        commit=commit, jax=jax.__version__, device=str(jax.devices()[0]),
        machine=platform.machine(), processor=platform.processor(), cpu=cpu,
        threads=1, repeats=args.repeats,
        load_average_start=[round(v, 2) for v in load0],
        load_average_end=[round(v, 2) for v in os.getloadavg()],
        si4onnx=si4, sijax=sj,
    )  # fmt: skip
    path = os.path.join(args.out, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{'case':<24} {'pieces':>6} {'si4onnx s':>10} {'sijax s':>8} "
          f"{'speed-up':>8} {'compile s':>9} {'|dp|/p':>8}")  # fmt: skip
    for n in names:
        a, b = si4[n], sj[n]
        ta, tb = statistics.median(a["runs_s"]), statistics.median(b["runs_s"])
        dp = abs(a["p_value"] - b["p_value"]) / max(a["p_value"], 1e-300)
        print(f"{n:<24} {b['search_count']:>6} {ta:>10.3f} {tb:>8.3f} "
              f"{ta / tb:>8.1f} {b['compile_s']:>9.1f} {dp:>8.1e}")  # fmt: skip
    print(f"raw: {os.path.relpath(path, REPO)}")


if __name__ == "__main__":
    main()
