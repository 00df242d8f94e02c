"""sijax against the authors' toolchain (si4onnx 0.1.13 + sicore 3.0.0), side by side.

One network, one set of images, one search, the same cores:

1. The v5 U-Net (docs/method.md §6) with fixed weights (the committed ``dal_v5_{size}``
   checkpoint when there is one, else a seeded random initialisation) and the DDIM
   reconstruction with fixed noises baked in is built in PyTorch and exported to ONNX
   (float32, opset 12, Identity nodes removed: what si4onnx 0.1.13 accepts).
2. si4onnx runs the reference-image DAL test (``ReferenceMeanDiff`` with
   ``InputDiff -> AverageFilter(3) -> Abs``, threshold 0.8, variance 1) on that file in
   a virtual environment this script creates (si4onnx and sicore need numpy < 2, so
   they never enter sijax's environment).
3. sijax runs the same test on the same ONNX file (``sijax.onnx.load`` behind a
   ``ReconstructionModel``) and on the same network built natively (the torch weights
   converted into a ``DiffusionModel``), with the same noises, images and search.

The p-value is sicore's equal-tailed ``2 min(F, 1 - F)`` (sijax ``alternative=
"two-sided"``). Both sides are pinned to the same cores (``taskset``-style affinity;
for one thread also ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`` and ``torch.set_num_threads(1)``).

Each side runs in a fresh process (si4onnx in its venv, sijax once for the ONNX
graph and once natively), so two times are measured:

- warm: seconds per p-value, sijax after one untimed test of the first image (its
  compilation; one compile serves every image), si4onnx as it comes;
- cold: wall time from launching the process (interpreter start, imports, model
  load and, for sijax, every compilation included) to the first image's p-value.
  sijax starts with JAX's persistent compilation cache switched off and pointed at
  a fresh empty directory (``JAX_ENABLE_COMPILATION_CACHE=false``,
  ``JAX_COMPILATION_CACHE_DIR``, ``SIJAX_COMPILE_CACHE=off``); the worker counts the
  XLA programs compiled (``jax.monitoring`` duration events
  ``/jax/core/compile/backend_compile_duration``) and the cache hits (none).

Usage::

    python benchmarks/vs_si4onnx.py --size 16 --images 3 --threads 1 \\
        [--search exhaustive|precision] [--engine propagate|walk] [--out DIR]

sijax runs with ``DALConfig(engine=...)``: "propagate" (the default here) or "walk".
The last line printed is one JSON object with size, images, threads,
si4onnx_seconds, sijax_seconds (medians per p-value), ratio (warm),
si4onnx_first_seconds, sijax_first_seconds, ratio_cold, sijax_compile_seconds (the
cold first test minus the warm test of the same image), sijax_programs,
max_p_difference, p_agree and cpu_share (each process's CPU time over its wall
time: below 1 when other work took turns on its cores). The raw per-image outputs
and that summary go to ``DIR/<size>_<search>_<engine>.json`` (default
benchmarks/results/vs_si4onnx; ``--no-write``: nowhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "sijax-vs-si4onnx")
VENV_PACKAGES = (
    ["torch==2.13.0"],  # a CPU build (see the repository's notes); installed first
    ["si4onnx==0.1.13", "sicore==3.0.0", "onnx", "numpy<2"],
)
CHANNELS = (32, 64, 128, 256)
STEPS = (460, 345, 230, 115, 0)
THRESHOLD = 0.8
# si4onnx 0.1.13 builds its threshold as torch.tensor(threshold).double(): lambda is
# rounded to float32 first (0.8 -> 0.800000011920929). sijax gets the same lambda;
# with 0.8 itself the region boundaries differ by ~1e-7 in z and the p-values by
# ~1e-7 (measured: 9.5e-8 at 8x8, 2.5e-6 at 16x16).
SIJAX_THRESHOLD = float(np.float32(THRESHOLD))


# ------------------------------------------------------ weights: sijax <-> torch


def _block_names(depth: int) -> list[str]:
    names = [f"down.{i}" for i in range(depth - 1)] + ["mid"]
    return names + [f"up.{i}" for i in range(depth - 1)]


def sijax_to_torch(pure: dict, depth: int) -> dict[str, np.ndarray]:
    """A sijax U-Net state (``nnx.to_pure_dict``) as a torch ``state_dict``."""
    out = {}
    for name in _block_names(depth):
        part, *idx = name.split(".")
        blk = pure[part][int(idx[0])] if idx else pure[part]
        for lin in ("mlp1", "mlp2"):
            out[f"{name}.{lin}.weight"] = np.asarray(blk[lin]["kernel"]).T
            out[f"{name}.{lin}.bias"] = np.asarray(blk[lin]["bias"])
        out[f"{name}.conv.weight"] = np.asarray(blk["conv"]["kernel"]).transpose(
            3, 2, 0, 1
        )
        out[f"{name}.conv.bias"] = np.asarray(blk["conv"]["bias"])
        for t, s in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                     ("running_var", "var")):  # fmt: skip
            out[f"{name}.bn.{t}"] = np.asarray(blk["bn"][s])
    out["out.weight"] = np.asarray(pure["out"]["kernel"]).transpose(3, 2, 0, 1)
    out["out.bias"] = np.asarray(pure["out"]["bias"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def torch_to_sijax(state: dict[str, np.ndarray], pure: dict, depth: int) -> dict:
    """The inverse of :func:`sijax_to_torch`: fills a template pure dict."""
    for name in _block_names(depth):
        part, *idx = name.split(".")
        blk = pure[part][int(idx[0])] if idx else pure[part]
        for lin in ("mlp1", "mlp2"):
            blk[lin]["kernel"] = state[f"{name}.{lin}.weight"].T
            blk[lin]["bias"] = state[f"{name}.{lin}.bias"]
        blk["conv"]["kernel"] = state[f"{name}.conv.weight"].transpose(2, 3, 1, 0)
        blk["conv"]["bias"] = state[f"{name}.conv.bias"]
        for t, s in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                     ("running_var", "var")):  # fmt: skip
            blk["bn"][s] = state[f"{name}.bn.{t}"]
    pure["out"]["kernel"] = state["out.weight"].transpose(2, 3, 1, 0)
    pure["out"]["bias"] = state["out.bias"]
    return pure


def ddim_constants() -> dict:
    """Schedule constants of the DAL reconstruction (docs/method.md §6), float64."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1.0 - betas)
    t = np.asarray(STEPS)
    s = np.append(t[1:], -1)
    ab_t = ab[t]
    ab_s = np.where(s < 0, 1.0, ab[np.clip(s, 0, None)])
    c1 = np.sqrt((1.0 - ab_t / ab_s) * (1.0 - ab_s) / (1.0 - ab_t))
    c2 = np.sqrt(np.maximum(1.0 - ab_s - c1**2, 0.0))
    return dict(t=t, ab_t=ab_t, ab_s=ab_s, c1=c1, c2=c2)


