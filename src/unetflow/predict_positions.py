"""Prediction over the positions of a plate or a collection: batches of positions, one network.

A screen is thousands of small images, so prediction runs in *batches* of positions (one
job each, `plates.position_batches`) and `finish_plate` then writes what spans the whole
dataset (plate and well metadata, the index). Each position's output is the NGFF 0.5 image
that the single-image path (`predict.predict_to_ome_zarr`) writes for that field, at
`plates.position_output_path`, written atomically.

A batch loads the checkpoint, hashes it and builds the network once; per position it pays
only for its own pixels. Positions are worked on by the job's dask workers (threads), each
position by one: it opens the field, predicts it in memory (at most
`tiling.UNIT_MEGAPIXELS` of output: no raw store, no scratch store) and, when the output
is one chunk (most fields of a screen), writes it with `ome.write_image_direct` (the store
ome-zarr-py writes, without dask and Zarr calls). Outputs of several chunks are written by
the main thread with dask, chunked as the raw store is; larger positions go through the raw
store as a single image does (create, shard, gather), with the same network.

Cost (64 fields of 256^2 on this 2-core machine, `bench/plate_throughput.py` and
cProfile): the single-image path run per field cost about 300 ms per field beyond its
forward pass (checkpoint loaded and hashed, dask graphs, raw and scratch stores, ome-zarr-py);
here a field costs its forward pass plus about 20-40 ms, most of it creating the 24 folders
and 15 files of its NGFF image (three levels and labels).

Reruns. Each output carries a fingerprint (`position_fingerprint`) of what decides it: the
checkpoint's contents, the predict settings that change outputs, the position's
normalization statistics, the channels and the image path. A batch keeps an output whose
fingerprint matches and predicts the others, so rerunning a batch after a failure, or after
wells were added to the selection, predicts only the positions that are missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from unetflow import notices
from unetflow.config import result_settings
from unetflow.files import write_json_atomic
from unetflow.integrity import warn_missing_chunks
from unetflow.model.checkpoint import file_sha256, read_description, skeleton_model
from unetflow.model.unet import UNet
from unetflow.normalize import normalize_array, position_stats, read_stats
from unetflow.plates import Position, PositionSet, position_output_path
from unetflow.predict import (
    PredictionJob,
    TileRunner,
    _predict_core,
    _Progress,
    _threads,
    check_checkpoint_task,
    create_raw_store,
    fold_windows,
    gather_prediction,
    instance_labels,
    job_runner,
    predict_box,
    predict_shard,
    prediction_provenance,
    prepare_job,
    write_regression,
    write_segmentation,
)
from unetflow.tiling import UNIT_MEGAPIXELS, TilePlan, reflect_indices
from unetflow.watershed import seeded_watershed

__all__ = [
    "finish_plate",
    "position_fingerprint",
    "predict_positions",
    "stored_fingerprint",
]

FINGERPRINT_FORMAT = "unetflow-position-prediction-1"
# predict keys that do not decide a position's output, besides the execution keys: shards
# and positions_per_job (which jobs there are) and checkpoint (best/last: the file's hash
# decides)
NOT_OUTPUT_KEYS = ("shards", "positions_per_job", "checkpoint")
INDEX_FORMAT = "unetflow-position-index-1"
PLATE_FORMAT = "unetflow-predicted-plate-1"  # the output plate's provenance


# --- fingerprints -------------------------------------------------------------------------
def position_fingerprint(checkpoint_sha256: str, settings: dict[str, Any],
                         stats: dict[str, Any], channels: list | None, image: str) -> str:
    """sha256 of what decides a position's output.

    Of the statistics only the per-channel figures count (what normalization reads), not
    bookkeeping such as which positions were read; of the predict section, the keys that
    change outputs (`config.result_settings` less NOT_OUTPUT_KEYS).
    """
    document = {"format": FINGERPRINT_FORMAT, "checkpoint_sha256": checkpoint_sha256,
                "predict": result_settings("predict", settings, leave_out=NOT_OUTPUT_KEYS),
                "stats": stats["channels"], "channels": channels, "image": str(image)}
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stored_fingerprint(output: str | Path) -> str | None:
    """The fingerprint in an output image's attributes (read from its zarr.json: 0.1 ms,
    against about 1 ms through zarr); None when there is no complete output."""
    try:
        document = json.loads((Path(output) / "zarr.json").read_text())
        return document["attributes"]["unetflow"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- what a batch shares ------------------------------------------------------------------
@dataclass
class _Batch:
    """What every position of a batch shares: read once, not once per position."""

    checkpoint: str
    description: dict[str, Any]
    network: UNet  # the architecture without weights (plans tiles)
    checkpoint_sha256: str
    stats: dict[str, Any]
    channels: list | None
    settings: dict[str, Any]
    model: str
    dataset: str
    runner: TileRunner | None = None
    workers: int = 1
    predicted: list[str] = field(default_factory=list)

    def job(self, position: Position) -> PredictionJob:
        """The position's prediction job: its image opened lazily and its tiles planned."""
        return prepare_job(self.checkpoint, position.image, self.channels, self.settings,
                           description=self.description, network=self.network,
                           stats=position_stats(self.stats, position.key))

    def fingerprint(self, position: Position) -> str:
        return position_fingerprint(self.checkpoint_sha256, self.settings,
                                    position_stats(self.stats, position.key), self.channels,
                                    position.image)

    def provenance(self, job: PredictionJob, position: Position,
                   fingerprint: str) -> dict[str, Any]:
        """The single-image provenance, plus the position's key and fingerprint, with the
        warnings about this position's input only (not those of the batch before it)."""
        said_before = len(notices.recorded())
        warn_missing_chunks(job.image, "input")
        provenance = prediction_provenance(job, self.model, self.dataset, [],
                                           self.checkpoint_sha256)
        return {**provenance, "warnings": notices.recorded()[said_before:],
                "position": position.key, "fingerprint": fingerprint}


