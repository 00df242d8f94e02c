"""The ``sijax`` command line: parse, build a config, call one library function.

Subcommands are rows of ``COMMANDS`` (name -> (help, add_arguments, run)); add a row
to add a command. Deliberate errors (``SijaxError``) print ``error: ...`` to stderr
and exit with status 2, without a traceback.
"""

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from sijax.errors import InputError, SijaxError, ensure_output_dir


def _configure_jax():
    # The test path is float64; switched on here, not at import.
    import jax

    from sijax.compile_cache import enable_compilation_cache

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    enable_compilation_cache()  # $SIJAX_COMPILE_CACHE: a directory, or off


# --- train -------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", help="preset name (dal_v5, tiny; default dal_v5 with "
                   "--data); with --resume it may be omitted and is read from the "
                   "workdir")
    p.add_argument("--data", help="normal images to train on: a folder of images "
                   "(PNG, JPEG, TIFF, NPY), an .npy/.npz stack, or an MVTec AD "
                   "category root (uses train/good); without it, iid N(0, 1) images "
                   "(the paper's synthetic setting)")
    p.add_argument("--detector", help="detection method the model serves: dal (the "
                   "default), deco_diff, mdps, anoddpm, ddad, diffpath "
                   "(docs/detectors.md); without --config, its own preset")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config field or a "
                   "detector option (repeatable)")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --workdir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_run(a: argparse.Namespace) -> int:
    import dataclasses
    import json

    from sijax.config import TrainConfig, apply_overrides
    from sijax.configs import get_config
    from sijax.detectors import get_detector
    from sijax.train import train

    stored = os.path.join(a.workdir, "config.json")
    if a.config is None and a.resume and os.path.isfile(stored):
        with open(stored) as f:
            cfg = TrainConfig.from_dict(json.load(f))
    elif a.config is None and a.data is None and a.detector is None:
        raise InputError("--config is required (except with --data or --detector, "
                         "or with --resume on an existing --workdir)")
    elif a.config is None and a.detector is not None:
        cfg = get_detector(a.detector).preset()
    else:
        cfg = get_config(a.config or "dal_v5")
    if a.detector is not None and cfg.detector != a.detector:
        cfg = dataclasses.replace(cfg, detector=a.detector, detector_options=())
    cfg = apply_overrides(cfg, a.overrides)
    _configure_jax()
    res = train(cfg, a.workdir, data=a.data, resume=a.resume,
                progress=not a.no_progress)
    cfg = res.model.config
    speed = (f"{res.seconds_per_step * 1e3:.1f} ms/step"
             if not math.isnan(res.seconds_per_step)
             else "ms/step not measured (no step after the compiling chunk)")
    print(f"trained {cfg.name} ({cfg.detector}) size={cfg.size} "
          f"channels={cfg.in_channels} on "
          f"{cfg.n_train} {'images' if a.data else 'N(0, 1) images'}: "
          f"{int(res.state.step)} steps, final loss {res.losses[-1, 1]:.4f}, "
          f"{speed}; model in {os.path.join(a.workdir, 'model')}")
    return 0


# --- sample ------------------------------------------------------------------------

def _sample_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True,
                   help="model directory, training workdir, or committed name")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("-n", "--num", type=int, default=8, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0,
                   help="DDIM steps evenly spaced over T-1..0 (0: DDPM, all T)")
    p.add_argument("--eta", type=float, default=1.0)


def _sample_run(a: argparse.Namespace) -> int:
    import numpy as np

    from sijax.checkpoint import load_model
    from sijax.data.images import save_image
    from sijax.diffusion.reconstruction import sample_images

    if a.num < 1 or a.steps < 0:
        raise InputError(f"need --num >= 1 and --steps >= 0; got {a.num}, {a.steps}")
    ensure_output_dir(a.out)
    _configure_jax()
    model = load_model(a.checkpoint)
    T = model.schedule.T  # noqa: N806
    steps = None
    if a.steps:
        steps = tuple(sorted({int(s) for s in np.linspace(T - 1, 0, a.steps)},
                             reverse=True))
    imgs = sample_images(model, a.num, seed=a.seed, steps=steps, eta=a.eta)
    np.save(os.path.join(a.out, "samples.npy"), imgs)
    for i, img in enumerate(imgs):
        save_image(os.path.join(a.out, f"sample_{i:03d}.png"), img)
    print(f"wrote {a.num} samples to {a.out} (mean {imgs.mean():.3f}, "
          f"std {imgs.std():.3f})")
    return 0


