"""Adjusted p-values for several selective tests on one image (docs/method.md §5).

When each connected component of a detected region gets its own selective test
(``DALConfig(components=True)``), the image yields a family of m p-values; each is
exactly Uniform(0, 1) under its own null given the region, and an adjustment
within the family controls the error over the components:

* ``"holm"`` (default): Holm's step-down procedure, family-wise error rate under any
  dependence. With p_(1) <= ... <= p_(m), the adjusted p_(i) is
  max_{j <= i} min(1, (m - j + 1) p_(j)).
* ``"bh"``: Benjamini-Hochberg step-up, false discovery rate (under independence or
  positive dependence). The adjusted p_(i) is min_{j >= i} min(1, m p_(j) / j), so
  "adjusted <= q" is exactly the set BH rejects at level q.

Host-side (numpy): the family is small (the components of one mask).
"""

from __future__ import annotations

import numpy as np

from sijax.errors import InputError

__all__ = ["ADJUSTMENTS", "adjust_p_values", "check_adjustment"]

ADJUSTMENTS: tuple[str, ...] = ("holm", "bh")


def check_adjustment(method: str) -> str:
    """Return ``method`` if it is one of :data:`ADJUSTMENTS`, else raise."""
    if method not in ADJUSTMENTS:
        raise InputError(f"adjustment={method!r} must be one of {ADJUSTMENTS}")
    return method


def adjust_p_values(p_values, method: str = "holm") -> np.ndarray:
    """Adjusted p-values of one family, in the input order.

    Args:
      p_values: (m,) p-values in [0, 1]; NaN entries (no test) are left out of the
        family and stay NaN.
      method: "holm" (default) or "bh".

    Returns:
      (m,) float64 adjusted p-values; reject where <= the level.
    """
    check_adjustment(method)
    p = np.asarray(p_values, np.float64).ravel()
    tested = ~np.isnan(p)
    if np.any((p[tested] < 0.0) | (p[tested] > 1.0)):
        raise InputError(f"p-values must lie in [0, 1], got {p[tested]}")
    out = np.full(p.shape, np.nan)
    q = p[tested]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    ranked = q[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, ranked * (m / rank))[::-1])[::-1]
    back = np.empty(m)
    back[order] = adj
    out[tested] = back
    return out
