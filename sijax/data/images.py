"""Reading, checking and writing single images of shape (H, W, C).

Reading (:func:`read_raw`) returns an image in its stored dtype with 1 (grey) or 3
(RGB) channels; scaling (:func:`scale_intensity`) maps it to the model's values by bit
depth, the same rule for every format:

* ``uint8`` (8-bit PNG, JPEG, TIFF, BMP or a uint8 ``.npy``) -> ``pixel / 255``;
* ``uint16`` (16-bit PNG or TIFF, or a uint16 ``.npy``) -> ``pixel / 65535``;
* floating point (``.npy``, 32-bit float TIFF) -> as stored (float64 on the test path);
* any other dtype (int32, int64, bool, ...) -> :class:`InputError`: its scale is
  unknown, and a guess would be a silently wrong answer.

So one picture stored as an 8-bit PNG, an 8-bit TIFF or a uint8 ``.npy`` gives the same
input, and a 16-bit file of it gives the same input up to the 8-bit rounding.

Colour conversion on reading: an alpha channel is dropped (RGBA -> RGB, grey+alpha ->
grey; the colour values are kept as stored, not composited on a background); palette
images are expanded to RGB; 1-bit images to grey 0/255; CMYK and YCbCr to RGB. A
``.npy`` holds numbers, not a picture format: its C >= 1 channels are taken as C
bands as they are (multispectral images, stacks of modalities), never as RGBA.
Pixels are taken as stored: EXIF orientation, ICC profiles and gamma are ignored (so
an image and its PNG mask always align). A
multi-page TIFF (or any multi-frame file) is an error, not its first page.

Pillow pitfalls handled here: Pillow reads a 16-bit grey PNG/TIFF as mode ``"I;16"``
(kept as uint16), but it silently reduces 16-bit RGB(A) PNG and TIFF files to 8 bits.
16-bit colour PNGs are therefore decoded by a small PNG reader in this module, and TIFFs
by ``tifffile`` when it is installed (it comes with scikit-image); without ``tifffile``
a 16-bit colour TIFF is an :class:`InputError`, never an 8-bit answer.

Written PNGs (:func:`save_image`) are min-max scaled for viewing only; the ``.npy``
twin keeps the exact values.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from sijax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Full scale of each integer dtype that has a defined intensity scale.
_FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


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


def check_pixels(x: np.ndarray, where: str) -> np.ndarray:
    """Checks a stored image array: numeric, rank 2 or 3, C >= 1 channels, finite.

    Args:
        x: (H, W) or (H, W, C) array in its stored dtype.
        where: the file (and index) named in error messages.

    Returns:
        (H, W, C) array, same dtype.

    Raises:
        InputError: naming ``where``.
    """
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(
            x):
        raise InputError(f"{where}: pixels must be real numbers; got dtype={x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise InputError(f"{where}: an image must have shape (H, W) or (H, W, C); "
                         f"got shape={x.shape}")
    if x.shape[2] < 1:
        raise InputError(f"{where}: no channels (shape={x.shape})")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{where}: empty image, shape={x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            raise InputError(
                f"{where}: {int(bad.sum())} NaN/Inf pixel value(s), first at "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    return x


def scale_intensity(raw: np.ndarray, where: str = "image") -> np.ndarray:
    """Maps stored pixel values to the model's scale by bit depth (module docstring).

    Args:
        raw: array in its stored dtype.
        where: named in the error message.

    Returns:
        float64 array, same shape: uint8 / 255, uint16 / 65535, floats unchanged.

    Raises:
        InputError: an integer dtype other than uint8/uint16, or a non-numeric one.
    """
    raw = np.asarray(raw)
    if np.issubdtype(raw.dtype, np.floating):
        return raw.astype(np.float64)
    full = _FULL_SCALE.get(raw.dtype)
    if full is None:
        raise InputError(
            f"{where}: pixel dtype {raw.dtype} has no defined intensity scale; "
            "store uint8 (0..255), uint16 (0..65535) or float values")
    return raw.astype(np.float64) / full


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """Reads one image file in its stored dtype: PNG, JPEG, TIFF, BMP or ``.npy``.

    Args:
        path: the file.

    Returns:
        (H, W, C) array, C in {1, 3}; dtype uint8 or uint16 for PNG/JPEG/TIFF (float32
        for a float TIFF), the stored dtype for ``.npy``. Colour conversions as in the
        module docstring.

    Raises:
        InputError: naming the file: missing, unknown suffix, unreadable or truncated,
            unsupported mode, wrong channel count, NaN/Inf in a float image.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return check_pixels(load_npy(path, "image"), path)
    if suffix not in _PIL_SUFFIXES:
        raise InputError(f"unknown image type {suffix!r} for {path}; use one of "
                         + ", ".join(IMAGE_SUFFIXES))
    if os.path.isdir(path):
        raise InputError(f"image {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise InputError(f"image file not found: {path}")
    try:
        x = _read_pil(path, suffix)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  (any decoder failure is bad input)
        raise InputError(f"cannot read image {path}: {e}") from None
    return check_pixels(x, path)


def image_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """The (H, W, C) that :func:`read_raw` will return, read from the header only.

    Cheap for large folders (no pixel decoding); a truncated file is found later, when
    its pixels are read.

    Raises:
        InputError: naming the file, as :func:`read_raw`.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        if not os.path.isfile(path):
            raise InputError(f"image file not found: {path}")
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            why = "not a NumPy .npy file" if "pickle" in str(e) else str(e)
            raise InputError(f"cannot read image {path}: {why}") from None
        shape = x.shape if x.ndim != 2 else (*x.shape, 1)
        if len(shape) != 3 or shape[2] < 1:
            raise InputError(f"{path}: an image must be (H, W) or (H, W, C) with C >= "
                             f"1; got shape={x.shape}")
        return tuple(int(s) for s in shape)
    if suffix not in _PIL_SUFFIXES:
        raise InputError(f"unknown image type {suffix!r} for {path}")
    if suffix in (".tif", ".tiff"):
        # Float, planar or multi-page TIFFs: only the full reader knows the shape.
        return tuple(int(s) for s in read_raw(path).shape)
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            grey = im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith(
                "I;")
            return int(h), int(w), 1 if grey else 3
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read image {path}: {e}") from None


def load_image(path: str | os.PathLike,
               image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Reads an image file and scales it by bit depth: float64 (H, W, C).

    ``read_raw`` then ``scale_intensity`` (module docstring), then
    :func:`validate_image` against ``image_shape``.

    Raises:
        InputError: missing/unreadable file, unknown suffix, or a bad image.
    """
    path = os.fspath(path)
    return validate_image(scale_intensity(read_raw(path), path), image_shape)


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


def save_png8(path: str | os.PathLike, u8: np.ndarray) -> None:
    """Writes a uint8 (H, W) or (H, W, C in {1, 3}) array as an 8-bit PNG, unscaled."""
    from PIL import Image

    u8 = np.asarray(u8)
    if u8.dtype != np.uint8:
        raise InputError(f"save_png8 needs uint8 pixels; got dtype={u8.dtype}")
    if u8.ndim == 3 and u8.shape[2] == 1:
        u8 = u8[:, :, 0]
    Image.fromarray(u8).save(os.fspath(path), optimize=False)


# ---------------------------------------------------------------------------- readers


def _read_pil(path: str, suffix: str) -> np.ndarray:
    from PIL import Image

    if suffix == ".png":
        depth, colour_type = _png_depth(path)
        if depth == 16 and colour_type in (2, 4, 6):
            return _read_png16(path)
    if suffix in (".tif", ".tiff"):
        x = _read_tiff(path)
        if x is not None:
            return x
    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            raise InputError(f"{path}: a file with {im.n_frames} images (frames); "
                             "sijax reads one image per file")
        im.load()
        mode = im.mode
        if suffix in (".tif", ".tiff"):
            bits = im.tag_v2.get(258, (8,))
            if max(bits) > 8 and mode not in ("F",) and not mode.startswith("I"):
                raise InputError(
                    f"{path}: {max(bits)}-bit colour TIFF; Pillow would reduce it to "
                    "8 bits. pip install tifffile (it comes with scikit-image), or "
                    "save it as .npy")
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            return np.asarray(im).astype(np.uint16)
        if mode == "I":  # 32-bit integers: a 16-bit PNG in old Pillow versions
            x = np.asarray(im)
            if suffix == ".png" and x.min() >= 0 and x.max() <= 65535:
                return x.astype(np.uint16)
            raise InputError(f"{path}: 32-bit integer pixels have no defined scale; "
                             "save 8/16-bit or float")
        if mode == "F":
            return np.asarray(im, dtype=np.float32)
        if mode in ("L", "RGB"):
            return np.asarray(im)
        if mode in ("1", "LA", "La"):
            return np.asarray(im.convert("L"))
        if mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            if mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return np.asarray(im.convert("RGB"))
        raise InputError(f"{path}: unsupported image mode {mode!r}")


def _read_tiff(path: str) -> np.ndarray | None:
    """tifffile when installed (keeps 16-bit colour), else None (Pillow reads it)."""
    try:
        import tifffile
    except ImportError:
        return None
    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if not getattr(p, "is_reduced", False)]
        if len(pages) != 1:
            raise InputError(f"{path}: a TIFF with {len(pages)} images (pages); sijax "
                             "reads one image per file")
        page = pages[0]
        x = np.asarray(page.asarray())
        if x.ndim == 3 and int(page.planarconfig) == 2:  # separate planes (C, H, W)
            x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[2] in (2, 4):
        x = x[:, :, : x.shape[2] - 1]  # drop alpha, as for every format
    if x.dtype == np.bool_:
        x = x.astype(np.uint8) * 255
    return x