# --- reconstruct -------------------------------------------------------------------

def _reconstruct_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True,
                   help="model directory, training workdir, or committed name")
    p.add_argument("--image", required=True,
                   help="PNG, JPEG, TIFF or .npy image (a model trained on data "
                   "applies its recorded preprocessing)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler noises")


def _reconstruct_run(a: argparse.Namespace) -> int:
    from sijax.checkpoint import load_model
    from sijax.data.images import read_raw
    from sijax.diffusion.reconstruction import reconstruct_image, save_reconstruction
    from sijax.evaluation.images import model_input

    ensure_output_dir(a.out)
    _configure_jax()
    model = load_model(a.checkpoint)
    x = model_input(model, read_raw(a.image), a.image)
    rec = reconstruct_image(model, x, seed=a.seed)
    paths = save_reconstruction(a.out, rec)
    print(f"wrote {len(paths)} files to {a.out}; max |error| "
          f"{abs(rec.error).max():.4f}")
    return 0


# --- test / demo ---------------------------------------------------------------------

def _load_for_test(a: argparse.Namespace):
    """The model of ``--checkpoint`` with the detector options among ``--set``
    applied (the rest of ``--set`` stays for the DALConfig)."""
    import dataclasses

    from sijax.checkpoint import load_model

    model = load_model(a.checkpoint)
    names = {f.name for f in dataclasses.fields(model.detector.options)}
    dal = {f.name for f in dataclasses.fields(_dal_config_type())}
    options, rest = {}, []
    for item in a.overrides:
        key, _, raw = item.partition("=")
        if key.strip() in names and key.strip() not in dal:
            options[key.strip()] = raw.strip()
        else:
            rest.append(item)
    a.overrides = rest
    return model.with_options(**options) if options else model


def _dal_config_type():
    from sijax.detect.dal import DALConfig

    return DALConfig


def _dal_config(a: argparse.Namespace, model=None):
    """The DAL options of the command line; a data-trained model's calibrated
    threshold is the default threshold."""
    from sijax.config import apply_overrides
    from sijax.detect.dal import DALConfig

    cfg = DALConfig()
    if model is not None and model.info.threshold is not None:
        cfg = DALConfig(threshold=model.info.threshold)
    sets = [f"{k}={getattr(a, k)}" for k in ("hypothesis", "search", "termination",
                                              "alternative", "threshold", "precision",
                                              "engine")
            if getattr(a, k, None) is not None]
    return apply_overrides(cfg, sets + list(a.overrides))


# Spelled out so that building the parser imports no JAX (checked by the tests).
HYPOTHESES = ("reference", "background", "neighbour")


def _dal_options(p: argparse.ArgumentParser):
    p.add_argument("--hypothesis", choices=HYPOTHESES)
    p.add_argument("--search", choices=("parametric", "exhaustive",
                                        "over_conditioning"))
    p.add_argument("--termination", choices=("precision", "decision"))
    p.add_argument("--alternative", choices=("abs", "two-sided", "less", "greater"))
    p.add_argument("--threshold", type=float, help="region threshold lambda (0.8)")
    p.add_argument("--precision", type=float, help="stop when sup_p - inf_p < this")
    p.add_argument("--engine", choices=("auto", "walk", "propagate"),
                   help="how pieces are found (the same pieces): walk (one compiled "
                   "search), propagate (batched breakpoint propagation; faster on "
                   "16x16 and larger images) or auto (default: propagate from "
                   "16x16 on a CPU for the dal detector, else walk)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override any DALConfig field, or an "
                   "option of the model's detector (docs/detectors.md)")
    p.add_argument("--seed", type=int, default=0, help="key of the sampler noises")
    p.add_argument("--out", default="sijax-out", help="output directory")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar of the search")


def _sigma(raw: str):
    if raw in ("iid", "corr"):
        return raw
    try:
        return float(raw)
    except ValueError:
        from sijax.data.images import load_npy

        if not os.path.exists(raw):
            raise InputError(f"--sigma {raw!r} is neither a number, iid, corr nor a "
                             "file") from None
        return load_npy(raw, "--sigma")


