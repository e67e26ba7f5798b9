"""Damaged files are named, never a traceback; missing chunks are said, never silent zeros.

Each case damages a real small store the way a cut-short copy or a bad disk block would
(random bytes in a chunk, a truncated file, junk metadata, a deleted level or chunk) and
meets it where a user does: the metadata checks Snakemake runs at planning
(`dataset_problems`) and the `unetflow` subcommand of the rule that reads the file. Every
error is one line naming the file (and chunk), what is wrong and what to do.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from conftest import run_cli
from test_bad_input import (
    STATS_SETTINGS,
    assert_cli_error,
    assert_one_clear_line,
    data_config,
    extract_cli,
    normalize_cli,
    predict_cli,
    save_unet_checkpoint,
    train_cli,
)
from unetflow import notices
from unetflow.checks import dataset_problems
from unetflow.demo import synthesize_nuclei
from unetflow.integrity import (
    DamagedFileError,
    checked_from_zarr,
    missing_chunks,
    warn_missing_chunks,
)
from unetflow.normalize import compute_dataset_stats, read_stats, write_stats
from unetflow.ome import open_image, write_image
from unetflow.patchstore import ShardedPatches, create_patch_array, open_patch_array

CHUNKS = (1, 32, 32)  # a 96^2 image in 3 x 3 chunks
DAMAGE_FIX = "is damaged; copy the image again or rewrite that chunk"


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    nuclei = synthesize_nuclei((96, 96), seed=7)
    return {"image": nuclei.noisy.astype(np.float32)[None],
            "labels": nuclei.labels.astype(np.uint16)[None]}


def write_chunked(path: Path, data: np.ndarray, ngff: str = "0.5") -> str:
    """A (1, 96, 96) image in 32^2 chunks, NGFF 0.5 (zarr v3) or 0.4 (zarr v2)."""
    if ngff == "0.5":
        write_image(path, data, ["c", "y", "x"], chunks=CHUNKS)
    else:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_image as ome_write_image

        ome_write_image(data, zarr.open_group(str(path), mode="w", zarr_format=2), axes="cyx",
                        fmt=FormatV04(), scale_factors=(), storage_options={"chunks": CHUNKS})
    return str(path)


def chunk_file(image: str, ngff: str = "0.5", index: tuple[int, ...] = (0, 1, 2)) -> Path:
    """The file of chunk `index` of level s0: `c/0/1/2` (v3) or `0/1/2` (v2, '/' keys)."""
    key = "/".join(map(str, index))
    return Path(image) / "s0" / (f"c/{key}" if ngff == "0.5" else key)


def scramble(path: Path) -> None:
    """Random bytes in place of a chunk, of the same length."""
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def assert_error_line(result, command: str, *fragments: str) -> None:
    """Exit 1, no traceback, and one `unetflow <command>: error:` line holding `fragments`
    (prediction's progress bar shares stderr, so the whole of it is not one line)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line.split("\r")[-1] for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"unetflow {command}: error: "), result.stderr
    assert_one_clear_line(errors[0], *fragments)


@pytest.fixture
def pair(tmp_path, scene) -> dict[str, str]:
    image = write_chunked(tmp_path / "image.ome.zarr", scene["image"])
    target = write_chunked(tmp_path / "labels.ome.zarr", scene["labels"])
    stats = tmp_path / "image.json"
    write_stats(compute_dataset_stats(image, None, STATS_SETTINGS, "d"), stats)
    return {"image": image, "target": target, "stats": str(stats)}


# --- damaged chunks --------------------------------------------------------------------------
@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_chunk_of_the_input_names_the_chunk_and_its_file(tmp_path, scene, ngff,
                                                                   damage):
    image = write_chunked(tmp_path / "image.ome.zarr", scene["image"], ngff)
    bad = chunk_file(image, ngff)
    if damage == "random bytes":
        scramble(bad)
    else:
        bad.write_bytes(bad.read_bytes()[:40])
    key = "c/0/1/2" if ngff == "0.5" else "0/1/2"
    result = normalize_cli(image, tmp_path / "stats.json")
    assert_cli_error(result, "normalize", f"{image}/s0: chunk {key} cannot be decoded",
                     f"the file {bad} {DAMAGE_FIX}")
    assert not (tmp_path / "stats.json").exists()


def test_a_damaged_chunk_of_the_target_in_patch_extraction(tmp_path, pair):
    """extract_patches reads chunk files itself (unetflow.chunkfiles), not through Zarr."""
    bad = chunk_file(pair["target"], index=(0, 2, 1))
    scramble(bad)
    out = tmp_path / "out"
    out.mkdir()
    result = extract_cli(pair["image"], pair["target"], pair["stats"], out)
    assert_cli_error(result, "extract-patches", f"{pair['target']}/s0: chunk c/0/2/1",
                     f"the file {bad} {DAMAGE_FIX}")
    assert not (out / "patches.zarr").exists()


def test_a_damaged_chunk_of_the_input_in_prediction(tmp_path, pair):
    bad = chunk_file(pair["image"], index=(0, 0, 0))
    scramble(bad)
    checkpoint = save_unet_checkpoint(tmp_path / "m.pt")
    result, out = predict_cli(tmp_path, checkpoint, pair)
    assert_error_line(result, "predict run", f"{pair['image']}/s0: chunk c/0/0/0",
                     f"the file {bad} {DAMAGE_FIX}")
    assert not list(tmp_path.glob("*prediction.ome.zarr*"))


def test_the_checked_read_is_from_zarr_s_graph_and_reads_only_what_is_asked(tmp_path, scene):
    """Same values and blocks as da.from_zarr; a slice reads only its chunks (dask's slice
    fusion still applies), so a damaged chunk elsewhere does not fail it."""
    image = write_chunked(tmp_path / "image.ome.zarr", scene["image"])
    array = zarr.open_array(f"{image}/s0", mode="r")
    checked = checked_from_zarr(array, f"{image}/s0")
    assert checked.chunks == da.from_zarr(array).chunks
    np.testing.assert_array_equal(checked.compute(), scene["image"])
    scramble(chunk_file(image, index=(0, 2, 2)))
    np.testing.assert_array_equal(checked[:, :64, :64].compute(), scene["image"][:, :64, :64])
    with pytest.raises(DamagedFileError, match="chunk c/0/2/2 cannot be decoded"):
        checked[:, 70:, 70:].compute()


def test_the_checked_read_costs_no_more_than_from_zarr(tmp_path):
    """A 2048^2 float32 image in 256^2 chunks (64 reads): within 25% + 20 ms of from_zarr
    (measured at 4096^2: 0.51 vs 0.53 s at 256^2 chunks, 0.18 vs 0.18 s at 1024^2)."""
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2048, 2048), chunks=(256, 256),
                              dtype="f4")
    array[:] = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)

    def best(make) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            make().sum().compute(num_workers=2)
            times.append(time.perf_counter() - start)
        return min(times)

    plain = best(lambda: da.from_zarr(array))
    checked = best(lambda: checked_from_zarr(array, "a.zarr"))
    assert checked <= 1.25 * plain + 0.02, (checked, plain)