def _load_batch(checkpoint: str, stats: str | Path | dict[str, Any], channels: list | None,
                settings: dict[str, Any], model: str, dataset: str,
                task: str | None = None) -> _Batch:
    description = read_description(checkpoint)
    check_checkpoint_task(checkpoint, description, task)
    stats = stats if isinstance(stats, dict) else read_stats(stats)
    return _Batch(str(checkpoint), description, skeleton_model(description),
                  file_sha256(checkpoint), stats, channels, settings, model, dataset)


# --- predicting one position in memory ----------------------------------------------------
def _fits_in_memory(plan: TilePlan) -> bool:
    """Small enough to predict without a raw store: the bound of one work unit."""
    return float(np.prod(plan.shape)) <= UNIT_MEGAPIXELS * 1e6


def _reflect_pad(x: np.ndarray, plan: TilePlan) -> np.ndarray:
    """`x` (C, *plan.axes) extended by the halo on the model's axes, mirrored at the ends
    (the reflection `tiling.read_box` applies)."""
    for axis in plan.model_axes:
        size = plan.shape[axis]
        x = np.take(x, reflect_indices(-plan.halo, size + plan.halo, size), axis=1 + axis)
    return x


def _crop_in_memory(x: np.ndarray, plan: TilePlan, runner: TileRunner) -> np.ndarray:
    """Crop blending over a numpy image: every tile with its halo in, its core out.

    The same tiles, halos and forward passes as `predict.predict_box` (so the same values),
    without a dask graph per position.
    """
    padded = _reflect_pad(x, plan)
    out = np.empty((plan.channels_out, *plan.shape), dtype=np.float32)
    for tile in np.ndindex(*plan.grid):
        source, target = [slice(None)], [slice(None)]
        for axis, index in enumerate(tile):
            start = index * plan.tile[axis]
            core = min(plan.tile[axis], plan.shape[axis] - start)
            extra = 2 * plan.halo if axis in plan.model_axes else 0
            source.append(slice(start, start + core + extra))
            target.append(slice(start, start + core))
        out[tuple(target)] = _predict_core(padded[tuple(source)], runner, plan.model_dims,
                                           plan.halo, None)
    return out


