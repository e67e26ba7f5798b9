"""Reading and writing OME-Zarr images (NGFF 0.4 on zarr v2 and 0.5 on zarr v3).

Every stage goes through these functions, so axes, resolution levels and physical
scales are interpreted in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from unetflow.files import atomic_path

__all__ = [
    "multiscales_and_version",
    "omero_channel_names",
    "OmeImage",
    "OmeZarrError",
    "open_image",
    "spatial_axes",
    "write_image",
    "write_label_image",
    "resolve_channels",
    "channel_first",
    "channel_first_axes",
    "add_translation",
]

SPATIAL_AXES = ("z", "y", "x")


class OmeZarrError(ValueError):
    """An input path is missing or is not a readable OME-Zarr image."""


@dataclass
class OmeImage:
    """One resolution level of an OME-Zarr multiscale image, read lazily."""

    path: str
    axes: list[str]
    data: da.Array
    level_path: str
    scale: list[float]
    translation: list[float]
    units: dict[str, str] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_axes(self) -> list[str]:
        return spatial_axes(self.axes)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[self.axes.index(a)] for a in self.spatial_axes)

    def spatial_scale(self) -> dict[str, float]:
        return {a: self.scale[self.axes.index(a)] for a in self.spatial_axes}

    def axis_scale(self) -> dict[str, float]:
        """Physical pixel size of every axis (1.0 where the metadata gives none)."""
        return dict(zip(self.axes, self.scale, strict=True))

    def axis_translation(self) -> dict[str, float]:
        """Physical position of the first pixel's centre along every axis."""
        return dict(zip(self.axes, self.translation, strict=True))


def spatial_axes(axes: list[str]) -> list[str]:
    """The spatial axis names among `axes`, in storage order."""
    return [a for a in axes if a in SPATIAL_AXES]


def multiscales_and_version(attrs: dict[str, Any]) -> tuple[list[dict], str, dict]:
    """(multiscales, NGFF version, the metadata dict) of a group's attributes, 0.4 or 0.5."""
    if "ome" in attrs:  # NGFF 0.5
        ome = attrs["ome"]
        return ome.get("multiscales", []), str(ome.get("version", "0.5")), ome
    return attrs.get("multiscales", []), "0.4", attrs


def omero_channel_names(meta: dict[str, Any], n_channels: int) -> list[str]:
    """Channel labels from omero metadata; their indices when absent or of another count."""
    omero = meta.get("omero") or {}
    names = [str(c.get("label", i)) for i, c in enumerate(omero.get("channels", []))]
    return names if len(names) == n_channels else [str(i) for i in range(n_channels)]


def _transforms(dataset: dict, ndim: int) -> tuple[list[float], list[float]]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    return scale, translation


def open_image(path: str | Path, level: int = 0,
               dask_array: Callable[[zarr.Array, list[str]], da.Array] | None = None
               ) -> OmeImage:
    """Open resolution level `level` of the first multiscales entry of an OME-Zarr image.

    `dask_array(zarr_array, axes)` makes its data (default `da.from_zarr`, the Zarr chunks).
    Raises OmeZarrError naming the path when it is missing, not OME-Zarr, lacks axes,
    or has no such level.
    """
    path = str(path)
    if not Path(path).exists():
        raise OmeZarrError(f"{path}: no such file or directory; fix the path (a relative path "
                           f"starts in the working directory {Path.cwd()})")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several types for non-zarr folders
        raise OmeZarrError(f"{path}: not a Zarr group ({err.__class__.__name__}); give an "
                           f"OME-Zarr image (NGFF 0.4 or 0.5), or a .tif/.tiff file that rule "
                           f"convert turns into one") from err
    multiscales, _version, meta = multiscales_and_version(group.attrs.asdict())
    if not multiscales:
        raise OmeZarrError(f"{path}: not an OME-Zarr image (no 'multiscales' in its "
                           f"attributes); give the image's root group, or write it with an "
                           f"OME-Zarr writer (ome-zarr-py, bioformats2raw)")
    ms = multiscales[0]
    if not ms.get("axes"):
        raise OmeZarrError(f"{path}: multiscales entry has no 'axes' (NGFF before 0.4); "
                           f"rewrite the metadata as NGFF 0.4 or 0.5, which names the axes")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"]]
    datasets = ms.get("datasets", [])
    if not 0 <= level < len(datasets):
        raise OmeZarrError(f"{path}: resolution level {level} does not exist "
                           f"(the image has {len(datasets)} levels)")
    level_path = datasets[level]["path"]
    array = zarr.open_array(f"{path}/{level_path}", mode="r")
    if array.ndim != len(axes):
        raise OmeZarrError(f"{path}: axes {axes} do not match the array's {array.ndim} dimensions")
    array = dask_array(array, axes) if dask_array else da.from_zarr(array)
    scale, translation = _transforms(datasets[level], len(axes))
    units = {a["name"]: a["unit"] for a in ms["axes"] if isinstance(a, dict) and a.get("unit")}
    n_channels = array.shape[axes.index("c")] if "c" in axes else 1
    return OmeImage(path=path, axes=axes, data=array, level_path=level_path, scale=scale,
                    translation=translation, units=units,
                    channel_names=omero_channel_names(meta, n_channels), attrs=dict(group.attrs))


