"""Reading, checking and writing single images of shape (H, W, C).

Pixel convention: ``.npy`` files hold the model's values as they are (float64 on the
test path). 8-bit PNG/JPEG files are read as ``pixel / 255`` in [0, 1]; this is a
convenience for real images and says nothing about their noise model. Written PNGs
are min-max scaled for viewing only; the ``.npy`` twin keeps the exact values.
"""

import os

import numpy as np

from sijax.errors import InputError

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def validate_image(x, image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Checks one image and returns it as float64 (H, W, C).

    A 2-D (H, W) array is taken as one grey channel.

    Args:
        x: array-like image.
        image_shape: expected (H, W, C), or None to accept any 3-D shape.

    Raises:
        InputError: wrong rank, size or channel count, or NaN/Inf pixels.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise InputError(f"an image must have shape (H, W, C); got shape={x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise InputError(f"an image must be real-valued; got dtype={x.dtype}")
    x = x.astype(np.float64)
    if image_shape is not None:
        h, w, c = image_shape
        if x.shape[2] != c:
            raise InputError(
                f"image has {x.shape[2]} channel(s) but the model expects {c}: "
                f"shape={x.shape}, expected {tuple(image_shape)}")
        if x.shape[:2] != (h, w):
            raise InputError(
                f"image is {x.shape[0]}x{x.shape[1]} but the model expects {h}x{w}: "
                f"shape={x.shape}, expected {tuple(image_shape)}")
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(
            f"image has {int(bad.sum())} NaN/Inf pixel value(s), first at "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    return x


def load_npy(path: str | os.PathLike, what: str = "array") -> np.ndarray:
    """Reads a ``.npy`` file of numbers (no pickled objects).

    Raises:
        InputError: missing file, a directory, or a file that is not a numeric .npy
            (``what`` names it in the message).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a directory, not an .npy file")
    if not os.path.isfile(path):
        raise InputError(f"{what} file not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001  (numpy raises several types on bad files)
        # Without the .npy header numpy takes the file for a pickle and says so.
        why = "not a NumPy .npy file" if "pickle" in str(e) else str(e)
        raise InputError(f"cannot read {what} {path}: {why}") from None
    if not isinstance(x, np.ndarray):  # an .npz archive
        raise InputError(f"cannot read {what} {path}: an .npz archive, not an .npy")
    return x


def load_image(path: str | os.PathLike,
               image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Reads a ``.npy``, PNG or JPEG image as float64 (H, W, C) and validates it.

    Raises:
        InputError: missing/unreadable file, unknown suffix, or a bad image (see
            :func:`validate_image`).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return validate_image(load_npy(path, "image"), image_shape)
    if not os.path.isfile(path):
        raise InputError(f"image file not found: {path}")
    try:
        if suffix in _PIL_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode not in ("L", "RGB"):
                    im = im.convert("RGB" if "A" in im.mode or im.mode == "P"
                                    else "L")
                x = np.asarray(im, dtype=np.float64) / 255.0
        else:
            raise InputError(
                f"unknown image type {suffix!r} for {path}; use .npy, .png or .jpg")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  (any decoder failure is bad input)
        raise InputError(f"cannot read image {path}: {e}") from None
    return validate_image(x, image_shape)


def save_image(path: str | os.PathLike, x) -> None:
    """Writes one image (H, W, C) by suffix: ``.npy`` exact, ``.png`` min-max scaled."""
    path = os.fspath(path)
    x = np.asarray(x, dtype=np.float64)
    if path.lower().endswith(".npy"):
        np.save(path, x)
        return
    from PIL import Image

    lo, hi = float(np.min(x)), float(np.max(x))
    u8 = np.round(255.0 * (x - lo) / (hi - lo if hi > lo else 1.0)).astype(np.uint8)
    if u8.shape[2] == 1:
        u8 = u8[:, :, 0]
    Image.fromarray(u8).save(path)
