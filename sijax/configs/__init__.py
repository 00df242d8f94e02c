"""Presets: small files with a ``get_config()`` each."""

from sijax.configs import dal_v5, tiny
from sijax.errors import InputError

PRESETS = {"dal_v5": dal_v5.get_config, "tiny": tiny.get_config}


def get_config(name: str, **kwargs):
    """Returns the preset ``name`` (a ``TrainConfig``).

    Raises:
        InputError: unknown preset; the message lists the valid ones.
    """
    if name not in PRESETS:
        raise InputError(
            f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)
