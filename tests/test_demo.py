"""Tests for the synthetic nuclei: reproducible, plausible, and hard enough to be worth a U-Net."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from unetflow.demo import DemoImage, synthesize_nuclei

SHAPE_2D = (128, 128)
SHAPE_3D = (32, 64, 64)


@pytest.fixture(scope="module")
def image_2d() -> DemoImage:
    return synthesize_nuclei(SHAPE_2D, seed=0)


@pytest.fixture(scope="module")
def image_3d() -> DemoImage:
    return synthesize_nuclei(SHAPE_3D, seed=0)


def psnr(noisy: np.ndarray, clean: np.ndarray) -> float:
    data_range = float(clean.max() - clean.min())
    mse = float(np.mean((noisy.astype(np.float64) - clean) ** 2))
    return 10 * np.log10(data_range**2 / mse)


def foreground_iou(prediction: np.ndarray, labels: np.ndarray) -> float:
    truth = labels > 0
    return float((prediction & truth).sum() / (prediction | truth).sum())


def test_same_seed_gives_identical_arrays(image_2d):
    again = synthesize_nuclei(SHAPE_2D, seed=0)
    for name in ("noisy", "clean", "labels"):
        np.testing.assert_array_equal(getattr(again, name), getattr(image_2d, name))


def test_different_seeds_give_different_scenes(image_2d):
    other = synthesize_nuclei(SHAPE_2D, seed=1)
    assert not np.array_equal(other.labels, image_2d.labels)
    assert not np.array_equal(other.clean, image_2d.clean)


@pytest.mark.parametrize("fixture", ["image_2d", "image_3d"])
def test_dtypes_and_shapes(fixture, request):
    image = request.getfixturevalue(fixture)
    shape = SHAPE_2D if fixture == "image_2d" else SHAPE_3D
    assert image.noisy.dtype == np.float32 and image.noisy.shape == shape
    assert image.clean.dtype == np.float32 and image.clean.shape == shape
    assert image.labels.dtype == np.uint16 and image.labels.shape == shape


@pytest.mark.parametrize("fixture", ["image_2d", "image_3d"])
def test_labels_are_consecutive_instances_of_plausible_number(fixture, request):
    labels = request.getfixturevalue(fixture).labels
    present = np.unique(labels)
    np.testing.assert_array_equal(present, np.arange(len(present)))
    radius = 11 if labels.ndim == 2 else 6
    ball = np.pi * radius**2 if labels.ndim == 2 else 4 / 3 * np.pi * radius**3
    expected = 0.27 * labels.size / ball
    assert 0.5 * expected < labels.max() < 2.5 * expected


def test_each_nucleus_is_one_connected_piece(image_2d):
    labels = image_2d.labels
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        _, pieces = ndimage.label(labels[box] == index)
        assert pieces == 1, f"nucleus {index} falls apart into {pieces} pieces"


def test_some_nuclei_touch(image_2d):
    left, right = image_2d.labels[:, :-1], image_2d.labels[:, 1:]
    assert np.any((left > 0) & (right > 0) & (left != right))


@pytest.mark.parametrize("fixture", ["image_2d", "image_3d"])
def test_foreground_fraction_in_range(fixture, request):
    fraction = np.mean(request.getfixturevalue(fixture).labels > 0)
    assert 0.2 <= fraction <= 0.35


@pytest.mark.parametrize("fixture", ["image_2d", "image_3d"])
def test_noise_is_strong_but_not_overwhelming(fixture, request):
    image = request.getfixturevalue(fixture)
    assert 16.0 <= psnr(image.noisy, image.clean) <= 24.0


@pytest.mark.parametrize("fixture", ["image_2d", "image_3d"])
def test_otsu_threshold_is_plausible_but_not_enough(fixture, request):
    image = request.getfixturevalue(fixture)
    iou = foreground_iou(image.noisy > threshold_otsu(image.noisy), image.labels)
    assert 0.5 < iou < 0.95


def test_nuclei_are_brighter_than_background(image_2d):
    inside = image_2d.clean[image_2d.labels > 0].mean()
    outside = image_2d.clean[image_2d.labels == 0].mean()
    assert inside > 2 * outside


def test_mean_radius_scales_nuclei():
    small = synthesize_nuclei(SHAPE_2D, seed=0, mean_radius=5)
    large = synthesize_nuclei(SHAPE_2D, seed=0, mean_radius=15)
    assert small.labels.max() > 4 * large.labels.max()


@pytest.mark.parametrize(
    "shape", [(128,), (8, 8, 8, 8), (16, 64, 64), (31, 128), (128, 0), (64.0, 64), "64x64"]
)
def test_bad_shape_raises_naming_it(shape):
    with pytest.raises(ValueError, match="shape"):
        synthesize_nuclei(shape, seed=0)


@pytest.mark.parametrize("mean_radius", [0, 1.5, -3, float("nan"), "11"])
def test_bad_mean_radius_raises(mean_radius):
    with pytest.raises(ValueError, match="mean_radius"):
        synthesize_nuclei(SHAPE_2D, seed=0, mean_radius=mean_radius)
