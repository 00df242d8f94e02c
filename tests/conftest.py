"""Strict harness: float64, no rank promotion, fake devices."""

import os

# Several fake CPU devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# No persistent compilation cache in the test process (the CLI would switch it on):
# tests write nothing outside their temporary directories; test_compile_cache.py
# runs the cache in subprocesses.
os.environ["SIJAX_COMPILE_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY = os.environ.get("SIJAX_TINY") or os.path.join(
    os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8")


@pytest.fixture(scope="module")
def model():
    """The committed tiny_8 model (a module may define its own ``model``)."""
    from sijax.checkpoint import load_model

    return load_model(TINY)


@pytest.fixture(scope="module")
def example(model):
    """An image with a planted +3 square, its reference, and sampler noises."""
    from sijax.detect.dal import draw_noises

    shape = model.image_shape
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    x[2:5, 3:6] += 3.0
    x_ref = rng.standard_normal(shape)
    return x, x_ref, draw_noises(jax.random.key(7), shape)


@pytest.fixture(scope="module", autouse=True)
def _fresh_compilation_caches():
    """Drops JAX's in-memory compilation caches after each test module, so that
    the process does not keep every program of the default run (thousands). One
    idle run of it crashed (a segmentation fault inside tracing, at test 581 of
    626, tests that pass on their own); whether the caches were the cause is not
    known. A module's programs are not reused by the next."""
    yield
    jax.clear_caches()
