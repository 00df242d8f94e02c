"""Search policies for the truncation set Zset along the line (docs/method.md §5).

The search never looks at a network: it talks to a *piece oracle*

    piece_fn(params, z, direction) -> (lo, hi, accept)

a jit-traceable function of a () float64 ``z`` and a () int32 ``direction`` (+1 or -1)
that returns the piece [lo, hi] of the line on which the whole pipeline is affine and
contains ``z`` (when ``z`` is exactly a breakpoint, the piece on the side of
``direction``: +1 right, -1 left), and ``accept``: whether the region mask on that piece
equals the observed one (the piece belongs to Zset). ``lo`` may be -inf and ``hi`` +inf.
``params`` is any pytree the oracle needs (the line, network weights, ...): pass arrays
through it rather than closing over them, so that one compiled search serves every
image.

Policies:

* ``"parametric"`` (default): start with the piece at z_obs, then grow the searched
  component [L, R] one piece at a time, on the side whose end has the larger N(0, 1)
  density (sicore's "pi3": its candidates are the points just outside [L, R]; the
  oracle's ``direction`` makes the step size unnecessary here: the next piece is asked
  for at the breakpoint itself). Termination ``"precision"`` stops once
  sup_p - inf_p < precision (default 1e-3); ``"decision"`` stops once p is known to lie
  on one side of alpha (sup_p < alpha: reject; inf_p >= alpha: do not reject).
* ``"exhaustive"``: the same growth until [L, R] covers
  [-margin - |z_obs|, margin + |z_obs|] (margin 10).
* ``"over_conditioning"``: only the piece at z_obs; Zset is defined to be that piece, so
  the p-value is exact for that (valid, low-power) conditioning and inf_p = sup_p = p.

**Exact confidence interval ends** (``level=...``, "parametric" only). A selective
confidence interval (:mod:`sijax.selective.confidence`) needs Zset far from 0, which
the p-value's stopping rule never looks at. With a ``level``, the search goes on after
its own rule is met until the unsearched part can no longer move either end of the
interval by more than the tolerance: the loop keeps the certified brackets of
:func:`sijax.selective.confidence.tighten` (one vectorised evaluation per piece on
the found part merged to at most 32 intervals) and stops when
:func:`~sijax.selective.confidence.brackets_exact` holds. In that phase it grows the
side whose unsearched end is nearer the interval (the end that N(lo, 1) or N(hi, 1)
still weighs), not the pi3 side. If Zset needs more than 32 intervals the brackets
cannot be certified and the search stops at the p-value's rule (the interval is then
reported as not exact); reaching ``max_pieces`` in that phase keeps status OK (the
p-value is known; the interval is not exact).

Which p-value is reported for a search that stopped early: ``p_value`` is computed on
the searched part only, i.e. with every unsearched z counted *out of* Zset (as sicore
does);
``inf_p`` and ``sup_p`` bound the p-value of every Zset consistent with what was
searched (all unsearched mass counted in or out of Zset in the worse direction for each
bound, :func:`sijax.selective.pvalues.bounds_from_log_masses`). Hence
inf_p <= p_value <= sup_p, and the p-value of any longer search (the exhaustive one, or
the exact one) lies in [inf_p, sup_p].

Everything runs in one capped ``lax.while_loop`` with a single call site of
``piece_fn`` (the oracle is compiled once), so the search is jit- and vmap-compatible.
:func:`search_host` runs the same state machine (``_Machine``) from the host, one
small compiled step per piece, for a host oracle ``source(z, direction)`` that cannot
be jitted (the breakpoint propagation of :class:`sijax.tracking.LineCache`).

Progress: with ``report_every=k`` the loop sends (pieces, L, R, inf_p, sup_p) to the
host every k pieces and when it ends (``jax.debug.callback``), to the function
installed by :func:`reporting` (none installed: the reports are dropped). The
reporter is looked up at run time, so one compiled search serves every reporter.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sijax.errors import InputError, SearchError
from sijax.selective.confidence import (
    EndBrackets,
    brackets_exact,
    check_level,
    open_brackets,
    tighten,
)
from sijax.selective.intervals import Intervals, merge_pieces
from sijax.selective.pvalues import (
    bounds_from_log_masses,
    check_alternative,
    split_log_masses,
)

__all__ = [
    "POLICIES",
    "TERMINATIONS",
    "PieceFn",
    "PieceSource",
    "Progress",
    "SearchError",
    "SearchResult",
    "SearchStatus",
    "new_pieces",
    "raise_for_status",
    "reporting",
    "search",
    "search_host",
]

POLICIES: tuple[str, ...] = ("parametric", "exhaustive", "over_conditioning")
TERMINATIONS: tuple[str, ...] = ("precision", "decision")

PieceFn = Callable[
    [object, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]
]

# A progress report of a search: fn(pieces, lo, hi, inf_p, sup_p) with the pieces
# searched, the searched range [lo, hi] of z and the current bounds of the p-value.
Progress = Callable[[int, float, float, float, float], None]


class SearchStatus:
    """Status codes of :class:`SearchResult` (int32 in ``status``)."""

    OK = 0
    MAX_PIECES = 1  # cap reached; p_value, inf_p, sup_p are those found so far
    ORACLE_STALLED = 2  # a piece did not contain / extend past the query point
    OBSERVED_NOT_ACCEPTED = 3  # the piece at z_obs does not reproduce the mask
    NONFINITE = 4  # z_obs or a piece end point is NaN

    MESSAGES = {
        0: "ok",
        1: "max_pieces reached before the search finished; the p-value and its bounds"
        " are those of the part searched so far (raise max_pieces, or use the bounds)",
        2: "the piece oracle returned a piece that does not contain the query point or"
        " does not extend past it (a bug in piece_fn, or breakpoints lost to rounding)",
        3: "the piece at z_obs does not reproduce the observed region (accept=False):"
        " detection and search disagree",
        4: "z_obs or a piece end point is NaN",
    }


class SearchResult(NamedTuple):
    """Result of :func:`search` (one line; add a leading axis under vmap).

    Attributes:
      z_obs: () float64, the observed statistic.
      truncated: Zset found, in z units: a normalised padded union with capacity
        ``max_pieces`` (accepted pieces that touch are merged, so no overflow).
      searched: the searched component [L, R] as a union with capacity 1.
      search_count: () int32, number of pieces evaluated (oracle calls).
      p_value: () float64, the selective p-value on the searched part.
      inf_p: () float64, lower bound over the unsearched part.
      sup_p: () float64, upper bound over the unsearched part.
      log_p_value, log_inf_p, log_sup_p: () float64 logs (no underflow at large |z|).
      status: () int32 :class:`SearchStatus` code.
    """

    z_obs: jax.Array  # ()
    truncated: Intervals  # (max_pieces, 2)
    searched: Intervals  # (1, 2)
    search_count: jax.Array  # () int32
    p_value: jax.Array  # ()
    inf_p: jax.Array  # ()
    sup_p: jax.Array  # ()
    log_p_value: jax.Array  # ()
    log_inf_p: jax.Array  # ()
    log_sup_p: jax.Array  # ()
    status: jax.Array  # () int32


class _State(NamedTuple):
    i: jax.Array  # () int32, pieces evaluated
    lo_s: jax.Array  # () L, left end of the searched component
    hi_s: jax.Array  # () R, right end
    buf_lo: jax.Array  # (P,) evaluated pieces (clipped to the new part)
    buf_hi: jax.Array  # (P,)
    keep: jax.Array  # (P,) bool, accepted
    side: jax.Array  # (P,) int32, -1 / 0 / +1: left of, at, right of z_obs
    n_left: jax.Array  # () int32, pieces added on the left
    n_right: jax.Array  # () int32, pieces added on the right
    t_in: jax.Array  # () log mass of accepted pieces inside the extreme set A
    t_out: jax.Array  # () ... outside A
    u_in: jax.Array  # () log mass of the unsearched set inside A
    u_out: jax.Array  # () ... outside A
    status: jax.Array  # () int32
    done: jax.Array  # () bool
    memo_right: Any  # oracle memo of the walk to the right (() without a memo)
    memo_left: Any  # ... to the left
    ends: EndBrackets  # certified brackets of the interval's ends (with a level)
    phase: jax.Array  # () bool, the p-value's rule is met: searching for the ends


# Installed reporters, innermost last. Process-wide, not per thread: the callbacks
# run on XLA's runtime threads, not on the thread that started the search.
_REPORTERS: list[Callable] = []


@contextlib.contextmanager
def reporting(fn: Progress) -> Iterator[None]:
    """Sends the progress reports of searches run inside the block to ``fn``.

    ``fn(pieces, lo, hi, inf_p, sup_p)`` receives the pieces evaluated so far, the
    searched component [lo, hi] and the current p-value bounds; only searches
    compiled with ``report_every > 0`` report. Reporters nest (the innermost gets the
    reports); they are process-wide. The block should end with the results on the
    host (``jax.device_get`` or ``jax.effects_barrier()``), so that every report has
    arrived.
    """
    _REPORTERS.append(fn)
    try:
        yield
    finally:
        _REPORTERS.pop()


def new_pieces(pieces: int, report_every: int) -> int:
    """Pieces that one progress report of a search adds to those reported before it.

    A search reports at every multiple of ``report_every`` pieces and once more when
    it ends elsewhere (see the loop body of :func:`search`), so the sum of
    ``new_pieces`` over the reports of any interleaving of searches is the number of
    pieces they evaluated.
    """
    rest = pieces % report_every
    return rest if rest else report_every


def _report(i, lo, hi, inf_p, sup_p) -> None:
    if _REPORTERS:
        _REPORTERS[-1](int(i), float(lo), float(hi), float(inf_p), float(sup_p))


def _check_options(policy, termination, alternative, max_pieces, level=None):
    if level is not None and not isinstance(level, jax.core.Tracer):
        check_level(level)
    if policy not in POLICIES:
        raise InputError(f"{policy=} must be one of {POLICIES}")
    if termination not in TERMINATIONS:
        raise InputError(f"{termination=} must be one of {TERMINATIONS}")
    check_alternative(alternative)
    if int(max_pieces) < 1:
        raise InputError(f"{max_pieces=} must be >= 1")


def search(
    piece_fn: PieceFn,
    params,
    z_obs: jax.Array,
    *,
    policy: str = "parametric",
    termination: str = "precision",
    alternative: str = "abs",
    precision: float = 1e-3,
    alpha: float = 0.05,
    max_pieces: int = 2048,
    margin: float = 10.0,
    throw: bool = False,
    memo: Any = None,
    report_every: int = 0,
    level=None,
) -> SearchResult:
    """Search the line for Zset and compute the selective p-value (docs/method.md §5).

    Jit it with ``piece_fn`` and the string / int options static, e.g.
    ``jax.jit(search, static_argnums=0, static_argnames=("policy", "termination",
    "alternative", "max_pieces", "throw"))``; ``params``, ``z_obs``, ``precision``,
    ``alpha`` and ``margin`` may be traced. Under ``jax.vmap`` over ``params`` and
    ``z_obs`` the oracle is batched too and the loop runs until every line is done.

    Args:
      piece_fn: the piece oracle ``piece_fn(params, z, direction) -> (lo, hi, accept)``
        (see the module docstring).
      params: pytree passed to ``piece_fn`` unchanged.
      z_obs: () the observed standardised statistic.
      policy: "parametric" (default), "exhaustive" or "over_conditioning".
      termination: for "parametric": "precision" (default) or "decision".
      alternative: "abs" (default), "two-sided", "less" or "greater"
        (:mod:`sijax.selective.pvalues`).
      precision: "precision" stops once sup_p - inf_p < precision.
      alpha: "decision" stops once sup_p < alpha or inf_p >= alpha.
      max_pieces: cap on oracle calls (static); also the capacity of ``truncated``.
      margin: "exhaustive" covers [-margin - |z_obs|, margin + |z_obs|].
      throw: raise :class:`SearchError` when the status is not OK (on concrete results
        at once; inside jit through a host callback at run time).
      memo: optional initial state of a stateful oracle. With a memo, the oracle is
        ``piece_fn(params, z, direction, memo) -> (lo, hi, accept, memo)`` and the
        search keeps one memo per side (the walks right and left each continue from
        their own), e.g. the step memo of :func:`sijax.tracking.track_memo`. The
        pieces, and so the result, are those of the oracle without memo.
      report_every: static; > 0 sends a progress report every this many pieces and
        at the end (see :func:`reporting`); 0 (default) compiles no report.
      level: a confidence level 1 - a (may be traced): with "parametric", search on
        until the ends of that selective confidence interval are exact (module
        docstring); None (default): stop at the p-value's rule.

    Returns:
      :class:`SearchResult`.
    """
    _check_options(policy, termination, alternative, max_pieces, level)
    report_every = int(report_every)
    if report_every < 0:
        raise InputError(f"report_every={report_every} must be >= 0")
    m = _Machine(
        policy, termination, alternative, int(max_pieces), report_every,
        z_obs, precision, alpha, margin, level,
    )  # fmt: skip

    def body(s: _State) -> _State:
        q = zq, direction, first, go_right = m.query(s)
        if memo is None:
            lo, hi, accept = piece_fn(params, zq, direction)
            memo_right = memo_left = ()
        else:
            # The first piece starts both walks; later ones continue their side's.
            right, left = first | go_right, first | ~go_right

            def pick(use_new, new, old):
                return jax.tree.map(lambda n, o: jnp.where(use_new, n, o), new, old)

            side_memo = pick(right, s.memo_right, s.memo_left)
            lo, hi, accept, new_memo = piece_fn(params, zq, direction, side_memo)
            memo_right = pick(right, new_memo, s.memo_right)
            memo_left = pick(left, new_memo, s.memo_left)
        s = s._replace(memo_right=memo_right, memo_left=memo_left)
        return m.absorb(s, q, lo, hi, accept)

    s = lax.while_loop(lambda s: ~s.done, body, m.start(() if memo is None else memo))
    return m.finish(s, throw)


class _Machine:
    """The search of :func:`search` as a state machine: ``start``, then ``query`` ->
    the oracle's piece -> ``absorb`` until ``done``, then ``finish``. The jitted
    search runs it in one ``lax.while_loop``; :func:`search_host` drives it from
    the host, one piece at a time, for oracles that are not jittable."""

    def __init__(self, policy, termination, alternative, p_max, report_every,
                 z_obs, precision, alpha, margin, level=None):  # fmt: skip
        self.policy, self.termination = policy, termination
        # The interval's ends are searched for by "parametric" only.
        self.level = level if policy == "parametric" else None
        self.alternative = alternative
        self.p_max, self.report_every = p_max, report_every
        self.z_obs = z_obs = jnp.asarray(z_obs, jnp.float64)
        self.precision, self.alpha = precision, alpha
        if policy == "exhaustive":
            self.r_lo = -margin - jnp.abs(z_obs)
            self.r_hi = margin + jnp.abs(z_obs)
        else:
            self.r_lo, self.r_hi = -jnp.inf, jnp.inf

    def start(self, memo=()) -> _State:
        inf, p_max = jnp.inf, self.p_max
        nan_z = jnp.isnan(self.z_obs)
        return _State(
            i=jnp.zeros((), jnp.int32),
            lo_s=self.z_obs,
            hi_s=self.z_obs,
            buf_lo=jnp.full((p_max,), inf),
            buf_hi=jnp.full((p_max,), inf),
            keep=jnp.zeros((p_max,), bool),
            side=jnp.zeros((p_max,), jnp.int32),
            n_left=jnp.zeros((), jnp.int32),
            n_right=jnp.zeros((), jnp.int32),
            t_in=jnp.asarray(-inf),
            t_out=jnp.asarray(-inf),
            u_in=jnp.asarray(0.0),
            u_out=jnp.asarray(0.0),
            status=jnp.where(nan_z, SearchStatus.NONFINITE, SearchStatus.OK).astype(
                jnp.int32
            ),
            done=nan_z,
            memo_right=memo,
            memo_left=memo,
            ends=open_brackets(),
            phase=jnp.zeros((), bool),
        )

    def query(self, s: _State):
        """(z, direction, first, go_right): where the next piece is asked for."""
        first = s.i == 0
        need_right = s.hi_s < self.r_hi
        need_left = s.lo_s > self.r_lo
        # pi3: the side whose end has the larger N(0, 1) density, i.e. smaller |end|.
        nearer = jnp.abs(s.hi_s) <= jnp.abs(s.lo_s)
        if self.level is not None:
            # Searching for the interval's ends: the side whose unsearched end is
            # nearer the interval's outer bracket (N(mu, 1) weighs it most).
            nearer = jnp.where(
                s.phase, s.ends.q_hi - s.hi_s >= s.lo_s - s.ends.p_lo, nearer
            )
        go_right = need_right & (~need_left | nearer)
        zq = jnp.where(first, self.z_obs, jnp.where(go_right, s.hi_s, s.lo_s))
        direction = jnp.where(first | go_right, 1, -1).astype(jnp.int32)
        return zq, direction, first, go_right

    def _masses(self, lo, hi, take, lo_s, hi_s):
        # Row 0: the new piece (if accepted); row 1: (-inf, L) and (R, inf). One call
        # keeps a single mass evaluation in the loop body.
        inf = jnp.inf
        rows_lo = jnp.stack([jnp.stack([lo, inf]), jnp.stack([-inf, hi_s])])
        rows_hi = jnp.stack([jnp.stack([hi, inf]), jnp.stack([lo_s, inf])])
        valid = jnp.stack([jnp.stack([take, False]), jnp.stack([True, True])])
        m_in, m_out = split_log_masses(
            self.z_obs, rows_lo, rows_hi, valid, self.alternative
        )
        return m_in[0], m_out[0], m_in[1], m_out[1]

    def _finished(self, s: _State, bounds) -> tuple[jax.Array, jax.Array]:
        """(done by the p-value's rule, the whole range covered)."""
        covered = (s.lo_s <= self.r_lo) & (s.hi_s >= self.r_hi)
        if self.policy == "over_conditioning":
            return s.i >= 1, covered
        if self.policy == "exhaustive":
            return covered, covered
        if self.termination == "precision":
            return covered | (bounds.sup_p - bounds.inf_p < self.precision), covered
        decided = (bounds.sup_p < self.alpha) | (bounds.inf_p >= self.alpha)
        return covered | decided, covered

    def _ends(self, s: _State, go: jax.Array):
        """(the interval's brackets, tightened when ``go``; whether they are exact;
        whether the found part of Zset has more than _ENDS_ROWS rows, in which case
        they are neither tightened nor exact)."""
        k = min(_ENDS_ROWS, self.p_max)
        found = merge_pieces(s.buf_lo, s.buf_hi, s.keep, k, order=_order(s, self.p_max))
        ok = ~found.overflow
        ends = lax.cond(
            go & ok,
            lambda: tighten(s.ends, self.z_obs, found, s.lo_s, s.hi_s, self.level),
            lambda: s.ends,
        )
        return ends, ok & brackets_exact(ends, self.z_obs), found.overflow

    def absorb(self, s: _State, query, lo, hi, accept) -> _State:
        """The state after the oracle answered ``query`` (``self.query(s)``) with a
        piece."""
        zq, direction, first, go_right = query
        lo = jnp.asarray(lo, jnp.float64)
        hi = jnp.asarray(hi, jnp.float64)
        accept = jnp.asarray(accept, bool)
        finite = ~(jnp.isnan(lo) | jnp.isnan(hi))
        # The piece must contain the query and move the searched end strictly.
        ok_first = (lo <= zq) & (zq <= hi) & (lo < hi)
        ok_right = (lo <= zq) & (hi > zq)
        ok_left = (hi >= zq) & (lo < zq)
        sane = jnp.where(first, ok_first, jnp.where(go_right, ok_right, ok_left))
        # Keep only the new part (no mass counted twice if the oracle overlaps).
        new_lo = jnp.where(first | ~go_right, lo, jnp.maximum(lo, s.hi_s))
        new_hi = jnp.where(first | go_right, hi, jnp.minimum(hi, s.lo_s))
        lo_s = jnp.where(first, new_lo, jnp.minimum(s.lo_s, new_lo))
        hi_s = jnp.where(first, new_hi, jnp.maximum(s.hi_s, new_hi))
        good = finite & sane
        take = good & accept
        lo_new = jnp.where(good, lo_s, s.lo_s)
        hi_new = jnp.where(good, hi_s, s.hi_s)
        p_in, p_out, u_in, u_out = self._masses(new_lo, new_hi, take, lo_new, hi_new)
        status = jnp.where(
            ~finite,
            SearchStatus.NONFINITE,
            jnp.where(
                ~sane,
                SearchStatus.ORACLE_STALLED,
                jnp.where(
                    first & ~accept, SearchStatus.OBSERVED_NOT_ACCEPTED, SearchStatus.OK
                ),
            ),
        ).astype(jnp.int32)
        new = s._replace(
            i=s.i + 1,
            lo_s=lo_new,
            hi_s=hi_new,
            buf_lo=s.buf_lo.at[s.i].set(new_lo),
            buf_hi=s.buf_hi.at[s.i].set(new_hi),
            keep=s.keep.at[s.i].set(take),
            side=s.side.at[s.i].set(jnp.where(first, 0, direction)),
            n_left=s.n_left + (~first & ~go_right).astype(jnp.int32),
            n_right=s.n_right + (~first & go_right).astype(jnp.int32),
            t_in=jnp.logaddexp(s.t_in, p_in),
            t_out=jnp.logaddexp(s.t_out, p_out),
            u_in=u_in,
            u_out=u_out,
            status=status,
            done=status != SearchStatus.OK,
        )
        bounds = bounds_from_log_masses(
            new.t_in, new.t_out, u_in, u_out, self.alternative
        )
        p_done, covered = self._finished(new, bounds)
        late = jnp.zeros((), bool)  # capped while searching for the interval's ends
        if self.level is None:
            done = new.done | p_done
        else:
            phase = p_done & ~covered & ~new.done
            ends, exact, overflow = self._ends(new, phase)
            new = new._replace(ends=ends, phase=phase)
            # A Zset of more rows than _ENDS_ROWS cannot be certified: stop at the
            # p-value's rule then (the interval is reported as not exact).
            done = new.done | covered | (p_done & (exact | overflow))
            late = phase
        capped = ~done & (new.i >= self.p_max)
        if self.report_every:
            lax.cond(
                (new.i % self.report_every == 0) | done | capped,
                lambda: jax.debug.callback(
                    _report, new.i, lo_new, hi_new, bounds.inf_p, bounds.sup_p
                ),
                lambda: None,
            )
        return new._replace(
            done=done | capped,
            status=jnp.where(
                capped & ~late, SearchStatus.MAX_PIECES, new.status
            ).astype(jnp.int32),
        )

    def finish(self, s: _State, throw: bool = False) -> SearchResult:
        p_max, alternative = self.p_max, self.alternative
        inf = jnp.inf
        truncated = merge_pieces(
            s.buf_lo, s.buf_hi, s.keep, p_max, order=_order(s, p_max)
        )
        searched = Intervals(
            bounds=jnp.stack([s.lo_s, s.hi_s])[None, :],
            count=(s.i > 0).astype(jnp.int32),
            overflow=jnp.zeros((), bool),
        )
        # The running log masses (sums of positive terms, so accurate to a few ulps)
        # give the p-value; no second mass evaluation is compiled after the loop.
        if self.policy == "over_conditioning":
            # Zset *is* the piece at z_obs: nothing is unknown.
            bounds = bounds_from_log_masses(s.t_in, s.t_out, -inf, -inf, alternative)
            bounds = bounds._replace(
                inf_p=bounds.p_value,
                sup_p=bounds.p_value,
                log_inf_p=bounds.log_p_value,
                log_sup_p=bounds.log_p_value,
            )
        else:
            bounds = bounds_from_log_masses(
                s.t_in, s.t_out, s.u_in, s.u_out, alternative
            )
        result = SearchResult(
            z_obs=self.z_obs,
            truncated=truncated,
            searched=searched,
            search_count=s.i,
            p_value=bounds.p_value,
            inf_p=bounds.inf_p,
            sup_p=bounds.sup_p,
            log_p_value=bounds.log_p_value,
            log_inf_p=bounds.log_inf_p,
            log_sup_p=bounds.log_sup_p,
            status=s.status,
        )
        if throw:
            if isinstance(result.status, jax.core.Tracer):
                jax.debug.callback(_raise_status_callback, result.status)
            else:
                raise_for_status(result)
        return result


# Rows of the found part of Zset that the search for the interval's ends keeps.
_ENDS_ROWS = 32


def _order(s: _State, p_max: int) -> jax.Array:
    """(P,) the slots of the evaluated pieces sorted along the line.

    Pieces were added outwards, so their order is known: the k-th left piece
    (k = 1, 2, ...) has rank n_left - k, the first n_left, the k-th right
    n_left + k. Unused slots keep their index. No sort is needed.
    """
    slot = jnp.arange(p_max, dtype=jnp.int32)
    ordinal = jnp.cumsum(
        jnp.stack([s.side < 0, s.side > 0]).astype(jnp.int32), axis=1
    )  # (2, P): k for left / right pieces
    rank = jnp.where(
        s.side < 0,
        s.n_left - ordinal[0],
        jnp.where(s.side > 0, s.n_left + ordinal[1], s.n_left),
    )
    rank = jnp.where(slot < s.i, rank, slot)
    return jnp.zeros((p_max,), jnp.int32).at[rank].set(slot)


PieceSource = Callable[[float, int], tuple[float, float, bool]]


@functools.cache
def _host_steps(policy, termination, alternative, p_max, ends=False):
    """Jitted start / step / finish of :class:`_Machine` for :func:`search_host`
    (``ends``: the last of ``nums`` is a confidence level, see :func:`search`)."""

    def machine(nums):
        if not ends:
            nums = nums[:4]
        return _Machine(policy, termination, alternative, p_max, 0, *nums)

    def start(nums):
        m = machine(nums)
        s = m.start()
        return s, m.query(s)

    def step(s, query, lo, hi, accept, nums):
        """The next state, its query and the p-value bounds so far (no merge of
        the pieces: that is left to ``finish``)."""
        m = machine(nums)
        s = m.absorb(s, query, lo, hi, accept)
        b = bounds_from_log_masses(s.t_in, s.t_out, s.u_in, s.u_out, alternative)
        return s, m.query(s), (b.inf_p, b.sup_p)

    def finish(s, nums):
        return machine(nums).finish(s)

    return jax.jit(start), jax.jit(step, donate_argnums=0), jax.jit(finish)


def search_host(
    source: PieceSource,
    z_obs: float,
    *,
    policy: str = "parametric",
    termination: str = "precision",
    alternative: str = "abs",
    precision: float = 1e-3,
    alpha: float = 0.05,
    max_pieces: int = 2048,
    margin: float = 10.0,
    throw: bool = False,
    progress: Progress | None = None,
    report_every: int = 10,
    level=None,
) -> SearchResult:
    """:func:`search` driven from the host, for a piece oracle that is not jittable.

    ``source(z, direction) -> (lo, hi, accept)`` is a host function with the
    contract of ``piece_fn`` (module docstring), e.g. a
    :class:`sijax.tracking.LineCache` that enumerates stretches of the line by
    breakpoint propagation. The pieces are absorbed one by one by the same state
    machine as :func:`search` (one small compiled step per piece), so the policies,
    the stopping rules and the result are those of :func:`search` on the same pieces.

    Args:
      source: the host piece oracle.
      z_obs, policy, termination, alternative, precision, alpha, max_pieces, margin,
        throw, level: as :func:`search`.
      progress: optional ``fn(pieces, lo, hi, inf_p, sup_p)``, called every
        ``report_every`` pieces and at the end (as a reporter of :func:`search`).

    Returns:
      :class:`SearchResult` (device arrays).
    """
    _check_options(policy, termination, alternative, max_pieces, level)
    start, step, finish = _host_steps(
        policy, termination, alternative, int(max_pieces), level is not None
    )
    nums = tuple(
        jnp.asarray(v, jnp.float64)
        for v in (z_obs, precision, alpha, margin, 0.95 if level is None else level)
    )
    s, q = start(nums)
    while not bool(s.done):
        lo, hi, accept = source(float(q[0]), int(q[1]))
        s, q, (inf_p, sup_p) = step(s, q, lo, hi, accept, nums)
        i = int(s.i)
        if progress is not None and i % report_every == 0 and not bool(s.done):
            progress(i, float(s.lo_s), float(s.hi_s), float(inf_p), float(sup_p))
    result = finish(s, nums)
    if progress is not None and int(s.i) > 0:  # the end, with the result's bounds
        progress(int(s.i), float(s.lo_s), float(s.hi_s), float(result.inf_p),
                 float(result.sup_p))  # fmt: skip
    if throw:
        raise_for_status(result)
    return result


def _message(code: int) -> str:
    return SearchStatus.MESSAGES.get(code, f"unknown status {code}")


def _raise_status_callback(status) -> None:
    codes = np.atleast_1d(np.asarray(status))
    bad = codes[codes != SearchStatus.OK]
    if bad.size:
        raise SearchError(
            f"search failed ({bad.size} of {codes.size}): {_message(int(bad[0]))}"
        )


def raise_for_status(result: SearchResult) -> SearchResult:
    """Raise :class:`SearchError` with a readable message unless every status is OK.

    Works on concrete (possibly batched) results; returns ``result`` otherwise.
    """
    _raise_status_callback(result.status)
    return result
