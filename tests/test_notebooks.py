"""The notebooks run top to bottom on a CPU (STYLE habit 21)."""

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
