"""Patch extraction and normalization statistics against plain reads of the same source.

Source: a 4096x4096 synthetic nuclei image (a 1024x1024 `synthesize_nuclei` scene tiled 4x4)
written as OME-Zarr in a temporary folder, float32 and uint16 versions, with its uint16
labels, chunks of 1024x1024 (zstd, ome-zarr-py's default). Each timing is the best of
REPEATS runs, the runs of the things compared interleaved.

Ratios (higher is better, goal >= 0.5 for both headline ratios, printed last):
- extract_vs_raw_read_ratio: MB/s of source read by `extract_patches` (image + labels, the
  schema's default 256 patches of 128x128, foreground fraction 0.33, block validation; every
  chunk is touched, so the whole source counts as read) divided by MB/s of reading the same
  two arrays whole with zarr (`array[...]`, zarr's own concurrent chunk reads).
- extract_dense_vs_raw_read_ratio: the same with 1024 patches (they cover the image once).
- stats_vs_dask_mean_ratio_<dtype>: MB/s of `compute_dataset_stats` (mean, std, min, max,
  1/99.8 percentiles) divided by MB/s of `da.from_zarr(...).mean().compute()` on the same
  array with the same threads.
- extract_peak_traced_mb / extract_peak_traced_mb_4x: peak of memory allocated during one
  extraction of 1024 patches (tracemalloc sees numpy's buffers) from this source and from one
  with 4x the pixels (8192x8192, same chunks): it follows the chunks in flight and the
  decoded labels kept between passes (at most patches.LABEL_MEMO_BYTES, 64 MiB), not the
  dataset, so it must grow far less than 4x.
- store_write_only_s vs extract_s: writing the same number of patches (images and targets,
  same layout and codec, with `ShardedPatches` as extraction does) into a fresh store, with
  nothing read: the floor under extraction. store_write_zarr_setitem_s: the same through
  zarr's `Array.__setitem__`, 16 patches per call (what `ShardedPatches` replaces).
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from unetflow.config import section_settings
from unetflow.demo import synthesize_nuclei
from unetflow.normalize import compute_dataset_stats, write_stats
from unetflow.ome import write_image
from unetflow.patches import DatasetInput, extract_patches
from unetflow.patchstore import ShardedPatches, create_patch_array, patches_per_shard

REPEATS = 5
TILE, TILES, CHUNK = 1024, 4, 1024
# the schema's defaults (normalize: percentiles 1, 99.8 over 4096 bins; patches: 256 of 128²)
STATS = section_settings("normalize", {})
PATCHES = section_settings("patches", {})


def write_sources(root: Path, tiles: int = TILES, uint16: bool = True) -> dict[str, Path]:
    scene = synthesize_nuclei((TILE, TILE), seed=7)
    noisy = np.tile(scene.noisy, (tiles, tiles))
    arrays = {"float32": noisy, "labels": np.tile(scene.labels, (tiles, tiles)).astype(np.uint16)}
    if uint16:
        arrays["uint16"] = np.clip(noisy * 100 + 100, 0, 65535).astype(np.uint16)
    paths = {}
    for name, array in arrays.items():
        paths[name] = root / f"{name}.ome.zarr"
        write_image(paths[name], array[None], ["c", "y", "x"], chunks=(1, CHUNK, CHUNK))
    return paths


def bench_dataset(root: Path, paths: dict[str, Path]) -> DatasetInput:
    write_stats(compute_dataset_stats(str(paths["float32"]), None, STATS, "bench"),
                root / "stats.json")
    return DatasetInput("bench", str(paths["float32"]), str(paths["labels"]),
                        str(root / "stats.json"))


def traced_peak_mb(root: Path, dataset: DatasetInput) -> float:
    tracemalloc.start()
    extract(root, dataset, 1024, "traced")
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return peak


def best_time(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_read(paths: list[Path]) -> int:
    return sum(zarr.open_array(str(p / "s0"), mode="r")[...].nbytes for p in paths)


def extract(root: Path, dataset: DatasetInput, per_dataset: int, out: str) -> None:
    extract_patches([dataset], "segmentation", {**PATCHES, "per_dataset": per_dataset},
                    {"method": "percentile", "clip": False}, 2, None, root / f"{out}.zarr",
                    root / f"{out}.tsv")


def write_only_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random 128x128 image patches and their 0/1 labels, as extraction would write."""
    images = np.random.default_rng(0).random((n, 1, 128, 128), dtype=np.float32)
    return images, (images[:, 0] > 0.7).astype(np.int32)


