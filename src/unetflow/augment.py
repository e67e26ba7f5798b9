"""Augmentation of training batches, each sample on its own, from one seeded generator.

Geometry (flips, 90-degree rotations, rotation by any angle, scaling, elastic deformation)
moves image and target alike; gamma, blur, simulated low resolution, intensity scale/shift
and noise change the image (intensity scale/shift also a regression target, see
`augment_batch`). The settings are the validated `train.augment` section
(workflow/schemas/config.schema.yaml); every draw comes from the `rng` passed in, which the
trainer keys by (seed, step), so a resumed run replays the same augmentations. An
augmentation with probability 0 draws nothing: with the new ones off, the generator's
sequence, and so every batch, is what it was before they existed.

The rotation, scaling and elastic deformation of a sample make ONE sampling grid (output
pixel -> input coordinates), and image and target are resampled at the same coordinates:
the image and a regression target linearly (order 1: nnU-Net uses cubic splines for images,
linear is faster and blurs a 1-2 px feature only slightly), a segmentation target by
nearest neighbour (order 0), so labels are only ever ids of the input and ignore_label pixels
stay ignore_label. Outside the patch both are mirrored (mode "mirror"), so no empty region
appears and image and target agree there too. An identity transform is not resampled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["GEOMETRIC", "IMAGE_ONLY", "RICH_AUGMENT", "augment_batch"]

GEOMETRIC = ("rotate", "scale", "elastic")
IMAGE_ONLY = ("blur", "low_resolution", "gamma")
# nnU-Net's probabilities (Isensee et al. 2021, batchgenerators' defaults) with the schema's
# default ranges: the suggested set for small training sets (README, "Augmentation").
RICH_AUGMENT: dict[str, dict[str, Any]] = {
    "rotate": {"p": 0.2, "degrees": 180.0, "degrees_3d_tilt": 15.0},
    "scale": {"p": 0.2, "range": [0.85, 1.25]},
    "elastic": {"p": 0.2, "magnitude": [0.0, 8.0], "sigma": [9.0, 13.0]},
    "gamma": {"p": 0.3, "range": [0.7, 1.5]},
    "blur": {"p": 0.2, "sigma": [0.5, 1.0]},
    "low_resolution": {"p": 0.25, "zoom": [0.5, 1.0]},
}


def _chosen(settings: dict[str, Any], name: str, rng: np.random.Generator
            ) -> dict[str, Any] | None:
    """The block of augmentation `name` when it applies to this sample; no draw when off."""
    block = settings.get(name)
    if not block or block["p"] <= 0:
        return None
    return block if rng.random() < block["p"] else None


# --- flips and 90-degree rotations (exact, no resampling) --------------------------------
def _flip_rotate90(x: np.ndarray, y: np.ndarray, settings: dict[str, Any],
                   rng: np.random.Generator, spatial_dims: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One sample: x is (C, *spatial), y is (*spatial) or (C, *spatial); axes from the end."""
    if settings.get("flips"):
        for axis in range(-spatial_dims, 0):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
    if settings.get("rotate90"):
        square = x.shape[-1] == x.shape[-2]
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        x, y = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    return x, y


# --- rotation, scaling, elastic deformation: one sampling grid ---------------------------
def _plane_rotation(dims: int, axes: tuple[int, int], degrees: float) -> np.ndarray:
    """The rotation by `degrees` in the plane of two axes, as a (dims, dims) matrix."""
    matrix, (i, j) = np.eye(dims), axes
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = cos, -sin, sin, cos
    return matrix


