"""The bundled example of `sijax demo`: an image with a planted anomaly, its reference.

The arrays are committed (``sijax/data/examples/``) so the demo needs nothing but the
package; :func:`make_example` is how they were made, so anyone can regenerate or vary
them.
"""

from __future__ import annotations

import os

import numpy as np

EXAMPLES_DIR = os.path.join(os.path.dirname(__file__), "examples")
# Sizes with a committed example (and a committed dal_v5_<size> model for the demo).
SIZES = (8, 16, 32)


def make_example(size: int, *, delta: float = 3.0, seed: int = 0):
    """A d x d x 1 N(0, 1) test image with a +delta square of side d // 3 and an
    independent N(0, 1) reference (the power setting of docs/method.md §7).

    Returns:
      (x, x_ref) float64 arrays of shape (size, size, 1).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, size, 1))
    x_ref = rng.standard_normal((size, size, 1))
    side = max(1, size // 3)
    r0, c0 = rng.integers(0, size - side + 1, size=2)
    x[r0 : r0 + side, c0 : c0 + side] += delta
    return x, x_ref


def example_paths(size: int) -> tuple[str, str]:
    """Paths of the committed (image, reference) .npy files for ``size``."""
    return (
        os.path.join(EXAMPLES_DIR, f"demo_{size}.npy"),
        os.path.join(EXAMPLES_DIR, f"demo_{size}_ref.npy"),
    )


def load_example(size: int):
    """The committed example for ``size`` as (x, x_ref) float64 (size, size, 1)."""
    px, pr = example_paths(size)
    return np.load(px), np.load(pr)


if __name__ == "__main__":  # python -m sijax.data.examples: regenerate the files
    os.makedirs(EXAMPLES_DIR, exist_ok=True)
    for d in SIZES:
        x, x_ref = make_example(d, seed=d)
        px, pr = example_paths(d)
        np.save(px, x)
        np.save(pr, x_ref)
        print("wrote", px, pr)
