"""Seeded watershed: ideal maps give the objects; out of core against the whole image."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from unetflow import notices
from unetflow.watershed import seeded_watershed, seeded_watershed_chunked


def ideal_maps(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """(3, *shape) probabilities that are exactly the boundary target of `labels`: interior
    = object pixels farther than `width` (city-block) from any pixel not of their object,
    boundary = the other object pixels, background = the rest."""
    interior = np.zeros(labels.shape, dtype=bool)
    for label in np.unique(labels[labels > 0]):
        own = labels == label
        interior |= own & (ndimage.distance_transform_cdt(own, metric="taxicab") > width)
    boundary = (labels > 0) & ~interior
    return np.stack([labels == 0, interior, boundary]).astype(np.float32)


def balls(shape: tuple[int, ...], centres: list[tuple[float, ...]],
          radii: list[float]) -> np.ndarray:
    """Labels 1, 2, ... of balls (discs in 2D); a later ball overwrites an earlier one."""
    grid = np.indices(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    for label, (centre, radius) in enumerate(zip(centres, radii, strict=True), start=1):
        offset = grid - np.reshape(centre, (-1,) + (1,) * len(shape))
        labels[(offset**2).sum(axis=0) <= radius**2] = label
    return labels


def touching_pairs(rng: np.random.Generator, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """A pair of touching balls of random radii and direction in each `cell`-sized cell, so
    every clump of touching objects stays inside its cell."""
    centres, radii = [], []
    for corner in np.ndindex(*[s // cell for s in shape]):
        r = rng.uniform(cell / 5, cell / 4.2, size=2)  # a pair spans 2 * r.sum() < cell
        direction = rng.normal(size=len(shape))
        step = direction / np.linalg.norm(direction) * (r.sum() - 0.5) / 2
        middle = (np.array(corner) + 0.5) * cell
        centres += [tuple(middle - step), tuple(middle + step)]
        radii += list(r)
    return balls(shape, centres, radii)


def noisy_maps(rng: np.random.Generator, labels: np.ndarray, quantize: bool,
               width: int = 2) -> np.ndarray:
    """Ideal maps blurred by noise: seeds miss interior pixels and appear in the boundary,
    elevations vary (or, quantized, tie on plateaus: skimage then breaks ties by queue order).
    Channel 0 is not a true complement: the watershed reads channels 1 and 2 only."""
    ideal = ideal_maps(labels, width)
    objects = labels > 0
    interior = ideal[1] * 0.4 + rng.uniform(0, 0.6, labels.shape) * objects
    boundary = ideal[2] * 0.6 + rng.uniform(0, 0.3, labels.shape) * objects
    if quantize:
        interior, boundary = np.round(interior * 4) / 4, np.round(boundary * 4) / 4
    return np.stack([1 - interior - boundary, interior, boundary]).astype(np.float32)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same pixels in objects, grouped the same way (ids may differ)."""
    if ((a > 0) != (b > 0)).any():
        return False
    objects = a > 0
    pairs = np.unique(np.stack([a[objects], b[objects]]), axis=1)
    return pairs.shape[1] == np.unique(a[objects]).size == np.unique(b[objects]).size


def clump_span(probabilities: np.ndarray) -> int:
    """The largest extent, along any axis, of a clump of touching objects."""
    clumps, _ = ndimage.label(probabilities[1] + probabilities[2] > 0.5)
    return max(s.stop - s.start for box in ndimage.find_objects(clumps) for s in box)


def chunked(probabilities: np.ndarray, chunks: tuple[int, ...], tmp_path, settings: dict,
            separate_axes: tuple[int, ...] = ()) -> tuple[np.ndarray, int]:
    labels, count = seeded_watershed_chunked(
        da.from_array(probabilities, chunks=(3, *chunks)), tmp_path / "watershed", 2,
        settings, separate_axes)
    return labels.compute(), count


def test_two_touching_discs_with_ideal_maps_are_two_objects(tmp_path):
    """The seeds are the discs' interiors; the boundary is a plateau, over which the flood
    reaches each pixel from the seed nearest to it (city-block, through the foreground), so
    a boundary pixel nearer its own disc's seed goes to its own disc; equally near pixels
    could go either way, and these discs have none: the objects are the discs."""
    discs = balls((40, 48), [(20, 15), (20, 32)], [9, 8])
    assert (ndimage.binary_dilation(discs == 1) & (discs == 2)).any()  # they touch
    maps = ideal_maps(discs)
    assert ndimage.label(maps[1] > 0.5)[1] == 2  # two seeds, apart
    labels = seeded_watershed(maps, {})
    assert labels.dtype == np.uint32
    assert same_partition(labels, discs)
    tiled, count = chunked(maps, (12, 16), tmp_path, {"halo": 24})  # chunks cut the contact
    assert count == 2 and same_partition(tiled, discs)


