"""Scoring a model's prediction of a dataset against its target, next to what one would do by
hand, and collecting all scores into one table.

Baselines, computed on the same pixels as the model:
  - regression: the input itself, and the input denoised as one would by hand, each with its
    parameter tuned on the model's training data (`tune_baselines`, rule `tune_baseline`,
    `evaluate.baselines`): a Gaussian (sigma), total variation (scikit-image's Chambolle,
    weight) and non-local means (scikit-image, strength h);
  - segmentation: Otsu's threshold on the first input channel, then connected components.
The definitions of every metric are in `unetflow.metrics`; the metrics JSON repeats them.
Images are read block by block (`unetflow.scoring`), at the resolution level the prediction
was made at, so memory does not grow with the image.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from unetflow.files import atomic_path, file_sha256, write_json_atomic, write_text_atomic
from unetflow.metrics import (
    TV_ITERATIONS,
    check_sigma_reach,
    nlm_denoise,
    nlm_patch,
    noise_sd,
    tune_candidates,
    tune_gaussian_sigma,
    tv_denoise,
)
from unetflow.normalize import denormalize_array
from unetflow.ome import channel_first, open_image

__all__ = [
    "DEFINITIONS",
    "SUMMARY_METRICS",
    "read_channels_first",
    "prediction_provenance",
    "prediction_level",
    "open_prediction",
    "evaluate_prediction",
    "BASELINE_PARAMETER",
    "read_baselines",
    "read_metrics",
    "tuning_crops",
    "tune_baselines",
    "write_json",
    "method_label",
    "summary_rows",
    "write_summary",
    "write_summary_html",
    "metric_warnings",
    "check_provenance",
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
    "instances": "prediction objects = labels/prediction of the prediction store; 'objects' "
                 "says how predict made them: connected components of the predicted "
                 "foreground, or (model.target: boundaries) a seeded watershed that splits "
                 "touching objects along the predicted boundaries",
}
LOWER_IS_BETTER = {"mae"}
SUMMARY_METRICS = {
    "segmentation": ["foreground_iou", "foreground_dice", "precision", "recall", "f1", "mean_ap"],
    "regression": ["psnr", "ssim", "mae", "pearson_r"],
}


# --- reading ------------------------------------------------------------------------------
def read_channels_first(path: str, level: int = 0, channels: list | None = None) -> np.ndarray:
    """An OME-Zarr image as a numpy array (C, *spatial) at resolution `level`, whole: for
    small images only (a position's field, a test); the stages stream (`unetflow.scoring`)."""
    return np.asarray(channel_first(open_image(path, level), channels).compute())


def prediction_provenance(path: str) -> dict[str, Any]:
    """What predict recorded in the store: model, settings, normalization statistics."""
    return dict(open_image(path).attrs.get("unetflow", {}))


def check_provenance(provenance: dict[str, Any], where: str, task: str,
                     checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """predict's record of a store, checked against what the stage reading it expects: the
    model's task and, given its SHA-256, the checkpoint the workflow has now. A store of
    the wrong task, or one predicted by a checkpoint since replaced, would be scored and
    drawn as if it were this model's; it is refused with the fix."""
    if not provenance.get("task") or not provenance.get("checkpoint_sha256"):
        raise ValueError(f"{where}: records no task and checkpoint SHA-256 (not written by "
                         f"unetflow predict, or by an older version); delete it and run "
                         f"Snakemake again to predict it")
    if provenance["task"] != task:
        raise ValueError(f"{where}: predicted by a {provenance['task']} model, but this model "
                         f"is configured as task: {task}; delete it and run Snakemake again "
                         f"(it predicts with the model's own checkpoint), or fix the task")
    if checkpoint_sha256 and provenance["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(f"{where}: predicted with the checkpoint of SHA-256 "
                         f"{provenance['checkpoint_sha256'][:12]}..., not with "
                         f"{provenance.get('checkpoint', 'the checkpoint')} as it is now "
                         f"({checkpoint_sha256[:12]}...); delete it and run Snakemake again to "
                         f"predict with the current checkpoint")
    return provenance


def prediction_level(provenance: dict[str, Any]) -> int:
    """The resolution level of the input that the prediction was made at."""
    return int(provenance.get("predict", {}).get("level", 0))


def open_prediction(path: str, task: str,
                    provenance: dict[str, Any] | None = None) -> dict[str, da.Array]:
    """The prediction in target units, lazily: `image` (C, *spatial) and, for segmentation,
    `labels` (*spatial) from labels/prediction. `provenance`: predict's record, when it is
    not the store's own."""
    provenance = prediction_provenance(path) if provenance is None else provenance
    out = {"image": channel_first(open_image(path))}
    if task == "segmentation":
        out["labels"] = channel_first(open_image(f"{path}/labels/prediction"))[0]
    elif provenance.get("predict", {}).get("output_units") == "normalized":
        out["image"] = denormalize_array(out["image"], provenance["normalization"],
                                         provenance["normalize"]["method"])
    return out


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


BASELINE_PARAMETER = {"gaussian": "sigma", "tv": "weight", "nlm": "h"}
"""Each tuned baseline and the name of its parameter, as the summary shows it."""


def _stale(baseline: str, why: str) -> ValueError:
    return ValueError(f"{baseline}: {why}; delete it and run Snakemake again, which tunes it "
                      f"again")


def read_baselines(baseline: str | None) -> dict[str, dict[str, Any]] | None:
    """The tuned baselines of `tune_baselines`' JSON, as the scoring takes them:
    {"gaussian": {"sigma"}, "tv": {"weight", "noise_sd"}, "nlm": {"h", "noise_sd"}}, those
    that were tuned; None without a file. A file of an older unetflow (the Gaussian's sigma
    only) is refused as stale, not read as "TV and NLM not wanted"."""
    if not baseline:
        return None
    try:
        record = json.loads(Path(baseline).read_text())
    except ValueError as err:
        raise _stale(baseline, f"not a file of tuned baselines ({err})") from None
    if isinstance(record, dict) and "sigma" in record and "baselines" not in record:
        raise _stale(baseline, "written by an older unetflow, which tuned the Gaussian only")
    try:
        noise = [float(sd) for sd in record["noise_sd"]]
        chosen = {name: {BASELINE_PARAMETER[name]: float(record["baselines"][name][
            BASELINE_PARAMETER[name]])} for name in record["baselines"]}
    except (ValueError, KeyError, TypeError) as err:
        raise _stale(baseline, f"not a file of tuned baselines ({err.__class__.__name__}: "
                               f"{err})") from None
    if any(not math.isfinite(sd) or sd <= 0 for sd in noise):
        raise _stale(baseline, f"noise sd {noise} is not a list of positive numbers")
    for name, parameters in chosen.items():
        value = next(iter(parameters.values()))
        if not math.isfinite(value) or value <= 0:
            raise _stale(baseline, f"{name}'s {BASELINE_PARAMETER[name]} {value} is not a "
                                   f"positive number")
        if name != "gaussian":
            parameters["noise_sd"] = noise
    return chosen


def evaluate_prediction(prediction: str, image: str, target: str, task: str,
                        settings: dict[str, Any], num_classes: int, channels: list | None,
                        model: str, dataset: str, output: str, baseline: str | None = None,
                        crop_scores: str | None = None,
                        checkpoint: str | None = None) -> dict[str, Any]:
    """Score the prediction and the baselines against the target; write the metrics JSON.

    `settings` is the model's evaluate section (ignore_label, iou_threshold, and how the
    passes run: block_pixels, workers); `baseline` is the JSON of `tune_baselines`
    (regression only). With `crop_scores`, also writes the montage's per-crop errors there
    (TSV; settings["montage_crop_size"]), so the montage reads only the crops it draws.
    The image is read block by block (`unetflow.scoring`); object labels that need making
    go to a scratch folder beside `output`, removed at the end. The store's provenance is
    checked first (`check_provenance`, against `checkpoint` when given).
    """
    from unetflow.scoring import score_prediction  # scoring builds on this module

    provenance = check_provenance(prediction_provenance(prediction), prediction, task,
                                  file_sha256(checkpoint) if checkpoint else None)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    result = score_prediction(prediction, image, target, task, settings, num_classes, channels,
                              f"model '{model}', dataset '{dataset}'", read_baselines(baseline),
                              provenance=provenance,
                              crop_size=settings["montage_crop_size"] if crop_scores else None,
                              scratch_dir=Path(output).parent)
    crops = result.pop("crop_scores", None)
    record = {"model": model, "dataset": dataset, "task": task, "level": result.pop("level"),
              "ignore_label": settings["ignore_label"], "prediction": prediction,
              "target": target, **result, "definitions": DEFINITIONS}
    if crops is not None:
        crops.write_tsv(crop_scores)
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


def _tuning_pairs(datasets: list[dict[str, Any]], settings: dict[str, Any]
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[float, ...] | None,
                             dict[str, tuple[int, str]]]:
    """(image, target) crops of every training dataset, the pixel size, and each dataset's
    largest extent and image path."""
    pairs, spacing, extents = [], None, {}
    for ds in datasets:
        img = open_image(ds["image"])
        image = channel_first(img, ds.get("channels"))
        target = channel_first(open_image(ds["target"]))
        if image.shape != target.shape:
            raise ValueError(f"dataset '{ds['name']}': image shape {image.shape} differs from "
                             f"target shape {target.shape}; the baselines need both alike")
        spacing = tuple(img.spatial_scale()[a] for a in img.spatial_axes)
        extents[ds["name"]] = (max(image.shape[1:]), ds["image"])
        for box in tuning_crops(image.shape[1:], settings["tuning_crop_size"],
                                settings["tuning_crops"]):
            pairs.append((np.asarray(image[(slice(None), *box)]),
                          np.asarray(target[(slice(None), *box)])))
    return pairs, spacing, extents


def _tune(name: str, pairs: list, settings: dict[str, Any], spacing: tuple[float, ...] | None,
          noise: list[float]) -> dict[str, Any]:
    """One baseline's chosen parameter, the MSE of every candidate, and what defines it."""
    if name == "gaussian":
        result = tune_gaussian_sigma(pairs, settings["gaussian_sigmas"], spacing)
        return {**result, "sigma_unit": "pixels along x; other axes scaled by their pixel size"}
    if name == "tv":
        weight, mse = tune_candidates(pairs, settings["tv_weights"],
                                      lambda img, w: tv_denoise(img, w, noise))
        return {"weight": weight, "mse_by_weight": mse, "weight_unit": "noise sd",
                "iterations": TV_ITERATIONS, "method": "skimage denoise_tv_chambolle"}
    ndim = pairs[0][0].ndim - 1
    h, mse = tune_candidates(pairs, settings["nlm_strengths"],
                             lambda img, v: nlm_denoise(img, v, noise))
    size, distance = nlm_patch(ndim)
    return {"h": h, "mse_by_h": mse, "h_unit": "noise sd", "patch_size": size,
            "patch_distance": distance, "method": "skimage denoise_nl_means, fast mode, "
            "sigma = the noise sd"}


def tune_baselines(datasets: list[dict[str, Any]], settings: dict[str, Any],
                   output: str) -> dict[str, Any]:
    """Tune each of `settings["baselines"]` (gaussian, tv, nlm) on the model's training data:
    the candidate with the least MSE from image to target on the same crops for all.

    `datasets` are the model's training datasets ({"name", "image", "target", "channels"});
    `settings` the evaluate section (baselines, gaussian_sigmas, tv_weights, nlm_strengths,
    tuning_crops, tuning_crop_size). Only crops are read, so this stays cheap on large
    datasets. The JSON holds each baseline's choice and the MSE of every candidate, the
    input's MSE, and the noise sd of each channel (`metrics.noise_sd` on the crops) that
    TV's weight and NLM's h are multiples of.
    """
    pairs, spacing, extents = _tuning_pairs(datasets, settings)
    wanted = settings["baselines"]
    if extents and "gaussian" in wanted:  # as planning checks: the largest image bounds sigmas
        name = max(extents, key=lambda n: extents[n][0])
        check_sigma_reach(settings["gaussian_sigmas"], extents[name][0],
                          f"the largest image tuned on (dataset '{name}', {extents[name][1]})")
    if not pairs:
        raise ValueError("tuning the baselines needs training crops: no training dataset given")
    noise = [noise_sd([image[c] for image, _ in pairs]) for c in range(pairs[0][0].shape[0])]
    input_mse = float(np.mean([np.mean((img.astype(np.float32) - tgt.astype(np.float32)) ** 2,
                                       dtype=np.float64) for img, tgt in pairs]))
    record = {"baselines": {name: _tune(name, pairs, settings, spacing, noise)
                            for name in wanted},
              "input_mse": input_mse, "noise_sd": noise,
              "noise_sd_method": "median |finest diagonal Haar coefficient| / 0.6745 on the "
                                 "tuning crops, per channel",
              "datasets": [d["name"] for d in datasets], "crops": len(pairs)}
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


def method_label(method: str, scores: dict[str, Any]) -> str:
    """A method as the summary names it: a tuned baseline with its parameter
    (`gaussian(sigma=1.5)`, `tv(weight=2)`, `nlm(h=1.4)`), the others by name."""
    parameter = BASELINE_PARAMETER.get(method)
    if parameter is None or scores.get(parameter) is None:
        return method
    return f"{method}({parameter}={float(scores[parameter]):g})"


def summary_rows(metric_files: list[str]) -> list[dict[str, Any]]:
    """One row per model, dataset and method (the U-Net or a baseline) of these metrics
    files: the summary's lines (a bioimage.io export repeats its model's in its README)."""
    fields = ["model", "dataset", "task", "method", *_all_metric_names()]
    rows = []
    for path in metric_files:
        record = read_metrics(path)
        for method, scores in record["scores"].items():
            row = {f: "" for f in fields}
            row.update(model=record["model"], dataset=record["dataset"], task=record["task"],
                       method=method_label(method, scores))
            row.update({m: _cell(scores.get(m)) for m in SUMMARY_METRICS[record["task"]]})
            rows.append(row)
    return rows


def write_summary(metric_files: list[str], output: str) -> list[dict[str, Any]]:
    """The summary rows (`summary_rows`) as TSV, atomically."""
    fields = ["model", "dataset", "task", "method", *_all_metric_names()]
    rows = summary_rows(metric_files)
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def metric_warnings(metric_files: list[str]) -> list[str]:
    """The warnings recorded with the scores (`model on dataset: warning`), each once: what
    normalize, predict and evaluate said about the data that changes what a score means."""
    found = []
    for path in metric_files:
        record = read_metrics(path)
        found += [f"{record['model']} on {record['dataset']}: {w}"
                  for w in record.get("warnings", [])]
    return list(dict.fromkeys(found))


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
    """A score as a number; None when missing or undefined (NaN). +-inf stays (PSNR of a
    perfect prediction)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _versus(model: dict[str, Any], baseline: dict[str, Any], metrics: list[str]
            ) -> tuple[list[str], list[str]]:
    """(metrics on which `model` is ahead of `baseline`, metrics on which it is behind),
    over the metrics defined for both; equal values are in neither."""
    ahead, behind = [], []
    for m in metrics:
        a, b = _number(model.get(m)), _number(baseline.get(m))
        if a is None or b is None or a == b:
            continue
        (ahead if (a < b if m in LOWER_IS_BETTER else a > b) else behind).append(m)
    return ahead, behind


def _behind_text(behind: dict[str, list[str]]) -> str:
    """`tv, nlm (behind on psnr, ssim)`, or each with its own metrics when they differ."""
    metric_lists = {tuple(ms) for ms in behind.values()}
    if len(metric_lists) == 1:
        return f"{', '.join(behind)} (behind on {', '.join(next(iter(metric_lists)))})"
    return (f"{', '.join(behind)} (behind "
            + "; ".join(f"{method} on {', '.join(ms)}" for method, ms in behind.items()) + ")")


def _verdict(model: str, dataset: str, unet: dict[str, Any],
             baselines: list[dict[str, Any]]) -> str:
    """A model is better than a baseline when it is ahead of it on at least one metric and
    behind on none; a baseline it only ties (every metric equal, e.g. all 0 on an empty
    image) it is "no better than". The sentence names both sides, so a model that lands
    between baselines (ahead of the input and the Gaussian, behind TV) says so."""
    metrics = [m for m in SUMMARY_METRICS.get(unet.get("task", ""), [])
               if _number(unet.get(m)) is not None]
    where = f"{model} on {dataset}"
    if not metrics:
        return f"{where}: cannot be compared with the baselines: no score is defined."
    compared = {r["method"]: _versus(unet, r, metrics) for r in baselines}
    behind = {k: b for k, (_, b) in compared.items() if b}
    tied = [k for k, (a, b) in compared.items() if not a and not b]
    better = [k for k, (a, b) in compared.items() if a and not b]
    if not behind and not tied:
        return f"{where}: better than every baseline on {', '.join(metrics)}."
    if not behind and not better:
        return (f"{where}: no better than {', '.join(tied)} - equal on every score "
                f"({', '.join(metrics)}).")
    parts = [f"better than {', '.join(better)}"] if better else []
    if behind:
        parts.append(f"NOT better than {_behind_text(behind)}")
    if tied:
        parts.append(f"no better than {', '.join(tied)} (equal on every score)")
    return f"{where}: {'; '.join(parts)}."


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per model and dataset: does the model beat every baseline?"""
    lines = []
    for model, dataset in dict.fromkeys((r["model"], r["dataset"]) for r in rows):
        group = [r for r in rows if (r["model"], r["dataset"]) == (model, dataset)]
        unet = next((r for r in group if r["method"] == "unet"), None)
        if unet is None or len(group) == 1:
            continue
        lines.append(_verdict(model, dataset, unet, [r for r in group if r is not unet]))
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
li{margin:.3em 0;font-size:15px}.warn{color:#8a4b00}"""


def write_summary_html(rows: list[dict[str, Any]], output: str,
                       warnings: list[str] | None = None) -> None:
    """The summary as a small self-contained HTML page for the report: the verdicts, the
    `warnings` that qualify the scores (`metric_warnings`), one table per task, the model's
    rows shaded, the best value of each metric per model and dataset in bold; written
    atomically."""
    tables = [_html_table([r for r in rows if r["task"] == task], task)
              for task in SUMMARY_METRICS if any(r["task"] == task for r in rows)]
    from html import escape

    said = "".join(f"<li>{escape(line)}</li>" for line in verdicts(rows))
    warned = "".join(f"<li>{escape(line)}</li>" for line in warnings or [])
    warned = (f"<p class='warn'><b>Warnings that change what these scores mean:</b></p>"
              f"<ul class='warn'>{warned}</ul>") if warned else ""
    note = ("<p>unet = the model; otsu, input, gaussian, tv (total variation) and nlm "
            "(non-local means) are baselines on the same pixels, each tuned on the model's "
            "training data. "
            "Bold: the best value per model and dataset (lowest for mae, highest otherwise). "
            "IoU/Dice: foreground pixels; precision, recall, F1: objects matched at IoU 0.5; "
            "mean_ap: mean over IoU 0.5-0.95 of TP/(TP+FP+FN); PSNR and SSIM with the target's "
            "max - min as data range. All scores with definitions: 3. Metrics in detail.</p>")
    write_text_atomic(f"<!doctype html><html><head><meta charset='utf-8'><style>"
                      f"{HTML_STYLE}</style></head><body>"
                      f"{'<ul>' + said + '</ul>' if said else ''}{warned}"
                      f"{''.join(tables) or 'no results'}{note}</body></html>", output)
