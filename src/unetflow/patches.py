"""Sampling training and validation patches, and writing them to a Zarr v3 patch store.

Split without leakage. With `validation: block` each image is cut across its longest axis
(relative to the patch) into a training block and a held-out validation block at the end,
separated by a gap of half a patch, so no validation patch shares a pixel with a training
patch nor touches one. With `validation: image` the datasets named in
`patches.validation_datasets` are held out whole.

Plates and collections (a dataset entry with a `positions` file instead of an image and a
target). The dataset's patches (`per_dataset`, or `per_megapixel` of all its pixels) are
spread over its positions by a seeded multinomial proportional to their pixel counts (read
from metadata), per split and kind, and only the positions that get patches are opened;
each is then sampled as an image. `validation: block` splits each such position as above;
`position` / `well` hold out whole positions / whole wells, round(validation_fraction * n)
of the n (at least 1, at least one left for training), drawn with a generator seeded by
(`patches.seed`, the dataset's name), so no patch of a held-out well is in training (and
every dataset must then be a plate, or for `position` a plate or collection). Foreground
patches drawn for a position without foreground come from the split's positions with
foreground instead. Each patch is normalized with its position's statistics
(`normalize.position_stats`), and the manifest names its position and well.

Samplers. Per split, `round(n * foreground_fraction)` patches are forced onto foreground (a
chunk drawn with probability proportional to its foreground count, then a foreground pixel of
it, which the patch contains); the rest are uniform. A candidate is rejected when its target is
entirely `ignore_label` or its foreground fraction is below `min_foreground`; each kind is
redrawn at most `max_attempts` times before a PatchError names the dataset. Everything is
drawn from one generator seeded by `patches.seed`, so the same seed gives the same store, byte
for byte.

Reading. Labels are read once to index foreground (a count and a seeded sample of
foreground pixels per chunk), once more only when `min_foreground` or `ignore_label` must be
checked, and the image and target once when writing; the decoded label blocks are kept
between these passes up to LABEL_MEMO_BYTES (chunkfiles.BlockMemo), so labels that fit are
decoded once. Local sources are read from their chunk files directly (unetflow.chunkfiles),
others through Zarr, in dask chunks of several Zarr chunks (READ_CHUNK_BYTES). Patches
are grouped by the chunk holding their origin; a group's task depends on that chunk and on
the neighbours its patches reach (one patch at most on the high side of each axis) and copies
each patch from them piece by piece, so each chunk is read once for both splits, never
concatenated with its neighbours, chunks are processed in parallel by dask, and only the
chunks in flight (and the kept labels) are in memory, never the whole dataset.

Normalization is applied at extraction, with each dataset's own statistics (so datasets of
different intensity ranges pool on one scale): training reads every patch many times, so
normalizing once costs less than normalizing on every load, and the statistics used are
stored in the store's attributes (and copied from there into every checkpoint).

Store layout (unetflow.patchstore): `<split>/images` float32 (N, C, *patch) and
`<split>/targets` (N, *patch) int32 class indices or (N, C, *patch) float32, one patch per
Zarr chunk so training reads any patch alone, consecutive patches grouped in shard files.
Writing is two-level: a task per source chunk cuts, normalizes and encodes its patches, and a
task per shard gathers the encoded patches of its index range (they come from a few
neighbouring source chunks, as store indices follow the source chunks) and writes the shard
file of images and of targets.
"""

from __future__ import annotations

import csv
import itertools
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.highlevelgraph import HighLevelGraph

from unetflow.chunkfiles import BlockMemo, direct_dask_array
from unetflow.files import atomic_path
from unetflow.integrity import checked_from_zarr
from unetflow.normalize import normalize_array, position_stats, read_stats
from unetflow.ome import channel_first, open_image, spatial_axes
from unetflow.patchstore import ShardedPatches, create_patch_array, patches_per_shard
from unetflow.plates import read_positions, spatial_shape
from unetflow.targets import (
    BOUNDARY_CLASSES,
    N2V,
    boundary_classes_lazy,
    segmentation_target,
)

__all__ = [
    "DatasetInput",
    "PatchError",
    "Region",
    "extract_patches",
    "held_out_groups",
    "patch_count",
    "prepare_target",
    "read_manifest",
    "PatchSource",
    "ForegroundIndex",
    "Sampler",
    "SourceImage",
    "SourceSet",
    "patch_source",
    "patch_tasks",
    "sample_patches",
    "sample_position_patches",
    "split_regions",
    "summarize_records",
    "write_manifest",
]

MANIFEST_FIELDS = ["index", "dataset", "position", "well", "split", "origin", "shape",
                   "foreground_fraction", "kind"]
READ_CHUNK_BYTES = 16 << 20  # dask chunks of the source: several Zarr chunks each
LABEL_MEMO_BYTES = 64 << 20  # labels of all datasets decoded once while they fit in this
FOREGROUND_POINTS = 1 << 20  # sampled foreground pixels kept over all chunks (<= 24 MB)


class PatchError(ValueError):
    """Patches cannot be sampled as configured from this data."""


@dataclass(frozen=True)
class DatasetInput:
    """What patch extraction needs to know of one dataset: one `image` and its `target`, or
    the `positions` file of a plate or collection (each position names its target)."""

    name: str
    image: str | None = None
    target: str | None = None
    stats: str | None = None
    channels: list | None = None
    positions: str | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.positions is None):
            raise PatchError(f"dataset '{self.name}': give exactly one of image (one image) "
                             f"and positions (a positions file)")
        if not self.stats:
            raise PatchError(f"dataset '{self.name}': no normalization statistics (stats)")


@dataclass(frozen=True)
class SourceImage:
    """One image patches are drawn from, with its target: a single-image dataset, or one
    position of a plate or collection (`position` is its key, "" for a single image)."""

    dataset: str
    image: str
    target: str | None  # None: the image is its own target (model.target n2v)
    position: str = ""
    well: str = ""

    @property
    def id(self) -> tuple[str, str]:
        return self.dataset, self.position

    @property
    def where(self) -> str:
        """How errors name it: the dataset, and the position with its path."""
        if not self.position:
            return f"dataset '{self.dataset}'"
        return f"dataset '{self.dataset}' position {self.position} ({self.image})"


@dataclass(frozen=True)
class Region:
    """A box [start, stop) in spatial pixel coordinates, assigned to one split."""

    split: str
    start: tuple[int, ...]
    stop: tuple[int, ...]

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))


def _split_axis(spatial_shape: tuple[int, ...], patch_shape: tuple[int, ...]) -> int:
    """The axis with the most room for patches; the last one on ties."""
    room = [s / p for s, p in zip(spatial_shape, patch_shape, strict=True)]
    return len(room) - 1 - int(np.argmax(room[::-1]))


