"""Selective confidence intervals by inverting the truncated normal (docs/method.md §5).

Given the selection, the standardised statistic is N(mu, 1) truncated to Zset, where
mu = eta^T E[x~] / sd is the tested contrast in z units (sd = sqrt(eta^T Sigma~ eta);
mu = 0 is H0). With F_mu(z) = P(Z <= z | Z in Zset) for that law, the equal-tailed
interval at level 1 - a is

    { mu : a/2 <= F_mu(z_obs) <= 1 - a/2 } = [lo, hi],
    F_lo(z_obs) = 1 - a/2,   F_hi(z_obs) = a/2,

an interval because F_mu(z) falls as mu grows (the truncated normal family has a
monotone likelihood ratio in z). It covers mu with probability 1 - a given the
selection, whatever Zset is. In image units (the mean difference eta^T x~ estimates)
the interval is [lo sd, hi sd], since raw = z sd.

F is computed in log space as the log odds log F - log(1 - F) =
log m_mu(Zset, t <= z) - log m_mu(Zset, t > z) with the masses of
:func:`sijax.selective.pvalues.split_log_masses` moved by mu (m_mu([u, v]) is the
N(0, 1) mass of [u - mu, v - mu]), so |z_obs| and |mu| of tens to thousands of sd keep
full accuracy. The root is bracketed on the grid z_obs +- 2^k, k = -6..20, then
bisected (64 halvings); everything is jit- and vmap-compatible. An end further than
2^20 sd from z_obs is reported as infinite (wider, so still valid).

**Unsearched part of the line.** The interval needs all of Zset. When the search
stopped early (termination "precision" or "decision", ``max_pieces``, or the range
of "exhaustive"), the unsearched set U may or may not belong to Zset. The rule here:
the reported interval is the *widest* that any Zset consistent with the search could
give, i.e. the union of their intervals. F_mu is largest when all of U below z_obs
(and none above) is in Zset, and smallest in the opposite case, so

    lo = the lower end for Zset = T + (U above z_obs),
    hi = the upper end for Zset = T + (U below z_obs),

with T the part of Zset found. It contains the exact interval, so its coverage is at
least 1 - a. The narrowest ends any consistent Zset could give (``lo_inner``,
``hi_inner``: the same two sets swapped) bracket the exact ends,
lo <= lo_exact <= lo_inner and hi_inner <= hi_exact <= hi; the interval is called
``exact`` when both brackets are narrower than ``tol`` (1 + |end - z_obs|) (default
tol 1e-3). A search that covers the whole line (or over-conditioning, where Zset is
the piece at z_obs by definition) gives exact ends.

**Searching until the ends are exact** (:class:`EndBrackets`, :func:`tighten`). With
S_a = T + (U above z_obs) and S_b = T + (U below z_obs), the four ends above are
lo = root(S_a), lo_inner = root(S_b), hi_inner = root'(S_a), hi = root'(S_b). As a
search grows, every newly searched stretch either joins T or leaves U, so the log
odds of S_a can only rise and those of S_b only fall, at every mu: lo and hi_inner
move up, lo_inner and hi down. Hence one evaluation of the log odds is a proof that
lasts: h_a(m) >= logit(1 - a/2) shows m <= lo for the rest of the search, and so on.
:func:`tighten` keeps four such certified points,

    p_lo <= lo <= lo_exact <= lo_inner <= q_lo,
    p_hi <= hi_inner <= hi_exact <= hi <= q_hi,

and moves each one to the best of a few candidates spread over its bracket (evenly
in a stretched coordinate, log2(1 + |mu - z_obs| / 2^-6), so that a first call on
(-inf, inf) lands within a factor of two of an end and a few more pin it down). No
root is solved inside the search loop: one vectorised evaluation per piece.
:func:`brackets_exact` says when both brackets are within half the tolerance of
``exact``; :func:`sijax.selective.search.search` (``level=...``) then stops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.errors import InputError
from sijax.selective.intervals import (
    Intervals,
    complement,
    complement_list,
    normalize_list,
)
from sijax.selective.pvalues import split_log_masses

__all__ = [
    "ConfidenceInterval",
    "EndBrackets",
    "brackets_exact",
    "check_level",
    "confidence_interval",
    "confidence_interval_list",
    "log_cdf_odds",
    "naive_interval",
    "open_brackets",
    "tighten",
]

# Bracketing grid: z_obs +- 2^k for k in [_K_MIN, _K_MAX]; beyond: infinite ends.
_K_MIN, _K_MAX = -6, 20
_HALVINGS = 64  # 2^(K_MAX + 1) / 2^64 < 1e-13: below rounding of the ends
_TOL = 1e-3
_CANDIDATES = 12  # points per bracket and call of tighten
_S_MAX = math.log2(1.0 + 2.0 ** (_K_MAX - _K_MIN))  # stretched coordinate of 2^K_MAX


class ConfidenceInterval(NamedTuple):
    """A selective confidence interval in z units (add a leading axis under vmap).

    Attributes:
      lo, hi: () the reported (widest consistent) interval; may be -inf / +inf.
      lo_inner, hi_inner: () the narrowest ends any Zset consistent with the search
        could give (equal to lo, hi when nothing is unsearched).
      exact: () bool, both ends known to within tol (1 + |end - z_obs|).
    """

    lo: jax.Array  # () float64
    hi: jax.Array  # () float64
    lo_inner: jax.Array  # () float64
    hi_inner: jax.Array  # () float64
    exact: jax.Array  # () bool


def check_level(level: float) -> float:
    """Return ``level`` as a float if 0 < level < 1, else raise :class:`InputError`."""
    level = float(level)
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence {level=} must be in (0, 1)")
    return level


def log_cdf_odds(
    mu: jax.Array, z: jax.Array, lo: jax.Array, hi: jax.Array, valid: jax.Array
) -> jax.Array:
    """log(F / (1 - F)) with F = P(Z <= z | Z in union), Z ~ N(mu, 1).

    Args:
      mu: () mean (z units).
      z: () the point.
      lo, hi: (K,) disjoint intervals; valid: (K,) bool, rows in the union.

    Returns:
      () float64; decreasing in mu; +inf when the union has no mass above z, NaN
      when it has no mass at all.
    """
    mu = jnp.asarray(mu, jnp.float64)
    l_le, l_gt = split_log_masses(z - mu, lo - mu, hi - mu, valid, "less")
    return l_le - l_gt


def _solve(z, lo, hi, valid, target):
    """mu with log_cdf_odds(mu) = target (decreasing in mu): bracket, then bisect."""
    odds = jax.vmap(log_cdf_odds, in_axes=(0, None, None, None, None))
    steps = 2.0 ** jnp.arange(_K_MIN, _K_MAX + 1, dtype=jnp.float64)
    grid = jnp.concatenate([z - steps[::-1], z[None], z + steps])
    h = odds(grid, z, lo, hi, valid)
    below = h < target  # True from the root on (h decreasing)
    first = jnp.argmax(below)  # first grid point past the root
    none_below = ~jnp.any(below)
    left = grid[jnp.maximum(first - 1, 0)]
    right = grid[first]

    def halve(_, ab):
        a, b = ab
        m = 0.5 * (a + b)
        past = log_cdf_odds(m, z, lo, hi, valid) < target
        return jnp.where(past, a, m), jnp.where(past, m, b)

    a, b = lax.fori_loop(0, _HALVINGS, halve, (left, right))
    root = 0.5 * (a + b)
    root = jnp.where(first == 0, -jnp.inf, root)  # past the root already at z - 2^20
    root = jnp.where(none_below, jnp.inf, root)  # never past it up to z + 2^20
    return jnp.where(jnp.any(jnp.isnan(h)), jnp.nan, root)


def _interval(z, lo, hi, t_valid, below_valid, above_valid, level, tol):
    """The four ends (outer lo, outer hi, inner lo, inner hi) in one vmapped solve."""
    a = 1.0 - level
    c = jnp.log1p(-0.5 * a) - jnp.log(0.5 * a)  # logit(1 - a/2) > 0
    with_above = t_valid | above_valid
    with_below = t_valid | below_valid
    sets = jnp.stack([with_above, with_below, with_below, with_above])
    targets = jnp.stack([c, -c, c, -c])
    ends = jax.vmap(_solve, in_axes=(None, None, None, 0, 0))(z, lo, hi, sets, targets)
    lo_out, hi_out, lo_in, hi_in = ends[0], ends[1], ends[2], ends[3]

    def close(outer, inner):
        gap = jnp.abs(inner - outer)
        same = (outer == inner) | (gap <= tol * (1.0 + jnp.abs(outer - z)))
        return same & ~jnp.isnan(outer)

    return ConfidenceInterval(
        lo=lo_out,
        hi=hi_out,
        lo_inner=lo_in,
        hi_inner=hi_in,
        exact=close(lo_out, lo_in) & close(hi_out, hi_in),
    )


def confidence_interval(
    z_obs: jax.Array,
    truncation: Intervals,
    searched: Intervals | None = None,
    level: float = 0.95,
    *,
    tol: float = _TOL,
) -> ConfidenceInterval:
    """Equal-tailed selective confidence interval for mu, in z units (jit-compatible).

    Args:
      z_obs: () observed statistic (inside ``truncation``).
      truncation: the part T of Zset found (normalised, disjoint rows).
      searched: the normalised searched union; its complement is unknown (counted in
        or out of Zset, whichever widens the interval: module docstring). None: the
        whole line was searched (T is Zset).
      level: 1 - a, e.g. 0.95.
      tol: relative tolerance of ``exact``.

    Returns:
      :class:`ConfidenceInterval` (multiply by sd for image units); NaN ends when
      Zset has no mass.
    """
    z = jnp.asarray(z_obs, jnp.float64)
    t_lo, t_hi, t_valid = truncation.lo, truncation.hi, truncation.valid
    if searched is None:
        lo, hi, t_v = t_lo, t_hi, t_valid
        below = above = jnp.zeros_like(t_valid)
    else:
        u = complement(searched)
        # U split at z_obs (z_obs is searched, so no row of U holds it inside).
        u_lo = jnp.concatenate([u.lo, jnp.maximum(u.lo, z)])
        u_hi = jnp.concatenate([jnp.minimum(u.hi, z), u.hi])
        k = u.lo.shape[0]
        side = jnp.arange(2 * k) < k
        u_valid = jnp.concatenate([u.valid, u.valid])
        lo = jnp.concatenate([t_lo, u_lo])
        hi = jnp.concatenate([t_hi, u_hi])
        none = jnp.zeros_like(u_valid)
        t_v = jnp.concatenate([t_valid, none])
        zeros_t = jnp.zeros_like(t_valid)
        below = jnp.concatenate([zeros_t, u_valid & side])
        above = jnp.concatenate([zeros_t, u_valid & ~side])
    return _interval(z, lo, hi, t_v, below, above, level, tol)


@jax.jit
def _interval_jit(z, lo, hi, t_valid, below, above, level, tol):
    return _interval(z, lo, hi, t_valid, below, above, level, tol)


def _bucket(n: int) -> int:
    """Row capacity for n rows: the next power of two (at least 8), so that few
    shapes are compiled."""
    return max(8, 1 << max(0, n - 1).bit_length())


def confidence_interval_list(
    z_obs: float,
    truncated: list,
    searched: list | None = None,
    level: float = 0.95,
    *,
    tol: float = _TOL,
) -> ConfidenceInterval:
    """:func:`confidence_interval` from host lists of (lo, hi) pairs (as in
    :class:`sijax.detect.dal.TestResult`), with host floats in the result.

    The rows are padded to a power of two, so one compiled solve serves every Zset
    of up to that many intervals.

    Args:
      z_obs: the observed statistic.
      truncated: the found part of Zset, list of (lo, hi) in z units.
      searched: the searched union (list of (lo, hi)); None: the whole line.
      level: 1 - a.
      tol: relative tolerance of ``exact``.
    """
    level = check_level(level)
    t_rows = normalize_list(truncated)
    rows = list(t_rows)
    below, above = [], []
    if searched is not None:
        for u, v in complement_list(normalize_list(searched)):
            if u < z_obs:
                below.append((u, min(v, z_obs)))
            if v > z_obs:
                above.append((max(u, z_obs), v))
    rows = t_rows + below + above
    k = _bucket(len(rows))
    lo = np.full(k, np.inf)
    hi = np.full(k, np.inf)
    flags = np.zeros((3, k), bool)
    for i, (u, v) in enumerate(rows):
        lo[i], hi[i] = u, v
    n_t, n_b = len(t_rows), len(below)
    flags[0, :n_t] = True
    flags[1, n_t : n_t + n_b] = True
    flags[2, n_t + n_b : len(rows)] = True
    out = _interval_jit(
        jnp.asarray(float(z_obs), jnp.float64),
        jnp.asarray(lo),
        jnp.asarray(hi),
        *(jnp.asarray(f) for f in flags),
        jnp.asarray(level, jnp.float64),
        jnp.asarray(float(tol), jnp.float64),
    )
    out = jax.device_get(out)
    return ConfidenceInterval(*(float(v) for v in out[:4]), exact=bool(out.exact))


class EndBrackets(NamedTuple):
    """Certified brackets of the interval's ends during a search (z units; module
    docstring): p_lo <= lo <= lo_exact <= lo_inner <= q_lo and
    p_hi <= hi_inner <= hi_exact <= hi <= q_hi, for the rest of the search."""

    p_lo: jax.Array  # () float64, may be -inf
    q_lo: jax.Array  # ()
    p_hi: jax.Array  # ()
    q_hi: jax.Array  # () may be +inf


def open_brackets() -> EndBrackets:
    """The brackets known before anything is evaluated: (-inf, inf) for both ends."""
    inf = jnp.asarray(jnp.inf, jnp.float64)
    return EndBrackets(-inf, inf, -inf, inf)


def _stretch(d):
    """mu - z_obs -> the coordinate in which candidates are spread evenly."""
    s = jnp.sign(d) * jnp.log2(1.0 + jnp.abs(d) * 2.0**-_K_MIN)
    return jnp.clip(s, -_S_MAX, _S_MAX)


def _unstretch(s):
    return jnp.sign(s) * (jnp.exp2(jnp.abs(s)) - 1.0) * 2.0**_K_MIN


def tighten(
    brackets: EndBrackets,
    z_obs: jax.Array,
    truncation: Intervals,
    lo_s: jax.Array,
    hi_s: jax.Array,
    level,
) -> EndBrackets:
    """Tightened brackets after the search has covered [lo_s, hi_s] (jit/vmap).

    Args:
      brackets: the current :class:`EndBrackets` (from :func:`open_brackets` or an
        earlier call with a smaller searched range).
      z_obs: () the observed statistic.
      truncation: the part T of Zset found in [lo_s, hi_s] (disjoint rows, not
        overflowed: missing rows would break the certificates).
      lo_s, hi_s: () the searched component [L, R] (z_obs inside).
      level: 1 - a (may be traced).

    Returns:
      :class:`EndBrackets`, each end at least as tight as before.
    """
    z = jnp.asarray(z_obs, jnp.float64)
    a = 1.0 - jnp.asarray(level, jnp.float64)
    c = jnp.log1p(-0.5 * a) - jnp.log(0.5 * a)  # logit(1 - a/2)
    inf = jnp.inf
    # S_a = T + (R, inf), S_b = T + (-inf, L): one extra row each.
    lo = jnp.stack([jnp.append(truncation.lo, hi_s), jnp.append(truncation.lo, -inf)])
    hi = jnp.stack([jnp.append(truncation.hi, inf), jnp.append(truncation.hi, lo_s)])
    valid = jnp.append(truncation.valid, True)
    frac = jnp.linspace(0.0, 1.0, _CANDIDATES)

    def spread(p, q):
        sp, sq = _stretch(p - z), _stretch(q - z)
        return z + _unstretch(sp + (sq - sp) * frac)

    b = brackets
    mus = jnp.stack([spread(b.p_lo, b.q_lo), spread(b.p_hi, b.q_hi)])  # (2, n)
    odds = jax.vmap(  # sets
        jax.vmap(jax.vmap(log_cdf_odds, (0, None, None, None, None)),  # mus
                 (0, None, None, None, None)),  # the two brackets
        (None, None, 0, 0, None),
    )(mus, z, lo, hi, valid)  # (2 sets, 2 brackets, n)
    h_a, h_b = odds[0], odds[1]
    targets = jnp.stack([c, -c])[:, None]  # lo end: c; hi end: -c

    def best(ok, pick, default):
        return pick(jnp.where(ok, mus, default), axis=1)

    p_new = best(h_a >= targets, jnp.max, -inf)  # p <= outer (lo) / inner (hi)
    q_new = best(h_b <= targets, jnp.min, inf)  # q >= inner (lo) / outer (hi)
    return EndBrackets(
        p_lo=jnp.maximum(b.p_lo, p_new[0]),
        q_lo=jnp.minimum(b.q_lo, q_new[0]),
        p_hi=jnp.maximum(b.p_hi, p_new[1]),
        q_hi=jnp.minimum(b.q_hi, q_new[1]),
    )


def brackets_exact(brackets: EndBrackets, z_obs: jax.Array, tol=_TOL) -> jax.Array:
    """() bool: both ends are pinned to within tol / 2 (1 + |end - z_obs|) (half the
    tolerance of :attr:`ConfidenceInterval.exact`, so that the solved ends pass it),
    or lie beyond 2^20 sd (reported as infinite)."""
    z = jnp.asarray(z_obs, jnp.float64)
    far = 2.0**_K_MAX * (1.0 - 1e-9)

    def tight(p, q):
        dist = jnp.maximum(jnp.maximum(p - z, z - q), 0.0)
        return jnp.isfinite(p) & jnp.isfinite(q) & (q - p <= 0.5 * tol * (1.0 + dist))

    b = brackets
    lo_ok = tight(b.p_lo, b.q_lo) | (b.q_lo - z <= -far)
    hi_ok = tight(b.p_hi, b.q_hi) | (b.p_hi - z >= far)
    return lo_ok & hi_ok


def naive_interval(z_obs: float, level: float = 0.95) -> tuple[float, float]:
    """z_obs -+ Phi^{-1}(1 - a/2): the interval that ignores the selection."""
    from statistics import NormalDist

    q = NormalDist().inv_cdf(1.0 - 0.5 * (1.0 - check_level(level)))
    return float(z_obs) - q, float(z_obs) + q
