"""A selective test per connected component of the detected region (issue 27 item 2).

Oracles: scipy-free brute-force labelling on small masks; Holm and
Benjamini-Hochberg from their definitions (step-down / step-up rejections at every
level) and sijax.evaluation.metrics; on the tiny DAL model, the component's line
from line_statistic on its own mask, its Zset against direct evaluation of the
detector on a grid (the whole mask must match), and the single-component case
against the whole-region test; a slow type I error check under the null.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sijax.detect.dal import (
    DALConfig,
    dal_test,
    dal_test_batch,
    detector,
    draw_noises,
    label_components,
)
from sijax.detect.report import write_report
from sijax.detect.run import format_result
from sijax.errors import InputError
from sijax.selective.multiple import adjust_p_values
from sijax.selective.statistics import line_statistic

TINY = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8")


# ------------------------------------------------------------------ labelling


def brute_labels(mask, connectivity):
    """Flood fill from each unlabelled pixel in row-major order."""
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    labels = np.zeros((h, w), int)
    n = 0
    for r in range(h):
        for c in range(w):
            if mask[r, c] and not labels[r, c]:
                n += 1
                todo = [(r, c)]
                labels[r, c] = n
                while todo:
                    i, j = todo.pop()
                    for di, dj in steps:
                        a, b = i + di, j + dj
                        inside = 0 <= a < h and 0 <= b < w
                        if inside and mask[a, b] and not labels[a, b]:
                            labels[a, b] = n
                            todo.append((a, b))
    return labels, n


@pytest.mark.parametrize("connectivity", [4, 8])
def test_labels_match_a_flood_fill(connectivity):
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 9)) < 0.35
        got, n = label_components(mask, connectivity)
        want, m = brute_labels(mask, connectivity)
        assert n == m
        np.testing.assert_array_equal(got, want)


def test_diagonal_neighbours_join_only_with_8_connectivity():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    assert label_components(mask, 8)[1] == 2
    assert label_components(mask, 4)[1] == 3
    with pytest.raises(InputError, match="connectivity"):
        label_components(mask, 6)
    with pytest.raises(InputError, match="connectivity"):
        DALConfig(components=True, connectivity=6)
    with pytest.raises(InputError, match="adjustment"):
        DALConfig(components=True, adjustment="bonferroni")


# ---------------------------------------------------------------- adjustment


def holm_by_definition(p, alpha):
    """Holm's step-down rejections at level alpha."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    out = np.zeros(m, bool)
    for i, k in enumerate(order):
        if p[k] > alpha / (m - i):
            break
        out[k] = True
    return out


def bh_by_definition(p, q):
    m = len(p)
    ranked = np.sort(p)
    ok = [k for k in range(1, m + 1) if ranked[k - 1] <= k * q / m]
    cut = ranked[max(ok) - 1] if ok else -1.0
    return p <= cut


@pytest.mark.parametrize("seed", range(5))
def test_adjusted_p_values_reject_as_the_procedures_do(seed):
    from sijax.evaluation.metrics import benjamini_hochberg, holm

    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 1, 6), rng.uniform(0, 0.02, 3), [0.01, 0.01]])
    holm_adj = adjust_p_values(p, "holm")
    bh_adj = adjust_p_values(p, "bh")
    np.testing.assert_allclose(holm_adj, holm(p), rtol=0, atol=0)
    assert np.all(holm_adj >= p) and np.all(bh_adj >= p)
    assert np.all(bh_adj <= holm_adj + 1e-15)
    # Levels on a grid and just either side of each p-value (exactly at one, the
    # procedures' own rounding decides).
    levels = np.concatenate([np.linspace(0.001, 0.5, 60), p * (1 - 1e-9),
                             np.minimum(p * (1 + 1e-9), 1.0)])  # fmt: skip
    for level in levels:
        np.testing.assert_array_equal(holm_adj <= level, holm_by_definition(p, level))
        np.testing.assert_array_equal(bh_adj <= level, bh_by_definition(p, level))
        np.testing.assert_array_equal(bh_adj <= level, benjamini_hochberg(p, level))


def test_adjustment_of_one_and_of_missing_p_values():
    assert adjust_p_values([0.03], "holm") == pytest.approx([0.03])
    assert adjust_p_values([0.03], "bh") == pytest.approx([0.03])
    out = adjust_p_values([0.01, np.nan, 0.04], "holm")
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.04])
    assert adjust_p_values([], "bh").shape == (0,)
    with pytest.raises(InputError):
        adjust_p_values([1.5], "holm")


