"""TIFF -> OME-Zarr round trips: data, axes, shape and physical scale as open_image reads them."""

import numpy as np
import pytest
import tifffile
import zarr

from unetflow.cli import main
from unetflow.config import ConfigError
from unetflow.convert import convert_tiff, use_converted_tiffs
from unetflow.ome import open_image


def test_ome_tiff_round_trip_keeps_axes_sizes_and_data(tmp_path):
    data = np.random.default_rng(0).integers(0, 4000, (5, 2, 40, 24)).astype(np.uint16)
    source = tmp_path / "stack.ome.tif"
    tifffile.imwrite(source, data, ome=True, metadata={
        "axes": "ZCYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5,
        "Channel": {"Name": ["dapi", "actin"]}})
    info = convert_tiff(source, tmp_path / "stack.ome.zarr")
    image = open_image(tmp_path / "stack.ome.zarr")
    assert image.axes == ["c", "z", "y", "x"]
    assert image.data.shape == (2, 5, 40, 24)
    assert image.scale == [1.0, 1.5, 0.25, 0.2]
    assert image.units == {"z": "micrometer", "y": "micrometer", "x": "micrometer"}
    assert image.channel_names == ["dapi", "actin"]
    np.testing.assert_array_equal(image.data.compute(), data.transpose(1, 0, 2, 3))
    assert info["metadata_source"] == "OME-XML" and info["unknown_pixel_size"] == []
    version = zarr.open_group(str(tmp_path / "stack.ome.zarr"), mode="r").attrs["ome"]["version"]
    assert version == "0.5"


def test_imagej_tiff_sizes_from_resolution_and_spacing(tmp_path):
    data = np.arange(3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)
    source = tmp_path / "ij.tif"
    tifffile.imwrite(source, data, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    convert_tiff(source, tmp_path / "ij.ome.zarr")
    image = open_image(tmp_path / "ij.ome.zarr")
    assert image.axes == ["c", "z", "y", "x"] and image.data.shape == (1, 3, 32, 32)
    assert image.scale == pytest.approx([1.0, 2.0, 0.5, 0.5])


def test_plain_tiff_needs_axes_and_takes_sizes_from_config(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (7, 16, 16)).astype(np.uint8)
    source = tmp_path / "plain.tif"
    tifffile.imwrite(source, data)  # axes unknown to the file ("QYX")
    with pytest.raises(ValueError, match="set the dataset's 'axes'"):
        convert_tiff(source, tmp_path / "x.ome.zarr")
    info = convert_tiff(source, tmp_path / "plain.ome.zarr", axes="zyx",
                        pixel_size={"z": 2.0, "y": 0.5, "x": 0.5}, chunks=(1, 4, 8, 8))
    image = open_image(tmp_path / "plain.ome.zarr")
    assert image.axes == ["c", "z", "y", "x"] and image.scale == [1.0, 2.0, 0.5, 0.5]
    assert image.data.chunksize == (1, 4, 8, 8) and info["chunks"] == (1, 4, 8, 8)
    np.testing.assert_array_equal(image.data[0].compute(), data)


def test_label_target_keeps_one_level_and_its_integer_values(tmp_path):
    labels = np.zeros((64, 64), np.uint16)
    labels[10:30, 10:30], labels[40:60, 5:25] = 1, 2
    source = tmp_path / "labels.tif"
    tifffile.imwrite(source, labels)
    info = convert_tiff(source, tmp_path / "labels.ome.zarr", pyramid_levels=3, role="target")
    assert info["levels"] == 1
    image = open_image(tmp_path / "labels.ome.zarr")
    assert image.axes == ["c", "y", "x"] and image.data.dtype == np.uint16
    np.testing.assert_array_equal(image.data[0].compute(), labels)
    as_image = convert_tiff(source, tmp_path / "image.ome.zarr", pyramid_levels=2)
    assert as_image["levels"] == 2 and open_image(tmp_path / "image.ome.zarr", level=1)


def test_cli_convert_with_pixel_size(tmp_path, capsys):
    source = tmp_path / "a.tif"
    tifffile.imwrite(source, np.ones((20, 30), np.float32))
    main(["convert", str(source), str(tmp_path / "a.ome.zarr"), "--pixel-size", "x=0.1,y=0.2"])
    assert open_image(tmp_path / "a.ome.zarr").scale == [1.0, 0.2, 0.1]
    assert "axes cyx" in capsys.readouterr().out


def test_datasets_pointing_to_tiffs_read_the_conversion():
    datasets = {"a": {"image": "raw/a.TIF", "target": "raw/a_labels.tiff", "axes": "zyx"},
                "b": {"image": "data/b.ome.zarr", "target": None}}
    sources = use_converted_tiffs(datasets, "results/converted")
    assert sources == {("a", "image"): "raw/a.TIF", ("a", "target"): "raw/a_labels.tiff"}
    assert datasets["a"]["image"] == "results/converted/a/image.ome.zarr"
    assert datasets["a"]["target"] == "results/converted/a/target.ome.zarr"
    assert datasets["b"]["image"] == "data/b.ome.zarr"
    with pytest.raises(ConfigError, match="datasets.c.pixel_size"):
        use_converted_tiffs({"c": {"image": "c.ome.zarr", "pixel_size": {"x": 1.0}}}, "r")


def test_pyramidal_ome_tiff_converts_its_full_resolution(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (128, 128)).astype(np.uint8)
    source = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(source) as tw:
        tw.write(data, subifds=1, tile=(32, 32),
                 metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(data[::2, ::2], subfiletype=1, tile=(32, 32))
    convert_tiff(source, tmp_path / "pyramid.ome.zarr")
    image = open_image(tmp_path / "pyramid.ome.zarr")
    assert image.data.shape == (1, 128, 128) and image.spatial_scale() == {"y": 0.5, "x": 0.5}
    np.testing.assert_array_equal(image.data[0].compute(), data)
