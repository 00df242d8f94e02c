"""Rules of the piecewise equations (max, abs, sign, comparisons, reductions,
windows) and the linear checks."""

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sijax.tracking.propagate.context import Line
from sijax.tracking.propagate.segments import (
    difference_has,
    difference_roots,
    envelope_kinks,
    fp_add,
    midpoint,
    sign_fp,
    spread,
    take_rows,
)
from sijax.tracking.propagate.timing import tick
from sijax.tracking.propagate.values import is_pv
from sijax.tracking.rules import (
    bind,
    not_piecewise_linear,
    reduce_windows,
    to_last,
)


def side_values(invals, side: str) -> list:
    return [getattr(x, side) if is_pv(x) else x for x in invals]


_BATCHED: dict = {}
JIT_AFTER = 2  # calls of one equation run eagerly before it gets compiled


def _vmapped(eqn, invals):
    """`eqn` on a batch of points (axis 0 of line-dependent operands).

    The first `JIT_AFTER` calls of an equation trace `vmap` eagerly (~1 ms of Python
    per equation, but primitives compile once per shape for every program); later
    calls (scan iterations, windows, repeated lines) go through a `jit` compiled once
    per equation, operand kinds and bucket: one dispatch per equation.
    """
    axes = tuple(0 if is_pv(x) else None for x in invals)
    key = (id(eqn), axes)
    hit = _BATCHED.get(key)
    if hit is None or hit[0] is not eqn:  # keeps eqn alive, so its id stays unique
        fun = jax.vmap(lambda *xs: bind(eqn, xs), in_axes=axes)
        hit = _BATCHED[key] = [eqn, fun, 0]
    hit[2] += 1
    if hit[2] == JIT_AFTER + 1:
        hit[1] = jax.jit(hit[1])
    return hit[1]


def pointwise(line: Line, eqn, invals) -> list:
    """Applies the primitive at every point (to right and left values)."""
    pvs = [x for x in invals if is_pv(x)]
    affine = any(x.affine for x in pvs)
    fun = _vmapped(eqn, invals)
    right = fun(*side_values(invals, "right"))
    if all(x.continuous for x in pvs):
        left = right
    else:
        left = fun(*side_values(invals, "left"))
    return [
        line.new(r, lf, affine=affine and jnp.issubdtype(r.dtype, jnp.floating))
        for r, lf in zip(right, left, strict=True)
    ]


def segmentwise(line: Line, eqn, invals) -> list:
    """A piecewise-constant output (comparison, sign, argmax) from midpoint values."""
    mids = []
    for x in invals:
        if is_pv(x):
            mids.append(midpoint(x.right, x.left) if x.affine else x.right[:-1])
        else:
            mids.append(x)
    n = jnp.asarray(line.n)
    outs = []
    for seg in _vmapped(eqn, invals)(*mids):
        right, left = spread(seg, n)
        outs.append(line.new(right, left, affine=False))
    return outs


def broadcast(line: Line, x, shape, dtype) -> tuple:
    """(right, left) of an operand broadcast to (cap, *shape)."""
    if is_pv(x):
        full = (line.cap, *shape)
        r = jnp.broadcast_to(x.right, full)
        return r, (r if x.continuous else jnp.broadcast_to(x.left, full))
    v = jnp.broadcast_to(jnp.asarray(x, dtype), (line.cap, *shape))
    return v, v


def _lead(line: Line, x, ndim: int) -> tuple:
    """(right, left) with a leading point axis (of size 1 for a constant)."""
    if is_pv(x):
        return x.right, x.left
    # On the host: a small eager device op here would queue behind running work.
    v = np.asarray(x, line.dtype)
    v = v.reshape((1,) * (ndim + 1)) if v.ndim == 0 else v[None]
    return v, v


def _pair_roots(line: Line, x, y, ndim: int):
    """A root finder (see `Line.insert_roots`) of x - y."""
    args = (line.z_dev, line.n, *_lead(line, x, ndim), *_lead(line, y, ndim))
    has, count = difference_has(*args)
    return has, count, partial(difference_roots, *args)


