"""si4onnx's preset hypotheses: the region, the comparison set and eta.

A hypothesis here holds its options and builds, from the observed region, the
contrast eta of the test (docs/method.md §3); the region itself and the search are
the model's (:mod:`sijax.si4onnx.si`). Semantics follow si4onnx 0.1.13:

* the threshold is ``torch.tensor(threshold).double()``: a Python float is rounded
  to float32 first (0.8 -> 0.800000011920929), a NumPy or torch float64 is kept;
* the region is ``score > threshold`` (strict) on the squeezed score map, AND the
  user's mask when one is given;
* eta's entries are float32 numbers cast to float64 (si4onnx divides integer
  tensors, which PyTorch does in float32): 1/|M| is rounded to float32.
"""

from __future__ import annotations

import numbers

import numpy as np

from sijax.errors import InputError
from sijax.si4onnx.operators import Operator

__all__ = [
    "BackMeanDiff",
    "Hypothesis",
    "NeighborMeanDiff",
    "NoHypothesisError",
    "PresetHypothesis",
    "ReferenceMeanDiff",
    "torch_double",
]


class NoHypothesisError(Exception):
    """The observed data give no hypothesis (an empty region or comparison set)."""

    def __str__(self) -> str:
        return "Hypothesis is not obtained."


def torch_double(value) -> float:
    """``float(torch.tensor(value).double())`` without torch.

    A Python float becomes a float32 tensor first (PyTorch's default dtype); NumPy
    scalars and arrays (and torch tensors, through ``__array__``) keep their dtype;
    integers and booleans are exact.
    """
    if isinstance(value, bool | numbers.Integral) and not isinstance(value, np.generic):
        return float(value)
    if type(value) is float:
        return float(np.float32(value))
    if hasattr(value, "detach"):  # a torch tensor (sijax does not import torch)
        value = value.detach().cpu()
    arr = np.asarray(value)
    if arr.size != 1:
        raise InputError(f"threshold must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()).astype(np.float64))


def _ratio32(indicator: np.ndarray) -> np.ndarray:
    """indicator / sum(indicator) as PyTorch computes it for integer tensors:
    float32, then float64. NaN everywhere when the sum is 0 (no hypothesis)."""
    ind = indicator.astype(np.float32)
    total = np.float32(np.sum(indicator))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ind / total).astype(np.float32)


class Hypothesis:
    """Base class of si4onnx's hypotheses (only the presets are supported)."""


class PresetHypothesis(Hypothesis):
    """Options shared by the preset hypotheses.

    Args:
      threshold: the region is ``score > threshold`` (see :func:`torch_double`).
      i_idx: the network input that is tested (the others are held fixed).
      o_idx: the network output the score is computed from.
      post_process: an :class:`Operator` or a list of them, applied in order to the
        selected output.
      use_norm: min-max normalise the score map before thresholding; sijax follows
        ``score - min > threshold * (max - min)`` along the line (the arg-max and
        arg-min are decisions of the tracker), never a division.
    """

    def __init__(
        self,
        threshold: float,
        i_idx: int = 0,
        o_idx: int = 0,
        post_process: Operator | list[Operator] = (),
        use_norm: bool = False,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self.threshold = torch_double(threshold)
        self.i_idx = int(i_idx)
        self.o_idx = int(o_idx)
        ops = post_process if isinstance(post_process, list | tuple) else [post_process]
        for op in ops:
            if not isinstance(op, Operator):
                raise InputError(
                    f"post_process takes sijax.si4onnx operators, got {type(op)!r}"
                )
        self.post_process = tuple(ops)
        self.use_norm = bool(use_norm)

    # The comparison set (None: the reference image) and the contrast, on the host.
    def comparison(self, roi: np.ndarray, mask: np.ndarray | None):
        raise NotImplementedError

    def eta(self, roi: np.ndarray, other: np.ndarray | None) -> np.ndarray:
        """(n,) or (2n,) float64: the contrast of the test statistic eta^T data."""
        m = roi.reshape(-1).astype(np.int32)
        o = other.reshape(-1).astype(np.int32)
        return (_ratio32(m) - _ratio32(o)).astype(np.float64)

    def has_reference(self) -> bool:
        return False


class BackMeanDiff(PresetHypothesis):
    """Region mean minus the mean of the rest of the input (the background)."""

    def comparison(self, roi, mask):
        non_roi = (1 - roi).astype(np.int32)
        if mask is not None:
            non_roi = np.logical_and(non_roi, mask).astype(np.int32)
        return non_roi


class NeighborMeanDiff(PresetHypothesis):
    """Region mean minus the mean of its neighbourhood: the region dilated by a
    (2r + 1)-wide window (r = ``neighborhood_range``), minus the region."""

    def __init__(
        self,
        threshold: float,
        neighborhood_range: int = 1,
        i_idx: int = 0,
        o_idx: int = 0,
        post_process: Operator | list[Operator] = (),
        use_norm: bool = False,
        **kwargs,
    ):
        super().__init__(threshold, i_idx, o_idx, post_process, use_norm, **kwargs)
        self.neighborhood_range = int(neighborhood_range)

    def comparison(self, roi, mask):
        r = self.neighborhood_range
        if roi.ndim not in (1, 2):
            raise ValueError(f"Unsupported dimension: {roi.ndim}")
        padded = np.pad(roi.astype(np.int32), r)
        dilated = np.zeros_like(roi, dtype=np.int32)
        for offset in np.ndindex(*(2 * r + 1,) * roi.ndim):
            sl = tuple(slice(o, o + s) for o, s in zip(offset, roi.shape, strict=True))
            dilated = np.maximum(dilated, padded[sl])
        ring = np.logical_xor(dilated, roi).astype(np.int32)
        if mask is not None:
            ring = np.logical_and(ring, mask).astype(np.int32)
        return ring


class ReferenceMeanDiff(PresetHypothesis):
    """Region mean of the input minus the region mean of a reference image
    (``inference((input, reference), var)``); eta acts on (input, reference)."""

    def comparison(self, roi, mask):
        return None

    def eta(self, roi, other):
        m = _ratio32(roi.reshape(-1).astype(np.int32))
        return np.concatenate([m, -m]).astype(np.float64)

    def has_reference(self) -> bool:
        return True
