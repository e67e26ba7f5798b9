"""Tests for unetflow.ome: reading NGFF 0.4 and 0.5, channel/time handling, writing with
physical geometry, pyramids and image-label metadata that validators accept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from unetflow.ome import (
    OmeZarrError,
    channel_first,
    channel_first_axes,
    open_image,
    resolve_channels,
    spatial_axes,
    write_image,
    write_label_image,
)


def validate(path: Path) -> None:
    """ome-zarr-models accepts the store, and ome-zarr-py's reader opens it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    open_ome_zarr(zarr.open_group(str(path), mode="r"))
    assert list(Reader(parse_url(str(path)))())


def write_v04(path: Path, data: np.ndarray, axes: str, scale: dict[str, float]) -> None:
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as ome_write_image

    ome_write_image(data, str(path), axes=axes, fmt=FormatV04(), scale_factors=[2], scale=scale)


def test_ngff_04_and_05_read_the_same(tmp_path):
    data = np.arange(2 * 3 * 16 * 20, dtype=np.uint16).reshape(2, 3, 16, 20)
    scale = {"c": 1.0, "z": 2.0, "y": 0.5, "x": 0.5}
    write_v04(tmp_path / "v04.ome.zarr", data, "czyx", scale)
    write_image(tmp_path / "v05.ome.zarr", data, ["c", "z", "y", "x"], scale=scale,
                pyramid_levels=2)
    old, new = open_image(tmp_path / "v04.ome.zarr"), open_image(tmp_path / "v05.ome.zarr")
    assert "multiscales" in old.attrs and "ome" in new.attrs  # really 0.4 and 0.5
    for image in (old, new):
        assert image.axes == ["c", "z", "y", "x"] and image.scale == [1.0, 2.0, 0.5, 0.5]
        assert np.array_equal(image.data.compute(), data)
        assert spatial_axes(image.axes) == ["z", "y", "x"]
    assert open_image(tmp_path / "v04.ome.zarr", level=1).data.shape == (2, 3, 8, 10)


def test_unreadable_inputs_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(OmeZarrError, match="no such file"):
        open_image(tmp_path / "missing.ome.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(OmeZarrError, match="no 'multiscales'"):
        open_image(tmp_path / "plain.zarr")
    write_image(tmp_path / "one.ome.zarr", np.zeros((4, 4)), ["y", "x"])
    with pytest.raises(OmeZarrError, match="level 3 does not exist"):
        open_image(tmp_path / "one.ome.zarr", level=3)


def test_channels_by_name_or_index_and_time_points(tmp_path):
    data = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)  # t, c, y, x
    path = tmp_path / "tc.ome.zarr"
    write_image(path, data, ["t", "c", "y", "x"], channel_names=["dapi", "gfp", "rfp"])
    image = open_image(path)
    assert resolve_channels(image, ["rfp", 0]) == [2, 0]
    with pytest.raises(OmeZarrError, match="channel 'cy5' does not exist"):
        resolve_channels(image, ["cy5"])
    kept, axes = channel_first_axes(image, ["gfp"])
    assert axes == ["c", "t", "y", "x"]
    assert np.array_equal(kept.compute(), data[:, [1]].transpose(1, 0, 2, 3))
    with pytest.raises(OmeZarrError, match="2 time points"):  # training reads one time point
        channel_first(image)
    assert channel_first(image, keep_time=True).shape == (3, 2, 8, 8)  # statistics over all
    single = tmp_path / "t1.ome.zarr"
    write_image(single, data[:1, :, :, :], ["t", "c", "y", "x"])
    assert channel_first(open_image(single)).shape == (3, 8, 8)


def test_image_without_channel_axis_gets_one(tmp_path):
    write_image(tmp_path / "zyx.ome.zarr", np.ones((3, 5, 6)), ["z", "y", "x"])
    data, axes = channel_first_axes(open_image(tmp_path / "zyx.ome.zarr"))
    assert data.shape == (1, 3, 5, 6) and axes == ["c", "z", "y", "x"]


def test_write_image_keeps_translation_on_every_level_and_is_atomic(tmp_path):
    path = tmp_path / "out.ome.zarr"
    write_image(path, np.zeros((1, 64, 48), dtype=np.float32), ["c", "y", "x"],
                scale={"c": 1.0, "y": 0.25, "x": 0.5}, units={"y": "micrometer",
                                                              "x": "micrometer"},
                pyramid_levels=3, chunks=(1, 16, 16), translation={"y": 100.0, "x": -3.0},
                attrs={"model": "m"})
    validate(path)
    datasets = open_image(path).attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["s0", "s1", "s2"]
    for level in range(len(datasets)):
        image = open_image(path, level)
        factor = 2**level
        assert image.scale == [1.0, 0.25 * factor, 0.5 * factor]
        # pixel centres: the input's offset plus ome-zarr-py's half-pixel shift per level
        assert image.translation == [0.0, 100.0 + 0.125 * (factor - 1),
                                     -3.0 + 0.25 * (factor - 1)]
    assert open_image(path).data.chunksize == (1, 16, 16)
    assert open_image(path).attrs["unetflow"] == {"model": "m"}
    assert open_image(path).units == {"y": "micrometer", "x": "micrometer"}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_the_old_image_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.ome.zarr"
    write_image(path, np.ones((1, 8, 8), dtype=np.float32), ["c", "y", "x"])

    def fail(*args, **kwargs):
        raise RuntimeError("killed after the pixels were written")

    monkeypatch.setattr("unetflow.ome.add_translation", fail)
    with pytest.raises(RuntimeError, match="killed"):
        write_image(path, np.zeros((1, 8, 8), dtype=np.float32), ["c", "y", "x"],
                    translation={"y": 1.0})
    assert open_image(path).data.compute().min() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("streaming", [False, True])
def test_label_image_has_image_label_metadata_and_validates(tmp_path, streaming):
    path = tmp_path / "img.ome.zarr"
    write_image(path, np.zeros((1, 32, 32), dtype=np.float32), ["c", "y", "x"],
                pyramid_levels=2, translation={"y": 5.0, "x": 5.0})
    labels = np.zeros((32, 32), dtype=np.uint32)
    labels[4:10, 4:10], labels[20:30, 3:8] = 7, 9
    write_label_image(path, "cells", labels, ["y", "x"], pyramid_levels=2,
                      translation={"y": 5.0, "x": 5.0}, streaming=streaming)
    validate(path)
    group = zarr.open_group(str(path), mode="r")
    meta = group["labels/cells"].attrs["ome"]["image-label"]
    assert meta["source"] == {"image": "../../"} and meta["version"] == "0.5"
    assert group["labels"].attrs["ome"]["labels"] == ["cells"]
    read = open_image(f"{path}/labels/cells")
    assert np.array_equal(read.data.compute(), labels) and read.translation == [5.0, 5.0]
    assert len(read.attrs["ome"]["multiscales"][0]["datasets"]) == 2


