"""The Otsu baseline out of core: a threshold from a histogram summed block by block, and
objects as the out-of-core connected components of what lies above it.

`metrics.otsu_instances` is the in-memory oracle: `otsu_threshold` gives exactly
scikit-image's `threshold_otsu` of the whole channel, because the histogram is built with
its bins (one per integer value between the minimum and the maximum for integer images,
256 equal bins over [minimum, maximum] for floating-point ones) and a bin of a pixel
depends only on its value and the global range, not on the block it is read in.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np

from unetflow.blockwise import Block, map_blocks_ordered, plan_blocks
from unetflow.components import connected_components

__all__ = ["otsu_threshold", "otsu_objects"]

FLOAT_BINS = 256  # threshold_otsu's default nbins


def _range(channel: da.Array, blocks: list[Block], workers: int) -> tuple:
    """(minimum, maximum) of the channel as scalars of its dtype (pass 1); NaN when any
    pixel is NaN (numpy's min propagates it, Python's would not)."""
    def extremes(_block: Block, data: dict[str, np.ndarray]) -> tuple:
        return data["channel"].min(), data["channel"].max()

    found = list(map_blocks_ordered(extremes, {"channel": channel}, blocks, workers))
    return np.array([low for low, _ in found]).min(), np.array([high for _, high in found]).max()


def _is_integer(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.integer))


def _bin_centres(dtype: np.dtype, low, high) -> np.ndarray:
    """The bin centres skimage.exposure.histogram gives an image with this range."""
    if _is_integer(dtype):
        return np.arange(int(low), int(high) + 1)
    edges = np.histogram(np.array([low, high], dtype), FLOAT_BINS, range=(low, high))[1]
    return (edges[:-1] + edges[1:]) / 2.0


def _block_counts(values: np.ndarray, low, high) -> np.ndarray:
    """One block's histogram over the channel's bins: a bin per integer from `low` to
    `high`, or FLOAT_BINS equal bins as np.histogram makes them for the range (low, high)."""
    if _is_integer(values.dtype):
        shifted = values.astype(np.int64).ravel() - int(low)
        return np.bincount(shifted, minlength=int(high) - int(low) + 1)
    return np.histogram(values, FLOAT_BINS, range=(low, high))[0]


def otsu_threshold(channel: da.Array, block: tuple[int, ...], workers: int = 1) -> float | None:
    """Otsu's threshold of a channel (*spatial) of any size, equal to
    `skimage.filters.threshold_otsu(np.asarray(channel))`; None when the channel is constant
    (it has nothing to separate).

    Two passes over blocks of shape `block`: the range, then the histogram over it, summed.
    Memory: the blocks in flight and the histogram (up to one bin per integer value).
    """
    from skimage.filters import threshold_otsu

    blocks = plan_blocks(channel.shape, block)
    low, high = _range(channel, blocks, workers)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"the channel's values run from {low} to {high}; Otsu's threshold "
                         f"needs finite values (NaN or inf pixels in the image?)")
    if low == high:
        return None

    def counts(_block: Block, data: dict[str, np.ndarray]) -> np.ndarray:
        return _block_counts(data["channel"], low, high)

    total = np.zeros(len(_bin_centres(channel.dtype, low, high)), np.int64)
    for part in map_blocks_ordered(counts, {"channel": channel}, blocks, workers):
        total += part
    return float(threshold_otsu(hist=(total, _bin_centres(channel.dtype, low, high))))


def otsu_objects(channel: da.Array, threshold: float | None, scratch: str | Path,
                 block: tuple[int, ...], workers: int = 1) -> da.Array:
    """The Otsu baseline's objects: face-connected components of `channel > threshold`,
    labelled out of core (`components.connected_components`, chunks of shape `block`,
    scratch labels under `scratch`). The same objects as `metrics.otsu_instances`, with
    other ids (unique per object, not consecutive). All zeros (uint32) when `threshold` is
    None (a constant channel)."""
    if threshold is None:
        return da.zeros(channel.shape, dtype=np.uint32, chunks=block)
    foreground = (channel > threshold).rechunk(block)
    labels, _count = connected_components(foreground, scratch, workers)
    return labels