def _gaussian_in_memory(x: np.ndarray, plan: TilePlan, runner: TileRunner) -> np.ndarray:
    """Gaussian blending over a numpy image: the store path's dask code, computed in this
    thread (windows and folding are not worth a second implementation)."""
    box = tuple((0, g) for g in plan.grid)
    windows = predict_box(da.from_array(x, chunks=x.shape), plan, box, runner)
    return np.asarray(fold_windows(windows, plan, box).compute(scheduler="sync"))


def _model_output(job: PredictionJob, runner: TileRunner) -> np.ndarray:
    """The model's output (K, *image) for a small position, as the store path computes it."""
    data = np.asarray(job.data.compute(scheduler="sync"))
    norm = job.normalization
    x = normalize_array(data, job.stats, norm["method"], norm["clip"])
    if job.plan.blending == "crop":
        return _crop_in_memory(x, job.plan, runner)
    return _gaussian_in_memory(x, job.plan, runner)


# --- writing one position -----------------------------------------------------------------
def _single_chunk(plan: TilePlan) -> bool:
    return all(s <= t for s, t in zip(plan.shape, plan.tile, strict=True))


def _labels_of_one_chunk(job: PredictionJob, probabilities: np.ndarray) -> np.ndarray:
    """The output labels of a position of one chunk, as `predict.instance_labels` makes
    them: `components.connected_components` of one chunk is scipy's labels of it, and
    `watershed.seeded_watershed_chunked` of one chunk is `seeded_watershed`."""
    from scipy import ndimage

    if job.settings["instances"] and job.boundaries:
        return seeded_watershed(probabilities, job.settings["watershed"], job.separate_axes)
    classes = probabilities.argmax(axis=0).astype(np.uint32)
    if not job.settings["instances"]:
        return classes
    return ndimage.label(classes > 0)[0].astype(np.uint32)


def _write_one_chunk(job: PredictionJob, values: np.ndarray, output: str,
                     provenance: dict[str, Any]) -> None:
    """A position of one chunk: numpy arrays to the direct writers (the same store as the
    gather's, without dask or Zarr calls: safe on any worker thread)."""
    if job.segmentation:
        write_segmentation(job, values, _labels_of_one_chunk(job, values), Path(output),
                           provenance)
    else:
        write_regression(job, values, Path(output), provenance)


def _write_chunked(job: PredictionJob, values: np.ndarray, output: str,
                   provenance: dict[str, Any], workers: int) -> None:
    """A position of several chunks (but small enough for memory): dask arrays chunked as
    the raw store is (so the same pyramid and labels as the gather's), dask in this thread
    (it sets dask's scheduler: the main thread only)."""
    lazy = da.from_array(values, chunks=(values.shape[0], *job.plan.tile))
    work = Path(output).with_name(f".{Path(output).name}.work")
    try:
        if job.segmentation:
            classes = lazy.argmax(axis=0).astype(np.uint32)
            if job.settings["instances"]:
                work.mkdir(parents=True, exist_ok=True)
                classes = instance_labels(job, lazy, work, workers)[0]
            with dask.config.set(scheduler="sync"):
                write_segmentation(job, lazy, classes, Path(output), provenance)
        else:
            with dask.config.set(scheduler="sync"):
                write_regression(job, lazy, Path(output), provenance)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _predict_through_store(batch: _Batch, job: PredictionJob, output: str,
                           provenance: dict[str, Any], threads: int) -> None:
    """A large position: the single-image path (raw store, one shard, gather), with the
    batch's network."""
    raw = Path(output).with_name(f".{Path(output).name}.raw.zarr")
    try:
        create_raw_store(job, raw, shards=1)
        record = predict_shard(job, raw, 0, 1, threads, runner=batch.runner)
        gather_prediction(job, raw, [record], output, batch.model, batch.dataset, threads,
                          provenance=provenance)
    finally:
        shutil.rmtree(raw, ignore_errors=True)


