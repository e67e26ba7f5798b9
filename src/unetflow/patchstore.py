"""The patch store's arrays: one patch per Zarr chunk, consecutive chunks grouped in shard files.

Layout. `<split>/images` (N, C, *patch) and `<split>/targets` (N, *patch) or (N, C, *patch) are
Zarr v3 arrays whose chunk is one patch, so any patch is compressed, found and decoded alone,
and whose shard (one file) holds `patches_per_shard` consecutive patches (SHARD_BYTES of
uncompressed image data). Shard keys are `c.<k>.0.0...` in one flat folder.

Why shards. A store with one file per patch creates two files per patch: on this box creating
a file cost 0.06-0.45 ms of kernel time (ext4, varying with the disk's load; creates in one
folder serialize on its lock), which made file creation the largest part of extraction after
reading the source (bench/patches.py: 512 one-patch files vs 2 shard files for 256 patches).
On cluster file systems (Lustre, GPFS) every file costs a metadata-server round trip, and
inode quotas of a few million files are common: a 100 000-patch store is 200 000 files
unsharded and about 800 sharded.

Why this module reads and writes the files itself. Zarr 3.1 spends about 1 ms of Python per
chunk (asyncio tasks, thread hops) in `Array.__setitem__` and in reads, 10-20x the cost of
decoding a 64 KB patch, and a training batch is a handful of patches at random places. Zarr
creates the arrays and their metadata; `ShardedPatches` writes every shard exactly as Zarr
would (tests/test_patchstore.py compares the files byte for byte) and reads a patch with one
`pread` at the offset the shard's index gives (the index is read once per shard and cached),
so any Zarr reader reads the store and this module reads stores Zarr wrote. Arrays in any
other layout (a local store is required) are read through Zarr (`PatchArray`).

Codec: Blosc LZ4 with byte shuffle inside each chunk, chosen by measurement on normalized demo
patches of 128x128 (single-thread numcodecs, this 2-core box; x = compression ratio):

    codec              image          labels (0/1 int32)   clean target
                       dec MB/s  x    dec MB/s  x          dec MB/s  x
    zstd 1 (~ zarr's)     641  1.12     1461  65           587  1.19
    zstd 3                462  1.12      934  65           486  1.19
    blosc lz4 shuffle    1067  1.11     1327  25          1710  1.47
    blosc zstd1 shuffle   643  1.20      674  84           620  1.55

Noisy float images barely compress with any codec, so decode speed decides: LZ4 decodes
1.6-2.9x faster than zstd, compresses smooth targets better and labels 25x. Encoding is cheap
too: about 0.05 ms per 64 KB patch on one thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from unetflow.chunkfiles import little_endian_bytes, numcodecs_codec
from unetflow.integrity import DamagedFileError, array_where, describe_error, failing_chunk

__all__ = [
    "CHUNK_KEYS",
    "PATCH_CODEC",
    "SHARD_BYTES",
    "PatchArray",
    "ShardedPatches",
    "create_patch_array",
    "open_patch_array",
    "open_patch_store",
    "patches_per_shard",
]

PATCH_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
CHUNK_KEYS = {"name": "default", "separator": "."}  # one flat folder of shard files
SHARD_BYTES = 16 << 20  # uncompressed image bytes per shard file
EMPTY = 2**64 - 1  # a shard index entry of a chunk that is not stored
INDEX_ENTRY = 16  # bytes per chunk in a shard index: offset and length, uint64 each
CRC_BYTES = 4


def patches_per_shard(patch_shape: tuple[int, ...], dtype: Any, n: int) -> int:
    """Patches of `patch_shape` (channels included) per shard: SHARD_BYTES of them, at least
    one, at most the array's `n`."""
    nbytes = np.dtype(dtype).itemsize * int(np.prod(patch_shape))
    return max(1, min(n, SHARD_BYTES // nbytes))


def create_patch_array(group: zarr.Group, name: str, n: int, patch_shape: tuple[int, ...],
                       dtype: Any, per_shard: int) -> zarr.Array:
    """An empty (n, *patch_shape) array in the store's layout: one patch per chunk,
    `per_shard` patches per shard file."""
    if n < 1 or per_shard < 1:
        raise ValueError(f"a patch array needs at least one patch and one patch per shard, "
                         f"got n={n}, per_shard={per_shard} for '{name}'")
    patch_shape = tuple(int(s) for s in patch_shape)
    return group.create_array(name, shape=(n, *patch_shape), dtype=dtype,
                              chunks=(1, *patch_shape), shards=(per_shard, *patch_shape),
                              compressors=[PATCH_CODEC], chunk_key_encoding=CHUNK_KEYS,
                              config={"write_empty_chunks": True})


def _store_root(array: zarr.Array) -> Path | Any:
    """The folder of a local array's store (what to delete), else the store itself."""
    return Path(array.store.root) if isinstance(array.store, LocalStore) else array.store


def _rerun(store: str | Path) -> str:
    return (f"delete {store} and run Snakemake again, which extracts the patches again")


def _damaged_metadata(store: str | Path, file: Path, err: BaseException) -> DamagedFileError:
    return DamagedFileError(f"patch store {store}: the metadata {file} cannot be read "
                            f"({describe_error(err)}): the file is damaged; {_rerun(store)}")


def open_patch_store(store: str | Path) -> zarr.Group:
    """The patch store's root group; one line naming its metadata file when that is damaged."""
    try:
        return zarr.open_group(str(store), mode="r")
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # junk JSON, missing keys: zarr raises several types
        raise _damaged_metadata(store, Path(store) / "zarr.json", err) from err


def open_patch_array(group: zarr.Group, key: str) -> PatchArray:
    """The patch array `key` (e.g. "train/images") of an open patch store, read by index;
    one line naming its metadata file when that is damaged (KeyError when it is absent)."""
    store = Path(group.store.root) if isinstance(group.store, LocalStore) else group.store
    try:
        array = group[key]
    except KeyError:
        if not (Path(str(store)) / key / "zarr.json").exists():
            raise
        err: BaseException = KeyError(key)
        try:  # zarr reports a junk document as a missing node: say what is wrong with it
            zarr.open_array(str(Path(str(store)) / key), mode="r")
        except Exception as found:  # noqa: BLE001
            err = found
        raise _damaged_metadata(store, Path(str(store)) / key / "zarr.json", err) from None
    except Exception as err:
        raise _damaged_metadata(store, Path(str(store)) / key / "zarr.json", err) from err
    if not isinstance(array, zarr.Array):
        raise DamagedFileError(f"patch store {store}: {key} is a group, not a patch array; "
                               f"{_rerun(store)}")
    return PatchArray(array)


def _layout_problem(array: zarr.Array) -> str | None:
    """Why `ShardedPatches` cannot handle `array` directly, or None when it can."""
    if not isinstance(array.store, LocalStore):
        return f"its store {array.store} is not a local folder"
    codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return "it is not sharded"
    sharding = codecs[0]
    inner, index = sharding.codecs, sharding.index_codecs
    if tuple(sharding.chunk_shape) != (1, *array.shape[1:]):
        return f"its chunks {sharding.chunk_shape} are not one patch each"
    if not (len(inner) == 2 and little_endian_bytes(inner[0], array.dtype.itemsize)
            and isinstance(inner[1], BloscCodec)):
        return f"its chunk codecs {inner} are not bytes + blosc"
    if not (len(index) == 2 and little_endian_bytes(index[0], INDEX_ENTRY // 2)
            and isinstance(index[1], Crc32cCodec)
            and sharding.index_location == ShardingCodecIndexLocation.end):
        return f"its shard index ({index}, at {sharding.index_location}) is not Zarr's default"
    return None


class ShardedPatches:
    """Reads and writes the shard files of one local patch array in the store's layout."""

    def __init__(self, array: zarr.Array) -> None:
        problem = _layout_problem(array)
        if problem:
            raise ValueError(f"ShardedPatches handles local sharded arrays of one patch per "
                             f"chunk with bytes + blosc codecs; {array.path}: {problem}")
        sharding = array.metadata.codecs[0]
        self.store = Path(array.store.root)
        self.folder = self.store / array.path
        self.key = array.path
        self.metadata = array.metadata
        self.shape = tuple(array.shape)
        self.per_shard = int(array.shards[0])
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill_value = array.fill_value
        self.codec = numcodecs_codec(sharding.codecs[1])
        self._indexes: dict[int, np.ndarray | None] = {}

    @property
    def n_shards(self) -> int:
        return -(-self.shape[0] // self.per_shard)

    def shard_path(self, shard: int) -> Path:
        return self.folder / self.metadata.encode_chunk_key((shard,) + (0,) * (len(self.shape) - 1))

    def shard_range(self, shard: int) -> range:
        """Patch indices stored in shard `shard`."""
        return range(shard * self.per_shard, min(self.shape[0], (shard + 1) * self.per_shard))

    # --- writing ------------------------------------------------------------------------
    def encode(self, stack: np.ndarray) -> list[bytes]:
        """Each patch of `stack` (k, *patch) encoded as its chunk."""
        return [self.codec.encode(np.ascontiguousarray(patch, dtype=self.dtype))
                for patch in stack]

    def write_shard(self, shard: int, chunks: list[bytes]) -> None:
        """Shard file `shard` from the encoded chunks of all its patches, in index order: the
        chunks, then the index (offset, length per chunk; EMPTY past the array's end) and its
        CRC32C, as Zarr's sharding codec writes them."""
        if len(chunks) != len(self.shard_range(shard)):
            raise ValueError(f"shard {shard} of {self.folder} holds "
                             f"{len(self.shard_range(shard))} patches, got {len(chunks)}")
        index = np.full((self.per_shard, 2), EMPTY, dtype="<u8")
        lengths = np.array([len(c) for c in chunks], dtype="<u8")
        index[:len(chunks), 1] = lengths
        index[:len(chunks), 0] = np.cumsum(lengths) - lengths
        index_bytes = index.tobytes()
        crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        with open(self.shard_path(shard), "wb") as fh:
            fh.writelines([*chunks, index_bytes, crc])  # no joined copy of the shard

    # --- reading ------------------------------------------------------------------------
    def _index(self, shard: int, fd: int) -> np.ndarray:
        """(offset, length) of each chunk of an open shard file, checked against its CRC32C."""
        size = INDEX_ENTRY * self.per_shard + CRC_BYTES
        end = os.fstat(fd).st_size
        raw = os.pread(fd, size, end - size) if end >= size else b""
        if len(raw) != size:
            raise ValueError(f"{self.shard_path(shard)}: {end} bytes, too short for a shard "
                             f"index of {self.per_shard} chunks (a damaged or partly written "
                             f"file); {_rerun(self.store)}")
        if np.uint32(google_crc32c.value(raw[:-CRC_BYTES])).astype("<u4").tobytes() != \
                raw[-CRC_BYTES:]:
            raise ValueError(f"{self.shard_path(shard)}: the shard index fails its CRC32C "
                             f"check (a damaged or partly written file); "
                             f"{_rerun(self.store)}")
        return np.frombuffer(raw[:-CRC_BYTES], dtype="<u8").reshape(self.per_shard, 2)

    def _damaged_patch(self, shard: int, position: int, err: BaseException) -> DamagedFileError:
        return DamagedFileError(
            f"{self.shard_path(shard)}: patch {shard * self.per_shard + position} of "
            f"{self.key} cannot be decoded ({describe_error(err)}): the shard file is "
            f"damaged; {_rerun(self.store)}")

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Patches at `indices` (any order, repeats allowed), (len(indices), *patch)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.shape[0]):
            raise IndexError(f"patch indices {indices.min()}..{indices.max()} are outside "
                             f"0..{self.shape[0] - 1} of {self.folder}")
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        shards = indices // self.per_shard
        for shard in np.unique(shards):
            picks = np.flatnonzero(shards == shard)
            self._read_shard(int(shard), indices[picks], out, picks)
        return out

    def _read_shard(self, shard: int, indices: np.ndarray, out: np.ndarray,
                    picks: np.ndarray) -> None:
        try:
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
        except FileNotFoundError:
            out[picks] = self.fill_value
            return
        try:
            if shard not in self._indexes:
                self._indexes[shard] = self._index(shard, fd)
            index = self._indexes[shard]
            for pick, position in zip(picks, indices - shard * self.per_shard, strict=True):
                offset, length = index[position]
                if offset == EMPTY:
                    out[pick] = self.fill_value
                    continue
                data = os.pread(fd, int(length), int(offset))
                try:
                    self.codec.decode(data, out=out[pick])
                except Exception as err:  # noqa: BLE001 - blosc says RuntimeError, others vary
                    raise self._damaged_patch(shard, int(position), err) from err
        finally:
            os.close(fd)


class PatchArray:
    """A patch array read by index: through `ShardedPatches` in the store's layout, through
    Zarr otherwise (stores written by other tools or older versions)."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self._direct = ShardedPatches(array) if _layout_problem(array) is None else None

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Patches at `indices` (any order, repeats allowed)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._direct is not None:
            return self._direct.read(indices).astype(self.dtype, copy=False)
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            return np.asarray(self.array.get_orthogonal_selection((unique,)))[inverse]
        except (IndexError, MemoryError, PermissionError):
            raise
        except Exception as err:
            for index in unique:  # find the patch that fails by itself
                region = (slice(int(index), int(index) + 1),)
                found = failing_chunk(self.array, region + (slice(None),) * (self.array.ndim - 1))
                if found is not None:
                    key, file, cause = found
                    raise DamagedFileError(
                        f"{array_where(self.array)}: patch {index} (chunk {key}) cannot be "
                        f"decoded ({describe_error(cause)}): the file {file} is damaged; "
                        f"{_rerun(_store_root(self.array))}") from err
            raise

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Patches [start, stop)."""
        return self.read(np.arange(start, min(stop, self.shape[0])))
