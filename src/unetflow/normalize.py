"""Per-dataset, per-channel intensity statistics, and the one function that applies them.

Statistics come from the whole dataset (never from one tile or patch), computed with dask
chunk by chunk, so images larger than memory work. Percentiles come from a fixed-bin histogram
over [min, max]: their error is below one bin width, which is stored beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from unetflow.ome import channel_first, open_image

__all__ = [
    "compute_channel_stats",
    "compute_dataset_stats",
    "write_stats",
    "read_stats",
    "normalize_array",
    "denormalize_array",
    "NormalizationError",
]

EPS = 1e-6


class NormalizationError(ValueError):
    """The data cannot be normalized as configured (NaN/Inf values, empty mask, ...)."""


def _percentiles_from_histogram(counts: np.ndarray, edges: np.ndarray,
                                percentiles: list[float]) -> list[float]:
    """Percentiles by linear interpolation inside the bin where the cumulative count crosses."""
    cdf = np.cumsum(counts, dtype=np.float64)
    total = cdf[-1]
    values = []
    for p in percentiles:
        rank = p / 100.0 * total
        i = int(np.searchsorted(cdf, rank, side="left"))
        i = min(i, len(counts) - 1)
        before = cdf[i - 1] if i > 0 else 0.0
        inside = (rank - before) / counts[i] if counts[i] else 0.0
        values.append(float(edges[i] + np.clip(inside, 0.0, 1.0) * (edges[i + 1] - edges[i])))
    return values


def compute_channel_stats(data: da.Array, percentiles: list[float], bins: int,
                          mask: da.Array | None = None, name: str = "image") -> list[dict]:
    """Statistics of each channel of `data` (C, *spatial), optionally only where `mask` is true."""
    data = data.astype(np.float64)
    per_channel = []
    for c in range(data.shape[0]):
        values = data[c] if mask is None else data[c][mask]
        per_channel.append(values)
    moments = dask.compute(*[(v.size if mask is None else (mask.sum()), da.nansum(v),
                              da.nansum(v * v), da.min(v), da.max(v),
                              da.isfinite(v).all()) for v in per_channel])
    stats = []
    for c, (values, (count, total, squares, vmin, vmax, finite)) in enumerate(
            zip(per_channel, moments, strict=True)):
        if not finite:
            raise NormalizationError(f"{name}: channel {c} contains NaN or Inf values; "
                                     f"clean the image or mask those pixels")
        count = int(count)
        if count == 0:
            raise NormalizationError(f"{name}: channel {c} has no pixels to compute statistics on "
                                     f"(empty mask)")
        mean = total / count
        std = float(np.sqrt(max(squares / count - mean * mean, 0.0)))
        hi = vmax if vmax > vmin else vmin + 1.0
        counts, edges = da.histogram(values, bins=bins, range=(float(vmin), float(hi)))
        counts = counts.compute()
        stats.append({
            "channel": c, "count": count, "mean": float(mean), "std": std,
            "min": float(vmin), "max": float(vmax),
            "percentiles": dict(zip([str(float(p)) for p in percentiles],
                                    _percentiles_from_histogram(counts, edges, percentiles),
                                    strict=True)),
            "percentile_error_bound": float(edges[1] - edges[0]),
        })
    return stats


def compute_dataset_stats(image_path: str, channels: list | None, settings: dict[str, Any],
                          dataset: str, target_path: str | None = None) -> dict[str, Any]:
    """Statistics of one dataset at `settings['level']`, as a JSON-ready dict."""
    image = open_image(image_path, level=settings["level"])
    data = channel_first(image, channels)
    mask = None
    if settings.get("mask") == "foreground":
        if not target_path:
            raise NormalizationError(f"dataset '{dataset}': normalize.mask is 'foreground' but "
                                     f"the dataset has no target to take the foreground from")
        target = channel_first(open_image(target_path, level=settings["level"]))[0]
        mask = target > 0
    stats = compute_channel_stats(data, settings["percentiles"], settings["histogram_bins"],
                                  mask=mask, name=f"dataset '{dataset}' ({image_path})")
    names = [image.channel_names[i] for i in range(len(image.channel_names))]
    from unetflow.ome import resolve_channels
    for entry, index in zip(stats, resolve_channels(image, channels), strict=True):
        entry["channel"] = index
        entry["name"] = names[index]
    return {"dataset": dataset, "image": image_path, "level": settings["level"],
            "level_path": image.level_path, "percentiles": list(settings["percentiles"]),
            "histogram_bins": settings["histogram_bins"], "mask": settings.get("mask"),
            "channels": stats}


def write_stats(stats: dict[str, Any], path: str | Path) -> None:
    """Write the statistics JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats, indent=2))
    tmp.replace(path)


def read_stats(path: str | Path) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


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


def normalize_array(x, stats: dict[str, Any], method: str = "percentile", clip: bool = False):
    """Normalize `x` (C, *spatial), numpy or dask, with dataset statistics.

    The single implementation used by patch extraction, training and prediction. A constant
    channel (zero spread) is divided by EPS-guarded scale, so it maps to 0, never NaN.
    """
    offset, scale = _per_channel(stats, method, x.ndim)
    out = (x.astype(np.float32) - offset) / scale
    if clip:
        low, high = (0.0, 1.0) if method in ("percentile", "minmax") else (-5.0, 5.0)
        out = out.clip(low, high)
    return out


def denormalize_array(y, stats: dict[str, Any], method: str = "percentile"):
    """Map a normalized regression output (C, *spatial) back to the input's intensity units."""
    offset, scale = _per_channel(stats, method, y.ndim)
    return y * scale + offset