# ------------------------------------------------ the torch side (in the venv)


def _torch_worker_build(work: str, size: int) -> None:
    """Builds the torch reconstruction, exports ONNX (opset 12, float32)."""
    import onnx
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(0)
    depth = len(CHANNELS)

    def temb(t: float, dim: int = 100) -> np.ndarray:
        i = np.arange(dim)
        arg = t / np.power(10000.0, i / dim)
        return np.where(i % 2 == 0, np.sin(arg), np.cos(arg))

    class Block(torch.nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.mlp1 = torch.nn.Linear(100, cin)
            self.mlp2 = torch.nn.Linear(cin, cin)
            self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(cout, eps=1e-5)

        def forward(self, x, te):
            h = x + self.mlp2(F.relu(self.mlp1(te)))[:, :, None, None]
            return F.relu(self.bn(self.conv(h)))

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            ch = CHANNELS
            self.down = torch.nn.ModuleList(
                [Block(1 if i == 0 else ch[i - 1], ch[i]) for i in range(depth - 1)]
            )
            self.mid = Block(ch[-2], ch[-1])
            self.up = torch.nn.ModuleList(
                [Block(ch[i + 1] + ch[i], ch[i]) for i in range(depth - 1)]
            )
            self.out = torch.nn.Conv2d(ch[0], 1, 1)

        def forward(self, x, te):
            skips = []
            h = x
            for blk in self.down:
                h = blk(h, te)
                skips.append(h)
                h = F.avg_pool2d(h, 2)
            h = self.mid(h, te)
            for i in reversed(range(depth - 1)):
                up = F.interpolate(h, scale_factor=2, mode="bilinear",
                                   align_corners=False)  # fmt: skip
                h = self.up[i](torch.cat([up, skips[i]], dim=1), te)
            return self.out(h)

    class Reconstruction(torch.nn.Module):
        """D(x): jump to t' = 460, then DDIM (eta = 1) with fixed noises."""

        def __init__(self, unet, eps0, eps):
            super().__init__()
            self.unet = unet
            co = ddim_constants()
            self.co = co
            self.register_buffer("eps0", torch.tensor(eps0[None, None]))
            self.register_buffer("eps", torch.tensor(eps[:, None, None]))
            self.register_buffer(
                "temb", torch.tensor(np.stack([temb(t) for t in co["t"]])[:, None],
                                     dtype=torch.float32))  # fmt: skip

        def forward(self, x):
            co = self.co
            ab0 = float(co["ab_t"][0])
            x_t = float(np.sqrt(ab0)) * x + float(np.sqrt(1.0 - ab0)) * self.eps0
            for k in range(len(co["t"])):
                e = self.unet(x_t, self.temb[k])
                x0 = (x_t - float(np.sqrt(1.0 - co["ab_t"][k])) * e) / float(
                    np.sqrt(co["ab_t"][k])
                )
                if k == len(co["t"]) - 1:
                    return x0
                x_t = (float(np.sqrt(co["ab_s"][k])) * x0
                       + float(co["c1"][k]) * self.eps[k]
                       + float(co["c2"][k]) * e)  # fmt: skip
            return x_t

    unet = UNet()
    init = os.path.join(work, "init_state.npz")
    if os.path.exists(init):
        with np.load(init) as z:
            sd = {k: torch.tensor(z[k]) for k in z.files}
        missing, unexpected = unet.load_state_dict(sd, strict=False)
        assert not unexpected and all("num_batches" in m for m in missing), (
            missing,
            unexpected,
        )
    unet.eval()
    with np.load(os.path.join(work, "noises.npz")) as z:
        eps0, eps = z["eps0"].astype(np.float32), z["eps"].astype(np.float32)
    model = Reconstruction(unet, eps0, eps).eval()
    np.savez(
        os.path.join(work, "torch_state.npz"),
        **{k: v.detach().numpy() for k, v in unet.state_dict().items()
           if "num_batches" not in k},
    )  # fmt: skip
    x = torch.zeros(1, 1, size, size)
    path = os.path.join(work, "model_raw.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model, (x,), path, opset_version=12, dynamo=False,
            do_constant_folding=True, input_names=["x"], output_names=["x0"],
        )  # fmt: skip
    proto = onnx.load(path)
    _remove_identities(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, os.path.join(work, "model.onnx"))
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"exported {len(proto.graph.node)} nodes, ops {ops}", flush=True)


