"""Tests for unetflow.predict: tiled prediction against one whole-image pass (the oracle),
seams, sharding, the NGFF output and the sharded Snakemake rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from conftest import planned_jobs, snakemake, write_config
from unetflow.config import section_settings
from unetflow.model.checkpoint import new_checkpoint, save_checkpoint
from unetflow.model.unet import UNet, exact_halo
from unetflow.normalize import compute_dataset_stats, normalize_array, write_stats
from unetflow.ome import open_image, write_image
from unetflow.predict import (
    TileRunner,
    create_raw_store,
    gather_prediction,
    predict_array,
    predict_shard,
    predict_to_ome_zarr,
    prepare_job,
)

TINY = dict(depth=2, base_features=4)
STATS_SETTINGS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 256, "mask": None}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(dims: int = 2, channels_out: int = 1, seed: int = 0, **kwargs) -> UNet:
    torch.manual_seed(seed)
    model = UNet(dims, 1, channels_out, **{**TINY, **kwargs}).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not identity
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def predict_defaults(**overrides) -> dict:
    """The predict section with the schema's defaults, as the workflow passes it."""
    return section_settings("predict", {"device": "cpu", "pyramid_levels": 2, **overrides})


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32) * 5


def whole_image_pass(model: UNet, x: np.ndarray, halo: int) -> np.ndarray:
    """The oracle: one forward pass over the image reflect-padded by `halo` (numpy's pad)."""
    dims = model.spatial_dims
    padded = np.pad(x, [(0, 0)] * (x.ndim - dims) + [(halo, halo)] * dims, mode="reflect")
    with torch.inference_mode():
        y = model(torch.from_numpy(padded[None]))[0].numpy()
    return y[(slice(None),) + (slice(halo, -halo),) * dims]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (b.max() - b.min()))


# --- the oracle: crop tiling equals one whole-image pass ---------------------------------
@pytest.mark.parametrize("dims,shape,tile", [
    (2, (75, 101), (32, 32)),  # odd sizes; last tiles of 11 and 5 px, smaller than the halo
    (2, (40, 33), (64, 64)),  # one tile, smaller than the tile shape
    (3, (11, 35, 29), (24, 24, 24)),  # odd 3D, 2 x 2 tiles in y, x
])
def test_crop_with_default_halo_equals_whole_image_pass(dims, shape, tile):
    model = tiny_model(dims, channels_out=2)
    x = smooth_image((1, *shape))
    tiled = predict_array(model, x, predict_defaults(tile_shape=list(tile))).compute()
    assert tiled.shape == (2, *shape)
    assert relative_error(tiled, whole_image_pass(model, x, exact_halo(model))) < 1e-5


def test_halo_below_the_exact_one_is_not_exact_and_warns():
    model = tiny_model()
    x = smooth_image((1, 75, 101))
    with pytest.warns(UserWarning, match="smaller than this model's exact halo"):
        tiled = predict_array(model, x, predict_defaults(halo=8, tile_shape=[32, 32])).compute()
    assert relative_error(tiled, whole_image_pass(model, x, 8)) > 1e-3


def test_2d_model_runs_per_z_slice_and_time_point():
    model = tiny_model(2)
    x = smooth_image((1, 2, 3, 45, 37))  # c, t, z, y, x
    tiled = predict_array(model, x, predict_defaults(tile_shape=[32, 32]),
                          axes=["t", "z", "y", "x"]).compute()
    halo = exact_halo(model)
    for t in range(2):
        for z in range(3):
            want = whole_image_pass(model, x[:, t, z], halo)
            assert relative_error(tiled[:, t, z], want) < 1e-5


def test_batches_across_dask_workers_equal_single_tiles():
    model = tiny_model()
    x = smooth_image((1, 75, 101))
    single = predict_array(model, x, predict_defaults(tile_shape=[32, 32])).compute(num_workers=1)
    batched = predict_array(model, x, predict_defaults(tile_shape=[32, 32], batch_size=3)
                            ).compute(num_workers=4)
    assert relative_error(batched, single) < 1e-5


# --- gaussian blending: no seams --------------------------------------------------------
def border_gradient_ratio(y: np.ndarray, tile: int) -> float:
    """Mean |difference| across tile borders (along x) / mean |difference| elsewhere."""
    diff = np.abs(np.diff(y, axis=-1))
    at_border = np.zeros(diff.shape[-1], dtype=bool)
    at_border[tile - 1::tile] = True
    return float(diff[..., at_border].mean() / diff[..., ~at_border].mean())