def split_regions(spatial_shape: tuple[int, ...], patch_shape: tuple[int, ...], mode: str,
                  fraction: float, held_out: bool) -> list[Region]:
    """Training and validation regions of one image.

    `block`: along the split axis the last `fraction` (at least one patch) is validation, and
    a gap of half a patch separates it from the training block. `image`: the whole image
    belongs to one split (`held_out` -> validation). `position` and `well` hold out whole
    positions of plates and collections (`sample_position_patches`); within a position, they
    are `block`.
    """
    spatial_shape, patch_shape = tuple(spatial_shape), tuple(patch_shape)
    zeros = tuple(0 for _ in spatial_shape)
    if mode == "image":
        return [Region("val" if held_out else "train", zeros, spatial_shape)]
    axis = _split_axis(spatial_shape, patch_shape)
    width, p = spatial_shape[axis], patch_shape[axis]
    val_width = max(p, int(round(width * fraction)))
    gap = (p + 1) // 2
    train_stop = width - val_width - gap
    if train_stop < p:
        raise PatchError(f"image of shape {spatial_shape} is too small to hold a training "
                         f"block, a gap of {gap} px and a validation block of {val_width} px "
                         f"with patches of {patch_shape}; use validation: image or "
                         f"smaller patches")

    def box(split: str, a: int, b: int) -> Region:
        start = zeros[:axis] + (a,) + zeros[axis + 1:]
        stop = spatial_shape[:axis] + (b,) + spatial_shape[axis + 1:]
        return Region(split, start, stop)

    return [box("train", 0, train_stop), box("val", width - val_width, width)]


def prepare_target(target: np.ndarray, task: str, num_classes: int,
                   ignore_label: int | None, where: str = "the target") -> np.ndarray:
    """Segmentation targets as int32 class indices; with 2 classes any positive label is
    foreground (instance labels). Negative labels (but ignore_label) are refused in every
    case, and with more classes also labels >= num_classes, here, before training, naming
    `where`: with 2 classes a -1 (say, an unlabelled marker whose ignore_label was not set)
    was silently trained as foreground, and with more a loss fails after GPU hours."""
    if task != "segmentation":
        return target.astype(np.float32)
    if num_classes != 2:
        _check_label_range(target, num_classes, ignore_label, where)
        return target.astype(np.int32)
    _check_label_range(target, None, ignore_label, where)
    binary = (target != 0).astype(np.int32)
    if ignore_label is not None:
        binary[target == ignore_label] = ignore_label
    return binary


def _check_label_range(target: np.ndarray, num_classes: int | None, ignore_label: int | None,
                       where: str) -> None:
    """Labels outside 0..num_classes-1 (num_classes None: negative labels) but ignore_label
    are refused in one line naming `where`."""
    if np.issubdtype(target.dtype, np.unsignedinteger) and num_classes is None:
        return  # no negative values possible
    bad = target < 0
    if num_classes is not None:
        bad |= target >= num_classes
    if ignore_label is not None:
        bad &= target != ignore_label
    if bad.any():
        values = np.unique(target[bad])
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        if num_classes is None:
            raise PatchError(f"{where} holds negative labels {shown}; with 2 classes any "
                             f"positive label is foreground and 0 background, a negative "
                             f"one is neither: set train.ignore_label to it to skip those "
                             f"pixels, or relabel the target")
        raise PatchError(f"{where} holds labels {shown}, outside 0-{num_classes - 1} "
                         f"(model.num_classes: {num_classes}); set model.num_classes to the "
                         f"classes the labels hold, train.ignore_label to skip a label, or "
                         f"relabel the target")


def _foreground(target: np.ndarray, ignore_label: int | None) -> np.ndarray:
    fg = target != 0
    if ignore_label is not None:
        fg &= target != ignore_label
    return fg


def patch_count(settings: dict[str, Any], spatial_shape: tuple[int, ...], dataset: str) -> int:
    """Patches to draw from one dataset: `per_megapixel` of its pixels if set, else
    `per_dataset`."""
    if settings.get("per_megapixel"):
        return max(1, int(round(settings["per_megapixel"] * np.prod(spatial_shape) / 1e6)))
    if not settings.get("per_dataset"):
        raise PatchError(f"dataset '{dataset}': set patches.per_dataset or "
                         f"patches.per_megapixel (both are null)")
    return int(settings["per_dataset"])


