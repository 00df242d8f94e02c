"""Selective confidence intervals (issue 27 item 1) and the honest p-value text
(item 4).

Oracles: the naive interval z -+ 1.96 when Zset is the whole line; scipy's truncnorm
inverted with brentq for one interval; mpmath (50 digits) for F_mu at the ends of
unions and at extreme z; the containment promises of the unsearched-part rule; the
coverage of the interval for a truncated normal sampled by rejection (binomial
tolerance); and on the tiny DAL model, the agreement of the test's interval with the
host computation, of the batch with the single test, and a slow coverage check.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from scipy import optimize, stats

from sijax.detect.dal import DALConfig, dal_test, dal_test_batch, draw_noises
from sijax.detect.report import write_report
from sijax.detect.run import format_result
from sijax.errors import InputError
from sijax.selective import confidence as ci_mod
from sijax.selective import intervals as iv
from sijax.selective.search import search, search_host

mp.mp.dps = 50
INF = math.inf
Q975 = stats.norm.ppf(0.975)


def interval(z, zset, searched=None, level=0.95):
    return ci_mod.confidence_interval_list(z, zset, searched, level)


def mp_cdf(mu, z, zset):
    """F_mu(z | Zset) with 50 digits (Z ~ N(mu, 1))."""
    mu, z = mp.mpf(mu), mp.mpf(z)

    def mass(a, b):
        a, b = mp.mpf(a) - mu, mp.mpf(b) - mu
        if not a < b:
            return mp.mpf(0)
        if a >= 0:
            return mp.ncdf(-a) - mp.ncdf(-b)
        return mp.ncdf(b) - mp.ncdf(a)

    below = mp.fsum(mass(a, min(mp.mpf(b), z)) for a, b in zset)
    return below / mp.fsum(mass(a, b) for a, b in zset)


# ------------------------------------------------------------ config parsing


def test_set_confidence_parses_optional_numbers():
    """`sijax test --set confidence=0.95` (a float | None field), and "none"."""
    from sijax.config import apply_overrides

    assert apply_overrides(DALConfig(), ["confidence=0.95"]).confidence == 0.95
    on = DALConfig(confidence=0.9)
    assert apply_overrides(on, ["confidence=None"]).confidence is None
    assert apply_overrides(on, ["confidence=none"]).confidence is None
    off = apply_overrides(DALConfig(), ["exact_interval=false"])
    assert off.exact_interval is False
    with pytest.raises(InputError, match="cannot parse"):
        apply_overrides(DALConfig(), ["confidence=high"])
    with pytest.raises(InputError, match="confidence"):
        apply_overrides(DALConfig(), ["confidence=1.5"])


# --------------------------------------------------------------------- oracles


@pytest.mark.parametrize("z", [-2.5, 0.0, 1.3, 7.0])
def test_whole_line_gives_the_naive_interval(z):
    ci = interval(z, [(-INF, INF)])
    assert ci.exact
    assert ci.lo == pytest.approx(z - Q975, abs=1e-9)
    assert ci.hi == pytest.approx(z + Q975, abs=1e-9)
    lo, hi = ci_mod.naive_interval(z, 0.95)
    assert (ci.lo, ci.hi) == pytest.approx((lo, hi), abs=1e-9)


@pytest.mark.parametrize(
    "z, a, b", [(1.3, 0.5, 2.0), (-0.2, -3.0, 0.1), (2.2, 1.9, INF), (0.7, -INF, 0.8)]
)
def test_single_interval_matches_scipy_truncnorm(z, a, b):
    ci = interval(z, [(a, b)])

    def f(mu, q):
        return stats.truncnorm.cdf(z, a - mu, b - mu, loc=mu) - q

    lo = optimize.brentq(f, ci.lo - 5, ci.lo + 5, args=(0.975,), xtol=1e-12)
    hi = optimize.brentq(f, ci.hi - 5, ci.hi + 5, args=(0.025,), xtol=1e-12)
    assert ci.lo == pytest.approx(lo, abs=1e-7)
    assert ci.hi == pytest.approx(hi, abs=1e-7)
    assert ci.exact


@pytest.mark.parametrize(
    "z, zset",
    [
        (3.1, [(-INF, -2.0), (2.5, 3.4), (6.0, 6.5)]),
        (39.2, [(38.0, 41.0)]),  # far tail: log-space masses
        (-40.0, [(-41.0, -39.9), (1.0, 2.0)]),
        (250.0, [(249.0, 250.5), (260.0, INF)]),
        (0.05, [(0.0, 0.1)]),  # narrow: a wide interval
    ],
)
def test_ends_solve_the_equations_to_50_digit_accuracy(z, zset):
    ci = interval(z, zset)
    assert np.isfinite([ci.lo, ci.hi]).all() and ci.exact
    assert float(mp_cdf(ci.lo, z, zset)) == pytest.approx(0.975, abs=1e-9)
    assert float(mp_cdf(ci.hi, z, zset)) == pytest.approx(0.025, abs=1e-9)


def test_vanishing_zset_gives_infinite_ends():
    """A Zset narrower than rounding: F_mu stays at 1/2 within 2^20 sd, so the ends
    are reported as infinite (wider: still valid)."""
    ci = interval(3.0, [(3.0 - 1e-9, 3.0 + 1e-9)])
    assert ci.lo == -INF and ci.hi == INF


# ---------------------------------------------------------------- monotonicity


def test_ends_increase_with_z_and_intervals_nest_with_level():
    zset = [(-INF, -1.0), (0.5, 1.5), (2.0, 2.2), (3.0, INF)]
    zs = [-3.0, -1.5, 0.6, 1.0, 1.4, 2.1, 3.5, 6.0]
    ends = np.array([[interval(z, zset).lo, interval(z, zset).hi] for z in zs])
    assert np.all(np.diff(ends[:, 0]) > 0) and np.all(np.diff(ends[:, 1]) > 0)
    levels = [0.5, 0.8, 0.9, 0.95, 0.99]
    widths = [interval(1.0, zset, level=c) for c in levels]
    for narrow, wide in zip(widths, widths[1:], strict=False):
        assert wide.lo < narrow.lo and narrow.hi < wide.hi


def test_log_cdf_odds_decreases_in_mu():
    u = iv.from_list([(-2.0, -1.0), (0.5, 3.0)], 4)
    mus = jnp.linspace(-30.0, 30.0, 301)
    h = jax.jit(jax.vmap(ci_mod.log_cdf_odds, in_axes=(0, None, None, None, None)))(
        mus, 1.0, u.lo, u.hi, u.valid
    )
    assert np.all(np.diff(np.asarray(h)) < 0)


# ------------------------------------------------------- the unsearched part


@pytest.mark.parametrize("seed", range(4))
def test_unsearched_rule_contains_every_consistent_interval(seed):
    """Outer ends = the widest over every Zset that agrees with the search; inner
    ends bracket the exact ends from inside."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0)
    left, right = z - rng.uniform(0.5, 3.0), z + rng.uniform(0.5, 3.0)
    cuts = np.sort(rng.uniform(left, right, 6))
    found = [(cuts[0], cuts[1]), (min(cuts[2], z - 0.1), max(cuts[3], z + 0.1))]
    found = iv.normalize_list(found + [(cuts[4], cuts[5])])
    ci = interval(z, found, [(left, right)])
    assert not ci.exact
    assert ci.lo <= ci.lo_inner and ci.hi_inner <= ci.hi
    unknown = [(-INF, left - 2.0), (left - 1.0, left), (right, right + 0.5)]
    unknown += [(right + 3.0, INF)]
    for mask in range(16):
        extra = [u for k, u in enumerate(unknown) if mask >> k & 1]
        exact = interval(z, found + extra)
        assert ci.lo - 1e-9 <= exact.lo <= ci.lo_inner + 1e-9
        assert ci.hi_inner - 1e-9 <= exact.hi <= ci.hi + 1e-9


