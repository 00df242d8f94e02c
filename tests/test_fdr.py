"""The realised-FDR measurement (issue 27 item 3) on p-values of known law."""

import numpy as np
import pytest

from sijax.errors import InputError
from sijax.experiments.fdr import realised_fdr


def test_uniform_nulls_keep_the_rate_and_strong_signals_are_found():
    rng = np.random.default_rng(0)
    null = rng.uniform(size=20_000)
    signal = rng.uniform(size=20_000) * 1e-4
    for proc in ("bh", "storey"):
        res = realised_fdr(null, signal, m=10, pi0=0.5, q=0.1, procedure=proc)
        assert res.reps == 4000 and res.m0 == 5
        # BH: FDR = pi0 q = 0.05 exactly for independent uniform nulls.
        assert res.fdr_lo <= (0.05 if proc == "bh" else 0.1) + 0.01
        assert res.fdr < 0.1 + 0.02
        assert res.power > 0.99


def test_anti_conservative_nulls_show_up():
    rng = np.random.default_rng(1)
    null = rng.uniform(size=4000) ** 3  # far too small under the null
    signal = rng.uniform(size=4000) * 1e-3
    res = realised_fdr(null, signal, m=10, pi0=0.5, q=0.05)
    assert res.fdr_lo > 0.1


def test_too_few_trials_are_refused():
    with pytest.raises(InputError, match="at most 2 groups"):
        realised_fdr(np.ones(10), np.ones(10), m=10, pi0=0.5, reps=3)
    with pytest.raises(InputError, match="procedure"):
        realised_fdr(np.ones(10), np.ones(10), procedure="holm")


def test_experiment_summary_pairs_each_signal_setting_with_its_null_twin():
    from sijax.experiments import default_spec
    from sijax.experiments.summary import fdr_markdown, fdr_rows

    spec = default_spec("power", sizes=(8,), checkpoints={8: "tiny_8"},
                        covariances=("iid",), deltas=(0.0, 2.0), trials=20,
                        methods=("selective", "naive"))
    rng = np.random.default_rng(2)
    records = []
    for s in spec.settings():
        for i in range(20):
            p = rng.uniform() if s.delta == 0 else rng.uniform() * 1e-3
            records.append({"setting": s.key, "index": i, "valid": True,
                            "methods": {"selective": {"p": p, "sup_p": p},
                                        "naive": {"p": p}}})
    rows = fdr_rows(spec, records)
    assert {(r["method"], r["procedure"]) for r in rows} == {
        (m, p) for m in ("selective", "naive") for p in ("bh", "storey")}
    assert all(r["reps"] == 4 and r["m0"] == 5 and r["power"] > 0.9 for r in rows)
    assert "realised false discovery rate" in fdr_markdown(rows)
    assert fdr_rows(spec, [r for r in records if "0.0" not in r["setting"]]) == []
