"""A resumable scheduler of batches, for the experiments and any run like them.

Work is a set of *groups*, each with integer indices (the experiments: one group per
setting, its trials; ``sijax evaluate``: one group, its images). A group says which
indices to run next given its records so far (:class:`Group`); :class:`Runner` gives
the groups turns batch by batch, runs each batch with a callable
``run_batch(group, indices, report) -> list[dict]`` (in this process, or in
``workers`` spawned processes), and appends the records to a JSONL file in the
output directory as each batch finishes, under the directory's lock. A killed run
loses nothing, and ``resume=True`` redoes nothing that finished: a record is
keyed by (group key, ``record["index"]``), the last one written winning.

Example, every index once (as ``sijax evaluate`` tests every image of a folder)::

    from sijax.experiments.runner import EveryIndex, Runner

    def test_images(group, indices, report):
        # top level (or a picklable object holding the models): with workers > 1
        # it is pickled once into each worker process
        return [{"index": i, "p": p_value_of(i, progress=report)} for i in indices]

    records = Runner(
        [EveryIndex("images", num_images)], test_images, out_dir, batch=8,
        records_file="images.jsonl", resume=True, workers=4, desc="evaluate",
        unit="image", summary=lambda records: write_summary(out_dir, records),
    ).run()

Records need an ``"index"``; with several groups each also names its group in
``record[key_field]``. ``report`` forwards ``dal_test_batch``'s ``progress`` calls
(the pieces searched in the running batch show on the bar); it is None without a
bar. With ``workers=1`` the batch may be sharded over all devices inside
``run_batch`` (:func:`sijax.experiments.trials.shard` on a ``device_mesh``, results
through ``gather``): every process of a multi-host run then runs the same batches,
and process 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Protocol

from sijax.errors import InputError, ensure_output_dir
from sijax.experiments.files import append_records, exclusive, read_records
from sijax.experiments.pool import call, worker_pool

__all__ = ["EveryIndex", "Group", "Runner"]


class Group(Protocol):
    """One kind of work of a run: integer indices, run in batches.

    Attributes:
      key: names the group's records (``record[key_field]``) and its progress.
      total: units of progress-bar work (indices, or valid trials wanted).
    """

    key: str
    total: int

    def count(self, records: Mapping[int, dict]) -> int:
        """Units of ``total`` done, given the group's records ({index: record})."""
        ...

    def next_indices(
        self, records: Mapping[int, dict], busy: Set[int], batch: int
    ) -> list[int]:
        """At most ``batch`` indices to run next, none in ``busy`` (running now);
        [] when none should start now. A group that returns [] while none of its
        indices are running is finished."""
        ...


@dataclasses.dataclass(frozen=True)
class EveryIndex:
    """A group that runs every index in ``range(total)`` exactly once, in order."""

    key: str
    total: int

    def count(self, records: Mapping[int, dict]) -> int:
        return sum(1 for i in records if 0 <= i < self.total)

    def next_indices(
        self, records: Mapping[int, dict], busy: Set[int], batch: int
    ) -> list[int]:
        out = []
        for i in range(self.total):
            if len(out) == batch:
                break
            if i not in records and i not in busy:
                out.append(i)
        return out


class _Done:
    """A batch run in this process, with the interface of a Future."""

    def __init__(self, records: list[dict]):
        self.records = records

    def result(self) -> list[dict]:
        return self.records


class _Bar:
    """A tqdm bar of the units done, showing the pieces searched so far in the
    running batch before the client's postfix text.

    A batch of 16x16 images runs for minutes between two updates of the count; its
    searches' progress reports (interleaved, see ``dal_test_batch``) are summed with
    ``search.new_pieces`` and shown at most twice a second.
    """

    def __init__(self, total: int, desc: str | None, unit: str):
        from tqdm import tqdm

        self.tqdm = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        self.text, self.pieces, self.shown = "", 0, 0.0

    def start(self) -> None:
        self.pieces = 0

    def report(self, pieces, lo, hi, inf_p, sup_p) -> None:
        from sijax.detect.dal import REPORT_EVERY
        from sijax.selective.search import new_pieces

        self.pieces += new_pieces(pieces, REPORT_EVERY)
        now = time.monotonic()
        if now - self.shown >= 0.5:
            self.shown = now
            text = f"batch: {self.pieces} pieces"
            if self.text:
                text = f"{text} | {self.text}"
            self.tqdm.set_postfix_str(text[:120])

    def advance(self, n: int, text: str) -> None:
        self.tqdm.update(n)
        self.text = text
        self.tqdm.set_postfix_str(text[:120])


