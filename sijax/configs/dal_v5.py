"""The paper's v5 model and recipe (docs/method.md §6), one model per image size.

    sijax train --config dal_v5 --set size=8 --set epochs=100 --workdir runs/dal_v5_8

trains the 8x8 model; the paper uses 1000 epochs, and the committed checkpoints use
fewer (400 epochs at size 8, 100 at size 16, 50 at size 32; see
``sijax/checkpoints/README.md``).
Expected result: the noise-prediction MSE falls from about 1.0 to about 0.28 within
the first epochs; the Bayes risk for N(0, 1) images is mean_t alpha_bar_t = 0.2755.
"""

from sijax.config import TrainConfig

SIZES = (8, 16, 32, 64)


def get_config(size: int = 8) -> TrainConfig:
    """U-Net 32/64/128/256, 1000 iid N(0,1) images, batch 32, Adam 3e-4, 1000 epochs.

    Args:
        size: image side, one of 8, 16, 32, 64 (others that are multiples of 8 work
            too; ``--set size=...`` changes it after the preset is built).
    """
    return TrainConfig(name="dal_v5", size=size, channels=(32, 64, 128, 256),
                       n_train=1000, batch_size=32, epochs=1000, lr=3e-4)
