"""The DAL test end to end on the committed, trained `tiny` model (issue 4).

Oracles: a dense z-grid of direct detections for the truncation set, the bracketing
promises of the search policies, and statistical checks under the null.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from scipy import stats

from sijax.detect.dal import (
    REPORT_EVERY,
    DALConfig,
    Engine,
    dal_test,
    dal_test_batch,
    default_lanes,
    detect_region,
    draw_noises,
)
from sijax.detect.report import write_report
from sijax.diffusion.sampler import reconstruct
from sijax.errors import InputError, NotPiecewiseLinearError, SearchError
from sijax.selective.search import new_pieces
from sijax.selective.statistics import line_statistic
from sijax.status import Status

TINY = os.environ.get("SIJAX_TINY") or os.path.join(
    os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8"
)


@pytest.fixture(scope="module")
def exhaustive(model, example):
    x, x_ref, nz = example
    return dal_test(
        model, x, x_ref, sigma=1.0, noises=nz, config=DALConfig(search="exhaustive")
    )


def _inside(intervals, z):
    z = np.asarray(z)
    return np.any([(lo <= z) & (z <= hi) for lo, hi in intervals], axis=0)


def test_exhaustive_truncation_set_matches_dense_grid(model, example, exhaustive):
    x, x_ref, nz = example
    res = exhaustive
    assert res.status == "ok" and res.mask.any()
    assert res.status is Status.OK and str(res.status) == "ok"
    line = line_statistic(x, x_ref, jnp.asarray(res.mask), sigma=1.0)
    z_obs = float(line.z_obs)
    assert z_obs == pytest.approx(res.stat, rel=1e-12)
    r = 10.0 + abs(z_obs)
    zs = np.linspace(-r, r, 10_000)
    step = zs[1] - zs[0]
    detect = jax.jit(
        jax.vmap(lambda z: detect_region_core(model, line.a + line.b * z, nz))
    )
    masks = np.asarray(detect(jnp.asarray(zs)))
    on_grid = np.all(masks == res.mask[None], axis=(1, 2))
    found = _inside(res.truncated_intervals, zs)
    ends = np.array([e for iv in res.truncated_intervals for e in iv])
    near_end = np.min(np.abs(zs[:, None] - ends[None, :]), axis=1) <= step
    disagree = (on_grid != found) & ~near_end
    assert not disagree.any(), zs[disagree][:10]
    assert on_grid.sum() > 0  # the grid does see the set
    # The searched range covers [-r, r] and z_obs lies in Zset.
    ((s_lo, s_hi),) = res.searched_intervals
    assert s_lo <= -r and s_hi >= r
    assert _inside(res.truncated_intervals, z_obs)


@pytest.mark.parametrize(
    "search,termination",
    [
        pytest.param("exhaustive", "precision", marks=pytest.mark.slow),
        # the default run keeps "decision" (and the devices test, also propagating)
        pytest.param("parametric", "precision", marks=pytest.mark.slow),
        ("parametric", "decision"),
    ],
)
def test_propagate_engine_gives_the_walking_result(
    model, example, exhaustive, search, termination
):
    """engine="propagate" (stretches by breakpoint propagation, search on the host)
    finds the same pieces as walking: same count, same truncation set (to the tie
    tolerance), same p-value and bounds, same progress contract."""
    x, x_ref, nz = example
    config = DALConfig(search=search, termination=termination)
    walk = (
        exhaustive
        if search == "exhaustive"
        else dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config)
    )
    seen = []
    prop = dal_test(
        model, x, x_ref, sigma=1.0, noises=nz,
        config=dataclasses.replace(config, engine="propagate"),
        progress=lambda *r: seen.append(r),
    )  # fmt: skip
    assert prop.status == walk.status == "ok"
    assert prop.search_count == walk.search_count >= 5
    for field in ("p_value", "inf_p", "sup_p"):
        assert getattr(prop, field) == pytest.approx(getattr(walk, field), abs=1e-12)
    searched = np.array(prop.searched_intervals)
    want = np.array(walk.searched_intervals)
    if search == "exhaustive":  # the end pieces are cut at the ends of the range
        r = 10.0 + abs(prop.stat)
        np.testing.assert_array_equal(searched, [[-r, r]])
        assert want[0, 0] <= -r and want[0, 1] >= r
        searched = want = np.clip(want, -r, r)
    np.testing.assert_allclose(searched, want, rtol=0, atol=1e-9)
    trunc = [np.clip(iv, *searched[0]) for iv in walk.truncated_intervals]
    assert len(prop.truncated_intervals) == len(trunc)
    np.testing.assert_allclose(prop.truncated_intervals, trunc, rtol=0, atol=1e-9)
    assert seen[-1][0] == prop.search_count
    assert sum(new_pieces(r[0], REPORT_EVERY) for r in seen) == prop.search_count


def test_devices_share_one_line_and_give_the_one_device_result(model, example):
    """DALConfig(devices=0): the propagate engine's windows cut over all devices
    (four CPU devices in the tests) give the one-device pieces, truncation set and
    p-value; devices is checked."""
    x, x_ref, nz = example
    config = DALConfig(engine="propagate", termination="decision")
    one, many = (
        dal_test(model, x, x_ref, sigma=1.0, noises=nz,
                 config=dataclasses.replace(config, devices=n))  # fmt: skip
        for n in (1, 0)
    )
    assert many.status == one.status == "ok"
    assert many.search_count == one.search_count >= 5
    for field in ("p_value", "inf_p", "sup_p"):
        assert getattr(many, field) == pytest.approx(getattr(one, field), abs=1e-12)
    assert len(many.truncated_intervals) == len(one.truncated_intervals)
    np.testing.assert_allclose(
        many.truncated_intervals, one.truncated_intervals, rtol=0, atol=1e-9
    )
    with pytest.raises(InputError, match="propagate"):
        DALConfig(engine="walk", devices=2)
    with pytest.raises(InputError, match="devices"):
        DALConfig(engine="propagate", devices=-1)
    with pytest.raises(InputError, match="backend has"):
        dal_test(model, x, x_ref, sigma=1.0, noises=nz,
                 config=dataclasses.replace(config, devices=99))  # fmt: skip


def test_processes_share_one_line_and_give_the_one_process_result(model, example):
    """DALConfig(processes=2): every window of the propagate engine cut into one
    segment per worker process and joined gives the one-process pieces, truncation
    set and p-value; the workers are kept for the next test of the same model;
    processes is checked."""
    from sijax.detect.line_workers import _ACTIVE, close_line_workers

    x, x_ref, nz = example
    config = DALConfig(engine="propagate", termination="decision")
    one = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config)
    try:
        two = [
            dal_test(model, x, x_ref, sigma=1.0, noises=nz,
                     config=dataclasses.replace(config, processes=2))  # fmt: skip
            for _ in range(2)
        ]
        assert _ACTIVE["workers"].size == 2
    finally:
        close_line_workers()
    assert "workers" not in _ACTIVE
    for many in two:
        assert many.status == one.status == "ok"
        assert many.search_count == one.search_count >= 5
        for field in ("p_value", "inf_p", "sup_p"):
            assert getattr(many, field) == pytest.approx(
                getattr(one, field), abs=1e-12
            )
        np.testing.assert_allclose(
            many.truncated_intervals, one.truncated_intervals, rtol=0, atol=1e-9
        )
    with pytest.raises(InputError, match="propagate"):
        DALConfig(engine="walk", processes=2)
    with pytest.raises(InputError, match="processes"):
        DALConfig(processes=0)
    with pytest.raises(InputError, match="not both"):
        DALConfig(processes=2, devices=2)


def test_auto_engine_picks_the_measured_faster_one():
    """engine="auto" (the default): propagation for the DAL detector from 16x16 on
    a CPU, or when the line is shared over devices; walking at 8x8, for the other
    detectors and for lockstep batches; an explicit engine is kept."""
    from types import SimpleNamespace

    from sijax.detect.dal import resolve_engine

    dal = SimpleNamespace(config=SimpleNamespace(detector="dal"))
    ddad = SimpleNamespace(config=SimpleNamespace(detector="ddad"))
    auto = DALConfig()
    assert auto.engine is Engine.AUTO

    def pick(model, shape, config=auto, **kw):
        return resolve_engine(config, model, shape, **kw).engine

    assert pick(dal, (8, 8, 1)) is Engine.WALK
    assert pick(dal, (16, 16, 1)) is Engine.PROPAGATE
    assert pick(object(), (32, 32, 3)) is Engine.PROPAGATE  # a plain Reconstructor
    assert pick(ddad, (16, 16, 1)) is Engine.WALK
    assert pick(dal, (16, 16, 1), lockstep=True) is Engine.WALK
    assert pick(ddad, (8, 8, 1), DALConfig(devices=2)) is Engine.PROPAGATE
    assert pick(dal, (16, 16, 1), DALConfig(engine="walk")) is Engine.WALK


def test_engine_is_checked():
    with pytest.raises(InputError, match="engine"):
        DALConfig(engine="fast")
    # checked and converted once: the string and the member give the same config
    cfg = DALConfig(engine="propagate")
    assert cfg.engine is Engine.PROPAGATE and cfg.engine == "propagate"
    assert cfg == DALConfig(engine=Engine.PROPAGATE)
    assert dataclasses.replace(cfg, engine="walk").engine is Engine.WALK


def detect_region_core(model, x, nz):
    from sijax.detect.dal import detector

    return detector(model, nz, DALConfig())(x)[2]


def test_detect_region_matches_observed_mask(model, example, exhaustive):
    x, _, nz = example
    score, mask = detect_region(model, x, nz)
    np.testing.assert_array_equal(mask, exhaustive.mask)
    np.testing.assert_array_equal(mask, score > 0.8)


@pytest.mark.parametrize("termination", ["precision", "decision"])
def test_parametric_brackets_exhaustive(model, example, exhaustive, termination):
    x, x_ref, nz = example
    res = dal_test(
        model,
        x,
        x_ref,
        sigma=1.0,
        noises=nz,
        config=DALConfig(search="parametric", termination=termination),
    )
    p = exhaustive.p_value
    assert res.status == "ok"
    assert res.inf_p - 1e-12 <= p <= res.sup_p + 1e-12
    assert res.inf_p <= res.p_value <= res.sup_p
    if termination == "precision":
        assert res.sup_p - res.inf_p < 1e-3
    else:
        alpha = 0.05
        assert res.sup_p < alpha or res.inf_p >= alpha
        assert (res.sup_p < alpha) == (p < alpha)
    assert res.search_count <= exhaustive.search_count


def test_over_conditioning_is_a_subset(model, example, exhaustive):
    x, x_ref, nz = example
    res = dal_test(
        model,
        x,
        x_ref,
        sigma=1.0,
        noises=nz,
        config=DALConfig(search="over_conditioning"),
    )
    assert res.search_count == 1
    ((lo, hi),) = res.truncated_intervals
    assert lo <= res.stat <= hi
    assert _inside(exhaustive.truncated_intervals, np.linspace(lo, hi, 101)).all()


def test_empty_region_is_a_status_not_a_crash(model, example, tmp_path):
    x, x_ref, nz = example
    res = dal_test(
        model,
        x,
        x_ref,
        sigma=1.0,
        noises=nz,
        config=DALConfig(threshold=1e6, search="over_conditioning"),
    )
    assert res.status == "no region"
    assert np.isnan(res.p_value) and not res.mask.any()
    assert "empty region" in res.message
    _check_report(tmp_path / "none", res, example, rows=1)


def _check_report(out, res, example, rows):
    """report.json round-trips; report.png has the image row, plus the line if any."""
    import matplotlib.image

    x, x_ref, _ = example
    write_report(out, res, x, x_ref, config=DALConfig(), checkpoint=TINY)
    saved = json.loads((out / "report.json").read_text())
    assert saved["result"]["status"] == res.status
    np.testing.assert_array_equal(np.load(out / "mask.npy"), res.mask)
    height, width = matplotlib.image.imread(out / "report.png").shape[:2]
    assert (height > 0.37 * width) == (rows == 2), (height, width)  # 0.45 vs 0.28


def test_report_shows_the_line(tmp_path, exhaustive, example):
    assert exhaustive.status == "ok" and exhaustive.truncated_intervals
    _check_report(tmp_path, exhaustive, example, rows=2)


@pytest.mark.parametrize(
    "field, match",
    [
        (dict(search="fast"), r"search='fast' must be one of \("),
        (dict(termination="soon"), r"termination='soon' must be one of"),
        (dict(hypothesis="paired"), r"hypothesis='paired' must be one of"),
        (dict(filter_size=4), r"filter_size=4 must be a positive odd"),
        (dict(precision=0.0), r"got alpha=0.05, precision=0.0$"),
        (dict(alpha=1.5), r"got alpha=1.5, precision="),
        (dict(max_pieces=0), r"^max_pieces=0 must be >= 1$"),
        (dict(threshold=-0.8), r"^threshold=-0.8 must be a finite number >= 0"),
        (dict(threshold=float("nan")), r"^threshold=nan must be a finite"),
        (dict(steps=(400, 0)), r"steps=\(400, 0\), t_start=460$"),
    ],
)
def test_bad_config_names_the_field_and_value(field, match):
    with pytest.raises(InputError, match=match) as e:
        DALConfig(**field)
    assert "self." not in str(e.value)


def test_progress_reports_follow_the_search(model, example, exhaustive):
    x, x_ref, nz = example
    seen = []
    cfg = DALConfig(search="exhaustive")
    res = dal_test(
        model,
        x,
        x_ref,
        sigma=1.0,
        noises=nz,
        config=cfg,
        progress=lambda *r: seen.append(r),
    )
    assert res.search_count == exhaustive.search_count > REPORT_EVERY
    assert res.truncated_intervals == exhaustive.truncated_intervals
    assert res.p_value == exhaustive.p_value
    counts = [r[0] for r in seen]
    assert counts == sorted(set(counts)) and counts[-1] == res.search_count
    assert counts[0] == REPORT_EVERY
    assert seen[-1][1:3] == res.searched_intervals[0]
    assert seen[-1][3:] == (res.inf_p, res.sup_p)


def test_max_pieces_reports_status_and_bounds(model, example):
    x, x_ref, nz = example
    cfg = DALConfig(search="exhaustive", max_pieces=3)
    res = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    assert res.status == "max_pieces" and res.search_count == 3
    assert 0.0 <= res.inf_p <= res.p_value <= res.sup_p <= 1.0
    with pytest.raises(SearchError, match="max_pieces"):
        dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=cfg, throw=True)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda x, r: (
                np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x),
                r,
            ),
            "NaN",
        ),
        (lambda x, r: (x, np.full_like(r, np.inf)), "NaN or Inf"),
        (lambda x, r: (x, r[:4]), "shape"),
        (lambda x, r: (x[:4], r), "shape"),
        (lambda x, r: (x, None), "reference"),
        # A cast would drop the imaginary part, or take a mask for an image.
        (lambda x, r: (x + 1j, r), "x must hold real numbers; got dtype=complex"),
        (lambda x, r: (x, r > 0), "x_ref must hold real numbers; got dtype=bool"),
    ],
)
def test_bad_images_are_refused(model, example, change, match):
    x, x_ref, nz = example
    x2, r2 = change(x, x_ref)
    with pytest.raises(InputError, match=match):
        dal_test(model, x2, r2, sigma=1.0, noises=nz)


def test_missing_or_wrong_noises_are_refused(model, example):
    x, x_ref, nz = example
    with pytest.raises(InputError, match="noises=None: .* sijax.draw_noises"):
        dal_test(model, x, x_ref, sigma=1.0, noises=None)
    with pytest.raises(InputError, match="noises=None"):
        detect_region(model, x, None)
    with pytest.raises(InputError, match="noises=None"):
        dal_test_batch(model, x[None], x_ref[None], sigma=1.0, noises=None)
    wrong = draw_noises(jax.random.key(0), (16, 16, 1))
    with pytest.raises(InputError, match=r"noises have shapes .*\(16, 16, 1\)"):
        detect_region(model, x, wrong)
    # Once reported as a non-finite score map, "corrupt or diverged weights?".
    nan = jax.tree.map(lambda a: a.at[0].set(jnp.nan), nz)
    with pytest.raises(InputError, match="noises hold NaN or Inf"):
        dal_test(model, x, x_ref, sigma=1.0, noises=nan)


def test_float32_weights_are_refused_by_name(model, example):
    # Once a TypeError from inside a convolution.
    x, x_ref, nz = example
    m32 = model.astype(jnp.float32)
    with pytest.raises(InputError, match=r"weights are \['float32'\] but the "
                       "images are float64: load it with sijax.load_model"):
        dal_test(m32, x, x_ref, sigma=1.0, noises=nz)
    with pytest.raises(InputError, match="weights are"):
        detect_region(m32, x, nz)


@pytest.mark.parametrize("sigma", [0.0, -1.0, "nonsense"])
def test_bad_covariance_is_refused(model, example, sigma):
    x, x_ref, nz = example
    with pytest.raises(InputError):
        dal_test(model, x, x_ref, sigma=sigma, noises=nz)


def test_singular_covariance_along_eta_is_refused(model, example, exhaustive):
    x, x_ref, nz = example
    n = x.size
    # Variance zero on every pixel of the region and of the reference: eta^T S eta = 0.
    var = np.where(np.repeat(exhaustive.mask.reshape(-1), 1), 0.0, 1.0)
    dense = np.diag(var)
    with pytest.raises(InputError):
        dal_test(model, x, x_ref, sigma=dense.reshape(n, n), noises=nz)


@pytest.mark.parametrize("engine", ["walk", "propagate"])
def test_model_that_outputs_nan_is_an_error_not_an_empty_region(model, example, engine):
    """NaN scores fall below every threshold: without a check the region would be
    empty and the image reported as normal ("no region")."""
    x, x_ref, nz = example
    broken = jax.tree.map(lambda w: w * np.nan, model)
    cfg = DALConfig(search="over_conditioning", engine=engine)
    with pytest.raises(InputError, match="non-finite detection"):
        dal_test(broken, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    res = dal_test_batch(
        broken, x[None], x_ref[None], sigma=1.0,
        noises=jax.tree.map(lambda a: a[None], nz), config=cfg,
    )  # fmt: skip
    assert int(res.status[0]) == 3 and int(res.stat_status[0]) == 5


@struct.dataclass
class _SiLUModel:
    """A stand-in model whose denoiser is smooth (SiLU): not piecewise linear."""

    inner: object

    @property
    def image_shape(self):
        return self.inner.image_shape

    def reconstruction(self, x, noises, *, steps, eta):
        return reconstruct(
            lambda x_t, t: jax.nn.silu(x_t),
            x,
            noises,
            schedule=self.inner.schedule,
            steps=steps,
            eta=eta,
        )


def test_object_that_is_not_a_model_is_refused(example):
    x, x_ref, nz = example
    with pytest.raises(InputError, match="reconstruction"):
        dal_test(object(), x, x_ref, sigma=1.0, noises=nz)


def test_model_that_is_not_piecewise_linear_is_named(model, example):
    x, x_ref, nz = example
    with pytest.raises(NotPiecewiseLinearError, match="logistic|silu|exp"):
        dal_test(
            _SiLUModel(model),
            x,
            x_ref,
            sigma=1.0,
            noises=nz,
            config=DALConfig(search="over_conditioning", threshold=0.1),
        )


@pytest.mark.parametrize("termination", ["precision", "decision"])
def test_memo_gives_the_same_search(model, example, termination):
    """The step memo changes the work, not the pieces or the p-value."""
    x, x_ref, nz = example
    out = [
        dal_test(
            model, x, x_ref, sigma=1.0, noises=nz,
            config=DALConfig(termination=termination, memo=memo),
        )  # fmt: skip
        for memo in (True, False)
    ]
    assert out[0].search_count == out[1].search_count > 1
    np.testing.assert_allclose(out[0].p_value, out[1].p_value, rtol=1e-10)
    np.testing.assert_allclose(
        out[0].truncated_intervals, out[1].truncated_intervals, rtol=1e-10, atol=1e-10
    )


def test_batch_equals_single(model, example, exhaustive):
    x, x_ref, nz = example
    xs = np.stack([x, x])
    refs = np.stack([x_ref, x_ref])
    nzs = jax.tree.map(lambda a: jnp.stack([a, a]), nz)
    for lanes in (1, 2):  # in turn, in lockstep: the same results
        out = dal_test_batch(
            model, xs, refs, sigma=1.0, noises=nzs, lanes=lanes,
            config=DALConfig(search="exhaustive"),
        )  # fmt: skip
        np.testing.assert_allclose(
            np.asarray(out.p_value), exhaustive.p_value, rtol=1e-12
        )
        np.testing.assert_array_equal(np.asarray(out.status), 0)
    with pytest.raises(InputError, match="divisor"):
        dal_test_batch(model, xs, refs, sigma=1.0, noises=nzs, lanes=3)


@pytest.mark.slow
def test_batch_progress_counts_every_piece(model, example, exhaustive):
    """The reports of a batch's searches add up to their pieces; same results."""
    x, x_ref, nz = example
    x2 = x + 0.3 * np.random.default_rng(5).standard_normal(x.shape)
    xs, refs = np.stack([x, x2]), np.stack([x_ref, x_ref])
    nzs = jax.tree.map(lambda a: jnp.stack([a, a]), nz)
    cfg = DALConfig(search="exhaustive")
    reports = []
    # Default lanes: a batch that is not split over devices runs in one lane, also on
    # this 4-device test host (it used to run in lockstep there).
    assert default_lanes(2) == 1 and default_lanes(8, 4) == 4
    assert default_lanes(6, 4) == 2
    out = dal_test_batch(model, xs, refs, sigma=1.0, noises=nzs, config=cfg,
                         progress=lambda *r: reports.append(r))  # fmt: skip
    counts = np.asarray(out.search_count)
    assert counts[0] == exhaustive.search_count and counts[1] > 0
    assert sum(new_pieces(r[0], REPORT_EVERY) for r in reports) == counts.sum()
    assert {r[0] for r in reports} >= set(counts.tolist())  # each search's last
    np.testing.assert_allclose(np.asarray(out.p_value)[0], exhaustive.p_value,
                               rtol=1e-12)  # fmt: skip
    # Lockstep lanes send no reports (and the same results).
    reports.clear()
    out2 = dal_test_batch(model, xs, refs, sigma=1.0, noises=nzs, lanes=2, config=cfg,
                          progress=lambda *r: reports.append(r))  # fmt: skip
    assert reports == []
    np.testing.assert_allclose(np.asarray(out2.p_value), np.asarray(out.p_value),
                               rtol=1e-12)  # fmt: skip
    # The propagate engine: the images in turn, the same pieces, reports and results.
    out3 = dal_test_batch(
        model, xs, refs, sigma=1.0, noises=nzs, progress=lambda *r: reports.append(r),
        config=dataclasses.replace(cfg, engine="propagate"),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out3.search_count), counts)
    assert sum(new_pieces(r[0], REPORT_EVERY) for r in reports) == counts.sum()
    np.testing.assert_allclose(np.asarray(out3.p_value), np.asarray(out.p_value),
                               rtol=0, atol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out3.status), np.asarray(out.status))