def resolve_channels(image: OmeImage, channels: list[int | str] | None) -> list[int]:
    """Channel indices for a config's `channels` list (indices or names); None means all."""
    n = len(image.channel_names)
    if channels is None:
        return list(range(n))
    indices = []
    for ch in channels:
        if isinstance(ch, str) and ch in image.channel_names:
            indices.append(image.channel_names.index(ch))
        elif isinstance(ch, int) and 0 <= ch < n:
            indices.append(ch)
        else:
            raise OmeZarrError(f"{image.path}: channel {ch!r} does not exist; the image has "
                               f"{n} channel(s) named {image.channel_names}: give indices "
                               f"0-{n - 1} or those names")
    return indices


def channel_first(image: OmeImage, channels: list[int | str] | None = None,
                  keep_time: bool = False) -> da.Array:
    """The image as a dask array (C, *spatial) with the selected channels.

    An image without a `c` axis gets a channel axis of length 1. A `t` axis of length 1 is
    dropped; longer time series are refused here (prediction handles them per time point),
    or with `keep_time` kept as (C, T, *spatial) (statistics over all time points).
    """
    data, axes = image.data, list(image.axes)
    if "t" in axes and keep_time and data.shape[axes.index("t")] > 1:
        return channel_first_axes(image, channels)[0]
    if "t" in axes:
        t = axes.index("t")
        if data.shape[t] != 1:
            raise OmeZarrError(f"{image.path}: {data.shape[t]} time points; pick one time point "
                               f"(training reads single-time-point images)")
        data = data[(slice(None),) * t + (0,)]
        axes.pop(t)
    if "c" not in axes:
        data, axes = data[None], ["c", *axes]
    data = da.moveaxis(data, axes.index("c"), 0)
    indices = resolve_channels(image, channels)
    return data[indices] if indices != list(range(data.shape[0])) else data


def channel_first_axes(image: OmeImage,
                       channels: list[int | str] | None = None) -> tuple[da.Array, list[str]]:
    """The image as (C, *other axes) with the selected channels, and the names of those axes.

    Unlike `channel_first`, time points are kept (prediction runs per time point): an image
    with axes t, c, z, y, x gives (C, T, Z, Y, X) and ["c", "t", "z", "y", "x"]. An image
    without a `c` axis gets one of length 1.
    """
    data, axes = image.data, list(image.axes)
    if "c" not in axes:
        data, axes = data[None], ["c", *axes]
    data = da.moveaxis(data, axes.index("c"), 0)
    axes = ["c", *[a for a in axes if a != "c"]]
    indices = resolve_channels(image, channels)
    return (data[indices] if indices != list(range(data.shape[0])) else data), axes


def _scale_factors(spatial: list[str], levels: int, downsample_z: bool) -> list[dict[str, int]]:
    factors = []
    for i in range(1, levels):
        f = 2**i
        factors.append({a: (f if (a != "z" or downsample_z) else 1) for a in spatial})
    return factors


