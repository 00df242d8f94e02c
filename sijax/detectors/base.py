"""What a diffusion detector is to sijax: one :class:`Detector` record per method.

A detector is a trained network ``eps_fn(x_t, t)`` (the U-Net of
:mod:`sijax.diffusion.unet`, whatever it was trained to predict) plus pure functions
of explicit inputs:

* ``draw_noises(key, image_shape, options) -> pytree`` draws every random tensor of one
  test up front (STYLE habit 2), so that
* ``reconstruction(eps_fn, x, noises, *, schedule, options) -> (H, W, C)`` is a
  deterministic function of the image, piecewise linear in ``x`` (the tracker follows
  it along a line), and
* ``score(x, rec, options) -> (H, W)`` turns image and reconstruction into the anomaly
  map whose super-level set ``score > threshold`` is the detected region (None: the
  paper's ``sum_c |mean_filter(rec - x)_c|`` with ``DALConfig.filter_size``).
* ``loss(apply, schedule, x0, key, options) -> scalar`` is the training objective
  (None: the noise-prediction loss of DDPM), with ``apply(x (B, H, W, C), t (B,))``
  the network in training mode.
* ``image_score(eps_fn, x, noises, *, schedule, options) -> ()`` for detectors that
  score whole images only (DiffPath); such a detector has no region to test.
* ``fit(model, images) -> dict`` (image-level detectors) fits what the score needs
  on normal images (N, H, W, C) when the model is trained on data (a density of the
  path statistics); the JSON dict is stored in the model directory, and
  ``fitted_score(model, fit, x) -> float`` then scores one image with it.
* ``testable(options) -> str | None`` says why a p-value cannot be computed with these
  options (a published, non-piecewise-linear form kept for detection only), or None.

The options are a frozen dataclass of the detector's own settings (its test-time
schedule, filter, guidance weight, ...). They are stored in the model directory with
the training config (``TrainConfig.detector_options``) and can be overridden there by
``sijax train --set NAME=VALUE``, or after loading by ``model.with_options(...)``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from sijax.errors import InputError

__all__ = ["Detector", "options_from_items", "options_items"]


def _always_testable(options) -> str | None:
    del options
    return None


@dataclasses.dataclass(frozen=True)
class Detector:
    """One detection method (module docstring for the signatures).

    Attributes:
        name: registry name (``sijax train --detector NAME``).
        title: one line for listings and reports.
        options: the frozen dataclass type of its settings; its defaults are the
            method's defaults.
        preset: ``preset(size) -> TrainConfig`` with ``detector=name``: the default
            training recipe at image side ``size``.
        draw_noises: see the module docstring.
        reconstruction: see the module docstring (None for image-level detectors).
        score: see the module docstring (None: the paper's filtered error).
        loss: see the module docstring (None: noise prediction).
        image_score: see the module docstring (None: region detectors).
        fit, fitted_score: see the module docstring (None: nothing to fit).
        testable: see the module docstring.
    """

    name: str
    title: str
    options: type
    preset: Callable[..., Any]
    draw_noises: Callable[..., Any]
    reconstruction: Callable[..., Any] | None = None
    score: Callable[..., Any] | None = None
    loss: Callable[..., Any] | None = None
    image_score: Callable[..., Any] | None = None
    fit: Callable[..., dict] | None = None
    fitted_score: Callable[..., float] | None = None
    testable: Callable[[Any], str | None] = _always_testable

    @property
    def has_region(self) -> bool:
        """Whether the detector gives a region (and so a region test)."""
        return self.image_score is None


def _parse(name: str, raw, typ):
    from sijax.config import parse_value

    if not isinstance(raw, str) or typ is str:
        return raw
    return parse_value(name, raw, typ)


def options_from_items(detector: Detector, items) -> Any:
    """The detector's options from ``(name, value)`` pairs (values may be strings, as
    given to ``--set``).

    Raises:
        InputError: an unknown name (the message lists the valid ones) or a value
            the options reject.
    """
    fields = {f.name for f in dataclasses.fields(detector.options)}
    hints = typing.get_type_hints(detector.options)
    kwargs = {}
    for name, raw in items:
        if name not in fields:
            raise InputError(
                f"unknown option {name!r} of detector {detector.name!r}; valid: "
                f"{', '.join(sorted(fields)) or '(none)'}")
        kwargs[name] = _parse(name, raw, hints[name])
    try:
        return detector.options(**kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"{detector.name} options: {e}") from None


def options_items(options) -> tuple[tuple[str, Any], ...]:
    """The options as sorted ``(name, value)`` pairs with JSON-friendly values
    (tuples stay tuples), as stored in ``TrainConfig.detector_options``."""
    return tuple(sorted((f.name, getattr(options, f.name))
                        for f in dataclasses.fields(options)))
