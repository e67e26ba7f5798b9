"""The whole workflow on a small HCS plate and on a collection, with real Snakemake runs.

A 2 x 3-well plate (2 fields each, labels/nuclei in every field, a clean twin plate) is
written with ome-zarr-py. A segmentation model trains on row A (one well held out for
validation) and predicts two wells of row B in batches of 2 positions; the output plate must
validate as an NGFF HCS plate and open as one with ome-zarr-py. Then the cases users meet:
a dry run after completion plans nothing; adding a well predicts only the new positions; a
failed batch is the only one rerun; a smaller selection leaves a plate of just those wells.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import zarr

from conftest import TINY_CONFIG, planned_jobs, snakemake, write_config
from unetflow.plates import clean_plate_path, write_demo_plate

PLATE = "data/plate.ome.zarr"
INDEX = "results/seg/predictions/screen.index.json"
OUTPUT = "results/seg/predictions/screen.ome.zarr"


def plate_config(wells: list[str]) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    config.pop("demo")
    config["datasets"] = {
        "train": {"plate": PLATE, "wells": ["A01", "A02", "A03"], "labels": "nuclei"},
        "screen": {"plate": PLATE, "wells": wells, "labels": "nuclei",
                   "normalize": "position"},
    }
    config["models"] = {"seg": {"task": "segmentation", "train_on": ["train"],
                                "predict_on": ["screen"],
                                "patches": {"validation": "well"}}}
    config["predict"]["positions_per_job"] = 2
    return config


def run(workdir: Path, *args: str, check: bool = True):
    return snakemake(workdir, *args, "--cores", "2", "--configfile", "config.yaml",
                     check=check)


def records(workdir: Path) -> dict[str, dict]:
    folder = workdir / "results/seg/predictions/screen.batches"
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("batch_*.json"))}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("plate_run")
    write_demo_plate(workdir / PLATE, rows=2, columns=3, fields=2, shape=(64, 64), seed=2)
    write_config(workdir, plate_config(["B01", "B02"]))
    before = snapshot(workdir / "data")
    run(workdir)
    assert snapshot(workdir / "data") == before, "the workflow wrote into its input plates"
    return workdir


def test_the_output_plate_validates_and_opens_as_a_plate(plate_run: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.hcs import HCS

    output = plate_run / OUTPUT
    assert isinstance(open_ome_zarr(zarr.open_group(str(output), mode="r")), HCS)
    nodes = list(Reader(parse_url(str(output)))())
    assert any(isinstance(spec, Plate) for spec in nodes[0].specs)
    plate = zarr.open_group(str(output), mode="r").attrs["ome"]["plate"]
    assert sorted(w["path"] for w in plate["wells"]) == ["B/1", "B/2"]
    assert (output / "B/1/1/labels/prediction").is_dir()
    index = json.loads((plate_run / INDEX).read_text())
    assert sorted(index["positions"]) == ["B01_0", "B01_1", "B02_0", "B02_1"]


def test_tables_summary_and_plate_map(plate_run: Path) -> None:
    import csv

    metrics = plate_run / "results/seg/metrics"
    with open(metrics / "screen_positions.tsv") as fh:
        positions = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["position"] for r in positions] == ["B01_0", "B01_1", "B02_0", "B02_1"]
    with open(metrics / "screen_wells.tsv") as fh:
        assert [r["well"] for r in csv.DictReader(fh, delimiter="\t")] == ["B01", "B02"]
    with open(plate_run / "results/summary.tsv") as fh:
        summary = list(csv.DictReader(fh, delimiter="\t"))
    assert {(r["model"], r["dataset"]) for r in summary} == {("seg", "screen")}
    assert (plate_run / "results/seg/figures/screen_platemap.png").stat().st_size > 0


def test_held_out_well_has_no_training_patch(plate_run: Path) -> None:
    import csv

    with open(plate_run / "results/seg/patches_manifest.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    wells = {split: {r["position"].split("_")[0] for r in rows if r["split"] == split}
             for split in ("train", "val")}
    assert wells["val"] and wells["train"]
    assert not wells["val"] & wells["train"]


def test_a_finished_plate_plans_nothing(plate_run: Path) -> None:
    result = run(plate_run, "-n")
    assert not planned_jobs(result.stdout + result.stderr)


@pytest.fixture
def plate_copy(plate_run: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(plate_run, workdir, symlinks=True)
    return workdir


def test_adding_a_well_predicts_only_its_positions(plate_copy: Path) -> None:
    write_config(plate_copy, plate_config(["B01", "B02", "B03"]))
    run(plate_copy)
    predicted = sorted(k for r in records(plate_copy).values() for k in r["predicted"])
    kept = sorted(k for r in records(plate_copy).values() for k in r["kept"])
    assert predicted == ["B03_0", "B03_1"]
    assert kept == ["B01_0", "B01_1", "B02_0", "B02_1"]
    plate = zarr.open_group(str(plate_copy / OUTPUT), mode="r").attrs["ome"]["plate"]
    assert sorted(w["path"] for w in plate["wells"]) == ["B/1", "B/2", "B/3"]


def test_a_failed_batch_is_the_only_one_rerun(plate_copy: Path) -> None:
    """Batch 1 (B02) fails on a damaged chunk; after the repair only batch 1 runs again."""
    chunk = next(p for p in sorted((plate_copy / PLATE / "B/2/0/s0").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    good = chunk.read_bytes()
    for p in (plate_copy / OUTPUT / "B/2").glob("[0-9]*"):  # the well's fields
        shutil.rmtree(p)
    # what a batch that failed in the first run leaves: no record, no index after it
    (plate_copy / "results/seg/predictions/screen.batches/batch_1.json").unlink()
    (plate_copy / INDEX).unlink()
    chunk.write_bytes(b"not a zstd frame")
    failed = run(plate_copy, "--keep-going", check=False)
    assert failed.returncode != 0
    assert "Error in rule predict_positions" in failed.stdout + failed.stderr
    chunk.write_bytes(good)
    dry = run(plate_copy, "-n")
    jobs = planned_jobs(dry.stdout + dry.stderr)
    assert ("predict_positions", "model=seg, dataset=screen, batch=1") in jobs
    assert not any(rule == "predict_positions" and "batch=0" in w for rule, w in jobs)
    run(plate_copy)
    # B02_0 failed; B02_1 is kept when its worker wrote it (atomically) before the job ended
    record = records(plate_copy)["batch_1.json"]
    assert "B02_0" in record["predicted"]
    assert sorted(record["predicted"] + record["kept"]) == ["B02_0", "B02_1"]


def test_a_smaller_selection_leaves_only_its_wells(plate_copy: Path) -> None:
    write_config(plate_copy, plate_config(["B02"]))
    run(plate_copy)
    output = plate_copy / OUTPUT
    plate = zarr.open_group(str(output), mode="r").attrs["ome"]["plate"]
    assert [w["path"] for w in plate["wells"]] == ["B/2"]
    assert not (output / "B/1").exists() or not any((output / "B/1").iterdir())
    assert sorted(json.loads((plate_copy / INDEX).read_text())["positions"]) == [
        "B02_0", "B02_1"]


def test_a_collection_of_tiffs_gets_one_output_image_per_position(tmp_path: Path) -> None:
    """A glob of TIFF stacks (the fields of a demo plate saved as TIFF), with clean TIFFs as
    targets under a second glob of the same keys: converted in one job, predicted in batches,
    one output image per key."""
    import tifffile

    plate = tmp_path / "src.ome.zarr"
    write_demo_plate(plate, rows=1, columns=2, fields=2, shape=(64, 64), seed=4)
    clean = Path(clean_plate_path(plate))
    for folder in ("images/ctrl", "clean/ctrl"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for well in ("1", "2"):
        for field in ("0", "1"):
            name = f"ctrl/w{well}f{field}.tif"
            for src, folder in ((plate, "images"), (clean, "clean")):
                pixels = zarr.open_array(str(src / "A" / well / field / "s0"), mode="r")[0]
                tifffile.imwrite(tmp_path / "data" / folder / name, pixels)
    config = copy.deepcopy(TINY_CONFIG)
    config.pop("demo")
    config["datasets"] = {
        "cells": {"collection": "data/images/*/*.tif", "target": "data/clean/*/*.tif",
                  "axes": "yx"},
    }
    config["models"] = {"dn": {"task": "regression", "train_on": ["cells"],
                               "predict_on": ["cells"], "model": {"residual": True},
                               "patches": {"validation": "position"}}}
    config["predict"]["positions_per_job"] = 2
    write_config(tmp_path, config)
    run(tmp_path, "results/dn/metrics/cells.json", "results/dn/predictions/cells.index.json")
    index = json.loads((tmp_path / "results/dn/predictions/cells.index.json").read_text())
    keys = ["ctrl__w1f0", "ctrl__w1f1", "ctrl__w2f0", "ctrl__w2f1"]
    assert sorted(index["positions"]) == keys
    for key in keys:
        assert (tmp_path / f"results/dn/predictions/cells/{key}.ome.zarr/zarr.json").is_file()
        converted = tmp_path / f"results/converted_collections/cells/image/{key}.ome.zarr"
        assert (converted / "zarr.json").is_file()
    assert len(records_of(tmp_path / "results/dn/predictions/cells.batches")) == 2


def records_of(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("batch_*.json"))]
