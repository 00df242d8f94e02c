"""Time of one tracked piece against the arithmetic floor (issue 6; not a test).

One value-and-slope pass of the DAL detector (5 DDIM steps, 3x3 mean filter, abs,
threshold) at a fixed point of a fixed line, for the network of a
`benchmarks/vs_si4onnx.py` work directory (``--workdir``, which holds the exported
ONNX graph, the torch weights and the noises) loaded two ways: the ONNX import and the
same weights as a native `DiffusionModel`. No memo: every call evaluates the whole
pipeline. XLA's cost analysis of the flat ONNX program gives the floating-point
operations of one pass (it counts a loop body once, so not of the native program,
whose steps are a scan); at ``--gflops`` (default 53, one core's float64 matrix
product here) they set the floor.
The two variants are timed interleaved, after a warm-up, compile time apart.

    python benchmarks/vs_si4onnx.py --size 16 --images 1 --workdir /tmp/vs16
    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" \\
        python benchmarks/bench_piece.py --workdir /tmp/vs16 --size 16
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import vs_si4onnx  # noqa: E402  (benchmarks/vs_si4onnx.py: the same model loaders)

import sijax  # noqa: E402
from sijax.detect.dal import detector  # noqa: E402
from sijax.tracking import track  # noqa: E402


def _tracked_piece(model, noises):
    """jit'd (a, b, z) -> piece of the detector's mask along a + b t."""
    detect = detector(model, noises, sijax.DALConfig(), vs_si4onnx.SIJAX_THRESHOLD)

    def mask(x):
        return detect(x)[2]

    return jax.jit(lambda a, b, z: track(mask)(a, b, z, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gflops", type=float, default=53.0)
    args = ap.parse_args()
    models = {
        which: vs_si4onnx.load_sijax_model(args.workdir, args.size, which)
        for which in ("onnx", "native")
    }
    noises = vs_si4onnx.load_noises(args.workdir)
    shape = (args.size, args.size, 1)
    a = jax.random.normal(jax.random.key(3), shape, jnp.float64)
    b = jax.random.normal(jax.random.key(4), shape, jnp.float64)
    fns = {}
    for which, model in models.items():
        fn = _tracked_piece(model, noises)
        t0 = time.perf_counter()
        compiled = fn.lower(a, b, 0.0).compile()
        if which == "onnx":
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            gflop = float(cost.get("flops", float("nan"))) / 1e9
        jax.block_until_ready(fn(a, b, 0.0))
        print(f"{which}: compile + first call {time.perf_counter() - t0:.1f} s")
        fns[which] = fn
    times = {which: [] for which in fns}
    for r in range(args.reps):
        for which, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(a, b, 0.01 * r))
            times[which].append(time.perf_counter() - t0)
    floor = 1e3 * gflop / args.gflops
    print(f"one pass: {gflop:.3f} GFLOP (XLA, ONNX program); floor {floor:.1f} ms")
    print("| network | ms / piece (median, min) | x floor |")
    print("|---|---|---|")
    for which, ts in times.items():
        med = 1e3 * np.median(ts)
        print(f"| {which} | {med:.1f}, {1e3 * min(ts):.1f} | {med / floor:.1f} |")


if __name__ == "__main__":
    main()
