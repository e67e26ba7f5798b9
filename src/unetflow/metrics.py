"""Image metrics as pure functions on numpy arrays: no files, no config.

Regression (prediction and target in the same intensity units, shape (C, *spatial)):
  - PSNR = 10 log10(R² / MSE) in dB, with R the data range (the target's max - min unless
    given); +inf for a perfect prediction.
  - SSIM: scikit-image's `structural_similarity` with the same data range R, 7-pixel uniform
    window, computed per channel and averaged.
  - MAE = mean |prediction - target|; Pearson r over all pixels (None when either is constant).

Semantic segmentation (integer class maps): per class k, IoU = |P∩T| / |P∪T| and
Dice = 2|P∩T| / (|P| + |T|); both are 1.0 when the class is absent from prediction and target.

Instance segmentation (integer label images, 0 = background): predicted and true objects are
paired by IoU; a pair matches at threshold τ when IoU ≥ τ, each object matching at most once
(for τ > 0.5 the pairing is unique; ties at exactly 0.5 go to the higher IoU). With TP matched
pairs, FP unmatched predictions and FN unmatched true objects:
  precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN), and
  AP_τ = TP/(TP+FP+FN) (the StarDist / Cellpose / DSB 2018 definition, not the area under a
  precision-recall curve); mean AP averages AP_τ over τ = 0.50, 0.55, ..., 0.95.
A ratio with a zero denominator is 1.0 when there are no objects at all (nothing to find and
nothing found) and 0.0 otherwise.

Pixels where `valid` is False (the target's `ignore_label`) are left out of every metric:
instance pixels there are set to background in both images before objects are measured.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "AP_THRESHOLDS",
    "psnr",
    "ssim_window",
    "ssim",
    "pearson_r",
    "regression_scores",
    "iou_dice",
    "class_scores",
    "instance_overlaps",
    "match_scores",
    "instance_scores",
    "otsu_instances",
    "label_objects",
    "gaussian_smooth",
    "tune_gaussian_sigma",
    "TV_ITERATIONS",
    "noise_sd",
    "tv_denoise",
    "tv_reach",
    "nlm_patch",
    "nlm_denoise",
    "nlm_reach",
    "tune_candidates",
]

AP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _ratio(numerator: float, denominator: float, nothing_at_all: bool) -> float:
    if denominator:
        return float(numerator / denominator)
    return 1.0 if nothing_at_all else 0.0


# --- regression ---------------------------------------------------------------------------
def psnr(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB for the data range `data_range`."""
    mse = float(np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2))
    return float(10 * np.log10(data_range**2 / mse)) if mse > 0 else math.inf


def ssim_window(spatial_shape: tuple[int, ...]) -> int:
    """SSIM's window edge for an image: 7 (scikit-image's default), or the largest odd size
    that fits a small image. One function, so the in-memory and the streaming SSIM agree."""
    smallest = min(spatial_shape)
    win = min(7, smallest if smallest % 2 else smallest - 1)
    if win < 3:
        raise ValueError(f"SSIM needs at least 3 pixels along each axis, got {spatial_shape}")
    return win


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float) -> float:
    """Mean SSIM over channels of (C, *spatial) arrays, with the given data range: the metric.

    scikit-image's `structural_similarity` with its 7-pixel uniform window (the largest odd
    size that fits an image thinner than that). The training loss term is a different SSIM,
    `unetflow.losses.ssim_gaussian11`.
    """
    from skimage.metrics import structural_similarity

    win = ssim_window(target.shape[1:])
    return float(np.mean([
        structural_similarity(p.astype(np.float64), t.astype(np.float64),
                              data_range=data_range, win_size=win)
        for p, t in zip(pred, target, strict=True)]))


def pearson_r(pred: np.ndarray, target: np.ndarray) -> float | None:
    """Pearson correlation over all pixels; None when either image is constant."""
    p = pred.astype(np.float64).ravel() - pred.mean(dtype=np.float64)
    t = target.astype(np.float64).ravel() - target.mean(dtype=np.float64)
    denominator = math.sqrt(float(p @ p) * float(t @ t))
    return float(p @ t / denominator) if denominator > 0 else None


