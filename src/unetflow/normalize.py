"""Per-dataset, per-channel intensity statistics, and the one function that applies them.

Statistics come from the whole dataset at one resolution level (never from one tile or patch),
reduced chunk by chunk with dask, so images larger than memory work: every chunk is read once
and turned into a small mergeable summary per channel (count, shifted sums of values and
squares, min, max, and a fixed-bin histogram), and the summaries are summed in a tree.

The histogram needs its range before the pass. How it is chosen decides precision and cost:

- 8- and 16-bit integer images get one bin per possible value: percentiles, mean and std are
  exact (they equal numpy's on the same data) and the error bound is 0.
- Other images (floats, 32/64-bit integers) get `histogram_bins` equal bins over the range of
  a sample of at most 1/16 of the chunks (at most 16, spread over the image), widened by 1/8 of
  that range on each side; values outside land in an underflow or overflow bin. A percentile
  is read inside its bin, so its error is below one bin width, stored as
  `percentile_error_bound`. Only when a requested percentile falls outside the sampled range
  (the sample missed a tail) is a second pass made, with bins over the exact [min, max] of the
  first; the JSON records `passes`. Mean and std are exact up to float rounding.

Percentiles follow numpy's default (linear interpolation between order statistics), so the
integer path reproduces `np.percentile` bit for bit on small test arrays.

Datasets of many positions (an HCS plate's fields, a collection's images;
`compute_positions_stats`) get statistics per position (each as above), or for the whole
dataset: the positions' pixels pooled, as if they were one image, read position after
position in one pass (PARTS_AT_ONCE positions computed together; never concatenated), their
chunk summaries merged as chunks are. Integer images stay exact (equal to `np.percentile`
over the pooled pixels); float images share one binning, chosen from a sample of at most
SAMPLE_CHUNKS chunks spread over at most SAMPLE_CHUNKS positions. Positions of a dataset
must share dtype and channels.

A large dataset is sampled: `normalize.sample_positions` (default 64; null reads all)
positions at most, spread evenly over the plate order (np.linspace over the indices, so the
first and last positions and every part of the plate between are read; deterministic).
The JSON records what was read under "positions" (total, used, keys). Plates vary
between fields much more than pixels vary within a field's histogram bins, so the
sampling error is set by that spread: the standard error of a sampled percentile is
about sd(the positions' own percentile) * sqrt((1 - m/N) / m) for m of N positions.
Measured with `bench/normalize_positions.py` on the demo plate of 4 x 6 wells x 2 fields
(48 positions of 64x64; all positions: p1 -2.071, p99.8 35.39, mean 7.21), sampling 8:
p1 -1.991 (+0.08, 0.2% of the p1-p99.8 range), p99.8 36.83 (+1.44, 4.1% of its value,
3.9% of the range), mean 7.63 (+5.8%); the predicted standard error of p99.8 was 1.05.
Sampling 16: p99.8 +0.55 (1.5%). With fields of 256x256 (less noise per field), sampling
8 was off by 1.1% at p99.8 (4: 3.0%, 16: 0.5%). A normalized intensity moves by the
error relative to the range, so 64 positions of a 3,456-position plate keep the scale
within a few percent; set `sample_positions: null` where exact figures matter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np

from unetflow import notices
from unetflow.files import write_json_atomic
from unetflow.integrity import DamagedFileError, describe_error, warn_missing_chunks
from unetflow.ome import OmeImage, channel_first, open_image, resolve_channels

if TYPE_CHECKING:  # plates imports the demo generator; only its types are needed here
    from unetflow.plates import Position, PositionSet

__all__ = [
    "Binning",
    "ChannelSummary",
    "NormalizationError",
    "PooledImage",
    "channel_scaling",
    "clip_range",
    "compute_channel_stats",
    "compute_dataset_stats",
    "compute_positions_stats",
    "denormalize_array",
    "non_finite_statistics",
    "normalize_array",
    "pooled_channel_stats",
    "position_stats",
    "read_stats",
    "spread_indices",
    "write_stats",
]

EPS = 1e-6
EXACT_DTYPES = (np.dtype(np.bool_), np.dtype(np.uint8), np.dtype(np.int8),
                np.dtype(np.uint16), np.dtype(np.int16))
SUBBLOCK = 1 << 16  # values per inner step: temporaries stay in cache (3x faster than whole)
SAMPLE_CHUNKS = 16
SAMPLE_FRACTION = 1 / 16
RANGE_MARGIN = 0.125
TREE_FAN_IN = 8
SAMPLE_BATCH = 4  # sampled chunks in memory at once
PARTS_AT_ONCE = 8  # positions computed together in one pass


class NormalizationError(ValueError):
    """The data cannot be normalized as configured (NaN/Inf values, empty mask, ...)."""


@dataclass(frozen=True)
class Binning:
    """How one channel's values map to histogram bins and the shift its moments use.

    Exact (integer) binnings have one bin per value from `lo`; others have `bins` bins of
    `width` from `lo`, plus an underflow bin first and an overflow bin last.
    """

    exact: bool
    lo: float
    width: float
    bins: int
    shift: float = 0.0

    @property
    def length(self) -> int:
        return self.bins if self.exact else self.bins + 2

    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1, dtype=np.float64)


@dataclass
class ChannelSummary:
    """Mergeable statistics of some of a channel's values; sums are of (value - shift)."""

    count: int
    s1: float
    s2: float
    vmin: float
    vmax: float
    hist: np.ndarray | None
    finite: bool = True

    def merge(self, other: ChannelSummary) -> ChannelSummary:
        hist = (None if self.hist is None or other.hist is None else self.hist + other.hist)
        return ChannelSummary(self.count + other.count, self.s1 + other.s1, self.s2 + other.s2,
                              min(self.vmin, other.vmin), max(self.vmax, other.vmax), hist,
                              self.finite and other.finite)


