"""Bad input fails early with one clear line, leaves no output, and untrusted files run no code.

Each case is met where a user meets it: config problems through `validate_config` (what
Snakemake's common.smk calls) and one real `snakemake -n`; data problems through the
metadata checks common.smk runs before any job (`dataset_problems`) and through the `unetflow`
subcommand of the rule that reads the pixels, on real small OME-Zarr stores. Every error is
one line naming the config key or file, the problem and the fix, and the stage's output path
does not exist afterwards.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from conftest import REPO, TINY_CONFIG, run_cli, snakemake, write_config
from unetflow.checks import dataset_problems
from unetflow.config import ConfigError, config_warnings, load_config, validate_config
from unetflow.demo import synthesize_nuclei
from unetflow.model.checkpoint import new_checkpoint, save_checkpoint
from unetflow.model.unet import build_unet
from unetflow.normalize import compute_dataset_stats, normalize_array, read_stats, write_stats
from unetflow.ome import write_image

STATS_SETTINGS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 256, "mask": None}
ARCH = {"depth": 2, "base_features": 4}


# --- helpers -------------------------------------------------------------------------------
def config_error(config: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    return str(err.value)


def assert_one_clear_line(message: str, *fragments: str) -> None:
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def assert_cli_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit status 1 and one `unetflow <command>: error: ...` line, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"unetflow {command}: error: "), result.stderr
    assert_one_clear_line(result.stderr, *fragments)


def write_2d(path: Path, data: np.ndarray, channel_names: list[str] | None = None) -> str:
    """A (C, Y, X) or (Y, X) array as an NGFF 0.5 image."""
    data = data if data.ndim == 3 else data[None]
    write_image(path, data, ["c", "y", "x"], channel_names=channel_names)
    return str(path)


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    nuclei = synthesize_nuclei((96, 96), seed=5)
    return {"image": nuclei.noisy.astype(np.float32), "labels": nuclei.labels.astype(np.uint16)}


@pytest.fixture
def good(tmp_path, scene) -> dict[str, str]:
    """A valid image/target pair with its statistics, as rules normalize/extract see them."""
    image = write_2d(tmp_path / "image.ome.zarr", scene["image"])
    target = write_2d(tmp_path / "labels.ome.zarr", scene["labels"])
    stats = tmp_path / "image.json"
    write_stats(compute_dataset_stats(image, None, STATS_SETTINGS, "d"), stats)
    return {"image": image, "target": target, "stats": str(stats)}


def data_config(image: str, target: str | None, **dataset) -> dict:
    """A validated config of one segmentation model training and predicting on dataset d."""
    return validate_config({
        "datasets": {"d": {"image": image, "target": target, **dataset}},
        "models": {"m": {"task": "segmentation", "train_on": ["d"], "predict_on": ["d"]}},
        "patches": {"shape": [32, 32]}, "model": ARCH, "predict": {"tile_shape": [32, 32]}})


def dag_problem(config: dict, *fragments: str) -> None:
    """What common.smk reports before any job runs: exactly one problem, one clear line."""
    problems = dataset_problems(config)
    assert len(problems) == 1, problems
    assert_one_clear_line(problems[0], *fragments)


def normalize_cli(image: str, out: Path, channels: list | None = None,
                  target: str | None = None, mask: str | None = None):
    """`unetflow normalize` as rule normalize runs it."""
    args = ["normalize", "--image", image, "--dataset", "d", "--output", str(out),
            "--settings", json.dumps({**STATS_SETTINGS, "mask": mask}),
            "--channels", json.dumps(channels)]
    return run_cli(*args, *(["--target", target] if target else []))


def extract_cli(image: str, target: str, stats: str, out: Path, task: str = "segmentation",
                **settings) -> subprocess.CompletedProcess:
    """`unetflow extract-patches` as rule extract_patches runs it, with the schema defaults."""
    config = data_config(image, target)
    patches = {**config["patches"], "per_dataset": 8, **settings}
    datasets = [{"name": "d", "image": image, "target": target, "stats": stats,
                 "channels": None}]
    return run_cli("extract-patches", "--datasets", json.dumps(datasets), "--task", task,
                   "--settings", json.dumps(patches),
                   "--normalize", json.dumps({"method": "percentile", "clip": False}),
                   "--num-classes", "2", "--store", str(out / "patches.zarr"),
                   "--manifest", str(out / "manifest.tsv"))


def assert_no_patches(out: Path) -> None:
    assert not (out / "patches.zarr").exists() and not (out / "manifest.tsv").exists()
    leftovers = list(out.glob("*patches.zarr*"))  # temporaries (.patches.zarr.<pid>.tmp) too
    assert not leftovers, leftovers


# --- config --------------------------------------------------------------------------------
CONFIG_CASES = {
    "unknown key": (lambda c: c["train"].update(stpes=3),
                    ["config key 'train'", "unknown key 'stpes'", "Did you mean 'steps'?"]),
    "wrong type": (lambda c: c["train"].update(steps="many"),
                   ["config key 'train.steps'", "'many'", "must be an integer"]),
    "undefined dataset": (lambda c: c["models"]["seg"].update(predict_on=["te_sge"]),
                          ["config key 'models.seg.predict_on[0]'", "'te_sge' is not defined",
                           "Did you mean 'te_seg'?"]),
    "empty dataset list": (lambda c: c["models"]["seg"].update(train_on=[]),
                           ["config key 'models.seg.train_on'", "the list is empty",
                            "give at least 1 dataset name defined under 'datasets'"]),
    "no datasets": (lambda c: c.update(datasets={}),
                    ["config key 'datasets'", "no entries", "define at least 1"]),
    "unknown task": (lambda c: c["models"]["seg"].update(task="segmentaton"),
                     ["config key 'models.seg.task'", "'segmentaton' is not allowed",
                      "Did you mean 'segmentation'?", "Use one of: segmentation, regression"]),
    "zero size": (lambda c: c["patches"].update(shape=[0, 32]),
                  ["config key 'patches.shape[0]'", "0 is too small", "of at least 1"]),
    "negative size": (lambda c: c["predict"].update(tile_shape=[64, -64]),
                      ["config key 'predict.tile_shape[1]'", "-64 is too small"]),
    "patch dimensionality": (lambda c: c["patches"].update(shape=[32, 32, 32]),
                             ["config key 'patches.shape' (used by model 'seg')",
                              "has 3 dimensions but the model is 2D", "give 2 sizes"]),
    "tile dimensionality": (lambda c: c["models"]["dn"].update(
        predict={"tile_shape": [16, 64, 64]}), ["config key 'models.dn.predict.tile_shape'",
                                                "has 3 dimensions", "give 2 sizes"]),
    "one-entry shape": (lambda c: c["predict"].update(tile_shape=[64]),
                        ["config key 'predict.tile_shape'", "[64] has 1 entries",
                         "give at least 2"]),
    "tile not divisible": (lambda c: c["predict"].update(tile_shape=[66, 64]),
                           ["'predict.tile_shape'", "not divisible by 2**model.depth = 4",
                            "use e.g. [64, 64]"]),
    "halo off the grid": (lambda c: c["predict"].update(halo=10),
                          ["'predict.halo'", "not a multiple of 2**model.depth = 4",
                           "use e.g. 12"]),
    "unsafe dataset name": (lambda c: c["datasets"].update({"x; rm -rf ~": {"image": "a"}}),
                            ["config key 'datasets'", "name 'x; rm -rf ~' is not allowed",
                             "letters, digits, '_' and '-'"]),
    "unsafe model name": (lambda c: c["models"].update({"../m": c["models"]["seg"]}),
                          ["config key 'models'", "name '../m' is not allowed"]),
    "missing key": (lambda c: c["models"]["seg"].pop("task"),
                    ["config key 'models.seg'", "'task' is missing", "add it"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_is_one_line_naming_the_key_the_problem_and_the_fix(case):
    edit, fragments = CONFIG_CASES[case]
    config = copy.deepcopy(TINY_CONFIG)
    edit(config)
    assert_one_clear_line(config_error(config), *fragments)


def test_a_halo_below_the_exact_one_with_crop_blending_warns():
    config = copy.deepcopy(TINY_CONFIG)
    config["models"]["seg"]["predict"] = {"halo": 8}
    lines = config_warnings(validate_config(config))
    assert len(lines) == 1
    assert_one_clear_line(lines[0], "config key 'models.seg.predict.halo'", "8 is smaller than",
                          "exact halo 24 of model 'seg'", "seams", "predict.halo: 24 (or null)")
    config["models"]["seg"]["predict"]["blending"] = "gaussian"
    assert config_warnings(validate_config(config)) == []
    config["models"]["seg"]["predict"] = {"halo": 24}
    assert config_warnings(validate_config(config)) == []


def test_snakemake_stops_on_a_bad_config_before_any_job(tmp_path):
    config = copy.deepcopy(TINY_CONFIG)
    config["train"]["stpes"] = 3
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", "config.yaml",
                       check=False)
    assert result.returncode != 0
    assert ("invalid configuration: config key 'train': unknown key 'stpes'. Did you mean "
            "'steps'?") in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


def test_snakemake_lists_every_data_problem_and_logs_warnings_before_any_job(
        tmp_path, scene):
    """One dry run: missing path, non-OME-Zarr folder, mismatched target, plus the halo
    warning; demo stores that rule demo_data makes are not checked (they do not exist yet)."""
    (tmp_path / "plain").mkdir()
    write_2d(tmp_path / "image.ome.zarr", scene["image"])
    write_2d(tmp_path / "small.ome.zarr", scene["labels"][:48, :48])
    config = copy.deepcopy(TINY_CONFIG)
    config["datasets"].update({
        "lost": {"image": "nowhere/image.ome.zarr"},
        "plain": {"image": "plain"},
        "shifted": {"image": "image.ome.zarr", "target": "small.ome.zarr"}})
    config["models"]["seg"]["predict_on"] += ["lost", "plain", "shifted"]
    config["predict"]["halo"] = 8
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", "config.yaml",
                       check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unetflow warning: config key 'predict.halo' (used by model 'seg'): 8 is smaller" \
        in output
    assert ("config key 'datasets.lost.image': nowhere/image.ome.zarr: no such file or "
            "directory; fix the path") in output
    assert "config key 'datasets.plain.image': plain: not a Zarr group" in output
    assert ("config key 'datasets.shifted.target': small.ome.zarr has spatial shape (48, 48) "
            "but the image image.ome.zarr has (96, 96)") in output
    assert "tr_seg" not in output.split("invalid data:")[-1]  # demo stores: made by a rule
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()


# --- data: problems seen in the metadata, before any job -----------------------------------
def test_a_path_that_does_not_exist(tmp_path, good):
    missing = str(tmp_path / "nowhere.ome.zarr")
    dag_problem(data_config(missing, good["target"]), "config key 'datasets.d.image'",
                f"{missing}: no such file or directory", "fix the path")
    result = normalize_cli(missing, tmp_path / "stats.json")
    assert_cli_error(result, "normalize", missing, "no such file or directory", "fix the path")
    assert not (tmp_path / "stats.json").exists()


@pytest.mark.parametrize("kind", ["plain folder", "zarr group without multiscales"])
def test_a_directory_that_is_not_ome_zarr(tmp_path, good, kind):
    path = tmp_path / "notome"
    if kind == "plain folder":
        path.mkdir()
        (path / "image.png").write_bytes(b"\x89PNG")
        fragments = ("not a Zarr group", "give an OME-Zarr image (NGFF 0.4 or 0.5)")
    else:
        zarr.open_group(str(path), mode="w").create_array("0", shape=(8, 8), dtype="f4")
        fragments = ("not an OME-Zarr image (no 'multiscales'", "OME-Zarr writer")
    dag_problem(data_config(str(path), good["target"]), "config key 'datasets.d.image'",
                *fragments)
    result = normalize_cli(str(path), tmp_path / "stats.json")
    assert_cli_error(result, "normalize", str(path), *fragments)
    assert not (tmp_path / "stats.json").exists()


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_a_multiscales_entry_without_axes(tmp_path, scene, good, ngff):
    path = tmp_path / f"noaxes_{ngff}.ome.zarr"
    if ngff == "0.4":
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_image as ome_write_image

        ome_write_image(scene["image"][None], str(path), axes="cyx", fmt=FormatV04(),
                        scale_factors=())
    else:
        write_2d(path, scene["image"])
    group = zarr.open_group(str(path), mode="r+")
    attrs = group.attrs.asdict()
    meta = attrs["ome"] if ngff == "0.5" else attrs
    assert group.metadata.zarr_format == (3 if ngff == "0.5" else 2)
    del meta["multiscales"][0]["axes"]
    group.attrs.update(attrs)
    fragments = ("multiscales entry has no 'axes'", "rewrite the metadata as NGFF 0.4 or 0.5")
    dag_problem(data_config(str(path), good["target"]), "config key 'datasets.d.image'",
                *fragments)
    result = normalize_cli(str(path), tmp_path / "stats.json")
    assert_cli_error(result, "normalize", str(path), *fragments)
    assert not (tmp_path / "stats.json").exists()


@pytest.mark.parametrize("channel", [2, "GFP"])
def test_a_channel_that_does_not_exist(tmp_path, scene, good, channel):
    two = write_2d(tmp_path / "two.ome.zarr", np.stack([scene["image"]] * 2),
                   channel_names=["DAPI", "actin"])
    fragments = (f"channel {channel!r} does not exist", "2 channel(s) named ['DAPI', 'actin']",
                 "give indices 0-1 or those names")
    dag_problem(data_config(two, good["target"], channels=[0, channel]),
                "config key 'datasets.d.channels'", *fragments)
    result = normalize_cli(two, tmp_path / "stats.json", channels=[0, channel])
    assert_cli_error(result, "normalize", two, *fragments)
    assert not (tmp_path / "stats.json").exists()


def test_image_and_target_with_different_spatial_shapes(tmp_path, scene, good):
    small = write_2d(tmp_path / "small.ome.zarr", scene["labels"][:, :48])
    dag_problem(data_config(good["image"], small), "config key 'datasets.d.target'",
                "has spatial shape (96, 48) but the image", "has (96, 96)",
                "give the target of this image at the same resolution")
    result = extract_cli(good["image"], small, good["stats"], tmp_path)
    assert_cli_error(result, "extract-patches", "dataset 'd'", "(96, 96)", "(96, 48)",
                     "same resolution")
    assert_no_patches(tmp_path)


def test_a_segmentation_target_that_is_not_integer(tmp_path, scene, good):
    floats = write_2d(tmp_path / "float.ome.zarr", scene["labels"].astype(np.float32))
    dag_problem(data_config(good["image"], floats), "config key 'datasets.d.target'",
                "has dtype float32", "model 'm' is a segmentation model",
                "needs integer labels; point the target at a label image")
    result = extract_cli(good["image"], floats, good["stats"], tmp_path)
    assert_cli_error(result, "extract-patches", "segmentation target", "dtype float32",
                     "integer labels")
    assert_no_patches(tmp_path)


SMALL_IMAGES = {
    "smaller than the patch": ((24, 40), ["spatial shape (24, 40)", "smaller than the patch "
                                          "shape [32, 32] of model 'm' (patches.shape)",
                                          "use patches no larger than the image"],
                               ["patch shape (32, 32) does not fit", "use patches.shape no "
                                                                     "larger than the image"]),
    "too small to split": ((64, 64), ["model 'm' (patches.validation)", "too small to hold a "
                                      "training block, a gap of 16 px and a validation block",
                                      "use validation: image or smaller patches"],
                           ["dataset 'd': image of shape (64, 64) is too small",
                            "use validation: image or smaller patches"]),
}


@pytest.mark.parametrize("case", SMALL_IMAGES)
def test_an_image_smaller_than_the_patch(tmp_path, scene, case):
    (rows, cols), at_dag, at_job = SMALL_IMAGES[case]
    image = write_2d(tmp_path / "tiny.ome.zarr", scene["image"][:rows, :cols])
    target = write_2d(tmp_path / "tiny_labels.ome.zarr", scene["labels"][:rows, :cols])
    dag_problem(data_config(image, target), "dataset 'd'", *at_dag)
    stats = tmp_path / "tiny.json"
    write_stats(compute_dataset_stats(image, None, STATS_SETTINGS, "d"), stats)
    result = extract_cli(image, target, str(stats), tmp_path)
    assert_cli_error(result, "extract-patches", *at_job)
    assert_no_patches(tmp_path)


# --- data: problems in the pixels, caught by the first stage that reads them ----------------
def test_a_target_with_no_foreground(tmp_path, scene, good):
    empty = write_2d(tmp_path / "empty.ome.zarr", np.zeros_like(scene["labels"]))
    assert dataset_problems(data_config(good["image"], empty)) == []  # metadata is fine
    result = extract_cli(good["image"], empty, good["stats"], tmp_path)
    assert_cli_error(result, "extract-patches", "dataset 'd': the target has no foreground",
                     "check the label image, or set patches.foreground_fraction: 0")
    assert_no_patches(tmp_path)
    result = normalize_cli(good["image"], tmp_path / "stats.json", target=empty,
                           mask="foreground")
    assert_cli_error(result, "normalize", "has no pixels to compute statistics on",
                     "normalize.mask is empty")
    assert not (tmp_path / "stats.json").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_the_image(tmp_path, scene, bad):
    image = scene["image"].copy()
    image[40, 7] = bad
    path = write_2d(tmp_path / "bad.ome.zarr", image)
    result = normalize_cli(path, tmp_path / "stats.json")
    assert_cli_error(result, "normalize", "dataset 'd'", path, "contains NaN or Inf values",
                     "clean the image")
    assert not (tmp_path / "stats.json").exists()


def test_a_constant_image_normalizes_to_zero_without_dividing_by_zero(tmp_path):
    path = write_2d(tmp_path / "flat.ome.zarr", np.full((64, 64), 7.0, np.float32))
    out = tmp_path / "stats.json"
    result = normalize_cli(path, out)
    assert result.returncode == 0, result.stderr
    assert_one_clear_line(result.stderr, "warning: dataset 'd' channel 0", "is constant (7)",
                          "normalizes to 0 everywhere", "check the image")
    stats = read_stats(out)
    assert stats["channels"][0]["std"] == 0.0
    for method in ("percentile", "zscore", "minmax", "none"):
        values = normalize_array(np.full((1, 8, 8), 7.0, np.float32), stats, method)
        assert np.isfinite(values).all(), method
    assert (normalize_array(np.full((1, 8, 8), 7.0), stats, "zscore") == 0).all()


# --- checkpoints --------------------------------------------------------------------------
def write_patch_store(path: Path) -> str:
    """A small patch store laid out as extract_patches writes it."""
    rng = np.random.default_rng(0)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["unetflow"] = {"task": "segmentation", "patch_shape": [32, 32],
                               "normalize": {"method": "percentile", "clip": False},
                               "datasets": {"d": {"level": 0}}}
    for split, n in (("train", 4), ("val", 2)):
        group.create_array(f"{split}/images", shape=(n, 1, 32, 32), dtype="float32",
                           chunks=(1, 1, 32, 32))[...] = rng.normal(size=(n, 1, 32, 32))
        group.create_array(f"{split}/targets", shape=(n, 32, 32), dtype="int32",
                           chunks=(1, 32, 32))[...] = rng.integers(0, 2, (n, 32, 32))
    return str(path)


def save_unet_checkpoint(path: Path, **arch) -> Path:
    """A checkpoint as the trainer writes it (the keys that fine-tuning and prediction read)."""
    model = build_unet({**ARCH, **arch}, 2, 1, 2)
    normalization = {"method": "percentile", "clip": False, "datasets": {}}
    save_checkpoint(path, new_checkpoint(model, "segmentation", normalization, step=1))
    return path


def train_cli(tmp_path: Path, init_from: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`unetflow train` as rule train runs it, fine-tuning from `init_from`."""
    config = data_config("i", "t")
    config["train"].update(steps=2, validate_every=1, batch_size=2, init_from=init_from)
    out = tmp_path / "run"
    out.mkdir()
    files = {name: str(out / name) for name in ("best.pt", "last.pt", "log.csv", "curve.png")}
    result = run_cli("train", "--store", write_patch_store(tmp_path / "patches.zarr"),
                     "--model-dir", str(out), "--task", "segmentation",
                     "--model-settings", json.dumps(config["model"]),
                     "--settings", json.dumps(config["train"]), "--threads", "1",
                     "--best", files["best.pt"], "--last", files["last.pt"],
                     "--log", files["log.csv"], "--curve", files["curve.png"])
    return result, out


