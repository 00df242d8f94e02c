"""The DAL paper's detector (docs/method.md §6): the reference for the others.

Its sampler settings (``steps``, ``eta``) and filter live in
:class:`sijax.detect.dal.DALConfig`, as they always have, so it has no options of its
own; :class:`sijax.checkpoint.DiffusionModel` runs its reconstruction directly.
"""

import dataclasses

from sijax.detectors.base import Detector


@dataclasses.dataclass(frozen=True)
class Options:
    """No settings beyond DALConfig's."""


def preset(size: int = 8):
    from sijax.configs import dal_v5

    return dal_v5.get_config(size)


def draw_noises(key, image_shape, options, steps: int = 5):
    from sijax.diffusion.sampler import draw_noises as sampler_noises

    del options
    return sampler_noises(key, tuple(image_shape), steps)


DETECTOR = Detector(
    name="dal", title="DAL: DDIM reconstruction from t = 460, filtered |error|",
    options=Options, preset=preset, draw_noises=draw_noises,
)
