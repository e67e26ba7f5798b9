"""Validation of the workflow configuration, and the per-model view of its stage sections.

The config is checked once, at the edge (Snakemake's `common.smk` and the CLI), against
`workflow/schemas/config.schema.yaml`; the rest of the package trusts validated values.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "ConfigError",
    "SCHEMA_PATH",
    "load_schema",
    "validate_config",
    "load_config",
    "model_section",
    "normalization_stats_settings",
    "config_warnings",
    "check_config_size",
    "trained_elsewhere",
    "EXECUTION_KEYS",
    "PREDICT_OUTPUT_KEYS",
    "section_settings",
    "execution_settings",
    "result_settings",
    "training_settings",
]

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# the sections a stage of the CLI takes (config.section_settings)
STAGE_SECTIONS = ("demo", "normalize", "patches", "model", "train", "predict", "evaluate",
                  "export")
STATS_KEYS = ("level", "percentiles", "histogram_bins", "mask")
# Settings of how a stage runs, not of what it computes: editing them reruns nothing
# (rules pass them as resources, which Snakemake does not compare; README "Reruns").
# train: the trainer leaves them out of its fingerprint too, so a job moved to another node
# or given more workers resumes. device, compile and deterministic change floating-point
# rounding only; amp (bf16/fp16 on CUDA) changes the trajectory more than rounding, but a
# rerun would resume the saved state at its last step and rewrite the same checkpoint.
# predict: per-tile results do not depend on threads or workers; batch_size and device
# change rounding only (about 1e-7 of the output range on the CPU). predict.amp is on the
# results side: on a GPU it changes outputs by bf16/fp16 rounding (about 1e-2), which a
# user switching it off to check accuracy must see. predict.shards is not here: it decides
# which jobs exist (the gather's inputs), so changing it reruns the prediction whatever
# the params say. predict.positions_per_job groups positions into jobs: the jobs change,
# but each position's output is kept when its fingerprint (model, settings) still holds.
EXECUTION_KEYS = {
    "train": ("device", "amp", "compile", "num_workers", "threads", "deterministic", "gpus"),
    "predict": ("device", "threads", "dask_workers", "batch_size", "positions_per_job"),
    # evaluate: blocks are summed in another order, which changes sums by float rounding
    # (about 1e-15 relative) and nothing else.
    "evaluate": ("workers", "block_pixels"),
}
# keys of earlier versions, with what replaces them (said when a config still has one)
RETIRED_KEYS = {"amp_dtype": "It was merged into amp: use amp: bf16 or amp: fp16"}
# predict keys that only change how the gather writes the output, not the raw tiles: they
# are not params of predict_create and predict_shard. While the raw store exists (a gather
# that failed or was cut off) editing them reruns the gather alone; after a complete
# prediction the raw store (a temp() output) is gone and the whole prediction reruns.
PREDICT_OUTPUT_KEYS = ("pyramid_levels", "chunks", "probabilities", "instances", "output_units",
                      "watershed")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key, the value and the fix."""


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _key_path(path) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "<top level>"


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _subschema_properties(error: jsonschema.ValidationError, schema: dict) -> dict:
    sub = error.schema
    while "$ref" in sub:
        ref = sub["$ref"].split("/")[-1]
        sub = schema["$defs"][ref]
    return sub.get("properties", {})


_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string",
               "boolean": "true or false", "array": "a list", "object": "a mapping of keys",
               "null": "null"}


def _expected_types(schema_type) -> str:
    types = schema_type if isinstance(schema_type, list) else [schema_type]
    return " or ".join(_TYPE_NAMES.get(t, t) for t in types)


