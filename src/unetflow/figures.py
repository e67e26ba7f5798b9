"""Figures for the report: montages of crops where the model does best and worst, a bar
chart of every model next to its baselines, and for datasets of many positions a plate map
(or, for a collection, a strip of its images) of the headline metric.

Montage: one row per crop, columns input / prediction / target / error. The crops are picked
from a grid over the image (a few z planes for stacks) by the model's error, from the lowest
to the highest, so a user sees both what works and where it fails. The input (and, for
regression, prediction and target, which share its units) is shown between the 1st and the
high percentile of the dataset's normalization statistics.
"""

from __future__ import annotations

import textwrap
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
    "plate_grid",
    "write_plate_map",
    "write_position_strip",
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


# --- datasets of many positions -------------------------------------------------------------
PLATE_MAP_NUMBERS = 96  # wells up to which each well shows its value
UNSELECTED = (0.9, 0.9, 0.9)
STRIP_NAMES = 60  # positions up to which the strip names each one


def plate_grid(values: dict[tuple[str, str], float | None], rows: list[str],
               columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(values, selected) as (rows x columns) arrays in the plate's order; NaN where a well
    is not selected or has no value. `values` maps (row, column) names to the well's value."""
    grid = np.full((len(rows), len(columns)), np.nan)
    selected = np.zeros(grid.shape, bool)
    for (row, column), value in values.items():
        i, j = rows.index(row), columns.index(column)
        selected[i, j] = True
        grid[i, j] = np.nan if value is None else value
    return grid, selected


def _colour_range(grid: np.ndarray, metric: str) -> tuple[float, float]:
    """[0, 1] for bounded metrics; otherwise the finite values' range (inf: a perfect PSNR)."""
    if metric in BOUNDED_METRICS:
        return 0.0, 1.0
    finite = grid[np.isfinite(grid)]
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _value_text(value: float, metric: str) -> str:
    if np.isnan(value):
        return "n/a"
    if np.isinf(value):
        return "inf"
    return f"{value:.2f}" if metric in BOUNDED_METRICS else f"{value:.3g}"


def _well_numbers(ax, grid: np.ndarray, selected: np.ndarray, cmap, norm, metric: str) -> None:
    """Each selected well's value, in black or white, whichever reads on its colour."""
    for i, j in zip(*np.nonzero(selected), strict=True):
        value = grid[i, j]
        r, g, b, _ = (*UNSELECTED, 1) if np.isnan(value) else cmap(norm(min(value, norm.vmax)))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, _value_text(value, metric), ha="center", va="center",
                fontsize=6 if grid.shape[1] > 12 else 7, color="white" if dark else "black")


def write_plate_map(values: dict[tuple[str, str], float | None], rows: list[str],
                    columns: list[str], metric: str, title: str, output: str) -> np.ndarray:
    """PNG of a plate as screeners read it: wells in the plate's rows (A at the top) and
    columns (1 at the left, names along the top), coloured by `metric`, with a colour bar.

    Wells not in `values` stay light grey; a selected well without a value reads "n/a"; on
    plates of up to 96 wells each well shows its value. Returns the grid drawn (NaN where
    blank), rows x columns.
    """
    grid, selected = plate_grid(values, rows, columns)
    low, high = _colour_range(grid, metric)
    plt = _plt()
    from matplotlib.colors import Normalize

    cmap, norm = plt.get_cmap("viridis").with_extremes(bad=UNSELECTED), Normalize(low, high)
    ny, nx = grid.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * nx + 2.2), max(2.5, 0.42 * ny + 1.4)))
    image = ax.imshow(np.ma.masked_invalid(np.where(np.isinf(grid), high, grid)), cmap=cmap,
                      norm=norm, interpolation="nearest")
    small = ny * nx <= 96
    ax.set_xticks(range(nx), columns, fontsize=8 if small else 6)
    ax.set_yticks(range(ny), rows, fontsize=8 if small else 6)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(nx + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(ny + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    if small:
        _well_numbers(ax, grid, selected, cmap, norm, metric)
    fig.colorbar(image, ax=ax, label=metric, shrink=0.9)
    fig.suptitle(textwrap.fill(title, width=max(40, int(9 * fig.get_figwidth()))), fontsize=9)
    fig.tight_layout()
    _save_png(fig, output)
    return grid


def write_position_strip(values: dict[str, float | None], metric: str, title: str,
                         output: str) -> list[str]:
    """PNG of a collection's positions sorted by `metric`, worst first: one named bar each
    for up to 60 positions, beyond that the sorted values with the five worst named.
    A collection has no layout to draw as a plate; what a user needs is which images fail.
    Returns the keys in the order drawn.
    """
    lower_better = metric in ("mae",)
    known = {k: v for k, v in values.items() if v is not None and not np.isnan(v)}
    order = sorted(known, key=lambda k: known[k], reverse=lower_better)
    shown = np.array([known[k] for k in order], float)
    low, high = _colour_range(shown, metric)
    shown = np.where(np.isinf(shown), high, shown)
    plt = _plt()
    if len(order) <= STRIP_NAMES:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * max(1, len(order))))
        ax.barh(range(len(order)), shown, color="C0")
        ax.set_yticks(range(len(order)), order, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(metric)
    else:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(range(len(order)), shown, ".", markersize=3)
        for rank in range(min(5, len(order))):
            ax.annotate(order[rank], (rank, shown[rank]), fontsize=6, rotation=30)
        ax.set_xlabel(f"position, sorted by {metric} (worst first)")
        ax.set_ylabel(metric)
    if metric in BOUNDED_METRICS:
        (ax.set_xlim if len(order) <= STRIP_NAMES else ax.set_ylim)(0, 1.05)
    missing = len(values) - len(known)
    ax.set_title(title + (f" ({missing} without a value)" if missing else ""), fontsize=9)
    fig.tight_layout()
    _save_png(fig, output)
    return order
