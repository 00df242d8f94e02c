"""Errors that sijax raises on purpose; the CLI prints them without a traceback."""


class SijaxError(Exception):
    """Base class of every error sijax raises deliberately."""


class InputError(SijaxError, ValueError):
    """Bad user input: wrong shape, NaN/Inf, unknown preset or key, bad covariance."""


class CheckpointError(SijaxError):
    """A checkpoint directory is missing, incomplete or corrupt."""


class NotPiecewiseLinearError(SijaxError, TypeError):
    """The traced function uses a primitive that is not piecewise linear in the line."""


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
