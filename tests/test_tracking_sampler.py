"""The tracker on a v5-like DAL pipeline (docs/method.md §4 and 6), in float64.

A small ReLU U-Net (conv, eval batch-norm as mul/add, average pooling, bilinear resize
up, concatenation, per-step time bias) called inside a 5-step DDIM-like `lax.scan` with
fixed noises, then a 3x3 zero-padded mean filter, abs, and the threshold > 0.8. The same
oracles as the property tests: affine forms, real piece ends, exact tiling, and the
region mask against a 10^4-point grid. A test on the trained `tiny_8` checkpoint runs
when that checkpoint exists.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from _oracles import (
    SIZE,
    STEPS,
    THRESHOLD,
    check_piece,
    check_tiling_and_grid,
    line_through,
    sampler_noises,
    tiny_checkpoint_detector,
)
from jax import lax

from sijax.tracking import track

WIDTH = 4


def _alpha_bar(t):
    betas = np.linspace(1e-4, 0.02, 1000)
    return 1.0 if t < 0 else float(np.prod(1.0 - betas[: t + 1]))


def _ddim_constants():
    """(S, 5) rows: sqrt(ab_t), sqrt(1 - ab_t), sqrt(ab_s), c1, c2 (docs/method.md
    §6)."""
    rows = []
    for t, s in zip(STEPS, STEPS[1:] + (-1,), strict=True):
        ab_t, ab_s = _alpha_bar(t), _alpha_bar(s)
        c1 = np.sqrt((1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t))
        c2 = np.sqrt(max(1 - ab_s - c1**2, 0.0))
        rows.append([np.sqrt(ab_t), np.sqrt(1 - ab_t), np.sqrt(ab_s), c1, c2])
    return jnp.asarray(np.array(rows))


def _conv(x, w):
    return lax.conv_general_dilated(
        x[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0]


def _init(seed):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale)

    def block(cin, cout):
        return {
            "w": normal(3, 3, cin, cout, scale=1.4 / np.sqrt(9 * cin)),
            "b": normal(cout, scale=0.1),
            # Eval-mode batch-norm: running mean/var and affine parameters.
            "mean": normal(cout, scale=0.1),
            "var": jnp.asarray(rng.uniform(0.5, 1.5, size=cout)),
            "gamma": jnp.asarray(rng.uniform(0.8, 1.2, size=cout)),
            "beta": normal(cout, scale=0.1),
            "tbias": normal(len(STEPS), cin, scale=0.2),  # MLP(temb(t)), per step
        }

    c = WIDTH
    return {
        "down1": block(1, c),
        "down2": block(c, 2 * c),
        "up1": block(3 * c, c),
        "out": normal(1, 1, c, 1, scale=1 / np.sqrt(c)),
    }


def _block(p, x, k):
    h = x + p["tbias"][k][None, None]
    h = _conv(h, p["w"]) + p["b"][None, None]
    scale = p["gamma"] * lax.rsqrt(p["var"] + 1e-5)  # constants: any primitive is fine
    h = (h - p["mean"][None, None]) * scale[None, None] + p["beta"][None, None]
    return jax.nn.relu(h)


def _unet(params, x, k):
    h1 = _block(params["down1"], x, k)  # (8, 8, c)
    pooled = lax.reduce_window(h1, 0.0, lax.add, (2, 2, 1), (2, 2, 1), "VALID") / 4
    h2 = _block(params["down2"], pooled, k)  # (4, 4, 2c)
    up = jax.image.resize(h2, (SIZE, SIZE, 2 * WIDTH), "bilinear")
    h3 = _block(params["up1"], jnp.concatenate([up, h1], axis=-1), k)
    return _conv(h3, params["out"])


def _mean_filter(e):
    s = lax.reduce_window(e, 0.0, lax.add, (3, 3, 1), (1, 1, 1), "SAME")
    return s / 9.0


def _pipeline(eps_fn, noises, coefs, steps, x, flat=False):
    """D(x) by DDIM (eta = 1), then score = |mean filter(D(x) - x)|, region > 0.8.

    ``flat``: the steps unrolled in Python (no scan), as in an exported graph.
    """
    eps0, eps = noises
    ab0 = _alpha_bar(STEPS[0])
    x_t = np.sqrt(ab0) * x + np.sqrt(1 - ab0) * eps0

    def step(x_t, per_step):
        k, co, eps_k = per_step
        sq_ab_t, sq_1m_ab_t, sq_ab_s, c1, c2 = co
        e_hat = eps_fn(x_t, k)
        x0_hat = (x_t - sq_1m_ab_t * e_hat) / sq_ab_t
        return sq_ab_s * x0_hat + c1 * eps_k + c2 * e_hat, None

    if flat:
        x0 = x_t
        for k in range(len(STEPS)):
            x0, _ = step(x0, (steps[k], coefs[k], eps[k]))
    else:
        x0, _ = lax.scan(step, x_t, (steps, coefs, eps))
    score = jnp.sum(jnp.abs(_mean_filter(x0 - x)), axis=-1)
    return {"score": score, "mask": score > THRESHOLD}


def _checks(f, x_obs, seed):
    a, b, z_obs = line_through(x_obs, seed)
    mask_obs = f(a + b * z_obs)["mask"]

    def same_region(out):  # per piece
        return jnp.all(out["mask"] == mask_obs)

    def same_region_grid(out):  # on the batch of direct evaluations
        return np.all(
            np.asarray(out["mask"]) == np.asarray(mask_obs)[None], axis=(1, 2)
        )

    rng = np.random.default_rng(seed)
    piece = check_piece(f, a, b, z_obs, 1, rng)
    assert piece.out["score"].alpha.dtype == jnp.float64
    for z in rng.uniform(z_obs - 2.0, z_obs + 2.0, size=2):
        check_piece(f, a, b, float(z), int(rng.choice([-1, 1])), rng)
    pieces = check_tiling_and_grid(
        f,
        a,
        b,
        z_obs - 1.5,
        z_obs + 1.5,
        same_region,
        same_region_grid,
        max_pieces=1024,
    )
    count = int(pieces.count)
    assert count > 3, "the line should cross several pieces"
    return pieces


def v5_like_sampler(flat=False):
    """(f, x_obs): the v5-like pipeline (seeded weights and noises) and an image with
    a planted anomaly, so that some region is detected; ``flat``: steps unrolled."""
    params, noises = _init(0), sampler_noises(1)
    coefs, steps = _ddim_constants(), jnp.arange(len(STEPS))

    def f(x):
        with jax.default_matmul_precision("highest"):
            return _pipeline(
                lambda x_t, k: _unet(params, x_t, k), noises, coefs, steps, x, flat
            )

    x_obs = np.random.default_rng(2).normal(size=(SIZE, SIZE, 1))
    x_obs[2:5, 3:6] += 2.0
    return f, x_obs


def test_v5_like_sampler_pieces_are_exact():
    f, x_obs = v5_like_sampler()
    # Float64 throughout: no 32-bit float anywhere in the traced tracker.
    a, b, _ = line_through(x_obs, 0)
    text = str(jax.make_jaxpr(track(f))(a, b, 0.0))
    assert "f32" not in text and "f16" not in text
    pieces = _checks(f, x_obs, 3)
    assert np.any(np.asarray(pieces.summary[: int(pieces.count)]))


CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "sijax", "checkpoints")


def test_trained_tiny_checkpoint_pieces_are_exact():
    """The real v5 pipeline: trained tiny U-Net, sijax's DDIM sampler and detector."""
    f = tiny_checkpoint_detector(4)
    x_obs = np.random.default_rng(5).normal(size=(SIZE, SIZE, 1))
    _checks(f, x_obs, 6)
