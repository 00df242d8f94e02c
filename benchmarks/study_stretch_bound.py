"""Study (issue 6 item 4): can a cheap sound bound decide stretches? (not a test)

The "Search order" study measured the payoff of a certificate that the region differs
from the observed one over a whole stretch: about 6x fewer pieces in the precision
search. This study builds the cheapest bound that keeps the line's own correlation and
measures how long the stretches are that it certifies on the trained checkpoints.

The bound ("symbolic interval", DeepZ with the error terms of all relaxed units merged
into one box per value): on the stretch z = z0 + t w, t in [0, 1], every value of the
pipeline is held as ``c + g t + [-r, r]`` (elementwise arrays c, g, r >= 0). Linear maps
carry c and g exactly and r through their absolute coefficients (|W| for products and
convolutions); a ReLU whose bounds straddle 0 is replaced by its chord relaxation
(lambda = hi / (hi - lo), DeepZ's parallelogram); a ReLU on one side is exact.
So a bound costs three columns (c, g, r) through the network, about three forward
passes, against one forward pass per piece for propagation: it pays when the
certified stretch holds more than about three pieces. Rounding is ignored (a study:
the margins compared are > 1e-6).

For start points z0 along the bundled example's DAL line where the region differs from
the observed one, the study doubles and bisects w to the longest stretch [z0, z0 + w] on
which some pixel is certainly on the wrong side of the threshold, and counts the exact
pieces in it (walking) and the pieces until that pixel really crosses (the ideal).

    python benchmarks/study_stretch_bound.py --size 16 --starts 8
"""

import argparse
import json
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

from sijax.tracking.control import CALLS, sub_jaxpr  # noqa: E402
from sijax.tracking.rules import LINEAR, bind, reduce_windows, with_operands  # noqa: E402


class Box:
    """c + g t + [-r, r] for t in [0, 1] (elementwise)."""

    def __init__(self, c, g, r):
        self.c, self.g, self.r = c, g, r

    @property
    def lo(self):
        return self.c + jnp.minimum(self.g, 0) - self.r

    @property
    def hi(self):
        return self.c + jnp.maximum(self.g, 0) + self.r


def _is_box(x) -> bool:
    return isinstance(x, Box)


def _read(env, v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]


def _linear(eqn, invals):
    """c exactly, g and r through the tangent map (r through |coefficients|)."""
    idx = [i for i, x in enumerate(invals) if _is_box(x)]
    fun = with_operands(eqn, invals, idx)

    cs = tuple(invals[i].c for i in idx)
    gs = tuple(invals[i].g for i in idx)
    outs_c, outs_g = jax.jvp(fun, cs, gs)
    rs = [jnp.zeros_like(o) for o in outs_c]
    for k, i in enumerate(idx):
        tang = tuple(invals[i].r if j == k else jnp.zeros_like(invals[i2].c)
                     for j, i2 in enumerate(idx))  # fmt: skip
        _, outs_r = jax.jvp(fun, cs, tang)
        # Every LINEAR primitive maps each output from one input with coefficient +-1
        # or sums with coefficients >= 0, so |T_i r_i| = |T_i| r_i.
        rs = [acc + jnp.abs(o) for acc, o in zip(rs, outs_r, strict=True)]
    return [Box(c, g, r) for c, g, r in zip(outs_c, outs_g, rs, strict=True)]


def _product(eqn, invals):
    """mul / dot_general / conv with exactly one line-dependent operand."""
    i = [k for k, x in enumerate(invals) if _is_box(x)]
    if len(i) != 1:
        raise NotImplementedError(f"{eqn.primitive.name} of two boxes")
    i = i[0]
    args = list(invals)

    def with_(x, absolute):
        a = list(args)
        a[i] = x
        if absolute:
            a[1 - i] = jnp.abs(a[1 - i])
        return bind(eqn, a)[0]

    x = invals[i]
    if eqn.primitive.name == "mul":
        # c k exactly; g k; r |k| (the constant may broadcast).
        return [Box(with_(x.c, False), with_(x.g, False), with_(x.r, True))]
    return [Box(with_(x.c, False), with_(x.g, False), with_(x.r, True))]


