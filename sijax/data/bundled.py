"""Real image data that ships offline: anomaly data sets built from bundled images.

:func:`build_dataset` writes an MVTec-layout folder (see :mod:`sijax.data.datasets`) of
8-bit PNGs with masks, a deterministic function of its arguments (and of the package
versions that ship the source images). Sources, all inside installed packages, nothing
downloaded:

* "digits": scikit-learn's handwritten digits (``sklearn.datasets.load_digits``,
  1797 images of 8x8 pixels at 17 levels 0..16, written as ``round(v * 255 / 16)``).
  train/good, test/good and the defective test images are disjoint sets of digits.
* "brick", "grass", "gravel" (grey, 512x512) and "ihc" (RGB immunohistochemistry,
  512x512): scikit-image's bundled textures (``skimage.data.<name>()``). Patches are
  crops of side ``2 * size`` (``size`` for size > 64) area-averaged down to ``size``.
  The picture is cut into square blocks of 1.5 crop sides, 30 % of them (at random)
  for test patches and the rest for training patches, each crop inside one block, so
  no test pixel was seen in training.

Defects (one ``test/<kind>`` folder each; ``n_test_defect`` images per kind):

* "scratch": a thin bright or dark line segment at a random angle;
* "spot": a bright or dark blob with a wavy outline that keeps a trace of the texture;
* "missing": a rectangle replaced by a flat colour or by a patch of another texture
  (digits: by the background, a missing block of the stroke);
* "stain" (textures only): a smooth additive darker or lighter area with a soft edge;
  changes below ``STAIN_MIN_LEVEL`` grey levels are dropped, so its mask is where the
  change is visible.

Mask rule, for every kind: the mask (``ground_truth/<kind>/<name>_mask.png``, 0 or 255)
marks exactly the pixels whose stored 8-bit value differs from the defect-free patch
in some channel. A defect that changes fewer than ``min_area`` pixels (e.g. a dark
line over dark background) is drawn again.

scikit-image and scikit-learn are the optional extra ``pip install -e '.[data]'``;
they are imported only here, when a data set is built.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import numpy as np

from sijax.data.images import save_png8
from sijax.data.preprocess import resize
from sijax.errors import InputError

TEXTURES = {
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "ihc": "immunohistochemistry",
}
DESCRIPTIONS = {
    "digits": "scikit-learn handwritten digits, 8x8 grey; defects scratch, spot, "
              "missing",
    "brick": "scikit-image brick wall texture, grey; defects scratch, spot, missing, "
             "stain",
    "grass": "scikit-image grass texture, grey; defects scratch, spot, missing, stain",
    "gravel": "scikit-image gravel texture, grey; defects scratch, spot, missing, "
              "stain",
    "ihc": "scikit-image immunohistochemistry tissue, RGB; defects scratch, spot, "
           "missing, stain",
}
TEXTURE_DEFECTS = ("scratch", "spot", "missing", "stain")
DIGIT_DEFECTS = ("scratch", "spot", "missing")
# Defaults (size, n_train, n_test_good, n_test_defect per kind): a few hundred files.
DEFAULTS = {"digits": (8, 300, 60, 20), "texture": (32, 200, 40, 15)}
STAIN_MIN_LEVEL = 8  # grey levels of 255
MANIFEST = "sijax_dataset.json"
_PIP_HINT = "pip install -e '.[data]'"


def list_datasets() -> tuple[str, ...]:
    """Names accepted by :func:`build_dataset` ("digits", "brick", ...)."""
    return tuple(DESCRIPTIONS)


def defect_kinds(name: str) -> tuple[str, ...]:
    """The defect folders that :func:`build_dataset` writes for ``name``."""
    _check_name(name)
    return DIGIT_DEFECTS if name == "digits" else TEXTURE_DEFECTS


def build_dataset(name: str, out_dir: str | os.PathLike, *, size: int | None = None,
                  n_train: int | None = None, n_test_good: int | None = None,
                  n_test_defect: int | None = None, seed: int = 0,
                  overwrite: bool = False) -> str:
    """Writes a bundled anomaly data set in the MVTec layout (module docstring).

    Args:
        name: one of :func:`list_datasets`.
        out_dir: the category folder to write (``train/good``, ``test/<kind>``,
            ``ground_truth/<kind>``, and ``sijax_dataset.json`` recording the
            arguments and sources); created if needed; must be empty unless
            ``overwrite``.
        size: H = W of the images (default 8 for digits, 32 for textures; textures
            need 8 <= size <= 170, digits 4 <= size).
        n_train: normal training images (default 300 digits / 200 texture patches).
        n_test_good: normal test images (default 60 / 40).
        n_test_defect: defective test images per defect kind (default 20 / 15).
        seed: everything random (patch positions, defects) follows from it.
        overwrite: replace a data set written earlier by this function (one with a
            ``sijax_dataset.json``); other folders are never deleted.

    Returns:
        The absolute path of ``out_dir``.

    Raises:
        InputError: unknown name, bad sizes or counts, a non-empty ``out_dir``, or
            scikit-image / scikit-learn missing (``pip install -e '.[data]'``).
    """
    _check_name(name)
    d_size, d_train, d_good, d_defect = DEFAULTS["digits" if name == "digits"
                                                 else "texture"]
    size = d_size if size is None else size
    n_train = d_train if n_train is None else n_train
    n_test_good = d_good if n_test_good is None else n_test_good
    n_test_defect = d_defect if n_test_defect is None else n_test_defect
    for k, v, lo in (("size", size, 4), ("n_train", n_train, 1),
                     ("n_test_good", n_test_good, 0),
                     ("n_test_defect", n_test_defect, 0), ("seed", seed, 0)):
        if not isinstance(v, int | np.integer) or v < lo:
            flag = "--" + k.replace("_", "-")  # the option of `sijax data`
            raise InputError(f"build_dataset: {k} ({flag}) must be an integer >= "
                             f"{lo}; got {v!r}")
    out = _prepare_out(os.path.abspath(os.fspath(out_dir)), overwrite)
    try:
        _build(name, out, size, n_train, n_test_good, n_test_defect, seed)
    except OSError as e:  # disk full, permissions
        raise InputError(f"cannot write {e.filename or out}: {e.strerror or e}"
                         ) from None
    return out


def _build(name, out, size, n_train, n_test_good, n_test_defect, seed):
    # The name enters the seed so that two data sets of one seed differ in layout.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    kinds = defect_kinds(name)
    if name == "digits":
        train, good, defect_base, other, source = _digit_patches(
            rng, size, n_train, n_test_good, n_test_defect * len(kinds))
    else:
        train, good, defect_base, other, source = _texture_patches(
            name, rng, size, n_train, n_test_good, n_test_defect * len(kinds))
    _write_all(out, "train", "good", train)
    _write_all(out, "test", "good", good)
    background = 0 if name == "digits" else None
    for j, kind in enumerate(kinds):
        imgs, masks = [], []
        for p in defect_base[j * n_test_defect : (j + 1) * n_test_defect]:
            x, m = make_defect(kind, p, rng, other=other, background=background)
            imgs.append(x)
            masks.append(m)
        _write_all(out, "test", kind, imgs, masks)
    manifest = {"name": name, "seed": seed, "size": size, "n_train": n_train,
                "n_test_good": n_test_good, "n_test_defect": n_test_defect,
                "defect_kinds": list(kinds), "source": source,
                "mask_rule": "pixels whose 8-bit value differs from the defect-free "
                             "patch in some channel"}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)


# -------------------------------------------------------------------------- defects


def make_defect(kind: str, patch: np.ndarray, rng: np.random.Generator, *,
                other: np.ndarray | None = None, background: int | None = None,
                min_area: int | None = None, tries: int = 50
                ) -> tuple[np.ndarray, np.ndarray]:
    """Draws one defect on a patch.

    Args:
        kind: "scratch", "spot", "missing" or "stain".
        patch: uint8 (s, s, C) defect-free image.
        rng: numpy Generator (advanced).
        other: uint8 (K, s, s, C) patches of another texture, for "missing" (None:
            flat fill only).
        background: fill level of "missing" (digits: 0); None picks a flat grey or
            ``other``.
        min_area: redraw until at least this many pixels change (default
            max(3, s * s // 100)).
        tries: redraws before giving up.

    Returns:
        (image uint8 (s, s, C), mask bool (s, s)); mask == (image != patch).any(-1).

    Raises:
        InputError: unknown kind, or no visible defect in ``tries`` draws.
    """
    draw = {"scratch": _scratch, "spot": _spot, "missing": _missing,
            "stain": _stain}.get(kind)
    if draw is None:
        raise InputError(f"unknown defect kind {kind!r}; use scratch, spot, missing "
                         "or stain")
    s = patch.shape[0]
    min_area = max(3, s * s // 100) if min_area is None else min_area
    for _ in range(tries):
        x = draw(patch, rng, other=other, background=background)
        mask = np.any(x != patch, axis=2)
        if mask.sum() >= min_area:
            return x, mask
    raise InputError(f"could not draw a visible {kind!r} defect on this patch "
                     f"in {tries} tries")


def _grid(s: int):
    r, c = np.mgrid[0:s, 0:s].astype(np.float64)
    return r + 0.5, c + 0.5


def _level(patch, rng, bright: bool) -> np.ndarray:
    """A fill level far from the patch: near black or near white, per channel."""
    c = patch.shape[2]
    if bright:
        return np.full(c, 255.0) - rng.integers(0, 25)
    return np.full(c, 0.0) + rng.integers(0, 25)


def _scratch(patch, rng, **_):
    s = patch.shape[0]
    r, c = _grid(s)
    theta = rng.uniform(0, np.pi)
    length = rng.uniform(0.4, 0.9) * s
    r0, c0 = rng.uniform(0.25 * s, 0.75 * s, size=2)
    dr, dc = np.sin(theta), np.cos(theta)
    # Distance of each pixel centre to the segment through (r0, c0).
    t = np.clip((r - r0) * dr + (c - c0) * dc, -length / 2, length / 2)
    dist = np.hypot(r - (r0 + t * dr), c - (c0 + t * dc))
    width = max(1.0, s / 32) * rng.uniform(0.8, 1.5)
    line = dist <= width / 2
    x = patch.astype(np.float64)
    x[line] = _level(patch, rng, bool(rng.integers(2)))
    return _to_u8(x)


def _spot(patch, rng, **_):
    s = patch.shape[0]
    r, c = _grid(s)
    rad = rng.uniform(0.06, 0.15, size=2) * s + 0.6
    r0, c0 = rng.uniform(rad.max(), s - rad.max(), size=2)
    phi = rng.uniform(0, np.pi)
    u = (r - r0) * np.cos(phi) + (c - c0) * np.sin(phi)
    v = -(r - r0) * np.sin(phi) + (c - c0) * np.cos(phi)
    ang = np.arctan2(v, u)
    wavy = 1 + 0.2 * np.sin(rng.integers(2, 5) * ang + rng.uniform(0, 2 * np.pi))
    blob = (u / rad[0]) ** 2 + (v / rad[1]) ** 2 <= wavy**2
    x = patch.astype(np.float64)
    level = _level(patch, rng, bool(rng.integers(2)))
    # Keep 30 % of the texture's variation inside the spot: a stain-like blob, not a
    # pasted disc.
    x[blob] = level + 0.3 * (x[blob] - x[blob].mean(0))
    return _to_u8(x)


def _missing(patch, rng, *, other=None, background=None, **_):
    s = patch.shape[0]
    h, w = np.maximum(2, np.round(rng.uniform(0.15, 0.4, size=2) * s)).astype(int)
    r0, c0 = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
    x = patch.copy()
    if background is not None:
        x[r0 : r0 + h, c0 : c0 + w] = background
    elif other is not None and rng.integers(2):
        o = other[rng.integers(len(other))]
        x[r0 : r0 + h, c0 : c0 + w] = o[r0 : r0 + h, c0 : c0 + w]
    else:
        x[r0 : r0 + h, c0 : c0 + w] = np.round(
            _level(patch, rng, bool(rng.integers(2))) * 0.5
            + patch.reshape(-1, patch.shape[2]).mean(0) * 0.5).astype(np.uint8)
    return x


def _stain(patch, rng, **_):
    s = patch.shape[0]
    r, c = _grid(s)
    sig = rng.uniform(0.12, 0.3, size=2) * s
    r0, c0 = rng.uniform(0.2 * s, 0.8 * s, size=2)
    phi = rng.uniform(0, np.pi)
    u = (r - r0) * np.cos(phi) + (c - c0) * np.sin(phi)
    v = -(r - r0) * np.sin(phi) + (c - c0) * np.cos(phi)
    g = np.exp(-0.5 * ((u / sig[0]) ** 2 + (v / sig[1]) ** 2))
    amp = rng.uniform(40, 90) * (1 if rng.integers(2) else -1)
    tint = rng.uniform(0.7, 1.0, size=patch.shape[2])
    delta = amp * g[:, :, None] * tint
    delta[np.abs(delta) < STAIN_MIN_LEVEL] = 0.0
    return _to_u8(patch + delta)


def _to_u8(x) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------- sources


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"the bundled data sets need {module.split('.')[0]}: "
                         f"{_PIP_HINT}") from None


def _resize_u8(x: np.ndarray, size: int) -> np.ndarray:
    return _to_u8(resize(x, size, size))


def _digit_patches(rng, size, n_train, n_good, n_defect):
    datasets = _require("sklearn.datasets")
    sklearn = _require("sklearn")
    imgs = datasets.load_digits().images  # (1797, 8, 8), levels 0..16
    need = n_train + n_good + n_defect
    if need > len(imgs):
        raise InputError(f"digits: {need} images asked (--n-train + --n-test-good + "
                         f"the defect images), {len(imgs)} available")
    u8 = np.round(imgs * (255.0 / 16.0)).astype(np.uint8)[..., None]
    perm = rng.permutation(len(imgs))
    pick = [u8[i] if size == 8 else _resize_u8(u8[i], size) for i in perm[:need]]
    source = {"loader": "sklearn.datasets.load_digits", "version": sklearn.__version__,
              "indices": [int(i) for i in perm[:need]]}
    return (pick[:n_train], pick[n_train : n_train + n_good], pick[n_train + n_good :],
            None, source)


def _texture(name: str) -> np.ndarray:
    data = _require("skimage.data")
    x = np.asarray(getattr(data, TEXTURES[name])())
    return x[:, :, None] if x.ndim == 2 else x[:, :, :3]


def _texture_patches(name, rng, size, n_train, n_good, n_defect):
    skimage = _require("skimage")
    img = _texture(name)
    h, w, c = img.shape
    # Blocks of side 1.5 crop (so a crop has room to move in its block), each
    # assigned to train or test; a crop lies inside one block, so no test pixel is
    # seen in training, and both splits sample the whole picture (ihc is not
    # stationary). Crops are 2 * size where that leaves >= 4 blocks, else size.
    for crop in (2 * size, size):
        side = crop + crop // 2
        grid = [(i * side, j * side) for i in range(h // side)
                for j in range(w // side)]
        if len(grid) >= 4:
            break
    else:
        raise InputError(f"{name}: size {size} too large for the {h}x{w} picture; "
                         f"use size <= {min(h, w) // 3}")
    if size < 8:
        raise InputError(f"{name}: size must be >= 8; got {size}")
    order = rng.permutation(len(grid))
    n_test_blocks = max(1, round(0.3 * len(grid)))
    test_blocks = [grid[k] for k in sorted(order[:n_test_blocks])]
    train_blocks = [grid[k] for k in sorted(order[n_test_blocks:])]

    def patches(n, blocks):
        out = []
        for _ in range(n):
            b0, b1 = blocks[rng.integers(len(blocks))]
            r0, c0 = rng.integers(0, side - crop + 1, size=2)
            out.append(_resize_u8(img[b0 + r0 : b0 + r0 + crop,
                                      b1 + c0 : b1 + c0 + crop], size))
        return out

    train = patches(n_train, train_blocks)
    good = patches(n_good, test_blocks)
    defect = patches(n_defect, test_blocks)
    # "missing" may paste a patch of another texture, grey for grey sources.
    other_name = {"brick": "gravel", "grass": "brick", "gravel": "grass",
                  "ihc": "gravel"}[name]
    o = _texture(other_name)
    if c == 3 and o.shape[2] == 1:
        o = np.repeat(o, 3, axis=2)
    others = []
    for _ in range(16):
        r0, c0 = rng.integers(0, np.array(o.shape[:2]) - crop + 1)
        others.append(_resize_u8(o[r0 : r0 + crop, c0 : c0 + crop], size))
    source = {"loader": f"skimage.data.{TEXTURES[name]}", "version":
              skimage.__version__, "crop": crop, "block": side,
              "test_blocks": [list(map(int, t)) for t in test_blocks],
              "other_texture": other_name}
    return train, good, defect, np.stack(others), source


# ----------------------------------------------------------------------------- files


def _check_name(name: str):
    if name not in DESCRIPTIONS:
        raise InputError(f"unknown bundled data set {name!r}; choose one of "
                         + ", ".join(DESCRIPTIONS))


def _prepare_out(out: str, overwrite: bool) -> str:
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not (overwrite and os.path.isfile(os.path.join(out, MANIFEST))):
            raise InputError(
                f"{out} is not empty; choose a new folder"
                + (" (overwrite=True replaces only a data set written by sijax)"
                   if not overwrite else f" (no {MANIFEST}: not written by sijax)"))
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        os.remove(os.path.join(out, MANIFEST))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create {out}: {e.strerror or e}") from None
    return out


def _write_all(root, split, kind, imgs, masks=None):
    folder = os.path.join(root, split, kind)
    os.makedirs(folder, exist_ok=True)
    if masks is not None:
        os.makedirs(os.path.join(root, "ground_truth", kind), exist_ok=True)
    for i, x in enumerate(imgs):
        save_png8(os.path.join(folder, f"{i:03d}.png"), x)
        if masks is not None:
            save_png8(os.path.join(root, "ground_truth", kind, f"{i:03d}_mask.png"),
                      masks[i].astype(np.uint8) * 255)
