"""The notebooks run top to bottom on a CPU."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "notebooks"))


def _run(maker, cwd: str) -> str:
    """Executes the notebook ``maker`` builds; returns the text of its outputs
    after checking that no cell raised."""
    nb = maker.execute(maker.build(), cwd)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    return "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_tour_runs(tmp_path):
    import make_tour

    text = _run(make_tour, str(tmp_path))
    assert "selective p =" in text and "permutation (B=200)" in text


@pytest.mark.slow
def test_real_data_runs_at_a_small_size(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits need the [data] extra")
    import make_real_data

    monkeypatch.setenv("SIJAX_NOTEBOOK_SMALL", "1")
    text = _run(make_real_data, str(tmp_path))
    assert "selective p =" in text and "pixel_auroc" in text
