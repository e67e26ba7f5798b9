"""Figures for the report: montages of crops where the model does best and worst, and a bar
chart of every model next to its baselines.

Montage: one row per crop, columns input / prediction / target / error. The crops are picked
from a grid over the image (a few z planes for stacks) by the model's error, from the lowest
to the highest, so a user sees both what works and where it fails. The input (and, for
regression, prediction and target, which share its units) is shown between the 1st and the
high percentile of the dataset's normalization statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetflow.evaluate import (
    SUMMARY_METRICS,
    prediction_provenance,
    read_channels_first,
    read_prediction,
    read_summary,
)
from unetflow.files import atomic_path
from unetflow.normalize import position_stats, read_stats
from unetflow.ome import channel_first, open_image

__all__ = [
    "Crop",
    "candidate_crops",
    "pick_crops",
    "display_range",
    "error_image",
    "write_montage",
    "write_comparison",
]

# Okabe-Ito colours, distinguishable with colour-blindness.
HIT, FALSE_POSITIVE, FALSE_NEGATIVE, IGNORED = (0.85, 0.85, 0.85), (0.9, 0.6, 0.0), \
    (0.0, 0.45, 0.7), (0.35, 0.35, 0.35)
COMPARISON_METRICS = {"segmentation": ["foreground_iou", "mean_ap"],
                      "regression": ["psnr", "ssim"]}
BOUNDED_METRICS = {"foreground_iou", "mean_ap", "ssim"}
Crop = tuple[int | None, slice, slice]  # (z plane or None, y slice, x slice)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def candidate_crops(spatial_shape: tuple[int, ...], size: int, planes: int = 5) -> list[Crop]:
    """Non-overlapping size x size crops covering y and x, on up to `planes` z planes."""
    ny, nx = spatial_shape[-2:]
    sy, sx = min(size, ny), min(size, nx)
    zs: list[int | None] = [None]
    if len(spatial_shape) == 3:
        zs = sorted({int(z) for z in np.linspace(0, spatial_shape[0] - 1, planes).round()})
    return [(z, slice(y, y + sy), slice(x, x + sx))
            for z in zs for y in range(0, ny - sy + 1, sy) for x in range(0, nx - sx + 1, sx)]


def _plane(array: np.ndarray, crop: Crop) -> np.ndarray:
    """The crop of the last two axes of (*spatial) `array`, on plane z for stacks."""
    z, ys, xs = crop
    return array[z, ys, xs] if z is not None else array[ys, xs]


def pick_crops(error: np.ndarray, crops: list[Crop], count: int,
               interesting: np.ndarray | None = None) -> list[tuple[Crop, float]]:
    """`count` crops spread evenly from the lowest to the highest mean error.

    `interesting` (e.g. the target's foreground) keeps crops that show something, when any do.
    """
    if interesting is not None:
        showing = [c for c in crops if _plane(interesting, c).any()]
        crops = showing or crops
    scored = sorted(((c, float(_plane(error, c).mean())) for c in crops), key=lambda t: t[1])
    ranks = sorted({int(r) for r in np.linspace(0, len(scored) - 1, count).round()})
    return [scored[r] for r in ranks]


def display_range(stats: dict[str, Any]) -> tuple[float, float]:
    """(low, high) percentiles of the first channel's normalization statistics."""
    values = list(stats["channels"][0]["percentiles"].values())
    low, high = float(values[0]), float(values[-1])
    return (low, high) if high > low else (low, low + 1.0)


def _label_colors(labels: np.ndarray) -> np.ndarray:
    """Instance labels as RGB: a fixed pseudo-random colour per id, black background."""
    palette = np.random.default_rng(0).uniform(0.25, 1.0, (256, 3))
    rgb = palette[labels.astype(np.int64) % 255 + 1]
    rgb[labels == 0] = 0
    return rgb


def error_image(pred_fg: np.ndarray, true_fg: np.ndarray,
                valid: np.ndarray) -> np.ndarray:
    """RGB map of segmentation errors: hits grey, false positives orange, misses blue."""
    rgb = np.zeros((*true_fg.shape, 3))
    rgb[pred_fg & true_fg] = HIT
    rgb[pred_fg & ~true_fg] = FALSE_POSITIVE
    rgb[~pred_fg & true_fg] = FALSE_NEGATIVE
    rgb[~valid] = IGNORED
    return rgb


def _segmentation_panels(pred: dict, truth: np.ndarray, ignore_label: int | None):
    valid = np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label
    pred_fg, true_fg = pred["labels"] != 0, (truth != 0) & valid
    error = ((pred_fg != true_fg) & valid).astype(np.float32)
    panels = [("prediction (objects)", lambda c: _label_colors(_plane(pred["labels"], c)), {}),
              ("target (objects)", lambda c: _label_colors(_plane(np.where(valid, truth, 0), c)),
               {}),
              ("error: orange = false object pixels,\nblue = missed, grey = right",
               lambda c: error_image(_plane(pred_fg, c), _plane(true_fg, c), _plane(valid, c)),
               {})]
    return panels, error, true_fg


def _regression_panels(pred: np.ndarray, target: np.ndarray, low: float, high: float):
    shown = {"cmap": "gray", "vmin": low, "vmax": high}
    limit = (high - low) / 4
    difference = pred[0] - target[0]
    panels = [("prediction", lambda c: _plane(pred[0], c), shown),
              ("target", lambda c: _plane(target[0], c), shown),
              (f"error: prediction - target (±{limit:.3g})", lambda c: _plane(difference, c),
               {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit})]
    return panels, difference**2, None


def _crop_name(crop: Crop, rank: int, count: int, error: float, task: str) -> str:
    z, ys, xs = crop
    where = f"y {ys.start}:{ys.stop}, x {xs.start}:{xs.stop}"
    where = f"z {z}, {where}" if z is not None else where
    kind = "best" if rank == 0 else "worst" if rank == count - 1 else "middle"
    measure = "wrong pixels" if task == "segmentation" else "MSE"
    value = f"{error:.1%}" if task == "segmentation" else f"{error:.3g}"
    return f"{kind}: {where}\n{measure} {value}"


def write_montage(prediction: str, image: str, target: str, stats_path: str, task: str,
                  channels: list | None, settings: dict[str, Any], output: str,
                  title: str, position: str | None = None) -> list[tuple[Crop, float]]:
    """Montage PNG of input / prediction / target / error on representative crops.

    `settings` is the evaluate section (montage_crops, montage_crop_size, ignore_label);
    `position` is the plate/collection position shown (for per-position statistics).
    Returns the crops shown with their mean error.
    """
    level = int(prediction_provenance(prediction).get("predict", {}).get("level", 0))
    pred = read_prediction(prediction, task)
    image_arr = np.asarray(channel_first(open_image(image, level), channels).compute())
    target_arr = read_channels_first(target, level)
    low, high = display_range(position_stats(read_stats(stats_path), position))
    if task == "segmentation":
        panels, error, interesting = _segmentation_panels(pred, target_arr[0],
                                                          settings["ignore_label"])
    else:
        panels, error, interesting = _regression_panels(pred["image"], target_arr, low, high)
    crops = pick_crops(error, candidate_crops(error.shape, settings["montage_crop_size"]),
                       settings["montage_crops"], interesting)
    panels = [(f"input (channel 0, {low:.3g} to {high:.3g})", lambda c: _plane(image_arr[0], c),
               {"cmap": "gray", "vmin": low, "vmax": high}), *panels]
    _draw_montage(panels, crops, task, title, output)
    return crops


def _draw_montage(panels, crops, task: str, title: str, output: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(crops), len(panels), squeeze=False,
                             figsize=(2.6 * len(panels), 2.6 * len(crops) + 0.6))
    for row, (crop, err) in enumerate(crops):
        for col, (name, draw, style) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(draw(crop), interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8, wrap=True)
        axes[row, 0].set_ylabel(_crop_name(crop, row, len(crops), err, task), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_png(fig, output)


def _numbers(rows: list[dict[str, str]], metric: str) -> list[float]:
    return [float(r[metric]) if r.get(metric) not in ("", None, "inf") else np.nan for r in rows]


def write_comparison(summary: str, output: str) -> None:
    """Bar chart of the headline metrics of each model and its baselines, per dataset."""
    rows = read_summary(summary)
    tasks = [t for t in SUMMARY_METRICS if any(r["task"] == t for r in rows)]
    plt = _plt()
    fig, axes = plt.subplots(max(1, len(tasks)), 2, squeeze=False,
                             figsize=(10, 3.4 * max(1, len(tasks))))
    for row, task in enumerate(tasks):
        group = [r for r in rows if r["task"] == task]
        for col, metric in enumerate(COMPARISON_METRICS[task]):
            _bars(axes[row, col], group, metric, task)
    if not tasks:
        axes[0, 0].text(0.5, 0.5, "no evaluated predictions", ha="center")
    fig.tight_layout()
    _save_png(fig, output)


def _save_png(fig, output: str) -> None:
    """Save and close `fig` as a PNG, atomically; the format is given explicitly because
    the temporary file's suffix is .tmp, not .png."""
    try:
        with atomic_path(output) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        _plt().close(fig)


def _method_kind(method: str) -> str:
    """`gaussian(sigma=1.5)` -> `gaussian`: one colour per kind of baseline."""
    return method.split("(", 1)[0]


def _bars(ax, rows: list[dict[str, str]], metric: str, task: str) -> None:
    pairs = list(dict.fromkeys((r["model"], r["dataset"]) for r in rows))
    methods = list(dict.fromkeys(_method_kind(r["method"]) for r in rows))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        chosen = [next((r for r in rows if (r["model"], r["dataset"]) == p
                        and _method_kind(r["method"]) == method), {}) for p in pairs]
        values = _numbers(chosen, metric)
        x = np.arange(len(pairs)) + (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(x, values, width, label=method, color=f"C{i}")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(np.arange(len(pairs)), [f"{m}\n{d}" for m, d in pairs], fontsize=8)
    if metric in BOUNDED_METRICS:
        ax.set_ylim(0, 1.08)
    ax.set_title(f"{task}: {metric} (higher is better)", fontsize=9)
    ax.legend(fontsize=7)
