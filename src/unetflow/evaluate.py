"""Scoring a model's prediction of a dataset against its target, next to what one would do by
hand, and collecting all scores into one table.

Baselines, computed on the same pixels as the model:
  - regression: the input itself, and the input smoothed by a Gaussian whose sigma was tuned
    on the model's training data (`tune_gaussian_baseline`, rule `tune_baseline`);
  - segmentation: Otsu's threshold on the first input channel, then connected components.
The definitions of every metric are in `unetflow.metrics`; the metrics JSON repeats them.
Images are read whole, at the resolution level the prediction was made at.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from unetflow.files import atomic_path, write_json_atomic, write_text_atomic
from unetflow.metrics import (
    class_scores,
    gaussian_smooth,
    instance_scores,
    label_objects,
    otsu_instances,
    regression_scores,
    tune_gaussian_sigma,
)
from unetflow.normalize import denormalize_array
from unetflow.ome import channel_first, open_image

__all__ = [
    "DEFINITIONS",
    "SUMMARY_METRICS",
    "read_channels_first",
    "read_prediction",
    "prediction_provenance",
    "is_instance_target",
    "evaluate_segmentation",
    "evaluate_regression",
    "evaluate_prediction",
    "score_prediction",
    "read_sigma",
    "read_metrics",
    "tuning_crops",
    "tune_gaussian_baseline",
    "write_json",
    "write_summary",
    "write_summary_html",
    "read_summary",
    "verdicts",
    "format_table",
]

DEFINITIONS = {
    "psnr": "10*log10(R^2/MSE) dB, R = data_range = target max - min",
    "ssim": "scikit-image structural_similarity, 7-px window, data_range R, mean over channels",
    "mae": "mean |prediction - target| in target units",
    "pearson_r": "Pearson correlation over all pixels",
    "iou/dice": "per class on pixels not equal to ignore_label; 1.0 when the class is absent "
                "from both",
    "precision/recall/f1": "objects matched one-to-one at IoU >= iou_threshold",
    "mean_ap": "mean over IoU 0.50:0.05:0.95 of TP/(TP+FP+FN) (StarDist definition)",
    "instances": "prediction objects = labels/prediction of the prediction store (connected "
                 "components of the predicted foreground); no seeded watershed, because no "
                 "model predicts boundaries",
}
LOWER_IS_BETTER = {"mae"}
SUMMARY_METRICS = {
    "segmentation": ["foreground_iou", "foreground_dice", "precision", "recall", "f1", "mean_ap"],
    "regression": ["psnr", "ssim", "mae", "pearson_r"],
}


# --- reading ------------------------------------------------------------------------------
def read_channels_first(path: str, level: int = 0, channels: list | None = None) -> np.ndarray:
    """An OME-Zarr image as a numpy array (C, *spatial) at resolution `level`."""
    return np.asarray(channel_first(open_image(path, level), channels).compute())


def prediction_provenance(path: str) -> dict[str, Any]:
    """What predict recorded in the store: model, settings, normalization statistics."""
    return dict(open_image(path).attrs.get("unetflow", {}))


def read_prediction(path: str, task: str,
                    provenance: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The prediction in target units: `image` (C, *spatial) and, for segmentation,
    `labels` (*spatial) from labels/prediction. `provenance`: predict's record, when it is
    not the store's own."""
    provenance = prediction_provenance(path) if provenance is None else provenance
    out = {"image": read_channels_first(path)}
    if task == "segmentation":
        out["labels"] = read_channels_first(f"{path}/labels/prediction")[0]
    elif provenance.get("predict", {}).get("output_units") == "normalized":
        out["image"] = denormalize_array(out["image"], provenance["normalization"],
                                         provenance["normalize"]["method"])
    return out


def _prediction_level(provenance: dict[str, Any]) -> int:
    return int(provenance.get("predict", {}).get("level", 0))


def _check_same_shape(name: str, a: tuple[int, ...], b: tuple[int, ...], where: str) -> None:
    if a != b:
        raise ValueError(f"{where}: {name} has spatial shape {a} but the prediction has {b}; "
                         f"they must cover the same pixels")


