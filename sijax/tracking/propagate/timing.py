"""Seconds per kind of step, for the benchmarks (``PROFILE = {}`` to collect)."""

import time

import jax

from sijax.tracking.propagate.values import is_pv

PROFILE: dict | None = None  # set to {} to collect seconds per kind of step


def tick(key: str, t0: float, arrays) -> float:
    """Adds the seconds since t0 to PROFILE[key] (synchronised); returns now."""
    if PROFILE is None:
        return t0
    jax.block_until_ready(arrays)
    now = time.perf_counter()
    PROFILE[key] = PROFILE.get(key, 0.0) + now - t0
    return now


def account(key: str, outvals, t0) -> None:
    """Adds the time of one step (synchronised) to PROFILE (benchmarks only)."""
    jax.block_until_ready([o.right if is_pv(o) else o for o in outvals])
    PROFILE[key] = PROFILE.get(key, 0.0) + time.perf_counter() - t0
