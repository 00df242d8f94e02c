"""Unions of closed intervals on the real line (docs/method.md §4: the truncation set).

Two representations:

* In compiled code, a union is an :class:`Intervals` pytree: a padded ``(K, 2)`` array
  of rows ``[lo, hi]``, a ``count`` of valid rows and an ``overflow`` flag (STYLE 7).
  Valid rows come first, sorted and disjoint once normalised; padding rows are
  ``(+inf, +inf)`` so that they sort last and carry no probability mass. When more
  intervals than ``K`` would be needed, the extra ones are dropped *and* ``overflow`` is
  set: nothing is ever truncated silently.
* On the host, a union is a plain list of ``(lo, hi)`` float pairs; the ``*_list``
  helpers normalise, intersect and complement such lists in plain Python.

Intervals are closed; two intervals that touch (``hi_i == lo_j``) are merged. Rows with
``lo > hi`` or NaN end points are empty and dropped. Single points (``lo == hi``) are
kept: they carry no mass but record that a point belongs to the set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.errors import InputError

__all__ = [
    "Intervals",
    "complement",
    "complement_list",
    "contains",
    "empty_intervals",
    "from_list",
    "intersect_list",
    "merge_pieces",
    "normalize",
    "normalize_list",
    "to_list",
]

PAD = math.inf  # value of both end points of a padding row


class Intervals(NamedTuple):
    """A union of closed intervals with a static maximum size K.

    Attributes:
      bounds: (K, 2) float64 rows ``[lo, hi]``; rows ``>= count`` are ``(inf, inf)``.
      count: () int32, number of valid rows.
      overflow: () bool, True when intervals were dropped because K was too small.
    """

    bounds: jax.Array  # (K, 2) float64
    count: jax.Array  # () int32
    overflow: jax.Array  # () bool

    @property
    def lo(self) -> jax.Array:
        """(K,) left end points (padding rows: +inf)."""
        return self.bounds[..., 0]

    @property
    def hi(self) -> jax.Array:
        """(K,) right end points (padding rows: +inf)."""
        return self.bounds[..., 1]

    @property
    def valid(self) -> jax.Array:
        """(K,) bool, True on the rows that hold an interval."""
        k = self.bounds.shape[-2]
        return jnp.arange(k) < self.count[..., None]

    @property
    def max_intervals(self) -> int:
        """The static capacity K."""
        return self.bounds.shape[-2]


def empty_intervals(max_intervals: int, dtype=jnp.float64) -> Intervals:
    """The empty union with capacity ``max_intervals`` (K >= 1)."""
    if max_intervals < 1:
        raise InputError(f"{max_intervals=} must be >= 1")
    return Intervals(
        bounds=jnp.full((max_intervals, 2), PAD, dtype),
        count=jnp.zeros((), jnp.int32),
        overflow=jnp.zeros((), bool),
    )


def merge_pieces(
    lo: jax.Array,
    hi: jax.Array,
    keep: jax.Array | None = None,
    max_intervals=None,
    order: jax.Array | None = None,
) -> Intervals:
    """Normalised union of the pieces ``[lo_i, hi_i]`` with ``keep_i`` (jit-compatible).

    Sorts by left end point and merges overlapping or touching pieces: a new group
    starts at a kept row when its ``lo`` exceeds the largest ``hi`` of the kept rows
    before it. Cost O(P log P), or O(P) when ``order`` is given.

    Args:
      lo: (P,) left end points.
      hi: (P,) right end points.
      keep: (P,) bool, which pieces belong to the union (default: all).
      max_intervals: static K of the result (default P). More than K groups set
        ``overflow`` and keep the K left-most groups.
      order: optional (P,) int permutation that already sorts the kept rows by ``lo``
        (rows not kept may sit anywhere); skips the sort (a search that grows outwards
        knows it, and a sort is costly to compile).

    Returns:
      The union as :class:`Intervals` with capacity K.
    """
    lo = jnp.asarray(lo, jnp.float64)
    hi = jnp.asarray(hi, jnp.float64)
    if lo.ndim != 1 or lo.shape != hi.shape:
        raise InputError(f"{lo.shape=} and {hi.shape=} must be equal 1-d shapes")
    p = lo.shape[0]
    k = p if max_intervals is None else int(max_intervals)
    if k < 1:
        raise InputError(f"max_intervals={k} must be >= 1")
    if keep is None:
        keep = jnp.ones((p,), bool)
    # NaN end points compare False, so `lo <= hi` drops them too.
    ok = jnp.asarray(keep, bool) & (lo <= hi)
    lo_s = jnp.where(ok, lo, PAD)
    hi_s = jnp.where(ok, hi, PAD)
    if order is None:
        order = jnp.argsort(lo_s, stable=True)
    lo_s, hi_s, ok_s = lo_s[order], hi_s[order], ok[order]
    # Running max of the right end points of kept rows only (others may sit anywhere).
    reach = lax.cummax(jnp.where(ok_s, hi_s, -jnp.inf))
    prev_reach = jnp.concatenate([jnp.full((1,), -jnp.inf, hi_s.dtype), reach[:-1]])
    # The first kept row always starts a group (its lo may be -inf, not > -inf).
    first = ok_s & (jnp.cumsum(ok_s.astype(jnp.int32)) == 1)
    start = ok_s & ((lo_s > prev_reach) | first)
    gid = jnp.cumsum(start.astype(jnp.int32)) - 1
    gid = jnp.where(ok_s, gid, k)  # invalid rows go nowhere (mode="drop")
    n_groups = jnp.sum(start.astype(jnp.int32))
    out_lo = jnp.full((k,), PAD, lo_s.dtype).at[gid].min(lo_s, mode="drop")
    out_hi = jnp.full((k,), -jnp.inf, hi_s.dtype).at[gid].max(hi_s, mode="drop")
    count = jnp.minimum(n_groups, k).astype(jnp.int32)
    live = jnp.arange(k) < count
    out_hi = jnp.where(live, out_hi, PAD)
    return Intervals(
        bounds=jnp.stack([out_lo, out_hi], axis=-1),
        count=count,
        overflow=n_groups > k,
    )


def normalize(iv: Intervals, max_intervals: int | None = None) -> Intervals:
    """Sort and merge the valid rows of ``iv`` (jit-compatible); keeps ``overflow``."""
    out = merge_pieces(iv.lo, iv.hi, iv.valid, max_intervals or iv.max_intervals)
    return out._replace(overflow=out.overflow | iv.overflow)


def complement(iv: Intervals, lo=-jnp.inf, hi=jnp.inf) -> Intervals:
    """``[lo, hi]`` minus the normalised union ``iv`` (jit-compatible), capacity K + 1.

    The gaps are returned as closed intervals (their end points belong to ``iv``; this
    does not change any probability mass).

    Args:
      iv: a normalised union (sorted, disjoint, as produced by :func:`merge_pieces`).
      lo: left end of the range.
      hi: right end of the range.

    Returns:
      :class:`Intervals` with K + 1 rows.
    """
    k = iv.max_intervals
    valid = iv.valid
    # gap i lies between interval i-1 and interval i (i = 0..count).
    ninf = jnp.full((1,), -jnp.inf)
    pinf = jnp.full((1,), jnp.inf)
    gap_lo = jnp.concatenate([ninf, jnp.where(valid, iv.hi, PAD)])
    gap_hi = jnp.concatenate([jnp.where(valid, iv.lo, jnp.inf), pinf])
    gap_lo = jnp.maximum(gap_lo, lo)
    gap_hi = jnp.minimum(gap_hi, hi)
    in_range = jnp.arange(k + 1) <= iv.count
    # Drop zero-width gaps between touching rows too (lo < hi strictly), except a
    # degenerate requested range [lo, lo] that is not covered.
    keep = in_range & (gap_lo < gap_hi)
    return merge_pieces(gap_lo, gap_hi, keep, k + 1)


def contains(iv: Intervals, z: jax.Array) -> jax.Array:
    """() bool: whether ``z`` lies in one of the valid (closed) intervals."""
    return jnp.any(iv.valid & (iv.lo <= z) & (z <= iv.hi))


# --------------------------------------------------------------------------- host side


def _check_pairs(pairs: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise InputError(f"an interval must be a (lo, hi) pair, got {pair!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if math.isnan(lo) or math.isnan(hi):
            raise InputError(f"interval end points must not be NaN, got {pair!r}")
        out.append((lo, hi))
    return out


def normalize_list(pairs: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint union of closed intervals; touching ones merged, empty dropped.

    Args:
      pairs: iterable of ``(lo, hi)``; pairs with ``lo > hi`` are empty.

    Returns:
      A list of ``(lo, hi)`` floats, sorted and pairwise disjoint.
    """
    rows = sorted(p for p in _check_pairs(pairs) if p[0] <= p[1])
    out: list[tuple[float, float]] = []
    for lo, hi in rows:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def intersect_list(
    a: Iterable[Sequence[float]], b: Iterable[Sequence[float]]
) -> list[tuple[float, float]]:
    """Intersection of two unions of closed intervals (a normalised list)."""
    a, b = normalize_list(a), normalize_list(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return normalize_list(out)


def complement_list(
    pairs: Iterable[Sequence[float]], lo: float = -math.inf, hi: float = math.inf
) -> list[tuple[float, float]]:
    """``[lo, hi]`` minus the union, as closed intervals with positive width."""
    out, cur = [], float(lo)
    for a, b in normalize_list(pairs):
        if a > cur:
            out.append((cur, min(a, hi)))
        cur = max(cur, b)
        if cur >= hi:
            break
    if cur < hi:
        out.append((cur, float(hi)))
    return [(a, b) for a, b in out if a < b]


def from_list(
    pairs: Iterable[Sequence[float]], max_intervals: int | None = None
) -> Intervals:
    """Host list of ``(lo, hi)`` to a normalised padded :class:`Intervals`.

    Args:
      pairs: the intervals (any order; overlaps are merged).
      max_intervals: capacity K (default: the number of merged intervals, at least 1).
        More intervals than K set ``overflow`` and keep the K left-most ones.
    """
    rows = normalize_list(pairs)
    k = max(1, len(rows)) if max_intervals is None else int(max_intervals)
    if k < 1:
        raise InputError(f"{max_intervals=} must be >= 1")
    bounds = np.full((k, 2), PAD)
    n = min(k, len(rows))
    if n:
        bounds[:n] = np.asarray(rows[:n], dtype=np.float64)
    return Intervals(
        bounds=jnp.asarray(bounds, jnp.float64),
        count=jnp.asarray(n, jnp.int32),
        overflow=jnp.asarray(len(rows) > k),
    )


def to_list(iv: Intervals) -> list[tuple[float, float]]:
    """The valid rows of a (concrete, unbatched) :class:`Intervals` as float pairs."""
    bounds = np.asarray(iv.bounds)
    if bounds.ndim != 2:
        raise InputError(f"to_list takes one union, got {bounds.shape=}")
    n = int(iv.count)
    return [(float(a), float(b)) for a, b in bounds[:n]]
