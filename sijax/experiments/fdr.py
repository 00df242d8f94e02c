"""The realised false discovery rate of Benjamini-Hochberg over selective p-values.

A user who tests many images and keeps those that Benjamini-Hochberg (or Storey's
adaptive variant) selects at rate q wants the expected share of null images among
the selected to stay at or below q. :func:`realised_fdr` measures it: it forms
``reps`` disjoint groups of ``m`` images, ``m0 = round(pi0 m)`` of them null (their
p-values drawn without replacement from a null setting's trials) and the rest with a
signal, applies the procedure to each group, and averages the false discovery
proportion. Independent trials make independent p-values, the case in which BH
controls the FDR at ``pi0 q``.

The p-values are the conservative ones (``sup_p``): the exact selective p-value where
the search pinned it down, an upper bound where it stopped at a decision, so the
selection never uses a point inside bounds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sijax.errors import InputError
from sijax.evaluation.metrics import benjamini_hochberg, storey_bh

PROCEDURES = {"bh": benjamini_hochberg, "storey": storey_bh}


@dataclasses.dataclass(frozen=True)
class FDRResult:
    """The realised FDR and power of one procedure over the repetitions.

    Attributes:
        procedure: "bh" or "storey".
        q: the target rate.
        m, m0: images per repetition and null images among them.
        reps: repetitions (disjoint groups of trials).
        fdr: mean false discovery proportion (0 for a repetition with no
            discovery); ``fdr_lo``, ``fdr_hi``: its 99% normal interval.
        power: mean share of the signal images selected.
        discoveries: mean number of selected images per repetition.
    """

    procedure: str
    q: float
    m: int
    m0: int
    reps: int
    fdr: float
    fdr_lo: float
    fdr_hi: float
    power: float
    discoveries: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def realised_fdr(null_p, signal_p, *, m: int = 10, pi0: float = 0.5,
                 reps: int | None = None, q: float = 0.05, procedure: str = "bh",
                 seed: int = 0) -> FDRResult:
    """Realised FDR of ``procedure`` at ``q`` over disjoint groups of trials.

    Args:
        null_p: p-values of independent null trials (1-D).
        signal_p: p-values of independent trials with a signal (1-D).
        m: images per repetition.
        pi0: share of null images in a repetition.
        reps: repetitions (None: as many as the trials allow).
        q: target false discovery rate.
        procedure: "bh" (Benjamini-Hochberg) or "storey" (adaptive, lambda 0.5).
        seed: shuffles the trials before they are grouped.

    Raises:
        InputError: too few trials for ``reps`` groups, or bad arguments.
    """
    if procedure not in PROCEDURES:
        raise InputError(f"procedure={procedure!r} must be one of {tuple(PROCEDURES)}")
    if m < 1 or not 0.0 <= pi0 <= 1.0 or not 0.0 < q < 1.0:
        raise InputError(f"need m >= 1, 0 <= pi0 <= 1, 0 < q < 1: {m=} {pi0=} {q=}")
    null_p, signal_p = (np.asarray(v, np.float64).ravel() for v in (null_p, signal_p))
    m0 = int(round(pi0 * m))
    m1 = m - m0
    most = min(len(null_p) // m0 if m0 else math.inf,
               len(signal_p) // m1 if m1 else math.inf)
    reps = int(most) if reps is None else reps
    if reps < 1 or reps > most:
        raise InputError(f"{len(null_p)} null and {len(signal_p)} signal trials make "
                         f"at most {most} groups of {m0} + {m1}; asked for {reps}")
    rng = np.random.default_rng(seed)
    nulls = rng.permutation(null_p)[: reps * m0].reshape(reps, m0)
    signals = rng.permutation(signal_p)[: reps * m1].reshape(reps, m1)
    fdp, power, found = np.zeros(reps), np.zeros(reps), np.zeros(reps)
    for r in range(reps):
        sel = PROCEDURES[procedure](np.concatenate([nulls[r], signals[r]]), q)
        false = int(sel[:m0].sum())
        found[r] = sel.sum()
        fdp[r] = false / max(1, found[r])
        power[r] = sel[m0:].mean() if m1 else 0.0
    half = 2.5758 * fdp.std(ddof=1) / math.sqrt(reps) if reps > 1 else math.nan
    return FDRResult(procedure=procedure, q=q, m=m, m0=m0, reps=reps,
                     fdr=float(fdp.mean()), fdr_lo=float(max(0.0, fdp.mean() - half)),
                     fdr_hi=float(fdp.mean() + half), power=float(power.mean()),
                     discoveries=float(found.mean()))
