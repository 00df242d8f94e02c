"""Selective inference for a region chosen from the data (docs/method.md §2-5).

Works on any function: nothing here imports the diffusion model or the detector.

* :mod:`~sijax.selective.intervals`: padded unions of intervals (jit) and host helpers.
* :mod:`~sijax.selective.pvalues`: truncated-normal masses and p-values in log space.
* :mod:`~sijax.selective.confidence`: confidence intervals by inverting the truncated
  normal.
* :mod:`~sijax.selective.statistics`: eta, covariances and the line a + b z.
* :mod:`~sijax.selective.search`: search policies over a piece oracle.
* :mod:`~sijax.selective.multiple`: p-values adjusted within a family (the
  components of one region).
"""

from sijax.selective.confidence import (
    ConfidenceInterval,
    EndBrackets,
    brackets_exact,
    confidence_interval,
    confidence_interval_list,
    open_brackets,
    tighten,
)
from sijax.selective.intervals import (
    Intervals,
    complement,
    complement_list,
    contains,
    empty_intervals,
    from_list,
    intersect_list,
    merge_pieces,
    normalize,
    normalize_list,
    to_list,
)
from sijax.selective.multiple import ADJUSTMENTS, adjust_p_values
from sijax.selective.pvalues import (
    ALTERNATIVES,
    PValueBounds,
    bonferroni_p_value,
    bonferroni_threshold,
    bounds_from_log_masses,
    log_bonferroni_p_value,
    log_naive_p_value,
    log_ndtr,
    log_ndtri,
    log_normal_mass,
    log_p_value_bounds,
    log_selective_p_value,
    log_union_mass,
    naive_p_value,
    p_value_bounds,
    selective_p_value,
)
from sijax.selective.search import (
    POLICIES,
    TERMINATIONS,
    SearchError,
    SearchResult,
    SearchStatus,
    raise_for_status,
    search,
)
from sijax.selective.statistics import (
    HYPOTHESES,
    AR1Covariance,
    Covariance,
    DenseCovariance,
    DiagonalCovariance,
    LineStatistic,
    LowRankDiagonalCovariance,
    OperatorCovariance,
    ScalarCovariance,
    StationaryCovariance,
    StatStatus,
    as_covariance,
    circulant_spectrum,
    covariance_matrix,
    line_statistic,
    region_eta,
)

__all__ = [
    "ADJUSTMENTS",
    "ALTERNATIVES",
    "AR1Covariance",
    "ConfidenceInterval",
    "Covariance",
    "DenseCovariance",
    "DiagonalCovariance",
    "EndBrackets",
    "HYPOTHESES",
    "Intervals",
    "LineStatistic",
    "LowRankDiagonalCovariance",
    "OperatorCovariance",
    "POLICIES",
    "PValueBounds",
    "ScalarCovariance",
    "SearchError",
    "SearchResult",
    "SearchStatus",
    "StatStatus",
    "StationaryCovariance",
    "TERMINATIONS",
    "adjust_p_values",
    "as_covariance",
    "bonferroni_p_value",
    "bonferroni_threshold",
    "bounds_from_log_masses",
    "brackets_exact",
    "complement",
    "complement_list",
    "confidence_interval",
    "confidence_interval_list",
    "circulant_spectrum",
    "contains",
    "covariance_matrix",
    "empty_intervals",
    "from_list",
    "intersect_list",
    "line_statistic",
    "log_bonferroni_p_value",
    "log_naive_p_value",
    "log_ndtr",
    "log_ndtri",
    "log_normal_mass",
    "log_p_value_bounds",
    "log_selective_p_value",
    "log_union_mass",
    "merge_pieces",
    "naive_p_value",
    "normalize",
    "normalize_list",
    "open_brackets",
    "p_value_bounds",
    "raise_for_status",
    "region_eta",
    "search",
    "selective_p_value",
    "tighten",
    "to_list",
]