def _remove_identities(proto) -> None:
    """Rewires around Identity nodes (si4onnx 0.1.13 has no Identity operator)."""
    g = proto.graph
    outputs = {o.name for o in g.output}
    alias = {}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del g.node[:]
    g.node.extend(keep)
    for init in g.initializer:
        if init.data_type == 11:  # DOUBLE: si4onnx refuses float64 constants
            raise SystemExit(f"float64 initializer {init.name} in the export")


def _torch_worker_si4onnx(work: str, search: str, precision: float,
                          threads: int) -> None:  # fmt: skip
    """Runs si4onnx's reference-image test on every image; writes si4onnx.json with
    ``time.monotonic()`` stamps (after the imports, at each p-value) for the cold
    time."""
    from importlib.metadata import version

    import onnx
    import si4onnx
    import torch
    from si4onnx.hypothesis import ReferenceMeanDiff
    from si4onnx.operators import Abs, AverageFilter, InputDiff

    imported = time.monotonic()
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    model = onnx.load(os.path.join(work, "model.onnx"))
    with np.load(os.path.join(work, "images.npz")) as z:
        xs, refs = z["x"], z["x_ref"]
    results = []
    for i in range(len(xs)):
        si_model = si4onnx.load(
            model,
            hypothesis=ReferenceMeanDiff(
                threshold=THRESHOLD,
                post_process=[InputDiff(), AverageFilter(3), Abs()],
            ),
        )
        x = torch.tensor(xs[i][None, None], dtype=torch.float64)
        r = torch.tensor(refs[i][None, None], dtype=torch.float64)
        t0, c0 = time.perf_counter(), time.process_time()
        kw = {"inference_mode": "exhaustive"} if search == "exhaustive" else {
            "inference_mode": "parametric", "termination_criterion": "precision",
            "search_strategy": "pi3", "precision": precision}  # fmt: skip
        res = si_model.inference((x, r), var=1.0, **kw)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        done, done_cpu = time.monotonic(), time.process_time()
        results.append(dict(
            p_value=float(res.p_value), inf_p=float(res.inf_p),
            sup_p=float(res.sup_p), stat=float(res.stat),
            search_count=int(res.search_count), seconds=sec, cpu_seconds=cpu,
            done=done, done_cpu=done_cpu,
            truncated=[list(map(float, iv)) for iv in res.truncated_intervals],
            roi=np.asarray(res.roi).astype(int).tolist(),
            output=np.asarray(res.output).reshape(xs[i].shape).tolist(),
        ))  # fmt: skip
        print(f"  si4onnx image {i}: p={res.p_value:.10g} pieces={res.search_count} "
              f"{sec:.1f}s", flush=True)  # fmt: skip
    versions = {k: version(k) for k in ("si4onnx", "sicore", "torch", "onnx", "numpy")}
    with open(os.path.join(work, "si4onnx.json"), "w") as f:
        json.dump(dict(imported=imported, versions=versions, images=results), f)


# ---------------------------------------------------------- the venv runner


