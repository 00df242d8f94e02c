"""One image of a data set through the DAL test, as ``sijax evaluate`` runs it.

The null hypothesis on real images (docs/noise_models.md): a normal image is the
template (the mean of the normal training images) plus Gaussian variation with the
covariance estimated from them. The reference is the template itself, whose own
covariance is that of a mean of ``n_images`` images. The test asks whether the
detected region's mean departs from the template's by more than normal variation
would, given that the region was selected.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from sijax.detect.dal import DALConfig, dal_test, draw_noises
from sijax.errors import InputError, InputWarning


class Reference(NamedTuple):
    """What a test image is compared with, and the covariances of the test.

    Attributes:
      x_ref: (H, W, C) float64 reference image (the template, a user's image), or
        None (background and neighbour tests need none).
      sigma: covariance of a test image (anything ``sijax.as_covariance`` takes).
      sigma_ref: covariance of the reference (None: ``sigma``).
      name: how it was chosen, for the records ("model:lowrank", "1.0", ...).
    """

    x_ref: np.ndarray
    sigma: Any
    sigma_ref: Any
    name: str


def resolve_reference(model, sigma, reference=None, *,
                      reference_path: str | None = None) -> Reference:
    """The reference image and covariances of a test, from what a user gives.

    Args:
      model: the loaded model.
      sigma: "model" or "model:KIND" (the noise model stored with a data-trained
        model: "pixel", "stationary" or "lowrank"), or any covariance
        ``sijax.as_covariance`` takes (a variance, "iid", "corr", an array).
      reference: None (no reference: background/neighbour tests, or the template
        with a noise model), "template" (the mean of the normal training images),
        or a raw reference image as read from its file (preprocessed here).
      reference_path: the reference's file, named in messages.

    With a noise model, a reference image gets the covariance of one normal image
    and the template that of a mean of ``n_images`` images. Otherwise the reference
    gets ``sigma`` too (the paper's setting).

    Raises:
      InputError: "model" for a model that stores no noise model, "template"
        without one, or an unknown kind.
    """
    use_model = isinstance(sigma, str) and (sigma == "model"
                                            or sigma.startswith("model:"))
    if use_model or (isinstance(reference, str) and reference == "template"):
        kind = sigma.split(":", 1)[1] if use_model and ":" in sigma else None
        nm = model.noise_model(kind)
        name = f"model:{kind or model.info.noise_model}"
        if not use_model:
            raise InputError("--reference template needs --sigma model (the template's "
                             "covariance comes from the stored noise model)")
        if reference is None or (isinstance(reference, str)
                                 and reference == "template"):
            return Reference(np.asarray(nm.mean, np.float64), nm.covariance(),
                             nm.template_covariance(), name)
        x_ref = model_input(model, reference, reference_path)
        return Reference(x_ref, nm.covariance(), nm.covariance(), name)
    x_ref = None if reference is None else model_input(model, reference,
                                                        reference_path)
    label = sigma if isinstance(sigma, (int, float, str)) else "array"
    return Reference(x_ref, sigma, None, str(label))


def model_input(model, raw, path: str | os.PathLike | None = None) -> np.ndarray:
    """A raw image (as read from its file) as the model's input (H, W, C) float64:
    the model's recorded preprocessing, with its checks (a warning when the image is
    far from the training images, an error for channels it cannot convert). Models
    trained without data take the image as it is, scaled by its bit depth (uint8
    / 255, uint16 / 65535, floats unchanged)."""
    from sijax.data.images import scale_intensity, validate_image

    prep = model.preprocessing
    if prep is None:
        where = "image" if path is None else os.fspath(path)
        return validate_image(scale_intensity(np.asarray(raw), where),
                              model.image_shape)
    return prep.check_input(raw, path)


# Kinds of input warning already shown by this process (message, image named
# "<image>"): an evaluation of many images shows each kind once and records every
# image's warnings with its record.
_SHOWN: set = set()


def noted_input(model, raw, item) -> tuple[np.ndarray, list[str]]:
    """:func:`model_input` for one image of a data set, its input warnings
    (:class:`~sijax.errors.InputWarning`: another channel count, size or intensity
    than the training images) returned for its record instead of printed for every
    image: each kind is shown once per process, with a pointer to the records."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        x = model_input(model, raw, item.name)
    notes = []
    for w in caught:
        if not issubclass(w.category, InputWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        text = str(w.message)
        notes.append(text)
        kind = text.replace(item.name, "<image>")
        if kind not in _SHOWN:
            _SHOWN.add(kind)
            warnings.warn(InputWarning(
                f"{text} (further images with this warning: their records' "
                "'warnings' in images.jsonl)"), stacklevel=2)
    return x, notes


def run_image_test(model, x, reference: Reference, *, config: DALConfig,
                   key) -> tuple:
    """The DAL test of one preprocessed image against ``reference``.

    Returns:
      (record dict, TestResult): the record holds the fields of ``images.jsonl``
      that depend on the test (region_size, stat, p_value, inf_p, sup_p,
      naive_p_value, p_text, p_exact, status, message, pieces, seconds, reject,
      naive_reject).
    """
    noises = draw_noises(key, model, config)
    t0 = time.perf_counter()
    res = dal_test(model, x, reference.x_ref, sigma=reference.sigma,
                   sigma_ref=reference.sigma_ref, noises=noises, config=config)
    seconds = time.perf_counter() - t0
    tested = res.status in ("ok", "max_pieces")
    rec = {
        "region_size": int(res.mask.sum()),
        "stat": _num(res.stat),
        "p_value": _num(res.p_value),
        "inf_p": _num(res.inf_p),
        "sup_p": _num(res.sup_p),
        "naive_p_value": _num(res.naive_p_value),
        # The p-value as it is known (a point only when the search pinned it down).
        "p_text": res.p_text() if tested else None,
        "p_exact": bool(tested and res.p_exact),
        "status": str(res.status),
        "message": res.message,
        "pieces": int(res.search_count),
        "seconds": seconds,
        # Rejection at alpha: with a "decision" search only the side of alpha is
        # known, and sup_p < alpha is what decides it (both agree otherwise).
        "reject": bool(tested and res.sup_p < config.alpha),
        "naive_reject": bool(tested and res.naive_p_value < config.alpha),
    }
    return rec, res


def run_image_score(model, x, *, config: DALConfig, key) -> dict:
    """The whole-image score of an image-level detector (DiffPath) for one image.

    Returns:
      The record fields of ``images.jsonl``: image_score, status "image_level",
      no region and no test (reject False), seconds.
    """
    noises = draw_noises(key, model, config)
    t0 = time.perf_counter()
    score = float(model.image_score(jax.numpy.asarray(x), noises))
    return {"image_score": score, "status": "image_level", "region_size": 0,
            "pieces": 0, "seconds": time.perf_counter() - t0, "reject": False,
            "naive_reject": False, "p_value": None, "sup_p": None}


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def image_key(seed: int, index: int) -> jax.Array:
    """The key of the sampler noises of image ``index``: a function of (seed, index)
    only, so any image's test can be rerun on its own."""
    return jax.random.fold_in(jax.random.key(seed), index)


def check_reference_shape(model, reference: Reference) -> None:
    if tuple(reference.x_ref.shape) != tuple(model.image_shape):
        raise InputError(f"reference shape {reference.x_ref.shape} does not match "
                         f"the model's {model.image_shape}")
