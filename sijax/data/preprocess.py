"""One recorded preprocessing from a stored image to the model's input.

A :class:`Preprocessing` is fitted once on the normal training images, saved in the
model directory (``config.json``, as :meth:`Preprocessing.to_dict`) and applied the
same way by train, test, reconstruct and evaluate. :meth:`Preprocessing.apply` does,
in this order:

1. bit-depth scaling (:func:`sijax.data.images.scale_intensity`): uint8 / 255,
   uint16 / 65535, floats as stored;
2. channels: grey -> RGB repeats the grey value in R, G and B; RGB -> grey is the
   ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (Pillow's "L"); other channel
   counts are an :class:`InputError`;
3. geometry: ``"resize"`` resamples H and W independently to ``size`` (the aspect
   ratio may change); ``"center_crop"`` first crops the central ``min(H, W)`` square,
   then resamples. Shrinking averages over the area each output pixel covers (an
   antialiased box filter, exact for fractional overlaps); enlarging interpolates
   bilinearly between pixel centres. Both are linear maps ``A @ x @ B.T``, in float64;
4. standardisation ``(x - mean) / std`` per channel, with the mean and standard
   deviation over all pixels of the training images after steps 1-3.

Masks go through the same crop and a nearest-neighbour resampling
(:meth:`Preprocessing.resize_mask`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable

import numpy as np

from sijax.data.images import check_pixels, read_raw, scale_intensity
from sijax.errors import InputError, InputWarning

MODES = ("resize", "center_crop")
# ITU-R BT.601 luma weights, as Pillow's convert("L").
LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Stored image -> model input (module docstring gives the steps).

    Attributes:
        size: H = W of the model input.
        channels: C of the model input: 1 (grey), 3 (RGB), or any C >= 1 for
            arrays of C bands (no conversion then).
        mode: "resize" or "center_crop".
        mean: per-channel mean of the training images after steps 1-3, length C.
        std: per-channel standard deviation, length C, each > 0.
        stored: what the training images were as stored, for the warnings of
            :meth:`check_input`: ``{"channels": C, "min_hw": [H, W], "max_hw":
            [H, W]}`` (recorded by :meth:`fit`; None for older models).
    """

    size: int
    channels: int = 1
    mode: str = "resize"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    stored: dict | None = dataclasses.field(default=None, compare=False)

    # An input whose standardised channel mean is beyond this, or whose standard
    # deviation is beyond this factor of the training one, gets an InputWarning.
    MAX_ABS_MEAN = 4.0
    MAX_STD_RATIO = 4.0

    def __post_init__(self):
        if not isinstance(self.size, int | np.integer) or self.size < 1:
            raise InputError(f"Preprocessing.size must be a positive integer; got "
                             f"{self.size!r}")
        if not isinstance(self.channels, int | np.integer) or self.channels < 1:
            raise InputError(f"Preprocessing.channels must be a positive integer; "
                             f"got {self.channels!r}")
        if self.mode not in MODES:
            raise InputError(f"Preprocessing.mode must be one of {MODES}; got "
                             f"{self.mode!r}")
        object.__setattr__(self, "size", int(self.size))
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        # One value stands for every channel (the defaults).
        mean = mean * self.channels if len(mean) == 1 else mean
        std = std * self.channels if len(std) == 1 else std
        if len(mean) != self.channels or len(std) != self.channels:
            raise InputError(f"Preprocessing: mean and std need {self.channels} values;"
                             f" got mean={mean}, std={std}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise InputError(f"Preprocessing: mean must be finite and std > 0; got "
                             f"mean={mean}, std={std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(size, size, channels): the model's image shape."""
        return (self.size, self.size, self.channels)

    # ----------------------------------------------------------------- (de)serialise

    def to_dict(self) -> dict:
        """A JSON-ready dict (plain ints, floats, lists) for config.json."""
        d = {"size": self.size, "channels": self.channels, "mode": self.mode,
             "mean": list(self.mean), "std": list(self.std)}
        if self.stored is not None:
            d["stored"] = self.stored
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Inverse of :meth:`to_dict`.

        Raises:
            InputError: unknown or missing keys, or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown or "size" not in d:
            raise InputError(f"bad preprocessing record {d!r}: unknown keys "
                             f"{sorted(unknown)}, or no 'size'")
        kw = dict(d)
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        stored = kw.get("stored")
        if stored is not None and not (
                isinstance(stored, dict) and set(stored) == {"channels", "min_hw",
                                                             "max_hw"}):
            raise InputError(f"bad preprocessing record: 'stored' {stored!r}")
        return cls(**kw)

    # ----------------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, raw_images: Iterable, *, size: int, channels: int | None = None,
            mode: str = "resize") -> Preprocessing:
        """Fits the per-channel mean and std on normal training images.

        Args:
            raw_images: images as stored (each (H, W) or (H, W, C), uint8, uint16 or
                float), a stacked (N, H, W, C) array, or file paths.
            size: model H = W.
            channels: model C; None takes the channel count of the first image.
            mode: "resize" or "center_crop".

        Returns:
            The fitted Preprocessing; std is pooled over all pixels of all images.

        Raises:
            InputError: no images, or constant images (std = 0).
        """
        geo = None
        s1 = s2 = None
        n = 0
        lo_hw, hi_hw, stored_c = None, None, None
        for raw in raw_images:
            raw = _as_raw(raw)
            hw = np.asarray(raw.shape[:2])
            lo_hw = hw if lo_hw is None else np.minimum(lo_hw, hw)
            hi_hw = hw if hi_hw is None else np.maximum(hi_hw, hw)
            stored_c = 1 if raw.ndim == 2 else raw.shape[2]
            if geo is None:
                c = raw.shape[2] if channels is None else channels
                geo = cls(size=size, channels=c, mode=mode)
            x = geo.resample(raw)
            flat = x.reshape(-1, geo.channels)
            s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
            s2 = (flat**2).sum(0) if s2 is None else s2 + (flat**2).sum(0)
            n += flat.shape[0]
        if geo is None:
            raise InputError("Preprocessing.fit: no training images")
        mean = s1 / n
        # Second pass avoided: float64 sums of values in [0, 1] lose nothing that
        # matters here; clip the tiny negative rounding of a constant channel.
        var = np.maximum(s2 / n - mean**2, 0.0)
        std = np.sqrt(var)
        if np.any(std < 1e-8 * np.maximum(1.0, np.abs(mean))):
            raise InputError(f"Preprocessing.fit: the training images are constant in "
                             f"some channel (std={std.tolist()}); nothing to learn")
        stored = {"channels": int(stored_c), "min_hw": [int(v) for v in lo_hw],
                  "max_hw": [int(v) for v in hi_hw]}
        return dataclasses.replace(geo, mean=tuple(mean), std=tuple(std),
                                   stored=stored)

    # ---------------------------------------------------------------------- applying

    def resample(self, raw, where: str = "image") -> np.ndarray:
        """Steps 1-3 (scale, channels, geometry), without standardisation.

        Args:
            raw: (H, W) or (H, W, C) image as stored, or a file path.
            where: named in error messages (a file path names itself).

        Returns:
            float64 (size, size, channels).
        """
        if isinstance(raw, str | os.PathLike):
            where = os.fspath(raw)
        raw = _as_raw(raw, where)
        x = _convert_channels(scale_intensity(raw, where), self.channels, where)
        x = _crop(x, self.mode)
        return resize(x, self.size, self.size)

    def apply(self, raw, where: str = "image") -> np.ndarray:
        """Stored image -> model input (steps 1-4).

        Args:
            raw: (H, W) or (H, W, C) image as stored (uint8, uint16 or float), or a
                file path (read with :func:`sijax.data.images.read_raw`).
            where: named in error messages (a file path names itself).

        Returns:
            float64 (size, size, channels).
        """
        x = self.resample(raw, where)
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def unapply(self, x) -> np.ndarray:
        """Inverse of step 4, for viewing model outputs: ``x * std + mean``.

        Args:
            x: (..., channels) model-scale values (e.g. a reconstruction).

        Returns:
            float64, same shape, on the [0, 1] intensity scale of step 1 (not clipped).
        """
        return np.asarray(x, np.float64) * np.asarray(self.std) + np.asarray(self.mean)

    def apply_native(self, raw, path: str | os.PathLike | None = None) -> np.ndarray:
        """Steps 1, 2 and 4 without the geometry: an image at its own resolution in
        the model's units, for testing a large image tile by tile
        (:mod:`sijax.evaluation.tiles`).

        Args:
            raw: (H, W) or (H, W, C) image as stored, or a file path.
            path: named in messages.

        Returns:
            float64 (H, W, channels).
        """
        where = os.fspath(path) if path is not None else "image"
        x = _convert_channels(scale_intensity(_as_raw(raw, where), where),
                              self.channels, where)
        return (x - np.asarray(self.mean)) / np.asarray(self.std)

    def apply_batch(self, raws: Iterable) -> np.ndarray:
        """:meth:`apply` over images: float64 (N, size, size, channels)."""
        out = [self.apply(r) for r in raws]
        if not out:
            return np.zeros((0, *self.image_shape))
        return np.stack(out)

    def check_input(self, raw, path: str | os.PathLike | None = None) -> np.ndarray:
        """:meth:`apply` with the checks for an image to be tested.

        Args:
            raw: image as stored, or a file path.
            path: named in messages (defaults to ``raw`` if that is a path).

        Returns:
            float64 (size, size, channels), as :meth:`apply`.

        Raises:
            InputError: a channel count that cannot be converted (neither 1 nor 3),
                or an unreadable file (naming it).

        Warns:
            InputWarning: a standardised channel mean beyond ``MAX_ABS_MEAN`` or a
                channel std outside ``[1 / MAX_STD_RATIO, MAX_STD_RATIO]`` times the
                training one: the model never saw such an image, so its answer may
                say more about the scale than about an anomaly. Also (models that
                recorded their training images, ``stored``) a channel count other
                than the training images' (converted, e.g. a grey image for a
                colour model), or a height or width beyond half to twice the
                training images' range (resampled to ``size``, it shows its
                content at another scale than the model learned).
        """
        raw, where = self._read_checked(raw, path)
        if self.stored is not None:
            h, w = raw.shape[:2]
            self._check_size(h, w, f"{where} is {h}x{w}", "resampled to "
                             f"{self.size}x{self.size} it shows its content at "
                             "another scale than the model learned (crop or resize "
                             "it like the training images, or test it by tiles)")
        x = self.apply(raw, where)
        self._check_intensity(x, where)
        return x

    def check_native(self, raw, path: str | os.PathLike | None = None
                     ) -> np.ndarray:
        """:meth:`apply_native` with the checks for an image tested by tiles.

        Args:
            raw: image as stored, or a file path.
            path: named in messages (defaults to ``raw`` if that is a path).

        Returns:
            float64 (H, W, channels), as :meth:`apply_native`.

        Raises:
            InputError: as :meth:`check_input`.

        Warns:
            InputWarning: those of :meth:`check_input` (the intensity on the whole
                image; the channel count), except that the size checked is a tile's:
                ``size`` x ``size`` pixels at the image's own resolution, against the
                training images the model learned resampled to ``size`` (beyond
                half to twice their sizes, a tile shows its content at another
                scale than the model learned).
        """
        raw, where = self._read_checked(raw, path)
        s = self.size
        self._check_size(s, s, f"{where}: its {s}x{s} tiles are tested at its own "
                         "resolution", f"the model learned them resampled to {s}x{s},"
                         " so a tile shows its content at another scale (train on "
                         f"{s}x{s} patches of images at this resolution)")
        x = self.apply_native(raw, where)
        self._check_intensity(x, where)
        return x

    def _read_checked(self, raw, path) -> tuple[np.ndarray, str]:
        """(the image as stored, the name for messages), its channels checked:
        an error if they cannot be converted, a warning if they differ from the
        training images'."""
        where = os.fspath(path) if path is not None else (
            os.fspath(raw) if isinstance(raw, str | os.PathLike) else "image")
        raw = _as_raw(raw, where)
        _convert_channels(raw[:1, :1].astype(np.float64), self.channels, where)
        self._check_channels(raw, where)
        return raw, where

    def _check_intensity(self, x: np.ndarray, where: str) -> None:
        flat = x.reshape(-1, self.channels)
        m, s = flat.mean(0), flat.std(0)
        lo = 1.0 / self.MAX_STD_RATIO
        if np.any(np.abs(m) > self.MAX_ABS_MEAN) or np.any(
                (s < lo) | (s > self.MAX_STD_RATIO)):
            warnings.warn(InputWarning(
                f"{where}: far from the training images after preprocessing: "
                f"channel mean {np.round(m, 2).tolist()} (training 0), std "
                f"{np.round(s, 2).tolist()} (training 1); the test may answer about "
                "the intensity scale, not about an anomaly. Is it the same kind of "
                "image, bit depth and exposure?"), stacklevel=3)

    def _check_channels(self, raw: np.ndarray, where: str) -> None:
        if self.stored is None:
            return
        c = 1 if raw.ndim == 2 else raw.shape[2]
        if c != self.stored["channels"]:
            how = ("its grey value repeated in R, G and B" if c == 1 else
                   "its luma" if self.channels == 1 else "converted")
            warnings.warn(InputWarning(
                f"{where} has {c} channel(s) but the training images had "
                f"{self.stored['channels']}: the model sees {how}; an image unlike "
                "the training ones in colour may be flagged for that alone"),
                stacklevel=4)

    def _check_size(self, h: int, w: int, what: str, why: str) -> None:
        """Warns when (h, w) is beyond half to twice the training images' sizes."""
        if self.stored is None:
            return
        lo, hi = self.stored["min_hw"], self.stored["max_hw"]
        if not (lo[0] / 2 <= h <= 2 * hi[0] and lo[1] / 2 <= w <= 2 * hi[1]):
            span = (f"{lo[0]}x{lo[1]}" if lo == hi else
                    f"{lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}")
            warnings.warn(InputWarning(
                f"{what} but the training images were {span}: {why}"), stacklevel=3)

    def resize_mask(self, mask) -> np.ndarray:
        """A mask through the same crop, resampled by nearest neighbour.

        Args:
            mask: (H, W) or (H, W, 1) array; nonzero = anomalous.

        Returns:
            bool (size, size).
        """
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m.any(axis=2)
        if m.ndim != 2:
            raise InputError(f"a mask must be (H, W); got shape={np.shape(mask)}")
        m = _crop(m[:, :, None] != 0, self.mode)[:, :, 0]
        rows = nearest_index(m.shape[0], self.size)
        cols = nearest_index(m.shape[1], self.size)
        return m[np.ix_(rows, cols)]


