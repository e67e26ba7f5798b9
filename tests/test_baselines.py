"""The Otsu baseline out of core against the in-memory oracle (skimage's threshold_otsu and
metrics.otsu_instances) on real small images split into several blocks."""

import dask.array as da
import numpy as np
import pytest
import zarr
from skimage import data
from skimage.filters import threshold_otsu

from unetflow.baselines import otsu_objects, otsu_threshold
from unetflow.demo import synthesize_nuclei
from unetflow.metrics import otsu_instances


def nuclei(shape: tuple[int, ...]) -> np.ndarray:
    """A synthetic fluorescence recording (float32 photon counts, a few below zero)."""
    return synthesize_nuclei(shape, seed=1).noisy


def images() -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """Real small images of several dtypes, 2D and 3D, with blocks that do not divide them."""
    flat = nuclei((61, 75))
    stack = nuclei((33, 35, 37))
    return {
        "float32 2D": (flat, (16, 32)),
        "float64 2D": (flat.astype(np.float64) * 1e-3 + 7, (24, 16)),
        "float32 3D": (stack, (8, 16, 16)),
        "uint8 cell": (data.cell()[200:297, 100:181], (32, 32)),
        "uint8 coins": (data.coins()[::3, ::3], (40, 48)),
        "uint16 3D": ((stack * 100 + 500).clip(0).astype(np.uint16), (16, 16, 8)),
        "int16 negative": ((flat * 40 - 300).astype(np.int16), (32, 20)),
    }


def as_dask(image: np.ndarray) -> da.Array:
    """Stored in chunks smaller than the blocks, as the images the workflow reads are."""
    return da.from_array(image, chunks=8)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects, whatever their ids."""
    if not np.array_equal(a != 0, b != 0):
        return False
    pairs = np.unique(np.stack([a[a != 0], b[b != 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a != 0])) == len(np.unique(b[b != 0]))


def crosses_blocks(labels: np.ndarray, block: tuple[int, ...]) -> bool:
    """Whether some object lies on both sides of a block border."""
    for axis, edge in enumerate(block):
        for border in range(edge, labels.shape[axis], edge):
            before = labels.take(border - 1, axis)
            after = labels.take(border, axis)
            if ((before == after) & (before != 0)).any():
                return True
    return False


@pytest.mark.parametrize("name", list(images()))
def test_threshold_equals_skimage_on_the_whole_image(name):
    image, block = images()[name]
    assert otsu_threshold(as_dask(image), block) == threshold_otsu(image)


@pytest.mark.parametrize("name", ["float32 2D", "float32 3D", "uint8 cell", "int16 negative"])
def test_objects_equal_otsu_instances(name, tmp_path):
    image, block = images()[name]
    oracle = otsu_instances(image)
    assert oracle.max() > 3 and crosses_blocks(oracle, block)  # the test means something
    threshold = otsu_threshold(as_dask(image), block)
    labels = otsu_objects(as_dask(image), threshold, tmp_path / "scratch.zarr", block)
    assert labels.chunks[0][0] == block[0]
    assert same_partition(labels.compute(), oracle)


def test_zarr_image_with_two_workers(tmp_path):
    """A Zarr image read through dask by two workers: same threshold and objects."""
    image = (nuclei((70, 66)) * 100 + 1000).astype(np.uint16)
    stored = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=image.shape,
                             chunks=(16, 16), dtype=image.dtype)
    stored[:] = image
    channel = da.from_zarr(str(tmp_path / "image.zarr"))
    threshold = otsu_threshold(channel, (32, 32), workers=2)
    assert threshold == threshold_otsu(image)
    labels = otsu_objects(channel, threshold, tmp_path / "scratch.zarr", (32, 32), workers=2)
    assert same_partition(labels.compute(), otsu_instances(image))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_constant_image_has_no_threshold_and_no_objects(dtype, tmp_path):
    image = np.full((20, 30), 7, dtype)
    assert otsu_threshold(as_dask(image), (8, 8)) is None
    labels = otsu_objects(as_dask(image), None, tmp_path / "scratch.zarr", (8, 8))
    assert labels.dtype == np.uint32 and labels.shape == image.shape
    assert not labels.compute().any() and not otsu_instances(image).any()


def test_two_values_split_between_them():
    image = np.zeros((9, 11), np.float32)
    image[3:, 4:] = 1.0
    threshold = otsu_threshold(as_dask(image), (4, 4))
    assert threshold == threshold_otsu(image) and 0.0 <= threshold < 1.0


def test_non_finite_values_are_refused():
    image = nuclei((40, 40))
    image[35, 37] = np.nan  # in the last block
    with pytest.raises(ValueError, match="finite"):
        otsu_threshold(as_dask(image), (16, 16))
