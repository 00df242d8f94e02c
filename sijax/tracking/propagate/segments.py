"""Jitted helpers on the segments between points: interpolation, differences and
their roots, decision fingerprints."""

from functools import partial

import jax
import jax.numpy as jnp

from sijax.tracking.interpreter import (
    hash_weights,
)


def per_point(w, ndim):
    return w.reshape(w.shape + (1,) * (ndim - 1))


@partial(jax.jit, static_argnames=("affine", "continuous"))
def interp(right, left, il, ir, w, is_new, *, affine, continuous):
    """Values at a new point set: copies at old points, interpolation at new ones."""
    r_l = right[il]
    if affine:
        w = per_point(w.astype(right.dtype), right.ndim)
        other = right[ir] if continuous else left[ir]
        mid = r_l + w * (other - r_l)
    else:  # constant on the segment: its right value at the left neighbour
        mid = r_l
    new = per_point(is_new, right.ndim)
    out_r = jnp.where(new, mid, r_l)
    if continuous:  # (a jit returns distinct buffers: the caller shares this one)
        return out_r, None
    return out_r, jnp.where(new, mid, left[il])


def _segments(z, n):
    """(cap - 1,) left ends, lengths and validity of the segments."""
    valid = jnp.arange(z.shape[0] - 1) < n - 1
    return z[:-1], z[1:] - z[:-1], valid


def _difference(z, xr, xl, yr, yl):
    """u = x - y as (cap - 1, E) right values at z_k and left values at z_{k+1}."""
    cap = z.shape[0]
    full = (cap, *jnp.broadcast_shapes(xr.shape, yr.shape)[1:])
    ur = jnp.broadcast_to(xr, full) - jnp.broadcast_to(yr, full)
    ul = jnp.broadcast_to(xl, full) - jnp.broadcast_to(yl, full)
    return ur[:-1].reshape(cap - 1, -1), ul[1:].reshape(cap - 1, -1)


def _strict_change(r0, l1):
    return ((r0 < 0) & (l1 > 0)) | ((r0 > 0) & (l1 < 0))


@jax.jit
def difference_has(z, n, xr, xl, yr, yl):
    """Which segments hold a strict sign change of some element of u = x - y
    (x, y: (cap or 1, *shape) right and left values; 1: a constant): (cap - 1,)
    bools and their count.

    One fused read of the operands; the roots themselves are computed only in the
    segments that have one (`difference_roots`).
    """
    r0, l1 = _difference(z, xr, xl, yr, yl)
    valid = jnp.arange(z.shape[0] - 1) < n - 1
    has = valid & jnp.any(_strict_change(r0, l1), axis=1)
    return has, jnp.sum(has)


@jax.jit
def difference_roots(z, n, xr, xl, yr, yl, idx):
    """The roots of u in the segments `idx` (k,): (k, E), NaN where none."""
    r0, l1 = _difference(z, xr, xl, yr, yl)
    r0, l1 = r0[idx], l1[idx]
    cross = _strict_change(r0, l1)
    frac = r0 / jnp.where(cross, r0 - l1, 1)
    z0, dz = z[idx][:, None], (z[idx + 1] - z[idx])[:, None]
    return jnp.where(cross, z0 + dz * jnp.clip(frac, 0, 1), jnp.nan)


@jax.jit
def take_rows(t, idx):
    return t[idx]


@partial(jax.jit, static_argnames="ends")
def sign_fp(fp, salt, n, xr, xl, yr, yl, *, ends=False):
    """Adds the signs of x - y at the segment midpoints to the fingerprint; with
    `ends`, only to the first and the last segment (rows 0 and n - 2)."""
    rows = jnp.stack([0, jnp.maximum(n - 2, 0)]) if ends else jnp.arange(len(fp) - 1)

    def at(a, r):  # rows of a (cap, ...) value, or its only row (a constant)
        return a[jnp.minimum(r, a.shape[0] - 1)]

    mid = (at(xr, rows) - at(yr, rows) + at(xl, rows + 1) - at(yl, rows + 1)) / 2
    w = hash_weights(mid.shape[1:], salt, fp.dtype)
    s = jnp.sum((jnp.sign(mid) * w[None]).reshape(len(rows), -1), axis=1)
    return fp.at[rows].set(fp[rows] + s)


@jax.jit
def envelope_kinks(z, n, r, left):
    """First change of the winner of a max over the last axis inside each segment.

    r, l: (cap, M, W) right and left values of the entries (-inf entries never win).
    The winner at the left end is the largest right value, ties to the largest left
    value (the larger slope); the first entry to overtake it gives the kink.
    Returns ((cap - 1, M) kinks or NaN, (cap - 1,) whether a segment has one, count).
    """
    z0, dz, valid = _segments(z, n)
    r0, l1 = r[:-1], left[1:]
    dead = jnp.isneginf(r0) | jnp.isneginf(l1)
    r0 = jnp.where(dead, -jnp.inf, r0)
    l1 = jnp.where(dead, -jnp.inf, l1)
    tie = r0 == jnp.max(r0, axis=-1, keepdims=True)
    win = jnp.argmax(jnp.where(tie, l1, -jnp.inf), axis=-1)[..., None]
    rw = jnp.take_along_axis(r0, win, axis=-1)
    lw = jnp.take_along_axis(l1, win, axis=-1)
    dr, dl = rw - r0, lw - l1
    cand = ~dead & jnp.isfinite(rw) & jnp.isfinite(lw) & (dr > 0) & (dl < 0)
    frac = jnp.min(jnp.where(cand, dr / jnp.where(cand, dr - dl, 1), jnp.inf), -1)
    has = valid[:, None] & jnp.isfinite(frac)
    t = z0[:, None] + dz[:, None] * jnp.clip(jnp.where(has, frac, 0), 0, 1)
    t = jnp.where(has, t, jnp.nan)
    return t, jnp.any(has, axis=1), jnp.sum(has)


@jax.jit
def midpoint(r, left):
    return (r[:-1] + left[1:]) / 2


@jax.jit
def spread(seg, n):
    """Per-segment values (cap - 1, ...) to (right, left) per point (cap, ...)."""
    k = jnp.arange(seg.shape[0] + 1)
    right = seg[jnp.clip(k, 0, jnp.maximum(n - 2, 0))]
    left = seg[jnp.clip(k - 1, 0, jnp.maximum(n - 2, 0))]
    return right, left


@jax.jit
def fp_add(fp, decision, salt):
    """Adds one decision per segment ((cap - 1, ...) numbers) to the fingerprint."""
    w = hash_weights(decision.shape[1:], salt, fp.dtype)
    d = decision.astype(fp.dtype) * w[None]
    return fp.at[:-1].add(jnp.sum(d.reshape(d.shape[0], -1), axis=1))