def ensure_venv(venv: str) -> str:
    """The venv's python, creating the venv with the pinned packages if needed."""
    py = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".sijax-vs-si4onnx-ready")
    if os.path.exists(marker):
        return py
    print(f"creating the si4onnx environment in {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    for pkgs in VENV_PACKAGES:
        subprocess.run([py, "-m", "pip", "install", "-q", *pkgs], check=True)
    with open(marker, "w") as f:
        f.write("\n".join(" ".join(p) for p in VENV_PACKAGES))
    return py


def run_worker(py: str, cpus: list[int], threads: int, *args: str,
               env: dict | None = None) -> float:  # fmt: skip
    """Runs this script's ``--worker args`` with ``py`` in a fresh process pinned to
    ``cpus``; returns ``time.monotonic()`` just before the launch (the clock is
    system-wide on Linux, so the worker's stamps are measured from it). ``env``:
    the environment (default: this one without ``XLA_FLAGS``)."""
    if env is None:
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.pop("PYTHONPATH", None)
    cmd = ["taskset", "-c", ",".join(map(str, cpus)), py, os.path.abspath(__file__),
           "--worker", *args]  # fmt: skip
    if shutil.which("taskset") is None:
        cmd = cmd[3:]
    launched = time.monotonic()
    subprocess.run(cmd, check=True, env=env, cwd=HERE)
    return launched


# ---------------------------------------------------------------- sijax side


def _onnx_reconstruction(fn, x):
    """(H, W, C) image -> D(x) through an NCHW, batch-1 ONNX reconstruction."""
    import jax.numpy as jnp

    y = fn(jnp.transpose(x, (2, 0, 1))[None])
    return jnp.transpose(y[0], (1, 2, 0))


def prepare(work: str, size: int, n_images: int, seed: int, signal: float,
            weights: str) -> None:  # fmt: skip
    """Weights (torch layout), noises and images; images have a non-empty region."""
    import jax.numpy as jnp
    from flax import nnx

    import sijax
    from sijax.checkpoint import CHECKPOINTS_DIR
    from sijax.diffusion.sampler import Noises

    name = f"dal_v5_{size}"
    if weights == "checkpoint" and os.path.isdir(os.path.join(CHECKPOINTS_DIR, name)):
        model = sijax.load_model(name)
        pure = nnx.to_pure_dict(model.state)
        np.savez(os.path.join(work, "init_state.npz"),
                 **sijax_to_torch(pure, len(CHANNELS)))  # fmt: skip
        print(f"weights: the committed checkpoint {name}", flush=True)
    else:
        model = None
        print("weights: torch's default initialisation, seed 0", flush=True)
    rng = np.random.default_rng(seed)
    eps0 = rng.standard_normal((size, size)).astype(np.float32)
    eps = rng.standard_normal((len(STEPS), size, size)).astype(np.float32)
    np.savez(os.path.join(work, "noises.npz"), eps0=eps0, eps=eps)
    noises = Noises(jnp.asarray(eps0[..., None], jnp.float64),
                    jnp.asarray(eps[..., None], jnp.float64))  # fmt: skip
    xs, refs = [], []
    side = max(1, size // 3)
    detect = None  # without a sijax model the images are not screened
    if model is not None:
        cfg = sijax.DALConfig(threshold=SIJAX_THRESHOLD)

        def detect(x):
            return sijax.detect_region(model, x, noises, cfg)[1]

    tries = 0
    while len(xs) < n_images and tries < 200:
        tries += 1
        x = rng.standard_normal((size, size))
        r0, c0 = rng.integers(0, size - side + 1, 2)
        x[r0 : r0 + side, c0 : c0 + side] += signal
        x_ref = rng.standard_normal((size, size))
        if detect is not None and not bool(np.any(detect(x[..., None]))):
            continue
        xs.append(x)
        refs.append(x_ref)
    np.savez(os.path.join(work, "images.npz"), x=np.stack(xs), x_ref=np.stack(refs))
    print(f"images: {len(xs)} with a non-empty region after {tries} draws "
          f"(signal {signal} on a {side}x{side} square)", flush=True)  # fmt: skip


def load_noises(work: str):
    """The DDIM noises of the work directory as sijax ``Noises`` (float64, NHWC)."""
    import jax.numpy as jnp

    from sijax.diffusion.sampler import Noises

    with np.load(os.path.join(work, "noises.npz")) as z:
        return Noises(jnp.asarray(z["eps0"][..., None], jnp.float64),
                      jnp.asarray(z["eps"][..., None], jnp.float64))  # fmt: skip


def load_sijax_model(work: str, size: int, which: str):
    """The work directory's network in sijax: "onnx" (the exported graph through
    ``sijax.onnx.load``) or "native" (its torch weights in a ``DiffusionModel``)."""
    import jax.numpy as jnp
    from flax import nnx

    import sijax.onnx
    from sijax.checkpoint import DiffusionModel, cast_state
    from sijax.config import TrainConfig
    from sijax.detect import ReconstructionModel
    from sijax.diffusion.unet import UNet

    if which == "onnx":
        fn = sijax.onnx.load(os.path.join(work, "model.onnx"))
        return ReconstructionModel(_onnx_reconstruction, (size, size, 1), fn)
    config = TrainConfig(size=size, channels=CHANNELS)
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: UNet(config.unet_config(), rngs=nnx.Rngs(0)))
    )
    pure = nnx.to_pure_dict(state)  # every leaf is overwritten below
    with np.load(os.path.join(work, "torch_state.npz")) as z:
        tstate = {k: z[k] for k in z.files}
    nnx.replace_by_pure_dict(state, torch_to_sijax(tstate, pure, len(CHANNELS)))
    return DiffusionModel(config=config, graphdef=graphdef,
                          state=cast_state(state, jnp.float64))  # fmt: skip


