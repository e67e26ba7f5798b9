"""Scoring a prediction against its target block by block, so memory stays flat as images grow.

The metrics are those of `unetflow.metrics` (the in-memory definitions, and the oracle of the
tests); here each is computed from what the blocks contribute (`unetflow.metric_sums`):
  - regression: one pass for the target's range (PSNR's and SSIM's data range), then one
    pass reading prediction, input and target with the halo that SSIM's window and the tuned
    baselines need; each baseline (Gaussian, total variation, non-local means) is applied
    per block to the input grown by its reach (`baseline_reach`, as dask's
    `map_overlap(depth=reach, boundary='none')` would), so no denoised image is ever stored,
    and each equals its whole-image result.
  - segmentation: Otsu's threshold from a histogram of the whole input (two passes), its
    objects by out-of-core connected components into a scratch Zarr array, then one pass
    that counts the confusion matrix of each method and the overlaps of predicted and true
    objects (a sparse table of object pairs: memory grows with the objects, not the pixels).
    The model's objects are the prediction store's labels/prediction, already made out of
    core by predict (or, when predict kept classes, their connected components). Predicted
    objects are connected, so one on no face a block shares with another lies wholly in
    it: its pairs that cannot reach the lowest IoU scored are dropped there, and if none is
    left it is only counted, which keeps a noisy Otsu's millions of speckles out of the table.
While a pass runs, the per-crop errors that the montage ranks its crops by are summed too
(`figures.CropScores`), so the figure never reads more than the crops it draws.

Memory: about 2 x `workers` blocks of `block_pixels` pixels in flight, each holding the
prediction, input and target over the block and its halo plus the SSIM filter's float64
temporaries: measured, about 100 bytes per block pixel, channel and worker for regression
(about 60 MB more at 1024² blocks with the TV and NLM baselines) and 50 for segmentation,
over about 250 MB (README "Memory"); object tables add about 50
bytes per true object and per predicted object that crosses blocks or may match.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from unetflow import notices
from unetflow.baselines import otsu_objects, otsu_threshold
from unetflow.blockwise import Block, block_shape, map_blocks_ordered, plan_blocks
from unetflow.components import connected_components
from unetflow.evaluate import open_prediction, prediction_level, prediction_provenance
from unetflow.figures import CropScores, montage_error
from unetflow.integrity import warn_missing_chunks
from unetflow.metric_sums import (
    ObjectOverlaps,
    RegressionSums,
    SsimSum,
    class_scores_from_confusion,
    confusion,
    ssim_window,
)
from unetflow.metrics import gaussian_smooth, nlm_denoise, nlm_reach, tv_denoise, tv_reach
from unetflow.ome import channel_first, open_image

__all__ = [
    "DEFAULT_BLOCK_PIXELS",
    "gaussian_reach",
    "baseline_reach",
    "score_segmentation",
    "score_regression",
    "score_prediction",
]

DEFAULT_BLOCK_PIXELS = 1 << 20  # evaluate.block_pixels' default: 1024 x 1024 pixels


def _check_same_shape(name: str, a: tuple[int, ...], b: tuple[int, ...], where: str) -> None:
    if a != b:
        raise ValueError(f"{where}: {name} has spatial shape {a} but the prediction has {b}; "
                         f"they must cover the same pixels")


def _plan(array: da.Array, block_pixels: int,
          halo: tuple[int, ...] | int = 0) -> tuple[list[Block], tuple[int, ...]]:
    """Blocks over the spatial axes of (C, *spatial) `array`, aligned to its chunks, and
    their edge."""
    spatial = array.shape[1:]
    edge = block_shape(spatial, tuple(c[0] for c in array.chunks[1:]), block_pixels)
    return plan_blocks(spatial, edge, halo), edge


def _core(array: np.ndarray, block: Block) -> np.ndarray:
    return array[(..., *block.inner)]


# --- segmentation -------------------------------------------------------------------------
def _classes(block: dict[str, np.ndarray], settings: dict[str, Any],
             num_classes: int) -> np.ndarray:
    """The model's class map on one block (see `_class_source`)."""
    labels = block["labels"]
    if num_classes == 2 or settings.get("instances", True) and not settings.get("probabilities"):
        return (labels != 0).astype(np.int64)
    if not settings.get("instances", True):
        return labels.astype(np.int64)
    return block["image"].argmax(axis=0)


