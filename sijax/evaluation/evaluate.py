"""``sijax evaluate``: the DAL test of every test image of a data set.

For an MVTec AD category root (or a folder/stack, whose images are all tested as
"unlabelled"), every test image is preprocessed as the model records, tested
against the reference (by default the template and the noise model stored with a
data-trained model) and its record appended to ``OUT/images.jsonl`` as it
finishes; its score map and region go to ``OUT/maps/INDEX.npz`` and, unless
switched off, its report picture to ``OUT/images/INDEX_KIND_NAME/``. The run is
the experiments' :class:`sijax.experiments.runner.Runner` with one group, every
index once: resumable (``resume=True`` redoes nothing that finished), spread over
worker processes (one per core on a CPU), with a progress bar. ``summary.json``,
``summary.md`` and ``overview.png`` (see :mod:`sijax.evaluation.summary`) are
rewritten every few minutes and at the end.

Image i's sampler noises are a function of (seed, i) only, so any image's result
can be reproduced on its own with ``sijax test --seed`` semantics of
:func:`sijax.evaluation.images.image_key`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np

from sijax.data.datasets import data_source
from sijax.detect.dal import DALConfig
from sijax.errors import InputError, InputWarning, ensure_output_dir
from sijax.evaluation.images import (
    Reference,
    image_key,
    model_input,
    noted_input,
    run_image_score,
    run_image_test,
)
from sijax.evaluation.metrics import roc_auc
from sijax.evaluation.summary import (
    plot_image_scores,
    plot_overview,
    summarize_images,
    summary_markdown,
)
from sijax.experiments.files import read_records

RECORDS_FILE = "images.jsonl"
# evaluation.json entries that identify the contents behind the paths.
FINGERPRINTS = ("weights_sha256", "data_sha256")


def evaluation_items(dataset, kinds: Sequence[str] | None = None,
               max_per_kind: int | None = None) -> list:
    """The items ``evaluate`` tests: the test split (all items of a folder or stack
    without one, as "unlabelled"), optionally only ``kinds`` and at most
    ``max_per_kind`` of each kind (the first by name)."""
    items = list(dataset.test)
    if not items and dataset.layout == "mvtec":
        # Never fall back to train/good: a model tested on its own training
        # images looks better than it is.
        raise InputError(f"{dataset.path}: no test images in test/good or "
                         "test/<defect> (the training images of train/good are "
                         "never used as test images)")
    if not items:
        items = [it._replace(split="test", kind="unlabelled") for it in dataset.items]
    if kinds:
        unknown = sorted(set(kinds) - {it.kind for it in items})
        if unknown:
            raise InputError(f"no test images of kind {unknown} in {dataset.path}; "
                             f"kinds: {sorted({it.kind for it in items})}")
        items = [it for it in items if it.kind in kinds]
    if max_per_kind is not None:
        if max_per_kind < 1:
            raise InputError(f"--max-per-kind must be >= 1; got {max_per_kind}")
        seen: dict = {}
        kept = []
        for it in items:
            seen[it.kind] = seen.get(it.kind, 0) + 1
            if seen[it.kind] <= max_per_kind:
                kept.append(it)
        items = kept
    if not items:
        raise InputError(f"no test images in {dataset.path}")
    return items


@dataclasses.dataclass
class ImageBatch:
    """The batch function of an evaluation (picklable: each worker process holds
    one copy of the model, the reference and the data set's index)."""

    model: object
    reference: Reference
    dataset: object
    items: list
    config: DALConfig
    seed: int
    out_dir: str
    checkpoint: str
    reports: bool = True

    def __call__(self, group, indices, report=None) -> list[dict]:
        from sijax.detect.report import write_report

        out = []
        for i in indices:
            item = self.items[i]
            raw = self.dataset.read(item)
            x, notes = noted_input(self.model, raw, item)
            record = {"index": i, "path": item.source, "name": item.name,
                      "kind": item.kind, "warnings": notes}
            if not self.model.detector.has_region:
                # An image-level detector (DiffPath): a score, no region to test.
                out.append({**record, **run_image_score(
                    self.model, x, config=self.config, key=image_key(self.seed, i))})
                continue
            rec, res = run_image_test(self.model, x, self.reference,
                                      config=self.config,
                                      key=image_key(self.seed, i))
            np.savez_compressed(map_path(self.out_dir, i),
                                score=res.score_map.astype(np.float32),
                                region=res.mask)
            record.update(rec)
            if self.reports:
                folder = os.path.join(self.out_dir, "images", _slug(i, item))
                write_report(folder, res, x, self.reference.x_ref,
                             config=self.config, checkpoint=self.checkpoint,
                             extra={"image": item.source, "kind": item.kind,
                                    "sigma": self.reference.name, "index": i})
            out.append(record)
        return out


def _slug(i: int, item) -> str:
    base = os.path.splitext(item.name.replace("/", "_"))[0]
    return f"{i:05d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:60]


def map_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "maps", f"{index:05d}.npz")


