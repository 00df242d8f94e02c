"""Validity in pure statistics: selective p-values are Uniform(0, 1) under H0.

Z ~ N(0, 1) is drawn by rejection sampling *given* Z in a fixed, known union (the
selection event); the selective p-value conditions on it and must be uniform, while the
naive p-value ignores it and is not when the set depends on |Z| (as a detected region
does).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sijax.selective import intervals as iv
from sijax.selective import pvalues as pv
from sijax.selective.search import SearchStatus, search

INF = np.inf
N_SAMPLES = 3000


def truncated_normal(rng, union, n):
    out = []
    while len(out) < n:
        z = rng.standard_normal(20 * n)
        inside = np.zeros(z.shape, bool)
        for lo, hi in union:
            inside |= (z >= lo) & (z <= hi)
        out.extend(z[inside].tolist())
    return np.asarray(out[:n])


P_BATCH = jax.jit(
    jax.vmap(pv.selective_p_value, in_axes=(0, None, None)), static_argnums=2
)
NAIVE_BATCH = jax.jit(jax.vmap(pv.naive_p_value))


def type_one_error_interval(n, alpha=0.05, level=0.99):
    lo, hi = stats.binom.interval(level, n, alpha)
    return lo / n, hi / n


@pytest.mark.parametrize(
    "union,alternatives",
    [
        # A selection that depends on |Z|: the naive test is badly anti-conservative.
        ([(-INF, -1.5), (1.5, INF)], ("abs", "two-sided", "less", "greater")),
        ([(-3.0, -1.0), (0.5, 0.8), (2.0, INF)], ("abs", "two-sided", "less")),
    ],
)
def test_selective_p_values_are_uniform(union, alternatives):
    rng = np.random.default_rng(20240)
    z = truncated_normal(rng, union, N_SAMPLES)
    zset = iv.from_list(union, 4)
    lo, hi = type_one_error_interval(N_SAMPLES)
    for alt in alternatives:
        p = np.asarray(P_BATCH(jnp.asarray(z), zset, alt))
        assert stats.kstest(p, "uniform").pvalue > 0.01, alt
        assert lo <= np.mean(p < 0.05) <= hi, alt
    naive = np.asarray(NAIVE_BATCH(jnp.asarray(z)))
    assert stats.kstest(naive, "uniform").pvalue < 1e-6
    if union[0] == (-INF, -1.5):
        assert np.mean(naive < 0.05) > 0.3  # vs 0.05 nominal


def test_search_p_values_are_uniform_on_a_grid_oracle():
    """The same through the parametric search, with Zset known only to the oracle."""
    g = jnp.linspace(-6.0, 6.0, 49)  # pieces of width 0.25
    accept = jnp.asarray(np.random.default_rng(1).random(50) < 0.4).at[0].set(True)

    def oracle(params, z, direction):
        g, accept = params
        j = jnp.where(
            direction > 0,
            jnp.searchsorted(g, z, side="right"),
            jnp.searchsorted(g, z, side="left"),
        )
        lo = jnp.where(j == 0, -jnp.inf, g[jnp.maximum(j - 1, 0)])
        hi = jnp.where(j == g.shape[0], jnp.inf, g[jnp.minimum(j, g.shape[0] - 1)])
        return lo, hi, accept[j]

    edges = np.concatenate([[-INF], np.asarray(g), [INF]])
    union = iv.normalize_list(
        [(edges[k], edges[k + 1]) for k in range(50) if bool(accept[k])]
    )
    z = truncated_normal(np.random.default_rng(2), union, 1000)
    run = jax.jit(
        jax.vmap(lambda z: search(oracle, (g, accept), z, precision=1e-4)),
    )
    res = run(jnp.asarray(z))
    assert np.all(np.asarray(res.status) == SearchStatus.OK)
    p = np.asarray(res.p_value)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    naive = np.asarray(NAIVE_BATCH(jnp.asarray(z)))
    # This set puts extra mass in the tails: the naive p-value is not uniform.
    assert stats.kstest(naive, "uniform").pvalue < 0.01