def elementwise_rule(pairs, discrete: bool):
    """A rule whose decisions are the signs of `pairs(invals)` = [(x, y), ...]."""

    def rule(line: Line, eqn, invals) -> list:
        event = line.event(eqn)
        ndim = len(eqn.outvars[0].aval.shape)
        t0 = time.perf_counter()
        line.insert_roots(
            [_pair_roots(line, x, y, ndim) for x, y in pairs(invals)], event
        )
        t0 = tick("insert", t0, line.fp)
        for x, y in pairs(invals):  # after insertion: the values are updated in place
            args = (*_lead(line, x, ndim), *_lead(line, y, ndim))
            line.fp = sign_fp(line.fp, event, line.n, *args, ends=line.ends_only)
        t0 = tick("fingerprint", t0, line.fp)
        out = (segmentwise if discrete else pointwise)(line, eqn, invals)
        tick("apply", t0, [o.right for o in out])
        return out

    return rule


def envelope_rule(entries, discrete: bool):
    """reduce_max-like rules: `entries(line, eqn, invals)` gives (right, left) arrays
    (cap, M, W) of the candidates (negated for a min)."""

    def rule(line: Line, eqn, invals) -> list:
        event = line.event(eqn)
        while True:  # one kink per segment and element per round
            r, lf = entries(line, eqn, invals)
            t, has, count = envelope_kinks(line.z_dev, line.n, r, lf)
            if not line.insert_roots([(has, count, partial(take_rows, t))], event):
                break
        r, lf = entries(line, eqn, invals)
        win = jnp.argmax(midpoint(r, lf), axis=-1)
        line.fp = fp_add(line.fp, win, event)
        return (segmentwise if discrete else pointwise)(line, eqn, invals)

    return rule


def both(x, fun):
    r = fun(x.right)
    return r, (r if x.continuous else fun(x.left))


def reduce_entries(line, eqn, invals):
    (x,) = invals
    sign = -1 if eqn.primitive.name in ("reduce_min", "argmin") else 1
    axes = tuple(eqn.params["axes"])
    r, lf = both(x, jax.vmap(lambda v: to_last(v, axes)))
    return _flat_entries(sign * r), _flat_entries(sign * lf)


def _flat_entries(e):
    return e.reshape(e.shape[0], -1, e.shape[-1])


def _window_entries(line, eqn, invals):
    x = invals[0]
    name = eqn.primitive.name
    if name == "reduce_window":
        init = jnp.asarray(invals[1], line.dtype)
        ops = _window_ops(eqn)
        sign = -1 if ops == ["min"] else 1
    else:
        sign = -1 if name == "reduce_window_min" else 1
        init = None
    fill = init if init is not None else (jnp.inf if sign < 0 else -jnp.inf)

    def windows(v):
        e = reduce_windows(v, fill, eqn.params)
        if init is not None:  # the initial value is one more (constant) entry
            e = jnp.concatenate([e, jnp.broadcast_to(init, e.shape[:-1] + (1,))], -1)
        return e

    r, lf = both(x, jax.vmap(windows))
    return _flat_entries(sign * r), _flat_entries(sign * lf)


def _window_ops(eqn) -> list[str]:
    body = eqn.params["jaxpr"]
    body = getattr(body, "jaxpr", body)
    return [e.primitive.name for e in body.eqns]


reduce_window_max = envelope_rule(_window_entries, discrete=False)


def reduce_window_rule(line: Line, eqn, invals) -> list:
    """Generic reduce_window (non-literal init): a single add, max or min."""
    ops = _window_ops(eqn)
    if len(invals) != 2 or ops not in (["add"], ["max"], ["min"]):
        line.fail(eqn, f"a window reduction by {ops} is not supported")
    if is_pv(invals[1]):
        line.fail(eqn, "its initial value depends on the line")
    if ops == ["add"]:
        return pointwise(line, eqn, invals)
    return reduce_window_max(line, eqn, invals)


# ------------------------------------------------------------------ linear checks


def linear_rule(line, eqn, invals) -> list:
    return pointwise(line, eqn, invals)


def _refuse(line, eqn, invals) -> None:
    """Fails where `rules.not_piecewise_linear` says so (affine operands vary)."""
    why = not_piecewise_linear(eqn, [is_pv(x) and x.affine for x in invals])
    if why:
        line.fail(eqn, why)


def checked_rule(line, eqn, invals) -> list:
    """mul, dot, conv, div, convert: applied pointwise where piecewise linear."""
    _refuse(line, eqn, invals)
    return pointwise(line, eqn, invals)


def integer_pow_rule(line, eqn, invals) -> list:
    _refuse(line, eqn, invals)
    return list(invals)


def identity_rule(line, eqn, invals) -> list:
    return list(invals)
