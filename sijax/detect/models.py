"""Models the DAL test can run on: the detector protocol.

:func:`sijax.dal_test` needs two things of a model: ``image_shape`` (H, W, C) and
``reconstruction(x, noises, *, steps, eta) -> D(x)``, a pure function of one image that
is piecewise linear in ``x`` (so the tracker can follow it). A trained
:class:`sijax.checkpoint.DiffusionModel` is one; :class:`ReconstructionModel` turns any
function ``fn(params, x)`` into one (an ONNX graph with its noises baked in, another
diffusion detector, a toy map for tests). Both are pytrees, so they cross ``jit`` and
``vmap`` as ordinary arguments and their arrays are traced, not baked into the program.

A detector whose anomaly score is not the paper's ``sum_c |filter(D(X) - X)_c|``
(another filter, a max over channels, a distance of features) also gives
``score_fn(x, rec) -> (H, W)``, piecewise linear in both; the region is then
``score_fn > threshold`` for detection and test alike (``DALConfig.filter_size`` is
not used). Without it the paper's score applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
from flax import struct

from sijax.errors import InputError

__all__ = ["Reconstructor", "ReconstructionModel"]


class Reconstructor(Protocol):
    """What the DAL test asks of a model."""

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def reconstruction(
        self, x: jax.Array, noises, *, steps, eta: float
    ) -> jax.Array: ...

    # Optional: score_fn(x, rec) -> (H, W) score map (the module docstring).


@struct.dataclass
class ReconstructionModel:
    """A detector given by a pure reconstruction function.

    Attributes:
      fn: ``fn(params, x) -> D(x)`` for one (H, W, C) float64 image (static; must be
        hashable, e.g. a module-level function). It receives no noises: a function
        with randomness must have it fixed inside (as an exported ONNX sampler does).
      image_shape: (H, W, C) (static).
      params: pytree of arrays ``fn`` reads (traced).
      score_fn: ``score_fn(x, rec) -> (H, W)`` anomaly score (static; None: the
        paper's filtered absolute error).
    """

    fn: Callable[[Any, jax.Array], jax.Array] = struct.field(pytree_node=False)
    image_shape: tuple[int, int, int] = struct.field(pytree_node=False)
    params: Any = None
    score_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = struct.field(
        pytree_node=False, default=None
    )

    def reconstruction(self, x: jax.Array, noises, *, steps, eta: float) -> jax.Array:
        """``fn(params, x)``; ``noises``, ``steps`` and ``eta`` are not used."""
        del noises, steps, eta
        rec = self.fn(self.params, x)
        if rec.shape != x.shape:
            raise InputError(
                f"the reconstruction has shape {rec.shape}, the image {x.shape}"
            )
        return rec
