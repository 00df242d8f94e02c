"""Worker processes that run batches, and the device policy of the command line.

A run on a CPU either shards each batch over single-threaded XLA CPU devices
(:func:`use_cpu_devices`) or gives whole batches to spawned worker processes, each
with one such device (:func:`worker_pool`); :func:`auto_workers` picks between them.
Each worker leaves when its parent is gone, and a failed batch (or Ctrl-C) stops the
others at once rather than after their batches.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from sijax import compile_cache
from sijax.errors import InputError

# XLA_FLAGS of a single-threaded CPU device (`--cpu-devices`, and each worker): the
# searches of the propagate engine are driven from Python, so threads of one
# process would wait for each other; XLA's own threads gain little on these
# small products.
SINGLE_THREAD_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


def usable_cores() -> int:
    """Cores this process may run on (its affinity on Linux; all cores where the
    platform has no affinity call, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_workers(engine: str, backend: str, processes: int) -> int:
    """Default --workers: propagation tests one image at a time from Python, so on a
    CPU it needs a process per core to use the machine; walking shards its batches
    over --cpu-devices instead, and on an accelerator (or multi-host) one process
    drives the device."""
    if engine == "propagate" and backend == "cpu" and processes == 1:
        return usable_cores()
    return 1


def use_cpu_devices(n: int) -> None:
    """n single-threaded XLA CPU devices (before the backend starts; 1: unchanged).

    Batches are sharded over the devices and each device runs its own searches, which
    uses the cores far better than XLA's threads inside these small products
    (benchmarks/README.md, "Throughput"). Only the CPU platform is affected.
    """
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    if n <= 1 or "xla_force_host_platform_device_count" in flags:
        return
    jax.config.update("jax_num_cpu_devices", n)
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + SINGLE_THREAD_FLAGS).strip()


# One worker process: the function it was given (with its state, e.g. the models)
# and where its searches' progress reports go, kept between the batches it runs.
_WORKER: dict = {"fn": None, "report": None, "inside": False}


def _worker_init(flags: str, reports=None, fn: bytes = b"") -> None:
    """Worker set-up; `reports`: a queue for the searches' progress reports; `fn`:
    the pool's function (pickled), run by :func:`call`."""
    import jax

    os.environ["XLA_FLAGS"] = flags
    _WORKER["inside"] = True
    _WORKER["report"] = None if reports is None else (lambda *r: reports.put(r))
    # A worker is one CPU device, also on a GPU machine (where several processes
    # would each claim most of the GPU's memory).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    if compile_cache.ENV in os.environ:  # the parent's cache (or "off"), inherited
        compile_cache.enable_compilation_cache()
    # Unpickled only now: arrays made before x64 is on would be float32.
    _WORKER["fn"] = pickle.loads(fn) if fn else None
    # A parent killed outright (SIGTERM, SIGKILL) cannot shut the pool down: its
    # workers would compute on as orphans. Each one leaves when its parent is gone.
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def call(*args):
    """In a worker: the pool's function applied to ``args`` and the worker's report
    callable (None when the pool has no ``report``)."""
    return _WORKER["fn"](*args, _WORKER["report"])


class _Spawn:
    """The "spawn" context, keeping the processes it starts: a failed run stops
    them itself (Python < 3.14 has no ``ProcessPoolExecutor.terminate_workers``)."""

    def __init__(self):
        self.context = multiprocessing.get_context("spawn")
        self.processes: list = []

    def Process(self, *args, **kwargs):  # named as the context it stands for
        process = self.context.Process(*args, **kwargs)
        self.processes.append(process)
        return process

    def __getattr__(self, name):
        return getattr(self.context, name)


@contextlib.contextmanager
def worker_pool(
    workers: int, fn: Callable | None = None, report: Callable | None = None
) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` spawned processes, each one single-threaded CPU device.

    Args:
      workers: processes (on this host; multi-host runs shard batches instead).
      fn: a picklable callable, pickled once and set up in each worker (after x64 is
        on); ``pool.submit(call, *args)`` runs ``fn(*args, report)`` in a worker.
      report: where the workers' ``report(*r)`` calls arrive (in a thread of this
        process), e.g. the searches' progress for a bar.

    Yields:
      the ``ProcessPoolExecutor``. An exception inside the block (a failed batch,
      Ctrl-C) stops the workers at once instead of waiting for their batches.

    Raises:
      InputError: called in a worker of another pool (worker processes of a
        run's batches whose tests would share each line's search over processes
        of their own: the nested pool hung), a multi-host run, or an unpicklable
        ``fn``.
    """
    import jax

    if _WORKER["inside"]:
        raise InputError(
            "a worker process cannot start worker processes of its own: choose "
            "either --workers N (tests at the same time) or --processes N / "
            "processes=N (one test's search shared), not both"
        )
    if jax.process_count() > 1:
        raise InputError("workers > 1 is for one host; multi-host runs shard batches")
    try:
        setup = b"" if fn is None else pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise InputError(
            "worker processes need a picklable batch function (a top-level function, "
            f"or an instance of a top-level class): {e}"
        ) from None
    ctx = _Spawn()
    reports = ctx.Queue() if report is not None else None

    def forward():
        for r in iter(reports.get, None):
            report(*r)

    relay = None if reports is None else threading.Thread(target=forward, daemon=True)
    if relay is not None:
        relay.start()
    try:
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init,
            initargs=(SINGLE_THREAD_FLAGS, reports, setup),
        ) as pool:  # fmt: skip
            try:
                yield pool
            except BaseException:
                # Leaving the pool would first wait for the other workers' batches,
                # minutes each. Stop them now.
                _terminate(pool, ctx.processes)
                raise
    finally:
        if relay is not None:
            reports.put(None)
            relay.join()


def _terminate(pool: ProcessPoolExecutor, processes: list) -> None:
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10.0)
