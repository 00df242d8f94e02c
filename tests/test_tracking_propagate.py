"""Batched breakpoint propagation (`enumerate_line`) against independent oracles.

For random piecewise-linear programs (the generators of the property tests: ReLU/abs/
clamp/max/where MLPs, conv nets with pooling and resizing, scan loops) and the trained
`tiny_8` sampler pipeline:
  * the breakpoints equal those of the walking `enumerate_pieces` to 1e-9 of the
    stretch length, with the same per-piece summary;
  * the pieces tile [z_min, z_max] (strictly increasing, exact ends) and every
    breakpoint is a real change of some decision (fingerprints differ);
  * the per-piece summary equals direct evaluation of f on a 10^4-point grid.
Non-piecewise-linear functions raise `NotPiecewiseLinearError`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import N_GRID, direct, enumerate_walking
from hypothesis import given
from jax import lax
from test_tracking_properties import _normal, _settings, convnets, mlps, scan_loops

from sijax.errors import NotPiecewiseLinearError
from sijax.tracking import LineCache, enumerate_line, track
from sijax.tracking.interpreter import DEFAULT_TIE_TOL
from sijax.tracking.propagate import (
    ENDS,
    LineDependentControlError,
    join_pieces,
    split_stretch,
)
from sijax.tracking.propagate.pointwise import JIT_AFTER

RTOL = 1e-9  # breakpoints, relative to the stretch length


def _walk_z(pieces) -> np.ndarray:
    k = int(pieces.count)
    return np.concatenate([np.asarray(pieces.lo[:k]), [float(pieces.hi[k - 1])]])


def check_against_oracles(f, a, b, z_min, z_max, summary, reference, **kw):
    """enumerate_line vs enumerate_pieces, tiling, and a dense grid. Returns pieces."""
    pieces = enumerate_line(f, a, b, z_min, z_max, summary=summary, **kw)
    z, count = pieces.z, pieces.count
    # Tiling: exact ends, no gap, no overlap, every breakpoint a real decision change.
    assert z[0] == z_min and z[-1] == z_max
    assert np.all(np.diff(z) > 0)
    assert pieces.origin[0] == ENDS and pieces.origin[-1] == ENDS
    assert np.all(np.abs(np.diff(pieces.fingerprint)) > 1e-6)
    for leaf in jax.tree.leaves(pieces.summary):
        assert leaf.shape[0] == count

    # The walking tracker finds the same pieces and the same summaries.
    walked = enumerate_walking(f, summary, a, b, 4 * count + 64, z_min, z_max)
    assert int(walked.status) == 0
    z_walk = _walk_z(walked)
    assert len(z_walk) == len(z), f"{len(z_walk) - 1} pieces walking, {count} here"
    np.testing.assert_allclose(z, z_walk, rtol=0, atol=RTOL * (z_max - z_min))
    for got, want in zip(
        jax.tree.leaves(pieces.summary), jax.tree.leaves(walked.summary), strict=True
    ):
        np.testing.assert_array_equal(got, np.asarray(want)[:count])

    # Direct evaluation on a dense grid (points within rounding of a breakpoint skip).
    ts = np.linspace(z_min, z_max, N_GRID)
    want = reference(direct(f, a, b, ts))
    k = np.clip(np.searchsorted(z, ts, side="right") - 1, 0, count - 1)
    near = np.minimum(np.abs(ts - z[k]), np.abs(ts - z[k + 1])) < 1e-9
    for g, w in zip(
        jax.tree.leaves(pieces.summary), jax.tree.leaves(want), strict=True
    ):
        g, w = np.asarray(g)[k], np.asarray(w)
        bad = np.any((g != w).reshape(N_GRID, -1), axis=1) & ~near
        assert not bad.any(), f"summary differs from the grid at t={ts[bad][:5]}"
    return pieces


def _run_checks(f, shape, seed, discrete_keys):
    """A random line, a threshold at the score's median, then every oracle."""
    rng = np.random.default_rng(seed)
    a, b = _normal(rng, *shape), _normal(rng, *shape)
    thr = float(jnp.median(f(a)["score"]))

    def g(x):
        out = f(x)
        return {**out, "mask": out["score"] > thr}

    def pick(out):  # the discrete leaves (the same for walking and propagation)
        return {k: out[k] for k in ("mask", *discrete_keys)}

    z = float(rng.uniform(-2.0, 2.0))
    return check_against_oracles(g, a, b, z - 1.0, z + 1.0, pick, pick)


