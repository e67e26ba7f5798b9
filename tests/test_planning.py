"""Planning-time checks (issue 16, item 1): what metadata can tell is refused when Snakemake
plans, before any job, with one line naming the key or file and the fix.

Settings are checked against the data they apply to (tiles, shards, sigmas, patches), images
against each other (channels, pixel sizes, time points, label dtypes) and against the
checkpoint a model starts from (train.init_from). Each case runs `validate_config` or
`dataset_problems` (what common.smk calls) on real small OME-Zarr stores; one real
`snakemake -n` shows the lines appear before any job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import TINY_CONFIG, run_cli, snakemake, write_config
from test_bad_input import (
    ARCH,
    STATS_SETTINGS,
    assert_cli_error,
    assert_no_patches,
    assert_one_clear_line,
    config_error,
    dag_problem,
)
from unetflow.checks import dataset_problems
from unetflow.config import ConfigError, load_config, validate_config
from unetflow.model.checkpoint import new_checkpoint, save_checkpoint
from unetflow.model.unet import build_unet
from unetflow.normalize import compute_dataset_stats, write_stats
from unetflow.ome import write_image
from unetflow.tiling import clamp_tiles, plan_tiles


# --- YAML alias bomb -----------------------------------------------------------------------
def alias_bomb(levels: int = 9) -> str:
    """A YAML list whose aliases expand to 9**levels strings (a 'billion laughs')."""
    anchors = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        anchors.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "[" + ", ".join(anchors) + "]"


def test_an_alias_bomb_is_refused_in_a_fraction_of_a_second(tmp_path, tiny_config):
    text = yaml.safe_dump(tiny_config, sort_keys=False).replace(
        "train:\n", f"train:\n  init_from: {alias_bomb()}\n", 1)
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - start < 2
    assert_one_clear_line(str(err.value), "config key 'train.init_from'", "YAML aliases",
                          "write the value out without nested aliases")


def test_a_value_that_contains_itself_is_refused(tiny_config):
    looped = yaml.safe_load("a: &a [1, *a]")["a"]
    tiny_config["train"]["init_from"] = looped
    assert_one_clear_line(config_error(tiny_config), "config key 'train.init_from'",
                          "refers to itself")


def test_aliases_that_stay_small_are_fine(tiny_config):
    shared = {"residual": True}
    tiny_config["models"]["dn"]["model"] = shared
    tiny_config["models"]["seg"]["model"] = shared  # the same dict twice, as an alias gives
    validate_config(tiny_config)


# --- data and settings, on real small stores ------------------------------------------------
def write_zarr(path, data, axes=("c", "y", "x"), scale=None) -> str:
    write_image(path, data, list(axes), scale=scale)
    return str(path)


@pytest.fixture
def pair(tmp_path) -> dict[str, str]:
    """A 128x128 one-channel image, its labels and a regression target."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 128, 128), dtype=np.float32)
    labels = (image > 0.5).astype(np.uint8)
    return {"image": write_zarr(tmp_path / "image.ome.zarr", image),
            "target": write_zarr(tmp_path / "labels.ome.zarr", labels),
            "clean": write_zarr(tmp_path / "clean.ome.zarr", image),
            "root": str(tmp_path)}


