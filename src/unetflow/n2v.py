"""Noise2Void's blind spot (Krull et al. 2019): training a denoiser from noisy images alone.

A few pixels of each patch (default 0.2%, as in the paper and CAREamics) are masked: each is
replaced by a pixel drawn at random from a small window around it (never itself), and the
loss is computed on those pixels only, against their original values. The network cannot
copy a masked pixel's value from its input, so it learns to predict it from the
neighbourhood; with noise independent from pixel to pixel, the best such prediction is the
clean signal. structN2V (Broaddus et al. 2020) also hides a short line of neighbours along
one axis, for noise correlated along that axis (scan lines, camera stripes).

In the workflow a regression model with `model.target: n2v` trains this way
(`train.blind_spot` holds the settings): the patch store holds the images only, the loader
masks each batch with a generator drawn from (seed, step) so a resumed run replays the same
masks, and the target it hands the loss is the image at the masked pixels and NaN elsewhere,
so a batch stays a pair of tensors and the loss needs no third one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_WINDOW",
    "blind_spot",
    "mask_batch",
    "masked_count",
    "masked_loss",
    "masked_mse",
    "masked_psnr",
]

AXIS_OFFSET = {"x": -1, "y": -2, "z": -3}  # train.blind_spot.struct_axis from the end

DEFAULT_FRACTION = 0.002  # of a patch's pixels: 0.2%
DEFAULT_WINDOW = 11  # px: the replacement is drawn from this window around the pixel


def masked_count(spatial: tuple[int, ...], fraction: float) -> int:
    """Pixels masked per patch and channel: the fraction of its pixels, at least one."""
    if not 0 < fraction < 1:
        raise ValueError(f"the masked fraction must lie in (0, 1), got {fraction}")
    return max(1, round(fraction * int(np.prod(spatial))))


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Indices beyond [0, size) mirrored back without repeating the edge (-1 -> 1)."""
    period = 2 * (size - 1)
    index = np.abs(index) % period if period else np.zeros_like(index)
    return np.where(index >= size, period - index, index)


def _neighbours(points: np.ndarray, spatial: tuple[int, ...], window: int,
                rng: np.random.Generator) -> np.ndarray:
    """For each point (k, d), another pixel of the `window`-wide box around it, inside the
    patch (mirrored at its edges), never the point itself."""
    radius = window // 2
    chosen = np.empty_like(points)
    todo = np.arange(len(points))
    while todo.size:  # a draw mirrored back onto its own pixel is drawn again
        offsets = rng.integers(-radius, radius + 1, size=(todo.size, len(spatial)))
        candidate = np.stack([_reflect(points[todo, a] + offsets[:, a], n)
                              for a, n in enumerate(spatial)], axis=1)
        same = (candidate == points[todo]).all(axis=1)
        chosen[todo[~same]] = candidate[~same]
        todo = todo[same]
    return chosen


