"""Training losses for segmentation (logits vs integer labels) and regression (image vs image).

``build_loss`` turns the config's task and loss name into a function ``loss(prediction,
target) -> scalar``. Segmentation losses leave out pixels labelled ``ignore_label`` (unlabelled
regions of sparse annotations); a batch that is entirely ignored gives 0 with zero gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "build_loss", "ssim_gaussian11", "dice_loss", "cross_entropy_loss"]

LOSSES = {"regression": ("mse", "mae", "mae_ssim"), "segmentation": ("ce", "dice", "ce_dice")}

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DICE_SMOOTH = 1e-5
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

LossFunction = Callable[[Tensor, Tensor], Tensor]


def build_loss(
    task: str,
    name: str,
    ignore_label: int | None = None,
    class_weights: Sequence[float] | None = None,
    mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> LossFunction:
    """The loss ``name`` for ``task``, as a function of (prediction, target).

    Args:
        task: ``regression`` or ``segmentation``.
        name: one of ``LOSSES[task]``.
        ignore_label: segmentation only; target pixels with this value do not count.
        class_weights: segmentation only; per-class weights of the cross-entropy term.
        mean_over_ranks: training on several processes (DDP), each with a share of the
            batch: the mean of a value over the processes (an all-reduce). The
            cross-entropy then divides by the mean over ranks of the counted weight, so that
            the average DDP takes of the ranks' losses is the cross-entropy of the whole
            batch even when the ranks count different numbers of pixels (ignore_label,
            class_weights). The other terms are means of per-sample or per-pixel terms over
            equal shares and need nothing.
    """
    if task not in LOSSES:
        raise ValueError(f"task={task!r} is not one of {list(LOSSES)}")
    if name not in LOSSES[task]:
        raise ValueError(f"loss {name!r} is not one of {list(LOSSES[task])} for task {task!r}")
    if task == "regression":
        _require_unset_for_regression(ignore_label=ignore_label, class_weights=class_weights)
        return functools.partial(_regression_loss, name=name)
    weights = None if class_weights is None else tuple(float(w) for w in class_weights)
    return functools.partial(
        _segmentation_loss, name=name, ignore_label=ignore_label, class_weights=weights,
        mean_over_ranks=mean_over_ranks,
    )


def _require_unset_for_regression(**options: object) -> None:
    """Regression has no labels to ignore or weight; a value here is a config mistake."""
    for option, value in options.items():
        if value is not None:
            raise ValueError(f"{option}={value!r} applies to segmentation only, not regression")


# Regression


def _regression_loss(prediction: Tensor, target: Tensor, name: str) -> Tensor:
    """MSE, MAE or MAE + (1 - SSIM) between two (N, C, *spatial) images."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(prediction.shape)} differs from target shape "
            f"{tuple(target.shape)}"
        )
    if name == "mse":
        return F.mse_loss(prediction, target)
    mae = F.l1_loss(prediction, target)
    if name == "mae":
        return mae
    return mae + (1 - ssim_gaussian11(prediction, target))


def gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A normalised 1D Gaussian of odd ``size``; applied once per axis (it is separable)."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def _window_size(axis_size: int) -> int:
    """SSIM_WINDOW, shrunk to the largest odd size that fits a short axis (thin 3D patches)."""
    return min(SSIM_WINDOW, axis_size if axis_size % 2 else axis_size - 1)


def _local_mean(image: Tensor) -> Tensor:
    """Gaussian-weighted local mean of (N, C, *spatial), per channel, 'valid' positions only.

    Valid (unpadded) filtering, as in Wang et al. 2004 and scikit-image, so borders are not
    compared against invented padding.
    """
    spatial_dims = image.ndim - 2
    channels = image.shape[1]
    for axis in range(spatial_dims):
        size = _window_size(image.shape[2 + axis])
        window = gaussian_window(size, SSIM_SIGMA, image.dtype, image.device)
        shape = [1, 1] + [size if a == axis else 1 for a in range(spatial_dims)]
        weight = window.reshape(shape).repeat(channels, *[1] * (spatial_dims + 1))
        image = _CONV[spatial_dims](image, weight, groups=channels)
    return image


