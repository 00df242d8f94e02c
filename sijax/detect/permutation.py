"""The permutation baseline of the DAL paper (docs/method.md §5).

Pool the 2n pixels of the test and the reference image, permute them, split them back
into a test and a reference image, re-run the detection on the permuted test image and
compute its statistic; the p-value is the fraction of permutations with a statistic at
least as extreme as the observed one ("abs": |z_perm| > |z_obs|), among permutations
whose detected region is not empty (empty ones are skipped and counted).

The permutations run vmapped in chunks through one compiled program; all of them use the
same sampler noises as the observed test.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sijax.detect.dal import (
    DALConfig,
    detect_and_line,
    prepare_inputs,
    split_config,
)
from sijax.diffusion.sampler import Noises
from sijax.errors import InputError
from sijax.selective.statistics import StatStatus
from sijax.status import Status

__all__ = ["PermutationResult", "permutation_test"]


class PermutationResult(NamedTuple):
    """Outcome of the permutation test of one image.

    Attributes:
      p_value: fraction of valid permutations at least as extreme as the observed
        statistic (NaN when the observed region is empty or no permutation is valid).
      stat: observed standardised statistic z_obs (NaN without a region).
      num_valid: permutations with a non-empty region (the denominator).
      num_skipped: permutations whose region was empty.
      status: :attr:`Status.OK` or :attr:`Status.NO_REGION` (the observed region is
        empty).
    """

    p_value: float
    stat: float
    num_valid: int
    num_skipped: int
    status: Status


def _z(model, x, x_ref, noises, cov, cov_ref, nums, config: DALConfig):
    """(z, valid) of one (test, reference) pair: detection, then the statistic."""
    *_, line = detect_and_line(model, x, x_ref, noises, cov, cov_ref, nums, config)
    ok = line.status == StatStatus.OK
    return jnp.where(ok, line.z_obs, jnp.nan), ok


@functools.partial(jax.jit, static_argnames=("config",))
def _observed(model, x, x_ref, noises, cov, cov_ref, nums, config):
    return _z(model, x, x_ref, noises, cov, cov_ref, nums, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _permuted(model, pooled, perms, noises, cov, cov_ref, nums, config):
    """z of each permutation: perms (P, 2n) int indices into the pooled pixels."""
    n = pooled.shape[0] // 2
    shape = noises.eps0.shape

    def one(perm):
        p = pooled[perm]
        return _z(
            model,
            p[:n].reshape(shape),
            p[n:].reshape(shape),
            noises,
            cov,
            cov_ref,
            nums,
            config,
        )

    return jax.vmap(one)(perms)


def _more_extreme(z_perm, z_obs, alternative: str):
    if alternative in ("abs", "two-sided"):
        return np.abs(z_perm) > abs(z_obs)
    if alternative == "greater":
        return z_perm > z_obs
    return z_perm < z_obs


def permutation_test(
    model,
    x,
    x_ref,
    *,
    sigma,
    noises: Noises,
    key: jax.Array,
    num_permutations: int = 1000,
    sigma_ref=None,
    config: DALConfig = DALConfig(),  # noqa: B008 (frozen dataclass)
    chunk: int = 64,
) -> PermutationResult:
    """Permutation p-value of the region detected in ``x`` against ``x_ref``.

    Args:
      model: any :class:`sijax.detect.models.Reconstructor` (float64 on the test path).
      x: (H, W, C) test image; x_ref: reference image of the same shape.
      sigma: covariance of X (as :func:`sijax.dal_test`); it standardises the
        statistic, which does not change the ranking under ``"iid"``.
      noises: sampler noises (the same for every permutation).
      key: PRNG key for the permutations (used once).
      num_permutations: B (the paper uses 1000).
      sigma_ref: covariance of X_ref (default ``sigma``).
      config: :class:`sijax.DALConfig` (detection options, hypothesis "reference",
        alternative).
      chunk: permutations per vmapped call (bounds memory).

    Returns:
      :class:`PermutationResult`.

    Raises:
      InputError: no reference image, a hypothesis other than "reference", bad
        shapes, NaN/Inf, an invalid covariance, ``num_permutations < 1``.
    """
    if config.hypothesis != "reference":
        raise InputError(
            "the permutation test pools the test and the reference image: it needs "
            f"hypothesis='reference', got {config.hypothesis!r}"
        )
    if num_permutations < 1 or chunk < 1:
        raise InputError(f"need {num_permutations=} >= 1 and {chunk=} >= 1")
    x, x_ref, cov, cov_ref = prepare_inputs(
        model, x, x_ref, sigma, sigma_ref, config, noises=noises
    )
    static, nums = split_config(config)
    z_obs, ok = jax.device_get(
        _observed(model, x, x_ref, noises, cov, cov_ref, nums, static)
    )
    if not bool(ok):
        return PermutationResult(float("nan"), float("nan"), 0, 0, Status.NO_REGION)
    pooled = jnp.concatenate([x.ravel(), x_ref.ravel()])
    keys = jax.random.split(key, num_permutations)
    perm = jax.vmap(lambda k: jax.random.permutation(k, pooled.shape[0]))
    extreme = valid = 0
    for start in range(0, num_permutations, chunk):
        # Fixed chunk shape (the last chunk is padded) so the program compiles once.
        idx = np.minimum(np.arange(start, start + chunk), num_permutations - 1)
        z_p, ok_p = jax.device_get(
            _permuted(
                model, pooled, perm(keys[idx]), noises, cov, cov_ref, nums, static
            )
        )
        live = np.arange(start, start + chunk) < num_permutations
        ok_p = np.asarray(ok_p) & live
        valid += int(ok_p.sum())
        extreme += int(
            _more_extreme(np.asarray(z_p)[ok_p], float(z_obs), config.alternative).sum()
        )
    p = extreme / valid if valid else float("nan")
    return PermutationResult(
        p_value=p,
        stat=float(z_obs),
        num_valid=valid,
        num_skipped=num_permutations - valid,
        status=Status.OK,
    )
