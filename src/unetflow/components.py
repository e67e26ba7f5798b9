"""Out-of-core connected components: instance labels of a foreground larger than memory."""

from __future__ import annotations

import tempfile
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


def _face_file(faces: Path, index: tuple[int, ...]) -> Path:
    return faces / ("_".join(map(str, index)) + ".npz")


def _label_and_store(foreground: np.ndarray, local: zarr.Array, region: tuple[slice, ...],
                     faces: Path, index: tuple[int, ...]) -> int:
    """Label one chunk into the scratch array and its faces (first and last slice along each
    axis: all that merging needs) into a file; return its label count.

    Faces go to disk, not memory: they add up to 16 bytes per 1,000 pixels of a 2D image in
    1024^2 chunks but 190 per 1,000 voxels of a volume in 128^3 chunks (4.7 GB for 100 GB
    of float32), so keeping them would make memory grow with the image.
    """
    labels = _label_chunk(foreground)
    local[region] = labels
    np.savez(_face_file(faces, index), *[face for axis in range(labels.ndim)
                                          for face in (labels.take(0, axis),
                                                       labels.take(-1, axis))])
    return int(labels.max(initial=0))


def _face(faces: Path, index: tuple[int, ...], axis: int, last: bool) -> np.ndarray:
    with np.load(_face_file(faces, index)) as stored:
        return stored[f"arr_{2 * axis + int(last)}"]


def _touching_pairs(last: np.ndarray, first: np.ndarray, offset_a: int,
                    offset_b: int) -> np.ndarray:
    """Global id pairs of labels facing each other across one chunk face."""
    both = (last > 0) & (first > 0)
    if not both.any():
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.stack([last[both].astype(np.int64) + offset_a,
                      first[both].astype(np.int64) + offset_b], axis=1)
    return np.unique(pairs, axis=0)


def _all_touching_pairs(faces: Path, grid: tuple[int, ...], offsets: np.ndarray,
                        separate_axes: tuple[int, ...]) -> np.ndarray:
    """Global id pairs touching across every chunk face, reading two faces at a time."""
    pairs = []
    for index in np.ndindex(*grid):
        for axis in range(len(grid)):
            if index[axis] + 1 < grid[axis] and axis not in separate_axes:
                nxt = index[:axis] + (index[axis] + 1,) + index[axis + 1:]
                pairs.append(_touching_pairs(_face(faces, index, axis, last=True),
                                             _face(faces, nxt, axis, last=False),
                                             int(offsets[index]), int(offsets[nxt])))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)


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
    unique per object but not consecutive. Memory holds the chunks in flight and the labels
    that touch a face; the chunk faces wait in files beside `scratch` (removed at the end),
    two read at a time; never one entry per pixel. Objects are not joined along
    `separate_axes` (time), which must be chunked by 1. Returns labels and their count.
    """
    if foreground.npartitions == 1:  # one chunk (a plate's field): no scratch store
        labels = _label_chunk(foreground.compute())
        return da.from_array(labels, chunks=labels.shape), int(labels.max(initial=0))
    chunk = tuple(c[0] for c in foreground.chunks)
    local = zarr.open_array(str(scratch), mode="w", shape=foreground.shape, chunks=chunk,
                            dtype=np.uint32, fill_value=0)
    blocks = foreground.to_delayed()
    grid = blocks.shape
    with tempfile.TemporaryDirectory(prefix=".faces-", dir=Path(scratch).parent) as faces:
        tasks = [dask.delayed(_label_and_store, pure=False)(
            blocks[index], local, tuple(slice(i * c, (i + 1) * c)
                                        for i, c in zip(index, chunk, strict=True)),
            Path(faces), index) for index in np.ndindex(*grid)]
        counts = np.array(dask.compute(*tasks, scheduler="threads", num_workers=workers),
                          dtype=np.int64).reshape(grid)
        offsets = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(grid)
        pairs = _all_touching_pairs(Path(faces), grid, offsets, separate_axes)
    ids, roots, merged_objects = _merge_face_labels(pairs)
    total = int(counts.sum())
    dtype = np.dtype(np.uint32 if total < 2**32 else np.uint64)

    def relabel(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        offset = int(offsets[tuple(block_info[0]["chunk-location"])])
        return _relabel_chunk(block, offset, ids, roots, dtype)

    return da.from_zarr(local).map_blocks(relabel, dtype=dtype), total - ids.size + merged_objects
