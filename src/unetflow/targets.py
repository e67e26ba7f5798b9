"""What a segmentation network learns from a label image: its classes, or boundary-aware
classes that let prediction split touching objects.

With `model.target: classes` the label values are the classes (with two classes any
nonzero label is foreground), and objects are the connected components of the predicted
foreground: touching nuclei merge into one object. With `model.target: boundaries` an
instance label image becomes three classes, as in the DSB 2018 winners' foreground +
contour targets and the 3-class U-Net of Caicedo et al. 2019: 0 background, 1 interior,
2 boundary, where an object's pixel is boundary when a pixel within `boundary_width`
(city-block distance, along the model's axes) holds another label, the background or
`ignore_label`. Two touching objects then get a boundary band between them, the
network learns to see it, and prediction grows seeds from the confident interior by a
watershed (`unetflow.watershed`). Pixels beyond the image's edge do not count: an object
cut by the image border has no boundary there (its border is not known).

The classes are derived at patch extraction from the whole label image (each chunk read
with `boundary_width` pixels of its neighbours), so a patch's edge never invents a
boundary; the patch store keeps them.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

__all__ = [
    "BACKGROUND",
    "INTERIOR",
    "BOUNDARY",
    "BOUNDARY_CLASSES",
    "N2V",
    "TARGET_KEYS",
    "boundary_classes",
    "boundary_classes_lazy",
    "network_classes",
    "segmentation_target",
    "uses_boundaries",
    "uses_n2v",
]

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
BOUNDARY_CLASSES = 3
# model.target of a regression model that learns from its images alone (Noise2Void's blind
# spot, unetflow.n2v): no target is read, the patch store holds the images only
N2V = "n2v"
# the model-section keys that say what a segmentation network learns (not its layers)
TARGET_KEYS = ("target", "boundary_width")


def segmentation_target(model_settings: dict[str, Any]) -> dict[str, Any]:
    """The model section's target keys, with their defaults (older checkpoints and
    settings have none: they learnt classes)."""
    return {"target": model_settings.get("target", "classes"),
            "boundary_width": int(model_settings.get("boundary_width", 2))}


def uses_boundaries(model_settings: dict[str, Any] | None) -> bool:
    return bool(model_settings) and model_settings.get("target", "classes") == "boundaries"


def uses_n2v(model_settings: dict[str, Any] | None) -> bool:
    return bool(model_settings) and model_settings.get("target", "classes") == N2V


def network_classes(model_settings: dict[str, Any]) -> int:
    """Output channels of a segmentation network: 3 (background, interior, boundary) for
    the boundaries target, else model.num_classes."""
    return BOUNDARY_CLASSES if uses_boundaries(model_settings) else int(
        model_settings["num_classes"])


def _diamond(width: int, ndim: int, axes: int) -> np.ndarray:
    """City-block ball of radius `width` over the last `axes` of `ndim` axes (1 on the
    others: a 2D model's labels of a 3D image are split plane by plane)."""
    radius = [0] * (ndim - axes) + [width] * axes
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum(np.abs(g) for g in grid) <= width


def boundary_classes(labels: np.ndarray, width: int, ignore_label: int | None = None,
                     axes: int | None = None) -> np.ndarray:
    """Instance labels -> int32 classes 0 background, 1 interior, 2 boundary.

    A pixel of object `l` is boundary when any pixel within city-block distance `width`
    along the last `axes` axes (default all) holds a value other than `l`; pixels beyond
    the array's edge do not count. Background stays 0 and `ignore_label` pixels keep
    their value (the loss leaves them out). Negative labels other than ignore_label are
    refused.
    """
    from scipy import ndimage

    if width < 1:
        raise ValueError(f"model.boundary_width must be at least 1, got {width}")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"boundary targets need integer instance labels, got {labels.dtype}")
    axes = labels.ndim if axes is None else axes
    footprint = _diamond(width, labels.ndim, axes)
    # nearest: a pixel beyond the edge repeats one inside the ball, so the edge adds nothing
    low = ndimage.minimum_filter(labels, footprint=footprint, mode="nearest")
    high = ndimage.maximum_filter(labels, footprint=footprint, mode="nearest")
    ignored = np.zeros(labels.shape, bool) if ignore_label is None else labels == ignore_label
    objects = (labels != 0) & ~ignored
    bad = objects & (labels < 0)
    if bad.any():
        raise ValueError(f"instance labels hold negative values {np.unique(labels[bad])[:5]} "
                         f"other than ignore_label ({ignore_label}); labels must be >= 0")
    out = np.zeros(labels.shape, np.int32)
    out[objects] = INTERIOR
    out[objects & ((low != labels) | (high != labels))] = BOUNDARY
    if ignore_label is not None:
        out[ignored] = ignore_label
    return out


def boundary_classes_lazy(labels: da.Array, width: int, ignore_label: int | None,
                          axes: int, where: str = "the target") -> da.Array:
    """`boundary_classes` of a chunked label image, chunk by chunk, each read with `width`
    pixels of its neighbours along the last `axes` axes: the same classes as the whole
    image's, with memory of a few chunks. A bad label is a ValueError naming `where`."""
    def classes(block: np.ndarray) -> np.ndarray:
        try:
            return boundary_classes(block, width, ignore_label, axes)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    depth = {i: (width if i >= labels.ndim - axes else 0) for i in range(labels.ndim)}
    return labels.map_overlap(classes, depth=depth, boundary="none", dtype=np.int32)