def _reference(a: argparse.Namespace, model, config):
    """--sigma and --reference as a Reference: the stored noise model by default
    for a model trained on data; a model without one needs --sigma."""
    from sijax.data.images import read_raw
    from sijax.evaluation.images import resolve_reference

    sigma = a.sigma
    if sigma is None:
        if model.info.noise_model is None:
            raise InputError("--sigma is required: this model stores no noise model "
                             "(it was not trained with --data)")
        sigma = "model"
    sigma = sigma if sigma.startswith("model") else _sigma(sigma)
    raw_ref = a.reference
    if a.reference not in (None, "template"):
        raw_ref = read_raw(a.reference)
    ref = resolve_reference(model, sigma, raw_ref, reference_path=a.reference)
    if ref.x_ref is None and config.hypothesis == "reference":
        # Said here in the command line's terms; dal_test would name x_ref.
        template = (", or --sigma model to compare with the template of the normal "
                    "training images" if model.info.noise_model is not None else "")
        raise InputError(
            f"--sigma {a.sigma} with the reference test (the default --hypothesis) "
            f"needs --reference IMAGE, a normal image{template}; or --hypothesis "
            "background|neighbour to compare the region with the rest of the image")
    return ref


def _test_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="model directory")
    p.add_argument("--image", required=True,
                   help="test image (PNG, JPEG, TIFF or .npy; a model trained on "
                   "data applies its recorded preprocessing)")
    p.add_argument("--reference",
                   help="reference image (reference test), or 'template' (the mean "
                   "of the normal training images; the default with --sigma model)")
    p.add_argument("--sigma",
                   help="noise covariance of the image: 'model' or 'model:KIND' (the "
                   "noise model estimated from the training data: pixel, stationary, "
                   "lowrank; the default for models trained on data), a variance, "
                   "'iid', 'corr', or a .npy file (per-pixel variances or an n x n "
                   "matrix)")
    p.add_argument("--tiles", action="store_true",
                   help="an image larger than the model: test every model-sized tile "
                   "at the image's resolution (Holm-adjusted over the tiles); each "
                   "tile's record goes to tiles.jsonl as it finishes, then tiles.json "
                   "and tiles.png")
    p.add_argument("--resume", action="store_true",
                   help="with --tiles: continue a killed tiled test in --out (only "
                   "the tiles without a record are tested)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="with --tiles: worker processes testing tiles at the same "
                   "time (e.g. one per core)")
    p.add_argument("--confidence", type=float, metavar="LEVEL",
                   help="also give the selective confidence interval of the region's "
                   "mean difference at this level, e.g. 0.95 (equal-tailed; the "
                   "search goes on until its ends are exact; --set "
                   "exact_interval=false stops at the p-value's rule and gives the "
                   "widest interval the search allows)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="devices that share the search of the line (the propagate "
                   "engine, which this switches on; the same pieces and p-value). "
                   "Default: every accelerator when there are several, else one. "
                   "On a CPU, N single-threaded CPU devices, e.g. the cores")
    p.add_argument("--processes", type=int, metavar="N",
                   help="worker processes that share the search of the line on a "
                   "CPU (the propagate engine, which this switches on; the same "
                   "pieces and p-value): each enumerates its part of every window on "
                   "one core, e.g. --processes 2 on two cores. Default: 2 on a CPU "
                   "with two usable cores or more for images of 32x32 pixels or more "
                   "(the propagate engine, native models), else 1")
    p.add_argument("--components", action="store_true",
                   help="also test each connected component of the region on its own "
                   "(8-connected; --set connectivity=4 for edges only), conditioning "
                   "on the whole region, with p-values adjusted within the image "
                   "(Holm; --set adjustment=bh for Benjamini-Hochberg)")
    _dal_options(p)


def _test_run(a: argparse.Namespace) -> int:
    from sijax.data.images import read_raw
    from sijax.detect.run import format_result, run_test
    from sijax.evaluation.images import model_input

    if a.devices is not None:
        if a.devices < 1:
            raise InputError(f"--devices must be >= 1; got {a.devices}")
        from sijax.experiments.pool import use_cpu_devices

        use_cpu_devices(a.devices)  # before JAX starts its CPU backend
    _configure_jax()
    model = _load_for_test(a)
    config = _shared_line(a, _dal_config(a, model))
    if a.confidence is not None or a.components:
        import dataclasses

        config = dataclasses.replace(
            config, confidence=config.confidence if a.confidence is None else
            a.confidence, components=config.components or a.components)
    ref = _reference(a, model, config)
    extra = {"image": a.image, "reference": a.reference or
             ("template" if ref.sigma_ref is not None else None), "sigma": ref.name}
    if a.tiles:
        return _test_tiles(a, model, ref, config, extra)
    if a.resume or a.workers != 1:
        raise InputError("--resume and --workers go with --tiles (one image is one "
                         "test; --processes shares its search)")
    x = model_input(model, read_raw(a.image), a.image)
    config = _auto_processes(a, model, config, x.shape)
    result, seconds = run_test(model, x, ref.x_ref, sigma=ref.sigma,
                               sigma_ref=ref.sigma_ref, out_dir=a.out,
                               checkpoint=a.checkpoint, seed=a.seed, config=config,
                               progress=not a.no_progress, extra=extra)
    print(format_result(result))
    print(f"{seconds:.1f} s (compilation included); report in {a.out}/")
    return 0


# From this many pixels `sijax test` on a CPU shares one image's line over worker
# processes by default (when the propagate engine runs it, the model is a native
# one and there are two usable cores): at 32x32 two processes gave 1.83x warm and
# 1.61x on the first p-value, at 16x16 only 1.19x / 1.03x (benchmarks/README.md,
# "One image on every core"). At most AUTO_PROCESSES, the count measured.
AUTO_PROCESSES_PIXELS = 1024
AUTO_PROCESSES = 2


def _auto_processes(a: argparse.Namespace, model, config, shape):
    """The default of --processes for one image of ``shape`` (see above)."""
    import dataclasses

    import jax

    from sijax.checkpoint import DiffusionModel
    from sijax.detect.dal import Engine, resolve_engine
    from sijax.experiments.pool import usable_cores

    asked = a.processes is not None or a.devices is not None
    if asked or config.devices != 1 or config.processes != 1:
        return config
    n = min(usable_cores(), AUTO_PROCESSES)
    big = shape[0] * shape[1] >= AUTO_PROCESSES_PIXELS
    if n < 2 or not big or not isinstance(model, DiffusionModel):
        return config
    if jax.default_backend() != "cpu":
        return config
    if resolve_engine(config, model, shape).engine is not Engine.PROPAGATE:
        return config
    return dataclasses.replace(config, engine=Engine.PROPAGATE, processes=n)


def _shared_line(a: argparse.Namespace, config):
    """--devices / --processes: the propagate engine's search shared by N devices
    (default: all accelerators when there are several; an explicit walk engine
    keeps one, and refuses an explicit --devices through DALConfig) or by N worker
    processes (DALConfig.processes)."""
    import dataclasses

    import jax

    procs = getattr(a, "processes", None)
    if procs is not None:
        if procs < 1:
            raise InputError(f"--processes must be >= 1; got {procs}")
        if procs > 1 and a.devices not in (None, 1):
            raise InputError("--devices and --processes both share the line: "
                             "choose one")  # fmt: skip
        if procs > 1:
            engine = "propagate" if config.engine == "auto" else config.engine
            return dataclasses.replace(config, engine=engine, processes=procs)
    n = a.devices
    if n is None:
        devices = jax.local_devices()
        cpu = devices[0].platform == "cpu"
        n = 1 if cpu or config.engine == "walk" else len(devices)
    if n == 1:
        return config
    engine = "propagate" if config.engine == "auto" else config.engine
    return dataclasses.replace(config, engine=engine, devices=n)


def _test_tiles(a, model, ref, config, extra) -> int:
    import json

    from sijax.data.images import read_raw
    from sijax.evaluation.tiles import plot_tiles, run_tiled_test, tile_origins

    ensure_output_dir(a.out)
    prep = model.preprocessing
    raw = read_raw(a.image)
    if prep is not None:
        image = prep.check_native(raw, a.image)
    else:  # a model trained on N(0, 1) images: the file as it is, by bit depth
        from sijax.data.images import scale_intensity

        image = scale_intensity(raw, a.image)
    s = model.image_shape[0]
    # Said before the work: a large image is many tests, each up to minutes.
    n = len(tile_origins(image.shape[0], image.shape[1], s))
    print(f"{a.image}: {image.shape[0]}x{image.shape[1]}, {n} tiles of {s}x{s}; "
          "each tile with a region gets a DAL test (records in "
          f"{os.path.join(a.out, 'tiles.jsonl')} as they finish; --resume continues "
          "a killed run)", file=sys.stderr)
    res = run_tiled_test(model, image, ref, config=config, seed=a.seed, out_dir=a.out,
                         resume=a.resume, workers=a.workers,
                         progress=not a.no_progress)
    with open(os.path.join(a.out, "tiles.json"), "w") as f:
        json.dump({"tiles": res.tiles, "size": res.size, "alpha": config.alpha,
                   "adjustment": "holm", **extra}, f, indent=1)
    plot_tiles(os.path.join(a.out, "tiles.png"), image, res, alpha=config.alpha)
    print(f"{len(res.tiles)} tiles of {res.size}x{res.size}: {res.tested} with a "
          f"region, {res.significant} significant at {config.alpha:g} (Holm)")
    for t in res.tiles:
        if t["adjusted_p"] is not None:
            print(f"  tile {t['tile']} at ({t['row']}, {t['col']}): region "
                  f"{t['region_size']} px, {t['p_text']}, Holm-adjusted "
                  f"{'' if t['p_exact'] else '<= '}{t['adjusted_p']:.4g}"
                  + ("  *" if t["significant"] else ""))
    print(f"report in {a.out}/ (tiles.json, tiles.png)")
    return 0


def _demo_args(p: argparse.ArgumentParser):
    from sijax.data.examples import SIZES

    p.add_argument("--size", type=int, default=8, choices=SIZES,
                   help="example and committed checkpoint size")
    _dal_options(p)


def _demo_run(a: argparse.Namespace) -> int:
    from sijax.checkpoint import load_model
    from sijax.data.examples import example_paths, load_example
    from sijax.detect.run import DEFAULT_CHECKPOINTS, format_result, run_test

    _configure_jax()
    config = _dal_config(a)
    x, x_ref = load_example(a.size)
    checkpoint = os.path.join(DEFAULT_CHECKPOINTS, f"dal_v5_{a.size}")
    print(f"DAL test on the bundled {a.size}x{a.size} example (a +3 square planted in "
          f"N(0, 1) noise, an independent N(0, 1) reference), model {checkpoint}")
    result, seconds = run_test(load_model(checkpoint), x, x_ref, sigma=1.0,
                               out_dir=a.out, checkpoint=checkpoint, seed=a.seed,
                               config=config,
                               progress=not a.no_progress,
                               extra={"image": example_paths(a.size)[0],
                                      "reference": example_paths(a.size)[1]})
    print(format_result(result))
    print(f"{seconds:.1f} s (compilation included); report in {a.out}/")
    return 0


# --- experiment ----------------------------------------------------------------------

# Choices of `sijax experiment`, spelled out so that building the parser imports no
# JAX; tests check them against sijax.experiments.
EXPERIMENTS = ("fpr", "power", "pieces", "robustness", "pwl")
METHODS = ("selective", "oc", "naive", "bonferroni", "permutation")
NOISE_FAMILIES = ("skewnorm", "exponnorm", "gennorm_lo", "gennorm_hi", "t")


def _experiment_args(p: argparse.ArgumentParser):
    p.add_argument("experiment", choices=EXPERIMENTS,
                   help="fpr (type I error), power, pieces (exhaustive search cost), "
                   "robustness (non-Gaussian noise), pwl (piecewise-linear SiLU/GELU)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sizes", type=int, nargs="+", help="image sides d")
    p.add_argument("--covariance", nargs="+", choices=("iid", "corr"))
    p.add_argument("--trials", type=int, help="valid trials per setting (1000)")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--deltas", type=float, nargs="+", help="signals (power, pwl)")
    p.add_argument("--noises", nargs="+", choices=NOISE_FAMILIES,
                   help="noise families (robustness)")
    p.add_argument("--distances", type=float, nargs="+",
                   help="Wasserstein-1 distances to N(0, 1) (robustness)")
    p.add_argument("--activations", nargs="+", choices=("pwl_silu", "pwl_gelu"),
                   help="piecewise-linear activations (pwl)")
    p.add_argument("--checkpoint", nargs="+", default=[],
                   help="model directories or committed names, one per size "
                   "(default: the committed dal_v5_SIZE); a model's calibrated "
                   "threshold is the region threshold (else 0.8)")
    p.add_argument("--termination", choices=("decision", "precision"),
                   default="decision",
                   help="search termination of the selective test (default decision: "
                   "enough to count rejections)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--hypothesis", choices=HYPOTHESES, default="reference",
                   help="what the region's mean is compared with: reference (v5, "
                   "default), background (the v1 in-image test of the paper's "
                   "v1-era figures) or neighbour; the images are the same")
    p.add_argument("--max-pieces", type=int, default=20_000)
    p.add_argument("--engine", choices=("walk", "propagate"), default="walk",
                   help="search engine: walk (default; the batch in one compiled "
                   "call per device) or propagate (faster per image at 16x16 and "
                   "up, the images one after another, in --workers processes)")
    p.add_argument("--batch", type=int, default=8,
                   help="images per compiled call (rounded up to the devices)")
    p.add_argument("--permutations", type=int, default=1000,
                   help="B of the permutation method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from the trials already in --out")
    p.add_argument("--max-batches", type=int,
                   help="stop after this many batches (0: only rewrite the summary "
                   "and plots from --out's trials; needs --resume)")
    p.add_argument("--workers", type=int,
                   help="worker processes on this host, each with one single-threaded "
                   "CPU device (1: this process, its batches sharded over "
                   "--cpu-devices). Default: 1 walking; with --engine propagate one "
                   "per usable core when JAX runs on the CPU (else 1)")
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() first (multi-host runs; on "
                   "TPU, Slurm or Open MPI it finds the cluster itself, elsewhere "
                   "give the next three)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="with --distributed: the address of process 0")
    p.add_argument("--num-processes", type=int,
                   help="with --distributed: how many processes take part")
    p.add_argument("--process-id", type=int,
                   help="with --distributed: this process's index, 0 .. N-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu-devices", type=int, default=_usable_cores(),
                   help="on a CPU, split it into this many single-threaded XLA devices "
                   "that search their images independently (default: one per usable "
                   "core; 1: XLA's default); ignored when XLA_FLAGS sets a device "
                   "count")


# The device policy (also `sijax evaluate`'s) lives with the worker pool it serves.
from sijax.experiments.pool import auto_workers as _auto_workers  # noqa: E402
from sijax.experiments.pool import usable_cores as _usable_cores  # noqa: E402
from sijax.experiments.pool import use_cpu_devices as _use_cpu_devices  # noqa: E402


def _experiment_run(a: argparse.Namespace) -> int:
    cluster = (a.coordinator, a.num_processes, a.process_id)
    if not a.distributed and cluster != (None, None, None):
        raise InputError("--coordinator, --num-processes and --process-id need "
                         "--distributed")
    workers = 1 if a.workers is None and a.engine == "walk" else a.workers
    _use_cpu_devices(a.cpu_devices if workers == 1 else 1)  # workers: own devices
    _configure_jax()
    import jax

    from sijax.checkpoint import load_model
    from sijax.experiments import default_spec, run_experiment

    if a.distributed:
        jax.distributed.initialize(*cluster)
    if workers is None:
        workers = _auto_workers(a.engine, jax.default_backend(), jax.process_count())
    checkpoints = {}
    for c in a.checkpoint:
        checkpoints[load_model(c).image_shape[0]] = c
    spec = default_spec(
        a.experiment, sizes=a.sizes, covariances=a.covariance, trials=a.trials,
        methods=a.methods, deltas=a.deltas, noises=a.noises, distances=a.distances,
        activations=a.activations, checkpoints=checkpoints or None,
        termination=a.termination, alpha=a.alpha, max_pieces=a.max_pieces,
        hypothesis=a.hypothesis, batch=a.batch, permutations=a.permutations,
        seed=a.seed, engine=a.engine)
    rows = run_experiment(spec, a.out, resume=a.resume, progress=not a.no_progress,
                          max_batches=a.max_batches, workers=workers)
    if jax.process_index() == 0:
        with open(os.path.join(a.out, "summary.md")) as f:
            print(f.read())
        incomplete = sum(r.trials < r.target for r in rows)
        print(f"wrote summary.json, summary.md and plots to {a.out}/"
              + (f"; {incomplete} rows below the target trials" if incomplete else ""))
    return 0


# --- evaluate ------------------------------------------------------------------------

def _evaluate_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="model directory")
    p.add_argument("--data", required=True,
                   help="an MVTec AD category root (test/good, test/<defect>, "
                   "ground_truth/), or a folder or stack of images (all tested)")
    p.add_argument("--sigma", default=None,
                   help="'model' (default: the noise model stored with a model "
                   "trained on data) or 'model:KIND' (pixel, stationary, lowrank), "
                   "or a variance, 'iid', 'corr', a .npy file")
    p.add_argument("--reference", default=None,
                   help="'template' (default with a noise model) or an image file")
    p.add_argument("--fdr", type=float, default=0.05,
                   help="false discovery rate of the Benjamini-Hochberg selection "
                   "over the images (0.05)")
    p.add_argument("--kinds", nargs="+", help="test only these kinds (good, a "
                   "defect folder's name)")
    p.add_argument("--max-per-kind", type=int,
                   help="test at most this many images of each kind")
    p.add_argument("--workers", type=int,
                   help="worker processes (default: one per usable core on a CPU, "
                   "else 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue an evaluation in --out (nothing is redone)")
    p.add_argument("--no-reports", action="store_true",
                   help="no report picture per image (only the overview)")
    p.add_argument("--alpha", type=float, help="level of each image's test (0.05)")
    _dal_options(p)
    p.set_defaults(out=None)


def _evaluate_run(a: argparse.Namespace) -> int:
    if a.out is None:
        raise InputError("--out is required")
    from sijax.experiments.pool import usable_cores

    workers = a.workers or usable_cores()
    if workers < 1:
        raise InputError(f"--workers must be >= 1; got {workers}")
    _configure_jax()
    import jax

    from sijax.data import open_dataset
    from sijax.evaluation.evaluate import evaluate

    if jax.default_backend() != "cpu" and a.workers is None:
        workers = 1
    model = _load_for_test(a)
    config = _dal_config(a, model)
    if a.alpha is not None:
        import dataclasses

        config = dataclasses.replace(config, alpha=a.alpha)
    ref = _reference(a, model, config)
    dataset = open_dataset(a.data)
    summary = evaluate(model, dataset, ref, a.out, config=config,
                       checkpoint=a.checkpoint, seed=a.seed, fdr=a.fdr,
                       kinds=a.kinds, max_per_kind=a.max_per_kind, resume=a.resume,
                       workers=workers, progress=not a.no_progress,
                       reports=not a.no_reports)
    with open(os.path.join(a.out, "summary.md")) as f:
        print(f.read())
    print(f"wrote images.jsonl, summary.json, summary.md and overview.png to "
          f"{a.out}/ ({summary['images']} images)")
    return 0


# --- noise-check -------------------------------------------------------------------

def _noise_check_args(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="a model trained with --data")
    p.add_argument("--data", required=True,
                   help="held-out normal images: an MVTec AD category root (its "
                   "test/good is used) or a folder or stack of images (all used); "
                   "not the images the noise models were estimated from")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4],
                   help="sides of the random squares (1 2 3 4)")
    p.add_argument("--seed", type=int, default=0, help="places of the squares")
    p.add_argument("--out", help="also write the numbers to this JSON file")


