"""Values at the points of a line: the point buffer, line-dependent values (PV)
and the result type."""

from typing import Any, NamedTuple

import numpy as np

ENDS = -1  # origin of z_min and z_max
WINDOW = -2  # origin of a window boundary where some decision changes


class LinePieces(NamedTuple):
    """Every linear piece of f on [z_min, z_max]: piece k is [z[k], z[k + 1]].

    Host (numpy) arrays of data-dependent size.
    """

    z: (
        np.ndarray
    )  # (K + 1,) strictly increasing breakpoints; z[0] = z_min, z[K] = z_max
    summary: Any  # pytree, each leaf (K, ...): summary(f at the midpoint of piece k)
    fingerprint: np.ndarray  # (K,) weighted sum of every decision of f on the piece
    #   (with all_fingerprints=False only the first and the last; the others NaN)
    origin: np.ndarray  # (K + 1,) int: index in `events` of the decision that
    #   created z[k]; ENDS for z_min and z_max, WINDOW for a window boundary
    events: tuple[str, ...]  # one description per piecewise equation evaluated
    points: int  # points pushed through f, all windows (split attempts included)
    windows: int  # windows the stretch was enumerated in

    @property
    def lo(self) -> np.ndarray:
        return self.z[:-1]

    @property
    def hi(self) -> np.ndarray:
        return self.z[1:]

    @property
    def count(self) -> int:
        return len(self.z) - 1


class Overflow(Exception):
    """A window needs more than max_points points."""


class PV:
    """A line-dependent value at the points: (cap, ...) arrays, leading axis = points.

    `affine`: affine on each segment (floating); otherwise constant on each segment.
    Lazy: inserting points does not touch the value; reading `right` or `left`
    brings it to the line's current points first (`Line.refresh`: one gather from
    the points it was computed at, exact because the value is affine, or constant,
    between those points). A value that is live but unused over many insertions
    (a U-Net's skip connection) is interpolated once, when it is next used.
    """

    __slots__ = ("_right", "_left", "affine", "_line", "_version")

    def __init__(self, right, left, affine: bool, line):
        self._right, self._left, self.affine = right, left, affine
        self._line, self._version = line, line.version

    def _sync(self) -> None:
        if self._version != self._line.version:
            self._line.refresh(self)

    @property
    def right(self):
        self._sync()
        return self._right

    @property
    def left(self):
        self._sync()
        return self._left

    @property
    def continuous(self) -> bool:
        return self._left is self._right


def is_pv(x) -> bool:
    return isinstance(x, PV)


MIN_CAP = 32  # smallest point buffer: fewer buckets to compile, little waste


def bucket(n: int) -> int:
    """Capacity of the point buffer for n points: a power of two >= MIN_CAP."""
    return max(MIN_CAP, 1 << (n - 1).bit_length())
