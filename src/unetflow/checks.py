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

from unetflow.config import dataset_kind, has_target, model_section, trained_elsewhere
from unetflow.ome import OmeImage, OmeZarrError, PlannedImage, open_image, resolve_channels
from unetflow.patches import PatchError, split_regions
from unetflow.plates import PositionError, PositionSet, dataset_positions
from unetflow.targets import network_classes
from unetflow.tiling import clamp_tiles, enlarged_tiles, halo_limit

__all__ = ["DataError", "check_datasets", "command_problem", "dataset_problems",
           "planned_images"]

# relative difference of image and target pixel sizes still taken as equal (rounding in
# metadata written by different tools)
SCALE_TOLERANCE = 1e-3
# a Gaussian kernel's reach in sigmas (scipy's truncate; metrics.SIGMA_REACH, not imported
# here because metrics imports scipy)
SIGMA_REACH = 4


def _source(spec: dict[str, Any]) -> str:
    """What a dataset reads, for messages: its image, plate or collection glob."""
    return spec[dataset_kind(spec)]


class DataError(ValueError):
    """A dataset in the config points to data that cannot be used as configured."""


def _open(path: str, key: str, level: int,
          planned: dict[str, PlannedImage] | None = None) -> OmeImage:
    """The image at `level`: opened (metadata only), or described when a rule makes it."""
    try:
        if planned and str(Path(path)) in planned:
            return planned[str(Path(path))].at_level(level)
        return open_image(path, level=level)
    except OmeZarrError as err:
        raise DataError(f"config key '{key}': {err}") from None


def _spatial_shape(image: OmeImage) -> tuple[int, ...]:
    return tuple(image.data.shape[image.axes.index(a)] for a in image.spatial_axes)


def _check_image(name: str, spec: dict[str, Any], level: int,
                 planned: dict[str, PlannedImage] | None = None) -> OmeImage:
    image = _open(spec["image"], f"datasets.{name}.image", level, planned)
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


def _check_image_dataset(name: str, spec: dict[str, Any], level: int, produced: set[str],
                         planned: dict[str, PlannedImage]
                         ) -> tuple[OmeImage | None, OmeImage | None]:
    """Open a dataset's image and target, or describe them when a rule makes them (demo
    data, TIFF conversions: `planned`); None for other paths a rule makes."""
    image = None if _made_by_rule(spec["image"], produced, planned) else \
        _check_image(name, spec, level, planned)
    target = None
    if spec.get("target") and not _made_by_rule(spec["target"], produced, planned):
        target = _open(spec["target"], f"datasets.{name}.target", level, planned)
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
        return in_channels, network_classes(model_section(config, model, "model"))
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


# what shapes the encoder, of the keys above (model.unet's encoder_config, less channels)
ENCODER_KEYS = ("spatial_dims", "depth", "base_features", "growth", "norm", "activation",
                "downsample")


def _source_model(config: dict, path: str) -> str | None:
    """The model of this config whose checkpoint `path` is (results/<model>/checkpoint_*.pt)."""
    return next((m for m in config["models"] for which in ("best", "last")
                 if str(Path(path)) == str(Path(f"results/{m}/checkpoint_{which}.pt"))), None)


def _made_checkpoint(config: dict, path: str) -> bool:
    """A checkpoint that a rule of this config trains (results/<model>/checkpoint_*.pt)."""
    return _source_model(config, path) is not None


