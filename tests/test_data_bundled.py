"""Bundled offline data sets (sijax.data.bundled, issue 25 item 5).

Small sets built in tmp_path; skipped only where scikit-image / scikit-learn (the
'data' extra) are not installed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sijax.data import (
    Preprocessing,
    build_dataset,
    bundled,
    list_datasets,
    open_dataset,
)
from sijax.errors import InputError

pytest.importorskip("skimage", reason="the 'data' extra: pip install -e '.[data]'")
pytest.importorskip("sklearn", reason="the 'data' extra: pip install -e '.[data]'")

SMALL = {"n_train": 12, "n_test_good": 4, "n_test_defect": 3}


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_list_datasets():
    names = list_datasets()
    assert {"digits", "brick", "grass", "gravel", "ihc"} <= set(names)
    assert bundled.defect_kinds("digits") == ("scratch", "spot", "missing")
    assert bundled.defect_kinds("brick") == ("scratch", "spot", "missing", "stain")


@pytest.mark.parametrize("name, size, channels", [
    ("digits", 8, 1), ("brick", 16, 1), ("grass", 16, 1), ("gravel", 16, 1),
    ("ihc", 16, 3)])
def test_build_layout_and_determinism(tmp_path, name, size, channels):
    a = build_dataset(name, tmp_path / "a", size=size, seed=3, **SMALL)
    b = build_dataset(name, tmp_path / "b", size=size, seed=3, **SMALL)
    c = build_dataset(name, tmp_path / "c", size=size, seed=4, **SMALL)
    fa = _files(a)
    assert fa == _files(b)
    assert fa != _files(c)
    ds = open_dataset(a)
    kinds = bundled.defect_kinds(name)
    assert ds.layout == "mvtec" and ds.shape == (size, size, channels)
    assert ds.kinds == ("good", *sorted(kinds))
    assert len(ds.train) == 12 and len(ds.test) == 4 + 3 * len(kinds)
    raw = ds.train_images()
    assert raw.dtype == np.uint8 and raw.shape == (12, size, size, channels)
    pre = Preprocessing.fit(raw, size=size // 2)
    assert ds.train_images(pre).shape == (12, size // 2, size // 2, channels)
    items = list(ds.test_items())
    for t in items:
        assert t.mask.any() == (t.item.kind != "good"), t.item


def test_masks_are_exactly_the_changed_pixels():
    rng = np.random.default_rng(1)
    tex = bundled._texture("gravel")[:32, :32]
    other = bundled._texture("brick")[None, :32, :32]
    digit = np.zeros((8, 8, 1), np.uint8)
    digit[1:7, 3:5] = 255
    for kind in ("scratch", "spot", "missing", "stain"):
        for _ in range(10):
            x, m = bundled.make_defect(kind, tex, rng, other=other)
            assert x.dtype == np.uint8 and x.shape == tex.shape
            np.testing.assert_array_equal(m, np.any(x != tex, axis=2))
            assert m.sum() >= 32 * 32 // 100
    for kind in ("scratch", "spot", "missing"):
        for _ in range(10):
            x, m = bundled.make_defect(kind, digit, rng, background=0)
            np.testing.assert_array_equal(m, np.any(x != digit, axis=2))
            assert m.sum() >= 3


def test_stain_has_a_soft_edge_above_the_visible_level():
    rng = np.random.default_rng(2)
    flat = np.full((32, 32, 1), 128, np.uint8)
    x, m = bundled.make_defect("stain", flat, rng)
    change = np.abs(x.astype(int) - 128)[:, :, 0]
    assert change[m].min() >= bundled.STAIN_MIN_LEVEL
    assert len(np.unique(change[m])) > 5  # graded, not a flat disc
    assert (change[~m] == 0).all()


def test_written_masks_match_test_images(tmp_path):
    root = build_dataset("digits", tmp_path / "d", seed=0, **SMALL)
    ds = open_dataset(root)
    for t in ds.test_items():
        if t.item.kind == "good":
            continue
        assert t.mask.sum() >= 3
        assert os.path.basename(t.item.mask) == os.path.basename(
            t.item.source).replace(".png", "_mask.png")


def test_digits_disjoint_and_scaled(tmp_path):
    from sklearn.datasets import load_digits

    root = build_dataset("digits", tmp_path / "d", seed=0, **SMALL)
    with open(os.path.join(root, bundled.MANIFEST)) as f:
        idx = json.load(f)["source"]["indices"]
    assert len(idx) == len(set(idx)) == 12 + 4 + 3 * 3
    ds = open_dataset(root)
    expect = np.round(load_digits().images[idx[:12]] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(ds.train_images()[..., 0], expect)


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="unknown bundled data set 'mnist'"):
        build_dataset("mnist", tmp_path / "x")
    with pytest.raises(InputError, match=r"n_train \(--n-train\) must be"):
        build_dataset("digits", tmp_path / "x", n_train=0)
    with pytest.raises(InputError, match="seed"):
        build_dataset("digits", tmp_path / "x", seed=-1)
    with pytest.raises(InputError, match="too large"):
        build_dataset("brick", tmp_path / "x", size=300, **SMALL)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        build_dataset("digits", tmp_path / "full", **SMALL)
    with pytest.raises(InputError, match="not written by sijax"):
        build_dataset("digits", tmp_path / "full", overwrite=True, **SMALL)
    assert (tmp_path / "full" / "mine.txt").exists()
    root = build_dataset("digits", tmp_path / "d", **SMALL)
    again = build_dataset("digits", root, overwrite=True, seed=5, n_train=5,
                          n_test_good=1, n_test_defect=1)
    assert len(open_dataset(again).train) == 5


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(InputError, match=r"pip install -e '\.\[data\]'"):
        build_dataset("digits", tmp_path / "d", **SMALL)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(InputError, match=r"pip install -e '\.\[data\]'"):
        build_dataset("brick", tmp_path / "b", **SMALL)


def test_core_import_needs_no_extra():
    code = ("import sys, sijax.data; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('skimage', 'sklearn', 'tifffile')]; print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