@pytest.mark.parametrize("ndim", [2, 3])
def test_tiled_growth_equals_whole_image_growth(tmp_path, ndim):
    """Random touching pairs, noisy and tied maps, chunks far smaller than the image: every
    clump spans less than the halo, so the chunked result is the whole-image one."""
    rng = np.random.default_rng(ndim)
    shape, cell, chunk, width = ((72, 72), 24, 18, 2) if ndim == 2 else ((24,) * 3, 12, 8, 1)
    settings = {"min_seed_size": 3, "min_size": 6, "halo": cell}
    for quantize in (False, True) if ndim == 2 else (True,):  # 3D: 27 chunks, tied maps
        maps = noisy_maps(rng, touching_pairs(rng, shape, cell), quantize, width)
        assert clump_span(maps) < settings["halo"]
        whole = seeded_watershed(maps, settings)
        tiled, count = chunked(maps, (chunk,) * ndim, tmp_path / str(quantize), settings)
        pairs = np.prod(np.array(shape) // cell)
        assert count == np.unique(whole[whole > 0]).size > pairs  # clumps were split
        assert same_partition(tiled, whole)
    assert notices.recorded() == []  # no clump reached beyond the halo


def test_time_points_are_grown_apart(tmp_path):
    """(t, y, x): the same objects as the whole-movie watershed and as each frame's own;
    nothing joins or grows across time points, even where frames overlap exactly."""
    rng = np.random.default_rng(3)
    frame = touching_pairs(rng, (48, 48), 16)
    movie = np.stack([noisy_maps(rng, f, q) for f, q in
                      ((frame, False), (frame, True), (np.roll(frame, 5, 1), True))], axis=1)
    settings = {"min_seed_size": 3, "min_size": 6, "halo": 16}
    whole = seeded_watershed(movie, settings, separate_axes=(0,))
    tiled, count = chunked(movie, (1, 16, 16), tmp_path, settings, separate_axes=(0,))
    assert same_partition(tiled, whole)
    frames = [seeded_watershed(movie[:, t], settings) for t in range(3)]
    assert count == sum(np.unique(f[f > 0]).size for f in frames)
    for t, own in enumerate(frames):
        assert same_partition(whole[t], own)
        assert not set(np.unique(whole[t])[1:]) & set(np.unique(whole[t - 1])[1:])


def test_small_seeds_and_small_objects_are_dropped(tmp_path):
    """A seed below min_seed_size grows nothing (its foreground stays background, like any
    foreground no seed reaches); an object below min_size after growing becomes background."""
    objects = balls((32, 48), [(8, 8), (16, 30), (26, 10)], [6, 10, 3.2])
    maps = ideal_maps(objects, width=1)
    maps[1][objects == 1] = 0  # object 1: all boundary except a 3-pixel seed
    maps[2][objects == 1] = 1
    maps[1][8, 7:10], maps[2][8, 7:10] = 1, 0
    assert [(maps[1][objects == k] > 0.5).sum() for k in (1, 3)] == [3, 21]
    assert (objects == 3).sum() == 37
    settings = {"min_seed_size": 4, "min_size": 38}
    for labels, count in ((seeded_watershed(maps, settings), None),
                          chunked(maps, (16, 16), tmp_path, {**settings, "halo": 24})):
        assert same_partition(labels, np.where(objects == 2, 2, 0))
        assert count in (None, 1)
    labels = seeded_watershed(maps, {"min_seed_size": 3, "min_size": 37})
    assert same_partition(labels, objects)


def test_one_chunk_gives_the_in_memory_ids(tmp_path):
    rng = np.random.default_rng(5)
    maps = noisy_maps(rng, touching_pairs(rng, (48, 64), 16), quantize=True)
    settings = {"min_seed_size": 3, "min_size": 6}
    labels, count = chunked(maps, (48, 64), tmp_path, settings)
    whole = seeded_watershed(maps, settings)
    assert np.array_equal(labels, whole) and labels.dtype == whole.dtype
    assert count == np.unique(whole[whole > 0]).size
    assert not (tmp_path / "watershed").exists()  # no scratch store for one chunk


def test_a_clump_wider_than_the_halo_is_said(tmp_path):
    discs = balls((32, 64), [(16, 18), (16, 44)], [14, 13])
    labels, _ = chunked(ideal_maps(discs), (16, 16), tmp_path, {"halo": 8})
    assert any("predict.watershed.halo (8 px)" in said for said in notices.recorded())
    assert sorted(p.name for p in (tmp_path / "watershed").iterdir()) == ["grown.zarr"]


@pytest.mark.parametrize("shape", [(2, 16, 16), (4, 8, 8, 8), (16,)])
def test_probabilities_without_three_channels_are_refused(tmp_path, shape):
    with pytest.raises(ValueError, match=r"predict\.watershed needs 3 probability channels.*"
                                         r"model\.target"):
        seeded_watershed(np.zeros(shape, np.float32), {})
    with pytest.raises(ValueError, match=r"predict\.watershed needs 3"):
        seeded_watershed_chunked(da.zeros(shape, chunks=4), tmp_path, 1, {})