# --- the batch ----------------------------------------------------------------------------
@dataclass
class _Todo:
    position: Position
    fingerprint: str
    output: str


class PositionFailed(ValueError):
    """A position of the batch could not be predicted; names the position."""


def _failed(todo: _Todo, err: BaseException) -> PositionFailed:
    return PositionFailed(f"position {todo.position.key} ({todo.position.image}): {err}")


def _refuse_overwriting_input(todo: _Todo) -> None:
    """An output root that is the source (a plate predicted into itself) would replace the
    fields by their predictions."""
    image, output = Path(todo.position.image).resolve(), Path(todo.output).resolve()
    if image == output or image in output.parents or output in image.parents:
        raise ValueError(f"{todo.output}: the output of position {todo.position.key} would "
                         f"overwrite its input {todo.position.image}; give another output")


@dataclass
class _Done:
    """What a worker hands back: the position's job, and what is left to do."""

    job: PredictionJob
    values: np.ndarray | None = None  # predicted, to be written with dask (several chunks)
    written: bool = False  # predicted and written (one chunk)


def _work_on(batch: _Batch, todo: _Todo) -> _Done:
    """Runs on a worker: open the position; predict it if it fits in memory, and write it
    too if it is one chunk (most fields of a screen)."""
    job = batch.job(todo.position)
    if not _fits_in_memory(job.plan):
        return _Done(job)
    values = _model_output(job, batch.runner)
    if not _single_chunk(job.plan):
        return _Done(job, values)
    _write_one_chunk(job, values, todo.output,
                     batch.provenance(job, todo.position, todo.fingerprint))
    return _Done(job, written=True)


def _in_order(batch: _Batch, todos: list[_Todo]) -> Iterator[tuple[_Todo, Future]]:
    """Positions worked on by `batch.workers` threads, yielded in order; at most twice as
    many in flight (so memory holds a few positions, never the batch)."""
    with ThreadPoolExecutor(batch.workers, thread_name_prefix="unetflow-position") as pool:
        pending: deque[tuple[_Todo, Future]] = deque()
        for todo in todos:
            pending.append((todo, pool.submit(_work_on, batch, todo)))
            if len(pending) >= 2 * batch.workers:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def _predict_todos(batch: _Batch, todos: list[_Todo], threads: int,
                   done: Callable[[], None]) -> None:
    """Predict and write every position of `todos`: small ones on the workers (in memory),
    the others through the raw store after them (those use all the job's threads)."""
    large: list[tuple[_Todo, PredictionJob]] = []
    for todo, future in _in_order(batch, todos):
        try:
            result = future.result()
            if not result.written and result.values is None:
                large.append((todo, result.job))
                continue
            if not result.written:
                _write_chunked(result.job, result.values, todo.output,
                               batch.provenance(result.job, todo.position, todo.fingerprint),
                               batch.workers)
        except (ValueError, OSError) as err:
            raise _failed(todo, err) from err
        batch.predicted.append(todo.position.key)
        done()
    for todo, job in large:
        try:
            _predict_through_store(batch, job, todo.output,
                                   batch.provenance(job, todo.position, todo.fingerprint),
                                   threads)
        except (ValueError, OSError) as err:
            raise _failed(todo, err) from err
        batch.predicted.append(todo.position.key)
        done()