def _relu_box(u: Box) -> Box:
    lo, hi = u.lo, u.hi
    on = lo >= 0
    off = hi <= 0
    lam = jnp.where(on | off, 0.0, hi / jnp.where(on | off, 1.0, hi - lo))
    mu = -lam * lo / 2
    c = jnp.where(on, u.c, jnp.where(off, 0.0, lam * u.c + mu))
    g = jnp.where(on, u.g, jnp.where(off, 0.0, lam * u.g))
    r = jnp.where(on, u.r, jnp.where(off, 0.0, lam * u.r + mu))
    return Box(c, g, r)


def _as_box(x, like):
    if _is_box(x):
        return x
    c = jnp.broadcast_to(jnp.asarray(x, like.c.dtype), like.c.shape)
    return Box(c, jnp.zeros_like(c), jnp.zeros_like(c))


def _max(eqn, invals):
    x, y = invals
    box = x if _is_box(x) else y
    x, y = _as_box(x, box), _as_box(y, box)
    shape = jnp.broadcast_shapes(x.c.shape, y.c.shape)
    x = Box(*(jnp.broadcast_to(v, shape) for v in (x.c, x.g, x.r)))
    y = Box(*(jnp.broadcast_to(v, shape) for v in (y.c, y.g, y.r)))
    d = _relu_box(Box(x.c - y.c, x.g - y.g, x.r + y.r))  # max = y + relu(x - y)
    return [Box(y.c + d.c, y.g + d.g, y.r + d.r)]


def _abs(eqn, invals):
    (x,) = invals
    lo, hi = x.lo, x.hi
    pos, neg = lo >= 0, hi <= 0
    top = jnp.maximum(-lo, hi)
    c = jnp.where(pos, x.c, jnp.where(neg, -x.c, top / 2))
    g = jnp.where(pos, x.g, jnp.where(neg, -x.g, 0.0))
    r = jnp.where(pos | neg, x.r, top / 2)
    return [Box(c, g, r)]


def _reduce_window(eqn, invals):
    x, init = invals
    body = eqn.params["jaxpr"]
    ops = [e.primitive.name for e in getattr(body, "jaxpr", body).eqns]
    if ops != ["add"]:
        raise NotImplementedError(f"reduce_window {ops}")
    init = jnp.asarray(init, x.c.dtype)
    return [Box(jnp.sum(reduce_windows(x.c, init, eqn.params), -1) + init,
                jnp.sum(reduce_windows(x.g, 0.0, eqn.params), -1),
                jnp.sum(reduce_windows(x.r, 0.0, eqn.params), -1))]  # fmt: skip


def _div(eqn, invals):
    x, k = invals
    if _is_box(k):
        raise NotImplementedError("division by a box")
    return [Box(x.c / k, x.g / k, x.r / jnp.abs(k))]


def _scan(eqn, invals, run):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    if any(_is_box(x) for x in xs) or p["reverse"]:
        raise NotImplementedError("scan over line-dependent xs or in reverse")
    ys_all = []
    for k in range(p["length"]):
        outs = run(p["jaxpr"], [*consts, *carry, *(x[k] for x in xs)])
        carry, ys = outs[:nk], outs[nk:]
        ys_all.append(ys)
    stacked = []
    for j in range(len(eqn.outvars) - nk):
        col = [ys[j] for ys in ys_all]
        if any(_is_box(v) for v in col):
            raise NotImplementedError("line-dependent scan outputs")
        stacked.append(jnp.stack(col))
    return [*carry, *stacked]