def predict_cli(tmp_path: Path, checkpoint: Path, good: dict[str, str]):
    out = tmp_path / "prediction.ome.zarr"
    result = run_cli("predict", "run", "--checkpoint", str(checkpoint), "--image", good["image"],
                     "--stats", good["stats"], "--output", str(out), "--model", "m",
                     "--dataset", "d", "--settings", json.dumps({"tile_shape": [32, 32]}))
    return result, out


def test_fine_tuning_from_a_checkpoint_of_another_model_configuration(tmp_path):
    other = save_unet_checkpoint(tmp_path / "other.pt", base_features=8)
    result, out = train_cli(tmp_path, str(other))
    assert_cli_error(result, "train", "train.init_from: checkpoint", str(other),
                     "'base_features': 8", "'base_features': 4",
                     "fine-tuning needs the same task and architecture")
    assert list(out.iterdir()) == []  # no checkpoint, log, curve or train_state


@pytest.mark.parametrize("entry", ["train.init_from", "predict --checkpoint"])
def test_a_corrupted_checkpoint_file(tmp_path, good, entry):
    whole = save_unet_checkpoint(tmp_path / "whole.pt").read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(whole[: len(whole) // 2])
    if entry == "train.init_from":
        result, out = train_cli(tmp_path, str(broken))
        assert_cli_error(result, "train", "train.init_from:", str(broken),
                         "not a readable unetflow checkpoint")
        assert list(out.iterdir()) == []
    else:
        result, out = predict_cli(tmp_path, broken, good)
        assert_cli_error(result, "predict run", str(broken), "not a readable unetflow checkpoint")
        assert not list(tmp_path.glob("*prediction.ome.zarr*"))  # temporaries too


# --- security ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs Path.touch(marker): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("entry", ["train.init_from", "predict --checkpoint"])
def test_a_crafted_pickle_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, good,
                                                                           entry):
    """The training resume path is covered by tests/test_train.py
    (test_a_pickled_payload_is_refused_and_does_not_run); these are the other two entry
    points that read a checkpoint a user may have downloaded."""
    marker, evil = tmp_path / "payload_ran", tmp_path / "evil.pt"
    torch.save({"model_state": {}, "payload": _Payload(marker)}, evil)
    if entry == "train.init_from":
        result, out = train_cli(tmp_path, str(evil))
        assert_cli_error(result, "train", "train.init_from:", str(evil), "not a readable "
                         "unetflow checkpoint", "refused, since loading it could run code")
        assert list(out.iterdir()) == []
    else:
        result, out = predict_cli(tmp_path, evil, good)
        assert_cli_error(result, "predict run", str(evil), "not a readable unetflow checkpoint",
                         "refused, since loading it could run code")
        assert not list(tmp_path.glob("*prediction.ome.zarr*"))  # temporaries too
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()


def _calls(tree: ast.AST, module: str, names: set[str]) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr in names
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def _python_sources() -> list[Path]:
    return sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "bench").glob("*.py"))


