"""DiffPath (sijax/detectors/diffpath.py; docs/detectors/diffpath.md): the DDIM
inversion path and its statistics against a plain loop, the fitted densities against
their formulas, the refusal of any region test, and an image AUROC on a tiny model
trained on smooth images."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

import sijax
from sijax.checkpoint import DiffusionModel, cast_state, init_unet, load_model
from sijax.config import TrainConfig, apply_overrides
from sijax.detect.dal import DALConfig
from sijax.detectors import diffpath as dp
from sijax.detectors import get_detector, options_from_items
from sijax.errors import InputError
from sijax.evaluation.metrics import roc_auc
from sijax.train import train

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def model():
    """A random-init DiffPath network (4, 8, 16), float64, 4 inversion steps."""
    cfg = dataclasses.replace(dp.preset(8), channels=(4, 8, 16))
    graphdef, state = init_unet(cfg.unet_config(), jax.random.key(0))
    net = DiffusionModel(config=cfg, graphdef=graphdef,
                         state=cast_state(state, jnp.float64))
    return net.with_options(steps=4)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).standard_normal(SHAPE)


def loop_path(model, x):
    """Oracle: the inversion as a Python loop over the schedule's alpha_bar, NumPy
    arithmetic around one jitted network call per step. Returns (x_t, eps, x_T)."""
    eps_fn = jax.jit(model.denoiser())
    n, big_t = model.options.steps, model.schedule.T
    ts = [i * big_t // n for i in range(n)]
    ab = np.asarray(model.schedule.alpha_bar)
    xs, es, x_i = [], [], np.asarray(x, np.float64)
    for i, t in enumerate(ts):
        e = np.asarray(eps_fn(jnp.asarray(x_i), t))
        a, a_next = ab[t], (ab[ts[i + 1]] if i + 1 < n else 0.0)
        x0_hat = (x_i - np.sqrt(1 - a) * e) / np.sqrt(a)
        xs.append(x_i)
        es.append(e)
        x_i = np.sqrt(a_next) * x0_hat + np.sqrt(1 - a_next) * e
    return np.stack(xs), np.stack(es), x_i


def loop_statistics(eps, n):
    """The paper's statistics from an eps path (N, H, W, C), NumPy."""
    d = n * np.diff(eps, axis=0)
    first = [eps.sum(), (eps**2).sum(), (eps**3).sum()]
    second = [d.sum(), (d**2).sum(), (d**3).sum()]
    return {"first": first, "second": second, "both": first + second,
            "curvature": [np.sqrt((d**2).sum())]}


def test_options_defaults_and_validation():
    o = dp.Options()
    assert (o.steps, o.statistic, o.density) == (10, "both", "gaussian")
    for bad in (dict(steps=1), dict(steps=2.5), dict(statistic="third"),
                dict(density="flow"), dict(components=0), dict(bandwidth=-1.0),
                dict(ridge=float("nan"))):
        with pytest.raises(ValueError):
            dp.Options(**bad)
    det = get_detector("diffpath")
    assert det is dp.DETECTOR and not det.has_region and det.reconstruction is None
    with pytest.raises(InputError, match="steps=1 must be an integer >= 2"):
        options_from_items(det, [("steps", "1")])
    with pytest.raises(InputError, match="unknown option 'threshold'"):
        options_from_items(det, [("threshold", "1")])
    assert options_from_items(det, [("statistic", "curvature")]).statistic == \
        "curvature"
    # --set NAME=VALUE reaches the options through the training config.
    cfg = apply_overrides(dp.preset(8), ["steps=20", "density=kde", "epochs=3"])
    assert cfg.options() == dp.Options(steps=20, density="kde") and cfg.epochs == 3
    with pytest.raises(InputError, match="statistic='third' must be one of"):
        apply_overrides(dp.preset(8), ["statistic=third"])


def test_preset_is_a_small_noise_predictor_on_the_linear_schedule():
    cfg = dp.preset(8)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.detector, cfg.name, cfg.schedule_kind) == ("diffpath", "diffpath",
                                                           "linear")
    assert cfg.channels == (32, 64, 128) and cfg.options() == dp.Options()
    assert dp.DETECTOR.loss is None and dp.DETECTOR.score is None


def test_inversion_times_follow_the_ddim_spacing():
    np.testing.assert_array_equal(dp.inversion_steps(1000, 10), np.arange(10) * 100)
    np.testing.assert_array_equal(dp.inversion_steps(10, 4), [0, 2, 5, 7])
    with pytest.raises(InputError, match="steps=11 must lie in 1..T=10"):
        dp.inversion_steps(10, 11)


