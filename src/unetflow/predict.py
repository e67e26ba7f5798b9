"""Tiled prediction over OME-Zarr: exact or Gaussian-blended, out of core, sharded across jobs.

Geometry: unetflow.tiling (tiles on the 2**depth grid, exact halo, reflection at the
image border). Instance labels: unetflow.components.

Execution. The work is a dask expression per *work unit* (a box of whole tiles of about
tiling.UNIT_MEGAPIXELS): read the unit with its halo chunk by chunk, overlap the chunks by
the halo (`da.overlap.overlap`), `map_blocks` each tile through the model, store the tile's output
into its own chunk. Units run one after another with one unit of look-ahead on a shared
thread pool, so memory and graph size do not grow with the image. Tiles from concurrent dask
tasks are gathered into batches of `predict.batch_size` by `TileRunner` (useful on a GPU,
where reading and writing then overlap with the forward passes).

Sharding. `predict.shards: N` splits the units into N contiguous groups with about equal
tile counts. `create_raw_store` makes one raw Zarr store; each shard writes only its tiles'
chunks (`predict_shard`), so no two jobs write the same chunk; `gather_prediction` then turns
the raw store into the NGFF 0.5 output (blending, pyramid, labels, metadata), atomically.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
import zarr

import unetflow
from unetflow import notices
from unetflow.components import connected_components
from unetflow.files import atomic_path
from unetflow.integrity import checked_from_zarr, warn_missing_chunks
from unetflow.model.checkpoint import (
    autocast_dtype,
    build_model,
    choose_device,
    file_sha256,
    load_checkpoint,
    read_description,
    skeleton_model,
)
from unetflow.model.inference import memory_format_for, prepare_for_inference
from unetflow.model.unet import UNet
from unetflow.normalize import denormalize_array, normalize_array, read_stats
from unetflow.ome import (
    OmeImage,
    channel_first_axes,
    open_image,
    write_image,
    write_image_direct,
    write_label_image,
    write_label_image_direct,
)
from unetflow.packaged import (
    PACKAGE_FORMAT,
    is_package,
    job_description,
    load_network,
    package_geometry,
    package_settings,
    preprocess,
)
from unetflow.targets import segmentation_target, uses_boundaries
from unetflow.tiling import (
    Box,
    NetworkGeometry,
    TilePlan,
    plan_tiles,
    read_box,
    shard_boxes,
    work_units,
)
from unetflow.watershed import seeded_watershed_chunked

__all__ = [
    "TileRunner",
    "PredictionJob",
    "gaussian_importance",
    "predict_box",
    "fold_windows",
    "predict_array",
    "prepare_job",
    "model_description",
    "network_skeleton",
    "job_runner",
    "prediction_provenance",
    "instance_labels",
    "write_regression",
    "write_segmentation",
    "create_raw_store",
    "predict_shard",
    "gather_prediction",
    "predict_to_ome_zarr",
]


RAW_FORMAT = "unetflow-raw-prediction-1"


# --- running the model on tiles -----------------------------------------------------------
class TileRunner:
    """The model as a function of tiles (N, C, *spatial) -> (N, K, *spatial) float32.

    It runs `prepare_for_inference`'s copy of the model (batch norms folded, channels-last).

    With batch_size > 1, tiles submitted by concurrent dask tasks are gathered into batches
    of up to batch_size tiles of equal shape (waiting at most max_wait_s for a batch to
    fill), so the GPU gets full batches while dask threads read and write. On CUDA two
    server threads, each on its own stream, take turns: one copies a batch in and launches
    it while the other waits for its results, so the GPU does not idle between batches.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, softmax: bool,
                 amp: bool | str, batch_size: int, max_wait_s: float = 0.05) -> None:
        if isinstance(model, UNet):
            self.model = prepare_for_inference(model, device)  # same function, 1.4x faster
            self.memory_format = memory_format_for(model.spatial_dims)
        else:  # a packaged network (unetflow.packaged): as its package gives it
            self.model = model.to(device).eval()
            self.memory_format = torch.contiguous_format
        self.device, self.softmax = device, softmax
        self.dtype = autocast_dtype(device, amp)
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self._pending: list[tuple[np.ndarray, Future]] = []
        self._cond = threading.Condition()
        self._servers: list[threading.Thread] = []

    def __dask_tokenize__(self) -> tuple[str, int]:
        """Name by identity: dask must not pickle the model to name each task."""
        return ("unetflow.TileRunner", id(self))

    def forward(self, tiles: np.ndarray, halo: int = 0) -> np.ndarray:
        """One forward pass over a batch of tiles, softmax over classes for segmentation.

        With `halo`, the tiles' cores only: the same values, computed with a decoder that
        skips the halo (UNet.forward_core: about 1.25x faster at 1024 px tiles, measured).
        """
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        autocast = (torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None
                    else torch.autocast(self.device.type, enabled=False))
        with torch.inference_mode(), autocast:
            y = (self.model.forward_core(x, halo) if halo else self.model(x)).float()
            if self.softmax:
                y = torch.softmax(y, dim=1)
        return y.cpu().contiguous().numpy()

    def __call__(self, tiles: np.ndarray, halo: int = 0) -> np.ndarray:
        if self.batch_size <= 1 or len(tiles) >= self.batch_size:
            return self.forward(tiles, halo)
        future: Future = Future()
        with self._cond:
            if not self._servers:
                for i in range(2 if self.device.type == "cuda" else 1):
                    self._servers.append(threading.Thread(target=self._serve, daemon=True,
                                                          name=f"unetflow-batches-{i}"))
                    self._servers[-1].start()
            self._pending.append((tiles, halo, future))
            self._cond.notify_all()
        return future.result()

    @staticmethod
    def _kind(item: tuple[np.ndarray, int, Future]) -> tuple[tuple[int, ...], int]:
        """Tiles batch together when they have one shape and one halo."""
        return item[0].shape[1:], item[1]

    def _ready(self) -> int:
        kind = self._kind(self._pending[0])
        return sum(len(item[0]) for item in self._pending if self._kind(item) == kind)

    def _next_batch(self) -> list[tuple[np.ndarray, int, Future]]:
        """Wait for tiles, then up to max_wait_s for a full batch of one kind; take it."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while self._ready() < self.batch_size and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            first = self._pending[0]
            batch, rest, count = [first], [], len(first[0])
            for item in self._pending[1:]:
                fits = count + len(item[0]) <= self.batch_size
                if fits and self._kind(item) == self._kind(first):
                    batch.append(item)
                    count += len(item[0])
                else:
                    rest.append(item)
            self._pending = rest
            return batch

    def _serve(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            batch = self._next_batch()
            try:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    out = self.forward(np.concatenate([t for t, _, _ in batch]), batch[0][1])
            except BaseException as err:  # hand the error to every waiting dask task
                for _, _, future in batch:
                    future.set_exception(err)
                continue
            start = 0
            for tiles, _, future in batch:
                future.set_result(out[start:start + len(tiles)])
                start += len(tiles)


class _Progress:
    """Tiles done / total on stderr (tqdm), updated from dask worker threads."""

    def __init__(self, total: int, desc: str, unit: str = "tile") -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, ascii=True,
                         mininterval=2.0, disable=False)
        self._lock = threading.Lock()

    def __dask_tokenize__(self) -> tuple[str, int]:
        return ("unetflow.Progress", id(self))

    def update(self, tiles: int) -> None:
        with self._lock:
            self._bar.update(tiles)

    def close(self) -> None:
        self._bar.close()


def _to_batch(block: np.ndarray, dims: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(C, *extra, *spatial) -> (N, C, *spatial): slices along t/z (2D model) become a batch."""
    extra = block.shape[1:block.ndim - dims]
    tiles = block.reshape(block.shape[0], -1, *block.shape[block.ndim - dims:])
    return np.moveaxis(tiles, 1, 0), extra