def _empty_summary(binning: Binning | None) -> ChannelSummary:
    hist = None if binning is None else np.zeros(binning.length, np.int64)
    return ChannelSummary(0, 0.0, 0.0, np.inf, -np.inf, hist)


def _exact_summary(values: np.ndarray, binning: Binning) -> ChannelSummary:
    """Histogram with one bin per integer value; moments and extremes follow from it later."""
    hist = np.zeros(binning.length, np.int64)
    offset = int(binning.lo)
    for i in range(0, values.size, SUBBLOCK):
        part = values[i:i + SUBBLOCK]
        if offset:
            part = part.astype(np.int32) - offset
        hist += np.bincount(part.astype(np.intp, copy=False), minlength=binning.length)
    return ChannelSummary(int(values.size), 0.0, 0.0, np.inf, -np.inf, hist)


def _work_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype.kind == "f" and dtype.itemsize <= 4 else np.dtype(
        np.float64)


def _float_summary(values: np.ndarray, binning: Binning | None) -> ChannelSummary:
    """Shifted sums, extremes and (with a binning) a histogram, in cache-sized steps."""
    if values.size == 0:
        return _empty_summary(binning)
    vmin, vmax = float(values.min()), float(values.max())
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        return replace(_empty_summary(binning), count=int(values.size), finite=False)
    work = _work_dtype(values.dtype)
    shift = work.type(binning.shift if binning else 0.0)
    buf = np.empty(min(SUBBLOCK, values.size), work)
    idx = np.empty(buf.size, np.intp)
    s1 = s2 = 0.0
    hist = None if binning is None else np.zeros(binning.length, np.int64)
    if binning is not None:
        scale = work.type(1.0 / binning.width)
        start = work.type((binning.shift - binning.lo) / binning.width + 1.0)
    for i in range(0, values.size, SUBBLOCK):
        part = values[i:i + SUBBLOCK]
        y = buf[:part.size]
        np.subtract(part, shift, out=y, casting="unsafe")
        s1 += float(np.add.reduce(y, dtype=np.float64))
        s2 += float(np.dot(y, y))
        if hist is not None:
            y *= scale
            y += start
            np.clip(y, 0, binning.bins + 1, out=y)
            ids = idx[:part.size]
            np.copyto(ids, y, casting="unsafe")  # truncation = floor for values >= 0
            hist += np.bincount(ids, minlength=binning.length)
    return ChannelSummary(int(values.size), s1, s2, vmin, vmax, hist)


def _summarize(values: np.ndarray, binning: Binning | None) -> ChannelSummary:
    if binning is not None and binning.exact:
        return _exact_summary(values.ravel(), binning)
    return _float_summary(values.ravel(), binning)


def _block_summaries(block: np.ndarray, mask: np.ndarray | None, first_channel: int,
                     binnings: dict[int, Binning | None]) -> dict[int, ChannelSummary]:
    """Summaries of every channel in one chunk (C, *spatial) of the image."""
    out = {}
    for i in range(block.shape[0]):
        values = block[i] if mask is None else block[i][mask]
        out[first_channel + i] = _summarize(values, binnings[first_channel + i])
    return out


