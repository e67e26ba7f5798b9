"""Metrics summed over blocks against the in-memory oracle (`unetflow.metrics`) on the same
small arrays, split into blocks that do not divide them."""

from functools import reduce

import numpy as np
import pytest
from scipy import ndimage

from unetflow.blockwise import plan_blocks
from unetflow.metric_sums import (
    ObjectOverlaps,
    RegressionSums,
    SsimSum,
    class_scores_from_confusion,
    confusion,
    ssim_window,
)
from unetflow.metrics import class_scores, instance_scores, regression_scores, ssim

SHAPES = [((37, 41), (16, 16)), ((9, 13, 11), (4, 8, 5))]  # (image, block): 2D and 3D, odd


def core(array: np.ndarray, block) -> np.ndarray:
    return array[(..., *block.core)]


def regression_pair(spatial: tuple[int, ...], channels: int, offset: float = 0.0, seed: int = 0):
    """A smooth target and a noisy, biased prediction of it, (C, *spatial) float32."""
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.random((channels, *spatial)), (0, *[2] * len(spatial)))
    pred = 0.9 * target + 0.05 * rng.standard_normal(target.shape)
    return (pred + offset).astype(np.float32), (target + offset).astype(np.float32)


def streamed_regression(pred, target, block) -> RegressionSums:
    blocks = plan_blocks(target.shape[1:], block)
    return reduce(RegressionSums.merge,
                  (RegressionSums.of(core(pred, b), core(target, b)) for b in blocks),
                  RegressionSums())


def streamed_ssim(pred, target, block, data_range, halo=None) -> SsimSum:
    win = ssim_window(target.shape[1:])
    blocks = plan_blocks(target.shape[1:], block, (win - 1) // 2 if halo is None else halo)
    return reduce(SsimSum.merge, (SsimSum.of(pred[(..., *b.extended)], target[(..., *b.extended)],
                                             b, target.shape[1:], data_range, win)
                                  for b in blocks), SsimSum())


# --- regression ---------------------------------------------------------------------------
@pytest.mark.parametrize(("spatial", "block"), SHAPES)
def test_regression_scores_equal_the_oracle(spatial, block):
    pred, target = regression_pair(spatial, channels=3)
    expected = regression_scores(pred, target)
    sums = streamed_regression(pred, target, block)
    data_range = sums.target_max - sums.target_min or 1.0
    ssim_value = streamed_ssim(pred, target, block, data_range).value()
    scores = sums.scores(data_range, ssim_value)
    assert scores.keys() == expected.keys()
    for key in expected:
        assert scores[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_pearson_keeps_its_precision_on_a_large_mean():
    """1e4 + signal of amplitude ~0.1: raw sums of squares would lose about 8 of 16 digits."""
    pred, target = regression_pair((63, 65), channels=2, offset=1e4, seed=1)
    expected = regression_scores(pred, target, data_range=1.0)["pearson_r"]
    forward = streamed_regression(pred, target, (8, 16))
    backward = streamed_regression(pred[:, ::-1, ::-1], target[:, ::-1, ::-1], (8, 16))
    assert forward.pearson_r() == pytest.approx(expected, rel=1e-9)
    assert backward.pearson_r() == pytest.approx(expected, rel=1e-9)


def test_perfect_and_constant_predictions():
    _, target = regression_pair((20, 21), channels=1)
    perfect = streamed_regression(target, target, (8, 8)).scores(1.0, 1.0)
    assert perfect["psnr"] == np.inf and perfect["mae"] == 0.0
    assert perfect["pearson_r"] == pytest.approx(1.0, rel=1e-12)
    for value in (0.0, 0.1, 3.7):
        constant = np.full_like(target, value)
        scores = streamed_regression(constant, target, (8, 8)).scores(1.0, 0.0)
        expected = regression_scores(constant, target, 1.0)
        assert scores.pop("pearson_r") is expected.pop("pearson_r") is None
        assert scores == pytest.approx(expected | {"ssim": 0.0}, rel=1e-9)


def test_empty_regression_sums_merge_as_nothing_and_have_no_scores():
    pred, target = regression_pair((5, 6), channels=1)
    one = RegressionSums.of(pred, target)
    assert one.merge(RegressionSums()) == one == RegressionSums().merge(one)
    with pytest.raises(ValueError, match="no pixels"):
        RegressionSums().scores(1.0, 1.0)
    with pytest.raises(ValueError, match=r"\(1, 5, 6\) differs"):
        RegressionSums.of(pred, target[:, :, :5])


# --- SSIM ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("spatial", "block", "halo"), [
    ((37, 41), (16, 16), 3),
    ((37, 41), (2, 3), 3),  # blocks thinner than the border skimage crops
    ((37, 41), (16, 16), 5),  # a halo wider than the window needs
    ((5, 40), (2, 16), 2),  # a thin image: window 5
    ((9, 13, 11), (4, 8, 5), 3),
])
def test_ssim_equals_the_oracle(spatial, block, halo):
    pred, target = regression_pair(spatial, channels=2, seed=2)
    data_range = float(target.max() - target.min())
    streamed = streamed_ssim(pred, target, block, data_range, halo)
    assert streamed.count == 2 * np.prod([s - ssim_window(spatial) + 1 for s in spatial])
    assert streamed.value() == pytest.approx(ssim(pred, target, data_range), rel=1e-9)