# --- segmentation -------------------------------------------------------------------------
def is_instance_target(truth: np.ndarray, num_classes: int, ignore_label: int | None) -> bool:
    """A binary task whose target holds more than one object id is an instance target."""
    if num_classes != 2:
        return False
    ids = np.unique(truth)
    ids = ids[(ids != 0) & (ids != (ignore_label if ignore_label is not None else 0))]
    return len(ids) > 1


def _predicted_classes(pred: dict[str, np.ndarray], settings: dict[str, Any],
                       num_classes: int) -> np.ndarray | None:
    """Class map of the prediction; None when predict kept only instances of >2 classes."""
    if num_classes == 2:
        return (pred["labels"] != 0).astype(np.int64)
    if not settings.get("instances", True):
        return pred["labels"].astype(np.int64)
    if settings.get("probabilities", False):
        return pred["image"].argmax(axis=0)
    return None


def _true_classes(truth: np.ndarray, num_classes: int) -> np.ndarray:
    return (truth != 0).astype(np.int64) if num_classes == 2 else truth.astype(np.int64)


def _method_scores(classes: np.ndarray, true_classes: np.ndarray, num_classes: int,
                   instances: np.ndarray | None, truth: np.ndarray | None, valid: np.ndarray,
                   iou_threshold: float) -> dict[str, Any]:
    """Class scores, and instance matching when `truth` holds instances."""
    scores: dict[str, Any] = class_scores(classes, true_classes, num_classes, valid)
    if truth is not None and instances is not None:
        matching = instance_scores(truth, instances, valid, iou_threshold)
        scores.update({k: matching[k] for k in ("precision", "recall", "f1", "mean_ap")})
        scores["instance_matching"] = matching
    return scores


def evaluate_segmentation(pred: dict[str, np.ndarray], image: np.ndarray, truth: np.ndarray,
                          num_classes: int, predict_settings: dict[str, Any],
                          ignore_label: int | None, iou_threshold: float) -> dict[str, Any]:
    """Scores of the model and of the Otsu baseline; `truth` is (*spatial) labels."""
    valid = np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label
    instance_target = is_instance_target(truth, num_classes, ignore_label)
    classes = _predicted_classes(pred, predict_settings, num_classes)
    notes = []
    if classes is None:
        classes = (pred["labels"] != 0).astype(np.int64)
        notes.append("per-class scores of the model need predict.probabilities: true or "
                     "predict.instances: false; the model's class scores are foreground only")
    model_instances = (pred["labels"] if predict_settings.get("instances", True)
                       else label_objects(pred["labels"] != 0))
    true_classes = _true_classes(truth, num_classes)
    instance_truth = truth if instance_target else None
    otsu = otsu_instances(image[0])
    scores = {
        "unet": _method_scores(classes, true_classes, num_classes, model_instances,
                               instance_truth, valid, iou_threshold),
        # Otsu separates foreground from background only: scored as a two-class answer.
        "otsu": _method_scores((otsu != 0).astype(np.int64), (true_classes != 0).astype(np.int64),
                               2, otsu, instance_truth, valid, iou_threshold),
    }
    if not instance_target:
        notes.append("instance metrics skipped: the target is not an instance label image "
                     "(binary task with more than one object id)")
    return {"scores": scores, "notes": notes, "instance_target": instance_target,
            "excluded_pixels": int(np.count_nonzero(~valid))}


# --- regression ---------------------------------------------------------------------------
def evaluate_regression(pred: np.ndarray, image: np.ndarray, target: np.ndarray,
                        sigma: float | None, spacing: tuple[float, ...]) -> dict[str, Any]:
    """Scores of the model, the input and the tuned Gaussian, all with the target's range."""
    data_range = float(target.max()) - float(target.min()) or 1.0
    scores = {"unet": regression_scores(pred, target, data_range)}
    notes = []
    if image.shape != target.shape:
        notes.append(f"baselines skipped: input shape {image.shape} differs from target "
                     f"shape {target.shape}")
    else:
        scores["input"] = regression_scores(image, target, data_range)
        if sigma is None:
            notes.append("Gaussian baseline skipped: no tuned sigma given")
        else:
            smoothed = gaussian_smooth(image, sigma, spacing)
            scores["gaussian"] = {**regression_scores(smoothed, target, data_range),
                                  "sigma": sigma}
    return {"scores": scores, "notes": notes, "data_range": data_range}


