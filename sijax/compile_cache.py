"""JAX's persistent compilation cache: compiled programs kept on disk across runs.

Compilation is a large part of a short run's wall time (about 10 of the 22 s of
``sijax demo`` on one core here), and the programs are the same from one run to the
next. With the cache on, a later run loads them instead (``sijax demo``: 22 -> 10 s
wall, measured; benchmarks/README.md, "Compilation cache"). The CLI switches it on;
library users call :func:`enable_compilation_cache` in their entry point.

Where: ``$SIJAX_COMPILE_CACHE`` (a directory, or ``off``), else
``$XDG_CACHE_HOME/sijax/jax``, else ``~/.cache/sijax/jax``. Deleting the directory is
always safe. An entry that cannot be read (a run killed while writing it) costs a
warning and a fresh compilation, never a wrong result: JAX keys each entry by the
program, the compile options, the device and the JAX/XLA versions.
"""

import os
import warnings

ENV = "SIJAX_COMPILE_CACHE"
_OFF = ("", "0", "off", "false", "no", "none")


def cache_dir() -> str | None:
    """The cache directory the environment asks for (``None``: switched off)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sijax", "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Switches on JAX's persistent compilation cache in ``path`` (default:
    :func:`cache_dir`); returns the directory used, or ``None`` when switched off.

    Every compiled program is kept, however small or quick to compile: the search
    compiles many small ones (the propagation engine 513 for the 16x16 demo, one per
    run of equations and bucket size), which JAX's defaults (programs compiled in
    under a second are not kept) would leave out. Processes started afterwards
    (``sijax experiment --workers``) inherit the directory through
    ``$SIJAX_COMPILE_CACHE``.
    A directory that cannot be created leaves the cache off with a warning: a cache
    never stops a run. Call it before the first compilation; later calls in the
    same process do not move a cache JAX has already opened.
    """
    import jax

    path = cache_dir() if path is None else os.fspath(path)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache off: cannot create {path!r} "
                      f"({e.strerror or e}); set {ENV}=off to silence this",
                      stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    os.environ[ENV] = path
    return path
