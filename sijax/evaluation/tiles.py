"""Images larger than the model, tested tile by tile.

The grid: tiles of the model's size ``s`` at rows 0, s, 2s, ... and the same
columns; where the image side is not a multiple of s, one more row (column) of tiles
is aligned with the bottom (right) edge, overlapping its neighbour, so that every
pixel is in at least one tile and no tile is resampled. Each tile is an image of the
model's input size at the image's own resolution (the recorded preprocessing scales
the intensities and standardises the channels, but does not resize), so the model
must have been trained on images at that scale (e.g. patches of larger images).

Each tile with a detected region gets its own DAL test (its own sampler noises,
a function of (seed, tile index)). Their p-values are adjusted for the number of
tested tiles by Holm's method (family-wise error at ``alpha`` over the image,
valid under any dependence between tiles); a tile is significant when its adjusted
p-value is below ``alpha``.

A large image is many tests: the tiles run through the experiments' resumable
runner (:class:`sijax.experiments.runner.Runner`), each tile's record appended to
``tiles.jsonl`` and its maps saved as it finishes, in one or several worker
processes; a killed run resumes where it stopped, and a resume with another image,
model or setting is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from typing import NamedTuple

import numpy as np

from sijax.detect.dal import DALConfig
from sijax.errors import InputError, ensure_output_dir
from sijax.evaluation.images import Reference, image_key, run_image_test
from sijax.evaluation.metrics import holm


def tile_origins(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(row, column) of the top-left corner of every tile (module docstring)."""
    if height < size or width < size:
        raise InputError(f"the image ({height}x{width}) is smaller than one tile "
                         f"({size}x{size}): test it without tiles")

    def starts(n):
        out = list(range(0, n - size + 1, size))
        return out if out[-1] == n - size else [*out, n - size]

    return [(r, c) for r in starts(height) for c in starts(width)]


class TiledResult(NamedTuple):
    """The tests of the tiles of one image.

    Attributes:
      tiles: one dict per tile: row, col, region_size, p_value, inf_p, sup_p,
        naive_p_value, status, ..., adjusted_p (Holm over the tested tiles; None
        for tiles without a region) and significant.
      score_map: (H, W) float64 score of every pixel (the maximum over the tiles
        that cover it).
      mask: (H, W) bool union of the detected regions.
      size: tile side.
    """

    tiles: list
    score_map: np.ndarray
    mask: np.ndarray
    size: int

    @property
    def tested(self) -> int:
        return sum(t["adjusted_p"] is not None for t in self.tiles)

    @property
    def significant(self) -> int:
        return sum(bool(t["significant"]) for t in self.tiles)


TILES_FILE = "tiles.jsonl"  # one record per finished tile
RUN_FILE = "tiles_run.json"  # what the records belong to, checked on resume


def tile_map_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "tile_maps", f"{index:05d}.npz")


@dataclasses.dataclass
class TileBatch:
    """Tests tiles of one image (picklable: each worker process holds a copy of the
    model, the image and the reference)."""

    model: object
    image: np.ndarray
    reference: Reference
    config: DALConfig
    seed: int
    origins: list
    out_dir: str

    def __call__(self, group, indices, report=None) -> list[dict]:
        s = self.model.image_shape[0]
        out = []
        for i in indices:
            r, col = self.origins[i]
            rec, res = run_image_test(self.model, self.image[r:r + s, col:col + s],
                                      self.reference, config=self.config,
                                      key=image_key(self.seed, i))
            # Saved before the record is appended: a record means its maps exist.
            np.savez_compressed(tile_map_path(self.out_dir, i), score=res.score_map,
                                region=res.mask)
            out.append({"index": i, "row": r, "col": col, **rec})
        return out