def test_searching_far_enough_makes_the_ends_exact():
    found = [(2.5, 3.5)]
    assert not interval(3.0, found, [(-5.0, 6.0)]).exact
    far = interval(3.0, found, [(-50.0, 60.0)])
    assert far.exact
    assert (far.lo, far.hi) == pytest.approx(
        (interval(3.0, found).lo, interval(3.0, found).hi), abs=1e-9
    )


@pytest.mark.parametrize("seed", range(3))
def test_brackets_hold_the_ends_and_tighten_as_the_search_grows(seed):
    """tighten's certificates: p_lo <= lo <= lo_inner <= q_lo and
    p_hi <= hi_inner <= hi <= q_hi at every step of a growing search (the ends by
    the bisection solver), and exact once the searched range is wide."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0)
    cuts = np.sort(rng.uniform(-12.0, 12.0, 14))
    full = iv.normalize_list(
        [(cuts[k], cuts[k + 1]) for k in range(0, 14, 2)]
        + [(z - rng.uniform(0.1, 1.0), z + rng.uniform(0.1, 1.0))]
    )
    step = jax.jit(ci_mod.tighten)
    b = ci_mod.open_brackets()
    for width in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0):
        left, right = z - width, z + width
        found = iv.intersect_list(full, [(left, right)])
        b = step(b, z, iv.from_list(found, 16), left, right, 0.95)
        ci = interval(z, found, [(left, right)])
        eps = 1e-9 * (1.0 + abs(z))
        assert float(b.p_lo) <= ci.lo + eps and ci.lo_inner <= float(b.q_lo) + eps
        assert float(b.p_hi) <= ci.hi_inner + eps and ci.hi <= float(b.q_hi) + eps
    assert bool(ci_mod.brackets_exact(b, z))
    exact = interval(z, full)
    assert exact.exact
    for end, p, q in ((exact.lo, b.p_lo, b.q_lo), (exact.hi, b.p_hi, b.q_hi)):
        assert float(p) <= end <= float(q)
        assert float(q) - float(p) <= 0.5e-3 * (1.0 + abs(end - z))


def steps_oracle(params, z, direction):
    """Pieces between sorted breakpoints g (two unbounded end pieces); at a
    breakpoint the piece on the side of ``direction``."""
    g, accept = params
    j = jnp.where(
        direction > 0,
        jnp.searchsorted(g, z, side="right"),
        jnp.searchsorted(g, z, side="left"),
    )
    lo = jnp.where(j == 0, -jnp.inf, g[jnp.maximum(j - 1, 0)])
    hi = jnp.where(j == g.shape[0], jnp.inf, g[jnp.minimum(j, g.shape[0] - 1)])
    return lo, hi, accept[j]


def steps_line(rng, z, n=160, spread=40.0, p_accept=0.8):
    g = np.sort(rng.uniform(-spread, spread, n))
    accept = rng.random(n + 1) < p_accept
    accept[np.searchsorted(g, z, side="right")] = True
    edges = np.concatenate([[-INF], g, [INF]])
    zset = iv.normalize_list(
        [(edges[k], edges[k + 1]) for k in range(n + 1) if accept[k]]
    )
    return (jnp.asarray(g), jnp.asarray(accept)), zset


def fragmented_line():
    """Accepted pieces of width 0.05 alternating with rejected ones: the p-value's
    rule needs more than 32 intervals of Zset."""
    g = np.linspace(-4.0, 4.0, 160)
    accept = np.arange(161) % 2 == np.searchsorted(g, 0.01, side="right") % 2
    return (jnp.asarray(g), jnp.asarray(accept)), 0.01


@pytest.fixture(scope="module")
def searched():
    """Three random lines and a fragmented one, searched with level 0.9 and
    without (vmapped; one compiled search each)."""
    rng = np.random.default_rng(11)
    zs = [0.3, 2.5, -3.0]
    lines = [steps_line(rng, z) for z in zs]
    frag, z_frag = fragmented_line()
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in lines], frag)
    z = jnp.asarray(zs + [z_frag])

    def run(p, z, level):
        return search(steps_oracle, p, z, max_pieces=512, level=level)

    def plain(p, z):
        return search(steps_oracle, p, z, max_pieces=512)

    with_level = jax.jit(jax.vmap(run, in_axes=(0, 0, None)))(params, z, 0.9)
    without = jax.jit(jax.vmap(plain))(params, z)
    return lines, params, np.asarray(z), with_level, without


def test_search_with_a_level_makes_the_ends_exact(searched):
    """With level=..., the search goes on until the interval from what it found is
    exact and equals the interval of the whole Zset (known here); without, it
    stops earlier and is not exact."""
    lines, _, zs, out, plain = searched
    assert np.all(np.asarray(out.status) == 0)
    n_exact_plain = 0
    for k, (_, zset) in enumerate(lines):
        z = float(zs[k])
        one = jax.tree.map(lambda a, k=k: a[k], out)
        ci = interval(z, iv.to_list(one.truncated), iv.to_list(one.searched), 0.9)
        truth = interval(z, zset, level=0.9)
        assert ci.exact and truth.exact
        for got, want in ((ci.lo, truth.lo), (ci.hi, truth.hi)):
            assert abs(got - want) <= 1e-3 * (1.0 + abs(want - z)), (k, got, want)
        # The p-value is that of the search without a level, or closer.
        base = jax.tree.map(lambda a, k=k: a[k], plain)
        assert float(base.inf_p) <= float(one.inf_p) <= float(one.sup_p)
        assert float(one.sup_p) <= float(base.sup_p)
        assert int(one.search_count) >= int(base.search_count)
        n_exact_plain += interval(
            z, iv.to_list(base.truncated), iv.to_list(base.searched), level=0.9
        ).exact
    assert n_exact_plain < len(lines)  # the p-value's rule alone is not enough here


def test_a_fragmented_zset_stops_at_the_p_value_rule(searched):
    """More than 32 intervals found: the ends cannot be certified, the search stops
    at the p-value's rule with status OK (the interval is then not exact)."""
    _, _, _, out, plain = searched
    one = jax.tree.map(lambda a: a[3], out)
    base = jax.tree.map(lambda a: a[3], plain)
    assert int(one.status) == 0
    assert len(iv.to_list(one.truncated)) > 32
    assert float(one.sup_p) - float(one.inf_p) < 1e-3
    assert int(one.search_count) == int(base.search_count)


