"""Normalization statistics against numpy on the same small arrays, and how they are applied."""

from __future__ import annotations

import json
from dataclasses import replace

import dask.array as da
import numpy as np
import pytest

from conftest import run_cli
from unetflow.demo import synthesize_nuclei
from unetflow.normalize import (
    NormalizationError,
    compute_channel_stats,
    compute_dataset_stats,
    compute_positions_stats,
    denormalize_array,
    normalize_array,
    position_stats,
    read_stats,
    spread_indices,
    write_stats,
)
from unetflow.ome import open_image, write_image
from unetflow.plates import (
    Position,
    PositionSet,
    dataset_positions,
    write_demo_plate,
    write_positions,
)

PERCENTILES = [1.0, 99.8]
SETTINGS = {"level": 0, "percentiles": PERCENTILES, "histogram_bins": 256, "mask": None}


def _stats(x: np.ndarray, chunks: tuple[int, ...], bins: int = 256, mask=None):
    mask_dask = None if mask is None else da.from_array(mask, chunks=chunks[1:])
    return compute_channel_stats(da.from_array(x, chunks=chunks), PERCENTILES, bins,
                                 mask=mask_dask, name="dataset 'test'")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_small_integer_stats_equal_numpy_exactly(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, size=(2, 37, 53), endpoint=True).astype(dtype)
    x[1] = (x[1] // 7).astype(dtype)  # a second channel with another distribution
    stats, passes = _stats(x, (1, 16, 20))
    assert passes == 1
    for c, entry in enumerate(stats):
        ref = x[c].astype(np.float64)
        assert list(entry["percentiles"].values()) == list(np.percentile(ref, PERCENTILES))
        assert entry["min"] == ref.min() and entry["max"] == ref.max()
        assert entry["mean"] == pytest.approx(ref.mean(), rel=1e-12)
        assert entry["std"] == pytest.approx(ref.std(), rel=1e-12)
        assert entry["percentile_error_bound"] == 0.0 and entry["count"] == ref.size


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_float_percentiles_within_one_bin_of_numpy(dtype):
    rng = np.random.default_rng(1)
    x = (rng.gamma(2.0, 300.0, size=(2, 3, 40, 44)) - 50).astype(dtype)  # (C, Z, Y, X)
    stats, passes = _stats(x, (2, 2, 16, 16))  # both channels in one chunk
    assert passes == 1
    for c, entry in enumerate(stats):
        ref = x[c].astype(np.float64)
        bound = entry["percentile_error_bound"]
        lo, hi = entry["histogram"]["range"]
        assert bound == pytest.approx((hi - lo) / 256)
        got = np.array(list(entry["percentiles"].values()))
        assert np.all(np.abs(got - np.percentile(ref, PERCENTILES)) < bound)
        assert entry["min"] == ref.min() and entry["max"] == ref.max()
        assert entry["mean"] == pytest.approx(ref.mean(), rel=1e-6)
        assert entry["std"] == pytest.approx(ref.std(), rel=1e-5)


def test_second_pass_when_sampled_chunk_misses_the_tail():
    x = np.full((1, 64, 64), 10.0, np.float32)
    x[0, 32:, 32:] = np.linspace(100.0, 5000.0, 32 * 32).reshape(32, 32)
    stats, passes = _stats(x, (1, 32, 32))  # the one sampled chunk is the constant corner
    assert passes == 2
    got = np.array(list(stats[0]["percentiles"].values()))
    assert np.all(np.abs(got - np.percentile(x, PERCENTILES)) < stats[0]["percentile_error_bound"])


def test_mask_restricts_statistics_to_foreground(tmp_path):
    demo = synthesize_nuclei((64, 80), seed=3)
    write_image(tmp_path / "img.ome.zarr", demo.noisy[None], ["c", "y", "x"], chunks=(1, 32, 32))
    write_image(tmp_path / "lab.ome.zarr", demo.labels[None], ["c", "y", "x"], chunks=(1, 48, 48))
    stats = compute_dataset_stats(str(tmp_path / "img.ome.zarr"), None,
                                  {**SETTINGS, "mask": "foreground"}, "nuclei",
                                  target_path=str(tmp_path / "lab.ome.zarr"))
    entry, ref = stats["channels"][0], demo.noisy[demo.labels > 0].astype(np.float64)
    assert entry["count"] == ref.size and entry["mean"] == pytest.approx(ref.mean(), rel=1e-6)
    got = np.array(list(entry["percentiles"].values()))
    assert np.all(np.abs(got - np.percentile(ref, PERCENTILES)) < entry["percentile_error_bound"])
    write_stats(stats, tmp_path / "s.json")
    assert read_stats(tmp_path / "s.json") == stats


def test_empty_mask_raises():
    x = np.ones((1, 32, 32), np.float32)
    with pytest.raises(NormalizationError, match="dataset 'test'.*no pixels"):
        _stats(x, (1, 16, 16), mask=np.zeros((32, 32), bool))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_raises_naming_the_dataset(tmp_path, bad):
    x = np.ones((1, 40, 40), np.float32)
    x[0, 35, 3] = bad  # not in the sampled chunk: found by the full pass
    write_image(tmp_path / "img.ome.zarr", x, ["c", "y", "x"], chunks=(1, 20, 20))
    with pytest.raises(NormalizationError, match="dataset 'broken'.*NaN or Inf"):
        compute_dataset_stats(str(tmp_path / "img.ome.zarr"), None, SETTINGS, "broken")


@pytest.mark.parametrize("method", ["percentile", "zscore", "minmax", "none"])
def test_constant_image_normalizes_without_dividing_by_zero(method):
    x = np.full((1, 33, 33), 700, np.uint16)
    stats, _ = _stats(x, (1, 16, 16))
    assert stats[0]["std"] == 0.0 and set(stats[0]["percentiles"].values()) == {700.0}
    out = normalize_array(x, {"channels": stats}, method)
    assert np.isfinite(out).all()
    assert np.all(out == (700.0 if method == "none" else 0.0))


def test_normalize_array_numpy_and_dask_agree_and_invert():
    rng = np.random.default_rng(2)
    x = rng.normal(100, 20, size=(2, 30, 30)).astype(np.float32)
    stats = {"channels": _stats(x, (1, 15, 15))[0]}
    for method in ("percentile", "zscore", "minmax"):
        eager = normalize_array(x, stats, method)
        lazy = normalize_array(da.from_array(x, chunks=(1, 15, 15)), stats, method).compute()
        np.testing.assert_array_equal(eager, lazy)
        np.testing.assert_allclose(denormalize_array(eager, stats, method), x, rtol=1e-5)
    clipped = normalize_array(x, stats, "percentile", clip=True)
    assert clipped.min() == 0.0 and clipped.max() == 1.0


# --- datasets of many positions -------------------------------------------------------------
POSITIONS_SETTINGS = {**SETTINGS, "sample_positions": None}


@pytest.fixture(scope="module")
def plate(tmp_path_factory) -> PositionSet:
    """The demo plate of 4 x 6 wells x 2 fields (float32), its labels as targets."""
    path = tmp_path_factory.mktemp("plate") / "plate.ome.zarr"
    write_demo_plate(path, rows=4, columns=6, fields=2, shape=(64, 64), seed=0, clean=False)
    return dataset_positions("screen", {"plate": str(path), "labels": "nuclei"})


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> PositionSet:
    """Five uint16 images of different sizes and brightness, as a collection."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(7)
    for i, shape in enumerate([(40, 52), (33, 33), (64, 20), (48, 48), (21, 70)]):
        x = rng.gamma(2.0 + i, 200.0 * (i + 1), size=(2, *shape)).clip(0, 65535)
        write_image(root / f"img{i}.ome.zarr", x.astype(np.uint16), ["c", "y", "x"],
                    chunks=(1, 16, 16))
    return dataset_positions("images", {"collection": str(root / "*.ome.zarr")})


def _pooled(positions, channel: int, mask: bool = False) -> np.ndarray:
    """numpy's oracle: the selected positions' pixels of one channel, concatenated."""
    values = []
    for p in positions:
        x = np.asarray(open_image(p.image).data)[channel]
        values.append(x[np.asarray(open_image(p.target).data) > 0] if mask else x.ravel())
    return np.concatenate(values).astype(np.float64)


@pytest.mark.parametrize("cap", [None, 3])
def test_integer_positions_pooled_equal_numpy_exactly(collection, cap):
    stats = compute_positions_stats(collection, None,
                                    {**POSITIONS_SETTINGS, "sample_positions": cap})
    used = [collection.positions[i] for i in ([0, 2, 4] if cap else range(5))]
    assert stats["positions"] == {"total": 5, "used": len(used),
                                  "keys": [p.key for p in used]}
    assert stats["passes"] == 1 and stats["dtype"] == "uint16"
    for c, entry in enumerate(stats["channels"]):
        ref = _pooled(used, c)
        assert list(entry["percentiles"].values()) == list(np.percentile(ref, PERCENTILES))
        assert (entry["min"], entry["max"], entry["count"]) == (ref.min(), ref.max(), ref.size)
        assert entry["mean"] == pytest.approx(ref.mean(), rel=1e-12)
        assert entry["std"] == pytest.approx(ref.std(), rel=1e-12)


def test_float_plate_pooled_within_one_bin_of_numpy(plate):
    stats = compute_positions_stats(plate, None, POSITIONS_SETTINGS)
    entry, ref = stats["channels"][0], _pooled(plate.positions, 0)
    assert stats["positions"]["used"] == 48 and entry["count"] == ref.size
    got = np.array(list(entry["percentiles"].values()))
    assert np.all(np.abs(got - np.percentile(ref, PERCENTILES))
                  < entry["percentile_error_bound"])
    assert entry["mean"] == pytest.approx(ref.mean(), rel=1e-6)


def test_foreground_mask_takes_each_positions_target(plate):
    chosen = plate.select(plate.keys[::7])
    stats = compute_positions_stats(chosen, None, {**POSITIONS_SETTINGS, "mask": "foreground"})
    entry, ref = stats["channels"][0], _pooled(chosen.positions, 0, mask=True)
    assert entry["count"] == ref.size
    got = np.array(list(entry["percentiles"].values()))
    assert np.all(np.abs(got - np.percentile(ref, PERCENTILES))
                  < entry["percentile_error_bound"])


def test_sampled_positions_stay_within_three_standard_errors(plate):
    """Sampling m of N positions: its error is bounded by what the spread between positions
    predicts for a sample mean, sd * sqrt((1 - m/N) / m), three times over (measured: 1.4
    times at p99.8, 0.08 of 35 at p1; see the module docstring)."""
    exact = compute_positions_stats(plate, None, POSITIONS_SETTINGS)["channels"][0]
    sampled = compute_positions_stats(plate, None, {**POSITIONS_SETTINGS,
                                                    "sample_positions": 8})
    assert sampled["positions"]["used"] == 8
    assert sampled["positions"]["keys"][0] == plate.keys[0]
    assert sampled["positions"]["keys"][-1] == plate.keys[-1]
    own = compute_positions_stats(plate, None, POSITIONS_SETTINGS, per="position")
    for i, p in enumerate(PERCENTILES):
        spread = np.std([list(s["channels"][0]["percentiles"].values())[i]
                         for s in own["positions"].values()], ddof=1)
        error = abs(sampled["channels"][0]["percentiles"][str(p)] - exact["percentiles"][str(p)])
        assert error <= 3 * spread * np.sqrt((1 - 8 / 48) / 8)


def test_per_position_stats_are_each_positions_own(plate, tmp_path):
    chosen = plate.select(plate.keys[:3])
    stats = compute_positions_stats(chosen, None, POSITIONS_SETTINGS, per="position")
    assert stats["per_position"] is True and list(stats["positions"]) == chosen.keys
    write_stats(stats, tmp_path / "s.json")
    stats = read_stats(tmp_path / "s.json")
    for position in chosen.positions:
        own = position_stats(stats, position.key)
        alone = compute_dataset_stats(position.image, None, SETTINGS, "screen")
        assert own["channels"] == alone["channels"]
        assert own["position"] == position.key and own["level"] == 0
    with pytest.raises(NormalizationError, match="screen.*'H12_0'"):
        position_stats(stats, "H12_0")


def test_dataset_level_stats_are_the_same_for_every_position(plate):
    stats = compute_positions_stats(plate.select(plate.keys[:2]), None, POSITIONS_SETTINGS)
    assert position_stats(stats, "A01_0") is stats and position_stats(stats, None) is stats


def test_positions_that_differ_in_dtype_are_refused_naming_the_position(collection, tmp_path):
    odd = tmp_path / "odd.ome.zarr"
    write_image(odd, np.ones((2, 20, 20), np.float32), ["c", "y", "x"], chunks=(1, 20, 20))
    mixed = replace(collection, positions=(*collection.positions[:2],
                                           Position("odd", str(odd))))
    with pytest.raises(NormalizationError, match=f"dataset 'images' position odd \\({odd}\\)"
                                                 f".*float32.*uint16"):
        compute_positions_stats(mixed, None, POSITIONS_SETTINGS)


def test_nan_in_one_position_names_its_path(collection, tmp_path):
    bad = tmp_path / "bad.ome.zarr"
    x = np.ones((1, 20, 20), np.float32)
    x[0, 3, 4] = np.nan
    write_image(bad, x, ["c", "y", "x"], chunks=(1, 20, 20))
    good = tmp_path / "good.ome.zarr"
    write_image(good, np.ones((1, 20, 20), np.float32), ["c", "y", "x"], chunks=(1, 20, 20))
    broken = replace(collection, positions=(Position("good", str(good)),
                                            Position("bad", str(bad))))
    for per in ("dataset", "position"):
        with pytest.raises(NormalizationError, match=f"position bad \\({bad}\\).*NaN or Inf"):
            compute_positions_stats(broken, None, POSITIONS_SETTINGS, per=per)


def test_foreground_mask_without_targets_names_the_position(collection):
    with pytest.raises(NormalizationError, match="dataset 'images' position img0 .*no target"):
        compute_positions_stats(collection, None, {**POSITIONS_SETTINGS, "mask": "foreground"})


@pytest.mark.parametrize(("total", "cap", "expected"), [
    (48, 8, [0, 7, 13, 20, 27, 34, 40, 47]), (5, 1, [0]), (5, 5, [0, 1, 2, 3, 4]),
    (3, None, [0, 1, 2]), (3, 10, [0, 1, 2])])
def test_spread_indices_cover_the_whole_order(total, cap, expected):
    assert spread_indices(total, cap) == expected


# --- the command line -------------------------------------------------------------------------
def test_cli_normalizes_a_positions_file_per_dataset_and_per_position(plate, tmp_path):
    chosen = plate.select(plate.keys[:4])
    write_positions(chosen, tmp_path / "screen.json")
    base = ["normalize", "--positions", str(tmp_path / "screen.json"), "--dataset", "screen",
            "--settings", json.dumps({"sample_positions": 2})]
    result = run_cli(*base, "--output", str(tmp_path / "d.json"))
    assert result.returncode == 0, result.stderr
    assert "(2 of 4 positions)" in result.stdout
    stats = read_stats(tmp_path / "d.json")
    assert stats["positions"] == {"total": 4, "used": 2, "keys": ["A01_0", "A02_1"]}
    assert stats["histogram_bins"] == 4096  # the schema's defaults filled in
    sampled = ("dataset 'screen': normalization statistics come from 2 of 4 positions "
               "(normalize.sample_positions); set it to null to read every position")
    assert f"unetflow normalize: warning: {sampled}" in result.stderr  # said, and recorded
    assert stats["warnings"] == [sampled]
    result = run_cli(*base, "--per", "position", "--output", str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr
    assert list(read_stats(tmp_path / "p.json")["positions"]) == chosen.keys
    assert "warning" not in result.stderr and "warnings" not in read_stats(tmp_path / "p.json")


@pytest.mark.parametrize(("extra", "message"), [
    (["--positions", "POSITIONS", "--image", "IMAGE"], "not allowed with argument"),
    ([], "one of the arguments --image --positions is required"),
    (["--per", "position", "--image", "IMAGE"], "--per chooses statistics"),
    (["--positions", "MISSING"], "--positions: MISSING: no such file or directory"),
    (["--positions", "POSITIONS", "--settings", '{"sample_positions": 0}'],
     "sample_positions"),
])
def test_cli_takes_exactly_one_of_image_and_positions(plate, tmp_path, extra, message):
    write_positions(plate.select(plate.keys[:1]), tmp_path / "screen.json")
    image = plate.positions[0].image
    extra = [{"IMAGE": image, "POSITIONS": str(tmp_path / "screen.json"),
              "MISSING": str(tmp_path / "nothing.json")}.get(a, a) for a in extra]
    settings = [] if "--settings" in extra else ["--settings", "{}"]
    result = run_cli("normalize", *extra, "--dataset", "screen", *settings,
                     "--output", str(tmp_path / "s.json"))
    assert result.returncode in (1, 2) and result.stderr.count("\n") == 1
    assert message.replace("MISSING", str(tmp_path / "nothing.json")) in result.stderr
    assert not (tmp_path / "s.json").exists()
