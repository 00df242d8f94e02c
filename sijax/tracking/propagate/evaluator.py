"""The evaluator: equations run one by one, consecutive linear ones fused into one
compiled run."""

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from sijax.tracking.control import CALLS, sub_jaxpr
from sijax.tracking.propagate import timing
from sijax.tracking.propagate.context import Line
from sijax.tracking.propagate.pointwise import pointwise, side_values
from sijax.tracking.propagate.table import RULES
from sijax.tracking.propagate.timing import account
from sijax.tracking.propagate.values import is_pv
from sijax.tracking.rules import (
    LINEAR,
    bind,
)


class _Liveness(NamedTuple):
    dead: list  # per equation: the variables whose last use it is
    last: dict  # variable -> index of its last use (len(eqns) for outputs)


_LIVENESS: dict = {}


def _liveness(jaxpr) -> _Liveness:
    key = id(jaxpr)
    hit = _LIVENESS.get(key)
    if hit is not None and hit[0] is jaxpr:  # keeps jaxpr alive: ids stay unique
        return hit[1]
    last: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                last[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            last[v] = len(jaxpr.eqns)
    dead: list[list] = [[] for _ in jaxpr.eqns]
    for v, i in last.items():
        if i < len(jaxpr.eqns):
            dead[i].append(v)
    out = _Liveness(dead, last)
    _LIVENESS[key] = (jaxpr, out)
    return out


# ------------------------------------------------------------------- fused runs
#
# Consecutive equations that need no new point (linear ones, and anything on
# constants or piecewise-constant values only) run as one compiled function on the
# whole batch: XLA fuses them (a 3x3 convolution written as pad, nine slices, a
# concatenation and a matrix product becomes one pass), and each run costs one
# dispatch. Which equations qualify depends on which operands are line-dependent, so
# a run is planned symbolically from the kinds of the values in the environment.

CONST, DISCRETE, AFFINE = 0, 1, 2
_CONTROL = frozenset({"scan", "cond", "while"})
_NOT_IN_RUNS = frozenset({"debug_callback"})


def _kind_of(x) -> int:
    if not is_pv(x):
        return CONST
    return AFFINE if x.affine else DISCRETE


def _linear_ok(eqn, kinds: list[int]) -> bool:
    """Whether an equation with affine operands is affine (the checks of the rules)."""
    name = eqn.primitive.name
    if name in LINEAR or name in ("stop_gradient", "optimization_barrier"):
        return True
    if name in ("mul", "dot_general", "conv_general_dilated"):
        return sum(k == AFFINE for k in kinds) <= 1
    if name == "div":
        return kinds[1] != AFFINE
    if name == "convert_element_type":
        return jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)
    if name == "integer_pow":
        return eqn.params["y"] == 1
    return False


def _out_kinds(eqn, kinds: list[int]) -> list[int] | None:
    """Kinds of the outputs if the equation can join a run, else None."""
    name = eqn.primitive.name
    if name in _NOT_IN_RUNS:
        return None
    top = max(kinds, default=CONST)
    if top == CONST:
        return [CONST] * len(eqn.outvars)
    if top == DISCRETE:  # piecewise-constant operands: any primitive, pointwise
        return [DISCRETE] * len(eqn.outvars)
    if name in CALLS:
        sub = sub_jaxpr(eqn)
        sub = getattr(sub, "jaxpr", sub)
        outs = _plan_kinds(sub, [CONST] * len(sub.constvars) + kinds)
        # Under vmap every output of the call has the point axis.
        return None if outs is None else [max(k, DISCRETE) for k in outs]
    if name in _CONTROL or not _linear_ok(eqn, kinds):
        return None
    return [
        AFFINE if jnp.issubdtype(v.aval.dtype, jnp.floating) else DISCRETE
        for v in eqn.outvars
    ]


def _plan_kinds(jaxpr, in_kinds: list[int]) -> list[int] | None:
    """Output kinds of a whole (call) jaxpr if every equation can join a run."""
    kinds = dict(zip([*jaxpr.constvars, *jaxpr.invars], in_kinds, strict=True))
    for eqn in jaxpr.eqns:
        ks = [
            CONST if isinstance(v, jex_core.Literal) else kinds[v] for v in eqn.invars
        ]
        outs = _out_kinds(eqn, ks)
        if outs is None:
            return None
        kinds.update(zip(eqn.outvars, outs, strict=True))
    return [
        CONST if isinstance(v, jex_core.Literal) else kinds[v] for v in jaxpr.outvars
    ]


