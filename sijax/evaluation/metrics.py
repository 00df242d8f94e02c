"""Detection metrics of a data set and multiplicity control over its p-values.

Pure NumPy/SciPy, no JAX: the score maps are plain arrays by the time they are
scored, and the same functions serve ``sijax evaluate`` and the benchmarks.

* :func:`roc_auc`: area under the ROC curve of scores against binary labels
  (ties counted one half, the Mann-Whitney form), used for pixel AUROC (every pixel
  of every test image) and image AUROC (an image's score is the maximum of its map).
* :func:`aupro`: the area under the per-region overlap curve up to a false positive
  rate of 0.3, normalised to [0, 1] (Bergmann et al., MVTec AD, IJCV 2021): each
  connected ground-truth region counts equally, whatever its size.
* :func:`benjamini_hochberg` and :func:`storey_bh`: which p-values are rejected at
  a false discovery rate ``q``; :func:`holm`: family-wise adjusted p-values (the
  tiles of one large image).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import scipy.stats

from sijax.errors import InputError

__all__ = ["aupro", "benjamini_hochberg", "holm", "roc_auc", "storey_bh"]


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties
    counted one half.

    Args:
      scores: (N,) float scores (any shape; flattened).
      labels: (N,) bool, True for positives.

    Returns:
      The AUROC, or NaN when one class is absent.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if s.shape != y.shape:
        raise InputError(f"scores and labels differ in size: {s.shape} {y.shape}")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(s)  # average ranks: ties count one half
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def aupro(score_maps, masks, *, max_fpr: float = 0.3, thresholds: int = 200) -> float:
    """Normalised area under the per-region overlap (PRO) curve up to ``max_fpr``.

    For each threshold, the PRO is the mean over every connected ground-truth
    region (8-connectivity) of the share of its pixels above the threshold, and the
    false positive rate is the share of normal pixels (all images) above it. The
    curve is integrated over FPR in [0, max_fpr] (linear interpolation at
    ``max_fpr``) and divided by ``max_fpr``.

    Args:
      score_maps: (N, H, W) float.
      masks: (N, H, W) bool ground truth.
      max_fpr: upper end of the integration.
      thresholds: number of thresholds (quantiles of the normal pixels' scores).

    Returns:
      AUPRO in [0, 1], or NaN without any anomalous or any normal pixel.
    """
    s = np.asarray(score_maps, np.float64)
    m = np.asarray(masks, bool)
    if s.shape != m.shape or s.ndim != 3:
        raise InputError(f"need score maps and masks (N, H, W); got {s.shape}, "
                         f"{m.shape}")
    regions = []
    for i in range(len(m)):
        lab, k = scipy.ndimage.label(m[i], structure=np.ones((3, 3)))
        for r in range(1, k + 1):
            regions.append(s[i][lab == r])
    normal = s[~m]
    if not regions or normal.size == 0:
        return float("nan")
    # Thresholds from high to low: FPR grows from 0; the top one flags nothing.
    qs = np.quantile(normal, np.linspace(1.0 - max_fpr, 1.0, thresholds))
    ts = np.concatenate([[np.inf], qs[::-1], [-np.inf]])
    normal_sorted = np.sort(normal)
    fpr = 1.0 - np.searchsorted(normal_sorted, ts, side="right") / normal.size
    pro = np.zeros(len(ts))
    for vals in regions:
        v = np.sort(vals)
        pro += 1.0 - np.searchsorted(v, ts, side="right") / v.size
    pro /= len(regions)
    keep = fpr <= max_fpr
    f, p = fpr[keep], pro[keep]
    nxt = np.argmax(fpr > max_fpr)  # first point past max_fpr: interpolate to it
    if fpr[nxt] > max_fpr and f.size:
        w = (max_fpr - f[-1]) / (fpr[nxt] - f[-1])
        f = np.append(f, max_fpr)
        p = np.append(p, p[-1] + w * (pro[nxt] - p[-1]))
    return float(np.trapezoid(p, f) / max_fpr)


def _check_p(p_values) -> np.ndarray:
    p = np.asarray(p_values, np.float64).ravel()
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise InputError("p-values must lie in [0, 1] (no NaN)")
    return p


def benjamini_hochberg(p_values, q: float = 0.05) -> np.ndarray:
    """Rejections of the Benjamini-Hochberg step-up procedure at FDR ``q``.

    Args:
      p_values: (m,) p-values in [0, 1].
      q: false discovery rate.

    Returns:
      (m,) bool, True where rejected: the k smallest p-values, k the largest index
      with p_(k) <= k q / m.
    """
    p = _check_p(p_values)
    m = p.size
    if m == 0:
        return np.zeros(0, bool)
    order = np.argsort(p, kind="stable")
    ok = p[order] <= q * np.arange(1, m + 1) / m
    k = int(np.nonzero(ok)[0].max()) + 1 if ok.any() else 0
    out = np.zeros(m, bool)
    out[order[:k]] = True
    return out


def storey_bh(p_values, q: float = 0.05, lam: float = 0.5) -> np.ndarray:
    """Storey's adaptive Benjamini-Hochberg: BH at level q / pi0_hat with
    pi0_hat = (1 + #{p > lam}) / (m (1 - lam)), capped at 1 (the "+1" form of
    Storey, Taylor and Siegmund 2004, which controls the FDR in finite samples for
    independent p-values)."""
    p = _check_p(p_values)
    if p.size == 0:
        return np.zeros(0, bool)
    if not 0.0 < lam < 1.0:
        raise InputError(f"lam={lam} must be in (0, 1)")
    pi0 = min(1.0, (1.0 + np.sum(p > lam)) / (p.size * (1.0 - lam)))
    return benjamini_hochberg(p, q / pi0)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control, any
    dependence): the i-th smallest becomes max_{j <= i} min(1, (m - j + 1) p_(j)).

    Args:
      p_values: (m,) p-values in [0, 1].

    Returns:
      (m,) adjusted p-values, in the input order; reject where <= alpha.
    """
    p = _check_p(p_values)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out