# ------------------------------------------------------------- the DAL test


@pytest.fixture(scope="module")
def model():
    from sijax.checkpoint import load_model

    return load_model(TINY)


@pytest.fixture(scope="module")
def two_blobs(model):
    """Two +4 squares in opposite corners: the tiny model detects two components."""
    shape = model.image_shape
    rng = np.random.default_rng(1)
    x = 0.5 * rng.standard_normal(shape)
    x[0:3, 0:3] += 4.0
    x[5:8, 5:8] += 4.0
    x_ref = rng.standard_normal(shape)
    nz = draw_noises(jax.random.key(1), shape)
    config = DALConfig(components=True, confidence=0.9)
    res = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config)
    return x, x_ref, nz, config, res


def test_two_blobs_give_two_components_with_their_own_tests(model, two_blobs):
    x, x_ref, nz, config, res = two_blobs
    assert res.status == "ok" and len(res.components) == 2
    first, second = res.components
    assert (first.label, second.label) == (1, 2)
    np.testing.assert_array_equal(first.mask | second.mask, res.mask)
    assert not np.any(first.mask & second.mask)
    assert first.mask[0, 0] and second.mask[7, 7]
    assert first.p_value != second.p_value and first.stat != second.stat
    for comp in res.components:
        assert comp.status == "ok" and comp.size == int(comp.mask.sum())
        # Its own contrast: the statistic of its own mask.
        line = line_statistic(x, x_ref, jnp.asarray(comp.mask), sigma=1.0)
        assert comp.stat == pytest.approx(float(line.z_obs), rel=1e-12)
        assert comp.raw_stat == pytest.approx(float(line.stat), rel=1e-12)
        assert comp.sd == pytest.approx(float(line.sd), rel=1e-12)
        assert comp.inf_p <= comp.p_value <= comp.sup_p
        assert comp.sup_p - comp.inf_p < config.precision
        assert comp.confidence_exact
        lo, hi = comp.confidence_interval
        assert lo < comp.raw_stat < hi
        assert any(a <= comp.stat <= b for a, b in comp.truncated_intervals)
    adj = adjust_p_values([c.p_value for c in res.components], "holm")
    assert [c.adjusted_p for c in res.components] == pytest.approx(list(adj))


def test_component_zset_conditions_on_the_whole_mask(model, two_blobs):
    """Direct evaluation along component 1's line: a grid point is in Zset exactly
    when the detector gives the whole observed mask there (not just the
    component), away from the found ends."""
    x, x_ref, nz, _, res = two_blobs
    comp = res.components[0]
    line = line_statistic(x, x_ref, jnp.asarray(comp.mask), sigma=1.0)
    ((lo, hi),) = comp.searched_intervals
    lo, hi = max(lo, comp.stat - 15.0), min(hi, comp.stat + 15.0)
    zs = np.linspace(lo, hi, 3001)
    detect = jax.jit(jax.vmap(lambda z: detector(model, nz, DALConfig())(
        line.a + line.b * z)[2]))  # fmt: skip
    masks = np.asarray(detect(jnp.asarray(zs)))
    whole = np.all(masks == res.mask[None], axis=(1, 2))
    found = np.any([(a <= zs) & (zs <= b) for a, b in comp.truncated_intervals], 0)
    ends = np.array([e for iv in comp.truncated_intervals for e in iv])
    near = np.min(np.abs(zs[:, None] - ends[None, :]), axis=1) <= zs[1] - zs[0]
    assert not np.any((whole != found) & ~near)
    # Somewhere on the grid the component alone is detected differently from the
    # rest: conditioning on the component only would give another set.
    own = np.all(masks[:, comp.mask] == True, axis=1)  # noqa: E712
    assert np.any(own & ~whole)


def test_bh_adjustment_and_4_connectivity(model, two_blobs):
    import dataclasses

    x, x_ref, nz, config, res = two_blobs
    bh = dal_test(model, x, x_ref, sigma=1.0, noises=nz,
                  config=dataclasses.replace(config, adjustment="bh",
                                             connectivity=4))  # fmt: skip
    assert len(bh.components) == 2
    p = [c.p_value for c in bh.components]
    assert p == pytest.approx([c.p_value for c in res.components], rel=1e-12)
    assert [c.adjusted_p for c in bh.components] == pytest.approx(
        list(adjust_p_values(p, "bh"))
    )