def configure(pair: dict, task: str = "segmentation", **sections) -> dict:
    target = pair["target"] if task == "segmentation" else pair["clean"]
    config = {"datasets": {"tr": {"image": pair["image"], "target": target},
                           "te": {"image": pair["image"], "target": target}},
              "models": {"m": {"task": task, "train_on": ["tr"], "predict_on": ["te"]}},
              "patches": {"shape": [32, 32], "per_dataset": 8}, "model": dict(ARCH),
              "predict": {"tile_shape": [32, 32]}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return validate_config(config)


def test_the_good_pair_has_no_problem(pair):
    assert dataset_problems(configure(pair)) == []
    assert dataset_problems(configure(pair, "regression")) == []


def test_a_tile_larger_than_the_image_is_clamped_to_it():
    model = build_unet(ARCH, 2, 1, 2)
    plan = plan_tiles(["y", "x"], (256, 202), model, (65536, 65536))
    assert plan.tile == (256, 204)  # the image rounded up to 2**depth: one tile, 200 kB
    assert plan.grid == (1, 1)
    assert clamp_tiles((1024, 64), (100, 300), 16) == (112, 64)


def test_a_tile_larger_than_the_image_predicts_as_before(pair, tmp_path):
    config = configure(pair, predict={"tile_shape": [65536, 65536]})
    assert dataset_problems(config) == []  # clamped, not refused


def test_more_shards_than_tiles_are_refused(pair, tiny_config):
    config = configure(pair, predict={"shards": 1000})
    dag_problem(config, "config key 'predict.shards' (used by model 'm')", "1000 shards",
                "has 16 tile(s)", "use at most 16 shards")
    assert dataset_problems(configure(pair, predict={"shards": 16})) == []
    # whatever the data, the schema bounds it: no setting can plan millions of jobs
    tiny_config["predict"]["shards"] = 1000000
    assert_one_clear_line(config_error(tiny_config), "config key 'predict.shards'",
                          "use a value of at most 10000", "one shard per tile")


def test_pyramid_levels_beyond_the_image_are_refused(pair):
    dag_problem(configure(pair, predict={"pyramid_levels": 30}),
                "config key 'predict.pyramid_levels'", "128x128", "use at most 8")
    assert dataset_problems(configure(pair, predict={"pyramid_levels": 8})) == []


def test_a_sigma_wider_than_the_image_is_refused(pair):
    config = configure(pair, "regression", evaluate={"gaussian_sigmas": [1.0, 1e9]})
    dag_problem(config, "config key 'evaluate.gaussian_sigmas' (used by model 'm')",
                "sigma 1e+09 px reaches 4e+09 px (4 sigma)", "use sigmas up to 32")
    config["evaluate"]["baselines"] = ["tv", "nlm"]  # the Gaussian not tuned: not checked
    assert dataset_problems(config) == []
    config["evaluate"]["baselines"] = ["gaussian"]
    config["models"]["m"]["task"] = "segmentation"  # no Gaussian baseline: not used
    config["datasets"]["tr"]["target"] = config["datasets"]["te"]["target"] = pair["target"]
    assert dataset_problems(config) == []


def test_more_patches_than_the_image_holds_are_refused(pair):
    dag_problem(configure(pair, patches={"per_dataset": 10**9}),
                "config key 'patches.per_dataset' (used by model 'm')", "1,000,000,000 patches",
                "only 9,409 distinct patches", "ask for at most 9,409")
    dag_problem(configure(pair, patches={"per_megapixel": 1e9}),
                "config key 'patches.per_megapixel'", "ask for at most 9,409")


def test_a_target_with_another_pixel_size_is_refused(pair, tmp_path):
    labels = np.zeros((1, 128, 128), np.uint8)
    coarse = write_zarr(tmp_path / "coarse.ome.zarr", labels, scale={"y": 10.0, "x": 10.0})
    config = configure(pair)
    config["datasets"]["tr"]["target"] = coarse
    dag_problem(config, "config key 'datasets.tr.target'", "pixel size y 10 x x 10",
                "has y 1 x x 1", "same shape, different scale")
    close = write_zarr(tmp_path / "close.ome.zarr", labels, scale={"y": 1.0005, "x": 1.0})
    config["datasets"]["tr"]["target"] = close  # within the 1e-3 tolerance
    assert dataset_problems(config) == []


def test_time_points_in_training_or_evaluated_data_are_refused(pair, tmp_path):
    movie = np.zeros((3, 1, 128, 128), np.float32)
    timed = write_zarr(tmp_path / "movie.ome.zarr", movie, ("t", "c", "y", "x"))
    labels = write_zarr(tmp_path / "movie_labels.ome.zarr", movie.astype(np.uint8),
                        ("t", "c", "y", "x"))
    config = configure(pair)
    config["datasets"]["tr"].update(image=timed, target=labels)
    dag_problem(config, "config key 'datasets.tr.image'", "3 time points",
                "model 'm' trains on dataset 'tr'", "write each time point as its own image")
    config = configure(pair)
    config["datasets"]["te"].update(image=timed, target=labels)
    dag_problem(config, "model 'm' is evaluated on dataset 'te'",
                "or predict on it without a target")
    config["datasets"]["te"]["target"] = None  # prediction alone runs per time point
    assert dataset_problems(config) == []


def test_labels_whose_dtype_cannot_hold_the_classes_are_refused(pair):
    dag_problem(configure(pair, model={"num_classes": 300}),
                "config key 'datasets.tr.target'", "dtype uint8, which holds labels up to 255",
                "300 classes")


def test_datasets_with_different_channel_counts_are_refused(pair, tmp_path):
    two = write_zarr(tmp_path / "two.ome.zarr", np.zeros((2, 128, 128), np.float32))
    config = configure(pair)
    config["datasets"]["te"]["image"] = two
    dag_problem(config, "model 'm' reads 1 channel(s) from dataset 'tr'", "but 2 from dataset "
                "'te'", "datasets.<name>.channels")
    config["datasets"]["te"]["channels"] = [0]  # selecting one channel agrees again
    assert dataset_problems(config) == []


def test_regression_targets_with_different_channel_counts_are_refused(pair, tmp_path):
    two = write_zarr(tmp_path / "two.ome.zarr", np.zeros((2, 128, 128), np.float32))
    config = configure(pair, "regression")
    config["datasets"]["te"]["target"] = two
    dag_problem(config, "regression model 'm'", "has 1 channel(s)", "has 2",
                "give targets with the same channels")


def save_ckpt(path, task: str, in_channels: int = 1, out_channels: int = 2, **arch) -> str:
    network = build_unet({**ARCH, **arch}, 2, in_channels, out_channels)
    normalization = {"method": "percentile", "clip": False, "datasets": {}}
    save_checkpoint(path, new_checkpoint(network, task, normalization))
    return str(path)


def test_init_from_a_checkpoint_of_another_task_or_network_is_refused(pair, tmp_path):
    good = save_ckpt(tmp_path / "good.pt", "segmentation")
    assert dataset_problems(configure(pair, train={"init_from": good})) == []
    regression = save_ckpt(tmp_path / "reg.pt", "regression", out_channels=1)
    dag_problem(configure(pair, train={"init_from": regression}),
                "config key 'train.init_from' (used by model 'm')", "holds a regression model",
                "model 'm' is a segmentation model")
    deeper = save_ckpt(tmp_path / "deep.pt", "segmentation", in_channels=3, depth=3)
    dag_problem(configure(pair, train={"init_from": deeper}), "differs from model 'm'",
                "depth 3 (the model: 2)", "in_channels 3 (the model: 1)",
                "fine-tuning needs the same architecture")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    dag_problem(configure(pair, train={"init_from": str(junk)}),
                "config key 'train.init_from'", str(junk))


def test_encoder_transfer_plans_from_another_task_and_refuses_another_encoder(pair, tmp_path):
    """train.init_encoder_only: a denoiser (1 output) starts a 2-class segmentation model;
    a checkpoint with another encoder, or a model of this config with other encoder
    settings, is refused when Snakemake plans (before that model is trained)."""
    regression = save_ckpt(tmp_path / "reg.pt", "regression", out_channels=1,
                           upsample="interpolate", residual=True)
    transfer = {"init_from": regression, "init_encoder_only": True}
    assert dataset_problems(configure(pair, train=transfer)) == []
    wider = save_ckpt(tmp_path / "wide.pt", "regression", out_channels=1, base_features=8)
    dag_problem(configure(pair, train={**transfer, "init_from": wider}),
                "the encoder of checkpoint", "base_features 8 (the model: 4)",
                "train.init_encoder_only needs the same encoder")
    config = configure(pair)
    config["datasets"]["dn"] = {"image": pair["image"], "target": pair["clean"]}
    config["models"]["pre"] = {"task": "regression", "train_on": ["dn"],
                               "model": {"depth": 3}}
    config["models"]["m"]["train"] = {"init_from": "results/pre/checkpoint_best.pt",
                                      "init_encoder_only": True}
    dag_problem(validate_config(config), "model 'pre', whose encoder model 'm' starts from",
                "depth 3 (the model: 2)")


def test_planning_imports_no_torch_without_init_from(pair):
    """Metadata checks stay cheap: torch is imported only to read an init_from checkpoint."""
    text = json.dumps(json.dumps(configure(pair)))
    code = ("import sys, json; from unetflow.checks import dataset_problems; "
            "from unetflow.config import validate_config; "
            f"assert dataset_problems(validate_config(json.loads({text}))) == []; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pair["root"])


def test_snakemake_names_the_problems_before_any_job(pair, tmp_path):
    """A real `snakemake -n`: impossible settings and an alias bomb stop it in seconds, with
    one line each, before any job is planned."""
    config = configure(pair, predict={"shards": 1000, "pyramid_levels": 30})
    write_config(tmp_path, {k: config[k] for k in ("datasets", "models", "patches", "model",
                                                   "predict")})
    result = snakemake(tmp_path, "-n", "--configfile", "config.yaml", check=False)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "invalid data:" in out and "Job stats" not in out, out
    assert "'predict.shards' (used by model 'm'): 1000 shards" in out, out
    assert "'predict.pyramid_levels' (used by model 'm'): 30 levels" in out, out
    bomb = yaml.safe_dump(TINY_CONFIG, sort_keys=False).replace(
        "train:\n", f"train:\n  init_from: {alias_bomb()}\n", 1)
    (tmp_path / "bomb.yaml").write_text(bomb)
    start = time.perf_counter()
    result = snakemake(tmp_path, "-n", "--configfile", "bomb.yaml", check=False, timeout=60)
    assert time.perf_counter() - start < 30
    assert result.returncode == 1
    assert ("invalid configuration: config key 'train.init_from': the value expands to "
            in result.stdout + result.stderr)


def test_labels_outside_the_classes_fail_extract_patches_in_one_line(tmp_path):
    """Values are not metadata: the first stage reading the labels refuses them, before
    training, naming the dataset."""
    rng = np.random.default_rng(1)
    image = write_zarr(tmp_path / "image.ome.zarr", rng.random((1, 96, 96), dtype=np.float32))
    labels = rng.integers(0, 3, (1, 96, 96)).astype(np.int16)
    labels[0, ::7, ::5] = -1
    labels[0, 3, 3] = 5
    target = write_zarr(tmp_path / "labels.ome.zarr", labels)
    stats = tmp_path / "image.json"
    write_stats(compute_dataset_stats(image, None, STATS_SETTINGS, "d"), stats)
    datasets = [{"name": "d", "image": image, "target": target, "stats": str(stats),
                 "channels": None}]
    patches = {**validate_config({"datasets": {"d": {"image": image, "target": target}},
                                  "models": {"m": {"task": "segmentation", "train_on": ["d"]}},
                                  "patches": {"shape": [32, 32], "per_dataset": 8},
                                  "model": dict(ARCH)})["patches"]}
    result = run_cli("extract-patches", "--datasets", json.dumps(datasets), "--task",
                     "segmentation", "--settings", json.dumps(patches),
                     "--normalize", json.dumps({"method": "percentile", "clip": False}),
                     "--num-classes", "3", "--store", str(tmp_path / "patches.zarr"),
                     "--manifest", str(tmp_path / "manifest.tsv"))
    assert_cli_error(result, "extract-patches", "the target of dataset 'd' holds labels -1",
                     "outside 0-2 (model.num_classes: 3)", "train.ignore_label")
    assert_no_patches(tmp_path)