# --- damaged or missing level metadata ---------------------------------------------------------
def _junk(path: Path) -> None:
    path.write_text("{junk")


LEVEL_CASES = {
    "junk s0/zarr.json": (lambda p: _junk(p / "s0" / "zarr.json"), "0.5",
                          "the metadata of resolution level 0 cannot be read (JSONDecodeError",
                          "s0/zarr.json is damaged; copy the image again"),
    "s0/zarr.json without keys": (
        lambda p: (p / "s0" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}'),
        "0.5", "cannot be read (KeyError: 'data_type')", "s0/zarr.json is damaged"),
    "junk s0/.zarray (NGFF 0.4)": (lambda p: _junk(p / "s0" / ".zarray"), "0.4",
                                   "the metadata of resolution level 0 cannot be read",
                                   "s0/.zarray is damaged; copy the image again"),
    "deleted level": (lambda p: shutil.rmtree(p / "s0"), "0.5",
                      "resolution level 0 (multiscales 'datasets' path 's0') has no array",
                      "s0/zarr.json does not exist", "copy the image again, or fix the "
                      "datasets path in"),
    "datasets path that does not exist": (
        lambda p: (p / "zarr.json").write_text((p / "zarr.json").read_text().replace(
            '"path": "s0"', '"path": "level0"')),
        "0.5", "'datasets' path 'level0') has no array", "level0/zarr.json does not exist"),
    "junk root zarr.json": (lambda p: _junk(p / "zarr.json"), "0.5",
                            "its group metadata cannot be read (JSONDecodeError",
                            "zarr.json is damaged; copy the image again"),
}


