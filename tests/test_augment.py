"""Augmentation of training batches (unetflow.augment)."""

from __future__ import annotations

import numpy as np
import pytest

from unetflow.train import augment_batch


# --- moved from test_train.py --------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(8, 8), (6, 10), (4, 6, 6)])
def test_geometric_augmentation_moves_image_and_target_alike(spatial):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2, *spatial)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    settings = {"flips": True, "rotate90": True, "intensity": 0.0, "noise": 0.0}
    xa, ya = augment_batch(x, y, settings, np.random.default_rng(1), "segmentation")
    assert xa.shape == x.shape and ya.shape == y.shape
    assert np.array_equal(ya, (xa[:, 0] > 0).astype(np.int32))
    changed = [not np.array_equal(xa[i], x[i]) for i in range(len(x))]
    assert any(changed) and not all(changed)  # per sample, not one draw for the batch


def test_intensity_changes_images_and_regression_targets_never_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=(8, 6, 6)).astype(np.int32)
    only_intensity = {"flips": False, "rotate90": False, "intensity": 0.5, "noise": 0.0}
    xa, la = augment_batch(x, labels, only_intensity, np.random.default_rng(1), "segmentation")
    assert not np.allclose(xa, x) and np.array_equal(la, labels) and la.dtype == np.int32
    xa, ya = augment_batch(x, x.copy(), only_intensity, np.random.default_rng(1), "regression")
    assert not np.allclose(xa, x) and np.array_equal(xa, ya)
    apart = {**only_intensity, "intensity_target": False}
    xa, ya = augment_batch(x, x.copy(), apart, np.random.default_rng(1), "regression")
    assert not np.allclose(xa, x) and np.array_equal(ya, x)
    noisy = {**only_intensity, "intensity": 0.0, "noise": 0.2}
    xa, ya = augment_batch(x, x.copy(), noisy, np.random.default_rng(1), "regression")
    assert np.array_equal(ya, x) and np.std(xa - x) == pytest.approx(0.2, rel=0.1)
