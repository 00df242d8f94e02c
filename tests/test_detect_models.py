"""Pluggable detectors (ReconstructionModel) and the permutation baseline."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import check_exhaustive_on_grid

from sijax.checkpoint import load_model
from sijax.detect.dal import DALConfig, dal_test, detect_region, draw_noises
from sijax.detect.models import ReconstructionModel
from sijax.detect.permutation import permutation_test
from sijax.errors import InputError
from sijax.selective.statistics import line_statistic

TINY = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8")
SHAPE = (8, 8, 1)


def shrink(params, x):
    """A toy piecewise-linear 'reconstruction': clamp towards zero."""
    return jnp.clip(x, -params, params)


@pytest.fixture(scope="module")
def toy():
    return ReconstructionModel(shrink, SHAPE, jnp.asarray(1.5))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE)
    x[1:4, 2:5] += 3.0
    return x, rng.standard_normal(SHAPE), draw_noises(jax.random.key(1), SHAPE)


def test_wrapped_diffusion_model_gives_the_same_test(data):
    """A DiffusionModel's D(x) behind ReconstructionModel: identical result."""
    model = load_model(TINY)
    x, x_ref, nz = data
    cfg = DALConfig(search="over_conditioning", threshold=0.5)

    def rec(params, image):
        return params[0].reconstruction(image, params[1], steps=cfg.steps, eta=1.0)

    wrapped = ReconstructionModel(rec, model.image_shape, (model, nz))
    direct = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    via = dal_test(wrapped, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    assert direct.status == "ok"
    np.testing.assert_array_equal(direct.mask, via.mask)
    assert direct.p_value == via.p_value
    assert direct.truncated_intervals == via.truncated_intervals


def test_toy_model_exhaustive_matches_dense_grid(toy, data):
    check_exhaustive_on_grid(toy, data, DALConfig(search="exhaustive", threshold=0.5))


def unfiltered_max(x, rec):
    """A score other than the paper's: no mean filter, max over channels."""
    return jnp.max(jnp.abs(rec - x), axis=-1)


@pytest.mark.parametrize("engine", ["walk", "propagate"])
def test_a_detector_with_its_own_score(toy, data, engine):
    """A score_fn replaces the paper's filtered error for detection and test alike;
    the truncation set is still exact on a dense grid."""
    own = toy.replace(score_fn=unfiltered_max)
    x, _, nz = data
    cfg = DALConfig(search="exhaustive", threshold=0.5, engine=engine)
    score, mask = detect_region(own, x, nz, cfg)
    np.testing.assert_array_equal(score, unfiltered_max(x, shrink(1.5, x)))
    assert not np.array_equal(mask, detect_region(toy, x, nz, cfg)[1])
    res = check_exhaustive_on_grid(own, data, cfg)
    np.testing.assert_array_equal(res.mask, mask)
    flat = toy.replace(score_fn=lambda x, rec: jnp.ravel(rec - x))
    with pytest.raises(InputError, match=r"score map of shape \(64,\)"):
        detect_region(flat, x, nz, cfg)


def _loop_permutation_p(model, x, x_ref, nz, cfg, key, num):
    """Oracle: one detection and one statistic per permutation, in a Python loop."""
    _, m = detect_region(model, x, nz, cfg)
    z_obs = float(line_statistic(x, x_ref, m, sigma=1.0).z_obs)
    pooled = np.concatenate([np.ravel(x), np.ravel(x_ref)])
    n = pooled.size // 2
    extreme = valid = 0
    for k in jax.random.split(key, num):
        p = pooled[np.asarray(jax.random.permutation(k, 2 * n))]
        xp, rp = p[:n].reshape(SHAPE), p[n:].reshape(SHAPE)
        _, mp = detect_region(model, xp, nz, cfg)
        if not np.asarray(mp).any():
            continue
        valid += 1
        zp = float(line_statistic(xp, rp, mp, sigma=1.0).z_obs)
        extreme += abs(zp) > abs(z_obs)
    return extreme / valid, valid, z_obs


def test_permutation_matches_loop_oracle(toy, data):
    x, x_ref, nz = data
    cfg = DALConfig(threshold=0.2)
    key = jax.random.key(9)
    res = permutation_test(
        toy,
        x,
        x_ref,
        sigma=1.0,
        noises=nz,
        key=key,
        num_permutations=37,
        config=cfg,
        chunk=16,
    )
    p, valid, z_obs = _loop_permutation_p(toy, x, x_ref, nz, cfg, key, 37)
    assert res.status == "ok"
    assert res.num_valid == valid and res.num_skipped == 37 - valid
    assert res.p_value == pytest.approx(p, abs=0)
    assert res.stat == pytest.approx(z_obs, rel=1e-12)
    # A planted +3 square is extreme among permutations of the pooled pixels.
    assert res.p_value < 0.1


def test_permutation_null_is_not_extreme(toy):
    """Exchangeable test and reference: the observed z is not extreme."""
    rng = np.random.default_rng(8)
    x, x_ref = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    nz = draw_noises(jax.random.key(2), SHAPE)
    res = permutation_test(
        toy,
        x,
        x_ref,
        sigma=1.0,
        noises=nz,
        key=jax.random.key(3),
        num_permutations=200,
        config=DALConfig(threshold=0.2),
    )
    assert res.status == "ok" and res.num_valid >= 20
    assert res.p_value > 0.05


def test_permutation_errors_and_empty_region(toy, data):
    x, x_ref, nz = data
    bad = [
        (dict(x=x, x_ref=None), "reference"),
        (dict(x=x, x_ref=x_ref, config=DALConfig(hypothesis="background")),
         "hypothesis='reference'"),
        (dict(x=np.full(SHAPE, np.nan), x_ref=x_ref), "NaN"),
    ]  # fmt: skip
    for kwargs, match in bad:
        with pytest.raises(InputError, match=match):
            permutation_test(toy, sigma=1.0, noises=nz, key=jax.random.key(0), **kwargs)
    res = permutation_test(
        toy,
        np.zeros(SHAPE),
        x_ref,
        sigma=1.0,
        noises=nz,
        key=jax.random.key(0),
        config=DALConfig(threshold=0.5),
    )
    assert res.status == "no region" and np.isnan(res.p_value)
