"""Augmentation of training batches (unetflow.augment), against oracles: the code it replaced,
numpy's exact rot90, the untouched input, and the label ids a nearest-neighbour read can give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from test_train import sections, write_store
from unetflow import augment
from unetflow.augment import GEOMETRIC, IMAGE_ONLY, RICH_AUGMENT
from unetflow.config import (
    ConfigError,
    config_warnings,
    model_section,
    section_settings,
    training_settings,
    validate_config,
)
from unetflow.train import PatchBatches, Trainer, augment_batch

DEFAULTS = section_settings("train", {})["augment"]
PLAIN = {**DEFAULTS, "flips": False, "rotate90": False, "intensity": 0.0, "noise": 0.0}
IGNORE = 255


def always(*names: str, base: dict | None = None, **changes: dict) -> dict:
    """Settings with augmentations `names` at probability 1 (the rich set's ranges)."""
    settings = dict(PLAIN if base is None else base)
    for name in names:
        settings[name] = {**RICH_AUGMENT[name], "p": 1.0, **changes.get(name, {})}
    return settings


def blobs(shape: tuple[int, ...], n: int = 4, channels: int = 1, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """Smooth images and label images of ids 0, 3, 7 and IGNORE: what a segmentation
    batch holds."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(n, channels, *shape)),
                                    (0, 0) + (2,) * len(shape))
    x = (field / field.std()).astype(np.float32)
    labels = np.select([x[:, 0] > 1, x[:, 0] > 0.3, x[:, 0] < -1.2], [7, 3, IGNORE], 0)
    return x, labels.astype(np.int32)


# --- the code this replaced, verbatim: the oracle of the default settings ---------------
def _old_geometry(x, y, settings, rng, spatial_dims):
    if settings.get("flips"):
        for axis in range(-spatial_dims, 0):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
    if settings.get("rotate90"):
        square = x.shape[-1] == x.shape[-2]
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        x, y = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    return x, y


def old_augment_batch(x, y, settings, rng, task):
    x, y = np.array(x, dtype=np.float32), np.array(y)
    spatial_dims = x.ndim - 2
    for i in range(len(x)):
        x[i], y[i] = _old_geometry(x[i], y[i], settings, rng, spatial_dims)
    amount = settings.get("intensity", 0.0)
    if amount:
        shape = (len(x),) + (1,) * (x.ndim - 1)
        scale = (1 + rng.uniform(-amount, amount, size=shape)).astype(np.float32)
        shift = rng.uniform(-amount, amount, size=shape).astype(np.float32)
        x = x * scale + shift
        if task == "regression" and settings.get("intensity_target", True):
            y = y.astype(np.float32) * scale + shift
    if settings.get("noise"):
        x = x + rng.normal(0, settings["noise"], size=x.shape).astype(np.float32)
    return x, y


@pytest.mark.parametrize("task", ["segmentation", "regression"])
@pytest.mark.parametrize("spatial", [(16, 16), (8, 12), (4, 8, 8)])
def test_default_settings_reproduce_the_old_augmentation_exactly(task, spatial):
    x, labels = blobs(spatial, n=6, channels=2)
    y = labels if task == "segmentation" else x[:, :1] * 2
    for settings in (DEFAULTS, {**DEFAULTS, "noise": 0.1, "intensity": 0.3}):
        new = augment_batch(x, y, settings, np.random.default_rng(5), task)
        old = old_augment_batch(x, y, settings, np.random.default_rng(5), task)
        for a, b in zip(new, old, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)


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


# --- rotation, scaling, elastic deformation ------------------------------------------------
@pytest.mark.parametrize("spatial", [(32, 32), (24, 40), (8, 24, 24)])
def test_resampled_labels_hold_only_ids_of_the_original(spatial):
    x, labels = blobs(spatial)
    settings = always(*GEOMETRIC, base=DEFAULTS)
    for seed in range(3):
        xa, la = augment_batch(x, labels, settings, np.random.default_rng(seed), "segmentation")
        assert la.dtype == np.int32 and la.shape == labels.shape and xa.shape == x.shape
        for i in range(len(labels)):
            assert set(np.unique(la[i])) <= set(np.unique(labels[i]))
        assert not np.array_equal(la, labels)


@pytest.mark.parametrize("spatial", [(32, 32), (8, 24, 24)])
def test_ignore_label_pixels_stay_exactly_ignore_label(spatial):
    """The pixels that read IGNORE are exactly those where the ignore mask, augmented with the
    same draws, lands: never mixed with a neighbouring id, never lost or grown."""
    x, labels = blobs(spatial)
    settings = always(*GEOMETRIC)
    _, la = augment_batch(x, labels, settings, np.random.default_rng(3), "segmentation")
    _, mask = augment_batch(x, (labels == IGNORE).astype(np.int32), settings,
                            np.random.default_rng(3), "segmentation")
    assert np.array_equal(la == IGNORE, mask == 1) and mask.any()


@pytest.mark.parametrize("spatial", [(16, 16), (4, 8, 8)])
def test_identity_transform_returns_the_input_exactly(spatial):
    x, labels = blobs(spatial)
    settings = always(*GEOMETRIC, rotate={"degrees": 0}, scale={"range": [1, 1]},
                      elastic={"magnitude": [0, 0]})
    xa, la = augment_batch(x, labels, settings, np.random.default_rng(0), "segmentation")
    assert np.array_equal(xa, x) and np.array_equal(la, labels)
    xa, ya = augment_batch(x, x * 3, settings, np.random.default_rng(0), "regression")
    assert np.array_equal(xa, x) and np.array_equal(ya, x * 3)


@pytest.mark.parametrize("spatial", [(32, 32), (8, 24, 24)])
def test_a_regression_target_equal_to_the_image_stays_equal_to_it(spatial):
    """Image and target read at the same coordinates with the same interpolation."""
    x, _ = blobs(spatial, channels=2)
    xa, ya = augment_batch(x, x.copy(), always(*GEOMETRIC), np.random.default_rng(2),
                           "regression")
    assert np.array_equal(xa, ya) and not np.allclose(xa, x, atol=0.1)


def test_a_quarter_turn_of_the_grid_is_numpys_rot90():
    """The grid rotates about the patch centre: 90 degrees reads exactly what np.rot90 moves."""
    x, labels = blobs((12, 12))
    turn = augment._grid((12, 12), augment._plane_rotation(2, (0, 1), 90), None)
    image, label = augment._resample(x[0], turn, order=1), augment._resample(labels[0], turn, 0)
    assert np.array_equal(label, np.rot90(labels[0], -1))  # either way: angles are symmetric
    assert np.allclose(image, np.rot90(x[0], -1, axes=(-2, -1)), atol=1e-5)


def test_scaling_enlarges_objects_by_the_factor():
    """A disc of radius 5 scaled by 1.2 has about 1.2^2 times the area."""
    yy, xx = np.mgrid[:40, :40]
    disc = ((yy - 19.5) ** 2 + (xx - 19.5) ** 2 < 25).astype(np.int32)[None]
    settings = always("scale", scale={"range": [1.2, 1.2]})
    _, scaled = augment_batch(disc[:, None].astype(np.float32), disc, settings,
                              np.random.default_rng(0), "segmentation")
    assert scaled.sum() / disc.sum() == pytest.approx(1.44, rel=0.08)


def test_elastic_displacement_is_smooth_and_at_most_magnitude_px():
    block = {"p": 1.0, "magnitude": [5, 5], "sigma": [10, 10]}
    field = augment._elastic_displacement((64, 48), block, np.random.default_rng(0))
    assert field.shape == (2, 64, 48) and np.abs(field).max() == pytest.approx(5, rel=1e-5)
    assert np.abs(np.diff(field, axis=1)).max() < 1.0  # no jumps between neighbours


def test_3d_tilts_stay_within_degrees_3d_tilt():
    block = {"p": 1.0, "degrees": 180, "degrees_3d_tilt": 10}
    for seed in range(20):
        matrix = augment._rotation(3, block, np.random.default_rng(seed))
        assert np.allclose(matrix @ matrix.T, np.eye(3))
        z_axis = matrix @ [1, 0, 0]  # how far z leans: at most the two tilts combined
        assert np.degrees(np.arccos(min(1.0, abs(z_axis[0])))) <= 10 * np.sqrt(2) + 1e-6


# --- image only ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_gamma_blur_and_low_resolution_change_the_image_never_the_target(name):
    x, labels = blobs((32, 32), channels=2)
    settings = always(name)
    xa, la = augment_batch(x, labels, settings, np.random.default_rng(0), "segmentation")
    assert np.array_equal(la, labels) and not np.allclose(xa, x, atol=1e-3)
    xa, ya = augment_batch(x, x.copy(), settings, np.random.default_rng(0), "regression")
    assert np.array_equal(ya, x) and xa.dtype == np.float32 and xa.shape == x.shape


def test_gamma_keeps_each_channels_min_and_max_and_order():
    x, _ = blobs((16, 16), channels=3)
    xa, _ = augment_batch(x, x, always("gamma"), np.random.default_rng(1), "regression")
    axes = (2, 3)
    assert np.allclose(xa.min(axis=axes), x.min(axis=axes), atol=1e-5)
    assert np.allclose(xa.max(axis=axes), x.max(axis=axes), atol=1e-5)
    order = np.argsort(x[0, 0], axis=None)
    assert np.all(np.diff(xa[0, 0].ravel()[order]) >= -1e-5)  # monotonic


@pytest.mark.parametrize(("shape", "out"), [((2, 5, 9), (16, 30)), ((1, 4, 9, 7), (9, 30, 1))])
def test_linear_resize_is_ndimage_zoom_of_order_one(shape, out):
    array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    zoom = (1, *[o / n for o, n in zip(out, shape[1:], strict=True)])
    assert np.allclose(augment._resize_linear(array, out),
                       ndimage.zoom(array, zoom, order=1, mode="nearest"), atol=1e-6)


def test_low_resolution_at_zoom_one_and_blur_at_sigma_zero_change_nothing():
    x, _ = blobs((16, 16))
    settings = always("low_resolution", "blur", low_resolution={"zoom": [1, 1]},
                      blur={"sigma": [0, 0]})
    xa, _ = augment_batch(x, x, settings, np.random.default_rng(0), "regression")
    assert np.allclose(xa, x, atol=1e-6)


# --- seeding -------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x, labels = blobs((24, 24), n=6)
    settings = always(*GEOMETRIC, *IMAGE_ONLY, base=DEFAULTS)
    first = augment_batch(x, labels, settings, np.random.default_rng(7), "segmentation")
    again = augment_batch(x, labels, settings, np.random.default_rng(7), "segmentation")
    other = augment_batch(x, labels, settings, np.random.default_rng(8), "segmentation")
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_a_step_read_fresh_is_the_step_read_after_others(tmp_path):
    """Resume replays augmentation: a step's batch depends on (seed, step) alone."""
    store = write_store(tmp_path / "patches.zarr", n_train=6, n_val=2, shape=(16, 16))
    settings = {**DEFAULTS, "noise": 0.1, **always(*GEOMETRIC, *IMAGE_ONLY)}
    running = PatchBatches(store, "train", 4, 3, settings, "segmentation")
    batches = [running[step] for step in range(4)]
    fresh = PatchBatches(store, "train", 4, 3, settings, "segmentation")
    x, y = fresh[3]
    assert np.array_equal(x.numpy(), batches[3][0].numpy())
    assert np.array_equal(y.numpy(), batches[3][1].numpy())


def test_a_resumed_run_with_every_augmentation_equals_the_uninterrupted_one(tmp_path):
    """3D regression, every augmentation at probability 1 (test_train: the same for the
    default settings, and after SIGTERM)."""
    task, shape = "regression", (8, 16, 16)
    store = write_store(tmp_path / "p.zarr", task, n_train=6, n_val=2, shape=shape)
    rich = {name: {"p": 1.0} for name in (*GEOMETRIC, *IMAGE_ONLY)}
    model, train = sections(task, {"spatial_dims": len(shape)}, steps=6, validate_every=3,
                            augment=rich, threads=1)
    whole = Trainer(store, str(tmp_path / "whole"), task, model, train).run(False)
    Trainer(store, str(tmp_path / "parts"), task, model, train).run(False, until=3)
    resumed = Trainer(store, str(tmp_path / "parts"), task, model, train)
    assert resumed.resume_if_possible() and resumed.step == 3
    parts = resumed.run(False)
    for key, tensor in whole["model_state"].items():
        assert torch.equal(parts["model_state"][key], tensor), key


# --- configuration -------------------------------------------------------------------------
def test_rich_set_uses_the_schema_ranges_with_nnunets_probabilities():
    for name, block in RICH_AUGMENT.items():
        assert {k: v for k, v in block.items() if k != "p"} == {
            k: v for k, v in DEFAULTS[name].items() if k != "p"}
        assert DEFAULTS[name]["p"] == 0.0
    assert {name: block["p"] for name, block in RICH_AUGMENT.items()} == {
        "rotate": 0.2, "scale": 0.2, "elastic": 0.2, "gamma": 0.3, "blur": 0.2,
        "low_resolution": 0.25}


def _config(train: dict | None = None, model_train: dict | None = None,
            task: str = "segmentation", **model: dict) -> dict:
    model = {"task": task, "train_on": ["d"], **model}
    if model_train is not None:
        model["train"] = model_train
    return validate_config({"datasets": {"d": {"image": "i", "target": "t"}},
                            "models": {"m": model}, "train": train or {}})


def test_a_probability_alone_keeps_the_other_defaults():
    rotate = {"p": 0.5, "degrees": 180, "degrees_3d_tilt": 15}
    config = _config(train={"augment": {"rotate": {"p": 0.5}}})
    assert model_section(config, "m", "train")["augment"]["rotate"] == rotate
    config = _config(model_train={"augment": {"rotate": {"p": 0.5}}})
    augment_settings = model_section(config, "m", "train")["augment"]
    assert augment_settings["rotate"] == rotate and augment_settings["flips"] is True
    assert section_settings("train", {"augment": {"rotate": {"p": 0.5}}})["augment"][
        "rotate"] == rotate


@pytest.mark.parametrize("where", ["train", "model", "section"])
def test_a_range_with_low_above_high_is_refused_naming_the_key(where):
    bad = {"augment": {"scale": {"p": 0.2, "range": [1.3, 0.9]}}}
    with pytest.raises(ConfigError) as error:
        if where == "section":
            section_settings("train", bad)
        else:
            _config(**({"train": bad} if where == "train" else {"model_train": bad}))
    message = str(error.value)
    key = "models.m.train" if where == "model" else "train"
    assert message.startswith(f"config key '{key}.augment.scale.range': [1.3, 0.9]")
    assert "\n" not in message


@pytest.mark.parametrize("block", [{"p": 1.5}, {"range": [0.5]}, {"range": [0, 1]},
                                   {"factor": 2}])
def test_the_schema_refuses_bad_probabilities_and_ranges(block):
    with pytest.raises(ConfigError, match=r"config key 'train\.augment\.scale"):
        section_settings("train", {"augment": {"scale": block}})


def test_augmentations_left_off_change_no_params_and_no_fingerprint():
    """A model trained before rotate...low_resolution existed keeps its Snakemake params and
    training fingerprint: a block at p 0 draws nothing and is left out of both."""
    config = _config(model_train={"augment": {"gamma": {"p": 0.3}}})
    settings = training_settings(model_section(config, "m", "train"),
                                 model_section(config, "m", "model"))
    assert set(settings["augment"]) == {"flips", "rotate90", "intensity", "intensity_target",
                                        "noise", "gamma"}
    # what the rule passes, filled again by the command line, is what the trainer ran with
    filled = section_settings("train", settings)
    assert filled["augment"] == model_section(config, "m", "train")["augment"]


def test_an_n2v_model_with_pixel_mixing_augmentations_is_warned_about():
    config = _config(model_train={"augment": {"blur": {"p": 0.2}, "gamma": {"p": 0.3}}},
                     task="regression", model={"target": "n2v"})
    warnings = config_warnings(config)
    assert len(warnings) == 1 and warnings[0].startswith("config key 'models.m.train.augment'")
    assert "blur" in warnings[0]
    config = _config(train={"augment": {"blur": {"p": 0.2}}})  # not n2v: no warning
    assert config_warnings(config) == []