def test_ssim_window_is_what_the_oracle_uses():
    assert ssim_window((64, 64)) == 7 and ssim_window((5, 40)) == 5 and ssim_window((6, 9)) == 5
    with pytest.raises(ValueError, match=r"at least 3 pixels.*\(2, 9\)"):
        ssim_window((2, 9))


def test_ssim_refuses_a_halo_narrower_than_its_window():
    pred, target = regression_pair((20, 20), channels=1)
    block = plan_blocks((20, 20), (8, 8), 2)[4]  # an inner block, halo 2 < 3
    with pytest.raises(ValueError, match="halo of at least 3"):
        SsimSum.of(pred[(..., *block.extended)], target[(..., *block.extended)], block,
                   (20, 20), 1.0, 7)
    with pytest.raises(ValueError, match=r"spatial shape \(20, 20\) were not read over"):
        SsimSum.of(pred, target, block, (20, 20), 1.0, 7)
    with pytest.raises(ValueError, match=r"\(2, 20, 20\) differs"):
        SsimSum.of(np.concatenate([pred, pred]), target, block, (20, 20), 1.0, 7)
    with pytest.raises(ValueError, match="window 4"):
        SsimSum.of(pred, target, plan_blocks((20, 20), (20, 20))[0], (20, 20), 1.0, 4)
    with pytest.raises(ValueError, match="no pixels"):
        SsimSum().value()


# --- semantic segmentation ----------------------------------------------------------------
@pytest.mark.parametrize(("spatial", "block"), SHAPES)
def test_class_scores_from_summed_confusion_equal_the_oracle(spatial, block):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, spatial)
    pred = np.where(rng.random(spatial) < 0.7, truth, rng.integers(0, 3, spatial))
    valid = rng.random(spatial) < 0.8
    truth = np.where(valid, truth, 255)  # the ignore_label, outside the classes
    num_classes = 4  # class 3 absent from both: IoU and Dice 1.0
    summed = sum(confusion(core(pred, b), core(truth, b), core(valid, b), num_classes)
                 for b in plan_blocks(spatial, block))
    assert summed.dtype == np.int64 and summed.sum() == valid.sum()
    assert class_scores_from_confusion(summed) == class_scores(pred, truth, num_classes, valid)
    no_mask = sum(confusion(core(pred, b), core(np.where(valid, truth, 0), b), None, 4)
                  for b in plan_blocks(spatial, block))
    assert class_scores_from_confusion(no_mask) == class_scores(pred, np.where(valid, truth, 0), 4)


def test_confusion_rows_are_true_classes_and_refuses_classes_it_cannot_hold():
    truth = np.array([[0, 1, 1], [2, 2, 2]])
    pred = np.array([[0, 1, 2], [2, 2, 0]])
    np.testing.assert_array_equal(confusion(pred, truth, None, 3),
                                  [[1, 0, 0], [0, 1, 1], [1, 0, 2]])
    nothing_valid = confusion(pred, truth + 7, np.zeros(truth.shape, bool), 3)
    np.testing.assert_array_equal(nothing_valid, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="true class 2 is outside 0..1"):
        confusion(pred.clip(0, 1), truth, None, 2)
    with pytest.raises(ValueError, match="predicted class -1"):
        confusion(pred - 1, truth, None, 3)
    with pytest.raises(ValueError, match=r"shape \(2, 3\): must be \(K, K\)"):
        class_scores_from_confusion(np.zeros((2, 3), np.int64))


# --- instance segmentation ----------------------------------------------------------------
def blobs(spatial: tuple[int, ...], seed: int, level: float = 0.8,
          sigma: float = 1.5) -> np.ndarray:
    """Objects as components of smoothed noise above `level` standard deviations: a few
    blocks wide, so many cross block borders; a higher level shrinks and splits them."""
    smooth = ndimage.gaussian_filter(np.random.default_rng(seed).random(spatial), sigma)
    return ndimage.label((smooth - smooth.mean()) / smooth.std() > level)[0]


