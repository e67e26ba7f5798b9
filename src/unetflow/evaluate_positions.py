"""Evaluating a dataset made of many positions (the fields of an HCS plate, the images of a
collection): per position, per well and for the whole dataset.

Each position is scored exactly as `evaluate.evaluate_prediction` scores one image
(`scoring.score_prediction`: the model, and Otsu or the input and the tuned Gaussian as
baselines), one position's arrays in memory at a time. A job evaluates a batch of positions
and writes one TSV row per position (`evaluate_positions`); `aggregate_positions` joins the
batches into:
- the dataset's metrics JSON, in the format of the single-image evaluate, so `unetflow
  summarize`, `verdicts` and `compare` keep one row per model and dataset. Each metric is
  the mean over positions (of those that have it: Pearson r is undefined on a constant
  image, instance metrics on a position whose target has one object or none); object counts
  (tp, fp, fn, true and predicted objects) and excluded pixels are summed, and precision,
  recall and F1 of the pooled counts are given beside the means;
- the per-position table (every batch, in the dataset's order: plate order, or key order
  for a collection) and a per-well table (the same aggregates per well, with the number of
  positions);
- a figure of the headline metric (the model's foreground IoU, or PSNR): a plate map for a
  plate, and for a collection a strip of its positions sorted by the score, since a
  collection has no layout to draw.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from unetflow.evaluate import (
    DEFINITIONS,
    check_provenance,
    prediction_provenance,
    read_baselines,
    write_json,
)
from unetflow.files import atomic_path, file_sha256
from unetflow.normalize import position_stats
from unetflow.plates import PositionSet, position_output_path
from unetflow.scoring import score_prediction

__all__ = [
    "HEADLINE_METRIC",
    "aggregate_positions",
    "evaluate_positions",
    "position_provenance",
    "read_position_table",
    "well_table",
]

PLACE_COLUMNS = ["dataset", "position", "well", "row", "column", "field"]
TEXT_COLUMNS = {*PLACE_COLUMNS, "prediction", "notes", "warnings", "objects"}
INFO_COLUMNS = {"segmentation": ["level", "ignore_label", "iou_threshold", "instance_target",
                                 "excluded_pixels"],
                "regression": ["level", "data_range"]}
COUNTS = ("tp", "fp", "fn", "true_objects", "predicted_objects")
SUMMED = {*COUNTS, "excluded_pixels"}
HEADLINE_METRIC = {"segmentation": "foreground_iou", "regression": "psnr"}
AGGREGATE = "mean over positions"
AGGREGATE_DEFINITION = (
    "each score is the mean over the dataset's positions of that position's score (positions "
    "where it is undefined left out: positions_scored counts them when fewer than all); "
    "instance_matching sums tp, fp, fn and object counts over positions, and its precision, "
    "recall and f1 are those of the pooled counts; excluded_pixels is summed")


# --- one batch ------------------------------------------------------------------------------
def position_provenance(prediction_root: str, kind: str, position: Any) -> dict[str, Any]:
    """What predict recorded for a position: the field's own attributes, else the output
    plate's; per-position normalization statistics narrowed to this position."""
    provenance = prediction_provenance(position_output_path(prediction_root, kind, position))
    if not provenance and kind == "plate":
        root = zarr.open_group(str(prediction_root), mode="r")
        provenance = dict(root.attrs.get("unetflow", {}))
    stats = provenance.get("normalization")
    if isinstance(stats, dict) and stats.get("per_position"):
        provenance = {**provenance, "normalization": position_stats(stats, position.key)}
    return provenance


def _place(dataset: str, position: Any) -> dict[str, Any]:
    return {"dataset": dataset, "position": position.key, "well": position.well,
            "row": position.row, "column": position.column, "field": position.field}


def _row(result: dict[str, Any], settings: dict[str, Any], task: str) -> dict[str, Any]:
    """One position's result as flat columns: `<method>.<metric>`, counts included."""
    info = {"level": result["level"], "data_range": result.get("data_range"),
            "ignore_label": settings.get("ignore_label"),
            "iou_threshold": settings.get("iou_threshold"),
            "instance_target": int(bool(result.get("instance_target"))),
            "excluded_pixels": result.get("excluded_pixels")}
    row = {k: info[k] for k in INFO_COLUMNS[task]}
    for method, scores in result["scores"].items():
        for name, value in scores.items():
            if name == "instance_matching":
                row.update({f"{method}.{k}": value[k] for k in COUNTS})
            elif not isinstance(value, dict):
                row[f"{method}.{name}"] = value
    return row


