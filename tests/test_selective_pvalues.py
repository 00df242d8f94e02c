"""Intervals and log-space p-values against mpmath (50 digits) and host oracles."""

import math

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

from sijax.errors import InputError
from sijax.selective import intervals as iv
from sijax.selective import pvalues as pv

mp.mp.dps = 50
INF = math.inf
ALTS = ("abs", "two-sided", "less", "greater")
K = 4  # one capacity everywhere: one compilation per function and alternative

# Eager calls compile op by op; jit each function once instead.
LOG_P = jax.jit(pv.log_selective_p_value, static_argnums=2)
LOG_NAIVE = jax.jit(pv.log_naive_p_value, static_argnums=1)
MERGE = jax.jit(iv.merge_pieces, static_argnums=3)
COMPLEMENT = jax.jit(iv.complement)


def union(pairs):
    return iv.from_list(pairs, K)


# ------------------------------------------------------------------ mpmath oracles


def mp_mass(lo, hi):
    lo, hi = mp.mpf(lo), mp.mpf(hi)
    if not lo < hi:
        return mp.mpf(0)
    if lo >= 0:  # upper tail: difference of survival functions, no cancellation
        return mp.ncdf(-lo) - mp.ncdf(-hi)
    return mp.ncdf(hi) - mp.ncdf(lo)


def mp_split(z, union, alt):
    z = mp.mpf(z)
    if alt == "abs":
        r = abs(z)
        cuts_in, cuts_out = [(-mp.inf, -r), (r, mp.inf)], [(-r, r)]
    elif alt == "greater":
        cuts_in, cuts_out = [(z, mp.inf)], [(-mp.inf, z)]
    else:
        cuts_in, cuts_out = [(-mp.inf, z)], [(z, mp.inf)]

    def total(cuts):
        return mp.fsum(
            mp_mass(max(mp.mpf(a), c), min(mp.mpf(b), d))
            for a, b in union
            for c, d in cuts
        )

    return total(cuts_in), total(cuts_out)


def mp_log_p(z, union, alt):
    m_in, m_out = mp_split(z, union, alt)
    tot = m_in + m_out
    if alt == "two-sided":
        return min(mp.mpf(0), mp.log(2 * min(m_in, m_out) / tot))
    return mp.log(m_in / tot)


def assert_log_close(got, ref, rtol, atol=1e-14):
    got, ref = float(got), float(ref)
    assert abs(got - ref) <= rtol * abs(ref) + atol, (got, ref)


# --------------------------------------------------------------------- intervals


def test_merge_pieces_matches_host_normalize():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = 12
        lo = np.round(rng.uniform(-5, 5, p), 1)
        hi = lo + np.round(rng.uniform(-0.5, 2, p), 1)
        keep = rng.random(p) < 0.7
        lo[0] = -INF if rng.random() < 0.3 else lo[0]
        out = MERGE(jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(keep), p)
        expected = iv.normalize_list(
            [(a, b) for a, b, k in zip(lo, hi, keep, strict=True) if k]
        )
        assert iv.to_list(out) == expected
        assert not bool(out.overflow)
        # padding rows are (inf, inf) and sort last
        assert np.all(np.asarray(out.bounds)[int(out.count) :] == INF)


def test_touching_intervals_merge_and_overflow_is_reported():
    lo, hi = jnp.array([0.0, 1.0, 3.0, 5.0]), jnp.array([1.0, 2.0, 4.0, 6.0])
    out = MERGE(lo, hi, None, 4)
    assert iv.to_list(out) == [(0.0, 2.0), (3.0, 4.0), (5.0, 6.0)]
    small = MERGE(lo.at[1].set(10.0), hi.at[1].set(9.0), None, 2)
    assert bool(small.overflow) and int(small.count) == 2
    assert iv.to_list(small) == [(0.0, 1.0), (3.0, 4.0)]
    listed = iv.from_list([(0, 1), (2, 3), (4, 5)], max_intervals=2)
    assert bool(listed.overflow)


