"""The paper's experiments (docs/method.md §7) as pure functions of explicit settings.

An experiment is a grid of :class:`Setting` cells (size, covariance, signal, noise
family, activation, search). One *trial* is one image pair tested by every requested
method; it is a function of ``(setting, index)`` only (:func:`trial_data`), so any
trial can be reproduced on its own, whatever the batch it ran in. Trials run in batches
of images sharded over all JAX devices (:func:`device_mesh`, :func:`run_batch`), their
records are appended to ``trials.jsonl`` as they finish (a killed run loses nothing and
``resume=True`` continues), and :func:`summarize` turns them into rejection rates with
99% Clopper-Pearson intervals, written as ``summary.json``, ``summary.md`` and PNG plots
by :func:`run_experiment`.

Modules, one concern each:

- ``spec``: the grid (:class:`Setting`, :class:`ExperimentSpec`, :func:`default_spec`)
- ``noise``: non-Gaussian noise families at a Wasserstein-1 distance
- ``trials``: the data of one trial, the models, sharding, :func:`run_batch`
- ``summary``: rates, intervals and the summary table
- ``plots``: the PNG plots
- ``files``: the records file, the directory lock, provenance
- ``pool``: worker processes and the command line's device policy
- ``runner``: a resumable scheduler of batches (:class:`Runner`), shared with
  ``sijax evaluate``
- ``driver``: :func:`run_experiment`, the experiments on the runner
"""

from sijax.experiments.driver import (
    SettingBatches,
    SettingTrials,
    run_experiment,
    write_summary,
)
from sijax.experiments.files import (
    LOCK_FILE,
    TRIALS_FILE,
    append_records,
    exclusive,
    experiment_meta,
    git_commit,
    machine,
    read_records,
    read_trials,
)
from sijax.experiments.noise import (
    NOISE_FAMILIES,
    noise_parameter,
    sample_noise,
    wasserstein1_to_normal,
)
from sijax.experiments.plots import write_plots
from sijax.experiments.pool import (
    SINGLE_THREAD_FLAGS,
    auto_workers,
    usable_cores,
    use_cpu_devices,
    worker_pool,
)
from sijax.experiments.runner import EveryIndex, Group, Runner
from sijax.experiments.spec import (
    EXPERIMENTS,
    METHODS,
    ExperimentSpec,
    Setting,
    default_spec,
)
from sijax.experiments.summary import (
    CONFIDENCE,
    SummaryRecord,
    clopper_pearson,
    latest_records,
    null_p_values,
    summarize,
    summary_markdown,
)
from sijax.experiments.trials import (
    TrialData,
    device_mesh,
    gather,
    load_models,
    run_batch,
    shard,
    trial_data,
    with_activation,
)

__all__ = [
    "CONFIDENCE",
    "EXPERIMENTS",
    "LOCK_FILE",
    "METHODS",
    "NOISE_FAMILIES",
    "SINGLE_THREAD_FLAGS",
    "TRIALS_FILE",
    "EveryIndex",
    "ExperimentSpec",
    "Group",
    "Runner",
    "Setting",
    "SettingBatches",
    "SettingTrials",
    "SummaryRecord",
    "TrialData",
    "append_records",
    "auto_workers",
    "clopper_pearson",
    "default_spec",
    "device_mesh",
    "exclusive",
    "experiment_meta",
    "gather",
    "git_commit",
    "latest_records",
    "load_models",
    "machine",
    "noise_parameter",
    "null_p_values",
    "read_records",
    "read_trials",
    "run_batch",
    "run_experiment",
    "sample_noise",
    "shard",
    "summarize",
    "summary_markdown",
    "trial_data",
    "usable_cores",
    "use_cpu_devices",
    "wasserstein1_to_normal",
    "with_activation",
    "worker_pool",
    "write_plots",
    "write_summary",
]