def _describe_value_error(error: jsonschema.ValidationError, key: str) -> str | None:
    """One line for the common value errors: the key, the bad value and what would fix it."""
    kind, value, limit = error.validator, error.instance, error.validator_value
    if kind == "type":
        return (f"config key '{key}': {value!r} has the wrong type; it must be "
                f"{_expected_types(limit)}")
    if kind == "enum":
        allowed = [v for v in limit if v is not None]
        hint = _did_you_mean(str(value), [str(v) for v in allowed])
        return (f"config key '{key}': {value!r} is not allowed.{hint} Use one of: "
                f"{', '.join(map(str, allowed))}")
    if kind in ("minimum", "exclusiveMinimum"):
        bound = "of at least" if kind == "minimum" else "greater than"
        return f"config key '{key}': {value!r} is too small; use a value {bound} {limit}"
    if kind in ("maximum", "exclusiveMaximum"):
        bound = "of at most" if kind == "maximum" else "less than"
        # the schema may say why a bound exists (x-maximum-reason): a bound without a reason
        # reads as arbitrary
        reason = error.schema.get("x-maximum-reason") if isinstance(error.schema, dict) else None
        return (f"config key '{key}': {value!r} is too large; use a value {bound} {limit}"
                + (f" ({reason})" if reason else ""))
    if kind == "minItems" and not value:
        what = "dataset name defined under 'datasets'" if key.endswith("_on") else "entry"
        return f"config key '{key}': the list is empty; give at least {limit} {what}"
    if kind in ("minItems", "maxItems"):
        bound = "at least" if kind == "minItems" else "at most"
        return (f"config key '{key}': {value!r} has {len(value)} entries; give {bound} "
                f"{limit}")
    if kind == "minProperties":
        return f"config key '{key}': no entries; define at least {limit}"
    if kind == "required":
        missing = [k for k in limit if k not in value]
        return (f"config key '{key}': '{missing[0] if missing else '?'}' is missing; "
                f"add it (required: {', '.join(limit)})")
    return None


