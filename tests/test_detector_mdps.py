"""The MDPS detector (docs/detectors/mdps.md): numerics against a direct
re-implementation, exactness of the tracker through the DPS gradient (a ``jax.vjp``
of the U-Net inside the sampler), the DAL test, and the published
(non-piecewise-linear) step size.

The network is a small random U-Net (widths 4/8, 8x8x1) built in memory in float64:
exactness does not need a trained network, and a random one flags a non-trivial
first-stage mask.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import check_exhaustive_on_grid, check_piece
from flax import nnx
from jax.extend import core as jex_core
from scipy import ndimage

import sijax
from sijax.checkpoint import DiffusionModel
from sijax.detect.dal import DALConfig, dal_test, dal_test_batch, detect_region
from sijax.detectors import get_detector, mdps
from sijax.diffusion.unet import UNet
from sijax.errors import InputError, NotPiecewiseLinearError

SHAPE = (8, 8, 1)
# Small options: 2 steps, 2 samples; a first-stage threshold that splits the image
# of the fixture into trusted and untrusted pixels.
OPTIONS = dict(t_start=200, steps=2, samples=2, zeta=0.3, mask_threshold=0.25)
THRESHOLD = 0.1  # detection threshold: gives a region on the fixture's image


def _model(channels=(4, 8), seed=0, **options):
    """A random float64 U-Net with MDPS options. The weights are drawn in NumPy
    (fan-in scaled kernels, eval batch-norm statistics near 0 / 1) into the
    abstract state: no initialiser is compiled (``init_unet`` compiles one per
    parameter shape, tens of seconds on a busy machine)."""
    cfg = dataclasses.replace(mdps.preset(8), channels=channels,
                              detector_options=tuple(sorted(options.items())))
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: UNet(cfg.unet_config(), rngs=nnx.Rngs(params=jax.random.key(0)))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-2].key)
        shape = leaf.shape
        if name == "kernel":
            w = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "var":
            w = rng.uniform(0.5, 1.5, shape)
        elif name == "scale":
            w = rng.uniform(0.8, 1.2, shape)
        else:  # biases and running means
            w = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(w, jnp.float64)

    state = jax.tree_util.tree_map_with_path(draw, abstract)
    return DiffusionModel(config=cfg, graphdef=graphdef, state=state)


@pytest.fixture(scope="module")
def model():
    return _model(**OPTIONS)


@pytest.fixture(scope="module")
def data(model):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE)
    x[1:4, 2:5] += 3.0
    x_ref = rng.standard_normal(SHAPE)
    return x, x_ref, sijax.draw_noises(jax.random.key(1), model)


# --------------------------------------------------------------------------- oracle


def _alpha_bar(t: int) -> float:
    betas = np.linspace(1e-4, 0.02, 1000)
    return 1.0 if t < 0 else float(np.prod(1.0 - betas[: t + 1]))


@jax.jit
def _direct_step_parts(state_model, u, t, y, weights, sq_ab, sq_1m):
    """eps_hat, x0_hat and the DPS gradients by jax.grad of the published terms."""
    eps_fn = state_model.denoiser()

    def x0_of(v):
        return (v - sq_1m * eps_fn(v, t)) / sq_ab

    def sq(v):
        return 0.5 * jnp.sum((weights * (y - x0_of(v))) ** 2)

    def norm(v):
        return jnp.sqrt(jnp.sum((weights * (y - x0_of(v))) ** 2))

    e = eps_fn(u, t)
    return e, (u - sq_1m * e) / sq_ab, jax.grad(sq)(u), jax.grad(norm)(u)


def _oracle(model, x, nz, opts, steps):
    """MDPS written out step by step: Python loops, NumPy constants from the betas,
    the gradients by jax.grad, the maps by scipy's zero-padded uniform filter.

    Returns (first-stage map, M1, final map).
    """
    x = np.asarray(x)

    def chain(z, eps, weights, keep):
        ab0 = _alpha_bar(steps[0])
        x_t = np.sqrt(ab0) * x + np.sqrt(1 - ab0) * z
        for k, t in enumerate(steps):
            s = steps[k + 1] if k + 1 < len(steps) else -1
            ab_t, ab_s = _alpha_bar(t), _alpha_bar(s)
            if keep is not None:
                x_t = np.where(keep, np.sqrt(ab_t) * x + np.sqrt(1 - ab_t) * z, x_t)
            e, x0, g_sq, g_norm = map(np.asarray, _direct_step_parts(
                model, jnp.asarray(x_t), float(t), jnp.asarray(x),
                jnp.asarray(weights), np.sqrt(ab_t), np.sqrt(1 - ab_t)))
            g = g_norm if opts.published else g_sq
            c1 = opts.eta * np.sqrt((1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t))
            c2 = np.sqrt(max(1 - ab_s - c1**2, 0.0))
            x_t = np.sqrt(ab_s) * x0 + c1 * np.asarray(eps[k]) + c2 * e - opts.zeta * g
        return x_t

    def averaged_map(recs):
        e = np.mean([np.abs(r - x).sum(axis=-1) for r in recs], axis=0)
        return ndimage.uniform_filter(e, size=opts.filter_size, mode="constant")

    ones = np.ones_like(x)
    recs1 = [chain(nz.z1[i], nz.eps1[i], ones, None) for i in range(opts.samples)]
    first = averaged_map(recs1)
    trusted = first <= opts.mask_threshold
    keep = np.broadcast_to(trusted[..., None], x.shape)
    recs2 = [chain(nz.z2[i], nz.eps2[i], keep.astype(float), keep)
             for i in range(opts.samples)]
    return first, trusted, averaged_map(recs2)


# --------------------------------------------------------------------------- tests


def test_registered_options_and_validation(model):
    det = get_detector("mdps")
    assert det is mdps.DETECTOR and det.has_region and det.loss is None
    assert model.detector.name == "mdps" and model.options.samples == 2
    cfg = mdps.preset(8)
    assert cfg.detector == "mdps" and cfg.schedule_kind == "linear"
    assert mdps.timesteps(mdps.Options(t_start=200, steps=5)) == (200, 150, 100, 50, 0)
    assert mdps.timesteps(mdps.Options(t_start=7, steps=3)) == (7, 4, 0)
    assert mdps.timesteps(mdps.Options(t_start=3, steps=4)) == (3, 2, 1, 0)
    assert mdps.testable(mdps.Options()) is None
    assert "not piecewise linear" in mdps.testable(mdps.Options(published=True))
    for bad in (dict(steps=0), dict(steps=202), dict(samples=0), dict(zeta=-1.0),
                dict(eta=1.5), dict(mask_threshold=-0.1), dict(filter_size=2),
                dict(t_start=-1), dict(steps=2.5)):
        with pytest.raises(ValueError):
            mdps.Options(**bad)
        with pytest.raises(InputError, match="mdps options"):
            model.with_options(**bad)
    nz = mdps.draw_noises(jax.random.key(0), SHAPE, model.options)
    assert nz.z1.shape == (2, *SHAPE) and nz.eps2.shape == (2, 2, *SHAPE)
    assert nz.z1.dtype == jnp.float64
    wrong = mdps.draw_noises(jax.random.key(0), SHAPE, mdps.Options(steps=3))
    with pytest.raises(InputError, match="eps1"):
        mdps.reconstruction(model.denoiser(), jnp.zeros(SHAPE), wrong,
                            schedule=model.schedule, options=model.options)


def test_vjp_guidance_equals_grad_and_finite_differences(model):
    """g = J^T M (x0_hat - y) from the sampler's vjp equals jax.grad of
    0.5 ||M (y - x0_hat)||^2 and central differences along random directions (exact
    up to rounding inside a linear piece of the ReLU network); the published form is
    the gradient of the norm. The traced program holds no square."""
    rng = np.random.default_rng(0)
    eps_fn = model.denoiser()
    u, y = (jnp.asarray(rng.standard_normal(SHAPE)) for _ in range(2))
    weights = jnp.asarray((rng.uniform(size=SHAPE) < 0.7).astype(float))
    ab = _alpha_bar(100)
    sq_ab, sq_1m = np.sqrt(ab), np.sqrt(1 - ab)

    def guide(v, published=False):
        return mdps.dps_guidance(eps_fn, v, 100.0, y, weights, sq_ab=sq_ab,
                                 sq_1m_ab=sq_1m, published=published)

    x0, e, g = jax.jit(guide)(u)
    e_d, x0_d, g_sq, g_norm = _direct_step_parts(model, u, 100.0, y, weights, sq_ab,
                                                 sq_1m)
    np.testing.assert_allclose(e, e_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x0, x0_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, g_sq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda v: guide(v, True)[2])(u), g_norm,
                               rtol=1e-10, atol=1e-12)

    @jax.jit
    def central_difference(d, h=1e-6):
        def loss(v):
            x0_v = (v - sq_1m * eps_fn(v, 100.0)) / sq_ab
            return 0.5 * jnp.sum((weights * (y - x0_v)) ** 2)

        return (loss(u + h * d) - loss(u - h * d)) / (2 * h)

    for _ in range(3):
        d = jnp.asarray(rng.standard_normal(SHAPE))
        fd = float(central_difference(d))
        assert float(jnp.sum(g * d)) == pytest.approx(fd, rel=1e-6, abs=1e-8)

    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jex_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(guide)(u).jaxpr)
    assert "conv_general_dilated" in names and "select_n" in names  # the backward pass
    assert not names & {"integer_pow", "sqrt"}


@pytest.mark.parametrize(("published", "mask_threshold"), [(False, 0.18), (True, 0.4)],
                         ids=["fixed", "published"])
def test_detection_equals_the_direct_oracle(model, data, published, mask_threshold):
    """First-stage map, M1 and the final averaged map of the detector (3 steps, 2
    samples) equal the step-by-step oracle; detect_region gives the same map."""
    x, _, _ = data
    m = model.with_options(steps=3, published=published,
                          mask_threshold=mask_threshold)
    opts = m.options
    assert mdps.timesteps(opts) == (200, 100, 0)
    nz = m.draw_noises(jax.random.key(3))
    first, trusted, final = _oracle(m, x, nz, opts, (200, 100, 0))
    assert 0 < trusted.sum() < trusted.size  # both stages matter
    assert np.min(np.abs(first - opts.mask_threshold)) > 1e-6  # no tie at M1

    @jax.jit
    def run(x):
        rec, m1 = mdps.reconstruction(m.denoiser(), x, nz, schedule=m.schedule,
                                      options=opts, return_mask=True)
        return mdps.score(x, rec, opts), m1

    score, m1 = run(jnp.asarray(x))
    np.testing.assert_array_equal(m1, trusted)
    np.testing.assert_allclose(score, final, rtol=1e-9, atol=1e-11)
    got, mask = detect_region(m, x, nz, DALConfig(threshold=THRESHOLD))
    np.testing.assert_allclose(got, final, rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(mask, final > THRESHOLD)


def test_representative_carries_the_averaged_map():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 4, 3)))
    recs = jnp.asarray(rng.standard_normal((3, 4, 4, 3)))
    rep = mdps.representative(x, recs)
    opts = mdps.Options()
    np.testing.assert_allclose(mdps.score(x, rep, opts),
                               mdps.error_map(x, recs, opts.filter_size), rtol=1e-12)
    np.testing.assert_allclose(mdps.representative(x, recs[:1]), recs[0], rtol=1e-14,
                               atol=1e-15)  # x + (rec - x)


def test_tracker_pieces_equal_direct_evaluation(model, data):
    """The affine forms of the tracked pipeline (both stages, the vjp inside each
    step, the first-stage comparison, the final map and region) equal direct
    evaluation inside the piece, and each piece ends where a decision changes."""
    x, _, nz = data
    opts = model.options
    eps_fn = model.denoiser()

    def detect(v):
        rec, m1 = mdps.reconstruction(eps_fn, v, nz, schedule=model.schedule,
                                      options=opts, return_mask=True)
        score = mdps.score(v, rec, opts)
        return {"rec": rec, "m1": m1, "score": score, "mask": score > THRESHOLD}

    rng = np.random.default_rng(7)
    b = rng.standard_normal(SHAPE)
    b /= np.linalg.norm(b)
    a = jnp.asarray(x - float(np.sum(b * x)) * b)
    # One piece (the direct evaluation runs the pipeline at 10^4 points); the
    # exhaustive test below covers the whole line.
    piece = check_piece(detect, a, jnp.asarray(b), 0.0, 1.0, rng)
    assert np.isfinite(float(piece.lo)) and np.isfinite(float(piece.hi))


def test_exhaustive_truncation_set_matches_dense_grid(model, data):
    """Zset of the exhaustive DAL test (the first-stage mask is part of the tracked
    pipeline) against detection at 400 points of the line."""
    res = check_exhaustive_on_grid(
        model, data, DALConfig(search="exhaustive", threshold=THRESHOLD))
    assert len(res.truncated_intervals) >= 1 and 0.0 <= res.p_value <= 1.0


def test_dal_test_batch_agrees_with_dal_test(model, data):
    x, x_ref, nz = data
    cfg = DALConfig(search="exhaustive", threshold=THRESHOLD)
    xs = np.stack([x, x[::-1]])
    refs = np.stack([x_ref, x_ref])
    nzs = jax.tree.map(lambda a: jnp.stack([a, a]), nz)
    batch = dal_test_batch(model, xs, refs, sigma=1.0, noises=nzs, config=cfg)
    for i in range(2):
        one = dal_test(model, xs[i], refs[i], sigma=1.0, noises=nz, config=cfg)
        assert one.status == "ok"
        np.testing.assert_array_equal(np.asarray(batch.mask[i]), one.mask)
        assert float(batch.p_value[i]) == pytest.approx(one.p_value, rel=1e-9,
                                                        abs=1e-12)


def test_published_form_detects_but_has_no_p_value(model, data):
    x, x_ref, nz = data
    published = model.with_options(published=True)
    with pytest.raises(NotPiecewiseLinearError, match="published=True"):
        dal_test(published, x, x_ref, sigma=1.0, noises=nz)
    score, mask = detect_region(published, x, nz, DALConfig(threshold=THRESHOLD))
    assert np.all(np.isfinite(score)) and mask.any()
    # The tracker itself refuses the normalised step (a product of the residual
    # with itself), had the options check been bypassed.
    eps_fn = published.denoiser()

    def rec(v):
        return mdps.reconstruction(eps_fn, v, nz, schedule=published.schedule,
                                   options=published.options)

    x = jnp.asarray(x)
    with pytest.raises(NotPiecewiseLinearError, match="line-dependent"):
        sijax.track(rec)(x, x, 0.0)


@pytest.mark.slow
def test_train_on_data_and_reload(tmp_path):
    """``sijax train`` with ``detector="mdps"`` (the DDPM loss) on a tiny .npy stack:
    the loss falls, the threshold is calibrated with the MDPS score maps, and the
    saved directory reloads as an MDPS model."""
    from sijax.checkpoint import load_model
    from sijax.train import train

    rng = np.random.default_rng(0)
    images = rng.standard_normal((40, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    cfg = dataclasses.replace(mdps.preset(8), channels=(4, 8), batch_size=8,
                              epochs=12, lr=3e-3, steps_per_dispatch=4, save_every=40,
                              detector_options=(("samples", 1), ("steps", 2)))
    res = train(cfg, tmp_path / "run", data=str(tmp_path / "images.npy"),
                progress=False)
    losses = res.losses[:, 1]
    assert np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.9 * losses[:3].mean(), losses
    model = load_model(tmp_path / "run")
    assert model.detector.name == "mdps"
    assert model.options == mdps.Options(samples=1, steps=2)
    assert model.info.threshold is not None and model.info.threshold > 0.0
