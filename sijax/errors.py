"""Errors that sijax raises on purpose; the CLI prints them without a traceback."""


class SijaxError(Exception):
    """Base class of every error sijax raises deliberately."""


class InputError(SijaxError, ValueError):
    """Bad user input: wrong shape, NaN/Inf, unknown preset or key, bad covariance."""


class CheckpointError(SijaxError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class NotPiecewiseLinearError(SijaxError, TypeError):
    """The traced function uses a primitive that is not piecewise linear in the line."""
