"""The AnoDDPM detector (docs/detectors/anoddpm.md): its simplex noise, its chain
against the DDPM equations, exactness of its test, and its simplex-noise training."""

import dataclasses
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import check_exhaustive_on_grid, planted_example, tiny_serving

import sijax
from sijax.checkpoint import load_model
from sijax.detect.dal import DALConfig, detect_region
from sijax.detectors import anoddpm
from sijax.detectors.simplex import (
    F2,
    FIELD_VARIANCE,
    G2,
    R2,
    simplex_field,
    simplex_noise,
    vertex_gradients,
)
from sijax.diffusion.sampler import Noises
from sijax.errors import InputError, NotPiecewiseLinearError
from sijax.train import train

SHAPE = (8, 8, 1)
TINY = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8")
FAST = dict(t_lambda=250, stride=125)  # three network calls: 250, 125, 0


@pytest.fixture(scope="module")
def model():
    return tiny_serving("anoddpm", **FAST)


@pytest.fixture(scope="module")
def data(model):
    return planted_example(model, SHAPE)


# --- the noise -----------------------------------------------------------------


def test_simplex_noise_shape_dtype_and_determinism():
    key = jax.random.key(11)
    n = simplex_noise(key, (3, 8, 8, 2), wavelength=4.0)
    assert n.shape == (3, 8, 8, 2) and n.dtype == jnp.float64
    assert np.all(np.isfinite(np.asarray(n)))
    np.testing.assert_array_equal(n, simplex_noise(key, (3, 8, 8, 2), wavelength=4.0))
    other = simplex_noise(jax.random.key(12), (3, 8, 8, 2), wavelength=4.0)
    assert not np.allclose(n, other)
    # Every channel and leading index is its own draw.
    assert not np.allclose(n[0, ..., 0], n[0, ..., 1])
    assert not np.allclose(n[0], n[1])
    f32 = simplex_noise(key, (8, 8, 1), dtype=jnp.float32)
    assert f32.dtype == jnp.float32


def test_simplex_noise_moments_and_spatial_correlation():
    """Zero mean and unit variance per pixel over many draws; neighbours correlated
    (white noise: 0), for one octave and for the paper's six."""
    keys = jax.random.split(jax.random.key(0), 2000)
    one = np.asarray(jax.vmap(lambda k: simplex_field(k, (8, 8), 4.0))(keys))
    many = np.asarray(simplex_noise(jax.random.key(1), (800, 12, 12, 1),
                                    wavelength=12.0))[..., 0]
    white = np.asarray(jax.random.normal(jax.random.key(2), (2000, 8, 8)))
    for n in (one, many):
        assert abs(n.mean()) < 0.04
        assert abs(n.var() - 1.0) < 0.05
    # Per pixel (2000 draws: standard error of the variance about 0.03).
    assert np.abs(one.mean(axis=0)).max() < 0.1
    assert one.var(axis=0).min() > 0.88 and one.var(axis=0).max() < 1.12
    lag1 = lambda n: float(np.mean(n[:, :, 1:] * n[:, :, :-1]))  # noqa: E731
    assert lag1(one) > 0.35 and lag1(many) > 0.35
    assert abs(lag1(white)) < 0.03
    # Rows and columns alike.
    assert abs(lag1(one) - float(np.mean(one[:, 1:] * one[:, :-1]))) < 0.05


def test_simplex_field_equals_the_sum_over_all_lattice_vertices():
    """The three corners of the triangle are every vertex within the kernel radius:
    the field equals a brute-force sum over a whole block of the lattice."""
    key, wavelength = jax.random.key(5), 3.0
    field = np.asarray(simplex_field(key, (6, 7), wavelength))
    k_offset, k_grad = jax.random.split(key)
    u = np.asarray(jax.random.uniform(k_offset, (2,), jnp.float64))
    offset = u - G2 * u.sum()
    ij = np.stack(np.meshgrid(np.arange(6.0), np.arange(7.0), indexing="ij"), -1)
    p = ij / wavelength + offset
    top = int(np.ceil((p.sum(-1) * (1 + 2 * F2)).max())) + 2
    verts = np.stack(np.meshgrid(np.arange(top), np.arange(top), indexing="ij"),
                     -1).reshape(-1, 2)
    grads = np.asarray(vertex_gradients(k_grad, jnp.asarray(verts), jnp.float64))
    xy = verts - G2 * verts.sum(-1, keepdims=True)
    d = p[:, :, None, :] - xy[None, None]
    fall = np.maximum(R2 - np.sum(d * d, -1), 0.0) ** 4
    want = np.sum(fall * np.sum(d * grads[None, None], -1), -1)
    np.testing.assert_allclose(field, want / math.sqrt(FIELD_VARIANCE),
                               rtol=1e-10, atol=1e-12)