def _cell(value: Any) -> str:
    """Full precision, so aggregates of the table equal aggregates of the scores."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _write_table(rows: list[dict[str, Any]], output: str | Path) -> None:
    """Rows as TSV, atomically; the columns are the union of the rows' keys in order."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in fields} for row in rows)


def evaluate_positions(position_set: PositionSet, keys: list[str] | None, prediction_root: str,
                       task: str, settings: dict[str, Any], num_classes: int,
                       channels: list | None, model: str, dataset: str, output_tsv: str,
                       baseline: str | None = None,
                       checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Score one batch of positions; write one TSV row per position (atomically).

    `keys` is the batch (None: every position); each position's prediction is
    `plates.position_output_path(prediction_root, kind, position)`. `settings` is the
    evaluate section; `baseline` the tuned baselines' JSON (regression). Columns: dataset,
    position, well, row, column, field, the task's info (level, ...), `<method>.<metric>`
    for the model (`unet`) and each baseline, the prediction's path, and notes. Each
    position's provenance is checked against `task` and the `checkpoint` (hashed once).
    """
    chosen = position_set if keys is None else position_set.select(keys)
    checkpoint_sha256 = file_sha256(checkpoint) if checkpoint else None
    if not chosen.positions:
        raise ValueError(f"dataset '{dataset}': no positions to evaluate (--keys is empty)")
    baselines = read_baselines(baseline)
    rows = []
    for position in chosen.positions:
        if position.target is None:
            raise ValueError(f"dataset '{dataset}': position {position.key} has no target "
                             f"(configure labels or target for the dataset)")
        prediction = position_output_path(prediction_root, position_set.kind, position)
        if not Path(prediction).exists():
            raise FileNotFoundError(f"{prediction}: no prediction of position {position.key} "
                                    f"(model '{model}', dataset '{dataset}'); rerun prediction")
        where = f"model '{model}', dataset '{dataset}', position {position.key}"
        result = score_prediction(
            prediction, position.image, position.target, task, settings, num_classes, channels,
            where, baselines,
            check_provenance(position_provenance(prediction_root, position_set.kind, position),
                             prediction, task, checkpoint_sha256))
        warnings = [w.removeprefix(f"{where}: ") for w in result["warnings"]]
        rows.append({**_place(dataset, position), **_row(result, settings, task),
                     "prediction": prediction, "notes": "; ".join(result["notes"]),
                     "warnings": "; ".join(warnings),
                     **({"objects": result["objects"]} if "objects" in result else {})})
    _write_table(rows, output_tsv)
    return rows


# --- reading batches ----------------------------------------------------------------------
def _number(text: str, path: str, line: int, column: str) -> float | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: line {line}, column {column}: {text!r} is not a number; "
                         f"rerun its batch of evaluate-positions") from None


def read_position_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a TSV written by `evaluate_positions`, numbers as floats (None when empty);
    anything else is refused in one message naming the file."""
    path = str(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            fields = reader.fieldnames or []
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a table of evaluate-positions ({err}); rerun its "
                         f"batch") from None
    if fields[:len(PLACE_COLUMNS)] != PLACE_COLUMNS:
        raise ValueError(f"{path}: not a table of evaluate-positions (its columns do not start "
                         f"with {', '.join(PLACE_COLUMNS)}); rerun its batch")
    rows = []
    for line, cells in enumerate(raw, start=2):
        if None in cells or None in cells.values():
            raise ValueError(f"{path}: line {line} has {'more' if None in cells else 'fewer'} "
                             f"cells than the header; rerun its batch of evaluate-positions")
        rows.append({k: (v if k in TEXT_COLUMNS else _number(v, path, line, k))
                     for k, v in cells.items()})
    return rows


def _rows_by_key(position_set: PositionSet, batch_tsvs: list[str],
                 dataset: str) -> dict[str, dict[str, Any]]:
    """Every selected position's row, exactly once, from the batch tables."""
    found: dict[str, tuple[dict[str, Any], str]] = {}
    known = set(position_set.keys)
    for path in batch_tsvs:
        for row in read_position_table(path):
            key = row["position"]
            if row["dataset"] != dataset:
                raise ValueError(f"{path}: position {key} is of dataset '{row['dataset']}', "
                                 f"not '{dataset}'")
            if key not in known:
                raise ValueError(f"{path}: position {key} is not one of dataset '{dataset}''s "
                                 f"positions; rerun its batch of evaluate-positions")
            if key in found:
                raise ValueError(f"position {key} is in two batch tables, {found[key][1]} and "
                                 f"{path}")
            found[key] = (row, path)
    missing = [k for k in position_set.keys if k not in found]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if
                                            len(missing) > 10 else "")
        raise ValueError(f"dataset '{dataset}': {len(missing)} of {len(known)} positions have "
                         f"no row in the batch tables: {shown}; evaluate them first")
    return {k: found[k][0] for k in position_set.keys}


