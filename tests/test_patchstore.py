"""The patch store's arrays: shard files written and read without Zarr must be Zarr's."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
import zarr

from unetflow.patchstore import (
    PatchArray,
    ShardedPatches,
    create_patch_array,
    patches_per_shard,
)

STACKS = {"images": np.random.default_rng(0).normal(size=(7, 2, 8, 12)).astype(np.float32),
          "targets": np.random.default_rng(1).integers(0, 4, size=(7, 8, 12)).astype(np.int32)}


def _chunk_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "zarr.json")


def _write_all(shards: ShardedPatches, data: np.ndarray) -> None:
    for shard in range(shards.n_shards):
        wanted = shards.shard_range(shard)
        shards.write_shard(shard, shards.encode(data[wanted.start:wanted.stop]))


@pytest.mark.parametrize("per_shard", [1, 3, 7])  # one patch per file, a partial last shard, one
def test_shards_are_the_files_zarr_writes_byte_for_byte(tmp_path, per_shard):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    for name, data in STACKS.items():
        ours, theirs = (create_patch_array(group, f"{who}/{name}", len(data), data.shape[1:],
                                           data.dtype, per_shard) for who in ("ours", "zarr"))
        _write_all(ShardedPatches(ours), data)
        theirs[...] = data
        ours_dir, theirs_dir = (tmp_path / "s.zarr" / who / name for who in ("ours", "zarr"))
        files = _chunk_files(theirs_dir)
        assert len(files) == -(-len(data) // per_shard) == len(_chunk_files(ours_dir))
        _, mismatch, errors = filecmp.cmpfiles(ours_dir, theirs_dir, files, shallow=False)
        assert not mismatch and not errors
        np.testing.assert_array_equal(zarr.open_array(str(ours_dir), mode="r")[...], data)


def test_patches_are_read_by_index_from_what_zarr_wrote(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    data = STACKS["images"]
    array = create_patch_array(group, "images", len(data), data.shape[1:], data.dtype, 3)
    array[...] = data
    reader = PatchArray(array)
    assert reader._direct is not None  # the fast path, not Zarr
    picks = np.array([6, 0, 3, 3, 5, 1])  # across shards, unsorted, repeated, the last shard
    np.testing.assert_array_equal(reader.read(picks), data[picks])
    np.testing.assert_array_equal(reader.read_range(2, 99), data[2:])
    with pytest.raises(IndexError, match="outside 0..6"):
        reader.read(np.array([7]))


def test_other_layouts_are_read_through_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    data = STACKS["targets"]
    plain = group.create_array("plain", shape=data.shape, dtype=data.dtype,
                               chunks=(1, *data.shape[1:]))
    plain[...] = data
    reader = PatchArray(plain)
    assert reader._direct is None
    np.testing.assert_array_equal(reader.read(np.array([4, 1, 4])), data[[4, 1, 4]])
    with pytest.raises(ValueError, match="it is not sharded"):
        ShardedPatches(plain)


def test_a_damaged_shard_index_is_an_error_naming_the_file(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    data = STACKS["images"]
    array = create_patch_array(group, "images", len(data), data.shape[1:], data.dtype, 3)
    _write_all(ShardedPatches(array), data)
    shard = tmp_path / "s.zarr" / "images" / "c.1.0.0.0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="c.1.0.0.0.*CRC32C"):
        PatchArray(array).read(np.array([4]))
    shard.write_bytes(b"short")
    with pytest.raises(ValueError, match="c.1.0.0.0.*too short"):
        PatchArray(array).read(np.array([4]))


def test_a_missing_shard_reads_as_the_fill_value(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    data = STACKS["images"]
    array = create_patch_array(group, "images", len(data), data.shape[1:], data.dtype, 3)
    out = PatchArray(array).read(np.array([0, 6]))
    np.testing.assert_array_equal(out, np.zeros_like(data[[0, 6]]))
    np.testing.assert_array_equal(out, array[[0, 6]])  # as Zarr reads it


def test_shards_hold_a_bounded_number_of_bytes():
    assert patches_per_shard((1, 128, 128), "float32", 10_000) == 256  # 16 MiB of 64 KiB
    assert patches_per_shard((1, 128, 128), "float32", 10) == 10  # never past the array
    assert patches_per_shard((4, 512, 512, 512), "float32", 5) == 1  # at least one patch
    with pytest.raises(ValueError, match="n=0"):
        create_patch_array(zarr.open_group(store={}, mode="w"), "x", 0, (4, 4), "f4", 1)