def test_draw_noises_are_simplex_or_gaussian(model):
    opts = model.options
    nz = anoddpm.draw_noises(jax.random.key(3), SHAPE, opts)
    assert nz.eps0.shape == SHAPE and nz.eps.shape == (3, *SHAPE)
    k0, k1 = jax.random.split(jax.random.key(3))
    np.testing.assert_array_equal(nz.eps0, simplex_noise(
        k0, SHAPE, octaves=6, persistence=0.8, wavelength=64.0 * 8 / 256))
    gauss = anoddpm.draw_noises(jax.random.key(3), SHAPE,
                                dataclasses.replace(opts, noise="gaussian"))
    np.testing.assert_array_equal(gauss.eps, jax.random.normal(k1, (3, *SHAPE)))
    assert anoddpm.wavelength(opts, (32, 32, 3)) == 8.0


def test_options_are_validated(model):
    for bad in (dict(t_lambda=-1), dict(stride=0), dict(eta=1.5), dict(octaves=0),
                dict(noise="perlin"), dict(persistence=0.0), dict(frequency=-2.0),
                dict(filter_size=2)):
        with pytest.raises(InputError, match="anoddpm options"):
            model.with_options(**bad)
    with pytest.raises(InputError, match="below the schedule's T=1000"):
        model.with_options(t_lambda=1000).reconstruction(
            jnp.zeros(SHAPE), model.draw_noises(jax.random.key(0)), steps=None, eta=1.0)


# --- the chain against the paper's equations ----------------------------------


def _eps(model):
    eps_fn = jax.jit(model.denoiser())
    return lambda x, t: np.asarray(eps_fn(jnp.asarray(x), jnp.asarray(float(t))))


def ddpm_oracle(eps_fn, x, noises, betas, t_lambda):
    """The DDPM ancestral chain (Ho et al. eq. 6-7, posterior variance beta~_t) from
    x_lambda = sqrt(ab) x + sqrt(1 - ab) n_0, in NumPy, one step at a time."""
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    x_t = np.sqrt(ab[t_lambda]) * x + np.sqrt(1 - ab[t_lambda]) * np.asarray(
        noises.eps0)
    for k, t in enumerate(range(t_lambda, -1, -1)):
        x0_hat = (x_t - np.sqrt(1 - ab[t]) * eps_fn(x_t, t)) / np.sqrt(ab[t])
        mean = (betas[t] * np.sqrt(ab_prev[t]) / (1 - ab[t]) * x0_hat
                + (1 - ab_prev[t]) * np.sqrt(alphas[t]) / (1 - ab[t]) * x_t)
        var = betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
        x_t = mean + np.sqrt(var) * np.asarray(noises.eps[k])
    return x_t


def ddim_oracle(eps_fn, x, noises, ab, steps, eta):
    """DDIM (Song et al. eq. 12) over ``steps`` with noises n_k, in NumPy."""
    x_t = np.sqrt(ab[steps[0]]) * x + np.sqrt(1 - ab[steps[0]]) * np.asarray(
        noises.eps0)
    for k, t in enumerate(steps):
        a_s = ab[steps[k + 1]] if k + 1 < len(steps) else 1.0
        e = eps_fn(x_t, t)
        x0_hat = (x_t - np.sqrt(1 - ab[t]) * e) / np.sqrt(ab[t])
        sig = eta * np.sqrt((1 - a_s) / (1 - ab[t]) * (1 - ab[t] / a_s))
        x_t = (np.sqrt(a_s) * x0_hat + np.sqrt(1 - a_s - sig**2) * e
               + sig * np.asarray(noises.eps[k]))
    return x_t


