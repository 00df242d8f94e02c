"""Draws docs/figures/selective_vs_naive.png (docs/method.md §5, "Selective against
naive"): why a selective p-value can be smaller, or larger, than the naive one.

    python docs/figures/selective_vs_naive.py

The p-values in the panels are computed by sijax (selective_p_value, naive_p_value)
for the two truncation sets drawn.
"""

import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from sijax.selective import from_list, naive_p_value, selective_p_value  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "selective_vs_naive.png")
Z_OBS = 2.3
PANELS = (
    (
        "Zset = [-1.5, 2.4]: a larger z would have\nchanged the region",
        [(-1.5, 2.4)],
    ),
    (
        "Zset = |z| >= 2: the region is found\nonly when |z| is large",
        [(-np.inf, -2.0), (2.0, np.inf)],
    ),
)


def main() -> None:
    t = np.linspace(-4.0, 4.0, 1601)
    phi = stats.norm.pdf(t)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    naive = float(naive_p_value(jnp.asarray(Z_OBS)))
    for ax, (title, zset) in zip(axes, PANELS, strict=True):
        p = float(selective_p_value(jnp.asarray(Z_OBS), from_list(zset, 4)))
        inside = np.zeros_like(t, bool)
        for a, b in zset:
            inside |= (a <= t) & (t <= b)
        extreme = np.abs(t) >= Z_OBS
        ax.plot(t, phi, color="0.3", lw=1)
        ax.fill_between(t, 0, phi, where=extreme, color="0.7", lw=0,
                        label="|t| >= |z_obs|: the naive p")  # fmt: skip
        ax.fill_between(t, 0, phi, where=inside, color="cyan", alpha=0.45, lw=0,
                        label="Zset (same region)")  # fmt: skip
        ax.fill_between(t, 0, phi, where=inside & extreme, color="crimson", alpha=0.8,
                        lw=0, label="both: selective p numerator")  # fmt: skip
        ax.axvline(Z_OBS, color="crimson", lw=1.2)
        ax.axvline(-Z_OBS, color="crimson", lw=1.2, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(
            f"z (z_obs = {Z_OBS}):  selective p = {p:.3g},  naive p = {naive:.3g}",
            fontsize=9,
        )
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("N(0, 1) density", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left", frameon=False)
    fig.suptitle(
        "selective p = mass(Zset, |t| >= |z_obs|) / mass(Zset): smaller than the naive "
        "p when Zset keeps the centre but not the far tail",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
