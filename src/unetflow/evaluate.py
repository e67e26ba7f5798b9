"""Metrics of a prediction against its target, next to simple baselines, and the summary table.

Segmentation: foreground IoU and Dice (and per class) against an Otsu-threshold baseline.
Regression: PSNR, SSIM and MAE against the input itself (what you had before denoising).
The data range for PSNR and SSIM is the target's max - min, stated in the output.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from unetflow.ome import channel_first, open_image

__all__ = [
    "segmentation_scores",
    "regression_scores",
    "otsu_baseline",
    "evaluate_prediction",
    "write_summary",
]


def _valid(target: np.ndarray, ignore_label: int | None) -> np.ndarray:
    return np.ones(target.shape, bool) if ignore_label is None else target != ignore_label


def _iou_dice(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    p, t = pred & valid, truth & valid
    inter, union, total = (p & t).sum(), (p | t).sum(), p.sum() + t.sum()
    iou = float(inter / union) if union else 1.0
    dice = float(2 * inter / total) if total else 1.0
    return iou, dice


def segmentation_scores(pred_labels: np.ndarray, target: np.ndarray, num_classes: int = 2,
                        ignore_label: int | None = None) -> dict[str, float]:
    """Foreground IoU/Dice (any nonzero label is foreground) and, for >2 classes, per class."""
    valid = _valid(target, ignore_label)
    truth_fg = (target != 0) & valid
    iou, dice = _iou_dice(pred_labels != 0, truth_fg, valid)
    scores = {"foreground_iou": iou, "foreground_dice": dice}
    if num_classes > 2:
        for k in range(1, num_classes):
            scores[f"iou_class_{k}"], scores[f"dice_class_{k}"] = _iou_dice(
                pred_labels == k, target == k, valid)
    return scores


def regression_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM with data range = target max - min, and MAE, over all channels."""
    from skimage.metrics import structural_similarity

    pred, target = pred.astype(np.float64), target.astype(np.float64)
    data_range = float(target.max() - target.min()) or 1.0
    mse = float(np.mean((pred - target) ** 2))
    psnr = float(10 * np.log10(data_range**2 / mse)) if mse > 0 else float("inf")
    ssim = float(np.mean([structural_similarity(p, t, data_range=data_range)
                          for p, t in zip(pred, target, strict=True)]))
    return {"psnr": psnr, "ssim": ssim, "mae": float(np.mean(np.abs(pred - target))),
            "data_range": data_range}


def otsu_baseline(image: np.ndarray) -> np.ndarray:
    """Foreground by Otsu's threshold on the first channel: what one would do by hand."""
    from skimage.filters import threshold_otsu

    first = image[0]
    return first > threshold_otsu(first)


def _read_level0(path: str, name: str | None = None) -> np.ndarray:
    if name:
        path = f"{path}/labels/{name}"
    return np.asarray(channel_first(open_image(path)).compute())


def evaluate_prediction(prediction: str, image: str, target: str, task: str,
                        settings: dict[str, Any], num_classes: int, channels: list | None,
                        model: str, dataset: str, output: str) -> dict[str, Any]:
    """Score the prediction and the baseline against the target and write the metrics JSON."""
    target_arr = _read_level0(target)
    image_arr = np.asarray(channel_first(open_image(image), channels).compute())
    ignore = settings["ignore_label"]
    if task == "segmentation":
        pred = _read_level0(prediction, "prediction")[0]
        truth = target_arr[0]
        result = {"unetflow": segmentation_scores(pred, truth, num_classes, ignore),
                  "otsu": segmentation_scores(otsu_baseline(image_arr).astype(np.uint8), truth,
                                              2, ignore)}
    else:
        pred = _read_level0(prediction)
        result = {"unetflow": regression_scores(pred, target_arr),
                  "input": regression_scores(image_arr, target_arr)}
    record = {"model": model, "dataset": dataset, "task": task, "scores": result}
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return record


SUMMARY_METRICS = ["foreground_iou", "foreground_dice", "psnr", "ssim", "mae"]


def write_summary(metric_files: list[str], output: str) -> list[dict[str, Any]]:
    """One row per model, dataset and method (the model or a baseline), as TSV."""
    rows = []
    for path in metric_files:
        with open(path) as fh:
            record = json.load(fh)
        for method, scores in record["scores"].items():
            rows.append({"model": record["model"], "dataset": record["dataset"],
                         "task": record["task"], "method": method,
                         **{m: (f"{scores[m]:.4f}" if m in scores else "")
                            for m in SUMMARY_METRICS}})
    fields = ["model", "dataset", "task", "method", *SUMMARY_METRICS]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table for the console."""
    if not rows:
        return "(no results)"
    fields = list(rows[0])
    widths = {f: max(len(f), *(len(str(r[f])) for r in rows)) for f in fields}
    lines = ["  ".join(f.ljust(widths[f]) for f in fields)]
    lines += ["  ".join(str(r[f]).ljust(widths[f]) for f in fields) for r in rows]
    return "\n".join(lines)