def predict_positions(checkpoint: str, position_set: PositionSet, keys: list[str] | None,
                      stats: str | Path | dict[str, Any], channels: list | None,
                      settings: dict[str, Any], model: str, dataset: str,
                      output_root: str | Path, threads: int,
                      record_path: str | Path | None, task: str | None = None
                      ) -> dict[str, Any]:
    """Predict one batch of positions (`keys`, or all) into `output_root`; returns its record.

    `settings` is a validated predict section (execution keys included); `stats` the
    dataset's statistics file (or its contents), per position or dataset-level. Each
    position whose output already holds the current fingerprint is kept, the others are
    predicted and written atomically. The record {"dataset", "keys", "predicted", "kept",
    "seconds", "device"} is written atomically to `record_path` when all are done.
    `task`: the model's task in the config; a checkpoint of another task is refused.
    """
    started = time.perf_counter()
    if position_set.dataset != dataset:
        raise ValueError(f"the positions file is of dataset '{position_set.dataset}', "
                         f"not '{dataset}'")
    chosen = position_set.select(keys) if keys is not None else position_set
    batch = _load_batch(checkpoint, stats, channels, settings, model, dataset, task)
    todos, kept = [], []
    for position in chosen.positions:
        todo = _Todo(position, batch.fingerprint(position),
                     position_output_path(output_root, chosen.kind, position))
        _refuse_overwriting_input(todo)
        if stored_fingerprint(todo.output) == todo.fingerprint:
            kept.append(position.key)
        else:
            todos.append(todo)
    device = None
    if todos:
        batch.runner = job_runner(batch.job(todos[0].position))
        batch.workers = _threads(settings, threads)
        device = str(batch.runner.device)
        progress = _Progress(len(todos), f"predict {dataset}", unit="position")
        try:
            _predict_todos(batch, todos, threads, lambda: progress.update(1))
        finally:
            progress.close()
    predicted = set(batch.predicted)
    record = {"dataset": dataset, "keys": chosen.keys,
              "predicted": [k for k in chosen.keys if k in predicted],
              "kept": kept, "seconds": round(time.perf_counter() - started, 3),
              "device": device}
    if record_path is not None:
        write_json_atomic(record, record_path)
    return record


# --- after all batches --------------------------------------------------------------------
def _check_records(position_set: PositionSet, records: list[dict[str, Any]],
                   dataset: str) -> None:
    """Every selected position was in some batch of this dataset."""
    other = sorted({str(r.get("dataset")) for r in records} - {dataset})
    if other:
        raise ValueError(f"batch records of dataset(s) {other} were given for dataset "
                         f"'{dataset}'")
    covered = {key for record in records for key in record.get("keys", [])}
    missing = [key for key in position_set.keys if key not in covered]
    if missing:
        raise ValueError(f"position(s) {_summary(missing)} of dataset '{dataset}' are in no "
                         f"batch record; predict their batches first")


def _summary(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys) if len(keys) <= limit else ", ".join([*keys[:limit], "..."])


def _is_prediction(path: Path) -> bool:
    """A store that predict_positions wrote (its attributes carry the provenance)."""
    return stored_fingerprint(path) is not None


def _remove_stale(root: Path, keep: dict[str, Any]) -> list[str]:
    """Remove the folders under `root` that `keep` (a tree of names) does not hold.

    Files stay (a plate's zarr.json is rewritten); at the level of the outputs (the fields
    of a well, a collection's images) only predictions and hidden leftovers (temporaries of
    killed jobs) are removed, so that a wrong --output never deletes anything else.
    """
    removed = []
    if not root.is_dir():
        return removed
    outputs = all(value is None for value in keep.values())
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name not in keep:
            if outputs and not (_is_prediction(entry) or entry.name.startswith(".")):
                continue
            shutil.rmtree(entry)
            removed.append(str(entry))
        elif isinstance(keep[entry.name], dict):
            removed += _remove_stale(entry, keep[entry.name])
    return removed


