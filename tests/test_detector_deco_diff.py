"""The DeCo-Diff detector (sijax/detectors/deco_diff.py, docs/detectors/deco_diff.md).

Oracles: NumPy re-implementations of the corruption, the forward state and deviation,
the correction sampler and the map; a dense z grid for the exhaustive truncation set;
direct evaluation for the tracker's pieces; a short training run on digits-like data.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import check_exhaustive_on_grid, check_piece

import sijax
from sijax.checkpoint import DiffusionModel, init_unet
from sijax.config import apply_overrides
from sijax.detect.dal import (
    DALConfig,
    dal_test,
    dal_test_batch,
    detect_region,
    observed_line,
)
from sijax.detectors import deco_diff as dd
from sijax.detectors import get_detector, options_from_items
from sijax.errors import InputError, InputWarning, NotPiecewiseLinearError
from sijax.train import train

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def model():
    """A random (4, 8, 16) U-Net serving DeCo-Diff, float64.

    The weights are drawn in NumPy into the abstract state of ``init_unet`` (its
    own initialiser compiles one program per parameter shape: most of a minute on
    a busy 2-core machine): fan-in scaled kernels, small biases, eval batch-norm
    statistics near 0 and 1, and a small output layer.
    """
    cfg = dataclasses.replace(dd.preset(8), channels=(4, 8, 16))
    graphdef, abstract = jax.eval_shape(
        lambda: init_unet(cfg.unet_config(), jax.random.key(0)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name, shape = str(path[-2].key), leaf.shape
        if name == "kernel":
            w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name in ("var", "scale"):
            w = rng.uniform(0.7, 1.3, shape)
        else:  # biases and running means
            w = 0.1 * rng.standard_normal(shape)
        if str(path[0].key) == "out":
            w = 0.25 * w  # deviations of a few tenths: the map does not saturate
        return jnp.asarray(w, jnp.float64)

    state = jax.tree_util.tree_map_with_path(draw, abstract)
    return DiffusionModel(config=cfg, graphdef=graphdef, state=state)


@pytest.fixture(scope="module")
def data(model):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE)
    x[1:4, 2:5] += 3.0
    x_ref = rng.standard_normal(SHAPE)
    return x, x_ref, sijax.draw_noises(jax.random.key(1), model)


@pytest.fixture(scope="module")
def threshold(model, data):
    """A threshold that detects a few pixels of ``x`` (between two map values)."""
    x, _, nz = data
    score, _ = detect_region(model, x, nz, DALConfig(threshold=0.0))
    top = np.sort(np.ravel(score))[::-1]
    assert top[6] < top[5] < 1.0  # distinct, unsaturated values
    return float(0.5 * (top[5] + top[6]))


# --------------------------------------------------------------------------- options


def test_registry_preset_and_options():
    det = get_detector("deco_diff")
    assert det is dd.DETECTOR and det.has_region
    cfg = det.preset()
    assert (cfg.detector, cfg.name, cfg.schedule_kind, cfg.T) == (
        "deco_diff", "deco_diff", "cosine", 10)
    assert cfg.options() == dd.Options() and dd.Options().t0 == 5
    bad = [dict(t0=-1), dict(stride=0), dict(start="noise"), dict(patch_min=0),
           dict(patch_min=3, patch_max=2), dict(ratio_min=0.5, ratio_max=0.2),
           dict(ratio_max=1.5), dict(shuffle_min=-0.1), dict(clip=0.0),
           dict(filter_size=2), dict(coarse_factor=0), dict(coarse_clip=-1.0)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            dd.Options(**kwargs)
    with pytest.raises(InputError, match="deco_diff options"):
        options_from_items(det, [("stride", "0")])
    cfg = apply_overrides(cfg, ["t0=3", "start=noised", "size=16"])
    assert cfg.options().t0 == 3 and cfg.options().start == "noised"
    assert cfg.size == 16
    assert dd.testable(dd.Options()) is None
    assert "geometric mean" in dd.testable(dd.Options(published=True))
    with pytest.raises(InputError, match="patch side"):
        dd.patch_sizes((6, 6, 1), dd.Options(patch_min=4, patch_max=5))


# --------------------------------------------------------------------------- training


def _blocks(a, p):
    """(H, W, C) -> (H/p * W/p, p * p * C) patches in row-major order (NumPy)."""
    h, w, c = a.shape
    return np.stack([a[i:i + p, j:j + p].ravel() for i in range(0, h, p)
                     for j in range(0, w, p)])


def test_corruption_ranges_permutation_and_determinism():
    """Patch sides and ratios in range, the authors' count of corrupted patches, the
    shuffled image a permutation of the image's patches, one result per key."""
    x0 = jnp.arange(64.0).reshape(SHAPE)  # distinct pixels: patches identifiable
    opts = dd.Options(shuffle_min=0.2, shuffle_max=0.6, ratio_min=0.1, ratio_max=0.7)
    keys = jax.random.split(jax.random.key(3), 32)
    draw = jax.jit(jax.vmap(lambda k: dd.corrupt(k, x0, opts)))
    cors = jax.device_get(draw(keys))
    again = jax.device_get(draw(keys))
    for a, b in zip(jax.tree.leaves(cors), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(cors.patch.tolist()) == {1, 2, 4}
    x = np.asarray(x0)
    for i in range(len(keys)):
        p, r, s = int(cors.patch[i]), float(cors.ratio[i]), float(cors.share[i])
        assert 0.1 <= r <= 0.7 and 0.2 <= s <= 0.6
        n = 64 // p**2
        mask = _blocks(cors.mask[i][:, :, None], p)
        assert np.all(mask == mask[:, :1])  # constant on each aligned p x p patch
        assert mask[:, 0].sum() == n - np.floor(n * (1.0 - r))
        frm = _blocks(cors.from_shuffle[i][:, :, None], p)
        assert np.all(frm == frm[:, :1])
        assert frm[:, 0].sum() == n - np.floor(n * (1.0 - s))
        # Each shuffled patch is one of the image's patches, each used once.
        src, got = _blocks(x, p), _blocks(cors.shuffled[i], p)
        where = [int(np.flatnonzero(np.all(src == g, axis=1))[0]) for g in got]
        assert sorted(where) == list(range(n))
        on = cors.from_shuffle[i][:, :, None] > 0
        np.testing.assert_array_equal(np.where(on, cors.content[i], 0.0),
                                      np.where(on, cors.shuffled[i], 0.0))
        # Elsewhere the content is N(0, 1) noise, no image pixel.
        assert not np.isin(cors.content[i][~on], x).any()
    assert len({float(r) for r in cors.ratio}) == len(keys)  # keys differ
    # Defaults: only shuffled content; one side when patch_min = patch_max.
    one = dd.corrupt(jax.random.key(0), x0, dd.Options(patch_min=2, patch_max=2))
    assert int(one.patch) == 2 and float(one.share) == 1.0
    np.testing.assert_array_equal(one.content, one.shuffled)


def test_training_targets_follow_the_paper(model):
    """x_t and D of training_batch against the forward process written out in NumPy,
    and the loss as the mean squared error of D."""
    schedule = model.schedule
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((6, *SHAPE)))
    key = jax.random.key(11)
    batch = jax.jit(lambda x0, key: dd.training_batch(schedule, x0, key, dd.Options()))
    x_t, t, d, cor = jax.device_get(batch(x0, key))
    x0 = np.asarray(x0)
    assert t.shape == (6,) and t.min() >= 0 and t.max() <= 9
    for i in range(6):
        ab = schedule.alpha_bar[t[i]]
        m = cor.mask[i][:, :, None] > 0
        noisy = np.sqrt(ab) * x0[i] + np.sqrt(1.0 - ab) * cor.content[i]
        want_xt = np.where(m, noisy, x0[i])  # normal patches stay x0
        np.testing.assert_allclose(x_t[i], want_xt, rtol=0, atol=1e-12)
        want_d = (want_xt - x0[i]) / np.sqrt(1.0 - ab)
        np.testing.assert_allclose(d[i], want_d, rtol=0, atol=1e-12)
    got = dd.loss(lambda x, tt: jnp.zeros_like(x), schedule, jnp.asarray(x0), key,
                  dd.Options())
    assert float(got) == pytest.approx(np.mean(d**2), rel=1e-12)
    exact = dd.loss(lambda x, tt: jnp.asarray(d), schedule, jnp.asarray(x0), key,
                    dd.Options())
    assert float(exact) < 1e-28  # to rounding


