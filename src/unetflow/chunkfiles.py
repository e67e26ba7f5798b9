"""Dask arrays whose tasks read a local Zarr array's chunk files straight from disk.

Why. `da.from_zarr` makes every task a Zarr read, and Zarr 3.1 spends about 1 ms of Python per
chunk (asyncio tasks, thread hops) and decodes on its own thread pool besides dask's; with the
decoding itself a few ms per chunk, that is 20-30% on top, and the asyncio thread competes for
the GIL with the tasks that use the chunks (bench/patches.py: patch extraction 0.21-0.24 s
through Zarr, 0.18-0.19 s this way). Here a task opens the chunk file, decodes it with the
array's numcodecs codec (which releases the GIL) and hands the numpy array to its dependents.

What is handled: local (folder) stores; Zarr v3 arrays whose codecs are `bytes` (little
endian) plus at most one zstd, blosc or gzip compressor; Zarr v2 arrays in C order with at
most one numcodecs compressor and no filters; chunks that are missing read as the fill value,
chunks at the array's edge are cropped. Anything else (sharded sources, transposes, remote
stores) gets None from `direct_dask_array`, and the caller reads through Zarr.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

__all__ = ["BlockMemo", "chunk_codec", "direct_dask_array", "little_endian_bytes",
           "numcodecs_codec"]

BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}  # zarr v3 name -> numcodecs


def numcodecs_codec(codec: Any) -> numcodecs.abc.Codec | None:
    """The numcodecs codec that decodes what a Zarr v3 zstd, blosc or gzip codec wrote (None
    for others)."""
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc.from_config({
            "cname": codec.cname.value, "clevel": codec.clevel, "typesize": codec.typesize,
            "shuffle": BLOSC_SHUFFLE[codec.shuffle.value], "blocksize": codec.blocksize})
    if isinstance(codec, GzipCodec):
        return numcodecs.GZip(level=codec.level)
    return None


def little_endian_bytes(codec: Any, itemsize: int) -> bool:
    """A Zarr v3 `bytes` codec that stores little-endian values (no endianness for 1 byte)."""
    return isinstance(codec, BytesCodec) and (
        codec.endian == Endian.little or (codec.endian is None and itemsize == 1))


def chunk_codec(array: zarr.Array) -> tuple[numcodecs.abc.Codec | None, np.dtype] | None:
    """(decompressor or None for raw bytes, stored dtype) of a local array whose chunk files
    this module can decode, or None."""
    if not isinstance(array.store, LocalStore):
        return None
    meta = array.metadata
    dtype = np.dtype(array.dtype)
    if meta.zarr_format == 3:
        # the codecs as stored: array.serializer/compressors would be a shard's inner ones
        serializer, compressors = meta.codecs[0], meta.codecs[1:]
        if not little_endian_bytes(serializer, dtype.itemsize) or len(compressors) > 1:
            return None
        codec = numcodecs_codec(compressors[0]) if compressors else None
        if compressors and codec is None:
            return None
        return codec, dtype.newbyteorder("<")
    stored = np.dtype(meta.dtype.to_native_dtype())
    if meta.filters or meta.order != "C" or stored.byteorder == ">" or stored.hasobject:
        return None
    return meta.compressor, stored


def _read_chunk(path: Path, codec: numcodecs.abc.Codec | None, dtype: np.dtype,
                chunk_shape: tuple[int, ...], shape: tuple[int, ...],
                fill_value: Any) -> np.ndarray:
    """One chunk as stored (its full chunk shape) cropped to `shape`; the fill value when the
    file is missing; DamagedFileError naming the file when it does not decode."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return np.full(shape, fill_value, dtype=dtype)
    try:
        data = codec.decode(raw) if codec is not None else raw
        chunk = np.frombuffer(data, dtype=dtype).reshape(chunk_shape)
    except Exception as err:  # noqa: BLE001 - any codec's failure: zstd, blosc, zlib...
        raise _damaged(path, len(chunk_shape), err) from err
    if shape == chunk_shape:
        return chunk
    return chunk[tuple(slice(0, s) for s in shape)].copy()  # frees the rest of the chunk


def _damaged(path: Path, ndim: int, err: BaseException) -> Exception:
    """integrity's one line for a chunk file that does not decode. The array's folder is the
    one above the chunk key: `c/i/j` or `c.i.j` (v3), `i/j` or `i.j` (v2)."""
    from unetflow.integrity import damaged_chunk

    parts = path.parts
    length = 1 if "." in parts[-1] or ndim == 1 else ndim
    if len(parts) > length and parts[-length - 1] == "c":
        length += 1
    folder, key = Path(*parts[:-length]), "/".join(parts[-length:])
    return damaged_chunk(str(folder), key, path, err)