def test_full_chain_is_the_ddpm_ancestral_chain(model):
    """stride 1, eta 1: exactly the paper's DDPM reverse chain from t = lambda."""
    m = model.with_options(t_lambda=5, stride=1)
    x = np.random.default_rng(0).standard_normal(SHAPE)
    nz = m.draw_noises(jax.random.key(4))
    assert nz.eps.shape == (6, *SHAPE)
    got = m.reconstruction(jnp.asarray(x), nz, steps=None, eta=1.0)
    want = ddpm_oracle(_eps(m), x, nz, np.asarray(m.schedule.betas), 5)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_strided_chain_follows_the_ddim_equations(model):
    eta = 0.5
    m = model.with_options(t_lambda=30, stride=7, eta=eta)
    steps = (30, 23, 16, 9, 2)
    assert anoddpm.steps_of(m.options) == steps
    x = np.random.default_rng(1).standard_normal(SHAPE)
    nz = m.draw_noises(jax.random.key(5))
    got = m.reconstruction(jnp.asarray(x), nz, steps=None, eta=1.0)
    want = ddim_oracle(_eps(m), x, nz, np.asarray(m.schedule.alpha_bar), steps, eta)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_score_is_the_summed_absolute_error_and_published_the_squared():
    rng = np.random.default_rng(2)
    x, rec = rng.standard_normal((8, 8, 2)), rng.standard_normal((8, 8, 2))
    opts = anoddpm.Options()
    raw = np.abs(rec - x).sum(-1)
    np.testing.assert_allclose(
        anoddpm.score(x, rec, dataclasses.replace(opts, filter_size=1)), raw,
        rtol=1e-12)
    e = np.pad(raw, 1)
    want = sum(e[i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9
    np.testing.assert_allclose(anoddpm.score(x, rec, opts), want, rtol=1e-12)
    # The paper's map: squared error, unfiltered whatever filter_size says.
    pub = anoddpm.score(x, rec, dataclasses.replace(opts, published=True))
    np.testing.assert_allclose(pub, ((rec - x) ** 2).sum(-1), rtol=1e-12)


# --- exactness of the test ----------------------------------------------------------


@pytest.fixture(scope="module")
def exhaustive(model, data):
    x, x_ref, nz, threshold = data
    cfg = DALConfig(search="exhaustive", threshold=threshold)
    return cfg, check_exhaustive_on_grid(model, (x, x_ref, nz), cfg)


def test_exhaustive_search_matches_a_dense_grid_of_detections(exhaustive):
    _, res = exhaustive
    assert res.status == "ok" and 0.0 <= res.p_value <= 1.0


def test_dal_test_and_dal_test_batch_agree(model, data, exhaustive):
    x, x_ref, nz, _ = data
    cfg, res = exhaustive
    again = sijax.dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    assert again.p_value == res.p_value
    x2 = np.roll(x, 2, axis=1)
    batch = sijax.dal_test_batch(
        model, np.stack([x, x2]), np.stack([x_ref, x_ref]), sigma=1.0,
        noises=jax.tree.map(lambda a: jnp.stack([a, a]), nz), config=cfg)
    np.testing.assert_array_equal(np.asarray(batch.mask[0]), res.mask)
    np.testing.assert_allclose(float(batch.p_value[0]), res.p_value, rtol=1e-9,
                               atol=1e-12)


def test_published_map_detects_but_refuses_a_p_value(model, data):
    x, x_ref, nz, _ = data
    pub = model.with_options(published=True)
    assert "squared-error" in pub.detector.testable(pub.options)
    with pytest.raises(NotPiecewiseLinearError, match="not piecewise linear"):
        sijax.dal_test(pub, x, x_ref, sigma=1.0, noises=nz)
    score, mask = detect_region(pub, x, nz, DALConfig(threshold=1.0))
    rec = model.reconstruction(jnp.asarray(x), nz, steps=None, eta=1.0)
    np.testing.assert_allclose(score, ((np.asarray(rec) - x) ** 2).sum(-1),
                               rtol=1e-9)
    np.testing.assert_array_equal(mask, np.asarray(score) > 1.0)


# --- training ----------------------------------------------------------------------


def test_loss_is_noise_prediction_with_the_methods_noise(model):
    """loss = mean (apply(x_t, t) - n)^2 with t and n from the key's two halves."""
    schedule = model.schedule
    x0 = np.random.default_rng(4).standard_normal((3, *SHAPE))
    apply = lambda x, t: 0.5 * x + 1e-3 * t[:, None, None, None]  # noqa: E731
    key = jax.random.key(9)
    k_t, k_n = jax.random.split(key)
    t = np.asarray(jax.random.randint(k_t, (3,), 0, 1000))
    ab = np.asarray(schedule.alpha_bar)[t][:, None, None, None]
    for noise in ("simplex", "gaussian"):
        opts = dataclasses.replace(model.options, noise=noise)
        n = np.asarray(anoddpm.noise(k_n, x0.shape, opts))
        x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * n
        want = np.mean((np.asarray(apply(x_t, t)) - n) ** 2)
        got = anoddpm.loss(apply, schedule, jnp.asarray(x0), key, opts)
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
    gauss = np.asarray(anoddpm.noise(k_n, x0.shape, opts))
    np.testing.assert_array_equal(gauss, jax.random.normal(k_n, x0.shape))


def test_training_with_simplex_noise_lowers_the_loss_and_reloads(tmp_path):
    """A few dozen steps on a tiny stack of smooth images: the simplex loss falls,
    and the model directory reloads as an AnoDDPM model with its options."""
    rng = np.random.default_rng(0)
    u = np.linspace(0.0, 1.0, 8)
    imgs = np.stack([np.outer(np.sin(3 * u + a), np.cos(2 * u + b))
                     for a, b in rng.uniform(0, 3, size=(40, 2))])
    np.save(tmp_path / "images.npy", (imgs * 100 + 128).astype(np.float32))
    cfg = dataclasses.replace(
        anoddpm.preset(8), channels=(8,), batch_size=12, epochs=16, lr=3e-3,
        steps_per_dispatch=8, save_every=48, noise_rank=2,
        detector_options=(("stride", 125),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, tmp_path / "run", data=str(tmp_path / "images.npy"),
                    progress=False)
    losses = res.losses[:, 1]
    assert np.all(np.isfinite(losses)) and len(losses) == 6
    assert losses[-2:].mean() < 0.7 * losses[:2].mean(), losses
    loaded = load_model(tmp_path / "run")
    assert loaded.detector.name == "anoddpm"
    assert loaded.options == anoddpm.Options(stride=125)
    nz = sijax.draw_noises(jax.random.key(0), loaded)
    assert isinstance(nz, Noises) and nz.eps.shape == (3, 8, 8, 1)
