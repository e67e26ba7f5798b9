"""Instances from boundary-aware probabilities: seeds grown by a watershed, out of core.

A `boundaries` model predicts three classes: background, interior, boundary. Seeds are the
connected components of the confident interior; they grow over the boundary probability
(the elevation) within the predicted foreground, so touching objects, whose interiors the
boundary keeps apart, come out as separate objects.

Each clump (a connected component of the foreground: touching objects) is grown on its own,
over its bounding box with every other clump masked out; a clump with one seed becomes that
seed's object without a watershed. Why: `skimage.segmentation.watershed` breaks ties of
equal elevation by the order pixels entered its queue, and all markers enter with the same
key, so the order they leave in depends on how many other markers the queue holds. One
watershed over a chunk grown by the halo differed from one over the whole image in 50 of
200 random images whose clumps all fitted in the halo. A clump's own bounding box is the
same input whether it is cut out of the whole image or out of a chunk, so its growth is
the same, pixel for pixel: this makes the out-of-core result exact. Against one skimage
call over the whole image, only pixels whose seed is decided by such a tie differ (152 of
417,556 foreground pixels over 150 random 2D images, 420 of 562,136 in 60 3D ones), and
the clumps are faster (4096^2 nuclei: 1.8 s against 7.3 s)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from scipy import ndimage

from unetflow import notices
from unetflow.blockwise import Block, map_blocks_ordered, plan_blocks
from unetflow.components import connected_components
from unetflow.config import section_settings
from unetflow.targets import BOUNDARY, INTERIOR

__all__ = ["BOUNDARY", "INTERIOR", "seeded_watershed", "seeded_watershed_chunked"]


@functools.cache
def _defaults() -> dict[str, Any]:
    """predict.watershed's defaults, from the schema (the one place they are written)."""
    return section_settings("predict", {})["watershed"]


def _with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    return {**_defaults(), **settings}


def _check_channels(probabilities: np.ndarray | da.Array) -> None:
    if probabilities.ndim < 2 or probabilities.shape[0] != 3:
        raise ValueError(f"predict.watershed needs 3 probability channels (background, "
                         f"interior, boundary: a model with model.target 'boundaries'); got "
                         f"an array of shape {tuple(probabilities.shape)}")


def _footprint(ndim: int, separate_axes: tuple[int, ...]) -> np.ndarray:
    """Face connectivity, without the neighbours along `separate_axes` (time)."""
    footprint = ndimage.generate_binary_structure(ndim, 1)
    for axis in separate_axes:
        centre = [1] * ndim
        for side in (0, 2):
            centre[axis] = side
            footprint[tuple(centre)] = False
    return footprint


