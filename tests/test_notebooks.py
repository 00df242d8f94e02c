"""The notebooks run top to bottom on a CPU."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "notebooks"))


@pytest.mark.slow
def test_tour_runs(tmp_path):
    import make_tour

    nb = make_tour.execute(make_tour.build(), str(tmp_path))
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "selective p =" in text and "permutation (B=200)" in text
    assert not any(
        o.output_type == "error"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_real_data_runs_at_a_small_size(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits need the [data] extra")
    import make_real_data

    monkeypatch.setenv("SIJAX_NOTEBOOK_SMALL", "1")
    nb = make_real_data.execute(make_real_data.build(), str(tmp_path))
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "selective p =" in text and "pixel_auroc" in text
    assert not any(
        o.output_type == "error"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
