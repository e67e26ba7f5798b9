"""Out-of-core connected components: instance labels of a foreground larger than memory."""

from __future__ import annotations

from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

__all__ = ["connected_components"]


def _label_chunk(foreground: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, _ = ndimage.label(foreground)
    return labels.astype(np.uint32)


def _label_and_store(foreground: np.ndarray, local: zarr.Array,
                     region: tuple[slice, ...]) -> tuple[int, list[tuple[np.ndarray, ...]]]:
    """Label one chunk into the scratch array; return its label count and its faces.

    The faces (first and last slice along each axis) are all that merging needs later, so
    no chunk is read twice.
    """
    labels = _label_chunk(foreground)
    local[region] = labels
    faces = [(labels.take(0, axis).copy(), labels.take(-1, axis).copy())
             for axis in range(labels.ndim)]
    return int(labels.max(initial=0)), faces


def _touching_pairs(last: np.ndarray, first: np.ndarray, offset_a: int,
                    offset_b: int) -> np.ndarray:
    """Global id pairs of labels facing each other across one chunk face."""
    both = (last > 0) & (first > 0)
    if not both.any():
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.stack([last[both].astype(np.int64) + offset_a,
                      first[both].astype(np.int64) + offset_b], axis=1)
    return np.unique(pairs, axis=0)


def _merge_face_labels(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Union-find over labels touching across chunk faces.

    Returns the sorted ids that touch another chunk's label, the id each is replaced by
    (the smallest id of its object), and the number of objects they form.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    ids = np.unique(pairs)
    if ids.size == 0:
        return ids, ids, 0
    edges = np.searchsorted(ids, pairs)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(len(ids), len(ids)))
    count, component = components(graph, directed=False)
    smallest = np.full(count, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, component, ids)
    return ids, smallest[component], count


def _relabel_chunk(block: np.ndarray, offset: int, ids: np.ndarray, roots: np.ndarray,
                   dtype: np.dtype) -> np.ndarray:
    """Chunk-local labels -> global ids; labels merged across faces -> their object's id.

    A lookup table over this chunk's labels only: O(pixels + labels in the chunk).
    """
    count = int(block.max(initial=0))
    table = np.arange(offset, offset + count + 1, dtype=np.int64)
    table[0] = 0
    first, stop = np.searchsorted(ids, [offset + 1, offset + count + 1])
    table[ids[first:stop] - offset] = roots[first:stop]
    return table.astype(dtype)[block]


def connected_components(foreground: da.Array, scratch: str | Path, workers: int = 1,
                         separate_axes: tuple[int, ...] = ()) -> tuple[da.Array, int]:
    """Face-connected components of a chunked boolean array, without loading it whole.

    Each chunk is labelled on its own (scipy.ndimage.label) into a scratch Zarr array, with
    ids made unique by per-chunk offsets; labels that touch across chunk faces are merged by
    a union-find over the touching pairs and take the smallest id of their object. Ids are
    unique per object but not consecutive. Memory holds the chunks in flight, the chunk
    faces (4 bytes per face pixel: 8 MB for 16384^2 in 512^2 chunks) and the labels that
    touch a face; never one entry per pixel or per object. Objects are not joined along
    `separate_axes` (time), which must be chunked by 1. Returns labels and their count.
    """
    chunk = tuple(c[0] for c in foreground.chunks)
    local = zarr.open_array(str(scratch), mode="w", shape=foreground.shape, chunks=chunk,
                            dtype=np.uint32, fill_value=0)
    blocks = foreground.to_delayed()
    grid = blocks.shape
    tasks = [dask.delayed(_label_and_store, pure=False)(
        blocks[index], local, tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk,
                                                                             strict=True)))
        for index in np.ndindex(*grid)]
    results = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    counts = np.array([count for count, _ in results], dtype=np.int64).reshape(grid)
    faces = np.empty(grid, dtype=object)
    for index, (_, chunk_faces) in zip(np.ndindex(*grid), results, strict=True):
        faces[index] = chunk_faces
    del results
    offsets = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(grid)
    pairs = []
    for index in np.ndindex(*grid):
        for axis in range(len(grid)):
            if index[axis] + 1 < grid[axis] and axis not in separate_axes:
                nxt = index[:axis] + (index[axis] + 1,) + index[axis + 1:]
                pairs.append(_touching_pairs(faces[index][axis][1], faces[nxt][axis][0],
                                             int(offsets[index]), int(offsets[nxt])))
    del faces
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)
    ids, roots, merged_objects = _merge_face_labels(pairs)
    total = int(counts.sum())
    dtype = np.dtype(np.uint32 if total < 2**32 else np.uint64)

    def relabel(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        offset = int(offsets[tuple(block_info[0]["chunk-location"])])
        return _relabel_chunk(block, offset, ids, roots, dtype)

    return da.from_zarr(local).map_blocks(relabel, dtype=dtype), total - ids.size + merged_objects
