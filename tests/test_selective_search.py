"""Search policies against synthetic piece oracles (random grids, accept patterns)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sijax.selective import intervals as iv
from sijax.selective import pvalues as pv
from sijax.selective.search import (
    SearchError,
    SearchStatus,
    new_pieces,
    raise_for_status,
    reporting,
    search,
    search_host,
)

INF = math.inf
M = 120  # breakpoints per oracle
B = 8  # oracles per batch
TRACES = {"count": 0}


def grid_oracle(params, z, direction):
    """Pieces between sorted breakpoints g (plus two unbounded end pieces).

    At a breakpoint the piece on the side of ``direction`` is returned.
    """
    TRACES["count"] += 1  # Python side effect: runs once per trace
    g, accept = params  # (M,), (M + 1,)
    j = jnp.where(
        direction > 0,
        jnp.searchsorted(g, z, side="right"),
        jnp.searchsorted(g, z, side="left"),
    )
    lo = jnp.where(j == 0, -jnp.inf, g[jnp.maximum(j - 1, 0)])
    hi = jnp.where(j == g.shape[0], jnp.inf, g[jnp.minimum(j, g.shape[0] - 1)])
    return lo, hi, accept[j]


def make_oracle(rng, z_obs, spread=14.0, p_accept=0.5):
    g = np.sort(rng.uniform(-spread, spread, M))
    accept = rng.random(M + 1) < p_accept
    accept[np.searchsorted(g, z_obs, side="right")] = True
    return g, accept


def host_pieces(g, accept):
    edges = np.concatenate([[-INF], g, [INF]])
    return [(edges[k], edges[k + 1], bool(accept[k])) for k in range(M + 1)]


def expected_exhaustive(g, accept, z_obs, margin=10.0):
    """The pieces an exhaustive search must visit: those meeting the range
    [-margin - |z|, margin + |z|], plus the one at z_obs."""
    r_lo, r_hi = -margin - abs(z_obs), margin + abs(z_obs)
    j_obs = int(np.searchsorted(g, z_obs, side="right"))
    seen = []
    for k, (lo, hi, acc) in enumerate(host_pieces(g, accept)):
        if k == j_obs or (hi > r_lo and lo < r_hi):
            seen.append((lo, hi, acc))
    union = iv.normalize_list([(lo, hi) for lo, hi, acc in seen if acc])
    return union, (seen[0][0], seen[-1][1]), len(seen)


@functools.cache
def batched(policy, termination="precision", alternative="abs", max_pieces=256):
    run = functools.partial(
        search,
        grid_oracle,
        policy=policy,
        termination=termination,
        alternative=alternative,
        max_pieces=max_pieces,
    )
    return jax.jit(jax.vmap(run))


LOG_P = jax.jit(pv.log_selective_p_value, static_argnums=2)
SINGLE = jax.jit(
    search,
    static_argnums=0,
    static_argnames=("policy", "termination", "alternative", "max_pieces", "throw"),
)


def batch(seed, z_scale=2.5):
    rng = np.random.default_rng(seed)
    zs = rng.normal(0.0, z_scale, B)
    zs[0] = 0.0
    oracles = [make_oracle(rng, z) for z in zs]
    # One z_obs exactly on a breakpoint: the piece to its right is used.
    zs[1] = oracles[1][0][M // 2]
    oracles[1][1][M // 2 + 1] = True
    g = np.stack([o[0] for o in oracles])
    acc = np.stack([o[1] for o in oracles])
    return (jnp.asarray(g), jnp.asarray(acc)), jnp.asarray(zs), oracles, zs


def unstack(res, k):
    return jax.tree_util.tree_map(lambda a: a[k], res)


@pytest.mark.parametrize("alternative", ["abs", "two-sided"])
def test_exhaustive_recovers_the_exact_union(alternative):
    params, z, oracles, zs = batch(0)
    res = batched("exhaustive", alternative=alternative)(params, z)
    for k, ((g, acc), z_obs) in enumerate(zip(oracles, zs, strict=True)):
        r = unstack(res, k)
        union, searched, count = expected_exhaustive(g, acc, z_obs)
        assert int(r.status) == SearchStatus.OK
        assert iv.to_list(r.truncated) == union
        assert iv.to_list(r.searched) == [searched]
        assert int(r.search_count) == count
        ref = LOG_P(z_obs, iv.from_list(union, M + 1), alternative)
        assert float(r.log_p_value) == pytest.approx(float(ref), rel=1e-10, abs=1e-14)
        assert float(r.inf_p) <= float(r.p_value) <= float(r.sup_p)
        assert float(r.sup_p) - float(r.inf_p) < 1e-12


@pytest.mark.parametrize("alternative", ["abs", "two-sided"])
def test_precision_brackets_the_exhaustive_p_value(alternative):
    params, z, _, _ = batch(1)
    exh = batched("exhaustive", alternative=alternative)(params, z)
    par = batched("parametric", "precision", alternative)(params, z)
    assert np.all(np.asarray(par.status) == SearchStatus.OK)
    inf_p, p, sup_p = (np.asarray(a) for a in (par.inf_p, par.p_value, par.sup_p))
    p_exh = np.asarray(exh.p_value)
    assert np.all(sup_p - inf_p < 1e-3)
    assert np.all(inf_p <= p) and np.all(p <= sup_p)
    assert np.all(inf_p <= p_exh * (1 + 1e-12)) and np.all(p_exh <= sup_p * (1 + 1e-12))
    # Growing outwards from z_obs, the parametric search looks at fewer pieces.
    assert np.all(np.asarray(par.search_count) <= np.asarray(exh.search_count))
    # Its truncation set is the exhaustive one inside the searched component.
    for k in range(B):
        r, e = unstack(par, k), unstack(exh, k)
        (lo, hi) = iv.to_list(r.searched)[0]
        inside = iv.intersect_list(iv.to_list(e.truncated), [(lo, hi)])
        assert iv.to_list(r.truncated) == [(a, b) for a, b in inside if a < b]


def test_decision_is_on_the_right_side_of_alpha():
    alpha = 0.05
    for seed in (2,):
        params, z, _, _ = batch(seed, z_scale=3.0)
        exh = batched("exhaustive")(params, z)
        dec = batched("parametric", "decision")(params, z)
        p_exh = np.asarray(exh.p_value)
        inf_p, sup_p = np.asarray(dec.inf_p), np.asarray(dec.sup_p)
        assert np.all(np.asarray(dec.status) == SearchStatus.OK)
        decided_reject = sup_p < alpha
        decided_keep = inf_p >= alpha
        assert np.all(decided_reject | decided_keep)
        assert np.all(p_exh[decided_reject] < alpha)
        assert np.all(p_exh[decided_keep] >= alpha)
        assert np.all((inf_p <= p_exh * (1 + 1e-12)) & (p_exh <= sup_p * (1 + 1e-12)))


def test_over_conditioning_is_the_single_piece_at_z_obs():
    params, z, oracles, zs = batch(4)
    oc = batched("over_conditioning")(params, z)
    exh = batched("exhaustive")(params, z)
    assert np.all(np.asarray(oc.search_count) == 1)
    for k, ((g, _), z_obs) in enumerate(zip(oracles, zs, strict=True)):
        r = unstack(oc, k)
        j = int(np.searchsorted(g, z_obs, side="right"))
        lo = -INF if j == 0 else g[j - 1]
        hi = INF if j == M else g[j]
        assert iv.to_list(r.truncated) == [(lo, hi)]
        exh_union = iv.to_list(unstack(exh, k).truncated)
        assert iv.intersect_list(iv.to_list(r.truncated), exh_union) == [(lo, hi)]
        assert float(r.inf_p) == float(r.p_value) == float(r.sup_p)
        ref = np.exp(LOG_P(z_obs, iv.from_list([(lo, hi)], M + 1), "abs"))
        assert float(r.p_value) == pytest.approx(float(ref), rel=1e-10)


def test_vmap_matches_single_runs_and_no_retrace():
    params, z, _, _ = batch(5)
    res = batched("parametric")(params, z)
    TRACES["count"] = 0
    for k in (0, 3):
        one = SINGLE(grid_oracle, (params[0][k], params[1][k]), z[k], max_pieces=256)
        r = unstack(res, k)
        assert float(one.p_value) == float(r.p_value)
        assert iv.to_list(one.truncated) == iv.to_list(r.truncated)
        assert int(one.search_count) == int(r.search_count)
    assert TRACES["count"] == 1  # traced for the first call, reused for the second


def test_max_pieces_status_keeps_the_bounds_found_so_far():
    params, z, _, _ = batch(6)
    p1 = (params[0][2], params[1][2])
    exh = SINGLE(grid_oracle, p1, z[2], policy="exhaustive", max_pieces=256)
    cut = SINGLE(grid_oracle, p1, z[2], policy="exhaustive", max_pieces=5)
    assert int(cut.status) == SearchStatus.MAX_PIECES
    assert int(cut.search_count) == 5
    assert float(cut.inf_p) <= float(exh.p_value) <= float(cut.sup_p)
    assert float(cut.inf_p) <= float(cut.p_value) <= float(cut.sup_p)
    with pytest.raises(SearchError, match="max_pieces"):
        raise_for_status(cut)  # what throw=True does with a concrete result
    jitted = jax.jit(
        lambda p, z: (
            search(
                grid_oracle, p, z, policy="exhaustive", max_pieces=5, throw=True
            ).p_value
        )
    )
    with pytest.raises(Exception, match="max_pieces"):
        jax.block_until_ready(jitted(p1, z[2]))


def test_oracle_failures_give_status_codes():
    params, z, _, _ = batch(7)
    g, acc = params[0][0], params[1][0]
    rejected = (g, jnp.zeros_like(acc))
    r = SINGLE(grid_oracle, rejected, z[0], max_pieces=256)
    assert int(r.status) == SearchStatus.OBSERVED_NOT_ACCEPTED
    r = SINGLE(grid_oracle, (g, acc), jnp.nan, max_pieces=256)
    assert int(r.status) == SearchStatus.NONFINITE

    def stuck(params, z, direction):  # always the piece [-1, 1]: never advances
        return jnp.asarray(-1.0), jnp.asarray(1.0), jnp.asarray(True)

    r = search(stuck, None, 0.5, max_pieces=16)
    assert int(r.status) == SearchStatus.ORACLE_STALLED
    assert int(r.search_count) == 2
    assert float(r.inf_p) <= float(r.p_value) <= float(r.sup_p)


def test_progress_reports_do_not_change_the_search():
    """report_every=k: a report every k pieces and one at the end, whose count and
    bounds are the result's; the same compiled search serves two reporters."""
    g, accept = make_oracle(np.random.default_rng(7), 0.3)
    params = (jnp.asarray(g), jnp.asarray(accept))
    run = jax.jit(
        functools.partial(
            search,
            grid_oracle,
            policy="exhaustive",
            max_pieces=4 * M,
            report_every=10,
        )
    )
    plain = search(grid_oracle, params, 0.3, policy="exhaustive", max_pieces=4 * M)
    seen, other = [], []
    with reporting(lambda *r: seen.append(r)):
        res = run(params, 0.3)
        jax.effects_barrier()
    with reporting(lambda *r: other.append(r)):
        run(params, 0.3)
        jax.effects_barrier()
    run(params, 0.3)  # no reporter installed: reports are dropped
    jax.effects_barrier()
    n = int(res.search_count)
    assert n == int(plain.search_count) and n > 10
    assert [r[0] for r in seen] == [*range(10, n + 1, 10)] + ([n] if n % 10 else [])
    assert other == seen
    assert sum(new_pieces(r[0], 10) for r in seen) == n
    last = seen[-1]
    assert (last[1], last[2]) == tuple(np.asarray(res.searched.bounds[0]))
    assert (last[3], last[4]) == (float(res.inf_p), float(res.sup_p))
    np.testing.assert_array_equal(res.truncated.bounds, plain.truncated.bounds)
    with pytest.raises(Exception, match="report_every"):
        search(grid_oracle, params, 0.3, report_every=-1)