def _foreground(probabilities: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
    return probabilities[INTERIOR] + probabilities[BOUNDARY] > settings["foreground_threshold"]


def _seed_pixels(probabilities: np.ndarray | da.Array, settings: dict[str, Any]
                 ) -> np.ndarray | da.Array:
    return probabilities[INTERIOR] > settings["seed_threshold"]


def _clump_seeds(clumps: np.ndarray, seeds: np.ndarray, wanted: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per clump id: its seed's id if it holds exactly one seed (else 0); and the clumps
    that hold two or more. Only the clumps where `wanted` (a mask over clump ids) count."""
    marked = seeds > 0
    clump_of, seed_of = clumps[marked], seeds[marked]
    lowest = np.full(wanted.size, np.iinfo(seeds.dtype).max, dtype=seeds.dtype)
    highest = np.zeros(wanted.size, dtype=seeds.dtype)
    np.minimum.at(lowest, clump_of, seed_of)
    np.maximum.at(highest, clump_of, seed_of)
    wanted = wanted & (highest > 0)
    wanted[0] = False
    return np.where(wanted & (lowest == highest), highest, 0), np.flatnonzero(
        wanted & (lowest < highest))


def _grow(elevation: np.ndarray, clumps: np.ndarray, seeds: np.ndarray,
          footprint: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Seeds grown over `elevation` within the clumps (labelled foreground), one clump at a
    time (module docstring); clumps where `wanted` (a mask over clump ids) is False stay 0."""
    from skimage.segmentation import watershed

    only_seed, shared = _clump_seeds(clumps, seeds, wanted)
    grown = only_seed[clumps]
    boxes = ndimage.find_objects(clumps)
    for clump in shared:
        box = boxes[clump - 1]
        inside = clumps[box] == clump
        basins = watershed(elevation[box], seeds[box], mask=inside, connectivity=footprint)
        grown[box][inside] = basins[inside]
    return grown


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with fewer than `min_size` pixels set to 0 (in place)."""
    sizes = np.bincount(labels.ravel())
    labels[(sizes < min_size)[labels]] = 0
    return labels


def seeded_watershed(probabilities: np.ndarray, settings: dict,
                     separate_axes: tuple[int, ...] = ()) -> np.ndarray:
    """Instance ids (uint32, 0 background) of a whole image in memory.

    `probabilities` is (3, *spatial): background, interior, boundary. Seeds are the
    connected components (face connectivity) of interior > seed_threshold, those smaller
    than min_seed_size dropped; they grow over the boundary probability within foreground
    (interior + boundary > foreground_threshold) by a watershed, each clump of touching
    objects on its own (module docstring); foreground no seed reaches stays 0, and objects
    smaller than min_size become 0. Ids are the seeds' labels: unique, not consecutive.
    Nothing is joined or grown along `separate_axes` (spatial-axis indices: time).
    The oracle of the out-of-core `seeded_watershed_chunked`.
    """
    _check_channels(probabilities)
    settings = _with_defaults(settings)
    footprint = _footprint(probabilities.ndim - 1, separate_axes)
    seeds, _ = ndimage.label(_seed_pixels(probabilities, settings), footprint)
    seeds = _drop_small(seeds.astype(np.uint32), settings["min_seed_size"])
    clumps, count = ndimage.label(_foreground(probabilities, settings), footprint)
    grown = _grow(probabilities[BOUNDARY], clumps, seeds, footprint,
                  np.ones(count + 1, dtype=bool))
    return _drop_small(grown, settings["min_size"])


class _SizeTable:
    """Pixel counts per id, added chunk by chunk: 8 bytes per id up to the largest seen."""

    def __init__(self) -> None:
        self.sizes = np.zeros(1, dtype=np.int64)

    def add(self, counted: tuple[np.ndarray, np.ndarray]) -> None:
        ids, counts = counted
        if ids.size and int(ids[-1]) >= self.sizes.size:
            self.sizes = np.concatenate([self.sizes, np.zeros(
                max(int(ids[-1]) + 1, 2 * self.sizes.size) - self.sizes.size, np.int64)])
        self.sizes[ids.astype(np.intp)] += counts

    def kept(self, min_size: int) -> np.ndarray:
        """Whether each id holds at least `min_size` pixels (1 byte per id; id 0 never)."""
        keep = self.sizes >= min_size
        keep[0] = False
        return keep


def _counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, counts = np.unique(labels, return_counts=True)
    return ids[ids > 0], counts[ids > 0]


def _global_seeds(probabilities: da.Array, scratch: Path, workers: int,
                  settings: dict[str, Any], separate_axes: tuple[int, ...]
                  ) -> tuple[zarr.Array, _SizeTable]:
    """Seeds with global ids (`connected_components`), stored once in `scratch`/seeds.zarr
    (growth reads them with a halo), and their sizes."""
    fragments = scratch / "seed_fragments.zarr"
    seeds, _ = connected_components(_seed_pixels(probabilities, settings), fragments, workers,
                                    separate_axes)
    stored = zarr.open_array(str(scratch / "seeds.zarr"), mode="w", shape=seeds.shape,
                             chunks=seeds.chunksize, dtype=seeds.dtype, fill_value=0)

    def store(block: Block, data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        stored[block.core] = data["seeds"]
        return _counts(data["seeds"])

    sizes = _SizeTable()
    for counted in map_blocks_ordered(store, {"seeds": seeds},
                                      plan_blocks(seeds.shape, seeds.chunksize), workers):
        sizes.add(counted)
    shutil.rmtree(fragments)
    return stored, sizes


def _grow_chunks(probabilities: da.Array, seeds: zarr.Array, keep_seed: np.ndarray,
                 path: Path, settings: dict[str, Any], separate_axes: tuple[int, ...],
                 workers: int) -> _SizeTable:
    """Grow each chunk with its halo (none along `separate_axes`), store its core in a
    scratch array at `path`; return the objects' sizes. Says (notices.warn) in how many
    chunks a clump reaching into the core was cut by the halo's edge."""
    halo = [0 if a in separate_axes else int(settings["halo"]) for a in range(seeds.ndim)]
    blocks = plan_blocks(seeds.shape, seeds.chunks, tuple(halo))
    footprint = _footprint(seeds.ndim, separate_axes)
    grown_store = zarr.open_array(str(path), mode="w", shape=seeds.shape, chunks=seeds.chunks,
                                  dtype=seeds.dtype, fill_value=0)

    def grow(block: Block, data: dict[str, np.ndarray]) -> tuple[Any, ...]:
        p, kept_seeds = data["probabilities"], data["seeds"]
        kept_seeds = np.where(keep_seed[kept_seeds], kept_seeds, 0).astype(seeds.dtype)
        clumps, count = ndimage.label(_foreground(p, settings), footprint)
        wanted = np.bincount(clumps[block.inner].ravel(), minlength=count + 1) > 0
        grown = _grow(p[BOUNDARY], clumps, kept_seeds, footprint, wanted)
        grown_store[block.core] = grown[block.inner]
        return _counts(grown[block.inner]), _cut_by_halo(clumps, wanted, block)

    sizes, cut = _SizeTable(), 0
    # the seeds straight from Zarr: one read of the region, not a dask task per chunk
    for counted, was_cut in map_blocks_ordered(
            grow, {"probabilities": probabilities, "seeds": seeds}, blocks, workers):
        sizes.add(counted)
        cut += was_cut
    if cut:
        notices.warn(f"in {cut} of {len(blocks)} chunks a clump of touching objects reaches "
                     f"beyond predict.watershed.halo ({settings['halo']} px): near those "
                     f"chunks' borders it may split differently from a whole-image "
                     f"watershed; a larger halo makes it exact")
    return sizes


def _cut_by_halo(clumps: np.ndarray, wanted: np.ndarray, block: Block) -> bool:
    """Whether a clump reaching into the core (`wanted`: a mask over clump ids) also reaches
    a face of the extended region that is not the image's edge: it may go on beyond, and
    its growth be inexact."""
    faces = []
    for axis, (core, extended) in enumerate(zip(block.core, block.extended, strict=True)):
        if extended.start < core.start:
            faces.append(clumps.take(0, axis).ravel())
        if extended.stop > core.stop:
            faces.append(clumps.take(-1, axis).ravel())
    wanted = wanted.copy()
    wanted[0] = False
    return any(wanted[face].any() for face in faces)


def seeded_watershed_chunked(probabilities: da.Array, scratch: Path, workers: int,
                             settings: dict, separate_axes: tuple[int, ...] = ()
                             ) -> tuple[da.Array, int]:
    """`seeded_watershed` of a chunked (3, *spatial) dask array, out of core.

    Seeds: `components.connected_components` (global ids, union-find over chunk faces);
    their sizes counted chunk by chunk, small seeds dropped; each chunk read with `halo` px
    per side (clipped to the image; none along `separate_axes`) and grown there, its core
    stored in a scratch Zarr array; objects below min_size dropped lazily. Returns (uint32
    ids, uint64 past 2**32 seed fragments; 0 background; unique, not consecutive; chunked
    like `probabilities`) over `scratch`, which must outlive their use, and the count of
    objects. `probabilities` is read twice (seeds, then growth with halos), so it should be
    a stored array, not a computation; its channel axis is made one chunk, `separate_axes`
    chunked by 1 and the chunks regular (each axis's first chunk) if they are not.

    Exact: the same objects as `seeded_watershed` of the whole image whenever every clump
    of touching objects reaching into a chunk lies within the chunk grown by the halo, which
    holds when every clump spans at most `halo` px along each axis. A larger clump is grown
    from what the halo shows of it: near chunk borders it may split differently, or leave
    pixels whose seed lies beyond the halo as background; a warning says in how many chunks.
    With one chunk the ids are those of `seeded_watershed`.

    Memory: the blocks in flight (2 * workers chunks with their halo, each read from the
    stored chunks it touches) and tables indexed by seed id, where ids number the seed
    fragments of each chunk (a seed split by chunk faces takes one id per chunk; small and
    dropped seeds count too): 8 bytes for seed sizes, 1 to keep seeds, 8 for object sizes,
    1 to keep objects: 18 bytes per id (a size table holds up to twice its ids while it
    grows), plus what `connected_components` keeps for fragments touching a chunk face.
    Scratch on disk: three uint32 arrays of the image's shape, two removed before returning.
    """
    _check_channels(probabilities)
    settings = _with_defaults(settings)
    probabilities = probabilities.rechunk({0: -1, **{a + 1: 1 for a in separate_axes}})
    if probabilities[0].npartitions == 1:
        labels = seeded_watershed(np.asarray(probabilities.compute()), settings, separate_axes)
        return da.from_array(labels, chunks=labels.shape), int(np.count_nonzero(np.unique(labels)))
    probabilities = probabilities.rechunk((3, *(c[0] for c in probabilities.chunks[1:])))
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    seeds, seed_sizes = _global_seeds(probabilities, scratch, workers, settings, separate_axes)
    object_sizes = _grow_chunks(probabilities, seeds, seed_sizes.kept(settings["min_seed_size"]),
                                scratch / "grown.zarr", settings, separate_axes, workers)
    shutil.rmtree(scratch / "seeds.zarr")
    keep = object_sizes.kept(settings["min_size"])

    def drop_small(block: np.ndarray) -> np.ndarray:
        return np.where(keep[block], block, 0).astype(block.dtype)

    grown = da.from_zarr(str(scratch / "grown.zarr"))
    return grown.map_blocks(drop_small, dtype=grown.dtype), int(keep.sum())
