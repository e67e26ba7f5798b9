"""Validation of the workflow configuration, and the per-model view of its stage sections.

The config is checked once, at the edge (Snakemake's `common.smk` and the CLI), against
`workflow/schemas/config.schema.yaml`; the rest of the package trusts validated values.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "ConfigError",
    "STAGE_SECTIONS",
    "SCHEMA_PATH",
    "load_schema",
    "validate_config",
    "load_config",
    "model_section",
    "model_names",
    "dataset_names",
    "normalization_stats_settings",
]

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
STAGE_SECTIONS = ("normalize", "patches", "model", "train", "predict", "evaluate")
STATS_KEYS = ("level", "percentiles", "histogram_bins", "mask")


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


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    key = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = _subschema_properties(error, schema)
        extra = [k for k in error.instance if k not in allowed]
        hint = _did_you_mean(extra[0], allowed) if extra else ""
        return (f"config key '{key}': unknown key '{extra[0] if extra else '?'}'.{hint} "
                f"Allowed keys: {', '.join(sorted(allowed))}")
    if error.validator == "pattern" or (error.validator == "propertyNames"):
        return (f"config key '{key}': name {error.instance!r} is not allowed; names must start "
                f"with a letter and hold only letters, digits, '_' and '-' (safe in paths "
                f"and shell commands)")
    return f"config key '{key}': {error.message}"


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
        for name in spec["train_on"]:
            if not datasets[name].get("target"):
                raise ConfigError(f"config key 'datasets.{name}.target': model '{model}' trains "
                                  f"on '{name}', which has no target; set its target path")


def _check_shapes(config: dict) -> None:
    for model in config["models"]:
        arch = model_section(config, model, "model")
        dims, multiple = arch["spatial_dims"], 2 ** arch["depth"]
        for section, key in (("patches", "shape"), ("predict", "tile_shape")):
            shape = model_section(config, model, section)[key]
            where = f"'models.{model}.{section}.{key}' (or '{section}.{key}')"
            if len(shape) != dims:
                raise ConfigError(f"config key {where}: {shape} has {len(shape)} dimensions but "
                                  f"the model is {dims}D (model.spatial_dims)")
            bad = [s for s in shape if s % multiple]
            if bad:
                fixed = [max(multiple, round(s / multiple) * multiple) for s in shape]
                raise ConfigError(f"config key {where}: {shape} is not divisible by "
                                  f"2**model.depth = {multiple}; use e.g. {fixed}")


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict:
    """Validate `config`, fill defaults, and return a new dict; raise ConfigError on problems."""
    schema = schema or load_schema()
    config = copy.deepcopy(dict(config))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_describe(errors[0], schema))
    _fill_defaults(schema, config, schema)
    for ds in config["datasets"].values():
        _fill_defaults(schema["properties"]["datasets"]["additionalProperties"], ds, schema)
    for spec in config["models"].values():
        spec.setdefault("predict_on", [])
    _check_references(config)
    _check_shapes(config)
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (safe_load) and validate it."""
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(raw).__name__}")
    return validate_config(raw)


def model_section(config: dict[str, Any], model: str, section: str) -> dict[str, Any]:
    """The effective `section` for `model`: the global section updated by the model's override.

    Nested dicts (e.g. train.augment) are merged key by key. The result is plain data, so
    Snakemake's params comparison sees exactly the settings a job depends on.
    """
    merged = copy.deepcopy(config.get(section, {}))
    for key, value in config["models"][model].get(section, {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def normalization_stats_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The normalize keys that change the computed statistics (not how they are applied)."""
    return {k: config["normalize"][k] for k in STATS_KEYS}


def model_names(config: dict[str, Any]) -> list[str]:
    return list(config["models"])


def dataset_names(config: dict[str, Any]) -> list[str]:
    return list(config["datasets"])
