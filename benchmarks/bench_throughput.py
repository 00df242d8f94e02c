"""Throughput of the DAL test: p-values per second over batches of images (not a test).

`sijax.dal_test_batch` (one compiled, vmapped program) on null images (iid N(0, 1) test
and reference, the evaluation setting of the paper's type I error runs) with the
"decision" termination at alpha = 0.05, the committed `dal_v5_<size>` checkpoint where
one exists and a random initialisation of the same v5 U-Net otherwise. Compile time is
reported apart (first call); the timed call uses new images and noises of the same
shape and ends with `block_until_ready`. Images whose region is empty count as done
(they need no search). `lanes` images are searched in lockstep (vmap) and the rest of
the batch in turn (default: all of them on a GPU, one per device on a CPU); a lockstep
search runs until its slowest lane is done.

Memory per image: XLA's buffer assignment of the compiled program (temporaries +
arguments + outputs) divided by the batch size. With `--engine propagate` (the
images one after another, the search driven from the host) there is no such program:
the column shows the peak resident memory of the whole process instead, marked "RSS"
(it includes the compiled programs and the interpreter).

    python benchmarks/bench_throughput.py --sizes 8 16 --batch 16          # all threads
    XLA_FLAGS="--xla_force_host_platform_device_count=2 \\
        --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python benchmarks/bench_throughput.py                      # 2 CPU devices
    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" python benchmarks/bench_throughput.py

On a GPU machine the same command reports the device in its first line.
`--check-cpu K` recomputes the first K images of the timed batch on the host CPU
(one lane) and prints the largest p-value difference and how many searches
evaluated the same number of pieces: the accelerator's float64 results against the
CPU's. "GFLOP / pass": the matrix products and convolutions of one value-and-slope
pass of the detector (one tracked piece of the walk), counted from its jaxpr;
"TFLOP/s" is that times the pieces all images evaluated over the timed seconds
(lockstep lanes that wait are not counted), to be set against the device's float64
peak.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sijax  # noqa: E402
from sijax.checkpoint import (  # noqa: E402
    CHECKPOINTS_DIR,
    DiffusionModel,
    cast_state,
    init_unet,
)
from sijax.config import TrainConfig  # noqa: E402
from sijax.detect.dal import ENGINES, compile_batch, default_lanes  # noqa: E402
from sijax.experiments import device_mesh  # noqa: E402
from sijax.experiments import shard as _shard  # noqa: E402


def model_for(size: int):
    name = f"dal_v5_{size}"
    if os.path.isdir(os.path.join(CHECKPOINTS_DIR, name)):
        return sijax.load_model(name), f"checkpoint {name}"
    cfg = TrainConfig(size=size)
    graphdef, state = init_unet(cfg.unet_config(), jax.random.key(0))
    model = DiffusionModel(cfg, graphdef, cast_state(state, jnp.float64))
    return model, "random init (seed 0)"


def batch(model, b: int, seed: int):
    shape = model.image_shape
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    xs = jax.random.normal(k1, (b, *shape), jnp.float64)
    refs = jax.random.normal(k2, (b, *shape), jnp.float64)
    noises = jax.vmap(lambda k: sijax.draw_noises(k, shape))(jax.random.split(k3, b))
    if jax.device_count() == 1:
        return xs, refs, noises
    # Several devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2 on a
    # CPU): the batch is split over them in contiguous blocks, one lane per device.
    mesh = device_mesh()
    return jax.tree.map(lambda a: _shard(mesh, np.asarray(a)), (xs, refs, noises))


def memory_per_image(model, xs, refs, noises, cfg, lanes) -> float:
    compiled = compile_batch(
        model, xs, refs, sigma=1.0, noises=noises, config=cfg, lanes=lanes
    )
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return total / xs.shape[0]


def _product_flops(jaxpr, times: int = 1) -> float:
    """Floating-point operations of the matrix products and convolutions of a
    jaxpr (a scan's body counted `length` times; XLA's cost analysis counts a loop
    body once)."""
    total = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        out = e.outvars[0].aval.shape if e.outvars else ()
        if name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2.0 * np.prod(out) * np.prod([lhs[i] for i in contract])
        elif name == "conv_general_dilated":
            rhs = e.invars[1].aval.shape
            per_output = np.prod(rhs) / rhs[e.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(out) * per_output
        inner = e.params.get("length", 1) if name == "scan" else 1
        for v in e.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    total += _product_flops(sub, inner)
    return times * total


def gflop_per_pass(model, noises, cfg) -> float:
    """Products and convolutions of one value-and-slope pass (jvp) of the detector."""
    from sijax.detect.dal import detector

    detect = detector(model, jax.tree.map(lambda a: a[0], noises), cfg)
    x = jnp.zeros(model.image_shape, jnp.float64)
    closed = jax.make_jaxpr(lambda x, v: jax.jvp(lambda y: detect(y)[1], (x,), (v,)))
    return _product_flops(closed(x, x).jaxpr) / 1e9


def check_on_cpu(model, xs, refs, noises, cfg, res, k: int) -> str:
    """The first k images again on the host CPU: max |p difference|, same pieces."""
    cpu = jax.devices("cpu")[0]
    take = jax.tree.map(lambda a: jax.device_put(np.asarray(a)[:k], cpu),
                        (xs, refs, noises))  # fmt: skip
    with jax.default_device(cpu):
        ref = sijax.dal_test_batch(
            jax.device_put(model, cpu), *take[:2], sigma=1.0, noises=take[2],
            config=cfg, lanes=1,
        )  # fmt: skip
    p, q = np.asarray(res.p_value)[:k], np.asarray(ref.p_value)
    both = np.isfinite(p) & np.isfinite(q)
    diff = float(np.max(np.abs(p - q)[both])) if both.any() else 0.0
    same = int(np.sum(np.asarray(res.search_count)[:k] == np.asarray(ref.search_count)))
    nan_same = bool(np.all(np.isnan(p) == np.isnan(q)))
    return f"max |p - p_cpu| = {diff:.1e}, same pieces {same}/{k}, same NaNs {nan_same}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--termination", default="decision")
    ap.add_argument(
        "--lanes", type=int, default=None, help="images in lockstep (default: auto)"
    )
    ap.add_argument("--max-pieces", type=int, default=20_000)
    ap.add_argument("--engine", choices=ENGINES, default="walk")
    ap.add_argument("--json", default=None, help="append records to this file")
    ap.add_argument("--check-cpu", type=int, default=0, metavar="K",
                    help="recompute the first K images on the host CPU")  # fmt: skip
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dev = jax.devices()[0]
    print(
        f"commit {commit}, jax {jax.__version__}, {dev.device_kind} ({dev.platform}),"
        f" {platform.machine()}, affinity {len(os.sched_getaffinity(0))} cores,"
        f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(
        "| size | model | engine | batch | lanes | compile+first (s) | s / batch |"
        " p-values / s | pieces (median, max) | with region | MB / image |"
        " GFLOP / pass | TFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cfg = sijax.DALConfig(
        termination=args.termination, max_pieces=args.max_pieces, engine=args.engine
    )
    walk = args.engine == "walk"
    for d in args.sizes:
        model, desc = model_for(d)
        xs, refs, nz = batch(model, args.batch, seed=d)
        lanes = args.lanes or default_lanes(args.batch, jax.device_count())
        mb = rss = None
        if walk:
            mb = memory_per_image(model, xs, refs, nz, cfg, lanes) / 2**20
        t0 = time.perf_counter()
        jax.block_until_ready(
            sijax.dal_test_batch(
                model, xs, refs, sigma=1.0, noises=nz, config=cfg, lanes=lanes
            )
        )
        first = time.perf_counter() - t0
        xs, refs, nz = batch(model, args.batch, seed=1000 + d)
        t0 = time.perf_counter()
        res = jax.block_until_ready(
            sijax.dal_test_batch(
                model, xs, refs, sigma=1.0, noises=nz, config=cfg, lanes=lanes
            )
        )
        sec = time.perf_counter() - t0
        if not walk:  # ru_maxrss is in KiB
            rss, lanes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        memory = f"{mb:.1f}" if walk else f"{rss:.0f} RSS"
        status = np.asarray(res.status)
        pieces = np.asarray(res.search_count)[status == 0]
        med = float(np.median(pieces)) if pieces.size else 0.0
        mx = int(pieces.max()) if pieces.size else 0
        gflop = tflops = float("nan")  # propagation runs no value-and-slope pass
        if walk:
            gflop = gflop_per_pass(model, nz, cfg)
            tflops = gflop * float(np.asarray(res.search_count).sum()) / sec / 1e3
        print(
            f"| {d} | {desc} | {args.engine} | {args.batch} | {lanes} | {first:.1f} |"
            f" {sec:.2f} |"
            f" {args.batch / sec:.2f} | {med:.0f}, {mx} | {int((status == 0).sum())}"
            f" | {memory} | {gflop:.3f} | {tflops:.3f} |",
            flush=True,
        )
        check = None
        if args.check_cpu:
            check = check_on_cpu(model, xs, refs, nz, cfg, res, args.check_cpu)
            print(f"  {d}x{d}, {args.check_cpu} images on the CPU: {check}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(
                    json.dumps(
                        dict(
                            size=d,
                            batch=args.batch,
                            engine=args.engine,
                            commit=commit,
                            device=str(dev),
                            compile_first_s=first,
                            seconds=sec,
                            pvalues_per_s=args.batch / sec,
                            pieces_median=med,
                            pieces_max=mx,
                            mb_per_image=mb,
                            peak_rss_mb=rss,
                            gflop_per_pass=gflop,
                            tflops=tflops,
                            check_cpu=check,
                        )
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