def run_sijax(work: str, size: int, search: str, precision: float, which: str,
              engine: str = "propagate"):  # fmt: skip
    """sijax's test on every image; ``which`` is "onnx" or "native".

    The first image is tested once untimed (the compilation), then every image is
    timed, with the XLA programs compiled during its test (an equation of the
    propagation engine gets its ``jit`` at its third call, so the warm tests still
    compile some). Returns the per-image records and a dict of the run's first
    p-value: ``time.monotonic()`` stamps after the imports, after the model load and
    at the first p-value; the first test's seconds; its compile seconds (first minus
    the warm test of the same image); the XLA programs compiled up to the first
    p-value and afterwards, and the seconds spent tracing, lowering and compiling
    them (``jax.monitoring`` duration events); the persistent-cache hits.
    """
    import jax

    import sijax

    imported = time.monotonic()
    events = {}  # jax.monitoring duration event -> [count, seconds]
    hits = []
    backend = "backend_compile_duration"

    def on_duration(event: str, seconds: float, **_) -> None:
        c = events.setdefault(event.rsplit("/", 1)[-1], [0, 0.0])
        c[0] += 1
        c[1] += seconds

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    noises = load_noises(work)
    model = load_sijax_model(work, size, which)
    cfg = sijax.DALConfig(
        search="exhaustive" if search == "exhaustive" else "parametric",
        termination="precision", precision=precision, alternative="two-sided",
        threshold=SIJAX_THRESHOLD, hypothesis="reference", engine=engine,
    )  # fmt: skip
    with np.load(os.path.join(work, "images.npz")) as z:
        xs, refs = z["x"], z["x_ref"]
    loaded = time.monotonic()
    res = sijax.dal_test(model, xs[0], refs[0], sigma=1.0, noises=noises, config=cfg)
    first_done, first_cpu = time.monotonic(), time.process_time()
    cold_events = {k: list(v) for k, v in events.items()}
    out = []
    for i in range(len(xs)):
        before = list(events.get(backend, [0, 0.0]))
        t0, c0 = time.perf_counter(), time.process_time()
        res_i = sijax.dal_test(model, xs[i], refs[i], sigma=1.0, noises=noises,
                               config=cfg)  # fmt: skip
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = events.get(backend, [0, 0.0])
        out.append(dict(
            p_value=res_i.p_value, inf_p=res_i.inf_p, sup_p=res_i.sup_p,
            stat=res_i.stat, raw_stat=res_i.raw_stat, sd=res_i.sd,
            search_count=res_i.search_count, seconds=sec,
            cpu_seconds=cpu, status=res_i.status, programs=after[0] - before[0],
            xla_compile_seconds=after[1] - before[1],
            truncated=[[lo * res_i.sd, hi * res_i.sd] for lo, hi in
                       res_i.truncated_intervals],
            mask=res_i.mask.astype(int), reconstruction=res_i.reconstruction[..., 0],
        ))  # fmt: skip
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
    zero = [0, 0.0]
    first_call = first_done - loaded
    cold = dict(
        imported=imported, loaded=loaded, first_done=first_done,
        first_call_seconds=first_call, first_cpu_seconds=first_cpu,
        compile_seconds=max(first_call - out[0]["seconds"], 0.0),
        first_p_value=res.p_value,
        programs=cold_events.get(backend, zero)[0],
        xla_compile_seconds=cold_events.get(backend, zero)[1],
        trace_seconds=cold_events.get("jaxpr_trace_duration", zero)[1],
        lowering_seconds=cold_events.get("jaxpr_to_mlir_module_duration", zero)[1],
        warm_programs=events.get(backend, zero)[0] - cold_events.get(backend, zero)[0],
        cache_hits=len(hits),
        cache_enabled=bool(jax.config.jax_enable_compilation_cache),
        cache_dir=jax.config.jax_compilation_cache_dir,
    )  # fmt: skip
    return out, cold


def _sijax_worker(work: str, size: int, search: str, precision: float, which: str,
                  engine: str) -> None:  # fmt: skip
    """:func:`run_sijax` in a fresh process; writes sijax_{which}.json."""
    sys.path.insert(0, REPO)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    out, cold = run_sijax(work, size, search, precision, which, engine)
    for r in out:
        r["mask"] = r["mask"].tolist()
        r["reconstruction"] = r["reconstruction"].tolist()
    with open(os.path.join(work, f"sijax_{which}.json"), "w") as f:
        json.dump(dict(cold=cold, images=out), f)