# ------------------------------------------------------------------------- helpers


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of 1-D resampling (module docstring, step 3).

    Shrinking (n_out < n_in): output pixel i averages the input interval
    [i s, (i + 1) s), s = n_in / n_out, weighting each input pixel by its overlap, so
    each row sums to 1. Enlarging: bilinear between pixel centres
    (c = (i + 1/2) n_in / n_out - 1/2, clamped at the edges). Equal: identity.
    """
    if n_out == n_in:
        return np.eye(n_in)
    a = np.zeros((n_out, n_in))
    s = n_in / n_out
    if n_out < n_in:
        edges = np.arange(n_in + 1, dtype=np.float64)
        for i in range(n_out):
            lo, hi = i * s, (i + 1) * s
            a[i] = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0,
                           None) / s
        return a
    c = np.clip((np.arange(n_out) + 0.5) * s - 0.5, 0.0, n_in - 1)
    j0 = np.floor(c).astype(int)
    t = c - j0
    j1 = np.minimum(j0 + 1, n_in - 1)
    a[np.arange(n_out), j0] += 1.0 - t
    a[np.arange(n_out), j1] += t
    return a


def resize(x: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Resamples a float (H, W, C) image to float64 (h_out, w_out, C): ``A x B.T``
    with the matrices of :func:`resize_matrix` (area shrinking, bilinear enlarging).
    """
    x = np.asarray(x, dtype=np.float64)
    a = resize_matrix(x.shape[0], h_out)
    b = resize_matrix(x.shape[1], w_out)
    y = np.tensordot(a, x, axes=(1, 0))  # (h_out, W, C)
    return np.ascontiguousarray(np.tensordot(y, b, axes=(1, 1)).transpose(0, 2, 1))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-neighbour source index of each of n_out pixels: floor((i + 1/2) s)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)


def _as_raw(raw, where: str = "image") -> np.ndarray:
    if isinstance(raw, str | os.PathLike):
        return read_raw(raw)
    return check_pixels(np.asarray(raw), where)


def _convert_channels(x: np.ndarray, channels: int, where: str) -> np.ndarray:
    c = x.shape[2]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=2)
    if c == 3 and channels == 1:
        return (x @ np.asarray(LUMA))[:, :, None]
    raise InputError(f"{where}: cannot convert {c} channels to {channels} (the "
                     "model's): sijax converts only between grey (1) and RGB (3)")


def _crop(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "resize":
        return x
    h, w = x.shape[:2]
    s = min(h, w)
    r0, c0 = (h - s) // 2, (w - s) // 2
    return x[r0 : r0 + s, c0 : c0 + s]