def test_search_host_with_a_level_is_the_compiled_search(searched):
    _, params, zs, out, _ = searched
    g, acc = (np.asarray(a[1]) for a in params)

    def source(z, direction):  # steps_oracle in numpy
        j = int(np.searchsorted(g, z, side="right" if direction > 0 else "left"))
        lo = -INF if j == 0 else float(g[j - 1])
        hi = INF if j == g.size else float(g[j])
        return lo, hi, bool(acc[j])

    host = search_host(source, float(zs[1]), max_pieces=512, level=0.9)
    dev = jax.tree.map(lambda a: a[1], out)
    assert int(host.search_count) == int(dev.search_count)
    assert iv.to_list(host.truncated) == pytest.approx(iv.to_list(dev.truncated))


# One compiled, vmapped solve for the tests below (same shapes, level traced).
VMAPPED = jax.jit(jax.vmap(ci_mod.confidence_interval, in_axes=(0, None, None, None)))


def test_jit_and_vmap_agree_with_the_host_function():
    zset = [(-INF, -1.0), (0.5, 1.5), (3.0, INF)]
    u = iv.from_list(zset, 8)
    searched = iv.from_list([(-6.0, 7.0)], 1)
    zs = jnp.asarray([-2.0, 0.7, 1.2, 4.0])
    out = VMAPPED(zs, u, searched, 0.9)
    for i, z in enumerate(np.asarray(zs)):
        host = interval(float(z), zset, [(-6.0, 7.0)], 0.9)
        assert float(out.lo[i]) == pytest.approx(host.lo, abs=1e-9)
        assert float(out.hi[i]) == pytest.approx(host.hi, abs=1e-9)
        assert bool(out.exact[i]) == host.exact


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5])
def test_bad_level_is_refused(level):
    with pytest.raises(InputError, match="confidence"):
        interval(0.0, [(-INF, INF)], level=level)
    with pytest.raises(InputError, match="confidence"):
        DALConfig(confidence=level)