def _null_batch(model, n, seed, delta=0.0):
    shape = model.image_shape
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, *shape))
    refs = rng.standard_normal((n, *shape))
    side = max(1, shape[0] // 3)
    for i in range(n):
        r0, c0 = rng.integers(0, shape[0] - side + 1, size=2)
        xs[i, r0 : r0 + side, c0 : c0 + side] += delta
    keys = jax.random.split(jax.random.key(seed), n)
    nzs = jax.vmap(lambda k: draw_noises(k, shape))(keys)
    return xs, refs, nzs


@pytest.mark.slow
def test_null_p_values_are_uniform_and_naive_are_not(model):
    """Validity (docs/method.md §8): 560 null images, about 350 with a region; iid N(0,
    1),
    signal 0, reference test."""
    xs, refs, nzs = _null_batch(model, 560, seed=11)
    out = dal_test_batch(
        model,
        xs,
        refs,
        sigma=1.0,
        noises=nzs,
        config=DALConfig(search="parametric", precision=1e-3),
    )
    status = np.asarray(out.status)
    valid = status == 0
    assert np.all((status == 0) | (status == 1))  # ok or no region, nothing else
    p = np.asarray(out.p_value)[valid]
    naive = np.asarray(out.naive_p_value)[valid]
    assert valid.sum() >= 300, valid.sum()
    ks = stats.kstest(p, "uniform")
    assert ks.pvalue > 0.01, ks
    k = int(np.sum(p < 0.05))
    lo, hi = stats.binom.interval(0.99, len(p), 0.05)
    assert lo <= k <= hi, (k, len(p))
    # The naive test is biased by the selection: it fails the same checks.
    assert stats.kstest(naive, "uniform").pvalue < 0.01
    assert np.sum(naive < 0.05) > hi


@pytest.mark.slow
def test_power_exceeds_level(model):
    cfg = DALConfig(search="parametric", termination="decision")
    rates = []
    for delta in (0.0, 3.0):
        xs, refs, nzs = _null_batch(model, 160, seed=21, delta=delta)
        out = dal_test_batch(model, xs, refs, sigma=1.0, noises=nzs, config=cfg)
        valid = np.asarray(out.status) == 0
        rates.append(float(np.mean(np.asarray(out.sup_p)[valid] < 0.05)))
    # tiny model, 8x8, a 2x2 square: measured about 0.3 against 0.08 at delta 0.
    assert rates[1] > 2 * rates[0] and rates[1] > rates[0] + 0.12, rates