def _encoder_differences(held: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The encoder settings (and input channels, when known) that differ."""
    return [f"{k} {held.get(k)!r} (the model: {wanted[k]!r})"
            for k in (*ENCODER_KEYS, "in_channels")
            if wanted.get(k) is not None and held.get(k) != wanted[k]]


def _check_encoder_source(model: str, config: dict, path: str, key: str) -> None:
    """train.init_encoder_only from a model of this config: its encoder settings must be
    this model's, checked before Snakemake trains it (not after)."""
    source = _source_model(config, path)
    if source is None:
        return
    held = model_section(config, source, "model")
    differ = _encoder_differences(held, model_section(config, model, "model"))
    if differ:
        raise DataError(f"config key {key}: model '{source}', whose encoder model '{model}' "
                        f"starts from (train.init_encoder_only), differs in "
                        f"{', '.join(differ)}; give both models the same encoder settings")


def _check_init_from(model: str, config: dict, in_channels: int | None,
                     out_channels: int | None) -> None:
    """train.init_from: the checkpoint's task and network must be this model's (with
    train.init_encoder_only: its encoder). Its plain entries are read (torch imported) only
    when a model sets one; a missing file is left to Snakemake (the train rule's input) and
    a checkpoint this config trains is compared through that model's settings."""
    train = model_section(config, model, "train")
    path, encoder_only = train["init_from"], train["init_encoder_only"]
    if not path:
        return
    key = _where(config, model, "train", "init_from")
    if encoder_only:
        _check_encoder_source(model, config, path, key)
    if not Path(path).is_file() or _made_checkpoint(config, path):
        return
    description = _checkpoint_description(path, key)
    held = description.get("model_config") or {}
    wanted = _expected_network(config, model, in_channels, out_channels)
    if encoder_only:
        differ = _encoder_differences(held, wanted)
        if differ:
            raise DataError(f"config key {key}: the encoder of checkpoint {path} differs "
                            f"from model '{model}''s in {', '.join(differ)}; "
                            f"train.init_encoder_only needs the same encoder")
        return
    task = config["models"][model]["task"]
    if description.get("task") != task:
        raise DataError(f"config key {key}: checkpoint {path} holds a "
                        f"{description.get('task')} model but model '{model}' is a {task} "
                        f"model; fine-tuning starts from a checkpoint of the same task "
                        f"(or set train.init_encoder_only to take its encoder alone)")
    differ = [f"{k} {held.get(k)!r} (the model: {v!r})" for k, v in wanted.items()
              if held.get(k) != v]
    if differ:
        raise DataError(f"config key {key}: checkpoint {path} differs from model '{model}' "
                        f"in {', '.join(differ)}; fine-tuning needs the same architecture "
                        f"and channels: set the model's settings as the checkpoint has them, "
                        f"or start from another checkpoint")


def _checkpoint_description(path: str, key: str) -> dict[str, Any]:
    """A checkpoint's plain entries (task, network), read without its weights, for the checks
    of train.init_from and models.<name>.checkpoint; a file that is no checkpoint is one line
    naming `key` (quoted, as _where gives it)."""
    from unetflow.model.checkpoint import read_description

    try:
        return read_description(path)
    except (ValueError, OSError) as err:
        raise DataError(f"config key {key}: {err}") from None


def _elsewhere_network(model: str, config: dict, path: str, key: str) -> dict[str, Any]:
    """What a package or checkpoint says of its network: dims, grid, channels, task."""
    if config["models"][model].get("package"):
        from unetflow.packaged import PackageError, describe_package

        try:
            package = describe_package(path)
        except PackageError as err:
            raise DataError(f"config key '{key}': {err}") from None
        return {"dims": len(package["space_axes"]), "in_channels": package["in_channels"],
                "multiple": math.lcm(*package["size_step"]), "grid": "the package's size step"}
    description = _checkpoint_description(path, f"'{key}'")
    task = config["models"][model]["task"]
    if description["task"] != task:
        raise DataError(f"config key '{key}': {path} holds a {description['task']} model but "
                        f"model '{model}' is configured as task: {task}; fix the task")
    arch = description["model_config"]
    return {"dims": arch["spatial_dims"], "in_channels": arch["in_channels"],
            "multiple": 2 ** arch["depth"], "grid": "2**depth of the checkpoint's U-Net"}


def _check_trained_elsewhere(model: str, config: dict, in_channels: int | None,
                             opened: dict) -> None:
    """A model from a package or checkpoint (no train_on): the file is readable, takes the
    datasets' channels and dimensions, and predict.tile_shape / halo lie on its grid."""
    spec = config["models"][model]
    kind = trained_elsewhere(spec)
    if kind is None:
        return
    path, key = spec[kind], f"models.{model}.{kind}"
    if kind == "checkpoint" and _made_checkpoint(config, path):
        return  # a model of this config trains it first
    if not Path(path).exists():
        raise DataError(f"config key '{key}': {path}: no such file or folder")
    positions = [n for n in spec["predict_on"] if dataset_kind(config["datasets"][n]) != "image"]
    if kind == "package" and positions:
        raise DataError(f"config key '{key}': model '{model}' predicts on '{positions[0]}', a "
                        f"plate or collection; packaged models predict on images (datasets "
                        f"with image:) for now")
    network = _elsewhere_network(model, config, path, key)
    if in_channels is not None and in_channels != network["in_channels"]:
        raise DataError(f"config key '{key}': {path} takes {network['in_channels']} input "
                        f"channel(s) but model '{model}' reads {in_channels} from its datasets; "
                        f"select the channels with datasets.<name>.channels")
    for name in spec["predict_on"]:
        image = opened.get(name, (None, None))[0]
        if image is not None and len(image.spatial_axes) < network["dims"]:
            raise DataError(f"config key '{key}': {path} is a {network['dims']}D model but "
                            f"dataset '{name}' ({image.path}) has the spatial axes "
                            f"{image.spatial_axes}; predict it on {network['dims']}D images")
    _check_elsewhere_tiles(model, config, network, key, path)


def _check_elsewhere_tiles(model: str, config: dict, network: dict[str, Any], key: str,
                           path: str) -> None:
    settings = model_section(config, model, "predict")
    tiles, multiple = settings["tile_shape"], network["multiple"]
    where = _where(config, model, "predict", "tile_shape")
    if len(tiles) != network["dims"]:
        raise DataError(f"config key {where}: {tiles} has {len(tiles)} dimensions but "
                        f"{path} ({key}) is {network['dims']}D; give {network['dims']} sizes")
    if any(t % multiple for t in tiles) or (settings["halo"] or 0) % multiple:
        fixed = [max(multiple, round(t / multiple) * multiple) for t in tiles]
        raise DataError(f"config key {where} / predict.halo: {tiles} / {settings['halo']} "
                        f"are not multiples of {multiple}, {network['grid']} ({key}); use "
                        f"e.g. tile_shape {fixed}")


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
    tiles = enlarged_tiles(clamp_tiles(tuple(settings["tile_shape"]), tuple(shape[-dims:]),
                                       multiple), settings["halo"] or 0)
    per_model_axes = math.prod(math.ceil(n / t) for n, t in zip(shape[-dims:], tiles,
                                                                 strict=True))
    return per_model_axes * math.prod(shape[:-dims])


def _check_shards(model: str, config: dict, predicted: dict[str, OmeImage]) -> None:
    """predict.shards splits each image's tiles into jobs: more shards than the largest
    image has tiles only adds empty jobs (1,000,000 took minutes to plan)."""
    settings = model_section(config, model, "predict")
    images = {n: im for n, im in predicted.items()
              if dataset_kind(config["datasets"][n]) == "image"}
    if not images:
        return
    largest, tiles = _most_tiles(model, config, images)
    if settings["shards"] > tiles:
        raise DataError(f"config key {_where(config, model, 'predict', 'shards')}: "
                        f"{settings['shards']} shards but "
                        f"{_tiles_text(model, largest, images[largest], tiles)} shards")


def _most_tiles(model: str, config: dict, images: dict[str, OmeImage]) -> tuple[str, int]:
    """(dataset, tiles) of the image with the most tiles of the model's predict.tile_shape:
    what bounds the settings that divide or batch an image's tiles."""
    settings = model_section(config, model, "predict")
    arch = model_section(config, model, "model")
    tiles = {n: _tile_count(im, settings, arch) for n, im in images.items()}
    largest = max(tiles, key=tiles.get)
    return largest, tiles[largest]


def _tiles_text(model: str, name: str, image: OmeImage, tiles: int) -> str:
    """What bounds a tile count, for messages: the largest image and its tiles."""
    return (f"the largest image model '{model}' predicts on (dataset '{name}', {image.path}, "
            f"{_shape_text(image)}) has {tiles} tile(s) of predict.tile_shape; use at most "
            f"{tiles}")


def _check_halo(model: str, config: dict, predicted: dict[str, OmeImage]) -> None:
    """A predict.halo wider than an image it predicts on (tiling.check_halo says why it is
    refused, not clamped); the smallest image bounds it, as each image is tiled alone."""
    settings = model_section(config, model, "predict")
    if settings["halo"] is None:
        return  # the model's exact halo: never refused
    arch = model_section(config, model, "model")
    multiple = 2 ** arch["depth"]
    for name, image in predicted.items():
        model_axes = image.spatial_shape[-arch["spatial_dims"]:]
        limit = halo_limit(model_axes, multiple)
        if settings["halo"] > limit:
            raise DataError(f"config key {_where(config, model, 'predict', 'halo')}: "
                            f"{settings['halo']} px per side, but dataset '{name}' "
                            f"({image.path}, {_shape_text(image)}) is at most "
                            f"{max(model_axes)} px along the model's axes: a wider halo "
                            f"reads only reflected copies of the image, at the cost of a "
                            f"window of tile + 2 x halo per tile; use at most {limit}, or "
                            f"leave predict.halo unset for the model's exact halo")


def _check_predict_batch(model: str, config: dict, predicted: dict[str, OmeImage]) -> None:
    """predict.batch_size: tiles per forward pass, and batch_size + 1 dask threads by
    default. Refused, not clamped, above the tiles of the largest image predicted on: such
    a batch is never filled (each waits for tiles that do not exist) and 1,000,000 would
    start a million threads; the setting is plainly a mistake for this data."""
    settings = model_section(config, model, "predict")
    if settings["batch_size"] <= 1 or not predicted:
        return
    largest, tiles = _most_tiles(model, config, predicted)
    if settings["batch_size"] > tiles:
        raise DataError(f"config key {_where(config, model, 'predict', 'batch_size')}: "
                        f"{settings['batch_size']} tiles per forward pass but "
                        f"{_tiles_text(model, largest, predicted[largest], tiles)}")


def _check_train_batch(model: str, config: dict, patch_counts: dict[str, int]) -> None:
    """train.batch_size against the patches extracted for training (patches.per_dataset or
    per_megapixel, summed over train_on): every batch is filled up to batch_size by
    repeating patches, so a batch larger than all patches only repeats them, in memory
    (batch x patch pixels; 1e9 would never fit). Refused: the fix is the user's choice
    (fewer per batch, or more patches)."""
    if not patch_counts:
        return
    batch = model_section(config, model, "train")["batch_size"]
    total = sum(patch_counts.values())
    if batch > total:
        raise DataError(f"config key {_where(config, model, 'train', 'batch_size')}: "
                        f"{batch:,} patches per batch but model '{model}' extracts only "
                        f"{total:,} patches from its datasets "
                        f"({', '.join(patch_counts)}: patches.per_dataset or "
                        f"per_megapixel); a batch would repeat its patches in memory: use "
                        f"at most {total:,}, or extract more patches")


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
    """evaluate.gaussian_sigmas (the regression baseline): refused when a sigma's reach (the
    kernel's 4 sigma each side, as tune-baseline checks: metrics.check_sigma_reach) exceeds
    the largest image. Such a Gaussian only averages the image, and its kernel grows with
    sigma (1e9 tried to allocate 60 GiB). Refused, not clamped: a clamped candidate would be
    tuned and reported under a sigma nobody asked for. Not checked when evaluate.baselines
    leaves the Gaussian out. TV's weights and NLM's strengths need no check beyond the
    schema's (positive, at least one): they are multiples of the noise sd, and any value
    runs in the same time and memory."""
    settings = model_section(config, model, "evaluate")
    if config["models"][model]["task"] != "regression" or not used \
            or "gaussian" not in settings["baselines"]:
        return
    extent = {n: max(im.spatial_shape) for n, im in used.items()}
    largest = max(extent, key=extent.get)
    sigmas = settings["gaussian_sigmas"]
    wide = [s for s in sigmas if SIGMA_REACH * s > extent[largest]]
    if wide:
        raise DataError(f"config key {_where(config, model, 'evaluate', 'gaussian_sigmas')}: "
                        f"sigma {wide[0]:g} px reaches {SIGMA_REACH * wide[0]:g} px (4 sigma), "
                        f"beyond the largest image model '{model}' uses (dataset "
                        f"'{largest}', {used[largest].path}, {_shape_text(used[largest])}); "
                        f"a Gaussian that wide only averages the image: use sigmas up to "
                        f"{extent[largest] / SIGMA_REACH:g}")


def _check_patch_count(model: str, config: dict, name: str, image: OmeImage,
                       positions: int) -> int | None:
    """More patches than distinct patch origins (per image, times its positions) only
    repeats patches, and a count like 1e9 fills the disk."""
    settings = model_section(config, model, "patches")
    spatial, patch = image.spatial_shape, settings["shape"]
    if len(spatial) != len(patch) or any(p > n for p, n in zip(patch, spatial, strict=True)):
        return None  # said by _check_use_by_model
    origins = positions * math.prod(n - p + 1 for n, p in zip(spatial, patch, strict=True))
    if settings["per_megapixel"]:
        key = "per_megapixel"
        count = max(1, round(settings["per_megapixel"] * positions * math.prod(spatial) / 1e6))
    else:
        key, count = "per_dataset", settings["per_dataset"] or 0
    if count > origins:
        raise DataError(f"config key {_where(config, model, 'patches', key)}: "
                        f"{count:,} patches from dataset '{name}' "
                        f"({_source(config['datasets'][name])}) but its "
                        f"{'positions hold' if positions > 1 else 'image holds'} only "
                        f"{origins:,} distinct patches of shape {patch}; ask for at most "
                        f"{origins:,}")
    return count


def _made_by_rule(path: str, produced: set[str],
                  planned: dict[str, PlannedImage] | None = None) -> bool:
    """A path a rule makes and whose shape planning does not know."""
    return str(Path(path)) in produced and str(Path(path)) not in (planned or {})


def dataset_problems(config: dict[str, Any], produced: set[str] | None = None,
                     position_sets: dict[str, PositionSet] | None = None,
                     converted: str | None = None,
                     planned: dict[str, PlannedImage] | None = None) -> list[str]:
    """Every problem found, one line each; paths in `produced` are made by a rule and skipped,
    unless `planned` describes them (ome.PlannedImage: the demo data, TIFF conversions),
    which are checked like existing stores.

    The positions of plate and collection datasets are read (and checked) on the way; they
    go into `position_sets` when given. A collection's TIFFs are read from their conversions
    under `converted` (see plates.dataset_positions).
    """
    produced = {str(Path(p)) for p in (produced or set())}
    planned = {str(Path(p)): d for p, d in (planned or {}).items()}
    level = config["normalize"]["level"]
    problems: list[str] = []
    opened: dict[str, tuple[OmeImage | None, OmeImage | None]] = {}
    counts: dict[str, int] = {}  # positions of plates and collections
    first_images: dict[str, str] = {}  # the image (first position's) of each dataset
    for name, spec in config["datasets"].items():
        try:
            if dataset_kind(spec) == "image":
                opened[name] = _check_image_dataset(name, spec, level, produced, planned)
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
        patch_counts: dict[str, int] = {}  # training patches per dataset, when known
        for key in ("train_on", "predict_on"):
            for name in spec.get(key, []):
                if name in opened and opened[name][0] is not None:
                    try:
                        _check_use_by_model(model, config, name, *opened[name],
                                            training=key == "train_on")
                        if key == "train_on":
                            count = _check_patch_count(model, config, name, opened[name][0],
                                                       counts.get(name, 1))
                            if count is not None:
                                patch_counts[name] = count
                    except DataError as err:
                        problems.append(str(err))
        if len(patch_counts) == len(spec.get("train_on", [])):
            try:
                _check_train_batch(model, config, patch_counts)
            except DataError as err:
                problems.append(str(err))
        problems += _model_problems(model, config, opened, first_images, planned)
    return problems


def _predicted_images(model: str, config: dict, opened: dict, first_images: dict[str, str],
                      planned: dict[str, PlannedImage]) -> dict[str, OmeImage]:
    """The images `model` predicts on, at predict.level (opened again if not the level of
    the checks by dataset): metadata only."""
    level = model_section(config, model, "predict")["level"]
    images = {}
    for name in config["models"][model]["predict_on"]:
        if name not in opened or opened[name][0] is None:
            continue
        image = opened[name][0]
        if level != config["normalize"]["level"]:
            image = _open(first_images[name], _where(config, model, "predict", "level"), level,
                          planned)
        images[name] = image
    return images


def _model_problems(model: str, config: dict, opened: dict,
                    first_images: dict[str, str], planned: dict[str, PlannedImage]
                    ) -> list[str]:
    """A model's datasets against each other and its checkpoint (channels, train.init_from),
    and its settings against its data (shards, pyramid levels, sigmas): one line each."""
    spec = config["models"][model]
    used = {n: opened[n][0] for n in dict.fromkeys(spec["train_on"] + spec["predict_on"])
            if n in opened and opened[n][0] is not None}
    problems = []
    try:
        channels = _check_channels(model, config, opened)
        _check_init_from(model, config, *channels)
        _check_trained_elsewhere(model, config, channels[0], opened)
    except DataError as err:
        problems.append(str(err))
    try:
        predicted = _predicted_images(model, config, opened, first_images, planned)
    except DataError as err:
        return [*problems, str(err)]
    checks = [(_check_pyramid, predicted), (_check_sigmas, used)]
    if not (spec.get("package") or spec.get("checkpoint")):  # these size tiles by model:
        checks += [(_check_shards, predicted), (_check_halo, predicted),  # from the file
                   (_check_predict_batch, predicted)]  # for the others (prediction refuses)
    for check, images in checks:
        try:
            check(model, config, images)
        except DataError as err:
            problems.append(str(err))
    return problems


def planned_images(config: dict[str, Any], demo_root: str,
                   tiff_sources: dict[tuple[str, str], str]) -> dict[str, PlannedImage]:
    """What the rules will write, described from settings and metadata so that planning
    checks every setting against them too: the demo stores (rule demo_data, from the `demo`
    settings) and each TIFF's conversion (rule convert, from the TIFF's tags: no pixels).

    Without this a `predict.shards: 1000000` on the demo config was planned as a million
    jobs (minutes, GBs) before any check could see the image. A TIFF not there yet is left
    to Snakemake (a missing input); one whose axes cannot be converted is refused here.
    """
    from unetflow.convert import planned_conversion
    from unetflow.demo_store import planned_demo_images

    planned = dict(planned_demo_images(demo_root, config["demo"])) if config.get("demo") else {}
    for (name, role), tiff in tiff_sources.items():
        if not Path(tiff).is_file():
            continue
        spec = config["datasets"][name]
        try:
            planned[str(Path(spec[role]))] = planned_conversion(
                tiff, spec[role], spec.get("axes"), spec.get("pixel_size"), role)
        except Exception as err:  # tifffile raises several types for files it cannot read
            raise DataError(f"config key 'datasets.{name}.{role}': {tiff}: cannot be read as "
                            f"a TIFF ({err}); give a readable TIFF or an OME-Zarr image"
                            if not isinstance(err, ValueError) else
                            f"config key 'datasets.{name}.{role}': {err}") from None
    return planned


def check_datasets(config: dict[str, Any], produced: set[str] | None = None,
                   converted: str | None = None,
                   planned: dict[str, PlannedImage] | None = None) -> dict[str, PositionSet]:
    """Raise DataError listing every problem of the configured data; return the positions of
    the plate and collection datasets (read once, at planning)."""
    position_sets: dict[str, PositionSet] = {}
    problems = dataset_problems(config, produced, position_sets, converted, planned)
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