def test_gaussian_blending_has_no_seams_where_untiled_crop_has():
    model = tiny_model(channels_out=1)
    x = smooth_image((1, 96, 160), seed=1)
    settings = predict_defaults(tile_shape=[32, 32], blending="gaussian")
    gaussian = predict_array(model, x, settings).compute()
    with pytest.warns(UserWarning):
        seams = predict_array(model, x, predict_defaults(halo=0, tile_shape=[32, 32])).compute()
    assert border_gradient_ratio(gaussian, 32) < 1.25
    assert border_gradient_ratio(seams, 32) > 2.0  # the check can fail: no halo gives seams
    # gaussian windows of an exact halo stay close to the whole-image pass
    assert relative_error(gaussian, whole_image_pass(model, x, exact_halo(model))) < 0.05


# --- the OME-Zarr store path -------------------------------------------------------------
def write_dataset(root: Path, data: np.ndarray, axes: list[str], ngff: str = "0.5",
                  name: str = "image") -> tuple[str, str]:
    """An image store (NGFF 0.4 or 0.5) with scale and translation, and its statistics."""
    path = root / f"{name}.ome.zarr"
    scale = {a: (0.5 if a in "yx" else 2.0) for a in axes if a != "c"}
    if ngff == "0.4":
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_image as ome_write_image

        ome_write_image(data, str(path), axes="".join(axes), fmt=FormatV04(),
                        scale_factors=[], scale=scale)
    else:
        write_image(path, data, axes, scale=scale, units={a: "micrometer" for a in "zyx"
                                                            if a in axes},
                    translation={a: 10.0 for a in axes if a != "c"})
    stats = root / f"{name}.json"
    write_stats(compute_dataset_stats(str(path), None, STATS_SETTINGS, name), stats)
    return str(path), str(stats)


def write_checkpoint(path: Path, model: UNet, task: str) -> str:
    normalization = {"method": "percentile", "clip": False, "datasets": {}}
    save_checkpoint(path, new_checkpoint(model, task, normalization))
    return str(path)


def expected_output(model: UNet, image: str, stats_path: str, softmax: bool) -> np.ndarray:
    img = open_image(image)
    data = np.asarray(img.data.compute(), dtype=np.float32)
    if "c" not in img.axes:
        data = data[None]
    stats = json.loads(Path(stats_path).read_text())
    x = normalize_array(data, stats, "percentile", False)
    y = whole_image_pass(model, x, exact_halo(model))
    return torch.softmax(torch.from_numpy(y), 0).numpy() if softmax else y