class _Run(NamedTuple):
    end: int  # equations [start, end) of the jaxpr
    in_vars: list
    out_vars: list
    out_kinds: list[int]
    fun: Callable  # jitted: arrays of in_vars -> arrays of out_vars
    looped: Callable  # jitted: (n, arrays) -> the same, a chunk of rows at a time
    chunk: int  # rows per step of `looped`


_RUNS: dict = {}


def _plan_run(jaxpr, start: int, env: dict, live: _Liveness) -> _Run | None:
    """The longest run of equations from `start` that needs no new point."""
    kinds: dict = {}
    in_vars: list = []
    end = start
    for eqn in jaxpr.eqns[start:]:
        ks = []
        for v in eqn.invars:
            if isinstance(v, jex_core.Literal):
                ks.append(CONST)
            elif v in kinds:
                ks.append(kinds[v])
            else:
                kinds[v] = _kind_of(env[v])
                in_vars.append(v)
                ks.append(kinds[v])
        outs = _out_kinds(eqn, ks)
        if outs is None:
            break
        kinds.update(zip(eqn.outvars, outs, strict=True))
        end += 1
    if end == start:
        return None
    key = (id(jaxpr), start, end, tuple(kinds[v] for v in in_vars))
    hit = _RUNS.get(key)
    if hit is not None and hit[0] is jaxpr:
        return hit[1]
    defined = [v for e in jaxpr.eqns[start:end] for v in e.outvars]
    out_vars = [v for v in defined if live.last.get(v, -1) >= end]
    eqns = jaxpr.eqns[start:end]
    in_batched = [kinds[v] != CONST for v in in_vars]

    def run(*args):
        tenv = dict(zip(in_vars, args, strict=True))
        batched = dict(zip(in_vars, in_batched, strict=True))
        for eqn in eqns:
            vals, axes = [], []
            for v in eqn.invars:
                if isinstance(v, jex_core.Literal):
                    vals.append(v.val)
                    axes.append(None)
                else:
                    vals.append(tenv[v])
                    axes.append(0 if batched[v] else None)
            if any(a is not None for a in axes):
                outs = jax.vmap(lambda *xs, e=eqn: bind(e, xs), in_axes=axes)(*vals)
            else:
                outs = bind(eqn, vals)
            b = any(a is not None for a in axes)
            for v, o in zip(eqn.outvars, outs, strict=True):
                tenv[v], batched[v] = o, b
        return [tenv[v] for v in out_vars]

    elements = max(
        (math.prod(v.aval.shape) for e in eqns for v in e.outvars), default=1
    )
    out_kinds = [kinds[v] for v in out_vars]
    chunk = _chunk_rows(elements)
    looped = _looped(run, in_batched, out_kinds, chunk)
    plan = _Run(end, in_vars, out_vars, out_kinds, jax.jit(run), jax.jit(looped),
                chunk)  # fmt: skip
    _RUNS[key] = (jaxpr, plan)
    return plan


# Rows per call of a fused run: about CHUNK_ELEMENTS elements of its largest value
# (2 MB in float64), a power of two from MIN_ROWS to MAX_ROWS. Measured per piece of
# the DAL test (decision search, 1000 / 400 pieces, one core) with the same number
# of rows in every run: 16x16 11.6 / 10.6 / 11.1 / 12.1 ms with 8 / 16 / 32 / 64
# rows, 32x32 38.7 / 40.0 / 44.3 / 52.6 ms; with this rule 10.1 and 40.1 ms.
CHUNK_ELEMENTS = 2**18
MIN_ROWS, MAX_ROWS = 8, 64


