"""Study (issue 6 item 4): would another search order need fewer pieces? (not a test)

The "parametric" search grows the searched stretch [L, R] from the piece at z_obs one
piece at a time, on the side whose end has the larger N(0, 1) density (sicore's order),
until sup_p - inf_p < precision. This enumerates the exact pieces of the DAL line
once on [min(z_obs, 0) - w, max(z_obs, 0) + w] (breakpoint propagation, with each
piece's "region == observed" flag), then replays the precision search offline under
three orders:

- "density": sicore's (must reproduce the piece count of the real search);
- "bottleneck": the side whose unsearched mass, were it gone, leaves the narrower
  [inf_p, sup_p];
- "gradient": the larger density times the rate at which that side's unsearched
  mass widens [inf_p, sup_p].

It also counts the pieces inside and outside Zset among those the search needs.
A replay that runs off the enumerated stretch prints None (widen --half-width).

    python benchmarks/study_search_order.py --size 16
    python benchmarks/study_search_order.py --workdir DIR --image 1   # vs_si4onnx.py's
"""

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402

import sijax  # noqa: E402
from sijax.detect import dal  # noqa: E402
from sijax.detect.score import score_map  # noqa: E402
from sijax.selective.pvalues import bounds_from_log_masses  # noqa: E402
from sijax.tracking.propagate import enumerate_line  # noqa: E402

ORDERS = ("density", "bottleneck", "gradient")


def line_pieces(model, x, x_ref, noises, cfg, half_width):
    """The exact pieces on [min(z_obs, 0) - w, max(z_obs, 0) + w] (w: half_width):
    dict of z (breakpoints), accept (region == observed, per piece), z0 (z_obs),
    wrong (K, pixels: status on piece k differs from the observed region's), score
    (K, pixels: the score map at the piece's midpoint), mask (observed, flat) and
    direct (pixels: |filter(b)|, the slope of the score's x part along the line)."""
    static, nums = dal.split_config(cfg)
    _, _, mask, line = dal.observed_line(
        model, x, x_ref, sigma=1.0, noises=noises, config=cfg
    )
    z0 = float(line.z_obs)

    def f(params, x):  # (score, mask): the pieces of the mask, scores at midpoints
        model, noises, threshold = params
        return dal.detector(model, noises, static, threshold)(x)[1:]

    p = enumerate_line(
        f, line.a, line.b, min(z0, 0.0) - half_width, max(z0, 0.0) + half_width,
        params=(model, noises, nums.threshold),
        summary=lambda out: ((out[1] != mask).reshape(-1), out[0].reshape(-1)),
        all_fingerprints=False,
    )  # fmt: skip
    wrong = np.asarray(p.summary[0], bool)
    direct = score_map(line.b, jnp.zeros_like(line.b), filter_size=static.filter_size)
    return dict(
        z=p.z, accept=~wrong.any(axis=1), z0=z0, wrong=wrong,
        score=np.asarray(p.summary[1]), mask=np.asarray(mask).reshape(-1),
        direct=np.asarray(direct).reshape(-1),
    )  # fmt: skip


def certified_runs(d, lo, hi, threshold):
    """The out-of-Zset pieces among lo..hi-1 in the fewest runs of consecutive
    pieces that share one wrong pixel (greedy from the left, optimal for runs): what
    a perfect "the region differs here" certificate would leave, one run each. Per
    run: the pixel wrong throughout it, its smallest distance to the threshold (at
    the pieces' midpoints), the largest slope of its score between neighbouring
    midpoints and the slope of the score's x part (|filter(b)|): how much room a
    bound of the reconstruction's change at that pixel would have."""
    z, acc, wrong, score = d["z"], d["accept"], d["wrong"], d["score"]
    mid = 0.5 * (z[:-1] + z[1:])
    out, start, common = [], None, None

    def close(end):
        px = int(np.argmax(np.min(np.abs(score[start:end] - threshold), axis=0)
                           * common))  # fmt: skip
        s, m = score[start:end, px], mid[start:end]
        slope = float(np.max(np.abs(np.diff(s) / np.diff(m)))) if end - start > 1 else 0
        out.append(dict(
            z=(round(float(z[start]), 3), round(float(z[end]), 3)),
            pieces=end - start, pixel=px, in_region=bool(d["mask"][px]),
            min_margin=round(float(np.min(np.abs(s - threshold))), 4),
            max_slope=round(slope, 3), direct_slope=round(float(d["direct"][px]), 3),
        ))  # fmt: skip

    for k in range(lo, hi):
        joint = None if acc[k] or common is None else common & wrong[k]
        if joint is not None and joint.any():  # the run goes on
            common = joint
            continue
        if common is not None:
            close(k)
        start, common = (None, None) if acc[k] else (k, wrong[k])
    if common is not None:
        close(hi)
    return out