def ssim_gaussian11(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean structural similarity of two (N, C, *spatial) images, 2D or 3D: the loss term.

    Differentiable, with an 11-pixel Gaussian window of sigma 1.5 (shrunk to the largest odd
    size that fits a shorter axis), as in Wang et al. 2004; not the evaluation metric
    `unetflow.metrics.ssim` (scikit-image, 7-pixel uniform window).

    The data range L (in the constants (0.01 L)^2, (0.03 L)^2) is the target's max - min
    over the batch, not a fixed 1.0: normalised microscopy images are not confined to
    [0, 1], and a fixed range would weight the constants arbitrarily. A constant target
    (range 0) falls back to L = 1. The range is a constant (no gradient).
    """
    data_range = (target.max() - target.min()).detach()
    data_range = torch.where(data_range > 0, data_range, torch.ones_like(data_range))
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_p, mu_t = _local_mean(prediction), _local_mean(target)
    var_p = _local_mean(prediction * prediction) - mu_p**2
    var_t = _local_mean(target * target) - mu_t**2
    covariance = _local_mean(prediction * target) - mu_p * mu_t
    similarity = ((2 * mu_p * mu_t + c1) * (2 * covariance + c2)) / (
        (mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2)
    )
    return similarity.mean()


# Segmentation


def _segmentation_loss(
    logits: Tensor,
    target: Tensor,
    name: str,
    ignore_label: int | None,
    class_weights: tuple[float, ...] | None,
    mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Cross-entropy, soft Dice, or their sum, over the pixels that are not ignored."""
    target = _label_image(logits, target, ignore_label)
    if name == "dice":
        return dice_loss(logits, target, ignore_label)
    ce = cross_entropy_loss(logits, target, ignore_label, class_weights, mean_over_ranks)
    return ce if name == "ce" else ce + dice_loss(logits, target, ignore_label)


def _label_image(logits: Tensor, target: Tensor, ignore_label: int | None) -> Tensor:
    """Target as int64 (N, *spatial), checked against the logits (N, K, *spatial) early.

    A (N, 1, *spatial) target is squeezed. Labels outside 0..K-1 (other than ignore_label)
    are refused here rather than as an obscure error inside cross-entropy.
    """
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)} (expected (N, *spatial) or (N, 1, *spatial))"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"segmentation target has dtype {target.dtype}; labels must be integers")
    _require_labels_in_range(target, logits.shape[1], ignore_label)
    return target.long()


def _require_labels_in_range(target: Tensor, num_classes: int, ignore_label: int | None) -> None:
    """Fail naming the first label that is neither a class index nor ignore_label."""
    labels = target if ignore_label is None else target[target != ignore_label]
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"label {int(bad[0])} is outside the classes 0..{num_classes - 1} "
            f"(ignore_label={ignore_label!r})"
        )


def cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    ignore_label: int | None = None,
    class_weights: Sequence[float] | None = None,
    mean_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Weighted mean cross-entropy over non-ignored pixels; 0 (zero gradient) if there are none.

    PyTorch's own mean divides by the summed weight of the counted pixels and so returns NaN
    for an all-ignored batch; dividing by a denominator that is never zero avoids that.
    With `mean_over_ranks` (see `build_loss`) the denominator is its mean over the ranks.
    """
    num_classes = logits.shape[1]
    weight = None
    if class_weights is not None:
        if len(class_weights) != num_classes:
            raise ValueError(
                f"class_weights has {len(class_weights)} entries for {num_classes} classes"
            )
        weight = torch.tensor(class_weights, dtype=logits.dtype, device=logits.device)
    ignore_index = -100 if ignore_label is None else ignore_label
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                            reduction="sum")
    valid = target != ignore_index
    denominator = _counted_weight(target, valid, weight, logits.dtype)
    if mean_over_ranks is not None:
        denominator = mean_over_ranks(denominator)
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _counted_weight(
    target: Tensor, valid: Tensor, weight: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """Sum of the class weights of the counted pixels (their number without weights)."""
    if weight is None:
        return valid.sum().to(dtype)
    return weight[target[valid]].sum()


def dice_loss(logits: Tensor, target: Tensor, ignore_label: int | None = None) -> Tensor:
    """1 - soft Dice of the foreground classes 1..K-1, averaged over classes and samples.

    Probabilities come from a softmax over all K classes; ignored pixels are masked out of
    both the intersection and the sums. The smoothing term makes a class that is absent
    from both prediction and target score 1, and an all-ignored batch give 0 exactly.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"Dice needs a background and a foreground class, got {num_classes}")
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_label is None else (
        target != ignore_label
    )
    labels = torch.where(valid, target, torch.zeros_like(target))
    one_hot = F.one_hot(labels, num_classes).movedim(-1, 1).to(logits.dtype)
    mask = valid.unsqueeze(1).to(logits.dtype)
    probabilities = torch.softmax(logits, dim=1) * mask
    one_hot = one_hot * mask
    sum_axes = tuple(range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(sum_axes)[:, 1:]
    sizes = (probabilities.sum(sum_axes) + one_hot.sum(sum_axes))[:, 1:]
    dice = (2 * intersection + DICE_SMOOTH) / (sizes + DICE_SMOOTH)
    return 1 - dice.mean()
