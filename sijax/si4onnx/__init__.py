"""si4onnx's API on sijax's engine: change ``import si4onnx`` to
``import sijax.si4onnx as si4onnx`` (docs/si4onnx.md).

The public API of si4onnx 0.1.13: :func:`load`, the preset hypotheses
(:class:`BackMeanDiff`, :class:`NeighborMeanDiff`, :class:`ReferenceMeanDiff`), the
post-processing operators (:class:`InputDiff`, :class:`Neg`, :class:`Abs`,
:class:`AverageFilter`, :class:`GaussianFilter`, :class:`L1Norm`),
:class:`NoHypothesisError`, and the model's ``inference`` with its
:class:`InferenceResult`; :class:`RealSubset` (sicore's, what callable search
strategies and termination criteria receive). ``sijax.si4onnx.hypothesis`` and
``sijax.si4onnx.operators`` stand for si4onnx's modules of the same names.

The test runs in float64, as si4onnx's: :func:`load` switches JAX's x64 mode on
if it is off (it is this API's entry point; a si4onnx script has no JAX set-up).
The ``onnx`` package is needed (``pip install sijax[onnx]``); torch is not.
"""

from sijax.si4onnx.host_search import RealSubset
from sijax.si4onnx.hypothesis import (
    BackMeanDiff,
    Hypothesis,
    NeighborMeanDiff,
    NoHypothesisError,
    PresetHypothesis,
    ReferenceMeanDiff,
)
from sijax.si4onnx.operators import (
    Abs,
    AverageFilter,
    GaussianFilter,
    InputDiff,
    L1Norm,
    Neg,
    Operator,
)
from sijax.si4onnx.si import (
    InferenceResult,
    InfiniteLoopError,
    PresetSelectiveInferenceModel,
    SelectiveInferenceModel,
    load,
)

__all__ = [
    "Abs",
    "AverageFilter",
    "BackMeanDiff",
    "GaussianFilter",
    "Hypothesis",
    "InferenceResult",
    "InfiniteLoopError",
    "InputDiff",
    "L1Norm",
    "Neg",
    "NeighborMeanDiff",
    "NoHypothesisError",
    "Operator",
    "PresetHypothesis",
    "PresetSelectiveInferenceModel",
    "RealSubset",
    "ReferenceMeanDiff",
    "SelectiveInferenceModel",
    "load",
]