def regression_scores(pred: np.ndarray, target: np.ndarray,
                      data_range: float | None = None) -> dict[str, Any]:
    """PSNR, SSIM, MAE and Pearson r of `pred` against `target`, both (C, *spatial)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if data_range is None:
        data_range = float(target.max()) - float(target.min()) or 1.0
    mae = float(np.mean(np.abs(pred.astype(np.float64) - target.astype(np.float64))))
    return {"psnr": psnr(pred, target, data_range), "ssim": ssim(pred, target, data_range),
            "mae": mae, "pearson_r": pearson_r(pred, target), "data_range": float(data_range)}


# --- semantic segmentation ----------------------------------------------------------------
def iou_dice(intersection: int, predicted: int, true: int) -> tuple[float, float]:
    """IoU and Dice of a class from its pixel counts (both 1.0 when it is absent from both);
    shared with the streaming scores, which count pixels block by block."""
    empty = predicted == 0 and true == 0
    return (_ratio(intersection, predicted + true - intersection, empty),
            _ratio(2 * intersection, predicted + true, empty))


def _iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = int(np.count_nonzero(pred & truth))
    return iou_dice(inter, int(np.count_nonzero(pred)), int(np.count_nonzero(truth)))


def class_scores(pred_classes: np.ndarray, true_classes: np.ndarray, num_classes: int,
                 valid: np.ndarray | None = None) -> dict[str, float]:
    """IoU and Dice of each class 0..num_classes-1, and of the foreground (any class > 0)."""
    valid = np.ones(true_classes.shape, bool) if valid is None else valid
    pred, truth = pred_classes[valid], true_classes[valid]
    scores = {}
    scores["foreground_iou"], scores["foreground_dice"] = _iou_dice(pred != 0, truth != 0)
    for k in range(num_classes):
        scores[f"iou_class_{k}"], scores[f"dice_class_{k}"] = _iou_dice(pred == k, truth == k)
    return scores


# --- instance segmentation ----------------------------------------------------------------
def _sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 1..n (0 stays background), and n."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        return inverse.reshape(labels.shape) + 1, len(ids)
    return inverse.reshape(labels.shape), len(ids) - 1


def instance_overlaps(
    true_labels: np.ndarray, pred_labels: np.ndarray, valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Every overlapping (true, predicted) object pair with its IoU, as sparse arrays.

    Returns (true index, predicted index, IoU, number of true objects, number of predicted
    objects); indices count objects from 1. Memory grows with the number of overlapping
    pairs, not with the product of object counts.
    """
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"label shapes differ: target {true_labels.shape}, "
                         f"prediction {pred_labels.shape}")
    if valid is not None:
        true_labels, pred_labels = np.where(valid, true_labels, 0), np.where(valid, pred_labels, 0)
    t, n_true = _sequential(true_labels.ravel())
    p, n_pred = _sequential(pred_labels.ravel())
    t, p = t.astype(np.int64), p.astype(np.int64)
    true_area = np.bincount(t, minlength=n_true + 1)
    pred_area = np.bincount(p, minlength=n_pred + 1)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(t[both] * (n_pred + 1) + p[both], return_counts=True)
    ti, pi = pairs // (n_pred + 1), pairs % (n_pred + 1)
    iou = inter / (true_area[ti] + pred_area[pi] - inter)
    return ti, pi, iou, n_true, n_pred


