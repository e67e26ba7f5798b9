"""Streaming evaluation equals the in-memory definitions, on real OME-Zarr stores of many
blocks: 2D and 3D, sizes the blocks do not divide, objects across block borders, ignored
pixels, several channels; and the figures' crop errors are those of the whole image."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from unetflow.figures import montage_error
from unetflow.metrics import (
    class_scores,
    gaussian_smooth,
    instance_scores,
    label_objects,
    nlm_denoise,
    otsu_instances,
    regression_scores,
    tv_denoise,
)
from unetflow.ome import write_image, write_label_image
from unetflow.scoring import baseline_reach, gaussian_reach, score_prediction

SMALL_BLOCKS = 4096  # block_pixels: 64 x 64 pixels, or 16 x 16 x 16 voxels


# --- the in-memory oracle: what evaluate computed before it streamed -------------------------
def oracle_segmentation(labels, image, truth, num_classes, instances, ignore_label, threshold):
    valid = np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label
    ids = np.unique(truth[valid])
    instance_target = num_classes == 2 and len(ids[ids != 0]) > 1
    classes = (labels != 0).astype(np.int64) if num_classes == 2 or instances \
        else labels.astype(np.int64)
    objects = labels if instances else label_objects(labels != 0)
    true_classes = (truth != 0).astype(np.int64) if num_classes == 2 else truth.astype(np.int64)
    otsu = otsu_instances(image[0])

    def method(pred_classes, k, pred_objects):
        scores = class_scores(pred_classes, true_classes if k > 2 else
                              (true_classes != 0).astype(np.int64), k, valid)
        if instance_target:
            matching = instance_scores(truth, pred_objects, valid, threshold)
            scores.update({m: matching[m] for m in ("precision", "recall", "f1", "mean_ap")})
            scores["instance_matching"] = matching
        return scores

    return {"unet": method(classes, num_classes, objects),
            "otsu": method((otsu != 0).astype(np.int64), 2, otsu)}, instance_target, \
        int(np.count_nonzero(~valid))


def oracle_regression(pred, image, target, baselines, spacing):
    """Each baseline applied to the whole input, then scored."""
    data_range = float(target.max()) - float(target.min()) or 1.0
    scores = {"unet": regression_scores(pred, target, data_range),
              "input": regression_scores(image, target, data_range)}
    whole = {"gaussian": lambda p: gaussian_smooth(image, p["sigma"], spacing),
             "tv": lambda p: tv_denoise(image, p["weight"], p["noise_sd"]),
             "nlm": lambda p: nlm_denoise(image, p["h"], p["noise_sd"])}
    for name, parameters in baselines.items():
        scores[name] = {**regression_scores(whole[name](parameters), target, data_range),
                        **{k: v for k, v in parameters.items() if k != "noise_sd"}}
    return scores


def assert_same(streamed, expected, path="scores", rel=1e-9):
    """Equal to float tolerance, key by key, with the path of a difference in the message."""
    if isinstance(expected, dict):
        assert set(streamed) == set(expected), path
        for key in expected:
            assert_same(streamed[key], expected[key], f"{path}.{key}", rel)
    elif isinstance(expected, float) and math.isfinite(expected):
        assert streamed == pytest.approx(expected, rel=rel, abs=1e-12), path
    else:
        assert streamed == expected, path


# --- stores ---------------------------------------------------------------------------------
def axes(ndim):
    return ["c", *["z", "y", "x"][-ndim:]]


def touching_objects(shape, rng, count):
    """Instance labels of blobs that cross block borders and touch each other."""
    seeds = np.zeros(shape, np.uint32)
    for i in range(1, count + 1):
        seeds[tuple(rng.integers(0, s) for s in shape)] = i
    distance, (indices) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(indices)]
    labels[distance > 9] = 0
    return labels


def write_case(tmp_path, labels_pred, image, truth, instances=True, chunks=32):
    ax = axes(truth.ndim)
    write_image(tmp_path / "image.ome.zarr", image, ax, chunks=(1, *(chunks,) * truth.ndim))
    write_image(tmp_path / "target.ome.zarr", truth[None], ax)
    pred = tmp_path / "pred.ome.zarr"
    write_image(pred, (labels_pred[None] != 0).astype(np.float32), ax,
                chunks=(1, *(chunks,) * truth.ndim),
                attrs={"predict": {"level": 0, "instances": instances}})
    write_label_image(pred, "prediction", labels_pred.astype(np.uint32), ax[1:])
    return str(pred)


def score(tmp_path, prediction, task, settings, num_classes=2, **kwargs):
    """score_prediction of the stores a case wrote into `tmp_path`."""
    return score_prediction(str(prediction), str(tmp_path / "image.ome.zarr"),
                            str(tmp_path / "target.ome.zarr"), task, settings, num_classes,
                            None, "test", **kwargs)


def segmentation_case(shape, seed, ignore=None):
    """Truth with touching objects across blocks, a prediction that misses, merges, shifts
    and invents objects, and an input whose Otsu threshold finds most of them."""
    rng = np.random.default_rng(seed)
    truth = touching_objects(shape, rng, count=max(6, math.prod(shape) // 900))
    pred = np.roll(truth, 2, axis=-1)
    pred[pred == 1] = 0  # a miss
    pred[pred == 3] = 2  # a merge
    pred[tuple(slice(0, 5) for _ in shape)] = 77  # a false object
    # predicted ids are connected components, as predict's labels always are (the rolled
    # objects wrapped around the edge, and the merge, are split into their pieces)
    pred = measure.label(pred, background=0, connectivity=1)
    if ignore is not None:
        truth[tuple(slice(s // 2, s // 2 + 9) for s in shape)] = ignore
    image = ((truth > 0) * 10.0 + rng.normal(0, 2.5, shape)).astype(np.float32)[None]
    return pred.astype(np.uint32), image, truth


@pytest.mark.parametrize("shape,ignore", [((150, 170), None), ((150, 170), 99),
                                          ((21, 45, 50), 99)])
def test_segmentation_streams_to_the_in_memory_scores(tmp_path, shape, ignore):
    pred, image, truth = segmentation_case(shape, seed=len(shape), ignore=ignore)
    path = write_case(tmp_path, pred, image, truth, chunks=16 if len(shape) == 3 else 32)
    settings = {"ignore_label": ignore, "iou_threshold": 0.5, "block_pixels": SMALL_BLOCKS,
                "workers": 2}
    result = score(tmp_path, path, "segmentation", settings, scratch_dir=tmp_path)
    scores, instance_target, excluded = oracle_segmentation(pred, image, truth, 2, True, ignore,
                                                            0.5)
    assert instance_target and result["instance_target"]
    assert result["excluded_pixels"] == excluded
    assert_same(result["scores"], scores)
    assert 0 < result["scores"]["unet"]["f1"] < 1  # the case has hits and misses
    assert not list(tmp_path.glob(".unetflow-scratch-*"))  # scratch labels removed


def test_integer_input_and_semantic_prediction_stream_alike(tmp_path):
    """predict.instances: false (classes): the model's objects are made out of core; an
    integer input gets Otsu's one-bin-per-value histogram."""
    pred, image, truth = segmentation_case((130, 97), seed=5)
    image = np.clip(image * 300 + 1000, 0, 65535).astype(np.uint16)
    classes = (pred != 0).astype(np.uint32)
    path = write_case(tmp_path, classes, image, truth, instances=False)
    settings = {"ignore_label": None, "iou_threshold": 0.6, "block_pixels": SMALL_BLOCKS}
    result = score(tmp_path, path, "segmentation", settings, scratch_dir=tmp_path)
    scores, _, _ = oracle_segmentation(classes, image, truth, 2, False, None, 0.6)
    assert_same(result["scores"], scores)