def evaluate(model, dataset, reference: Reference, out_dir: str, *,
             config: DALConfig, checkpoint: str = "", seed: int = 0,
             fdr: float = 0.05, kinds: Sequence[str] | None = None,
             max_per_kind: int | None = None, resume: bool = False,
             workers: int = 1, progress: bool = True, reports: bool = True,
             summary_every: float = 120.0, max_batches: int | None = None) -> dict:
    """Tests every test image of ``dataset``; returns the summary.

    Args:
      model: a loaded model (a data-trained one applies its preprocessing).
      dataset: ``sijax.data.open_dataset(path)``.
      reference: from :func:`sijax.evaluation.images.resolve_reference`.
      out_dir: where images.jsonl, maps/, images/, summary.* and overview.png go.
      config: the DAL options (``alpha``: the per-image level).
      checkpoint: the model's path, recorded in the reports.
      seed: image i's noises come from ``image_key(seed, i)``.
      fdr: the Benjamini-Hochberg rate over the images.
      kinds, max_per_kind: test only these kinds, at most this many of each.
      resume: continue a killed run (required when ``out_dir`` holds records).
      workers: worker processes (1: this process).
      progress: show a progress bar.
      reports: write a report picture per image.
      summary_every: rewrite the summary files every this many seconds.
      max_batches: stop after this many batches (resumable).

    Raises:
      InputError: no test images, records without ``resume``, another run in
        ``out_dir``, a reference of another shape.
    """
    from sijax.experiments.runner import EveryIndex, Runner

    items = evaluation_items(dataset, kinds, max_per_kind)
    if reference.x_ref is not None and tuple(reference.x_ref.shape) != tuple(
            model.image_shape):
        raise InputError(f"reference shape {reference.x_ref.shape} does not match "
                         f"the model's {model.image_shape}")
    ensure_output_dir(out_dir)
    os.makedirs(os.path.join(out_dir, "maps"), exist_ok=True)
    meta = {"checkpoint": checkpoint, "data": dataset.path, "layout": dataset.layout,
            "sigma": reference.name, "seed": seed, "fdr": fdr,
            "config": dataclasses.asdict(config), "images": len(items),
            "detector": model.config.detector,
            "detector_options": dict(model.config.detector_options),
            # Paths alone let a resume mix results of a retrained model or of
            # replaced images with the earlier ones.
            "weights_sha256": model.weights_sha256(),
            "data_sha256": data_source(dataset.path)["sha256"]}
    batch_fn = ImageBatch(model, reference, dataset, items, config, seed, out_dir,
                          checkpoint, reports)

    def write_summary(records):
        write_evaluation_summary(out_dir, dataset, items, records, model=model,
                                 reference=reference, alpha=config.alpha, fdr=fdr)

    runner = Runner([EveryIndex("images", len(items))], batch_fn, out_dir, batch=1,
                    records_file=RECORDS_FILE, resume=resume, workers=workers,
                    progress=progress, desc="evaluate", unit="image",
                    postfix=_postfix, summary=write_summary,
                    summary_every=summary_every, max_batches=max_batches,
                    what="sijax evaluate",
                    claim=functools.partial(claim_output, out_dir, RECORDS_FILE,
                                            "evaluation.json", meta, resume,
                                            "an evaluation"))
    runner.run()
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def claim_output(out_dir: str, records_file: str, meta_file: str, meta: dict,
                 resume: bool, what: str) -> None:
    """Checks that a run may write to ``out_dir`` and records its settings there.

    Records without ``resume`` are refused, and so is a resume of records made with
    other settings (:func:`changed_settings`); only then is ``meta`` written, so a
    refused call leaves the stored settings as they were (a call refused for want of
    ``--resume`` once overwrote them, and the resume that followed mixed records of
    two settings). Called as the :class:`~sijax.experiments.runner.Runner`'s
    ``claim``, under the directory's lock: a run refused because another one is
    writing ``out_dir`` leaves that run's settings alone too.

    Raises:
      InputError: as above.
    """
    meta = json.loads(json.dumps(meta, default=str))
    records = os.path.join(out_dir, records_file)
    if not resume and read_records(records):
        raise InputError(f"{records} already holds records: pass --resume to "
                         "continue, or choose another --out")
    meta_path = os.path.join(out_dir, meta_file)
    if resume and os.path.isfile(meta_path):
        with open(meta_path) as f:
            changed = changed_settings(json.load(f), meta)
        if changed:
            raise InputError(f"{out_dir} holds {what} with other settings (stored, "
                             f"given): {changed}; choose another --out")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)


