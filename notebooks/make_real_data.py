"""Writes and executes `real_data.ipynb` (run: python notebooks/make_real_data.py).

Real images end to end, driving the library only: build the bundled digits set
(scikit-learn's handwritten digits with synthetic defects, MVTec AD layout), train a
model on its normal images, test one defective image with the stored noise model,
evaluate the test set and look at the pictures. Runs on a CPU in a few minutes;
`tests/test_notebooks.py` executes it at a small size (`SIJAX_NOTEBOOK_SMALL=1`:
the tiny U-Net and fewer images).
"""

import os
import sys

import nbformat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tour import HERE, execute, notebook  # noqa: E402

CELLS = [
    (
        "md",
        """# Real images with sijax: train, test, evaluate

A diffusion model learns what normal images look like; the DAL test then flags
the region of a test image that the model cannot reconstruct and gives it an exact
selective p-value. On real images the test needs the covariance of normal
variation, which `sijax train --data` estimates from the training images and
stores with the model (pixel, stationary and low-rank noise models), together with
the preprocessing and a detection threshold calibrated on held-out normal images.
Needs the `[data]` extra (`pip install -e ".[data]"`).""",
    ),
    (
        "code",
        """import json, os, tempfile, warnings
import jax
jax.config.update("jax_enable_x64", True)  # the test path is float64
import matplotlib.pyplot as plt
import numpy as np
import sijax
from sijax.data import build_dataset, open_dataset
from sijax.train import train
from sijax.configs import get_config
from sijax.config import apply_overrides

small = os.environ.get("SIJAX_NOTEBOOK_SMALL") == "1"
work = tempfile.mkdtemp()
data = build_dataset("digits", os.path.join(work, "digits"),
                     n_train=66 if small else 600, n_test_good=6 if small else 60,
                     n_test_defect=3 if small else 20)
ds = open_dataset(data)
print(ds.layout, len(ds.train), "training images;", "test kinds:", ds.kinds)""",
    ),
    (
        "md",
        """## Train on the normal images
The same call as `sijax train --data DIR --config dal_v5 --set epochs=E`; 10% of
the images are held out for the validation loss and the threshold.""",
    ),
    (
        "code",
        """cfg = get_config("tiny") if small else get_config("dal_v5", size=8)
cfg = apply_overrides(cfg, ["epochs=12", "batch_size=16"] if small else ["epochs=60"])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # digits have constant border pixels
    res = train(cfg, os.path.join(work, "run"), data=data, progress=False)
model = sijax.load_model(os.path.join(work, "run"))
meta = json.load(open(os.path.join(work, "run", "model", "config.json")))
print("trained on", meta["data"]["count"], "files; threshold",
      round(model.info.threshold, 3), "; preprocessing", meta["preprocessing"])
rows = [json.loads(l) for l in open(os.path.join(work, "run", "losses.jsonl"))]
plt.figure(figsize=(5, 2.5))
plt.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training")
v = [r for r in rows if "val_loss" in r]
plt.plot([r["step"] for r in v], [r["val_loss"] for r in v], "o-", label="held out")
plt.xlabel("step"); plt.ylabel("loss"); plt.legend();""",
    ),
    (
        "md",
        """## One defective image against the template
`resolve_reference(model, "model")` gives the template (mean of the normal images)
with the stored noise model: a test image has the covariance of one normal image,
the template that of their mean.""",
    ),
    (
        "code",
        """from sijax.evaluation.images import model_input, resolve_reference
from sijax.detect.report import plot_report

item = [it for it in ds.test if it.kind == "spot"][0]
x = model_input(model, ds.read(item), item.name)
ref = resolve_reference(model, "model")
config = sijax.DALConfig(threshold=model.info.threshold)
noises = sijax.draw_noises(jax.random.key(0), model.image_shape)
r = sijax.dal_test(model, x, ref.x_ref, sigma=ref.sigma, sigma_ref=ref.sigma_ref,
                   noises=noises, config=config)
print(f"{item.name}: region {int(r.mask.sum())} px, selective p = {r.p_value:.4g}, "
      f"naive p = {r.naive_p_value:.4g} ({r.status})")
png = os.path.join(work, "report.png")
plot_report(png, r, x, ref.x_ref, threshold=config.threshold)
plt.figure(figsize=(12, 3)); plt.imshow(plt.imread(png)); plt.axis("off");""",
    ),
    (
        "md",
        """## Evaluate the test set
What `sijax evaluate --checkpoint RUN --data DIR --out OUT` runs: every test image,
one record each in `images.jsonl`, and a summary with pixel AUROC, AUPRO, image
AUROC, the rejection rate on good images (the real-data type I error) and on each
defect (power).""",
    ),
    (
        "code",
        """from sijax.evaluation.evaluate import evaluate

out = os.path.join(work, "eval")
cfg_eval = sijax.DALConfig(threshold=model.info.threshold, termination="decision")
summary = evaluate(model, ds, ref, out, config=cfg_eval, reports=False,
                   progress=False, max_per_kind=2 if small else None)
print(open(os.path.join(out, "summary.md")).read())
plt.figure(figsize=(14, 7)); plt.imshow(plt.imread(os.path.join(out, "overview.png")))
plt.axis("off");""",
    ),
]


def build() -> nbformat.NotebookNode:
    return notebook(CELLS)


if __name__ == "__main__":
    out = os.path.join(HERE, "real_data.ipynb")
    nb = build()
    if "--no-run" not in sys.argv:
        execute(nb, HERE)
    nbformat.write(nb, out)
    print("wrote", out)
