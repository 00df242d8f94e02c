"""Records on disk: the JSONL file a run appends to, the advisory lock that keeps a
second run out of its directory, and the provenance written next to the numbers
(commit, machine, models)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

from sijax.errors import InputError
from sijax.experiments.spec import ExperimentSpec

TRIALS_FILE = "trials.jsonl"
LOCK_FILE = ".lock"


def read_records(path: str) -> list[dict]:
    """Records of a JSONL file such as ``trials.jsonl`` (or a gzipped
    ``trials.jsonl.gz``, as committed results are); a torn last line (a killed
    writer) is ignored."""
    if not os.path.exists(path):
        return []
    out = []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


read_trials = read_records  # the experiments' name for it


def portable_key(key: str) -> str:
    """A setting key whose committed checkpoint is named as committed ("dal_v5_8")
    rather than by the absolute path of the checkout that ran it, so that records
    made from another checkout (a worktree, a fresh clone) resume the same setting
    instead of starting its trials again."""
    from sijax.checkpoint import CHECKPOINTS_DIR

    setting = json.loads(key)
    path = setting.get("checkpoint")
    if isinstance(path, str) and os.path.isabs(path):
        parent, name = os.path.split(os.path.normpath(path))
        committed = os.path.isdir(os.path.join(CHECKPOINTS_DIR, name))
        if os.path.basename(parent) == "checkpoints" and committed:
            setting["checkpoint"] = name
            return json.dumps(setting, sort_keys=True)
    return key


def records_by_setting(path: str) -> dict[str, dict[int, dict]]:
    """{setting key: {trial index: record}} of a trials file, keys made portable
    (`portable_key`); a trial recorded twice keeps its first record."""
    done: dict = {}
    for r in read_records(path):
        r["setting"] = portable_key(r["setting"])
        done.setdefault(r["setting"], {}).setdefault(r["index"], r)
    return done


def _drop_torn_tail(path: str, block: int = 1 << 16) -> None:
    """Cuts a torn last line (a writer killed mid-record) off ``path``: the record
    it held is incomplete and is computed again, and the file stays valid JSON
    lines for other readers (``pandas.read_json(lines=True)``). A last line that
    lacks only its newline (killed just before it) is a whole record, which
    :func:`read_records` reads and a resume does not compute again: it gets its
    newline instead."""
    if not os.path.exists(path):
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        cut = 0  # where the last line starts
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return  # intact
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                cut = start + nl + 1
                break
            pos = start
        f.seek(cut)
        try:
            json.loads(f.read())
        except ValueError:  # torn (UnicodeDecodeError is a ValueError too)
            f.truncate(cut)
            return
        f.write(b"\n")


def append_records(path: str, records: Sequence[dict]) -> None:
    """Appends ``records`` to ``path``, one JSON line each, flushed to disk."""
    _drop_torn_tail(path)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def exclusive(out_dir: str, what: str = "sijax experiment") -> Iterator[None]:
    """Holds ``out_dir/.lock`` so that one run at a time writes an output directory.

    Two runs appending to one records file would compute the same indices twice and
    interleave their records. The lock is an advisory ``flock`` (released by the
    kernel when its process dies, so a killed run leaves no stale lock); the file
    names its holder for the error message. Where ``fcntl`` is missing (Windows) no
    lock is taken.

    Args:
      out_dir: an existing directory.
      what: the kind of run, for the error message ("another {what} (pid ...)").

    Raises:
      InputError: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    path = os.path.join(out_dir, LOCK_FILE)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(
                f"{out_dir} is being written by another {what} ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the flock


@functools.cache
def git_commit() -> str:
    """Short hash of the sijax checkout's HEAD, with "+dirty" when tracked files
    under ``sijax/`` differ from it ("unknown" outside a checkout). Read once per
    process: the code a process runs is the code it imported."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=here, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if not commit:
            return "unknown"
        package = os.path.dirname(here)
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", package)
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(engine) -> dict:
    """What every trial record states about what made it (issue 27 item 5): the
    commit (:func:`git_commit`) and the search engine that ran ("walk" or
    "propagate": resolved, never "auto")."""
    return {"commit": git_commit(), "engine": getattr(engine, "value", engine)}


def machine() -> str:
    """Host, CPUs, JAX version, backend, devices and processes, in one line."""
    import jax

    return (
        f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus; "
        f"jax {jax.__version__} {jax.default_backend()}, "
        f"{jax.device_count()} devices, {jax.process_count()} processes"
    )


def experiment_meta(spec: ExperimentSpec, models) -> dict:
    """``experiment.json``: the spec, the models (with their weights' hashes), the
    termination of the selective test, the machine, the commit and the date."""
    mods = {}
    for (ckpt, act), m in models.items():
        mods[f"{ckpt} ({act})"] = {
            "preset": m.config.name,
            "size": m.config.size,
            "epochs": m.config.epochs,
            "channels": list(m.config.channels),
            "detector": m.config.detector,
            "detector_options": dict(m.config.detector_options),
            "weights_sha256": m.weights_sha256(),
        }
    return {
        "experiment": spec.experiment,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items()},
        "models": mods,
        "termination_note": (
            f"hypothesis '{spec.hypothesis}'; "
            f"selective test with search '{spec.settings()[0].search}'"
            + (
                f", termination '{spec.termination}'"
                if spec.experiment != "pieces"
                else ""
            )
            + (
                "; 'decision' stops once p is known to be on one side of alpha: "
                "rejections are exact, p-values away from alpha are bounds only"
                if not any(s.selective_p_exact for s in spec.settings())
                else ""
            )
        ),
        "machine": machine(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