def changed_settings(had: dict, given: dict) -> dict:
    """The settings of ``given`` that differ from the stored ``had``, as (stored,
    given). A DALConfig field that the stored run predates counts as unchanged
    when it has its default value (the stored run computed without it), so a run
    resumes across versions that only add options."""
    defaults = {f.name: f.default for f in dataclasses.fields(DALConfig)}
    # Runs made before the detectors existed were the DAL detector's.
    before = {"detector": "dal", "detector_options": {}}
    # Fingerprints a stored run may predate: unknown there, so not compared.
    unknown = {k for k in FINGERPRINTS if k not in had}
    changed = {k: (had.get(k), v) for k, v in given.items()
               if k != "config" and k not in unknown
               and had.get(k, before.get(k)) != v}
    stored, now = had.get("config") or {}, given.get("config") or {}
    diff = {k: (stored.get(k), v) for k, v in now.items()
            if (stored[k] != v if k in stored else v != defaults.get(k))}
    diff.update({k: (v, None) for k, v in stored.items() if k not in now})
    if diff:
        changed["config"] = diff
    return changed


def _postfix(group, records) -> str:
    tested = [r for r in records if r["status"] in ("ok", "max_pieces")]
    good = [r for r in tested if r["kind"] == "good"]
    text = f"{len(tested)} with a region"
    if good:
        text += (f", good rejected {np.mean([r['reject'] for r in good]):.3f} "
                 f"(naive {np.mean([r['naive_reject'] for r in good]):.3f})")
    return text


def latest_by_index(records: Sequence[dict]) -> list[dict]:
    """One record per index (the last written), in index order."""
    by = {}
    for r in records:
        by[r["index"]] = r
    return [by[i] for i in sorted(by)]


def write_evaluation_summary(out_dir: str, dataset, items, records, *, model,
                             reference, alpha: float, fdr: float) -> dict:
    """summary.json, summary.md and overview.png from the records so far."""
    records = latest_by_index(records)
    if not records:
        return {}
    if not model.detector.has_region:
        return _image_level_summary(out_dir, records, alpha=alpha, fdr=fdr,
                                    reference=reference)
    prep = model.preprocessing
    maps, regions, masks = [], [], []
    for r in records:
        with np.load(map_path(out_dir, r["index"])) as z:
            maps.append(z["score"])
            regions.append(z["region"])
        m = dataset.read_mask(items[r["index"]])
        masks.append(prep.resize_mask(m) if prep is not None else m)
    maps, regions, masks = np.stack(maps), np.stack(regions), np.stack(masks)
    summary = summarize_images(records, maps, masks, alpha=alpha, fdr=fdr)
    summary["sigma"] = reference.name
    summary["images_with_warnings"] = sum(bool(r.get("warnings")) for r in records)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))

    class Inputs:  # the images of the overview, read only when drawn
        def __getitem__(self, k):
            it = items[records[k]["index"]]
            with warnings.catch_warnings():  # said when the image was tested
                warnings.simplefilter("ignore", InputWarning)
                return model_input(model, dataset.read(it), it.name)

    plot_overview(os.path.join(out_dir, "overview.png"), records, Inputs(), maps,
                  masks, regions, alpha=alpha)
    return summary


def _image_level_summary(out_dir: str, records, *, alpha, fdr, reference) -> dict:
    """summary.json, summary.md and scores.png of an image-level detector: the
    image AUROC of its scores (good images against the rest), no tests."""
    summary = summarize_images(records, None, None, alpha=alpha, fdr=fdr)
    summary["sigma"] = reference.name
    scores = np.array([r["image_score"] for r in records], dtype=np.float64)
    good = np.array([r["kind"] == "good" for r in records])
    if good.any() and (~good).any() and all(r["kind"] != "unlabelled"
                                             for r in records):
        summary["image_auroc"] = roc_auc(scores, ~good)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    plot_image_scores(os.path.join(out_dir, "scores.png"), records, scores,
                      summary.get("image_auroc"))
    return summary
