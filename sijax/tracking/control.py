"""Rules for primitives that hold sub-jaxprs: calls, scan, cond, while.

Calls (jit, custom_jvp_call such as jax.nn.relu, custom_vjp_call, remat) are inlined:
the interpreter recurses into their jaxpr. Loops and conditionals stay loops and
conditionals in the traced program (`lax.scan`, `lax.while_loop`, `lax.switch`), so a
1000-step sampler costs one trace of its body. Their carry holds the piece state (lo,
hi, fingerprint) next to the (value, slope) of every line-dependent carry.

Which carries depend on the line is static (trace-time) information. A carry that starts
constant may become line-dependent after one step (an accumulator fed by x), so the set
is grown to a fixed point by tracing the body abstractly (`jax.eval_shape`) before the
real loop is built; constants that must join are promoted to `Lin(c, 0)`.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sijax.tracking.affine import Lin
from sijax.tracking.rules import Rule, is_lin


def flatten(vals: Sequence) -> list:
    """Interpreter values to a flat list of arrays (a Lin gives value then slope)."""
    out = []
    for x in vals:
        out.extend([x.value, x.slope] if is_lin(x) else [jnp.asarray(x)])
    return out


def unflatten(arrays: Sequence, flags: Sequence[bool]) -> list:
    """Inverse of `flatten` given which values are line-dependent."""
    it = iter(arrays)
    return [Lin(next(it), next(it)) if f else next(it) for f in flags]


def promote(x, want_lin: bool):
    """Makes a constant line-dependent (slope 0) when a loop carry requires it."""
    if want_lin and not is_lin(x):
        x = jnp.asarray(x)
        return Lin(x, jnp.zeros_like(x))
    return x


def flags_of(vals: Sequence) -> list[bool]:
    return [is_lin(x) for x in vals]


def _abstract(x) -> jax.ShapeDtypeStruct:
    x = jnp.asarray(x) if not hasattr(x, "shape") else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def sub_jaxpr(eqn):
    """The jaxpr a call equation (pjit, closed_call, custom_jvp/vjp, remat) runs."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise KeyError(f"no sub-jaxpr in {eqn.primitive.name}")  # pragma: no cover


class StepMemo(NamedTuple):
    """What `track_memo` keeps of one top-level scan, per step k (leading axis T).

    On the line t, the carry after step k is value + slope * (t - z[k]) for every t in
    [lo[k], hi[k]], the piece of all decisions up to and including step k.
    """

    z: jax.Array  # (T,) where the step was last evaluated
    lo: jax.Array  # (T,) prefix piece of steps 0..k (lo[k] is non-decreasing)
    hi: jax.Array  # (T,) (hi[k] is non-increasing)
    fp: jax.Array  # (T,) decision fingerprint after step k
    carry: list  # flat carry after step k, each (T, ...)
    ys: list  # flat per-step outputs, each (T, ...)

    @classmethod
    def empty(cls, shapes: "StepMemo") -> "StepMemo":
        """An entry of these shapes (ShapeDtypeStructs) in which no step is valid."""
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return zeros._replace(
            lo=jnp.full_like(zeros.lo, jnp.inf), hi=jnp.full_like(zeros.hi, -jnp.inf)
        )


def _shift(flat: list, flags: Sequence[bool], z_from, z_to) -> list:
    """Moves the (value, slope) pairs of a flat list from z_from to z_to."""
    out, it = [], iter(flat)
    for f in flags:
        if f:
            v, s = next(it), next(it)
            out.extend([v + s * (z_to - z_from).astype(v.dtype), s])
        else:
            out.append(next(it))
    return out