def _rotation(dims: int, block: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Any angle in [-degrees, degrees] in the image plane (the last two axes); a 3D patch is
    also tilted in the (z, y) and (z, x) planes by at most degrees_3d_tilt (nnU-Net: 15)."""
    matrix = _plane_rotation(dims, (dims - 2, dims - 1),
                             rng.uniform(-block["degrees"], block["degrees"]))
    if dims == 3:
        tilt = min(block["degrees_3d_tilt"], block["degrees"])
        for plane in ((0, 1), (0, 2)):
            matrix = matrix @ _plane_rotation(3, plane, rng.uniform(-tilt, tilt))
    return matrix


def _resize_linear(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C, *spatial) resized to (C, *shape) by linear interpolation, corners aligned (as
    ndimage.zoom with order 1), one axis at a time: two reads along the axis and their
    weighted sum. Several times cheaper than ndimage.zoom, and no BLAS call, whose threads
    stall on small matrices when the cores are busy."""
    for axis, n_out in enumerate(shape, start=1):
        n_in = array.shape[axis]
        if n_in == n_out:
            continue
        at = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        low = np.minimum(np.floor(at).astype(np.intp), n_in - 1)
        weight = (at - low).astype(np.float32).reshape((-1,) + (1,) * (array.ndim - axis - 1))
        below = np.take(array, low, axis=axis)
        above = np.take(array, np.minimum(low + 1, n_in - 1), axis=axis)
        array = below + (above - below) * weight
    return array.astype(np.float32, copy=False)


def _elastic_displacement(shape: tuple[int, ...], block: dict[str, Any],
                          rng: np.random.Generator) -> np.ndarray:
    """(dims, *shape) displacements in pixels: uniform noise smoothed by a Gaussian of `sigma`
    px, scaled so that its largest component is `magnitude` px.

    The noise is drawn and smoothed on a grid about `sigma / 4` px apart, which spans the
    patch corner to corner, and interpolated linearly: the field has no detail finer than
    sigma, and the smoothing costs (4 / sigma)^dims of the same at full resolution.
    """
    magnitude, sigma = rng.uniform(*block["magnitude"]), rng.uniform(*block["sigma"])
    step = max(1.0, sigma / 4)
    coarse = tuple(math.ceil((n - 1) / step) + 1 for n in shape)
    noise = rng.uniform(-1, 1, size=(len(shape), *coarse)).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, (0, *[sigma / step] * len(shape)), mode="mirror")
    field = _resize_linear(smooth, shape)
    largest = float(np.abs(field).max())
    return field * np.float32(magnitude / largest) if largest > 0 else field * 0


def _sampling_grid(shape: tuple[int, ...], settings: dict[str, Any],
                   rng: np.random.Generator) -> np.ndarray | None:
    """Input coordinates (dims, *shape) of each output pixel, or None for the identity.

    Rotation and scaling turn about the patch centre: an output pixel at offset v from it
    reads the input at R v / s (plus the elastic displacement), so a factor s > 1 makes
    objects s times larger.
    """
    dims = len(shape)
    matrix, field = np.eye(dims), None
    if block := _chosen(settings, "rotate", rng):
        matrix = _rotation(dims, block, rng)
    if block := _chosen(settings, "scale", rng):
        matrix = matrix / rng.uniform(*block["range"])
    if block := _chosen(settings, "elastic", rng):
        field = _elastic_displacement(shape, block, rng)
    if np.array_equal(matrix, np.eye(dims)) and (field is None or not field.any()):
        return None
    return _grid(shape, matrix, field)


def _grid(shape: tuple[int, ...], matrix: np.ndarray, field: np.ndarray | None
          ) -> np.ndarray:
    """Input coordinates matrix @ v + centre (+ field) of the output offsets v from the
    patch centre, float32 (dims, *shape). Written out as sums, not a matrix product: BLAS
    threads stall on such small products when the cores are busy."""
    dims = len(shape)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    offsets = np.indices(shape, dtype=np.float32) - centre.reshape(dims, *[1] * dims)
    grid = np.stack([sum(np.float32(matrix[i, j]) * offsets[j] for j in range(dims)) + centre[i]
                     for i in range(dims)])
    return grid if field is None else grid + field


def _resample(array: np.ndarray, grid: np.ndarray, order: int) -> np.ndarray:
    """`array` ((*spatial) or (C, *spatial)) read at `grid`, mirrored outside."""
    if array.ndim == len(grid):
        return ndimage.map_coordinates(array, grid, order=order, mode="mirror")
    return np.stack([ndimage.map_coordinates(a, grid, order=order, mode="mirror")
                     for a in array])