def test_every_torch_load_uses_weights_only_and_every_yaml_read_is_safe():
    """A guard beside the behaviour tests: no code path unpickles freely or loads unsafe YAML."""
    loads = 0
    for path in _python_sources():
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", {"load"}):
            loads += 1
            flags = {k.arg: k.value for k in call.keywords}
            assert isinstance(flags.get("weights_only"), ast.Constant) and \
                flags["weights_only"].value is True, f"{path}:{call.lineno}"
        assert not _calls(tree, "yaml", {"load", "full_load", "unsafe_load", "load_all"}), path
        assert not _calls(tree, "pickle", {"load", "loads"}), path
    assert loads >= 1  # the guard looked at the real loader (model.checkpoint._load)


def test_a_yaml_config_with_python_tags_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "tag_ran"
    config = tmp_path / "config.yaml"
    config.write_text(f'evil: !!python/object/apply:os.system ["touch {marker}"]\n'
                      + yaml.safe_dump(TINY_CONFIG))
    with pytest.raises(yaml.constructor.ConstructorError):
        load_config(config)
    result = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(config),
                       check=False)
    assert result.returncode != 0
    assert "not valid JSON or YAML" in result.stdout + result.stderr
    assert not marker.exists()


# Placeholders a rule may leave unquoted: names limited by the schema's pattern and the
# wildcard constraints, numbers, fixed choices, and flags the input functions quote themselves.
SAFE_UNQUOTED = {
    "wildcards.model", "wildcards.dataset", "wildcards.shard", "wildcards.role", "threads",
    "params.task",  # 'segmentation' or 'regression' (schema enum)
    "params.num_classes", "params.shards",  # integers
    "params.ignore_label",  # '--ignore-label <int>' or ''
    "params.target", "params.baseline",  # '--x <path>' quoted by common.smk's single_quoted
    "params.options",  # convert: --axes (pattern ^[tczyx]{2,5}$), --pixel-size numbers
    "params.plate_map", "params.paths",  # '--x <path>' quoted by common.smk's single_quoted
    "params.args",  # export: '--x <json or dataset name>' each quoted by single_quoted
}


