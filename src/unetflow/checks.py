"""Checks of the data a config points to, run when Snakemake builds its DAG.

They read metadata only (no pixels), so a wrong path, a missing channel or mismatched shapes
fail in seconds with one line naming the dataset, the file and the fix, before any job runs.
Pixel-level problems (NaN, no foreground, constant images) are caught by the first stage that
reads the pixels, before it writes anything.

`command_problem` checks the software instead: the rules call the `unetflow` command, and
without it every job would fail with exit 127, said only in each job's log.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from unetflow.config import dataset_kind, model_section
from unetflow.ome import OmeImage, OmeZarrError, open_image, resolve_channels
from unetflow.patches import PatchError, split_regions
from unetflow.plates import PositionError, PositionSet, dataset_positions

__all__ = ["DataError", "check_datasets", "command_problem", "dataset_problems"]


def _source(spec: dict[str, Any]) -> str:
    """What a dataset reads, for messages: its image, plate or collection glob."""
    return spec[dataset_kind(spec)]


class DataError(ValueError):
    """A dataset in the config points to data that cannot be used as configured."""


def _open(path: str, key: str, level: int) -> OmeImage:
    try:
        return open_image(path, level=level)
    except OmeZarrError as err:
        raise DataError(f"config key '{key}': {err}") from None


def _spatial_shape(image: OmeImage) -> tuple[int, ...]:
    return tuple(image.data.shape[image.axes.index(a)] for a in image.spatial_axes)


def _check_image(name: str, spec: dict[str, Any], level: int) -> OmeImage:
    image = _open(spec["image"], f"datasets.{name}.image", level)
    try:
        resolve_channels(image, spec.get("channels"))
    except OmeZarrError as err:
        raise DataError(f"config key 'datasets.{name}.channels': {err}") from None
    return image


def _check_same_pixels(name: str, spec: dict[str, Any], image: OmeImage,
                       target: OmeImage) -> None:
    if _spatial_shape(target) != _spatial_shape(image):
        raise DataError(f"config key 'datasets.{name}.target': {spec['target']} has spatial "
                        f"shape {_spatial_shape(target)} but the image {spec['image']} has "
                        f"{_spatial_shape(image)}; give the target of this image at the same "
                        f"resolution (image and target must cover the same pixels)")


def _check_use_by_model(model: str, config: dict, name: str, image: OmeImage,
                        target: OmeImage | None, training: bool) -> None:
    arch = model_section(config, model, "model")
    spatial = _spatial_shape(image)
    if len(spatial) < arch["spatial_dims"]:
        raise DataError(f"model '{model}' is {arch['spatial_dims']}D (model.spatial_dims) but "
                        f"dataset '{name}' ({_source(config['datasets'][name])}) has only the "
                        f"spatial axes {image.spatial_axes}; give a {arch['spatial_dims']}D "
                        f"image, or set model.spatial_dims: {len(spatial)} for this model")
    if not training:
        return
    task = config["models"][model]["task"]
    if task == "segmentation" and target is not None and not np.issubdtype(
            target.data.dtype, np.integer):
        raise DataError(f"config key 'datasets.{name}.target': {target.path} has dtype "
                        f"{target.data.dtype}, but model '{model}' is a segmentation model and "
                        f"needs integer labels; point the target at a label image, or use "
                        f"task: regression")
    settings = model_section(config, model, "patches")
    patch = settings["shape"]
    where = f"dataset '{name}' ({_source(config['datasets'][name])})"
    if len(spatial) != len(patch):
        raise DataError(f"model '{model}' trains on {len(patch)}D patches (patches.shape) but "
                        f"{where} has the spatial axes {image.spatial_axes}; train a "
                        f"{len(spatial)}D model on it (model.spatial_dims, patches.shape, "
                        f"predict.tile_shape) or give a {len(patch)}D image")
    if any(p > s for p, s in zip(patch, spatial, strict=True)):
        raise DataError(f"{where} has spatial shape {spatial}, smaller than the patch shape "
                        f"{patch} of model '{model}' (patches.shape); use patches no larger "
                        f"than the image")
    if settings["validation"] in ("position", "well"):
        return  # whole positions or wells are held out: any patch that fits will do
    try:
        split_regions(spatial, patch, settings["validation"], settings["validation_fraction"],
                      name in settings["validation_datasets"])
    except PatchError as err:
        raise DataError(f"{where}, model '{model}' (patches.validation): {err}") from None


def _check_image_dataset(name: str, spec: dict[str, Any], level: int, produced: set[str]
                         ) -> tuple[OmeImage | None, OmeImage | None]:
    """Open what exists of a dataset; (image, target), None for paths a rule makes."""
    image = None if _made_by_rule(spec["image"], produced) else _check_image(name, spec, level)
    target = None
    if spec.get("target") and not _made_by_rule(spec["target"], produced):
        target = _open(spec["target"], f"datasets.{name}.target", level)
        if image is not None:
            _check_same_pixels(name, spec, image, target)
    return image, target


def _check_positions_dataset(name: str, spec: dict[str, Any], level: int,
                             converted: str | None
                             ) -> tuple[PositionSet, OmeImage | None, OmeImage | None]:
    """Read and check a plate's or collection's positions (metadata of every position), and
    open its first position (all agree on axes and channels) for the checks by model; a
    collection of TIFFs not converted yet is checked by the jobs that convert and read it."""
    try:
        positions = dataset_positions(name, spec, converted=converted)
    except PositionError as err:
        raise DataError(str(err)) from None
    first = positions.positions[0]
    if not Path(first.image).exists():
        return positions, None, None
    image = _check_image(name, {**spec, "image": first.image}, level)
    target = None
    if first.target:
        role = "labels" if spec.get("labels") else "target"
        target = _open(first.target, f"datasets.{name}.{role}", level)
    return positions, image, target


def _made_by_rule(path: str, produced: set[str]) -> bool:
    return str(Path(path)) in produced


def dataset_problems(config: dict[str, Any], produced: set[str] | None = None,
                     position_sets: dict[str, PositionSet] | None = None,
                     converted: str | None = None) -> list[str]:
    """Every problem found, one line each; paths in `produced` are made by a rule and skipped.

    The positions of plate and collection datasets are read (and checked) on the way; they
    go into `position_sets` when given. A collection's TIFFs are read from their conversions
    under `converted` (see plates.dataset_positions).
    """
    produced = {str(Path(p)) for p in (produced or set())}
    level = config["normalize"]["level"]
    problems: list[str] = []
    opened: dict[str, tuple[OmeImage | None, OmeImage | None]] = {}
    for name, spec in config["datasets"].items():
        try:
            if dataset_kind(spec) == "image":
                opened[name] = _check_image_dataset(name, spec, level, produced)
            else:
                positions, *opened[name] = _check_positions_dataset(name, spec, level,
                                                                    converted)
                if position_sets is not None:
                    position_sets[name] = positions
        except DataError as err:
            problems.append(str(err))
    for model, spec in config["models"].items():
        for key in ("train_on", "predict_on"):
            for name in spec.get(key, []):
                if name in opened and opened[name][0] is not None:
                    try:
                        _check_use_by_model(model, config, name, *opened[name],
                                            training=key == "train_on")
                    except DataError as err:
                        problems.append(str(err))
    return problems


def check_datasets(config: dict[str, Any], produced: set[str] | None = None,
                   converted: str | None = None) -> dict[str, PositionSet]:
    """Raise DataError listing every problem of the configured data; return the positions of
    the plate and collection datasets (read once, at planning)."""
    position_sets: dict[str, PositionSet] = {}
    problems = dataset_problems(config, produced, position_sets, converted)
    if problems:
        raise DataError("\n".join(problems))
    return position_sets


def command_problem(command: str = "unetflow", conda: bool = False) -> str | None:
    """One line saying why the rules' jobs cannot run `command`, or None when they can.

    Jobs run it from PATH (the activated environment), or from the conda environment each rule
    names when Snakemake runs with `--sdm conda`.
    """
    if conda or shutil.which(command) is not None:
        return None
    return (f"unetflow: the '{command}' command is not on PATH: activate the environment "
            f"first (source .venv/bin/activate) or run with --sdm conda")