def _check_output_root(position_set: PositionSet, root: Path) -> None:
    """Refuse to tidy a folder that is not a prediction of this workflow (a wrong --output)."""
    try:
        document = json.loads((root / "zarr.json").read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise ValueError(f"{root}/zarr.json: unreadable ({err}); give the output folder of "
                         f"'unetflow predict positions'") from err
    provenance = document.get("attributes", {}).get("unetflow")
    if position_set.kind != "plate" or (provenance or {}).get("format") != PLATE_FORMAT:
        raise ValueError(f"{root}: not the output of 'unetflow predict positions' (a Zarr "
                         f"group that finish did not write); nothing was changed")


def _output_tree(position_set: PositionSet) -> dict[str, Any]:
    """The folders that the selection's outputs occupy: {row: {column: {field: None}}} for
    a plate, {"<key>.ome.zarr": None} for a collection."""
    if position_set.kind != "plate":
        return {Path(position_output_path("", "collection", p)).name: None
                for p in position_set.positions}
    tree: dict[str, Any] = {}
    for p in position_set.positions:
        tree.setdefault(p.row, {}).setdefault(p.column, {})[str(p.field)] = None
    return tree


def _check_outputs(position_set: PositionSet, root: str | Path) -> dict[str, str]:
    """{key: output path} of the selection; refuses when any output is missing."""
    paths = {p.key: position_output_path(root, position_set.kind, p)
             for p in position_set.positions}
    missing = [key for key, path in paths.items() if not (Path(path) / "zarr.json").is_file()]
    if missing:
        raise ValueError(f"{root}: no prediction for position(s) {_summary(missing)} of "
                         f"dataset '{position_set.dataset}'; rerun their batches")
    return paths


def _write_plate_metadata(position_set: PositionSet, root: Path,
                          provenance: dict[str, Any]) -> None:
    """NGFF 0.5 plate and well metadata for the selected wells and fields (ome-zarr-py)."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    fmt = FormatV05()
    wells: dict[tuple[str, str], list[str]] = {}
    for p in position_set.positions:
        wells.setdefault((p.row, p.column), []).append(str(p.field))
    layout = position_set.plate or {}
    rows = layout.get("rows") or list(dict.fromkeys(r for r, _ in wells))
    columns = layout.get("columns") or list(dict.fromkeys(c for _, c in wells))
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    for row in dict.fromkeys(r for r, _ in wells):
        zarr.open_group(str(root / row), mode="a", zarr_format=3)
    for (row, column), fields in wells.items():
        well = zarr.open_group(str(root / row / column), mode="a", zarr_format=3)
        write_well_metadata(well, fields, fmt=fmt)
    write_plate_metadata(group, rows, columns, [f"{r}/{c}" for r, c in wells], fmt=fmt,
                         field_count=max(len(f) for f in wells.values()),
                         name=layout.get("name"))
    group.attrs["unetflow"] = provenance


def finish_plate(position_set: PositionSet, output_root: str | Path,
                 records: list[dict[str, Any]], model: str, dataset: str, checkpoint: str,
                 settings: dict[str, Any], index_path: str | Path) -> dict[str, Any]:
    """After all batches: remove stale outputs, check all are there, write the metadata.

    Fields (or a collection's images) under `output_root` that are not in the selection,
    left by an earlier, larger one, are removed. For a plate, the NGFF 0.5 plate and well
    metadata list the selected wells and fields under the source plate's row and column
    names, with the provenance at plate level. The index {"dataset", "kind", "output",
    "positions": {key: path}} is written last, atomically, and returned.
    """
    _check_records(position_set, records, dataset)
    root = Path(output_root)
    _check_output_root(position_set, root)
    _remove_stale(root, _output_tree(position_set))
    paths = _check_outputs(position_set, root)
    if position_set.kind == "plate":
        provenance = {"format": PLATE_FORMAT, "model": model, "dataset": dataset,
                      "checkpoint": str(checkpoint),
                      "checkpoint_sha256": file_sha256(checkpoint), "predict": settings,
                      "source": position_set.source, "positions": len(paths)}
        _write_plate_metadata(position_set, root, provenance)
    index = {"format": INDEX_FORMAT, "dataset": dataset, "kind": position_set.kind,
             "output": str(root), "positions": paths}
    write_json_atomic(index, index_path)
    return index