# --- image only ----------------------------------------------------------------------------
def _gamma(x: np.ndarray, block: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """x ** gamma on each channel rescaled to [0, 1] over its own min and max, mapped back.
    As nnU-Net: gamma below 1 and above 1 equally often (when the range holds both)."""
    low, high = block["range"]
    if low < 1 < high and rng.random() < 0.5:
        gamma = rng.uniform(low, 1)
    else:
        gamma = rng.uniform(max(low, 1) if high > 1 else low, high)
    axes = tuple(range(1, x.ndim))
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1).astype(np.float32)
    unit = np.clip((x - lo) / span, 0, 1)
    return np.where(hi > lo, unit ** np.float32(gamma) * span + lo, x).astype(np.float32)


def _blur(x: np.ndarray, block: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of sigma (px) drawn from the range, the same along every spatial axis."""
    sigma = rng.uniform(*block["sigma"])
    return ndimage.gaussian_filter(x, (0, *[sigma] * (x.ndim - 1)), mode="mirror")


def _low_resolution(x: np.ndarray, block: dict[str, Any], rng: np.random.Generator
                    ) -> np.ndarray:
    """Downsampled by `zoom` (nearest neighbour) and upsampled back (linear), as nnU-Net's
    SimulateLowResolution: the detail of a coarser camera or objective."""
    zoom = rng.uniform(*block["zoom"])
    spatial = x.shape[1:]
    small = x
    for axis, n in enumerate(spatial, start=1):
        size = max(1, round(n * zoom))
        picks = np.round(np.arange(size) * ((n - 1) / (size - 1) if size > 1 else 0.0))
        small = np.take(small, picks.astype(np.intp), axis=axis)
    return _resize_linear(small, spatial)


_IMAGE_ONLY = {"blur": _blur, "low_resolution": _low_resolution, "gamma": _gamma}


def _augment_sample(x: np.ndarray, y: np.ndarray, settings: dict[str, Any],
                    rng: np.random.Generator, task: str) -> tuple[np.ndarray, np.ndarray]:
    """One sample, after its flips and rot90: the resampling geometry, then the image-only
    changes (in nnU-Net's order: blur, low resolution, gamma)."""
    grid = _sampling_grid(x.shape[1:], settings, rng)
    if grid is not None:
        x = _resample(x, grid, order=1)
        y = _resample(y, grid, order=0 if task == "segmentation" else 1)
    for name in IMAGE_ONLY:
        if block := _chosen(settings, name, rng):
            x = _IMAGE_ONLY[name](x, block, rng)
    return x, y


def augment_batch(x: np.ndarray, y: np.ndarray, settings: dict[str, Any],
                  rng: np.random.Generator, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Augment each sample of a batch on its own.

    Flips along every spatial axis and 90-degree rotations in the image plane (the last two
    axes; 180 degrees only when that plane is not square) move image and target alike, and
    so do rotation by any angle, scaling and elastic deformation (module docstring). Gamma,
    blur and simulated low resolution change the image only. Intensity scale/shift and
    Gaussian noise change the image. A segmentation target holds labels, which no intensity
    change may touch. A regression target gets the same scale/shift as its image when
    `intensity_target` is on (the default): in denoising the target is the same signal in
    the same normalized units, and a gain the network cannot see in its input would
    otherwise be unlearnable noise on the target. Turn it off when the target is another
    modality whose intensities do not follow the input's.
    """
    x, y = np.array(x, dtype=np.float32), np.array(y)
    spatial_dims = x.ndim - 2
    for i in range(len(x)):
        x[i], y[i] = _flip_rotate90(x[i], y[i], settings, rng, spatial_dims)
        x[i], y[i] = _augment_sample(x[i], y[i], settings, rng, task)
    amount = settings.get("intensity", 0.0)
    if amount:
        shape = (len(x),) + (1,) * (x.ndim - 1)
        scale = (1 + rng.uniform(-amount, amount, size=shape)).astype(np.float32)
        shift = rng.uniform(-amount, amount, size=shape).astype(np.float32)
        x = x * scale + shift
        if task == "regression" and settings.get("intensity_target", True):
            y = y.astype(np.float32) * scale + shift
    if settings.get("noise"):
        x = x + rng.normal(0, settings["noise"], size=x.shape).astype(np.float32)
    return x, y
