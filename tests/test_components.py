"""Out-of-core connected components against scipy's whole-image labelling."""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import ndimage

from unetflow.components import connected_components


def test_out_of_core_connected_components_match_whole_image_labelling(tmp_path):
    rng = np.random.default_rng(0)
    foreground = ndimage.gaussian_filter(rng.normal(size=(70, 90)), 2) > 0.05
    labels, count = connected_components(da.from_array(foreground, chunks=(16, 24)),
                                         tmp_path / "scratch.zarr")
    labels = labels.compute()
    want, want_count = ndimage.label(foreground)
    assert count == want_count
    assert ((labels > 0) == foreground).all()
    pairs = np.unique(np.stack([labels[foreground], want[foreground]]), axis=1)
    assert pairs.shape[1] == want_count  # one-to-one: same partition into objects
    movie = np.stack([foreground[:35], foreground[35:]])  # t, y, x: no objects across t
    labels, count = connected_components(da.from_array(movie, chunks=(1, 16, 24)),
                                         tmp_path / "movie.zarr", separate_axes=(0,))
    assert count == sum(ndimage.label(frame)[1] for frame in movie)


def test_volume_in_many_chunks_with_two_workers_leaves_no_face_files(tmp_path):
    """3D objects across chunk faces on every axis; the faces kept on disk are removed."""
    rng = np.random.default_rng(1)
    foreground = ndimage.gaussian_filter(rng.normal(size=(23, 30, 27)), 1.5) > 0.1
    labels, count = connected_components(da.from_array(foreground, chunks=(5, 8, 7)),
                                         tmp_path / "scratch.zarr", workers=2)
    labels = labels.compute()
    want, want_count = ndimage.label(foreground)
    assert count == want_count > 3
    pairs = np.unique(np.stack([labels[foreground], want[foreground]]), axis=1)
    assert pairs.shape[1] == want_count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch.zarr"]