def test_complement_intersect_contains():
    u = union([(0.5, 1), (-2, -1), (0.9, 3)])
    assert iv.to_list(u) == [(-2.0, -1.0), (0.5, 3.0)]
    c = COMPLEMENT(u)
    assert iv.to_list(c) == [(-INF, -2.0), (-1.0, 0.5), (3.0, INF)]
    assert iv.to_list(c) == iv.complement_list(iv.to_list(u))
    assert iv.to_list(COMPLEMENT(u, -1.5, 2.0)) == [(-1.0, 0.5)]
    assert iv.complement_list([(0, 1)], -1, 1) == [(-1.0, 0.0)]
    assert iv.to_list(COMPLEMENT(iv.empty_intervals(K))) == [(-INF, INF)]
    assert iv.intersect_list([(0, 2), (3, 5)], [(1, 4)]) == [(1.0, 2.0), (3.0, 4.0)]
    contains = jax.jit(iv.contains)
    assert bool(contains(u, 3.0)) and not bool(contains(u, 0.0))
    with pytest.raises(InputError):
        iv.normalize_list([(0.0, float("nan"))])


# ------------------------------------------------------------ masses and log Phi


@pytest.mark.parametrize(
    "x", [-1e4, -200.0, -40.0, -38.0, -21.0, -15.0, -10.0, -9.99, -5.0, -1.0, 0.0, 3.0]
)
def test_log_ndtr_against_mpmath(x):
    ref = mp.log(mp.ncdf(x))
    assert_log_close(jax.jit(pv.log_ndtr)(x), ref, 1e-14, 0.0)


def test_log_normal_mass_against_mpmath():
    cases = [
        (-INF, INF), (-INF, -40.0), (40.0, INF), (39.0, 41.0), (-41.0, -39.0),
        (-0.1, 0.2), (-3.0, 1e-9), (5.0, 5.0 + 1e-7), (-0.5e-9, 0.5e-9),
        (20.5, 20.6), (-21.0, -20.999), (0.0, 1.0), (-1.0, 0.0), (10.0, 10.001),
        (2.0, 1.0), (1.0, 1.0), (100.0, 101.0), (-1e3, -999.0), (-8.0, 8.0),
    ]  # fmt: skip
    lo = jnp.array([c[0] for c in cases])
    hi = jnp.array([c[1] for c in cases])
    got = np.asarray(jax.jit(pv.log_normal_mass)(lo, hi))
    for (a, b), g in zip(cases, got, strict=True):
        m = mp_mass(a, b)
        if m == 0:
            assert g == -INF
        else:
            assert_log_close(g, mp.log(m), 1e-12, 1e-15)


# ------------------------------------------------------------ selective p-values

CASES = [
    ([(-INF, INF)], 1.96),
    ([(1.0, 3.0)], 2.0),
    ([(39.0, 41.0)], 40.0),
    ([(39.5, 40.2)], 40.0),
    ([(-41.0, -39.0), (39.0, 41.0)], 40.5),  # symmetric
    ([(-3.0, -1.0), (1.0, 3.0)], 1.5),  # symmetric
    ([(-5.0, -2.0), (-1.0, 0.5), (2.5, 4.0), (10.0, 12.0)], 3.0),
    ([(1.0, 2.0), (3.0, 4.0)], 2.0),  # z_obs on a right edge
    ([(1.0, 2.0), (3.0, 4.0)], 3.0),  # z_obs on a left edge
    ([(-45.0, -38.0), (20.0, 21.0), (38.5, 39.0)], 38.7),
    ([(-0.1, 0.2)], 0.15),
    ([(5.0, 5.000001)], 5.0000005),
    ([(99.0, 101.0), (-100.5, -99.5)], 100.0),
    ([(0.1, 50.0)], 0.1000001),  # p close to 1 for "greater"
    ([(-INF, -30.0), (-1.0, 1.0), (30.0, INF)], -35.0),
]


@pytest.mark.parametrize("alt", ALTS)
def test_selective_p_value_against_mpmath(alt):
    for pairs, z in CASES:
        got = LOG_P(z, union(pairs), alt)
        assert_log_close(got, mp_log_p(z, pairs, alt), 1e-8)
        assert float(got) <= 0.0


