"""Checks of the data a config points to, run when Snakemake builds its DAG.

They read metadata only (no pixels), so a wrong path, a missing channel or mismatched shapes
fail in seconds with one line naming the dataset, the file and the fix, before any job runs.
Pixel-level problems (NaN, no foreground, constant images) are caught by the first stage that
reads the pixels, before it writes anything.

`command_problem` checks the software instead: the rules call the `unetflow` command, and
without it every job would fail with exit 127, said only in each job's log.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from unetflow.config import dataset_kind, has_target, model_section
from unetflow.ome import OmeImage, OmeZarrError, open_image, resolve_channels
from unetflow.patches import PatchError, split_regions
from unetflow.plates import PositionError, PositionSet, dataset_positions

__all__ = ["DataError", "check_datasets", "command_problem", "dataset_problems"]

# relative difference of image and target pixel sizes still taken as equal (rounding in
# metadata written by different tools)
SCALE_TOLERANCE = 1e-3


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
    image_scale, target_scale = image.spatial_scale(), target.spatial_scale()
    if any(not math.isclose(image_scale[a], target_scale.get(a, image_scale[a]),
                            rel_tol=SCALE_TOLERANCE) for a in image_scale):
        raise DataError(f"config key 'datasets.{name}.target': {target.path} has pixel size "
                        f"{_sizes(target_scale)} but the image {image.path} has "
                        f"{_sizes(image_scale)} (same shape, different scale); give the "
                        f"target of this image, or fix the scale in its multiscales "
                        f"coordinateTransformations")


def _sizes(scale: dict[str, float]) -> str:
    return " x ".join(f"{a} {v:g}" for a, v in scale.items())


def _check_use_by_model(model: str, config: dict, name: str, image: OmeImage,
                        target: OmeImage | None, training: bool) -> None:
    arch = model_section(config, model, "model")
    spatial = _spatial_shape(image)
    if len(spatial) < arch["spatial_dims"]:
        raise DataError(f"model '{model}' is {arch['spatial_dims']}D (model.spatial_dims) but "
                        f"dataset '{name}' ({_source(config['datasets'][name])}) has only the "
                        f"spatial axes {image.spatial_axes}; give a {arch['spatial_dims']}D "
                        f"image, or set model.spatial_dims: {len(spatial)} for this model")
    _check_time_points(model, config, name, image, target, training)
    if not training:
        return
    task = config["models"][model]["task"]
    if task == "segmentation" and target is not None and not np.issubdtype(
            target.data.dtype, np.integer):
        raise DataError(f"config key 'datasets.{name}.target': {target.path} has dtype "
                        f"{target.data.dtype}, but model '{model}' is a segmentation model and "
                        f"needs integer labels; point the target at a label image, or use "
                        f"task: regression")
    if task == "segmentation" and target is not None:
        _check_label_dtype(model, config, name, target)
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


def _time_points(image: OmeImage) -> int:
    return image.data.shape[image.axes.index("t")] if "t" in image.axes else 1


def _check_time_points(model: str, config: dict, name: str, image: OmeImage,
                       target: OmeImage | None, training: bool) -> None:
    """Training and evaluation read one time point per image (ome.channel_first);
    prediction alone runs per time point."""
    evaluated = has_target(config["datasets"][name])
    if not (training or evaluated):
        return
    for role, opened in (("image", image), ("target", target)):
        if opened is not None and _time_points(opened) > 1:
            use = "trains on" if training else "is evaluated on"
            raise DataError(f"config key 'datasets.{name}.{role}': {opened.path} has "
                            f"{_time_points(opened)} time points (axis t), but model "
                            f"'{model}' {use} dataset '{name}', which reads one time point "
                            f"per image; write each time point as its own image (a "
                            f"collection) or keep one" + ("" if training else
                                                          ", or predict on it without a target"))


def _check_label_dtype(model: str, config: dict, name: str, target: OmeImage) -> None:
    """A label dtype that cannot hold the model's classes (model.num_classes)."""
    classes = model_section(config, model, "model")["num_classes"]
    dtype = target.data.dtype
    if np.issubdtype(dtype, np.integer):
        top = int(np.iinfo(dtype).max)
        if classes - 1 > top:
            raise DataError(f"config key 'datasets.{name}.target': {target.path} has dtype "
                            f"{dtype}, which holds labels up to {top}, but model '{model}' has "
                            f"{classes} classes (model.num_classes: labels 0-{classes - 1}); "
                            f"set model.num_classes to the classes the labels hold")


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
        _check_same_pixels(name, {**spec, "image": first.image, "target": first.target},
                           image, target)
    return positions, image, target