# --- aggregates -----------------------------------------------------------------------------
def _values(rows: list[dict[str, Any]], column: str) -> list[float]:
    values = [r.get(column) for r in rows]
    return [v for v in values if v is not None and not math.isnan(v)]


def _aggregate(rows: list[dict[str, Any]], column: str) -> float | None:
    """Sum of counts, mean of scores, over the rows that have a value; None if none do."""
    values = _values(rows, column)
    if not values:
        return None
    metric = column.split(".", 1)[-1]
    return float(np.sum(values)) if metric in SUMMED else float(np.mean(values))


def _score_columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if "." in k and k not in TEXT_COLUMNS))


def well_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per well (in the rows' order): the number of positions and the aggregates of each
    `<method>.<metric>` column and of excluded_pixels (counts summed, scores averaged)."""
    columns = [c for c in ("excluded_pixels",) if any(c in r for r in rows)]
    columns += _score_columns(rows)
    wells = list(dict.fromkeys(r["well"] for r in rows if r.get("well")))
    table = []
    for well in wells:
        group = [r for r in rows if r["well"] == well]
        table.append({"dataset": group[0]["dataset"], "well": well, "row": group[0]["row"],
                      "column": group[0]["column"], "positions": len(group),
                      **{c: _aggregate(group, c) for c in columns}})
    return table


def _pooled(matching: dict[str, Any]) -> dict[str, float]:
    """Precision, recall and F1 of the summed counts (as `metrics` defines them: 1.0 when
    there are no objects at all)."""
    tp, fp, fn = matching["tp"], matching["fp"], matching["fn"]
    nothing = tp + fp + fn == 0

    def ratio(a: int, b: int) -> float:
        return a / b if b else (1.0 if nothing else 0.0)

    return {"pooled_precision": ratio(tp, tp + fp), "pooled_recall": ratio(tp, tp + fn),
            "pooled_f1": ratio(2 * tp, 2 * tp + fp + fn)}


def _dataset_scores(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, int]]:
    """scores[method] as the single-image JSON has them, and the number of positions that
    scored each metric, where fewer than all did."""
    scores: dict[str, dict[str, Any]] = {}
    scored = {}
    for column in _score_columns(rows):
        method, metric = column.split(".", 1)
        value = _aggregate(rows, column)
        if metric in COUNTS:
            matching = scores.setdefault(method, {}).setdefault("instance_matching", {})
            matching[metric] = int(value) if value is not None else None
        else:
            scores.setdefault(method, {})[metric] = value
        if metric not in COUNTS and len(_values(rows, column)) < len(rows):
            scored[column] = len(_values(rows, column))
    threshold = _aggregate(rows, "iou_threshold")
    for method_scores in scores.values():
        matching = method_scores.get("instance_matching")
        if matching and None not in (matching.get(k) for k in ("tp", "fp", "fn")):
            matching.update(iou_threshold=threshold, **_pooled(matching))
    return scores, scored


def _level(rows: list[dict[str, Any]]) -> int | list[int]:
    levels = sorted({int(v) for v in _values(rows, "level")})
    return levels[0] if len(levels) == 1 else levels


def _target_description(position_set: PositionSet) -> str | None:
    target = position_set.target or {}
    if target.get("kind") == "labels":
        return f"{position_set.source} (labels/{target['labels']} in each position)"
    return target.get("source")


def _notes(rows: list[dict[str, Any]], column: str = "notes") -> list[str]:
    """Each distinct note (or warning) of the positions, with how many positions gave it."""
    counts: dict[str, int] = {}
    for row in rows:
        for note in filter(None, (row.get(column) or "").split("; ")):
            counts[note] = counts.get(note, 0) + 1
    return [f"{note} ({n} of {len(rows)} positions)" for note, n in counts.items()]


def _dataset_record(position_set: PositionSet, rows: list[dict[str, Any]], task: str,
                    model: str, dataset: str, positions_tsv: str) -> dict[str, Any]:
    scores, scored = _dataset_scores(rows)
    predictions = [r["prediction"] for r in rows if r.get("prediction")]
    record: dict[str, Any] = {
        "model": model, "dataset": dataset, "task": task, "level": _level(rows),
        "kind": position_set.kind, "source": position_set.source,
        "prediction": os.path.commonpath(predictions) if predictions else None,
        "target": _target_description(position_set), "positions": len(rows),
        "aggregate": AGGREGATE, "positions_table": positions_tsv, "scores": scores,
        "positions_scored": scored,
        "notes": [f"scores are the {AGGREGATE} ({len(rows)}); per-position scores are in "
                  f"{positions_tsv}", *_notes(rows)],
        "warnings": _notes(rows, "warnings")}
    if task == "segmentation":
        labels = _values(rows, "ignore_label")
        record["ignore_label"] = int(labels[0]) if labels else None
        record["instance_target"] = all(r.get("instance_target") for r in rows)
        record["excluded_pixels"] = int(_aggregate(rows, "excluded_pixels") or 0)
        record["objects"] = "; ".join(dict.fromkeys(r["objects"] for r in rows
                                                    if r.get("objects")))
    return {**record, "definitions": {**DEFINITIONS, "aggregate": AGGREGATE_DEFINITION}}


def _draw(position_set: PositionSet, rows: list[dict[str, Any]], wells: list[dict[str, Any]],
          task: str, model: str, dataset: str, output: str) -> None:
    from unetflow.figures import write_plate_map, write_position_strip

    metric = HEADLINE_METRIC[task]
    column = f"unet.{metric}"
    if position_set.kind == "plate" and position_set.plate:
        values = {(w["row"], w["column"]): w.get(column) for w in wells}
        fields = sorted({w["positions"] for w in wells})
        per = f"{fields[0]}" if len(fields) == 1 else f"{fields[0]}-{fields[-1]}"
        write_plate_map(values, position_set.plate["rows"], position_set.plate["columns"],
                        metric, f"{model} on {dataset}: {metric} per well (mean of {per} "
                                f"field(s))", output)
    else:
        write_position_strip({r["position"]: r.get(column) for r in rows}, metric,
                             f"{model} on {dataset}: {metric} per image", output)


def aggregate_positions(position_set: PositionSet, batch_tsvs: list[str], task: str,
                        model: str, dataset: str, output_json: str, positions_tsv: str,
                        wells_tsv: str, plate_map_png: str | None = None) -> dict[str, Any]:
    """Join the batch tables of a dataset into its metrics JSON, per-position and per-well
    tables, and the plate map (a strip of positions for a collection).

    Every position of `position_set` must have exactly one row in `batch_tsvs`; otherwise
    nothing is written and the error names the missing positions. The JSON has the format
    of `evaluate.evaluate_prediction`'s (so `summarize` reads it) plus "positions": n and
    "aggregate": "mean over positions". A collection's wells table has the header only.
    """
    rows = list(_rows_by_key(position_set, batch_tsvs, dataset).values())
    wells = well_table(rows)
    record = _dataset_record(position_set, rows, task, model, dataset, positions_tsv)
    _write_table(rows, positions_tsv)
    _write_wells(wells, rows, wells_tsv)
    if plate_map_png:
        _draw(position_set, rows, wells, task, model, dataset, plate_map_png)
    write_json(record, output_json)
    return record


def _write_wells(wells: list[dict[str, Any]], rows: list[dict[str, Any]],
                 output: str) -> None:
    if wells:
        _write_table(wells, output)
        return
    header = ["dataset", "well", "row", "column", "positions", *_score_columns(rows)]
    with atomic_path(output) as tmp:
        tmp.write_text("\t".join(header) + "\n")