def run_jaxpr(closed, args):
    jaxpr = getattr(closed, "jaxpr", closed)
    consts = getattr(closed, "consts", [])
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(map(_is_box, invals)):
            outs = bind(eqn, invals)
        elif name in CALLS:
            outs = run_jaxpr(sub_jaxpr(eqn), invals)
        elif name == "scan":
            outs = _scan(eqn, invals, run_jaxpr)
        elif name in ("sub", "neg") or name in LINEAR:
            outs = _linear(eqn, invals)
        elif name in ("mul", "dot_general", "conv_general_dilated"):
            outs = _product(eqn, invals)
        elif name == "max":
            outs = _max(eqn, invals)
        elif name == "abs":
            outs = _abs(eqn, invals)
        elif name == "div":
            outs = _div(eqn, invals)
        elif name == "reduce_window":
            outs = _reduce_window(eqn, invals)
        elif name == "convert_element_type":
            outs = [invals[0]]
        else:
            raise NotImplementedError(f"no box rule for {name}")
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_read(env, v) for v in jaxpr.outvars]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--half-width", type=float, default=4.0)
    args = ap.parse_args()

    from bench_propagate import _pipeline

    from sijax import DALConfig, draw_noises, load_model
    from sijax.detect.score import score_map
    from sijax.tracking import enumerate_pieces

    size = args.size
    _, a, b, z_obs, mask = _pipeline(size)
    model = load_model(f"dal_v5_{size}")
    config = DALConfig()
    lam = config.threshold
    noises = draw_noises(jax.random.key(0), model.image_shape, config)

    def score(x):
        with jax.default_matmul_precision("highest"):
            rec = model.reconstruction(x, noises, steps=config.steps, eta=config.eta)
            return score_map(x, rec, filter_size=config.filter_size)

    closed = jax.make_jaxpr(score)(a)
    mask = np.asarray(mask)

    @jax.jit
    def bound(z0, w):
        (out,) = run_jaxpr(closed, [Box(a + b * z0, b * w, jnp.zeros_like(a))])
        return out.lo, out.hi

    score_at = jax.jit(lambda z: score(a + b * z))

    def certified(z0, w):
        lo, hi = (np.asarray(v) for v in bound(z0, w))
        wrong = np.where(mask, hi <= lam, lo > lam)
        return bool(wrong.any())

    def pieces_in(z0, z1):
        p = jax.jit(lambda a, b: enumerate_pieces(
            score, a, b, z0, z1, max_pieces=4096,
            summary=lambda o: (o.alpha, o.beta)))(a, b)  # fmt: skip
        k = int(p.count)
        return k, np.asarray(p.summary[0][:k]), np.asarray(p.summary[1][:k]), \
            np.asarray(p.lo[:k]), np.asarray(p.hi[:k])

    t0 = time.perf_counter()
    jax.block_until_ready(bound(z_obs, 1e-3))
    print(f"bound compiled in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    jax.block_until_ready(bound(z_obs, 1e-3))
    print(f"one bound: {time.perf_counter() - t0:.3f} s")
    # Soundness on samples: the exact score lies inside the bound.
    for w in (1e-3, 0.1, 1.0):
        lo, hi = (np.asarray(v) for v in bound(z_obs, w))
        for t in np.linspace(0, 1, 9):
            s = np.asarray(score_at(z_obs + t * w))
            assert np.all(lo <= s + 1e-9) and np.all(s <= hi + 1e-9), (w, t)
        print(f"w={w}: bound width median {np.median(hi - lo):.3g}, "
              f"max {np.max(hi - lo):.3g}; exact samples inside")

    rows = []
    starts = np.linspace(z_obs - args.half_width, z_obs + args.half_width, args.starts)
    for z0 in starts:
        s0 = np.asarray(score_at(z0))
        if np.array_equal(s0 > lam, mask):
            rows.append(dict(z0=float(z0), region="observed"))
            print(json.dumps(rows[-1]))
            continue
        w, ok = 1e-4, 0.0
        if not certified(z0, w):
            rows.append(dict(z0=float(z0), certified_w=0.0))
            print(json.dumps(rows[-1]))
            continue
        while certified(z0, 2 * w) and w < 8:
            w *= 2
        lo_w, hi_w = w, 2 * w
        for _ in range(8):
            mid = (lo_w + hi_w) / 2
            lo_w, hi_w = (mid, hi_w) if certified(z0, mid) else (lo_w, mid)
        ok = lo_w
        # Exact pieces in the certified stretch, and the ideal: the pieces until the
        # region would first equal the observed one.
        k, alpha, beta, plo, phi = pieces_in(z0, z0 + max(4 * ok, 0.5))
        inside = int(np.sum(plo < z0 + ok))
        mid = 0.5 * (plo + phi)
        same = [np.array_equal((alpha[j] + beta[j] * mid[j]) > lam, mask)
                for j in range(k)]  # fmt: skip
        first_same = next((j for j, s in enumerate(same) if s), None)
        rows.append(dict(z0=float(z0), certified_w=ok, pieces_certified=inside,
                         pieces_enumerated=k, first_observed_piece=first_same,
                         enumerated_to=float(phi[-1])))  # fmt: skip
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