def write_image(
    path: str | Path,
    data: np.ndarray | da.Array,
    axes: list[str],
    scale: dict[str, float] | None = None,
    units: dict[str, str] | None = None,
    pyramid_levels: int = 1,
    chunks: tuple[int, ...] | None = None,
    attrs: dict[str, Any] | None = None,
    channel_names: list[str] | None = None,
    downsample_z: bool = False,
    translation: dict[str, float] | None = None,
) -> None:
    """Write `data` as an NGFF 0.5 multiscale image with ome-zarr-py, atomically.

    The store is written next to `path` under a temporary name (`files.atomic_path`) and
    renamed when complete.
    `attrs` land under the group's `unetflow` attribute (provenance). `translation` (physical
    position of the first pixel per axis) is added to every level's translation, so a
    prediction lies where its input lies.
    """
    from ome_zarr.writer import write_image as ome_write_image

    spatial = spatial_axes(axes)
    storage = {"chunks": tuple(chunks)} if chunks else None
    with atomic_path(path) as tmp:
        ome_write_image(
            data, str(tmp), axes="".join(axes) if all(len(a) == 1 for a in axes) else axes,
            scale_factors=_scale_factors(spatial, pyramid_levels, downsample_z),
            scale=scale or None, axes_units=units or None, storage_options=storage,
        )
        group = zarr.open_group(str(tmp), mode="r+")
        if translation:
            add_translation(group, translation)
        if channel_names:
            ome = dict(group.attrs["ome"])
            ome["omero"] = {"channels": [{"label": n, "active": True} for n in channel_names]}
            group.attrs["ome"] = ome
        if attrs:
            group.attrs["unetflow"] = attrs


def write_label_image(image_path: str | Path, name: str, labels: np.ndarray | da.Array,
                      axes: list[str], scale: dict[str, float] | None = None,
                      units: dict[str, str] | None = None, chunks: tuple[int, ...] | None = None,
                      pyramid_levels: int = 1, downsample_z: bool = False,
                      translation: dict[str, float] | None = None,
                      streaming: bool = False) -> None:
    """Add an integer label image under `<image>/labels/<name>` with NGFF image-label metadata.

    It gets as many levels as the image (nearest-neighbour downsampling), and the `labels`
    group carries `ome.version`, both of which ome-zarr-models needs to validate the image.
    `translation` is added to every level's translation, as in `write_image`.
    By default this is ome-zarr-py's `write_labels`, which also inspects every label value
    (`da.unique` over the whole image: memory grows with the number of objects). `streaming`
    writes the same multiscales and image-label metadata (source, version) chunk by chunk,
    for label images of any size.
    The labels are written into the image store in place, not atomically: call this on a
    store that is still under its temporary name (as predict's gather does), not on a
    finished output.
    """
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image as ome_write_image
    from ome_zarr.writer import write_label_metadata, write_labels

    root = zarr.open_group(str(image_path), mode="r+")
    factors = _scale_factors(spatial_axes(axes), pyramid_levels, downsample_z)
    storage = {"chunks": tuple(chunks)} if chunks else None
    if not streaming:
        write_labels(labels, root, name=name, scaler=None, scale_factors=factors,
                     method=Methods.NEAREST, axes="".join(axes), scale=scale or None,
                     axes_units=units or None, storage_options=storage,
                     label_metadata={"source": {"image": "../../"}})
    else:
        ome_write_image(labels, root.require_group(f"labels/{name}"), scale_factors=factors,
                        method=Methods.NEAREST, axes="".join(axes), scale=scale or None,
                        axes_units=units or None, storage_options=storage)
        write_label_metadata(root["labels"], name, source={"image": "../../"})
    if translation:
        add_translation(root[f"labels/{name}"], translation)
    labels_group = root["labels"]
    ome = dict(labels_group.attrs.get("ome", {}))
    names = sorted(set(ome.get("labels", [])) | {name})
    labels_group.attrs["ome"] = {"version": "0.5", "labels": names}


def add_translation(group: zarr.Group, translation: dict[str, float]) -> None:
    """Shift every level of the group's first multiscales entry by `translation` (per axis).

    ome-zarr-py writes each level's translation relative to a first pixel at 0; adding the
    input's offset keeps a derived image (a prediction) registered to its source.
    """
    attrs = group.attrs.asdict()
    ome = dict(attrs["ome"]) if "ome" in attrs else attrs
    multiscales = [dict(m) for m in ome["multiscales"]]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in multiscales[0]["axes"]]
    offset = [float(translation.get(n, 0.0)) for n in names]
    datasets = []
    for dataset in multiscales[0]["datasets"]:
        transforms = [dict(t) for t in dataset.get("coordinateTransformations", [])]
        shifts = [t for t in transforms if t.get("type") == "translation"]
        if shifts:
            shifts[0]["translation"] = [a + b for a, b in zip(shifts[0]["translation"], offset,
                                                             strict=True)]
        else:
            transforms.append({"type": "translation", "translation": offset})
        datasets.append({**dataset, "coordinateTransformations": transforms})
    multiscales[0] = {**multiscales[0], "datasets": datasets}
    if "ome" in attrs:
        group.attrs["ome"] = {**ome, "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales
