"""The DDAD detector (docs/detectors/ddad.md): its conditioned DDIM chain against
the paper's equations, its maps, exactness of its test, and a model directory."""

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import (
    check_exhaustive_on_grid,
    check_piece,
    planted_example,
    tiny_serving,
)

import sijax
from sijax.checkpoint import load_model
from sijax.detect.dal import DALConfig, detect_region, detector
from sijax.detectors import ddad
from sijax.diffusion.sampler import reconstruct
from sijax.errors import InputError, NotPiecewiseLinearError
from sijax.selective.statistics import line_statistic
from sijax.train import train

SHAPE = (8, 8, 1)
TINY = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8")
FAST = dict(t0=250, stride=125)  # three network calls: 250, 125, 0


@pytest.fixture(scope="module")
def model():
    return tiny_serving("ddad", **FAST)


@pytest.fixture(scope="module")
def data(model):
    return planted_example(model, SHAPE)


def test_options_noises_and_steps(model):
    assert model.options == ddad.Options(t0=250, stride=125)
    assert ddad.steps_of(ddad.Options()) == tuple(range(250, -1, -25))
    nz = model.draw_noises(jax.random.key(1))
    assert nz.eps0.shape == SHAPE and nz.eps.shape == (3, *SHAPE)
    for bad in (dict(t0=-1), dict(stride=0), dict(w=-1.0), dict(w=float("inf")),
                dict(eta=2.0), dict(filter_size=4)):
        with pytest.raises(InputError, match="ddad options"):
            model.with_options(**bad)
    with pytest.raises(InputError, match="below the schedule's T=1000"):
        model.with_options(t0=1000).reconstruction(
            jnp.zeros(SHAPE), model.draw_noises(jax.random.key(0)), steps=None, eta=0.0)


# --- the chain against the paper's equations ----------------------------------


def ddad_oracle(eps_fn, x, noises, ab, steps, w, eta):
    """DDAD's conditioned DDIM in NumPy, one step at a time, target y = x:
    y_t = sqrt(ab_t) y + sqrt(1 - ab_t) e, eps_hat = e - w sqrt(1 - ab_t)(y_t - x_t),
    x_s = sqrt(ab_s) (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)
          + sigma n_k + sqrt(1 - ab_s - sigma^2) eps_hat."""
    y = x
    x_t = np.sqrt(ab[steps[0]]) * x + np.sqrt(1 - ab[steps[0]]) * np.asarray(
        noises.eps0)
    for k, t in enumerate(steps):
        a_t = ab[t]
        a_s = ab[steps[k + 1]] if k + 1 < len(steps) else 1.0
        e = eps_fn(x_t, t)
        y_t = np.sqrt(a_t) * y + np.sqrt(1 - a_t) * e
        eps_hat = e - w * np.sqrt(1 - a_t) * (y_t - x_t)
        x0 = (x_t - np.sqrt(1 - a_t) * eps_hat) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1 - a_t / a_s) * (1 - a_s) / (1 - a_t))
        x_t = (np.sqrt(a_s) * x0 + sigma * np.asarray(noises.eps[k])
               + np.sqrt(1 - a_s - sigma**2) * eps_hat)
    return x_t