def _describe(error: jsonschema.ValidationError, schema: dict, prefix: tuple = ()) -> str:
    key = _key_path((*prefix, *error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = _subschema_properties(error, schema)
        extra = [k for k in error.instance if k not in allowed]
        hint = _did_you_mean(extra[0], allowed) if extra else ""
        if extra and extra[0] in RETIRED_KEYS:
            hint = f" {RETIRED_KEYS[extra[0]]}."
        return (f"config key '{key}': unknown key '{extra[0] if extra else '?'}'.{hint} "
                f"Allowed keys: {', '.join(sorted(allowed))}")
    if error.validator == "pattern" or (error.validator == "propertyNames"):
        return (f"config key '{key}': name {error.instance!r} is not allowed; names must start "
                f"with a letter and hold only letters, digits, '_' and '-' (safe in paths "
                f"and shell commands)")
    return _describe_value_error(error, key) or f"config key '{key}': {error.message}"


def _fill_defaults(schema: dict, node: dict, root: dict) -> None:
    """Fill missing keys of `node` from the schema's defaults, recursively."""
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    for key, prop in schema.get("properties", {}).items():
        resolved = prop
        while "$ref" in resolved:
            resolved = root["$defs"][resolved["$ref"].split("/")[-1]]
        if key not in node and "default" in prop:
            node[key] = copy.deepcopy(prop["default"])
        if isinstance(node.get(key), dict) and resolved.get("properties"):
            _fill_defaults(resolved, node[key], root)


SOURCE_KEYS = ("image", "plate", "collection")
PLATE_ONLY_KEYS = ("wells", "fields")
POSITIONS_ONLY_KEYS = ("labels",)


def dataset_kind(spec: dict[str, Any]) -> str:
    """"image", "plate" or "collection": which source key a (validated) dataset has."""
    return next(k for k in SOURCE_KEYS if spec.get(k))


def has_target(spec: dict[str, Any]) -> bool:
    """Whether a dataset has targets: a target image/plate/glob, or a label image per field."""
    return bool(spec.get("target") or spec.get("labels"))


def dataset_settings(name: str, spec: dict[str, Any],
                     schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """One dataset entry validated as `validate_config` does (schema, defaults, the keys
    each kind of source takes): what `unetflow positions` reads from its --spec."""
    schema = schema or load_schema()
    spec = {k: v for k, v in spec.items() if v is not None}
    definition = {**schema["properties"]["datasets"]["additionalProperties"],
                  "$defs": schema["$defs"]}
    errors = sorted(jsonschema.Draft202012Validator(definition).iter_errors(spec),
                    key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0], schema, ("datasets", name)))
    _fill_defaults(definition, spec, schema)
    _check_dataset_kinds({"datasets": {name: spec}})
    return spec


def _exactly_one(spec: dict, keys: tuple[str, ...], key: str, choices: str) -> str:
    """The one of `keys` that `spec` gives (a dataset's or a model's source: the rules read
    it by that key alone), or a ConfigError naming `key` and what was given."""
    given = [k for k in keys if spec.get(k)]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise ConfigError(f"config key '{key}': give exactly one of {choices} (got {what})")
    return given[0]


def _check_dataset_kinds(config: dict) -> None:
    """Exactly one source per dataset, and the keys that only one kind of source takes."""
    for name, spec in config["datasets"].items():
        kind = _exactly_one(spec, SOURCE_KEYS, f"datasets.{name}",
                            "image, plate or collection")
        for key in PLATE_ONLY_KEYS:
            if spec.get(key) is not None and kind != "plate":
                raise ConfigError(f"config key 'datasets.{name}.{key}': selects the wells or "
                                  f"fields of a plate, but dataset '{name}' is a {kind}")
        if kind == "image" and (spec.get("labels") or spec.get("normalize") == "position"):
            key = "labels" if spec.get("labels") else "normalize"
            raise ConfigError(f"config key 'datasets.{name}.{key}': only plates and "
                              f"collections have positions; dataset '{name}' is one image "
                              f"(give its labels image as target)")
        for key in ("axes", "pixel_size"):
            if spec.get(key) is not None and kind == "plate":
                raise ConfigError(f"config key 'datasets.{name}.{key}': describes TIFF files, "
                                  f"but dataset '{name}' is a plate (OME-Zarr carries its "
                                  f"own axes and pixel sizes)")
        if spec.get("labels") and spec.get("target"):
            raise ConfigError(f"config key 'datasets.{name}.labels': give labels (a label "
                              f"image in each position) or target, not both")


def _check_validation_groups(config: dict) -> None:
    """validation: position/well holds out whole positions or wells of plates/collections."""
    for model, spec in config["models"].items():
        mode = model_section(config, model, "patches")["validation"]
        if mode not in ("position", "well"):
            continue
        for name in spec["train_on"]:
            kind = dataset_kind(config["datasets"][name])
            if kind == "image" or (mode == "well" and kind != "plate"):
                raise ConfigError(f"config key {_where(config, model, 'patches', 'validation')}"
                                  f": '{mode}' holds out whole {mode}s, but dataset '{name}' "
                                  f"is {'an image' if kind == 'image' else 'a collection'} "
                                  f"(no {mode}s); use validation: block or image")


MODEL_SOURCES = ("train_on", "package", "checkpoint")


def trained_elsewhere(spec: dict[str, Any]) -> str | None:
    """'package' or 'checkpoint' for a model that the config does not train (a bioimage.io
    package, a unetflow checkpoint), None for one it trains (train_on)."""
    return next((k for k in ("package", "checkpoint") if spec.get(k)), None)


def _check_model_sources(config: dict) -> None:
    """Each model is trained here (train_on) or comes from a package or a checkpoint."""
    for model, spec in config["models"].items():
        source = _exactly_one(spec, MODEL_SOURCES, f"models.{model}",
                              "train_on (train it here), package (a bioimage.io model "
                              "package) or checkpoint (a unetflow checkpoint)")
        if source != "train_on" and not spec.get("predict_on"):
            raise ConfigError(f"config key 'models.{model}.predict_on': model '{model}' comes "
                              f"from its {source} and is not trained here; give the "
                              f"datasets it predicts on")


def _check_references(config: dict) -> None:
    datasets = config["datasets"]
    for model, spec in config["models"].items():
        for key in ("train_on", "predict_on"):
            for i, name in enumerate(spec.get(key, [])):
                if name not in datasets:
                    raise ConfigError(
                        f"config key 'models.{model}.{key}[{i}]': dataset '{name}' is not "
                        f"defined under 'datasets'.{_did_you_mean(name, datasets)} "
                        f"Defined: {', '.join(datasets)}")
        for i, name in enumerate(model_section(config, model, "patches")["validation_datasets"]):
            if name not in datasets:
                raise ConfigError(f"config key 'models.{model}.patches.validation_datasets[{i}]':"
                                  f" dataset '{name}' is not defined under 'datasets'")
        if model_section(config, model, "model")["target"] == "n2v":
            continue  # learns from the images alone
        for name in spec["train_on"]:
            if not has_target(datasets[name]):
                raise ConfigError(f"config key 'datasets.{name}.target': model '{model}' trains "
                                  f"on '{name}', which has no target; set its target path "
                                  f"(or, for a denoiser, train it with model.target: n2v)")


def _where(config: dict, model: str, section: str, key: str) -> str:
    """The key a model's effective setting comes from: its override, or the global section."""
    if key in config["models"][model].get(section, {}):
        return f"'models.{model}.{section}.{key}'"
    return f"'{section}.{key}' (used by model '{model}')"


def _check_n2v(config: dict, model: str, spec: dict) -> None:
    """model.target n2v: a regression model, trained with mse or mae on the masked pixels;
    train.blind_spot's window odd and its struct_axis one of the model's axes."""
    where = _where(config, model, "model", "target")
    if spec["task"] != "regression":
        raise ConfigError(f"config key {where}: 'n2v' trains a denoiser (task regression), "
                          f"but model '{model}' has task '{spec['task']}'; pretrain an n2v "
                          f"model and start this one from its encoder (train.init_from, "
                          f"train.init_encoder_only)")
    train = model_section(config, model, "train")
    if train["loss"] not in (None, "mse", "mae"):
        raise ConfigError(f"config key {_where(config, model, 'train', 'loss')}: "
                          f"{train['loss']!r}; an n2v model learns from single masked pixels: "
                          f"use mse (the default) or mae")
    spot = train["blind_spot"]
    if spot["window"] % 2 == 0:
        raise ConfigError(f"config key {_where(config, model, 'train', 'blind_spot')}: window "
                          f"{spot['window']} must be odd (centred on the masked pixel)")
    dims = model_section(config, model, "model")["spatial_dims"]
    if spot["struct_axis"] == "z" and dims == 2:
        raise ConfigError(f"config key {_where(config, model, 'train', 'blind_spot')}: "
                          f"struct_axis 'z' but the model is 2D; use x or y")


def _check_segmentation_targets(config: dict) -> None:
    """model.target boundaries: a segmentation model of objects (2 classes: the label
    image holds instances, not classes); n2v: `_check_n2v`. train.init_encoder_only needs
    train.init_from."""
    for model, spec in config["models"].items():
        arch = model_section(config, model, "model")
        train = model_section(config, model, "train")
        if train["init_encoder_only"] and not train["init_from"]:
            raise ConfigError(f"config key {_where(config, model, 'train', 'init_encoder_only')}"
                              f": true, but no train.init_from names the checkpoint whose "
                              f"encoder to copy")
        if arch["target"] == "n2v":
            _check_n2v(config, model, spec)
        if arch["target"] != "boundaries":
            continue
        where = _where(config, model, "model", "target")
        if spec["task"] != "segmentation":
            raise ConfigError(f"config key {where}: 'boundaries' is a segmentation target, "
                              f"but model '{model}' has task '{spec['task']}'; use target: "
                              f"classes (or leave it out)")
        if arch["num_classes"] != 2:
            raise ConfigError(f"config key {_where(config, model, 'model', 'num_classes')}: "
                              f"{arch['num_classes']} classes, but target 'boundaries' "
                              f"separates objects of one class (the labels are instance ids); "
                              f"use num_classes: 2, or target: classes for semantic classes")


def _check_augment_ranges(augment: dict[str, Any], prefix: str) -> None:
    """Every [low, high] range of train.augment (a 2-item list) has low <= high: the schema
    checks each end, not their order."""
    for name, block in augment.items():
        for key, value in (block.items() if isinstance(block, dict) else ()):
            if isinstance(value, list) and len(value) == 2 and value[0] > value[1]:
                raise ConfigError(f"config key '{prefix}.{name}.{key}': {value!r} has its low "
                                  f"end above its high end; give [low, high] with low <= high")


def _check_train_augment(config: dict) -> None:
    _check_augment_ranges(config["train"]["augment"], "train.augment")
    for model, spec in config["models"].items():
        _check_augment_ranges(spec.get("train", {}).get("augment", {}),
                              f"models.{model}.train.augment")


def _check_shapes(config: dict) -> None:
    """patches.shape, predict.tile_shape and predict.halo on the 2**depth grid of a model
    trained here (a package's or checkpoint's grid is checked against the file, at
    planning: unetflow.checks)."""
    for model, spec in config["models"].items():
        if trained_elsewhere(spec):
            continue
        arch = model_section(config, model, "model")
        dims, multiple = arch["spatial_dims"], 2 ** arch["depth"]
        for section, key in (("patches", "shape"), ("predict", "tile_shape")):
            shape = model_section(config, model, section)[key]
            where = _where(config, model, section, key)
            if len(shape) != dims:
                raise ConfigError(f"config key {where}: {shape} has {len(shape)} dimensions but "
                                  f"the model is {dims}D (model.spatial_dims); give {dims} "
                                  f"sizes, one per spatial axis")
            bad = [s for s in shape if s % multiple]
            if bad:
                fixed = [max(multiple, round(s / multiple) * multiple) for s in shape]
                raise ConfigError(f"config key {where}: {shape} is not divisible by "
                                  f"2**model.depth = {multiple}; use e.g. {fixed}")
        halo = model_section(config, model, "predict")["halo"]
        if halo is not None and halo % multiple:
            fixed = math.ceil(halo / multiple) * multiple
            raise ConfigError(f"config key {_where(config, model, 'predict', 'halo')}: {halo} "
                              f"is not a multiple of 2**model.depth = {multiple}; use e.g. "
                              f"{fixed}, or null for the model's exact halo")


def _export_problem(settings: dict[str, Any]) -> str | None:
    """Why bioimage.io packages cannot be written as `export` says, in one line, or None:
    the extra (bioimageio.core) is missing, or the license is no SPDX identifier that
    bioimage.io knows. Imports bioimageio.spec (about 1.5 s), so only with export.enabled."""
    try:
        from bioimageio.spec.model.v0_5 import LicenseId
    except ImportError:
        return ("config key 'export.enabled': true, but bioimageio.core is not installed; "
                "install the extra: pip install -e '.[bioimageio]' (make install does)")
    try:
        LicenseId(settings["license"])
    except ValueError:
        return (f"config key 'export.license': {settings['license']!r} is not an SPDX license "
                f"identifier that bioimage.io accepts (e.g. CC-BY-4.0, MIT, BSD-3-Clause)")
    return None


def _check_export(config: dict) -> None:
    """export.enabled: the packages can be written (`_export_problem`), and each trained
    model's first train_on dataset has one set of statistics to bake into its package.
    Models from a package or a checkpoint are not exported: they have no train_on whose
    statistics a package could hold (a package model is one already)."""
    if not config["export"]["enabled"]:
        return
    problem = _export_problem(config["export"])
    if problem:
        raise ConfigError(problem)
    for model, spec in config["models"].items():
        if trained_elsewhere(spec):
            continue
        first = spec["train_on"][0]
        if config["datasets"][first].get("normalize") == "position":
            raise ConfigError(f"config key 'datasets.{first}.normalize': 'position' gives each "
                              f"position its own statistics, but the bioimage.io package of "
                              f"model '{model}' (export.enabled) bakes in those of its first "
                              f"train_on dataset '{first}'; use normalize: dataset")


def _model_exact_halo(config: dict[str, Any], model: str) -> int:
    """`unetflow.model.exact_halo` of the U-Net that `config` describes for `model`.

    Built from the model section alone, on the CPU: the halo does not depend on channels.
    """
    from unetflow.model.unet import build_unet, exact_halo, layer_settings

    arch = model_section(config, model, "model")
    return exact_halo(build_unet(layer_settings(arch), arch["spatial_dims"], 1, 1))


def config_warnings(config: dict[str, Any]) -> list[str]:
    """Settings that are valid but probably not meant, one line each (of a validated config).

    A `predict.halo` below the model's exact halo with crop blending gives seams at tile
    borders: prediction still runs, so this warns rather than fails.
    """
    found = []
    for model, spec in config["models"].items():
        settings = model_section(config, model, "predict")
        if trained_elsewhere(spec) or settings["halo"] is None \
                or settings["blending"] != "crop":
            continue
        exact, where = _model_exact_halo(config, model), _where(config, model, "predict", "halo")
        if settings["halo"] < exact:
            found.append(f"config key {where}: {settings['halo']} is smaller than the exact "
                         f"halo {exact} of model '{model}' with crop "
                         f"blending, so its predictions will show seams at tile borders; set "
                         f"predict.halo: {exact} (or null), or blending: gaussian")
    return found + _n2v_augment_warnings(config)


# augmentations that mix neighbouring pixels: blur and resampling (unetflow.augment)
NOISE_CORRELATING_AUGMENT = ("rotate", "scale", "elastic", "blur", "low_resolution")


def _n2v_augment_warnings(config: dict[str, Any]) -> list[str]:
    """Noise2Void needs noise that is independent from pixel to pixel; blur, simulated low
    resolution and the linear resampling of rotate/scale/elastic correlate it, and the blind
    spot then learns to predict the noise too."""
    found = []
    for model in config["models"]:
        if model_section(config, model, "model")["target"] != "n2v":
            continue
        augment = model_section(config, model, "train")["augment"]
        for name in NOISE_CORRELATING_AUGMENT:
            if augment[name]["p"] > 0:
                found.append(f"config key {_where(config, model, 'train', 'augment')}: "
                             f"{name} (p {augment[name]['p']}) mixes neighbouring pixels, "
                             f"which correlates the noise that model '{model}' (n2v) must "
                             f"see independent; set {name}.p: 0 for it (flips and rotate90 "
                             f"move whole pixels)")
    return found


# Entries a config may hold once YAML aliases are expanded: a plate-sized config (3,456
# dataset entries of a few keys each) holds tens of thousands; an alias bomb, billions.
MAX_CONFIG_ENTRIES = 1_000_000


def _expanded_entries(node: Any, sizes: dict[int, float]) -> float:
    """Entries under `node` with every alias expanded, counted without expanding: a node
    reached again through an alias is the same object, counted once and reused (inf for
    a node that contains itself)."""
    if not isinstance(node, (dict, list)):
        return 1
    key = id(node)
    if key in sizes:
        return sizes[key]
    sizes[key] = math.inf  # in progress: reaching it again is a cycle
    children = node.values() if isinstance(node, dict) else node
    sizes[key] = 1 + sum(_expanded_entries(child, sizes) for child in children)
    return sizes[key]


def check_config_size(config: Any, limit: int = MAX_CONFIG_ENTRIES) -> None:
    """Refuse a config whose YAML aliases expand to more than `limit` entries (an alias
    bomb: validating or copying it would take minutes and GBs before a MemoryError).

    Costs one visit per distinct node; names the deepest config key still over the limit.
    """
    sizes: dict[int, float] = {}
    if _expanded_entries(config, sizes) <= limit:
        return
    path, node = [], config
    while isinstance(node, dict):
        over = [k for k, v in node.items() if _expanded_entries(v, sizes) > limit]
        if not over:
            break
        path.append(over[0])
        node = node[over[0]]
    size = sizes.get(id(node), math.inf)
    what = ("refers to itself through a YAML alias" if size == math.inf else
            f"expands to {size:,.0f} entries through YAML aliases (*name) repeating anchors "
            f"(&name) inside each other")
    raise ConfigError(f"config key '{_key_path(path)}': the value {what}, more than the "
                      f"{limit:,} a config may hold; write the value out without nested "
                      f"aliases")


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict:
    """Validate `config`, fill defaults, and return a new dict; raise ConfigError on problems."""
    check_config_size(config)
    schema = schema or load_schema()
    config = copy.deepcopy(dict(config))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0], schema))
    _fill_defaults(schema, config, schema)
    for ds in config["datasets"].values():
        _fill_defaults(schema["properties"]["datasets"]["additionalProperties"], ds, schema)
    _check_model_sources(config)
    for spec in config["models"].values():
        spec.setdefault("predict_on", [])
        spec.setdefault("train_on", [])
    _check_dataset_kinds(config)
    _check_references(config)
    _check_validation_groups(config)
    _check_shapes(config)
    _check_segmentation_targets(config)
    _check_train_augment(config)
    _check_export(config)
    return config


