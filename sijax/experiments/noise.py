"""Non-Gaussian noise of the robustness experiment (v5 Appendix I): five families,
standardised to mean 0 and variance 1, each at a chosen Wasserstein-1 distance from
N(0, 1); and the noise of one image (:func:`sample_noise`)."""

from __future__ import annotations

import functools
import math

import numpy as np

from sijax.errors import InputError

NOISE_FAMILIES = ("skewnorm", "exponnorm", "gennorm_lo", "gennorm_hi", "t")

_FAMILY = {
    # name: (scipy name, parameter bracket, how the parameter moves away from normal)
    "skewnorm": ("skewnorm", (0.0, 30.0)),
    "exponnorm": ("exponnorm", (1e-3, 10.0)),
    "gennorm_lo": ("gennorm", (2.0, 0.6)),  # beta < 2: heavier tails than normal
    "gennorm_hi": ("gennorm", (2.0, 20.0)),  # beta > 2: lighter tails
    "t": ("t", (1e4, 2.2)),
}


def _standardised(family: str, param: float):
    """scipy frozen distribution of ``family`` shifted and scaled to mean 0, var 1."""
    from scipy import stats

    dist = getattr(stats, _FAMILY[family][0])(param)
    mean, var = (float(v) for v in dist.stats(moments="mv"))
    sd = math.sqrt(var)
    return getattr(stats, _FAMILY[family][0])(param, loc=-mean / sd, scale=1.0 / sd)


def wasserstein1_to_normal(dist, *, quadrature: bool = False) -> float:
    """W1(dist, N(0, 1)) = integral |F(x) - Phi(x)| dx.

    Args:
      dist: a frozen scipy distribution (with a vectorised ``cdf``).
      quadrature: adaptive quadrature (slow, the reference) instead of the trapezoid
        rule on 40001 sinh-spaced points covering [-1e4, 1e4] (dense near 0).
    """
    from scipy import integrate, stats

    if quadrature:

        def gap(x):
            return abs(float(dist.cdf(x)) - float(stats.norm.cdf(x)))

        total = 0.0
        for lo, hi in ((-np.inf, -4.0), (-4.0, 0.0), (0.0, 4.0), (4.0, np.inf)):
            total += integrate.quad(gap, lo, hi, limit=400, epsabs=1e-10)[0]
        return total
    x = np.sinh(np.linspace(-np.arcsinh(1e4), np.arcsinh(1e4), 40001))
    return float(integrate.trapezoid(np.abs(_cdf(dist, x) - stats.norm.cdf(x)), x))


def _cdf(dist, x: np.ndarray) -> np.ndarray:
    """dist.cdf(x); the skew-normal through Owen's T (scipy's generic cdf is slow):
    F(y) = Phi(y) - 2 T(y, a) for the standard skew-normal with shape a."""
    from scipy import special

    if dist.dist.name == "skewnorm":
        (a,) = dist.args
        y = (x - dist.kwds["loc"]) / dist.kwds["scale"]
        return special.ndtr(y) - 2.0 * special.owens_t(y, a)
    return dist.cdf(x)


@functools.cache
def noise_parameter(family: str, distance: float) -> float:
    """Shape parameter of ``family`` whose standardised law is at W1 ``distance``
    from N(0, 1) (v5 Appendix I), by root finding on :func:`wasserstein1_to_normal`.

    Raises:
      InputError: unknown family, or a distance the family cannot reach.
    """
    from scipy import optimize

    if family not in _FAMILY:
        raise InputError(f"{family=} must be one of {NOISE_FAMILIES}")
    near, far = _FAMILY[family][1]

    def excess(p):
        return wasserstein1_to_normal(_standardised(family, p)) - distance

    lo, hi = excess(near), excess(far)
    if not lo < 0.0 < hi:
        raise InputError(
            f"{family} reaches W1 in [{lo + distance:.4f}, {hi + distance:.4f}] on "
            f"its parameter range; {distance=} is outside"
        )
    return float(optimize.brentq(excess, near, far, xtol=1e-10, rtol=1e-10))


def sample_noise(
    rng: np.random.Generator,
    shape,
    *,
    covariance: str = "iid",
    noise: str = "gaussian",
    distance: float = 0.0,
) -> np.ndarray:
    """Noise eps of one image: mean 0, covariance I ("iid") or 0.5^|i-j| ("corr").

    Innovations are N(0, 1) or the standardised ``noise`` family at W1 ``distance``;
    "corr" runs them through the AR(1) recursion e_i = 0.5 e_{i-1} + sqrt(0.75) u_i
    (e_0 = u_0) over the row-major flattened pixels, which gives Sigma_ij = 0.5^|i-j|
    exactly for any unit-variance innovations.

    Returns:
      float64 array of ``shape``.
    """
    n = int(np.prod(shape))
    if noise == "gaussian":
        u = rng.standard_normal(n)
    else:
        u = _standardised(noise, noise_parameter(noise, distance)).rvs(
            size=n, random_state=rng
        )
    if covariance == "corr":
        e = np.empty(n)
        e[0] = u[0]
        c = math.sqrt(0.75)
        for i in range(1, n):
            e[i] = 0.5 * e[i - 1] + c * u[i]
        u = e
    elif covariance != "iid":
        raise InputError(f"{covariance=} must be 'iid' or 'corr'")
    return np.asarray(u, np.float64).reshape(shape)
