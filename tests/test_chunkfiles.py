"""Dask arrays read from chunk files directly must equal what Zarr reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

from unetflow.chunkfiles import BlockMemo, direct_dask_array
from unetflow.ome import open_image, write_image

DATA = np.random.default_rng(0).integers(0, 60000, size=(2, 100, 130)).astype(np.uint16)


def _array(tmp_path: Path, fmt=None, **kwargs) -> zarr.Array:
    path = tmp_path / "img.ome.zarr"
    if fmt is None:
        write_image(path, DATA, ["c", "y", "x"], chunks=(1, 32, 48))
        return zarr.open_array(str(path / "s0"), mode="r")
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    array = group.create_array("s0", shape=DATA.shape, dtype=DATA.dtype, chunks=(1, 32, 48),
                               **kwargs)
    array[...] = DATA
    return array


@pytest.mark.parametrize("layout", ["v3 zstd (ome-zarr)", "v2 blosc", "v2 uncompressed",
                                    "v2 nested (NGFF 0.4)", "v3 gzip", "v3 uncompressed"])
def test_blocks_equal_zarr_with_edge_chunks_and_merged_blocks(tmp_path, layout):
    if layout.startswith("v2"):
        compressors = None if "uncompressed" in layout else "auto"
        keys = {"name": "v2", "separator": "/" if "nested" in layout else "."}
        array = _array(tmp_path, fmt=2, compressors=compressors, chunk_key_encoding=keys)
        assert (Path(array.store.root) / "s0" / ("0/1/1" if "nested" in layout
                                                  else "0.1.1")).exists()
    elif layout == "v3 zstd (ome-zarr)":
        array = _array(tmp_path)
        assert "Zstd" in type(array.compressors[0]).__name__
    else:
        group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w", zarr_format=3)
        array = group.create_array("s0", shape=DATA.shape, dtype=DATA.dtype,
                                   chunks=(1, 32, 48),
                                   compressors=None if "uncompressed" in layout else
                                   [zarr.codecs.GzipCodec(level=1)])
        array[...] = DATA
    for chunks in (None, ((2,), (64, 36), (96, 34)), ((1, 1), (100,), (130,))):
        lazy = direct_dask_array(array, chunks)
        assert lazy is not None, layout
        np.testing.assert_array_equal(lazy.compute(), DATA)


def test_missing_chunks_read_as_the_fill_value(tmp_path):
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w", zarr_format=3)
    array = group.create_array("a", shape=(64, 64), dtype="int32", chunks=(32, 32),
                               fill_value=7)
    array[:32, :32] = 1  # one chunk written, three never
    expected = np.full((64, 64), 7)
    expected[:32, :32] = 1
    np.testing.assert_array_equal(direct_dask_array(array).compute(), expected)


def test_unhandled_layouts_and_split_chunks_give_none(tmp_path):
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="w", zarr_format=3)
    sharded = group.create_array("sharded", shape=(64, 64), dtype="uint8", chunks=(16, 16),
                                 shards=(32, 32))
    assert direct_dask_array(sharded) is None
    in_memory = zarr.create_array(store={}, shape=(4, 4), dtype="uint8")
    assert direct_dask_array(in_memory) is None
    array = _array(tmp_path)
    assert direct_dask_array(array, ((2,), (50, 50), (130,))) is None  # 50 splits a chunk


def test_a_memo_keeps_blocks_for_the_next_computation_within_its_budget(tmp_path):
    array = _array(tmp_path)
    block = 32 * 48 * 2  # bytes of one chunk of one channel
    memo = BlockMemo(budget=3 * block)
    first = direct_dask_array(array, memo=memo)
    np.testing.assert_array_equal(first.compute(), DATA)
    held = sum(b.nbytes for b in memo.blocks.values())
    assert held == memo.used <= memo.budget and memo.used > memo.budget - block  # filled
    assert 3 <= len(memo.blocks) < 12  # of 12 blocks; edge blocks are smaller
    shutil.rmtree(tmp_path / "img.ome.zarr" / "s0" / "c")  # the chunk files are gone
    again = direct_dask_array(array, memo=memo)  # another graph over the same files
    with dask.config.set(scheduler="sync"):
        for path, shape in list(memo.blocks):  # the kept blocks are still served
            key = tuple(int(part) for part in path.parts[-3:])  # .../c/<c>/<y>/<x>
            where = tuple(slice(k * c, k * c + s)
                          for k, c, s in zip(key, (1, 32, 48), shape, strict=True))
            np.testing.assert_array_equal(again.blocks[key].compute(), DATA[where])


def test_open_image_builds_its_data_with_the_given_factory(tmp_path):
    _array(tmp_path)
    seen = []

    def factory(array, axes):
        seen.append(axes)
        return direct_dask_array(array)

    image = open_image(tmp_path / "img.ome.zarr", dask_array=factory)
    assert seen == [["c", "y", "x"]]
    np.testing.assert_array_equal(image.data.compute(), DATA)
