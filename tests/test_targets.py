"""Boundary-aware targets (model.target: boundaries): the classes derived from instance
labels, their extraction into the patch store, the network and loss they train."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from test_patches import NORM, PATCHES, _write_dataset
from unetflow.config import ConfigError, validate_config
from unetflow.demo import synthesize_nuclei
from unetflow.losses import build_loss
from unetflow.patches import extract_patches, read_manifest
from unetflow.targets import (
    BOUNDARY,
    INTERIOR,
    boundary_classes,
    boundary_classes_lazy,
    network_classes,
)

B, N = BOUNDARY, INTERIOR  # N: iNterior


def test_boundary_classes_of_two_touching_rectangles_are_the_hand_computed_ones():
    labels = np.zeros((7, 8), np.uint16)
    labels[1:6, 1:4] = 1  # 5 x 3
    labels[1:6, 4:7] = 2  # touches object 1 along a column
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, B, B, B, B, B, B, 0],
        [0, B, N, B, B, N, B, 0],
        [0, B, N, B, B, N, B, 0],
        [0, B, N, B, B, N, B, 0],
        [0, B, B, B, B, B, B, 0],
        [0, 0, 0, 0, 0, 0, 0, 0]])
    assert np.array_equal(boundary_classes(labels, 1), expected)


def test_width_two_reaches_two_pixels_in_city_block_distance():
    labels = np.zeros((9, 9), np.int32)
    labels[:, :] = 0
    labels[0:9, 0:9] = 3
    labels[4, 4] = 0  # one background pixel in the middle of an object
    out = boundary_classes(labels, 2)
    distance = np.abs(np.arange(9)[:, None] - 4) + np.abs(np.arange(9)[None, :] - 4)
    expected = np.where(distance <= 2, B, N)
    expected[4, 4] = 0
    assert np.array_equal(out, expected)


def test_the_image_edge_is_not_a_boundary_and_ignore_label_is_kept_and_counts_as_other():
    labels = np.full((5, 6), 4, np.int32)
    labels[:, 5] = 255  # unannotated
    out = boundary_classes(labels, 1, ignore_label=255)
    assert np.array_equal(out[:, 5], np.full(5, 255))
    assert np.array_equal(out[:, 4], np.full(5, B))  # next to the ignored column
    assert np.array_equal(out[:, :4], np.full((5, 4), N))  # the image edge adds nothing


def test_a_2d_model_splits_the_labels_of_a_stack_plane_by_plane():
    labels = np.zeros((2, 5, 5), np.int32)
    labels[0] = 1
    labels[1] = 2  # another object in the next plane: no boundary along z
    out = boundary_classes(labels, 1, axes=2)
    assert (out == N).all()
    assert (boundary_classes(labels, 1) == B).all()  # 3D: the planes face each other


def test_negative_labels_are_refused_and_float_labels_too():
    with pytest.raises(ValueError, match="negative"):
        boundary_classes(np.array([[0, -3], [1, 1]]), 1)
    with pytest.raises(ValueError, match="integer"):
        boundary_classes(np.zeros((3, 3), np.float32), 1)


@pytest.mark.parametrize("chunks, width, axes", [((37, 41), 2, 2), ((16, 16), 3, 2),
                                                 ((9, 13, 17), 1, 3), ((11, 11, 9), 2, 2)])
def test_chunk_by_chunk_equals_the_whole_image(chunks, width, axes):
    rng = np.random.default_rng(width)
    shape = (60, 80) if len(chunks) == 2 else (32, 40, 40)
    labels = synthesize_nuclei(shape, seed=width, mean_radius=5).labels
    labels[rng.random(shape) < 0.01] = 7  # specks: many boundaries everywhere
    lazy = boundary_classes_lazy(da.from_array(labels, chunks=chunks), width, None, axes)
    assert np.array_equal(lazy.compute(), boundary_classes(labels, width, None, axes))


def test_extraction_stores_the_classes_of_the_whole_label_image(tmp_path):
    nuclei = synthesize_nuclei((96, 160), seed=3)
    ds = _write_dataset(tmp_path, "n", nuclei.noisy, nuclei.labels, (40, 48))
    store, manifest = tmp_path / "p.zarr", tmp_path / "p.tsv"
    extract_patches([ds], "segmentation", {**PATCHES, "per_dataset": 40}, NORM, 2, None, store,
                    manifest, target={"target": "boundaries", "boundary_width": 2})
    whole = boundary_classes(nuclei.labels, 2)
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["unetflow"]["target"] == {"target": "boundaries", "boundary_width": 2}
    rows = read_manifest(manifest)
    seen = set()
    for row in rows:
        y, x = row["origin"]
        stored = group[f"{row['split']}/targets"][int(row["index"])]
        assert np.array_equal(stored, whole[y:y + 32, x:x + 32])
        seen |= set(np.unique(stored).tolist())
    assert seen == {0, N, B}


def test_extraction_names_the_target_holding_negative_labels(tmp_path):
    nuclei = synthesize_nuclei((96, 160), seed=4)
    labels = nuclei.labels.astype(np.int32)
    labels[5, 5] = -2
    ds = _write_dataset(tmp_path, "neg", nuclei.noisy, labels, (40, 48))
    with pytest.raises(ValueError, match=r"neg_target\.ome\.zarr.*negative"):
        extract_patches([ds], "segmentation", {**PATCHES, "per_dataset": 4}, NORM, 2, None,
                        tmp_path / "p.zarr", tmp_path / "p.tsv",
                        target={"target": "boundaries", "boundary_width": 1})
    assert not (tmp_path / "p.zarr").exists() and not (tmp_path / "p.tsv").exists()


def test_the_network_has_three_outputs_and_the_loss_honours_ignore_label():
    assert network_classes({"num_classes": 2, "target": "boundaries"}) == 3
    assert network_classes({"num_classes": 4}) == 4
    loss = build_loss("segmentation", "ce_dice", ignore_label=255, class_weights=[1, 1, 4])
    target = torch.tensor([[[0, 1, 2, 255], [2, 1, 0, 255]]])
    logits = torch.randn(1, 3, 2, 4, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert torch.all(logits.grad[..., 3] == 0)  # ignored pixels give no gradient
    changed = logits.detach().clone()
    changed[..., 3] = torch.randn(1, 3, 2)
    assert torch.equal(loss(changed, target), value.detach())


def _config(**model) -> dict:
    return {"datasets": {"d": {"image": "i.ome.zarr", "target": "t.ome.zarr"}},
            "models": {"m": {"task": "segmentation", "train_on": ["d"], "model": model}}}


def test_config_refuses_boundaries_for_regression_or_several_classes():
    assert validate_config(_config(target="boundaries"))["models"]["m"]["model"]["target"] \
        == "boundaries"
    bad = _config(target="boundaries")
    bad["models"]["m"]["task"] = "regression"
    with pytest.raises(ConfigError, match=r"models\.m\.model\.target.*regression"):
        validate_config(bad)
    with pytest.raises(ConfigError, match=r"models\.m\.model\.num_classes.*instance ids"):
        validate_config(_config(target="boundaries", num_classes=3))
    with pytest.raises(ConfigError, match="boundary_width"):
        validate_config(_config(target="boundaries", boundary_width=0))


def test_training_refuses_patches_extracted_for_another_target(tmp_path: Path):
    from unetflow.train import _check_store_target

    meta = {"target": {"target": "classes", "boundary_width": 2}}
    wanted = {"num_classes": 2, "target": "boundaries", "boundary_width": 2}
    with pytest.raises(ValueError, match="re-extract the patches"):
        _check_store_target(meta, "segmentation", wanted, str(tmp_path))
    _check_store_target({}, "segmentation", {"num_classes": 2}, str(tmp_path))  # older store


def test_boundary_classes_agree_with_a_distance_transform_per_object():
    """A second definition: interior = object pixels farther than the width (taxicab) from
    every pixel not of their object (scipy's chamfer distance within the image)."""
    from scipy import ndimage

    labels = synthesize_nuclei((96, 128), seed=5, mean_radius=6).labels
    for width in (1, 2, 3):
        interior = np.zeros(labels.shape, bool)
        for label in np.unique(labels[labels > 0]):
            own = labels == label
            interior |= own & (ndimage.distance_transform_cdt(own, metric="taxicab") > width)
        expected = np.where(interior, N, np.where(labels > 0, B, 0))
        assert np.array_equal(boundary_classes(labels, width), expected)
