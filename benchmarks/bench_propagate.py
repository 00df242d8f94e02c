"""Benchmark: walking `enumerate_pieces` vs batched `enumerate_line` (not a test).

The pipeline is the v5 DAL detector exactly as `sijax.detect.dal` builds it: the
committed checkpoint `dal_v5_<size>` in float64, 5 DDIM steps from t' = 460 with
fixed noises (key 0), 3x3 mean filter, abs, threshold 0.8; the summary per piece is
whether the region equals the observed one. The line is the reference-hypothesis DAL
line of the bundled example image (`sijax.data.examples`, sigma = 1) on the stretch
[z_obs - w, z_obs + w]. Both enumerators cover the whole stretch; their breakpoints
are compared. Compilation is timed apart (walking: lower + compile; propagation: the
first call minus a warm run), every timed run follows a warm-up.

Breakpoint attribution: each breakpoint found by
propagation records the equation that created it; the first ReLU of the first U-Net
call is the first piecewise equation the line meets.

Single thread:

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" python benchmarks/bench_propagate.py --write

`--write` appends (or replaces) the "Breakpoint propagation" section of
benchmarks/README.md.
"""

import argparse
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from _readme import replace_section  # benchmarks/_readme.py

TITLE = "## Breakpoint propagation"


def _pipeline(size: int):
    """(mask function, a, b, z_obs) of the DAL test of the bundled example."""
    from sijax import DALConfig, draw_noises, line_statistic, load_model
    from sijax.data.examples import load_example
    from sijax.detect.dal import detector

    model = load_model(f"dal_v5_{size}")
    config = DALConfig()
    noises = draw_noises(jax.random.key(0), model.image_shape, config)
    detect = detector(model, noises, config)

    def f(x):
        with jax.default_matmul_precision("highest"):
            return detect(x)[2]

    x, x_ref = (jnp.asarray(v) for v in load_example(size))
    mask = f(x)
    line = line_statistic(x, x_ref, mask, sigma=1.0)
    return f, line.a, line.b, float(line.z_obs), mask


def _walk(f, summary, a, b, lo, hi, cap):
    from sijax.tracking import enumerate_pieces

    def run(a, b):
        return enumerate_pieces(f, a, b, lo, hi, max_pieces=cap, summary=summary)

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(a, b).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(a, b))  # warm-up
    t0 = time.perf_counter()
    pieces = jax.block_until_ready(compiled(a, b))
    run_s = time.perf_counter() - t0
    k = int(pieces.count)
    z = np.concatenate([np.asarray(pieces.lo[:k]), [float(pieces.hi[k - 1])]])
    covered = int(pieces.status) == 0
    return dict(z=z, summary=np.asarray(pieces.summary[:k]), covered=covered,
                run_s=run_s, compile_s=compile_s)  # fmt: skip


def _propagate(f, summary, a, b, lo, hi):
    import sijax.tracking.propagate as propagate
    from sijax.tracking.propagate import timing

    t0 = time.perf_counter()
    propagate.enumerate_line(f, a, b, lo, hi, summary=summary)
    first_s = time.perf_counter() - t0
    propagate.enumerate_line(f, a, b, lo, hi, summary=summary)  # warm-up
    t0 = time.perf_counter()
    pieces = propagate.enumerate_line(f, a, b, lo, hi, summary=summary)
    run_s = time.perf_counter() - t0
    timing.PROFILE = {}  # one more run, synchronised step by step
    propagate.enumerate_line(f, a, b, lo, hi, summary=summary)
    profile, timing.PROFILE = timing.PROFILE, None
    return dict(pieces=pieces, run_s=run_s, compile_s=first_s - run_s,
                profile=profile)  # fmt: skip


def _attribution(pieces) -> dict:
    """Breakpoints (ends excluded) per origin: first ReLU of the first U-Net call,
    the rest of that call, the later sampler steps, and the score/threshold."""
    inner = pieces.origin[1:-1]
    events = pieces.events
    out = Counter()
    for e in inner:
        name = events[e] if e >= 0 else "window"
        if e == 0:
            out["first ReLU, first U-Net call"] += 1
        elif name.startswith("scan[0]/"):
            out["rest of the first U-Net call"] += 1
        elif name.startswith("scan["):
            out["U-Net calls 2-5"] += 1
        else:
            out["after the sampler (abs, threshold)"] += 1
    top = Counter(int(e) for e in inner).most_common(5)
    return dict(groups=dict(out), top=[(events[e], c) for e, c in top])


