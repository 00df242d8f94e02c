"""Benchmark: pieces per second of the tracker on the v5 DAL pipeline (not a test).

The pipeline is the v5 reconstruction (U-Net of widths 32/64/128/256, 5 DDIM steps from
t' = 460 with fixed noises), the 3x3 mean filter, abs and the threshold 0.8 (spec
section 6). The weights are the committed `dal_v5_<size>` checkpoint when it exists,
otherwise a random initialisation (the count of pieces then differs from a trained
model, the cost per piece does not). `enumerate_pieces` walks the line from z_obs - 2
with a cap on the number of pieces; pieces per second = pieces found / run time.
Compilation is timed apart; every timed run follows a warm-up run and ends with
`block_until_ready`.

Single thread (the figure that matters for a cluster of one-core workers):

    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" python benchmarks/bench_tracking.py --write

`--write` replaces the "Tracking" section of benchmarks/README.md with the results.
"""

import argparse
import os
import platform
import re
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from _readme import replace_section  # benchmarks/_readme.py

from sijax.checkpoint import CHECKPOINTS_DIR, cast_state, init_unet, load_model
from sijax.detect.score import region, score_map
from sijax.diffusion.sampler import draw_noises, reconstruct
from sijax.diffusion.unet import UNetConfig
from sijax.tracking import enumerate_pieces

# (size, lines, max_pieces per line): caps keep a full run under ~10 minutes.
PLAN = ((8, 1, 100), (8, 64, 6), (16, 1, 30), (16, 64, 2), (32, 1, 8), (32, 64, 1))


def _model(size: int):
    """(eps_fn, schedule, description) for one image size."""
    name = f"dal_v5_{size}"
    if os.path.isdir(os.path.join(CHECKPOINTS_DIR, name)):
        model = load_model(name)
        return model.denoiser(), model.schedule, f"checkpoint {name}"
    from sijax.config import TrainConfig

    cfg = TrainConfig(size=size)
    graphdef, state = init_unet(UNetConfig(channels=cfg.channels), jax.random.key(0))
    state = cast_state(state, jnp.float64)
    from sijax.checkpoint import apply_unet

    def eps_fn(x_t, t):
        return apply_unet(graphdef, state, x_t[None], jnp.reshape(t, (1,)))[0]

    return eps_fn, cfg.schedule(), "random init (seed 0), widths 32/64/128/256"


def _lines(size: int, n: int, seed: int = 0):
    """n DAL-like lines: x_obs ~ N(0, I), eta = indicator of a floor(d/3) square."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 1))
    eta = np.zeros((size, size, 1))
    k = max(size // 3, 1)
    eta[:k, :k] = 1.0
    b = eta / np.linalg.norm(eta)
    z = np.einsum("nhwc,hwc->n", x, b)
    a = x - z[:, None, None, None] * b[None]
    return jnp.asarray(a), jnp.asarray(np.broadcast_to(b, x.shape)), jnp.asarray(z)


def bench(size: int, n_lines: int, max_pieces: int) -> dict:
    eps_fn, schedule, source = _model(size)
    noises = draw_noises(jax.random.key(1), (size, size, 1), 5, dtype=jnp.float64)

    def f(x):
        with jax.default_matmul_precision("highest"):
            s = score_map(x, reconstruct(eps_fn, x, noises, schedule=schedule))
            return region(s, 0.8)

    def one(a, b, z):
        return enumerate_pieces(f, a, b, z - 2.0, z + 2.0, max_pieces=max_pieces)

    run = jax.jit(jax.vmap(one))
    a, b, z = _lines(size, n_lines)
    t0 = time.perf_counter()
    compiled = run.lower(a, b, z).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(a, b, z))  # warm-up
    t0 = time.perf_counter()
    pieces = jax.block_until_ready(compiled(a, b, z))
    run_s = time.perf_counter() - t0
    count = int(np.sum(np.asarray(pieces.count)))
    covered = int(np.sum(np.asarray(pieces.status) == 0))
    return dict(
        size=size,
        lines=n_lines,
        cap=max_pieces,
        pieces=count,
        covered=covered,
        run_s=run_s,
        compile_s=compile_s,
        rate=count / run_s,
        source=source,
    )


def _environment() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            found = re.search(r"model name\s*:\s*(.*)", fh.read())
            cpu = found.group(1) if found else cpu
    except OSError:
        pass
    affinity = sorted(os.sched_getaffinity(0))
    return dict(
        commit=commit,
        jax=jax.__version__,
        device=str(jax.devices()[0]),
        cpu=cpu,
        cores=f"{len(affinity)} of {os.cpu_count()} (affinity {affinity})",
        xla_flags=os.environ.get("XLA_FLAGS", "(unset)"),
        load=", ".join(f"{x:.1f}" for x in os.getloadavg()),
    )


def _section(rows, env) -> str:
    lines = [
        "## Tracking",
        "",
        "Pieces per second of `enumerate_pieces` on the v5 pipeline (reconstruction",
        "with 5 DDIM steps, 3x3 mean filter, abs, threshold 0.8), float64, matmul",
        'precision "highest", on the stretch [z_obs - 2, z_obs + 2] of DAL-like lines',
        "(eta = a floor(d/3) square), capped at `cap` pieces per line. 64 lines run",
        "as one `vmap`. Compile time is reported apart; runs are timed after a",
        "warm-up.",
        "",
        "Command:",
        "",
        "```",
        'taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false '
        'intra_op_parallelism_threads=1" \\',
        "    python benchmarks/bench_tracking.py --write",
        "```",
        "",
        f"- commit `{env['commit']}`, jax {env['jax']}, device {env['device']}",
        f"- CPU: {env['cpu']}; cores used: {env['cores']}",
        f"- XLA_FLAGS: `{env['xla_flags']}`",
        f"- load average at start (machine shared with other jobs): {env['load']}",
        f"- weights: {rows[0]['source']}",
        "",
        "| size | lines | cap/line | pieces | lines covered | run (s) | pieces/s "
        "| compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}x{r['size']} | {r['lines']} | {r['cap']} | {r['pieces']} "
            f"| {r['covered']}/{r['lines']} | {r['run_s']:.2f} | {r['rate']:.1f} "
            f"| {r['compile_s']:.1f} |"
        )
    lines += [
        "",
        "One piece costs one value-and-slope pass of the whole pipeline (about two",
        "forward passes); the section 'Breakpoint propagation' describes a batched",
        "alternative.",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--write", action="store_true", help="update README.md")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    env = _environment()
    rows = []
    for size, n_lines, cap in PLAN:
        if size not in args.sizes:
            continue
        r = bench(size, n_lines, cap)
        rows.append(r)
        print(
            f"{size}x{size} lines={n_lines} pieces={r['pieces']} run={r['run_s']:.2f}s "
            f"rate={r['rate']:.1f}/s compile={r['compile_s']:.1f}s",
            flush=True,
        )
    section = _section(rows, env)
    print(section)
    if args.write:
        replace_section("Tracking", section)


if __name__ == "__main__":
    main()
