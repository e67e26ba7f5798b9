"""TIFF / OME-TIFF / ImageJ TIFF stacks to OME-Zarr (NGFF 0.5), so users with TIFFs can start.

Axes and pixel sizes come from the file's metadata (OME-XML, ImageJ tags, or a centimetre
TIFF resolution), or from the config, which wins. The TIFF is read lazily through tifffile's
Zarr interface, so a stack larger than memory converts plane by plane. Axes are written in the
NGFF order t, c, z, y, x; a channel axis is always present (length 1 for grey images), and
singleton t and z axes are dropped so a single plane is a 2D image.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from unetflow.config import ConfigError
from unetflow.ome import PlannedImage, write_image

__all__ = [
    "TIFF_SUFFIXES",
    "TiffMetadata",
    "is_tiff",
    "converted_path",
    "use_converted_tiffs",
    "read_tiff_metadata",
    "ngff_axes",
    "default_chunks",
    "default_pyramid_levels",
    "convert_tiff",
    "planned_conversion",
    "parse_pixel_size",
]

TIFF_SUFFIXES = (".tif", ".tiff")
NGFF_ORDER = "tczyx"
TIFFFILE_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
UNITS = {"µm": "micrometer", "um": "micrometer", "\\u00B5m": "micrometer", "micron": "micrometer",
         "microns": "micrometer", "micrometer": "micrometer", "nm": "nanometer",
         "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
         "cm": "centimeter", "m": "meter", "Å": "angstrom", "angstrom": "angstrom"}
CM_IN_MICROMETERS = 1e4


def is_tiff(path: str | None) -> bool:
    """Whether a dataset path names a TIFF file (by its suffix)."""
    return bool(path) and str(path).lower().endswith(TIFF_SUFFIXES)


def converted_path(root: str, dataset: str, role: str) -> str:
    """Where the workflow writes the OME-Zarr conversion of a dataset's image or target."""
    return f"{root}/{dataset}/{role}.ome.zarr"


def use_converted_tiffs(datasets: dict[str, dict[str, Any]], root: str) -> dict[tuple, str]:
    """Point every TIFF image/target of `datasets` at its conversion, in place.

    Returns {(dataset, role): TIFF path} for rule `convert`. `axes` and `pixel_size` describe a
    TIFF; given for an OME-Zarr dataset they would be silently unused, so that is an error.
    """
    sources = {}
    for name, ds in datasets.items():
        if not ds.get("image"):
            continue  # plates hold OME-Zarr; a collection's TIFFs: plates.collection_tiffs
        tiffs = [role for role in ("image", "target") if is_tiff(ds.get(role))]
        for key in ("axes", "pixel_size"):
            if ds.get(key) is not None and not tiffs:
                raise ConfigError(f"config key 'datasets.{name}.{key}': only used to convert a "
                                  f"TIFF image or target, but dataset '{name}' has none; OME-Zarr "
                                  f"stores carry their own axes and pixel sizes")
        for role in tiffs:
            sources[(name, role)] = ds[role]
            ds[role] = converted_path(root, name, role)
    return sources


@dataclass
class TiffMetadata:
    """What the TIFF says about itself, in tifffile's axis letters and the file's order."""

    axes: str
    shape: tuple[int, ...]
    dtype: str
    pixel_size: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    source: str = "none"


def _unit(name: str | None) -> str | None:
    return UNITS.get(str(name).strip()) if name else None