def _reusable_steps(ctx, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """How many leading cached units (steps, segments) still hold at (ctx.z, direction).

    lo, hi: (T,) the cached prefix pieces.

    Step k holds if z lies in its prefix piece and more than tau inside on the side of
    the direction (so that a fresh evaluation would take every sign the same way).
    """
    z, tau = ctx.z, ctx.tau
    inside = (lo <= z) & (z <= hi)
    margin = jnp.where(ctx.direction > 0, hi > z + tau, lo < z - tau)
    ok = (inside & margin).astype(jnp.int32)
    return jnp.sum(jnp.cumprod(ok))


def call_rule(ctx, eqn, invals) -> list:
    """jit / pjit / closed_call / custom_jvp_call / custom_vjp_call / remat: inline."""
    return ctx.eval(sub_jaxpr(eqn), invals)


def scan_rule(ctx, eqn, invals) -> list:
    """lax.scan: a scan over (value, slope) pairs whose carry also holds the piece."""
    p = eqn.params
    body = p["jaxpr"]
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts = invals[:n_consts]
    init = list(invals[n_consts : n_consts + n_carry])
    xs = invals[n_consts + n_carry :]
    xs_flags = flags_of(xs)
    record: dict = {}

    def step(carry, x_flat, carry_flags):
        state, carry_flat = carry
        child = ctx.child(state)
        carry_vals = unflatten(carry_flat, carry_flags)
        outs = child.eval(body, list(consts) + carry_vals + unflatten(x_flat, xs_flags))
        new, ys = outs[:n_carry], outs[n_carry:]
        record["carry"], record["ys"] = flags_of(new), flags_of(ys)
        new = [promote(c, f) for c, f in zip(new, carry_flags, strict=True)]
        return (child.state, flatten(new)), flatten(ys)

    carry_flags = flags_of(init)
    x_abstract = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in flatten(xs)]
    for _ in range(n_carry + 1):
        carry_in = [promote(c, f) for c, f in zip(init, carry_flags, strict=True)]
        abstract = jax.tree.map(_abstract, (ctx.state, flatten(carry_in)))
        jax.eval_shape(lambda c, x, f=carry_flags: step(c, x, f), abstract, x_abstract)
        grown = [a or b for a, b in zip(carry_flags, record["carry"], strict=True)]
        if grown == carry_flags:
            break
        carry_flags = grown

    init = [promote(c, f) for c, f in zip(init, carry_flags, strict=True)]
    memoising, cached = ctx.memo_entry()
    if memoising and not p["reverse"]:
        state, carry_flat, ys_flat = _memo_scan(
            ctx, p, step, carry_flags, record["ys"], init, xs, cached
        )
    else:
        (state, carry_flat), ys_flat = lax.scan(
            lambda c, x: step(c, x, carry_flags),
            (ctx.state, flatten(init)),
            flatten(xs),
            length=p["length"],
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
    ctx.set_state(state)
    return unflatten(carry_flat, carry_flags) + unflatten(ys_flat, record["ys"])


def _memo_scan(ctx, p, step, carry_flags, ys_flags, init, xs, cached):
    """The scan of `scan_rule` with the step memo (`sijax.tracking.track_memo`).

    Steps k < k* (those that still hold) are not evaluated: `lax.cond` takes their
    outputs from the memo, moved to z. The memo written back keeps the old entry of a
    reused step (no drift from repeated moves) and the fresh one of a computed step.
    Without a cached entry (`memo_init` tracing the shapes) every step is computed.
    """
    z = ctx.z
    k_star = 0 if cached is None else _reusable_steps(ctx, cached.lo, cached.hi)

    def body(c, x):
        x_flat, k, m = x
        state, carry_flat = c

        def compute(_):
            (st, new_flat), ys = step((state, carry_flat), x_flat, carry_flags)
            return (st, new_flat, ys), StepMemo(z, *st, new_flat, ys)

        def reuse(_):
            st = (jnp.maximum(state[0], m.lo), jnp.minimum(state[1], m.hi), m.fp)
            moved = (
                _shift(m.carry, carry_flags, m.z, z),
                _shift(m.ys, ys_flags, m.z, z),
            )
            return (st, *moved), m

        if m is None:
            (st, new_flat, ys), m_out = compute(None)
        else:
            (st, new_flat, ys), m_out = lax.cond(k < k_star, reuse, compute, None)
        return (st, new_flat), (ys, m_out)

    steps = jnp.arange(p["length"], dtype=jnp.int32)
    (state, carry_flat), (ys_flat, memo) = lax.scan(
        body,
        (ctx.state, flatten(init)),
        (flatten(xs), steps, cached),
        length=p["length"],
        unroll=p["unroll"],
    )
    ctx.memo_out.append(memo)
    return state, carry_flat, ys_flat


def cond_rule(ctx, eqn, invals) -> list:
    """lax.cond / switch: the branch index is an integer, constant on the piece."""
    index, ops = invals[0], invals[1:]
    ops_flags = flags_of(ops)
    branches = eqn.params["branches"]
    out_flags = [False] * len(eqn.outvars)

    def branch_fn(br, want):
        def fn(state, ops_flat):
            child = ctx.child(state)
            outs = child.eval(br, unflatten(ops_flat, ops_flags))
            for i, o in enumerate(outs):
                out_flags[i] = out_flags[i] or is_lin(o)
            outs = [promote(o, w) for o, w in zip(outs, want, strict=True)]
            return child.state, flatten(outs)

        return fn

    abstract = jax.tree.map(_abstract, (ctx.state, flatten(ops)))
    for br in branches:
        jax.eval_shape(branch_fn(br, [False] * len(out_flags)), *abstract)
    want = list(out_flags)
    fns = [branch_fn(br, want) for br in branches]
    state, outs_flat = lax.switch(index, fns, ctx.state, flatten(ops))
    ctx.set_state(state)
    return unflatten(outs_flat, want)


def while_rule(ctx, eqn, invals) -> list:
    """lax.while_loop; the predicate is re-evaluated inside the body so that a piece
    restricted by it (a line-dependent trip count) keeps its restriction."""
    p = eqn.params
    cond_j, body_j = p["cond_jaxpr"], p["body_jaxpr"]
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:nc], invals[nc : nc + nb]
    init = list(invals[nc + nb :])
    record: dict = {}

    def body(carry_vals, child):
        outs = child.eval(body_j, list(bconsts) + carry_vals)
        record["carry"] = flags_of(outs)
        return outs

    carry_flags = flags_of(init)
    for _ in range(len(init) + 1):
        carry_in = [promote(c, f) for c, f in zip(init, carry_flags, strict=True)]
        abstract = jax.tree.map(_abstract, (ctx.state, flatten(carry_in)))
        jax.eval_shape(
            lambda st, fl, f=carry_flags: body(unflatten(fl, f), ctx.child(st)),
            *abstract,
        )
        grown = [a or b for a, b in zip(carry_flags, record["carry"], strict=True)]
        if grown == carry_flags:
            break
        carry_flags = grown

    def loop_body(loop):
        _, state, flat = loop
        child = ctx.child(state)
        outs = body(unflatten(flat, carry_flags), child)
        outs = [promote(o, f) for o, f in zip(outs, carry_flags, strict=True)]
        (pred,) = child.eval(cond_j, list(cconsts) + outs)
        return jnp.asarray(pred), child.state, flatten(outs)

    init = [promote(c, f) for c, f in zip(init, carry_flags, strict=True)]
    (pred0,) = ctx.eval(cond_j, list(cconsts) + init)
    _, state, flat = lax.while_loop(
        lambda loop: loop[0], loop_body, (jnp.asarray(pred0), ctx.state, flatten(init))
    )
    ctx.set_state(state)
    return unflatten(flat, carry_flags)


CALLS = (
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
)  # fmt: skip

CONTROL_RULES: dict[str, Rule] = {name: call_rule for name in CALLS}
CONTROL_RULES.update({"scan": scan_rule, "cond": cond_rule, "while": while_rule})