def _class_notes(settings: dict[str, Any], num_classes: int) -> list[str]:
    if num_classes == 2 or not settings.get("instances", True) or settings.get("probabilities"):
        return []
    return ["per-class scores of the model need predict.probabilities: true or "
            "predict.instances: false; the model's class scores are foreground only"]


def _model_objects(labels: da.Array, settings: dict[str, Any], scratch: Path,
                   block: tuple[int, ...], workers: int) -> da.Array:
    """The model's objects: predict's labels, or the connected components of its classes."""
    if settings.get("instances", True):
        return labels
    objects, _ = connected_components((labels != 0).rechunk(block), scratch / "model_objects",
                                      workers)
    return objects


def _whole_objects(pred: np.ndarray, block: Block, spatial: tuple[int, ...]) -> np.ndarray:
    """Ids of predicted objects wholly inside this block: on none of its faces shared with
    another block. Predicted ids are connected components (predict's labels, Otsu's), so an
    object that leaves the block shows on a shared face."""
    faces = [pred.take(end, axis).ravel()
             for axis, (c, n) in enumerate(zip(block.core, spatial, strict=True))
             for end, shared in ((0, c.start > 0), (-1, c.stop < n)) if shared]
    ids = np.unique(pred)
    return np.setdiff1d(ids[ids != 0], np.unique(np.concatenate(faces)) if faces else [])


def _object_overlaps(truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None,
                     block: Block, spatial: tuple[int, ...], min_iou: float) -> ObjectOverlaps:
    """The block's object table; pairs of objects wholly in it that cannot match are left
    out, and such objects with no pair are only counted (`ObjectOverlaps.of`)."""
    return ObjectOverlaps.of(truth, pred, valid, _whole_objects(pred, block, spatial), min_iou)


def _segmentation_block(block: Block, data: dict[str, np.ndarray], num_classes: int,
                        settings: dict[str, Any], ignore_label: int | None,
                        crops: bool, spatial: tuple[int, ...],
                        iou_threshold: float) -> dict[str, Any]:
    """What one block contributes: confusion matrices, object overlaps and, with `crops`,
    the montage's error map of the block."""
    truth = data["target"][0]
    valid = None if ignore_label is None else truth != ignore_label
    true_classes = (truth != 0).astype(np.int64) if num_classes == 2 else truth.astype(np.int64)
    otsu = data["otsu"]
    part = {
        "unet": confusion(_classes(data, settings, num_classes), true_classes, valid, num_classes),
        "otsu": confusion((otsu != 0).astype(np.int64), (true_classes != 0).astype(np.int64),
                          valid, 2),
        "excluded": 0 if valid is None else int(valid.size - np.count_nonzero(valid)),
    }
    if num_classes == 2:
        min_iou = min(0.5, iou_threshold)  # the lowest IoU scored (mean AP: 0.5 to 0.95)
        part["unet_objects"] = _object_overlaps(truth, data["objects"], valid, block, spatial,
                                                min_iou)
        part["otsu_objects"] = _object_overlaps(truth, otsu, valid, block, spatial, min_iou)
    if crops:
        part["crop_error"] = montage_error("segmentation", data["labels"], data["target"],
                                           ignore_label)
    return part


