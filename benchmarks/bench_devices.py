"""One image's search on every core: the line shared over devices (not a test).

`sijax.dal_test` with the propagate engine on the example of each size
(`sijax.data.examples.make_example`: N(0, 1) with a +3 square of side d // 3, seed 0;
the committed `dal_v5_<size>` checkpoint, at sizes without one a seeded random
initialisation of the same v5 U-Net), reference test, sigma = 1, noises key 0,
in three set-ups, each in a fresh process pinned with `taskset`:

* ``1core``: one CPU device, one XLA thread, on cpu 0 (the one-core time);
* ``1dev-2threads``: one CPU device with XLA's default threads on cpus 0-1 (what
  XLA's own threads make of the second core);
* ``2dev``: two single-threaded CPU devices on cpus 0-1 with
  ``DALConfig(devices=2)``: every window of the line cut into two segments
  enumerated at the same time, in two threads of one process;
* ``2proc``: ``DALConfig(processes=2)`` on cpus 0-1: the same two segments per
  window enumerated by two worker processes (spawned by the first test, each a
  single-threaded CPU device), the parent process planning the windows.

Each process tests the image once (compilation included: what a user of
`sijax test` waits for, with an empty compilation cache) and then again (warm).
The pieces and p-values of the three must agree (the same truncation set).

    python benchmarks/bench_devices.py --sizes 16 32 --write

`--write` saves the raw outputs to benchmarks/results/devices/ and replaces the
"One image on every core" section of benchmarks/README.md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _readme import replace_section  # noqa: E402

ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
SETUPS = {
    # name: (cpus, XLA_FLAGS, CPU devices, worker processes)
    "1core": ("0", ONE_THREAD, 1, 1),
    "1dev-2threads": ("0,1", "", 1, 1),  # XLA's default threads, over the two cpus
    "2dev": ("0,1", ONE_THREAD, 2, 1),
    "2proc": ("0,1", ONE_THREAD, 1, 2),
}


def worker(size: int, devices: int, processes: int, termination: str) -> dict:
    """Inside the pinned process: the test twice, as JSON."""
    import jax

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    from bench_throughput import model_for  # sets x64 on import

    from sijax import DALConfig, dal_test, draw_noises
    from sijax.data.examples import make_example

    t0 = time.perf_counter()
    model, weights = model_for(size)
    x, x_ref = (jnp.asarray(v) for v in make_example(size))
    config = DALConfig(engine="propagate", termination=termination, devices=devices,
                       processes=processes)  # fmt: skip
    noises = draw_noises(jax.random.key(0), model, config)
    load_s = time.perf_counter() - t0
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        r = dal_test(model, x, x_ref, sigma=1.0, noises=noises, config=config)
        runs.append(time.perf_counter() - t0)
    return dict(
        size=size, devices=devices, processes=processes, weights=weights,
        termination=termination,
        jax_devices=[str(d) for d in jax.devices()], load_seconds=load_s,
        first_seconds=runs[0], warm_seconds=runs[1], p_value=r.p_value,
        inf_p=r.inf_p, sup_p=r.sup_p, pieces=r.search_count, status=str(r.status),
        truncated=[list(map(float, iv)) for iv in r.truncated_intervals],
    )  # fmt: skip


def run_setup(name: str, size: int, termination: str) -> dict:
    cpus, flags, devices, processes = SETUPS[name]
    env = dict(os.environ, XLA_FLAGS=flags, SIJAX_COMPILE_CACHE="off",
               JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="sijax-cc-"))
    cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--worker", str(size),
           str(devices), str(processes), termination]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    rec.update(setup=name, cpus=cpus, xla_flags=flags,
               process_seconds=time.perf_counter() - t0)  # fmt: skip
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    ap.add_argument("--termination", default="precision",
                    choices=("precision", "decision"))  # fmt: skip
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        size, devices, processes, termination = a.worker
        print(json.dumps(worker(int(size), int(devices), int(processes), termination)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    rows = []
    for size in a.sizes:
        for name in a.setups:
            rec = run_setup(name, size, a.termination)
            rec.update(commit=commit, load_average_at_start=[round(v, 2) for v in load],
                       date=time.strftime("%Y-%m-%d %H:%M"))  # fmt: skip
            rows.append(rec)
            print(f"{size}x{size} {name}: {rec['pieces']} pieces, "
                  f"p={rec['p_value']:.8g}, first {rec['first_seconds']:.1f} s, "
                  f"warm {rec['warm_seconds']:.1f} s, process "
                  f"{rec['process_seconds']:.1f} s", flush=True)  # fmt: skip
    if a.write:
        write(a, rows, commit, load)


def write(a, rows, commit, load) -> None:
    dest = os.path.join(HERE, "results", "devices")
    os.makedirs(dest, exist_ok=True)
    sizes = "_".join(str(s) for s in a.sizes)
    with open(os.path.join(dest, f"devices_{sizes}_{a.termination}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [
        "## One image on every core",
        "",
        "Issue 29 item 3. "
        f"{time.strftime('%Y-%m-%d')}, commit {commit}, "
        f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores), load average "
        f"{', '.join(f'{v:.1f}' for v in load)} at start, "
        f"`python benchmarks/bench_devices.py --sizes {' '.join(map(str, a.sizes))} "
        f"--termination {a.termination} --write` (raw: "
        f"results/devices/devices_{sizes}_{a.termination}.json). The DAL test of the "
        "example image (make_example), propagate engine, each set-up in a fresh "
        "process with an empty compilation cache: `first` includes compilation, "
        "`warm` is the same image again. 1core: one device, one XLA thread on "
        "cpu 0; 1dev-2threads: one device, two XLA threads on cpus 0-1; 2dev: "
        "two single-threaded CPU devices on cpus 0-1 sharing the line in two "
        "threads (`DALConfig(devices=2)`); 2proc: two worker processes on cpus 0-1 "
        "sharing the line (`DALConfig(processes=2)`, the workers spawned by the "
        "first test: its time includes their start).",
        "",
        "| size | weights | set-up | pieces | p-value | first (s) | warm (s) "
        "| warm vs 1core |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["size"]: r["warm_seconds"] for r in rows if r["setup"] == "1core"}
    for r in rows:
        ratio = base.get(r["size"])
        gain = "-" if ratio is None else f"{ratio / r['warm_seconds']:.2f}x"
        lines.append(
            f"| {r['size']}x{r['size']} | {r['weights']} | {r['setup']} | "
            f"{r['pieces']} | {r['p_value']:.8g} | {r['first_seconds']:.1f} | "
            f"{r['warm_seconds']:.1f} | "
            f"{gain} |"
        )
    replace_section("One image on every core", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
