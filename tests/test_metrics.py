"""Metrics against values computed by hand on small arrays."""

import math

import numpy as np
import pytest
from scipy import ndimage

from unetflow.metrics import (
    AP_THRESHOLDS,
    class_scores,
    gaussian_smooth,
    instance_scores,
    label_objects,
    otsu_instances,
    regression_scores,
    ssim,
    tune_gaussian_sigma,
)


def spike(y: int, x: int) -> np.ndarray:
    image = np.zeros((1, 8, 8), np.float32)
    image[0, y, x] = 1.0
    return image


# --- regression ---------------------------------------------------------------------------
def test_regression_perfect_prediction():
    target = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    scores = regression_scores(target.copy(), target)
    assert scores["psnr"] == math.inf
    assert scores["ssim"] == pytest.approx(1.0)
    assert scores["mae"] == 0.0
    assert scores["pearson_r"] == pytest.approx(1.0)


def test_regression_spatially_shifted_spike():
    # Two of 64 pixels differ by 1: MSE 2/64, R = 1 -> PSNR 10 log10(32).
    # Pearson: cov = 0 - 64 m^2 = -1/64, var = 1 - 1/64 each -> r = -1/63.
    scores = regression_scores(spike(3, 4), spike(3, 3))
    assert scores["psnr"] == pytest.approx(10 * math.log10(32))
    assert scores["mae"] == pytest.approx(2 / 64)
    assert scores["pearson_r"] == pytest.approx(-1 / 63)
    assert scores["data_range"] == 1.0


def test_regression_intensity_shift():
    target = np.broadcast_to(np.arange(8, dtype=np.float32), (1, 8, 8)).copy()
    scores = regression_scores(target + 1, target)
    assert scores["psnr"] == pytest.approx(20 * math.log10(7))  # MSE 1, R = 7
    assert scores["mae"] == pytest.approx(1.0)
    assert scores["pearson_r"] == pytest.approx(1.0)


def test_regression_empty_prediction():
    scores = regression_scores(np.zeros((1, 8, 8), np.float32), spike(3, 3))
    assert scores["psnr"] == pytest.approx(10 * math.log10(64))  # MSE 1/64, R = 1
    assert scores["mae"] == pytest.approx(1 / 64)
    assert scores["pearson_r"] is None  # a constant image has no correlation


def test_ssim_of_constant_images_by_formula():
    # Constant images: every window has mu_x = b, mu_y = a, no variance, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 R)^2.
    a, b, c1 = 0.5, 0.25, (0.01 * 1.0) ** 2
    value = ssim(np.full((1, 9, 9), b), np.full((1, 9, 9), a), data_range=1.0)
    assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


# --- semantic segmentation ----------------------------------------------------------------
def square(x0: int, y0: int = 2, size: int = 4, shape=(10, 10)) -> np.ndarray:
    out = np.zeros(shape, np.int64)
    out[y0:y0 + size, x0:x0 + size] = 1
    return out


def test_class_scores_perfect_shifted_and_empty():
    truth = square(2)
    perfect = class_scores(truth, truth, 2)
    assert perfect == {"foreground_iou": 1.0, "foreground_dice": 1.0, "iou_class_0": 1.0,
                       "dice_class_0": 1.0, "iou_class_1": 1.0, "dice_class_1": 1.0}
    # 4x4 squares one pixel apart: overlap 12, union 20; background overlap 80, union 88.
    shifted = class_scores(square(3), truth, 2)
    assert shifted["iou_class_1"] == pytest.approx(12 / 20)
    assert shifted["dice_class_1"] == pytest.approx(24 / 32)
    assert shifted["iou_class_0"] == pytest.approx(80 / 88)
    assert shifted["dice_class_0"] == pytest.approx(160 / 168)
    empty = class_scores(np.zeros_like(truth), truth, 2)
    assert empty["foreground_iou"] == 0.0 and empty["foreground_dice"] == 0.0
    assert empty["iou_class_0"] == pytest.approx(84 / 100)
    assert empty["dice_class_0"] == pytest.approx(168 / 184)


def test_class_absent_from_both_scores_one_and_ignored_pixels_do_not_count():
    truth = square(2)
    pred = square(3)
    valid = np.ones(truth.shape, bool)
    valid[:, 6] = False  # the one column where the prediction sticks out
    scores = class_scores(pred, truth, 3, valid)
    assert scores["iou_class_1"] == pytest.approx(12 / 16)  # union loses the 4 FP pixels
    assert scores["iou_class_2"] == 1.0


# --- instance segmentation ----------------------------------------------------------------
def constructed_instances():
    """A: found exactly; B (5x5): found one pixel off, IoU 20/30; C: missed (a small
    prediction overlaps it at IoU 1/7); D: a false positive."""
    truth = np.zeros((20, 20), np.int32)
    pred = np.zeros((20, 20), np.int32)
    truth[1:5, 1:5] = 1
    pred[1:5, 1:5] = 7
    truth[1:6, 10:15] = 2
    pred[1:6, 11:16] = 3
    truth[10:12, 2:4] = 5
    pred[11:13, 3:5] = 9
    pred[15:19, 15:19] = 4
    return truth, pred


