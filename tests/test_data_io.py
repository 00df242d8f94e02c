"""Image files, data sets and the recorded preprocessing (sijax.data, issue 25 item 1).

Oracles: the same pixels written through every format, a hand-written 16-bit PNG
encoder (all five filter types), block means for area resampling, Pillow's own luma.
"""

import json
import os
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from sijax.data import (
    InputWarning,
    Preprocessing,
    data_source,
    load_image,
    open_dataset,
    read_raw,
)
from sijax.data import images as images_mod
from sijax.data.preprocess import resize, resize_matrix
from sijax.errors import InputError

RNG = np.random.default_rng(0)
GREY8 = RNG.integers(0, 256, (12, 10), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def write_png16(path, x, filters=(0, 1, 2, 3, 4)):
    """An independent 16-bit PNG encoder (colour type 2 or 0), cycling the filters."""
    x = np.asarray(x, np.uint16)
    if x.ndim == 2:
        x = x[:, :, None]
    h, w, c = x.shape
    raw = x.astype(">u2").tobytes()
    stride, bpp = w * c * 2, c * 2
    rows = [np.frombuffer(raw[i * stride : (i + 1) * stride], np.uint8).astype(int)
            for i in range(h)]
    out = bytearray()
    for i, row in enumerate(rows):
        f = filters[i % len(filters)]
        up = rows[i - 1] if i else np.zeros(stride, int)
        left = np.concatenate([np.zeros(bpp, int), row[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, int), up[:-bpp]])
        if f == 0:
            pred = np.zeros(stride, int)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = up
        elif f == 3:
            pred = (left + up) // 2
        else:
            p = left + up - ul
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
        out.append(f)
        out += ((row - pred) & 255).astype(np.uint8).tobytes()

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 0, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                 + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ file formats


@pytest.mark.parametrize("pixels", [GREY8, RGB8], ids=["grey", "rgb"])
def test_8bit_formats_give_the_same_input(tmp_path, pixels):
    expect = (pixels.astype(np.float64) / 255.0).reshape(12, 10, -1)
    for name in ("a.png", "a.tif", "a.tiff", "a.bmp"):
        Image.fromarray(pixels).save(tmp_path / name)
    np.save(tmp_path / "a.npy", pixels)
    for name in ("a.png", "a.tif", "a.tiff", "a.bmp", "a.npy"):
        x = load_image(tmp_path / name)
        assert x.dtype == np.float64
        np.testing.assert_array_equal(x, expect, err_msg=name)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=100, subsampling=0)
    jpg = load_image(tmp_path / "a.jpg")  # lossy: same scale, close values
    assert jpg.shape == expect.shape
    assert np.abs(jpg - expect).mean() < 0.05


def test_16bit_grey_png_tiff_npy_same_and_truly_16bit(tmp_path):
    x16 = (GREY8.astype(np.uint16) * 257) + RNG.integers(0, 200, GREY8.shape).astype(
        np.uint16)
    Image.fromarray(x16).save(tmp_path / "a.png")  # Pillow mode "I;16"
    Image.fromarray(x16).save(tmp_path / "a.tif")
    np.save(tmp_path / "a.npy", x16)
    write_png16(tmp_path / "b.png", x16)
    expect = x16[:, :, None] / 65535.0
    for name in ("a.png", "a.tif", "a.npy", "b.png"):
        assert read_raw(tmp_path / name).dtype == np.uint16, name
        np.testing.assert_array_equal(load_image(tmp_path / name), expect, name)
    # 16 bits kept: not equal to any 8-bit rounding of it.
    assert not np.array_equal(load_image(tmp_path / "a.png"),
                              np.round(expect * 255) / 255)


def test_8_and_16_bit_of_one_image_are_equal(tmp_path):
    Image.fromarray(GREY8).save(tmp_path / "a8.png")
    Image.fromarray(GREY8.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a8.png"),
                                  load_image(tmp_path / "a16.png"))


