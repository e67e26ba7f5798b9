"""Bad plates and collections fail at planning with one line naming the dataset's config key.

Each case goes through `dataset_problems` (what common.smk calls before any job) on real
stores; one real `snakemake -n` sees them all at once and leaves nothing behind.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONFIG, snakemake, write_config
from unetflow.checks import dataset_problems
from unetflow.config import ConfigError, validate_config
from unetflow.ome import write_image
from unetflow.plates import clean_plate_path, write_demo_plate


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> Path:
    """A good plate, a plate whose field B02_1 has two channels, one whose field A01_1 lost
    its labels, a twin plate without well B03, and a plain image."""
    root = tmp_path_factory.mktemp("bad_plates")
    write_demo_plate(root / "good.ome.zarr", rows=2, columns=3, fields=2, shape=(64, 64))
    shutil.copytree(root / "good.ome.zarr", root / "channels.ome.zarr")
    field = root / "channels.ome.zarr/B/2/1"
    shutil.rmtree(field)
    write_image(field, np.zeros((2, 64, 64), np.float32), ["c", "y", "x"], pyramid_levels=1,
                chunks=(1, 64, 64))
    shutil.copytree(root / "good.ome.zarr", root / "labels.ome.zarr")
    shutil.rmtree(root / "labels.ome.zarr/A/1/1/labels/nuclei")
    write_demo_plate(root / "twin.ome.zarr", rows=2, columns=2, fields=2, shape=(64, 64),
                     labels=False, clean=False)
    write_image(root / "image.ome.zarr", np.zeros((1, 64, 64), np.float32), ["c", "y", "x"],
                pyramid_levels=1, chunks=(1, 64, 64))
    return root


CASES = {
    "an image, not a plate": (
        {"plate": "image.ome.zarr"},
        "image.ome.zarr: an OME-Zarr image, not an HCS plate"),
    "a well that does not exist": (
        {"plate": "good.ome.zarr", "wells": ["B03", "H12"]},
        "well H12 does not exist; the plate has 6 wells"),
    "a field that does not exist": (
        {"plate": "good.ome.zarr", "fields": [0, 2]},
        "field 2 does not exist; the well has 2 field(s), 0-1"),
    "positions whose channels differ": (
        {"plate": "channels.ome.zarr"},
        "position B02_1 has channels 2 channel(s)"),
    "a glob that matches nothing": (
        {"collection": "nowhere/*.ome.zarr"},
        "nowhere/*.ome.zarr: the glob matches nothing"),
    "a target plate missing positions": (
        {"plate": "good.ome.zarr", "target": "twin.ome.zarr"},
        "twin.ome.zarr: the target plate has no position A03_0, A03_1, B03_0, B03_1 (of 12)"),
    "a labels name missing in some field": (
        {"plate": "labels.ome.zarr", "labels": "nuclei"},
        "field A01_1 has no label image 'nuclei' (labels/nuclei)"),
}


def config_with(dataset: dict) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    config["datasets"]["screen"] = dataset
    config["models"]["seg"]["predict_on"].append("screen")
    return config


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_plate_is_one_line_naming_the_dataset(plates, monkeypatch, case):
    monkeypatch.chdir(plates)
    dataset, expected = CASES[case]
    produced = {str(Path(p)) for d in TINY_CONFIG["datasets"].values() for p in
                (d["image"], d["target"])}
    problems = dataset_problems(validate_config(config_with(dataset)), produced)
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    assert problems[0].startswith("dataset 'screen' (datasets.screen): "), problems[0]
    assert expected in problems[0], problems[0]


@pytest.mark.parametrize(("dataset", "key", "fragment"), [
    ({"plate": "p", "image": "i"}, "datasets.screen", "exactly one of image, plate or collection"),
    ({"image": "i", "wells": ["B03"]}, "datasets.screen.wells", "but dataset 'screen' is a image"),
    ({"collection": "c/*", "fields": [0]}, "datasets.screen.fields", "is a collection"),
    ({"image": "i", "labels": "nuclei"}, "datasets.screen.labels", "only plates and collections"),
    ({"plate": "p", "labels": "n", "target": "t"}, "datasets.screen.labels", "not both"),
])
def test_config_words_of_plates_are_checked(dataset, key, fragment):
    with pytest.raises(ConfigError) as err:
        validate_config(config_with(dataset))
    assert f"config key '{key}'" in str(err.value) and fragment in str(err.value), err.value


def test_validation_by_well_needs_plates():
    config = copy.deepcopy(TINY_CONFIG)
    config["patches"]["validation"] = "well"
    with pytest.raises(ConfigError, match=r"'patches.validation' \(used by model 'seg'\): "
                                          r"'well' holds out whole wells, but dataset 'tr_seg' "
                                          r"is an image"):
        validate_config(config)


def test_snakemake_reports_every_bad_plate_before_any_job(plates, tmp_path):
    config = copy.deepcopy(TINY_CONFIG)
    for i, name in enumerate(sorted(CASES)):
        dataset = dict(CASES[name][0])
        for key in ("plate", "target"):
            if key in dataset:
                dataset[key] = str(plates / dataset[key])
        config["datasets"][f"bad{i}"] = dataset
        config["models"]["seg"]["predict_on"].append(f"bad{i}")
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", "config.yaml",
                       check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for i, name in enumerate(sorted(CASES)):
        assert f"dataset 'bad{i}' (datasets.bad{i}): " in output, (name, output[-3000:])
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()
    assert clean_plate_path("x.ome.zarr") == "x_clean.ome.zarr"
