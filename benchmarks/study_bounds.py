"""Study (issue 6 item 4): how many pieces could sound stretch bounds skip? (not a test)

Before building a bound that decides whole stretches of the line at once, measure what
the best bounds of two families could achieve on the real pipeline, from its exact
pieces:

- "true range": a stretch is decided when, for every pixel, the score's true minimum
  and maximum over the stretch lie on one side of the threshold (the ideal: no sound
  bound can do better);
- "true slope hull": the score is bounded by its value at the stretch's start plus
  [min slope, max slope] x (t - start), the slopes taken over the stretch's exact
  pieces; the tightest any derivative-interval (mean-value) bound could get.

A greedy left-to-right cover counts the stretches each needs; the ratio pieces /
stretches is the most such a bound could cut network evaluations (before the cost of
computing the bound). Pipeline and line as in bench_propagate.py: committed
`dal_v5_<size>`, 5 DDIM steps, 3x3 mean filter, abs, threshold 0.8, the bundled
example's DAL line on [z_obs - w, z_obs + w].

    python benchmarks/study_bounds.py --sizes 8 16 --write
"""

import argparse
import time

import jax
import numpy as np
from _readme import replace_section  # benchmarks/_readme.py
from bench_propagate import _pipeline

TITLE = "Fewer pieces: what stretch bounds could skip (issue 6 item 4)"


def score_pieces(size: int, half_width: float, cap: int) -> dict:
    """Exact pieces of the score map (affine per pixel) along the DAL line."""
    from sijax import DALConfig, draw_noises, load_model
    from sijax.detect.dal import detector
    from sijax.tracking import enumerate_pieces

    _, a, b, z_obs, mask = _pipeline(size)
    model = load_model(f"dal_v5_{size}")
    config = DALConfig()
    detect = detector(
        model, draw_noises(jax.random.key(0), model.image_shape, config), config
    )

    def score(x):
        with jax.default_matmul_precision("highest"):
            return detect(x)[1]

    def run(a, b):
        return enumerate_pieces(
            score,
            a,
            b,
            z_obs - half_width,
            z_obs + half_width,
            max_pieces=cap,
            summary=lambda o: (o.alpha, o.beta),
        )

    t0 = time.perf_counter()
    pieces = jax.block_until_ready(jax.jit(run)(a, b))
    k = int(pieces.count)
    if int(pieces.status) != 0:
        raise SystemExit(f"size {size}: the stretch needs more than {cap} pieces")
    return dict(
        lo=np.asarray(pieces.lo[:k]),
        hi=np.asarray(pieces.hi[:k]),
        alpha=np.asarray(pieces.summary[0][:k]).reshape(k, -1),
        beta=np.asarray(pieces.summary[1][:k]).reshape(k, -1),
        threshold=config.threshold,
        z_obs=z_obs,
        region=int(np.sum(mask)),
        seconds=time.perf_counter() - t0,
    )


def _decided_by_range(p, i, j) -> bool:
    """Pieces i..j: every pixel's true score range stays on one side of lambda."""
    ends = np.concatenate(
        [
            p["alpha"][i : j + 1] + p["beta"][i : j + 1] * p["lo"][i : j + 1, None],
            (p["alpha"][j] + p["beta"][j] * p["hi"][j])[None],
        ]
    )
    lam = p["threshold"]
    return bool(np.all((ends.min(0) > lam) | (ends.max(0) < lam)))


def _decided_by_slope_hull(p, i, j) -> bool:
    """Pieces i..j: start value + [min, max] slope x length stays on one side."""
    z0, z1 = p["lo"][i], p["hi"][j]
    v0 = p["alpha"][i] + p["beta"][i] * z0
    lower = v0 + np.minimum(0.0, p["beta"][i : j + 1].min(0) * (z1 - z0))
    upper = v0 + np.maximum(0.0, p["beta"][i : j + 1].max(0) * (z1 - z0))
    lam = p["threshold"]
    return bool(np.all((lower > lam) | (upper < lam)))


def greedy_cover(p, decided) -> list[int]:
    """Stretch lengths (in pieces) of a left-to-right cover; an undecided piece is
    its own stretch (it must be walked)."""
    k, i, lengths = len(p["lo"]), 0, []
    while i < k:
        j = i
        while j + 1 < k and decided(p, i, j + 1):
            j += 1
        lengths.append(j - i + 1)
        i = j + 1
    return lengths


def study(size: int, half_width: float, cap: int) -> dict:
    p = score_pieces(size, half_width, cap)
    mid = 0.5 * (p["lo"] + p["hi"])
    inside = (p["alpha"] + p["beta"] * mid[:, None]) > p["threshold"]
    margin = np.abs(p["alpha"] + p["beta"] * p["lo"][:, None] - p["threshold"]).min(1)
    row = dict(
        size=size,
        z_obs=p["z_obs"],
        half_width=half_width,
        region=p["region"],
        pieces=len(p["lo"]),
        seconds=p["seconds"],
        region_changes=int(np.sum(np.any(inside[1:] != inside[:-1], axis=1))),
        margin_median=float(np.median(margin)),
    )
    for name, fn in (("range", _decided_by_range), ("hull", _decided_by_slope_hull)):
        lengths = greedy_cover(p, fn)
        row[name] = dict(stretches=len(lengths), longest=max(lengths))
    return row


def _section(rows) -> str:
    lines = [
        f"## {TITLE}",
        "",
        "`benchmarks/study_bounds.py` (a study, not a timing): the exact pieces",
        "of the score map along the bundled example's DAL line (committed",
        "`dal_v5_<size>`, 5 DDIM steps, 3x3 mean filter, abs, threshold 0.8), then",
        "a greedy cover of the stretch by stretches that a bound would decide at",
        'once: "true range" (the ideal, each pixel\'s true min/max over the stretch)',
        'and "true slope hull" (start value plus [min, max] of the exact slopes',
        "times the length: the best any derivative-interval bound could do).",
        "Pieces / stretches is the most such a bound could cut network",
        "evaluations, before paying for the bound itself.",
        "",
        "```",
        "python benchmarks/study_bounds.py --sizes 8 16 --write",
        "```",
        "",
        "| size | stretch | region (pixels) | pieces | region changes "
        "| median min margin | stretches, true range (longest) "
        "| stretches, true slope hull (longest) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}x{r['size']} | [{r['z_obs'] - r['half_width']:.3f}, "
            f"{r['z_obs'] + r['half_width']:.3f}] | {r['region']} | {r['pieces']} | "
            f"{r['region_changes']} | {r['margin_median']:.4f} | "
            f"{r['range']['stretches']} ({r['range']['longest']}) | "
            f"{r['hull']['stretches']} ({r['hull']['longest']}) |"
        )
    return "\n".join(lines) + "\n\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--half-width", type=float, default=2.0)
    ap.add_argument("--cap", type=int, default=4000)
    ap.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    rows = []
    for size in args.sizes:
        row = study(size, args.half_width, args.cap)
        print(row, flush=True)
        rows.append(row)
    if args.write:
        replace_section(TITLE, _section(rows))


if __name__ == "__main__":
    main()