@pytest.mark.parametrize("case", list(LEVEL_CASES))
def test_damaged_or_missing_level_metadata_at_planning_and_in_the_job(tmp_path, scene, pair,
                                                                      case):
    damage, ngff, *fragments = LEVEL_CASES[case]
    image = write_chunked(tmp_path / "damaged.ome.zarr", scene["image"], ngff)
    damage(Path(image))
    problems = dataset_problems(data_config(image, pair["target"]))
    assert len(problems) == 1, problems
    assert_one_clear_line(problems[0], image, *fragments)
    result = normalize_cli(image, tmp_path / "stats.json")
    assert_cli_error(result, "normalize", image, *fragments)
    assert not (tmp_path / "stats.json").exists()


# --- missing chunks: legal, but said -------------------------------------------------------------
def test_missing_chunks_are_counted_and_said_once_per_image(tmp_path, pair):
    """Writers leave out chunks that hold only the fill value: the labels' two background
    corners are not stored. That is the rule for label images, so an integer target is not
    said (the warning would be noise); the input's lost chunks are."""
    for index in ((0, 0, 0), (0, 1, 1)):
        chunk_file(pair["image"], index=index).unlink()
    assert missing_chunks(open_image(pair["image"])) == (2, 9)
    assert missing_chunks(open_image(pair["target"])) == (2, 9)
    assert not chunk_file(pair["target"], index=(0, 2, 2)).exists()
    result = normalize_cli(pair["image"], tmp_path / "stats.json", target=pair["target"])
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if ": warning: " in line]
    said = ("are missing and were read as the fill value 0 ({}; writers leave out chunks "
            "holding only the fill value, but a copy cut short does too: if the image was "
            "copied, check the copy)")
    assert warnings == [
        f"unetflow normalize: warning: 2 of 9 chunks of {pair['image']}/s0 {said.format('input')}",
        ], result.stderr


def test_missing_chunks_of_the_input_are_said_by_prediction(tmp_path, pair):
    chunk_file(pair["image"], index=(0, 2, 0)).unlink()
    checkpoint = save_unet_checkpoint(tmp_path / "m.pt")
    result, out = predict_cli(tmp_path, checkpoint, pair)
    assert result.returncode == 0, result.stderr
    assert (f"unetflow predict run: warning: 1 of 9 chunks of {pair['image']}/s0 are missing"
            in result.stderr), result.stderr


def test_warn_missing_chunks_names_the_role_and_the_fill_value(tmp_path, scene):
    path = tmp_path / "filled.zarr"
    write_image(path, scene["image"], ["c", "y", "x"], chunks=CHUNKS)  # a regression target
    chunk_file(str(path), index=(0, 1, 1)).unlink()
    notices.forget()
    assert warn_missing_chunks(open_image(path), "target") == 1
    assert notices.recorded() == [
        f"1 of 9 chunks of {path}/s0 are missing and were read as the fill value 0 (target; "
        f"writers leave out chunks holding only the fill value, but a copy cut short does "
        f"too: if the image was copied, check the copy)"]
    notices.forget()


