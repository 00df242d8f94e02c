"""Independent oracles for the tracker tests (direct evaluation, dense grids): a
helper module that holds no tests (its name keeps pytest from collecting it).

Shared by tests/test_tracking*.py. The checks compare the tracker with f itself:
  * `check_piece`: alpha + beta t against f(a + b t) at random t inside the piece, and
    just past each finite end some decision of f really changes (the decision
    fingerprint of the neighbouring piece differs), so pieces are not cut short;
  * `check_tiling_and_grid`: enumerate_pieces tiles [z_min, z_max] exactly and its
    per-piece summary equals direct evaluation on a dense grid.
Each check is one jit compilation, to keep the property tests fast.

Also the line and the detector of the sampler tests (test_tracking_sampler,
test_tracking_propagate, test_tracking_memo): `line_through`, `sampler_noises`,
`tiny_checkpoint_detector`.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sijax.tracking import COVERED, Affine, enumerate_pieces
from sijax.tracking.interpreter import make_line_jaxpr, track_jaxpr

RTOL = 1e-9
REACH = 3.0  # sample within z +- REACH where the piece is unbounded
N_GRID = 10_000  # every direct evaluation runs on this many points (one compilation)


def _is_affine(x):
    return isinstance(x, Affine)


@partial(jax.jit, static_argnums=0)
def _direct(f, a, b, ts):
    return jax.vmap(lambda t: f(a + b * t))(ts)


def direct(f, a, b, ts):
    """f(a + b t) for each t in ts (at most N_GRID points; padded to N_GRID)."""
    ts = np.asarray(ts, dtype=np.float64)
    padded = np.concatenate([ts, np.full(N_GRID - len(ts), ts[-1])])
    out = _direct(f, a, b, jnp.asarray(padded, a.dtype))
    return jax.tree.map(lambda x: np.asarray(x)[: len(ts)], out)


@partial(jax.jit, static_argnums=0)
def _fingerprinted(f, a, b, z, direction):
    closed, treedef = make_line_jaxpr(f, a.shape, a.dtype)
    return track_jaxpr(closed, treedef, a, b, z, direction, fingerprint=True)


def check_piece(f, a, b, z, direction, rng, n=20):
    """Affine forms match f at n random points of the piece at z (bool and integer
    leaves are constant there), and each finite end is a real decision change.

    Returns the Piece.
    """
    dtype = a.dtype
    piece, fp = _fingerprinted(
        f, a, b, jnp.asarray(z, dtype), jnp.asarray(direction, dtype)
    )
    lo, hi = float(piece.lo), float(piece.hi)
    assert lo <= z <= hi
    ts = rng.uniform(max(lo, z - REACH), min(hi, z + REACH), size=n)
    want = direct(f, a, b, ts)
    got_leaves = jax.tree.leaves(piece.out, is_leaf=_is_affine)
    want_leaves = jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for got, w in zip(got_leaves, want_leaves, strict=True):
        w = np.asarray(w)
        if isinstance(got, Affine):
            t = ts.reshape((-1,) + (1,) * np.ndim(got.alpha))
            pred = np.asarray(got.alpha)[None] + np.asarray(got.beta)[None] * t
            scale = max(1.0, float(np.max(np.abs(w))))
            err = float(np.max(np.abs(pred - w))) / scale
            assert err <= RTOL, f"affine form off by {err:.3g} (relative) in the piece"
        else:
            np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), w.shape), w)
    for end, side in ((hi, 1), (lo, -1)):
        if np.isfinite(end):
            other, fp_other = _fingerprinted(
                f, a, b, jnp.asarray(end, dtype), jnp.asarray(side, dtype)
            )
            start_of_next = other.lo if side == 1 else other.hi
            assert abs(float(fp_other) - float(fp)) > 1e-6, (
                f"piece cut at {end} but no decision changes there"
            )
            # The neighbour starts where this piece ends (up to the tie tolerance).
            assert abs(float(start_of_next) - end) <= 1e-9 * max(1.0, abs(end))
    return piece


@partial(jax.jit, static_argnums=(0, 1, 4))
def enumerate_walking(f, summary, a, b, max_pieces, z_min, z_max):
    return enumerate_pieces(
        f, a, b, z_min, z_max, max_pieces=max_pieces, summary=summary
    )


def check_tiling_and_grid(f, a, b, z_min, z_max, summary, reference, *, max_pieces=512):
    """enumerate_pieces tiles [z_min, z_max] and `summary` agrees with `reference`
    (the same summary computed from f's direct output) on a dense grid.

    Returns the Pieces.
    """
    pieces = enumerate_walking(f, summary, a, b, max_pieces, z_min, z_max)
    ts = np.linspace(z_min, z_max, N_GRID)
    want = reference(direct(f, a, b, ts))  # reference works on a batch of outputs
    n_grid = N_GRID
    count = int(pieces.count)
    assert int(pieces.status) == COVERED, f"not covered with {count} pieces"
    lo, hi = np.asarray(pieces.lo[:count]), np.asarray(pieces.hi[:count])
    assert lo[0] == z_min and hi[-1] == z_max
    np.testing.assert_array_equal(lo[1:], hi[:-1])  # no gap, no overlap
    assert np.all(hi > lo)
    assert np.all(np.isnan(np.asarray(pieces.lo[count:])))

    k = np.clip(np.searchsorted(hi, ts, side="right"), 0, count - 1)
    # Points within rounding of a breakpoint can sit on either side: skip them.
    near = np.minimum(np.abs(ts - lo[k]), np.abs(ts - hi[k])) < 1e-9
    got = jax.tree.leaves(pieces.summary)
    for g, w in zip(got, jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g)[k], np.asarray(w)
        bad = np.any((g != w).reshape(n_grid, -1), axis=1) & ~near
        assert not bad.any(), f"summary differs from the grid at t={ts[bad][:5]}"
    return pieces


# --- the DAL line of the sampler tests (docs/method.md §4 and 6) ---------------

SIZE, STEPS = 8, (460, 345, 230, 115, 0)
THRESHOLD = 0.8


def sampler_noises(seed):
    """Fixed sampler noises (eps0 (SIZE, SIZE, 1), eps (len(STEPS), SIZE, SIZE, 1))."""
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(SIZE, SIZE, 1))),
        jnp.asarray(rng.normal(size=(len(STEPS), SIZE, SIZE, 1))),
    )


def line_through(x_obs, seed):
    """The DAL line of a mean-difference statistic over a square (docs/method.md §4)."""
    eta = np.zeros((SIZE, SIZE, 1))
    eta[2:5, 3:6] = 1.0
    b = eta / np.sqrt(np.sum(eta**2))
    z_obs = float(np.sum(b * x_obs))
    return jnp.asarray(x_obs - z_obs * b), jnp.asarray(b), z_obs


def tiny_checkpoint_detector(seed=4):
    """The real v5 detection x -> {"score", "mask"}: the trained `tiny_8` U-Net,
    sijax's DDIM sampler over STEPS with fixed noises, the 3x3 mean filter and the
    threshold, at matmul precision "highest"."""
    from sijax.checkpoint import load_model
    from sijax.detect.score import region, score_map
    from sijax.diffusion.sampler import Noises, reconstruct

    model = load_model("tiny_8")
    eps_fn, schedule = model.denoiser(), model.schedule
    eps0, eps = sampler_noises(seed)
    noises = Noises(eps0=eps0, eps=eps)

    def f(x):
        with jax.default_matmul_precision("highest"):
            d = reconstruct(eps_fn, x, noises, schedule=schedule, steps=STEPS)
            score = score_map(x, d)
            return {"score": score, "mask": region(score, THRESHOLD)}

    return f


def check_exhaustive_on_grid(model, data, cfg):
    """The exhaustive test's Zset against detection on 400 points of its range.

    ``data`` is (x, x_ref, noises); ``cfg`` a DALConfig with search="exhaustive"
    (sigma 1). Any model :func:`sijax.dal_test` accepts. Returns the TestResult.
    """
    from sijax.detect.dal import dal_test, detect_region
    from sijax.selective.statistics import line_statistic

    x, x_ref, nz = data
    res = dal_test(model, x, x_ref, sigma=1.0, noises=nz, config=cfg)
    assert res.status == "ok" and res.mask.any()
    line = line_statistic(x, x_ref, res.mask, sigma=1.0)
    lo, hi = -10 - abs(res.stat), 10 + abs(res.stat)  # the exhaustive range
    assert res.searched_intervals[0][0] <= lo and res.searched_intervals[-1][1] >= hi
    step = (hi - lo) / 4000
    for z in np.linspace(lo + step, hi - step, 400):
        _, m = detect_region(model, line.a + line.b * z, nz, cfg)
        same = bool(np.array_equal(np.asarray(m), res.mask))
        inside = any(a <= z <= b for a, b in res.truncated_intervals)
        near_edge = any(abs(z - e) < step for iv in res.truncated_intervals for e in iv)
        assert same == inside or near_edge, z
    return res


def tiny_serving(detector: str, **options):
    """The committed tiny_8 U-Net (widths 4/8/16, float64) serving ``detector``.

    Its weights stand in for a random initialisation: building the network in
    memory with ``init_unet`` compiles an initialiser per weight shape (about 20 s
    of CPU), loading it takes under a second.
    """
    import dataclasses

    from sijax.checkpoint import ModelInfo, load_model

    base = load_model("tiny_8")
    cfg = dataclasses.replace(base.config, name=detector, detector=detector,
                              detector_options=tuple(options.items()))
    return base.replace(config=cfg, info=ModelInfo())


def planted_example(model, shape=(8, 8, 1)):
    """Image with a planted square, reference, noises, and a threshold that
    detects a region (the 80% quantile of the score map)."""
    import sijax
    from sijax.detect.dal import DALConfig, detect_region

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    x[2:5, 3:6] += 3.0
    x_ref = rng.standard_normal(shape)
    nz = sijax.draw_noises(jax.random.key(7), model)
    score, _ = detect_region(model, x, nz, DALConfig(threshold=0.0))
    threshold = float(np.quantile(np.asarray(score), 0.8))
    return x, x_ref, nz, threshold
