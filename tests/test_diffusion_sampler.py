"""The DDIM reconstruction D(x) (docs/method.md §6) against a step-by-step NumPy
oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusion_helpers import random_model

from sijax.diffusion.sampler import (
    DAL_STEPS,
    Noises,
    ddim_coefficients,
    draw_noises,
    reconstruct,
    sample,
)
from sijax.diffusion.schedule import linear_schedule

SCHEDULE = linear_schedule()


@pytest.fixture(scope="module")
def model():
    return random_model(seed=7)


def test_spec_constants():
    co = ddim_coefficients(SCHEDULE, DAL_STEPS, eta=1.0)
    assert abs(co.ab_t[0] - 0.114760) < 5e-7
    np.testing.assert_allclose(co.c1, [0.697120, 0.542744, 0.325988, 0.009997, 0.0],
                               atol=5e-7)
    np.testing.assert_allclose(co.c2, [0.469756, 0.360953, 0.168367, 0.000254, 0.0],
                               atol=5e-7)
    assert co.s[-1] == -1 and co.ab_s[-1] == 1.0
    with pytest.raises(ValueError):
        ddim_coefficients(SCHEDULE, (0, 115))


def numpy_reconstruct(eps_np, x, eps0, eps, steps):
    """Step-by-step NumPy implementation of docs/method.md §6 (its own alpha_bar)."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ab_all = np.cumprod(1.0 - betas)

    def ab(t):
        return 1.0 if t < 0 else ab_all[t]

    t0 = steps[0]
    x_t = np.sqrt(ab(t0)) * x + np.sqrt(1.0 - ab(t0)) * eps0
    for k, t in enumerate(steps):
        s = steps[k + 1] if k + 1 < len(steps) else -1
        e_hat = eps_np(x_t, t)
        x0_hat = (x_t - np.sqrt(1.0 - ab(t)) * e_hat) / np.sqrt(ab(t))
        c1 = np.sqrt((1.0 - ab(t) / ab(s)) * (1.0 - ab(s)) / (1.0 - ab(t)))
        c2 = np.sqrt(1.0 - ab(s) - c1**2)
        x_t = np.sqrt(ab(s)) * x0_hat + c1 * eps[k] + c2 * e_hat
    return x_t


@pytest.mark.parametrize("steps", [DAL_STEPS, (700, 300, 10)])
def test_reconstruct_matches_numpy_oracle(model, steps):
    eps_jit = jax.jit(model.denoiser())

    def eps_np(x_t, t):  # the same network, called once per step from NumPy
        return np.asarray(eps_jit(jnp.asarray(x_t), float(t)))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 1))
    noises = draw_noises(jax.random.key(3), x.shape, len(steps))
    got = jax.jit(lambda x, n: reconstruct(model.denoiser(), x, n, schedule=SCHEDULE,
                                           steps=steps))(jnp.asarray(x), noises)
    want = numpy_reconstruct(eps_np, x, np.asarray(noises.eps0),
                             np.asarray(noises.eps), steps)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-10)
    assert np.abs(want - x).max() > 1e-3  # not trivially the identity


def test_reconstruct_deterministic_jit_and_vmap(model):
    """Bit-identical across calls and between single-image jit and vmapped batches."""
    traces = []

    def one(x, n):
        traces.append(1)  # counts traces
        return reconstruct(model.denoiser(), x, n, schedule=SCHEDULE)

    single = jax.jit(one)
    batched = jax.jit(jax.vmap(one))
    xs = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    noises = jax.vmap(lambda k: draw_noises(k, (8, 8, 1), 5))(
        jax.random.split(jax.random.key(2), 6))
    out_b = batched(xs, noises)
    for i in range(6):
        n_i = Noises(noises.eps0[i], noises.eps[i])
        r1, r2 = single(xs[i], n_i), single(xs[i], n_i)
        assert np.array_equal(r1, r2)
        assert np.array_equal(r1, out_b[i]), np.abs(r1 - out_b[i]).max()
    assert np.array_equal(batched(xs, noises), out_b)
    assert len(traces) == 2  # one trace per (function, shape)


def test_reconstruct_depends_only_on_inputs(model):
    x = jnp.zeros((8, 8, 1))
    n1 = draw_noises(jax.random.key(0), x.shape, 5)
    n2 = draw_noises(jax.random.key(1), x.shape, 5)
    f = jax.jit(lambda x, n: reconstruct(model.denoiser(), x, n, schedule=SCHEDULE))
    assert not np.allclose(f(x, n1), f(x, n2))
    # The last step's noise is unused (c1 = 0 towards t = -1).
    n3 = Noises(n1.eps0, n1.eps.at[-1].set(123.0))
    assert np.array_equal(f(x, n1), f(x, n3))


def test_sample_shapes_and_ddim_eta0(model):
    out = jax.jit(lambda k: sample(model.denoiser(), k, (8, 8, 1), schedule=SCHEDULE,
                                   steps=(999, 500, 0)))(jax.random.key(0))
    assert out.shape == (8, 8, 1) and np.all(np.isfinite(out))
    # eta = 0 ignores the per-step noise: deterministic given x_T.
    a = sample(model.denoiser(), jax.random.key(0), (8, 8, 1), schedule=SCHEDULE,
               steps=(999, 500, 0), eta=0.0)
    assert np.all(np.isfinite(a))
