"""An image worked on one block at a time, so a stage's memory does not grow with the image.

Prediction is out of core through dask's `map_overlap`; the stages after it (evaluation,
baselines, figures) reduce an image to a few numbers, so they walk a list of blocks instead:
each block is read through dask (only the Zarr chunks it touches), grown by the halo a
windowed computation needs (SSIM's window, a Gaussian's reach), handed to a function that
returns something small (sums, counts, a table), and dropped. A pool of `workers` threads
keeps at most `2 * workers` blocks in flight, so the peak memory of a stage is about
`2 * workers` blocks, whatever the image's size.

Blocks are whole multiples of the stored chunks (`block_shape`), so no chunk is split
between blocks except where a halo reaches into a neighbour.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import dask.array as da
import numpy as np

__all__ = ["Block", "block_shape", "plan_blocks", "read_region", "map_blocks_ordered"]

T = TypeVar("T")
Region = tuple[slice, ...]


@dataclass(frozen=True)
class Block:
    """One block of an image's spatial axes: its own pixels (`core`) and the pixels read
    with it (`extended`: the core grown by the halo, clipped to the image)."""

    core: Region
    extended: Region

    @property
    def inner(self) -> Region:
        """Where the core lies inside arrays read over `extended`."""
        return tuple(slice(c.start - e.start, c.stop - e.start)
                     for c, e in zip(self.core, self.extended, strict=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.core)


def block_shape(spatial_shape: tuple[int, ...], chunks: tuple[int, ...],
                block_pixels: int) -> tuple[int, ...]:
    """Block edge per spatial axis: whole multiples of `chunks` (the stored chunk edges),
    at most `block_pixels` pixels (but never less than one chunk), never beyond the image.

    The shortest edge that can still grow is doubled first, so blocks tend to cubes (a 3D
    block's halo costs least then).
    """
    if len(chunks) != len(spatial_shape):
        raise ValueError(f"chunks {chunks} do not match the spatial shape {spatial_shape}")
    edge = [min(int(c), int(s)) for c, s in zip(chunks, spatial_shape, strict=True)]
    while True:
        growable = [a for a in range(len(edge)) if edge[a] < spatial_shape[a]]
        if not growable:
            break
        axis = min(growable, key=lambda a: edge[a])
        grown = min(edge[axis] * 2, spatial_shape[axis])
        if math.prod(edge) // edge[axis] * grown > block_pixels:
            break
        edge[axis] = grown
    return tuple(edge)


def plan_blocks(spatial_shape: tuple[int, ...], block: tuple[int, ...],
                halo: tuple[int, ...] | int = 0) -> list[Block]:
    """The blocks covering an image in raster order (last axis fastest), each with its halo;
    blocks at the far end of an axis are shorter when the block does not divide the image."""
    halo = (halo,) * len(spatial_shape) if isinstance(halo, int) else tuple(halo)
    if len(block) != len(spatial_shape) or len(halo) != len(spatial_shape):
        raise ValueError(f"block {block} and halo {halo} must have one entry per spatial "
                         f"axis of {spatial_shape}")
    if min(block, default=1) < 1:
        raise ValueError(f"block {block}: every edge must be at least 1 pixel")
    starts = [range(0, s, b) for s, b in zip(spatial_shape, block, strict=True)]
    blocks = []
    for origin in np.ndindex(*[len(r) for r in starts]):
        core = tuple(slice(r[i], min(r[i] + b, s))
                     for r, i, b, s in zip(starts, origin, block, spatial_shape, strict=True))
        extended = tuple(slice(max(0, c.start - h), min(s, c.stop + h))
                         for c, h, s in zip(core, halo, spatial_shape, strict=True))
        blocks.append(Block(core, extended))
    return blocks


def read_region(array: da.Array | np.ndarray, region: Region) -> np.ndarray:
    """The trailing (spatial) axes of `array` over `region`, all leading axes whole, in
    memory. A dask array reads only the chunks the region touches, in this thread."""
    part = array[(..., *region)]
    if isinstance(part, da.Array):
        return np.asarray(part.compute(scheduler="sync"))
    return np.asarray(part)


def map_blocks_ordered(fn: Callable[[Block, dict[str, np.ndarray]], T],
                       arrays: dict[str, da.Array | np.ndarray], blocks: list[Block],
                       workers: int = 1) -> Iterator[T]:
    """`fn(block, data)` for each block in order, `data` holding every array read over the
    block's extended region; results are yielded in block order.

    Arrays are (*leading, *spatial) with the blocks' spatial axes last. `workers` threads
    run `fn` (numpy and scipy release the GIL); at most `2 * workers` blocks are read and
    not yet consumed at any time, which bounds the memory.
    """
    workers = max(1, int(workers))

    def run(block: Block) -> T:
        return fn(block, {name: read_region(a, block.extended) for name, a in arrays.items()})

    if workers == 1:
        for block in blocks:
            yield run(block)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="block") as pool:
        pending: deque = deque()
        for block in blocks:
            pending.append(pool.submit(run, block))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