@pytest.mark.slow
@_settings(3)
@given(mlps())
def test_random_mlps_match_walking_and_grid(program):
    f, shape, seed, _ = program
    _run_checks(f, shape, seed, ("top", "low", "positive"))


@pytest.mark.slow
@_settings(3)
@given(convnets())
def test_random_convnets_match_walking_and_grid(program):
    f, shape, seed, _ = program
    _run_checks(f, shape, seed, ("where_max",))


@pytest.mark.slow
@_settings(2)
@given(scan_loops())
def test_random_scan_loops_match_walking_and_grid(program):
    f, shape, seed, _ = program
    _run_checks(f, shape, seed, ("above",))


# ---------------------------------------------------------- control flow, windows


def _mlp_weights(seed, n=4, width=6):
    rng = np.random.default_rng(seed)
    return (
        _normal(rng, n, width, scale=1 / np.sqrt(n)),
        _normal(rng, width, width, scale=1 / np.sqrt(width)),
        _normal(rng, width, n, scale=1 / np.sqrt(width)),
    )


@jax.custom_vjp
def _leaky(h):
    return jnp.maximum(h, 0.2 * h)


_leaky.defvjp(lambda h: (_leaky(h), h), lambda h, g: (g,))


def test_control_flow_and_custom_calls():
    """pjit, custom_jvp (relu), custom_vjp, cond with a constant predicate, a while
    loop with a line-independent trip count, a reverse scan."""
    w1, w2, w3 = _mlp_weights(0)
    flag = jnp.asarray(1.0)

    @jax.jit
    def inner(h):
        return jax.nn.relu(h @ w2 - 0.1)

    def f(x):
        h = _leaky(x @ w1)
        h = lax.cond(flag > 0, inner, lambda h: -h, h)

        def body(c):
            i, h = c
            return i + 1, jnp.clip(h @ w2 + 0.05 * i, -1.0, 1.0)

        _, h = lax.while_loop(lambda c: c[0] < 3, body, (0, h))
        h, ys = lax.scan(lambda c, w: (jnp.abs(c - w), c), h, w2[:3], reverse=True)
        y = h @ w3
        return {"score": y + jnp.sum(ys), "top": jnp.argmax(y)}

    rng = np.random.default_rng(1)
    a, b = _normal(rng, 4), _normal(rng, 4)
    thr = float(jnp.median(f(a)["score"]))

    def g(x):
        out = f(x)
        return {**out, "mask": out["score"] > thr}

    def pick(out):
        return {"mask": out["mask"], "top": out["top"]}

    pieces = check_against_oracles(g, a, b, -2.0, 2.0, pick, pick)
    assert pieces.count > 5


def test_windows_give_the_same_pieces():
    """A small max_points forces windows; their boundaries inside a piece vanish."""
    w1, w2, w3 = _mlp_weights(2, width=10)

    def f(x):
        h = jax.nn.relu(x @ w1)
        y = jnp.abs(h @ w2) @ w3
        return {"score": y, "mask": y > 0.1}

    rng = np.random.default_rng(3)
    a, b = _normal(rng, 4), _normal(rng, 4)
    whole = enumerate_line(f, a, b, -3.0, 3.0, summary=lambda o: o["mask"])
    split = check_against_oracles(
        f,
        a,
        b,
        -3.0,
        3.0,
        lambda o: o["mask"],
        lambda o: o["mask"],
        max_points=whole.count // 3 + 3,
    )
    assert split.windows > 2
    np.testing.assert_allclose(split.z, whole.z, rtol=0, atol=RTOL * 6.0)
    np.testing.assert_array_equal(split.summary, whole.summary)
    # Joining windows needs only the end pieces' fingerprints.
    ends = enumerate_line(
        f, a, b, -3.0, 3.0, summary=lambda o: o["mask"],
        max_points=whole.count // 3 + 3, all_fingerprints=False,
    )  # fmt: skip
    assert ends.windows == split.windows
    np.testing.assert_array_equal(ends.z, split.z)
    np.testing.assert_array_equal(ends.summary, split.summary)
    have = ~np.isnan(ends.fingerprint)  # the pieces at the ends of windows
    assert have[0] and have[-1] and have.sum() <= 2 * ends.windows
    np.testing.assert_allclose(ends.fingerprint[have], split.fingerprint[have])


