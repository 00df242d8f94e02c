"""Rejection rates with exact binomial intervals, from the trial records.

:func:`summarize` turns the records into one :class:`SummaryRecord` per (setting,
method): the rate over the first ``trials`` valid trials by index, with its 99%
Clopper-Pearson interval, written as ``summary.json`` and ``summary.md``
(:func:`summary_markdown`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from sijax.experiments.spec import ExperimentSpec

CONFIDENCE = 0.99


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE):
    """Exact (Clopper-Pearson) binomial interval for k successes in n trials."""
    from scipy import stats

    if n == 0:
        return float("nan"), float("nan")
    a = (1.0 - confidence) / 2.0
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


@dataclasses.dataclass(frozen=True)
class SummaryRecord:
    """One row of ``summary.json``: a method on one setting.

    ``trials`` counts valid trials (non-empty regions) used, ``skipped`` the empty
    regions among the attempts that led to them; ``rate`` = rejections / trials with
    its 99% Clopper-Pearson interval [ci_lo, ci_hi]; ``seconds`` is the mean wall time
    per trial of the compiled batches (compilation excluded when possible), pieces
    statistics are those of the selective search. ``ks_p`` is the Kolmogorov-Smirnov
    p-value of the method's p-values against U(0, 1) on a null setting (delta 0),
    where they are exact p-values: over-conditioning, naive, and the selective test
    unless its search stopped at a decision (then only its rejections are exact);
    NaN otherwise.
    """

    experiment: str
    method: str
    size: int
    n: int
    covariance: str
    delta: float
    noise: str
    distance: float
    activation: str
    search: str
    termination: str
    alpha: float
    hypothesis: str
    target: int
    trials: int
    skipped: int
    capped: int
    rejections: int
    rate: float
    ci_lo: float
    ci_hi: float
    seconds: float
    pieces_mean: float
    pieces_median: float
    pieces_max: int
    ks_p: float = float("nan")

    def to_json(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }


def latest_records(records: Iterable[dict]) -> dict[str, dict[int, dict]]:
    """{setting key: {index: record}}, the last record of each trial winning."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["setting"], {})[int(r["index"])] = r
    return out


def _used(trials: dict[int, dict], target: int, methods) -> tuple[list, int]:
    """The first ``target`` valid trials by index that have every method, and the
    number of empty regions met before the last of them."""
    used, skipped = [], 0
    for i in sorted(trials):
        r = trials[i]
        if len(used) >= target:
            break
        if not r["valid"]:
            skipped += 1
        elif all(m in r["methods"] for m in methods):
            used.append(r)
    return used, skipped


def summarize(spec: ExperimentSpec, records: Iterable[dict]) -> list[SummaryRecord]:
    """Rates with 99% Clopper-Pearson intervals per (setting, method)."""
    from scipy import stats

    by_key = latest_records(records)
    rows = []
    for s in spec.settings():
        used, skipped = _used(by_key.get(s.key, {}), spec.trials, spec.methods)
        done = [r for r in used if not r["compile"]] or used
        secs = float(np.mean([r["seconds"] for r in done])) if done else float("nan")
        pieces = [
            r["methods"]["selective"]["pieces"]
            for r in used
            if "selective" in r["methods"]
        ]
        capped = sum(
            r["methods"]["selective"]["capped"]
            for r in used
            if "selective" in r["methods"]
        )
        for m in spec.methods:
            res = [r["methods"][m] for r in used]
            if m == "permutation":  # no valid permutation: no p-value
                res = [v for v in res if v["num_valid"] > 0]
            k = sum(bool(v["reject"]) for v in res)
            lo, hi = clopper_pearson(k, len(res))
            exact = m in ("oc", "naive") or (m == "selective" and s.selective_p_exact)
            ks = float("nan")
            if exact and s.delta == 0.0 and len(res) >= 2:
                ks = float(stats.kstest([v["p"] for v in res], "uniform").pvalue)
            rows.append(
                SummaryRecord(
                    experiment=spec.experiment,
                    method=m,
                    size=s.size,
                    n=s.size * s.size,
                    covariance=s.covariance,
                    delta=s.delta,
                    noise=s.noise,
                    distance=s.distance,
                    activation=s.activation,
                    search=s.search,
                    termination=s.termination,
                    alpha=s.alpha,
                    hypothesis=s.hypothesis,
                    target=spec.trials,
                    trials=len(res),
                    skipped=skipped,
                    capped=capped if m == "selective" else 0,
                    rejections=k,
                    rate=k / len(res) if res else float("nan"),
                    ci_lo=lo,
                    ci_hi=hi,
                    seconds=secs,
                    pieces_mean=float(np.mean(pieces)) if pieces else float("nan"),
                    pieces_median=float(np.median(pieces)) if pieces else float("nan"),
                    pieces_max=int(max(pieces)) if pieces else 0,
                    ks_p=ks,
                )
            )
    return rows