def _noise_check_run(a: argparse.Namespace) -> int:
    _configure_jax()
    import json

    import numpy as np

    from sijax.checkpoint import load_model
    from sijax.data import open_dataset
    from sijax.evaluation.evaluate import evaluation_items
    from sijax.evaluation.images import model_input
    from sijax.noise_model import KINDS, check_noise_model

    model = load_model(a.checkpoint)
    if model.info.noise_model is None:
        raise InputError(f"{a.checkpoint} stores no noise model (it was not trained "
                         "with --data)")
    dataset = open_dataset(a.data)
    _refuse_training_data(model, dataset)
    items = evaluation_items(dataset)
    if any(it.kind == "good" for it in items):
        items = [it for it in items if it.kind == "good"]
    elif any(it.kind != "unlabelled" for it in items):
        raise InputError(f"{a.data} has no test/good images to check against")
    x = np.stack([np.asarray(model_input(model, dataset.read(it), it.name))
                  for it in items])
    rows = {kind: check_noise_model(model.noise_model(kind), x, a.sizes, seed=a.seed)
            for kind in KINDS}
    print(f"{len(x)} held-out normal images; per square side: variance of z "
          "[99% interval] (1 when the noise model is right) and the fraction with "
          "|z| > 1.96 (0.05)")
    for kind, checks in rows.items():
        cells = [f"{r['size']}x{r['size']} {r['var_z']:.2f} "
                 f"[{r['var_z_interval_99'][0]:.2f}, {r['var_z_interval_99'][1]:.2f}]"
                 f" {r['rate_196']:.3f}" for r in checks]
        under = [r["size"] for r in checks if r["var_z_interval_99"][0] > 1.0]
        over = [r["size"] for r in checks if r["var_z_interval_99"][1] < 1.0]
        note = ""
        if under:  # the test would reject normal regions of these sizes too often
            note = (f"  <- UNDERSTATES the variance (sides {under}): too many "
                    "rejections")
        elif over:
            note = f"  (overstates it at sides {over}: conservative there)"
        print(f"  {kind:<10}  " + "  ".join(cells) + note)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"images": len(x), "checks": rows}, f, indent=1)
    return 0


