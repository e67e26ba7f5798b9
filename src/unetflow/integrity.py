"""Damaged and incomplete image files, named where they are read.

A chunk whose bytes no longer decode (a copy cut short, a bad disk block) makes Zarr's codec
raise a bare RuntimeError ("Zstd decompression error") deep inside a dask task: nothing in it
names the file. Every pixel read of an image therefore goes through a `CheckedArray` (or, in
`chunkfiles`, through `damaged_chunk`), which on a failed decode finds the chunk that fails by
itself and raises `DamagedFileError`: one line naming the level, the chunk key and its file.
A successful read costs one Python call more per chunk (see `checked_from_zarr`).

A chunk that is not stored at all is legal Zarr (it reads as the fill value), but after a
partial copy it silently turns part of an image into zeros. `missing_chunks` counts them by
listing the level's files once, and `warn_missing_chunks` says so as a notice (terminal and
report) once per image and stage.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from zarr.storage import LocalStore

from unetflow import notices

if TYPE_CHECKING:
    from unetflow.ome import OmeImage

__all__ = ["CheckedArray", "DamagedFileError", "array_where", "checked_from_zarr", "damaged_chunk",
           "describe_error", "failing_chunk", "missing_chunks", "stored_and_total",
           "warn_missing_chunks"]

METADATA_FILES = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}
NOT_DAMAGE = (PermissionError, FileNotFoundError, MemoryError, KeyboardInterrupt, IndexError)


class DamagedFileError(ValueError):
    """A file of a store exists but cannot be read back (damaged chunk, metadata or index)."""


def describe_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def damaged_chunk(where: str, key: str, file: str | Path | None,
                  err: BaseException) -> DamagedFileError:
    """The one-line error for chunk `key` of the array at `where` that does not decode."""
    file_text = f"the file {file}" if file is not None else f"chunk {key} of {where}"
    return DamagedFileError(f"{where}: chunk {key} cannot be decoded ({describe_error(err)}): "
                            f"{file_text} is damaged; copy the image again or rewrite that chunk")


def _array_folder(array: zarr.Array) -> Path | None:
    """The local folder of `array`, or None for other stores."""
    if isinstance(array.store, LocalStore):
        return Path(array.store.root) / array.path
    return None


def _chunk_grid(selection: Any, shape: tuple[int, ...],
                chunks: tuple[int, ...]) -> list[range] | None:
    """Chunk indices along each axis covered by a tuple of slices (None for other selections)."""
    if not isinstance(selection, tuple):
        selection = (selection,)
    if len(selection) != len(shape) or not all(isinstance(s, slice) for s in selection):
        return None
    grid = []
    for part, size, chunk in zip(selection, shape, chunks, strict=True):
        start, stop, step = part.indices(size)
        if step != 1:
            return None
        grid.append(range(start // chunk, -(-stop // chunk)) if stop > start else range(0))
    return grid


def failing_chunk(array: zarr.Array, selection: Any) -> tuple[str, Path | None,
                                                              BaseException] | None:
    """(key, file, error) of the first chunk within `selection` that fails to read by itself,
    or None when each reads (the failure was not a damaged chunk)."""
    import itertools

    chunks = tuple(array.chunks)
    grid = _chunk_grid(selection, tuple(array.shape), chunks)
    if grid is None:
        grid = [range(-(-s // c)) for s, c in zip(array.shape, chunks, strict=True)]
    files = tuple(array.shards or chunks)
    folder = _array_folder(array)
    for index in itertools.product(*grid):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
        try:
            array[region]
        except NOT_DAMAGE:
            return None
        except Exception as err:  # noqa: BLE001 - any codec's failure: zstd, blosc, zlib...
            key = array.metadata.encode_chunk_key(
                tuple(i * c // f for i, c, f in zip(index, chunks, files, strict=True)))
            return key, (folder / key if folder is not None else None), err
    return None


class CheckedArray:
    """A Zarr array for `da.from_array` whose reads name the chunk that does not decode."""

    def __init__(self, array: zarr.Array, where: str) -> None:
        self.array, self.where = array, where
        self.shape, self.dtype, self.ndim = tuple(array.shape), array.dtype, array.ndim
        self.chunks, self.shards = array.chunks, array.shards

    def __getitem__(self, selection: Any) -> Any:
        try:
            return self.array[selection]
        except NOT_DAMAGE:
            raise
        except Exception as err:
            found = failing_chunk(self.array, selection)
            if found is None:
                raise
            key, file, cause = found
            raise damaged_chunk(self.where, key, file, cause) from err

    def __dask_tokenize__(self) -> str:
        return tokenize(self.array, self.where)


def array_where(array: zarr.Array) -> str:
    """How to name `array` in a message: its local folder, else its store and path."""
    folder = _array_folder(array)
    return str(folder) if folder is not None else f"{array.store}/{array.path}"


def checked_from_zarr(array: zarr.Array, where: str | None = None,
                      chunks: Any = None) -> da.Array:
    """`da.from_zarr(array, chunks=chunks)` whose reads name a damaged chunk (`where` is the
    level as users know it, `<store>/<level>`; default `array_where`).

    Same graph as from_zarr (one getter task per block on the wrapped array), so dask's slice
    fusion and the read cost stay; a 4096^2 float32 image in 256^2 chunks read 1.0x as fast.
    """
    chunks = chunks if chunks is not None else array.chunks
    where = where if where is not None else array_where(array)
    name = "from-zarr-checked-" + tokenize(array, where, chunks)
    meta = np.empty((0,) * array.ndim, dtype=array.dtype)
    return da.from_array(CheckedArray(array, where), chunks=chunks, name=name, meta=meta,
                         asarray=True)


def _stored_files(folder: Path) -> int:
    """Chunk (or shard) files under a local array's folder: every file but metadata and
    hidden ones."""
    count, pending = 0, [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in METADATA_FILES:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                else:
                    count += 1
    return count


def stored_and_total(array: zarr.Array) -> tuple[int, int]:
    """(chunk files stored, chunk files the array's shape needs); shards count as one."""
    files = tuple(array.shards or array.chunks)
    total = math.prod(-(-s // c) for s, c in zip(array.shape, files, strict=True))
    folder = _array_folder(array)
    stored = _stored_files(folder) if folder is not None and folder.is_dir() else \
        array._nshards_initialized
    return min(stored, total), total


def _level_array(image: OmeImage) -> zarr.Array:
    return zarr.open_array(f"{image.path}/{image.level_path}", mode="r")


def missing_chunks(image: OmeImage) -> tuple[int, int]:
    """(chunks missing, chunks in all) of the image's level: missing ones read as the fill
    value. One listing of the level's folder (see README's measured cost)."""
    stored, total = stored_and_total(_level_array(image))
    return total - stored, total


def warn_missing_chunks(image: OmeImage, role: str) -> int:
    """Say (notices.warn) how many chunks of the image's level are missing and were read as
    the fill value, naming its role ("input", "target", ...); the count (0: nothing said).

    A label image (integer target) is not checked: writers leave out its empty chunks as a
    rule (a 96^2 demo label image in 32^2 chunks lacks 2 of 9), so a warning there would be
    noise that hides the ones that matter."""
    array = _level_array(image)
    if role == "target" and np.issubdtype(array.dtype, np.integer):
        return 0
    stored, total = stored_and_total(array)
    missing = total - stored
    if missing:
        fill = 0 if array.fill_value is None else array.fill_value
        fill = fill.item() if isinstance(fill, np.generic) else fill
        fill = int(fill) if isinstance(fill, float) and fill.is_integer() else fill
        notices.warn(f"{missing} of {total} chunks of {image.path}/{image.level_path} are "
                     f"missing and were read as the fill value {fill} ({role}; writers leave "
                     f"out chunks holding only the fill value, but a copy cut short does too: "
                     f"if the image was copied, check the copy)")
    return missing