def validate_ngff(path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models import open_ome_zarr

    open_ome_zarr(zarr.open_group(str(path), mode="r"))
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes and nodes[0].data[0].shape == open_image(path).data.shape


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_regression_store_keeps_axes_scale_translation_and_provenance(tmp_path, ngff):
    model = tiny_model()
    image, stats = write_dataset(tmp_path, smooth_image((1, 45, 70)) + 100, ["c", "y", "x"],
                                 ngff)
    ckpt = write_checkpoint(tmp_path / "m.pt", model, "regression")
    out = tmp_path / "pred.ome.zarr"
    predict_to_ome_zarr(ckpt, image, stats, None, predict_defaults(tile_shape=[32, 32],
                                                                   output_units="normalized"),
                        str(out), "m", "d", threads=2)
    validate_ngff(out)
    pred, source = open_image(out), open_image(image)
    assert pred.axes == source.axes and pred.scale == source.scale
    assert pred.translation == source.translation
    assert len(pred.attrs["ome"]["multiscales"][0]["datasets"]) == 2
    got = np.asarray(pred.data.compute())
    assert relative_error(got, expected_output(model, image, stats, False)) < 1e-5
    provenance = pred.attrs["unetflow"]
    assert provenance["checkpoint_sha256"] and provenance["unetflow_version"]
    assert provenance["halo"] == exact_halo(model) and provenance["normalization"]["channels"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.raw.zarr"))


def test_regression_in_input_units_maps_back_with_the_stored_statistics(tmp_path):
    model = tiny_model(residual=True)
    image, stats = write_dataset(tmp_path, smooth_image((45, 70)) * 20 + 500, ["y", "x"])
    ckpt = write_checkpoint(tmp_path / "m.pt", model, "regression")
    out = tmp_path / "pred.ome.zarr"
    predict_to_ome_zarr(ckpt, image, stats, None, predict_defaults(tile_shape=[32, 32]),
                        str(out), "m", "d", threads=1)
    pred = open_image(out)
    assert pred.axes == ["y", "x"]  # no c in the input, one output channel: none added
    got = np.asarray(pred.data.compute())
    stats_json = json.loads(Path(stats).read_text())
    low, high = list(stats_json["channels"][0]["percentiles"].values())
    want = expected_output(model, image, stats, False)[0] * (high - low) + low
    assert relative_error(got, want) < 1e-5


def test_time_series_at_level_one_keeps_its_axes_and_geometry(tmp_path):
    model = tiny_model()
    data = np.stack([smooth_image((1, 90, 70), seed=s) for s in (1, 2)])  # t, c, y, x
    path = tmp_path / "tc.ome.zarr"
    write_image(path, data, ["t", "c", "y", "x"], scale={"t": 30.0, "c": 1.0, "y": 0.5,
                                                        "x": 0.5},
                pyramid_levels=2, translation={"t": 0.0, "y": 7.0, "x": -2.0})
    stats = tmp_path / "tc.json"
    write_stats(compute_dataset_stats(str(path), None, STATS_SETTINGS, "tc"), stats)
    ckpt = write_checkpoint(tmp_path / "m.pt", model, "regression")
    out = tmp_path / "pred.ome.zarr"
    predict_to_ome_zarr(ckpt, str(path), str(stats), [0], predict_defaults(
        tile_shape=[16, 16], level=1, output_units="normalized"), str(out), "m", "d", threads=1)
    pred, source = open_image(out), open_image(path, level=1)
    assert pred.axes == ["t", "c", "y", "x"] and pred.data.shape == (2, 1, 45, 35)
    assert pred.scale == source.scale and pred.translation == source.translation
    x = normalize_array(np.asarray(source.data.compute()).transpose(1, 0, 2, 3),
                        json.loads(stats.read_text()))
    got = np.asarray(pred.data.compute())
    for t in range(2):
        assert relative_error(got[t], whole_image_pass(model, x[:, t], exact_halo(model))) < 1e-5


def test_segmentation_store_has_probabilities_and_instance_labels(tmp_path):
    model = tiny_model(channels_out=2, seed=3)
    image, stats = write_dataset(tmp_path, smooth_image((1, 2, 40, 52)), ["c", "z", "y", "x"])
    ckpt = write_checkpoint(tmp_path / "m.pt", model, "segmentation")
    out = tmp_path / "seg.ome.zarr"
    settings = predict_defaults(tile_shape=[32, 32], probabilities=True, chunks=[16, 16])
    predict_to_ome_zarr(ckpt, image, stats, None, settings, str(out), "m", "d", threads=1)
    validate_ngff(out)
    pred = open_image(out)
    assert pred.axes == ["c", "z", "y", "x"] and pred.data.chunksize == (2, 1, 16, 16)
    probabilities = np.asarray(pred.data.compute())
    img = open_image(image)
    data = normalize_array(np.asarray(img.data.compute()), json.loads(Path(stats).read_text()))
    for z in range(2):
        y = whole_image_pass(model, data[:, z], exact_halo(model))
        want = torch.softmax(torch.from_numpy(y), 0).numpy()
        assert relative_error(probabilities[:, z], want) < 1e-5
    labels = np.asarray(open_image(f"{out}/labels/prediction").data.compute())
    want_labels, _ = ndimage.label(probabilities.argmax(0) > 0)  # face-connected in 3D
    assert ((labels > 0) == (want_labels > 0)).all()
    pairs = np.unique(np.stack([labels[labels > 0], want_labels[want_labels > 0]]), axis=1)
    assert pairs.shape[1] == want_labels.max() == len(np.unique(labels)) - 1  # same objects
    label_attrs = zarr.open_group(f"{out}/labels/prediction", mode="r").attrs["ome"]
    assert "image-label" in label_attrs


def test_sharded_equals_unsharded_and_shards_write_disjoint_tiles(tmp_path):
    model = tiny_model(channels_out=2, seed=1)
    image, stats = write_dataset(tmp_path, smooth_image((1, 75, 101)), ["c", "y", "x"])
    ckpt = write_checkpoint(tmp_path / "m.pt", model, "segmentation")
    settings = predict_defaults(tile_shape=[32, 32], probabilities=True, blending="gaussian")
    whole = tmp_path / "whole.ome.zarr"
    predict_to_ome_zarr(ckpt, image, stats, None, settings, str(whole), "m", "d", threads=1)
    job = prepare_job(ckpt, image, None, settings, stats)
    raw = tmp_path / "raw.zarr"
    create_raw_store(job, raw, shards=3)
    records = [predict_shard(job, raw, i, 3, threads=1) for i in range(3)]
    assert sum(r["tiles"] for r in records) == job.plan.tile_count() == 12
    sharded = tmp_path / "sharded.ome.zarr"
    gather_prediction(job, raw, records, sharded, "m", "d", threads=1)
    for sub in ("", "/labels/prediction"):
        a = np.asarray(open_image(f"{whole}{sub}").data.compute())
        b = np.asarray(open_image(f"{sharded}{sub}").data.compute())
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"shards \[0, 2\]"):
        gather_prediction(job, raw, [records[0], records[2]], tmp_path / "x.ome.zarr", "m", "d",
                          threads=1)


# --- the sharded Snakemake rules ---------------------------------------------------------
@pytest.mark.slow
def test_snakemake_reruns_only_the_shard_that_failed(tmp_path):
    """Shards 0 and 2 of 3 are done, shard 1's job died: the rerun runs shard 1 and the
    gather only, and the result equals the whole-image pass."""
    model = tiny_model(channels_out=1)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    image, _ = write_dataset(data_dir, smooth_image((1, 75, 101)), ["c", "y", "x"])
    results = tmp_path / "results"
    (results / "m").mkdir(parents=True)
    (results / "normalization").mkdir()
    write_checkpoint(results / "m" / "checkpoint_best.pt", model, "regression")
    write_stats(compute_dataset_stats(image, None, STATS_SETTINGS, "d"),
                results / "normalization" / "d.json")
    config = {"datasets": {"d": {"image": image, "target": None}, "tr": {"image": image,
                                                                        "target": image}},
              "models": {"m": {"task": "regression", "train_on": ["tr"], "predict_on": ["d"]}},
              "model": TINY, "patches": {"shape": [32, 32]},
              "predict": {"tile_shape": [32, 32], "shards": 3, "pyramid_levels": 2,
                          "device": "cpu", "output_units": "normalized"}}
    write_config(tmp_path, config)
    shard = "results/m/predictions/d.shards/shard_{}.json"
    target = "results/m/predictions/d.ome.zarr"
    options = ("--cores", "2", "--configfile", "config.yaml", "--allowed-rules",
               "predict_create", "predict_shard", "predict")
    # the state a failed shard 1 leaves: shards 0 and 2 done, the raw store kept (Snakemake
    # keeps temp files whose consumers have not run; --notemp does so for this partial run)
    snakemake(tmp_path, shard.format(0), shard.format(2), *options, "--notemp")
    rerun = snakemake(tmp_path, target, *options)
    ran = planned_jobs(rerun.stdout + rerun.stderr)
    assert {rule for rule, _ in ran} == {"predict_shard", "predict"}
    assert [w for rule, w in ran if rule == "predict_shard"] == ["model=m, dataset=d, shard=1"]
    got = np.asarray(open_image(tmp_path / target).data.compute())
    want = expected_output(model, image, str(results / "normalization" / "d.json"), False)
    assert relative_error(got[0] if got.ndim == 3 else got, want[0]) < 1e-5
    assert not (tmp_path / "results/m/predictions/d.shards/raw.zarr").exists()  # temp


# --- CUDA ---------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_batches_stay_close_to_the_cpu_pass():
    model = tiny_model(channels_out=2)
    x = smooth_image((1, 150, 203))
    want = predict_array(model, x, predict_defaults(tile_shape=[64, 64])).compute()
    gpu = model.to("cuda")
    for amp in (False, True):
        runner_out = predict_array(gpu, x, predict_defaults(tile_shape=[64, 64], amp=amp,
                                                            batch_size=4),
                                   device=torch.device("cuda")).compute(num_workers=4)
        assert relative_error(runner_out, want) < (2e-2 if amp else 1e-4)
    runner = TileRunner(gpu, torch.device("cuda"), softmax=False, amp=True, batch_size=2)
    assert runner.dtype in (torch.bfloat16, torch.float16)