def _refuse_training_data(model, dataset) -> None:
    """noise-check on the very images the noise models were estimated from would
    pass whatever the noise: the recorded training folder (an MVTec root's
    train/good), or the same files elsewhere. An MVTec root is fine (its test/good
    is used)."""
    import json

    from sijax.data.datasets import data_source

    if dataset.layout == "mvtec":
        return
    with open(os.path.join(model.info.directory, "config.json")) as f:
        trained = json.load(f).get("data") or {}
    if "path" not in trained:
        return
    folder = trained["path"]
    if trained.get("layout") == "mvtec":
        folder = os.path.join(folder, "train", "good")
    same = os.path.abspath(dataset.path) == folder or (
        trained.get("sha256") == data_source(dataset.path)["sha256"])
    if same:
        raise InputError(
            f"{dataset.path} holds the images the model was trained on (the same "
            "files as its recorded data source): its noise models were estimated "
            "from them, so the check would pass whatever the noise; give normal "
            "images that were not used for training")


# --- data --------------------------------------------------------------------------

def _data_args(p: argparse.ArgumentParser):
    p.add_argument("name", help="digits (scikit-learn's handwritten digits) or a "
                   "scikit-image texture: brick, grass, gravel, ihc")
    p.add_argument("--out", required=True, help="output folder (MVTec AD layout)")
    p.add_argument("--size", type=int, help="image side (digits: 8)")
    p.add_argument("--n-train", type=int, help="normal training images")
    p.add_argument("--n-test-good", type=int, help="normal test images")
    p.add_argument("--n-test-defect", type=int, help="test images per defect kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing data set in --out")


