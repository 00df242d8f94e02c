"""One DAL test from files to files: what `sijax test` and `sijax demo` call."""

from __future__ import annotations

import os
import time

import jax

from sijax.detect.dal import DALConfig, dal_test, draw_noises
from sijax.detect.report import write_report
from sijax.errors import ensure_output_dir

DEFAULT_CHECKPOINTS = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "checkpoints"
)


def run_test(
    checkpoint: str,
    x,
    x_ref,
    *,
    sigma,
    out_dir: str,
    seed: int = 0,
    config: DALConfig | None = None,
    extra: dict | None = None,
):
    """Loads the model, runs :func:`sijax.detect.dal.dal_test`, writes the report.

    Args:
      checkpoint: model directory (``sijax train`` output or a committed checkpoint).
      x, x_ref: (H, W, C) arrays (x_ref may be None for background/neighbour tests).
      sigma: covariance of X (see :func:`dal_test`).
      out_dir: where report.json, the .npy arrays and report.png go.
      seed: the key of the sampler noises (drawn once, fixed along the line).
      config: :class:`DALConfig`.
      extra: more fields for report.json.

    Returns:
      (TestResult, seconds of the test including compilation).

    Raises:
      InputError: ``out_dir`` cannot be written (checked before the test runs).
    """
    from sijax.checkpoint import load_model

    ensure_output_dir(out_dir)  # before the test: a bad --out must not cost a run
    config = DALConfig() if config is None else config
    model = load_model(checkpoint)
    noises = draw_noises(jax.random.key(seed), model.image_shape, config)
    t0 = time.perf_counter()
    result = dal_test(model, x, x_ref, sigma=sigma, noises=noises, config=config)
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


def format_result(result) -> str:
    """A few lines for the terminal."""
    iv = ", ".join(f"[{lo:.4f}, {hi:.4f}]" for lo, hi in result.truncated_intervals[:6])
    more = len(result.truncated_intervals) - 6
    if more > 0:
        iv += f", ... ({more} more)"
    if result.status == "no region":
        return f"no region detected ({result.message}); nothing to test"
    return (
        f"region: {int(result.mask.sum())} pixels   z = {result.stat:.4f}\n"
        f"selective p-value ({result.alternative}): {result.p_value:.6g}   "
        f"bounds [{result.inf_p:.6g}, {result.sup_p:.6g}]   status: {result.status}\n"
        f"naive p-value: {result.naive_p_value:.6g}\n"
        f"truncation set Zset: {iv}\n"
        f"pieces searched: {result.search_count}   searched range: "
        f"{[tuple(round(v, 4) for v in s) for s in result.searched_intervals]}"
    )
