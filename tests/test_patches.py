"""Patch sampling, the leakage-free split and the patch store, on real small OME-Zarr stores."""

from __future__ import annotations

import filecmp
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import run_cli
from unetflow import patches
from unetflow.demo import synthesize_nuclei
from unetflow.normalize import (
    compute_dataset_stats,
    compute_positions_stats,
    normalize_array,
    position_stats,
    write_stats,
)
from unetflow.ome import open_image, write_image
from unetflow.patches import (
    DatasetInput,
    PatchError,
    extract_patches,
    held_out_groups,
    prepare_target,
    read_manifest,
    split_regions,
    summarize_records,
)
from unetflow.plates import (
    clean_plate_path,
    dataset_positions,
    read_positions,
    write_demo_plate,
    write_positions,
)

NORM = {"method": "percentile", "clip": False}
STATS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 1024, "mask": None}
PATCHES = {"shape": [32, 32], "per_dataset": 30, "per_megapixel": None,
           "foreground_fraction": 0.33, "min_foreground": 0.0, "max_attempts": 20,
           "validation": "block", "validation_fraction": 0.25, "validation_datasets": [],
           "seed": 0}


def _write_dataset(root: Path, name: str, image: np.ndarray, target: np.ndarray,
                   chunks: tuple[int, ...]) -> DatasetInput:
    axes = ["c", "z", "y", "x"] if image.ndim == 3 else ["c", "y", "x"]
    write_image(root / f"{name}_image.ome.zarr", image[None], axes, chunks=(1, *chunks))
    write_image(root / f"{name}_target.ome.zarr", target[None], axes, chunks=(1, *chunks))
    stats = compute_dataset_stats(str(root / f"{name}_image.ome.zarr"), None, STATS, name)
    write_stats(stats, root / f"{name}.json")
    return DatasetInput(name, str(root / f"{name}_image.ome.zarr"),
                        str(root / f"{name}_target.ome.zarr"), str(root / f"{name}.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, DatasetInput]:
    root = tmp_path_factory.mktemp("patch_data")
    a = synthesize_nuclei((96, 160), seed=11)
    b = synthesize_nuclei((80, 120), seed=12)
    return {
        "a": _write_dataset(root, "a", a.noisy, a.labels, (40, 48)),
        "b": _write_dataset(root, "b", b.noisy * 3 + 50, b.labels, (64, 64)),
        "a_clean": _write_dataset(root, "a_clean", a.noisy, a.clean, (40, 48)),
        "empty": _write_dataset(root, "empty", a.noisy, np.zeros_like(a.labels), (40, 48)),
    }


def _extract(tmp_path: Path, datasets: list[DatasetInput], task: str = "segmentation",
             ignore_label: int | None = None, out: str = "p", **settings):
    store, manifest = tmp_path / f"{out}.zarr", tmp_path / f"{out}.tsv"
    records = extract_patches(datasets, task, {**PATCHES, **settings}, NORM, 2, ignore_label,
                              store, manifest)
    return records, read_manifest(manifest), zarr.open_group(str(store), mode="r")


def _separation(a: tuple[int, ...], b: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Largest gap between two boxes along any axis (negative when they overlap)."""
    return max(max(y - (x + s), x - (y + s)) for x, y, s in zip(a, b, shape, strict=True))


def test_block_split_patches_are_disjoint_with_a_gap(tmp_path, data):
    _, rows, _ = _extract(tmp_path, [data["a"], data["b"]])
    for name in ("a", "b"):
        train = [r for r in rows if r["dataset"] == name and r["split"] == "train"]
        val = [r for r in rows if r["dataset"] == name and r["split"] == "val"]
        assert len(train) == round(30 * 0.75) and len(val) == round(30 * 0.25)
        gaps = [_separation(t["origin"], v["origin"], t["shape"]) for t in train for v in val]
        assert min(gaps) >= 16  # half a patch: no shared pixel, no touching


def test_split_regions_cut_the_axis_with_most_room():
    train, val = split_regions((300, 100), (32, 32), "block", 0.2, held_out=False)
    assert (train.start, train.stop) == ((0, 0), (224, 100))
    assert (val.start, val.stop) == ((240, 0), (300, 100))
    with pytest.raises(PatchError, match="too small"):
        split_regions((64, 64), (32, 32), "block", 0.2, held_out=False)


def test_image_split_holds_out_whole_datasets(tmp_path, data):
    _, rows, _ = _extract(tmp_path, [data["a"], data["b"]], validation="image",
                          validation_datasets=["b"])
    assert {r["dataset"] for r in rows if r["split"] == "val"} == {"b"}
    assert {r["dataset"] for r in rows if r["split"] == "train"} == {"a"}
    with pytest.raises(PatchError, match="does not train on"):
        _extract(tmp_path, [data["a"]], validation="image", validation_datasets=["zz"])


def test_foreground_oversampling_gives_the_configured_fraction(tmp_path, data):
    _, rows, group = _extract(tmp_path, [data["a"]], foreground_fraction=0.6, per_dataset=40)
    for split, n in (("train", 30), ("val", 10)):
        mine = [r for r in rows if r["split"] == split]
        forced = [r for r in mine if r["kind"] == "foreground"]
        assert len(mine) == n and len(forced) == round(n * 0.6)
        assert all(r["foreground_fraction"] > 0 for r in forced)
        targets = group[f"{split}/targets"][:]
        for r in mine:  # the manifest's fraction is the stored target's
            assert r["foreground_fraction"] == pytest.approx((targets[r["index"]] > 0).mean())


def test_store_holds_normalized_source_patches(tmp_path, data):
    _, rows, group = _extract(tmp_path, [data["a"], data["b"]])
    assert group.attrs["unetflow"]["datasets"]["b"]["dataset"] == "b"
    sources = {n: (synthesize_nuclei(shape, seed=s), group.attrs["unetflow"]["datasets"][n])
               for n, shape, s in (("a", (96, 160), 11), ("b", (80, 120), 12))}
    for r in rows:
        demo, stats = sources[r["dataset"]]
        noisy = demo.noisy * 3 + 50 if r["dataset"] == "b" else demo.noisy
        box = tuple(slice(o, o + s) for o, s in zip(r["origin"], r["shape"], strict=True))
        expected = normalize_array(noisy[box][None], stats, "percentile")
        np.testing.assert_array_equal(group[f"{r['split']}/images"][r["index"]], expected)
        np.testing.assert_array_equal(group[f"{r['split']}/targets"][r["index"]],
                                      prepare_target(demo.labels[box], "segmentation", 2, None))


def test_regression_targets_are_normalized_like_the_image(tmp_path, data):
    _, rows, group = _extract(tmp_path, [data["a_clean"]], task="regression")
    demo = synthesize_nuclei((96, 160), seed=11)
    stats = group.attrs["unetflow"]["datasets"]["a_clean"]
    assert {r["kind"] for r in rows} == {"uniform"}
    for r in rows[:5]:
        box = tuple(slice(o, o + s) for o, s in zip(r["origin"], r["shape"], strict=True))
        np.testing.assert_array_equal(group[f"{r['split']}/targets"][r["index"]],
                                      normalize_array(demo.clean[box][None], stats))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_the_same_store(tmp_path, data):
    _extract(tmp_path, [data["a"], data["b"]], out="one", min_foreground=0.05)
    _extract(tmp_path, [data["a"], data["b"]], out="two", min_foreground=0.05)
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert _files(one) == _files(two)
    _, mismatch, errors = filecmp.cmpfiles(one, two, _files(one), shallow=False)
    assert not mismatch and not errors
    assert (tmp_path / "one.tsv").read_text() == (tmp_path / "two.tsv").read_text()
    _, other, _ = _extract(tmp_path, [data["a"], data["b"]], out="three", seed=1)
    assert [r["origin"] for r in other] != [r["origin"] for r in read_manifest(
        tmp_path / "one.tsv")]


@pytest.mark.parametrize("read_bytes", [patches.READ_CHUNK_BYTES, 1])  # merged, chunk by chunk
def test_reading_through_zarr_gives_the_same_store_as_reading_chunk_files(tmp_path, data,
                                                                           monkeypatch,
                                                                           read_bytes):
    """Sources chunkfiles cannot read directly (remote, sharded) go through Zarr: same
    store, byte for byte, and the same with the labels decoded twice (no memo)."""
    monkeypatch.setattr(patches, "READ_CHUNK_BYTES", read_bytes)
    _extract(tmp_path, [data["a"], data["b"]], out="direct", min_foreground=0.05)
    with monkeypatch.context() as patched:
        patched.setattr(patches, "direct_dask_array", lambda array, chunks, memo: None)
        _extract(tmp_path, [data["a"], data["b"]], out="zarr", min_foreground=0.05)
    with monkeypatch.context() as patched:
        patched.setattr(patches, "LABEL_MEMO_BYTES", 0)
        _extract(tmp_path, [data["a"], data["b"]], out="no_memo", min_foreground=0.05)
    direct = tmp_path / "direct.zarr"
    for other in ("zarr", "no_memo"):
        assert _files(direct) == _files(tmp_path / f"{other}.zarr")
        _, mismatch, errors = filecmp.cmpfiles(direct, tmp_path / f"{other}.zarr",
                                               _files(direct), shallow=False)
        assert not mismatch and not errors


def test_ngff_04_sources_give_the_same_patches(tmp_path, data):
    """NGFF 0.4 (Zarr v2, nested chunk keys, blosc) is read from its chunk files too."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as ome_write_image

    demo = synthesize_nuclei((96, 160), seed=11)  # dataset 'a' of the fixture
    old = {}
    for kind, values in (("image", demo.noisy), ("target", demo.labels)):
        old[kind] = tmp_path / f"a04_{kind}.ome.zarr"
        ome_write_image(values[None], str(old[kind]), axes="cyx", fmt=FormatV04(),
                        scale_factors=(), storage_options={"chunks": (1, 40, 48)})
    assert zarr.open_group(str(old["image"]), mode="r").metadata.zarr_format == 2
    assert patches.direct_dask_array(zarr.open_array(str(old["target"] / "s0")), None,
                                     None) is not None
    v04 = DatasetInput("a", str(old["image"]), str(old["target"]), data["a"].stats)
    _, rows, group = _extract(tmp_path, [v04], out="v04")
    _, rows_05, group_05 = _extract(tmp_path, [data["a"]], out="v05")
    assert rows == rows_05
    for key in ("train/images", "train/targets", "val/images", "val/targets"):
        np.testing.assert_array_equal(group[key][...], group_05[key][...])


def test_label_image_without_foreground_raises_naming_the_dataset(tmp_path, data):
    with pytest.raises(PatchError, match="dataset 'empty'.*no foreground"):
        _extract(tmp_path, [data["a"], data["empty"]])


def test_unsatisfiable_min_foreground_raises_after_bounded_attempts(tmp_path, data):
    with pytest.raises(PatchError, match="dataset 'a'.*min_foreground=0.99.*max_attempts=3"):
        _extract(tmp_path, [data["a"]], min_foreground=0.99, max_attempts=3)


def test_min_foreground_filter_holds(tmp_path, data):
    _, rows, _ = _extract(tmp_path, [data["a"]], min_foreground=0.2)
    assert all(r["foreground_fraction"] >= 0.2 for r in rows)


def test_patches_entirely_ignore_label_are_skipped(tmp_path):
    demo = synthesize_nuclei((64, 192), seed=5)
    labels = demo.labels.astype(np.int32)
    labels[:, :96] = 9  # most of the training block is 'not annotated'
    ds = _write_dataset(tmp_path, "ign", demo.noisy, labels, (32, 64))
    _, rows, group = _extract(tmp_path, [ds], ignore_label=9, foreground_fraction=0.0,
                              per_dataset=40)
    targets = group["train/targets"][:]
    assert len(rows) == 40 and max(r["origin"][1] for r in rows if r["split"] == "train") < 128
    assert not any(np.all(t == 9) for t in targets)
    assert any(np.any(t == 9) for t in targets)  # partly ignored patches are kept


def test_per_megapixel_and_3d_patches(tmp_path, monkeypatch):
    monkeypatch.setattr(patches, "READ_CHUNK_BYTES", 1)  # read in the small chunks written
    demo = synthesize_nuclei((32, 40, 96), seed=6)
    ds = _write_dataset(tmp_path, "vol", demo.noisy, demo.labels, (16, 32, 32))
    records, rows, group = _extract(tmp_path, [ds], shape=[16, 16, 16], per_megapixel=100.0)
    n = round(100.0 * 32 * 40 * 96 / 1e6)
    assert len(rows) == round(n * 0.75) + round(n * 0.25)
    assert group["train/images"].shape[1:] == (1, 16, 16, 16)
    stats = group.attrs["unetflow"]["datasets"]["vol"]
    for r in rows:  # patches copied piece by piece from up to 8 chunks
        box = tuple(slice(o, o + s) for o, s in zip(r["origin"], r["shape"], strict=True))
        np.testing.assert_array_equal(group[f"{r['split']}/images"][r["index"]],
                                      normalize_array(demo.noisy[box][None], stats))
    val_x = min(r["origin"][2] for r in rows if r["split"] == "val")
    train_x = max(r["origin"][2] + 16 for r in rows if r["split"] == "train")
    assert val_x - train_x >= 8  # split across x, the axis with most room
    assert summarize_records(records)[-1].startswith(f"total: {round(n * 0.75)} train")


def test_pooled_datasets_need_the_same_channels(tmp_path, data):
    demo = synthesize_nuclei((64, 64), seed=7)
    two = np.stack([demo.noisy, demo.noisy])
    write_image(tmp_path / "two.ome.zarr", two, ["c", "y", "x"], chunks=(2, 32, 32))
    write_stats(compute_dataset_stats(str(tmp_path / "two.ome.zarr"), None, STATS, "two"),
                tmp_path / "two.json")
    ds = DatasetInput("two", str(tmp_path / "two.ome.zarr"), data["a"].target,
                      str(tmp_path / "two.json"))
    with pytest.raises(PatchError, match="same channels|spatial shape"):
        _extract(tmp_path, [data["a"], ds])
    assert os.path.exists(data["a"].image)


@pytest.mark.parametrize("merged", [False, True])
def test_chunks_smaller_than_a_patch_and_unlike_the_target(tmp_path, monkeypatch, merged):
    if not merged:  # read chunk by chunk: patches are copied from up to 4 chunks
        monkeypatch.setattr(patches, "READ_CHUNK_BYTES", 1)
    demo = synthesize_nuclei((64, 96), seed=8)
    write_image(tmp_path / "i.ome.zarr", demo.noisy[None], ["c", "y", "x"], chunks=(1, 20, 24))
    write_image(tmp_path / "t.ome.zarr", demo.labels[None], ["c", "y", "x"], chunks=(1, 64, 40))
    write_stats(compute_dataset_stats(str(tmp_path / "i.ome.zarr"), None, STATS, "small"),
                tmp_path / "s.json")
    ds = DatasetInput("small", str(tmp_path / "i.ome.zarr"), str(tmp_path / "t.ome.zarr"),
                      str(tmp_path / "s.json"))
    _, rows, group = _extract(tmp_path, [ds], shape=[32, 32], validation_fraction=0.3)
    stats = group.attrs["unetflow"]["datasets"]["small"]
    for r in rows:
        box = tuple(slice(o, o + s) for o, s in zip(r["origin"], r["shape"], strict=True))
        np.testing.assert_array_equal(group[f"{r['split']}/images"][r["index"]],
                                      normalize_array(demo.noisy[box][None], stats))
        np.testing.assert_array_equal(group[f"{r['split']}/targets"][r["index"]],
                                      (demo.labels[box] > 0).astype(np.int32))


@pytest.mark.parametrize("k", [3, 40])  # by rejection, and from the list of True pixels
def test_foreground_pixels_are_sampled_uniformly_without_repeats(k):
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:30] = True  # 200 foreground pixels
    hits = np.zeros(mask.size, int)
    for seed in range(500):
        chosen = patches._sample_flat(mask, 200, k, np.random.default_rng(seed))
        assert len(chosen) == k == len(set(chosen.tolist())) and mask.reshape(-1)[chosen].all()
        hits[chosen] += 1
    expected = 500 * k / 200
    assert np.abs(hits[mask.reshape(-1)] - expected).max() < 5 * np.sqrt(expected)
    assert len(patches._sample_flat(mask, 200, 500, np.random.default_rng(0))) == 200


# --- datasets of positions (plates, collections) -------------------------------------------
PLATE_PATCHES = {**PATCHES, "shape": [16, 16], "per_dataset": 40}
POSITION_STATS = {**STATS, "sample_positions": None}


def _positions_input(root: Path, name: str, spec: dict, per: str = "dataset",
                     channels: list | None = None) -> DatasetInput:
    """A plate or collection dataset as the rules give it: positions file and statistics."""
    found = dataset_positions(name, spec)
    write_positions(found, root / f"{name}_positions.json")
    write_stats(compute_positions_stats(found, channels, POSITION_STATS, per),
                root / f"{name}_stats.json")
    return DatasetInput(name, stats=str(root / f"{name}_stats.json"), channels=channels,
                        positions=str(root / f"{name}_positions.json"))


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> dict[str, DatasetInput]:
    """A 2 x 2-well plate of 2 fields of 64x64, with labels and its clean twin plate."""
    root = tmp_path_factory.mktemp("plate")
    path = root / "plate.ome.zarr"
    write_demo_plate(path, rows=2, columns=2, fields=2, shape=(64, 64), seed=3)
    return {
        "dataset": _positions_input(root, "screen", {"plate": str(path), "labels": "nuclei"}),
        "position": _positions_input(root, "screen", {"plate": str(path), "labels": "nuclei"},
                                     per="position"),
        "clean": _positions_input(root, "denoise", {"plate": str(path),
                                                    "target": clean_plate_path(path)}),
        "collection": _positions_input(root, "fields", {"collection": f"{path}/*/*/[0-9]",
                                                        "labels": "nuclei"}),
    }


def _position_pixels(positions: str, key: str, box: tuple[slice, ...], target: bool = False):
    position = read_positions(positions).by_key(key)
    return np.asarray(open_image(position.target if target else position.image).data)[
        (Ellipsis, *box)]


@pytest.mark.parametrize("per", ["dataset", "position"])
def test_plate_patches_name_their_positions_and_hold_their_normalized_pixels(tmp_path, plate,
                                                                            per):
    ds = plate[per]
    records, rows, group = _extract(tmp_path, [ds], **PLATE_PATCHES)
    keys = read_positions(ds.positions).keys
    assert len(rows) == 40 and {r["position"] for r in rows} <= set(keys)
    assert all(r["well"] == r["position"].split("_")[0] for r in rows)
    stored = group.attrs["unetflow"]["datasets"]["screen"]
    if per == "position":  # once per dataset, only the positions that gave patches
        assert set(stored["positions"]) == {r["position"] for r in rows}
    for r in rows:
        box = tuple(slice(o, o + s) for o, s in zip(r["origin"], r["shape"], strict=True))
        stats = position_stats(stored, r["position"])
        expected = normalize_array(_position_pixels(ds.positions, r["position"], box)[None],
                                   stats)
        np.testing.assert_array_equal(group[f"{r['split']}/images"][r["index"]], expected[0])
        labels = _position_pixels(ds.positions, r["position"], box, target=True)
        np.testing.assert_array_equal(group[f"{r['split']}/targets"][r["index"]],
                                      (labels > 0).astype(np.int32))
    assert any("screen: patches from" in line for line in summarize_records(records))


def test_block_split_separates_each_positions_patches(tmp_path, plate):
    _, rows, _ = _extract(tmp_path, [plate["dataset"]], **PLATE_PATCHES)
    for key in {r["position"] for r in rows}:
        mine = [r for r in rows if r["position"] == key]
        train = [r for r in mine if r["split"] == "train"]
        val = [r for r in mine if r["split"] == "val"]
        gaps = [_separation(t["origin"], v["origin"], t["shape"]) for t in train for v in val]
        assert min(gaps, default=8) >= 8
    assert sum(r["split"] == "val" for r in rows) == round(40 * 0.25)


@pytest.mark.parametrize(("mode", "fraction", "held"), [("well", 0.25, 1), ("well", 0.5, 2),
                                                        ("position", 0.25, 2)])
def test_held_out_wells_and_positions_have_no_training_patch(tmp_path, plate, mode, fraction,
                                                             held):
    _, rows, _ = _extract(tmp_path, [plate["dataset"]], **{
        **PLATE_PATCHES, "validation": mode, "validation_fraction": fraction})
    group = "well" if mode == "well" else "position"
    val = {r[group] for r in rows if r["split"] == "val"}
    train = {r[group] for r in rows if r["split"] == "train"}
    keys = read_positions(plate["dataset"].positions).keys
    everything = sorted({k.split("_")[0] for k in keys} if mode == "well" else keys)
    assert val == held_out_groups(everything, fraction, PATCHES["seed"], "screen")
    assert len(val) == held and not val & train
    assert sum(r["split"] == "val" for r in rows) == round(40 * fraction)


def test_well_validation_of_a_collection_is_one_line_naming_setting_and_dataset(tmp_path,
                                                                               plate):
    with pytest.raises(PatchError) as err:
        _extract(tmp_path, [plate["collection"]], **{**PLATE_PATCHES, "validation": "well"})
    assert "\n" not in str(err.value)
    assert "patches.validation is 'well'" in str(err.value) and "'fields'" in str(err.value)
    _, rows, _ = _extract(tmp_path, [plate["collection"]], **{**PLATE_PATCHES,
                                                              "validation": "position"})
    assert {r["well"] for r in rows} == {""} and len({r["position"] for r in rows}) > 1


@pytest.mark.parametrize("mode", ["well", "position"])
def test_position_and_well_validation_refuse_single_images(tmp_path, plate, data, mode):
    with pytest.raises(PatchError, match=f"patches.validation is '{mode}' but dataset 'a' is "
                                         f"one image"):
        _extract(tmp_path, [plate["dataset"], data["a"]], **{**PLATE_PATCHES,
                                                             "validation": mode})


def test_plate_regression_targets_from_the_twin_plate(tmp_path, plate):
    ds = plate["clean"]
    _, rows, group = _extract(tmp_path, [ds], task="regression", **PLATE_PATCHES)
    stats = group.attrs["unetflow"]["datasets"]["denoise"]
    assert stats["positions"]["used"] == 8
    for r in rows[:6]:
        box = tuple(slice(o, o + s) for o, s in zip(r["origin"], r["shape"], strict=True))
        clean = _position_pixels(ds.positions, r["position"], box, target=True)
        np.testing.assert_array_equal(group[f"{r['split']}/targets"][r["index"]],
                                      normalize_array(clean[None], stats)[0])


def test_same_seed_gives_the_same_plate_store(tmp_path, plate):
    for out in ("one", "two"):
        _extract(tmp_path, [plate["position"]], out=out, **{**PLATE_PATCHES,
                                                             "validation": "well"})
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    _, mismatch, errors = filecmp.cmpfiles(one, two, _files(one), shallow=False)
    assert _files(one) == _files(two) and not mismatch and not errors
    assert (tmp_path / "one.tsv").read_text() == (tmp_path / "two.tsv").read_text()


def test_patches_go_to_positions_by_pixel_count_and_foreground_to_where_it_is(tmp_path):
    """A 160x160 and a 40x40 image (16:1 pixels), the big one without any foreground: the
    small one gets about 1/17 of the patches, and every foreground patch."""
    for name, shape, seed in (("big", (160, 160), 1), ("small", (40, 40), 2)):
        demo = synthesize_nuclei(shape, seed=seed)
        labels = np.zeros_like(demo.labels) if name == "big" else demo.labels
        write_image(tmp_path / "img" / f"{name}.ome.zarr", demo.noisy[None], ["c", "y", "x"],
                    chunks=(1, 32, 32))
        write_image(tmp_path / "lab" / f"{name}.ome.zarr", labels[None], ["c", "y", "x"],
                    chunks=(1, 32, 32))
    ds = _positions_input(tmp_path, "two", {"collection": str(tmp_path / "img" / "*.ome.zarr"),
                                            "target": str(tmp_path / "lab" / "*.ome.zarr")})
    _, rows, _ = _extract(tmp_path, [ds], **{**PLATE_PATCHES, "per_dataset": 170,
                                            "foreground_fraction": 0.5})
    uniform = [r for r in rows if r["kind"] == "uniform"]
    small = sum(r["position"] == "small" for r in uniform)
    assert 0 < small < 3 * len(uniform) / 17  # binomial(85, 1/17): mean 5, sd 2.2
    foreground = [r for r in rows if r["kind"] == "foreground"]
    assert len(foreground) == round(128 * 0.5) + round(42 * 0.5)
    assert {r["position"] for r in foreground} == {"small"}


def test_dataset_input_is_one_image_or_positions(plate, data):
    with pytest.raises(PatchError, match="exactly one of image"):
        DatasetInput("x", image=data["a"].image, target=data["a"].target, stats=data["a"].stats,
                     positions=plate["dataset"].positions)
    without = DatasetInput("x", image=data["a"].image, stats=data["a"].stats)
    with pytest.raises(PatchError, match="dataset 'x': image .* has no target .* n2v"):
        _extract(Path(data["a"].stats).parent / "never", [without])
    assert not (Path(data["a"].stats).parent / "never.zarr").exists()


N2V = {"target": "n2v"}


@pytest.mark.parametrize("source", ["image", "plate"])
def test_an_n2v_store_holds_the_images_a_regression_store_holds_and_no_target(
        tmp_path, data, plate, source):
    """model.target n2v reads no target (the dataset may have none): the same uniform
    patches as a regression model at the same seed, images only."""
    ds, extra = (data["a_clean"], {}) if source == "image" else (plate["clean"], PLATE_PATCHES)
    _, rows, supervised = _extract(tmp_path, [ds], task="regression", out="r", **extra)
    alone = replace(ds, target=None)
    store, manifest = tmp_path / "n.zarr", tmp_path / "n.tsv"
    extract_patches([alone], "regression", {**PATCHES, **extra}, NORM, 2, None, store,
                    manifest, target=N2V)
    group = zarr.open_group(str(store), mode="r")
    assert read_manifest(manifest) == rows
    assert group.attrs["unetflow"]["target"]["target"] == "n2v"
    for split in ("train", "val"):
        assert sorted(group[split].array_keys()) == ["images"]
        np.testing.assert_array_equal(group[f"{split}/images"][...],
                                      supervised[f"{split}/images"][...])


def test_manifests_written_before_positions_still_read(tmp_path):
    (tmp_path / "old.tsv").write_text(
        "index\tdataset\tsplit\torigin\tshape\tforeground_fraction\tkind\n"
        "0\ta\ttrain\t1,2\t32,32\t0.25\tuniform\n")
    row, = read_manifest(tmp_path / "old.tsv")
    assert (row["position"], row["well"], row["origin"]) == ("", "", (1, 2))


def test_cli_extract_patches_takes_a_positions_entry(tmp_path, plate):
    ds = plate["dataset"]
    entry = {"name": "screen", "positions": ds.positions, "stats": ds.stats, "channels": None}
    args = ["extract-patches", "--task", "segmentation", "--settings",
            json.dumps({**PLATE_PATCHES, "validation": "well"}), "--normalize", "{}",
            "--store", str(tmp_path / "p.zarr"), "--manifest", str(tmp_path / "p.tsv")]
    result = run_cli(*args, "--datasets", json.dumps([entry]))
    assert result.returncode == 0, result.stderr
    assert "screen: patches from" in result.stdout
    missing = {**entry, "positions": str(tmp_path / "none.json")}
    result = run_cli(*args, "--datasets", json.dumps([missing]))
    assert result.returncode == 1
    assert result.stderr.startswith("unetflow extract-patches: error: --datasets[0].positions")