def test_multiclass_classes_stream_to_the_in_memory_scores(tmp_path):
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 3, (70, 90)).astype(np.uint8)
    truth = ndimage.median_filter(truth, 5)
    pred = np.where(rng.random(truth.shape) < 0.1, (truth + 1) % 3, truth).astype(np.uint32)
    image = (truth * 5.0 + rng.normal(0, 1, truth.shape)).astype(np.float32)[None]
    path = write_case(tmp_path, pred, image, truth, instances=False)
    settings = {"ignore_label": None, "iou_threshold": 0.5, "block_pixels": SMALL_BLOCKS}
    result = score(tmp_path, path, "segmentation", settings, 3, scratch_dir=tmp_path)
    scores, instance_target, _ = oracle_segmentation(pred, image, truth, 3, False, None, 0.5)
    assert not instance_target and not result["instance_target"]
    assert_same(result["scores"], scores)


def regression_case(tmp_path, shape, channels, spacing, seed):
    rng = np.random.default_rng(seed)
    clean = np.stack([gaussian_smooth(rng.uniform(0, 10, (1, *shape)), 2.0)[0] + 100 * c
                      for c in range(channels)])
    noisy = (clean + rng.normal(0, 1, clean.shape)).astype(np.float32)
    pred = (clean + rng.normal(0, 0.3, clean.shape)).astype(np.float32)
    ax = axes(len(shape))
    scale = dict(zip(ax[1:], spacing, strict=True))
    chunks = (1, *(16 if len(shape) == 3 else 32,) * len(shape))
    write_image(tmp_path / "image.ome.zarr", noisy, ax, scale=scale, chunks=chunks)
    write_image(tmp_path / "target.ome.zarr", clean.astype(np.float32), ax, scale=scale)
    write_image(tmp_path / "pred.ome.zarr", pred, ax, scale=scale, chunks=chunks,
                attrs={"predict": {"level": 0, "output_units": "input"}})
    return pred, noisy, clean.astype(np.float32)