def _mask_mlp_line():
    """(f, a, b): a ReLU/abs MLP giving a mask, and a line through its input."""
    w1, w2, w3 = _mlp_weights(5, width=10)

    def f(x):
        h = jax.nn.relu(x @ w1)
        return jnp.abs(h @ w2) @ w3 > 0.1

    rng = np.random.default_rng(6)
    return f, _normal(rng, 4), _normal(rng, 4)


def test_chunked_runs_give_the_same_pieces(monkeypatch):
    """Fused runs called a few rows at a time (padding chunks skipped) change
    nothing."""
    from sijax.tracking.propagate import evaluator

    f, a, b = _mask_mlp_line()
    whole = enumerate_line(f, a, b, -3.0, 3.0, summary=lambda o: o)
    monkeypatch.setattr(evaluator, "MAX_ROWS", 8)
    monkeypatch.setattr(evaluator, "_RUNS", {})  # plans fix their chunk size
    chunked = enumerate_line(f, a, b, -3.0, 3.0, summary=lambda o: o)
    # Every run was planned in chunks of 8 rows, and the point buffers (32 rows
    # or more) went through the compiled loop over chunks.
    assert {plan.chunk for _, plan in evaluator._RUNS.values()} == {8}
    assert whole.count > 8 and chunked.count == whole.count
    np.testing.assert_allclose(chunked.z, whole.z, rtol=0, atol=RTOL * 6.0)
    np.testing.assert_array_equal(chunked.summary, whole.summary)


def test_programs_compile_per_buffer_size_not_per_point_count():
    """Lines with different numbers of points in the same buffer size reuse every
    compiled program (the summary included): a warm test compiles nothing new."""
    f, a, b = _mask_mlp_line()
    compiles = []

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        counts = []
        # The first calls compile (an equation is jitted at its call JIT_AFTER + 1).
        for z in (1.0,) * (JIT_AFTER + 1) + (0.6, 0.3):
            n0 = len(compiles)
            pieces = enumerate_line(f, a, b, -z, z, summary=lambda o: o)
            counts.append((pieces.count, len(compiles) - n0))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len({c for c, _ in counts}) > 2, counts  # different point counts
    assert counts[0][0] + 1 <= 32  # one buffer size (MIN_CAP) throughout
    assert [n for _, n in counts[JIT_AFTER + 1:]] == [0, 0], counts


def _mlp_with_params(params, x):
    w1, w2, w3 = params
    y = jnp.abs(jax.nn.relu(x @ w1) @ w2) @ w3
    return {"score": y, "mask": y > 0.1}


def test_params_are_inputs_of_one_trace():
    """f(params, x): other weights reuse the trace (the same jaxpr object) and give
    the pieces of the function with those weights closed over."""
    from sijax.tracking.propagate.driver import _JAXPRS

    rng = np.random.default_rng(8)
    a, b = _normal(rng, 4), _normal(rng, 4)
    for seed in (2, 3):
        w = _mlp_weights(seed, width=10)
        got = enumerate_line(
            _mlp_with_params, a, b, -3.0, 3.0, params=w, summary=lambda o: o["mask"]
        )
        want = enumerate_line(
            lambda x, w=w: _mlp_with_params(w, x), a, b, -3.0, 3.0,
            summary=lambda o: o["mask"],
        )  # fmt: skip
        assert got.count == want.count > 5
        np.testing.assert_array_equal(got.z, want.z)
        np.testing.assert_array_equal(got.summary, want.summary)
    assert len(_JAXPRS[_mlp_with_params]) == 1