def _chunk_rows(elements: int) -> int:
    rows = 1 << max(0, (CHUNK_ELEMENTS // max(elements, 1)).bit_length() - 1)
    return max(MIN_ROWS, min(MAX_ROWS, rows))


def _looped(run: Callable, rows: list[bool], out_kinds: list[int], chunk: int):
    """`run` on the rows of the point buffer, `chunk` rows per step of one compiled
    loop: (n, *args) -> outputs, args with rows (`rows`) of a common length cap,
    a multiple of `chunk`.

    Rows are independent, so each step's intermediates stay in cache
    (`_chunk_rows`). Only the chunks holding the n points are computed; the padding
    rows after them repeat the last computed row (padding rows repeat the last
    point). One program per run and buffer size: the loop, the slicing and the
    joining are inside it, none of them dispatched from Python."""

    def looped(n, *args):
        cap = next(x.shape[0] for x, r in zip(args, rows, strict=True) if r)

        def step(i):
            return run(*[jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk) if r else x
                         for x, r in zip(args, rows, strict=True)])  # fmt: skip

        def put(outs, part, i):
            return [
                p if k == CONST
                else jax.lax.dynamic_update_slice_in_dim(o, p, i * chunk, 0)
                for o, p, k in zip(outs, part, out_kinds, strict=True)
            ]

        shapes = jax.eval_shape(step, 0)  # the run appears once in the program
        empty = [jnp.zeros(o.shape if k == CONST else (cap, *o.shape[1:]), o.dtype)
                 for o, k in zip(shapes, out_kinds, strict=True)]  # fmt: skip

        def body(i, outs):
            return put(outs, step(i), i)

        used = (n + chunk - 1) // chunk  # >= 1: a line has at least two points
        outs = jax.lax.fori_loop(0, used, body, empty)
        row = jnp.arange(cap)
        last = used * chunk - 1
        return [
            o if k == CONST else jnp.where(
                (row < used * chunk).reshape((cap,) + (1,) * (o.ndim - 1)), o, o[last])
            for o, k in zip(outs, out_kinds, strict=True)
        ]

    return looped


def _chunked(line: Line, plan: _Run, vals: list, side: str) -> list:
    """plan.fun on the rows of the point buffer (`_looped` when it has more rows
    than one chunk)."""
    args = side_values(vals, side)
    if line.cap <= plan.chunk:
        return plan.fun(*args)
    return plan.looped(np.int32(line.n), *args)


def _execute_run(line: Line, plan: _Run, env: dict) -> None:
    vals = [env[v] for v in plan.in_vars]
    pvs = [x for x in vals if is_pv(x)]
    if not pvs:
        right = plan.fun(*vals)
    else:
        right = _chunked(line, plan, vals, "right")
    if all(x.continuous for x in pvs):
        left = right
    else:
        left = _chunked(line, plan, vals, "left")
    for v, kind, r, lf in zip(plan.out_vars, plan.out_kinds, right, left, strict=True):
        env[v] = r if kind == CONST else line.new(r, lf, affine=kind == AFFINE)


def eval_jaxpr(line: Line, jaxpr, consts, args) -> list:
    """Interprets `jaxpr` on constants and line-dependent values (`PV`)."""
    env: dict = {}

    def read(var):
        if isinstance(var, jex_core.Literal):
            return var.val
        return env[var]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    live = _liveness(jaxpr)
    i, n_eqns = 0, len(jaxpr.eqns)
    while i < n_eqns:
        t0 = time.perf_counter() if timing.PROFILE is not None else 0.0
        plan = _plan_run(jaxpr, i, env, live)
        if plan is not None:
            _execute_run(line, plan, env)
            if timing.PROFILE is not None:
                account("runs", [env[v] for v in plan.out_vars], t0)
            for k in range(i, plan.end):
                for var in live.dead[k]:
                    env.pop(var, None)
            i = plan.end
            continue
        eqn = jaxpr.eqns[i]
        invals = [read(v) for v in eqn.invars]
        pvs = [x for x in invals if is_pv(x)]
        rule = RULES.get(eqn.primitive.name)
        if not any(x.affine for x in pvs) or rule is None:
            # Only a debug callback on non-affine operands, or no rule at all.
            if any(x.affine for x in pvs):
                line.fail(eqn, "it has a line-dependent operand and no tracking rule")
            outvals = pointwise(line, eqn, invals) if pvs else bind(eqn, invals)
        else:
            line.stack.append(eqn)
            try:
                outvals = rule(line, eqn, invals)
            finally:
                line.stack.pop()
        name = eqn.primitive.name
        if timing.PROFILE is not None and name not in CALLS and name not in _CONTROL:
            account(f"piecewise:{name}", outvals, t0)
        for var, val in zip(eqn.outvars, outvals, strict=True):
            env[var] = val
        del invals, pvs, outvals
        for var in live.dead[i]:
            env.pop(var, None)
        i += 1
    return [read(v) for v in jaxpr.outvars]