@pytest.mark.parametrize(
    "policy,termination",
    [
        ("parametric", "precision"),
        ("parametric", "decision"),
        ("exhaustive", "precision"),
        ("over_conditioning", "precision"),
    ],
)
def test_search_host_equals_the_jitted_search(policy, termination):
    """The host-driven loop (for oracles that cannot be jitted) absorbs the same
    pieces through the same state machine: identical results, progress reported."""
    params, zs, oracles, _ = batch(11)
    for k in (0, 1, 3):
        g, accept = oracles[k]
        pk = (jnp.asarray(g), jnp.asarray(accept))
        want = SINGLE(
            grid_oracle, pk, zs[k], policy=policy, termination=termination,
            max_pieces=256,
        )  # fmt: skip

        def source(z, direction, pk=pk):
            lo, hi, acc = grid_oracle(pk, jnp.asarray(z), jnp.asarray(direction))
            return float(lo), float(hi), bool(acc)

        seen = []
        got = search_host(
            source, float(zs[k]), policy=policy, termination=termination,
            max_pieces=256, progress=lambda *r, seen=seen: seen.append(r),
            report_every=7,
        )  # fmt: skip
        for field in ("search_count", "status", "p_value", "inf_p", "sup_p"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
        np.testing.assert_array_equal(got.truncated.bounds, want.truncated.bounds)
        n = int(got.search_count)
        assert seen[-1][0] == n and seen[-1][3:] == (float(got.inf_p), float(got.sup_p))
    stuck = search_host(lambda z, d: (-1.0, 1.0, True), 0.5, max_pieces=16)
    assert int(stuck.status) == SearchStatus.ORACLE_STALLED
    with pytest.raises(SearchError, match="max_pieces"):
        search_host(source, float(zs[3]), policy="exhaustive", max_pieces=3, throw=True)
