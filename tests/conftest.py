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
