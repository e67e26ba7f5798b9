"""Evaluating plates and collections per position, per well and per dataset, on real stores:
a demo plate, "predictions" written in predict's layout (the target itself: a perfect
score; a corrupted copy: a lower one), batch tables joined into the dataset's metrics."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import zarr

from conftest import run_cli
from unetflow.evaluate import (
    evaluate_prediction,
    read_channels_first,
    read_metrics,
    read_summary,
    write_summary,
)
from unetflow.evaluate_positions import (
    aggregate_positions,
    evaluate_positions,
    position_provenance,
    read_position_table,
)
from unetflow.ome import write_image, write_label_image
from unetflow.plates import (
    clean_plate_path,
    dataset_positions,
    position_batches,
    position_output_path,
    read_positions,
    write_demo_plate,
    write_positions,
)

SETTINGS = {"ignore_label": None, "iou_threshold": 0.5}
PREDICT = {"level": 0, "instances": True, "probabilities": False, "output_units": "input"}


def recorded(task: str) -> dict:
    """What predict records of its checkpoint (checked by every later stage)."""
    return {"task": task, "checkpoint_sha256": "0" * 64}
CORRUPTED = "A02_1"


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """A 2 x 3 plate with 2 fields per well, labels/nuclei in each field, a clean twin."""
    root = tmp_path_factory.mktemp("plate")
    path = root / "plate.ome.zarr"
    write_demo_plate(path, rows=2, columns=3, fields=2, shape=(64, 64))
    return path


def positions_file(tmp_path, name, spec):
    path = tmp_path / "positions" / f"{name}.json"
    write_positions(dataset_positions(name, spec), path)
    return read_positions(path), str(path)


def corrupt(labels: np.ndarray) -> np.ndarray:
    """The top half of the field predicted as background: a lower IoU, a known one."""
    out = labels.copy()
    out[: labels.shape[0] // 2] = 0
    return out


def write_segmentations(positions, root, corrupted=()):
    """Each position's target as its prediction, in predict's layout; `corrupted` keys get
    `corrupt(target)` instead."""
    for position in positions.positions:
        labels = read_channels_first(position.target)[0].astype(np.uint32)
        if position.key in corrupted:
            labels = corrupt(labels)
        out = position_output_path(root, positions.kind, position)
        write_image(out, labels[None], ["c", "y", "x"],
                    attrs={"predict": PREDICT, **recorded("segmentation")})
        write_label_image(out, "prediction", labels, ["y", "x"])


@pytest.fixture
def segmentation(plate, tmp_path):
    positions, path = positions_file(tmp_path, "screen", {"plate": str(plate),
                                                          "labels": "nuclei"})
    root = str(tmp_path / "predictions" / "m" / "screen.ome.zarr")
    write_segmentations(positions, root, corrupted={CORRUPTED})
    return positions, path, root


def batch_tables(positions, root, tmp_path, per_job=5, task="segmentation", baseline=None):
    tables = []
    for i, keys in enumerate(position_batches(positions.keys, per_job)):
        out = str(tmp_path / "batches" / f"{i}.tsv")
        evaluate_positions(positions, keys, root, task, SETTINGS, 2, None, "m",
                           positions.dataset, out, baseline=baseline)
        tables.append(out)
    return tables


def aggregate(positions, tables, tmp_path, task="segmentation"):
    out = tmp_path / "metrics"
    record = aggregate_positions(positions, tables, task, "m", positions.dataset,
                                 str(out / f"{positions.dataset}.json"), str(out / "positions.tsv"),
                                 str(out / "wells.tsv"), str(out / "platemap.png"))
    return record, out


def test_perfect_predictions_score_one_per_position(plate, tmp_path):
    positions, _, = positions_file(tmp_path, "screen", {"plate": str(plate),
                                                        "labels": "nuclei"})
    root = str(tmp_path / "pred")
    write_segmentations(positions, root)
    rows = evaluate_positions(positions, None, root, "segmentation", SETTINGS, 2, None, "m",
                              "screen", str(tmp_path / "batch.tsv"))
    assert [r["position"] for r in rows] == positions.keys and len(rows) == 12
    assert all(r["unet.foreground_iou"] == 1.0 and r["unet.f1"] == 1.0 for r in rows)
    assert all(r["unet.fp"] == r["unet.fn"] == 0 for r in rows)
    assert all("otsu.foreground_iou" in r for r in rows)
    table = read_position_table(tmp_path / "batch.tsv")
    assert [r["unet.foreground_iou"] for r in table] == [1.0] * 12
    assert table[0]["well"] == "A01" and table[0]["row"] == "A" and table[0]["field"] == "0"


def test_a_position_scores_as_the_single_image_evaluate_scores_it(segmentation, tmp_path):
    """The oracle: evaluate_prediction on the same prediction, image and target."""
    positions, _, root = segmentation
    position = positions.by_key(CORRUPTED)
    prediction = position_output_path(root, "plate", position)
    single = evaluate_prediction(prediction, position.image, position.target, "segmentation",
                                 SETTINGS, 2, None, "m", "screen", str(tmp_path / "one.json"))
    [row] = evaluate_positions(positions, [CORRUPTED], root, "segmentation", SETTINGS, 2,
                               None, "m", "screen", str(tmp_path / "batch.tsv"))
    for method, scores in single["scores"].items():
        for name, value in scores.items():
            if not isinstance(value, dict):
                assert row[f"{method}.{name}"] == value, (method, name)
    assert row["unet.tp"] == single["scores"]["unet"]["instance_matching"]["tp"]
    assert 0 < row["unet.foreground_iou"] < 1


def test_a_corrupted_position_lowers_only_its_row_and_its_well(segmentation, tmp_path):
    positions, _, root = segmentation
    _, out = aggregate(positions, batch_tables(positions, root, tmp_path), tmp_path)
    rows = read_position_table(out / "positions.tsv")
    assert [r["position"] for r in rows] == positions.keys  # plate order, all batches
    low = {r["position"] for r in rows if r["unet.foreground_iou"] < 1.0}
    assert low == {CORRUPTED}
    with open(out / "wells.tsv", newline="") as fh:
        wells = list(csv.DictReader(fh, delimiter="\t"))
    assert [w["well"] for w in wells] == ["A01", "A02", "A03", "B01", "B02", "B03"]
    assert all(w["positions"] == "2" for w in wells)
    assert {w["well"] for w in wells if float(w["unet.foreground_iou"]) < 1.0} == {"A02"}


def test_well_values_are_the_mean_of_their_positions(segmentation, tmp_path):
    positions, _, root = segmentation
    _, out = aggregate(positions, batch_tables(positions, root, tmp_path), tmp_path)
    rows = read_position_table(out / "positions.tsv")
    with open(out / "wells.tsv", newline="") as fh:
        wells = list(csv.DictReader(fh, delimiter="\t"))
    for well in wells:
        group = [r for r in rows if r["well"] == well["well"]]
        for column in ("unet.foreground_iou", "unet.mean_ap", "otsu.f1"):
            assert float(well[column]) == pytest.approx(np.mean([r[column] for r in group]))
        assert float(well["unet.tp"]) == sum(r["unet.tp"] for r in group)  # counts add up


def test_dataset_metrics_are_a_summary_row_per_model_and_dataset(segmentation, tmp_path):
    positions, _, root = segmentation
    record, out = aggregate(positions, batch_tables(positions, root, tmp_path), tmp_path)
    assert read_metrics(out / "screen.json")["scores"] == json.loads(
        (out / "screen.json").read_text())["scores"]
    assert record["positions"] == 12 and record["aggregate"] == "mean over positions"
    assert "aggregate" in record["definitions"]
    rows = read_position_table(out / "positions.tsv")
    # how the objects were made, said once for the dataset (every position's is the same)
    assert {r["objects"] for r in rows} == {record["objects"]}
    assert record["objects"].startswith("connected components of the predicted foreground")
    unet = record["scores"]["unet"]
    assert unet["foreground_iou"] == pytest.approx(np.mean([r["unet.foreground_iou"]
                                                            for r in rows]))
    assert unet["instance_matching"]["tp"] == sum(r["unet.tp"] for r in rows)
    assert 0 < unet["instance_matching"]["pooled_f1"] < 1
    summary = write_summary([str(out / "screen.json")], str(tmp_path / "summary.tsv"))
    assert [(r["model"], r["dataset"], r["method"]) for r in summary] == [
        ("m", "screen", "unet"), ("m", "screen", "otsu")]
    assert float(read_summary(str(tmp_path / "summary.tsv"))[0]["foreground_iou"]) < 1.0
    assert (out / "platemap.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_plate_map_has_the_plate_grid_with_unselected_wells_blank(plate, tmp_path):
    from matplotlib.image import imread

    spec = {"plate": str(plate), "labels": "nuclei", "wells": ["A01", "B03"], "fields": [0]}
    positions, _ = positions_file(tmp_path, "part", spec)
    root = str(tmp_path / "pred")
    write_segmentations(positions, root)
    _, out = aggregate(positions, batch_tables(positions, root, tmp_path), tmp_path)
    assert imread(out / "platemap.png").ndim == 3
    from unetflow.figures import write_plate_map

    with open(out / "wells.tsv", newline="") as fh:
        wells = list(csv.DictReader(fh, delimiter="\t"))
    values = {(w["row"], w["column"]): float(w["unet.foreground_iou"]) for w in wells}
    grid = write_plate_map(values, positions.plate["rows"], positions.plate["columns"],
                           "foreground_iou", "t", str(tmp_path / "again.png"))
    assert grid.shape == (2, 3)  # rows A, B x columns 1, 2, 3 of the source plate
    assert grid[0, 0] == grid[1, 2] == 1.0
    assert np.isnan(grid[0, 1:]).all() and np.isnan(grid[1, :2]).all()


def test_a_missing_position_is_an_error_and_nothing_is_written(segmentation, tmp_path):
    positions, _, root = segmentation
    tables = batch_tables(positions, root, tmp_path)
    with pytest.raises(ValueError, match=r"6 of 12 positions have no row .*: A01_0, A01_1"):
        aggregate(positions, tables[1:], tmp_path)
    assert not (tmp_path / "metrics").exists()
    with pytest.raises(ValueError, match="in two batch tables"):
        aggregate(positions, [*tables, tables[0]], tmp_path)
    assert not (tmp_path / "metrics").exists()


def test_regression_scores_the_model_input_and_gaussian_per_position(plate, tmp_path):
    positions, _ = positions_file(tmp_path, "dn", {"plate": str(plate),
                                                   "target": clean_plate_path(plate)})
    root = str(tmp_path / "pred")
    for position in positions.positions:
        source = position.image if position.key == CORRUPTED else position.target
        write_image(position_output_path(root, "plate", position), read_channels_first(source),
                    ["c", "y", "x"], attrs={"predict": PREDICT, **recorded("regression")})
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"baselines": {"gaussian": {"sigma": 1.0},
                                                  "tv": {"weight": 2.0}, "nlm": {"h": 1.0}},
                                    "noise_sd": [0.05]}))
    tables = batch_tables(positions, root, tmp_path, task="regression", baseline=str(baseline))
    record, out = aggregate(positions, tables, tmp_path, task="regression")
    rows = read_position_table(out / "positions.tsv")
    assert [r["position"] for r in rows if math.isfinite(r["unet.psnr"])] == [CORRUPTED]
    assert all(r["gaussian.sigma"] == 1.0 and r["tv.weight"] == 2.0 and r["nlm.h"] == 1.0
               and "input.psnr" in r and "nlm.psnr" in r for r in rows)
    assert record["scores"]["unet"]["psnr"] == math.inf  # the mean of 11 perfect and 1 not
    assert json.loads((out / "dn.json").read_text())["scores"]["unet"]["psnr"] == "inf"
    assert record["scores"]["unet"]["mae"] == pytest.approx(
        np.mean([r["unet.mae"] for r in rows]))
    summary = write_summary([str(out / "dn.json")], str(tmp_path / "summary.tsv"))
    assert [r["method"] for r in summary] == ["unet", "input", "gaussian(sigma=1)",
                                              "tv(weight=2)", "nlm(h=1)"]


def test_a_collection_gets_a_strip_of_its_images_and_no_wells(plate, tmp_path):
    folder = tmp_path / "images"
    for key in ("A01_0", "B02_1", "A03_0"):
        row, column, field = key[0], str(int(key[1:3])), key[-1]
        shutil.copytree(plate / row / column / field, folder / f"img_{key}.ome.zarr")
    positions, _ = positions_file(tmp_path, "coll", {"collection": f"{folder}/*.ome.zarr",
                                                     "labels": "nuclei"})
    root = str(tmp_path / "pred")
    write_segmentations(positions, root, corrupted={"img_B02_1"})
    record, out = aggregate(positions, batch_tables(positions, root, tmp_path), tmp_path)
    assert record["positions"] == 3 and record["kind"] == "collection"
    assert (out / "wells.tsv").read_text().startswith("dataset\twell\trow\tcolumn\tpositions\t")
    assert len((out / "wells.tsv").read_text().splitlines()) == 1
    assert (out / "platemap.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    rows = read_position_table(out / "positions.tsv")
    assert rows[0]["well"] == "" and rows[0]["field"] == ""


def test_the_command_line_runs_a_batch_and_joins_it(segmentation, tmp_path):
    positions, path, root = segmentation
    batch = str(tmp_path / "b.tsv")
    result = run_cli("evaluate-positions", "--positions", path, "--keys",
                     json.dumps(positions.keys), "--prediction", root, "--task",
                     "segmentation", "--settings", "{}", "--model", "m", "--dataset",
                     "screen", "--output", batch)
    assert result.returncode == 0, result.stderr
    assert f"screen {CORRUPTED}: unet.foreground_iou 0." in result.stdout
    assert "screen A01_0: unet.foreground_iou 1\n" in result.stdout
    out = tmp_path / "metrics"
    args = ["evaluate-dataset", "--positions", path, "--task", "segmentation", "--model",
            "m", "--dataset", "screen", "--output", str(out / "m.json"), "--table",
            str(out / "p.tsv"), "--wells", str(out / "w.tsv"), "--plate-map",
            str(out / "map.png")]
    result = run_cli(*args, batch)
    assert result.returncode == 0, result.stderr
    assert "(12 positions, mean over positions): unet:" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "map.png", "p.tsv", "w.tsv"]


@pytest.mark.parametrize("damage", ["truncated", "header", "number"])
def test_a_damaged_batch_table_is_one_line_naming_the_file(segmentation, tmp_path, damage):
    positions, path, root = segmentation
    [table] = batch_tables(positions, root, tmp_path, per_job=12)
    lines = open(table).read().splitlines()
    if damage == "truncated":
        lines[3] = "\t".join(lines[3].split("\t")[:5])
    elif damage == "header":
        lines[0] = "key" + lines[0][len("dataset"):]
    else:
        lines[2] = lines[2].replace("\t1.0\t", "\tone\t", 1)
    damaged = tmp_path / "damaged.tsv"
    damaged.write_text("\n".join(lines) + "\n")
    out = tmp_path / "metrics"
    result = run_cli("evaluate-dataset", "--positions", path, "--task", "segmentation",
                     "--model", "m", "--dataset", "screen", "--output", str(out / "m.json"),
                     "--table", str(out / "p.tsv"), "--wells", str(out / "w.tsv"),
                     str(damaged))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"unetflow evaluate-dataset: error: {damaged}: "), \
        result.stderr
    assert not out.exists()


def test_provenance_comes_from_the_field_or_else_the_output_plate(plate, tmp_path):
    """A field without its own record takes the output plate's; per-position statistics are
    narrowed to the position (what denormalizes a regression output)."""
    positions, _ = positions_file(tmp_path, "dn", {"plate": str(plate),
                                                   "target": clean_plate_path(plate)})
    root = tmp_path / "pred.ome.zarr"
    stats = {"per_position": True, "dataset": "dn",
             "positions": {k: {"channels": [{"name": k}]} for k in positions.keys}}
    zarr.open_group(str(root), mode="w").attrs["unetflow"] = {"predict": PREDICT,
                                                              "normalization": stats}
    first, second = positions.positions[:2]
    write_image(position_output_path(root, "plate", first), np.zeros((1, 8, 8), np.float32),
                ["c", "y", "x"])
    write_image(position_output_path(root, "plate", second), np.zeros((1, 8, 8), np.float32),
                ["c", "y", "x"], attrs={"predict": {**PREDICT, "level": 1}})
    inherited = position_provenance(str(root), "plate", first)
    assert inherited["predict"] == PREDICT
    assert inherited["normalization"]["channels"] == [{"name": first.key}]
    assert position_provenance(str(root), "plate", second)["predict"]["level"] == 1


def test_an_empty_batch_is_refused(segmentation, tmp_path):
    positions, _, root = segmentation
    with pytest.raises(ValueError, match="no positions to evaluate"):
        evaluate_positions(positions, [], root, "segmentation", SETTINGS, 2, None, "m",
                           "screen", str(tmp_path / "b.tsv"))
    assert not (tmp_path / "b.tsv").exists()
