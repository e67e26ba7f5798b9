"""How an image is cut into prediction tiles, work units and shards.

Geometry. The output is cut into tiles of `predict.tile_shape` along the axes the model sees
(y, x or z, y, x); a tile is also the chunk of the raw output store. Every tile is predicted
from its input extended by `predict.halo` on each side: neighbours' pixels inside the image,
reflection (numpy's "reflect", edge not repeated) outside it. A U-Net with pooling is
shift-equivariant only for shifts that are multiples of 2**depth, so tile origins and the halo
lie on that grid; with a halo of at least `exact_halo(model)` (the default), `crop` blending
(keep each tile's core, drop its halo) equals one whole-image pass over the reflect-padded
image. `gaussian` blending keeps each tile's whole window (tile + 2 halo), weights it with a
Gaussian importance map (sigma 1/8 of the window, as nnU-Net does) and divides the summed
weighted windows by the summed weights, so neighbouring windows fade into each other.

Other axes. Axes the model does not see (t, and z for a 2D model) are predicted one index at a
time (tile size 1): a 2D model runs per z-slice and per time point.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from unetflow.ome import spatial_axes

if TYPE_CHECKING:  # torch is imported only where a network is planned for, so that
    # planning's checks (unetflow.checks) can size tiles with these very functions
    from unetflow.model.unet import UNet

__all__ = [
    "BLENDINGS",
    "UNIT_MEGAPIXELS",
    "Box",
    "NetworkGeometry",
    "TilePlan",
    "check_halo",
    "clamp_tiles",
    "enlarged_tiles",
    "halo_limit",
    "network_geometry",
    "plan_tiles",
    "read_box",
    "reflect_indices",
    "shard_boxes",
    "work_units",
]

BLENDINGS = ("crop", "gaussian")
# pixels per work unit: bounds memory (a unit and its look-ahead are in flight) and graph size
UNIT_MEGAPIXELS = 4.0

Box = tuple[tuple[int, int], ...]  # per plan axis: first tile, stop tile


# --- tile geometry ------------------------------------------------------------------------
@dataclass(frozen=True)
class TilePlan:
    """How one image is cut into tiles: the geometry that every shard and the gather share.

    Attributes:
        axes: the image's non-channel axes in storage order, e.g. ("t", "z", "y", "x").
        shape: their sizes.
        tile: the tile (= raw chunk) size per axis; 1 on the axes the model does not see.
        halo: input pixels added on each side of a tile along the model's axes.
        model_dims: 2 or 3; the model sees the last `model_dims` axes.
        blending: "crop" or "gaussian".
        channels_out: the model's output channels (classes for segmentation).
    """

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    tile: tuple[int, ...]
    halo: int
    model_dims: int
    blending: str
    channels_out: int

    @property
    def model_axes(self) -> tuple[int, ...]:
        """Indices (into `axes`) of the axes the model sees."""
        return tuple(range(len(self.axes) - self.model_dims, len(self.axes)))

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of tiles along each axis."""
        return tuple(math.ceil(s / t) for s, t in zip(self.shape, self.tile, strict=True))

    @property
    def window(self) -> tuple[int, ...]:
        """A full tile's input (and Gaussian window) size: tile + 2 halo on the model's axes."""
        return tuple(t + 2 * self.halo if a in self.model_axes else t
                     for a, t in enumerate(self.tile))

    def core_sizes(self, axis: int, first: int, stop: int) -> tuple[int, ...]:
        """Output sizes of tiles first..stop-1 along `axis` (the last one may be shorter)."""
        t, n = self.tile[axis], self.shape[axis]
        return tuple(min(t, n - i * t) for i in range(first, stop))

    def box_slices(self, box: Box) -> tuple[slice, ...]:
        """Pixel slices (per plan axis) covered by a box of tiles."""
        return tuple(slice(a * t, min(b * t, n))
                     for (a, b), t, n in zip(box, self.tile, self.shape, strict=True))

    def tile_count(self, boxes: list[Box] | None = None) -> int:
        """Tiles in `boxes` (all tiles when None)."""
        if boxes is None:
            return math.prod(self.grid)
        return sum(math.prod(b - a for a, b in box) for box in boxes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilePlan:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def fingerprint(self) -> str:
        """Identifies the geometry, so a shard never joins a store planned differently."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _check_tile_shape(tile_shape: tuple[int, ...], dims: int, multiple: int) -> None:
    if len(tile_shape) != dims:
        raise ValueError(f"predict.tile_shape {list(tile_shape)} has {len(tile_shape)} "
                         f"dimensions but the model is {dims}D")
    if any(t < 1 or t % multiple for t in tile_shape):
        raise ValueError(f"predict.tile_shape {list(tile_shape)} must hold multiples of "
                         f"2**depth = {multiple}: tile origins must lie on the pooling grid")


@dataclass(frozen=True)
class NetworkGeometry:
    """What tiling needs of a network: unetflow's U-Net (`network_geometry`) or a packaged
    model (unetflow.packaged.package_geometry).

    Attributes:
        spatial_dims: 2 or 3: the network sees the last `spatial_dims` axes.
        size_multiple: tile origins and the halo lie on this grid (2**depth, a package's
            size step).
        exact_halo: the smallest halo with which `crop` equals one whole-image pass; None
            when unknown (a package that declares no halo: Gaussian blending).
        out_channels: the network's output channels.
        per_tile_statistics: the network normalizes with each input's own statistics
            (group and instance norms), so tiles cannot equal a whole-image pass.
    """

    spatial_dims: int
    size_multiple: int
    exact_halo: int | None
    out_channels: int
    per_tile_statistics: str | None = None


def network_geometry(model: UNet | NetworkGeometry) -> NetworkGeometry:
    """The tiling geometry of a U-Net (its exact halo from the receptive field)."""
    if isinstance(model, NetworkGeometry):
        return model
    from unetflow.model.unet import exact_halo

    norm = model.config()["norm"]
    return NetworkGeometry(model.spatial_dims, model.size_multiple, exact_halo(model),
                           model.config()["out_channels"],
                           norm if norm in ("group", "instance") else None)


def _resolve_halo(geometry: NetworkGeometry, halo: int | None, blending: str) -> int:
    """The configured halo, checked against the pooling grid; warns when crop is not exact."""
    exact, multiple = geometry.exact_halo, geometry.size_multiple
    if halo is None and exact is None:
        raise ValueError("predict.halo is needed: the model declares no halo")
    halo = exact if halo is None else int(halo)
    if halo < 0 or halo % multiple:
        raise ValueError(f"predict.halo {halo} must be a non-negative multiple of 2**depth = "
                         f"{multiple} (the exact halo of this model is {exact})")
    if blending == "crop" and exact is not None and halo < exact:
        warnings.warn(f"predict.halo {halo} is smaller than this model's exact halo {exact}: "
                      f"crop blending will differ from a whole-image pass near tile borders "
                      f"(seams); leave predict.halo unset for {exact}", stacklevel=3)
    if geometry.per_tile_statistics:
        warnings.warn(f"model.norm is {geometry.per_tile_statistics!r}: its statistics are "
                      f"taken per tile, so tiled output is not equal to a whole-image pass",
                      stacklevel=3)
    return halo


def enlarged_tiles(tile_shape: tuple[int, ...], halo: int) -> tuple[int, ...]:
    """Tiles at least as large as the halo (whole multiples): dask overlap needs depth <=
    chunk."""
    return tuple(t * math.ceil(halo / t) if t < halo else t for t in tile_shape)


def _enlarge_small_tiles(tile_shape: tuple[int, ...], halo: int) -> tuple[int, ...]:
    """Tiles at least as large as the halo (`enlarged_tiles`), said when they change."""
    tiles = enlarged_tiles(tile_shape, halo)
    if tiles != tuple(tile_shape):
        warnings.warn(f"predict.tile_shape {list(tile_shape)} is smaller than the halo {halo} "
                      f"along some axis; using tiles {list(tiles)}", stacklevel=3)
    return tiles


def clamp_tiles(tile_shape: tuple[int, ...], shape: tuple[int, ...],
                multiple: int) -> tuple[int, ...]:
    """Tiles no larger than the image (its size rounded up to `multiple`) along each axis.

    A tile is the raw store's chunk: one of 65536^2 on a 256^2 image would be allocated
    whole (32 GiB). The image is then one tile along that axis, as it was before, so the
    output is the same (crop: one core; gaussian: one window per pixel, whose weights cancel).
    """
    return tuple(min(t, math.ceil(s / multiple) * multiple)
                 for t, s in zip(tile_shape, shape, strict=True))


def halo_limit(shape: tuple[int, ...], multiple: int) -> int:
    """The widest useful predict.halo for an image of `shape` (the model's axes): its largest
    extent rounded up to `multiple`."""
    return math.ceil(max(shape) / multiple) * multiple


def check_halo(halo: int, shape: tuple[int, ...], multiple: int) -> None:
    """Refuse a configured halo wider than the image along every model axis.

    Refused, not clamped: a halo that wide reads only reflected copies of the image (the
    context a tile can have is the image itself), yet each tile's window (tile + 2 halo)
    is read and run through the network whole, so its memory and time grow as halo**dims
    (1e9 would never finish). Clamping would change the output of a halo set on purpose;
    the model's exact halo (predict.halo unset) is never refused.
    """
    limit = halo_limit(shape, multiple)
    if halo > limit:
        raise ValueError(f"predict.halo {halo} is wider than the image (largest extent along "
                         f"the model's axes {max(shape)} px): beyond that the halo reads "
                         f"only reflected copies of the image, at the cost of a window of "
                         f"tile + 2 x halo per tile; use at most {limit}, or leave "
                         f"predict.halo unset for the model's exact halo")


def plan_tiles(axes: list[str], shape: tuple[int, ...], model: UNet | NetworkGeometry,
               tile_shape: tuple[int, ...], halo: int | None = None,
               blending: str = "crop") -> TilePlan:
    """The tile plan for an image with non-channel `axes` of `shape` and this model.

    `model` is a U-Net or the geometry of another network (a packaged model). Raises
    ValueError naming predict.tile_shape, predict.halo or predict.blending when the tiles or
    the halo are off the 2**depth grid, or the image lacks the model's axes.
    """
    model = network_geometry(model)
    dims = model.spatial_dims
    if blending not in BLENDINGS:
        raise ValueError(f"predict.blending {blending!r} is not one of {list(BLENDINGS)}")
    if spatial_axes(list(axes))[-dims:] != list(axes)[-dims:] or len(spatial_axes(axes)) < dims:
        raise ValueError(f"the image has axes {list(axes)} but the {dims}D model needs "
                         f"{dims} spatial axes last")
    _check_tile_shape(tuple(tile_shape), dims, model.size_multiple)
    extra = len(axes) - dims
    if halo is not None:
        check_halo(int(halo), tuple(shape)[extra:], model.size_multiple)
    halo = _resolve_halo(model, halo, blending)
    tile_shape = clamp_tiles(tuple(tile_shape), tuple(shape)[extra:], model.size_multiple)
    tiles = _enlarge_small_tiles(tile_shape, halo)
    return TilePlan(axes=tuple(axes), shape=tuple(int(s) for s in shape),
                    tile=(1,) * extra + tiles, halo=halo, model_dims=dims, blending=blending,
                    channels_out=model.out_channels)


# --- work units and shards ----------------------------------------------------------------
def work_units(plan: TilePlan, max_tiles: int | None = None) -> list[Box]:
    """Chunk-aligned boxes of whole tiles covering the image, in C order.

    A unit spans one tile along all but the last two axes, a band of rows along the
    second-to-last and a run of tiles along the last, with at most `max_tiles` tiles
    (default: about UNIT_MEGAPIXELS of output).
    """
    if max_tiles is None:
        max_tiles = max(1, int(UNIT_MEGAPIXELS * 1e6 // math.prod(plan.tile)))
    grid = plan.grid
    run = min(grid[-1], max_tiles)
    band = max(1, min(grid[-2], max_tiles // run))
    units = []
    for prefix in np.ndindex(*grid[:-2]):
        for row in range(0, grid[-2], band):
            for col in range(0, grid[-1], run):
                units.append(tuple((i, i + 1) for i in prefix)
                             + ((row, min(row + band, grid[-2])), (col, min(col + run, grid[-1]))))
    return units


def shard_boxes(plan: TilePlan, shards: int, index: int) -> list[Box]:
    """The units of shard `index` of `shards`: contiguous, about equal tile counts.

    Units are made small enough that every shard can get some; with more shards than tiles
    the surplus shards are empty.
    """
    if not 0 <= index < shards:
        raise ValueError(f"shard {index} does not exist; predict.shards is {shards}")
    total = plan.tile_count()
    default = max(1, int(UNIT_MEGAPIXELS * 1e6 // math.prod(plan.tile)))
    units = work_units(plan, min(default, max(1, total // shards)))
    mine, done = [], 0
    for box in units:
        if done * shards // total == index:
            mine.append(box)
        done += plan.tile_count([box])
    return mine


# --- reading a box with its halo ----------------------------------------------------------
def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices for positions start..stop-1 of an axis of `size`, mirrored at its ends.

    numpy's "reflect" (d c b | a b c d | c b a), repeated for halos longer than the axis.
    """
    positions = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)


def _take_reflected(x: da.Array, axis: int, start: int, stop: int) -> da.Array:
    """x[start:stop] along `axis`, mirrored where the range leaves the array."""
    size = x.shape[axis]
    inside = slice(max(start, 0), min(stop, size))
    pieces = []
    if start < 0:
        pieces.append(da.take(x, reflect_indices(start, 0, size), axis=axis))
    pieces.append(x[(slice(None),) * axis + (inside,)])
    if stop > size:
        pieces.append(da.take(x, reflect_indices(size, stop, size), axis=axis))
    return pieces[0] if len(pieces) == 1 else da.concatenate(pieces, axis=axis)


def read_box(source: da.Array, plan: TilePlan, box: Box) -> da.Array:
    """(C, *box + halo) chunked as [halo + tile, tile, ..., last tile + halo] on model axes.

    The first and last chunks carry the halo, so that after `da.overlap.overlap` every block
    is exactly one tile with its halo, whatever the size of the last tile.
    """
    x, chunks = source, [source.shape[0]]
    for axis, ((first, stop), sl) in enumerate(zip(box, plan.box_slices(box), strict=True)):
        cores = plan.core_sizes(axis, first, stop)
        if axis in plan.model_axes:
            h = plan.halo
            x = _take_reflected(x, axis + 1, sl.start - h, sl.stop + h)
            cores = tuple(c + h * ((i == 0) + (i == len(cores) - 1))
                          for i, c in enumerate(cores))
        else:
            x = x[(slice(None),) * (axis + 1) + (sl,)]
        chunks.append(cores)
    return x.rechunk(tuple(chunks))