def _from_batch(y: np.ndarray, extra: tuple[int, ...]) -> np.ndarray:
    """(N, K, *spatial) -> (K, *extra, *spatial)."""
    return np.moveaxis(y, 0, 1).reshape(y.shape[1], *extra, *y.shape[2:])


def _predict_core(block: np.ndarray, runner: TileRunner, dims: int, halo: int,
                  progress: _Progress | None) -> np.ndarray:
    """Crop blending: one tile with its halo in, the tile's core out."""
    tiles, extra = _to_batch(block, dims)
    y = runner(tiles, halo)
    if progress is not None:
        progress.update(len(tiles))
    return _from_batch(y, extra)


def gaussian_importance(shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """A Gaussian centred on the window, maximum 1, floored at 1e-6 so no weight is zero."""
    weights = np.ones(shape, dtype=np.float64)
    for axis, (n, s) in enumerate(zip(shape, sigma, strict=True)):
        x = np.arange(n) - (n - 1) / 2.0
        profile = np.exp(-0.5 * (x / s) ** 2)
        weights = weights * profile.reshape((1,) * axis + (n,) + (1,) * (len(shape) - axis - 1))
    return np.maximum(weights / weights.max(), 1e-6).astype(np.float32)


def _predict_window(block: np.ndarray, runner: TileRunner, dims: int, window: tuple[int, ...],
                    progress: _Progress | None) -> np.ndarray:
    """Gaussian blending: the whole window, weighted, plus the weight as a last channel.

    Windows at the image end are smaller; they are zero-padded (weight 0) to the full window
    so that window i sits at i * window in the windows array.
    """
    tiles, extra = _to_batch(block, dims)
    y = runner(tiles)
    if progress is not None:
        progress.update(len(tiles))
    spatial = y.shape[2:]
    weight = gaussian_importance(spatial, tuple(w / 8.0 for w in window))
    out = np.zeros((y.shape[0], y.shape[1] + 1, *window), dtype=np.float32)
    inside = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
    out[inside] = np.concatenate([y * weight, np.broadcast_to(weight, (y.shape[0], 1, *spatial))],
                                 axis=1)
    return _from_batch(out, extra)


def predict_box(source: da.Array, plan: TilePlan, box: Box, runner: TileRunner,
                progress: _Progress | None = None) -> da.Array:
    """Lazy model output for a box of tiles of normalized `source` (C, *plan.axes).

    crop: (K, *box pixels). gaussian: (K + 1, ...) weighted windows, window i of an axis at
    i * plan.window (fold them with `fold_windows`).
    """
    x = read_box(source, plan, box)
    depth = {1 + a: (plan.halo if a in plan.model_axes else 0) for a in range(len(plan.axes))}
    blocks = da.overlap.overlap(x, depth=depth, boundary="none") if plan.halo else x
    meta = np.empty((0,) * x.ndim, dtype=np.float32)
    if plan.blending == "crop":
        chunks = (plan.channels_out,) + tuple(plan.core_sizes(a, f, s)
                                              for a, (f, s) in enumerate(box))
        return blocks.map_blocks(_predict_core, runner=runner, dims=plan.model_dims,
                                 halo=plan.halo, progress=progress, dtype=np.float32,
                                 chunks=chunks, meta=meta)
    chunks = (plan.channels_out + 1,) + tuple((w,) * (s - f) for w, (f, s)
                                              in zip(plan.window, box, strict=True))
    window = tuple(plan.window[a] for a in plan.model_axes)
    return blocks.map_blocks(_predict_window, runner=runner, dims=plan.model_dims,
                             window=window, progress=progress, dtype=np.float32,
                             chunks=chunks, meta=meta)


# --- folding Gaussian windows -------------------------------------------------------------
def _along(axis: int, sl: slice) -> tuple[slice, ...]:
    return (slice(None),) * axis + (sl,)


def _fold_axis(ext: np.ndarray, axis: int, halo: int, window: int, core: int,
               has_left: bool, has_right: bool) -> np.ndarray:
    """Sum a window and its neighbours' overlapping strips into the tile's core (one axis).

    `ext` holds [left neighbour's last halo] + own window + [right neighbour's first halo].
    The left strip covers the core's first halo pixels, the right strip its last halo.
    """
    start = halo if has_left else 0
    out = ext[_along(axis, slice(start + halo, start + halo + core))].copy()
    if has_left:
        n = min(halo, core)
        out[_along(axis, slice(0, n))] += ext[_along(axis, slice(0, n))]
    if has_right:
        right = ext[_along(axis, slice(start + window, start + window + halo))]
        out[_along(axis, slice(core - halo, core))] += right
    return out


def _fold_block(ext: np.ndarray, plan: TilePlan, block_info: dict | None = None) -> np.ndarray:
    """One tile's blended output from its overlapped windows block: (K + 1, ...) -> (K, ...)."""
    info = block_info[None]
    out = ext
    for a in plan.model_axes:
        loc, count = info["chunk-location"][1 + a], info["num-chunks"][1 + a]
        out = _fold_axis(out, 1 + a, plan.halo, plan.window[a], info["chunk-shape"][1 + a],
                         has_left=loc > 0, has_right=loc < count - 1)
    return out[:-1] / out[-1:]


def fold_windows(windows: da.Array, plan: TilePlan, box: Box) -> da.Array:
    """Blended output (K, *box pixels) from the weighted windows array (K + 1, ...).

    Reads the box's windows and one neighbour tile on each side, overlaps them by the halo
    and folds each window with its neighbours' strips (a Gaussian-weighted average).
    """
    reads, keep, chunks = [slice(None)], [slice(None)], [plan.channels_out]
    for a, (first, stop) in enumerate(box):
        if a in plan.model_axes:
            lo, hi = max(first - 1, 0), min(stop + 1, plan.grid[a])
            w, t = plan.window[a], plan.tile[a]
            reads.append(slice(lo * w, hi * w))
            sizes = plan.core_sizes(a, lo, hi)
            keep.append(slice((first - lo) * t, (first - lo) * t + sum(sizes[first - lo:
                                                                              stop - lo])))
        else:
            reads.append(slice(first, stop))
            keep.append(slice(None))
            sizes = plan.core_sizes(a, first, stop)
        chunks.append(sizes)
    part = windows[tuple(reads)]
    part = part.rechunk((part.shape[0],) + tuple(
        (plan.window[a],) * len(c) if a in plan.model_axes else (1,) * len(c)
        for a, c in enumerate(chunks[1:])))
    depth = {1 + a: (plan.halo if a in plan.model_axes else 0) for a in range(len(plan.axes))}
    part = da.overlap.overlap(part, depth=depth, boundary="none") if plan.halo else part
    folded = part.map_blocks(_fold_block, plan=plan, dtype=np.float32, chunks=tuple(chunks),
                             meta=np.empty((0,) * part.ndim, dtype=np.float32))
    return folded[tuple(keep)]


def predict_array(model: UNet, data: da.Array | np.ndarray, settings: dict[str, Any],
                  device: torch.device | None = None, softmax: bool = False,
                  axes: list[str] | None = None) -> da.Array:
    """Lazy model output (K, *spatial) for normalized `data` (C, *spatial), tiled.

    `settings` is a validated predict section (config.section_settings). The whole image is
    one box: the same code the sharded store path runs per unit. With `crop` and the exact
    halo it equals one forward pass over the reflect-padded image.
    """
    data = data if isinstance(data, da.Array) else da.from_array(data)
    axes = axes or ["t", "z", "y", "x"][-(data.ndim - 1):]
    plan = plan_tiles(axes, data.shape[1:], model, tuple(settings["tile_shape"]),
                      settings["halo"], settings["blending"])
    runner = TileRunner(model, device or torch.device("cpu"), softmax=softmax,
                        amp=settings["amp"], batch_size=settings["batch_size"])
    box = tuple((0, g) for g in plan.grid)
    out = predict_box(data, plan, box, runner)
    return out if plan.blending == "crop" else fold_windows(out, plan, box)


# --- one prediction job: checkpoint, image, settings --------------------------------------
@dataclass
class PredictionJob:
    """What the create, shard and gather steps of one dataset share: no network, no device.

    Only the shard step loads the weights and chooses a device (`load_network`); create and
    gather run on CPU nodes whatever predict.device says.
    """

    checkpoint_path: str
    description: dict[str, Any]  # the checkpoint without weights (read_description)
    image: OmeImage
    axes: list[str]  # of `data`: "c" then the image's other axes in storage order
    data: da.Array  # the selected channels (C, ...), lazy, as stored
    stats: dict[str, Any] | None  # the dataset's normalization statistics
    settings: dict[str, Any]  # the validated predict section
    plan: TilePlan

    @property
    def segmentation(self) -> bool:
        return self.description["task"] == "segmentation"

    @property
    def boundaries(self) -> bool:
        """The network learnt background, interior and boundary (model.target
        boundaries): its objects come from a seeded watershed, not connected components."""
        return self.segmentation and uses_boundaries(self.description.get("model_settings"))

    @property
    def separate_axes(self) -> tuple[int, ...]:
        """Spatial axes (of the label image) along which objects are never joined: time."""
        return tuple(i for i, a in enumerate(self.plan.axes) if a == "t")

    @cached_property
    def checkpoint_sha256(self) -> str:
        """The checkpoint's (or package's) SHA-256, which every store made from it records."""
        return file_sha256(self.checkpoint_path)

    @property
    def packaged(self) -> bool:
        """A bioimage.io package (unetflow.packaged), not a unetflow checkpoint."""
        return self.description.get("format") == PACKAGE_FORMAT

    @property
    def normalization(self) -> dict[str, Any]:
        """How the model's inputs were normalized in training (method, clip); method
        "package" for a package, which normalizes with its own preprocessing."""
        norm = self.description["normalization"]
        return {"method": norm["method"], "clip": norm["clip"]}

    def normalized_source(self) -> da.Array:
        """The input as the network sees it: normalized with the dataset's statistics, or
        by the package's preprocessing (with them where it depends on the data)."""
        if self.stats is None:
            raise ValueError("this prediction step needs the dataset's statistics (--stats)")
        if self.packaged:
            return preprocess(self.data, self.description["package"], self.stats)
        norm = self.normalization
        return normalize_array(self.data, self.stats, norm["method"], norm["clip"])

    def load_network(self) -> tuple[torch.nn.Module, torch.device]:
        """The checkpoint's (or package's) network on predict.device (the shard step only)."""
        device = choose_device(self.settings["device"], "predict.device")
        if self.packaged:
            return load_network(self.description, device), device
        return build_model(load_checkpoint(self.checkpoint_path), device), device


def prepare_job(checkpoint_path: str, image_path: str, channels: list | None,
                settings: dict[str, Any], stats_path: str | None = None, *,
                description: dict[str, Any] | None = None, network: UNet | None = None,
                stats: dict[str, Any] | None = None, task: str | None = None) -> PredictionJob:
    """Open the image lazily and plan its tiles from the checkpoint's description.

    `task` is the model's task in the config: a checkpoint of another task is refused here,
    before any tile is predicted (it would write a store of the wrong kind that looks
    complete).

    The network's architecture (for the exact halo) is built without weights on the meta
    device: nothing is loaded onto a device. A job that prepares many images (a batch of
    positions) passes the `description`, its skeleton `network` and the `stats` it has
    already read, so that each image costs only its own metadata.
    """
    description = description or model_description(checkpoint_path, task)
    check_checkpoint_task(checkpoint_path, description, task)
    network = network or network_skeleton(description)
    if description.get("format") == PACKAGE_FORMAT:
        settings = package_settings(description, settings, f"--checkpoint {checkpoint_path}")
    image = open_image(image_path, level=settings["level"])
    data, axes = channel_first_axes(image, channels)
    in_channels = description["model_config"]["in_channels"]
    if data.shape[0] != in_channels:
        raise ValueError(f"{image_path}: {data.shape[0]} channel(s) selected but the model "
                         f"takes {in_channels}; check datasets.*.channels")
    if stats is None and stats_path:
        stats = read_stats(stats_path)
    plan = plan_tiles(axes[1:], data.shape[1:], network, tuple(settings["tile_shape"]),
                      settings["halo"], settings["blending"])
    return PredictionJob(checkpoint_path, description, image, axes, data, stats, settings,
                         plan)


def model_description(path: str, task: str | None) -> dict[str, Any]:
    """What a unetflow checkpoint says of its network (no weights), or a bioimage.io
    package's description (unetflow.packaged), whose task only the config says."""
    if not is_package(path):
        return read_description(path)
    from unetflow.packaged import describe_package

    if task is None:
        raise ValueError(f"--checkpoint {path} is a bioimage.io package: give the model's "
                         f"--task (segmentation or regression)")
    return job_description(describe_package(path), task)


def network_skeleton(description: dict[str, Any]) -> UNet | NetworkGeometry:
    """What tiling needs of the network: the U-Net without weights, or a package's
    declared geometry."""
    if description.get("format") == PACKAGE_FORMAT:
        return package_geometry(description)
    return skeleton_model(description)


def check_checkpoint_task(checkpoint_path: str, description: dict[str, Any],
                          task: str | None) -> None:
    """Refuse a checkpoint whose task is not the one the config gives its model."""
    if task is not None and description["task"] != task:
        raise ValueError(f"--checkpoint {checkpoint_path} holds a {description['task']} model, "
                         f"but this model is configured as task: {task} (models.<model>.task); "
                         f"put back the checkpoint that model trained (or delete the file and "
                         f"run Snakemake again to retrain it), or fix the task")


def _threads(settings: dict[str, Any], threads: int) -> int:
    """Set torch's threads and return dask's workers.

    batch_size 1: every dask worker runs the model, so by default as many workers as job
    threads with one torch thread each (measured on a 2-core CPU: 2 workers x 1 thread beat
    1 x 2 by about 15%). batch_size > 1: one thread runs the batches with all job threads,
    and batch_size + 1 dask workers read and write around it, enough to fill each batch.
    """
    threads = max(1, threads)
    batched = settings["batch_size"] > 1
    workers = settings["dask_workers"] or (settings["batch_size"] + 1 if batched else threads)
    torch.set_num_threads(settings["threads"] or (threads if batched
                                                  else max(1, threads // workers)))
    return workers


def _raw_array_name(plan: TilePlan) -> str:
    return "output" if plan.blending == "crop" else "windows"


def _raw_shape_and_chunks(plan: TilePlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if plan.blending == "crop":
        return (plan.channels_out, *plan.shape), (plan.channels_out, *plan.tile)
    return ((plan.channels_out + 1, *(g * w for g, w in zip(plan.grid, plan.window, strict=True))),
            (plan.channels_out + 1, *plan.window))


MAX_SHARDS = 10000  # the schema's maximum of predict.shards


def check_shard_count(shards: int, tiles: int, image: str) -> None:
    """The job's backstop for predict.shards (planning refuses more shards than the largest
    image of a model has tiles, and the schema more than MAX_SHARDS).

    An image with fewer tiles than shards is not refused here: shards are set per model, so
    a model predicting on a large and a small image gives the small one empty shards (jobs
    that write nothing), which cost little and leave the output whole; refusing them here
    would fail, after training, a config that planning accepted. Refused is a count above
    the image's tiles and above MAX_SHARDS, which no plan needs and only a settings JSON
    that bypassed the schema (the CLI called by hand) can give.
    """
    if shards > MAX_SHARDS and shards > tiles:
        raise ValueError(f"predict.shards {shards} but {image} has {tiles} tile(s) of "
                         f"predict.tile_shape; use at most {max(1, tiles)} shards (and at "
                         f"most {MAX_SHARDS}: no image needs more than one shard per tile)")


def create_raw_store(job: PredictionJob, path: str | Path, shards: int) -> None:
    """Create the empty raw store (zarr v3) the shards write into, atomically.

    Chunks are tiles (crop) or tile windows (gaussian), so each tile has its own chunk. The
    tile plan is stored with it: shards and the gather check theirs against it.
    """
    check_shard_count(shards, job.plan.tile_count(), job.image.path)
    warn_missing_chunks(job.image, "input")
    shape, chunks = _raw_shape_and_chunks(job.plan)
    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.create_array(_raw_array_name(job.plan), shape=shape, chunks=chunks,
                           dtype="float32", fill_value=0.0)
        group.attrs["unetflow"] = {"format": RAW_FORMAT, "plan": job.plan.to_dict(),
                                   "fingerprint": job.plan.fingerprint(), "shards": shards,
                                   "tiles": job.plan.tile_count(), "image": job.image.path,
                                   "task": job.description["task"],
                                   "checkpoint_sha256": job.checkpoint_sha256}


def _open_raw(path: str | Path, job: PredictionJob) -> tuple[zarr.Group, dict[str, Any]]:
    """The raw store and its metadata, checked against the plan of this step's settings and
    the checkpoint it was created for (a checkpoint replaced between the steps would mix
    two models' tiles in one store)."""
    plan = job.plan
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no raw prediction store; run 'unetflow predict "
                                f"create' first")
    group = zarr.open_group(str(path), mode="r+")
    meta = group.attrs.get("unetflow", {})
    if meta.get("format") != RAW_FORMAT:
        raise ValueError(f"{path}: not a raw prediction store of unetflow")
    stored = TilePlan.from_dict(meta["plan"])
    if stored.fingerprint() != plan.fingerprint():
        raise ValueError(f"{path}: planned for tiles {meta['plan']}, not {plan.to_dict()}; "
                         f"delete it and rerun (the predict settings or the image changed)")
    if meta.get("checkpoint_sha256") != job.checkpoint_sha256:
        raise ValueError(f"{path}: created for the checkpoint with SHA-256 "
                         f"{str(meta.get('checkpoint_sha256'))[:12]}..., but "
                         f"{job.checkpoint_path} is now {job.checkpoint_sha256[:12]}...; delete "
                         f"{path} and rerun (the checkpoint changed between the steps)")
    return group, meta


def _store_boxes(lazy_boxes: Iterator[tuple[da.Array, tuple[slice, ...]]],
                 target: zarr.Array, workers: int) -> None:
    """Compute and store boxes on one shared pool, one box of look-ahead.

    The next box starts while the current one finishes, so workers do not idle at box
    boundaries, and no more than two boxes are ever in memory.
    """
    pool = ThreadPoolExecutor(workers, thread_name_prefix="unetflow-dask")
    in_flight: deque[Future] = deque()
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="unetflow-box") as driver:
            for lazy, region in lazy_boxes:
                job = da.store(lazy, target, regions=region, lock=False, compute=False)
                in_flight.append(driver.submit(dask.compute, job, scheduler="threads",
                                               pool=pool, num_workers=workers))
                if len(in_flight) >= 2:
                    in_flight.popleft().result()
            while in_flight:
                in_flight.popleft().result()
    finally:
        pool.shutdown()


def job_runner(job: PredictionJob) -> TileRunner:
    """The job's network loaded on predict.device, as a TileRunner (loads the weights)."""
    model, device = job.load_network()
    softmax = job.segmentation and not job.packaged  # a package postprocesses its output
    return TileRunner(model, device, softmax=softmax, amp=job.settings["amp"],
                      batch_size=job.settings["batch_size"])


def predict_shard(job: PredictionJob, raw_path: str | Path, shard: int, shards: int,
                  threads: int, runner: TileRunner | None = None) -> dict[str, Any]:
    """Predict the tiles of shard `shard` of `shards` into the raw store; returns a record.

    Only this shard's chunks are written, so shards can run as separate jobs at once; a
    shard that was killed is simply run again (it rewrites the same chunks). A caller that
    predicts many images with one network passes its `runner` (`job_runner`), so the
    checkpoint is loaded once.
    """
    group, meta = _open_raw(raw_path, job)
    if meta["shards"] != shards:
        raise ValueError(f"{raw_path}: created for {meta['shards']} shards, not {shards}")
    boxes = shard_boxes(job.plan, shards, shard)
    runner = runner or job_runner(job)
    device = runner.device
    workers = _threads(job.settings, threads)
    source = job.normalized_source()
    progress = _Progress(job.plan.tile_count(boxes), f"predict shard {shard + 1}/{shards}")
    started = time.perf_counter()
    target = group[_raw_array_name(job.plan)]
    lazy = ((predict_box(source, job.plan, box, runner, progress), _raw_region(job.plan, box))
            for box in boxes)
    try:
        _store_boxes(lazy, target, workers)
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    pixels = sum(math.prod(s.stop - s.start for s in job.plan.box_slices(b)) for b in boxes)
    return {"shard": shard, "shards": shards, "fingerprint": job.plan.fingerprint(),
            "tiles": job.plan.tile_count(boxes), "boxes": [list(map(list, b)) for b in boxes],
            "seconds": round(seconds, 3), "megapixels_per_s": round(pixels / 1e6 / seconds, 4)
            if seconds > 0 else None, "device": str(device), "dask_workers": workers,
            "torch_threads": torch.get_num_threads()}


def _raw_region(plan: TilePlan, box: Box) -> tuple[slice, ...]:
    """Where a box's output lies in the raw array."""
    if plan.blending == "crop":
        return (slice(None), *plan.box_slices(box))
    return (slice(None), *(slice(a * w, b * w) for (a, b), w in zip(box, plan.window,
                                                                    strict=True)))


# --- gather: raw store -> NGFF 0.5 output ---------------------------------------------------
def _check_shard_records(records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    seen = sorted(r["shard"] for r in records)
    if seen != list(range(meta["shards"])):
        raise ValueError(f"shards {seen} were given but the store has {meta['shards']} shards")
    stale = [r["shard"] for r in records if r["fingerprint"] != meta["fingerprint"]]
    if stale:
        raise ValueError(f"shard(s) {stale} were predicted for another tile plan; rerun them")


def _blend(job: PredictionJob, raw: zarr.Group, work: Path, workers: int) -> da.Array:
    """The blended model output (K, *image): the raw tiles (crop) or folded windows."""
    plan = job.plan
    if plan.blending == "crop":
        return checked_from_zarr(raw["output"])
    blended = zarr.open_array(str(work / "blended.zarr"), mode="w",
                              shape=(plan.channels_out, *plan.shape),
                              chunks=(plan.channels_out, *plan.tile), dtype="float32")
    windows = checked_from_zarr(raw["windows"])
    boxes = ((fold_windows(windows, plan, box), (slice(None), *plan.box_slices(box)))
             for box in work_units(plan))
    _store_boxes(boxes, blended, workers)
    return da.from_zarr(blended)


def _output_layout(job: PredictionJob, channels: int) -> tuple[list[str], int | None]:
    """Output axes (the input's, with c where the input has it or channels > 1) and c's index."""
    other = job.axes[1:]
    if "c" in job.image.axes or channels > 1:
        position = 1 if other and other[0] == "t" else 0
        return other[:position] + ["c"] + other[position:], position
    return other, None


def _place_channels(values: da.Array | np.ndarray, position: int | None
                    ) -> da.Array | np.ndarray:
    """(K, *other) -> the output axis order (c after t), or without c."""
    if position is None:
        return values[0]
    return (np if isinstance(values, np.ndarray) else da).moveaxis(values, 0, position)


def _writers(values: da.Array | np.ndarray) -> tuple[Any, Any]:
    """ome's image and label writers for dask arrays, or their direct twins for numpy (the
    same stores, without dask's cost per image: a batch of small positions)."""
    if isinstance(values, np.ndarray):
        return write_image_direct, write_label_image_direct
    return write_image, partial(write_label_image, streaming=True)


def _chunks_for(job: PredictionJob, axes: list[str], channels: int) -> tuple[int, ...]:
    """Output chunks: predict.chunks on the model's axes (default: the tile), 1 on t and on
    z for a 2D model, all channels together; never larger than the image, whose one chunk
    would otherwise be padded to the tile (16x the bytes of a 256^2 field in tiles of 1024,
    written, compressed and read back for nothing)."""
    plan = job.plan
    configured = job.settings["chunks"]
    tiles = dict(zip(plan.axes, plan.tile, strict=True))
    if configured:
        model_names = [plan.axes[a] for a in plan.model_axes]
        tiles.update(zip(model_names[-len(configured):], configured, strict=False))
    sizes = dict(zip(plan.axes, plan.shape, strict=True))
    return tuple(channels if a == "c" else min(tiles[a], sizes[a]) for a in axes)


def objects_made_by(job: PredictionJob) -> str | None:
    """How the labels/prediction objects of a segmentation were made, in words (the
    metrics repeat it beside the instance scores)."""
    if not job.segmentation:
        return None
    if not job.settings["instances"]:
        return "none: labels/prediction holds the class map (predict.instances: false)"
    if job.boundaries:
        width = segmentation_target(job.description["model_settings"])["boundary_width"]
        w = job.settings["watershed"]
        return (f"seeded watershed (model.target: boundaries, boundary_width {width}): seeds "
                f"= connected components of P(interior) > {w['seed_threshold']} with at "
                f"least {w['min_seed_size']} px, grown over P(boundary) within P(interior) "
                f"+ P(boundary) > {w['foreground_threshold']}, objects under "
                f"{w['min_size']} px dropped")
    return "connected components of the predicted foreground (model.target: classes)"


def prediction_provenance(job: PredictionJob, model_name: str, dataset: str,
                          records: list[dict[str, Any]],
                          checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """What the output's `unetflow` attribute records: model, data, checkpoint, settings.

    `checkpoint_sha256` saves hashing the checkpoint again (a batch of positions hashes
    it once).
    """
    ckpt = job.description
    return {"model": model_name, "dataset": dataset, "image": job.image.path,
            "level": job.settings["level"], "checkpoint": str(job.checkpoint_path),
            "checkpoint_sha256": checkpoint_sha256 or job.checkpoint_sha256,
            "task": ckpt["task"],
            "step": ckpt.get("step"), "predict": job.settings, "halo": job.plan.halo,
            "tiles": job.plan.to_dict(), "shards": [{k: r[k] for k in
                                                    ("shard", "tiles", "seconds", "device")}
                                                   for r in records],
            "normalize": job.normalization, "normalization": job.stats,
            "model_config": ckpt["model_config"], "objects": objects_made_by(job),
            "unetflow_version": unetflow.__version__,
            "warnings": notices.recorded()}


def _geometry(job: PredictionJob, axes: list[str]) -> dict[str, Any]:
    scale, shift = job.image.axis_scale(), job.image.axis_translation()
    return {"scale": {a: (1.0 if a == "c" else scale[a]) for a in axes},
            "translation": {a: shift[a] for a in axes if a != "c"},
            "units": {a: u for a, u in job.image.units.items() if a in axes}}


def write_regression(job: PredictionJob, values: da.Array | np.ndarray, output: Path,
                     provenance: dict[str, Any]) -> None:
    """The regression output (in the input's units with output_units: input) as an NGFF
    image with its pyramid, atomically; dask arrays are computed with dask's current
    scheduler, numpy arrays (a small position, one block) written directly."""
    if job.settings["output_units"] == "input" and not job.packaged:  # a package's own units
        if values.shape[0] != len(job.stats["channels"]):
            raise ValueError(f"predict.output_units is 'input' but the model has "
                             f"{values.shape[0]} output channels and the statistics "
                             f"{len(job.stats['channels'])}; use output_units: normalized")
        values = denormalize_array(values, job.stats, job.normalization["method"])
    axes, position = _output_layout(job, values.shape[0])
    geo = _geometry(job, axes)
    write, _ = _writers(values)
    write(output, _place_channels(values.astype(np.float32), position), axes,
                scale=geo["scale"], units=geo["units"],
                pyramid_levels=job.settings["pyramid_levels"],
                chunks=_chunks_for(job, axes, values.shape[0]), attrs=provenance,
                translation=geo["translation"])


def instance_labels(job: PredictionJob, probabilities: da.Array, work: Path,
                    workers: int) -> tuple[da.Array, int]:
    """The objects (per time point), stored once under `work` (both writes read them), and
    their count: connected components of the foreground, or with model.target boundaries
    the seeded watershed of predict.watershed (`unetflow.watershed`)."""
    if job.boundaries:
        labels, count = seeded_watershed_chunked(probabilities, work / "watershed", workers,
                                                 job.settings["watershed"], job.separate_axes)
    else:
        classes = probabilities.argmax(axis=0)
        labels, count = connected_components(classes > 0, work / "local_labels.zarr", workers,
                                             separate_axes=job.separate_axes)
    stored = zarr.open_array(str(work / "labels.zarr"), mode="w", shape=labels.shape,
                             chunks=labels.chunksize, dtype=labels.dtype)
    with dask.config.set(scheduler="threads", num_workers=workers):
        da.store(labels, stored, lock=False)  # relabel once, read by both writes
    return da.from_zarr(stored), count


def write_segmentation(job: PredictionJob, probabilities: da.Array | np.ndarray,
                       labels: da.Array | np.ndarray, output: Path,
                       provenance: dict[str, Any]) -> None:
    """Probabilities (predict.probabilities) or the labels as the image, the labels under
    labels/prediction, atomically; dask arrays are computed with dask's current scheduler,
    numpy arrays (a small position, one block) written directly."""
    root = probabilities if job.settings["probabilities"] else labels[None]
    axes, position = _output_layout(job, root.shape[0])
    label_axes = [a for a in axes if a != "c"]
    geo = _geometry(job, axes)
    levels = job.settings["pyramid_levels"]
    chunks = _chunks_for(job, axes, root.shape[0])
    write, write_labels = _writers(root)
    with atomic_path(output) as tmp:
        write(tmp, _place_channels(root, position), axes, scale=geo["scale"],
              units=geo["units"], pyramid_levels=levels, chunks=chunks,
              attrs=provenance, translation=geo["translation"])
        write_labels(tmp, "prediction", labels, label_axes,
                     scale={a: geo["scale"][a] for a in label_axes}, units=geo["units"],
                     chunks=tuple(c for c, a in zip(chunks, axes, strict=True) if a != "c"),
                     pyramid_levels=levels, translation=geo["translation"])


def _write_segmentation(job: PredictionJob, probabilities: da.Array, output: Path,
                        provenance: dict[str, Any], work: Path, workers: int) -> int:
    """Probabilities (optional) as the image, labels under labels/prediction; returns count."""
    if job.settings["instances"]:
        labels, count = instance_labels(job, probabilities, work, workers)
    else:
        labels, count = probabilities.argmax(axis=0).astype(np.uint32), None
    with dask.config.set(scheduler="threads", num_workers=workers):
        write_segmentation(job, probabilities, labels, output, provenance)
    return count if count is not None else int(labels.max().compute())


def gather_prediction(job: PredictionJob, raw_path: str | Path, records: list[dict[str, Any]],
                      output: str | Path, model_name: str, dataset: str,
                      threads: int, provenance: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Write the NGFF 0.5 output from a complete raw store: blend, pyramid, labels, metadata.

    Everything streams chunk by chunk; the store appears at `output` only when complete.
    No network is loaded: the checkpoint's description and the dataset's statistics suffice.
    `provenance` replaces the default `prediction_provenance` (a position adds its own).
    """
    if job.stats is None:
        raise ValueError("the gather needs the dataset's statistics (--stats)")
    raw, meta = _open_raw(raw_path, job)
    if provenance is None:  # said again here so that the store records it (create is apart)
        warn_missing_chunks(job.image, "input")
    _check_shard_records(records, meta)
    output = Path(output)
    work = output.with_name(output.name + ".work")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    workers = _threads(job.settings, threads)
    provenance = provenance or prediction_provenance(job, model_name, dataset, records)
    try:
        values = _blend(job, raw, work, workers)
        if job.segmentation:
            objects = _write_segmentation(job, values, output, provenance, work, workers)
            summary = {"labels": objects}
        else:
            with dask.config.set(scheduler="threads", num_workers=workers):
                write_regression(job, values, output, provenance)
            summary = {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"output": str(output), "tiles": job.plan.tile_count(), **summary}


def predict_to_ome_zarr(checkpoint_path: str, image_path: str, stats_path: str,
                        channels: list | None, settings: dict[str, Any], output: str,
                        model_name: str, dataset: str, threads: int,
                        task: str | None = None) -> dict[str, Any]:
    """Predict one dataset in this process (create, one shard, gather) into NGFF 0.5.

    `settings` is a validated predict section. Returns the gather's summary (output path,
    tiles, and the label count for segmentation).
    """
    job = prepare_job(checkpoint_path, image_path, channels, settings, stats_path, task=task)
    out = Path(output)
    raw = out.with_name(out.name + ".raw.zarr")
    try:
        create_raw_store(job, raw, shards=1)
        record = predict_shard(job, raw, 0, 1, threads)
        return gather_prediction(job, raw, [record], out, model_name, dataset, threads)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