# --- the evaluate stage -------------------------------------------------------------------
def write_json(record: dict[str, Any], output: str) -> None:
    """Write JSON atomically; +-inf and NaN become strings so the file stays standard JSON."""
    write_json_atomic(_json_safe(record), output)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return str(float(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_sigma(baseline: str | None) -> float | None:
    """The tuned Gaussian's sigma from `tune_gaussian_baseline`'s JSON; None without one."""
    if not baseline:
        return None
    with open(baseline) as fh:
        return float(json.load(fh)["sigma"])


def score_prediction(prediction: str, image: str, target: str, task: str,
                     settings: dict[str, Any], num_classes: int, channels: list | None,
                     where: str, sigma: float | None = None,
                     provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores of the prediction and the baselines against the target, written nowhere.

    What `evaluate_prediction` writes for one image, and what `evaluate_positions` records
    for each position of a plate or collection: {"level", "scores", "notes", ...}.
    `where` names the image in errors; `sigma` is the tuned Gaussian's (regression);
    `provenance` replaces the prediction's own (None: read it from the store).
    """
    provenance = prediction_provenance(prediction) if provenance is None else provenance
    level = _prediction_level(provenance)
    pred = read_prediction(prediction, task, provenance)
    img = open_image(image, level)
    image_arr = np.asarray(channel_first(img, channels).compute())
    target_arr = read_channels_first(target, level)
    shape = pred["image"].shape[1:]
    _check_same_shape(f"target {target}", target_arr.shape[1:], shape, where)
    _check_same_shape(f"image {image}", image_arr.shape[1:], shape, where)
    if task == "segmentation":
        result = evaluate_segmentation(pred, image_arr, target_arr[0], num_classes,
                                       provenance.get("predict", {}), settings["ignore_label"],
                                       settings["iou_threshold"])
    else:
        spacing = tuple(img.spatial_scale()[a] for a in img.spatial_axes)
        result = evaluate_regression(pred["image"], image_arr, target_arr, sigma, spacing)
    return {"level": level, **result}


def evaluate_prediction(prediction: str, image: str, target: str, task: str,
                        settings: dict[str, Any], num_classes: int, channels: list | None,
                        model: str, dataset: str, output: str,
                        baseline: str | None = None) -> dict[str, Any]:
    """Score the prediction and the baselines against the target; write the metrics JSON.

    `settings` is the model's evaluate section (ignore_label, iou_threshold); `baseline` is
    the JSON of `tune_gaussian_baseline` (regression only).
    """
    result = score_prediction(prediction, image, target, task, settings, num_classes, channels,
                              f"model '{model}', dataset '{dataset}'", read_sigma(baseline))
    record = {"model": model, "dataset": dataset, "task": task, "level": result.pop("level"),
              "ignore_label": settings["ignore_label"], "prediction": prediction,
              "target": target, **result, "definitions": DEFINITIONS}
    write_json(record, output)
    return record


# --- tuning the Gaussian baseline ---------------------------------------------------------
def tuning_crops(shape: tuple[int, ...], crop: int, count: int,
                 seed: int = 0) -> list[tuple[slice, ...]]:
    """Up to `count` random boxes of edge `crop` (clipped to the image), reproducible."""
    rng = np.random.default_rng(seed)
    size = [min(crop, s) for s in shape]
    if all(c == s for c, s in zip(size, shape, strict=True)):
        return [tuple(slice(0, s) for s in shape)]
    boxes = []
    for _ in range(count):
        origin = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size, strict=True)]
        boxes.append(tuple(slice(o, o + c) for o, c in zip(origin, size, strict=True)))
    return boxes


def tune_gaussian_baseline(datasets: list[dict[str, Any]], settings: dict[str, Any],
                           output: str) -> dict[str, Any]:
    """Choose the Gaussian sigma that best maps training images onto their targets.

    `datasets` are the model's training datasets ({"name", "image", "target", "channels"});
    `settings` the evaluate section (gaussian_sigmas, tuning_crops, tuning_crop_size). Only
    crops are read, so this stays cheap on large datasets.
    """
    pairs, spacing = [], None
    for ds in datasets:
        img = open_image(ds["image"])
        image = channel_first(img, ds.get("channels"))
        target = channel_first(open_image(ds["target"]))
        if image.shape != target.shape:
            raise ValueError(f"dataset '{ds['name']}': image shape {image.shape} differs from "
                             f"target shape {target.shape}; the Gaussian baseline needs both alike")
        spacing = tuple(img.spatial_scale()[a] for a in img.spatial_axes)
        for box in tuning_crops(image.shape[1:], settings["tuning_crop_size"],
                                settings["tuning_crops"]):
            pairs.append((np.asarray(image[(slice(None), *box)]),
                          np.asarray(target[(slice(None), *box)])))
    result = tune_gaussian_sigma(pairs, settings["gaussian_sigmas"], spacing)
    record = {**result, "datasets": [d["name"] for d in datasets], "crops": len(pairs),
              "sigma_unit": "pixels along x; other axes scaled by their pixel size"}
    write_json(record, output)
    return record


# --- the summary table --------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    return f"{value:.4f}"


def _all_metric_names() -> list[str]:
    names = []
    for metrics in SUMMARY_METRICS.values():
        names += [m for m in metrics if m not in names]
    return names


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A metrics JSON written by `evaluate_prediction`; anything else is named and refused."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerun its evaluation") from err
    missing = [k for k in ("model", "dataset", "task", "scores") if k not in record] \
        if isinstance(record, dict) else ["model"]
    if missing:
        raise ValueError(f"{path}: not a metrics file of unetflow evaluate (no "
                         f"'{missing[0]}'); rerun its evaluation")
    return record


def write_summary(metric_files: list[str], output: str) -> list[dict[str, Any]]:
    """One row per model, dataset and method (the U-Net or a baseline), as TSV (atomically)."""
    fields = ["model", "dataset", "task", "method", *_all_metric_names()]
    rows = []
    for path in metric_files:
        record = read_metrics(path)
        for method, scores in record["scores"].items():
            row = {f: "" for f in fields}
            row.update(model=record["model"], dataset=record["dataset"], task=record["task"],
                       method=method if method != "gaussian" else
                       f"gaussian(sigma={scores['sigma']:g})")
            row.update({m: _cell(scores.get(m)) for m in SUMMARY_METRICS[record["task"]]})
            rows.append(row)
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def read_summary(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _aligned(rows: list[dict[str, Any]], fields: list[str]) -> list[str]:
    widths = {f: max(len(f), *(len(str(r.get(f, ""))) for r in rows)) for f in fields}
    lines = ["  ".join(f.ljust(widths[f]) for f in fields).rstrip()]
    lines += ["  ".join(str(r.get(f, "")).ljust(widths[f]) for f in fields).rstrip()
              for r in rows]
    return lines


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _behind(model: dict[str, Any], baseline: dict[str, Any], metrics: list[str]) -> list[str]:
    """The metrics on which `baseline` scores better than `model`."""
    worse = []
    for m in metrics:
        a, b = _number(model.get(m)), _number(baseline.get(m))
        if a is not None and b is not None and (b < a if m in LOWER_IS_BETTER else b > a):
            worse.append(m)
    return worse


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per model and dataset: does the model beat every baseline?"""
    lines = []
    for model, dataset in dict.fromkeys((r["model"], r["dataset"]) for r in rows):
        group = [r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]
        unet = next((r for r in group if r["method"] == "unet"), None)
        if unet is None or len(group) == 1:
            continue
        metrics = [m for m in SUMMARY_METRICS.get(unet.get("task", ""), [])
                   if _number(unet.get(m)) is not None]
        behind = {r["method"]: _behind(unet, r, metrics) for r in group if r is not unet}
        behind = {k: v for k, v in behind.items() if v}
        if not behind:
            lines.append(f"{model} on {dataset}: better than every baseline on "
                         f"{', '.join(metrics)}.")
        else:
            what = "; ".join(f"{method} on {', '.join(ms)}" for method, ms in behind.items())
            lines.append(f"{model} on {dataset}: NOT better than every baseline - behind {what}.")
    return lines


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as aligned text, one table per task with only the columns that apply,
    followed by one verdict per model and dataset."""
    if not rows:
        return "(no results)"
    blocks = []
    for task in dict.fromkeys(r.get("task", "") for r in rows):
        group = [r for r in rows if r.get("task", "") == task]
        fields = [f for f in group[0] if f != "task" and any(str(r.get(f, "")) for r in group)]
        blocks.append("\n".join([f"{task}:" if task else "", *_aligned(group, fields)]).strip())
    if all("model" in r and "method" in r for r in rows) and verdicts(rows):
        blocks.append("\n".join(verdicts(rows)))
    return "\n\n".join(blocks)


def _best_cells(group: list[dict[str, Any]], metric: str) -> set[int]:
    """Row indices of `group` holding the best value of `metric`."""
    values = {}
    for i, row in enumerate(group):
        try:
            values[i] = float(row.get(metric, ""))
        except ValueError:
            continue
    if not values:
        return set()
    best = (min if metric in LOWER_IS_BETTER else max)(values.values())
    return {i for i, v in values.items() if v == best}


def _html_table(rows: list[dict[str, Any]], task: str) -> str:
    from html import escape

    metrics = [m for m in SUMMARY_METRICS[task] if any(r.get(m) for r in rows)]
    head = "".join(f"<th>{escape(h)}</th>" for h in ["model", "dataset", "method", *metrics])
    body = []
    for pair in dict.fromkeys((r["model"], r["dataset"]) for r in rows):
        group = [r for r in rows if (r["model"], r["dataset"]) == pair]
        best = {m: _best_cells(group, m) for m in metrics}
        for i, r in enumerate(group):
            cells = [escape(str(r[k])) for k in ("model", "dataset", "method")]
            cells += [f"<b>{escape(str(r.get(m, '')))}</b>" if i in best[m]
                      else escape(str(r.get(m, ""))) for m in metrics]
            kind = ' class="model"' if r["method"] == "unet" else ""
            body.append(f"<tr{kind}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<h2>{escape(task)}</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


HTML_STYLE = """body{font-family:sans-serif;font-size:14px;margin:1em}
table{border-collapse:collapse;margin-bottom:1.5em}th,td{padding:4px 10px;text-align:right;
border-bottom:1px solid #ddd}th{background:#f0f0f0}td:nth-child(-n+3),th:nth-child(-n+3)
{text-align:left}tr.model{background:#eef6ff}b{color:#0a6d2c}p{max-width:60em;color:#444}
li{margin:.3em 0;font-size:15px}"""


def write_summary_html(rows: list[dict[str, Any]], output: str) -> None:
    """The summary as a small self-contained HTML page for the report: one table per task,
    the model's rows shaded, the best value of each metric per model and dataset in bold;
    written atomically."""
    tables = [_html_table([r for r in rows if r["task"] == task], task)
              for task in SUMMARY_METRICS if any(r["task"] == task for r in rows)]
    from html import escape

    said = "".join(f"<li>{escape(line)}</li>" for line in verdicts(rows))
    note = ("<p>unet = the model; otsu, input and gaussian are baselines on the same pixels. "
            "Bold: the best value per model and dataset (lowest for mae, highest otherwise). "
            "IoU/Dice: foreground pixels; precision, recall, F1: objects matched at IoU 0.5; "
            "mean_ap: mean over IoU 0.5-0.95 of TP/(TP+FP+FN); PSNR and SSIM with the target's "
            "max - min as data range. All scores with definitions: 3. Metrics in detail.</p>")
    write_text_atomic(f"<!doctype html><html><head><meta charset='utf-8'><style>"
                      f"{HTML_STYLE}</style></head><body>"
                      f"{'<ul>' + said + '</ul>' if said else ''}"
                      f"{''.join(tables) or 'no results'}{note}</body></html>", output)