def test_every_shell_placeholder_is_quoted_or_safe_by_construction():
    found = 0
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        for block in re.findall(r"\n    shell:\n((?:        .*\n)+)", text):
            for field in re.findall(r"\{([^{}]+)\}", block):
                found += 1
                name, _, spec = field.partition(":")
                assert spec == "q" or name in SAFE_UNQUOTED, f"{path.name}: {{{field}}}"
    assert found > 50  # every rule's shell line was read


def test_paths_with_quotes_and_command_substitution_reach_the_command_intact(tmp_path,
                                                                            good):
    """A dataset path holding ', spaces, ; and $(...) runs rule normalize (image and the
    foreground --target) as a literal path: no code runs, and every planned command splits
    back into the path as one argument. (The run also shows that a config warning reaches
    Snakemake's log file.)"""
    marker = tmp_path / "PWNED"  # where the jobs' shell would create it: the workdir
    folder = tmp_path / "it's a $(touch PWNED); `touch PWNED` \"dir\""
    folder.mkdir()
    shutil.copytree(good["image"], folder / "image.ome.zarr")
    shutil.copytree(good["target"], folder / "labels.ome.zarr")
    config = {"datasets": {"d": {"image": str(folder / "image.ome.zarr"),
                                 "target": str(folder / "labels.ome.zarr")}},
              "models": {"m": {"task": "segmentation", "train_on": ["d"],
                               "predict_on": ["d"]}},
              "normalize": {"mask": "foreground"}, "patches": {"shape": [32, 32]},
              "model": ARCH, "predict": {"tile_shape": [32, 32], "halo": 8}}
    write_config(tmp_path, config)
    dry = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--configfile", "config.yaml")
    commands = [line.split("Shell command: ", 1)[1] for line in dry.stdout.splitlines()
                if "Shell command: " in line and not line.endswith(": None")]
    assert len(commands) == 10  # every rule of the DAG, from normalize to compare
    paths = {"image": str(folder / "image.ome.zarr"), "target": str(folder / "labels.ome.zarr")}
    seen = 0
    for command in commands:
        words = shlex.split(command)
        for flag, value in zip(words, words[1:], strict=False):
            if flag in ("--image", "--target"):
                assert value == paths[flag[2:]], command
                seen += 1
            elif flag == "--datasets":
                assert {k: json.loads(value)[0][k] for k in paths} == paths, command
                seen += 1
    assert seen == 10
    snakemake(tmp_path, "results/normalization/d.json", "--cores", "1", "--configfile",
              "config.yaml")
    assert read_stats(tmp_path / "results/normalization/d.json")["mask"] == "foreground"
    assert not marker.exists()
    [log] = (tmp_path / ".snakemake" / "log").glob("*.snakemake.log")
    assert "unetflow warning: config key 'predict.halo' (used by model 'm'): 8 is smaller " \
        "than the exact halo 24" in log.read_text()
