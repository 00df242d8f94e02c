"""The diffusion detectors sijax trains and tests (docs/detectors.md).

Each lives in its own module that defines ``DETECTOR``, a
:class:`sijax.detectors.base.Detector`; :func:`get_detector` imports it on first use.

    dal        the DAL paper's: DDIM reconstruction from t = 460, filtered |error|
    deco_diff  DeCo-Diff: deviation correction from t0 (cosine schedule, T = 10)
    mdps       MDPS: masked diffusion posterior sampling (guided by the image)
    anoddpm    AnoDDPM: partial diffusion with multi-scale simplex noise
    ddad       DDAD: denoising conditioned on the test image
    diffpath   DiffPath: image-level score from the DDIM inversion path (no region)
"""

import importlib

from sijax.detectors.base import Detector, options_from_items, options_items
from sijax.errors import InputError

__all__ = ["DETECTORS", "Detector", "get_detector", "options_from_items",
           "options_items"]

DETECTORS = ("dal", "deco_diff", "mdps", "anoddpm", "ddad", "diffpath")


def get_detector(name: str) -> Detector:
    """The :class:`Detector` registered as ``name``.

    Raises:
        InputError: an unknown name (the message lists the valid ones).
    """
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}")
    try:
        module = importlib.import_module(f"sijax.detectors.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"sijax.detectors.{name}":
            raise
        raise InputError(f"detector {name!r} is not available in this version of "
                         "sijax") from None
    return module.DETECTOR