def blind_spot(patch: np.ndarray, rng: np.random.Generator,
               fraction: float = DEFAULT_FRACTION, window: int = DEFAULT_WINDOW,
               struct_axis: int | None = None, struct_span: int = 5
               ) -> tuple[np.ndarray, np.ndarray]:
    """The network's input and the loss mask of one (C, *spatial) patch.

    Per channel, `masked_count` distinct pixels drawn uniformly are replaced by a random
    other pixel of the `window` around them; the mask (bool, the patch's shape) is True
    there only. With `struct_axis` (a spatial axis index), the `struct_span` - 1 pixels
    centred on each masked pixel along that axis (not the pixel itself) also get values
    drawn uniformly from the patch channel's range, so correlated noise along the axis
    cannot leak the pixel's value; they are not in the loss mask.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"the replacement window must be odd and at least 3, got {window}")
    spatial = patch.shape[1:]
    if min(spatial) < 2:
        raise ValueError(f"a patch of spatial shape {spatial} has no neighbours to draw from")
    count = masked_count(spatial, fraction)
    manipulated, mask = patch.copy(), np.zeros(patch.shape, dtype=bool)
    for channel in range(patch.shape[0]):
        flat = rng.choice(int(np.prod(spatial)), size=count, replace=False)
        points = np.stack(np.unravel_index(flat, spatial), axis=1)
        source = _neighbours(points, spatial, window, rng)
        if struct_axis is not None:
            _hide_line(manipulated[channel], points, struct_axis, struct_span, rng)
        manipulated[(channel, *points.T)] = patch[(channel, *source.T)]
        mask[(channel, *points.T)] = True
    return manipulated, mask


def _hide_line(image: np.ndarray, points: np.ndarray, axis: int, span: int,
               rng: np.random.Generator) -> None:
    """structN2V: the neighbours within span // 2 along `axis` of each point get uniform
    random values of the image's range (in place; the points themselves are set after)."""
    low, high = float(image.min()), float(image.max())
    for step in range(-(span // 2), span // 2 + 1):
        if step == 0:
            continue
        line = points.copy()
        line[:, axis] += step
        inside = (line[:, axis] >= 0) & (line[:, axis] < image.shape[axis])
        line = line[inside]
        image[tuple(line.T)] = rng.uniform(low, high, size=len(line)).astype(image.dtype)


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked pixels only: (N, C, *spatial) tensors and a bool
    mask of the same shape. Unmasked outputs get no gradient; no masked pixel gives 0."""
    if prediction.shape != target.shape or mask.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)}, target "
                         f"{tuple(target.shape)} and mask {tuple(mask.shape)} must have one "
                         f"shape")
    weight = mask.to(prediction.dtype)
    total = ((prediction - target) ** 2 * weight).sum()
    return total / torch.clamp(weight.sum(), min=1.0)


def mask_batch(x: np.ndarray, settings: dict[str, Any], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """A batch (N, C, *spatial) as (network input, loss target): each patch through
    `blind_spot` with `settings` (train.blind_spot: fraction, window, struct_axis as "x",
    "y" or "z" or None, struct_span); the target holds the original values at the masked
    pixels and NaN elsewhere (`masked_loss` reads the mask from it)."""
    spatial_dims = x.ndim - 2
    axis = settings.get("struct_axis")
    struct = None
    if axis is not None:
        if -AXIS_OFFSET[axis] > spatial_dims:
            raise ValueError(f"train.blind_spot.struct_axis {axis!r}: the patches have "
                             f"only {spatial_dims} spatial axes")
        struct = spatial_dims + AXIS_OFFSET[axis]
    inputs = np.empty_like(x, dtype=np.float32)
    targets = np.full(x.shape, np.nan, dtype=np.float32)
    for i in range(len(x)):
        inputs[i], mask = blind_spot(x[i].astype(np.float32), rng, settings["fraction"],
                                     settings["window"], struct, settings["struct_span"])
        targets[i][mask] = x[i][mask]
    return inputs, targets


def masked_loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss over the finite pixels of the target only (`mask_batch`): "mse" (as
    published) or "mae"."""
    if kind not in ("mse", "mae"):
        raise ValueError(f"train.loss {kind!r}: a model.target n2v model trains with mse or "
                         f"mae on the masked pixels")

    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        mask = torch.isfinite(target)
        error = prediction - torch.nan_to_num(target)
        error = error**2 if kind == "mse" else error.abs()
        return (error * mask).sum() / torch.clamp(mask.sum(), min=1)

    return loss


def masked_psnr(output: Tensor, target: Tensor) -> tuple[float, int]:
    """(sum of the per-patch PSNR over the masked pixels, count): the validation metric of
    an n2v model, against the noisy values it never saw (the data range is that of the
    masked values of each patch). Higher is better, as for any regression model."""
    mask = torch.isfinite(target).flatten(1)
    values = torch.nan_to_num(target).flatten(1)
    count = mask.sum(1).clamp(min=1)
    mse = (((output.flatten(1) - values) ** 2) * mask).sum(1) / count
    high = torch.where(mask, values, torch.full_like(values, -torch.inf)).max(1).values
    low = torch.where(mask, values, torch.full_like(values, torch.inf)).min(1).values
    data_range = (high - low).clamp(min=1e-6)
    psnr = 10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))
    return float(psnr.sum()), len(psnr)
