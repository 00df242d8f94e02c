"""Detection metrics and FDR procedures against brute-force oracles."""

import itertools

import numpy as np
import pytest

from sijax.errors import InputError
from sijax.evaluation.metrics import (
    aupro,
    benjamini_hochberg,
    holm,
    roc_auc,
    storey_bh,
)


def test_roc_auc_counts_pairs_with_ties_one_half():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 120).astype(float)  # many ties
    y = rng.random(120) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])]
    assert roc_auc(s, y) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert np.isnan(roc_auc(s, np.zeros(120, bool)))
    with pytest.raises(InputError, match="differ in size"):
        roc_auc(s, y[:-1])


def test_aupro_perfect_random_and_region_weighting():
    rng = np.random.default_rng(1)
    m = np.zeros((20, 16, 16), bool)
    for i in range(20):
        r, c = rng.integers(0, 10, 2)
        m[i, r:r + 6, c:c + 6] = True
    assert aupro(m.astype(float), m) == pytest.approx(1.0)
    # Scores independent of the masks: PRO = FPR, so the normalised area is 0.15.
    assert aupro(rng.random(m.shape), m) == pytest.approx(0.15, abs=0.02)
    # Each region counts once: a large region found and a small one missed give
    # a PRO of one half at every threshold below the large region's scores.
    big = np.zeros((1, 16, 16), bool)
    big[0, :8, :8] = True
    big[0, 14, 14] = True
    score = np.where(big, 0.0, rng.random(big.shape) * 0.5)
    score[0, :8, :8] = 2.0
    assert aupro(score, big) == pytest.approx(0.5, abs=0.02)


def _bh_oracle(p, q):
    m = len(p)
    ks = [k for k in range(1, m + 1) if np.sort(p)[k - 1] <= k * q / m]
    k = max(ks, default=0)
    return p <= np.sort(p)[k - 1] if k else np.zeros(m, bool)


def test_benjamini_hochberg_and_storey_match_their_definitions():
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = np.concatenate([rng.random(rng.integers(1, 30)),
                            rng.random(rng.integers(0, 10)) * 1e-3])
        np.testing.assert_array_equal(benjamini_hochberg(p, 0.1), _bh_oracle(p, 0.1))
        pi0 = min(1.0, (1 + np.sum(p > 0.5)) / (len(p) * 0.5))
        np.testing.assert_array_equal(storey_bh(p, 0.1), _bh_oracle(p, 0.1 / pi0))
    assert benjamini_hochberg([], 0.1).shape == (0,)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.1, np.nan])


def test_bh_controls_the_fdr_on_independent_p_values():
    """Realised FDR over 2000 repetitions with 80% nulls stays below q pi0."""
    rng = np.random.default_rng(3)
    m, m0, q = 50, 40, 0.1
    fdp = []
    for _ in range(2000):
        p = np.concatenate([rng.random(m0), rng.random(m - m0) ** 8])
        rej = benjamini_hochberg(p, q)
        fdp.append(rej[:m0].sum() / max(1, rej.sum()))
    assert np.mean(fdp) <= q * m0 / m + 3 * np.std(fdp) / np.sqrt(len(fdp))


def test_holm_matches_its_definition():
    rng = np.random.default_rng(4)
    for _ in range(100):
        p = rng.random(rng.integers(1, 12)) ** 3
        m = len(p)
        order = np.argsort(p)
        want = np.empty(m)
        for i, k in enumerate(order):
            want[k] = min(1.0, max((m - j) * p[order[j]] for j in range(i + 1)))
        np.testing.assert_allclose(holm(p), want, rtol=0, atol=0)


def _record(kind, inf_p, sup_p, p=None, status="ok"):
    return {"kind": kind, "path": f"{kind}/{inf_p}", "status": status,
            "inf_p": inf_p, "sup_p": sup_p, "p_value": inf_p if p is None else p,
            "naive_p_value": inf_p, "reject": sup_p is not None and sup_p < 0.05,
            "naive_reject": inf_p is not None and inf_p < 0.05, "region_size": 3,
            "pieces": 1, "seconds": 0.1}


def test_the_selection_over_images_uses_the_upper_bound_of_a_bounded_p():
    from sijax.evaluation.summary import conservative_p, p_label, summarize_images

    # A search that stopped early: p_value (a point at inf_p) would pass BH, the
    # bound sup_p does not; the exactly known p-values pass on their own.
    records = [_record("good", 1e-4, 0.3), _record("bad", 1e-5, 1e-5),
               _record("bad", 2e-4, 2e-4),
               _record("good", None, None, status="no region")]
    assert [conservative_p(r) for r in records] == [0.3, 1e-5, 2e-4, 1.0]
    s = summarize_images(records, None, None, alpha=0.05, fdr=0.05)
    assert s["bh_rejected"] == ["bad/1e-05", "bad/0.0002"]
    assert [p_label(r, 0.05) for r in records] == [
        "p\u2208[0.0001, 0.3]", "p=1e-05", "p=0.0002", "no test"]
    assert p_label(_record("x", 1e-9, 1e-3), 0.05) == "p<0.05"
    assert p_label(_record("x", 0.2, 0.9), 0.05) == "p\u22650.05"


def test_a_resume_accepts_options_added_since_at_their_defaults():
    from sijax.evaluation.evaluate import changed_settings

    stored = {"data": "d", "sigma": "model:pixel", "config": {"alpha": 0.05}}
    now = {"data": "d", "sigma": "model:pixel",
           "config": {"alpha": 0.05, "confidence": None, "components": False}}
    assert changed_settings(stored, now) == {}
    # A run from before the fingerprints resumes (they are unknown there); one
    # that has them compares them.
    prints = {"weights_sha256": "w", "data_sha256": "d"}
    assert changed_settings(stored, {**now, **prints}) == {}
    assert changed_settings({**stored, **prints}, {**now, **prints,
                                                   "data_sha256": "e"}) == {
        "data_sha256": ("d", "e")}
    # A new option away from its default, a changed one, or a dropped one is a
    # change: the stored images were computed otherwise.
    now["config"]["confidence"] = 0.9
    assert changed_settings(stored, now) == {"config": {"confidence": (None, 0.9)}}
    assert changed_settings(stored, {**now, "config": {"alpha": 0.1}}) == {
        "config": {"alpha": (0.05, 0.1)}}
    assert changed_settings({**stored, "config": {"alpha": 0.05, "old": 1}},
                            {**now, "config": {"alpha": 0.05}}) == {
        "config": {"old": (1, None)}}
    assert changed_settings(stored, {**now, "sigma": "model:lowrank",
                                     "config": {"alpha": 0.05}}) == {
        "sigma": ("model:pixel", "model:lowrank")}


def test_a_summary_without_good_images_is_strict_json():
    import json

    from sijax.evaluation.summary import summarize_images, summary_markdown

    # An MVTec folder with an empty test/good: the image AUROC is undefined. It
    # was NaN, which json.dump writes as `NaN` (not JSON).
    records = [_record("spot", 0.01, 0.01), _record("spot", 0.5, 0.5)]
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 1:3, 1:3] = True
    s = summarize_images(records, maps, masks, alpha=0.05, fdr=0.05)
    assert s["image_auroc"] is None and 0.0 <= s["pixel_auroc"] <= 1.0

    def strict(text):
        raise ValueError(f"{text} is not JSON")

    assert json.loads(json.dumps(s), parse_constant=strict) == s
    assert "image_auroc: undefined (needs both good and defect" in summary_markdown(s)
