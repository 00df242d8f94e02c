"""Writes and executes `dal_test_tour.ipynb` (run: python notebooks/make_tour.py).

The notebook drives the library only and runs top to bottom on a CPU
in a couple of minutes; `tests/test_notebooks.py` executes it (marked slow).
"""

import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))

CELLS = [
    (
        "md",
        """# A tour of the DAL test in sijax

Detect an anomalous region with a diffusion reconstruction, then give it an exact
selective p-value: the region was chosen from the same data, so the naive z-test is
biased; conditioning on the selection event repairs it
(the method in our words: `docs/method.md`). Everything runs on a CPU with the
committed 8x8
model.""",
    ),
    (
        "code",
        """import os, tempfile
import jax
jax.config.update("jax_enable_x64", True)  # the test path is float64
import matplotlib.pyplot as plt
import numpy as np
import sijax
from sijax.data.examples import load_example
from sijax.detect.report import plot_report

model = sijax.load_model("dal_v5_8")
x, x_ref = load_example(8)  # a +3 square planted in N(0, 1) noise, and a reference
noises = sijax.draw_noises(jax.random.key(0), model.image_shape)
print(model.image_shape, x.shape)""",
    ),
    (
        "md",
        """## The test with the default settings
Search "parametric" grows outwards from z_obs until the p-value is known to within
`precision` (1e-3).""",
    ),
    (
        "code",
        """config = sijax.DALConfig()
res = sijax.dal_test(model, x, x_ref, sigma=1.0, noises=noises, config=config)
print(f"z = {res.stat:.4f}, selective p = {res.p_value:.5f} "
      f"[{res.inf_p:.5f}, {res.sup_p:.5f}], naive p = {res.naive_p_value:.5f}")
print("Zset:", [(round(a, 4), round(b, 4)) for a, b in res.truncated_intervals])
png = os.path.join(tempfile.mkdtemp(), "report.png")  # what `sijax test` writes
plot_report(png, res, x, x_ref, threshold=config.threshold)
plt.figure(figsize=(12, 3)); plt.imshow(plt.imread(png)); plt.axis("off");""",
    ),
    (
        "md",
        """## Where the region stays the same along the line
The test conditions on {z : M(a + b z) = M_obs}. Evaluate the detector directly on a
grid of z and compare with the truncation set found by the exhaustive search.""",
    ),
    (
        "code",
        """full = sijax.dal_test(model, x, x_ref, sigma=1.0, noises=noises,
                      config=sijax.DALConfig(search="exhaustive"))
line = sijax.line_statistic(x, x_ref, full.mask, sigma=1.0)
zs = np.linspace(-6, 6, 241)
same = [np.array_equal(np.asarray(sijax.detect_region(
            model, line.a + line.b * z, noises)[1]), full.mask) for z in zs]
fig, ax = plt.subplots(figsize=(8, 2))
ax.plot(zs, same, ".", ms=3, label="grid: same region")
for lo, hi in full.truncated_intervals:
    ax.axvspan(max(lo, -6), min(hi, 6), alpha=0.2, color="C1")
ax.axvline(full.stat, color="k", lw=1, label="z_obs")
ax.set_xlabel("z"); ax.legend(loc="upper left"); ax.set_yticks([0, 1]);
print(f"exhaustive: p = {full.p_value:.6f}, {full.search_count} pieces")""",
    ),
    (
        "md",
        """## Search policies and baselines
"decision" stops as soon as p is known to be on one side of alpha; over-conditioning
uses only the piece at z_obs; the permutation baseline re-detects on permuted pooled
pixels.""",
    ),
    (
        "code",
        """for search, termination in [("over_conditioning", "precision"),
                            ("parametric", "decision"), ("parametric", "precision")]:
    r = sijax.dal_test(model, x, x_ref, sigma=1.0, noises=noises,
                       config=sijax.DALConfig(search=search, termination=termination))
    print(f"{search:18s} {termination:9s} p = {r.p_value:.5f} "
          f"[{r.inf_p:.5f}, {r.sup_p:.5f}] pieces = {r.search_count}")
perm = sijax.permutation_test(model, x, x_ref, sigma=1.0, noises=noises,
                              key=jax.random.key(1), num_permutations=200)
print(f"permutation (B=200): p = {perm.p_value:.3f}, "
      f"{perm.num_skipped} empty regions skipped")""",
    ),
]


def notebook(cells) -> nbformat.NotebookNode:
    """A notebook of (kind, source) cells, kind "md" or "code"."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(src)
        if kind == "md"
        else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def build() -> nbformat.NotebookNode:
    return notebook(CELLS)


def execute(nb, cwd: str, timeout: int = 900):
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": cwd}},
    ).execute()
    return nb


if __name__ == "__main__":
    out = os.path.join(HERE, "dal_test_tour.ipynb")
    nb = build()
    if "--no-run" not in sys.argv:
        execute(nb, HERE)
    nbformat.write(nb, out)
    print("wrote", out)
