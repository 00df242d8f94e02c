"""Errors that sijax raises on purpose; the CLI prints them without a traceback."""


class SijaxError(Exception):
    """Base class of every error sijax raises deliberately."""


class InputError(SijaxError, ValueError):
    """Bad user input: wrong shape, NaN/Inf, unknown preset or key, bad covariance."""


class CheckpointError(SijaxError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class NotPiecewiseLinearError(SijaxError, TypeError):
    """The traced function uses a primitive that is not piecewise linear in the line."""


class LineDependentControlError(SijaxError, NotImplementedError):
    """`cond` or `while` whose predicate depends on the line: the propagation engine
    (:func:`sijax.tracking.enumerate_line`) cannot follow it (the walking tracker,
    :func:`sijax.tracking.enumerate_pieces`, can)."""


class UnsupportedOperatorError(InputError):
    """The ONNX graph uses an operator (or an operator option) sijax cannot import.

    Attributes:
      op_type: the ONNX operator type, e.g. ``"Softmax"``.
      node_name: the name of the offending node ('' when the node has none).
    """

    def __init__(self, op_type: str, node_name: str, detail: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        where = f"node {node_name!r}" if node_name else "an unnamed node"
        msg = f"unsupported ONNX operator {op_type!r} at {where}"
        if detail:
            msg += f": {detail}"
        else:
            from sijax.onnx import SUPPORTED_OPS

            msg += f" (supported: {', '.join(sorted(SUPPORTED_OPS))})"
        super().__init__(msg)


class SearchError(SijaxError, RuntimeError):
    """A search along the line failed or stopped early where ``throw=True`` was asked
    for: the cap ``max_pieces`` was hit, the piece oracle stalled, the piece at z_obs
    did not reproduce the observed region, or a piece end was NaN."""


class MaxPiecesError(SearchError):
    """:func:`sijax.tracking.enumerate_pieces` ran out of room (status MAX_PIECES)
    with ``throw=True``."""


class SijaxWarning(UserWarning):
    """Base class of the warnings sijax issues on purpose."""


class InputWarning(SijaxWarning):
    """An input sijax can process but whose answer may mislead (an image far from
    the training images, a model without a calibrated threshold)."""


class NoiseModelWarning(SijaxWarning):
    """A noise-model estimate needed its variance floor (pixels with no variation)."""


def ensure_output_dir(path) -> str:
    """Creates ``path`` if needed and checks that files can be written in it.

    Called before long work (a test, an experiment), so that a bad ``--out`` fails at
    once instead of after the results are computed.

    Raises:
      InputError: the directory cannot be created or is not writable.
    """
    import os
    import tempfile

    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise InputError(
            f"cannot write to the output directory {path!r}: {e.strerror or e}"
        ) from None
    return path
