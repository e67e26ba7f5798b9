"""Augmentation of training batches, each sample on its own, from one seeded generator."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["augment_batch"]


def _augment_geometry(x: np.ndarray, y: np.ndarray, settings: dict[str, Any],
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


def augment_batch(x: np.ndarray, y: np.ndarray, settings: dict[str, Any],
                  rng: np.random.Generator, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Augment each sample of a batch on its own.

    Flips along every spatial axis and 90-degree rotations in the image plane (the last two
    axes; 180 degrees only when that plane is not square) move image and target alike.
    Intensity scale/shift and Gaussian noise change the image. A segmentation target holds
    labels, which no intensity change may touch. A regression target gets the same
    scale/shift as its image when `intensity_target` is on (the default): in denoising the
    target is the same signal in the same normalized units, and a gain the network cannot
    see in its input would otherwise be unlearnable noise on the target. Turn it off when
    the target is another modality whose intensities do not follow the input's.
    """
    x, y = np.array(x, dtype=np.float32), np.array(y)
    spatial_dims = x.ndim - 2
    for i in range(len(x)):
        x[i], y[i] = _augment_geometry(x[i], y[i], settings, rng, spatial_dims)
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