def replay(z, accept, z0, order, precision, alternative="two-sided"):
    """Pieces the precision search needs under `order`, or None off the stretch."""
    bounds = jax.jit(lambda *m: bounds_from_log_masses(*m, alternative))

    def log(m):
        return np.log(m) if m > 0 else -np.inf

    def width(t_in, t_out, u_in, u_out):
        r = bounds(log(t_in), log(t_out), log(u_in), log(u_out))
        return float(r.sup_p - r.inf_p)

    k = int(np.searchsorted(z, z0, side="right") - 1)
    lo, hi = k, k + 1  # searched [z[lo], z[hi]]
    t = [0.0, 0.0]  # Zset mass below / above z_obs

    def add(i):
        if accept[i]:
            a, b = z[i], z[i + 1]
            t[0] += max(norm.cdf(min(b, z0)) - norm.cdf(a), 0.0)
            t[1] += max(norm.cdf(b) - norm.cdf(max(a, z0)), 0.0)

    add(k)
    n = 1
    while True:
        u_in, u_out = norm.cdf(z[lo]), norm.sf(z[hi])
        w = width(*t, u_in, u_out)
        if w < precision:
            inside = int(accept[lo:hi].sum())
            return dict(pieces=n, inside=inside, L=float(z[lo]), R=float(z[hi]))
        if lo == 0 or hi == len(z) - 1:
            return None
        if order == "density":
            left = norm.pdf(z[lo]) > norm.pdf(z[hi])
        elif order == "bottleneck":
            left = width(*t, 0.0, u_out) < width(*t, u_in, 0.0)
        else:
            e = 1e-9
            g_in = (w - width(*t, u_in * (1 - e), u_out)) / (e * u_in)
            g_out = (w - width(*t, u_in, u_out * (1 - e))) / (e * u_out)
            left = norm.pdf(z[lo]) * g_in > norm.pdf(z[hi]) * g_out
        if left:
            lo -= 1
            add(lo)
        else:
            add(hi)
            hi += 1
        n += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=16, help="bundled example, dal_v5_SIZE")
    ap.add_argument("--workdir", help="a vs_si4onnx.py workdir (its ONNX model)")
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--half-width", type=float, default=4.5)
    ap.add_argument("--precision", type=float, default=1e-3)
    args = ap.parse_args()
    if args.workdir:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import vs_si4onnx as V

        with np.load(os.path.join(args.workdir, "images.npz")) as f:
            x, x_ref = f["x"][args.image], f["x_ref"][args.image]
        size = x.shape[0]
        noises = V.load_noises(args.workdir)
        model = V.load_sijax_model(args.workdir, size, "onnx")
        threshold = V.SIJAX_THRESHOLD
    else:
        from sijax.data.examples import load_example

        model = sijax.load_model(f"dal_v5_{args.size}")
        x, x_ref = load_example(args.size)
        noises = sijax.draw_noises(jax.random.PRNGKey(0), model.image_shape)
        threshold = sijax.DALConfig().threshold
    cfg = sijax.DALConfig(
        termination="precision", precision=args.precision, alternative="two-sided",
        threshold=threshold, hypothesis="reference",
    )  # fmt: skip
    t0 = time.perf_counter()
    d = line_pieces(model, x, x_ref, noises, cfg, args.half_width)
    z, accept, z0 = d["z"], d["accept"], d["z0"]
    print(
        f"z_obs {z0:.6f}: {len(accept)} pieces on [{z[0]:.3f}, {z[-1]:.3f}]"
        f" ({time.perf_counter() - t0:.0f} s), {int(accept.sum())} in Zset"
    )
    for order in ORDERS:
        r = replay(z, accept, z0, order, args.precision)
        print(order, r)
        if r is not None:
            lo, hi = np.searchsorted(z, [r["L"], r["R"]])
            runs = certified_runs(d, int(lo), int(hi), threshold)
            print(
                f"  out-of-Zset pieces in {len(runs)} runs with one wrong pixel each:"
            )
            for run in runs:
                print("   ", run)


if __name__ == "__main__":
    main()
