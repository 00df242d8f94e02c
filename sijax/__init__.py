"""sijax: diffusion-based anomaly localization with exact selective p-values.

The public API. x64 is not switched on here: call
``jax.config.update("jax_enable_x64", True)`` in your entry point (the CLI does).
"""

__version__ = "0.1.0"

from sijax import onnx  # sijax.onnx.load (the onnx package is imported lazily)
from sijax.checkpoint import DiffusionModel, ModelInfo, load_model
from sijax.config import TrainConfig
from sijax.data import Preprocessing, open_dataset
from sijax.detect.dal import (
    BatchResult,
    ComponentResult,
    DALConfig,
    Engine,
    TestResult,
    dal_test,
    dal_test_batch,
    detect_region,
    draw_noises,
    label_components,
)
from sijax.detect.models import ReconstructionModel
from sijax.detect.permutation import PermutationResult, permutation_test
from sijax.diffusion.sampler import Noises, reconstruct
from sijax.errors import (
    CheckpointError,
    InputError,
    InputWarning,
    NoiseModelWarning,
    NotPiecewiseLinearError,
    SearchError,
    SijaxError,
    SijaxWarning,
)
from sijax.noise_model import NoiseModel, check_noise_model, estimate_noise_model
from sijax.selective import (
    AR1Covariance,
    Intervals,
    LineStatistic,
    LowRankDiagonalCovariance,
    OperatorCovariance,
    SearchResult,
    SearchStatus,
    StationaryCovariance,
    as_covariance,
    bonferroni_p_value,
    line_statistic,
    naive_p_value,
    search,
    selective_p_value,
)
from sijax.selective.search import Progress
from sijax.status import Status
from sijax.tracking import Affine, Piece, Pieces, enumerate_pieces, evaluate, track

__all__ = [
    "AR1Covariance",
    "Affine",
    "BatchResult",
    "CheckpointError",
    "ComponentResult",
    "DALConfig",
    "DiffusionModel",
    "Engine",
    "InputError",
    "InputWarning",
    "Intervals",
    "LineStatistic",
    "LowRankDiagonalCovariance",
    "ModelInfo",
    "NoiseModel",
    "NoiseModelWarning",
    "Noises",
    "NotPiecewiseLinearError",
    "OperatorCovariance",
    "PermutationResult",
    "Piece",
    "Pieces",
    "Preprocessing",
    "Progress",
    "ReconstructionModel",
    "SearchError",
    "SearchResult",
    "SearchStatus",
    "SijaxError",
    "SijaxWarning",
    "StationaryCovariance",
    "Status",
    "TestResult",
    "TrainConfig",
    "as_covariance",
    "bonferroni_p_value",
    "check_noise_model",
    "dal_test",
    "dal_test_batch",
    "detect_region",
    "draw_noises",
    "enumerate_pieces",
    "estimate_noise_model",
    "evaluate",
    "label_components",
    "line_statistic",
    "load_model",
    "naive_p_value",
    "onnx",
    "open_dataset",
    "permutation_test",
    "reconstruct",
    "search",
    "selective_p_value",
    "track",
]