def test_listing_ten_thousand_chunks_is_cheap(tmp_path):
    """A 100 x 100 grid of chunk files is counted in well under a second (measured 12 ms;
    Zarr's own _nshards_initialized takes 1.3 s)."""
    path = tmp_path / "many.ome.zarr"
    write_image(path, np.ones((1, 800, 800), dtype=np.uint8), ["c", "y", "x"], chunks=(1, 8, 8))
    image = open_image(path)
    start = time.perf_counter()
    assert missing_chunks(image) == (0, 10_000)
    assert time.perf_counter() - start < 1.0


# --- patch store -------------------------------------------------------------------------------
def _sharded_store(path: Path) -> tuple[zarr.Group, np.ndarray]:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    data = np.random.default_rng(0).normal(size=(6, 1, 16, 16)).astype(np.float32)
    shards = ShardedPatches(create_patch_array(group, "train/images", 6, data.shape[1:],
                                               data.dtype, 3))
    for shard in range(shards.n_shards):
        wanted = shards.shard_range(shard)
        shards.write_shard(shard, shards.encode(data[wanted.start:wanted.stop]))
    return group, data


def test_a_damaged_patch_payload_with_an_intact_index(tmp_path):
    store = tmp_path / "patches.zarr"
    group, data = _sharded_store(store)
    shard = store / "train" / "images" / "c.1.0.0.0"
    raw = bytearray(shard.read_bytes())
    raw[:16] = bytes(16)  # the first patch's blosc header; the index at the end is intact
    shard.write_bytes(bytes(raw))
    patches = open_patch_array(group, "train/images")
    np.testing.assert_array_equal(patches.read(np.arange(3)), data[:3])  # shard 0 is fine
    with pytest.raises(DamagedFileError) as err:
        patches.read(np.arange(6))
    assert_one_clear_line(str(err.value), f"{shard}: patch 3 of train/images cannot be decoded",
                          "the shard file is damaged", f"delete {store} and run Snakemake "
                          f"again, which extracts the patches again")


def _patch_train_cli(tmp_path: Path, damage) -> tuple:
    """`unetflow train` on the tests' patch store (read through Zarr) after `damage(store)`."""
    from test_bad_input import write_patch_store

    store = Path(write_patch_store(tmp_path / "patches.zarr"))
    damage(store)
    config = data_config("i", "t")
    config["train"].update(steps=2, validate_every=1, batch_size=2)
    out = tmp_path / "run"
    out.mkdir()
    files = {name: str(out / name) for name in ("best.pt", "last.pt", "log.csv", "curve.png")}
    result = run_cli("train", "--store", str(store), "--model-dir", str(out), "--task",
                     "segmentation", "--model-settings", json.dumps(config["model"]),
                     "--settings", json.dumps(config["train"]), "--threads", "1",
                     "--best", files["best.pt"], "--last", files["last.pt"],
                     "--log", files["log.csv"], "--curve", files["curve.png"])
    return result, out, store


@pytest.mark.parametrize("case", ["payload", "array zarr.json", "root zarr.json"])
def test_a_damaged_patch_store_stops_training_with_one_line(tmp_path, case):
    def damage(store: Path) -> None:
        if case == "payload":
            scramble(store / "train" / "images" / "c" / "1" / "0" / "0" / "0")
        elif case == "array zarr.json":
            _junk(store / "val" / "targets" / "zarr.json")
        else:
            _junk(store / "zarr.json")

    result, out, store = _patch_train_cli(tmp_path, damage)
    fragments = {"payload": ("patch 1 (chunk c/1/0/0/0) cannot be decoded",
                             f"{store}/train/images/c/1/0/0/0 is damaged"),
                 "array zarr.json": (f"the metadata {store}/val/targets/zarr.json cannot be "
                                     f"read",),
                 "root zarr.json": (f"the metadata {store}/zarr.json cannot be read",)}[case]
    assert_cli_error(result, "train", *fragments,
                     f"delete {store} and run Snakemake again, which extracts the patches again")
    assert list(out.iterdir()) == []