def bench(size: int, half_width: float, cap: int) -> dict:
    f, a, b, z_obs, mask = _pipeline(size)

    def summary(out):  # per piece: the region is the observed one
        return jnp.all(out == mask)

    lo, hi = z_obs - half_width, z_obs + half_width
    prop = _propagate(f, summary, a, b, lo, hi)
    walk = _walk(f, summary, a, b, lo, hi, cap)
    pieces = prop["pieces"]
    same = walk["covered"] and len(walk["z"]) == len(pieces.z)
    diff = float(np.max(np.abs(walk["z"] - pieces.z))) if same else float("nan")
    same_summary = same and bool(np.array_equal(walk["summary"], pieces.summary))
    return dict(
        size=size,
        lo=lo,
        hi=hi,
        walk_pieces=len(walk["z"]) - 1,
        prop_pieces=pieces.count,
        max_diff=diff,
        same_summary=same_summary,
        walk_run=walk["run_s"],
        walk_compile=walk["compile_s"],
        prop_run=prop["run_s"],
        prop_compile=prop["compile_s"],
        points=pieces.points,
        windows=pieces.windows,
        profile=prop["profile"],
        attribution=_attribution(pieces),
        region_pieces=int(np.sum(pieces.summary)),
    )


def _section(rows, env) -> str:
    lines = [
        TITLE,
        "",
        "Walking `enumerate_pieces` (one value-and-slope pass per piece, in a",
        "`lax.while_loop`) against `enumerate_line` (docs/design.md, "
        "`sijax/tracking/`: the",
        "sampler's jaxpr runs once on a sorted batch of points, breakpoints inserted",
        "where a ReLU/abs/comparison changes between neighbours, all live values",
        "interpolated; consecutive linear equations fused into one compiled run).",
        "Pipeline: committed `dal_v5_<size>` in float64, 5 DDIM steps from t' = 460,",
        "3x3 mean filter, abs, threshold 0.8, matmul precision highest; the DAL",
        "(reference) line of the bundled example image, sigma = 1, noises key 0;",
        "summary = region equals the observed one. Both cover the whole stretch.",
        "",
        "Command:",
        "",
        "```",
        'taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false '
        'intra_op_parallelism_threads=1" \\',
        "    python benchmarks/bench_propagate.py --write",
        "```",
        "",
        f"- commit `{env['commit']}`, jax {env['jax']}, device {env['device']}",
        f"- CPU: {env['cpu']}; cores used: {env['cores']}",
        f"- XLA_FLAGS: `{env['xla_flags']}`",
        f"- load average at start (machine shared with other jobs): {env['load']}",
        "",
        "| size | stretch | pieces walk / prop | max breakpoint diff | same summary "
        "| walk run (s) | walk pieces/s | walk s/piece | prop run (s) | prop pieces/s "
        "| prop s/piece | speed-up | compile walk / prop (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wr = r["walk_pieces"] / r["walk_run"]
        pr = r["prop_pieces"] / r["prop_run"]
        lines.append(
            f"| {r['size']}x{r['size']} | [{r['lo']:.3f}, {r['hi']:.3f}] "
            f"| {r['walk_pieces']} / {r['prop_pieces']} | {r['max_diff']:.1e} "
            f"| {r['same_summary']} | {r['walk_run']:.2f} | {wr:.1f} "
            f"| {1e3 / wr:.1f} ms | {r['prop_run']:.2f} | {pr:.1f} "
            f"| {1e3 / pr:.1f} ms | {r['walk_run'] / r['prop_run']:.1f}x "
            f"| {r['walk_compile']:.1f} / {r['prop_compile']:.1f} |"
        )
    lines += [
        "",
        "Where the propagation time goes (one extra run, synchronised per",
        "",
    ]
    lines[-2] += " step):"
    for r in rows:
        prof = ", ".join(
            f"{k} {v:.2f} s"
            for k, v in sorted(r["profile"].items(), key=lambda x: -x[1])
        )
        lines.append(f"- {r['size']}x{r['size']}: {prof}")
    lines += [
        "",
        "Breakpoint attribution on the trained checkpoints (do nearly all pieces still",
        "come from the first ReLU layer, as with random weights?):",
        "",
    ]
    for r in rows:
        groups = ", ".join(f"{k}: {v}" for k, v in r["attribution"]["groups"].items())
        lines.append(f"- {r['size']}x{r['size']} ({r['prop_pieces'] - 1} inner "
                     f"breakpoints): {groups}")  # fmt: skip
        for name, count in r["attribution"]["top"]:
            lines.append(f"  - {count} from `{name}`")
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--half-width", type=float, default=1.0)
    parser.add_argument("--cap", type=int, default=8192, help="walking max_pieces")
    parser.add_argument("--write", action="store_true", help="update README.md")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    from bench_tracking import _environment

    env = _environment()
    rows = []
    for size in args.sizes:
        r = bench(size, args.half_width, args.cap)
        rows.append(r)
        print(
            f"{size}x{size}: pieces walk={r['walk_pieces']} prop={r['prop_pieces']} "
            f"diff={r['max_diff']:.1e} walk={r['walk_run']:.2f}s "
            f"prop={r['prop_run']:.2f}s compile walk={r['walk_compile']:.1f}s "
            f"prop={r['prop_compile']:.1f}s {r['attribution']}",
            flush=True,
        )
    section = _section(rows, env)
    print(section)
    if args.write:
        replace_section("Breakpoint propagation", section)


if __name__ == "__main__":
    main()