class BlockMemo:
    """Blocks decoded by one computation kept for the next ones, up to `budget` bytes.

    For data that two passes read (patch extraction reads the labels to index foreground,
    then again to cut target patches): blocks are kept while they fit, so data smaller than
    the budget is decoded once and larger data costs at most the budget in memory. Dropping
    the memo frees them.
    """

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.blocks: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        return self.blocks.get(key)

    def offer(self, key: tuple, block: np.ndarray) -> None:
        with self._lock:
            if key not in self.blocks and self.used + block.nbytes <= self.budget:
                self.blocks[key] = block
                self.used += block.nbytes


def _read_block(paths: list[Path], offsets: list[tuple[int, ...]],
                shapes: list[tuple[int, ...]], block_shape: tuple[int, ...],
                codec: numcodecs.abc.Codec | None, dtype: np.dtype,
                chunk_shape: tuple[int, ...], fill_value: Any,
                memo: BlockMemo | None) -> np.ndarray:
    """A dask block made of whole chunks: one chunk is returned as decoded, several are
    copied into place; from and into `memo` when there is one, under its first chunk's file
    and its shape (which name the same data in any array and graph)."""
    key = (paths[0], block_shape)
    if memo is not None and (kept := memo.get(key)) is not None:
        return kept
    if len(paths) == 1:
        block = _read_chunk(paths[0], codec, dtype, chunk_shape, shapes[0], fill_value)
    else:
        block = np.empty(block_shape, dtype=dtype)
        for path, offset, shape in zip(paths, offsets, shapes, strict=True):
            where = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            block[where] = _read_chunk(path, codec, dtype, chunk_shape, shape, fill_value)
    if memo is not None:
        memo.offer(key, block)
    return block


def direct_dask_array(array: zarr.Array, chunks: Sequence[Sequence[int]] | None = None,
                      memo: BlockMemo | None = None) -> da.Array | None:
    """`array` as a dask array read chunk file by chunk file, or None when its layout is not
    handled (see the module docstring) or `chunks` split its Zarr chunks.

    `chunks` (dask's per-axis block sizes, default the Zarr chunks) merge whole Zarr chunks:
    each block is the chunks it covers, read by one task. With a `memo`, blocks are kept
    there for later computations of the same array.
    """
    found = chunk_codec(array)
    if found is None:
        return None
    codec, dtype = found
    shape, chunk_shape = tuple(array.shape), tuple(array.chunks)
    chunks = tuple(tuple(int(c) for c in axis) for axis in chunks) if chunks else \
        da.core.normalize_chunks(chunk_shape, shape)
    for axis, (sizes, native) in enumerate(zip(chunks, chunk_shape, strict=True)):
        ends = np.cumsum(sizes)
        if sum(sizes) != shape[axis] or any(e % native and e != shape[axis] for e in ends):
            return None
    folder = Path(array.store.root) / array.path
    fill_value = 0 if array.fill_value is None else array.fill_value
    name = f"zarr-files-{uuid.uuid4().hex}"
    starts = [np.concatenate([[0], np.cumsum(axis)[:-1]]).tolist() for axis in chunks]
    layer = {}
    for block in itertools.product(*(range(len(axis)) for axis in chunks)):
        lo = [starts[a][b] for a, b in enumerate(block)]
        block_shape = tuple(chunks[a][b] for a, b in enumerate(block))
        ranges = [range(lo[a] // chunk_shape[a], -(-(lo[a] + block_shape[a]) // chunk_shape[a]))
                  for a in range(len(shape))]
        paths, offsets, shapes = [], [], []
        for index in itertools.product(*ranges):
            start = [i * c for i, c in zip(index, chunk_shape, strict=True)]
            paths.append(folder / array.metadata.encode_chunk_key(index))
            offsets.append(tuple(s - o for s, o in zip(start, lo, strict=True)))
            shapes.append(tuple(min(c, n - s) for c, n, s in
                                zip(chunk_shape, shape, start, strict=True)))
        layer[(name, *block)] = (_read_block, paths, offsets, shapes, block_shape, codec,
                                 dtype, chunk_shape, fill_value, memo)
    return da.Array(layer, name, chunks=chunks, dtype=dtype)