def _merge_summaries(*parts: dict[int, ChannelSummary]) -> dict[int, ChannelSummary]:
    merged: dict[int, ChannelSummary] = {}
    for part in parts:
        for c, summary in part.items():
            merged[c] = summary if c not in merged else merged[c].merge(summary)
    return merged


def _cell(value: Any, ndim: int) -> np.ndarray:
    """A one-element object array: how a chunk hands its summaries back through dask."""
    cell = np.empty((1,) * ndim, dtype=object)
    cell.flat[0] = value
    return cell


def _summary_cell(block: np.ndarray, *mask: np.ndarray, binnings: dict[int, Binning | None],
                  block_info: dict | None = None) -> np.ndarray:
    first_channel = block_info[0]["array-location"][0][0]
    summaries = _block_summaries(block, mask[0][0] if mask else None, first_channel, binnings)
    return _cell(summaries, block.ndim)


def _flatten(cells: Any) -> list:
    if isinstance(cells, list):
        return [value for cell in cells for value in _flatten(cell)]
    return list(cells.ravel())


def _keep(cell: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return cell


def _ndim(cells: Any) -> int:
    return _ndim(cells[0]) if isinstance(cells, list) else cells.ndim


def _merge_cells(cells: Any, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    """Merge the (nested lists of) summary cells that `da.reduction` hands over."""
    return _cell(_merge_summaries(*_flatten(cells)), _ndim(cells))


def _summaries(data: da.Array, mask: da.Array | None,
               binnings: dict[int, Binning | None]) -> da.Array:
    """One lazy pass: a summary per chunk (`map_blocks`), merged in a tree (`da.reduction`)
    into one cell; every chunk is read once, in parallel, and only a few summaries are held
    at a time."""
    arrays = [data]
    if mask is not None:
        arrays.append(mask[None].rechunk(((1,),) + data.chunks[1:]))
    cells = da.map_blocks(_summary_cell, *arrays, binnings=binnings, dtype=object,
                          chunks=tuple((1,) * n for n in data.numblocks))
    total = da.reduction(cells, _keep, _merge_cells, combine=_merge_cells, axis=None,
                         keepdims=True, dtype=object, concatenate=False,
                         split_every=TREE_FAN_IN)
    return total


def _sample_summaries(data: da.Array, mask: da.Array | None,
                      blocks: list[tuple[int, ...]]) -> dict[int, ChannelSummary]:
    """Range and mean of a few chunks, read SAMPLE_BATCH at a time."""
    merged: dict[int, ChannelSummary] = {}
    starts = np.cumsum((0,) + data.chunks[0])
    mask = None if mask is None else mask.rechunk(data.chunks[1:])
    for i in range(0, len(blocks), SAMPLE_BATCH):
        part = blocks[i:i + SAMPLE_BATCH]
        images = dask.compute(*[data.blocks[b] for b in part])
        masks = (dask.compute(*[mask.blocks[b[1:]] for b in part]) if mask is not None
                 else [None] * len(part))
        for b, image, m in zip(part, images, masks, strict=True):
            found = _block_summaries(image, m, int(starts[b[0]]),
                                     dict.fromkeys(range(data.shape[0])))
            merged = _merge_summaries(merged, found)
    return merged


def _sample_blocks(numblocks: tuple[int, ...], limit: int = SAMPLE_CHUNKS
                   ) -> list[tuple[int, ...]]:
    """Chunks spread evenly over the image, at most 1/16 of them (and at most `limit`)."""
    spatial = numblocks[1:]
    total = int(np.prod(spatial))
    k = max(1, min(limit, int(total * SAMPLE_FRACTION)))
    flat = np.unique(np.linspace(0, total - 1, k).round().astype(int))
    return [(c, *np.unravel_index(i, spatial)) for c in range(numblocks[0]) for i in flat]


def _float_binning(lo: float, hi: float, bins: int, shift: float) -> Binning:
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return Binning(exact=False, lo=lo, width=(hi - lo) / bins, bins=bins, shift=shift)


def _sampled_binnings(parts: list[PooledImage], bins: int) -> dict[int, Binning]:
    """Bins over the widened range of a sample of chunks spread over the parts (at most
    SAMPLE_CHUNKS chunks from at most SAMPLE_CHUNKS parts); moments shifted by its mean."""
    chosen = [parts[i] for i in spread_indices(len(parts), SAMPLE_CHUNKS)]
    limit = max(1, SAMPLE_CHUNKS // len(chosen))
    sample: dict[int, ChannelSummary] = {}
    for part in chosen:
        data, mask = part.open()
        found = _sample_summaries(data, mask, _sample_blocks(data.numblocks, limit))
        for c, s in found.items():
            _raise_if_not_finite(s, c, part.name)
        sample = _merge_summaries(sample, found)
    binnings = {}
    for c, s in sample.items():
        if s.count == 0:  # the mask is empty in the sample: any range, refined later
            binnings[c] = _float_binning(0.0, 1.0, bins, 0.0)
            continue
        margin = RANGE_MARGIN * (s.vmax - s.vmin)
        binnings[c] = _float_binning(s.vmin - margin, s.vmax + margin, bins, s.s1 / s.count)
    return binnings


def _exact_binnings(dtype: np.dtype, channels: int) -> dict[int, Binning]:
    info = np.iinfo(np.uint8 if dtype == np.bool_ else dtype)
    size = int(info.max) - int(info.min) + 1
    return dict.fromkeys(range(channels), Binning(exact=True, lo=float(info.min), width=1.0,
                                                  bins=size))


def _raise_if_not_finite(summary: ChannelSummary, channel: int, name: str) -> None:
    if not summary.finite:
        raise NormalizationError(f"{name}: channel {channel} contains NaN or Inf values; "
                                 f"clean the image or mask those pixels")


def _order_statistics(hist: np.ndarray, binning: Binning, ks: np.ndarray) -> np.ndarray:
    """Values of the sorted data at 0-based positions `ks`, read from the histogram.

    Exact bins give the exact value; fixed bins place the k-th of a bin's n values at
    (k + 0.5) / n of its width, which is off by less than one bin. Positions in the
    underflow or overflow bin come back as NaN (the caller refines the range).
    """
    cdf = np.cumsum(hist)
    b = np.searchsorted(cdf, ks, side="right")
    if binning.exact:
        return binning.lo + b.astype(np.float64)
    before = np.where(b > 0, cdf[np.maximum(b - 1, 0)], 0)
    inside = (ks - before + 0.5) / np.maximum(hist[b], 1)
    values = binning.lo + binning.width * (b - 1 + inside)
    return np.where((b == 0) | (b == binning.bins + 1), np.nan, values)


def _percentiles(summary: ChannelSummary, binning: Binning,
                 percentiles: list[float]) -> np.ndarray:
    """numpy's linear-interpolation percentiles; NaN where the histogram range missed."""
    ranks = np.asarray(percentiles, np.float64) / 100.0 * (summary.count - 1)
    below = np.floor(ranks)
    low = _order_statistics(summary.hist, binning, below)
    high = _order_statistics(summary.hist, binning, np.minimum(below + 1, summary.count - 1))
    values = low + (ranks - below) * (high - low)
    return np.clip(values, summary.vmin, summary.vmax)


def _exact_extremes(summary: ChannelSummary, binning: Binning) -> ChannelSummary:
    """Min and max of an exact summary, read from its integer histogram."""
    present = np.flatnonzero(summary.hist)
    if present.size == 0:
        return summary
    return replace(summary, vmin=binning.lo + float(present[0]),
                   vmax=binning.lo + float(present[-1]))


def _mean_std(summary: ChannelSummary, binning: Binning) -> tuple[float, float]:
    """Mean and population std: exact from integer bins, else from the shifted sums."""
    if binning.exact:
        values = binning.lo + np.arange(binning.bins, dtype=np.float64)
        mean = float(summary.hist @ values) / summary.count
        centred = values - mean
        return mean, float(np.sqrt(summary.hist @ (centred * centred) / summary.count))
    m1 = summary.s1 / summary.count
    return binning.shift + m1, float(np.sqrt(max(summary.s2 / summary.count - m1 * m1, 0.0)))


def _needs_refining(summaries: dict[int, ChannelSummary], binnings: dict[int, Binning],
                    percentiles: list[float]) -> list[int]:
    return [c for c, s in summaries.items() if s.count
            and np.isnan(_percentiles(s, binnings[c], percentiles)).any()]


def _channel_entry(summary: ChannelSummary, binning: Binning, percentiles: list[float],
                   channel: int, name: str) -> dict[str, Any]:
    _raise_if_not_finite(summary, channel, name)
    if summary.count == 0:
        raise NormalizationError(f"{name}: channel {channel} has no pixels to compute "
                                 f"statistics on (the normalize.mask is empty)")
    if binning.exact:
        summary = _exact_extremes(summary, binning)
    mean, std = _mean_std(summary, binning)
    values = _percentiles(summary, binning, percentiles)
    return {
        "channel": channel, "count": summary.count, "mean": mean, "std": std,
        "min": summary.vmin, "max": summary.vmax,
        "percentiles": {str(float(p)): float(v) for p, v in zip(percentiles, values,
                                                                   strict=True)},
        "percentile_error_bound": 0.0 if binning.exact else float(binning.width),
        "histogram": {"kind": "exact" if binning.exact else "fixed-bin", "bins": binning.bins,
                      "range": [float(binning.lo), float(binning.edges()[-1])]},
    }


@dataclass(frozen=True)
class PooledImage:
    """One image whose pixels are pooled into a dataset's statistics (a position of a plate,
    or the one image of a dataset): `open()` gives its lazy data (C, *spatial) and mask, and
    `name` says where it is in errors. Opened when read, so positions are never all open."""

    name: str
    open: Callable[[], tuple[da.Array, da.Array | None]]


def spread_indices(total: int, cap: int | None) -> list[int]:
    """`cap` indices of `range(total)` spread evenly from the first to the last (all when
    `cap` is None or at least `total`): deterministic, and every part of the order is seen."""
    if cap is None or cap >= total:
        return list(range(total))
    return np.unique(np.linspace(0, total - 1, cap).round().astype(int)).tolist()


def _pass(parts: list[PooledImage], binnings: dict[int, Binning | None]
          ) -> dict[int, ChannelSummary]:
    """One pass over every part, merging their summaries; a part's NaN or Inf is reported
    with its own name. PARTS_AT_ONCE parts are computed together, so small positions keep
    the threads busy while only their chunks in flight and the summaries are in memory."""
    merged: dict[int, ChannelSummary] = {}
    for i in range(0, len(parts), PARTS_AT_ONCE):
        batch = parts[i:i + PARTS_AT_ONCE]
        lazy = [_summaries(*part.open(), binnings) for part in batch]
        for part, found in zip(batch, dask.compute(*lazy), strict=True):
            found = found.flat[0]
            for c, s in found.items():
                _raise_if_not_finite(s, c, part.name)
            merged = _merge_summaries(merged, found)
    return merged


def pooled_channel_stats(parts: list[PooledImage], percentiles: list[float], bins: int,
                         name: str, dtype: np.dtype, channels: int
                         ) -> tuple[list[dict[str, Any]], int]:
    """Statistics of each channel over all pixels of all `parts` (of one `dtype` and number
    of `channels`), as if they were one image; `name` is the whole in errors.

    Returns the per-channel entries and the number of full passes over the data (1, or 2
    when a float image's sampled range missed a requested percentile).
    """
    if dtype in EXACT_DTYPES:
        binnings = _exact_binnings(dtype, channels)
    else:
        binnings = _sampled_binnings(parts, bins)
    summaries = _pass(parts, binnings)
    passes = 1
    refine = _needs_refining(summaries, binnings, percentiles)
    if refine:
        passes = 2
        for c in refine:
            s = summaries[c]
            binnings[c] = _float_binning(s.vmin, s.vmax, bins, binnings[c].shift)
        second = _pass(parts, binnings)
        for c in refine:
            summaries[c] = replace(summaries[c], hist=second[c].hist)
    entries = [_channel_entry(summaries[c], binnings[c], percentiles, c, name)
               for c in range(channels)]
    return entries, passes


def compute_channel_stats(data: da.Array, percentiles: list[float], bins: int,
                          mask: da.Array | None = None, name: str = "image"
                          ) -> tuple[list[dict[str, Any]], int]:
    """Statistics of each channel of `data` (C, *spatial), only where `mask` is true if given.

    Returns the per-channel entries and the number of full passes over the data (1, or 2
    when a float image's sampled range missed a requested percentile).
    """
    part = PooledImage(name, lambda: (data, mask))
    return pooled_channel_stats([part], percentiles, bins, name, data.dtype, data.shape[0])


def _foreground_mask(settings: dict[str, Any], target_path: str | None,
                     dataset: str) -> da.Array | None:
    if settings.get("mask") != "foreground":
        return None
    if not target_path:
        raise NormalizationError(f"dataset '{dataset}': normalize.mask is 'foreground' but "
                                 f"the dataset has no target to take the foreground from")
    target = channel_first(open_image(target_path, level=settings["level"]),
                           keep_time=True)[0]
    return target > 0


def _name_channels(entries: list[dict[str, Any]], image: OmeImage,
                   channels: list | None) -> None:
    for entry, index in zip(entries, resolve_channels(image, channels), strict=True):
        entry["channel"] = index
        entry["name"] = image.channel_names[index]


def _common(settings: dict[str, Any]) -> dict[str, Any]:
    return {"level": settings["level"], "percentiles": list(settings["percentiles"]),
            "histogram_bins": settings["histogram_bins"], "mask": settings.get("mask")}


def compute_dataset_stats(image_path: str, channels: list | None, settings: dict[str, Any],
                          dataset: str, target_path: str | None = None) -> dict[str, Any]:
    """Statistics of one dataset at `settings['level']`, as a JSON-ready dict."""
    image = open_image(image_path, level=settings["level"])
    warn_missing_chunks(image, "input")
    if target_path:
        warn_missing_chunks(open_image(target_path, level=settings["level"]), "target")
    data = channel_first(image, channels, keep_time=True)
    mask = _foreground_mask(settings, target_path, dataset)
    if mask is not None and mask.shape != data.shape[1:]:
        raise NormalizationError(f"dataset '{dataset}': target {target_path} has spatial shape "
                                 f"{mask.shape} but image {image_path} has {data.shape[1:]}")
    stats, passes = compute_channel_stats(data, settings["percentiles"],
                                          settings["histogram_bins"], mask=mask,
                                          name=f"dataset '{dataset}' ({image_path})")
    _name_channels(stats, image, channels)
    return {"dataset": dataset, "image": image_path, **_common(settings),
            "level_path": image.level_path, "dtype": str(data.dtype), "passes": passes,
            "channels": stats}


# --- datasets of many positions (plates, collections) -------------------------------------
def _position_name(dataset: str, position: Position) -> str:
    return f"dataset '{dataset}' position {position.key} ({position.image})"


def _open_position(position: Position, channels: list | None, settings: dict[str, Any],
                   dataset: str) -> tuple[OmeImage, da.Array, da.Array | None]:
    """A position's image (C, *spatial) and, with `mask: foreground`, its target's mask."""
    name = _position_name(dataset, position)
    try:
        image = open_image(position.image, level=settings["level"])
        warn_missing_chunks(image, "input")
        if position.target:
            warn_missing_chunks(open_image(position.target, level=settings["level"]), "target")
        data = channel_first(image, channels, keep_time=True)
        if settings.get("mask") != "foreground":
            return image, data, None
        if not position.target:
            raise NormalizationError("normalize.mask is 'foreground' but the position has no "
                                     "target to take the foreground from")
        target = open_image(position.target, level=settings["level"])
        mask = channel_first(target, keep_time=True)[0] > 0
    except ValueError as err:  # OmeZarrError names the path; add the dataset and position
        raise NormalizationError(f"{name}: {err}") from None
    if mask.shape != data.shape[1:]:
        raise NormalizationError(f"{name}: target {position.target} has spatial shape "
                                 f"{mask.shape} but the image has {data.shape[1:]}")
    return image, data, mask


def _position_part(position: Position, channels: list | None, settings: dict[str, Any],
                   dataset: str, first: tuple[Position, da.Array]) -> PooledImage:
    """A position as a PooledImage whose data must have the first position's dtype and
    channels (pooled histograms share one binning)."""
    name = _position_name(dataset, position)

    def opened() -> tuple[da.Array, da.Array | None]:
        _, data, mask = _open_position(position, channels, settings, dataset)
        other, like = first
        if data.dtype != like.dtype or data.shape[0] != like.shape[0]:
            raise NormalizationError(
                f"{name}: {data.shape[0]} channel(s) of {data.dtype}, but position "
                f"{other.key} ({other.image}) has {like.shape[0]} of {like.dtype}; the "
                f"positions of a dataset need one dtype for dataset-level statistics (or "
                f"use normalize: position)")
        return data, mask

    return PooledImage(name, opened)


def _dataset_level_stats(position_set: PositionSet, channels: list | None,
                         settings: dict[str, Any]) -> dict[str, Any]:
    """Statistics of the pixels of the sampled positions pooled, in one pass over them."""
    dataset, positions = position_set.dataset, position_set.positions
    used = [positions[i] for i in spread_indices(len(positions), settings["sample_positions"])]
    image, data, _ = _open_position(used[0], channels, settings, dataset)
    parts = [_position_part(p, channels, settings, dataset, (used[0], data)) for p in used]
    entries, passes = pooled_channel_stats(
        parts, settings["percentiles"], settings["histogram_bins"],
        f"dataset '{dataset}' ({len(used)} positions of {position_set.source})",
        data.dtype, data.shape[0])
    _name_channels(entries, image, channels)
    return {"dataset": dataset, "kind": position_set.kind, "source": position_set.source,
            **_common(settings), "level_path": image.level_path, "dtype": str(data.dtype),
            "passes": passes, "sample_positions": settings["sample_positions"],
            "positions": {"total": len(positions), "used": len(used),
                          "keys": [p.key for p in used]},
            "channels": entries}


def _one_position_stats(position: Position, channels: list | None, settings: dict[str, Any],
                        dataset: str) -> dict[str, Any]:
    image, data, mask = _open_position(position, channels, settings, dataset)
    entries, passes = compute_channel_stats(data, settings["percentiles"],
                                            settings["histogram_bins"], mask=mask,
                                            name=_position_name(dataset, position))
    _name_channels(entries, image, channels)
    return {"image": position.image, "level_path": image.level_path,
            "dtype": str(data.dtype), "passes": passes, "channels": entries}


def compute_positions_stats(position_set: PositionSet, channels: list | None,
                            settings: dict[str, Any], per: str = "dataset") -> dict[str, Any]:
    """Statistics of a dataset made of positions (a plate or a collection), JSON-ready.

    `per="dataset"`: one set of statistics for the pixels of all positions pooled, read in
    one pass, position after position (never concatenated); `settings["sample_positions"]`
    positions at most, spread evenly over the plate order (`spread_indices`), recorded under
    "positions". `per="position"`: every position's own statistics, under
    "positions" by key, with "per_position": true (`position_stats` picks one).
    With `mask: foreground`, each position's pixels where its own target is nonzero.
    """
    if per == "dataset":
        return _dataset_level_stats(position_set, channels, settings)
    if per != "position":
        raise ValueError(f"statistics are per 'dataset' or per 'position', not {per!r}")
    found = {p.key: _one_position_stats(p, channels, settings, position_set.dataset)
             for p in position_set.positions}
    return {"dataset": position_set.dataset, "kind": position_set.kind,
            "source": position_set.source, "per_position": True, **_common(settings),
            "positions": found}


def _channel_sets(stats: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(where, channel entries) of a statistics dict: the dataset's, or every position's."""
    if stats.get("per_position"):
        return [(f"position {key} ({own.get('image', '?')})", own["channels"])
                for key, own in stats["positions"].items()]
    return [(str(stats.get("image") or stats.get("source", "")), stats["channels"])]


def non_finite_statistics(stats: dict[str, Any]) -> str | None:
    """Where the statistics hold NaN or Inf (values that overflow float64), or None."""
    for where, channels in _channel_sets(stats):
        for ch in channels:
            numbers = {k: v for k, v in ch.items() if isinstance(v, (int, float))}
            numbers.update({f"percentile {p}": v
                            for p, v in (ch.get("percentiles") or {}).items()})
            bad = {k: v for k, v in numbers.items() if not math.isfinite(float(v))}
            if bad:
                shown = ", ".join(f"{k} {v}" for k, v in bad.items())
                return (f"{where} channel {ch.get('name', ch.get('channel'))}: {shown} "
                        f"(values from {ch.get('min')} to {ch.get('max')} overflow float64 "
                        f"sums)")
    return None


def write_stats(stats: dict[str, Any], path: str | Path) -> None:
    """Write the statistics JSON atomically (temporary file, then rename), with the warnings
    said while computing them (unetflow.notices, as "warnings" when there are any), so that
    later stages and the report carry them. Non-finite statistics are refused: they would
    normalize every pixel to NaN."""
    problem = non_finite_statistics(stats)
    if problem:
        raise NormalizationError(
            f"dataset '{stats.get('dataset')}': the statistics are not finite: {problem}; "
            f"rescale the image to a range float64 can square and sum (e.g. divide it by a "
            f"power of ten when it is written); nothing was written to {path}")
    said = notices.recorded()
    write_json_atomic({**stats, "warnings": said} if said else stats, path)


CHANNEL_KEYS = ("mean", "std", "min", "max", "percentiles")


def _not_json_constant(name: str) -> float:
    raise ValueError(f"it holds the non-finite value {name}")


def _channels_problem(channels: Any, where: str) -> str | None:
    """What is wrong with a statistics file's "channels" list (at `where`), or None."""
    if not isinstance(channels, list) or not channels:
        return f"{where}'channels' is missing or not a list of channels"
    for index, channel in enumerate(channels):
        missing = [k for k in CHANNEL_KEYS if not isinstance(channel, dict) or k not in channel]
        if missing:
            return f"{where}channel {index} has no {', '.join(missing)}"
        percentiles = channel["percentiles"]
        values = [channel[k] for k in CHANNEL_KEYS[:4]] + (
            list(percentiles.values()) if isinstance(percentiles, dict) else [None])
        if len(values) < 6 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and np.isfinite(v) for v in values):
            return (f"{where}channel {index} has a value that is not a finite number (or "
                    f"fewer than two percentiles)")
    return None


def _stats_problem(stats: Any) -> str | None:
    """What makes a parsed statistics file unusable, or None."""
    if not isinstance(stats, dict):
        return "it is not a JSON object"
    if not stats.get("per_position"):
        return _channels_problem(stats.get("channels"), "")
    positions = stats.get("positions")
    if not isinstance(positions, dict) or not positions:
        return "'positions' is missing or empty"
    for key, entry in positions.items():
        problem = _channels_problem(entry.get("channels") if isinstance(entry, dict) else None,
                                    f"position {key}: ")
        if problem:
            return problem
    return None


def read_stats(path: str | Path) -> dict[str, Any]:
    """The statistics JSON written by `write_stats`; one line naming the file (delete it and
    rerun) when it is not valid JSON, lacks what normalizing needs, or holds NaN/Infinity."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        stats = json.loads(raw, parse_constant=_not_json_constant)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        problem = str(err) if "non-finite" in str(err) else \
            f"it is not valid JSON ({describe_error(err)})"
    else:
        problem = _stats_problem(stats)
    if problem:
        raise DamagedFileError(f"statistics file {path}: {problem}; delete it and rerun; "
                               f"Snakemake normalizes again")
    return stats


def _offset_and_scale(channel: dict[str, Any], method: str) -> tuple[float, float]:
    if method == "percentile":
        low, high = list(channel["percentiles"].values())[:2]
        return low, high - low
    if method == "zscore":
        return channel["mean"], channel["std"]
    if method == "minmax":
        return channel["min"], channel["max"] - channel["min"]
    if method == "none":
        return 0.0, 1.0
    raise ValueError(f"normalize.method {method!r} is not one of percentile, zscore, minmax, none")


def _per_channel(stats: dict[str, Any], method: str, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_offset_and_scale(ch, method) for ch in stats["channels"]]
    shape = (len(pairs),) + (1,) * (ndim - 1)
    offset = np.array([p[0] for p in pairs], dtype=np.float32).reshape(shape)
    scale = np.array([max(p[1], EPS) for p in pairs], dtype=np.float32).reshape(shape)
    return offset, scale


def channel_scaling(stats: dict[str, Any], method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (offset, scale) of `normalize_array`: (x - offset) / scale, float32, the
    scale EPS-guarded. A bioimage.io export bakes them in as a fixed linear scaling."""
    offset, scale = _per_channel(stats, method, 1)
    return offset, scale


def clip_range(method: str) -> tuple[float, float]:
    """Where `normalize_array(..., clip=True)` clips: [0, 1] for the methods that map the
    range to it, else [-5, 5] (z-scores; no method)."""
    return (0.0, 1.0) if method in ("percentile", "minmax") else (-5.0, 5.0)


def normalize_array(x, stats: dict[str, Any], method: str = "percentile", clip: bool = False):
    """Normalize `x` (C, *spatial), numpy or dask, with dataset statistics.

    The single implementation used by patch extraction, training and prediction. A constant
    channel (zero spread) is divided by an EPS-guarded scale, so it maps to 0, never NaN.
    """
    offset, scale = _per_channel(stats, method, x.ndim)
    if offset.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"normalize_array: the array has {x.shape[0]} channel(s) but the "
                         f"statistics of dataset '{stats.get('dataset')}' have "
                         f"{offset.shape[0]}")
    out = (x.astype(np.float32) - offset) / scale
    if clip:
        out = out.clip(*clip_range(method))
    return out


def denormalize_array(y, stats: dict[str, Any], method: str = "percentile"):
    """Map a normalized regression output (C, *spatial) back to the input's intensity units."""
    offset, scale = _per_channel(stats, method, y.ndim)
    return y * scale + offset


def position_stats(stats: dict[str, Any], key: str | None) -> dict[str, Any]:
    """The statistics to normalize one position with: the dataset's (a single image, or a
    plate with dataset-level statistics), or the position's own (`per_position`), with the
    file's shared keys (dataset, level, percentiles...) and its key as "position"."""
    if not stats.get("per_position"):
        return stats
    if key not in stats["positions"]:
        raise NormalizationError(f"the per-position statistics of dataset "
                                 f"'{stats.get('dataset')}' have no position {key!r}")
    shared = {k: v for k, v in stats.items() if k not in ("per_position", "positions")}
    return {**shared, "position": key, **stats["positions"][key]}
