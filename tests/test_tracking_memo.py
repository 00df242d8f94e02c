"""The step memo (`track_memo`): skipping sampler steps gives the pieces of `track`.

Oracle: `track` itself, evaluated afresh at every query point. A walk over the v5-like
sampler of test_tracking_sampler, right then left and alternating between the two ends
(as the search's pi3 policy does), must give the same piece ends and affine forms, and
must actually skip steps (`track` itself is checked against a dense grid in
test_tracking_sampler); the DAL test with and without the memo is compared in
test_dal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import line_through
from test_tracking_sampler import v5_like_sampler

from sijax.tracking import interpreter, memo_init, track, track_memo
from sijax.tracking.control import _reusable_steps


def _sampler(flat=False):
    f, x_obs = v5_like_sampler(flat)
    a, b, z_obs = line_through(x_obs, 0)
    return f, a, b, float(z_obs)


def _same_piece(p, q):
    np.testing.assert_allclose(float(p.lo), float(q.lo), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(float(p.hi), float(q.hi), rtol=1e-11, atol=1e-11)
    for x, y in zip(jax.tree.leaves(p.out), jax.tree.leaves(q.out), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-9, atol=1e-9)


def _skippable(ctx, memo) -> int:
    """Leading units (scan steps, or segments of a flat program) reusable at ctx."""
    lo = jnp.concatenate([m.lo for m in memo])
    hi = jnp.concatenate([m.hi for m in memo])
    return int(_reusable_steps(ctx, lo, hi))


@pytest.mark.parametrize("flat", [False, True], ids=["scan", "flat"])
def test_memo_walk_equals_fresh_tracking(flat):
    """The scan's steps, or (flat: the steps unrolled) the program's segments."""
    f, a, b, z_obs = _sampler(flat)
    fresh = jax.jit(track(f))
    memo_fn = jax.jit(track_memo(f))

    class _At:  # the three numbers _reusable_steps reads from a tracking context
        def __init__(self, z, direction):
            self.z, self.direction = jnp.asarray(z), direction
            self.tau = 1e-10 * max(1.0, abs(z))

    # Alternate between the right and the left end, one memo per side (the search).
    memo = memo_init(f, a, b)
    first, memo = memo_fn(a, b, z_obs, 1, memo)
    _same_piece(first, fresh(a, b, z_obs, 1))
    ends = {1: float(first.hi), -1: float(first.lo)}
    memos = {1: memo, -1: memo}
    skipped = 0
    for i in range(40):
        d = 1 if i % 3 else -1
        z = ends[d]
        skipped += _skippable(_At(z, d), memos[d])
        p, memos[d] = memo_fn(a, b, z, d, memos[d])
        _same_piece(p, fresh(a, b, z, d))
        ends[d] = float(p.hi if d > 0 else p.lo)
    assert ends[1] > ends[-1]
    assert len(memo) == (interpreter.SEGMENTS if flat else 1)
    assert skipped > 0, "the walk should reuse some steps"


def test_empty_memo_reuses_nothing_and_a_foreign_point_recomputes():
    f, a, b, z_obs = _sampler()
    memo_fn = jax.jit(track_memo(f))
    p, memo = memo_fn(a, b, z_obs, 1, memo_init(f, a, b))
    # A point far outside every cached piece: nothing may be taken from the memo.
    far = float(p.hi) + 50.0
    _same_piece(memo_fn(a, b, far, 1, memo)[0], jax.jit(track(f))(a, b, far, 1))
