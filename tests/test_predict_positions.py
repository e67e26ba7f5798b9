"""Tests for unetflow.predict_positions: batches of a plate's or collection's positions against
the single-image path on the same field (the oracle), reruns that keep what is up to date,
the finished plate (validated by ome-zarr-models and read by ome-zarr-py), and the direct
NGFF writer against ome-zarr-py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import run_cli
from test_predict import predict_defaults, smooth_image, tiny_model, write_checkpoint
from unetflow import predict_positions as positions_module
from unetflow.model.checkpoint import new_checkpoint, save_checkpoint
from unetflow.normalize import (
    compute_dataset_stats,
    normalize_array,
    position_stats,
    write_stats,
)
from unetflow.ome import open_image, write_image, write_image_direct, write_label_image_direct
from unetflow.plates import (
    dataset_positions,
    position_batches,
    position_output_path,
    write_demo_plate,
    write_positions,
)
from unetflow.predict import predict_to_ome_zarr
from unetflow.predict_positions import finish_plate, predict_positions, stored_fingerprint

STATS_SETTINGS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 256, "mask": None}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> dict:
    """A 2 x 2-well demo plate with 2 fields of 64^2 each, its positions, a segmentation
    and a regression checkpoint, and dataset-level statistics."""
    root = tmp_path_factory.mktemp("plate")
    path = root / "screen.ome.zarr"
    write_demo_plate(path, rows=2, columns=2, fields=2, shape=(64, 64), clean=False)
    position_set = dataset_positions("screen", {"plate": str(path)})
    write_positions(position_set, root / "positions.json")
    stats = root / "stats.json"
    write_stats(compute_dataset_stats(position_set.positions[0].image, None, STATS_SETTINGS,
                                      "screen"), stats)
    return {"root": root, "positions": position_set, "stats": str(stats),
            "seg": segmenting_checkpoint(root / "seg.pt", position_set.positions[0].image,
                                         str(stats)),
            "reg": write_checkpoint(root / "reg.pt", tiny_model(residual=True), "regression")}


def segmenting_checkpoint(path: Path, image: str, stats: str) -> str:
    """A random 2-class model whose class-1 bias makes 30% of `image` foreground, so that
    outputs have objects to label (a random model's are all background)."""
    model = tiny_model(channels_out=2, seed=3)
    x = normalize_array(np.asarray(open_image(image).data, dtype=np.float32),
                        json.loads(Path(stats).read_text()))
    with torch.inference_mode():
        logits = model(torch.from_numpy(x[None]))[0]
        model.head.bias[1] -= torch.quantile((logits[1] - logits[0]).flatten(), 0.7)
    return write_checkpoint(path, model, "segmentation")


def boundary_checkpoint(path: Path, image: str, stats: str) -> str:
    """A random 3-class model (model.target boundaries) biased so that about 40% of `image`
    is interior and 25% boundary: seeds and rims for the watershed to grow."""
    model = tiny_model(channels_out=3, seed=4)
    x = normalize_array(np.asarray(open_image(image).data, dtype=np.float32),
                        json.loads(Path(stats).read_text()))
    with torch.inference_mode():
        logits = model(torch.from_numpy(x[None]))[0]
        spread = float((logits[1] - logits[0]).std())  # a random head's logits barely differ
        model.head.weight *= 4 / spread
        model.head.bias *= 4 / spread
        logits = model(torch.from_numpy(x[None]))[0]
        model.head.bias[1] -= torch.quantile((logits[1] - logits[0]).flatten(), 0.6)
        model.head.bias[2] -= torch.quantile((logits[2] - logits[0]).flatten(), 0.75)
    normalization = {"method": "percentile", "clip": False, "datasets": {}}
    save_checkpoint(path, new_checkpoint(model, "segmentation", normalization,
                                         model_settings={"num_classes": 2,
                                                         "target": "boundaries",
                                                         "boundary_width": 1}))
    return str(path)


def settings(**overrides) -> dict:
    return predict_defaults(tile_shape=[64, 64], **overrides)


def in_batches(plate: dict, checkpoint: str, output: Path, work: Path, per_job: int = 4,
               position_set=None, **overrides) -> list[dict]:
    """Predict the positions in batches of `per_job`, as the jobs of a plate do."""
    position_set = position_set or plate["positions"]
    return [predict_positions(checkpoint, position_set, keys, plate["stats"], None,
                              settings(**overrides), "m", "screen", output, 1,
                              work / f"batch_{i}.json")
            for i, keys in enumerate(position_batches(position_set.keys, per_job))]


# --- comparing NGFF stores ----------------------------------------------------------------
def store_files(path: Path) -> dict[str, Path]:
    return {str(f.relative_to(path)): f for f in sorted(path.rglob("*")) if f.is_file()}


def assert_same_store(got: Path, want: Path) -> None:
    """The same files, the same metadata (but the unetflow provenance) and the same values."""
    files, wanted = store_files(got), store_files(want)
    assert sorted(files) == sorted(wanted)
    for name, path in files.items():
        if not name.endswith("zarr.json"):
            continue
        ours, theirs = json.loads(path.read_text()), json.loads(wanted[name].read_text())
        ours.get("attributes", {}).pop("unetflow", None)
        theirs.get("attributes", {}).pop("unetflow", None)
        assert ours == theirs, name
        if ours["node_type"] == "array":
            array = str(path.parent)
            a = zarr.open_array(array, mode="r")[...]
            b = zarr.open_array(str(wanted[name].parent), mode="r")[...]
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def oracle(plate: dict, checkpoint: str, image: str, stats: str, work: Path,
           **overrides) -> Path:
    """The single-image path's output for one field."""
    out = work / f"oracle_{abs(hash((image, stats, checkpoint)))}.ome.zarr"
    predict_to_ome_zarr(checkpoint, image, stats, None, settings(**overrides), str(out), "m",
                        "screen", threads=1)
    return out


# --- a plate in batches -------------------------------------------------------------------
def test_a_plate_in_two_batches_equals_the_single_image_path_field_by_field(plate, tmp_path):
    out = tmp_path / "screen_pred.ome.zarr"
    records = in_batches(plate, plate["seg"], out, tmp_path)
    assert len(records) == 2
    assert sorted(k for r in records for k in r["predicted"]) == sorted(plate["positions"].keys)
    assert all(r["kept"] == [] and r["device"] == "cpu" for r in records)
    assert json.loads((tmp_path / "batch_1.json").read_text()) == records[1]
    objects = []
    for position in plate["positions"].positions:
        got = Path(position_output_path(out, "plate", position))
        assert_same_store(got, oracle(plate, plate["seg"], position.image, plate["stats"],
                                      tmp_path))
        provenance = zarr.open_group(str(got), mode="r").attrs["unetflow"]
        assert provenance["position"] == position.key and provenance["image"] == position.image
        objects.append(int(zarr.open_array(str(got / "labels/prediction/s0"))[...].max()))
        assert provenance["fingerprint"] == stored_fingerprint(got)
    assert min(objects) > 1  # the comparison of labels is not one of empty images
    index = finish_plate(plate["positions"], out, records, "m", "screen", plate["seg"],
                         settings(), tmp_path / "index.json")
    assert json.loads((tmp_path / "index.json").read_text()) == index
    assert index["kind"] == "plate" and index["positions"]["B02_1"] == f"{out}/B/2/1"
    assert not [p for p in out.rglob(".*") if p.name != ".zattrs"]  # no temporaries left


def validate_plate(path: Path, wells: list[str], fields: int) -> None:
    """ome-zarr-models' HCS model and ome-zarr-py's reader both take it as a plate."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.hcs import HCS

    model = open_ome_zarr(zarr.open_group(str(path), mode="r"))
    assert isinstance(model, HCS)
    plate_meta = model.ome_attributes.plate
    assert [w.path for w in plate_meta.wells] == wells
    assert plate_meta.field_count == fields
    node = next(iter(Reader(parse_url(str(path)))()))
    assert any(isinstance(spec, Plate) for spec in node.specs)


def test_the_finished_plate_validates_and_keeps_the_source_rows_and_columns(plate, tmp_path):
    out = tmp_path / "screen_pred.ome.zarr"
    records = in_batches(plate, plate["seg"], out, tmp_path)
    finish_plate(plate["positions"], out, records, "m", "screen", plate["seg"], settings(),
                 tmp_path / "index.json")
    validate_plate(out, ["A/1", "A/2", "B/1", "B/2"], 2)
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert [r["name"] for r in attrs["ome"]["plate"]["rows"]] == ["A", "B"]
    assert [c["name"] for c in attrs["ome"]["plate"]["columns"]] == ["1", "2"]
    provenance = attrs["unetflow"]
    assert provenance["positions"] == 8 and provenance["model"] == "m"
    assert provenance["source"] == plate["positions"].source
    assert len(provenance["checkpoint_sha256"]) == 64
    well = zarr.open_group(str(out / "B" / "2"), mode="r").attrs["ome"]["well"]
    assert [i["path"] for i in well["images"]] == ["0", "1"]


def test_a_smaller_selection_removes_stale_fields_and_lists_only_its_wells(plate, tmp_path):
    out = tmp_path / "screen_pred.ome.zarr"
    records = in_batches(plate, plate["seg"], out, tmp_path)
    finish_plate(plate["positions"], out, records, "m", "screen", plate["seg"], settings(),
                 tmp_path / "index.json")
    smaller = plate["positions"].select(["A01_0", "B02_0", "B02_1"])
    again = in_batches(plate, plate["seg"], out, tmp_path, position_set=smaller)
    assert [k for r in again for k in r["predicted"]] == []  # all three were up to date
    index = finish_plate(smaller, out, again, "m", "screen", plate["seg"], settings(),
                         tmp_path / "index.json")
    assert sorted(index["positions"]) == ["A01_0", "B02_0", "B02_1"]
    fields = sorted(str(p.parent.relative_to(out)) for p in out.glob("*/*/*/zarr.json"))
    assert fields == ["A/1/0", "B/2/0", "B/2/1"]
    assert not (out / "A" / "2").exists() and not (out / "B" / "1").exists()
    validate_plate(out, ["A/1", "B/2"], 2)


# --- reruns -------------------------------------------------------------------------------
def test_a_rerun_keeps_everything_and_a_deleted_position_is_the_only_one_redone(plate,
                                                                                 tmp_path):
    out = tmp_path / "screen_pred.ome.zarr"
    first = in_batches(plate, plate["seg"], out, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("zarr.json")}
    again = in_batches(plate, plate["seg"], out, tmp_path)
    assert [r["predicted"] for r in again] == [[], []]
    assert [r["kept"] for r in again] == [r["keys"] for r in first]
    assert again[0]["device"] is None  # nothing to predict: the network is not loaded
    assert {p: p.stat().st_mtime_ns for p in out.rglob("zarr.json")} == stamps
    gone = plate["positions"].by_key("B01_1")
    target = Path(position_output_path(out, "plate", gone))
    import shutil

    shutil.rmtree(target)
    third = in_batches(plate, plate["seg"], out, tmp_path)
    assert [r["predicted"] for r in third] == [[], ["B01_1"]]
    assert_same_store(target, oracle(plate, plate["seg"], gone.image, plate["stats"],
                                     tmp_path))


def test_settings_that_decide_outputs_repredict_and_execution_settings_do_not(plate,
                                                                             tmp_path):
    out = tmp_path / "screen_pred.ome.zarr"
    in_batches(plate, plate["seg"], out, tmp_path, per_job=8)
    faster = in_batches(plate, plate["seg"], out, tmp_path, per_job=8, batch_size=2,
                        dask_workers=2, threads=1, shards=3, positions_per_job=3)
    assert faster[0]["predicted"] == []
    changed = in_batches(plate, plate["seg"], out, tmp_path, per_job=8, pyramid_levels=3)
    assert changed[0]["predicted"] == plate["positions"].keys
    image = plate["positions"].positions[0]
    assert_same_store(Path(position_output_path(out, "plate", image)),
                      oracle(plate, plate["seg"], image.image, plate["stats"], tmp_path,
                             pyramid_levels=3))


def test_per_position_statistics_are_used_and_fingerprinted_per_position(plate, tmp_path):
    per_position = {"dataset": "screen", "per_position": True, "positions": {
        p.key: compute_dataset_stats(p.image, None, STATS_SETTINGS, "screen")
        for p in plate["positions"].positions}}
    stats = tmp_path / "per_position.json"
    write_stats(per_position, stats)
    chosen = plate["positions"].select(["A01_0", "A01_1"])
    out = tmp_path / "pred.ome.zarr"

    def run() -> dict:
        return predict_positions(plate["reg"], chosen, None, str(stats), None, settings(), "m",
                                 "screen", out, 2, tmp_path / "batch.json")

    assert run()["predicted"] == ["A01_0", "A01_1"]
    for position in chosen.positions:
        own = tmp_path / f"{position.key}.json"
        write_stats(position_stats(per_position, position.key), own)
        assert_same_store(Path(position_output_path(out, "plate", position)),
                          oracle(plate, plate["reg"], position.image, str(own), tmp_path))
    per_position["positions"]["A01_1"]["channels"][0]["percentiles"]["1.0"] -= 1.0
    write_stats(per_position, stats)
    assert run()["predicted"] == ["A01_1"]


# --- a collection, and the other ways through ----------------------------------------------
@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """Three images of different shapes (with scale and translation) in two folders."""
    root = tmp_path_factory.mktemp("collection")
    for i, (folder, shape) in enumerate([("ctrl", (64, 64)), ("ctrl", (48, 80)),
                                         ("drug", (72, 40))]):
        write_image(root / "images" / folder / f"img{i}.ome.zarr",
                    smooth_image((1, *shape), seed=i) + 50, ["c", "y", "x"],
                    scale={"c": 1.0, "y": 0.5, "x": 0.5}, units={"y": "micrometer",
                                                                 "x": "micrometer"},
                    translation={"y": 3.0 * i, "x": -1.5}, pyramid_levels=2)
    position_set = dataset_positions("cells", {"collection": f"{root}/images/*/*.ome.zarr"})
    stats = root / "stats.json"
    write_stats(compute_dataset_stats(position_set.positions[0].image, None, STATS_SETTINGS,
                                      "cells"), stats)
    return {"root": root, "positions": position_set, "stats": str(stats),
            "reg": write_checkpoint(root / "reg.pt", tiny_model(residual=True), "regression"),
            "seg": segmenting_checkpoint(root / "seg.pt", position_set.positions[0].image,
                                         str(stats)),
            "bnd": boundary_checkpoint(root / "bnd.pt", position_set.positions[0].image,
                                       str(stats))}


SMALL_OBJECTS = {"watershed": {"min_seed_size": 1, "min_size": 1, "halo": 16}}


@pytest.mark.parametrize("task,overrides", [
    ("reg", {}),  # one chunk each: the direct writer
    ("seg", {"tile_shape": [32, 32], "probabilities": True}),  # several chunks: dask in memory
    ("reg", {"tile_shape": [32, 32], "blending": "gaussian"}),
    ("seg", {"memory_megapixels": 1e-4}),  # too large for memory: the raw store path
    ("bnd", SMALL_OBJECTS),  # model.target boundaries: the seeded watershed, in each path
    ("bnd", {"tile_shape": [32, 32], **SMALL_OBJECTS}),
    ("bnd", {"memory_megapixels": 1e-4, "tile_shape": [32, 32], **SMALL_OBJECTS}),
])
def test_a_collection_in_two_batches_equals_the_single_image_path(collection, tmp_path,
                                                                    monkeypatch, task,
                                                                    overrides):
    overrides = dict(overrides)
    if "memory_megapixels" in overrides:
        monkeypatch.setattr(positions_module, "UNIT_MEGAPIXELS",
                            overrides.pop("memory_megapixels"))
    tile = overrides.pop("tile_shape", [64, 64])
    position_set, out = collection["positions"], tmp_path / "cells_pred"
    assert position_set.keys == ["ctrl__img0", "ctrl__img1", "drug__img2"]
    records = [predict_positions(collection[task], position_set, keys, collection["stats"],
                                 None, predict_defaults(tile_shape=tile, **overrides), "m",
                                 "cells", out, 2, None)
               for keys in position_batches(position_set.keys, 1)[::-1]]  # 3, last first
    assert [r["predicted"] for r in records] == [["drug__img2"], ["ctrl__img1"], ["ctrl__img0"]]
    for position in position_set.positions:
        want = tmp_path / f"{position.key}_oracle.ome.zarr"
        predict_to_ome_zarr(collection[task], position.image, collection["stats"], None,
                            predict_defaults(tile_shape=tile, **overrides), str(want), "m",
                            "cells", threads=1)
        assert_same_store(out / f"{position.key}.ome.zarr", want)
        if task == "bnd":
            provenance = zarr.open_group(str(want), mode="r").attrs["unetflow"]
            assert provenance["objects"].startswith("seeded watershed")
            labels = zarr.open_array(str(want / "labels/prediction/s0"))[...]
            assert len(np.unique(labels)) > 3  # the comparison is not one of empty images
    index = finish_plate(position_set, out, records, "m", "cells", collection[task],
                         predict_defaults(), tmp_path / "index.json")
    assert index["kind"] == "collection"
    assert index["positions"] == {k: f"{out}/{k}.ome.zarr" for k in position_set.keys}
    assert not (out / "zarr.json").exists()  # a collection's folder is not a plate


def test_a_smaller_collection_removes_the_stale_images(collection, tmp_path):
    out = tmp_path / "cells_pred"
    position_set = collection["positions"]
    record = predict_positions(collection["reg"], position_set, None, collection["stats"], None,
                               settings(), "m", "cells", out, 1, None)
    chosen = position_set.select(["drug__img2"])
    finish_plate(chosen, out, [record], "m", "cells", collection["reg"], settings(),
                 tmp_path / "index.json")
    assert sorted(p.name for p in out.iterdir()) == ["drug__img2.ome.zarr"]


# --- what finish refuses ------------------------------------------------------------------
def test_finish_names_missing_outputs_and_positions_in_no_batch(plate, tmp_path):
    out = tmp_path / "screen_pred.ome.zarr"
    records = in_batches(plate, plate["seg"], out, tmp_path)
    with pytest.raises(ValueError, match=r"position\(s\) B01_0, B01_1, B02_0, B02_1 .* in no "
                                         r"batch record"):
        finish_plate(plate["positions"], out, records[:1], "m", "screen", plate["seg"],
                     settings(), tmp_path / "index.json")
    import shutil

    shutil.rmtree(out / "A" / "2" / "1")
    with pytest.raises(ValueError, match=r"no prediction for position\(s\) A02_1 "):
        finish_plate(plate["positions"], out, records, "m", "screen", plate["seg"],
                     settings(), tmp_path / "index.json")
    assert not (tmp_path / "index.json").exists() and not (out / "zarr.json").exists()


# --- the command line ---------------------------------------------------------------------
def test_the_commands_predict_batches_and_finish_the_plate(plate, tmp_path):
    out, positions = tmp_path / "pred.ome.zarr", str(plate["root"] / "positions.json")
    batches = position_batches(plate["positions"].keys, 4)
    common = ["--checkpoint", plate["seg"], "--settings", json.dumps(settings())]
    for i, keys in enumerate(batches):
        result = run_cli("predict", "positions", *common, "--positions", positions,
                         "--keys", json.dumps(keys), "--stats", plate["stats"],
                         "--execution", json.dumps({"device": "cpu"}), "--model", "m",
                         "--dataset", "screen", "--threads", "2", "--output", str(out),
                         "--record", str(tmp_path / f"b{i}.json"))
        assert result.returncode == 0, result.stderr
        assert "4 predicted, 0 kept" in result.stdout
    result = run_cli("predict", "finish", *common, "--positions", positions, "--model", "m",
                     "--dataset", "screen", "--output", str(out), "--index",
                     str(tmp_path / "index.json"), str(tmp_path / "b0.json"),
                     str(tmp_path / "b1.json"))
    assert result.returncode == 0, result.stderr
    assert "8 positions (plate)" in result.stdout
    validate_plate(out, ["A/1", "A/2", "B/1", "B/2"], 2)


@pytest.mark.parametrize("keys,message", [
    ('["A01_0", "Z99_0"]', "has no position 'Z99_0'"),
    ('{"A01_0": 1}', "--keys: {\"A01_0\": 1} is not a JSON list of position keys"),
])
def test_bad_keys_are_one_line(plate, tmp_path, keys, message):
    result = run_cli("predict", "positions", "--checkpoint", plate["seg"], "--positions",
                     str(plate["root"] / "positions.json"), "--keys", keys, "--stats",
                     plate["stats"], "--settings", "{}", "--model", "m", "--dataset",
                     "screen", "--output", str(tmp_path / "out"), "--record",
                     str(tmp_path / "b.json"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.json").exists()


# --- the direct writer against ome-zarr-py ------------------------------------------------
@pytest.mark.parametrize("axes,shape,dtype,levels,chunks", [
    (["c", "y", "x"], (2, 64, 96), np.float32, 3, None),
    (["c", "y", "x"], (1, 64, 64), np.uint32, 2, (1, 32, 48)),  # edge chunks padded
    (["z", "y", "x"], (4, 32, 32), np.float32, 2, (1, 32, 32)),  # z is not downsampled
    (["t", "c", "y", "x"], (2, 1, 40, 40), np.float32, 3, None),
    (["y", "x"], (45, 71), np.float32, 3, None),  # odd sizes
    (["y", "x"], (3, 40), np.float32, 3, None),  # a level of size 0: ome-zarr-py's own path
])
@pytest.mark.filterwarnings("ignore:Dimension y is too small")
def test_the_direct_writer_writes_what_ome_zarr_py_writes(tmp_path, axes, shape, dtype,
                                                           levels, chunks):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 40).astype(dtype)
    data[..., :5, :] = 0  # some chunks hold only the fill value
    geometry = {"scale": {a: (0.5 if a in "yx" else 2.0) for a in axes},
                "units": {a: "micrometer" for a in axes if a in "zyx"},
                "translation": {a: 1.25 for a in axes if a != "c"}}
    options = {"pyramid_levels": levels, "chunks": chunks, "attrs": {"a": 1}, **geometry}
    write_image(tmp_path / "ref.ome.zarr", data, axes, **options)
    write_image_direct(tmp_path / "direct.ome.zarr", data, axes, **options)
    assert_same_store(tmp_path / "direct.ome.zarr", tmp_path / "ref.ome.zarr")
    assert zarr.open_group(str(tmp_path / "direct.ome.zarr")).attrs["unetflow"] == {"a": 1}


def test_the_direct_label_writer_writes_what_ome_zarr_py_writes(tmp_path):
    from unetflow.ome import write_label_image

    labels = np.zeros((64, 64), dtype=np.uint32)
    labels[10:30, 5:25], labels[40:60, 40:50] = 1, 7
    for name, writer in (("ref", write_label_image), ("direct", write_label_image_direct)):
        image = tmp_path / f"{name}.ome.zarr"
        write_image(image, labels[None].astype(np.float32), ["c", "y", "x"], pyramid_levels=3)
        kwargs = {"streaming": True} if name == "ref" else {}
        writer(image, "prediction", labels, ["y", "x"], scale={"y": 0.5, "x": 0.5},
               units={"y": "micrometer", "x": "micrometer"}, chunks=(32, 32),
               pyramid_levels=3, translation={"y": 2.0, "x": 0.0}, **kwargs)
    assert_same_store(tmp_path / "direct.ome.zarr", tmp_path / "ref.ome.zarr")


def test_no_temporaries_are_left_by_a_failing_position(plate, tmp_path):
    """A position that cannot be read fails the batch naming it; outputs written before it
    stay, and its own output does not appear."""
    broken = plate["positions"].select(["A01_0", "A01_1"])
    from dataclasses import replace

    bad = replace(broken.positions[1], image=str(tmp_path / "missing.ome.zarr"))
    broken = replace(broken, positions=(broken.positions[0], bad))
    out = tmp_path / "pred.ome.zarr"
    with pytest.raises(ValueError, match=r"position A01_1 \(.*missing.ome.zarr\)"):
        predict_positions(plate["seg"], broken, None, plate["stats"], None, settings(), "m",
                          "screen", out, 1, tmp_path / "b.json")
    assert (out / "A" / "1" / "0" / "zarr.json").is_file()
    assert not (out / "A" / "1" / "1").exists() and not (tmp_path / "b.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    assert os.listdir(out / "A" / "1") == ["0"]


def test_the_source_plate_is_never_written_or_tidied(plate, tmp_path):
    source = Path(plate["positions"].source)
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    with pytest.raises(ValueError, match="would overwrite its input"):
        predict_positions(plate["seg"], plate["positions"], None, plate["stats"], None,
                          settings(), "m", "screen", source, 1, tmp_path / "b.json")
    smaller = plate["positions"].select(["A01_0"])
    record = {"dataset": "screen", "keys": ["A01_0"], "predicted": [], "kept": ["A01_0"]}
    with pytest.raises(ValueError, match="not the output of 'unetflow predict positions'"):
        finish_plate(smaller, source, [record], "m", "screen", plate["seg"], settings(),
                     tmp_path / "index.json")
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before