def run_sijax_fresh(work: str, size: int, search: str, precision: float,
                    which: str, engine: str, cpus: list[int],
                    threads: int):  # fmt: skip
    """:func:`run_sijax` in a fresh process pinned to ``cpus``, with JAX's persistent
    compilation cache off and pointed at a new empty directory (nothing compiled
    before is reused). Returns the records and the cold dict, whose
    ``first_seconds`` runs from the launch to the first p-value."""
    cache = tempfile.mkdtemp(prefix="sijax-vs-si4onnx-jax-cache-")
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false",
               JAX_COMPILATION_CACHE_DIR=cache, SIJAX_COMPILE_CACHE="off")  # fmt: skip
    launched = run_worker(sys.executable, cpus, threads, "sijax", work, str(size),
                          search, str(precision), which, engine, env=env)  # fmt: skip
    with open(os.path.join(work, f"sijax_{which}.json")) as f:
        rec = json.load(f)
    cold = rec["cold"]
    cold["cache_entries_after"] = len(os.listdir(cache))
    shutil.rmtree(cache, ignore_errors=True)
    cold["first_seconds"] = cold["first_done"] - launched
    cold["imports_seconds"] = cold["imported"] - launched
    cold["load_seconds"] = cold["loaded"] - cold["imported"]
    for k in ("imported", "loaded", "first_done"):
        del cold[k]
    out = rec["images"]
    for r in out:
        r["mask"] = np.asarray(r["mask"])
        r["reconstruction"] = np.asarray(r["reconstruction"])
    return out, cold


# ---------------------------------------------------------------------- main