# --------------------------------------------------------------------------- test


def _numpy_correction(eps_fn, x, eps, schedule, opts):
    """DeCo-Diff's correction re-implemented: x_s = x_t - (sqrt(1 - abar_t) -
    sqrt(1 - abar_s)) D_hat over t0, t0 - stride, ..., with abar_{-1} = 1."""
    ab = np.asarray(schedule.alpha_bar)
    steps = list(range(opts.t0, -1, -opts.stride))
    x = np.asarray(x, np.float64)
    if opts.start == "noised":
        x = np.sqrt(ab[steps[0]]) * x + np.sqrt(1 - ab[steps[0]]) * np.asarray(eps)
    for k, t in enumerate(steps):
        ab_s = ab[steps[k + 1]] if k + 1 < len(steps) else 1.0
        d_hat = np.asarray(eps_fn(jnp.asarray(x), float(t)))
        x = x - (np.sqrt(1 - ab[t]) - np.sqrt(1 - ab_s)) * d_hat
    return x


def _numpy_map(x, rec, opts):
    """The piecewise-linear map with explicit zero padding, and the published one."""
    e = np.minimum(np.max(np.abs(rec - x), axis=-1), opts.clip)
    r = opts.filter_size // 2
    pad = np.pad(e, r)
    h, w = e.shape
    pixel = np.array([[pad[i:i + 2 * r + 1, j:j + 2 * r + 1].mean() for j in range(w)]
                      for i in range(h)]) / opts.clip
    f = opts.coarse_factor
    em = np.mean(np.abs(rec - x), axis=-1)
    coarse = np.array([[min(em[i // f * f:i // f * f + f, j // f * f:j // f * f + f]
                            .mean(), opts.coarse_clip) for j in range(w)]
                       for i in range(h)]) / opts.coarse_clip
    return pixel, np.sqrt(pixel * coarse)


@pytest.mark.parametrize("changes", [{}, dict(t0=8, stride=2, start="noised",
                                              filter_size=1, clip=0.3)])
def test_reconstruction_and_map_match_numpy(model, data, changes):
    x, _, nz = data
    m = model.with_options(**changes)
    opts = m.options
    rec = jax.jit(lambda x: m.reconstruction(x, nz, steps=None, eta=None))(x)
    want = _numpy_correction(jax.jit(m.denoiser()), x, nz.eps, m.schedule, opts)
    np.testing.assert_allclose(rec, want, rtol=0, atol=1e-10)
    pixel, geometric = _numpy_map(x, want, opts)
    np.testing.assert_allclose(m.score_fn(x, rec), pixel, rtol=0, atol=1e-10)
    pub = m.with_options(published=True)
    np.testing.assert_allclose(pub.score_fn(x, rec), geometric, rtol=0, atol=1e-10)
    # Start "image": a network that predicts no deviation leaves the image as it is.
    if not changes:
        zero = dd.reconstruction(lambda x_t, t: jnp.zeros_like(x_t), jnp.asarray(x),
                                 nz, schedule=m.schedule, options=opts)
        np.testing.assert_array_equal(zero, x)
    with pytest.raises(InputError, match="t0=10"):
        model.with_options(t0=10).reconstruction(x, nz, steps=None, eta=None)


def test_exhaustive_truncation_set_matches_dense_grid(model, data, threshold):
    res = check_exhaustive_on_grid(
        model, data, DALConfig(search="exhaustive", threshold=threshold))
    assert 0.0 <= res.p_value <= 1.0


def test_tracker_pieces_match_direct_evaluation(model, data, threshold):
    x, x_ref, nz = data
    m = model.with_options(start="noised")
    cfg = DALConfig(threshold=threshold)
    score_fn = m.score_fn

    def f(image):
        rec = m.reconstruction(image, nz, steps=None, eta=None)
        return {"rec": rec, "score": score_fn(image, rec)}

    line = observed_line(m, x, x_ref, sigma=1.0, noises=nz, config=cfg)[3]
    rng = np.random.default_rng(0)
    for z in (float(line.z_obs), -2.5):
        check_piece(f, line.a, line.b, z, 1.0, rng, n=8)


def test_dal_test_and_batch_agree(model, data, threshold):
    x, x_ref, nz = data
    cfg = DALConfig(threshold=threshold)
    one = sijax.dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    assert one.status == "ok" and one.mask.any()
    rng = np.random.default_rng(9)
    xs = np.stack([x, rng.standard_normal(SHAPE)])
    refs = np.stack([x_ref, rng.standard_normal(SHAPE)])
    other = sijax.draw_noises(jax.random.key(2), model)
    noises = jax.tree.map(lambda a, b: jnp.stack([a, b]), nz, other)
    batch = dal_test_batch(model, xs, refs, sigma=1.0, noises=noises, config=cfg)
    np.testing.assert_array_equal(np.asarray(batch.mask[0]), one.mask)
    assert float(batch.p_value[0]) == pytest.approx(one.p_value, rel=1e-9, abs=1e-15)
    assert float(batch.stat[0]) == pytest.approx(one.stat, rel=1e-12)


def test_published_map_detects_but_has_no_p_value(model, data, threshold):
    x, x_ref, nz = data
    pub = model.with_options(published=True)
    cfg = DALConfig(threshold=threshold)
    with pytest.raises(NotPiecewiseLinearError, match="published"):
        dal_test(pub, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    score, mask = detect_region(pub, x, nz, cfg)
    rec = model.reconstruction(jnp.asarray(x), nz, steps=None, eta=None)
    np.testing.assert_allclose(score, _numpy_map(x, np.asarray(rec), pub.options)[1],
                               rtol=0, atol=1e-10)
    np.testing.assert_array_equal(mask, np.asarray(score) > threshold)


# --------------------------------------------------------------------------- train


def _stack(n, rng):
    """n 8x8 images of a bar at a random row on a ramp background: a structure a
    patch shuffle breaks."""
    ramp = np.linspace(0.0, 1.0, 8)[None, :] * np.ones((8, 1))
    imgs = np.repeat(ramp[None], n, axis=0)
    rows = rng.integers(1, 7, size=n)
    imgs[np.arange(n), rows] += 2.0
    return (imgs + 0.05 * rng.standard_normal(imgs.shape)).astype(np.float32)


def test_training_loss_decreases_and_model_records_detector(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, _stack(40, np.random.default_rng(0)))
    cfg = dataclasses.replace(dd.preset(8), channels=(4, 8), batch_size=12, epochs=16,
                              lr=3e-3, steps_per_dispatch=4, save_every=48,
                              val_fraction=0.0, detector_options=(("t0", 4),))
    with pytest.warns(InputWarning, match="threshold"):
        res = train(cfg, tmp_path / "run", data=str(path), progress=False)
    losses = res.losses[:, 1]
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.75 * losses[:2].mean(), losses
    model = sijax.load_model(tmp_path / "run")
    assert model.detector.name == "deco_diff" and model.options.t0 == 4
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["config"]["detector"] == "deco_diff"
    assert meta["config"]["schedule_kind"] == "cosine" and meta["config"]["T"] == 10