def write_only(root: Path, data: tuple[np.ndarray, np.ndarray],
               through_zarr: bool = False) -> None:
    """Write the patches `data` in the store's layout, nothing read: with ShardedPatches as
    extraction does, or through zarr's `Array.__setitem__` 16 per call."""
    group = zarr.open_group(str(root / "write_only.zarr"), mode="w", zarr_format=3)
    n = len(data[0])
    per_shard = patches_per_shard(data[0].shape[1:], data[0].dtype, n)
    for name, stack in zip(("images", "targets"), data, strict=True):
        array = create_patch_array(group, name, n, stack.shape[1:], stack.dtype, per_shard)
        if through_zarr:
            for start in range(0, n, 16):
                array[start:start + 16] = stack[start:start + 16]
            continue
        shards = ShardedPatches(array)
        for shard in range(shards.n_shards):
            wanted = shards.shard_range(shard)
            shards.write_shard(shard, shards.encode(stack[wanted.start:wanted.stop]))


def main() -> None:
    dask.config.set(scheduler="threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_sources(root)
        dataset = bench_dataset(root, paths)
        source_bytes = raw_read([paths["float32"], paths["labels"]])
        figures: dict[str, float] = {"source_mb": source_bytes / 1e6}

        t_raw, t_sparse, t_dense, t_write, t_zarr = [], [], [], [], []
        written = write_only_data(256)
        for _ in range(REPEATS):
            t_raw.append(best_time(lambda: raw_read([paths["float32"], paths["labels"]]), 1))
            t_sparse.append(best_time(lambda: extract(root, dataset, 256, "sparse"), 1))
            t_dense.append(best_time(lambda: extract(root, dataset, 1024, "dense"), 1))
            t_write.append(best_time(lambda: write_only(root, written), 1))
            t_zarr.append(best_time(lambda: write_only(root, written, through_zarr=True), 1))
        figures["raw_read_s"] = min(t_raw)
        figures["extract_s"] = min(t_sparse)
        figures["store_write_only_s"] = min(t_write)
        figures["store_write_zarr_setitem_s"] = min(t_zarr)
        raw_mbs = source_bytes / 1e6 / min(t_raw)
        figures["raw_read_mb_per_s"] = raw_mbs
        figures["extract_mb_per_s"] = source_bytes / 1e6 / min(t_sparse)
        figures["extract_patches_per_s"] = 256 / min(t_sparse)
        figures["extract_vs_raw_read_ratio"] = figures["extract_mb_per_s"] / raw_mbs
        figures["extract_dense_mb_per_s"] = source_bytes / 1e6 / min(t_dense)
        figures["extract_dense_vs_raw_read_ratio"] = figures["extract_dense_mb_per_s"] / raw_mbs

        figures["extract_peak_traced_mb"] = traced_peak_mb(root, dataset)
        big = root / "big"
        big.mkdir()
        figures["source_mb_4x"] = 4 * figures["source_mb"]
        figures["extract_peak_traced_mb_4x"] = traced_peak_mb(
            big, bench_dataset(big, write_sources(big, 2 * TILES, uint16=False)))

        for dtype in ("float32", "uint16"):
            array = da.from_zarr(str(paths[dtype] / "s0"))
            t_mean, t_stats = [], []
            for _ in range(REPEATS):
                t_mean.append(best_time(lambda a=array: a.mean().compute(), 1))
                t_stats.append(best_time(
                    lambda d=dtype: compute_dataset_stats(str(paths[d]), None, STATS, d), 1))
            figures[f"dask_mean_mb_per_s_{dtype}"] = array.nbytes / 1e6 / min(t_mean)
            figures[f"stats_mb_per_s_{dtype}"] = array.nbytes / 1e6 / min(t_stats)
            figures[f"stats_vs_dask_mean_ratio_{dtype}"] = min(t_mean) / min(t_stats)
            figures[f"stats_passes_{dtype}"] = compute_dataset_stats(
                str(paths[dtype]), None, STATS, dtype)["passes"]
    headline = ["extract_vs_raw_read_ratio", "stats_vs_dask_mean_ratio_float32",
                "stats_vs_dask_mean_ratio_uint16"]
    for name in [n for n in figures if n not in headline] + headline:
        print(f"{name}: {figures[name]:.3g}")


if __name__ == "__main__":
    main()
