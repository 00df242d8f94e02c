"""Benchmark: `sijax demo` without, into and from the persistent compilation cache.

Each run is a fresh process (`python -m sijax.cli demo`), as a user's would be:

- off: ``SIJAX_COMPILE_CACHE=off``, everything compiled;
- cold: an empty cache directory, everything compiled and written;
- warm: the same directory again, the programs loaded.

Wall time is measured around the whole process (start-up, import, compilation,
search, report); the demo's own seconds (compilation included), pieces and
selective p-value are read from its report.json, and the p-values of the three runs
are compared for exact equality. Not a test.

    taskset -c 1 python benchmarks/bench_compile_cache.py --write

`--write` replaces the "Compilation cache" section of benchmarks/README.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _readme import replace_section  # benchmarks/_readme.py
from bench_tracking import _environment

TITLE = "## Compilation cache"
MODES = ("off", "cold", "warm")


def _demo(size: int, engine: str, cache: str, out: str) -> dict:
    env = dict(os.environ, SIJAX_COMPILE_CACHE=cache)
    cmd = [sys.executable, "-m", "sijax.cli", "demo", "--size", str(size), "--engine",
           engine, "--no-progress", "--out", out]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "report.json")) as fh:
        report = json.load(fh)
    return dict(wall=wall, inner=report["seconds"], p=report["result"]["p_value"],
                pieces=report["result"]["search_count"])


def bench(size: int, engine: str) -> dict:
    row = dict(size=size, engine=engine)
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for mode in MODES:
            row[mode] = _demo(size, engine, "off" if mode == "off" else cache,
                              os.path.join(tmp, mode))
            print(f"{size}x{size} {engine} {mode}: {row[mode]}", flush=True)
        files = [os.path.join(cache, f) for f in os.listdir(cache)]
        row["entries"] = len(files)
        row["mb"] = sum(os.path.getsize(f) for f in files) / 2**20
    row["same_p"] = len({row[m]["p"] for m in MODES}) == 1
    return row


def _section(rows, env) -> str:
    lines = [
        TITLE,
        "",
        "`sijax demo` in a fresh process, without the cache (off), into an empty",
        "one (cold) and from it (warm); the CLI keeps the cache in",
        "`$SIJAX_COMPILE_CACHE` (default `~/.cache/sijax/jax`; `off` switches it",
        "off). Wall: the whole process; demo: the demo's own \"s (compilation",
        "included)\", from its report.json. Same p: the three selective p-values are",
        "equal to the last bit.",
        "",
        "```",
        "taskset -c 1 python benchmarks/bench_compile_cache.py --write",
        "```",
        "",
        f"- commit `{env['commit']}`, jax {env['jax']}, device {env['device']}",
        f"- CPU: {env['cpu']}; cores used: {env['cores']}",
        f"- load average at start (machine shared with other jobs): {env['load']}",
        "",
        "| size | engine | pieces | wall off / cold / warm (s) | demo off / cold / "
        "warm (s) | warm vs off | same p | cache entries | cache size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = " / ".join(f"{r[m]['wall']:.1f}" for m in MODES)
        inner = " / ".join(f"{r[m]['inner']:.1f}" for m in MODES)
        lines.append(
            f"| {r['size']}x{r['size']} | {r['engine']} | {r['off']['pieces']} "
            f"| {wall} | {inner} | {r['off']['wall'] / r['warm']['wall']:.1f}x "
            f"| {r['same_p']} | {r['entries']} | {r['mb']:.1f} MB |")
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["8:walk", "16:walk",
                                                       "16:propagate"],
                        help="SIZE:ENGINE pairs")
    parser.add_argument("--write", action="store_true", help="update README.md")
    args = parser.parse_args()
    env = _environment()
    rows = []
    for case in args.cases:
        size, engine = case.split(":")
        rows.append(bench(int(size), engine))
    section = _section(rows, env)
    print(section)
    if args.write:
        replace_section(TITLE[3:], section)


if __name__ == "__main__":
    main()