# -------------------------------------------------------------- coverage (stats)


def test_coverage_of_a_truncated_normal_within_a_binomial_interval():
    """Z ~ N(mu, 1) given Z in Zset, sampled by rejection: the 90% interval covers
    mu in a fraction of trials inside the 99.9% binomial interval of 0.9."""
    zset = [(-INF, -1.0), (1.5, 2.0), (2.6, INF)]
    u = iv.from_list(zset, 8)
    whole = iv.from_list([(-INF, INF)], 1)  # nothing unsearched
    rng = np.random.default_rng(0)
    n, level = 800, 0.9
    mus = rng.choice([-1.0, 0.0, 1.0, 2.5], n)
    draws = rng.normal(mus[:, None], 1.0, (n, 60))
    inside = np.zeros(draws.shape, bool)
    for a, b in zset:
        inside |= (a <= draws) & (draws <= b)
    z = draws[np.arange(n), np.argmax(inside, axis=1)]
    assert inside.any(axis=1).all()
    out = VMAPPED(jnp.asarray(z), u, whole, level)
    assert np.all(np.asarray(out.exact))
    covered = (np.asarray(out.lo) <= mus) & (mus <= np.asarray(out.hi))
    lo, hi = stats.binom.ppf([0.0005, 0.9995], n, level)
    assert lo <= covered.sum() <= hi, covered.mean()


