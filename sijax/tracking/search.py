"""Enumerating every linear piece of f on a stretch [z_min, z_max] of the line.

A capped `lax.while_loop`: starting at z_min, track the piece on
the right of the cursor, record it as [cursor, min(hi, z_max)], move the cursor to hi,
repeat. Consecutive pieces share their end point exactly, so the recorded pieces tile
the stretch with no gap and no overlap. Results have static shapes: padded arrays, a
count, and a status code that says whether the stretch was covered or `max_pieces` was
hit.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sijax.errors import InputError, MaxPiecesError
from sijax.tracking.interpreter import (
    DEFAULT_TIE_TOL,
    make_line_jaxpr,
    track_jaxpr,
    validate_line,
)

COVERED = 0  # the pieces tile [z_min, z_max]
MAX_PIECES = 1  # max_pieces were recorded before z_max was reached


class Pieces(NamedTuple):
    """Pieces of f on [z_min, z_max], padded to `max_pieces`.

    Entries at index >= count are padding: lo and hi are NaN, summary leaves are zero.
    """

    lo: jax.Array  # (max_pieces,) start of each piece; lo[0] == z_min
    hi: jax.Array  # (max_pieces,) end of each piece; hi[k] == lo[k + 1]
    count: jax.Array  # () int32 number of recorded pieces
    summary: Any  # pytree of summary(piece.out), each leaf stacked: (max_pieces, ...)
    status: jax.Array  # () int32: COVERED or MAX_PIECES


def _raise_if_overflow(status, count, reached=None, z_max=None) -> None:
    status = jnp.asarray(status)
    if not bool(jnp.any(status == MAX_PIECES)):
        return
    where = ""
    if reached is not None:
        where = (
            f" at z={float(jnp.min(reached))} before reaching "
            f"z_max={float(jnp.max(jnp.asarray(z_max)))}"
        )
    raise MaxPiecesError(
        f"enumerate_pieces stopped after {int(jnp.max(count))} pieces{where}: "
        "increase max_pieces or shorten the stretch (or pass throw=False and read "
        "`status`)."
    )


def check_pieces(pieces: Pieces) -> Pieces:
    """Raises MaxPiecesError if `pieces` (concrete, outside jit) did not cover its
    stretch. Works on batched (vmapped) `Pieces` too; returns `pieces` unchanged."""
    _raise_if_overflow(pieces.status, pieces.count)
    return pieces


def enumerate_pieces(
    f: Callable,
    a: jax.Array,
    b: jax.Array,
    z_min,
    z_max,
    *,
    max_pieces: int,
    summary: Callable[[Any], Any] | None = None,
    tie_tol: float = DEFAULT_TIE_TOL,
    throw: bool = False,
) -> Pieces:
    """Every linear piece of f along a + b t for t in [z_min, z_max], left to right.

    Runs as one `lax.while_loop`; works under `jit` and `vmap` (over a, b, z_min, z_max)
    and traces f once.

    Args:
      f: piecewise-linear function of one array of the shape of `a` (see `track`).
      a, b: (...) the line x(t) = a + b t.
      z_min, z_max: () the stretch, z_min <= z_max (one piece [z, z] if equal).
      max_pieces: capacity (static).
      summary: optional `summary(piece.out) -> pytree of arrays`, e.g. whether the
        thresholded mask equals the observed one; stored per piece.
      tie_tol: see `track`.
      throw: raise `MaxPiecesError` when the capacity is hit (a host callback under
        `jit`); otherwise only `status` reports it.

    Returns:
      `Pieces` with lo/hi tiling [z_min, hi[count - 1]] exactly.
    """
    if max_pieces < 1:
        raise InputError(f"max_pieces must be >= 1; got {max_pieces=}")
    a, b = validate_line(a, b, z_min, 1)
    dtype = a.dtype
    z_min = jnp.asarray(z_min, dtype)
    z_max = jnp.asarray(z_max, dtype)
    if jnp.ndim(z_max) != 0:
        raise InputError(f"z_max must be a scalar; got shape {jnp.shape(z_max)}")
    concrete = not any(isinstance(z, jax.core.Tracer) for z in (z_min, z_max))
    if concrete and not bool(z_min <= z_max):
        raise InputError(f"need z_min <= z_max; got {z_min=} {z_max=}")
    closed, treedef = make_line_jaxpr(f, a.shape, dtype)
    summarize = summary if summary is not None else (lambda out: ())

    def piece_at(z):
        piece, _ = track_jaxpr(closed, treedef, a, b, z, 1, tie_tol=tie_tol)
        return piece, summarize(piece.out)

    summ_shape = jax.eval_shape(lambda z: piece_at(z)[1], z_min)
    nan = jnp.full((max_pieces,), jnp.nan, dtype)
    init = (
        jnp.zeros((), jnp.int32),
        z_min,
        nan,
        nan,
        jax.tree.map(lambda s: jnp.zeros((max_pieces, *s.shape), s.dtype), summ_shape),
    )

    def cond(loop):
        k, cursor = loop[0], loop[1]
        return (k < max_pieces) & ((k == 0) | (cursor < z_max))

    def body(loop):
        k, cursor, lo, hi, summ = loop
        piece, value = piece_at(cursor)
        end = jnp.minimum(piece.hi, z_max)
        lo = lo.at[k].set(cursor)
        hi = hi.at[k].set(end)
        summ = jax.tree.map(lambda acc, v: acc.at[k].set(v), summ, value)
        return k + 1, end, lo, hi, summ

    count, cursor, lo, hi, summ = lax.while_loop(cond, body, init)
    status = jnp.where(cursor >= z_max, COVERED, MAX_PIECES).astype(jnp.int32)
    if throw:
        if isinstance(status, jax.core.Tracer):
            jax.debug.callback(_raise_if_overflow, status, count, cursor, z_max)
        else:
            _raise_if_overflow(status, count, cursor, z_max)
    return Pieces(lo, hi, count, summ, status)