@pytest.mark.parametrize("shape,channels,spacing,sigma", [
    ((90, 110), 2, (1.0, 1.0), 1.5),
    ((20, 37, 45), 1, (2.0, 1.0, 1.0), 1.0),
])
def test_regression_streams_to_the_in_memory_scores(tmp_path, shape, channels, spacing, sigma):
    """Every baseline, applied block by block to the input read with its halo, scores as
    it does applied to the whole image: NLM equal to float rounding (the halo is its
    reach), TV too (a fixed number of iterations, each reaching one pixel further)."""
    pred, noisy, clean = regression_case(tmp_path, shape, channels, spacing, seed=11)
    baselines = {"gaussian": {"sigma": sigma},
                 "tv": {"weight": 1.5, "noise_sd": [1.0] * channels},
                 "nlm": {"h": 1.0, "noise_sd": [1.0] * channels}}
    settings = {"block_pixels": SMALL_BLOCKS, "workers": 2}
    result = score(tmp_path, tmp_path / "pred.ome.zarr", "regression", settings,
                   baselines=baselines)
    expected = oracle_regression(pred, noisy, clean, baselines, spacing)
    assert_same(result["scores"], expected, rel=1e-7)
    assert result["data_range"] == pytest.approx(float(clean.max() - clean.min()))
    assert max(gaussian_reach(sigma, spacing)) == int(4 * sigma + 0.5)
    assert max(baseline_reach(baselines, spacing)) == 10  # TV's 10 iterations reach furthest


@pytest.mark.parametrize("task", ["segmentation", "regression"])
def test_crop_errors_summed_in_blocks_are_the_whole_images(tmp_path, task):
    """The montage ranks crops by errors that evaluation summed block by block."""
    from unetflow.figures import CropScores

    if task == "segmentation":
        pred, image, truth = segmentation_case((150, 170), seed=3, ignore=99)
        path = write_case(tmp_path, pred, image, truth)
        target, prediction, ignore = truth[None], pred, 99
    else:
        prediction, image, target = regression_case(tmp_path, (150, 170), 1, (1.0, 1.0), 4)
        path, ignore = str(tmp_path / "pred.ome.zarr"), None
    settings = {"ignore_label": ignore, "iou_threshold": 0.5, "block_pixels": SMALL_BLOCKS}
    result = score(tmp_path, path, task, settings, crop_size=48, scratch_dir=tmp_path)
    whole = CropScores(target.shape[1:], 48)
    whole.add(tuple(slice(0, s) for s in target.shape[1:]),
              *montage_error(task, prediction, target, ignore))
    streamed, expected = result["crop_scores"].scored(), whole.scored()
    assert [c for c, _, _ in streamed] == [c for c, _, _ in expected]
    assert [s for _, _, s in streamed] == [s for _, _, s in expected]
    assert np.allclose([e for _, e, _ in streamed], [e for _, e, _ in expected], rtol=1e-6)