# --- reading patches chunk by chunk ------------------------------------------------------
def _chunks_at_least(sizes: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Merge neighbouring chunks until each holds at least `minimum` (overlap needs it)."""
    out, acc = [], 0
    for size in sizes:
        acc += size
        if acc >= minimum:
            out.append(acc)
            acc = 0
    if acc:
        if out:
            out[-1] += acc
        else:
            out.append(acc)
    return tuple(out)


@dataclass(frozen=True)
class PatchSource:
    """A dataset's arrays rechunked alike, and where their chunks start on each axis."""

    arrays: tuple[da.Array, ...]
    patch: tuple[int, ...]

    @property
    def spatial_chunks(self) -> tuple[tuple[int, ...], ...]:
        return self.arrays[0].chunks[-len(self.patch):]

    def chunk_of(self, origins: np.ndarray) -> np.ndarray:
        """Index of the chunk holding each origin (n, d) along every spatial axis."""
        starts = [np.cumsum((0,) + c[:-1]) for c in self.spatial_chunks]
        return np.stack([np.searchsorted(s, origins[:, i], side="right") - 1
                         for i, s in enumerate(starts)], axis=1)

    def chunk_start(self, index: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(sum(c[:i])) for c, i in zip(self.spatial_chunks, index, strict=True))


def patch_source(arrays: list[da.Array], patch: tuple[int, ...]) -> PatchSource:
    """Rechunk `arrays` (*lead, *spatial) to common spatial chunks of at least a patch each,
    with their leading axes whole, so a chunk plus one patch of overlap holds every patch
    whose origin lies in it."""
    d = len(patch)
    spatial = tuple(_chunks_at_least(c, p)
                    for c, p in zip(arrays[0].chunks[-d:], patch, strict=True))
    out = tuple(a.rechunk(tuple(a.shape[:a.ndim - d]) + spatial) for a in arrays)
    return PatchSource(out, tuple(patch))


def _cut_patches(blocks: list[list[np.ndarray]], starts: np.ndarray, origins: np.ndarray,
                 patch: tuple[int, ...]) -> list[np.ndarray]:
    """Stacks (k, *lead, *patch) of the patches at `origins`, one per array, each patch copied
    piece by piece from the source blocks (starting at `starts`) that it overlaps."""
    d, size = len(patch), np.array(patch)
    out = []
    for array_blocks in blocks:
        lead = array_blocks[0].shape[:-d]
        stack = np.empty((len(origins), *lead, *patch), dtype=array_blocks[0].dtype)
        for block, start in zip(array_blocks, starts, strict=True):
            low = np.maximum(origins, start)
            high = np.minimum(origins + size, start + block.shape[-d:])
            for k in np.flatnonzero((high > low).all(axis=1)):
                stack[(k, Ellipsis, *map(slice, low[k] - origins[k], high[k] - origins[k]))] = \
                    block[(Ellipsis, *map(slice, low[k] - start, high[k] - start))]
        out.append(stack)
    return out


def _cell(value: Any, ndim: int = 1) -> np.ndarray:
    """A one-element object array: how a block hands a Python value back through dask."""
    cell = np.empty((1,) * ndim, dtype=object)
    cell.flat[0] = value
    return cell


def _apply_to_blocks(blocks: list[list[np.ndarray]], starts: np.ndarray, items: np.ndarray,
                     origins: np.ndarray, patch: tuple[int, ...], fn: Callable,
                     kwargs: dict) -> np.ndarray:
    values = fn(items, _cut_patches(blocks, starts, origins, patch), **kwargs)
    return _cell(list(zip(items.tolist(), values, strict=True)))


def _blocks_reached(home: tuple[int, ...], last: np.ndarray) -> list[tuple[int, ...]]:
    """Chunk indices from `home` to the furthest chunk any of its patches reaches (`last`
    holds, per patch, the chunk of its last pixel): at most two per axis."""
    ranges = [range(a, int(b) + 1) for a, b in zip(home, last.max(axis=0), strict=True)]
    return list(itertools.product(*ranges))


def _home_groups(source: PatchSource, origins: np.ndarray
                 ) -> list[tuple[tuple[int, ...], list[int]]]:
    """Items (rows of `origins`) grouped by the chunk holding their origin, in chunk order:
    task t of `patch_tasks` handles group t."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for item, index in enumerate(map(tuple, source.chunk_of(origins).tolist())):
        groups[index].append(item)
    return sorted(groups.items())


def patch_tasks(source: PatchSource, origins: np.ndarray, fn: Callable, *,
                groups: list[tuple[tuple[int, ...], list[int]]] | None = None,
                **kwargs) -> da.Array | None:
    """`fn(items, patch_stacks, **kwargs) -> one value per item` applied chunk by chunk.

    Returns a lazy 1-D object array with one cell per chunk holding origins (None when there
    are no origins); a cell is that chunk's list of (item, value). A task depends on the
    source chunk holding its origins and on the neighbours its patches reach, and copies each
    patch from them piece by piece: every source chunk is read once (a chunk shared by tasks,
    or by the splits computed together, is one dask key), never concatenated with its
    neighbours, and chunks without patches are not read. `groups`: `_home_groups(source,
    origins)` when the caller has it already.
    """
    if len(origins) == 0:
        return None
    d = len(source.patch)
    last = source.chunk_of(origins + np.array(source.patch) - 1)
    name = f"patches-{fn.__name__}-{uuid.uuid4().hex}"
    layer = {}
    for t, (index, items) in enumerate(groups or _home_groups(source, origins)):
        reached = _blocks_reached(index, last[items])
        keys = [[(a.name, *(0,) * (a.ndim - d), *b) for b in reached] for a in source.arrays]
        starts = np.array([source.chunk_start(b) for b in reached])
        layer[(name, t)] = (_apply_to_blocks, keys, starts, np.array(items), origins[items],
                            source.patch, fn, kwargs)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=list(source.arrays))
    return da.Array(graph, name, chunks=((1,) * len(layer),), dtype=object)


def _gather(cells: np.ndarray, n: int) -> list:
    """Per-item values, in item order, from computed `patch_tasks` cells."""
    values: list[Any] = [None] * n
    for pairs in cells:
        for item, value in pairs:
            values[item] = value
    return values


# --- sampling ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForegroundIndex:
    """Per chunk of a region: its foreground pixel count and a uniform sample of those pixels
    (region coordinates), from one pass over the labels."""

    counts: np.ndarray
    points: list[np.ndarray]

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` foreground pixels: a chunk drawn by its foreground count, then one of its
        sampled pixels, so every foreground pixel is about equally likely."""
        chunks = rng.choice(self.counts.size, size=n, p=self.counts / self.counts.sum())
        return np.stack([self.points[c][rng.integers(len(self.points[c]))] for c in chunks])


def _sample_flat(mask: np.ndarray, count: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`min(k, count)` distinct flat indices of the `count` True pixels of `mask`, uniformly.

    With k at most count / 8 (so about k * size / count <= size / 8 draws find them), by
    rejection: uniform pixels, the True ones kept, then k of the distinct ones at random (every
    k-subset is equally likely); this spares listing every True pixel (np.flatnonzero), the
    costliest step of indexing foreground. Otherwise from that list.
    """
    k = min(k, count)
    flat = mask.reshape(-1)
    if k == 0 or 8 * k > count:
        return rng.choice(np.flatnonzero(flat), size=k, replace=False)
    chosen = np.empty(0, np.int64)
    while chosen.size < k:
        draws = rng.integers(flat.size, size=2 * (k - chosen.size) * flat.size // count + 16)
        chosen = np.union1d(chosen, draws[flat[draws]])
    return rng.choice(chosen, size=k, replace=False)


def _chunk_foreground(block: np.ndarray, k: int, base_seed: int, ignore_label: int | None,
                      block_info: dict | None = None) -> np.ndarray:
    """One chunk's foreground count and `k` of its foreground pixels, drawn with a generator
    seeded by the chunk's position (so the result does not depend on scheduling)."""
    info = block_info[0]
    flat = int(np.ravel_multi_index(info["chunk-location"], info["num-chunks"]))
    mask = _foreground(block, ignore_label)
    count = int(np.count_nonzero(mask))
    rng = np.random.default_rng([base_seed, flat])
    chosen = _sample_flat(mask, count, k, rng)
    start = np.array([a for a, _ in info["array-location"]])
    points = np.stack(np.unravel_index(np.sort(chosen), block.shape), 1) + start
    return _cell((count, points), block.ndim)


def _foreground_cells(labels: da.Array, region: Region, k: int, base_seed: int,
                      ignore_label: int | None) -> da.Array:
    sub = labels[region.slices()]
    return sub.map_blocks(_chunk_foreground, k, base_seed, ignore_label, dtype=object,
                          chunks=tuple((1,) * n for n in sub.numblocks))


def _origins_around(points: np.ndarray, region: Region, patch: tuple[int, ...],
                    rng: np.random.Generator) -> np.ndarray:
    """Origins placing each point at a jittered spot in the middle half of its patch."""
    p = np.array(patch)
    jitter = rng.integers(-(p // 4), p // 4 + 1, size=points.shape)
    origins = points + np.array(region.start) - p // 2 + jitter
    return np.clip(origins, region.start, np.array(region.stop) - p)


def _uniform_origins(region: Region, patch: tuple[int, ...], n: int,
                     rng: np.random.Generator) -> np.ndarray:
    high = np.array(region.stop) - np.array(patch) + 1
    return rng.integers(region.start, high, size=(n, len(patch)))


def _check_patches(items: np.ndarray, stacks: list[np.ndarray], ignore_label: int | None
                   ) -> list[tuple[float, bool]]:
    target = stacks[0]
    axes = tuple(range(1, target.ndim))
    fraction = _foreground(target, ignore_label).mean(axis=axes)
    ignored = (target == ignore_label).all(axis=axes) if ignore_label is not None else \
        np.zeros(len(items), bool)
    return list(zip(fraction.tolist(), ignored.tolist(), strict=True))


@dataclass
class Sampler:
    """How one image's patches are drawn (labels are None for regression); `source` is the
    image (a dataset's, or one position's), which records and errors name."""

    name: str
    labels: PatchSource | None
    patch: tuple[int, ...]
    settings: dict[str, Any]
    ignore_label: int | None
    source: SourceImage | None = None

    @property
    def where(self) -> str:
        return self.source.where if self.source else f"dataset '{self.name}'"

    @property
    def filters(self) -> bool:
        return self.labels is not None and (self.settings["min_foreground"] > 0
                                            or self.ignore_label is not None)

    def accept(self, origins: np.ndarray) -> np.ndarray:
        if not self.filters or len(origins) == 0:
            return np.ones(len(origins), bool)
        cells = patch_tasks(self.labels, origins, _check_patches,
                            ignore_label=self.ignore_label).compute()
        checks = _gather(cells, len(origins))
        return np.array([not ignored and fraction >= self.settings["min_foreground"]
                         for fraction, ignored in checks], bool)

    def record(self, region: Region, kind: str, origin: np.ndarray) -> dict[str, Any]:
        source = self.source or SourceImage(self.name, "", "")
        return {"dataset": self.name, "position": source.position, "well": source.well,
                "split": region.split, "origin": tuple(int(v) for v in origin), "kind": kind}


def _draw_kind(ctx: Sampler, region: Region, kind: str, quota: int, rng: np.random.Generator,
               foreground: ForegroundIndex | None) -> np.ndarray:
    """`quota` accepted origins of one kind, redrawing rejects at most max_attempts times."""
    accepted = np.zeros((0, len(ctx.patch)), np.int64)
    for _attempt in range(ctx.settings["max_attempts"]):
        need = quota - len(accepted)
        if need == 0:
            break
        if kind == "foreground":
            points = foreground.draw(need, rng)
            candidates = _origins_around(points, region, ctx.patch, rng)
        else:
            candidates = _uniform_origins(region, ctx.patch, need, rng)
        accepted = np.concatenate([accepted, candidates[ctx.accept(candidates)]])
    if len(accepted) < quota:
        raise PatchError(f"{ctx.where}: only {len(accepted)} of {quota} {kind} "
                         f"{region.split} patches had a foreground fraction of at least "
                         f"patches.min_foreground={ctx.settings['min_foreground']} and were "
                         f"not entirely ignore_label after patches.max_attempts="
                         f"{ctx.settings['max_attempts']} draws each; the labels are too "
                         f"sparse for this filter: lower min_foreground")
    return accepted


def _region_foreground(ctx: Sampler, regions: list[Region], quotas: list[int],
                       rng: np.random.Generator) -> list[ForegroundIndex | None]:
    """Foreground index of each region (None where it has no foreground), all computed in
    one parallel pass over the labels.

    Each chunk keeps at most as many sampled pixels as the region needs foreground patches
    (and at most FOREGROUND_POINTS over all chunks), drawn with a generator seeded from `rng`
    and the chunk's position, so the result does not depend on the order chunks finish.
    """
    labels = ctx.labels.arrays[0]
    n_chunks = int(np.prod(labels.numblocks))
    tasks = []
    for region, quota in zip(regions, quotas, strict=True):
        k = max(1, min(quota, max(8, FOREGROUND_POINTS // n_chunks)))
        tasks.append(_foreground_cells(labels, region, k, int(rng.integers(2**62)),
                                       ctx.ignore_label))
    computed = dask.compute(*tasks)
    out = []
    for cells in computed:
        chunks = cells.ravel().tolist()
        counts = np.array([c for c, _ in chunks], np.int64)
        out.append(ForegroundIndex(counts, [p for _, p in chunks]) if counts.sum() else None)
    return out


def _no_foreground(where: str, region: Region, settings: dict[str, Any]) -> PatchError:
    return PatchError(
        f"{where}: the target has no foreground in the {region.split} region "
        f"{region.start}-{region.stop}, so foreground-oversampled patches "
        f"(patches.foreground_fraction={settings['foreground_fraction']}) cannot "
        f"be drawn; check the label image, or set patches.foreground_fraction: 0")


def _split_quotas(settings: dict[str, Any], splits: list[str], total: int) -> list[int]:
    """Patches of each split: all in one split (`image`), else `validation_fraction` of
    them validation (at least 1 each)."""
    if settings["validation"] == "image":
        return [total for _ in splits]
    fraction = settings["validation_fraction"]
    return [max(1, int(round(total * (fraction if split == "val" else 1 - fraction))))
            for split in splits]


def _draw_regions(ctx: Sampler, regions: list[Region], quotas: list[tuple[int, int]],
                  foreground: list[ForegroundIndex | None], rng: np.random.Generator
                  ) -> list[dict]:
    """Records of (foreground, uniform) patches per region, drawn in region order."""
    records = []
    for region, counts, fg in zip(regions, quotas, foreground, strict=True):
        for kind, n in zip(("foreground", "uniform"), counts, strict=True):
            for origin in _draw_kind(ctx, region, kind, n, rng, fg) if n else []:
                records.append(ctx.record(region, kind, origin))
    return records


def sample_patches(ctx: Sampler, spatial: tuple[int, ...], held_out: bool,
                   rng: np.random.Generator) -> list[dict]:
    """Records {dataset, position, well, split, origin, kind} of one image's patches."""
    settings = ctx.settings
    try:
        regions = split_regions(spatial, ctx.patch, settings["validation"],
                                settings["validation_fraction"], held_out)
    except PatchError as err:
        raise PatchError(f"{ctx.where}: {err}") from None
    quotas = _split_quotas(settings, [r.split for r in regions],
                           patch_count(settings, spatial, ctx.name))
    fraction = settings["foreground_fraction"] if ctx.labels is not None else 0.0
    n_foreground = [int(round(q * fraction)) for q in quotas]
    foreground = (_region_foreground(ctx, regions, n_foreground, rng) if any(n_foreground)
                  else [None] * len(regions))
    for region, n_fg, fg in zip(regions, n_foreground, foreground, strict=True):
        if n_fg and fg is None:
            raise _no_foreground(ctx.where, region, settings)
    return _draw_regions(ctx, regions, [(f, q - f) for f, q in zip(n_foreground, quotas,
                                                                     strict=True)],
                         foreground, rng)


# --- datasets of positions (plates, collections) ------------------------------------------
def _source_images(ds: DatasetInput, self_supervised: bool) -> list[SourceImage]:
    """The positions of a plate or collection dataset as images with their targets (none
    read when the model learns from the images alone)."""
    found = read_positions(ds.positions)
    if self_supervised:
        return [SourceImage(ds.name, p.image, None, p.key, p.well or "")
                for p in found.positions]
    missing = [p for p in found.positions if not p.target]
    if missing:
        raise PatchError(f"dataset '{ds.name}' position {missing[0].key} ({missing[0].image}) "
                         f"has no target; give the dataset labels (a label image in every "
                         f"field) or a target plate or collection")
    return [SourceImage(ds.name, p.image, p.target, p.key, p.well or "")
            for p in found.positions]


def _groups(images: list[SourceImage], mode: str) -> list[str]:
    """What `validation: position | well` holds out whole: each image's group."""
    return [img.well if mode == "well" else img.position for img in images]


def _check_validation_groups(datasets: list[DatasetInput],
                             positions: dict[str, list[SourceImage]],
                             settings: dict[str, Any]) -> None:
    """`validation: position | well` needs positions (and wells) to hold out: every dataset
    a plate (well) or a plate or collection (position), each with at least two groups. As
    the config check refuses it, so does a stage run by hand."""
    mode = settings["validation"]
    if mode not in ("position", "well"):
        return
    for ds in datasets:
        if not ds.positions:
            raise PatchError(f"patches.validation is '{mode}' but dataset '{ds.name}' is one "
                             f"image, with no {mode}s to hold out; use patches.validation: "
                             f"block or image")
    for name, images in positions.items():
        if mode == "well" and not all(img.well for img in images):
            raise PatchError(f"patches.validation is 'well' but dataset '{name}' is a "
                             f"collection, whose positions have no wells; use "
                             f"patches.validation: position to hold out whole images")
        count = len(set(_groups(images, mode)))
        if count < 2:
            raise PatchError(f"patches.validation is '{mode}' but dataset '{name}' has only "
                             f"{count} {mode}; holding one out needs at least 2 (one for "
                             f"training), or use patches.validation: block")


def held_out_groups(groups: list[str], fraction: float, seed: int, dataset: str) -> set[str]:
    """The groups (positions or wells) held out for validation: round(fraction * n) of the
    n distinct groups, at least 1 and at most n - 1, drawn by a generator seeded with
    (patches.seed, the dataset's name), so a dataset's split stays the same whatever else
    the model trains on."""
    distinct = list(dict.fromkeys(groups))
    count = min(len(distinct) - 1, max(1, int(round(fraction * len(distinct)))))
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode())])
    return {distinct[i] for i in rng.choice(len(distinct), size=count, replace=False)}


def _pixel_counts(images: list[SourceImage], level: int) -> np.ndarray:
    """Pixels of each image, read from metadata (level 0, scaled to `level` by the first
    image's ratio when per_megapixel needs absolute counts): unopened images stay so."""
    counts = np.array([np.prod(spatial_shape(img.image)) for img in images], float)
    if level:
        at_level = np.prod(open_image(images[0].image, level=level).spatial_shape)
        counts *= at_level / counts[0]
    return counts


def _image_splits(images: list[SourceImage], settings: dict[str, Any], held_out: bool
                  ) -> dict[str, np.ndarray]:
    """Per split, which images may give its patches."""
    mode = settings["validation"]
    everyone = np.ones(len(images), bool)
    if mode == "block":
        return {"train": everyone, "val": everyone}
    if mode == "image":
        return {"val" if held_out else "train": everyone}
    name = images[0].dataset
    held = held_out_groups(_groups(images, mode), settings["validation_fraction"],
                           settings["seed"], name)
    val = np.array([g in held for g in _groups(images, mode)])
    return {"train": ~val, "val": val}


def _allocate(images: list[SourceImage], pixels: np.ndarray, settings: dict[str, Any],
              fraction: float, held_out: bool, rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
    """Patches per image, per split: (n_images, 2) counts of foreground and uniform patches.

    The dataset's patch count is cut into splits as for one image, and each split's
    foreground and uniform patches are spread over the images that may give them by a
    seeded multinomial proportional to their pixel counts.
    """
    total = patch_count(settings, (int(pixels.sum()),), images[0].dataset)
    splits = _image_splits(images, settings, held_out)
    out = {}
    for split, quota in zip(splits, _split_quotas(settings, list(splits), total), strict=True):
        weights = np.where(splits[split], pixels, 0.0)
        n_fg = int(round(quota * fraction))
        out[split] = np.stack([rng.multinomial(n, weights / weights.sum())
                               for n in (n_fg, quota - n_fg)], axis=1)
    return out


@dataclass
class _Leftover:
    """Foreground patches of one split whose image had no foreground in its region; the
    regions of that split with foreground (sampler, region, index) that can take them; the
    images known to have none there."""

    count: int = 0
    places: list[tuple[Sampler, Region, ForegroundIndex]] = field(default_factory=list)
    empty: set[int] = field(default_factory=set)


def _split_regions_of(ctx: Sampler, spatial: tuple[int, ...], settings: dict[str, Any],
                      splits: list[str]) -> list[Region]:
    """The regions of one image for `splits`: a block split of the image under
    `validation: block`, else the whole image for its one split."""
    if settings["validation"] != "block":
        return [Region(split, (0,) * len(spatial), tuple(spatial)) for split in splits]
    try:
        regions = split_regions(spatial, ctx.patch, "block", settings["validation_fraction"],
                                False)
    except PatchError as err:
        raise PatchError(f"{ctx.where}: {err}") from None
    return [r for r in regions if r.split in splits]


def _sample_position(ctx: Sampler, spatial: tuple[int, ...], counts: dict[str, np.ndarray],
                     index: int, leftover: dict[str, _Leftover], rng: np.random.Generator
                     ) -> list[dict]:
    """Patches of one position; foreground patches its regions cannot hold are left over."""
    wanted = [split for split in counts if counts[split][index].sum()]
    regions = _split_regions_of(ctx, spatial, ctx.settings, wanted)
    quotas = [tuple(int(n) for n in counts[r.split][index]) for r in regions]
    foreground = (_region_foreground(ctx, regions, [fg for fg, _ in quotas], rng)
                  if any(fg for fg, _ in quotas) else [None] * len(regions))
    for i, (region, fg) in enumerate(zip(regions, foreground, strict=True)):
        left = leftover[region.split]
        if fg is None and quotas[i][0]:
            left.count += quotas[i][0]
            left.empty.add(index)
            quotas[i] = (0, quotas[i][1])
        elif fg is not None:
            left.places.append((ctx, region, fg))
    return _draw_regions(ctx, regions, quotas, foreground, rng)


def _find_foreground(images: list[SourceImage], eligible: np.ndarray, split: str,
                     left: _Leftover, open_sampler: Callable, rng: np.random.Generator) -> None:
    """When no position drawn for `split` has foreground: open the split's other positions
    in a seeded order until one has (its region is where the left-over patches go)."""
    for index in rng.permutation(np.flatnonzero(eligible)):
        if left.places:
            return
        if index in left.empty:
            continue
        ctx, spatial = open_sampler(images[index])
        region, = _split_regions_of(ctx, spatial, ctx.settings, [split])
        fg, = _region_foreground(ctx, [region], [left.count], rng)
        if fg is None:
            left.empty.add(int(index))
        else:
            left.places.append((ctx, region, fg))


def _draw_leftover(left: _Leftover, rng: np.random.Generator) -> list[dict]:
    """Foreground patches of positions without foreground, drawn instead from the places
    that have some, in proportion to their foreground."""
    weights = np.array([fg.counts.sum() for _, _, fg in left.places], float)
    records = []
    for (ctx, region, fg), n in zip(left.places,
                                    rng.multinomial(left.count, weights / weights.sum()),
                                    strict=True):
        records += _draw_regions(ctx, [region], [(int(n), 0)], [fg], rng)
    return records


def sample_position_patches(ds: DatasetInput, images: list[SourceImage], stats: dict,
                     sources: SourceSet, settings: dict[str, Any], ignore_label: int | None,
                     rng: np.random.Generator) -> list[dict]:
    """Records of a plate's or collection's patches, drawn across its positions.

    The dataset's patches (`patch_count` of all its pixels) go to positions by a seeded
    multinomial proportional to their pixel counts (`_allocate`), per split and kind; only
    positions that get patches are opened. `validation: block` splits each such position as
    one image; `position` / `well` hold whole positions / wells out (`held_out_groups`);
    `image` holds out the whole dataset when it is in validation_datasets. Foreground patches
    drawn for a position without foreground go to the split's positions that have some (if
    none of those drawn has any, others are opened in a seeded order until one has).
    """
    segmentation = sources.task == "segmentation"
    fraction = settings["foreground_fraction"] if segmentation else 0.0
    held_out = ds.name in settings.get("validation_datasets", [])
    pixels = _pixel_counts(images, stats["level"] if settings.get("per_megapixel") else 0)
    counts = _allocate(images, pixels, settings, fraction, held_out, rng)
    leftover = {split: _Leftover() for split in counts}

    def open_sampler(img: SourceImage) -> tuple[Sampler, tuple[int, ...]]:
        source = sources.open(img, ds.channels, stats)
        return (Sampler(ds.name, sources.labels(img), sources.patch, settings, ignore_label,
                        img), source.arrays[0].shape[1:])

    records = []
    for index, img in enumerate(images):
        if any(c[index].sum() for c in counts.values()):
            records += _sample_position(*open_sampler(img), counts, index, leftover, rng)
    eligible = _image_splits(images, settings, held_out)
    for split, left in leftover.items():
        if not left.count:
            continue
        _find_foreground(images, eligible[split], split, left, open_sampler, rng)
        if not left.places:
            raise PatchError(
                f"dataset '{ds.name}': no position's target has foreground in its {split} "
                f"region, so foreground-oversampled patches (patches.foreground_fraction="
                f"{settings['foreground_fraction']}) cannot be drawn; check the label images, "
                f"or set patches.foreground_fraction: 0")
        records += _draw_leftover(left, rng)
    return records


# --- writing -------------------------------------------------------------------------------
def _merged_spatial_chunks(array: zarr.Array, axes: list[str]) -> dict[str, tuple[int, ...]]:
    """Dask chunks along each spatial axis that merge neighbouring Zarr chunks, last axis
    first, until a dask chunk holds READ_CHUNK_BYTES: fewer, bigger tasks (patch tasks are
    grouped by these chunks) read the bench source 10-20% faster than chunk by chunk."""
    native = da.core.normalize_chunks(array.chunks, array.shape)
    nbytes = array.dtype.itemsize * int(np.prod(array.chunks))
    out = {}
    for axis in reversed(spatial_axes(axes)):
        sizes = native[axes.index(axis)]
        merge = min(len(sizes), max(1, -(-READ_CHUNK_BYTES // nbytes)))
        out[axis] = _chunks_at_least(sizes, merge * sizes[0])
        nbytes *= merge
    return out


def _open_source(path: str, level: int, channels: list | None,
                 spatial_chunks: dict[str, tuple[int, ...]] | None = None,
                 memo: BlockMemo | None = None
                 ) -> tuple[da.Array, dict[str, tuple[int, ...]]]:
    """The image (C, *spatial) read in merged chunks (`spatial_chunks`, by axis name, where
    they fit, or its own), and those chunks, so that its target is read in the same ones.
    Read from the chunk files directly where chunkfiles can (keeping blocks in `memo`),
    through Zarr otherwise."""
    chosen: dict[str, tuple[int, ...]] = {}

    def to_dask(array: zarr.Array, axes: list[str]) -> da.Array:
        merged = spatial_chunks or _merged_spatial_chunks(array, axes)
        chosen.update(merged)
        native = da.core.normalize_chunks(array.chunks, array.shape)
        chunks = tuple(merged[a] if sum(merged.get(a, ())) == sum(c) else c
                       for a, c in zip(axes, native, strict=True))
        data = direct_dask_array(array, chunks, memo)
        return checked_from_zarr(array, chunks=chunks) if data is None else data

    image = open_image(path, level=level, dask_array=to_dask)
    return channel_first(image, channels), chosen


def _open_pair(img: SourceImage, channels: list | None, task: str, level: int,
               memo: BlockMemo | None = None) -> tuple[da.Array, da.Array | None]:
    """Image and target, the target's decoded blocks kept in `memo` for the second pass over
    it (foreground indexing reads it, then patch writing); no target for an image that is
    its own (model.target n2v)."""
    image, spatial_chunks = _open_source(img.image, level, channels)
    if img.target is None:
        return image, None
    target, _ = _open_source(img.target, level, None, spatial_chunks, memo)
    if target.shape[1:] != image.shape[1:]:
        raise PatchError(f"{img.where}: image {img.image} has spatial shape "
                         f"{image.shape[1:]} but target {img.target} has {target.shape[1:]}; "
                         f"give the target of this image at the same resolution")
    if task == "segmentation":
        if not np.issubdtype(target.dtype, np.integer):
            raise PatchError(f"{img.where}: segmentation target {img.target} has dtype "
                             f"{target.dtype}; it must hold integer labels")
        target = target[0]
    return image, target


def _normalize_stack(stack: np.ndarray, stats: dict, normalize: dict) -> np.ndarray:
    """Patches (k, C, *patch) normalized with one call (normalize_array takes C first); a
    view, which encoding copies patch by patch anyway."""
    out = normalize_array(np.moveaxis(stack, 1, 0), stats, normalize["method"],
                          normalize["clip"])
    return np.moveaxis(out, 0, 1)


def _encode_block(items: np.ndarray, stacks: list[np.ndarray], *, indices: np.ndarray,
                  images: ShardedPatches, targets: ShardedPatches | None, stats: dict,
                  normalize: dict, task: str, num_classes: int,
                  ignore_label: int | None, where: str = "the target") -> list[tuple]:
    """Normalize one source chunk's patches and encode them as store chunks: per item its
    (store index, foreground fraction or "", image chunk, target chunk or None)."""
    image = _normalize_stack(stacks[0], stats, normalize)
    if targets is None:  # the image is its own target (n2v): nothing more to store
        return list(zip(indices[items].tolist(), [""] * len(items), images.encode(image),
                        [None] * len(items), strict=True))
    target = stacks[1]
    target = prepare_target(target, task, num_classes, ignore_label, where)
    if task == "segmentation":
        axes = tuple(range(1, target.ndim))
        fractions = _foreground(target, ignore_label).mean(axis=axes).tolist()
    else:
        target = _normalize_stack(target, stats, normalize)
        fractions = [""] * len(items)
    return list(zip(indices[items].tolist(), fractions, images.encode(image),
                    targets.encode(target), strict=True))


def _write_shard(cells: list[np.ndarray], shard: int, images: ShardedPatches,
                 targets: ShardedPatches | None) -> np.ndarray:
    """Write shard `shard` of both arrays from the encoded patches in `cells` (those of the
    chunk tasks that hold its patches); returns its (store index, foreground fraction)."""
    wanted = images.shard_range(shard)
    found = {}
    for cell in cells:
        for _item, (index, fraction, image, target) in cell.flat[0]:
            if index in wanted:
                found[index] = (fraction, image, target)
    if sorted(found) != list(wanted):
        raise AssertionError(f"shard {shard}: patches {sorted(set(wanted) - set(found))} "
                             f"were not encoded")
    images.write_shard(shard, [found[i][1] for i in wanted])
    if targets is not None:
        targets.write_shard(shard, [found[i][2] for i in wanted])
    return _cell([(i, found[i][0]) for i in wanted])


def _create_arrays(group: zarr.Group, split: str, n: int, channels: int,
                   target_lead: tuple[int, ...] | None, patch: tuple[int, ...],
                   target_dtype: str) -> tuple[ShardedPatches, ShardedPatches | None]:
    """Images and targets arrays of one split, sharded alike (shard k of both holds the same
    patches), the shard size set by the image patches; no targets array when `target_lead`
    is None (the images are their own targets)."""
    sub = group.require_group(split)
    per_shard = patches_per_shard((channels, *patch), "float32", n)
    images = create_patch_array(sub, "images", n, (channels, *patch), "float32", per_shard)
    if target_lead is None:
        return ShardedPatches(images), None
    targets = create_patch_array(sub, "targets", n, (*target_lead, *patch), target_dtype,
                                 per_shard)
    return ShardedPatches(images), ShardedPatches(targets)


def _source_id(record: dict) -> tuple[str, str]:
    return record["dataset"], record.get("position", "")


def _target_name(sid: tuple[str, str]) -> str:
    position = f", position {sid[1]}" if sid[1] else ""
    return f"the target of dataset '{sid[0]}'{position}"


def _assign_indices(records: list[dict], sources: dict[tuple[str, str], PatchSource]) -> None:
    """Number each split's patches by (image, chunk of origin): a chunk's patches are
    written with one call, and chunks are visited in storage order."""
    order = {sid: i for i, sid in enumerate(sources)}
    home: list[tuple[int, ...]] = [()] * len(records)
    by_source: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[_source_id(r)].append(i)
    for sid, source in sources.items():
        rows = by_source.get(sid, [])
        if rows:
            chunks = source.chunk_of(np.array([records[i]["origin"] for i in rows]))
            for i, chunk in zip(rows, chunks.tolist(), strict=True):
                home[i] = tuple(chunk)
    for split in ("train", "val"):
        rows = [i for i, r in enumerate(records) if r["split"] == split]
        rows.sort(key=lambda i: (order[_source_id(records[i])], home[i], records[i]["origin"]))
        for index, i in enumerate(rows):
            records[i]["index"] = index


def _write_split(records: list[dict], split: str,
                 sources: dict[tuple[str, str], PatchSource],
                 stats: dict[tuple[str, str], dict], group: zarr.Group, task: str,
                 normalize: dict, num_classes: int, ignore_label: int | None
                 ) -> da.Array | None:
    """Lazy writes of one split: chunk tasks normalize and encode the patches of each source
    chunk, shard tasks gather the encoded patches of their index range and write the shard
    files. One cell per shard: its (store index, foreground fraction)."""
    chosen = [r for r in records if r["split"] == split]
    if not chosen:
        return None
    first = sources[_source_id(chosen[0])]
    image0 = first.arrays[0]
    lead = None if len(first.arrays) == 1 else \
        () if task == "segmentation" else (first.arrays[1].shape[0],)
    images, targets = _create_arrays(group, split, len(chosen), image0.shape[0], lead,
                                     first.patch,
                                     "int32" if task == "segmentation" else "float32")
    chunk_tasks, spans = [], []  # spans: (task key, lowest and highest store index)
    by_source: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in chosen:
        by_source[_source_id(r)].append(r)
    for sid, source in sources.items():
        mine = by_source.get(sid)
        if not mine:
            continue
        origins = np.array([r["origin"] for r in mine])
        indices = np.array([r["index"] for r in mine])
        groups = _home_groups(source, origins)
        cells = patch_tasks(source, origins, _encode_block, groups=groups, indices=indices,
                            images=images, targets=targets, stats=stats[sid],
                            normalize=normalize, task=task, num_classes=num_classes,
                            ignore_label=ignore_label, where=_target_name(sid))
        chunk_tasks.append(cells)
        for t, (_, items) in enumerate(groups):
            spans.append(((cells.name, t), int(indices[items].min()),
                          int(indices[items].max())))
    name = f"patch-shards-{split}-{uuid.uuid4().hex}"
    layer = {}
    for shard in range(images.n_shards):
        wanted = images.shard_range(shard)
        keys = [key for key, low, high in spans if low < wanted.stop and high >= wanted.start]
        layer[(name, shard)] = (_write_shard, keys, shard, images, targets)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=chunk_tasks)
    return da.Array(graph, name, chunks=((1,) * len(layer),), dtype=object)


def _write_store(records: list[dict], sources: dict[tuple[str, str], PatchSource],
                 stats: dict[tuple[str, str], dict], group: zarr.Group, task: str,
                 normalize: dict, num_classes: int, ignore_label: int | None) -> None:
    """Write both splits in one parallel dask computation (source chunks shared by the
    splits are read once); fill in the foreground fractions."""
    _assign_indices(records, sources)
    pending = {split: _write_split(records, split, sources, stats, group, task, normalize,
                                   num_classes, ignore_label) for split in ("train", "val")}
    pending = {split: cells for split, cells in pending.items() if cells is not None}
    results = dask.compute(*pending.values())
    fractions = {split: dict(pair for cell in cells for pair in cell)
                 for split, cells in zip(pending, results, strict=True)}
    for record in records:
        record["foreground_fraction"] = fractions[record["split"]][record["index"]]


# --- manifest and summary ------------------------------------------------------------------
def write_manifest(records: list[dict], path: str | Path, patch: tuple[int, ...]) -> None:
    """One row per patch, ordered by split and store index; written atomically."""
    rows = sorted(records, key=lambda r: (r["split"] != "train", r["index"]))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, delimiter="\t")
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: r.get(k, "") for k in MANIFEST_FIELDS},
                             "origin": ",".join(map(str, r["origin"])),
                             "shape": ",".join(map(str, patch))})


def read_manifest(path: str | Path) -> list[dict]:
    """Manifest rows with origins and shapes as int tuples, foreground fractions as floats
    (None for regression); position and well are "" for single images (and in manifests
    written before plates)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        row.setdefault("position", "")
        row.setdefault("well", "")
        row["origin"] = tuple(int(v) for v in row["origin"].split(","))
        row["shape"] = tuple(int(v) for v in row["shape"].split(","))
        row["index"] = int(row["index"])
        fraction = row["foreground_fraction"]
        row["foreground_fraction"] = float(fraction) if fraction != "" else None
    return rows


def _listed(names: list[str], limit: int = 12) -> str:
    shown = names if len(names) <= limit else [*names[:limit - 2], "...", names[-1]]
    return ", ".join(shown)


def summarize_records(records: list[dict]) -> list[str]:
    """Log lines: patches per dataset, split and kind, with their mean foreground fraction."""
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["split"], r["kind"])].append(r.get("foreground_fraction"))
    lines = []
    for (dataset, split, kind), fractions in sorted(groups.items()):
        known = [f for f in fractions if isinstance(f, float)]
        mean = f", mean foreground {np.mean(known):.3f}" if known else ""
        lines.append(f"{dataset} {split} {kind}: {len(fractions)} patches{mean}")
    for dataset in dict.fromkeys(r["dataset"] for r in records if r.get("position")):
        mine = [r for r in records if r["dataset"] == dataset]
        used = {split: sorted({r["position"] for r in mine if r["split"] == split})
                for split in ("train", "val")}
        wells = sorted({r["well"] for r in mine if r["split"] == "val" and r.get("well")})
        lines.append(f"{dataset}: patches from {len(used['train'])} positions for training, "
                     f"{len(used['val'])} for validation"
                     + (f" (wells {_listed(wells)})" if wells else ""))
    splits = Counter(r["split"] for r in records)
    lines.append(f"total: {splits['train']} train, {splits['val']} val patches")
    return lines


# --- the stage -----------------------------------------------------------------------------
def _check_validation_datasets(datasets: list[DatasetInput], settings: dict[str, Any]) -> None:
    names = [d.name for d in datasets]
    held = settings.get("validation_datasets", [])
    unknown = [n for n in held if n not in names]
    if unknown:
        raise PatchError(f"patches.validation_datasets names {unknown}, which the model does "
                         f"not train on (its datasets: {names})")
    if settings["validation"] == "image" and not held:
        raise PatchError("patches.validation is 'image' but patches.validation_datasets is "
                         "empty; list the held-out datasets there")
    if settings["validation"] == "image" and set(held) >= set(names):
        raise PatchError(f"patches.validation_datasets holds out every dataset {names}; "
                         f"at least one must remain for training")


@dataclass
class SourceSet:
    """The images opened for extraction, by `SourceImage.id`, in the order they were opened
    (the store's order), with the statistics each is normalized with."""

    task: str
    patch: tuple[int, ...]
    sources: dict[tuple[str, str], PatchSource] = field(default_factory=dict)
    stats: dict[tuple[str, str], dict] = field(default_factory=dict)
    first: tuple[str, int] | None = None  # where the first image came from, its channels
    # one budget for all images: labels decoded by the foreground pass, kept for writing
    memo: BlockMemo | None = None
    # model.target boundaries: the boundary width (the labels become 3 classes), else None
    boundary_width: int | None = None
    ignore_label: int | None = None
    # the targets as stored, for the sampler: their foreground is the boundary classes'
    # (nonzero, not ignored), so the classes are computed only where patches are cut
    stored_targets: dict[tuple[str, str], da.Array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task == "segmentation":
            self.memo = BlockMemo(LABEL_MEMO_BYTES)

    def open(self, img: SourceImage, channels: list | None, stats: dict) -> PatchSource:
        """Open `img` (at its statistics' level); it must hold a patch and have the
        channels of the first image opened."""
        image, target = _open_pair(img, channels, self.task, stats["level"], self.memo)
        spatial = image.shape[1:]
        if len(self.patch) != len(spatial) or any(
                p > n for p, n in zip(self.patch, spatial, strict=True)):
            raise PatchError(f"{img.where}: patch shape {self.patch} does not fit the image "
                             f"of spatial shape {spatial}; use patches.shape no larger than "
                             f"the image, with one entry per spatial axis")
        if self.first is not None and image.shape[0] != self.first[1]:
            raise PatchError(f"{img.where} has {image.shape[0]} channel(s) but "
                             f"{self.first[0]} has {self.first[1]}; pooled datasets must "
                             f"have the same channels (select them with datasets.*.channels)")
        self.first = self.first or (img.where, image.shape[0])
        if target is None:  # n2v: the image alone
            self.sources[img.id] = patch_source([image], self.patch)
            self.stats[img.id] = position_stats(stats, img.position or None)
            return self.sources[img.id]
        source = patch_source([image, target], self.patch)
        self.stored_targets[img.id] = source.arrays[1]
        if self.boundary_width is not None:
            classes = boundary_classes_lazy(source.arrays[1], self.boundary_width,
                                            self.ignore_label, len(self.patch),
                                            f"{img.where}: target {img.target}")
            source = PatchSource((source.arrays[0], classes), source.patch)
        self.sources[img.id] = source
        self.stats[img.id] = position_stats(stats, img.position or None)
        return self.sources[img.id]

    def labels(self, img: SourceImage) -> PatchSource | None:
        """The target alone, for the sampler (None for regression, which draws uniformly)."""
        if self.task != "segmentation":
            return None
        return patch_source([self.stored_targets[img.id]], self.patch)


def _stats_for_store(stats: dict[str, dict], sources: SourceSet) -> dict[str, dict]:
    """The statistics the store's patches were normalized with, once per dataset: a
    dataset-level file as it is, per-position statistics only for the positions that gave
    patches (the store's attributes go into every checkpoint)."""
    out = {}
    for name, found in stats.items():
        if found.get("per_position"):
            used = [key for dataset, key in sources.sources if dataset == name]
            found = {**found, "positions": {key: found["positions"][key] for key in used}}
        out[name] = found
    return out


def _check_targets_given(datasets: list[DatasetInput]) -> None:
    """A single-image dataset needs its target unless the model learns from images alone
    (model.target n2v, which is not checked)."""
    for ds in datasets:
        if ds.image is not None and not ds.target:
            raise PatchError(f"dataset '{ds.name}': image {ds.image} has no target (give "
                             f"datasets.{ds.name}.target, or train a model.target n2v "
                             f"model, which learns from the images alone)")


def _sample_image(ds: DatasetInput, stats: dict, sources: SourceSet, settings: dict[str, Any],
                  ignore_label: int | None, rng: np.random.Generator) -> list[dict]:
    """Patches of a single-image dataset."""
    img = SourceImage(ds.name, ds.image, ds.target)
    source = sources.open(img, ds.channels, stats)
    ctx = Sampler(ds.name, sources.labels(img), sources.patch, settings, ignore_label, img)
    held_out = ds.name in settings.get("validation_datasets", [])
    return sample_patches(ctx, source.arrays[0].shape[1:], held_out, rng)


def extract_patches(datasets: list[DatasetInput], task: str, settings: dict[str, Any],
                    normalize: dict[str, Any], num_classes: int, ignore_label: int | None,
                    store: str | Path, manifest: str | Path,
                    target: dict[str, Any] | None = None) -> list[dict]:
    """Sample patches of all `datasets`, normalize them and write store and manifest.

    A single-image dataset is sampled as one image; a plate or collection across its
    positions (`sample_position_patches`), opening only the positions that get patches. The
    store is written under a temporary name (`files.atomic_path`) and renamed when complete,
    after the manifest. Returns the manifest records. `target`: the model's
    `segmentation_target` (with boundaries, the labels become 3 classes: `unetflow.targets`).
    """
    target = segmentation_target(target or {})
    boundaries = task == "segmentation" and target["target"] == "boundaries"
    self_supervised = task == "regression" and target["target"] == N2V
    if boundaries:
        num_classes = BOUNDARY_CLASSES
    if self_supervised:  # the images are their own targets: none is read or stored
        datasets = [replace(ds, target=None) for ds in datasets]
    else:
        _check_targets_given(datasets)
    _check_validation_datasets(datasets, settings)
    stats = {ds.name: read_stats(ds.stats) for ds in datasets}
    positions = {ds.name: _source_images(ds, self_supervised)
                 for ds in datasets if ds.positions}
    _check_validation_groups(datasets, positions, settings)
    sources = SourceSet(task, tuple(settings["shape"]),
                        boundary_width=target["boundary_width"] if boundaries else None,
                        ignore_label=ignore_label)
    rng = np.random.default_rng(settings["seed"])
    records = []
    for ds in datasets:
        if ds.positions:
            records += sample_position_patches(ds, positions[ds.name], stats[ds.name],
                                               sources, settings, ignore_label, rng)
        else:
            records += _sample_image(ds, stats[ds.name], sources, settings, ignore_label, rng)
    with atomic_path(store) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs["unetflow"] = {"task": task, "patch_shape": list(sources.patch),
                                   "target": target if task == "segmentation" or
                                   self_supervised else None,
                                   "normalize": normalize,
                                   "datasets": _stats_for_store(stats, sources)}
        _write_store(records, sources.sources, sources.stats, group, task, normalize,
                     num_classes, ignore_label)
        write_manifest(records, manifest, sources.patch)
    return records
