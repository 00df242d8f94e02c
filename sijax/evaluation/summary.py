"""What ``sijax evaluate`` concludes from its per-image records.

``summary.json`` holds the detection metrics of the score maps against the ground
truth (pixel AUROC, AUPRO, image AUROC, the image score being the maximum of its
map), the rejection rates of the selective and the naive test per kind ("good":
the real-data type I error; each defect: the power) with 99% Clopper-Pearson
intervals, and the images that Benjamini-Hochberg rejects at the chosen false
discovery rate (over every image's selective p-value; an image without a region
counts as p = 1, it has nothing to reject).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from sijax.evaluation.metrics import aupro, benjamini_hochberg, roc_auc, storey_bh
from sijax.experiments.summary import clopper_pearson


def _rate(flags: Sequence[bool]) -> dict:
    k, n = int(sum(flags)), len(flags)
    lo, hi = clopper_pearson(k, n)
    return {"rejected": k, "tested": n, "rate": k / n if n else None,
            "interval_99": [lo, hi] if n else None}


def conservative_p(record: dict) -> float:
    """The p-value a selection over images may use: sup_p of a tested image (the
    exact selective p-value when the search pinned it down, an upper bound of it
    otherwise), 1 for an image without a test."""
    if record["status"] not in ("ok", "max_pieces") or record["sup_p"] is None:
        return 1.0
    return float(record["sup_p"])


def p_label(record: dict, alpha: float) -> str:
    """A short, honest label of an image's selective p-value: the value when the
    search pinned it down, else its side of alpha when decided, else its bounds."""
    lo, hi = record["inf_p"], record["sup_p"]
    if record["status"] not in ("ok", "max_pieces") or hi is None:
        return "no test"
    if hi - lo <= 1e-3 * max(hi, 1e-300):
        return f"p={record['p_value']:.2g}"
    if hi < alpha:
        return f"p<{alpha:g}"
    if lo >= alpha:
        return f"p\u2265{alpha:g}"
    return f"p\u2208[{lo:.2g}, {hi:.2g}]"


def summarize_images(records: Sequence[dict], score_maps: np.ndarray | None,
                     masks: np.ndarray | None, *, alpha: float,
                     fdr: float) -> dict:
    """The summary of an evaluation.

    Args:
      records: the per-image records (``images.jsonl``), in image order.
      score_maps: (N, H, W) float score maps in the same order, or None.
      masks: (N, H, W) bool ground truth (all False for good images), or None.
      alpha: level of the per-image tests.
      fdr: the false discovery rate of the Benjamini-Hochberg selection.
    """
    kinds = sorted({r["kind"] for r in records}, key=lambda k: (k != "good", k))
    out: dict = {"images": len(records), "alpha": alpha, "fdr": fdr}
    statuses: dict = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    out["statuses"] = statuses
    per_kind = {}
    for kind in kinds:
        rs = [r for r in records if r["kind"] == kind]
        tested = [r for r in rs if r["status"] in ("ok", "max_pieces")]
        per_kind[kind] = {
            "images": len(rs),
            "with_region": len(tested),
            # Rates among images with a region (the test's own level), and among
            # all images (what a user sees per image).
            "selective": _rate([r["reject"] for r in tested]),
            "naive": _rate([r["naive_reject"] for r in tested]),
            "selective_all_images": _rate([r["reject"] for r in rs]),
            "naive_all_images": _rate([r["naive_reject"] for r in rs]),
            "mean_pieces": float(np.mean([r["pieces"] for r in tested]))
            if tested else None,
            "mean_seconds": float(np.mean([r["seconds"] for r in tested]))
            if tested else None,
        }
    out["kinds"] = per_kind
    # sup_p, not p_value: a search that stopped early (decision termination,
    # max_pieces) knows p only up to [inf_p, sup_p], and a point inside those bounds
    # may be below the exact p-value. sup_p is never below it, so the selection over
    # the images keeps its rate (sup_p = p_value when the search pinned p down).
    p = np.array([conservative_p(r) for r in records])
    bh = benjamini_hochberg(p, fdr) if len(p) else np.zeros(0, bool)
    st = storey_bh(p, fdr) if len(p) else np.zeros(0, bool)
    out["bh_rejected"] = [records[i]["path"] for i in np.nonzero(bh)[0]]
    out["storey_rejected"] = [records[i]["path"] for i in np.nonzero(st)[0]]
    good = np.array([r["kind"] == "good" for r in records])
    if good.any() and (~good).any():
        for name, rej in (("bh", bh), ("storey", st)):
            out[f"{name}_false_discovery_proportion"] = (
                float((rej & good).sum() / max(1, rej.sum())))
    if score_maps is not None and masks is not None and len(records):
        labelled = np.array([r["kind"] != "unlabelled" for r in records])
        if labelled.all():
            # None where a class is absent (no good or no defect images or
            # pixels): NaN is not JSON, and strict readers refuse summary.json.
            out["pixel_auroc"] = _defined(roc_auc(score_maps, masks))
            out["aupro"] = _defined(aupro(score_maps, masks))
            out["image_auroc"] = _defined(roc_auc(
                score_maps.reshape(len(records), -1).max(1), ~good))
    return out


def _defined(metric: float) -> float | None:
    return None if np.isnan(metric) else metric


def summary_markdown(summary: dict) -> str:
    """A short table of the summary for the terminal and summary.md."""
    lines = [f"{summary['images']} images; alpha {summary['alpha']}",
             "", "| kind | images | with region | selective | naive |",
             "|---|---|---|---|---|"]
    for kind, k in summary["kinds"].items():
        def fmt(d):
            if not d["tested"]:
                return "-"
            lo, hi = d["interval_99"]
            return f"{d['rate']:.3f} [{lo:.3f}, {hi:.3f}]"

        lines.append(f"| {kind} | {k['images']} | {k['with_region']} | "
                     f"{fmt(k['selective'])} | {fmt(k['naive'])} |")
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        if key in summary:
            v = summary[key]
            lines.append(f"\n{key}: " + (
                "undefined (needs both good and defect images)" if v is None
                else f"{v:.4f}"))
    lines.append(f"\nBenjamini-Hochberg at FDR {summary['fdr']}: "
                 f"{len(summary['bh_rejected'])} images rejected")
    if summary.get("images_with_warnings"):
        lines.append(f"\n{summary['images_with_warnings']} images with input "
                     "warnings (unlike the training images: see 'warnings' in "
                     "images.jsonl)")
    return "\n".join(lines) + "\n"


def plot_overview(path: str | os.PathLike, records: Sequence[dict], images,
                  score_maps, masks, regions, *, alpha: float,
                  max_images: int = 24) -> None:
    """One page: a sample of images (up to ``max_images``, taking defect and good
    images in turn, rejected ones first) with the detected region (red) and the
    ground truth (green), their p-values, the distribution of the good images'
    selective and naive p-values, and the rejection rate per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(records)
    order = sorted(range(n), key=lambda i: (not records[i]["reject"],
                                            records[i]["kind"] == "good", i))
    by_kind: dict = {}
    for i in order:
        by_kind.setdefault(records[i]["kind"], []).append(i)
    pick = []
    while len(pick) < min(max_images, n):
        for lst in by_kind.values():
            if lst and len(pick) < max_images:
                pick.append(lst.pop(0))
    cols = 8
    rows = -(-len(pick) // cols)
    fig = plt.figure(figsize=(2 * cols, 2.2 * rows + 3.2))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[2.2] * rows + [3.2])
    for j, i in enumerate(pick):
        ax = fig.add_subplot(grid[j // cols, j % cols])
        x = np.asarray(images[i])
        shown = x[:, :, 0] if x.shape[2] == 1 else (x - x.min()) / max(
            1e-12, x.max() - x.min())
        ax.imshow(shown, cmap="gray" if x.shape[2] == 1 else None)
        if regions[i].any():
            ax.contour(regions[i], levels=[0.5], colors="red", linewidths=0.8)
        if masks is not None and masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        r = records[i]
        star = " *" if r["reject"] else ""
        ax.set_title(f"{r['kind']}\n{p_label(r, alpha)}{star}",
                     fontsize=7, color="red" if r["reject"] else "black")
        ax.set_axis_off()
    ax = fig.add_subplot(grid[rows, : cols // 2])
    good = [r for r in records if r["kind"] == "good"
            and r["status"] in ("ok", "max_pieces")]
    if good:
        for key, lab in (("sup_p", "selective (upper bound sup_p)"),
                         ("naive_p_value", "naive")):
            v = np.sort([r[key] for r in good if r[key] is not None])
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=lab)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("p-value of good images with a region")
        ax.set_ylabel("empirical CDF")
        ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[rows, cols // 2:])
    kinds = sorted({r["kind"] for r in records}, key=lambda k: (k != "good", k))
    xs = np.arange(len(kinds))
    for shift, key, lab in ((-0.2, "reject", "selective"),
                            (0.2, "naive_reject", "naive")):
        rates = []
        for k in kinds:
            t = [r[key] for r in records if r["kind"] == k
                 and r["status"] in ("ok", "max_pieces")]
            rates.append(np.mean(t) if t else 0.0)
        ax.bar(xs + shift, rates, width=0.4, label=lab)
    ax.axhline(alpha, color="k", ls=":", lw=0.8)
    ax.set_xticks(xs, kinds, rotation=30, fontsize=8)
    ax.set_ylabel(f"rejection rate at {alpha:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_image_scores(path: str | os.PathLike, records: Sequence[dict],
                      scores: np.ndarray, auroc: float | None) -> None:
    """Histogram of the image-level scores per kind (image-level detectors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in records}, key=lambda k: (k != "good", k))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # A few far outliers would squeeze the rest into one bar: scores above the
    # 95th percentile go to the last bin.
    top = float(np.quantile(scores, 0.95))
    shown = np.minimum(scores, top)
    bins = np.histogram_bin_edges(shown, bins=min(40, max(5, len(scores) // 5)))
    for kind in kinds:
        sel = np.array([r["kind"] == kind for r in records])
        ax.hist(shown[sel], bins=bins, alpha=0.5, label=f"{kind} ({sel.sum()})")
    clipped = int((scores > top).sum())
    ax.set_xlabel("image score (higher: more anomalous)"
                  + (f"; {clipped} above {top:.3g} in the last bin" if clipped else ""))
    ax.set_ylabel("images")
    title = "image scores" + ("" if auroc is None else f", image AUROC {auroc:.3f}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
