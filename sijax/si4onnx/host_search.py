"""sicore 3.0.0's search loop on the host, for the searches the compiled one lacks.

sijax.si4onnx runs sicore's default search ("pi3" order, "precision" or "decision"
rule, and "exhaustive") as one compiled ``lax.while_loop``
(:func:`sijax.selective.search`). sicore also accepts ``search_strategy`` "pi1",
"pi2" or a callable, a callable ``termination_criterion``, and ``n_jobs > 1`` (the
exhaustive range cut into ``n_jobs`` chunks, each searched from the left). Those run
here: the loops of sicore's ``SelectiveInference.inference`` and
``_inference_parallel``, step for step, around sijax's compiled piece oracle (one
tracked evaluation of the region per piece). The points searched, the pieces,
``search_count`` and ``detect_count`` are sicore's, and the p-value and its bounds
are computed as sicore computes them (scipy's log cdf / sf of N(0, 1), summed in
log space).

sicore's strategies, for the searched set S (a union of closed intervals) and the
standardised statistic z_obs:

* the first point is z_obs; then the *target* (z_obs for "pi1" and "pi3", the null
  mode 0 for "pi2") if it is not searched yet;
* otherwise, with [l, u] the component of S holding the target, the candidates are
  l - step and u + step (each retried with step / 10 down to 1e-11 while it falls
  in S), and the next point is the candidate nearer z_obs ("pi1") or of larger
  N(0, 1) density ("pi2", "pi3"; the left one on a tie).

So "pi1" and "pi3" grow the component of z_obs, and "pi2" searches z_obs's piece,
then grows the component of 0 (the two merge when they meet). sicore's "exhaustive"
mode uses the same strategy (its exhaustive order is never selected: a ``match`` on a
tuple pattern) and stops once [-10 - |z_obs|, 10 + |z_obs|] is covered.

Callables receive :class:`RealSubset`, a re-implementation of sicore's class of the
same name (closed intervals; a union merges gaps up to 1e-10): a strategy
``fn(searched) -> z``, a termination criterion ``fn(searched, truncated) -> bool |
float`` that ends the search on True or 1.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

__all__ = ["HostSearchResult", "RealSubset", "host_search", "parallel_search"]

_TOL = 1e-10  # sicore's simplify: intervals closer than this are merged


def _simplify(iv: np.ndarray) -> np.ndarray:
    if len(iv) == 0:
        return np.empty((0, 2))
    iv = iv[np.argsort(iv[:, 0])]
    out = [iv[0].copy()]
    for lo, hi in iv[1:]:
        if lo <= out[-1][1] + _TOL:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append(np.array([lo, hi]))
    return np.array(out)


def _complement(iv: np.ndarray) -> np.ndarray:
    if len(iv) == 0:
        return np.array([[-np.inf, np.inf]])
    out = []
    if iv[0][0] > -np.inf:
        out.append([-np.inf, iv[0][0]])
    out += [[iv[i][1], iv[i + 1][0]] for i in range(len(iv) - 1)]
    if iv[-1][1] < np.inf:
        out.append([iv[-1][1], np.inf])
    return _simplify(np.array(out).reshape(-1, 2))


class RealSubset:
    """A finite union of closed intervals of the real line (sicore's ``RealSubset``).

    Attributes:
      intervals: (n, 2) float64 array of [lo, hi] rows, sorted and disjoint (rows
        closer than 1e-10 are merged); the complement of [[a, b]] is
        [[-inf, a], [b, inf]] (closed, as sicore's).
    """

    def __init__(self, intervals=None, *, is_simplify: bool = True) -> None:
        if intervals is None:
            self.intervals = np.empty((0, 2))
        else:
            self.intervals = np.array(intervals, dtype=float).reshape(-1, 2)
            if is_simplify:
                self.intervals = _simplify(self.intervals)

    def complement(self) -> RealSubset:
        return RealSubset(_complement(self.intervals), is_simplify=False)

    __invert__ = complement

    def union(self, other: RealSubset) -> RealSubset:
        stacked = np.vstack([self.intervals, other.intervals])
        return RealSubset(_simplify(stacked), is_simplify=False)

    __or__ = union

    def intersection(self, other: RealSubset) -> RealSubset:
        return ~((~self) | (~other))

    __and__ = intersection

    def difference(self, other: RealSubset) -> RealSubset:
        return self & ~other

    __sub__ = difference

    def symmetric_difference(self, other: RealSubset) -> RealSubset:
        return (self - other) | (other - self)

    __xor__ = symmetric_difference

    def is_empty(self) -> bool:
        return len(self.intervals) == 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RealSubset):
            return False
        if self.intervals.shape != other.intervals.shape:
            return False
        return np.allclose(self.intervals, other.intervals, rtol=1e-12, atol=1e-12)

    __hash__ = None

    def issubset(self, other: RealSubset) -> bool:
        return (self - other).is_empty()

    __le__ = issubset

    def __lt__(self, other: RealSubset) -> bool:
        return self.issubset(other) and self != other

    def issuperset(self, other: RealSubset) -> bool:
        return other.issubset(self)

    __ge__ = issuperset

    def __gt__(self, other: RealSubset) -> bool:
        return self.issuperset(other) and self != other

    def isdisjoint(self, other: RealSubset) -> bool:
        return (self & other).is_empty()

    def __contains__(self, z: float) -> bool:
        iv = self.intervals
        return bool(len(iv)) and bool(np.any((iv[:, 0] <= z) & (z <= iv[:, 1])))

    def __getitem__(self, key: int) -> list[float]:
        return self.intervals[key].tolist()

    def find_interval_containing(self, z: float) -> list[float]:
        iv = self.intervals
        hit = (iv[:, 0] <= z) & (z <= iv[:, 1])
        if not np.any(hit):
            raise ValueError(f"The value {z:.6f} does not belong to the subset {self}.")
        return iv[hit][0].tolist()

    def tolist(self) -> list[list[float]]:
        return self.intervals.tolist()

    @property
    def measure(self) -> float:
        return float(np.sum(self.intervals[:, 1] - self.intervals[:, 0]))

    def __len__(self) -> int:
        return len(self.intervals)

    def __str__(self) -> str:
        return "[" + ", ".join(f"[{lo:.6f}, {hi:.6f}]" for lo, hi in self.intervals) \
            + "]"  # fmt: skip

    def __repr__(self) -> str:
        return f"RealSubset({self.tolist()})"


# ------------------------------------------------------------------- p-values


def _log1mexp(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    out = np.empty_like(x)
    small = x < -0.693147
    out[small] = np.log1p(-np.exp(x[small]))
    out[~small] = np.log(-np.expm1(x[~small]))
    return out


def _log_mass(s: RealSubset) -> float:
    """log P(Z in s), Z ~ N(0, 1), as sicore's ``compute_log_area``."""
    lo, hi = s.intervals.T
    out = np.empty(len(s))
    left = lo < 0.0  # the median
    out[left] = norm.logcdf(hi[left]) + _log1mexp(
        norm.logcdf(lo[left]) - norm.logcdf(hi[left])
    )
    out[~left] = norm.logsf(lo[~left]) + _log1mexp(
        norm.logsf(hi[~left]) - norm.logsf(lo[~left])
    )
    return float(logsumexp(out))


def _cdf(z: float, s: RealSubset) -> float:
    """The cdf at z of N(0, 1) truncated to s (sicore's ``truncated_cdf``)."""
    if z not in s:
        raise ValueError(f"The value {z:.6f} does not belong to the subset {s}.")
    below = RealSubset([[-np.inf, z]])
    inner, outer = _log_mass(s & below), _log_mass(s - below)
    return float(np.exp(-np.log1p(np.exp(outer - inner))))


def _two_sided(cdf: float) -> float:
    return float(2.0 * min(1.0 - cdf, cdf))


def p_value(z: float, truncated: RealSubset) -> float:
    """The equal-tailed selective p-value 2 min(F, 1 - F) on ``truncated``."""
    return _two_sided(_cdf(z, truncated))


def p_bounds(z: float, searched: RealSubset, truncated: RealSubset):
    """(inf_p, sup_p) over the unsearched part (sicore's
    ``_evaluate_pvalue_bounds``, two-sided)."""
    below = RealSubset([[-np.inf, z]])
    unsearched = ~searched
    inf_cdf = _cdf(z, truncated | (unsearched - below))
    sup_cdf = _cdf(z, truncated | (unsearched & below))
    inf_p, sup_p = np.sort([_two_sided(inf_cdf), _two_sided(sup_cdf)])
    if inf_cdf <= 0.5 <= sup_cdf:
        sup_p = 1.0
    return float(inf_p), float(sup_p)


# ---------------------------------------------------------------------- search

# oracle(z) -> (lo, hi, accept): the piece of the line holding z and whether its
# region is the observed one.
Oracle = Callable[[float], tuple[float, float, bool]]
_REAL = RealSubset([[-np.inf, np.inf]])


class HostSearchResult(NamedTuple):
    """The searched and truncated sets (in z units), the counts and the p-value."""

    searched: RealSubset
    truncated: RealSubset
    search_count: int
    detect_count: int
    p_value: float
    inf_p: float
    sup_p: float


class LoopError(Exception):
    """sicore's ``InfiniteLoopError`` (the message says which of its two kinds)."""


def limits(z: float) -> RealSubset:
    """sicore's search range [-10 - |z|, 10 + |z|]."""
    return RealSubset([[-10.0 - abs(z), 10.0 + abs(z)]])


def strategy(mode: str, name, z: float, step: float) -> Callable:
    """sicore's ``_create_search_strategy`` (see the module docstring)."""
    if callable(name):
        return name
    if mode == "over_conditioning":
        return lambda _: z
    if name not in ("pi1", "pi2", "pi3"):
        raise ValueError(
            f"search_strategy={name!r} must be 'pi1', 'pi2', 'pi3' or a callable"
        )
    target = 0.0 if name == "pi2" else z

    def metric(c):
        c = np.array(c)
        return np.abs(c - z) if name == "pi1" else -norm.logpdf(c)

    def next_point(searched: RealSubset) -> float:
        if searched.is_empty():
            return z
        unsearched = _REAL - searched
        if target in unsearched:
            return target
        candidates = []
        lo, hi = searched.find_interval_containing(target)
        for c, s in ((lo, -step), (hi, step)):
            if c in unsearched and np.isfinite(c):
                while abs(s) > 1e-11:
                    if c + s in unsearched:
                        candidates.append(c + s)
                        break
                    s /= 10
        return float(np.array(candidates)[np.argmin(metric(candidates))])

    return next_point


def termination(mode: str, name, z: float, precision: float, alpha: float):
    """sicore's ``_create_termination_criterion``."""
    if callable(name):
        return name
    if mode == "exhaustive":
        span = limits(z)
        return lambda searched, _: span <= searched
    if mode == "over_conditioning":
        return lambda *_: True
    if name not in ("precision", "decision"):
        raise ValueError(
            f"termination_criterion={name!r} must be 'precision', 'decision' or a "
            "callable"
        )

    def done(searched, truncated):
        inf_p, sup_p = p_bounds(z, searched, truncated)
        if name == "precision":
            return abs(sup_p - inf_p) < precision
        return min(alpha - inf_p, sup_p - alpha) < 0.0

    return done


def _result(z, searched, truncated, count, detect) -> HostSearchResult:
    return HostSearchResult(
        searched, truncated, count, detect, p_value(z, truncated),
        *p_bounds(z, searched, truncated),
    )  # fmt: skip


def host_search(oracle: Oracle, z: float, next_point: Callable, stop: Callable,
                max_iter: int) -> HostSearchResult:  # fmt: skip
    """sicore's sequential search: ``z_k = next_point(S)``, the piece at z_k is added
    to S (and to Zset if accepted) until ``stop(S, Zset)`` is True or 1.0.

    Raises:
      LoopError: more than ``max_iter`` pieces, or a piece that added nothing.
    """
    searched, truncated = RealSubset(), RealSubset()
    count = detect = 0
    before = RealSubset()
    while True:
        lo, hi, accept = oracle(float(next_point(searched)))
        piece = RealSubset([[lo, hi]])
        count += 1
        searched = searched | piece
        if accept:
            detect += 1
            truncated = truncated | piece
        if count > max_iter:
            raise LoopError(f"the search was performed {max_iter} times (max_iter)")
        if searched == before:
            raise LoopError("the search did not proceed (the same piece again)")
        before = searched
        flag = stop(searched, truncated)
        if flag is True or flag == 1.0:
            break
    return _result(z, searched & _REAL, truncated & _REAL, count, detect)


def parallel_search(oracle: Oracle, z: float, n_jobs: int,
                    max_iter: int) -> HostSearchResult:  # fmt: skip
    """sicore's ``_inference_parallel`` with ``n_jobs`` > 1, run one job after another.

    The range [-10 - |z|, 10 + |z|] is cut into ``n_jobs`` equal chunks; each job
    starts at half the chunk's *length* (sicore's ``(u - l) / 2``, the same point for
    every job) and then asks for the midpoint of the leftmost unsearched part of its
    chunk until the chunk is covered, at most ``max_iter // n_jobs`` pieces each.
    The jobs' searched and truncated sets are united and their counts added, so
    ``search_count`` is sicore's; the order of the jobs does not change the result.
    """
    span = limits(z)
    width = span.measure / n_jobs
    start = span[0][0]
    searched, truncated = RealSubset(), RealSubset()
    count = detect = 0
    cap = int(max_iter / n_jobs)
    for _ in range(n_jobs):
        chunk = RealSubset([[start, start + width]])
        start += width
        s_job, t_job = RealSubset(), RealSubset()
        c_job = 0
        point = (chunk[0][1] - chunk[0][0]) / 2
        before = RealSubset()
        while True:
            lo, hi, accept = oracle(float(point))
            piece = RealSubset([[lo, hi]])
            c_job += 1
            s_job = s_job | piece
            if accept:
                detect += 1
                t_job = t_job | piece
            rest = chunk - s_job
            if rest.is_empty():
                break
            if c_job > cap:
                raise LoopError(f"a job searched {cap} times (max_iter / n_jobs)")
            if s_job == before:
                raise LoopError("the search did not proceed (the same piece again)")
            before = s_job
            point = (rest[0][0] + rest[0][1]) / 2
        searched, truncated = searched | s_job, truncated | t_job
        count += c_job
    return _result(z, searched, truncated, count, detect)