def run_tiled_test(model, image: np.ndarray, reference: Reference, *,
                   config: DALConfig | None = None, seed: int = 0,
                   out_dir: str | os.PathLike | None = None, resume: bool = False,
                   workers: int = 1, progress: bool = False) -> TiledResult:
    """Tests every tile of a preprocessed image (not resized).

    Args:
      model: a model whose image shape is (s, s, C).
      image: (H, W, C) float64, H, W >= s, in the model's input units
        (``model.preprocessing.check_native(raw)``; for a model trained without
        data, ``sijax.data.images.scale_intensity(raw)``).
      reference: the reference of one tile and the covariances.
      config: the DAL options (``alpha`` is the family-wise level).
      seed: tile i's sampler noises come from ``image_key(seed, i)``.
      out_dir: where each tile's record (``tiles.jsonl``) and maps (``tile_maps/``)
        are written as it finishes; None: a temporary folder, removed at the end.
      resume: continue a killed run in ``out_dir`` (required when it holds
        records); only the tiles without a record are tested.
      workers: processes that test tiles at the same time (each on its own tiles).
        They are spawned: a script that passes workers > 1 needs the usual
        ``if __name__ == "__main__":`` guard, or its children fail to start.
      progress: a progress bar of the tiles.

    Raises:
      InputError: an image without the model's channels or smaller than a tile,
        an image of integers (as stored in its file, not in the model's units),
        records in ``out_dir`` without ``resume``, or a resume with another image,
        model or setting.
    """
    config = DALConfig() if config is None else config
    s, _, c = model.image_shape
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != c:
        raise InputError(f"image shape {image.shape} does not have the model's {c} "
                         "channel(s)")
    if not np.issubdtype(image.dtype, np.floating):
        # Pixels as stored (0..255) read as hundreds of standard deviations: every
        # tile would get a region and a tiny p-value.
        raise InputError(f"image dtype {image.dtype}: the tiles are tested in the "
                         "model's input units; pass model.preprocessing.check_native"
                         "(raw) (or scale_intensity(raw) for a model trained without "
                         "data)")
    origins = tile_origins(image.shape[0], image.shape[1], s)
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="sijax-tiles-") as tmp:
            return run_tiled_test(model, image, reference, config=config, seed=seed,
                                  out_dir=tmp, workers=workers, progress=progress)
    from sijax.evaluation.evaluate import claim_output
    from sijax.experiments.runner import EveryIndex, Runner

    out_dir = os.fspath(out_dir)
    ensure_output_dir(out_dir)
    os.makedirs(os.path.join(out_dir, "tile_maps"), exist_ok=True)
    pixels = np.ascontiguousarray(image, np.float64)
    meta = {"image_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "image_shape": list(image.shape), "tile": s, "tiles": len(origins),
            "weights_sha256": model.weights_sha256(), "sigma": reference.name,
            "seed": seed, "config": dataclasses.asdict(config)}
    batch = TileBatch(model, image, reference, config, seed, origins, out_dir)
    claim = functools.partial(claim_output, out_dir, TILES_FILE, RUN_FILE, meta,
                              resume, "the tiles of a test")
    records = Runner([EveryIndex("tiles", len(origins))], batch, out_dir, batch=1,
                     records_file=TILES_FILE, resume=resume, workers=workers,
                     progress=progress, desc="tiles", unit="tile",
                     what="sijax test --tiles", claim=claim).run()
    latest = {r["index"]: r for r in records}
    score = np.full(image.shape[:2], -np.inf)
    mask = np.zeros(image.shape[:2], bool)
    tiles = []
    for i, (r, col) in enumerate(origins):
        with np.load(tile_map_path(out_dir, i)) as maps:
            window = (slice(r, r + s), slice(col, col + s))
            score[window] = np.maximum(score[window], maps["score"])
            mask[window] |= maps["region"]
        tiles.append({"tile": i, **{k: v for k, v in latest[i].items()
                                     if k != "index"}})
    tested = [t for t in tiles if t["status"] in ("ok", "max_pieces")]
    # A decision search knows only bounds: its sup_p is the conservative p-value.
    p = [t["sup_p"] if t["sup_p"] is not None else 1.0 for t in tested]
    adjusted = holm(p) if tested else []
    for t in tiles:
        t["adjusted_p"], t["significant"] = None, False
    for t, a in zip(tested, adjusted, strict=True):
        t["adjusted_p"], t["significant"] = float(a), bool(a < config.alpha)
    return TiledResult(tiles, score, mask, s)


def plot_tiles(path: str | os.PathLike, image: np.ndarray, result: TiledResult,
               *, alpha: float, title: str = "") -> None:
    """One picture of all tiles: the image with the grid, the detected regions in
    red, significant tiles framed thick with their adjusted p-value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * h / w + 0.6))
    shown = image[:, :, 0] if image.shape[2] == 1 else image
    if image.shape[2] == 3:
        lo, hi = shown.min(), shown.max()
        shown = (shown - lo) / (hi - lo if hi > lo else 1.0)
    axes[0].imshow(shown, cmap="gray" if image.shape[2] == 1 else None)
    axes[0].contour(result.mask, levels=[0.5], colors="red", linewidths=0.8)
    axes[1].imshow(result.score_map, cmap="magma")
    axes[1].set_title("score map (max over tiles)")
    for t in result.tiles:
        sig = t["significant"]
        for ax in axes:
            ax.add_patch(Rectangle((t["col"] - 0.5, t["row"] - 0.5), result.size,
                                   result.size, fill=False, lw=2.5 if sig else 0.4,
                                   ec="lime" if sig else "white", alpha=0.9))
        if t["adjusted_p"] is not None:
            axes[0].text(t["col"] + 1, t["row"] + 1, f"{t['adjusted_p']:.2g}",
                         color="lime" if sig else "yellow", fontsize=6, va="top")
    axes[0].set_title(title or f"{len(result.tiles)} tiles, {result.tested} with a "
                      f"region, {result.significant} significant (Holm, alpha "
                      f"{alpha:g})")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
