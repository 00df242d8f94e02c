"""``sijax experiment``: an :class:`ExperimentSpec` run on the :class:`Runner`.

Each setting is a group of the runner (its key: ``setting.key``), running its next
untried trial indices until ``spec.trials`` valid trials are recorded (or
``spec.max_factor * spec.trials`` attempts); its batches are :func:`run_batch` on
the setting's model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence, Set
from typing import Any

from sijax.errors import InputError
from sijax.experiments.files import TRIALS_FILE, experiment_meta
from sijax.experiments.plots import write_plots
from sijax.experiments.runner import Runner
from sijax.experiments.spec import ExperimentSpec, Setting
from sijax.experiments.summary import (
    SummaryRecord,
    fdr_markdown,
    fdr_rows,
    null_p_values,
    summarize,
    summary_markdown,
)
from sijax.experiments.trials import device_mesh, load_models, run_batch


@dataclasses.dataclass(frozen=True)
class SettingTrials:
    """The trials of one setting, as a group of the :class:`Runner`.

    A trial is done when it has no region (status 1, skipped) or has a record of
    every method; the setting is finished at ``trials`` valid done trials or
    ``max_factor * trials`` done ones.
    """

    setting: Setting
    trials: int
    methods: tuple[str, ...]
    max_factor: int

    @property
    def key(self) -> str:
        return self.setting.key

    @property
    def total(self) -> int:
        return self.trials

    def done(self, records: Mapping[int, dict]) -> tuple[set[int], int]:
        """The done indices and how many of them are valid."""
        done = {
            i
            for i, r in records.items()
            if not r["valid"] or all(m in r["methods"] for m in self.methods)
        }
        return done, sum(1 for i in done if records[i]["valid"])

    def count(self, records: Mapping[int, dict]) -> int:
        return min(self.done(records)[1], self.trials)

    def next_indices(
        self, records: Mapping[int, dict], busy: Set[int], batch: int
    ) -> list[int]:
        done, valid = self.done(records)
        limit = self.max_factor * self.trials
        # Running trials count as valid until they end (no surplus batches).
        if valid + len(busy) >= self.trials or len(done | busy) >= limit:
            return []
        # Always a full batch of fresh indices: padding would cost the same.
        idx = [i for i in range(limit) if i not in done and i not in busy]
        return idx[:batch]


@dataclasses.dataclass
class SettingBatches:
    """``(group, indices, report) -> records``: :func:`run_batch` of a
    :class:`SettingTrials` on its setting's model (picklable: each worker process
    of a run holds one copy, with the models)."""

    models: dict[tuple[str, str], Any]
    methods: tuple[str, ...]
    batch: int
    permutations: int
    engine: str
    mesh: Any = None
    compiled: set = dataclasses.field(default_factory=set)

    def __call__(self, group: SettingTrials, indices, report=None) -> list[dict]:
        s = group.setting
        return run_batch(
            self.models[(s.checkpoint, s.activation)], s, indices, self.methods,
            batch=self.batch, mesh=self.mesh, permutations=self.permutations,
            compiled=self.compiled, progress=report, engine=self.engine,
        )  # fmt: skip


def _progress_text(rows: Sequence[SummaryRecord], setting: Setting) -> str:
    here = [
        r
        for r in rows
        if (r.size, r.covariance, r.delta, r.noise, r.distance, r.activation)
        == (
            setting.size,
            setting.covariance,
            setting.delta,
            setting.noise,
            setting.distance,
            setting.activation,
        )
    ]
    rates = " ".join(f"{r.method}={r.rate:.3f}" for r in here if r.trials)
    return f"{setting.label()}: {rates}"


def write_summary(
    out_dir: str, spec: ExperimentSpec, records: Sequence[dict], models
) -> list[SummaryRecord]:
    """summary.json, experiment.json, summary.md and the plots; returns the rows."""
    rows = summarize(spec, records)
    meta = experiment_meta(spec, models)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump([r.to_json() for r in rows], f, indent=1)
    with open(os.path.join(out_dir, "experiment.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    fdr = fdr_rows(spec, records)
    if fdr:
        with open(os.path.join(out_dir, "fdr.json"), "w") as f:
            json.dump(fdr, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(rows, meta) + fdr_markdown(fdr))
    write_plots(out_dir, spec, rows, null_p_values(spec, records))
    return rows


def run_experiment(
    spec: ExperimentSpec,
    out_dir: str,
    *,
    resume: bool = False,
    progress: bool = True,
    mesh=None,
    models=None,
    max_batches: int | None = None,
    summary_every: float = 300.0,
    workers: int = 1,
) -> list[SummaryRecord]:
    """Runs ``spec``, appending trial records to ``out_dir/trials.jsonl``.

    Settings take turns batch by batch (so a partial run has every setting), each
    running its next untried indices until ``spec.trials`` valid trials are recorded
    (or ``spec.max_factor * spec.trials`` attempts). Then writes ``summary.json`` (a
    list of :class:`SummaryRecord` dicts), ``experiment.json`` (spec, models,
    machine, commit), ``summary.md`` and PNG plots. Only process 0 writes files.

    Args:
      spec: the experiment.
      out_dir: output directory.
      resume: continue from the records in ``out_dir`` (required if there are some).
      progress: show a tqdm bar with the running estimates.
      mesh: a :func:`device_mesh` (default: all devices) or False for one device.
      models: {(checkpoint, activation): model} to reuse loaded models.
      max_batches: stop after this many batches (the run can be resumed); 0 only
        rewrites the summary and plots from the records in ``out_dir``.
      summary_every: also rewrite the summary files every this many seconds, so a
        long run that is killed leaves an up-to-date partial summary.
      workers: > 1: that many worker processes on this host (spawned; each loads
        the models and runs whole batches on one single-threaded CPU device, no
        mesh) while this process schedules and writes. For the propagate engine,
        whose searches run one image at a time, one worker per core. The records
        are the same as with one process; batches finish in any order. Each
        worker gets a copy of the models (``models`` or the loaded checkpoints).

    Returns:
      The summary rows.

    Raises:
      InputError: records present without ``resume``; another run writing
        ``out_dir`` (see :func:`sijax.experiments.files.exclusive`); bad settings
        or models.
    """
    settings = spec.settings()
    models = load_models(settings) if models is None else models
    missing = {(s.checkpoint, s.activation) for s in settings} - set(models)
    if missing:
        raise InputError(f"models has no model for {sorted(missing)}")
    if workers > 1:
        mesh = False
    mesh = device_mesh() if mesh is None else (mesh or None)
    ndev = 1 if mesh is None else mesh.size
    batch = -(-spec.batch // ndev) * ndev
    groups = [
        SettingTrials(s, spec.trials, spec.methods, spec.max_factor) for s in settings
    ]
    batches = SettingBatches(
        models, spec.methods, batch, spec.permutations, spec.engine, mesh
    )

    def postfix(group: SettingTrials, records: list[dict]) -> str:
        return _progress_text(summarize(spec, records), group.setting)

    runner = Runner(
        groups, batches, out_dir, batch=batch, records_file=TRIALS_FILE,
        key_field="setting", resume=resume, workers=workers, progress=progress,
        desc=spec.experiment, unit="trial", postfix=postfix,
        summary=lambda records: write_summary(out_dir, spec, records, models),
        summary_every=summary_every, max_batches=max_batches,
        what="sijax experiment",
    )  # fmt: skip
    return summarize(spec, runner.run())
