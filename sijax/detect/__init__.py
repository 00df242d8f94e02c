"""Score maps, regions and the end-to-end DAL test of one image (or a batch)."""

from sijax.detect.models import ReconstructionModel, Reconstructor
from sijax.detect.permutation import PermutationResult, permutation_test

__all__ = [
    "PermutationResult",
    "ReconstructionModel",
    "Reconstructor",
    "permutation_test",
]