@pytest.mark.parametrize("window_pieces", [3, 1000])
def test_line_cache_serves_the_pieces_of_the_whole_line(window_pieces):
    """Queries walking right and left from a point, as a search does, get the pieces
    of `enumerate_line` over the whole range (windows joined, no piece cut at a
    window end), with the walking tracker's convention at breakpoints; the ends of
    z_range cut the end pieces."""
    w = _mlp_weights(2, width=10)
    rng = np.random.default_rng(3)
    a, b = _normal(rng, 4), _normal(rng, 4)
    summary = lambda o: o["mask"]  # noqa: E731
    whole = enumerate_line(_mlp_with_params, a, b, -3.0, 3.0, params=w, summary=summary)
    cache = LineCache(
        _mlp_with_params, a, b, params=w, summary=summary, z_range=(-3.0, 3.0),
        width=0.1, window_pieces=window_pieces,
    )  # fmt: skip
    start = 0.5 * (whole.z[4] + whole.z[5])
    lo, hi, m = cache.piece(start, 1)
    got = [(lo, hi, m)]
    walk = track(lambda x: _mlp_with_params(w, x)["mask"])
    at = walk(a, b, start, 1)
    np.testing.assert_allclose([lo, hi], [at.lo, at.hi], rtol=0, atol=1e-9)
    while hi < 3.0:  # to the right, asking at each breakpoint
        lo, hi, m = cache.piece(hi, 1)
        got.append((lo, hi, m))
    lo = got[0][0]
    while lo > -3.0:
        lo, hi, m = cache.piece(lo, -1)
        got.insert(0, (lo, hi, m))
    z = np.array([p[0] for p in got] + [got[-1][1]])
    assert len(z) == len(whole.z)
    np.testing.assert_allclose(z, whole.z, rtol=0, atol=RTOL * 6.0)
    np.testing.assert_array_equal(np.stack([p[2] for p in got]), whole.summary)
    assert cache.windows > (5 if window_pieces == 3 else 0)
    assert cache.count == whole.count
    with pytest.raises(ValueError, match="outside z_range"):
        cache.piece(3.5, 1)


def test_devices_share_a_stretch_and_give_the_same_pieces(monkeypatch):
    """The stretch cut into one segment per device (four CPU devices in the tests),
    enumerated at once in threads and joined: the pieces of one device, each
    segment computed on its own device; a LineCache over the devices, or over
    segments enumerated apart and joined (join_pieces, as from worker processes),
    serves the same pieces as one over the default device."""
    devices = jax.devices()
    assert len(devices) >= 2  # conftest: four CPU devices
    w = _mlp_weights(2, width=10)
    rng = np.random.default_rng(3)
    a, b = _normal(rng, 4), _normal(rng, 4)
    summary = lambda o: o["mask"]  # noqa: E731
    one = enumerate_line(_mlp_with_params, a, b, -3.0, 3.0, params=w, summary=summary)
    from sijax.tracking.propagate import driver

    seen, run = [], driver._run_window

    def spy(closed, treedef, summarize, a, *rest):
        window, n = run(closed, treedef, summarize, a, *rest)
        seen.append(a.devices())  # the line is committed to the segment's device
        return window, n

    monkeypatch.setattr(driver, "_run_window", spy)
    many = enumerate_line(
        _mlp_with_params, a, b, -3.0, 3.0, params=w, summary=summary, devices=devices
    )
    monkeypatch.undo()
    assert many.windows == len(devices) and one.count > 2 * len(devices)
    np.testing.assert_allclose(many.z, one.z, rtol=0, atol=RTOL * 6.0)
    np.testing.assert_array_equal(many.summary, one.summary)
    assert [len(ds) for ds in seen] == [1] * len(devices)
    assert {d for ds in seen for d in ds} == set(devices)
    # A stretch too short to share stays on one device; an infinite one is refused.
    tiny = enumerate_line(_mlp_with_params, a, b, 0.0, 1e-9, params=w, devices=devices)
    assert tiny.windows == 1
    with pytest.raises(ValueError, match="finite"):
        enumerate_line(_mlp_with_params, a, b, 0.0, np.inf, params=w, devices=devices)
    with pytest.raises(ValueError, match="at least one device"):
        enumerate_line(_mlp_with_params, a, b, 0.0, 1.0, params=w, devices=[])
    # Segments enumerated apart and joined (what worker processes return, here
    # in this process): the pieces of the whole stretch.
    def three_segments(lo, hi):
        cuts = split_stretch(lo, hi, 3, DEFAULT_TIE_TOL)
        assert len(cuts) == 4 or hi - lo < 1e-5
        return join_pieces([
            enumerate_line(_mlp_with_params, a, b, cuts[i], cuts[i + 1], params=w,
                           summary=summary, all_fingerprints=False)
            for i in range(len(cuts) - 1)
        ])  # fmt: skip

    three_segments.size = 3
    joined = three_segments(-3.0, 3.0)
    assert joined.windows == 3 and joined.count == one.count
    np.testing.assert_allclose(joined.z, one.z, rtol=0, atol=RTOL * 6.0)
    np.testing.assert_array_equal(joined.summary, one.summary)
    walked = []
    for devs, segments in ((None, None), (devices[:2], None), (None, three_segments)):
        cache = LineCache(
            _mlp_with_params, a, b, params=w, summary=summary, z_range=(-3.0, 3.0),
            width=0.1, window_pieces=3, devices=devs, segments=segments,
        )  # fmt: skip
        hi, got = -3.0, []
        while hi < 3.0:
            lo, hi, m = cache.piece(hi, 1)
            got.append((lo, hi, bool(np.all(m))))
        walked.append(np.array(got))
    assert len(walked[0]) == len(walked[1]) == len(walked[2]) == one.count
    np.testing.assert_allclose(walked[1], walked[0], rtol=0, atol=RTOL * 6.0)
    np.testing.assert_allclose(walked[2], walked[0], rtol=0, atol=RTOL * 6.0)