def _count_matches(ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Matched pairs at IoU ≥ threshold, each object used once, higher IoU first."""
    keep = np.flatnonzero(iou >= threshold)
    if len(np.unique(ti[keep])) == len(np.unique(pi[keep])) == len(keep):
        return len(keep)  # no object in two pairs (always so above 0.5): every pair matches
    order = keep[np.argsort(-iou[keep], kind="stable")]
    used_true, used_pred, tp = set(), set(), 0
    for k in order:
        if ti[k] not in used_true and pi[k] not in used_pred:
            used_true.add(ti[k])
            used_pred.add(pi[k])
            tp += 1
    return tp


def _scores_at(tp: int, n_true: int, n_pred: int) -> dict[str, float]:
    fp, fn = n_pred - tp, n_true - tp
    nothing = n_true == 0 and n_pred == 0
    return {"tp": tp, "fp": fp, "fn": fn,
            "precision": _ratio(tp, tp + fp, nothing), "recall": _ratio(tp, tp + fn, nothing),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, nothing),
            "ap": _ratio(tp, tp + fp + fn, nothing)}


def match_scores(ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, n_true: int, n_pred: int,
                 threshold: float = 0.5) -> dict[str, Any]:
    """Matching at `threshold` (precision, recall, F1) and mean AP over τ = 0.5..0.95, from the
    overlapping pairs (`instance_overlaps`' result, or the streaming one's).

    Pairs must come in (true, predicted) order: ties in IoU go to the pair that comes first.
    """
    at = _scores_at(_count_matches(ti, pi, iou, threshold), n_true, n_pred)
    ap = {f"{tau:.2f}": _scores_at(_count_matches(ti, pi, iou, tau), n_true, n_pred)["ap"]
          for tau in AP_THRESHOLDS}
    return {"iou_threshold": threshold, "true_objects": n_true, "predicted_objects": n_pred,
            "tp": at["tp"], "fp": at["fp"], "fn": at["fn"], "precision": at["precision"],
            "recall": at["recall"], "f1": at["f1"], "ap_per_threshold": ap,
            "mean_ap": float(np.mean(list(ap.values())))}


def instance_scores(true_labels: np.ndarray, pred_labels: np.ndarray,
                    valid: np.ndarray | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """Matching at `threshold` (precision, recall, F1) and mean AP over τ = 0.5..0.95."""
    return match_scores(*instance_overlaps(true_labels, pred_labels, valid), threshold)


def label_objects(foreground: np.ndarray) -> np.ndarray:
    """Objects as the connected components (face connectivity) of a foreground mask, in memory.

    Not `unetflow.components.connected_components`, which labels a dask array out of core.
    """
    from scipy import ndimage

    labels, _ = ndimage.label(foreground)
    return labels.astype(np.uint32)


def otsu_instances(image: np.ndarray) -> np.ndarray:
    """The by-hand baseline: Otsu's threshold on `image`, then connected components."""
    from skimage.filters import threshold_otsu

    if float(image.min()) == float(image.max()):
        return np.zeros(image.shape, np.uint32)
    return label_objects(image > threshold_otsu(image))


# --- Gaussian baseline --------------------------------------------------------------------
SIGMA_REACH = 4  # scipy.ndimage.gaussian_filter's truncate: the kernel's reach in sigmas


def check_sigma_reach(sigmas: list[float], extent: int, where: str) -> None:
    """Refuse a Gaussian whose reach (4 sigma each side) exceeds an image of largest extent
    `extent`: it only averages the image, and its kernel grows with sigma (1e9: 60 GiB).
    Planning checks the same (checks._check_sigmas); this is the job's backstop."""
    wide = [s for s in sigmas if SIGMA_REACH * s > extent]
    if wide:
        raise ValueError(f"config key 'evaluate.gaussian_sigmas': sigma {wide[0]:g} px "
                         f"reaches {SIGMA_REACH * wide[0]:g} px (4 sigma), beyond {where} "
                         f"(largest extent {extent} px); a Gaussian that wide only averages "
                         f"the image: use sigmas up to {extent / SIGMA_REACH:g}")


def gaussian_smooth(image: np.ndarray, sigma: float,
                    spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Each channel of (C, *spatial) smoothed by a Gaussian of `sigma` pixels along the last
    axis, physically isotropic: axes with coarser `spacing` get proportionally less."""
    from scipy import ndimage

    spatial = image.ndim - 1
    spacing = spacing or (1.0,) * spatial
    sigmas = (0.0, *[sigma * spacing[-1] / s for s in spacing])
    return ndimage.gaussian_filter(image.astype(np.float32), sigmas, mode="reflect")


def tune_candidates(pairs: list[tuple[np.ndarray, np.ndarray]], candidates: list[float],
                    denoise: Callable[[np.ndarray, float], np.ndarray]
                    ) -> tuple[float, dict[str, float]]:
    """The candidate with the least mean squared error from `denoise(image, candidate)` to
    the target over `pairs` ((image, target) crops, each (C, *spatial)), and the MSE of
    every candidate (keys as `f"{c:g}"`), so the choice can be checked. Ties go to the
    candidate listed first."""
    if not pairs or not candidates:
        raise ValueError("tuning a baseline needs training crops and candidate values")
    mse = {}
    for value in candidates:
        errors = [np.mean((denoise(img, value) - tgt.astype(np.float32)) ** 2, dtype=np.float64)
                  for img, tgt in pairs]
        mse[float(value)] = float(np.mean(errors))
    best = min(mse, key=mse.get)
    return best, {f"{v:g}": e for v, e in mse.items()}


def tune_gaussian_sigma(pairs: list[tuple[np.ndarray, np.ndarray]], sigmas: list[float],
                        spacing: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The sigma with the least mean squared error from image to target over `pairs`.

    `pairs` are (image, target) crops of the training data, each (C, *spatial). Returns the
    chosen sigma and the MSE of every candidate, so the choice can be checked.
    """
    if not pairs or not sigmas:
        raise ValueError("tuning the Gaussian baseline needs training crops and candidate sigmas")
    best, mse = tune_candidates(pairs, sigmas, lambda img, s: gaussian_smooth(img, s, spacing))
    return {"sigma": best, "mse_by_sigma": mse}


# --- total-variation and non-local-means baselines ------------------------------------------
# Both work in units of each channel's noise standard deviation (`noise_sd`, estimated once
# on the tuning crops and kept in the baseline JSON): the TV weight and the NLM strength h
# are multiples of it, so one grid of candidates suits images of any intensity scale and
# noise level. Both ignore the pixel size (TV's differences and NLM's patches are isotropic
# in pixels; scikit-image offers no spacing), unlike the Gaussian.

TV_ITERATIONS = 10
"""Chambolle iterations of the TV baseline, fixed. scikit-image's default stopping rule
(energy change < 2e-4) stopped the demo's images after 10; a fixed count makes a pixel's
result depend only on pixels within TV_ITERATIONS px (each iteration's divergence and
gradient reach one pixel further), so TV computed block by block with that halo equals the
whole-image result exactly. With the stopping rule instead, each block stops at its own
iteration and blocks differ from the whole image by up to 0.35 noise sd (demo, any halo up
to 48 px). On a demo-like 1024² image, tuned: MSE 0.69 with 10 fixed iterations against
0.74 with the stopping rule, so the fixed count is no weaker a baseline."""

NLM_PATCH = {2: (5, 6), 3: (3, 3)}
"""(patch_size, patch_distance) of the NLM baseline by spatial dimensions: scikit-image's
defaults in 2D (5, 6: 0.5-0.6 Mpx/s on one core here); in 3D, 3 and 3 (0.17 Mvoxel/s here,
twice as fast as 3 and 4, and better on a demo-like stack: MSE 1.57 against 1.89). TV runs
at about 5 Mpx/s in 2D and 3D."""

_MAD_TO_SD = 0.6744897501960817  # the median of |N(0, 1)|


def _haar_details(image: np.ndarray) -> np.ndarray:
    """The finest diagonal Haar wavelet coefficients of a (*spatial) array (the detail along
    every axis at once): pure noise of the same sd where the image is smooth."""
    image = np.asarray(image, np.float64)
    image = image[tuple(slice(0, n - n % 2) for n in image.shape)]
    details = np.zeros([n // 2 for n in image.shape])
    for offsets in itertools.product((0, 1), repeat=image.ndim):
        details += (-1) ** sum(offsets) * image[tuple(slice(o, None, 2) for o in offsets)]
    return (details / 2 ** (image.ndim / 2)).ravel()


def noise_sd(images: list[np.ndarray]) -> float:
    """The noise standard deviation of (*spatial) arrays of one channel, estimated from the
    images alone: the median absolute finest diagonal Haar coefficient / 0.6745 (Donoho and
    Johnstone's estimator, as `skimage.restoration.estimate_sigma`, which needs PyWavelets,
    computes it with a db2 wavelet), pooled over all `images`. When more than half the
    coefficients are 0 (flat or synthetic images), their root mean square stands in; 1.0
    for constant images, so the baselines' units are always positive."""
    details = np.concatenate([_haar_details(image) for image in images])
    estimate = float(np.median(np.abs(details))) / _MAD_TO_SD if details.size else 0.0
    if estimate <= 0 and details.size:
        estimate = float(np.sqrt(np.mean(details**2)))
    return estimate if estimate > 0 and math.isfinite(estimate) else 1.0


def _per_channel(image: np.ndarray, noise: list[float] | None,
                 denoise: Callable[[np.ndarray, float], np.ndarray]) -> np.ndarray:
    """`denoise(channel, sd)` on each channel of (C, *spatial), as float32."""
    noise = [1.0] * image.shape[0] if noise is None else list(noise)
    if len(noise) != image.shape[0]:
        raise ValueError(f"{len(noise)} noise levels given for an image of {image.shape[0]} "
                         f"channels")
    return np.stack([denoise(channel.astype(np.float32), float(sd))
                     for channel, sd in zip(image, noise, strict=True)]).astype(np.float32)


def tv_denoise(image: np.ndarray, weight: float, noise: list[float] | None = None,
               iterations: int = TV_ITERATIONS) -> np.ndarray:
    """Each channel of (C, *spatial) denoised by total variation (scikit-image's
    `denoise_tv_chambolle`, `iterations` iterations exactly), with the weight `weight` x the
    channel's noise sd (`noise`, one per channel; None: `weight` in intensity units)."""
    from skimage.restoration import denoise_tv_chambolle

    return _per_channel(image, noise, lambda ch, sd: denoise_tv_chambolle(
        ch, weight=weight * sd, eps=0.0, max_num_iter=iterations))


def tv_reach(iterations: int = TV_ITERATIONS) -> int:
    """How far (pixels, each axis) a pixel of `tv_denoise` looks: one pixel per iteration."""
    return iterations


def nlm_patch(spatial_dims: int) -> tuple[int, int]:
    """(patch_size, patch_distance) of the NLM baseline for 2D or 3D images."""
    if spatial_dims not in NLM_PATCH:
        raise ValueError(f"non-local means takes 2D or 3D images, not {spatial_dims}D")
    return NLM_PATCH[spatial_dims]


def nlm_denoise(image: np.ndarray, h: float, noise: list[float] | None = None) -> np.ndarray:
    """Each channel of (C, *spatial) denoised by non-local means (scikit-image's
    `denoise_nl_means`, fast mode, patches of `nlm_patch`), with strength h = `h` x the
    channel's noise sd and that sd as the noise level it discounts (`noise`, one per
    channel; None: `h` in intensity units, no noise discounted)."""
    from skimage.restoration import denoise_nl_means

    size, distance = nlm_patch(image.ndim - 1)
    return _per_channel(image, noise, lambda ch, sd: denoise_nl_means(
        ch, h=h * sd, sigma=sd if noise is not None else 0.0, patch_size=size,
        patch_distance=distance, fast_mode=True))


def nlm_reach(spatial_dims: int) -> int:
    """How far (pixels, each axis) a pixel of `nlm_denoise` looks: its search window plus
    half a patch. Computed block by block with that halo, NLM equals the whole image's."""
    size, distance = nlm_patch(spatial_dims)
    return distance + size // 2
