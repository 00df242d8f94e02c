"""Exact piecewise-linear tracking of any JAX function along a line x(t) = a + b t.

Imports nothing from `sijax.diffusion` or `sijax.detect`: it works on any JAX function.
"""

from sijax.errors import MaxPiecesError
from sijax.tracking.affine import Affine, Piece
from sijax.tracking.interpreter import (
    DEFAULT_TIE_TOL,
    evaluate,
    memo_init,
    track,
    track_memo,
)
from sijax.tracking.propagate import LineCache, LinePieces, enumerate_line
from sijax.tracking.search import (
    COVERED,
    MAX_PIECES,
    Pieces,
    check_pieces,
    enumerate_pieces,
)

__all__ = [
    "COVERED",
    "DEFAULT_TIE_TOL",
    "MAX_PIECES",
    "Affine",
    "LineCache",
    "LinePieces",
    "MaxPiecesError",
    "Piece",
    "Pieces",
    "check_pieces",
    "enumerate_line",
    "enumerate_pieces",
    "evaluate",
    "memo_init",
    "track",
    "track_memo",
]
