"""Files a DAL test leaves behind: report.json, the arrays, and report.png."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform

import numpy as np

from sijax.status import Status


def _versions() -> dict:
    import flax
    import jax

    import sijax

    return {
        "sijax": sijax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": str(jax.devices()[0]),
    }


def _clean(v):
    """JSON-safe: NaN/inf become None/strings, tuples lists."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, (list, tuple)):
        return [_clean(u) for u in v]
    if isinstance(v, dict):
        return {k: _clean(u) for k, u in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


def write_report(
    out_dir,
    result,
    x,
    x_ref,
    *,
    config,
    checkpoint: str | None,
    extra: dict | None = None,
) -> dict:
    """Writes report.json, mask.npy, score_map.npy, reconstruction.npy, report.png,
    and with per-component tests components.npy (the labels: 0 outside the region,
    k on component k).

    Args:
      out_dir: directory (created).
      result: a :class:`sijax.detect.dal.TestResult`.
      x, x_ref: (H, W, C) test and reference images (x_ref may be None).
      config: the DALConfig used.
      checkpoint: path of the model's checkpoint.
      extra: more fields for report.json (sigma, seed, image paths, ...).

    Returns:
      The report as a dict.
    """
    os.makedirs(out_dir, exist_ok=True)
    report = {
        "result": result.to_json(),
        "config": dataclasses.asdict(config),
        "checkpoint": checkpoint,
        "versions": _versions(),
        **(extra or {}),
    }
    report = _clean(report)
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    np.save(os.path.join(out_dir, "mask.npy"), result.mask)
    np.save(os.path.join(out_dir, "score_map.npy"), result.score_map)
    np.save(os.path.join(out_dir, "reconstruction.npy"), result.reconstruction)
    if result.components is not None:
        labels = np.zeros(result.mask.shape, np.int32)
        for c in result.components:
            labels[c.mask] = c.label
        np.save(os.path.join(out_dir, "components.npy"), labels)
    plot_report(
        os.path.join(out_dir, "report.png"),
        result,
        x,
        x_ref,
        threshold=config.threshold,
    )
    return report


def _fmt_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def _title(result) -> str:
    """The title of report.png: the selective p-value as it is known (``p_text``:
    never a point inside wider bounds), the confidence interval if any, the naive
    p-value, z, the region's size and the status."""
    if result.status == Status.NO_REGION:
        return "no region detected: nothing to test"
    head = (
        f"selective {result.p_text()}   naive p = {_fmt_p(result.naive_p_value)}   "
        f"z = {result.stat:.3f}   |M| = {int(result.mask.sum())}   ({result.status})"
    )
    ci = result.confidence_text()
    head = head if ci is None else head + "\nmean difference " + ci
    if result.components:
        parts = [
            f"#{c.label}: {c.size} px, p = {_fmt_p(c.p_value)}, adj. "
            f"{_fmt_p(c.adjusted_p)}" for c in result.components[:6]
        ]  # fmt: skip
        more = len(result.components) - 6
        head += "\ncomponents (adjusted within the image): " + "; ".join(parts)
        head += f"; ... ({more} more)" if more > 0 else ""
    return head


# Colours of the components' outlines in report.png, cycled.
_COMPONENT_COLOURS = ("cyan", "yellow", "lime", "magenta", "orange", "deepskyblue")


def _outline(ax, result) -> None:
    """The region's outline, or one outline and label per component."""
    if result.components:
        for k, c in enumerate(result.components):
            colour = _COMPONENT_COLOURS[k % len(_COMPONENT_COLOURS)]
            ax.contour(c.mask.astype(float), levels=[0.5], colors=colour,
                       linewidths=1.2)  # fmt: skip
            r, col = c.centroid()
            ax.text(col, r, str(c.label), color=colour, fontsize=9,
                    fontweight="bold", ha="center", va="center")  # fmt: skip
    elif np.any(result.mask):
        ax.contour(
            result.mask.astype(float), levels=[0.5], colors="cyan", linewidths=1.2
        )


def _plot_line(ax, result) -> None:
    """The test along the line: log10 of the N(0, 1) density over the searched range,
    with Zset (the z whose detected region equals the observed one) shaded, the
    searched range's ends and the observed statistic marked."""
    from scipy import stats

    (lo, hi), *_ = result.searched_intervals
    z_obs = float(result.stat)
    pad = 0.05 * max(hi - lo, 1e-3)
    a = lo - pad if np.isfinite(lo) else min(z_obs, 0.0) - 5.0
    b = hi + pad if np.isfinite(hi) else max(z_obs, 0.0) + 5.0
    z = np.linspace(a, b, 800)
    ax.plot(z, stats.norm.logpdf(z) / np.log(10), color="0.3", lw=1)
    for k, (u, v) in enumerate(result.truncated_intervals):
        ax.axvspan(
            max(u, a),
            min(v, b),
            color="cyan",
            alpha=0.5,
            lw=0,
            label="Zset: same region" if k == 0 else None,
        )
    for end, side in ((lo, (a, lo)), (hi, (hi, b))):
        if np.isfinite(end):
            ax.axvspan(*side, color="0.85", lw=0)
    ax.axvline(z_obs, color="crimson", lw=1.2, label=f"z_obs = {z_obs:.3f}")
    if result.alternative == "abs":
        ax.axvline(-z_obs, color="crimson", lw=1.2, ls="--", label="-z_obs")
    ax.set_xlim(a, b)
    ax.set_xlabel(
        f"z along the line (searched [{lo:.3f}, {hi:.3f}] in "
        f"{result.search_count} pieces; grey: not searched)",
        fontsize=8,
    )
    ax.set_ylabel("log10 N(0,1) density", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower center", ncols=3, frameon=False)


def plot_report(path, result, x, x_ref, *, threshold: float) -> None:
    """Input, reference, reconstruction and score map with the region outlined
    (each component in its own colour, labelled by its number, when the components
    were tested), and below them the truncation set along the line (when there is
    a region)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(img):
        img = np.asarray(img)
        return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img

    panels = [("input X", show(x))]
    if x_ref is not None:
        panels.append(("reference", show(x_ref)))
    panels += [
        ("reconstruction D(X)", show(result.reconstruction)),
        (f"score (region: > {threshold:.4g})", result.score_map),
    ]
    line = result.status != Status.NO_REGION and bool(result.searched_intervals)
    fig = plt.figure(figsize=(3.2 * len(panels), 5.8 if line else 3.6))
    grid = fig.add_gridspec(
        2 if line else 1, len(panels), height_ratios=((3.6, 2.0) if line else None)
    )
    axes = [fig.add_subplot(grid[0, k]) for k in range(len(panels))]
    lim = max(float(np.max(np.abs(p[1]))) for p in panels[:-1]) or 1.0
    for ax, (title, img) in zip(axes, panels, strict=True):
        last = ax is axes[-1]
        im = ax.imshow(
            img,
            cmap="magma" if last else "gray",
            vmin=None if last else -lim,
            vmax=None if last else lim,
            interpolation="nearest",
        )
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        _outline(ax, result)
        if last:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if line:
        _plot_line(fig.add_subplot(grid[1, :]), result)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