def null_p_values(spec: ExperimentSpec, records: Iterable[dict]) -> dict:
    """{(setting label, method): sorted p-values} of the null (delta 0) settings."""
    by_key = latest_records(records)
    out = {}
    for s in spec.settings():
        if s.delta != 0.0:
            continue
        used, _ = _used(by_key.get(s.key, {}), spec.trials, spec.methods)
        for m in spec.methods:
            if m == "bonferroni":
                continue
            p = [r["methods"][m]["p"] for r in used]
            p = np.sort([v for v in p if v is not None and np.isfinite(v)])
            if len(p):
                out[(s.label(), m)] = p
    return out


def fdr_rows(spec: ExperimentSpec, records: Iterable[dict], *, m: int = 10,
             pi0: float = 0.5) -> list[dict]:
    """Realised FDR of BH and Storey at q = alpha, per setting with a signal whose
    null twin (the same setting with delta 0) is in the run: repetitions of ``m``
    images, a share ``pi0`` of them null (:func:`sijax.experiments.fdr.realised_fdr`;
    the two settings' images are independent: delta is part of the data seed).
    The selective method uses sup_p (exact, or an upper bound after a decision)."""
    from sijax.experiments.fdr import realised_fdr

    by_key = latest_records(records)
    settings = {s.key: s for s in spec.settings()}
    rows = []
    for s in settings.values():
        twin = dataclasses.replace(s, delta=0.0)
        if s.delta == 0.0 or twin.key not in settings:
            continue
        sig, _ = _used(by_key.get(s.key, {}), spec.trials, spec.methods)
        nul, _ = _used(by_key.get(twin.key, {}), spec.trials, spec.methods)
        for method in ("selective", "naive"):
            if method not in spec.methods:
                continue
            key = "sup_p" if method == "selective" else "p"
            p1 = [r["methods"][method][key] for r in sig]
            p0 = [r["methods"][method][key] for r in nul]
            m0 = int(round(pi0 * m))
            if len(p0) < m0 or len(p1) < m - m0:
                continue
            for proc in ("bh", "storey"):
                res = realised_fdr(p0, p1, m=m, pi0=pi0, q=spec.alpha, procedure=proc)
                rows.append({"setting": s.label(), "method": method, **res.to_json()})
    return rows


def fdr_markdown(rows: Sequence[dict]) -> str:
    """The realised-FDR table (empty without rows)."""
    if not rows:
        return ""
    lines = ["", "## Many images: realised false discovery rate", "",
             "| setting | p-value | procedure | m (null) | q | repetitions | FDR "
             "[99%] | pi0 q | power |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['procedure']} | {r['m']} "
            f"({r['m0']}) | {r['q']} | {r['reps']} | {r['fdr']:.3f} "
            f"[{r['fdr_lo']:.3f}, {r['fdr_hi']:.3f}] | "
            f"{r['q'] * r['m0'] / r['m']:.3f} | {r['power']:.3f} |")
    return "\n".join(lines) + "\n"


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary_markdown(rows: Sequence[SummaryRecord], meta: dict) -> str:
    """The summary table with the facts needed to read it."""
    spec = meta["spec"]
    lines = [
        f"# sijax experiment {meta['experiment']}",
        "",
        "- models: "
        + "; ".join(
            f"{k}: {v['preset']} d={v['size']}, {v['epochs']} epochs"
            for k, v in meta["models"].items()
        ),
        f"- {meta['termination_note']}; alpha {spec['alpha']}; "
        f"99% Clopper-Pearson intervals",
        f"- machine: {meta['machine']}; commit {meta['commit']}; {meta['date']}",
        "",
        "| method | d | cov | delta | noise | act | trials (target) | skipped | "
        "rejections | rate | 99% CI | KS p (null) | s/trial | pieces mean/median/max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        noise = r.noise if r.noise == "gaussian" else f"{r.noise} W1={r.distance:g}"
        pieces = (
            "-"
            if r.method != "selective"
            else f"{_fmt(r.pieces_mean, 1)}/{_fmt(r.pieces_median, 0)}/{r.pieces_max}"
        )
        capped = f" ({r.capped} capped)" if r.capped else ""
        lines.append(
            f"| {r.method} | {r.size} | {r.covariance} | {r.delta:g} | {noise} | "
            f"{r.activation} | {r.trials} ({r.target}) | {r.skipped} | "
            f"{r.rejections}{capped} | {_fmt(r.rate)} | "
            f"[{_fmt(r.ci_lo)}, {_fmt(r.ci_hi)}] | {_fmt(r.ks_p)} | "
            f"{_fmt(r.seconds, 2)} | {pieces} |"
        )
    return "\n".join(lines) + "\n"