def _pin(threads: int, cpus_arg: str | None) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if cpus_arg:
        cpus = [int(c) for c in cpus_arg.split(",")]
    else:
        cpus = allowed[-threads:]
    if len(cpus) != threads:
        raise SystemExit(f"--threads {threads} needs {threads} cpus, got {cpus}")
    os.sched_setaffinity(0, cpus)
    if threads == 1:
        os.environ["XLA_FLAGS"] = (
            "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    else:
        # XLA's default threads, bounded by the affinity just set. (A value that does
        # not start with "--" is read by XLA as the name of a flags file and fails.)
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=true"
    return cpus


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search", choices=("precision", "exhaustive"),
                   default="precision")  # fmt: skip
    p.add_argument("--precision", type=float, default=1e-3)
    p.add_argument(
        "--signal",
        type=float,
        default=0.0,
        help="added to a floor(size/3) square of each test image",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("checkpoint", "random"),
                   default="checkpoint")  # fmt: skip
    p.add_argument("--cpus", help="comma-separated cpu ids (default: the last "
                   "--threads cpus of this process's affinity)")  # fmt: skip
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--workdir", help="keep the files here (default: a temp dir)")
    p.add_argument("--skip-native", action="store_true")
    p.add_argument(
        "--engine",
        choices=("propagate", "walk"),
        default="propagate",
        help="sijax's DALConfig.engine (default propagate)",
    )
    p.add_argument("--out", default=os.path.join(HERE, "results", "vs_si4onnx"),
                   help="where <size>_<search>_<engine>.json (the raw per-image "
                   "outputs and the summary) goes")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="write no raw file")
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:  # a fresh process: the si4onnx venv, or sijax
        kind, work, *rest = args.worker
        if kind == "build":
            _torch_worker_build(work, int(rest[0]))
        elif kind == "si4onnx":
            _torch_worker_si4onnx(work, rest[0], float(rest[1]), int(rest[2]))
        else:
            _sijax_worker(work, int(rest[0]), rest[1], float(rest[2]), rest[3],
                          rest[4])  # fmt: skip
        return

    cpus = _pin(args.threads, args.cpus)
    sys.path.insert(0, REPO)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    work = args.workdir or tempfile.mkdtemp(prefix="sijax-vs-si4onnx-")
    os.makedirs(work, exist_ok=True)
    commit = _commit()
    date = time.strftime("%Y-%m-%d %H:%M:%S %z")
    load = os.getloadavg()
    print(f"commit {commit}, jax {jax.__version__}, cpus {cpus}, threads "
          f"{args.threads}, size {args.size}, search {args.search}, engine "
          f"{args.engine}, workdir {work}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
          flush=True)  # fmt: skip
    py = ensure_venv(args.venv)
    prepare(work, args.size, args.images, args.seed, args.signal, args.weights)
    run_worker(py, cpus, args.threads, "build", work, str(args.size))
    print("si4onnx ...", flush=True)
    launched = run_worker(py, cpus, args.threads, "si4onnx", work, args.search,
                          str(args.precision), str(args.threads))  # fmt: skip
    print(f"si4onnx done in {time.monotonic() - launched:.1f}s wall", flush=True)
    with open(os.path.join(work, "si4onnx.json")) as f:
        rec = json.load(f)
    si4 = rec["images"]
    si4_cold = dict(first_seconds=si4[0]["done"] - launched,
                    first_cpu_seconds=si4[0]["done_cpu"],
                    imports_seconds=rec["imported"] - launched)  # fmt: skip
    si4_versions = rec["versions"]
    for a in si4:
        del a["done"], a["done_cpu"]
    runs = {}
    for which in ("onnx",) + (() if args.skip_native else ("native",)):
        print(f"sijax ({which}, a fresh process) ...", flush=True)
        runs[which] = run_sijax_fresh(
            work, args.size, args.search, args.precision, which, args.engine, cpus,
            args.threads,
        )  # fmt: skip
    sj, cold = runs["onnx"]
    native, native_cold = runs.get("native", ([], None))
    compile_s = cold["compile_seconds"]

    tol = 1e-6 if args.search == "exhaustive" else None
    diffs, agree = [], []
    print(f"\nfirst p-value from a fresh process (s): si4onnx "
          f"{si4_cold['first_seconds']:.1f} (imports "
          f"{si4_cold['imports_seconds']:.1f})")  # fmt: skip
    for which, (out, c) in runs.items():
        print(f"  sijax {which}: {c['first_seconds']:.1f} (imports "
              f"{c['imports_seconds']:.1f}, load {c['load_seconds']:.1f}, first test "
              f"{c['first_call_seconds']:.1f} of which compile "
              f"{c['compile_seconds']:.1f}; {c['programs']} XLA programs, XLA "
              f"{c['xla_compile_seconds']:.1f} s, tracing {c['trace_seconds']:.1f} s, "
              f"lowering {c['lowering_seconds']:.1f} s; {c['warm_programs']} more in "
              f"the warm runs; cache hits {c['cache_hits']}, entries "
              f"{c['cache_entries_after']})")  # fmt: skip
        progs = [b["programs"] for b in out]
        secs = [round(b["xla_compile_seconds"], 1) for b in out]
        print(f"    warm tests: XLA programs compiled {progs}, XLA seconds {secs}")
    hdr = (f"{'img':>3} {'p si4onnx':>12} {'p sijax':>12} {'|dp|':>9} "
           f"{'pieces s/j':>11} {'s si4onnx':>9} {'s sijax':>8} {'ratio':>7}"
           f" {'p native':>12} {'s native':>8} mask")  # fmt: skip
    print(hdr)
    for i, (a, b) in enumerate(zip(si4, sj, strict=True)):
        dp = abs(a["p_value"] - b["p_value"])
        diffs.append(dp)
        if tol is not None:
            ok = dp <= tol
        else:  # both bracket the exact p-value: their bounds must overlap
            ok = max(a["inf_p"], b["inf_p"]) <= min(a["sup_p"], b["sup_p"]) + 1e-12
        agree.append(ok)
        same_mask = np.array_equal(np.asarray(a["roi"]).reshape(b["mask"].shape),
                                   b["mask"])  # fmt: skip
        nat = native[i] if native else None
        print(f"{i:>3} {a['p_value']:>12.8g} {b['p_value']:>12.8g} {dp:>9.2e} "
              f"{a['search_count']:>5}/{b['search_count']:<5} {a['seconds']:>9.2f} "
              f"{b['seconds']:>8.3f} {a['seconds'] / b['seconds']:>7.1f} "
              + (f"{nat['p_value']:>12.8g} {nat['seconds']:>8.3f}" if nat else
                 f"{'-':>12} {'-':>8}")
              + f" {'same' if same_mask else 'DIFFERENT'}")  # fmt: skip
        rec_d = np.max(np.abs(np.asarray(a["output"]) - b["reconstruction"]))
        print(f"    bounds si4onnx [{a['inf_p']:.6g}, {a['sup_p']:.6g}] sijax "
              f"[{b['inf_p']:.6g}, {b['sup_p']:.6g}]; max|D_si4onnx - D_sijax| = "
              f"{rec_d:.2e}; truncation set si4onnx "
              f"{_fmt(a['truncated'])} sijax {_fmt(b['truncated'])}")  # fmt: skip
        if nat:
            print(
                f"    native: p={nat['p_value']:.8g} pieces={nat['search_count']} "
                f"|p - p_onnx|={abs(nat['p_value'] - b['p_value']):.2e} "
                f"max|D_native - D_onnx|="
                f"{np.max(np.abs(nat['reconstruction'] - b['reconstruction'])):.2e}"
            )
    si_med = statistics.median(a["seconds"] for a in si4)
    sj_med = statistics.median(b["seconds"] for b in sj)
    summary = dict(
        size=args.size, images=len(si4), threads=args.threads, search=args.search,
        engine=args.engine,
        si4onnx_seconds=si_med, sijax_seconds=sj_med, ratio=si_med / sj_med,
        max_p_difference=max(diffs), p_agree=all(agree),
        si4onnx_pieces=statistics.median(a["search_count"] for a in si4),
        sijax_pieces=statistics.median(b["search_count"] for b in sj),
        si4onnx_ms_per_piece=1e3 * statistics.median(
            a["seconds"] / a["search_count"] for a in si4),
        sijax_ms_per_piece=1e3 * statistics.median(
            b["seconds"] / b["search_count"] for b in sj),
        si4onnx_first_seconds=si4_cold["first_seconds"],
        sijax_first_seconds=cold["first_seconds"],
        ratio_cold=si4_cold["first_seconds"] / cold["first_seconds"],
        sijax_compile_seconds=compile_s,
        sijax_programs=cold["programs"],
        sijax_xla_compile_seconds=cold["xla_compile_seconds"],
        native_seconds=statistics.median(n["seconds"] for n in native)
        if native else None,
        native_max_p_difference=max(abs(n["p_value"] - b["p_value"])
                                    for n, b in zip(native, sj, strict=True))
        if native else None,
        native_first_seconds=native_cold["first_seconds"] if native else None,
        native_ratio_cold=si4_cold["first_seconds"] / native_cold["first_seconds"]
        if native else None,
        native_compile_seconds=native_cold["compile_seconds"] if native else None,
        native_programs=native_cold["programs"] if native else None,
        commit=commit,
        load_average_at_start=[round(v, 2) for v in load],
    )  # fmt: skip
    # The share of the wall time each process had its cpu (1.0: no other process
    # ran there; the cores are shared with other work).
    share = dict(
        si4onnx=_share(si4),
        si4onnx_first=si4_cold["first_cpu_seconds"] / si4_cold["first_seconds"],
    )
    for which, (out, c) in runs.items():
        share[which] = _share(out)
        share[f"{which}_first"] = c["first_cpu_seconds"] / c["first_seconds"]
    summary["cpu_share"] = {k: round(v, 3) for k, v in share.items()}
    # The same ratios in CPU seconds, less moved by other work on the cores.
    summary["ratio_cpu"] = statistics.median(
        a["cpu_seconds"] for a in si4
    ) / statistics.median(b["cpu_seconds"] for b in sj)
    summary["ratio_cold_cpu"] = (
        si4_cold["first_cpu_seconds"] / cold["first_cpu_seconds"]
    )
    end = _commit()
    if end != commit:
        summary["commit_at_end"] = end  # sijax changed during the run
    if not args.no_write:
        path = write_raw(args, summary, si4, si4_cold, si4_versions, runs, cpus, date)
        print(f"raw: {path}")
    print(json.dumps(summary))


