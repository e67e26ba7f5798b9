"""Normalization statistics against numpy on the same small arrays, and how they are applied."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from unetflow.demo import synthesize_nuclei
from unetflow.normalize import (
    NormalizationError,
    compute_channel_stats,
    compute_dataset_stats,
    denormalize_array,
    normalize_array,
    read_stats,
    write_stats,
)
from unetflow.ome import write_image

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