# --------------------------------------------------------------- the DAL test

TINY = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8")


@pytest.fixture(scope="module")
def with_ci(model, example):
    x, x_ref, nz = example
    config = DALConfig(confidence=0.95)
    return dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config), config


def test_dal_interval_is_the_z_interval_times_sd(with_ci):
    res, _ = with_ci
    assert res.status == "ok" and res.confidence == 0.95
    assert res.confidence_exact  # the search went on until the ends were exact
    z_ci = interval(res.stat, res.truncated_intervals, res.searched_intervals)
    assert res.confidence_interval == pytest.approx(
        (z_ci.lo * res.sd, z_ci.hi * res.sd), rel=1e-12
    )
    assert res.confidence_inner == pytest.approx(
        (z_ci.lo_inner * res.sd, z_ci.hi_inner * res.sd), rel=1e-12
    )
    assert res.confidence_exact == z_ci.exact
    assert res.raw_stat == pytest.approx(res.stat * res.sd, rel=1e-12)
    text = format_result(res)
    assert "95% CI [" in text and res.p_text() in text


def _grid_zset(model, nz, line, mask, lo, hi, n):
    """Zset of the line by direct evaluation of the detector (no tracker): a grid of
    n points in [lo, hi] finds the runs of points whose mask is the observed one,
    then 50 bisections of each gap between a run and its outside neighbour place
    its ends (to about 1e-13)."""
    from sijax.detect.dal import detector

    detect = jax.jit(jax.vmap(lambda z: jnp.all(detector(model, nz, DALConfig())(
        line.a + line.b * z)[2] == mask)))  # fmt: skip
    zs = np.linspace(lo, hi, n)
    same = np.concatenate([
        np.asarray(detect(jnp.asarray(c)))
        for c in np.array_split(zs, max(1, n // 4000))
    ])  # fmt: skip
    change = np.flatnonzero(same[1:] != same[:-1])
    inside, outside = zs[change], zs[change + 1]  # flipped where same[i] is False
    flip = ~same[change]
    inside, outside = np.where(flip, outside, inside), np.where(flip, inside, outside)
    for _ in range(50):
        mid = 0.5 * (inside + outside)
        ok = np.asarray(detect(jnp.asarray(mid)))
        inside, outside = np.where(ok, mid, inside), np.where(ok, outside, mid)
    ends = list(0.5 * (inside + outside))
    if same[0]:
        ends.insert(0, lo)
    if same[-1]:
        ends.append(hi)
    return list(zip(ends[::2], ends[1::2], strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_8", "dal_v5_8"])
def test_demo_interval_ends_are_exact_and_match_a_dense_grid(name):
    """On the bundled 8x8 demo (the `sijax demo` image and reference, seed 0), the
    default search with a level gives exact ends, equal to those of Zset found by
    direct evaluation of the detector on a grid over [-300, 300] with bisected ends
    (no tracker), where exact_interval=False is not exact."""
    from sijax.checkpoint import load_model
    from sijax.data.examples import load_example
    from sijax.selective.statistics import line_statistic

    model = load_model(name)
    x, x_ref = load_example(8)
    nz = draw_noises(jax.random.key(0), model.image_shape)
    config = DALConfig(confidence=0.95)
    res = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config)
    assert res.status == "ok" and res.confidence_exact
    line = line_statistic(x, x_ref, jnp.asarray(res.mask), sigma=1.0)
    zset = _grid_zset(model, nz, line, res.mask, -300.0, 300.0, 12_001)
    grid = interval(res.stat, zset)
    ends = [v / res.sd for v in res.confidence_interval]
    inner = [v / res.sd for v in res.confidence_inner]
    for end, near, want in zip(ends, inner, (grid.lo, grid.hi), strict=True):
        tol = 1e-3 * (1.0 + abs(want - res.stat))
        assert abs(end - want) <= tol and abs(near - want) <= tol, (end, near, want)
    cheap = dal_test(model, x, x_ref, sigma=1.0, noises=nz,
                     config=DALConfig(confidence=0.95, exact_interval=False))
    assert not cheap.confidence_exact and cheap.search_count < res.search_count
    assert cheap.p_value == pytest.approx(res.p_value, abs=1e-3)


def test_dal_default_computes_no_interval(with_ci):
    res, _ = with_ci
    assert DALConfig().confidence is None
    off = res._replace(confidence=None, confidence_interval=None)
    assert off.confidence_text() is None
    assert "CI" not in format_result(off)


def test_report_records_the_interval_and_the_p_text(tmp_path, with_ci, example):
    res, config = with_ci
    x, x_ref, _ = example
    write_report(tmp_path, res, x, x_ref, config=config, checkpoint=TINY)
    saved = json.loads((tmp_path / "report.json").read_text())["result"]
    assert saved["confidence_interval"] == pytest.approx(list(res.confidence_interval))
    assert saved["confidence_text"] == res.confidence_text()
    assert saved["p_text"] == res.p_text()
    assert saved["decided"] is res.decided
    assert (tmp_path / "report.png").stat().st_size > 0


def test_batch_gives_the_single_test_interval(model, example, with_ci):
    res, config = with_ci
    x, x_ref, nz = example
    stack = jax.tree.map(lambda a: jnp.stack([a, a]), nz)
    out = dal_test_batch(
        model, np.stack([x, x]), np.stack([x_ref, x_ref]), sigma=1.0, noises=stack,
        config=config,
    )  # fmt: skip
    assert out.confidence_interval.shape == (2, 2)
    for row in out.confidence_interval:
        assert tuple(row) == pytest.approx(res.confidence_interval, rel=1e-9)
    assert list(out.confidence_exact) == [res.confidence_exact] * 2


# ------------------------------------------------------------ honest p text


def _fake(res, inf_p, sup_p, p, alpha=0.05, precision=1e-3):
    return res._replace(inf_p=inf_p, sup_p=sup_p, p_value=p, alpha=alpha,
                        precision=precision)  # fmt: skip


def test_p_text_gives_a_point_only_when_the_search_pinned_it(with_ci):
    res, _ = with_ci
    assert _fake(res, 0.2, 0.2005, 0.2001).p_text() == "p = 0.2001"
    decided = _fake(res, 1e-6, 0.03, 2e-6)
    assert decided.decided is True
    assert decided.p_text().startswith("p < 0.05 (decided")
    assert "2e-06" not in decided.p_text()  # the point inside the bounds is not shown
    kept = _fake(res, 0.06, 0.4, 0.07)
    assert kept.decided is False and kept.p_text().startswith("p >= 0.05 (decided")
    open_ = _fake(res, 0.01, 0.3, 0.02)
    assert open_.decided is None
    assert open_.p_text().startswith("p in [0.01, 0.3]")
    assert "nothing" in format_result(res._replace(status="no region"))


def test_report_prints_a_decided_test_as_decided(tmp_path, with_ci, example):
    res, config = with_ci
    x, x_ref, _ = example
    decided = _fake(res, 1e-6, 0.03, 2e-6)
    write_report(tmp_path, decided, x, x_ref, config=config, checkpoint=TINY)
    saved = json.loads((tmp_path / "report.json").read_text())["result"]
    assert saved["p_text"].startswith("p < 0.05 (decided")
    assert saved["p_exact"] is False and saved["decided"] is True
    assert "p < 0.05 (decided" in format_result(decided)


# ------------------------------------------------------------ coverage (DAL)


@pytest.mark.slow
def test_dal_interval_covers_the_region_contrast(model):
    """40 images with a +2 square (tiny model, iid): the 90% interval of the
    reference test covers mean_M(signal) - 0 in at least the binomial 0.1% quantile
    of Binomial(tested, 0.9) of them (conservative intervals may cover more)."""
    from sijax.experiments.spec import Setting
    from sijax.experiments.trials import trial_data

    setting = Setting(size=8, delta=2.0, seed=27)
    shape = model.image_shape
    data = [trial_data(setting, i, shape[2]) for i in range(40)]
    xs = np.stack([d.x for d in data])
    config = DALConfig(confidence=0.9)
    out = dal_test_batch(
        model, xs, np.stack([d.x_ref for d in data]), sigma=1.0,
        noises=jax.tree.map(
            jnp.asarray,
            draw_noises_batch([d.eps0 for d in data], [d.eps for d in data]),
        ),
        config=config,
    )  # fmt: skip
    signal = np.stack([_signal(setting, i, shape) for i in range(40)])
    mask = np.asarray(out.mask)
    tested = np.asarray(out.status) == 0
    theta = (signal[..., 0] * mask).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    lo, hi = out.confidence_interval.T
    covered = (lo <= theta) & (theta <= hi)
    n = int(tested.sum())
    assert n >= 20
    assert covered[tested].sum() >= stats.binom.ppf(0.001, n, 0.9), (
        covered[tested].sum(),
        n,
    )


def draw_noises_batch(eps0, eps):
    from sijax.diffusion.sampler import Noises

    return Noises(eps0=np.stack(eps0), eps=np.stack(eps))


def _signal(setting, index, shape):
    """The planted mean of trial ``index`` (its square), rebuilt from trial_data's
    random stream and checked against the trial's image."""
    from sijax.experiments.trials import planted_mean

    mean, data = planted_mean(setting, index, shape)
    assert mean.shape == data.x.shape
    return mean
