"""The detector registry and what every detector shares (issue 26): names, options
stored with the training config, the cosine schedule, noises drawn for the model."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import sijax
from sijax.config import TrainConfig, apply_overrides
from sijax.detectors import DETECTORS, get_detector
from sijax.diffusion.schedule import cosine_schedule
from sijax.errors import InputError


def test_unknown_detector_lists_the_names():
    with pytest.raises(InputError, match="unknown detector 'nope'; valid: dal, "):
        get_detector("nope")
    with pytest.raises(InputError, match="unknown detector"):
        TrainConfig(detector="nope")


def test_default_detector_is_dal_and_config_round_trips():
    cfg = TrainConfig()
    assert cfg.detector == "dal" and cfg.detector_options == ()
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and hash(again) == hash(cfg)
    assert get_detector("dal").has_region


def test_an_unknown_key_names_config_keys():
    with pytest.raises(InputError, match="unknown config key 'zeta'"):
        apply_overrides(TrainConfig(), ["zeta=1"])


def test_cosine_schedule_matches_its_formula():
    s = cosine_schedule(10)
    f = np.cos((np.arange(11) / 10 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(s.alpha_bar[:-1], f[1:-1] / f[0], rtol=1e-12)
    assert np.all(np.diff(s.alpha_bar) < 0) and 0 < s.alpha_bar[-1] < 1e-3
    cfg = TrainConfig(schedule_kind="cosine", T=10)
    np.testing.assert_array_equal(cfg.schedule().alpha_bar, s.alpha_bar)
    with pytest.raises(InputError, match="schedule_kind"):
        TrainConfig(schedule_kind="quadratic")


def test_dal_model_draws_the_dal_noises(model):
    cfg = sijax.DALConfig()
    via_model = sijax.draw_noises(jax.random.key(4), model, cfg)
    via_shape = sijax.draw_noises(jax.random.key(4), model.image_shape, cfg)
    jax.tree.map(np.testing.assert_array_equal, via_model, via_shape)
    assert model.detector.name == "dal" and model.score_fn is None


def test_noises_of_the_wrong_shape_are_refused(model, example):
    x, x_ref, nz = example
    with pytest.raises(InputError, match="noises have shapes .* expected"):
        sijax.dal_test(model, x, x_ref, sigma=1.0,
                       noises=nz._replace(eps=nz.eps[:3]))


@pytest.mark.parametrize("name", DETECTORS)
def test_every_detector_has_a_preset_that_records_it(name):
    det = get_detector(name)
    cfg = det.preset(8)
    assert cfg.detector == name and cfg.size == 8
    assert dataclasses.is_dataclass(det.options) and det.options().__hash__
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