def _data_run(a: argparse.Namespace) -> int:
    from sijax.data import build_dataset, open_dataset

    path = build_dataset(a.name, a.out, size=a.size, n_train=a.n_train,
                         n_test_good=a.n_test_good, n_test_defect=a.n_test_defect,
                         seed=a.seed, overwrite=a.overwrite)
    ds = open_dataset(path)
    counts = {k: sum(it.kind == k for it in ds.test) for k in ds.kinds}
    print(f"wrote {path}: {len(ds.train)} training images "
          f"{ds.shape[0]}x{ds.shape[1]}x{ds.shape[2]}, test {counts}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None],
                Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "train": ("train a diffusion model (resumable)", _train_args, _train_run),
    "sample": ("generate images from pure noise", _sample_args, _sample_run),
    "reconstruct": ("reconstruct one image; write D(x) and the error map",
                    _reconstruct_args, _reconstruct_run),
    "test": ("the DAL test of one image: region and selective p-value",
             _test_args, _test_run),
    "demo": ("the DAL test on the bundled example (no downloads)", _demo_args,
             _demo_run),
    "evaluate": ("test every image of a data set (MVTec AD layout or a folder): "
                 "images.jsonl, summary.json with AUROC, AUPRO, type I error and "
                 "power, overview.png", _evaluate_args, _evaluate_run),
    "data": ("build a small real data set offline (digits, textures) in the "
             "MVTec AD layout, with synthetic defects and masks (needs the [data] "
             "extra)", _data_args, _data_run),
    "noise-check": ("does each stored noise model give region means their real "
                    "variance? z of random squares on held-out normal images",
                    _noise_check_args, _noise_check_run),
    "experiment": ("the paper's experiments: type I error, power, pieces, "
                   "robustness, piecewise-linear activations", _experiment_args,
                   _experiment_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sijax", description="Diffusion-based anomaly localization with "
        "selective p-values (the DAL test).",
        epilog="Compiled programs are kept between runs in $SIJAX_COMPILE_CACHE "
        "(default ~/.cache/sijax/jax; 'off' keeps nothing; the directory may be "
        "deleted at any time).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sijax`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SijaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
