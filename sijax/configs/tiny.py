"""A tiny U-Net for tests and notebooks: trains in well under a minute on one core.

    sijax train --config tiny --workdir runs/tiny_8

gives the model committed as ``sijax/checkpoints/tiny_8`` (widths 4/8/16, 8x8 images).
"""

from sijax.config import TrainConfig


def get_config(size: int = 8) -> TrainConfig:
    """Widths (4, 8, 16), 256 N(0,1) images, batch 32, Adam 3e-3, 300 epochs."""
    return TrainConfig(name="tiny", size=size, channels=(4, 8, 16), temb_dim=100,
                       n_train=256, batch_size=32, epochs=300, lr=3e-3,
                       steps_per_dispatch=8, save_every=200)
