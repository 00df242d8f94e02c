"""Multi-scale 2-D simplex noise in JAX, drawn from a key (AnoDDPM's noise).

Simplex noise (Perlin 2001; the formulation of Gustavson, "Simplex noise demystified",
2005) is gradient noise on the triangular lattice. A point p in the plane is skewed,
s = p + F2 (p_1 + p_2) 1 with F2 = (sqrt(3) - 1) / 2, so that the lattice becomes
the integer grid; the triangle that holds p has the corners

    v_0 = floor(s),  v_1 = v_0 + (1, 0) if s_1 - v_0,1 > s_2 - v_0,2 else v_0 + (0, 1),
    v_2 = v_0 + (1, 1)

(in skewed coordinates; G2 = (3 - sqrt(3)) / 6 unskews them, u - G2 (u_1 + u_2) 1).
Each lattice vertex v carries a random unit gradient g_v, and the noise is

    n(p) = sum_{k=0..2} max(r^2 - |d_k|^2, 0)^4 <g_{v_k}, d_k>,   d_k = p - v_k,

with r^2 = 1/2: no vertex outside p's triangle is within radius r of p, so the sum
over the three corners is the sum over the whole lattice and n is continuous.

Here the gradients are i.i.d. uniform on the unit circle (a hash of the key and the
vertex, ``jax.random.fold_in``: :func:`vertex_gradients`), and the lattice is shifted
by a random offset that is uniform on one lattice cell. Then E n(p) = 0 and,
averaged over the offset,

    E n(p)^2 = rho / 2 * integral (r^2 - |d|^2)_+^8 |d|^2 dd = sqrt(3) pi r^20 / 180,

with rho = sqrt(3) lattice vertices per unit area: every pixel has the same
variance, which :func:`simplex_field` divides out (unit variance per pixel).

:func:`simplex_noise` sums ``octaves`` independent fields at wavelengths
lambda_0 / 2^k with amplitudes persistence^k (k = 0, ..., octaves - 1) and divides by
sqrt(sum_k persistence^(2 k)): multi-scale noise with zero mean and unit variance per
pixel, spatially correlated on the scale lambda_0. The draw is a fixed function of
the key (not of any image), so it needs no piecewise linearity.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["simplex_field", "simplex_noise", "vertex_gradients"]

F2 = (math.sqrt(3.0) - 1.0) / 2.0  # skew
G2 = (3.0 - math.sqrt(3.0)) / 6.0  # unskew
R2 = 0.5  # squared kernel radius r^2
# E n(p)^2 over gradients and offset (module docstring): sqrt(3) pi r^20 / 180.
FIELD_VARIANCE = math.sqrt(3.0) * math.pi * R2**10 / 180.0


def vertex_gradients(key: jax.Array, vertices: jax.Array, dtype) -> jax.Array:
    """Unit gradients of lattice vertices, i.i.d. uniform on the circle.

    A pure hash of (key, vertex): the same vertex always gets the same gradient.
    The vertex (a, b) is folded into the key as the one 32-bit word
    (a mod 2^16) 2^16 + (b mod 2^16), so the gradient lattice repeats every 65,536
    cells along each axis (far beyond any image).

    Args:
        key: PRNG key of one field.
        vertices: (..., 2) integer skewed lattice coordinates (non-negative).
        dtype: float dtype of the result.

    Returns:
        (..., 2) unit vectors (cos theta, sin theta).
    """
    v = jnp.reshape(vertices, (-1, 2)).astype(jnp.uint32) & jnp.uint32(0xFFFF)
    words = (v[:, 0] << jnp.uint32(16)) | v[:, 1]

    def angle(word):
        return jax.random.uniform(jax.random.fold_in(key, word), (), dtype, 0.0,
                                  2.0 * math.pi)

    theta = jax.vmap(angle)(words).reshape(vertices.shape[:-1])
    return jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)


def simplex_field(key: jax.Array, shape: tuple[int, int], wavelength: float,
                  dtype=None) -> jax.Array:
    """One 2-D simplex noise field on the pixel grid, unit variance per pixel.

    Pixel (i, j) sits at p = (i, j) / wavelength + o, with o a random offset uniform
    on one lattice cell; n(p) as in the module docstring, divided by
    sqrt(FIELD_VARIANCE).

    Args:
        key: PRNG key (used once: split into the offset and the gradients).
        shape: (H, W).
        wavelength: lattice spacing in pixels (> 0; may be traced); features
            span about this many pixels.
        dtype: float dtype (default: the default float).

    Returns:
        (H, W) noise field.
    """
    dtype = dtype or jnp.result_type(float)
    k_offset, k_grad = jax.random.split(key)
    h, w = shape
    # Uniform in the unit square of skewed coordinates = uniform on one cell.
    u = jax.random.uniform(k_offset, (2,), dtype)
    offset = u - G2 * jnp.sum(u)
    ii, jj = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype),
                          indexing="ij")
    p = jnp.stack([ii, jj], axis=-1) / wavelength + offset[None, None]  # (H, W, 2)
    s = p + F2 * jnp.sum(p, axis=-1, keepdims=True)
    v0 = jnp.floor(s)
    f = s - v0
    lower = (f[..., 0] > f[..., 1])[..., None]  # below the diagonal: step x first
    v1 = v0 + jnp.where(lower, jnp.asarray([[[1.0, 0.0]]], dtype),
                        jnp.asarray([[[0.0, 1.0]]], dtype))
    corners = jnp.stack([v0, v1, v0 + 1.0], axis=-2)  # (H, W, 3, 2) skewed
    d = p[..., None, :] - (corners - G2 * jnp.sum(corners, axis=-1, keepdims=True))
    g = vertex_gradients(k_grad, corners.astype(jnp.int32), dtype)
    fall = jnp.maximum(R2 - jnp.sum(d * d, axis=-1), 0.0) ** 4
    n = jnp.sum(fall * jnp.sum(g * d, axis=-1), axis=-1)
    return n / math.sqrt(FIELD_VARIANCE)


@functools.partial(jax.jit, static_argnames=("shape", "octaves", "persistence",
                                             "wavelength", "dtype"))
def simplex_noise(key: jax.Array, shape: tuple[int, ...], *, octaves: int = 6,
                  persistence: float = 0.8, wavelength: float = 64.0,
                  dtype=None) -> jax.Array:
    """Multi-scale simplex noise, zero mean and unit variance per pixel.

    n = sum_k persistence^k n_k / sqrt(sum_k persistence^(2 k)), with n_k
    independent :func:`simplex_field` draws at wavelength ``wavelength / 2^k``;
    every channel and every leading index is an independent draw.

    Args:
        key: PRNG key (used once).
        shape: (..., H, W, C).
        octaves: number of scales (>= 1).
        persistence: amplitude ratio between successive octaves (> 0).
        wavelength: wavelength of the first (coarsest) octave, in pixels.
        dtype: float dtype (default: the default float).

    Returns:
        Noise of ``shape``.
    """
    dtype = dtype or jnp.result_type(float)
    *lead, h, w, c = tuple(shape)
    n_fields = math.prod(lead) * c
    amps = np.asarray([persistence**k for k in range(octaves)])
    amps = jnp.asarray(amps / np.sqrt(np.sum(amps**2)), dtype)
    wavelengths = jnp.asarray([wavelength / 2**k for k in range(octaves)], dtype)
    keys = jax.random.split(key, (n_fields, octaves))
    # One field's code for every octave (the wavelength is an input): one compile.
    per_octave = jax.vmap(lambda k, lam: simplex_field(k, (h, w), lam, dtype))
    fields = jax.vmap(per_octave, in_axes=(0, None))(keys, wavelengths)  # (N, O, H, W)
    fields = jnp.einsum("nohw,o->nhw", fields, amps)
    fields = jnp.reshape(fields, (*lead, c, h, w))
    return jnp.moveaxis(fields, -3, -1)