@pytest.mark.parametrize("w,eta", [(3.0, 0.0), (1.5, 0.7)])
def test_reconstruction_follows_the_papers_equations(model, w, eta):
    m = model.with_options(t0=40, stride=13, w=w, eta=eta)
    steps = (40, 27, 14, 1)
    assert ddad.steps_of(m.options) == steps
    x = np.random.default_rng(1).standard_normal(SHAPE)
    nz = m.draw_noises(jax.random.key(5))
    eps_jit = jax.jit(m.denoiser())

    def eps_fn(x_t, t):
        return np.asarray(eps_jit(jnp.asarray(x_t), jnp.asarray(float(t))))

    got = m.reconstruction(jnp.asarray(x), nz, steps=None, eta=0.0)
    want = ddad_oracle(eps_fn, x, nz, np.asarray(m.schedule.alpha_bar), steps, w, eta)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_without_conditioning_it_is_plain_ddim(model):
    """w = 0: the DAL sampler's DDIM reconstruction over the same steps."""
    m = model.with_options(w=0.0, eta=1.0)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE))
    nz = m.draw_noises(jax.random.key(6))
    got = m.reconstruction(x, nz, steps=None, eta=0.0)
    want = reconstruct(m.denoiser(), x, nz, schedule=m.schedule,
                       steps=(250, 125, 0), eta=1.0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_conditioning_pulls_the_reconstruction_towards_the_image(model, data):
    x, _, nz, _ = data
    errors = [float(jnp.mean(jnp.abs(model.with_options(w=w).reconstruction(
        jnp.asarray(x), nz, steps=None, eta=0.0) - x))) for w in (0.0, 1.0)]
    assert errors[1] < errors[0]


# --- the maps ----------------------------------------------------------------------


def test_map_is_the_filtered_pixel_distance():
    rng = np.random.default_rng(2)
    x, rec = rng.standard_normal((8, 8, 3)), rng.standard_normal((8, 8, 3))
    e = np.pad(np.abs(rec - x).sum(-1), 1)
    want = sum(e[i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9
    np.testing.assert_allclose(ddad.score(x, rec, ddad.Options()), want, rtol=1e-12)


def test_published_map_is_the_blurred_normalised_distance():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    x, rec = rng.standard_normal((64, 64, 3)), rng.standard_normal((64, 64, 3))
    d = np.abs(rec - x).mean(-1)
    # sigma = 4 * 64 / 256 = 1 pixel; kernel radius int(4 sigma + 0.5) = 4,
    # reflected borders without repeating the edge pixel.
    want = ndimage.gaussian_filter(d / d.max(), 1.0, mode="mirror", truncate=4.0)
    got = ddad.score(x, rec, ddad.Options(published=True))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# --- exactness of the test ----------------------------------------------------------


@pytest.fixture(scope="module")
def exhaustive(model, data):
    x, x_ref, nz, threshold = data
    cfg = DALConfig(search="exhaustive", threshold=threshold)
    return cfg, check_exhaustive_on_grid(model, (x, x_ref, nz), cfg)


def test_exhaustive_search_matches_a_dense_grid_of_detections(exhaustive):
    _, res = exhaustive
    assert res.status == "ok" and 0.0 <= res.p_value <= 1.0


def test_tracker_pieces_match_direct_evaluation(model, data, exhaustive):
    """Affine forms of reconstruction and map against direct evaluation inside the
    piece, and a real decision change at each end (the target y = x moves along
    the line with x_t)."""
    x, x_ref, nz, _ = data
    cfg, res = exhaustive
    line = line_statistic(x, x_ref, res.mask, sigma=1.0)
    f = detector(model, nz, cfg)
    rng = np.random.default_rng(0)
    z_obs = float(line.z_obs)
    piece = check_piece(f, line.a, line.b, z_obs, 1, rng, n=8)
    assert piece.lo < z_obs < piece.hi
    check_piece(f, line.a, line.b, z_obs - 1.7, 1, rng, n=8)


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
    assert "not piecewise linear" in pub.detector.testable(pub.options)
    with pytest.raises(NotPiecewiseLinearError, match="not piecewise linear"):
        sijax.dal_test(pub, x, x_ref, sigma=1.0, noises=nz)
    score, mask = detect_region(pub, x, nz, DALConfig(threshold=0.5))
    rec = np.asarray(model.reconstruction(jnp.asarray(x), nz, steps=None, eta=0.0))
    d = np.abs(rec - x).mean(-1)
    # At 8 x 8 the blur (sigma = 1/8 pixel) leaves the normalised distance as is.
    np.testing.assert_allclose(score, d / d.max(), rtol=1e-9, atol=1e-12)
    assert float(np.max(score)) == pytest.approx(1.0)
    np.testing.assert_array_equal(mask, np.asarray(score) > 0.5)


# --- training ----------------------------------------------------------------------


def test_trained_model_directory_reloads_as_ddad(tmp_path):
    """Noise-prediction training on a tiny stack of images; the directory records
    the detector and its options, and its threshold is calibrated with DDAD's map."""
    rng = np.random.default_rng(0)
    u = np.linspace(0.0, 1.0, 8)
    imgs = np.stack([np.outer(np.sin(3 * u + a), np.cos(2 * u + b))
                     for a, b in rng.uniform(0, 3, size=(40, 2))])
    np.save(tmp_path / "images.npy", (imgs * 100 + 128).astype(np.float32))
    cfg = dataclasses.replace(
        ddad.preset(8), channels=(8,), batch_size=12, epochs=8, lr=3e-3,
        steps_per_dispatch=8, save_every=24, noise_rank=2,
        detector_options=(("stride", 125), ("w", 2.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, tmp_path / "run", data=str(tmp_path / "images.npy"),
                    progress=False)
    losses = res.losses[:, 1]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    loaded = load_model(tmp_path / "run")
    assert loaded.detector.name == "ddad" and loaded.detector.loss is None
    assert loaded.options == ddad.Options(stride=125, w=2.0)
    assert loaded.info.threshold is not None and loaded.info.threshold > 0.0


def test_synthetic_training_calibrates_the_threshold_the_experiments_use(tmp_path):
    """A detector other than the DAL one trained on N(0, 1) images (no --data)
    stores the quantile of its maps on fresh N(0, 1) images as its threshold (the
    paper's 0.8 belongs to the DAL map), and ``sijax experiment``'s trials detect
    with it."""
    from sijax import experiments as ex
    from sijax.data.synthetic import normal_images
    from sijax.train import SYNTHETIC_CALIBRATION_IMAGES, _keys, calibrate_threshold

    cfg = dataclasses.replace(
        ddad.preset(8), channels=(8,), batch_size=12, n_train=24, epochs=1,
        steps_per_dispatch=2, save_every=2, threshold_quantile=0.9,
        detector_options=(("stride", 250),))
    train(cfg, tmp_path / "run", progress=False)
    loaded = load_model(tmp_path / "run")
    fresh = np.asarray(normal_images(_keys(cfg.seed)["calibrate"],
                                     SYNTHETIC_CALIBRATION_IMAGES, SHAPE))
    assert loaded.info.threshold == pytest.approx(
        calibrate_threshold(loaded, fresh, 0.9), rel=1e-12)
    assert loaded.info.threshold != DALConfig().threshold

    setting = ex.Setting(size=8, checkpoint=str(tmp_path / "run"), max_pieces=2000)
    recs = ex.run_batch(loaded, setting, [0, 1], ["naive"], batch=2)
    for rec in recs:
        assert rec["threshold"] == loaded.info.threshold
        d = ex.trial_data(setting, rec["index"], 1)
        _, mask = detect_region(loaded, d.x, sijax.draw_noises(
            jax.random.key(d.key), loaded), DALConfig(threshold=rec["threshold"]))
        assert rec["region_size"] == int(np.sum(mask))