def _ome_sizes(xml: str) -> tuple[dict[str, float], dict[str, str], list[str]]:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    if pixels is None:
        return {}, {}, []
    sizes, units = {}, {}
    for axis in "xyz":
        value = pixels.get(f"PhysicalSize{axis.upper()}")
        if value is not None:
            sizes[axis] = float(value)
            unit = _unit(pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm"))
            if unit:
                units[axis] = unit
    names = [ch.get("Name") or str(i)
             for i, ch in enumerate(el for el in pixels if el.tag.endswith("}Channel"))]
    return sizes, units, names


def _resolution_size(page, unit: str | None) -> dict[str, float]:
    """Pixel size from the XResolution/YResolution tags (pixels per unit)."""
    sizes = {}
    for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
        res = page.tags.get(tag)
        if res is not None:
            num, den = res.value
            if num and den and num != den:
                sizes[axis] = den / num * (CM_IN_MICROMETERS if unit == "cm" else 1.0)
    return sizes


def _imagej_sizes(tf) -> tuple[dict[str, float], dict[str, str]]:
    meta = tf.imagej_metadata or {}
    unit = _unit(meta.get("unit"))
    sizes = _resolution_size(tf.pages[0], None)
    if meta.get("spacing"):
        sizes["z"] = float(meta["spacing"])
    return sizes, ({a: unit for a in sizes} if unit else {})


def _plain_sizes(tf) -> tuple[dict[str, float], dict[str, str]]:
    """Only a centimetre resolution is trusted: inch resolutions are mostly screen dpi."""
    unit_tag = tf.pages[0].tags.get("ResolutionUnit")
    if unit_tag is None or int(unit_tag.value) != 3:
        return {}, {}
    sizes = _resolution_size(tf.pages[0], "cm")
    return sizes, {a: "micrometer" for a in sizes}


def read_tiff_metadata(path: str | Path) -> TiffMetadata:
    """Axes, shape, dtype, pixel sizes and channel names of the first series of a TIFF."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        meta = TiffMetadata(axes=series.axes, shape=tuple(series.shape), dtype=str(series.dtype))
        if tf.is_ome and tf.ome_metadata:
            meta.pixel_size, meta.units, meta.channel_names = _ome_sizes(tf.ome_metadata)
            meta.source = "OME-XML"
        elif tf.is_imagej:
            meta.pixel_size, meta.units = _imagej_sizes(tf)
            meta.source = "ImageJ"
        else:
            meta.pixel_size, meta.units = _plain_sizes(tf)
            meta.source = "TIFF resolution" if meta.pixel_size else "none"
    return meta


def ngff_axes(tiff_axes: str, given: str | None, path: str) -> list[str]:
    """NGFF axis names of the file's axes in storage order; `given` (config) overrides."""
    if given:
        axes = list(given.lower())
        if len(axes) != len(tiff_axes):
            raise ValueError(f"{path}: axes '{given}' name {len(axes)} axes but the TIFF has "
                             f"{len(tiff_axes)} ({tiff_axes})")
    else:
        unknown = [a for a in tiff_axes if a not in TIFFFILE_AXES]
        if unknown:
            raise ValueError(f"{path}: the TIFF's axes '{tiff_axes}' include {unknown}, which "
                             f"have no OME-Zarr meaning; set the dataset's 'axes' in the config "
                             f"(e.g. axes: zyx), one letter of t, c, z, y, x per axis")
        axes = [TIFFFILE_AXES[a] for a in tiff_axes]
    bad = [a for a in axes if a not in NGFF_ORDER]
    if bad or len(set(axes)) != len(axes) or not {"y", "x"} <= set(axes):
        raise ValueError(f"{path}: axes {''.join(axes)!r} must be distinct letters of t, c, z, "
                         f"y, x and include y and x")
    return axes


def _to_ngff_order(data: da.Array, axes: list[str]) -> tuple[da.Array, list[str]]:
    """Transpose to t, c, z, y, x order, drop singleton t and z, add a channel axis."""
    order = sorted(range(len(axes)), key=lambda i: NGFF_ORDER.index(axes[i]))
    data, axes = data.transpose(order), [axes[i] for i in order]
    for name in ("t", "z"):
        if name in axes and data.shape[axes.index(name)] == 1:
            data = data.squeeze(axis=axes.index(name))
            axes.remove(name)
    if "c" not in axes:
        at = 1 if axes[0] == "t" else 0
        data, axes = da.expand_dims(data, at), axes[:at] + ["c"] + axes[at:]
    return data, axes


def default_chunks(shape: tuple[int, ...], axes: list[str]) -> tuple[int, ...]:
    """One time point and channel, z up to 32, y and x up to 256: small enough for random
    patch reads, large enough for tiled prediction."""
    limit = {"t": 1, "c": 1, "z": 32, "y": 256, "x": 256}
    return tuple(min(s, limit[a]) for s, a in zip(shape, axes, strict=True))


def default_pyramid_levels(shape: tuple[int, ...], axes: list[str]) -> int:
    """Halve y and x until the smallest level is about 512 px: 1 to 4 levels."""
    largest = max(shape[axes.index("y")], shape[axes.index("x")])
    return int(min(4, max(1, 1 + math.floor(math.log2(largest / 512))))) if largest > 512 else 1


def parse_pixel_size(text: str | dict | None) -> dict[str, float]:
    """`x=0.325,y=0.325,z=1` (or a dict) -> {"x": 0.325, ...}; sizes in micrometers."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else (
        part.split("=", 1) for part in str(text).split(",") if part.strip())
    sizes = {}
    for axis, value in items:
        axis = str(axis).strip().lower()
        if axis not in "zyx" or not axis or float(value) <= 0:
            raise ValueError(f"pixel size {axis}={value}: give positive sizes for z, y or x, "
                             f"e.g. x=0.325,y=0.325,z=1")
        sizes[axis] = float(value)
    return sizes


def _scale_and_units(meta: TiffMetadata, given: dict[str, float],
                     axes: list[str]) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """Scale per axis, units, and the spatial axes that stay at 1 pixel (unknown size)."""
    scale, units, unknown = {}, {}, []
    for axis in axes:
        if axis in given:
            scale[axis], units[axis] = given[axis], "micrometer"
        elif axis in meta.pixel_size:
            scale[axis] = meta.pixel_size[axis]
            if axis in meta.units:
                units[axis] = meta.units[axis]
        else:
            scale[axis] = 1.0
            if axis in "zyx":
                unknown.append(axis)
    return scale, units, unknown


def _ngff_shape(shape: tuple[int, ...], axes: list[str]) -> tuple[tuple[int, ...], list[str]]:
    """`_to_ngff_order` on a shape: the shape and axes the conversion will have."""
    order = sorted(range(len(axes)), key=lambda i: NGFF_ORDER.index(axes[i]))
    shape, axes = [shape[i] for i in order], [axes[i] for i in order]
    for name in ("t", "z"):
        if name in axes and shape[axes.index(name)] == 1:
            del shape[axes.index(name)]
            axes.remove(name)
    if "c" not in axes:
        at = 1 if axes[0] == "t" else 0
        shape, axes = shape[:at] + [1] + shape[at:], axes[:at] + ["c"] + axes[at:]
    return tuple(shape), axes


def planned_conversion(source: str | Path, output: str, axes: str | None = None,
                       pixel_size: dict[str, float] | str | None = None,
                       role: str = "image") -> PlannedImage:
    """What `convert_tiff` will write at `output`, from the TIFF's metadata (no pixels read),
    so that planning checks a TIFF dataset before its conversion exists. Raises ValueError
    naming the file when its axes cannot be converted (as the conversion would)."""
    source = str(source)
    meta = read_tiff_metadata(source)
    shape, out_axes = _ngff_shape(tuple(meta.shape), ngff_axes(meta.axes, axes, source))
    scale, _, _ = _scale_and_units(meta, parse_pixel_size(pixel_size), out_axes)
    labels = role == "target" and np.dtype(meta.dtype).kind in "iub"
    names = meta.channel_names if len(meta.channel_names) == shape[out_axes.index("c")] else []
    return PlannedImage(path=output, axes=tuple(out_axes), shape=shape, dtype=meta.dtype,
                        scale=tuple(scale[a] for a in out_axes),
                        levels=1 if labels else default_pyramid_levels(shape, out_axes),
                        channel_names=tuple(names))


def convert_tiff(source: str | Path, output: str | Path, axes: str | None = None,
                 pixel_size: dict[str, float] | str | None = None,
                 pyramid_levels: int | None = None, chunks: tuple[int, ...] | None = None,
                 role: str = "image") -> dict[str, Any]:
    """Convert the first series of a TIFF (its full resolution, for pyramidal files) into
    an NGFF 0.5 OME-Zarr image at `output`.

    `axes` (e.g. "zyx") and `pixel_size` (micrometers) override the file's metadata.
    A `role` "target" of integer type (labels) gets a single resolution level, because
    ome-zarr's image pyramids interpolate and would invent label values. Returns what was
    written.
    """
    import tifffile
    import zarr

    source = str(source)
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source}: no such TIFF file")
    meta = read_tiff_metadata(source)
    file_axes = ngff_axes(meta.axes, axes, source)
    given = parse_pixel_size(pixel_size)
    with tifffile.TiffFile(source) as tf, tf.series[0].aszarr(level=0) as store:
        data, out_axes = _to_ngff_order(da.from_zarr(zarr.open_array(store, mode="r")),
                                        file_axes)
        scale, units, unknown = _scale_and_units(meta, given, out_axes)
        labels = role == "target" and data.dtype.kind in "iub"
        levels = 1 if labels else (pyramid_levels or default_pyramid_levels(data.shape, out_axes))
        chunk_shape = tuple(chunks) if chunks else default_chunks(data.shape, out_axes)
        names = meta.channel_names if len(meta.channel_names) == data.shape[
            out_axes.index("c")] else None
        provenance = {"converted_from": source, "tiff_axes": meta.axes,
                      "metadata_source": meta.source, "pixel_size_from_config": given}
        write_image(output, data, out_axes, scale=scale, units=units or None,
                    pyramid_levels=levels, chunks=chunk_shape, attrs=provenance,
                    channel_names=names)
    return {"axes": out_axes, "shape": tuple(data.shape), "dtype": str(data.dtype),
            "scale": scale, "units": units, "levels": levels, "chunks": chunk_shape,
            "unknown_pixel_size": unknown, "metadata_source": meta.source,
            "pixel_size_source": _size_source(given, meta, out_axes)}


def _size_source(given: dict[str, float], meta: TiffMetadata, axes: list[str]) -> str:
    spatial = [a for a in axes if a in "zyx"]
    if all(a in given for a in spatial):
        return "config"
    return f"config and {meta.source}" if given else meta.source