# --- checks of a model across its datasets, and of its settings against them --------------
def _channel_counts(config: dict, names: list[str], opened: dict) -> dict[str, int]:
    counts = {}
    for name in names:
        image = opened.get(name, (None, None))[0]
        if image is not None:
            counts[name] = len(resolve_channels(image, config["datasets"][name]["channels"]))
    return counts


def _first_mismatch(counts: dict[str, int]) -> tuple[str, str] | None:
    names = list(counts)
    return next(((names[0], n) for n in names[1:] if counts[n] != counts[names[0]]), None)


def _check_channels(model: str, config: dict, opened: dict) -> tuple[int | None, int | None]:
    """Every dataset of a model gives it the same input channels, and (regression) every
    target the same output channels; returns (in, out) channels, None where unknown."""
    spec = config["models"][model]
    names = list(dict.fromkeys(spec["train_on"] + spec["predict_on"]))
    counts = _channel_counts(config, names, opened)
    pair = _first_mismatch(counts)
    if pair:
        a, b = pair
        raise DataError(f"model '{model}' reads {counts[a]} channel(s) from dataset '{a}' "
                        f"({_source(config['datasets'][a])}) but {counts[b]} from dataset "
                        f"'{b}' ({_source(config['datasets'][b])}); a model takes the same "
                        f"channels from every dataset it trains and predicts on: select them "
                        f"with datasets.<name>.channels")
    targets = {n: len(opened[n][1].channel_names) for n in names
               if n in opened and opened[n][1] is not None}
    pair = _first_mismatch(targets) if spec["task"] == "regression" else None
    if pair:
        a, b = pair
        raise DataError(f"regression model '{model}': the target of dataset '{a}' "
                        f"({opened[a][1].path}) has {targets[a]} channel(s) but the target of "
                        f"'{b}' ({opened[b][1].path}) has {targets[b]}; the model predicts one "
                        f"set of channels: give targets with the same channels")
    in_channels = next(iter(counts.values()), None)
    if spec["task"] == "segmentation":
        return in_channels, model_section(config, model, "model")["num_classes"]
    train_targets = [targets[n] for n in spec["train_on"] if n in targets]
    return in_channels, (train_targets[0] if train_targets else None)


ARCHITECTURE_KEYS = ("spatial_dims", "depth", "base_features", "growth", "norm", "activation",
                     "downsample", "upsample", "residual")


def _expected_network(config: dict, model: str, in_channels: int | None,
                      out_channels: int | None) -> dict[str, Any]:
    """What train would build for `model` (UNet.config()), less channels not known yet."""
    arch = model_section(config, model, "model")
    network = {k: arch[k] for k in ARCHITECTURE_KEYS}
    if in_channels is not None:
        network["in_channels"] = in_channels
    if out_channels is not None:
        network["out_channels"] = out_channels
    return network


def _made_checkpoint(config: dict, path: str) -> bool:
    """A checkpoint that a rule of this config trains (results/<model>/checkpoint_*.pt)."""
    return any(str(Path(path)) == str(Path(f"results/{m}/checkpoint_{which}.pt"))
               for m in config["models"] for which in ("best", "last"))


