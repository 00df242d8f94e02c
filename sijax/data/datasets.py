"""Image data sets on disk: a folder, an array stack, or the MVTec AD layout.

:func:`open_dataset` recognises

(a) a folder of image files (PNG, JPEG, TIFF, BMP, ``.npy``), flat, sorted by name:
    all items are split "train", kind "good";
(b) an ``.npy`` stack (N, H, W) or (N, H, W, C), or an ``.npz`` holding one array or
    an ``images`` array and optionally ``masks`` (N, H, W). Without masks all items
    are train/good; with masks all are "test", kind "good" where the mask is empty
    and "defect" otherwise;
(c) an MVTec AD category folder (one that has ``train/good/``)::

        train/good/*.png                   normal training images
        test/good/*.png                    normal test images
        test/<defect>/<name>.png           anomalous test images
        ground_truth/<defect>/<name>_mask.png   their masks (anomalous: above half
                                                the mask's largest value)

    ``sijax train --data`` on such a folder uses ``train/good``.

Images may differ in height and width (a model resizes each to its own size;
:attr:`Dataset.sizes` says whether they vary); they need one channel count. Checks
(each an :class:`~sijax.errors.InputError` naming the file): an empty folder, images of
different channel counts (naming the first odd file and the count of the others), an
unreadable or truncated file (found when its pixels are read), a
defect folder without its ``ground_truth`` folder or an image without its mask, a mask
without an image, a mask of another size than its image, NaN/Inf in an array.
Files that are not images (e.g. ``README.txt``, ``.DS_Store``, sub-folders of a flat
folder) are skipped and listed in :attr:`Dataset.skipped`. 8- and 16-bit images may be
mixed: they are scaled by bit depth to the same [0, 1] range.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from sijax.data.images import IMAGE_SUFFIXES, check_pixels, image_header, read_raw
from sijax.data.preprocess import Preprocessing
from sijax.digest import file_sha256
from sijax.errors import InputError

LAYOUTS = ("folder", "stack", "mvtec")
MASK_SUFFIX = "_mask"


class Item(NamedTuple):
    """One image of a data set.

    Attributes:
        source: the image file, or the stack file for a stack.
        index: position in the stack, or None for an image file.
        split: "train" or "test".
        kind: "good", or the defect's name (MVTec: its folder name).
        mask: the mask file, or None (good images; stacks keep masks in memory).
    """

    source: str
    index: int | None
    split: str
    kind: str
    mask: str | None

    @property
    def name(self) -> str:
        """A short label: ``kind/file`` or ``file[index]``."""
        base = os.path.basename(self.source)
        return f"{base}[{self.index}]" if self.index is not None else (
            f"{self.kind}/{base}")


class LabelledImage(NamedTuple):
    """A test image with its ground truth.

    Attributes:
        image: float64 (size, size, C) preprocessed model input, or the scaled image
            (H, W, C) in [0, 1] when no Preprocessing was given.
        mask: bool (size, size) (or (H, W)); all False for a good image.
        item: where it came from.
    """

    image: np.ndarray
    mask: np.ndarray
    item: Item


class Dataset(NamedTuple):
    """An opened data set (:func:`open_dataset`); images are read on demand.

    Attributes:
        path: the folder or file opened.
        layout: "folder", "stack" or "mvtec".
        items: every image, in order (train first, then test by kind and name).
        shape: (H, W, C) of the images as stored: the most common one when their
            sizes vary (``sizes``).
        skipped: files ignored because they are not images (reported, not read).
        stack: for a stack, the (N, H, W, C) array as stored; else None.
        stack_masks: for a stack with masks, bool (N, H, W); else None.
        sizes: (H, W) of each image file by its path when the images differ in
            size; else None (all are ``shape``).
    """

    path: str
    layout: str
    items: tuple[Item, ...]
    shape: tuple[int, int, int]
    skipped: tuple[str, ...] = ()
    stack: np.ndarray | None = None
    stack_masks: np.ndarray | None = None
    sizes: dict[str, tuple[int, int]] | None = None

    def size_of(self, item: Item) -> tuple[int, int]:
        """(H, W) of one item as stored."""
        if self.sizes is None:
            return self.shape[0], self.shape[1]
        return self.sizes[item.source]

    @property
    def train(self) -> tuple[Item, ...]:
        """The training items (split "train")."""
        return tuple(it for it in self.items if it.split == "train")

    @property
    def test(self) -> tuple[Item, ...]:
        """The test items (split "test")."""
        return tuple(it for it in self.items if it.split == "test")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The test kinds present ("good" first, then defects by name)."""
        ks = sorted({it.kind for it in self.test}, key=lambda k: (k != "good", k))
        return tuple(ks)

    def read(self, item: Item) -> np.ndarray:
        """One image as stored: (H, W, C), uint8/uint16/float."""
        if item.index is not None:
            return self.stack[item.index]
        return read_raw(item.source)

    def read_mask(self, item: Item) -> np.ndarray:
        """One mask at the stored size: bool (H, W); all False for good items.

        Raises:
            InputError: unreadable mask, or a size other than the image's.
        """
        h, w = self.size_of(item)
        if item.index is not None and self.stack_masks is not None:
            return self.stack_masks[item.index]
        if item.mask is None:
            return np.zeros((h, w), bool)
        m = read_raw(item.mask)
        if m.shape[:2] != (h, w):
            raise InputError(f"mask {item.mask} is {m.shape[0]}x{m.shape[1]} but its "
                             f"image {item.source} is {h}x{w}")
        # Above half the largest value: the nonzero pixels of a binary mask (0/1,
        # 0/255), without the faint ringing a JPEG mask has around its edges.
        return np.any(m > m.max() / 2, axis=2)

    def train_images(self, preprocessing: Preprocessing | None = None) -> np.ndarray:
        """All training images, stacked.

        Args:
            preprocessing: None for the images as stored, else applied to each.

        Returns:
            (N, H, W, C) in the stored dtype (uint8, uint16 or float; mixed 8/16-bit
            files give float64 scaled to [0, 1]), or float64 (N, size, size, C')
            preprocessed.

        Raises:
            InputError: no training items, images of different sizes without
                ``preprocessing`` (they do not stack; see :meth:`train_raws`), or an
                unreadable file (naming it).
        """
        if preprocessing is not None:
            return preprocessing.apply_batch(self.train_raws())
        raws = self.train_raws()
        items = self.train
        if self.sizes is not None:
            sizes = sorted({self.size_of(it) for it in items})
            if len(sizes) > 1:
                raise InputError(
                    f"{self.path}: the training images differ in size ({_fmt(sizes[0])}"
                    f" ... {_fmt(sizes[-1])}) and do not stack as stored; resize them "
                    "with a Preprocessing (sijax train does)")
        dtypes = {r.dtype for r in raws}
        if len(dtypes) > 1:
            from sijax.data.images import scale_intensity

            raws = [scale_intensity(r, it.source) for r, it in zip(raws, items,
                                                                   strict=True)]
        return np.stack(raws)

    def train_raws(self) -> list[np.ndarray]:
        """The training images as stored, one (H, W, C) array each (sizes may vary).

        Raises:
            InputError: no training items, or an unreadable file (naming it).
        """
        if not self.train:
            raise InputError(f"{self.path}: no training images (layout {self.layout};"
                             " an .npz with masks is a test set)")
        return [self.read(it) for it in self.train]

    def test_items(self, preprocessing: Preprocessing | None = None
                   ) -> Iterator[LabelledImage]:
        """The test images with their masks, one at a time.

        Args:
            preprocessing: applied to each image (``check_input``, so far-off images
                warn), and its ``resize_mask`` to each mask (nearest neighbour). None
                gives the bit-depth-scaled image and the mask at the stored size.

        Yields:
            LabelledImage(image, mask, item).
        """
        from sijax.data.images import scale_intensity

        for it in self.test:
            raw = self.read(it)
            mask = self.read_mask(it)
            if preprocessing is None:
                yield LabelledImage(scale_intensity(raw, it.source), mask, it)
            else:
                where = it.source if it.index is None else f"{it.source}[{it.index}]"
                yield LabelledImage(preprocessing.check_input(raw, where),
                               preprocessing.resize_mask(mask), it)


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Opens a data set and checks its layout (module docstring).

    Reads only headers (and whole arrays for stacks); pixels are read by the
    Dataset's methods.

    Args:
        path: a folder (flat, or MVTec with ``train/good``), or an .npy/.npz file.

    Returns:
        Dataset.

    Raises:
        InputError: naming the file, for every problem listed in the module docstring.
    """
    path = os.fspath(path)
    try:
        return _open(path)
    except OSError as e:  # permissions, a file vanishing while listed
        raise InputError(f"cannot read {e.filename or path}: {e.strerror or e}"
                         ) from None


def _open(path: str) -> Dataset:
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix in (".npy", ".npz"):
            return _open_stack(path)
        raise InputError(f"{path}: a data set is a folder or an .npy/.npz stack; "
                         "this is a single file")
    if not os.path.isdir(path):
        raise InputError(f"data set not found: {path}")
    if os.path.isdir(os.path.join(path, "train", "good")):
        return _open_mvtec(path)
    files, skipped = _list_images(path)
    if not files:
        raise InputError(f"{path}: no image files (looked for "
                         + ", ".join(IMAGE_SUFFIXES) + ")")
    shape, sizes = _common_shape(files, path)
    items = tuple(Item(f, None, "train", "good", None) for f in files)
    return Dataset(path, "folder", items, shape, tuple(skipped), sizes=sizes)


def data_source(path: str | os.PathLike) -> dict:
    """Identifies a data set for config.json: where, how many images, a SHA-256.

    The hash runs over the sorted list of the data set's files (relative path, size
    and the SHA-256 of the contents of each image and mask file; the stack file
    itself for a stack), so renaming, adding, removing or changing any image changes
    it, and skipped non-image files do not.

    Args:
        path: as for :func:`open_dataset`.

    Returns:
        dict(path=absolute path, layout, count=number of images, n_train,
        sha256=hex digest).
    """
    ds = open_dataset(path)
    root = os.path.abspath(ds.path)
    if ds.layout == "stack":
        files = [root]
        base = os.path.dirname(root)
    else:
        files = sorted({os.path.abspath(f) for it in ds.items
                        for f in (it.source, it.mask) if f is not None})
        base = root
    h = hashlib.sha256()
    for f in files:
        rel = os.path.relpath(f, base).replace(os.sep, "/")
        try:
            line = f"{rel}\0{os.path.getsize(f)}\0{file_sha256(f)}\n"
        except OSError as e:
            raise InputError(f"cannot read {f}: {e.strerror or e}") from None
        h.update(line.encode())
    return {"path": root, "layout": ds.layout, "count": len(ds.items),
            "n_train": len(ds.train), "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- helpers



def _list_images(folder: str) -> tuple[list[str], list[str]]:
    files, skipped = [], []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if (name.startswith(".") or not os.path.isfile(p)
                or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES):
            skipped.append(p)
        else:
            files.append(p)
    return files, skipped


def _fmt(shape) -> str:
    return "x".join(str(s) for s in shape)


def _common_shape(files: list[str], where: str):
    """(the most common (H, W, C), each file's (H, W) when they differ, else None).

    Raises:
        InputError: the files differ in channel count (naming the first odd one).
    """
    shapes = [image_header(f) for f in files]
    common = collections.Counter(shapes).most_common(1)[0][0]
    channels = collections.Counter(s[2] for s in shapes)
    if len(channels) > 1:
        c, n = channels.most_common(1)[0]
        odd = next(f for f, s in zip(files, shapes, strict=True) if s[2] != c)
        first = next(f for f, s in zip(files, shapes, strict=True) if s[2] == c)
        raise InputError(
            f"{odd} is {_fmt(shapes[files.index(odd)])} (H x W x C) but {n} of the "
            f"{len(files)} images in {where} have {c} channel(s) (e.g. {first}); all "
            "images of a data set need one channel count")
    if len(set(shapes)) == 1:
        return common, None
    return common, {f: (s[0], s[1]) for f, s in zip(files, shapes, strict=True)}


def _open_stack(path: str) -> Dataset:
    masks = None
    if path.lower().endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "images" in z:
                    x = z["images"]
                    masks = z["masks"] if "masks" in z else None
                elif len(keys) == 1:
                    x = z[keys[0]]
                else:
                    raise InputError(
                        f"{path}: an .npz data set needs one array or an 'images' "
                        f"array (optionally 'masks'); it has {keys}")
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read {path}: {e}") from None
    else:
        from sijax.data.images import load_npy

        x = load_npy(path, "image stack")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise InputError(f"{path}: an image stack must be (N, H, W) or (N, H, W, C) "
                         f"with N >= 1; got shape={x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            i = tuple(int(v) for v in np.argwhere(bad)[0])
            raise InputError(f"{path}: {int(bad.sum())} NaN/Inf value(s), first in "
                             f"image {i[0]} at pixel {i[1:]}")
    check_pixels(x[0], path)  # dtype and channel count, shared by all
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 4 and masks.shape[3] == 1:
            masks = masks[..., 0]
        if masks.shape != x.shape[:3]:
            raise InputError(f"{path}: masks have shape={masks.shape} but the images "
                             f"{x.shape}; need (N, H, W) = {x.shape[:3]}")
        masks = masks != 0
        items = tuple(Item(path, i, "test", "defect" if masks[i].any() else "good",
                           None) for i in range(x.shape[0]))
    else:
        items = tuple(Item(path, i, "train", "good", None) for i in range(x.shape[0]))
    return Dataset(path, "stack", items, tuple(int(s) for s in x.shape[1:]), (), x,
                   masks)


def _open_mvtec(root: str) -> Dataset:
    train_dir = os.path.join(root, "train", "good")
    train, skipped = _list_images(train_dir)
    if not train:
        raise InputError(f"{train_dir}: no image files (an MVTec category needs its "
                         "normal training images in train/good)")
    items = [Item(f, None, "train", "good", None) for f in train]
    test_dir = os.path.join(root, "test")
    gt_dir = os.path.join(root, "ground_truth")
    kinds = []
    if os.path.isdir(test_dir):
        for d in sorted(os.listdir(test_dir)):
            if os.path.isdir(os.path.join(test_dir, d)):
                kinds.append(d)
            else:
                skipped.append(os.path.join(test_dir, d))
    kinds.sort(key=lambda k: (k != "good", k))
    for kind in kinds:
        files, skip = _list_images(os.path.join(test_dir, kind))
        skipped += skip
        if kind == "good":
            items += [Item(f, None, "test", "good", None) for f in files]
            continue
        kind_gt = os.path.join(gt_dir, kind)
        if not os.path.isdir(kind_gt):
            raise InputError(f"{os.path.join(test_dir, kind)}: defect folder without "
                             f"masks; expected {kind_gt}/<name>{MASK_SUFFIX}.png")
        masks, skip = _list_images(kind_gt)
        skipped += skip
        by_stem = {}
        for m in masks:
            stem = os.path.splitext(os.path.basename(m))[0]
            if not stem.endswith(MASK_SUFFIX):
                raise InputError(f"{m}: a mask's name must be <image name>"
                                 f"{MASK_SUFFIX}.<ext>")
            by_stem[stem[: -len(MASK_SUFFIX)]] = m
        for f in files:
            stem = os.path.splitext(os.path.basename(f))[0]
            if stem not in by_stem:
                raise InputError(f"{f}: no mask; expected {kind_gt}/{stem}"
                                 f"{MASK_SUFFIX}.png")
            items.append(Item(f, None, "test", kind, by_stem.pop(stem)))
        if by_stem:
            m = sorted(by_stem.values())[0]
            raise InputError(f"{m}: mask without an image in "
                             f"{os.path.join(test_dir, kind)}")
    if os.path.isdir(gt_dir):
        for kind in sorted(os.listdir(gt_dir)):
            if kind not in kinds and os.path.isdir(os.path.join(gt_dir, kind)):
                orphans, _ = _list_images(os.path.join(gt_dir, kind))
                if orphans:
                    raise InputError(f"{orphans[0]}: mask without an image (no "
                                     f"folder {os.path.join(test_dir, kind)})")
    shape, sizes = _common_shape([it.source for it in items], root)
    for it in items:
        if it.mask is not None:
            mh, mw, _ = image_header(it.mask)
            h, w = shape[:2] if sizes is None else sizes[it.source]
            if (mh, mw) != (h, w):
                raise InputError(f"mask {it.mask} is {mh}x{mw} but its image "
                                 f"{it.source} is {h}x{w}")
    return Dataset(root, "mvtec", tuple(items), shape, tuple(skipped), sizes=sizes)
