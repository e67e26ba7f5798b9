"""Tile plans on the 2**depth grid, reflection at the border, work units and shards."""

from __future__ import annotations

import numpy as np
import pytest

from unetflow.model.unet import UNet
from unetflow.tiling import plan_tiles, reflect_indices, shard_boxes, work_units


def tiny_model(dims: int = 2) -> UNet:
    """Depth 2 (tiles and halos on a grid of 4), exact halo 24 in 2D."""
    return UNet(dims, 1, 1, depth=2, base_features=4).eval()


def test_off_grid_halo_and_tiles_are_refused_naming_the_key():
    model = tiny_model()  # depth 2: grid of 4
    with pytest.raises(ValueError, match="predict.halo 10"):
        plan_tiles(["y", "x"], (64, 64), model, (32, 32), halo=10)
    with pytest.raises(ValueError, match="predict.tile_shape"):
        plan_tiles(["y", "x"], (64, 64), model, (30, 32))
    with pytest.raises(ValueError, match="needs 3 spatial axes"):
        plan_tiles(["y", "x"], (64, 64), tiny_model(3), (32, 32, 32))


def test_tiles_smaller_than_the_halo_are_enlarged_on_the_grid():
    model = tiny_model()  # halo 24
    with pytest.warns(UserWarning, match="smaller than the halo"):
        plan = plan_tiles(["y", "x"], (64, 64), model, (16, 32))
    assert plan.tile == (32, 32)


def test_reflect_indices_match_numpy_reflect_even_beyond_the_axis():
    x = np.arange(5)
    for pad in (3, 4, 13):
        want = np.pad(x, pad, mode="reflect")
        assert np.array_equal(x[reflect_indices(-pad, 5 + pad, 5)], want)
    assert np.array_equal(reflect_indices(-2, 3, 1), np.zeros(5))


def test_shards_partition_the_tiles_into_chunk_aligned_boxes():
    plan = plan_tiles(["t", "z", "y", "x"], (2, 3, 75, 101), tiny_model(), (32, 32))
    for shards in (1, 3, 7, 100):
        covered = np.zeros(plan.grid, dtype=int)
        for index in range(shards):
            for box in shard_boxes(plan, shards, index):
                covered[tuple(slice(a, b) for a, b in box)] += 1
        assert (covered == 1).all()
    counts = [plan.tile_count(shard_boxes(plan, 3, i)) for i in range(3)]
    assert max(counts) - min(counts) <= plan.tile_count(work_units(plan, 1)[:1]) * 3
    assert sum(counts) == plan.tile_count()