def _check_init_from(model: str, config: dict, in_channels: int | None,
                     out_channels: int | None) -> None:
    """train.init_from: the checkpoint's task and network must be this model's. Its plain
    entries are read (torch imported) only when a model sets one; a missing file is left to
    Snakemake (the train rule's input) and a checkpoint this config trains is not read."""
    path = model_section(config, model, "train")["init_from"]
    if not path or not Path(path).is_file() or _made_checkpoint(config, path):
        return
    from unetflow.model.checkpoint import read_description

    key = _where(config, model, "train", "init_from")
    try:
        description = read_description(path)
    except (ValueError, OSError) as err:
        raise DataError(f"config key {key}: {err}") from None
    task = config["models"][model]["task"]
    if description.get("task") != task:
        raise DataError(f"config key {key}: checkpoint {path} holds a "
                        f"{description.get('task')} model but model '{model}' is a {task} "
                        f"model; fine-tuning starts from a checkpoint of the same task")
    held = description.get("model_config") or {}
    wanted = _expected_network(config, model, in_channels, out_channels)
    differ = [f"{k} {held.get(k)!r} (the model: {v!r})" for k, v in wanted.items()
              if held.get(k) != v]
    if differ:
        raise DataError(f"config key {key}: checkpoint {path} differs from model '{model}' "
                        f"in {', '.join(differ)}; fine-tuning needs the same architecture "
                        f"and channels: set the model's settings as the checkpoint has them, "
                        f"or start from another checkpoint")


def _where(config: dict, model: str, section: str, key: str) -> str:
    """The key a model's setting comes from: its override, or the global section."""
    if key in config["models"][model].get(section, {}):
        return f"'models.{model}.{section}.{key}'"
    return f"'{section}.{key}' (used by model '{model}')"


def _tile_count(image: OmeImage, settings: dict[str, Any], arch: dict[str, Any]) -> int:
    """Tiles of one image as tiling.plan_tiles cuts it (tiles clamped to the image), at
    most: tiles enlarged to an unset (exact) halo would be fewer."""
    shape = [n for n, a in zip(image.data.shape, image.axes, strict=True) if a != "c"]
    dims, multiple = arch["spatial_dims"], 2 ** arch["depth"]
    # tiling.clamp_tiles, without importing tiling (which imports torch)
    tiles = tuple(min(t, math.ceil(n / multiple) * multiple)
                  for t, n in zip(settings["tile_shape"], shape[-dims:], strict=True))
    halo = settings["halo"] or 0
    tiles = tuple(t * math.ceil(halo / t) if t < halo else t for t in tiles)
    per_model_axes = math.prod(math.ceil(n / t) for n, t in zip(shape[-dims:], tiles,
                                                                 strict=True))
    return per_model_axes * math.prod(shape[:-dims])


def _check_shards(model: str, config: dict, predicted: dict[str, OmeImage]) -> None:
    """predict.shards splits each image's tiles into jobs: more shards than the largest
    image has tiles only adds empty jobs (1,000,000 took minutes to plan)."""
    settings = model_section(config, model, "predict")
    arch = model_section(config, model, "model")
    images = {n: im for n, im in predicted.items()
              if dataset_kind(config["datasets"][n]) == "image"}
    if not images:
        return
    tiles = {n: _tile_count(im, settings, arch) for n, im in images.items()}
    largest = max(tiles, key=tiles.get)
    if settings["shards"] > tiles[largest]:
        raise DataError(f"config key {_where(config, model, 'predict', 'shards')}: "
                        f"{settings['shards']} shards but the largest image model '{model}' "
                        f"predicts on (dataset '{largest}', {images[largest].path}, "
                        f"{_shape_text(images[largest])}) has {tiles[largest]} tile(s) of "
                        f"predict.tile_shape; use at most {tiles[largest]} shards")


def _shape_text(image: OmeImage) -> str:
    return "x".join(map(str, image.spatial_shape))


def _check_pyramid(model: str, config: dict, predicted: dict[str, OmeImage]) -> None:
    """predict.pyramid_levels halve y and x per level: the smallest image bounds them."""
    levels = model_section(config, model, "predict")["pyramid_levels"]
    for name, image in predicted.items():
        smallest = min(image.data.shape[image.axes.index(a)] for a in ("y", "x")
                       if a in image.axes)
        most = int(math.log2(smallest)) + 1
        if levels > most:
            raise DataError(f"config key {_where(config, model, 'predict', 'pyramid_levels')}: "
                            f"{levels} levels, but dataset '{name}' ({image.path}, "
                            f"{_shape_text(image)}) halved {levels - 1} times would be smaller "
                            f"than one pixel; use at most {most}")