def relabel(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Labels 1..n renamed to `ids` (0 stays background)."""
    return np.concatenate([np.zeros(1, np.uint64), ids.astype(np.uint64)])[labels]


def streamed_overlaps(truth, pred, valid, block) -> ObjectOverlaps:
    parts = (ObjectOverlaps.of(core(truth, b), core(pred, b),
                               None if valid is None else core(valid, b))
             for b in plan_blocks(truth.shape, block))
    return reduce(ObjectOverlaps.merge, parts, ObjectOverlaps())


def assert_instance_scores_equal(truth, pred, valid, block):
    overlaps = streamed_overlaps(truth, pred, valid, block)
    for threshold in (0.3, 0.5, 0.7):
        expected = instance_scores(truth, pred, valid, threshold)
        assert overlaps.scores(threshold) == expected, threshold
    assert overlaps.true_objects == expected["true_objects"]


@pytest.mark.parametrize(("spatial", "block", "sigma"), [((45, 51), (16, 16), 1.5),
                                                          ((13, 19, 17), (8, 8, 8), 1.2)])
def test_instance_scores_equal_the_oracle_with_objects_across_blocks(spatial, block, sigma):
    truth = blobs(spatial, seed=4, sigma=sigma)
    pred = blobs(spatial, seed=4, level=1.0, sigma=sigma)  # IoUs from 0 to 1
    pred[pred == 3] = 0  # a missed object
    assert truth.max() > 5 and pred.max() > 5
    valid = np.ones(spatial, bool)
    valid[(slice(3, 12),) * len(spatial)] = False
    assert_instance_scores_equal(truth, pred, None, block)
    assert_instance_scores_equal(truth, pred, valid, block)


def test_large_uint64_ids():
    """Ids spread far apart (a block sorts them) and ids packed just below 2**64 (a block
    counts them directly), as global ids of out-of-core components can be."""
    truth, pred = blobs((40, 44), seed=5), blobs((40, 44), seed=6)
    rng = np.random.default_rng(7)
    spread = np.uint64(2**40) + rng.permutation(truth.max()).astype(np.uint64) * np.uint64(2**20)
    top = np.uint64(2**64 - 1) - rng.permutation(pred.max()).astype(np.uint64)
    truth, pred = relabel(truth, spread), relabel(pred, top)
    assert_instance_scores_equal(truth, pred, truth != spread[0], (16, 16))


def test_blocks_without_background():
    """Objects tiling the whole image: blocks whose every pixel is in an object."""
    truth = relabel(np.repeat(np.arange(1, 4), 4)[:, None] * np.ones((1, 10), int),
                    np.array([2**50, 2**60, 3], np.uint64))
    pred = np.ones((12, 10), np.uint16)
    pred[5:, 4:] = 2
    assert_instance_scores_equal(truth, pred, None, (3, 3))
    assert_instance_scores_equal(truth, pred, None, (12, 10))


def test_ties_in_iou_go_to_the_first_pair_in_id_order():
    """At threshold 0.25, true object a ties at IoU 1/3 with predicted objects b and c, and b
    overlaps true object d at 1/4: a takes whichever of b, c has the smaller id, so the id
    order decides between 1 and 2 matches."""
    truth = np.array([[1, 2, 2, 0, 2, 1]] * 2)
    pred = np.array([[2, 1, 0, 2, 0, 1]] * 2)
    for pred_ids, tp in [([7, 2**33], 1), ([2**33, 7], 2)]:
        t = relabel(truth, np.array([5, 2**40], np.uint64))
        p = relabel(pred, np.array(pred_ids, np.uint64))
        expected = instance_scores(t, p, threshold=0.25)
        assert expected["tp"] == tp
        assert streamed_overlaps(t, p, None, (1, 2)).scores(0.25) == expected


def test_merges_in_any_order_and_empty_images():
    truth, pred = blobs((30, 30), seed=8), blobs((30, 30), seed=9)
    parts = [ObjectOverlaps.of(core(truth, b), core(pred, b))
             for b in plan_blocks((30, 30), (4, 4))]
    folded = reduce(ObjectOverlaps.merge, parts)
    tree = parts
    while len(tree) > 1:
        tree = [reduce(ObjectOverlaps.merge, tree[i:i + 3]) for i in range(0, len(tree), 3)]
    expected = instance_scores(truth, pred)
    assert folded.scores(0.5) == tree[0].scores(0.5) == expected
    zeros = np.zeros((6, 7), np.uint32)
    nothing = streamed_overlaps(zeros, zeros, None, (4, 4))
    assert nothing.scores(0.5) == instance_scores(zeros, zeros) == ObjectOverlaps().scores(0.5)
    assert ObjectOverlaps().true_objects == 0
    missed = streamed_overlaps(truth, np.zeros_like(truth), None, (7, 7))
    assert missed.scores(0.5) == instance_scores(truth, np.zeros_like(truth))


def test_boolean_masks_are_one_object_each():
    truth, pred = blobs((20, 22), seed=10) > 0, blobs((20, 22), seed=10, level=1.0) > 0
    assert_instance_scores_equal(truth, pred, None, (8, 8))


def test_object_overlaps_refuse_labels_that_are_not_ids():
    with pytest.raises(ValueError, match="negative id -3"):
        ObjectOverlaps.of(np.array([[0, -3]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="dtype float32"):
        ObjectOverlaps.of(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"target \(2, 2\), prediction \(2, 3\)"):
        ObjectOverlaps.of(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