def test_16bit_rgb_png_all_filters(tmp_path):
    x16 = RNG.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
    write_png16(tmp_path / "c.png", x16)
    # Pillow alone would give 8 bits here.
    with Image.open(tmp_path / "c.png") as im:
        assert np.asarray(im).dtype == np.uint8
    got = read_raw(tmp_path / "c.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, x16)


def test_16bit_rgb_tiff(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    x16 = RNG.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", x16)
    np.testing.assert_array_equal(read_raw(tmp_path / "c.tif"), x16)
    # Without tifffile Pillow would reduce it to 8 bits: an error, not a wrong answer.
    monkeypatch.setattr(images_mod, "_read_tiff", lambda path: None)
    with pytest.raises(InputError, match="c.tif.*16-bit colour TIFF"):
        read_raw(tmp_path / "c.tif")


def test_float_npy_and_float_tiff_kept_as_stored(tmp_path):
    x = RNG.standard_normal((5, 6, 1))
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(load_image(tmp_path / "x.npy"), x)
    Image.fromarray(x[:, :, 0].astype(np.float32)).save(tmp_path / "x.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "x.tif"),
                                  x.astype(np.float32).astype(np.float64))


def test_mode_conversions(tmp_path):
    rgba = np.dstack([RGB8, np.full((12, 10), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    # The alpha channel is dropped.
    np.testing.assert_array_equal(read_raw(tmp_path / "rgba.png"), RGB8)
    Image.fromarray(RGB8).convert("P").save(tmp_path / "p.png")
    pal = read_raw(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        np.testing.assert_array_equal(pal, np.asarray(im.convert("RGB")))
    Image.fromarray(GREY8).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_raw(tmp_path / "la.png")[:, :, 0], GREY8)
    Image.fromarray(GREY8 > 128).save(tmp_path / "bw.png")
    np.testing.assert_array_equal(load_image(tmp_path / "bw.png")[:, :, 0],
                                  (GREY8 > 128).astype(float))


@pytest.mark.parametrize("array, why", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN/Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN/Inf"),
    (np.zeros((3, 3), np.int64), "no defined intensity scale"),
    (np.zeros((3, 3), bool), "real numbers"),
], ids=["nan", "inf", "int64", "bool"])
def test_bad_npy_names_the_file(tmp_path, array, why):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InputError, match=f"bad.npy.*{why}"):
        load_image(tmp_path / "bad.npy")


def test_npy_bands_are_kept_as_they_are(tmp_path):
    """A .npy with C channels is C bands (multispectral), never guessed as RGBA;
    a model of C channels takes it, a grey or RGB model refuses it by name."""
    bands = RNG.random((12, 12, 4))
    np.save(tmp_path / "four.npy", bands)
    np.testing.assert_array_equal(read_raw(tmp_path / "four.npy"), bands)
    pre = Preprocessing.fit(bands[None], size=6)
    assert pre.channels == 4 and pre.apply(tmp_path / "four.npy").shape == (6, 6, 4)
    with pytest.raises(InputError, match="four.npy.*cannot convert 4 channels to 3"):
        Preprocessing(size=6, channels=3).check_input(tmp_path / "four.npy")


def test_truncated_and_unreadable_files_name_the_file(tmp_path):
    Image.fromarray(RGB8).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.png"):
        read_raw(tmp_path / "t.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="junk.png"):
        read_raw(tmp_path / "junk.png")
    write_png16(tmp_path / "t16.png", RNG.integers(0, 65536, (9, 7, 3)))
    data = (tmp_path / "t16.png").read_bytes()
    (tmp_path / "t16.png").write_bytes(data[:60])
    with pytest.raises(InputError, match="t16.png"):
        read_raw(tmp_path / "t16.png")
    with pytest.raises(InputError, match="unknown image type"):
        read_raw(tmp_path / "x.gifx")


def test_load_image_shape_check_unchanged(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 4, 1)))
    with pytest.raises(InputError, match="expects 8x8"):
        load_image(tmp_path / "x.npy", (8, 8, 1))


# ------------------------------------------------------------------ preprocessing


def test_resize_matrices_area_and_bilinear():
    for n_in, n_out in [(12, 4), (10, 3), (5, 9), (7, 7)]:
        a = resize_matrix(n_in, n_out)
        np.testing.assert_allclose(a.sum(1), 1.0, rtol=0, atol=1e-14)
        assert (a >= 0).all()
    x = RNG.random((12, 8, 2))
    block = x.reshape(4, 3, 4, 2, 2).mean(axis=(1, 3))  # area = block mean
    np.testing.assert_allclose(resize(x, 4, 4), block, rtol=0, atol=1e-14)
    # Enlarging keeps a linear ramp linear inside (bilinear between centres).
    ramp = np.arange(4.0)[:, None, None] * np.ones((1, 1, 1))
    up = resize(ramp, 8, 1)[:, 0, 0]
    np.testing.assert_allclose(up[1:-1], (np.arange(1, 7) + 0.5) / 2 - 0.5,
                               atol=1e-14)


def test_preprocessing_fit_roundtrip_apply(tmp_path):
    raw = RNG.integers(0, 256, (6, 20, 14, 3), dtype=np.uint8)
    pre = Preprocessing.fit(raw, size=8, channels=3, mode="center_crop")
    stored = json.loads(json.dumps({"preprocessing": pre.to_dict()}))
    back = Preprocessing.from_dict(stored["preprocessing"])
    assert back == pre
    x = pre.apply_batch(raw)
    assert x.shape == (6, 8, 8, 3) and x.dtype == np.float64
    np.testing.assert_array_equal(back.apply_batch(raw), x)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-12)
    # center_crop = the central 14x14 square, then 14 -> 8 area resampling.
    crop = raw[0, 3:17].astype(np.float64) / 255
    np.testing.assert_allclose(x[0], (resize(crop, 8, 8) - pre.mean) / pre.std,
                               atol=1e-12)
    np.testing.assert_allclose(pre.unapply(x[0]), resize(crop, 8, 8), atol=1e-12)
    # A file path gives the same as its pixels.
    Image.fromarray(raw[0]).save(tmp_path / "r.png")
    np.testing.assert_array_equal(pre.apply(tmp_path / "r.png"), x[0])
    with pytest.raises(InputError, match="unknown keys"):
        Preprocessing.from_dict({**pre.to_dict(), "gamma": 2})


def test_channel_conversions():
    pre1 = Preprocessing(size=10, channels=1, mode="resize")
    grey = pre1.apply(RGB8[:10])
    pil = np.asarray(Image.fromarray(RGB8[:10]).convert("L")) / 255.0
    np.testing.assert_allclose(grey[:, :, 0], pil, atol=0.51 / 255)
    pre3 = Preprocessing(size=10, channels=3, mode="resize")
    rgb = pre3.apply(GREY8[:10])
    for k in range(3):
        np.testing.assert_array_equal(rgb[:, :, k], GREY8[:10] / 255.0)
    with pytest.raises(InputError, match="2 channels"):
        pre3.check_input(np.zeros((10, 10, 2)), "two.npy")
    # The file is named, not "image:" (sijax test on an int32 .npy said so).
    with pytest.raises(InputError, match="^i32.npy: pixel dtype int32 has no"):
        pre1.check_input(np.ones((10, 10), np.int32), "i32.npy")


def test_check_input_warns_far_from_training():
    raw = RNG.integers(60, 200, (5, 16, 16), dtype=np.uint8)
    pre = Preprocessing.fit(raw, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.check_input(raw[0], "ok.png")
    with pytest.warns(InputWarning, match="far.png"):
        pre.check_input(np.full((16, 16), 255, np.uint8), "far.png")  # bright
    with pytest.warns(InputWarning, match="u16.png"):
        # A 16-bit image stored in a uint8-trained scale would be 0..1/257: caught.
        pre.check_input(raw[0].astype(np.float64) * 40, "u16.png")


def test_check_input_warns_on_other_channels_or_scale():
    """A grey image for a colour model, or an image far larger or smaller than the
    training images (resampled, its content shows at another scale), warns; an old
    model without the record does not."""
    raw = [RNG.integers(60, 200, hw + (3,), dtype=np.uint8)
           for hw in [(16, 16), (20, 12)]]
    pre = Preprocessing.fit(raw, size=8)
    assert pre.stored == {"channels": 3, "min_hw": [16, 12], "max_hw": [20, 16]}
    back = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back.stored == pre.stored and back == pre
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.check_input(raw[1], "ok.png")
        pre.check_input(raw[0][:9, :7], "half.png")  # within half to twice
    grey = np.round(raw[0] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    with pytest.warns(InputWarning, match=r"grey.png has 1 channel\(s\) but the "
                      r"training images had 3: the model sees its grey value"):
        pre.check_input(grey, "grey.png")
    big = np.tile(raw[0], (3, 3, 1))  # 48x48
    with pytest.warns(InputWarning, match=r"big.png is 48x48 but the training images "
                      r"were 16x12 to 20x16"):
        pre.check_input(big, "big.png")
    old = Preprocessing.from_dict({k: v for k, v in pre.to_dict().items()
                                   if k != "stored"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old.check_input(big, "big.png")
    with pytest.raises(InputError, match="'stored'"):
        Preprocessing.from_dict({**pre.to_dict(), "stored": {"channels": 3}})


def test_check_native_warns_for_tiles_as_check_input_does():
    """A tiled test (sijax test --tiles) reads its image with check_native: another
    channel count, or an intensity far from the training images, warns as in
    check_input; the size compared is a tile's (size x size pixels at the image's
    resolution), since the model learned its training images resampled to size."""
    raw = [RNG.integers(60, 200, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    pre = Preprocessing.fit(raw, size=8)  # 16x16 images resampled to 8x8
    big = np.tile(raw[0], (4, 4, 1))  # 64x64, tested at its own resolution
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = pre.check_native(big, "big.png")  # an 8x8 tile: within half to twice
    np.testing.assert_allclose(x, pre.apply_native(big))
    grey = np.round(big @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    with pytest.warns(InputWarning, match=r"grey.png has 1 channel\(s\) but the "
                      r"training images had 3"):
        pre.check_native(grey, "grey.png")
    with pytest.warns(InputWarning, match="far from the training images"):
        pre.check_native(big // 4, "dark.png")
    scans = [RNG.integers(60, 200, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    shrunk = Preprocessing.fit(scans, size=8)  # 40x40 scans resampled to 8x8
    with pytest.warns(InputWarning) as caught:
        shrunk.check_native(big, "big.png")
    assert any(re.match(r"big.png: its 8x8 tiles are tested at its own resolution "
                        r"but the training images were 40x40", str(w.message))
               for w in caught)
    with pytest.raises(InputError, match="channel"):
        pre.check_native(np.zeros((16, 16, 2), np.uint8), "two.png")


def test_resize_mask_nearest_same_crop():
    pre = Preprocessing(size=4, mode="center_crop")
    m = np.zeros((8, 12), bool)
    m[0:2, 0:2] = True  # left of the central 8x8 square (columns 2..9): cut
    m[4:6, 6:8] = True
    got = pre.resize_mask(m)
    assert got.dtype == bool and got.shape == (4, 4)
    expect = np.zeros((4, 4), bool)
    expect[2, 2] = True
    np.testing.assert_array_equal(got, expect)


# ----------------------------------------------------------------------- data sets


def _save_all(folder, arrays, suffix=".png"):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"{i:03d}{suffix}"))


def test_folder_dataset_and_skips(tmp_path):
    imgs = RNG.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    _save_all(tmp_path, imgs)
    (tmp_path / "README.txt").write_text("notes")
    (tmp_path / "sub").mkdir()
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder" and ds.shape == (6, 6, 1)
    assert [it.split for it in ds.items] == ["train"] * 4
    assert {os.path.basename(p) for p in ds.skipped} == {"README.txt", "sub"}
    np.testing.assert_array_equal(ds.train_images(), imgs[..., None])
    pre = Preprocessing.fit(ds.train_images(), size=4)
    assert ds.train_images(pre).shape == (4, 4, 4, 1)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=f"{tmp_path}.*no image files"):
        open_dataset(tmp_path)


def test_mixed_channels_name_the_odd_file(tmp_path):
    _save_all(tmp_path, RNG.integers(0, 256, (3, 6, 6), dtype=np.uint8))
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "000a.png")
    with pytest.raises(InputError, match=r"000a.png is 6x6x3 .* 3 of the 4 .* have 1 "
                       r"channel"):
        open_dataset(tmp_path)


def test_mixed_sizes_are_resampled_one_by_one(tmp_path):
    """Real sets (line-scan parts, cropped scans) vary in size: each image goes
    through the preprocessing alone; only stacking them as stored is refused."""
    imgs = [RNG.integers(0, 256, hw, dtype=np.uint8) for hw in
            [(6, 6), (6, 7), (9, 5), (6, 6)]]
    for i, x in enumerate(imgs):
        Image.fromarray(x).save(tmp_path / f"{i:03d}.png")
    ds = open_dataset(tmp_path)
    assert ds.shape == (6, 6, 1)  # the most common
    assert ds.size_of(ds.train[2]) == (9, 5)
    with pytest.raises(InputError, match=r"differ in size \(6x6 ... 9x5\)"):
        ds.train_images()
    raws = ds.train_raws()
    assert [r.shape for r in raws] == [(6, 6, 1), (6, 7, 1), (9, 5, 1), (6, 6, 1)]
    pre = Preprocessing.fit(raws, size=4)
    x = ds.train_images(pre)
    assert x.shape == (4, 4, 4, 1)
    np.testing.assert_allclose(x[2], pre.apply(imgs[2]))


def test_mixed_8_and_16_bit_folder_works(tmp_path):
    Image.fromarray(GREY8).save(tmp_path / "a.png")
    Image.fromarray(GREY8.astype(np.uint16) * 257).save(tmp_path / "b.png")
    x = open_dataset(tmp_path).train_images()
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x[0], x[1])


def test_truncated_file_in_dataset_named_on_read(tmp_path):
    _save_all(tmp_path, RNG.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    data = (tmp_path / "001.png").read_bytes()
    (tmp_path / "001.png").write_bytes(data[: len(data) - 40])
    ds = open_dataset(tmp_path)  # the header is intact
    with pytest.raises(InputError, match="001.png"):
        ds.train_images()


def _mvtec(root, n=3, size=6):
    imgs = RNG.integers(0, 256, (3 * n, size, size), dtype=np.uint8)
    _save_all(root / "train" / "good", imgs[:n])
    _save_all(root / "test" / "good", imgs[n : 2 * n])
    _save_all(root / "test" / "scratch", imgs[2 * n :])
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 1:3, 2:5] = 255
    os.makedirs(root / "ground_truth" / "scratch")
    for i, m in enumerate(masks):
        Image.fromarray(m).save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return imgs, masks


def test_mvtec_layout_with_masks(tmp_path):
    imgs, masks = _mvtec(tmp_path)
    (tmp_path / "license.txt").write_text("CC")
    (tmp_path / "test" / "notes.txt").write_text("loose file")
    ds = open_dataset(tmp_path)
    assert [os.path.basename(p) for p in ds.skipped] == ["notes.txt"]
    assert ds.layout == "mvtec" and ds.kinds == ("good", "scratch")
    assert len(ds.train) == 3 and len(ds.test) == 6
    assert [it.kind for it in ds.test] == ["good"] * 3 + ["scratch"] * 3
    assert ds.test[3].mask.endswith(os.path.join("scratch", "000_mask.png"))
    np.testing.assert_array_equal(ds.train_images()[..., 0], imgs[:3])
    pre = Preprocessing.fit(ds.train_images(), size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        items = list(ds.test_items(pre))
    assert all(t.image.shape == (3, 3, 1) and t.mask.dtype == bool for t in items)
    assert not any(t.mask.any() for t in items[:3])
    expect = pre.resize_mask(masks[0])
    assert expect.any()
    for t in items[3:]:
        np.testing.assert_array_equal(t.mask, expect)
    raw_items = list(ds.test_items())
    np.testing.assert_array_equal(raw_items[4].mask, masks[1] > 0)
    np.testing.assert_array_equal(raw_items[4].image[..., 0], imgs[7] / 255.0)


def test_mvtec_bad_layouts(tmp_path):
    _mvtec(tmp_path)
    gt = tmp_path / "ground_truth" / "scratch"
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(gt / "007_mask.png")
    with pytest.raises(InputError, match="007_mask.png: mask without an image"):
        open_dataset(tmp_path)
    os.remove(gt / "007_mask.png")
    os.remove(gt / "001_mask.png")
    with pytest.raises(InputError, match=r"scratch.001.png: no mask"):
        open_dataset(tmp_path)
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(gt / "001_mask.png")
    with pytest.raises(InputError, match="001_mask.png is 5x6"):
        open_dataset(tmp_path)
    os.rename(gt, tmp_path / "elsewhere")
    with pytest.raises(InputError, match="scratch: defect folder without masks"):
        open_dataset(tmp_path)


def test_mvtec_masks_of_varied_sizes_and_jpeg_ringing(tmp_path):
    """Each mask matches its own image; a pixel counts where the mask exceeds half
    its largest value (0/1 masks, 0/255 masks, JPEG ringing)."""
    _mvtec(tmp_path)
    big = RNG.integers(0, 256, (8, 10), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "test" / "scratch" / "001.png")
    gt = tmp_path / "ground_truth" / "scratch"
    with pytest.raises(InputError, match=r"001_mask.png is 6x6 but its image .*001.png "
                       r"is 8x10"):
        open_dataset(tmp_path)
    ring = np.zeros((8, 10), np.uint8)
    ring[2:5, 3:7] = 250
    ring[1, 3:7] = 9  # JPEG-like ringing beside the edge
    Image.fromarray(ring).save(gt / "001_mask.png")
    ones = np.zeros((6, 6), np.uint8)
    ones[1:4, 1:5] = 1
    Image.fromarray(ones).save(gt / "002_mask.png")
    ds = open_dataset(tmp_path)
    assert ds.sizes is not None and ds.size_of(ds.test[4]) == (8, 10)
    raw = list(ds.test_items())
    np.testing.assert_array_equal(raw[4].mask, ring == 250)
    assert raw[4].image.shape == (8, 10, 1)
    np.testing.assert_array_equal(raw[3].mask[1:3, 2:5], True)  # a 0/255 mask
    assert raw[5].mask.sum() == 12  # a 0/1 mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        pre = Preprocessing.fit(ds.train_raws(), size=4)
        items = list(ds.test_items(pre))
    assert all(t.image.shape == (4, 4, 1) and t.mask.shape == (4, 4) for t in items)
    np.testing.assert_array_equal(items[4].mask, pre.resize_mask(ring == 250))


def test_mvtec_orphan_mask_folder(tmp_path):
    _mvtec(tmp_path)
    _save_all(tmp_path / "ground_truth" / "hole", [np.zeros((6, 6), np.uint8)])
    with pytest.raises(InputError, match="hole.000.png: mask without an image"):
        open_dataset(tmp_path)


def test_stacks(tmp_path):
    x = RNG.integers(0, 256, (5, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "s.npy", x)
    ds = open_dataset(tmp_path / "s.npy")
    assert ds.layout == "stack" and ds.shape == (6, 6, 1) and len(ds.train) == 5
    np.testing.assert_array_equal(ds.train_images()[..., 0], x)
    m = np.zeros((5, 6, 6), bool)
    m[2, 1, 1] = True
    np.savez(tmp_path / "t.npz", images=x, masks=m)
    ds = open_dataset(tmp_path / "t.npz")
    assert [it.kind for it in ds.test] == ["good", "good", "defect", "good", "good"]
    with pytest.raises(InputError, match="no training images"):
        ds.train_images()
    np.savez(tmp_path / "one.npz", x.astype(np.float64))
    assert open_dataset(tmp_path / "one.npz").train_images().dtype == np.float64
    bad = x.astype(np.float64)
    bad[3, 2, 4] = np.nan
    np.savez(tmp_path / "nan.npz", images=bad)
    with pytest.raises(InputError, match=r"nan.npz: 1 NaN/Inf .* image 3"):
        open_dataset(tmp_path / "nan.npz")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(InputError, match="two.npz.*'images'"):
        open_dataset(tmp_path / "two.npz")


def test_data_source_hash(tmp_path):
    _mvtec(tmp_path)
    a = data_source(tmp_path)
    assert a["count"] == 9 and a["n_train"] == 3 and len(a["sha256"]) == 64
    assert a["path"] == os.path.abspath(tmp_path)
    (tmp_path / "notes.txt").write_text("not data")
    assert data_source(tmp_path)["sha256"] == a["sha256"]
    Image.fromarray(np.ones((6, 6), np.uint8)).save(
        tmp_path / "train" / "good" / "001.png")
    assert data_source(tmp_path)["sha256"] != a["sha256"]
    np.save(tmp_path / "s.npy", np.zeros((2, 3, 3)))
    b = data_source(tmp_path / "s.npy")
    assert b["count"] == 2 and b["layout"] == "stack"


def test_missing_path():
    with pytest.raises(InputError, match="not found"):
        open_dataset("/nonexistent/sijax/data")


def test_multipage_tiff_is_an_error(tmp_path, monkeypatch):
    frames = [Image.fromarray(GREY8), Image.fromarray(255 - GREY8)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="m.tif: a (TIFF|file) with 2 images"):
        read_raw(tmp_path / "m.tif")
    monkeypatch.setattr(images_mod, "_read_tiff", lambda path: None)  # Pillow only
    with pytest.raises(InputError, match="m.tif: a file with 2 images"):
        read_raw(tmp_path / "m.tif")


def test_planar_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    x = RNG.integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(x, -1, 0),
                     planarconfig="separate", photometric="rgb")
    np.testing.assert_array_equal(read_raw(tmp_path / "p.tif"), x)


def test_unreadable_file_in_folder_named_on_open(tmp_path):
    _save_all(tmp_path, RNG.integers(0, 256, (2, 6, 6), dtype=np.uint8))
    (tmp_path / "002.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="002.png"):
        open_dataset(tmp_path)
    os.remove(tmp_path / "002.png")
    np.save(tmp_path / "003.npy", np.full((6, 6), np.nan))
    ds = open_dataset(tmp_path)
    with pytest.raises(InputError, match="003.npy: 36 NaN/Inf"):
        ds.train_images()


def test_evaluation_never_falls_back_to_the_training_images(tmp_path):
    from sijax.evaluation.evaluate import evaluation_items

    _mvtec(tmp_path)
    ds = open_dataset(tmp_path)
    assert [it.kind for it in evaluation_items(ds, max_per_kind=1)] == [
        "good", "scratch"]
    with pytest.raises(InputError, match="--max-per-kind must be >= 1; got 0"):
        evaluation_items(ds, max_per_kind=0)
    # An MVTec root whose test folders are empty once had its train/good images
    # tested as "unlabelled".
    for f in (tmp_path / "test").rglob("*.png"):
        f.unlink()
    for f in (tmp_path / "ground_truth").rglob("*.png"):
        f.unlink()
    with pytest.raises(InputError, match="no test images in test/good or "
                       r"test/<defect> \(the training images of train/good"):
        evaluation_items(open_dataset(tmp_path))
    # A flat folder has no test split: all its images are tested.
    flat = open_dataset(tmp_path / "train" / "good")
    assert {it.kind for it in evaluation_items(flat)} == {"unlabelled"}
