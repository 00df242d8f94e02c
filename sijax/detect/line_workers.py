"""One line's search shared by worker processes (``DALConfig(processes=N)``).

Threads of one process that share a line (``DALConfig.devices``) overlap only
inside XLA's computations: the host work of every window (planning the runs,
finding roots, inserting points) holds the interpreter lock, which is half or
more of a window on a CPU. Here each window of the propagate engine's
:class:`~sijax.tracking.LineCache` is cut into one segment per worker process
(:func:`~sijax.tracking.propagate.split_stretch`), every worker enumerates its
segment with :func:`~sijax.tracking.enumerate_line` on its own single-threaded
CPU device, and the segments are joined
(:func:`~sijax.tracking.propagate.join_pieces`) exactly as one process joins the
windows of a stretch, so the pieces, the truncation set and the p-value are those
of one process.

The workers are spawned once per (model, count) and kept for the next lines and
images (each worker loads the model once and compiles its own programs, all
workers at the same time); :func:`close_line_workers` stops them (also at exit).
"""

from __future__ import annotations

import atexit
import contextlib
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sijax.errors import SearchError
from sijax.tracking.propagate import enumerate_line, join_pieces, split_stretch


def _same_mask(mask, m):
    return jnp.all(m == mask)


class _Segment:
    """In a worker: the pieces of the DAL detector's mask along one segment of a
    line (picklable; holds the model, set up once per worker)."""

    def __init__(self, model, precision):
        self.model = model
        self.precision = precision

    def __call__(self, detector, noises, threshold, a, b, mask, lo, hi, max_points,
                 tie_tol, report=None):  # fmt: skip
        from sijax.detect.dal import _line_mask

        # The parent's matmul precision: it is part of every trace's key.
        jax.config.update("jax_default_matmul_precision", self.precision)
        return enumerate_line(
            _line_mask(*detector), jnp.asarray(a), jnp.asarray(b),
            lo, hi, params=(self.model, jax.tree.map(jnp.asarray, noises),
                            jnp.asarray(threshold)),
            summary=partial(_same_mask, jnp.asarray(mask)), max_points=max_points,
            tie_tol=tie_tol, all_fingerprints=False,
        )  # fmt: skip


class LineWorkers:
    """``count`` spawned processes, each a single-threaded CPU device holding
    ``model``; :meth:`segments` gives a LineCache the windows of one line."""

    def __init__(self, model, count: int):
        from sijax.experiments.pool import worker_pool

        self.model, self.size = model, int(count)
        self._stack = contextlib.ExitStack()
        fn = _Segment(model, jax.config.jax_default_matmul_precision)
        self.pool = self._stack.enter_context(worker_pool(self.size, fn))

    def close(self) -> None:
        self._stack.close()

    def segments(self, detector, noises, threshold, a, b, mask, *,
                 max_points: int, tie_tol: float):  # fmt: skip
        """``(lo, hi) -> LinePieces`` of the DAL mask along a + b z, each window cut
        into one segment per worker; its ``size`` is the worker count."""
        host = np.asarray
        line = (tuple(detector), jax.tree.map(host, noises), float(threshold),
                host(a), host(b), host(mask))  # fmt: skip
        return _LineSegments(self, line, max_points, tie_tol)


class _LineSegments:
    """``(lo, hi) -> LinePieces`` of one line: the window cut into one segment per
    worker, enumerated by the workers and joined; ``size`` is the worker count
    (what :class:`~sijax.tracking.LineCache` takes as ``segments``)."""

    def __init__(self, workers: LineWorkers, line: tuple, max_points: int,
                 tie_tol: float):  # fmt: skip
        self.workers, self.line = workers, line
        self.max_points, self.tie_tol = max_points, tie_tol
        self.size = workers.size

    def __call__(self, lo: float, hi: float):
        from sijax.experiments.pool import call

        cuts = split_stretch(lo, hi, self.size, self.tie_tol)
        try:
            futures = [
                self.workers.pool.submit(call, *self.line, cuts[i], cuts[i + 1],
                                         self.max_points, self.tie_tol)  # fmt: skip
                for i in range(len(cuts) - 1)
            ]
            return join_pieces([f.result() for f in futures])
        except BrokenProcessPool as e:
            close_line_workers()
            raise SearchError(
                "a worker process sharing the line's search died (out of "
                f"memory, or killed): {e}; run again, or with processes=1"
            ) from None


_ACTIVE: dict = {}


def line_workers(model, count: int) -> LineWorkers:
    """The worker processes for ``model`` (spawned at the first call, kept while
    the same model and count are asked for; another model or count replaces them)."""
    have = _ACTIVE.get("workers")
    if have is not None and have.model is model and have.size == count:
        return have
    close_line_workers()
    _ACTIVE["workers"] = LineWorkers(model, count)
    return _ACTIVE["workers"]


def close_line_workers() -> None:
    """Stops the worker processes of :func:`line_workers`, if any."""
    have = _ACTIVE.pop("workers", None)
    if have is not None:
        have.close()


atexit.register(close_line_workers)
