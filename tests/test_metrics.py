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
    nlm_denoise,
    nlm_reach,
    noise_sd,
    otsu_instances,
    regression_scores,
    ssim,
    tune_candidates,
    tune_gaussian_sigma,
    tv_denoise,
    tv_reach,
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


# --- total-variation and non-local-means baselines ------------------------------------------
@pytest.mark.parametrize("shape", [(96, 80), (12, 40, 36)])
def test_noise_sd_finds_the_noise_of_an_image_with_structure(shape):
    rng = np.random.default_rng(4)
    smooth = ndimage.gaussian_filter(rng.uniform(0, 100, shape), 4)
    noisy = smooth + rng.normal(0, 2.5, shape)
    assert noise_sd([noisy]) == pytest.approx(2.5, rel=0.08)
    assert noise_sd([noisy[:40], noisy[40:]]) == pytest.approx(2.5, rel=0.08)  # pooled
    assert noise_sd([np.full(shape, 7.0)]) == 1.0  # constant: a unit that stays positive


def demo_like(shape, seed):
    """The demo's synthetic nuclei: the noisy recording (C=1) and its clean scene."""
    from unetflow.demo import synthesize_nuclei

    drawn = synthesize_nuclei(shape, seed)
    return drawn.noisy[None].astype(np.float32), drawn.clean[None]


def blockwise(image, denoise, halo, chunk):
    """`denoise` applied chunk by chunk to the image read with `halo` more pixels each side
    (dask's map_overlap, no padding at the image's edge), as evaluate does."""
    import dask.array as da

    chunks = (1, *(min(chunk, n) for n in image.shape[1:]))
    return da.from_array(image, chunks=chunks).map_overlap(
        denoise, depth=(0, *(halo,) * (image.ndim - 1)), boundary="none",
        dtype=np.float32).compute()


@pytest.mark.parametrize("shape,chunk", [((192, 160), 64), ((32, 48, 40), 16)])
def test_blockwise_nlm_and_tv_equal_the_whole_image(shape, chunk):
    """NLM reads its search window plus half a patch; TV runs a fixed 10 iterations, each
    reaching one pixel further: with those halos, block by block equals the whole image
    (to float rounding; measured 2e-7 for NLM on values up to 50, 0 for TV)."""
    image, _ = demo_like(shape, seed=3)
    noise = [noise_sd([image[0]])]
    for denoise, halo in [(lambda b: nlm_denoise(b, 1.0, noise), nlm_reach(len(shape))),
                          (lambda b: tv_denoise(b, 2.0, noise), tv_reach())]:
        whole = denoise(image)
        np.testing.assert_allclose(blockwise(image, denoise, halo, chunk), whole,
                                   rtol=0, atol=1e-5)
    short = blockwise(image, lambda b: tv_denoise(b, 2.0, noise), tv_reach() // 2, chunk)
    assert np.abs(short - tv_denoise(image, 2.0, noise)).max() > 1e-3  # the halo matters


def test_tv_and_nlm_work_per_channel_in_units_of_each_channels_noise():
    image, clean = demo_like((64, 64), seed=5)
    scaled = np.concatenate([image, 10 * image])  # channel 1: ten times the intensities
    sd = noise_sd([image[0]])
    for denoise, value in [(tv_denoise, 2.0), (nlm_denoise, 1.0)]:
        out = denoise(scaled, value, [sd, 10 * sd])
        assert out.dtype == np.float32 and out.shape == scaled.shape
        np.testing.assert_allclose(out[1], 10 * out[0], rtol=1e-4, atol=1e-3)
        assert np.mean((out[0] - clean[0]) ** 2) < 0.5 * np.mean((image - clean) ** 2)


def test_tuning_picks_the_candidate_of_least_squared_error():
    """Oracle: the MSE of every candidate computed by hand on a tiny pair, the least one
    chosen; ties go to the first listed."""
    image, clean = demo_like((48, 48), seed=6)
    pairs = [(image[:, :24], clean[:, :24]), (image[:, 24:], clean[:, 24:])]
    sd = [noise_sd([image[0]])]
    candidates = [0.25, 1.0, 2.0, 4.0, 16.0]

    def by_hand(value):
        return np.mean([np.mean((tv_denoise(i, value, sd) - t) ** 2, dtype=np.float64)
                        for i, t in pairs])

    best, mse = tune_candidates(pairs, candidates, lambda i, v: tv_denoise(i, v, sd))
    expected = {f"{v:g}": by_hand(v) for v in candidates}
    assert mse == pytest.approx(expected, rel=1e-12)
    assert best == min(candidates, key=by_hand) and best not in (0.25, 16.0)
    assert tune_candidates(pairs, [3.0, 3.0], lambda i, v: i)[0] == 3.0
    with pytest.raises(ValueError, match="candidate values"):
        tune_candidates(pairs, [], lambda i, v: i)