def _merge_segmentation(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return part
    for key, value in part.items():
        total[key] = value + total[key] if key in ("unet", "otsu", "excluded") \
            else total[key].merge(value)
    return total


def _method_scores(matrix: np.ndarray, objects: ObjectOverlaps | None,
                   iou_threshold: float) -> dict[str, Any]:
    scores: dict[str, Any] = class_scores_from_confusion(matrix)
    if objects is not None:
        matching = objects.scores(iou_threshold)
        scores.update({k: matching[k] for k in ("precision", "recall", "f1", "mean_ap")})
        scores["instance_matching"] = matching
    return scores


def score_segmentation(pred: dict[str, da.Array], image: da.Array, target: da.Array,
                       num_classes: int, predict_settings: dict[str, Any],
                       ignore_label: int | None, iou_threshold: float, scratch: Path,
                       block_pixels: int = DEFAULT_BLOCK_PIXELS, workers: int = 1,
                       crops: CropScores | None = None) -> dict[str, Any]:
    """Scores of the model and of the Otsu baseline, block by block.

    `pred` as `open_prediction` gives it; `image` and `target` (C, *spatial). Same result as
    the in-memory definitions (`metrics.class_scores`, `metrics.instance_scores`,
    `metrics.otsu_instances`). `scratch`: a folder for the out-of-core object labels.
    """
    blocks, edge = _plan(pred["image"], block_pixels)
    threshold = otsu_threshold(image[0], edge, workers)
    arrays = {"labels": pred["labels"], "target": target,
              "otsu": otsu_objects(image[0], threshold, scratch / "otsu", edge, workers)}
    if num_classes == 2:
        arrays["objects"] = _model_objects(pred["labels"], predict_settings, scratch, edge,
                                           workers)
    if num_classes > 2 and predict_settings.get("instances", True) \
            and predict_settings.get("probabilities"):
        arrays["image"] = pred["image"]
    parts = map_blocks_ordered(
        lambda b, d: _segmentation_block(b, d, num_classes, predict_settings, ignore_label,
                                         crops is not None, tuple(target.shape[1:]),
                                         iou_threshold),
        arrays, blocks, workers)
    total = None
    for block, part in zip(blocks, parts, strict=True):
        _add_crop_error(crops, block, part)
        total = _merge_segmentation(total, part)
    return _segmentation_result(total, num_classes, predict_settings, iou_threshold)


def _add_crop_error(crops: CropScores | None, block: Block, part: dict[str, Any]) -> None:
    """Sum a block's montage errors into `crops`, in the consuming thread (in block order)."""
    error = part.pop("crop_error", None)
    if crops is not None:
        crops.add(block.core, *error)


def _segmentation_result(total: dict[str, Any], num_classes: int, settings: dict[str, Any],
                         iou_threshold: float) -> dict[str, Any]:
    instance_target = num_classes == 2 and total["unet_objects"].true_objects > 1
    scores = {
        "unet": _method_scores(total["unet"], total["unet_objects"] if instance_target else None,
                               iou_threshold),
        # Otsu separates foreground from background only: scored as a two-class answer.
        "otsu": _method_scores(total["otsu"], total["otsu_objects"] if instance_target else None,
                               iou_threshold),
    }
    notes, warnings = _class_notes(settings, num_classes), []
    if not total["unet"][1:].any():  # rows: the true classes
        warnings.append("the target has no foreground pixel: every overlap score is 0 or "
                        "undefined for the model and the baselines alike, so they say "
                        "nothing about the model; check the target")
    if not instance_target:
        notes.append("instance metrics skipped: the target is not an instance label image "
                     "(binary task with more than one object id)")
    return {"scores": scores, "notes": notes, "warnings": warnings,
            "instance_target": instance_target, "excluded_pixels": int(total["excluded"])}


# --- regression ---------------------------------------------------------------------------
def gaussian_reach(sigma: float, spacing: tuple[float, ...]) -> tuple[int, ...]:
    """How far, per spatial axis, the tuned Gaussian (`metrics.gaussian_smooth`: scipy's
    gaussian_filter, truncated at 4 sigma, sigma scaled by the pixel size) reaches."""
    return tuple(int(4.0 * (sigma * spacing[-1] / s) + 0.5) for s in spacing)


def baseline_reach(baselines: dict[str, dict[str, Any]], spacing: tuple[float, ...]
                   ) -> tuple[int, ...]:
    """How far, per spatial axis, the furthest-reaching tuned baseline looks: the halo with
    which each block is read so that a baseline's values on the block equal the whole
    image's. Gaussian: 4 sigma (`gaussian_reach`); non-local means: its search window plus
    half a patch (`metrics.nlm_reach`; equal to float rounding, 2e-7 measured); total
    variation: one pixel per iteration (`metrics.tv_reach`; it runs a fixed number of
    iterations, so equal too)."""
    ndim = len(spacing)
    reach = [(0,) * ndim]
    if "gaussian" in baselines:
        reach.append(gaussian_reach(baselines["gaussian"]["sigma"], spacing))
    if "tv" in baselines:
        reach.append((tv_reach(),) * ndim)
    if "nlm" in baselines:
        reach.append((nlm_reach(ndim),) * ndim)
    return tuple(max(r[axis] for r in reach) for axis in range(ndim))


def _baseline_values(image: np.ndarray, baselines: dict[str, dict[str, Any]],
                     spacing: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Each tuned baseline applied to the input read over a block and its halo."""
    found = {}
    if "gaussian" in baselines:
        found["gaussian"] = gaussian_smooth(image, baselines["gaussian"]["sigma"], spacing)
    if "tv" in baselines:
        found["tv"] = tv_denoise(image, baselines["tv"]["weight"], baselines["tv"]["noise_sd"])
    if "nlm" in baselines:
        found["nlm"] = nlm_denoise(image, baselines["nlm"]["h"], baselines["nlm"]["noise_sd"])
    return found


def _target_range(target: da.Array, blocks: list[Block], workers: int) -> float:
    """max - min of the target over all channels (0 for a constant target): one pass."""
    low, high = np.inf, -np.inf
    for lo, hi in map_blocks_ordered(lambda b, d: (float(d["t"].min()), float(d["t"].max())),
                                     {"t": target}, blocks, workers):
        low, high = min(low, lo), max(high, hi)
    return high - low


def _ssim_view(block: Block, halo: int, spatial: tuple[int, ...]) -> tuple[Block, tuple]:
    """The block grown by SSIM's halo only, and where that lies in arrays read over the
    block's (larger) extended region."""
    grown = tuple(slice(max(0, c.start - halo), min(n, c.stop + halo))
                  for c, n in zip(block.core, spatial, strict=True))
    view = tuple(slice(g.start - e.start, g.stop - e.start)
                 for g, e in zip(grown, block.extended, strict=True))
    return Block(block.core, grown), (..., *view)


def _regression_block(block: Block, data: dict[str, np.ndarray], spatial: tuple[int, ...],
                      data_range: float, win: int, baselines: dict[str, dict[str, Any]],
                      spacing: tuple[float, ...], crops: bool) -> dict[str, Any]:
    """What one block contributes for each method: its sums and its SSIM sum."""
    target = data["target"]
    methods = {"unet": data["pred"]}
    if "image" in data:
        methods["input"] = data["image"]
        methods.update(_baseline_values(data["image"], baselines, spacing))
    ssim_block, view = _ssim_view(block, (win - 1) // 2, spatial)
    ssim = SsimSum.of_each({name: values[view] for name, values in methods.items()},
                           target[view], ssim_block, spatial, data_range, win)
    part: dict[str, Any] = {
        name: (RegressionSums.of(_core(values, block), _core(target, block)), ssim[name])
        for name, values in methods.items()}
    if crops:
        part["crop_error"] = montage_error("regression", _core(data["pred"], block),
                                           _core(target, block), None)
    return part


def score_regression(pred: da.Array, image: da.Array, target: da.Array,
                     baselines: dict[str, dict[str, Any]] | None, spacing: tuple[float, ...],
                     block_pixels: int = DEFAULT_BLOCK_PIXELS, workers: int = 1,
                     crops: CropScores | None = None) -> dict[str, Any]:
    """Scores of the model, the input and the tuned baselines (`evaluate.read_baselines`:
    gaussian, tv, nlm, those given) against the target, block by block, all with the
    target's range; equal to `metrics.regression_scores` on whole arrays, each baseline
    applied to the whole input."""
    spatial = tuple(target.shape[1:])
    data_range = _target_range(target, _plan(target, block_pixels)[0], workers)
    notes, warnings = [], []
    if data_range == 0:
        warnings.append("the target is constant: PSNR and SSIM are measured with a data range "
                        "of 1, and the scores of the model and the baselines say little; "
                        "check the target")
        data_range = 1.0
    with_input = image.shape == target.shape
    if not with_input:
        notes.append(f"baselines skipped: input shape {image.shape} differs from target "
                     f"shape {target.shape}")
    elif baselines is None:
        notes.append("tuned baselines (gaussian, tv, nlm) skipped: none given")
    baselines = baselines if with_input and baselines else {}
    win = ssim_window(spatial)
    reach = baseline_reach(baselines, spacing)
    blocks, _ = _plan(pred, block_pixels, tuple((win - 1) // 2 + r for r in reach))
    arrays = {"pred": pred, "target": target, **({"image": image} if with_input else {})}
    parts = map_blocks_ordered(
        lambda b, d: _regression_block(b, d, spatial, data_range, win, baselines, spacing,
                                       crops is not None), arrays, blocks, workers)
    total: dict[str, tuple[RegressionSums, SsimSum]] = {}
    for block, part in zip(blocks, parts, strict=True):
        _add_crop_error(crops, block, part)
        for name, (sums, ssim) in part.items():
            old = total.get(name)
            total[name] = (sums, ssim) if old is None else (old[0].merge(sums), old[1].merge(ssim))
    scores = {name: sums.scores(data_range, ssim.value()) for name, (sums, ssim) in total.items()}
    for name, parameters in baselines.items():
        scores[name].update({k: v for k, v in parameters.items() if k != "noise_sd"})
    return {"scores": scores, "notes": notes, "warnings": warnings, "data_range": data_range}


# --- one prediction -----------------------------------------------------------------------
def score_prediction(prediction: str, image: str, target: str, task: str,
                     settings: dict[str, Any], num_classes: int, channels: list | None,
                     where: str, baselines: dict[str, dict[str, Any]] | None = None,
                     provenance: dict[str, Any] | None = None, crop_size: int | None = None,
                     scratch_dir: str | Path | None = None) -> dict[str, Any]:
    """Scores of the prediction and the baselines against the target, written nowhere.

    What `evaluate.evaluate_prediction` writes for one image, and what `evaluate_positions`
    records for each position of a plate or collection: {"level", "scores", "notes", ...}.
    `settings`: the evaluate section (ignore_label, iou_threshold; block_pixels and workers,
    how the passes run). `where` names the image in errors; `baselines` are the tuned
    baselines (regression: `evaluate.read_baselines`); `provenance` replaces the
    prediction's own (None: read it from the store).
    With `crop_size`, the result's "crop_scores" holds the montage's per-crop errors
    (`figures.CropScores`). Object labels go to a scratch folder in `scratch_dir` (None: the
    system's temporary folder), removed at the end.
    """
    provenance = prediction_provenance(prediction) if provenance is None else provenance
    said_before = len(notices.recorded())
    level = prediction_level(provenance)
    pred = open_prediction(prediction, task, provenance)
    img = open_image(image, level)
    image_arr = channel_first(img, channels)
    target_image = open_image(target, level)
    warn_missing_chunks(target_image, "target")
    target_arr = channel_first(target_image)
    shape = tuple(pred["image"].shape[1:])
    _check_same_shape(f"target {target}", tuple(target_arr.shape[1:]), shape, where)
    _check_same_shape(f"image {image}", tuple(image_arr.shape[1:]), shape, where)
    run = {"block_pixels": int(settings.get("block_pixels") or DEFAULT_BLOCK_PIXELS),
           "workers": int(settings.get("workers") or 1)}
    crops = CropScores(shape, crop_size) if crop_size else None
    if task == "segmentation":
        with tempfile.TemporaryDirectory(prefix=".unetflow-scratch-", dir=scratch_dir) as tmp:
            result = score_segmentation(pred, image_arr, target_arr, num_classes,
                                        provenance.get("predict", {}), settings["ignore_label"],
                                        settings["iou_threshold"], Path(tmp), crops=crops, **run)
        result["objects"] = provenance.get("objects") or ("connected components of the "
                                                          "predicted foreground")
    else:
        spacing = tuple(img.spatial_scale()[a] for a in img.spatial_axes)
        result = score_regression(pred["image"], image_arr, target_arr, baselines, spacing,
                                  crops=crops, **run)
    result["warnings"] = _inherited_warnings(provenance) + notices.recorded()[said_before:] + [
        _said(f"{where}: {w}") for w in result["warnings"]]
    return {"level": level, **result, **({"crop_scores": crops} if crops is not None else {})}


def _inherited_warnings(provenance: dict[str, Any]) -> list[str]:
    """What normalize and predict warned about the data this prediction comes from: they
    change what its scores mean (a constant channel, chunks read as fill value, statistics
    from a sample), so the metrics and the report carry them."""
    stats = provenance.get("normalization") or {}
    found = [*stats.get("warnings", []), *provenance.get("warnings", [])]
    return list(dict.fromkeys(str(w) for w in found))


def _said(message: str) -> str:
    notices.warn(message)
    return message