def test_inversion_and_statistics_equal_a_plain_loop(model, image):
    xs, es, x_end = loop_path(model, image)
    eps_fn, schedule, options = model.denoiser(), model.schedule, model.options

    @jax.jit
    def run(x):
        path = dp.ddim_inversion(eps_fn, x, schedule=schedule, steps=options.steps)
        return path, dp.path_statistics(eps_fn, x, schedule=schedule, options=options)

    path, stats = run(jnp.asarray(image))
    assert path.eps.shape == path.x_t.shape == (4, *SHAPE)
    np.testing.assert_allclose(path.x_t, xs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(path.eps, es, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(path.x_T, x_end, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(path.x_T, es[-1], rtol=1e-12)  # ab_T = 0: x_T = e_N-1
    want = loop_statistics(es, 4)
    np.testing.assert_allclose(stats, want["both"], rtol=1e-10, atol=1e-10)
    curvature = jax.jit(lambda x: dp.path_statistics(
        eps_fn, x, schedule=schedule,
        options=dataclasses.replace(options, statistic="curvature")))(image)
    np.testing.assert_allclose(curvature, want["curvature"], rtol=1e-10)


def test_statistics_shapes(model, image):
    eps_fn, schedule = model.denoiser(), model.schedule
    for name, k in (("first", 3), ("second", 3), ("both", 6), ("curvature", 1)):
        o = dp.Options(steps=3, statistic=name)
        out = jax.eval_shape(lambda x, o=o: dp.path_statistics(
            eps_fn, x, schedule=schedule, options=o), jnp.asarray(image))
        assert out.shape == (k,) == (len(dp.statistic_names(name)),)
        assert out.dtype == jnp.float64


def test_noises_are_empty_and_the_fallback_score_is_the_mean_squared_eps(model,
                                                                          image):
    noises = sijax.draw_noises(jax.random.key(3), model)
    assert noises == {} and jax.tree.leaves(noises) == []
    keys = jax.random.split(jax.random.key(4), 3)
    assert jax.vmap(lambda k: sijax.draw_noises(k, model))(keys) == {}
    score = jax.jit(lambda m, x: m.image_score(x, {}))(model, jnp.asarray(image))
    _, es, _ = loop_path(model, image)
    assert score.shape == ()
    np.testing.assert_allclose(score, np.mean(es**2), rtol=1e-10)


def test_no_region_so_no_dal_test_and_no_detection(model, image):
    noises = sijax.draw_noises(jax.random.key(0), model)
    msg = "diffpath detector scores whole images: it has no region"
    with pytest.raises(InputError, match=msg):
        sijax.dal_test(model, image, image, sigma=1.0, noises=noises)
    with pytest.raises(InputError, match=msg):
        sijax.dal_test_batch(model, image[None], image[None], sigma=1.0,
                             noises=jax.vmap(lambda k: {})(jax.random.split(
                                 jax.random.key(1), 1)))
    with pytest.raises(InputError, match=msg):
        sijax.detect_region(model, image, noises, DALConfig())
    with pytest.raises(InputError, match=msg):
        model.reconstruction(image, noises, steps=(0,), eta=0.0)


# ------------------------------------------------------------------ the densities


def normal_stats(n=300, seed=0):
    """Correlated 6-D statistics on very different scales (like the real ones)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((6, 6))
    return rng.standard_normal((n, 6)) @ a * np.array([10.0, 1, 0.1, 5, 100, 0.5]) \
        + np.arange(6)


def test_gaussian_density_is_the_normal_pdf_of_the_raw_statistics():
    s = normal_stats()
    d = dp.fit_statistics(s, dp.Options(ridge=1e-3))
    center, scale = s.mean(0), s.std(0)
    corr = np.cov((s - center).T / scale[:, None], bias=True)
    cov = (corr + 1e-3 * np.eye(6)) * np.outer(scale, scale)
    test = normal_stats(5, seed=1)
    want = -scipy.stats.multivariate_normal(center, cov).logpdf(test)
    np.testing.assert_allclose(d.scores(test), want, rtol=1e-9)
    assert d.score(test[0]) == pytest.approx(want[0], rel=1e-9)
    # Far from the normal statistics is less likely.
    assert d.score(center + 6 * scale) > d.score(center) + 10
    with pytest.raises(InputError, match=r"stats.shape=\(5,\) must be \(k,\) or "
                                         r"\(n, k\) with k=6"):
        d.score(test[0, :5])
    with pytest.raises(InputError, match="use scores"):
        d.score(test)


def test_kde_density_is_the_mean_of_its_kernels():
    s = normal_stats(40)[:, :1]  # a 1-D statistic, like the paper's DiffPath-1D
    o = dp.Options(statistic="curvature", density="kde", bandwidth=0.3, ridge=0.0)
    d = dp.fit_statistics(s, o)
    z = (s[:, 0] - s.mean()) / s.std()
    for v in (s[3, 0], s.mean() + 2 * s.std()):
        zv = (v - s.mean()) / s.std()
        p = np.mean(scipy.stats.norm.pdf(zv, z, 0.3)) / s.std()
        assert d.score(np.array([v])) == pytest.approx(-np.log(p), rel=1e-10)
    scott = dp.fit_statistics(s, dataclasses.replace(o, bandwidth=0.0))
    np.testing.assert_allclose(scott.covariances[:, 0, 0], 40 ** (-2 / 5))


def test_gmm_finds_two_clusters_and_beats_one_gaussian():
    rng = np.random.default_rng(5)
    s = np.concatenate([rng.normal(-4, 1, (150, 3)), rng.normal(4, 1, (150, 3))])
    gmm = dp.fit_statistics(s, dp.Options(statistic="first", density="gmm",
                                          components=2))
    assert sorted(np.round(gmm.weights, 1)) == [0.5, 0.5]
    means = np.sort(gmm.means * gmm.scale + gmm.center, axis=0)
    np.testing.assert_allclose(means, [[-4] * 3, [4] * 3], atol=0.35)
    one = dp.fit_statistics(s, dp.Options(statistic="first"))
    assert gmm.scores(s).mean() < one.scores(s).mean() - 1.0
    # The gap between the clusters is unlikely under the mixture, not the Gaussian.
    assert gmm.score(np.zeros(3)) > one.score(np.zeros(3))
    again = dp.fit_statistics(s, dp.Options(statistic="first", density="gmm",
                                            components=2))
    np.testing.assert_array_equal(again.means, gmm.means)  # seeded: reproducible


def test_density_record_round_trip_and_bad_inputs():
    s = normal_stats(50)
    d = dp.fit_statistics(s, dp.Options(density="gmm", components=2))
    back = dp.PathDensity.from_dict(json.loads(json.dumps(d.to_dict())))
    np.testing.assert_array_equal(back.scores(s), d.scores(s))
    assert (back.kind, back.statistic, back.steps) == ("gmm", "both", 10)
    with pytest.raises(InputError, match="bad PathDensity record"):
        dp.PathDensity.from_dict({**d.to_dict(), "extra": 1})
    with pytest.raises(InputError, match=r"must be \(n, 3\) for the 'first'"):
        dp.fit_statistics(s, dp.Options(statistic="first"))
    with pytest.raises(InputError, match="too few"):
        dp.fit_statistics(s[:2], dp.Options(density="gmm", components=3))
    bad = s.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        dp.fit_statistics(bad)


# ------------------------------------------------ a trained model: AUROC, directory


def smooth_images(rng, n):
    """Smooth random fields: iid noise blurred with a Gaussian of width 1.5 px."""
    z = rng.standard_normal((n, 8, 8))
    return 4.0 * np.stack([scipy.ndimage.gaussian_filter(a, 1.5, mode="wrap")
                           for a in z])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A (4, 8, 16) DiffPath network trained for 20 epochs on 128 smooth images."""
    root = tmp_path_factory.mktemp("diffpath")
    rng = np.random.default_rng(0)
    np.save(root / "normal.npy", smooth_images(rng, 128))
    cfg = dataclasses.replace(dp.preset(8), channels=(4, 8, 16), batch_size=16,
                              epochs=20, lr=3e-3, steps_per_dispatch=8,
                              save_every=1000, val_fraction=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no held-out images: nothing to calibrate
        res = train(cfg, root / "run", data=str(root / "normal.npy"), progress=False)
    return root, res


def test_training_records_diffpath_and_reloads(trained):
    root, res = trained
    losses = res.losses[:, 1]
    assert np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.75 * losses[:2].mean(), losses
    meta = json.loads((root / "run" / "model" / "config.json").read_text())
    assert meta["config"]["detector"] == "diffpath"
    assert "detect" not in meta  # no region, so no threshold is calibrated
    model = load_model(root / "run")
    assert model.detector.name == "diffpath" and model.options == dp.Options()
    assert model.config == res.model.config


def test_fitted_score_separates_noisy_and_shifted_images(trained):
    root, _ = trained
    model = load_model(root / "run")
    rng = np.random.default_rng(1)
    prep = model.preprocessing
    normal = np.stack([prep.apply(r) for r in np.load(root / "normal.npy")])
    density = dp.fit(model, normal)
    held_out = np.stack([prep.apply(r) for r in smooth_images(rng, 40)])
    # Standardised units: the normal images have pixel sd 1 (image means sd ~0.6).
    ood = {"noisy": held_out + 0.5 * rng.standard_normal(held_out.shape),
           "shifted": held_out + 4.0}
    stats_in = dp.model_statistics(model, held_out)
    stats_out = {k: dp.model_statistics(model, v) for k, v in ood.items()}
    labels = np.r_[np.zeros(40, bool), np.ones(40, bool)]
    auroc = {k: roc_auc(np.r_[density.scores(stats_in), density.scores(v)], labels)
             for k, v in stats_out.items()}
    # Over three training seeds: noisy >= 0.99, shifted >= 0.92.
    assert auroc["noisy"] > 0.9 and auroc["shifted"] > 0.8, auroc
    # The unfitted fallback ranks by sum e^2 (the second statistic): it sees noise.
    fallback = roc_auc(np.r_[stats_in[:, 1], stats_out["noisy"][:, 1]], labels)
    assert fallback > 0.9, fallback
