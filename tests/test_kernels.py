"""The Pallas decide kernel against its jnp twin, in interpret mode on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sijax.kernels import decide as K
from sijax.tracking import enumerate_pieces


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5, 8), (2, 1500)])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_kernel_equals_reference(shape, direction):
    rng = np.random.default_rng(sum(shape) + int(direction > 0))
    v = rng.standard_normal(shape)
    s = rng.standard_normal(shape)
    if v.size > 4:  # ties at z, zero slopes, and units exactly on a crossing
        v.flat[0], s.flat[1], v.flat[2], s.flat[2] = 0.0, 0.0, 0.0, 0.0
    args = (jnp.asarray(v), jnp.asarray(s), 0.25, direction, 1e-10)
    want = K.decide_reference(*args)
    got = K.decide_pallas(*args, interpret=True, block=128)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    sigma, lo, hi = got
    assert lo <= 0.25 <= hi


def test_tracker_with_kernel_gives_the_same_pieces(monkeypatch):
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 16)), rng.standard_normal((16, 3))

    def f(x):
        return jnp.abs(jax.nn.relu(x @ w1) @ w2) > 1.0

    a, b = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal(6))

    def pieces():
        return enumerate_pieces(
            lambda x: f(x), a, b, -3.0, 3.0, max_pieces=200, summary=lambda m: m
        )

    monkeypatch.setenv("SIJAX_PALLAS_DECIDE", "0")
    want = pieces()
    monkeypatch.setenv("SIJAX_PALLAS_DECIDE", "1")
    assert K.enabled()
    got = pieces()
    assert int(got.count) == int(want.count) > 3
    np.testing.assert_array_equal(np.asarray(got.lo), np.asarray(want.lo))
    np.testing.assert_array_equal(np.asarray(got.summary), np.asarray(want.summary))
