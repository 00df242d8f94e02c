"""One DAL test from files to files: what `sijax test` and `sijax demo` call."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax

from sijax.detect.dal import DALConfig, dal_test, draw_noises, resolve_engine
from sijax.detect.report import write_report
from sijax.errors import ensure_output_dir
from sijax.status import Status

DEFAULT_CHECKPOINTS = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "checkpoints"
)


def run_test(
    model,
    x,
    x_ref,
    *,
    sigma,
    sigma_ref=None,
    out_dir: str,
    checkpoint: str | None = None,
    seed: int = 0,
    config: DALConfig | None = None,
    extra: dict | None = None,
    progress: bool = False,
):
    """Runs :func:`sijax.detect.dal.dal_test` on a loaded model, writes the report.

    Args:
      model: the loaded model (:func:`sijax.load_model`, loaded once by the caller).
      x, x_ref: (H, W, C) arrays (x_ref may be None for background/neighbour tests).
      sigma: covariance of X (see :func:`dal_test`).
      sigma_ref: covariance of X_ref (None: ``sigma``).
      out_dir: where report.json, the .npy arrays and report.png go.
      checkpoint: the model's directory, recorded in report.json (data only: the
        model is not loaded again).
      seed: the key of the sampler noises (drawn once, fixed along the line).
      config: :class:`DALConfig`.
      extra: more fields for report.json.
      progress: show a progress bar of the search on stderr (:func:`search_bar`).

    Returns:
      (TestResult, seconds of the test including compilation).

    Raises:
      InputError: ``out_dir`` cannot be written (checked before the test runs).
    """
    ensure_output_dir(out_dir)  # before the test: a bad --out must not cost a run
    config = DALConfig() if config is None else config
    # The engine "auto" chooses, so that report.json records the one that ran.
    config = resolve_engine(config, model, jax.numpy.shape(x))
    noises = draw_noises(jax.random.key(seed), model, config)
    t0 = time.perf_counter()
    with search_bar(progress) as report:
        result = dal_test(
            model, x, x_ref, sigma=sigma, sigma_ref=sigma_ref, noises=noises,
            config=config, progress=report,
        )
    seconds = time.perf_counter() - t0
    write_report(
        out_dir,
        result,
        x,
        x_ref,
        config=config,
        checkpoint=checkpoint,
        extra={
            "sigma": sigma if isinstance(sigma, (int, float, str)) else "array",
            "seed": seed,
            "seconds": seconds,
            **(extra or {}),
        },
    )
    return result, seconds


@contextlib.contextmanager
def search_bar(enabled: bool = True):
    """A tqdm bar for ``dal_test(progress=...)``: pieces searched, the searched range
    of z and the current bounds of the p-value. Yields the reporter (None if not
    ``enabled``)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bars = []  # made at the first report, so that compiling is not timed as search

    def report(pieces, lo, hi, inf_p, sup_p):
        if not bars:
            bars.append(
                tqdm(desc="search", unit="piece", dynamic_ncols=True, file=sys.stderr)
            )
        bars[0].set_postfix_str(
            f"z in [{lo:.3f}, {hi:.3f}], p in [{inf_p:.4g}, {sup_p:.4g}]",
            refresh=False,
        )
        bars[0].update(pieces - bars[0].n)

    try:
        yield report
    finally:
        for bar in bars:
            bar.close()


def format_result(result) -> str:
    """A few lines for the terminal."""
    iv = ", ".join(f"[{lo:.4f}, {hi:.4f}]" for lo, hi in result.truncated_intervals[:6])
    more = len(result.truncated_intervals) - 6
    if more > 0:
        iv += f", ... ({more} more)"
    if result.status == Status.NO_REGION:
        return f"no region detected ({result.message}); nothing to test"
    # p_text: a point value only when the search pinned it down (else the side of
    # alpha, or the bounds); the bounds follow in full.
    ci = result.confidence_text()
    return (
        f"region: {int(result.mask.sum())} pixels   z = {result.stat:.4f}   "
        f"mean difference = {result.raw_stat:.6g} (sd {result.sd:.4g})\n"
        f"selective p-value ({result.alternative}): {result.p_text()}   "
        f"bounds [{result.inf_p:.6g}, {result.sup_p:.6g}]   status: {result.status}\n"
        + (
            f"selective confidence interval of the mean difference: {ci}\n"
            if ci
            else ""
        )
        + f"naive p-value: {result.naive_p_value:.6g}\n"
        f"truncation set Zset: {iv}\n"
        f"pieces searched: {result.search_count}   searched range: "
        f"{[tuple(round(v, 4) for v in s) for s in result.searched_intervals]}"
        + _components_text(result)
    )


def _components_text(result) -> str:
    """One line per connected component (with ``DALConfig(components=True)``)."""
    if result.components is None:
        return ""
    how = result.components[0].adjustment if result.components else "-"
    lines = [f"\nconnected components: {len(result.components)} (each tested on its "
             f"own contrast given the whole region; p adjusted within the image: "
             f"{how})"]  # fmt: skip
    for c in result.components:
        r, col = c.centroid()
        ci = ""
        if c.confidence_interval is not None:
            lo, hi = c.confidence_interval
            exact = "" if c.confidence_exact else " (conservative)"
            ci = f"   CI [{lo:.4g}, {hi:.4g}]{exact}"
        lines.append(
            f"  component {c.label}: {c.size} px around ({r:.1f}, {col:.1f})   "
            f"z = {c.stat:.4f}   p = {c.p_value:.4g} [{c.inf_p:.4g}, {c.sup_p:.4g}]   "
            f"adjusted = {c.adjusted_p:.4g}   naive p = {c.naive_p_value:.4g}{ci}"
        )
    return "\n".join(lines)
