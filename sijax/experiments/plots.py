"""Plots of an experiment's summary rows (type I error, power, pieces, robustness,
null QQ-plots), as PNG files."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from sijax.experiments.spec import ExperimentSpec
from sijax.experiments.summary import SummaryRecord


def _errorbar(ax, xs, rows, label, marker="o", shift=1.0):
    xs = np.asarray(xs, float) * shift  # methods side by side, not on top
    y = np.array([r.rate for r in rows], float)
    lo = np.array([r.ci_lo for r in rows], float)
    hi = np.array([r.ci_hi for r in rows], float)
    ax.errorbar(xs, y, yerr=[y - lo, hi - y], marker=marker, capsize=3, label=label)


def _panels(n):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols,
        cols,
        figsize=(4.5 * cols, 3.6 * ((n + cols - 1) // cols)),
        squeeze=False,
    )
    return fig, list(axes.ravel())


def write_plots(
    out_dir: str, spec: ExperimentSpec, rows: Sequence[SummaryRecord], null_p: dict
) -> list[str]:
    """PNG plots of the experiment; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in rows if r.trials > 0]
    if not rows:
        return paths
    title = (
        f"{spec.experiment}: termination {spec.termination}"
        if spec.experiment != "pieces"
        else "pieces: exhaustive search"
    )

    def save(fig, name):
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def groups(key):
        out = {}
        for r in rows:
            out.setdefault(key(r), []).append(r)
        return out

    null = [r for r in rows if r.delta == 0.0]
    if spec.experiment in ("fpr", "pwl") and null:
        # Type I error against n, one panel per (activation, covariance).
        panels = groups(lambda r: (r.activation, r.covariance))
        fig, axes = _panels(len(panels))
        for ax, ((act, cov), rs) in zip(axes, panels.items(), strict=False):
            for k, m in enumerate(spec.methods):
                mr = sorted((r for r in rs if r.method == m), key=lambda r: r.n)
                _errorbar(ax, [r.n for r in mr], mr, m, shift=1.04**k)
            ax.axhline(spec.alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_xscale("log", base=2)
            ns = [r.n for r in rs]
            ax.set_xlim(min(ns) / 1.5, max(ns) * 1.5)
            ax.set_xlabel("n (pixels)")
            ax.set_ylabel("type I error")
            ax.set_title(f"{cov}" + ("" if act == "relu" else f", {act}"))
            ax.legend(fontsize=7)
        save(fig, "type1_error.png")
    if spec.experiment in ("power", "pwl") and any(r.delta for r in rows):
        panels = groups(lambda r: (r.size, r.covariance, r.activation))
        fig, axes = _panels(len(panels))
        for ax, ((size, cov, act), rs) in zip(axes, panels.items(), strict=False):
            for k, m in enumerate(spec.methods):
                mr = sorted((r for r in rs if r.method == m), key=lambda r: r.delta)
                _errorbar(ax, [r.delta + 0.04 * k for r in mr], mr, m)
            ax.axhline(spec.alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_xlabel("delta")
            ax.set_ylabel("power")
            ax.set_ylim(0, 1)
            ax.set_title(f"d={size} {cov}" + ("" if act == "relu" else f" {act}"))
            ax.legend(fontsize=7)
        save(fig, "power.png")
    if spec.experiment == "pieces":
        fig, axes = _panels(2)
        for cov, rs in groups(lambda r: r.covariance).items():
            rs = sorted((r for r in rs if r.method == "selective"), key=lambda r: r.n)
            ns = [r.n for r in rs]
            axes[0].plot(ns, [r.pieces_mean for r in rs], "o-", label=f"{cov} mean")
            axes[0].plot(ns, [r.pieces_max for r in rs], "x:", label=f"{cov} max")
            axes[1].plot(ns, [r.seconds for r in rs], "o-", label=cov)
        for ax, lab in zip(
            axes, ("pieces per image", "seconds per image"), strict=True
        ):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("n (pixels)")
            ax.set_ylabel(lab)
            ax.legend(fontsize=7)
        save(fig, "pieces.png")
    if spec.experiment == "robustness":
        fams = [f for f in spec.noises if f != "gaussian"]
        fig, axes = _panels(len(spec.methods))
        for ax, m in zip(axes, spec.methods, strict=False):
            for fam in fams:
                rs = sorted(
                    (r for r in rows if r.method == m and r.noise == fam),
                    key=lambda r: r.distance,
                )
                if rs:
                    _errorbar(ax, [r.distance for r in rs], rs, fam)
            ax.axhline(spec.alpha, color="k", ls="--", lw=1, label="alpha")
            ax.set_xlabel("Wasserstein-1 distance to N(0, 1)")
            ax.set_ylabel("type I error")
            ax.set_title(m)
            ax.legend(fontsize=7)
        save(fig, "robustness.png")
    if null_p:
        labels = sorted({k[0] for k in null_p})
        fig, axes = _panels(len(labels))
        # A "decision" search stops once p is known to be on one side of alpha: its
        # selective p-values are those of the searched part only, not draws of the
        # null distribution, so a QQ-plot of them would mislead.
        bounds_only = not any(s.selective_p_exact for s in spec.settings())
        for ax, lab in zip(axes, labels, strict=False):
            for (l2, m), p in null_p.items():
                if l2 != lab or (m == "selective" and bounds_only):
                    continue
                q = (np.arange(1, len(p) + 1) - 0.5) / len(p)
                ax.plot(q, p, ".", ms=2, label=f"{m} ({len(p)})")
            if bounds_only and (lab, "selective") in null_p:
                ax.text(
                    0.98,
                    0.02,
                    "selective not shown: termination 'decision' gives exact\n"
                    "rejections, not p-values (use --termination precision)",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=7,
                )
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set_xlabel("Uniform(0, 1) quantile")
            ax.set_ylabel("null p-value")
            ax.set_title(lab)
            ax.legend(fontsize=7, markerscale=4)
        save(fig, "qq_null.png")
    return paths
