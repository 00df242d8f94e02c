"""Truncated-normal masses and selective p-values in log space (docs/method.md §5).

Under H0 the standardised statistic, given the selection event, is N(0, 1) truncated
to the union Zset. With A the set "as or more extreme than z_obs" for the alternative,

    p = P(Z in A | Z in Zset) = m(Zset & A) / m(Zset),   m = the N(0, 1) measure.

Alternatives (the set A, and what p is):

* ``"abs"`` (default, the paper's v5 form): A = {|t| >= |z_obs|}, p = P(|Z| >= |z_obs|).
* ``"two-sided"`` (sicore since July 2025): equal-tailed ``2 min(F, 1 - F)`` with
  ``F = P(Z <= z_obs | Zset)``, capped at 1.
* ``"less"``: A = {t <= z_obs}, p = F.
* ``"greater"``: A = {t >= z_obs}, p = 1 - F.

Every mass is computed in log space: log Phi on the lower side and log sf on the upper
side of 0 (never 1 - Phi of a number close to 1), ``log1mexp`` for differences and
``logsumexp`` for unions, so statistics of |z| = 40 and far beyond keep full relative
accuracy. All functions are jit/vmap-compatible and meant for float64.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erfc

from sijax.errors import InputError
from sijax.selective.intervals import Intervals, complement

__all__ = [
    "ALTERNATIVES",
    "Alternative",
    "PValueBounds",
    "bonferroni_p_value",
    "bonferroni_threshold",
    "bounds_from_log_masses",
    "check_alternative",
    "log1mexp",
    "log_bonferroni_p_value",
    "log_naive_p_value",
    "log_ndtr",
    "log_ndtri",
    "log_normal_mass",
    "log_p_value_bounds",
    "log_selective_p_value",
    "log_union_mass",
    "naive_p_value",
    "p_value_bounds",
    "selective_p_value",
    "split_log_masses",
]

Alternative = Literal["abs", "two-sided", "less", "greater"]
ALTERNATIVES: tuple[str, ...] = ("abs", "two-sided", "less", "greater")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG2 = math.log(2.0)
_CF_SWITCH = -10.0  # below this, log Phi via the Mills-ratio continued fraction
_CF_DEPTH = 24  # relative truncation error < 1e-24 for t >= 10 (checked with mpmath)
_NARROW = 1e-3  # w * (1 + |mid|) below this: midpoint series for the mass


def check_alternative(alternative: str) -> str:
    """Return ``alternative`` if it is known, else raise :class:`InputError`."""
    if alternative not in ALTERNATIVES:
        raise InputError(f"{alternative=} must be one of {ALTERNATIVES}")
    return alternative


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = jnp.asarray(x)
    return jnp.where(
        x > -_LOG2,
        jnp.log(-jnp.expm1(jnp.minimum(x, 0.0))),
        jnp.log1p(-jnp.exp(jnp.minimum(x, -_LOG2))),
    )


def log_ndtr(x: jax.Array) -> jax.Array:
    """log Phi(x), with full relative accuracy in the far lower tail.

    ``jax.scipy.special.log_ndtr`` uses an asymptotic series below x = -20 that is only
    accurate to ~1e-11 near x = -21. Here:

    * x < -10: Phi(x) = phi(x) R(-x) with the Mills-ratio continued fraction
      R(t) = 1/(t + 1/(t + 2/(t + 3/(t + ...)))), evaluated backwards at a fixed depth
      of 24 (converged to < 1e-24 relative for t >= 10, checked with mpmath);
    * -10 <= x < 0: log(erfc(-x / sqrt 2) / 2);
    * x >= 0: log1p(-erfc(x / sqrt 2) / 2).

    Args:
      x: any shape, float64.

    Returns:
      log Phi(x), same shape.
    """
    x = jnp.asarray(x, jnp.float64)
    t = jnp.maximum(-x, -_CF_SWITCH)  # t >= 10 on the branch that uses it

    def cf_step(j, f):
        return t + (_CF_DEPTH - j) / f

    f = lax.fori_loop(0, _CF_DEPTH, cf_step, t)
    log_cf = -0.5 * t * t - _LOG_SQRT_2PI - jnp.log(f)
    xc = jnp.maximum(x, _CF_SWITCH)
    half_erfc = 0.5 * erfc(jnp.abs(xc) / math.sqrt(2.0))
    mid = jnp.where(xc < 0.0, jnp.log(half_erfc), jnp.log1p(-half_erfc))
    return jnp.where(x < _CF_SWITCH, log_cf, mid)


def log_normal_mass(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """log P(lo <= Z <= hi) for Z ~ N(0, 1), elementwise; -inf when lo >= hi.

    Cases, chosen so that no cancellation happens:

    * ``lo >= 0``: log sf(lo) + log1mexp(log sf(hi) - log sf(lo)), where
      log sf(t) = log Phi(-t);
    * ``hi <= 0``: the mirror image with log Phi;
    * ``lo < 0 < hi``: log1mexp(logaddexp(log Phi(lo), log Phi(-hi))), both terms
      below 1/2 (the cancellation near w = 0 is left to the narrow case);
    * narrow intervals, ``w (1 + |m|) < 1e-3`` with w = hi - lo and m the midpoint:
      log(phi(m) w (1 + (m^2 - 1) w^2 / 24)), whose next term is below 1e-15 relative.

    Args:
      lo: left end points, any shape (may be -inf).
      hi: right end points, same shape (may be +inf).

    Returns:
      The log masses, same shape, float64.
    """
    lo = jnp.asarray(lo, jnp.float64)
    hi = jnp.asarray(hi, jnp.float64)
    empty = ~(lo < hi)  # also NaN
    # Fold to the upper side: for hi <= 0, [lo, hi] mirrors to [-hi, -lo].
    upper = lo >= 0.0
    lower = hi <= 0.0
    side = upper | lower
    u_lo = jnp.where(upper, lo, jnp.where(lower, -hi, 0.0))
    u_hi = jnp.where(upper, hi, jnp.where(lower, -lo, 1.0))
    s_lo = jnp.where(side, 0.0, lo)
    s_hi = jnp.where(side, 1.0, hi)
    # One log_ndtr on stacked arguments keeps the graph small; the barrier materialises
    # it once (otherwise XLA fuses, i.e. duplicates, it into every consumer).
    ls = lax.optimization_barrier(log_ndtr(jnp.stack([-u_lo, -u_hi, s_lo, -s_hi])))
    tail = ls[0] + log1mexp(jnp.minimum(ls[1] - ls[0], 0.0))
    # Straddling 0: 1 - Phi(lo) - Phi(-hi) with both terms below 1/2; the only
    # cancellation (both near 1/2) is for narrow intervals, which use the series.
    straddle = log1mexp(jnp.minimum(jnp.logaddexp(ls[2], ls[3]), 0.0))
    w = hi - lo
    mid = 0.5 * (hi + lo)
    narrow = (w * (1.0 + jnp.abs(mid)) < _NARROW) & jnp.isfinite(w)
    w_n = jnp.where(narrow, w, 1.0)
    m_n = jnp.where(narrow, mid, 0.0)
    series = (
        -0.5 * m_n * m_n
        - _LOG_SQRT_2PI
        + jnp.log(w_n)
        + jnp.log1p((m_n * m_n - 1.0) * w_n * w_n / 24.0)
    )
    out = jnp.where(side, tail, straddle)
    out = jnp.where(narrow, series, out)
    return jnp.where(empty, -jnp.inf, out)


def _logsumexp(x: jax.Array, axis=-1) -> jax.Array:
    """logsumexp that returns -inf (not NaN) when every term is -inf."""
    m = jnp.max(x, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(x - m_safe), axis=axis)
    return jnp.log(s) + jnp.squeeze(m_safe, axis=axis)


def log_union_mass(iv: Intervals) -> jax.Array:
    """log P(Z in union) for Z ~ N(0, 1): logsumexp of the row masses.

    Args:
      iv: a normalised union (disjoint rows; overlapping rows would be counted twice).

    Returns:
      () float64, -inf for the empty union.
    """
    lm = jnp.where(iv.valid, log_normal_mass(iv.lo, iv.hi), -jnp.inf)
    return _logsumexp(lm)


def split_log_masses(
    z: jax.Array, lo: jax.Array, hi: jax.Array, valid: jax.Array, alternative: str
) -> tuple[jax.Array, jax.Array]:
    """Log masses of the union inside and outside the extreme set A of ``z``.

    A is ``{|t| >= |z|}`` for "abs", ``{t >= z}`` for "greater", and ``{t <= z}`` for
    "less" and "two-sided" (where it gives F). The two parts partition the union, so
    ``logaddexp`` of the results is the log mass of the whole union.

    Args:
      z: () the observed statistic.
      lo, hi: (..., K) disjoint intervals; leading axes are separate unions (one mass
        evaluation serves them all, which keeps compiled graphs small).
      valid: (..., K) bool, the rows that belong to the union.
      alternative: one of :data:`ALTERNATIVES`.

    Returns:
      (log m(union & A), log m(union & not A)), each (...) float64.
    """
    check_alternative(alternative)
    z = jnp.asarray(z, jnp.float64)
    inf = jnp.inf
    if alternative == "abs":
        r = jnp.abs(z)
        cuts = ((-inf, -r), (r, inf), (-r, r))
        n_in = 2
    elif alternative == "greater":
        cuts = ((z, inf), (-inf, z))
        n_in = 1
    else:  # "less", "two-sided"
        cuts = ((-inf, z), (z, inf))
        n_in = 1
    # All clipped copies in one mass evaluation: one log_ndtr in the graph.
    c_lo = jnp.stack([jnp.maximum(lo, a) for a, _ in cuts])  # (cuts, ..., K)
    c_hi = jnp.stack([jnp.minimum(hi, b) for _, b in cuts])
    ok = jnp.broadcast_to(valid, c_lo.shape)
    lm = jnp.where(ok, log_normal_mass(c_lo, c_hi), -inf)
    is_in = (jnp.arange(len(cuts)) < n_in).reshape((len(cuts),) + (1,) * (lm.ndim - 1))
    # One variadic reduction with a logaddexp monoid: a single consumer of lm, so XLA
    # does not duplicate the mass computation into separate max and sum reductions.
    return lax.reduce(
        (jnp.where(is_in, lm, -inf), jnp.where(is_in, -inf, lm)),
        (jnp.asarray(-inf, lm.dtype), jnp.asarray(-inf, lm.dtype)),
        lambda a, b: (_logaddexp2(a[0], b[0]), _logaddexp2(a[1], b[1])),
        (0, lm.ndim - 1),
    )


def _logaddexp2(a, b):
    """log(e^a + e^b) from primitives (usable inside a lax.reduce computation)."""
    m = jnp.maximum(a, b)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    return jnp.where(
        m == -jnp.inf,
        -jnp.inf,
        m_safe + jnp.log1p(jnp.exp(jnp.minimum(a, b) - m_safe)),
    )


def _log_p_from_split(l_in: jax.Array, l_out: jax.Array, alternative: str) -> jax.Array:
    """log p from the two log masses of :func:`split_log_masses`.

    p = m_in / (m_in + m_out). When p > 1/2 it is computed as 1 - m_out / total through
    log1mexp, so log p stays accurate in relative terms even when p is close to 1. For
    "two-sided", p = 2 min(F, 1 - F) with F = m_in / total (accurate in relative terms
    except, unavoidably, in 1 - p when F is within rounding of 1/2).
    """
    l_tot = jnp.logaddexp(l_in, l_out)
    lp = l_in - l_tot
    lq = l_out - l_tot
    if alternative == "two-sided":
        # F and 1 - F are both accurate ratios; p = 2 min(F, 1 - F) capped at 1.
        return jnp.minimum(_LOG2 + jnp.minimum(lp, lq), 0.0)
    return jnp.where(lq < lp, log1mexp(lq), lp)


def log_selective_p_value(
    z_obs: jax.Array, truncation: Intervals, alternative: str = "abs"
) -> jax.Array:
    """log of the selective p-value of ``z_obs`` given Z in ``truncation``.

    Args:
      z_obs: () observed standardised statistic.
      truncation: the normalised union Zset (disjoint rows), in z units.
      alternative: "abs" (default, P(|Z| >= |z_obs| | Zset), the paper's v5 form),
        "two-sided" (2 min(F, 1 - F)), "less" (F) or "greater" (1 - F), with
        F = P(Z <= z_obs | Zset).

    Returns:
      () float64 log p; NaN when Zset has no mass.
    """
    l_in, l_out = split_log_masses(
        z_obs, truncation.lo, truncation.hi, truncation.valid, alternative
    )
    return _log_p_from_split(l_in, l_out, alternative)


def selective_p_value(
    z_obs: jax.Array, truncation: Intervals, alternative: str = "abs"
) -> jax.Array:
    """The selective p-value, ``exp`` of :func:`log_selective_p_value` (may underflow
    to 0 for extreme statistics; use the log form there)."""
    return jnp.exp(log_selective_p_value(z_obs, truncation, alternative))


class PValueBounds(NamedTuple):
    """A selective p-value computed on a searched part of the line, with bounds.

    Attributes:
      p_value: () the p-value of Zset restricted to the searched part (unsearched mass
        counted out of Zset).
      inf_p: () the smallest p-value any Zset consistent with the search can give.
      sup_p: () the largest.
      log_p_value, log_inf_p, log_sup_p: () their logs (no underflow).
    """

    p_value: jax.Array  # () float64
    inf_p: jax.Array  # () float64
    sup_p: jax.Array  # () float64
    log_p_value: jax.Array  # () float64
    log_inf_p: jax.Array  # () float64
    log_sup_p: jax.Array  # () float64


def bounds_from_log_masses(
    t_in: jax.Array,
    t_out: jax.Array,
    u_in: jax.Array,
    u_out: jax.Array,
    alternative: str,
) -> PValueBounds:
    """p-value and bounds from the log masses of the found and unsearched parts.

    With T the part of Zset found on the searched set and U the unsearched set, the true
    Zset is T plus some unknown U' within U. Writing the masses inside / outside A as
    (t_in, t_out) for T and (u_in, u_out) for U,

        p(U') = (t_in + x) / (t_in + t_out + x + y),  x <= u_in,  y <= u_out,

    which grows with x and falls with y, so (docs/method.md §5, "all unsearched mass
    counted in or out of Zset")

        sup_p = (t_in + u_in) / (t_in + t_out + u_in),
        inf_p = t_in / (t_in + t_out + u_out).

    For "two-sided", F = P(Z <= z_obs | Zset) takes every value in [F_inf, F_sup]
    (computed the same way) and p = 2 min(F, 1 - F): sup_p is its maximum over that
    range and inf_p its minimum, reached at an end.

    Args:
      t_in, t_out, u_in, u_out: () log masses (see above; -inf for empty).
      alternative: one of :data:`ALTERNATIVES`.

    Returns:
      :class:`PValueBounds`.
    """
    lp = _log_p_from_split(t_in, t_out, alternative)
    sup_in = jnp.logaddexp(t_in, u_in)
    inf_out = jnp.logaddexp(t_out, u_out)
    if alternative == "two-sided":
        # F = P(Z <= z); log F at its two extremes, and log(1 - F) likewise.
        l_f_sup = sup_in - jnp.logaddexp(sup_in, t_out)
        l_g_sup = t_out - jnp.logaddexp(sup_in, t_out)  # 1 - F_sup
        l_f_inf = t_in - jnp.logaddexp(t_in, inf_out)
        l_g_inf = inf_out - jnp.logaddexp(t_in, inf_out)  # 1 - F_inf
        # p at F_inf is 2 min(F_inf, 1 - F_inf); at F_sup likewise; min over the range
        # is at an end, max is 1 if 1/2 lies in the range.
        p_at_inf = jnp.minimum(l_f_inf, l_g_inf)
        p_at_sup = jnp.minimum(l_f_sup, l_g_sup)
        l_inf = jnp.minimum(_LOG2 + jnp.minimum(p_at_inf, p_at_sup), 0.0)
        half_inside = (l_f_inf <= -_LOG2) & (l_f_sup >= -_LOG2)
        l_sup = jnp.where(
            half_inside, 0.0, jnp.minimum(_LOG2 + jnp.maximum(p_at_inf, p_at_sup), 0.0)
        )
    else:
        l_sup = sup_in - jnp.logaddexp(sup_in, t_out)
        l_inf = t_in - jnp.logaddexp(t_in, inf_out)
    # Rounding must not let the point value escape its bounds.
    l_inf = jnp.minimum(l_inf, lp)
    l_sup = jnp.maximum(l_sup, lp)
    return PValueBounds(
        p_value=jnp.exp(lp),
        inf_p=jnp.exp(l_inf),
        sup_p=jnp.exp(l_sup),
        log_p_value=lp,
        log_inf_p=l_inf,
        log_sup_p=l_sup,
    )


def log_p_value_bounds(
    z_obs: jax.Array,
    truncation: Intervals,
    searched: Intervals,
    alternative: str = "abs",
) -> PValueBounds:
    """Selective p-value on the searched part, with worst-case bounds for the rest.

    Args:
      z_obs: () observed statistic.
      truncation: the part of Zset found, a normalised union inside ``searched``.
      searched: the normalised union of the searched z values; its complement in R is
        unknown (may or may not belong to Zset).
      alternative: one of :data:`ALTERNATIVES`.

    Returns:
      :class:`PValueBounds` with ``inf_p <= p_value <= sup_p`` (see
      :func:`bounds_from_log_masses` for the formulas).
    """
    unsearched = complement(searched)
    t_in, t_out = split_log_masses(
        z_obs, truncation.lo, truncation.hi, truncation.valid, alternative
    )
    u_in, u_out = split_log_masses(
        z_obs, unsearched.lo, unsearched.hi, unsearched.valid, alternative
    )
    return bounds_from_log_masses(t_in, t_out, u_in, u_out, alternative)


def p_value_bounds(
    z_obs: jax.Array,
    truncation: Intervals,
    searched: Intervals,
    alternative: str = "abs",
) -> tuple[jax.Array, jax.Array]:
    """(inf_p, sup_p): see :func:`log_p_value_bounds`."""
    b = log_p_value_bounds(z_obs, truncation, searched, alternative)
    return b.inf_p, b.sup_p


def log_naive_p_value(z: jax.Array, alternative: str = "abs") -> jax.Array:
    """log of the naive (unconditional) p-value, ignoring the selection.

    "abs" and "two-sided": 2 Phi(-|z|); "less": Phi(z); "greater": Phi(-z).
    """
    check_alternative(alternative)
    z = jnp.asarray(z, jnp.float64)
    if alternative in ("abs", "two-sided"):
        return jnp.minimum(_LOG2 + log_ndtr(-jnp.abs(z)), 0.0)
    if alternative == "less":
        return jnp.where(z <= 0, log_ndtr(z), log1mexp(log_ndtr(-z)))
    return jnp.where(z >= 0, log_ndtr(-z), log1mexp(log_ndtr(z)))


def naive_p_value(z: jax.Array, alternative: str = "abs") -> jax.Array:
    """The naive p-value (see :func:`log_naive_p_value`)."""
    return jnp.exp(log_naive_p_value(z, alternative))


def log_bonferroni_p_value(z: jax.Array, n: int, alternative: str = "abs") -> jax.Array:
    """log min(1, 2^n p_naive): Bonferroni over the 2^n possible regions of n pixels.

    Computed as min(0, n log 2 + log p_naive) so n = 4096 does not overflow.

    Args:
      z: () observed statistic.
      n: number of pixels (elements) the region is chosen from; family size 2^n.
      alternative: as in :func:`log_naive_p_value`.
    """
    if int(n) < 0:
        raise InputError(f"{n=} must be >= 0")
    return jnp.minimum(int(n) * _LOG2 + log_naive_p_value(z, alternative), 0.0)


def bonferroni_p_value(z: jax.Array, n: int, alternative: str = "abs") -> jax.Array:
    """min(1, 2^n p_naive) (see :func:`log_bonferroni_p_value`)."""
    return jnp.exp(log_bonferroni_p_value(z, n, alternative))


def log_ndtri(log_p: jax.Array, iterations: int = 8) -> jax.Array:
    """Inverse of :func:`log_ndtr`: x with log Phi(x) = log_p, for log_p < 0.

    Starts from ``ndtri(exp(log_p))`` or, deep in the tail, from the asymptotic
    x ~ -sqrt(-2 log_p - log(-2 log_p) - log 2 pi), then takes Newton steps. log Phi is
    increasing and concave, so after the first step the iterates approach the root
    monotonically from the left.

    Args:
      log_p: any shape, float64, values in (-inf, 0).
      iterations: Newton steps.

    Returns:
      x, same shape.
    """
    log_p = jnp.asarray(log_p, jnp.float64)
    deep = log_p < -30.0
    q = jnp.where(deep, -2.0 * log_p, 60.0)
    x_deep = -jnp.sqrt(q - jnp.log(q) - 2.0 * _LOG_SQRT_2PI)
    x_near = jax.scipy.special.ndtri(jnp.exp(jnp.where(deep, -1.0, log_p)))
    x = jnp.where(deep, x_deep, x_near)

    def step(_, x):
        lphi = -0.5 * x * x - _LOG_SQRT_2PI
        lcdf = log_ndtr(x)
        # f = lcdf - log_p; f' = phi / Phi.
        return x - (lcdf - log_p) * jnp.exp(lcdf - lphi)

    return lax.fori_loop(0, iterations, step, x)


def bonferroni_threshold(alpha: float, n: int) -> jax.Array:
    """Bonferroni threshold th with 2 Phi(-th) = alpha / 2^n (docs/method.md §5).

    Reject when |z_obs| > th. Solved in log space:
    log Phi(-th) = log alpha - (n + 1) log 2.

    Args:
      alpha: level in (0, 1].
      n: number of pixels; family size 2^n.

    Returns:
      () float64 threshold (about 75.33 for alpha = 0.05, n = 4096).
    """
    if not 0.0 < float(alpha) <= 1.0:
        raise InputError(f"{alpha=} must be in (0, 1]")
    if int(n) < 0:
        raise InputError(f"{n=} must be >= 0")
    log_tail = math.log(float(alpha)) - (int(n) + 1) * _LOG2
    return -log_ndtri(jnp.asarray(log_tail, jnp.float64))
