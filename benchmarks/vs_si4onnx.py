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
intra_op_parallelism_threads=1`` and ``torch.set_num_threads(1)``). sijax's compile
time is reported apart from its run time (one compile serves every image).

Usage::

    python benchmarks/vs_si4onnx.py --size 16 --images 3 --threads 1 \\
        [--search exhaustive|precision] [--engine propagate|walk]

sijax runs with ``DALConfig(engine=...)``: "propagate" (the default here) or "walk".
The last line printed is one JSON object with size, images, threads,
si4onnx_seconds, sijax_seconds (medians per p-value), ratio, max_p_difference and
p_agree.
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
    """Runs si4onnx's reference-image test on every image; writes si4onnx.json."""
    import onnx
    import si4onnx
    import torch
    from si4onnx.hypothesis import ReferenceMeanDiff
    from si4onnx.operators import Abs, AverageFilter, InputDiff

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
        t0 = time.perf_counter()
        kw = {"inference_mode": "exhaustive"} if search == "exhaustive" else {
            "inference_mode": "parametric", "termination_criterion": "precision",
            "search_strategy": "pi3", "precision": precision}  # fmt: skip
        res = si_model.inference((x, r), var=1.0, **kw)
        sec = time.perf_counter() - t0
        results.append(dict(
            p_value=float(res.p_value), inf_p=float(res.inf_p),
            sup_p=float(res.sup_p), stat=float(res.stat),
            search_count=int(res.search_count), seconds=sec,
            truncated=[list(map(float, iv)) for iv in res.truncated_intervals],
            roi=np.asarray(res.roi).astype(int).tolist(),
            output=np.asarray(res.output).reshape(xs[i].shape).tolist(),
        ))  # fmt: skip
        print(f"  si4onnx image {i}: p={res.p_value:.10g} pieces={res.search_count} "
              f"{sec:.1f}s", flush=True)  # fmt: skip
    with open(os.path.join(work, "si4onnx.json"), "w") as f:
        json.dump(results, f)


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


def run_worker(py: str, cpus: list[int], threads: int, *args: str) -> None:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.pop("XLA_FLAGS", None)
    env.pop("PYTHONPATH", None)
    cmd = ["taskset", "-c", ",".join(map(str, cpus)), py, os.path.abspath(__file__),
           "--worker", *args]  # fmt: skip
    if shutil.which("taskset") is None:
        cmd = cmd[3:]
    subprocess.run(cmd, check=True, env=env, cwd=HERE)


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
    """sijax's test on every image; ``which`` is "onnx" or "native"."""
    import sijax

    noises = load_noises(work)
    model = load_sijax_model(work, size, which)
    cfg = sijax.DALConfig(
        search="exhaustive" if search == "exhaustive" else "parametric",
        termination="precision", precision=precision, alternative="two-sided",
        threshold=SIJAX_THRESHOLD, hypothesis="reference", engine=engine,
    )  # fmt: skip
    with np.load(os.path.join(work, "images.npz")) as z:
        xs, refs = z["x"], z["x_ref"]
    t0 = time.perf_counter()
    sijax.dal_test(model, xs[0], refs[0], sigma=1.0, noises=noises, config=cfg)
    first = time.perf_counter() - t0
    out = []
    for i in range(len(xs)):
        t0 = time.perf_counter()
        res = sijax.dal_test(model, xs[i], refs[i], sigma=1.0, noises=noises,
                             config=cfg)  # fmt: skip
        sec = time.perf_counter() - t0
        out.append(dict(
            p_value=res.p_value, inf_p=res.inf_p, sup_p=res.sup_p, stat=res.stat,
            search_count=res.search_count, seconds=sec, status=res.status,
            truncated=[[lo * res.sd, hi * res.sd] for lo, hi in
                       res.truncated_intervals],
            mask=res.mask.astype(int), reconstruction=res.reconstruction[..., 0],
        ))  # fmt: skip
    compile_s = max(first - out[0]["seconds"], 0.0)
    return out, compile_s


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
        os.environ["XLA_FLAGS"] = f"intra_op_parallelism_threads={threads}"
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
    p.add_argument("--engine", choices=("propagate", "walk"), default="propagate",
                   help="sijax's DALConfig.engine (default propagate)")
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:  # inside the si4onnx venv
        kind, work = args.worker[0], args.worker[1]
        if kind == "build":
            _torch_worker_build(work, int(args.worker[2]))
        else:
            _torch_worker_si4onnx(work, args.worker[2], float(args.worker[3]),
                                  int(args.worker[4]))  # fmt: skip
        return

    cpus = _pin(args.threads, args.cpus)
    sys.path.insert(0, REPO)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    work = args.workdir or tempfile.mkdtemp(prefix="sijax-vs-si4onnx-")
    os.makedirs(work, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    # The tree is shared: say which tracked sijax files differ from the commit.
    dirty = subprocess.run(
        ["git", "diff", "--name-only", "HEAD", "--", "sijax"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split()
    if dirty:
        commit += "+dirty(" + ",".join(dirty) + ")"
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
    t0 = time.perf_counter()
    run_worker(py, cpus, args.threads, "si4onnx", work, args.search,
               str(args.precision), str(args.threads))  # fmt: skip
    print(f"si4onnx done in {time.perf_counter() - t0:.1f}s wall", flush=True)
    with open(os.path.join(work, "si4onnx.json")) as f:
        si4 = json.load(f)
    print("sijax (ONNX import) ...", flush=True)
    sj, compile_s = run_sijax(work, args.size, args.search, args.precision, "onnx",
                              args.engine)  # fmt: skip
    native, native_compile = ([], 0.0)
    if not args.skip_native:
        print("sijax (native network) ...", flush=True)
        native, native_compile = run_sijax(work, args.size, args.search,
                                           args.precision, "native",
                                           args.engine)  # fmt: skip

    tol = 1e-6 if args.search == "exhaustive" else None
    diffs, agree = [], []
    print(f"\nsijax compile: ONNX {compile_s:.1f}s, native {native_compile:.1f}s "
          "(not in the per-image seconds)")  # fmt: skip
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
        sijax_compile_seconds=compile_s,
        native_seconds=statistics.median(n["seconds"] for n in native)
        if native else None,
        native_max_p_difference=max(abs(n["p_value"] - b["p_value"])
                                    for n, b in zip(native, sj, strict=True))
        if native else None,
        commit=commit,
        load_average_at_start=[round(v, 2) for v in load],
    )  # fmt: skip
    print(json.dumps(summary))


def _fmt(ivs) -> str:
    return (
        "["
        + ", ".join(f"({lo:.4g}, {hi:.4g})" for lo, hi in ivs[:4])
        + (", ...]" if len(ivs) > 4 else "]")
    )


if __name__ == "__main__":
    main()
