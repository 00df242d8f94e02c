"""Property tests: random piecewise-linear programs, random lines, random points.

For every drawn program, line and point: the affine forms match direct evaluation inside
the piece, each finite end of the piece is a real change of some decision, and
enumerate_pieces tiles a stretch exactly with per-piece masks equal to a dense grid.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import check_piece, check_tiling_and_grid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax


def _settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale)


def _run_checks(f, shape, seed, threshold_of):
    """Draws a line and a point and runs every oracle on f.

    f returns a dict with at least a float "score" and whatever else; the mask compared
    on the grid is score > threshold, with the threshold set at the score's median at
    t = 0 so that the mask really changes along the line.
    """
    rng = np.random.default_rng(seed)
    a, b = _normal(rng, *shape), _normal(rng, *shape)
    thr = float(jnp.median(threshold_of(f(a))))

    def g(x):
        out = f(x)
        return {**out, "mask": out["score"] > thr}

    z = float(rng.uniform(-2.0, 2.0))
    direction = int(rng.choice([-1, 1]))
    check_piece(g, a, b, z, direction, rng)
    check_tiling_and_grid(
        g,
        a,
        b,
        z - 1.0,
        z + 1.0,
        summary=lambda out: out["mask"],
        reference=lambda out: out["mask"],
    )


# ------------------------------------------------------------------------ ReLU MLPs

ACTIVATIONS = {
    "relu": lambda h, w: jax.nn.relu(h),
    "abs": lambda h, w: jnp.abs(h),
    "clip": lambda h, w: jnp.clip(h, -1.0, 1.0),
    "lax_clamp": lambda h, w: lax.clamp(-0.5, h, 0.7),
    "leaky": lambda h, w: jnp.maximum(h, 0.1 * h),
    "max_of_two": lambda h, w: jnp.maximum(h, h @ w),
    "min": lambda h, w: jnp.minimum(h, 0.3),
    "where": lambda h, w: jnp.where(h > 0.2, h, -0.5 * h),
    "sign_gate": lambda h, w: h * (jnp.sign(h @ w) + 1.0),
}


@st.composite
def mlps(draw):
    n_in = draw(st.integers(2, 8))
    width = draw(st.integers(2, 12))
    acts = draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    layers = []
    n = n_in
    for name in acts:
        layers.append(
            (
                name,
                _normal(rng, n, width, scale=1 / np.sqrt(n)),
                _normal(rng, width, scale=0.3),
                _normal(rng, width, width, scale=1 / np.sqrt(width)),
            )
        )
        n = width
    w_out = _normal(rng, n, 3, scale=1 / np.sqrt(n))

    def f(x):
        h = x
        for name, w, c, w2 in layers:
            h = ACTIVATIONS[name](h @ w + c, w2)
        y = h @ w_out
        return {
            "score": y,
            "top": jnp.argmax(y),
            "low": jnp.argmin(y),
            "peak": jnp.max(h),
            "positive": jnp.sum(y > 0),
        }

    return f, (n_in,), seed, acts


@pytest.mark.slow
@_settings(10)
@given(mlps())
def test_random_mlps(program):
    f, shape, seed, _ = program
    _run_checks(f, shape, seed, lambda out: out["score"])


# ------------------------------------------------------------------- small conv nets


def _conv(x, w):
    return lax.conv_general_dilated(
        x[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0]


def _mean_filter(e):
    """3x3 mean filter with zero padding (divide by 9 everywhere)."""
    s = lax.reduce_window(e, 0.0, lax.add, (3, 3, 1), (1, 1, 1), "SAME")
    return s / 9.0


CONV_OPS = ("conv_relu", "avg_pool", "max_pool", "max_pool_same", "bilinear_up")
CONV_OPS += ("nearest_up", "abs", "max_channels")


@st.composite
def convnets(draw):
    size = draw(st.sampled_from([4, 6, 8]))
    ops = draw(st.lists(st.sampled_from(CONV_OPS), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ch = 2
    weights = [_normal(rng, 3, 3, ch, ch, scale=1 / np.sqrt(9 * ch)) for _ in ops]
    bias = [_normal(rng, ch, scale=0.2) for _ in ops]

    def f(x):
        h = x
        for op, w, c in zip(ops, weights, bias, strict=True):
            hw = h.shape[0]
            if op == "conv_relu":
                h = jax.nn.relu(_conv(h, w) + c[None, None])
            elif op == "avg_pool" and hw % 2 == 0 and hw > 2:
                h = nn.avg_pool(h[None], (2, 2), (2, 2))[0]
            elif op == "max_pool" and hw % 2 == 0 and hw > 2:
                h = nn.max_pool(h[None], (2, 2), (2, 2))[0]
            elif op == "max_pool_same":
                h = nn.max_pool(h[None], (3, 3), (1, 1), padding="SAME")[0]
            elif op == "bilinear_up" and hw <= 8:
                h = jax.image.resize(h, (2 * hw, 2 * hw, ch), "bilinear")
            elif op == "nearest_up" and hw <= 8:
                h = jax.image.resize(h, (2 * hw, 2 * hw, ch), "nearest")
            elif op == "abs":
                h = jnp.abs(h - c[None, None])
            elif op == "max_channels":
                h = jnp.concatenate([h, jnp.max(h, axis=-1, keepdims=True)], -1)[
                    ..., :ch
                ]
        score = jnp.sum(jnp.abs(_mean_filter(h)), axis=-1)
        return {"score": score, "where_max": jnp.argmax(score.reshape(-1))}

    return f, (size, size, ch), seed, ops


@pytest.mark.slow
@_settings(8)
@given(convnets())
def test_random_convnets(program):
    f, shape, seed, _ = program
    _run_checks(f, shape, seed, lambda out: out["score"])


# --------------------------------------------------------------------- scan loops


@st.composite
def scan_loops(draw):
    n = draw(st.integers(2, 6))
    steps = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w = _normal(rng, n, n, scale=1 / np.sqrt(n))
    u = _normal(rng, n, n, scale=1 / np.sqrt(n))
    noises = _normal(rng, steps, n, scale=0.5)
    coef = jnp.asarray(rng.uniform(0.3, 0.9, size=steps))

    def f(x):
        def step(h, inputs):
            noise, c = inputs
            e_hat = jax.nn.relu(h @ w + x @ u) - 0.5 * jnp.abs(h)
            h_next = c * h + (1 - c) * e_hat + 0.1 * noise
            return h_next, jnp.max(h_next)

        h, peaks = lax.scan(step, jnp.zeros_like(x), (noises, coef))
        return {"score": h - x, "peaks": peaks, "above": peaks > 0}

    return f, (n,), seed, steps


@pytest.mark.slow
@_settings(6)
@given(scan_loops())
def test_random_scan_loops(program):
    f, shape, seed, _ = program
    _run_checks(f, shape, seed, lambda out: out["score"])