def _check_sigmas(model: str, config: dict, used: dict[str, OmeImage]) -> None:
    """evaluate.gaussian_sigmas (the regression baseline): a sigma wider than the largest
    image only averages it, and its kernel (4 sigma each side) can take GBs."""
    if config["models"][model]["task"] != "regression" or not used:
        return
    extent = {n: max(im.spatial_shape) for n, im in used.items()}
    largest = max(extent, key=extent.get)
    sigmas = model_section(config, model, "evaluate")["gaussian_sigmas"]
    wide = [s for s in sigmas if s > extent[largest]]
    if wide:
        raise DataError(f"config key {_where(config, model, 'evaluate', 'gaussian_sigmas')}: "
                        f"sigma {wide[0]:g} px is wider than the largest image model "
                        f"'{model}' uses (dataset '{largest}', {used[largest].path}, "
                        f"{_shape_text(used[largest])}); a Gaussian that wide only averages "
                        f"the image: use sigmas up to {extent[largest]}")


def _check_patch_count(model: str, config: dict, name: str, image: OmeImage,
                       positions: int) -> None:
    """More patches than distinct patch origins (per image, times its positions) only
    repeats patches, and a count like 1e9 fills the disk."""
    settings = model_section(config, model, "patches")
    spatial, patch = image.spatial_shape, settings["shape"]
    if len(spatial) != len(patch) or any(p > n for p, n in zip(patch, spatial, strict=True)):
        return  # said by _check_use_by_model
    origins = positions * math.prod(n - p + 1 for n, p in zip(spatial, patch, strict=True))
    if settings["per_megapixel"]:
        key = "per_megapixel"
        count = round(settings["per_megapixel"] * positions * math.prod(spatial) / 1e6)
    else:
        key, count = "per_dataset", settings["per_dataset"] or 0
    if count > origins:
        raise DataError(f"config key {_where(config, model, 'patches', key)}: "
                        f"{count:,} patches from dataset '{name}' "
                        f"({_source(config['datasets'][name])}) but its "
                        f"{'positions hold' if positions > 1 else 'image holds'} only "
                        f"{origins:,} distinct patches of shape {patch}; ask for at most "
                        f"{origins:,}")


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
    counts: dict[str, int] = {}  # positions of plates and collections
    first_images: dict[str, str] = {}  # the image (first position's) of each dataset
    for name, spec in config["datasets"].items():
        try:
            if dataset_kind(spec) == "image":
                opened[name] = _check_image_dataset(name, spec, level, produced)
                first_images[name] = spec["image"]
            else:
                positions, *opened[name] = _check_positions_dataset(name, spec, level,
                                                                    converted)
                counts[name] = len(positions.positions)
                first_images[name] = positions.positions[0].image
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
                        if key == "train_on":
                            _check_patch_count(model, config, name, opened[name][0],
                                               counts.get(name, 1))
                    except DataError as err:
                        problems.append(str(err))
        problems += _model_problems(model, config, opened, first_images)
    return problems


def _predicted_images(model: str, config: dict, opened: dict, first_images: dict[str, str]
                      ) -> dict[str, OmeImage]:
    """The images `model` predicts on, at predict.level (opened again if not the level of
    the checks by dataset): metadata only."""
    level = model_section(config, model, "predict")["level"]
    images = {}
    for name in config["models"][model]["predict_on"]:
        if name not in opened or opened[name][0] is None:
            continue
        image = opened[name][0]
        if level != config["normalize"]["level"]:
            image = _open(first_images[name], _where(config, model, "predict", "level"), level)
        images[name] = image
    return images


def _model_problems(model: str, config: dict, opened: dict,
                    first_images: dict[str, str]) -> list[str]:
    """A model's datasets against each other and its checkpoint (channels, train.init_from),
    and its settings against its data (shards, pyramid levels, sigmas): one line each."""
    spec = config["models"][model]
    used = {n: opened[n][0] for n in dict.fromkeys(spec["train_on"] + spec["predict_on"])
            if n in opened and opened[n][0] is not None}
    problems = []
    try:
        channels = _check_channels(model, config, opened)
        _check_init_from(model, config, *channels)
    except DataError as err:
        problems.append(str(err))
    try:
        predicted = _predicted_images(model, config, opened, first_images)
    except DataError as err:
        return [*problems, str(err)]
    for check, images in ((_check_shards, predicted), (_check_pyramid, predicted),
                          (_check_sigmas, used)):
        try:
            check(model, config, images)
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
