"""Unit tests of the tracker: rules, ties, control flow, errors, jit/vmap, search."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import check_piece, check_tiling_and_grid
from jax import lax

from sijax.errors import NotPiecewiseLinearError
from sijax.tracking import (
    COVERED,
    MAX_PIECES,
    Affine,
    MaxPiecesError,
    Piece,
    check_pieces,
    enumerate_pieces,
    evaluate,
    track,
)

INF = float("inf")


def _line(n=6, seed=0, shape=None):
    rng = np.random.default_rng(seed)
    shape = shape or (n,)
    return jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=shape))


def _mlp_params(seed=1, n=6, width=10):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(n, width)) / np.sqrt(n)),
        jnp.asarray(rng.normal(size=width) * 0.3),
        jnp.asarray(rng.normal(size=(width, 2)) / np.sqrt(width)),
    )


def _mlp(params, x):
    w1, c1, w2 = params
    y = jax.nn.relu(x @ w1 + c1) @ w2
    return {"y": y, "mask": y > 0.1, "top": jnp.argmax(y)}


# ------------------------------------------------------------------- ties / rules


def test_relu_piece_and_both_sides_of_a_breakpoint():
    f = jax.nn.relu
    a, b = jnp.array([-1.0]), jnp.array([1.0])
    p = track(f)(a, b, 0.3)
    assert (float(p.lo), float(p.hi)) == (-INF, 1.0)
    np.testing.assert_array_equal(p.out.beta, [0.0])
    right = track(f)(a, b, 1.0, 1)
    left = track(f)(a, b, 1.0, -1)
    assert (float(right.lo), float(right.hi)) == (1.0, INF)
    assert (float(left.lo), float(left.hi)) == (-INF, 1.0)
    np.testing.assert_array_equal(right.out.beta, [1.0])
    np.testing.assert_array_equal(right.out.alpha, [-1.0])
    np.testing.assert_array_equal(left.out.beta, [0.0])


def test_comparisons_on_a_breakpoint_follow_the_direction():
    def f(x):
        return {"gt": x > 0, "ge": x >= 0, "lt": x < 0, "le": x <= 0}, (
            x == 0,
            x != 0,
            jnp.sign(x),
            (x - x) == 0,  # identically zero: eq holds everywhere
        )

    a, b = jnp.array([0.0]), jnp.array([2.0])
    for d, want in ((1, [1, 1, 0, 0]), (-1, [0, 0, 1, 1])):
        p = track(f)(a, b, 0.0, d)
        got = [bool(p.out[0][k][0]) for k in ("gt", "ge", "lt", "le")]
        assert got == [bool(w) for w in want]
        eq, ne, sign, always = p.out[1]
        assert not bool(eq[0]) and bool(ne[0]) and bool(always[0])
        np.testing.assert_array_equal(sign.alpha, [float(d)])
        assert float(p.lo if d == 1 else p.hi) == 0.0
        assert not np.isfinite(float(p.hi if d == 1 else p.lo))


def test_max_ties_pick_the_winner_on_the_chosen_side():
    a, b = jnp.array([0.0, 0.0, -5.0]), jnp.array([1.0, -1.0, 0.0])

    def f(x):
        return jnp.max(x), jnp.argmax(x), jnp.min(x), jnp.argmin(x)

    right = track(f)(a, b, 0.0, 1)
    left = track(f)(a, b, 0.0, -1)
    assert int(right.out[1]) == 0 and int(left.out[1]) == 1
    assert float(right.out[0].beta) == 1.0 and float(left.out[0].beta) == -1.0
    # min: -5 wins until the slope -1 entry crosses it at t = 5 (t = -5 on the left).
    assert int(right.out[3]) == 2 and int(left.out[3]) == 2
    assert (float(right.lo), float(right.hi)) == (0.0, 5.0)
    assert (float(left.lo), float(left.hi)) == (-5.0, 0.0)
    p = track(f)(a, b, 1.0, 1)
    assert (float(p.lo), float(p.hi)) == (0.0, 5.0)
    # Identical entries: the first index wins and nothing ever changes.
    q = track(jnp.argmax)(jnp.zeros(3), jnp.ones(3), 0.7)
    assert int(q.out) == 0 and (float(q.lo), float(q.hi)) == (-INF, INF)


def test_abs_clamp_and_min():
    a, b = jnp.array([-1.0, 2.0, 0.5]), jnp.array([1.0, -1.0, 0.0])

    def f(x):
        return jnp.abs(x) + lax.clamp(-0.5, x, 0.5) + jnp.minimum(x, 0.2)

    for z in (-3.0, 0.0, 0.75, 1.6, 4.0):
        check_piece(f, a, b, z, 1, np.random.default_rng(0))
    p = track(f)(a, b, 0.75)
    # Entry 0 breaks at 0.5, 1.0, 1.2, 1.5; entry 1 at 1.5, 1.8, 2.0, 2.5.
    assert (float(p.lo), float(p.hi)) == (0.5, 1.0)


def test_linear_primitives_are_exact_everywhere():
    a, b = _line(shape=(4, 3))
    idx = jnp.array([2, 0, 3])
    mask = jnp.array([[True, False, True]] * 4)

    def f(x):
        y = jnp.concatenate([x, jnp.ones((4, 1))], axis=1)  # concat with a constant
        y = jnp.pad(y, ((1, 0), (0, 2)), constant_values=0.5)
        y = jnp.cumsum(y, axis=0)[::-1].T  # cumsum, rev, transpose
        y = y[:, idx] + y[1:4, :3].sum()  # gather, slice, reduce_sum
        z = lax.dynamic_slice(x, (1, 0), (2, 3))
        z = lax.dynamic_update_slice(jnp.zeros((4, 3)), z * 2.0, (2, 0))
        z = z.at[idx, 1].add(x[0, 0]) + jnp.where(mask, x, -x)  # scatter-add, select
        w = jnp.squeeze(jnp.expand_dims(x, 0), 0).reshape(3, 4) / 4.0
        w = lax.stop_gradient(w) @ jnp.arange(4.0) - jnp.mean(x)
        s = jnp.stack(jnp.split(x, 3, axis=1), axis=0)  # split, stack
        # unstack: the transpose of stack, met in backward passes (MDPS guidance)
        u = jax.vjp(lambda v: jnp.stack([v, 2.0 * v], axis=1), jnp.ones((4, 3)))[1](
            jnp.stack([x, -x], axis=1))[0]
        return y, z, w, x.astype(jnp.float64), s, u

    p = track(f)(a, b, 0.4)
    assert (float(p.lo), float(p.hi)) == (-INF, INF)
    check_piece(f, a, b, 0.4, 1, np.random.default_rng(1))


def test_pooling_and_resize_primitives():
    a, b = _line(shape=(6, 6, 2), seed=3)

    def f(x):
        m = nn.max_pool(x[None], (3, 3), (1, 1), padding="SAME")[0]
        n = lax.reduce_window(x, jnp.inf, lax.min, (2, 2, 1), (2, 2, 1), "VALID")
        avg = nn.avg_pool(x[None], (2, 2), (2, 2))[0]
        up = jax.image.resize(avg, (6, 6, 2), "bilinear")
        near = jax.image.resize(n, (6, 6, 2), "nearest")
        # Non-literal initial values give the generic reduce_window primitive.
        zero, low = jnp.zeros((), x.dtype), jnp.full((), -1.0, x.dtype)
        s = lax.reduce_window(x, zero, lax.add, (3, 3, 1), (1, 1, 1), "SAME")
        g = lax.reduce_window(x, low, lax.max, (2, 2, 1), (1, 1, 1), "SAME")
        return m + up - near + s / 9.0 - g

    for z in (-1.0, 0.3):
        check_piece(f, a, b, z, 1, np.random.default_rng(2))


def test_large_z_stays_accurate():
    params = _mlp_params()
    a, b = _line(seed=4)
    f = lambda x: _mlp(params, x)  # noqa: E731
    for z in (-35.0, 40.0):
        check_piece(f, a, b, z, 1, np.random.default_rng(3))


# ------------------------------------------------------------------- control flow


def test_scan_carry_that_becomes_line_dependent():
    a, b = _line(n=4, seed=5)
    noises = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)))

    def f(x):
        def step(carry, noise):
            acc, count = carry  # acc starts constant, becomes line-dependent
            acc = jax.nn.relu(acc + x + noise)
            return (acc, count + 1), jnp.sum(acc)

        (acc, count), ys = lax.scan(step, (jnp.zeros(4), 0), noises)
        return acc, count, ys, acc > 0

    p = check_piece(f, a, b, 0.2, 1, np.random.default_rng(4))
    assert int(p.out[1]) == 3
    check_tiling_and_grid(f, a, b, -2.0, 2.0, lambda o: o[3], lambda o: o[3])


def test_cond_and_while_with_line_dependent_decisions():
    a, b = _line(n=3, seed=6)

    def f(x):
        y = lax.cond(jnp.sum(x) > 0.0, lambda v: 2.0 * v, lambda v: jnp.abs(v), x)

        def body(c):
            v, k = c
            return v * 0.5, k + 1

        # The trip count depends on the line; it is constant on each piece.
        v, k = lax.while_loop(
            lambda c: (jnp.max(c[0]) > 0.3) & (c[1] < 6), body, (y, 0)
        )
        w = lax.fori_loop(0, 3, lambda i, u: jnp.maximum(u, 0.0) - 0.1, x)
        return v + w, k

    for z in (-1.5, 0.1, 1.2):
        check_piece(f, a, b, z, 1, np.random.default_rng(5))
    pieces = check_tiling_and_grid(f, a, b, -4.0, 4.0, lambda o: o[1], lambda o: o[1])
    assert len(set(np.asarray(pieces.summary[: int(pieces.count)]).tolist())) > 1


def test_custom_vjp_checkpoint_and_nested_jit():
    @jax.custom_vjp
    def clip_grad(x):
        return jnp.maximum(x, -0.2)

    clip_grad.defvjp(lambda x: (clip_grad(x), None), lambda _, g: (g,))

    @jax.jit
    def inner(x):
        return jax.checkpoint(lambda v: jnp.abs(v - 0.3))(x)

    a, b = _line(n=5, seed=7)
    f = lambda x: clip_grad(inner(x)) - jax.nn.relu(x)  # noqa: E731
    check_piece(f, a, b, 0.4, -1, np.random.default_rng(6))


# ------------------------------------------------------------------------- errors


def _group_norm(x):
    mu = jnp.mean(x)
    return (x - mu) * lax.rsqrt(jnp.mean((x - mu) ** 2) + 1e-5)


@pytest.mark.parametrize(
    "f, primitive",
    [
        (lambda x: jax.nn.silu(x), "logistic"),
        (lambda x: jnp.exp(x), "exp"),
        (lambda x: x * x, "mul"),
        (lambda x: jax.nn.softmax(x), "exp"),
        (_group_norm, "integer_pow"),
        (lambda x: x / (1.0 + jnp.abs(x)), "div"),
        (lambda x: jnp.floor(x), "floor"),
        (lambda x: x.astype(jnp.int32), "convert_element_type"),
    ],
)
def test_not_piecewise_linear_names_primitive_and_line(f, primitive):
    a, b = _line(n=4)
    with pytest.raises(NotPiecewiseLinearError) as info:
        track(f)(a, b, 0.0)
    msg = str(info.value)
    assert f"'{primitive}'" in msg
    assert "test_tracking.py" in msg  # the user's line, not jax's


def test_constants_may_use_any_primitive():
    w = jnp.arange(4.0)
    f = lambda x: x * jnp.exp(w) + jax.nn.silu(w) * jnp.sum(w * w)  # noqa: E731
    a, b = _line(n=4)
    p = track(f)(a, b, 0.0)
    np.testing.assert_allclose(p.out.beta, b * jnp.exp(w))


def test_input_validation():
    a, b = _line(n=4)
    with pytest.raises(ValueError, match="same shape"):
        track(jax.nn.relu)(a, b[:3], 0.0)
    with pytest.raises(ValueError, match="direction"):
        track(jax.nn.relu)(a, b, 0.0, 0)
    with pytest.raises(ValueError, match="z_min <= z_max"):
        enumerate_pieces(jax.nn.relu, a, b, 1.0, 0.0, max_pieces=4)
    with pytest.raises(ValueError, match="max_pieces"):
        enumerate_pieces(jax.nn.relu, a, b, 0.0, 1.0, max_pieces=0)


# ----------------------------------------------------------------- jit, vmap, traces


def test_jit_equals_eager_and_vmap_equals_loop_without_retrace():
    params = _mlp_params()
    a, b = _line(seed=8)
    traces = []

    def f(x):
        traces.append(1)
        return _mlp(params, x)

    zs = jnp.linspace(-3.0, 3.0, 64)
    jitted = jax.jit(track(f))
    one = jitted(a, b, zs[7])
    jitted(a, b, zs[9])
    assert len(traces) == 1
    _assert_pieces_close(one, track(f)(a, b, zs[7]))

    batched = jax.jit(jax.vmap(track(f), in_axes=(None, None, 0)))
    many = batched(a, b, zs)
    batched(a, b, zs + 0.01)
    assert len(traces) <= 2  # jax may reuse the trace of f for the same shape
    for i in range(0, 64, 9):
        _assert_pieces_close(
            jax.tree.map(lambda v, i=i: v[i], many), jitted(a, b, zs[i])
        )


def _assert_pieces_close(p: Piece, q: Piece):
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(x, y)


def test_closed_over_tracers_and_params_as_arguments():
    params = _mlp_params()
    a, b = _line(seed=9)

    @jax.jit
    def run(params, a, b, z):
        return track(lambda x: _mlp(params, x))(a, b, z)

    p = run(params, a, b, 0.5)
    q = track(lambda x: _mlp(params, x))(a, b, 0.5)
    _assert_pieces_close(p, q)
    assert isinstance(p.out["y"], Affine)
    assert p.out["mask"].dtype == jnp.bool_ and p.out["top"].shape == ()
    np.testing.assert_allclose(
        evaluate(p, 0.5)["y"], _mlp(params, a + 0.5 * b)["y"], rtol=1e-12
    )


# ------------------------------------------------------------------------- search


def test_walking_both_ways_reproduces_enumerate_pieces():
    params = _mlp_params(seed=2)
    a, b = _line(seed=10)
    f = lambda x: _mlp(params, x)  # noqa: E731
    step = jax.jit(track(f))
    z0, z_min, z_max = 0.3, -2.0, 2.0
    ends = []
    piece = step(a, b, z0, 1)
    start = piece
    while float(piece.hi) < z_max:
        ends.append(float(piece.hi))
        piece = step(a, b, piece.hi, 1)
    piece = start
    while float(piece.lo) > z_min:
        ends.append(float(piece.lo))
        piece = step(a, b, piece.lo, -1)
    pieces = enumerate_pieces(f, a, b, z_min, z_max, max_pieces=256)
    count = int(pieces.count)
    assert int(pieces.status) == COVERED and count > 5
    np.testing.assert_allclose(
        sorted(ends), np.asarray(pieces.hi[: count - 1]), rtol=0, atol=1e-12
    )


def test_enumerate_traces_once_vmaps_over_lines_and_reports_overflow():
    params = _mlp_params(seed=3)
    traces = []

    def f(x):
        traces.append(1)
        return _mlp(params, x)

    rng = np.random.default_rng(11)
    a = jnp.asarray(rng.normal(size=(4, 6)))
    b = jnp.asarray(rng.normal(size=(4, 6)))
    run = jax.jit(
        jax.vmap(
            lambda a, b: enumerate_pieces(
                f, a, b, -2.0, 2.0, max_pieces=128, summary=lambda o: o["mask"]
            )
        )
    )
    batched = run(a, b)
    run(a + 1.0, b)
    assert len(traces) == 1
    for i in range(4):
        one = enumerate_pieces(f, a[i], b[i], -2.0, 2.0, max_pieces=128)
        n = int(one.count)
        assert int(batched.count[i]) == n
        np.testing.assert_allclose(batched.hi[i, :n], one.hi[:n], rtol=1e-12)
        assert batched.summary.shape == (4, 128, 2)

    small = enumerate_pieces(f, a[0], b[0], -2.0, 2.0, max_pieces=2)
    assert int(small.status) == MAX_PIECES and int(small.count) == 2
    with pytest.raises(MaxPiecesError, match="max_pieces"):
        check_pieces(small)
    with pytest.raises(MaxPiecesError, match="max_pieces"):
        enumerate_pieces(f, a[0], b[0], -2.0, 2.0, max_pieces=2, throw=True)
    with pytest.raises(Exception, match="increase max_pieces"):
        jax.jit(
            lambda a, b: enumerate_pieces(f, a, b, -2.0, 2.0, max_pieces=2, throw=True)
        )(a[0], b[0]).count.block_until_ready()
    single = enumerate_pieces(f, a[0], b[0], 0.5, 0.5, max_pieces=3)
    assert int(single.count) == 1 and float(single.lo[0]) == float(single.hi[0]) == 0.5