def test_instance_matching_constructed_case():
    truth, pred = constructed_instances()
    at_half = instance_scores(truth, pred, threshold=0.5)
    assert (at_half["tp"], at_half["fp"], at_half["fn"]) == (2, 2, 1)
    assert at_half["precision"] == pytest.approx(0.5)
    assert at_half["recall"] == pytest.approx(2 / 3)
    assert at_half["f1"] == pytest.approx(4 / 7)
    assert instance_scores(truth, pred, threshold=0.65)["tp"] == 2  # IoU 0.667 still matches
    assert instance_scores(truth, pred, threshold=0.7)["tp"] == 1
    scores = instance_scores(truth, pred)
    # AP = TP/(TP+FP+FN): 2/5 at 0.50-0.65 (4 thresholds), 1/6 at 0.70-0.95 (6 thresholds).
    assert scores["ap_per_threshold"]["0.50"] == pytest.approx(0.4)
    assert scores["ap_per_threshold"]["0.95"] == pytest.approx(1 / 6)
    assert scores["mean_ap"] == pytest.approx((4 * 0.4 + 6 / 6) / 10)
    assert len(scores["ap_per_threshold"]) == len(AP_THRESHOLDS) == 10


def test_one_object_matches_only_once():
    truth = np.zeros((4, 8), np.int32)
    truth[:, :] = 1
    pred = np.zeros((4, 8), np.int32)
    pred[:, :4], pred[:, 4:] = 1, 2  # two halves, each at IoU exactly 0.5
    result = instance_scores(truth, pred, threshold=0.5)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)


def test_perfect_empty_and_nothing_at_all():
    truth, _ = constructed_instances()
    perfect = instance_scores(truth, truth * 3)  # other ids, same objects
    assert perfect["mean_ap"] == 1.0 and perfect["f1"] == 1.0
    empty = instance_scores(truth, np.zeros_like(truth))
    assert (empty["tp"], empty["fp"], empty["fn"]) == (0, 0, 3)
    assert empty["precision"] == 0.0 and empty["recall"] == 0.0 and empty["mean_ap"] == 0.0
    nothing = instance_scores(np.zeros_like(truth), np.zeros_like(truth))
    assert nothing["mean_ap"] == 1.0 and nothing["f1"] == 1.0


def test_ignored_pixels_remove_objects_inside_them():
    truth, pred = constructed_instances()
    valid = np.ones(truth.shape, bool)
    valid[14:20, 14:20] = False  # the false positive D lies in an ignored region
    result = instance_scores(truth, pred, valid, threshold=0.5)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 1)


def test_otsu_instances_finds_two_bright_blobs():
    image = np.zeros((32, 32), np.float32)
    image[4:10, 4:10] = 10
    image[20:28, 18:26] = 10
    image += np.random.default_rng(1).uniform(0, 1, image.shape).astype(np.float32)
    labels = otsu_instances(image)
    assert labels.max() == 2
    assert (labels[6, 6] != 0) and (labels[24, 22] != 0) and labels[0, 0] == 0


def test_label_objects_joins_faces_not_corners():
    foreground = np.zeros((5, 5), bool)
    foreground[0, 0] = foreground[1, 1] = True  # touch at a corner only: two objects
    foreground[3, 2:5] = True  # one object along a row
    labels = label_objects(foreground)
    assert labels.dtype == np.uint32 and labels.max() == 3
    assert labels[0, 0] != labels[1, 1] and len(np.unique(labels[3, 2:5])) == 1


# --- Gaussian baseline --------------------------------------------------------------------
def test_gaussian_smooth_scales_sigma_by_pixel_size():
    volume = np.random.default_rng(2).random((1, 6, 12, 12)).astype(np.float32)
    smoothed = gaussian_smooth(volume, 2.0, spacing=(2.0, 0.5, 0.5))
    expected = ndimage.gaussian_filter(volume, (0, 0.5, 2.0, 2.0), mode="reflect")
    np.testing.assert_allclose(smoothed, expected, rtol=1e-6)


def test_tuned_sigma_recovers_the_blur_that_made_the_target():
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(2):
        image = rng.random((1, 32, 32)).astype(np.float32)
        pairs.append((image, gaussian_smooth(image, 2.0)))
    result = tune_gaussian_sigma(pairs, [0.5, 1.0, 2.0, 4.0])
    assert result["sigma"] == 2.0
    assert result["mse_by_sigma"]["2"] == pytest.approx(0.0, abs=1e-12)
    assert result["mse_by_sigma"]["1"] > 0
