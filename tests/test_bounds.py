"""Settings bounded by the data (issue 16, item 1, its gaps): images that rules make (demo
data, TIFF conversions) are checked at planning from their settings and metadata; halos,
batches, histogram bins and the other counts are bounded with a reason; the jobs keep
backstops for what planning cannot see (sigmas in tune-baseline, shards in predict create,
negative labels in extract-patches).

Each case runs what common.smk or the job runs, on real small stores.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tifffile

from conftest import REPO, run_cli, snakemake
from test_bad_input import (
    ARCH,
    STATS_SETTINGS,
    assert_cli_error,
    assert_no_patches,
    assert_one_clear_line,
    config_error,
    dag_problem,
)
from test_planning import configure, pair, write_zarr  # noqa: F401 (pair is a fixture)
from unetflow.checks import dataset_problems, planned_images
from unetflow.config import validate_config
from unetflow.convert import convert_tiff, planned_conversion, use_converted_tiffs
from unetflow.demo_store import planned_demo_images, write_demo_data
from unetflow.model.unet import build_unet
from unetflow.normalize import compute_dataset_stats, write_stats
from unetflow.ome import open_image
from unetflow.predict import check_shard_count
from unetflow.tiling import plan_tiles


def _same(planned, real) -> None:
    assert planned.axes == real.axes
    assert planned.data.shape == real.data.shape
    assert planned.data.dtype == real.data.dtype
    assert np.allclose(planned.scale, real.scale)
    assert planned.channel_names == real.channel_names


# --- images rules make, described at planning ------------------------------------------------
def test_planned_demo_images_match_what_demo_data_writes(tmp_path):
    settings = {"seed": 1, "shape_2d": [48, 40], "shape_3d": [33, 32, 36],
                "pixel_size_um": 0.5, "z_step_um": 2.0}
    write_demo_data(tmp_path, settings)
    planned = planned_demo_images(tmp_path, settings)
    assert len(planned) == 9
    for path, description in planned.items():
        for level in range(description.levels):
            _same(description.at_level(level), open_image(path, level=level))
        with pytest.raises(ValueError, match="level 2 does not exist"):
            description.at_level(2)


def test_planned_tiff_conversions_match_what_convert_writes(tmp_path):
    tiff = tmp_path / "stack.tif"
    tifffile.imwrite(tiff, np.zeros((3, 1100, 700), np.uint16), imagej=True,
                     metadata={"axes": "ZYX", "spacing": 2.0}, resolution=(2.0, 2.0))
    convert_tiff(tiff, tmp_path / "out.ome.zarr")
    planned = planned_conversion(tiff, str(tmp_path / "out.ome.zarr"))
    assert planned.levels == 2
    for level in range(planned.levels):
        _same(planned.at_level(level), open_image(tmp_path / "out.ome.zarr", level=level))
    labels = tmp_path / "labels.tif"
    tifffile.imwrite(labels, np.zeros((600, 700), np.int32))
    convert_tiff(labels, tmp_path / "labels.ome.zarr", role="target")
    planned = planned_conversion(labels, str(tmp_path / "labels.ome.zarr"), role="target")
    assert planned.levels == 1
    _same(planned.at_level(0), open_image(tmp_path / "labels.ome.zarr"))


def test_settings_against_the_demo_data_are_checked_before_it_exists(tiny_config, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/demo here: rule demo_data would make it
    tiny_config["predict"]["shards"] = 50
    config = validate_config(tiny_config)
    planned = planned_images(config, "data/demo", {})
    problems = dataset_problems(config, set(planned), planned=planned)
    assert len(problems) == 2, problems  # both models predict on a 192x192 demo image
    assert_one_clear_line(problems[0], "config key 'predict.shards' (used by model 'seg')",
                          "50 shards", "data/demo/test_2d/image.ome.zarr, 192x192",
                          "has 9 tile(s)", "use at most 9 shards")
    config["predict"]["shards"] = 9
    assert dataset_problems(config, set(planned), planned=planned) == []


def test_settings_against_a_tiff_are_checked_before_its_conversion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tifffile.imwrite("image.tif", np.zeros((96, 80), np.float32))
    tifffile.imwrite("labels.tif", np.zeros((96, 80), np.uint8))
    config = validate_config({
        "datasets": {"d": {"image": "image.tif", "target": "labels.tif"}},
        "models": {"m": {"task": "segmentation", "train_on": ["d"], "predict_on": ["d"]}},
        "patches": {"shape": [32, 32], "per_dataset": 8}, "model": dict(ARCH),
        "predict": {"tile_shape": [32, 32], "pyramid_levels": 20}})
    sources = use_converted_tiffs(config["datasets"], "results/converted")
    planned = planned_images(config, "data/demo", sources)
    problems = dataset_problems(config, set(planned), planned=planned)
    assert len(problems) == 1, problems
    assert_one_clear_line(problems[0], "config key 'predict.pyramid_levels'",
                          "results/converted/d/image.ome.zarr, 96x80", "use at most 7")


def test_snakemake_plans_the_demo_config_with_huge_shards_in_seconds(tmp_path):
    """What `predict.shards: 1000000` on the demo config did: minutes and GBs building the
    DAG. Now the schema refuses it, and a count the schema allows but the demo image does
    not is refused from the demo settings, before any job."""
    config = (REPO / "config" / "config.yaml").read_text()
    for shards, expected in ((1000000, "invalid configuration: config key 'predict.shards': "
                                        "1000000 is too large; use a value of at most 10000"),
                             (5000, "5000 shards but the largest image model 'nuclei_seg'")):
        (tmp_path / "cfg.yaml").write_text(config.replace("predict:\n",
                                                          f"predict:\n  shards: {shards}\n"))
        start = time.perf_counter()
        result = snakemake(tmp_path, "-n", "--configfile", "cfg.yaml", check=False,
                           timeout=120)
        assert time.perf_counter() - start < 60
        out = result.stdout + result.stderr
        assert result.returncode == 1 and expected in out, out
        assert "Job stats" not in out, out


# --- halo, batches, counts --------------------------------------------------------------------
def test_a_halo_wider_than_the_image_is_refused(pair):  # noqa: F811
    dag_problem(configure(pair, predict={"halo": 1 << 20}),
                "config key 'predict.halo' (used by model 'm')", "1048576 px per side",
                "128x128", "use at most 128", "leave predict.halo unset")
    assert dataset_problems(configure(pair, predict={"halo": 128})) == []
    model = build_unet(ARCH, 2, 1, 2)
    with pytest.raises(ValueError) as err:
        plan_tiles(["y", "x"], (100, 60), model, (32, 32), halo=1 << 20)
    assert_one_clear_line(str(err.value), "predict.halo 1048576 is wider than the image",
                          "use at most 100")
    assert plan_tiles(["y", "x"], (20, 20), model, (32, 32)).halo > 20  # exact: never refused


def test_batches_larger_than_the_data_are_refused(pair):  # noqa: F811
    dag_problem(configure(pair, predict={"batch_size": 1000}),
                "config key 'predict.batch_size' (used by model 'm')",
                "1000 tiles per forward pass", "has 16 tile(s)", "use at most 16")
    dag_problem(configure(pair, train={"batch_size": 1000}),
                "config key 'train.batch_size' (used by model 'm')", "1,000 patches per batch",
                "extracts only 8 patches", "use at most 8")
    assert dataset_problems(configure(pair, train={"batch_size": 8},
                                      predict={"batch_size": 16})) == []


@pytest.mark.parametrize("section, key, value, fragment", [
    ("normalize", "histogram_bins", 10**9, "8 bytes per channel"),
    ("patches", "max_attempts", 10**9, "if 10000 draws find no usable patch"),
    ("evaluate", "tuning_crops", 10**9, "held in memory together"),
])
def test_counts_that_only_cost_memory_or_time_are_bounded(tiny_config, section, key, value,
                                                          fragment):
    tiny_config.setdefault(section, {})[key] = value
    assert_one_clear_line(config_error(tiny_config), f"config key '{section}.{key}'",
                          "is too large; use a value of at most", fragment)


def test_sizes_the_code_clips_to_the_image_are_accepted(pair):  # noqa: F811
    """block_pixels, tuning_crop_size, montage_crop_size and positions_per_job are clipped
    to the image (or the dataset) where they are used: large values are not refused."""
    config = configure(pair, evaluate={"block_pixels": 10**12, "tuning_crop_size": 10**6,
                                       "montage_crop_size": 10**6},
                       predict={"positions_per_job": 10**6})
    assert dataset_problems(config) == []


# --- backstops in the jobs --------------------------------------------------------------------
def test_tune_baseline_refuses_a_sigma_wider_than_the_image(pair, tmp_path):  # noqa: F811
    datasets = [{"name": "tr", "image": pair["image"], "target": pair["clean"],
                 "channels": None}]
    result = run_cli("tune-baseline", "--datasets", json.dumps(datasets), "--settings",
                     json.dumps({"gaussian_sigmas": [1.0, 1e9]}), "--output",
                     str(tmp_path / "baseline.json"))
    assert_cli_error(result, "tune-baseline", "config key 'evaluate.gaussian_sigmas'",
                     "sigma 1e+09 px reaches 4e+09 px", "dataset 'tr'", pair["image"],
                     "use sigmas up to 32")
    assert not (tmp_path / "baseline.json").exists()


def test_predict_create_refuses_a_shard_count_no_plan_needs():
    with pytest.raises(ValueError) as err:
        check_shard_count(1000000, 16, "image.ome.zarr")
    assert_one_clear_line(str(err.value), "predict.shards 1000000", "image.ome.zarr has 16 "
                          "tile(s)", "use at most 16 shards")
    check_shard_count(16, 4, "small.ome.zarr")  # a small image of a model: empty shards


def test_negative_labels_fail_extract_patches_with_two_classes(tmp_path):
    rng = np.random.default_rng(2)
    image = write_zarr(tmp_path / "image.ome.zarr", rng.random((1, 96, 96), dtype=np.float32))
    labels = rng.integers(0, 3, (1, 96, 96)).astype(np.int16)
    labels[0, ::3, ::2] = -1
    target = write_zarr(tmp_path / "labels.ome.zarr", labels)
    stats = tmp_path / "image.json"
    write_stats(compute_dataset_stats(image, None, STATS_SETTINGS, "d"), stats)
    datasets = [{"name": "d", "image": image, "target": target, "stats": str(stats),
                 "channels": None}]
    patches = validate_config({"datasets": {"d": {"image": image, "target": target}},
                               "models": {"m": {"task": "segmentation", "train_on": ["d"]}},
                               "patches": {"shape": [32, 32], "per_dataset": 8},
                               "model": dict(ARCH)})["patches"]

    def extract(*extra):
        return run_cli("extract-patches", "--datasets", json.dumps(datasets), "--task",
                       "segmentation", "--settings", json.dumps(patches), "--normalize",
                       json.dumps({"method": "percentile", "clip": False}),
                       "--num-classes", "2", "--store", str(tmp_path / "patches.zarr"),
                       "--manifest", str(tmp_path / "manifest.tsv"), *extra)

    assert_cli_error(extract(), "extract-patches", "the target of dataset 'd' holds negative "
                     "labels -1", "set train.ignore_label")
    assert_no_patches(tmp_path)
    assert extract("--ignore-label", "-1").returncode == 0
