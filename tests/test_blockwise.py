"""Blocks cover an image exactly once, carry their halo, and stream in order."""

import dask.array as da
import numpy as np
import pytest

from unetflow.blockwise import block_shape, map_blocks_ordered, plan_blocks, read_region


@pytest.mark.parametrize("shape,block,halo", [((37, 50), (16, 16), 3),
                                              ((9, 20, 31), (4, 8, 16), (1, 2, 3)),
                                              ((5,), (5,), 0)])
def test_blocks_cover_each_pixel_once_with_their_halo(shape, block, halo):
    count = np.zeros(shape, int)
    halos = (halo,) * len(shape) if isinstance(halo, int) else halo
    for b in plan_blocks(shape, block, halo):
        count[b.core] += 1
        for c, e, h, s in zip(b.core, b.extended, halos, shape, strict=True):
            assert e.start == max(0, c.start - h) and e.stop == min(s, c.stop + h)
        assert tuple(i.stop - i.start for i in b.inner) == b.shape
    assert (count == 1).all()


def test_block_shape_is_whole_chunks_within_the_budget():
    assert block_shape((16384, 16384), (512, 512), 1 << 20) == (1024, 1024)
    assert block_shape((16384, 16384), (512, 512), 1000) == (512, 512)  # at least one chunk
    assert block_shape((300, 200), (256, 256), 1 << 20) == (300, 200)  # never beyond the image
    z, y, x = block_shape((256, 4096, 4096), (1, 256, 256), 1 << 20)
    assert z * y * x <= 1 << 20 and y % 256 == 0 and x % 256 == 0 and z > 1


@pytest.mark.parametrize("workers", [1, 3])
def test_map_blocks_ordered_reads_each_block_with_its_halo_in_order(workers):
    rng = np.random.default_rng(0)
    image = rng.random((2, 45, 61))
    array = da.from_array(image, chunks=(2, 16, 16))
    blocks = plan_blocks((45, 61), (16, 16), 2)
    seen = list(map_blocks_ordered(lambda b, d: (b, d["x"][(slice(None), *b.inner)].sum()),
                                   {"x": array}, blocks, workers))
    assert [b for b, _ in seen] == blocks
    for b, total in seen:
        assert total == pytest.approx(image[(slice(None), *b.core)].sum())
        assert read_region(array, b.extended).shape == (2, *(e.stop - e.start for e in b.extended))
