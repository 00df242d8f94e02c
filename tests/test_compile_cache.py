"""The persistent compilation cache the CLI switches on (sijax.compile_cache).

The cache itself runs in subprocesses: JAX opens it once per process, and the test
process keeps it off (conftest.py).
"""

import json
import os
import subprocess
import sys

import pytest

from sijax import compile_cache

# The CLI's JAX set-up, then one compiled program; prints its result and how many
# programs came from the cache (JAX's own monitoring events).
SCRIPT = """
import json, jax, jax.numpy as jnp
from sijax.cli import _configure_jax
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
_configure_jax()
f = jax.jit(lambda x: jnp.maximum(x, 0.0) @ x.T)
y = f(jnp.arange(12.0).reshape(3, 4) - 5.0)
print(json.dumps({"y": y.tolist(), "dtype": str(y.dtype),
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _run(tmp_path, cache: str):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(SIJAX_COMPILE_CACHE=cache, XDG_CACHE_HOME=str(tmp_path / "xdg"),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_the_cli_fills_the_cache_reads_it_and_survives_damaged_entries(tmp_path):
    cache = tmp_path / "cache"
    first, _ = _run(tmp_path, str(cache))
    assert first["dtype"] == "float64" and first["hits"] == 0
    entries = [p for p in cache.iterdir() if p.is_file()]
    assert entries, "nothing was written to the cache"

    second, _ = _run(tmp_path, str(cache))
    assert second["hits"] >= 1 and second["y"] == first["y"]

    for p in entries:  # a run killed while writing leaves such files behind
        p.write_bytes(b"not an executable")
    third, err = _run(tmp_path, str(cache))
    assert third["y"] == first["y"] and third["hits"] == 0
    # JAX warns, compiles afresh, and goes on
    assert "Error reading persistent compilation cache entry" in err


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_off_writes_nothing(tmp_path, value):
    result, _ = _run(tmp_path, value)
    assert result["hits"] == 0
    assert not (tmp_path / "xdg").exists()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == os.path.join(str(tmp_path), "sijax", "jax")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "here"))
    assert compile_cache.cache_dir() == str(tmp_path / "here")
    monkeypatch.setenv(compile_cache.ENV, "Off")
    assert compile_cache.cache_dir() is None


def test_a_directory_that_cannot_be_made_leaves_the_cache_off(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "off")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="compilation cache off"):
        assert compile_cache.enable_compilation_cache(blocker / "cache") is None
    assert os.environ[compile_cache.ENV] == "off"