def test_selective_p_value_identities():
    full = union([(-INF, INF)])
    for z in (-2.5, 0.3, 1.96, 40.0):
        naive = float(LOG_NAIVE(z, "abs"))
        assert_log_close(LOG_P(z, full, "abs"), naive, 1e-12)
        assert_log_close(LOG_P(z, full, "two-sided"), naive, 1e-12)
    sym = union([(-6.0, -2.0), (-1.0, 1.0), (2.0, 6.0)])
    for z in (-3.0, 0.5, 2.2):
        a, b, lt, gt = (float(np.exp(LOG_P(z, sym, alt))) for alt in ALTS)
        assert a == pytest.approx(b, rel=1e-12)
        assert lt + gt == pytest.approx(1.0, rel=1e-12)
    assert float(LOG_P(0.0, sym, "abs")) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(InputError, match="alternative"):
        pv.selective_p_value(1.0, sym, "both")


def test_naive_and_bonferroni_against_mpmath():
    for z in (0.0, 1.96, -3.0, 40.0, -40.0):
        assert_log_close(LOG_NAIVE(z, "abs"), mp.log(2 * mp.ncdf(-abs(z))), 1e-12)
        assert_log_close(LOG_NAIVE(z, "less"), mp.log(mp.ncdf(z)), 1e-12)
        assert_log_close(LOG_NAIVE(z, "greater"), mp.log(mp.ncdf(-z)), 1e-12)
    for n in (1, 64, 4096):
        th = float(pv.bonferroni_threshold(0.05, n))
        target = mp.log(mp.mpf("0.05")) - n * mp.log(2)
        ref = mp.findroot(lambda t, tg=target: mp.log(2 * mp.ncdf(-t)) - tg, th)
        assert th == pytest.approx(float(ref), rel=1e-12)
    # 2^4096 overflows float64; the log form does not.
    lp = jax.jit(pv.log_bonferroni_p_value, static_argnums=1)(80.0, 4096)
    ref = 4096 * mp.log(2) + mp.log(2 * mp.ncdf(-80))
    assert_log_close(lp, ref, 1e-12)
    assert float(pv.bonferroni_p_value(1.0, 3)) == 1.0
    assert float(pv.log_ndtri(pv.log_ndtr(-75.0))) == pytest.approx(-75.0, rel=1e-13)


@pytest.mark.parametrize("alt", ALTS)
def test_p_value_bounds_cover_every_completion(alt):
    """Bounds from (T, searched) hold for every Zset = T + U' with U' unsearched."""
    rng = np.random.default_rng(7)
    bounds_fn = jax.jit(pv.log_p_value_bounds, static_argnums=3)
    grid = np.linspace(-6.0, 6.0, 25)
    pieces = list(zip(grid[:-1], grid[1:], strict=True))
    for _ in range(5):
        z = rng.uniform(-3, 3)
        lo_s, hi_s = sorted(rng.choice(len(pieces), 2, replace=False))
        searched = [(pieces[lo_s][0], pieces[hi_s][1])]
        inside = pieces[lo_s : hi_s + 1]
        t = [p for p in inside if rng.random() < 0.6] + [inside[0]]
        outside = pieces[:lo_s] + pieces[hi_s + 1 :] + [(-INF, -6.0), (6.0, INF)]
        b = bounds_fn(z, iv.from_list(t, 30), iv.from_list(searched), alt)
        assert float(b.inf_p) <= float(b.p_value) <= float(b.sup_p)
        ref_p = float(mp.exp(mp_log_p(z, iv.normalize_list(t), alt)))
        assert float(b.p_value) == pytest.approx(ref_p, rel=1e-10)
        for _ in range(8):
            extra = [p for p in outside if rng.random() < 0.5]
            p_full = float(mp.exp(mp_log_p(z, iv.normalize_list(t + extra), alt)))
            assert (
                float(b.inf_p) * (1 - 1e-12) <= p_full <= float(b.sup_p) * (1 + 1e-12)
            )
    # Nothing unsearched: the bounds collapse.
    b = bounds_fn(1.0, iv.from_list([(0.5, 2.0)], 30), iv.from_list([(-INF, INF)]), alt)
    assert float(b.inf_p) == pytest.approx(float(b.sup_p), rel=1e-12)
