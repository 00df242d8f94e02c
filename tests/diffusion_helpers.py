"""Shared helpers of the foundation tests (not a test module)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sijax.checkpoint import DiffusionModel
from sijax.config import TrainConfig
from sijax.diffusion.unet import UNet

TINY = (4, 8, 16)


def random_model(channels=TINY, size=8, in_channels=1, seed=0) -> DiffusionModel:
    """A float64 eval-mode model with random weights and non-trivial BN statistics.

    Filled from NumPy into an abstract state, so it costs no compilation.
    """
    cfg = TrainConfig(name="test", size=size, channels=channels,
                      in_channels=in_channels)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: UNet(cfg.unet_config(), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1])
        if "mean" in name:
            v = rng.normal(0.0, 0.3, leaf.shape)
        elif "var" in name:
            v = rng.uniform(0.5, 2.0, leaf.shape)
        elif "scale" in name:
            v = 1.0 + rng.normal(0.0, 0.1, leaf.shape)
        elif "bias" in name:
            v = rng.normal(0.0, 0.1, leaf.shape)
        else:  # kernels, fan-in scaling
            v = rng.normal(0.0, 1.0, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(v, jnp.float64)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        fill, nnx.to_pure_dict(state)))
    return DiffusionModel(config=cfg, graphdef=graphdef, state=state)
