"""Every linear piece of f along a line by batched breakpoint propagation ("ExactLine").

Tracking notes, section 2(b); Sotoudeh and Thakur, "Computing linear restrictions of
neural networks", NeurIPS 2019. Instead of walking the line piece by piece (one
value-and-slope pass per piece, `search.enumerate_pieces`), f's jaxpr is evaluated once
on a sorted batch of points z_0 < ... < z_K of the stretch, with the invariant that
every value computed so far is affine on each segment [z_k, z_{k+1}]:

  * a linear equation (add, dot, conv, reshape, ...) runs once on the whole batch of
    points (`jax.vmap` of the primitive: one large matrix product or convolution);
  * at a piecewise equation (max, min, clamp, abs, sign, comparisons, reduce_max,
    argmax, max pooling) the points where its decision changes inside a segment are
    found as linear roots between neighbours, inserted, and every still-live value is
    obtained at the new points by linear interpolation between the neighbours (exact:
    all of them are affine there); then the primitive is applied. The interpolation
    is lazy: a value is brought to the current points when it is next read, in one
    gather from the points it was computed at, however many insertions came between.

No slopes are carried and no point is evaluated twice. The evaluator is host-driven:
consecutive equations that need no new point are fused into one compiled run
(`evaluator._plan_run`), piecewise equations are handled one by one with a host sync
to fetch their roots. The point axis is padded to a power of two (at least `MIN_CAP`)
so that each run compiles once per buffer size, not once per point count.

Values. A line-dependent value holds, at every point, its limit from the right
(`right`, the affine form of the segment that starts there) and from the left (`left`,
the segment that ends there). For a continuous value (everything a ReLU network
computes) both are the same array, computed once. Discontinuities come from a
line-dependent `select_n` predicate or a piecewise-constant factor (`h * sign(u)`);
such values keep both arrays, and everything downstream costs two evaluations.
Booleans, integers and `sign` outputs are piecewise constant: their value on segment k
is `right[k] == left[k + 1]`; a product of such a value with an affine one is fine, a
product of two affine values raises `NotPiecewiseLinearError`, as in the walking
tracker (whose classification of primitives, `rules.LINEAR` and the call table of
`control`, is reused here).

Decisions on a segment are taken at its midpoint; a breakpoint is a strict sign change
of an argument between the right value at z_k and the left value at z_{k+1}.

Near-ties. A root closer than tau = tie_tol * max(1, |t|) to a point already in the
batch (or to a root accepted just before it, scanning left to right) is not inserted,
as the walking tracker never returns a piece shorter than its tie tolerance. Values on
such a segment are then off by at most tau * |slope| (1e-10 relative by default), and a
breakpoint may sit up to tau from where walking puts it. Pieces shorter than tau at the
very ends of the stretch (a root within tau of z_min or z_max) are merged here; walking
may keep them.

Windows. Memory is points x live intermediates. When a stretch needs more than
`max_points` points it is split in half and each half enumerated on its own; a window
boundary that falls inside a piece is removed afterwards (the fingerprints of all
decisions on both sides agree), so the pieces do not depend on the windows.

Control flow: calls (pjit, closed_call, custom_jvp_call such as jax.nn.relu,
custom_vjp_call, remat) are inlined; `scan` and `while` are unrolled on the host (a new
point created in an iteration interpolates the carry, the stacked outputs so far and
every live outer value); `cond` and `while` need a line-independent predicate. Not
jittable: the result has a data-dependent size (host numpy arrays).

The modules, one section each: ``values`` (the point buffer, line-dependent values,
:class:`LinePieces`), ``segments`` (jitted helpers on segments), ``context`` (one
line's points and live values), ``pointwise`` and ``control_flow`` (the rules),
``table`` (the rule per primitive), ``evaluator`` (fused runs), ``driver``
(:func:`enumerate_line`, :class:`LineCache`), ``timing`` (benchmark profile).
"""

from sijax.errors import LineDependentControlError
from sijax.tracking.propagate.driver import (
    LineCache,
    enumerate_line,
    join_pieces,
    split_stretch,
)
from sijax.tracking.propagate.values import ENDS, MIN_CAP, WINDOW, LinePieces

__all__ = [
    "ENDS",
    "MIN_CAP",
    "WINDOW",
    "LineCache",
    "LineDependentControlError",
    "LinePieces",
    "enumerate_line",
    "join_pieces",
    "split_stretch",
]