def test_single_component_is_the_whole_region_test(model, two_blobs):
    """One blob (the first of two_blobs): one component, whose test is the
    whole-region test, bit for bit (same contrast, line and selection event)."""
    x, x_ref, nz, config, _ = two_blobs
    x = x.copy()
    x[5:8, 5:8] -= 4.0
    res = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config)
    (comp,) = res.components
    np.testing.assert_array_equal(comp.mask, res.mask)
    assert comp.stat == res.stat and comp.raw_stat == res.raw_stat
    assert comp.p_value == res.p_value and comp.adjusted_p == res.p_value
    assert (comp.inf_p, comp.sup_p) == (res.inf_p, res.sup_p)
    assert comp.truncated_intervals == res.truncated_intervals
    assert comp.searched_intervals == res.searched_intervals
    assert comp.search_count == res.search_count
    assert comp.confidence_interval == res.confidence_interval


def test_report_output_and_batch(tmp_path, model, two_blobs):
    x, x_ref, nz, config, res = two_blobs
    write_report(tmp_path, res, x, x_ref, config=config, checkpoint=TINY)
    saved = json.loads((tmp_path / "report.json").read_text())
    comps = saved["result"]["components"]
    assert [c["label"] for c in comps] == [1, 2]
    assert comps[0]["p_value"] == pytest.approx(res.components[0].p_value)
    assert comps[1]["bbox"][2:] == [7, 7]
    assert saved["config"]["components"] is True
    labels = np.load(tmp_path / "components.npy")
    assert labels.max() == 2 and np.array_equal(labels > 0, res.mask)
    assert (tmp_path / "report.png").stat().st_size > 0
    text = format_result(res)
    assert "component 1" in text and "component 2" in text and "holm" in text
    with pytest.raises(InputError, match="components"):
        stack = jax.tree.map(lambda a: jnp.stack([a]), nz)
        dal_test_batch(model, x[None], x_ref[None], sigma=1.0, noises=stack,
                       config=config)  # fmt: skip


def test_cli_components_and_set_confidence(tmp_path, capsys):
    """`sijax test --components --set confidence=0.95` end to end (the --set of an
    optional number used to fail to parse)."""
    from sijax.cli import main

    rng = np.random.default_rng(1)
    x = 0.5 * rng.standard_normal((8, 8, 1))
    x[0:3, 0:3] += 4.0
    x[5:8, 5:8] += 4.0
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", rng.standard_normal((8, 8, 1)))
    out = tmp_path / "out"
    code = main(["test", "--checkpoint", TINY, "--image", str(tmp_path / "x.npy"),
                 "--reference", str(tmp_path / "ref.npy"), "--sigma", "1",
                 "--components", "--set", "confidence=0.95", "--out", str(out),
                 "--no-progress", "--seed", "1"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "component 1" in printed and "95% CI" in printed
    report = json.loads((out / "report.json").read_text())
    saved = report["result"]
    assert saved["confidence"] == 0.95 and len(saved["components"]) >= 1
    assert report["config"]["engine"] == "walk"  # what "auto" chose at 8x8


# ------------------------------------------------------------------ validity


@pytest.mark.slow
def test_component_p_values_under_the_null(model):
    """Null images (N(0, 1) test and reference, tiny model): every component's
    p-value is Uniform(0, 1) given the region, so the fraction below 0.1 lies in
    the 99.9% binomial interval (both sides: the check can fail), and a KS test
    does not reject at 0.001."""
    shape = model.image_shape
    config = DALConfig(components=True)
    p = []
    for i in range(80):
        rng = np.random.default_rng([27, i])
        x = rng.standard_normal(shape)
        x_ref = rng.standard_normal(shape)
        nz = draw_noises(jax.random.fold_in(jax.random.key(27), i), shape)
        res = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=config)
        p += [c.p_value for c in res.components or [] if c.status == "ok"]
    n = len(p)
    assert n >= 40, n
    below = int(np.sum(np.asarray(p) < 0.1))
    lo, hi = stats.binom.ppf([0.0005, 0.9995], n, 0.1)
    assert lo <= below <= hi, (below, n)
    assert stats.kstest(p, "uniform").pvalue > 1e-3