class Runner:
    """Runs the groups' batches and appends their records to ``out_dir``.

    Groups take turns batch by batch (so a partial run has some of every group),
    each starting its :meth:`Group.next_indices` while fewer than ``workers``
    batches run, until every group is finished or ``max_batches`` batches have
    started. Only the writer (process 0 of a multi-host run, where every process
    runs every batch sharded over all devices) takes the lock, writes records,
    calls ``summary`` and shows the bar.

    Args:
      groups: the work (:class:`Group`); their keys are distinct.
      run_batch: ``run_batch(group, indices, report) -> records``, one dict per
        index with ``"index"`` (and ``key_field``). With ``workers > 1`` it must be
        picklable (a top-level function, or an instance of a top-level class whose
        state, e.g. loaded models, each worker then holds once).
      out_dir: output directory (created).
      batch: indices per batch.
      records_file: name of the JSONL file in ``out_dir``.
      key_field: the record field naming its group; None: one group, records
        without it.
      resume: continue from the records in ``out_dir`` (required if there are
        some).
      workers: > 1: that many spawned worker processes on this host, each one
        single-threaded CPU device (:func:`worker_pool`); batches finish in any
        order. 1: batches run in this process, one after another.
      progress: show a tqdm bar of the groups' :meth:`Group.count` out of their
        ``total``, labelled ``desc`` with ``unit``.
      postfix: ``postfix(group, records) -> str`` shown on the bar after a batch of
        ``group`` (e.g. the running estimates).
      summary: ``summary(records)`` called every ``summary_every`` seconds (so a
        killed run leaves an up-to-date partial summary) and at the end.
      max_batches: start at most this many batches (the run can be resumed); 0
        only calls ``summary`` on the records in ``out_dir``.
      writer: whether this process writes (default: ``jax.process_index() == 0``).
      what: the kind of run, for the lock's error message.
      claim: ``claim()``, called by the writer once it holds the directory's lock
        and before the records are read: checks that the run may write ``out_dir``
        and records its settings there (``claim_output`` of ``sijax evaluate``).
        Under the lock, a run refused because another one writes ``out_dir``
        leaves that run's settings as they were.

    Raises (from :meth:`run`):
      InputError: records present without ``resume``; another run writing
        ``out_dir``; an output directory that cannot be written; what ``claim``
        raises.
    """

    def __init__(
        self,
        groups: Sequence[Group],
        run_batch: Callable[..., list[dict]],
        out_dir: str,
        *,
        batch: int,
        records_file: str = "records.jsonl",
        key_field: str | None = None,
        resume: bool = False,
        workers: int = 1,
        progress: bool = True,
        desc: str | None = None,
        unit: str = "it",
        postfix: Callable[[Group, list[dict]], str] | None = None,
        summary: Callable[[list[dict]], None] | None = None,
        summary_every: float = 300.0,
        max_batches: int | None = None,
        writer: bool | None = None,
        what: str = "sijax run",
        claim: Callable[[], None] | None = None,
    ):
        if workers < 1:
            raise InputError(f"workers must be >= 1; got {workers}")
        if batch < 1:
            raise InputError(f"batch must be >= 1; got {batch}")
        keys = [g.key for g in groups]
        if len(set(keys)) != len(keys):
            raise InputError("the groups' keys must be distinct")
        if key_field is None and len(groups) != 1:
            raise InputError(f"{len(groups)} groups need a key_field in the records")
        if writer is None:
            import jax

            writer = jax.process_index() == 0
        self.groups = list(groups)
        self.run_batch = run_batch
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, records_file)
        self.batch, self.key_field, self.resume = batch, key_field, resume
        self.workers, self.max_batches, self.writer = workers, max_batches, writer
        self.progress, self.desc, self.unit = progress, desc, unit
        self.postfix, self.summary, self.summary_every = postfix, summary, summary_every
        self.what, self.claim = what, claim
        # The state of a run (set by run()).
        self.records: list[dict] = []  # every record, in file order
        self.latest: dict[str, dict[int, dict]] = {}  # {group key: {index: record}}
        self._pending: list[Group] = []  # groups not finished, in turn order
        self._running: dict = {}  # job (Future or _Done) -> (group, indices)
        self._turn = 0
        self._batches = 0
        self._last_summary = 0.0
        self._bar: _Bar | None = None
        self._pool = None

    def run(self) -> list[dict]:
        """Runs until every group is finished (or ``max_batches``); returns every
        record (those read back on resume first, the last of an index winning)."""
        if os.path.exists(self.path) and not self.resume and read_records(self.path):
            raise InputError(
                f"{self.path} already holds records: pass --resume to continue, "
                "or choose another --out"
            )
        ensure_output_dir(self.out_dir)
        # One writer per directory: a second run would redo the same indices.
        lock = exclusive(self.out_dir, self.what) if self.writer else None
        with lock or contextlib.nullcontext(), contextlib.ExitStack() as stack:
            if self.writer and self.claim is not None:
                self.claim()
            self.records, self.latest = [], {}
            self._remember(read_records(self.path))
            if self.progress and self.writer:
                total = sum(g.total for g in self.groups)
                self._bar = _Bar(total, self.desc, self.unit)
                self._bar.tqdm.update(sum(self._count(g) for g in self.groups))
            report = None if self._bar is None else self._bar.report
            if self.workers > 1:
                self._pool = stack.enter_context(
                    worker_pool(self.workers, self.run_batch, report)
                )
            self._pending, self._running = list(self.groups), {}
            self._turn = self._batches = 0
            self._last_summary = time.monotonic()
            self._loop()
            if self._bar is not None:
                self._bar.tqdm.close()
            if self.writer and self.summary is not None:
                self.summary(self.records)
        return self.records

    def _loop(self) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        slots = 1 if self._pool is None else self.workers
        while True:
            while (
                self._pending
                and len(self._running) < slots
                and (self.max_batches is None or self._batches < self.max_batches)
                and self._submit()
            ):
                pass
            if not self._running:
                return
            if self._pool is None:
                finished = list(self._running)
            else:
                finished = wait(self._running, return_when=FIRST_COMPLETED).done
            for job in finished:
                self._finish(job)

    def _submit(self) -> bool:
        """Starts the next group's next batch; False when none can start."""
        for _ in range(len(self._pending)):
            group = self._pending[self._turn % len(self._pending)]
            busy = {i for g, idx in self._running.values() if g is group for i in idx}
            idx = group.next_indices(self._records_of(group), busy, self.batch)
            if not idx:
                if not busy:  # finished: the next group takes its turn
                    self._pending.remove(group)
                else:
                    self._turn += 1
                if not self._pending:
                    return False
                continue
            self._turn += 1
            self._batches += 1
            if self._pool is None:
                if self._bar is not None:
                    self._bar.start()
                report = None if self._bar is None else self._bar.report
                job = _Done(self.run_batch(group, idx, report))
            else:
                job = self._pool.submit(call, group, idx)
            self._running[job] = (group, idx)
            return True
        return False

    def _finish(self, job) -> None:
        """Records a finished batch: appended to the file, the summary when due,
        the bar."""
        group, _ = self._running.pop(job)
        new = job.result()
        if self._pool is not None and self._bar is not None:
            self._bar.start()  # the pieces since the last batch that ended
        before = self._count(group)
        if self.writer:
            append_records(self.path, new)
        self._remember(new)
        due = time.monotonic() - self._last_summary > self.summary_every
        if self.writer and self.summary is not None and due:
            self.summary(self.records)
            self._last_summary = time.monotonic()
        if self._bar is not None:
            text = "" if self.postfix is None else self.postfix(group, self.records)
            self._bar.advance(self._count(group) - before, text)

    def _remember(self, records: Sequence[dict]) -> None:
        self.records.extend(records)
        for r in records:
            key = self.groups[0].key if self.key_field is None else r[self.key_field]
            self.latest.setdefault(key, {})[int(r["index"])] = r

    def _records_of(self, group: Group) -> Mapping[int, dict]:
        return self.latest.get(group.key, {})

    def _count(self, group: Group) -> int:
        return group.count(self._records_of(group))
