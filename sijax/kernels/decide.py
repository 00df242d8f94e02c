"""Fused sign-and-bound kernel for the tracker's hot path.

Every ReLU, abs and comparison of the tracked program calls
:meth:`sijax.tracking.interpreter.Context.decide`: for each unit u = v + s (t - z) it
takes the sign on the piece and shrinks the piece [lo, hi] to where no unit changes
sign. In plain ``jnp`` that is several passes over the (value, slope) arrays (sign,
crossing, two masked reductions); the Pallas kernel does it in one pass per block and
leaves a tiny per-block min/max for ``jnp`` to finish.

:func:`decide_reference` is the plain-``jnp`` twin; :func:`decide_pallas` the kernel
(``interpret=True`` runs it on a CPU, for tests). The library uses the reference
unless ``SIJAX_PALLAS_DECIDE=1`` is set: on the CPU the interpreted kernel is far
slower, and it has not been measured on a GPU yet (benchmarks/README.md).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["decide_reference", "decide_pallas", "decide", "enabled"]

BLOCK = 1024  # units per kernel block (a multiple of 128 for GPU/TPU lanes)


def enabled() -> bool:
    """Whether the tracker uses the kernel (environment ``SIJAX_PALLAS_DECIDE=1``)."""
    return os.environ.get("SIJAX_PALLAS_DECIDE", "0") == "1"


def decide_reference(v, s, z, direction, tau):
    """Signs of u = v + s (t - z) on the piece and the piece's bounds.

    Args:
      v: (...) values at z; s: (...) slopes (same shape and dtype).
      z: () the point; direction: () +1 or -1, the side the piece extends to;
      tau: () tie tolerance: a unit that is 0 at z takes its sign at
        z + direction * tau.

    Returns:
      (sigma (...) in {-1, 0, 1} with v's dtype, lo (), hi ()): every unit keeps the
      sign sigma on [lo, hi], lo <= z <= hi (clamped), +-inf where nothing crosses.
    """
    z = jnp.asarray(z)  # kept in its own dtype, as the bounds are
    sigma = jnp.sign(v + jnp.asarray(direction * tau, v.dtype) * s)
    u, w = sigma * v, sigma * s  # >= 0 at z + direction * tau
    safe = jnp.where(w == 0, jnp.ones_like(w), w)
    t_star = z - u / safe
    hi = jnp.min(jnp.where(w < 0, jnp.maximum(t_star, z), jnp.inf), initial=jnp.inf)
    lo = jnp.max(jnp.where(w > 0, jnp.minimum(t_star, z), -jnp.inf), initial=-jnp.inf)
    return sigma, lo, hi


def _kernel(scal_ref, v_ref, s_ref, sigma_ref, lo_ref, hi_ref):
    z, direction, tau = scal_ref[0], scal_ref[1], scal_ref[2]
    v, s = v_ref[...], s_ref[...]
    sigma = jnp.sign(v + direction * tau * s)
    u, w = sigma * v, sigma * s
    safe = jnp.where(w == 0, jnp.ones_like(w), w)
    t_star = z - u / safe
    sigma_ref[...] = sigma
    hi_ref[...] = jnp.full(
        hi_ref.shape, jnp.min(jnp.where(w < 0, jnp.maximum(t_star, z), jnp.inf))
    )
    lo_ref[...] = jnp.full(
        lo_ref.shape, jnp.max(jnp.where(w > 0, jnp.minimum(t_star, z), -jnp.inf))
    )


@functools.partial(jax.jit, static_argnames=("interpret", "block"))
def decide_pallas(
    v, s, z, direction, tau, *, interpret: bool = False, block: int = BLOCK
):
    """:func:`decide_reference` as one Pallas kernel over blocks of units."""
    from jax.experimental import pallas as pl

    shape, dtype = v.shape, v.dtype
    n = max(v.size, 1)
    nb = -(-n // block)
    pad = nb * block - v.size
    # Padding units have v = s = 0: sign 0, no crossing, so they never bound the piece.
    vf = jnp.pad(v.reshape(-1), (0, pad)).reshape(nb, block)
    sf = jnp.pad(s.reshape(-1), (0, pad)).reshape(nb, block)
    scal = jnp.stack(
        [jnp.asarray(z, dtype), jnp.asarray(direction, dtype), jnp.asarray(tau, dtype)]
    )
    row = pl.BlockSpec((1, block), lambda i: (i, 0))
    part = pl.BlockSpec((1, 1), lambda i: (i, 0))
    sigma, lo, hi = pl.pallas_call(
        _kernel,
        grid=(nb,),
        in_specs=[pl.BlockSpec((3,), lambda i: (0,)), row, row],
        out_specs=[row, part, part],
        out_shape=[
            jax.ShapeDtypeStruct((nb, block), dtype),
            jax.ShapeDtypeStruct((nb, 1), dtype),
            jax.ShapeDtypeStruct((nb, 1), dtype),
        ],
        interpret=interpret,
    )(scal, vf, sf)
    return sigma.reshape(-1)[: v.size].reshape(shape), jnp.max(lo), jnp.min(hi)


def decide(v, s, z, direction, tau):
    """The kernel when :func:`enabled` (interpreted off-GPU), else the reference."""
    if not enabled():
        return decide_reference(v, s, z, direction, tau)
    on_gpu = jax.default_backend() in ("gpu", "tpu")
    return decide_pallas(v, s, z, direction, tau, interpret=not on_gpu)
