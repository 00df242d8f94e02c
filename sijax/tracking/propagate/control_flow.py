"""Rules of calls, scan, cond and while (unrolled on the host)."""

import jax.numpy as jnp

from sijax.errors import (
    LineDependentControlError,
)
from sijax.tracking.control import sub_jaxpr
from sijax.tracking.propagate.context import Line
from sijax.tracking.propagate.pointwise import both, broadcast
from sijax.tracking.propagate.values import is_pv


def call_rule(line, eqn, invals) -> list:
    return line.eval(sub_jaxpr(eqn), invals)


def _index(line: Line, x, i: int):
    """x[i] along the scanned axis (axis 1 of a line-dependent value)."""
    if not is_pv(x):
        return x[i]
    r, lf = both(x, lambda v: v[:, i])
    return line.new(r, lf, affine=x.affine)


def _stack(line: Line, values: list, aval):
    """Stacks one output over the iterations of a scan (axis 1 for the points)."""
    if not any(map(is_pv, values)):
        return jnp.stack([jnp.asarray(v) for v in values])
    pvs = [v for v in values if is_pv(v)]
    affine = any(v.affine for v in pvs)
    shape = aval.shape[1:]
    pairs = [broadcast(line, v, shape, aval.dtype) for v in values]
    right = jnp.stack([p[0] for p in pairs], axis=1)
    if all(v.continuous for v in pvs):  # constants are continuous too
        return line.new(right, affine=affine)
    left = jnp.stack([p[1] for p in pairs], axis=1)
    return line.new(right, left, affine=affine)


def scan_rule(line: Line, eqn, invals) -> list:
    """lax.scan, unrolled on the host: every iteration runs on the whole batch."""
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    consts = list(invals[:n_consts])
    carry = list(invals[n_consts : n_consts + n_carry])
    xs = list(invals[n_consts + n_carry :])
    steps = []
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    for i in order:
        line.path.append(f"scan[{i}]")
        try:
            x_i = [_index(line, x, i) for x in xs]
            outs = line.eval(p["jaxpr"], consts + carry + x_i)
        finally:
            line.path.pop()
        carry, ys = outs[:n_carry], outs[n_carry:]
        steps.append(ys)
    if p["reverse"]:
        steps.reverse()
    y_avals = [v.aval for v in eqn.outvars[n_carry:]]
    ys = [_stack(line, [s[j] for s in steps], aval) for j, aval in enumerate(y_avals)]
    return carry + ys


def cond_rule(line: Line, eqn, invals) -> list:
    index, ops = invals[0], invals[1:]
    if is_pv(index):
        line.fail(
            eqn,
            "its branch index depends on the line (use enumerate_pieces)",
            LineDependentControlError,
        )
    return line.eval(eqn.params["branches"][int(index)], list(ops))


def while_rule(line: Line, eqn, invals) -> list:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = list(invals[:nc]), list(invals[nc : nc + nb])
    carry = list(invals[nc + nb :])
    i = 0
    while True:
        (pred,) = line.eval(p["cond_jaxpr"], cconsts + carry)
        if is_pv(pred):
            line.fail(
                eqn,
                "its trip count depends on the line (use enumerate_pieces)",
                LineDependentControlError,
            )
        if not bool(pred):
            return carry
        line.path.append(f"while[{i}]")
        try:
            carry = line.eval(p["body_jaxpr"], bconsts + carry)
        finally:
            line.path.pop()
        i += 1