def test_degenerate_stretch_and_bad_input():
    w1, _, w3 = _mlp_weights(4)

    def f(x):
        return jax.nn.relu(x @ w1) @ w3

    a, b = jnp.ones(4), jnp.ones(4)
    one = enumerate_line(f, a, b, 0.5, 0.5)
    assert one.count == 1 and one.z[0] == one.z[1] == 0.5
    with pytest.raises(ValueError, match="z_min <= z_max"):
        enumerate_line(f, a, b, 1.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        enumerate_line(f, a, jnp.ones(3), 0.0, 1.0)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda x: jnp.exp(x), "'exp'"),
        (lambda x: x * jax.nn.relu(x), "multiplies two line-dependent"),
        (lambda x: 1.0 / (jnp.abs(x) + 1.0), "divides by a line-dependent"),
        (lambda x: jnp.round(x).astype(jnp.int32), "'round'|rounds"),
        (lambda x: x.astype(jnp.int32), "rounds a line-dependent"),
        (lambda x: jax.nn.sigmoid(x), "logistic"),
        (lambda x: x**2, "x \\*\\* 2"),
    ],
)
def test_not_piecewise_linear_raises(fn, match):
    with pytest.raises(NotPiecewiseLinearError, match=match):
        enumerate_line(fn, jnp.ones(3), jnp.ones(3), -1.0, 1.0)


def test_constants_and_piecewise_constant_values_allow_any_primitive():
    """exp of a constant or of a piecewise-constant value (a sign) is fine."""
    c = jnp.asarray([0.5, -1.0, 2.0])

    def f(x):
        return jnp.exp(jnp.sign(x)) * x + jnp.exp(c)

    pieces = check_against_oracles(
        lambda x: {"y": f(x), "up": jnp.sign(x) > 0},
        jnp.asarray([0.1, -0.3, 0.2]),
        jnp.ones(3),
        -1.0,
        1.0,
        lambda o: o["up"],
        lambda o: o["up"],
    )
    assert pieces.count == 4  # the three sign changes


def test_line_dependent_control_flow_raises():
    def branchy(x):
        return lax.cond(jnp.sum(x) > 0, lambda h: h, lambda h: -h, x)

    def loopy(x):
        return lax.while_loop(lambda h: jnp.sum(h) < 5, lambda h: h + 1.0, x)

    for fn in (branchy, loopy):
        with pytest.raises(LineDependentControlError, match="depends on the line"):
            enumerate_line(fn, jnp.ones(3), jnp.ones(3), -1.0, 1.0)


# -------------------------------------------------------------- trained sampler

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints")


@pytest.mark.slow
def test_trained_tiny_sampler_matches_walking_and_grid():
    """The real pipeline: trained tiny U-Net, 5 DDIM steps from t' = 460 (lax.scan),
    3x3 mean filter, abs, threshold 0.8 (as tests/test_tracking_sampler.py)."""
    from _oracles import SIZE, line_through, tiny_checkpoint_detector

    f = tiny_checkpoint_detector(4)
    x_obs = np.random.default_rng(5).normal(size=(SIZE, SIZE, 1))
    a, b, z_obs = line_through(x_obs, 6)
    mask_obs = np.asarray(f(a + b * z_obs)["mask"])

    def same_region(out):  # per piece, for both enumerators
        return jnp.all(out["mask"] == mask_obs)

    def same_region_grid(out):  # on the batch of direct evaluations
        return np.all(np.asarray(out["mask"]) == mask_obs[None], axis=(1, 2))

    pieces = check_against_oracles(
        f, a, b, z_obs - 1.5, z_obs + 1.5, same_region, same_region_grid
    )
    assert pieces.count > 10
    assert np.any(pieces.summary) and not np.all(pieces.summary)