def _png_depth(path: str) -> tuple[int, int]:
    """(bit depth, colour type) from the PNG IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise InputError(f"cannot read image {path}: not a PNG file (bad signature "
                         "or header)")
    return head[24], head[25]


def _read_png16(path: str) -> np.ndarray:
    """Decodes a non-interlaced 16-bit PNG (colour types 2, 4, 6) to uint16 (H, W, C).

    Pillow has no 16-bit colour mode and returns such files as 8 bits. Alpha is dropped
    as for every format.
    """
    with open(path, "rb") as f:
        data = f.read()
    pos, idat, ihdr = 8, [], None
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        if len(body) < n:
            raise InputError(f"cannot read image {path}: truncated PNG ({kind!r} chunk "
                             "cut short)")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    else:
        raise InputError(f"cannot read image {path}: truncated PNG (no IEND chunk)")
    w, h, depth, colour_type, _, _, interlace = ihdr
    if interlace:
        raise InputError(f"{path}: interlaced 16-bit colour PNG is not supported; "
                         "save it without interlacing, or as TIFF/.npy")
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    bpp = 2 * channels
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise InputError(f"cannot read image {path}: corrupt PNG data ({e})") from None
    stride = w * bpp
    if len(raw) < h * (stride + 1):
        raise InputError(f"cannot read image {path}: truncated PNG image data")
    rows = np.frombuffer(raw, np.uint8, h * (stride + 1)).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int64)
    prev = np.zeros(stride, np.int64)
    for i in range(h):
        ftype, line = rows[i, 0], rows[i, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 255
        elif ftype in (1, 3, 4):
            cur = _unfilter_sequential(ftype, line, prev, bpp)
        else:
            raise InputError(f"cannot read image {path}: corrupt PNG (filter type "
                             f"{ftype})")
        out[i] = prev = cur
    x = (out[:, 0::2] << 8 | out[:, 1::2]).astype(np.uint16).reshape(h, w, channels)
    return {2: x[:, :, :1], 3: x, 4: x[:, :, :3]}[channels]


def _unfilter_sequential(ftype: int, line, prev, bpp: int) -> np.ndarray:
    """PNG filters Sub (1), Average (3) and Paeth (4): each byte needs its left one.

    Plain Python lists: several times faster than indexing numpy scalars (about
    1 s per million bytes for Paeth).
    """
    line, prev = line.tolist(), prev.tolist()
    cur = list(line)
    n = len(line)
    if ftype == 1:
        for j in range(bpp, n):
            cur[j] = (cur[j] + cur[j - bpp]) & 255
        return np.asarray(cur, np.int64)
    for j in range(n):
        left = cur[j - bpp] if j >= bpp else 0
        up = prev[j]
        if ftype == 3:
            cur[j] = (line[j] + (left + up) // 2) & 255
            continue
        up_left = prev[j - bpp] if j >= bpp else 0
        p = left + up - up_left
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
        pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
        cur[j] = (line[j] + pred) & 255
    return np.asarray(cur, np.int64)