# --- statistics file -------------------------------------------------------------------------
STATS_CASES = {
    "invalid JSON": (lambda s: json.dumps(s)[:-20], "it is not valid JSON (JSONDecodeError"),
    "binary junk": (lambda s: "\udcff", "it is not valid JSON"),
    "NaN": (lambda s: json.dumps(s).replace(str(s["channels"][0]["std"]), "NaN"),
            "it holds the non-finite value NaN"),
    "Infinity": (lambda s: json.dumps(s).replace(str(s["channels"][0]["max"]), "-Infinity"),
                 "it holds the non-finite value -Infinity"),
    "no channels": (lambda s: json.dumps({k: v for k, v in s.items() if k != "channels"}),
                    "'channels' is missing"),
    "a channel without percentiles": (
        lambda s: json.dumps({**s, "channels": [{k: v for k, v in s["channels"][0].items()
                                                 if k != "percentiles"}]}),
        "channel 0 has no percentiles"),
    "a value that is not a number": (
        lambda s: json.dumps({**s, "channels": [{**s["channels"][0], "mean": "1.0"}]}),
        "channel 0 has a value that is not a finite number"),
    "not an object": (lambda s: "[]", "it is not a JSON object"),
}


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_a_damaged_statistics_file(tmp_path, pair, case):
    write, fragment = STATS_CASES[case]
    stats = json.loads(Path(pair["stats"]).read_text())
    text = write(stats)
    Path(pair["stats"]).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DamagedFileError) as err:
        read_stats(pair["stats"])
    assert_one_clear_line(str(err.value), f"statistics file {pair['stats']}: {fragment}",
                          "delete it and rerun; Snakemake normalizes again")
    checkpoint = save_unet_checkpoint(tmp_path / "m.pt")
    result, out = predict_cli(tmp_path, checkpoint, pair)
    assert_error_line(result, "predict run", f"statistics file {pair['stats']}: {fragment}")
    assert not list(tmp_path.glob("*prediction.ome.zarr*"))


def test_per_position_statistics_are_checked_per_position(tmp_path):
    path = tmp_path / "stats.json"
    channel = {"mean": 1.0, "std": 1.0, "min": 0, "max": 2, "percentiles": {"1.0": 0, "99": 2}}
    path.write_text(json.dumps({"per_position": True, "positions": {
        "A/1/0": {"channels": [channel]}, "A/1/1": {"channels": [{**channel, "std": 1e400}]}}},
        allow_nan=True).replace("1e400", "Infinity"))
    with pytest.raises(DamagedFileError, match="non-finite value Infinity"):
        read_stats(path)
    path.write_text(json.dumps({"per_position": True, "positions": {
        "A/1/0": {"channels": [channel]}, "A/1/1": {}}}))
    with pytest.raises(DamagedFileError, match="position A/1/1: 'channels' is missing"):
        read_stats(path)


# --- checkpoint --------------------------------------------------------------------------------
CHECKPOINT_DAMAGE = {
    "random bytes": lambda whole: np.random.default_rng(2).bytes(len(whole)),
    "empty": lambda whole: b"",
    "bytes changed inside the weights": lambda whole: (
        whole[:len(whole) // 2] + bytes(64) + whole[len(whole) // 2 + 64:]),
}


@pytest.mark.parametrize("entry", ["train.init_from", "predict --checkpoint"])
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_one_line_in_train_and_predict(tmp_path, pair, entry, damage):
    """Truncation is tests/test_bad_input.py's case. Bytes changed inside a tensor's record
    load silently with torch (it does not check the zip's CRC-32): checked here."""
    whole = save_unet_checkpoint(tmp_path / "whole.pt").read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(CHECKPOINT_DAMAGE[damage](whole))
    fragments = [str(broken), "not a readable unetflow checkpoint"]
    if damage == "bytes changed inside the weights":
        fragments.append("fails its CRC-32 check; the file is damaged: copy it again")
    if entry == "train.init_from":
        result, out = train_cli(tmp_path, str(broken))
        assert_cli_error(result, "train", "train.init_from:", *fragments)
        assert list(out.iterdir()) == []
    else:
        result, out = predict_cli(tmp_path, broken, pair)
        assert_error_line(result, "predict run", *fragments)
        assert not list(tmp_path.glob("*prediction.ome.zarr*"))