def _share(records: list) -> float:
    return sum(r["cpu_seconds"] for r in records) / sum(r["seconds"] for r in records)


def _commit() -> str:
    """HEAD's short hash, with the tracked sijax files that differ from it (the tree
    is shared)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
        ["git", "diff", "--name-only", "HEAD", "--", "sijax"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    return commit + ("+dirty(" + ",".join(dirty) + ")" if dirty else "")


def write_raw(args, summary: dict, si4: list, si4_cold: dict, si4_versions: dict,
              runs: dict, cpus: list[int], date: str) -> str:  # fmt: skip
    """Writes the per-image outputs of both sides, the cold timings and the summary
    to ``args.out/<size>_<search>_<engine>.json``; returns its path. Units: sijax's
    ``stat`` is z (``raw_stat / sd``), si4onnx's is eta^T x like sijax's
    ``raw_stat``; both sides' truncation sets are in eta^T x units."""
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    keys = ("p_value", "inf_p", "sup_p", "stat", "search_count", "seconds",
            "cpu_seconds", "truncated")  # fmt: skip
    images = []
    for i, a in enumerate(si4):
        row = dict(image=i, si4onnx={k: a[k] for k in keys})
        for which, (out, _) in runs.items():
            b = out[i]
            more = ("raw_stat", "sd", "status", "programs", "xla_compile_seconds")
            row[f"sijax_{which}"] = {k: b[k] for k in keys + more}
            row[f"sijax_{which}"]["same_mask"] = bool(
                np.array_equal(np.asarray(a["roi"]).reshape(b["mask"].shape), b["mask"])
            )
            row[f"sijax_{which}"]["max_abs_reconstruction_difference"] = float(
                np.max(np.abs(np.asarray(a["output"]) - b["reconstruction"]))
            )
        images.append(row)
    record = dict(
        summary=summary, date=date, load_average_at_end=[
            round(v, 2) for v in os.getloadavg()],
        machine=dict(cpu=cpu, cores=os.cpu_count(), cpus=cpus,
                     threads=args.threads, device=str(jax.devices()[0]),
                     jax=jax.__version__, python=platform.python_version()),
        si4onnx_versions=si4_versions,
        options=dict(size=args.size, images=args.images, search=args.search,
                     precision=args.precision, engine=args.engine,
                     signal=args.signal, seed=args.seed, weights=args.weights,
                     threshold_si4onnx=THRESHOLD,
                     threshold_sijax=SIJAX_THRESHOLD),
        cold=dict(si4onnx=si4_cold, **{f"sijax_{w}": c for w, (_, c) in
                                       runs.items()}),
        images=images,
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.size}_{args.search}_{args.engine}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def _fmt(ivs) -> str:
    return (
        "["
        + ", ".join(f"({lo:.4g}, {hi:.4g})" for lo, hi in ivs[:4])
        + (", ...]" if len(ivs) > 4 else "]")
    )


if __name__ == "__main__":
    main()