def section_settings(section: str, values: dict[str, Any],
                     schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stage section (e.g. `predict`) validated against the schema, defaults filled.

    What the CLI runs on: a stage called by hand, by a rule or by a benchmark gets exactly
    the schema's defaults for what it is not given, and an unknown or bad key is refused
    with its name (``predict.tile_shape``...).
    """
    schema = schema or load_schema()
    definition = schema["$defs"].get(section) or schema["properties"].get(section)
    if section not in STAGE_SECTIONS or definition is None:
        raise ConfigError(f"unknown config section {section!r}")
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{section}': {values!r} is not a mapping of keys")
    section_schema = {**definition, "$defs": schema["$defs"]}
    values = copy.deepcopy(values)
    validator = jsonschema.Draft202012Validator(section_schema)
    errors = sorted(validator.iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0], schema, (section,)))
    _fill_defaults(section_schema, values, schema)
    if section == "train":
        _check_augment_ranges(values["augment"], "train.augment")
    return values


def execution_settings(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """The keys of a section that say how a stage runs (EXECUTION_KEYS), not what it makes."""
    return {k: v for k, v in values.items() if k in EXECUTION_KEYS.get(section, ())}


def result_settings(section: str, values: dict[str, Any],
                    leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of a section that decide its results (all but EXECUTION_KEYS, `leave_out`)."""
    skip = set(EXECUTION_KEYS.get(section, ())) | set(leave_out)
    return {k: v for k, v in values.items() if k not in skip}


def training_settings(settings: dict[str, Any], model_settings: dict[str, Any]
                      ) -> dict[str, Any]:
    """The train settings that decide this model's weights: train.blind_spot only for a
    model.target n2v model, train.init_encoder_only only with train.init_from, a block of
    train.augment (rotate, scale, ...) only when its p is above 0. Left out otherwise, so
    that a model trained before these keys existed keeps its Snakemake params (it is not
    retrained) and its training fingerprint (a stopped run resumes)."""
    drop = set()
    if model_settings.get("target") != "n2v":
        drop.add("blind_spot")
    if not settings.get("init_from"):
        drop.add("init_encoder_only")
    kept = {k: v for k, v in settings.items() if k not in drop}
    if isinstance(kept.get("augment"), dict):  # an augmentation at p 0 draws nothing
        kept["augment"] = {k: v for k, v in kept["augment"].items()
                           if not (isinstance(v, dict) and v.get("p") == 0)}
    return kept


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (safe_load) and validate it."""
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(raw).__name__}")
    return validate_config(raw)


def model_section(config: dict[str, Any], model: str, section: str) -> dict[str, Any]:
    """The effective `section` for `model`: the global section updated by the model's override.

    Nested dicts (e.g. train.augment, train.augment.rotate) are merged key by key, at every
    depth. The result is plain data, so Snakemake's params comparison sees exactly the
    settings a job depends on.
    """
    return _merged(config.get(section, {}), config["models"][model].get(section, {}))


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`; a dict in both is merged the same way, recursively."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def normalization_stats_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The normalize keys that change the computed statistics (not how they are applied)."""
    return {k: config["normalize"][k] for k in STATS_KEYS}
