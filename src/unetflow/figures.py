"""Figures for the report: montages of crops where the model does best and worst, a bar
chart of every model next to its baselines, and for datasets of many positions a plate map
(or, for a collection, a strip of its images) of the headline metric.

Montage: one row per crop, columns input / prediction / target / error. The crops are picked
from a grid over the image (a few z planes for stacks) by the model's error, from the lowest
to the highest, so a user sees both what works and where it fails. The input (and, for
regression, prediction and target, which share its units) is shown between the 1st and the
high percentile of the dataset's normalization statistics.

The montage of an image of any size reads only the crops it draws: the error of every
candidate crop is summed block by block (`CropScores`), by the evaluation pass (a TSV) or by
one streaming pass of its own, and then only the chosen crops are read from the stores.
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np

from unetflow.blockwise import block_shape, map_blocks_ordered, plan_blocks
from unetflow.evaluate import (
    SUMMARY_METRICS,
    check_provenance,
    prediction_provenance,
    read_summary,
)
from unetflow.files import atomic_path
from unetflow.normalize import denormalize_array, position_stats, read_stats
from unetflow.ome import channel_first, open_image

__all__ = [
    "Crop",
    "candidate_crops",
    "montage_error",
    "CropScores",
    "read_crop_scores",
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
# object outlines in the montage: an outline pixel keeps this share of its object's colour
OUTLINE_SHADE = 0.3
COMPARISON_METRICS = {"segmentation": ["foreground_iou", "mean_ap"],
                      "regression": ["psnr", "ssim"]}
BOUNDED_METRICS = {"foreground_iou", "mean_ap", "ssim"}
Crop = tuple[int | None, slice, slice]  # (z plane or None, y slice, x slice)
ScoredCrop = tuple[Crop, float, bool]  # (crop, mean error over it, whether it shows something)
# One column of the montage: its title, what it draws of a crop's views, imshow's style.
Panel = tuple[str, Callable[[dict[str, np.ndarray]], np.ndarray], dict[str, Any]]
CROP_SCORE_COLUMNS = ["z", "y_start", "y_stop", "x_start", "x_stop", "mean_error", "shows"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _crop_grid(spatial_shape: tuple[int, ...], size: int,
               planes: int) -> tuple[list[int | None], tuple[int, int], tuple[int, int]]:
    """The candidate crops as a grid: their z planes, their (y, x) edge and how many fit
    along y and x."""
    ny, nx = spatial_shape[-2:]
    sy, sx = min(size, ny), min(size, nx)
    zs: list[int | None] = [None]
    if len(spatial_shape) == 3:
        zs = sorted({int(z) for z in np.linspace(0, spatial_shape[0] - 1, planes).round()})
    return zs, (sy, sx), (ny // sy, nx // sx)


def candidate_crops(spatial_shape: tuple[int, ...], size: int, planes: int = 5) -> list[Crop]:
    """Non-overlapping size x size crops covering y and x, on up to `planes` z planes."""
    zs, (sy, sx), (cy, cx) = _crop_grid(spatial_shape, size, planes)
    return [(z, slice(y * sy, (y + 1) * sy), slice(x * sx, (x + 1) * sx))
            for z in zs for y in range(cy) for x in range(cx)]


def _plane(array: np.ndarray | da.Array, crop: Crop) -> np.ndarray | da.Array:
    """The crop of the last two axes of (*spatial) `array`, on plane z for stacks."""
    z, ys, xs = crop
    return array[z, ys, xs] if z is not None else array[ys, xs]


def montage_error(task: str, prediction: np.ndarray, target: np.ndarray,
                  ignore_label: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-pixel error the montage ranks crops by, and where a crop shows something.

    Segmentation: `prediction` is the predicted labels (*spatial), `target` (C, *spatial);
    the error is 1 where foreground and background disagree (ignored pixels are right), and
    the target's objects are what is worth showing. Regression: `prediction` (C, *spatial)
    in target units; the squared error of channel 0, and every crop is worth showing (None).
    """
    truth = target[0]
    if task == "segmentation":
        valid = np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label
        true_fg = (truth != 0) & valid
        return (((prediction != 0) != true_fg) & valid).astype(np.float32), true_fg
    return (prediction[0] - truth) ** 2, None


def _crop_runs(span: slice, edge: int, count: int) -> tuple[slice, list[int], int] | None:
    """Along one axis: the crops that `span` (part of a block's core) overlaps, where each
    starts inside it (offsets for np.add.reduceat), and the length of the span crops cover;
    None when no crop reaches into it."""
    stop = min(span.stop, count * edge)
    if span.start >= stop:
        return None
    first, last = span.start // edge, (stop - 1) // edge
    starts = [max(i * edge, span.start) - span.start for i in range(first, last + 1)]
    return slice(first, last + 1), starts, stop - span.start


class CropScores:
    """The montage's candidate crops scored block by block: per crop the error summed over
    the blocks' cores and whether any pixel there shows something. Memory: a few numbers per
    crop, so the montage of an image of any size can pick its crops from one streaming pass
    (evaluate's) and read only those.
    """

    def __init__(self, spatial_shape: tuple[int, ...], size: int, planes: int = 5) -> None:
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.candidates = candidate_crops(self.spatial_shape, size, planes)
        self._planes, self._edge, grid = _crop_grid(self.spatial_shape, size, planes)
        self._sums = np.zeros((len(self._planes), *grid), np.float64)
        self._shows = np.zeros(self._sums.shape, bool)

    def add(self, core: tuple[slice, ...], error: np.ndarray,
            interesting: np.ndarray | None) -> None:
        """Count one block: `error` and `interesting` over its `core` (*spatial of the core).
        `interesting` None: every crop shows something (regression: the image itself)."""
        if error.shape != tuple(s.stop - s.start for s in core):
            raise ValueError(f"an error of shape {error.shape} for the block {core}")
        runs = [_crop_runs(span, edge, count) for span, edge, count
                in zip(core[-2:], self._edge, self._sums.shape[1:], strict=True)]
        if None in runs:
            return
        (rows, row_starts, row_stop), (cols, col_starts, col_stop) = runs
        for index, z in enumerate(self._planes):
            if z is not None and not core[0].start <= z < core[0].stop:
                continue
            at = () if z is None else (z - core[0].start,)
            part = error[(*at, slice(0, row_stop), slice(0, col_stop))]
            sums = np.add.reduceat(part, row_starts, axis=0, dtype=np.float64)
            self._sums[index, rows, cols] += np.add.reduceat(sums, col_starts, axis=1)
            if interesting is None:
                self._shows[index, rows, cols] = True
                continue
            shown = interesting[(*at, slice(0, row_stop), slice(0, col_stop))]
            shown = np.logical_or.reduceat(shown, row_starts, axis=0)
            self._shows[index, rows, cols] |= np.logical_or.reduceat(shown, col_starts, axis=1)

    def merge(self, other: CropScores) -> CropScores:
        """The scores of both (disjoint) sets of blocks, e.g. counted by two workers."""
        if other.candidates != self.candidates:
            raise ValueError("merging crop scores of different images or crop sizes")
        merged = CropScores.__new__(CropScores)
        merged.__dict__.update(self.__dict__)
        merged._sums, merged._shows = self._sums + other._sums, self._shows | other._shows
        return merged

    def scored(self) -> list[ScoredCrop]:
        """(crop, mean error over the crop, shows something), candidates in order."""
        pixels = self._edge[0] * self._edge[1]
        return [(crop, float(total / pixels), bool(shows)) for crop, total, shows
                in zip(self.candidates, self._sums.ravel(), self._shows.ravel(), strict=True)]

    def write_tsv(self, path: str) -> None:
        """The scored crops as a TSV (read_crop_scores), written atomically; z is empty
        for 2D images, shows is 1 or 0, the mean error exact (repr)."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(CROP_SCORE_COLUMNS)
            for (z, ys, xs), error, shows in self.scored():
                writer.writerow(["" if z is None else z, ys.start, ys.stop, xs.start,
                                 xs.stop, repr(error), int(shows)])


def _scored_row(row: list[str]) -> ScoredCrop:
    z, y0, y1, x0, x1, error, shows = row
    if shows not in ("0", "1"):
        raise ValueError(f"shows is {shows!r}, not 0 or 1")
    crop = (None if z == "" else int(z), slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    return crop, float(error), shows == "1"


def read_crop_scores(path: str) -> list[ScoredCrop]:
    """The scored crops of a TSV written by `CropScores.write_tsv`, in its order."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows or rows[0] != CROP_SCORE_COLUMNS:
        raise ValueError(f"{path}: not a crop scores table: its header is "
                         f"{rows[0] if rows else 'missing'}, not {CROP_SCORE_COLUMNS}")
    scored = []
    for number, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(CROP_SCORE_COLUMNS):
                raise ValueError(f"{len(row)} columns, not {len(CROP_SCORE_COLUMNS)}")
            scored.append(_scored_row(row))
        except ValueError as err:
            raise ValueError(f"{path}: line {number} {row}: {err}") from err
    return scored


def pick_crops(scored: list[ScoredCrop], count: int) -> list[tuple[Crop, float]]:
    """`count` crops spread evenly from the lowest to the highest mean error.

    Crops that show something (e.g. the target's objects) are kept, when any do; ties keep
    the order of `scored`.
    """
    showing = [(crop, error) for crop, error, shows in scored if shows]
    ranked = sorted(showing or [(crop, error) for crop, error, _ in scored], key=lambda t: t[1])
    ranks = sorted({int(r) for r in np.linspace(0, len(ranked) - 1, count).round()})
    return [ranked[r] for r in ranks]


def display_range(stats: dict[str, Any]) -> tuple[float, float]:
    """(low, high) percentiles of the first channel's normalization statistics."""
    values = list(stats["channels"][0]["percentiles"].values())
    low, high = float(values[0]), float(values[-1])
    return (low, high) if high > low else (low, low + 1.0)


def _label_colors(labels: np.ndarray) -> np.ndarray:
    """Instance labels as RGB: a fixed pseudo-random colour per id, black background, and
    each object's outline darkened, so that two touching objects (a split) show a line
    between them even where their colours are alike, and a merge shows none."""
    from skimage.segmentation import find_boundaries

    palette = np.random.default_rng(0).uniform(0.25, 1.0, (256, 3))
    rgb = palette[labels.astype(np.int64) % 255 + 1]
    rgb[find_boundaries(labels, mode="inner")] *= OUTLINE_SHADE
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


def _segmentation_panels(ignore_label: int | None) -> list[Panel]:
    """Predicted objects, target objects (ignored pixels black) and the error map."""
    def valid(view: dict[str, np.ndarray]) -> np.ndarray:
        truth = view["target"]
        return np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label

    def target_objects(view: dict[str, np.ndarray]) -> np.ndarray:
        return _label_colors(np.where(valid(view), view["target"], 0))

    def errors(view: dict[str, np.ndarray]) -> np.ndarray:
        ok = valid(view)
        return error_image(view["prediction"] != 0, (view["target"] != 0) & ok, ok)

    return [("prediction (objects)", lambda view: _label_colors(view["prediction"]), {}),
            ("target (objects)", target_objects, {}),
            ("error: orange = false object pixels,\nblue = missed, grey = right", errors, {})]


def _regression_panels(low: float, high: float) -> list[Panel]:
    """Prediction and target in the input's display range, and their difference."""
    shown = {"cmap": "gray", "vmin": low, "vmax": high}
    limit = (high - low) / 4
    return [("prediction", lambda view: view["prediction"], shown),
            ("target", lambda view: view["target"], shown),
            (f"error: prediction - target (±{limit:.3g})",
             lambda view: view["prediction"] - view["target"],
             {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit})]


def _crop_name(crop: Crop, rank: int, count: int, error: float, task: str) -> str:
    z, ys, xs = crop
    where = f"y {ys.start}:{ys.stop}, x {xs.start}:{xs.stop}"
    where = f"z {z}, {where}" if z is not None else where
    kind = "best" if rank == 0 else "worst" if rank == count - 1 else "middle"
    measure = "wrong pixels" if task == "segmentation" else "MSE"
    value = f"{error:.1%}" if task == "segmentation" else f"{error:.3g}"
    return f"{kind}: {where}\n{measure} {value}"


def _montage_arrays(prediction: str, image: str, target: str, task: str,
                    channels: list | None) -> dict[str, da.Array]:
    """The stores as lazy (1, *spatial) arrays, nothing read yet: `input` (channel 0 of the
    image), `prediction` (labels for segmentation; channel 0 of the image in target units
    for regression, denormalized as evaluate.open_prediction does) and `target` (channel 0),
    image and target at the resolution level the prediction was made from."""
    provenance = check_provenance(prediction_provenance(prediction), prediction, task)
    level = int(provenance.get("predict", {}).get("level", 0))
    if task == "segmentation":
        predicted = channel_first(open_image(f"{prediction}/labels/prediction"))
    else:
        predicted = channel_first(open_image(prediction))
        if provenance.get("predict", {}).get("output_units") == "normalized":
            predicted = denormalize_array(predicted, provenance["normalization"],
                                          provenance["normalize"]["method"])
    return {"input": channel_first(open_image(image, level), channels)[:1],
            "prediction": predicted[:1], "target": channel_first(open_image(target, level))[:1]}


def _stream_crop_scores(arrays: dict[str, da.Array], task: str, settings: dict[str, Any],
                        workers: int) -> list[ScoredCrop]:
    """Every candidate crop scored in one pass over blocks of the prediction and target."""
    prediction, target = arrays["prediction"], arrays["target"]
    spatial = prediction.shape[1:]
    chunks = tuple(c[0] for c in prediction.chunks[1:])
    block = block_shape(spatial, chunks, int(settings.get("block_pixels", 1 << 20)))
    scores = CropScores(spatial, settings["montage_crop_size"])

    def score(block, data: dict[str, np.ndarray]) -> tuple:
        pred = data["prediction"][0] if task == "segmentation" else data["prediction"]
        return block.core, *montage_error(task, pred, data["target"], settings["ignore_label"])

    for core, error, interesting in map_blocks_ordered(
            score, {"prediction": prediction, "target": target}, plan_blocks(spatial, block),
            workers):
        scores.add(core, error, interesting)
    return scores.scored()


def _check_crops(scored: list[ScoredCrop], spatial: tuple[int, ...], size: int,
                 path: str) -> None:
    """The crop scores were written for this image and this montage_crop_size."""
    expected = candidate_crops(spatial, size)
    if [crop for crop, _, _ in scored] != expected:
        raise ValueError(f"{path}: its {len(scored)} crops are not the {len(expected)} "
                         f"candidate crops of {size} pixels of the image of shape {spatial}; "
                         f"it was written for another image or montage_crop_size (rerun "
                         f"evaluate)")


def _read_crop(arrays: dict[str, da.Array], crop: Crop) -> dict[str, np.ndarray]:
    """One crop of every array, in memory: only the chunks it touches are read."""
    return {name: np.asarray(_plane(array[0], crop).compute(scheduler="sync"))
            for name, array in arrays.items()}


def write_montage(prediction: str, image: str, target: str, stats_path: str, task: str,
                  channels: list | None, settings: dict[str, Any], output: str,
                  title: str, position: str | None = None, crop_scores: str | None = None,
                  workers: int = 1) -> list[tuple[Crop, float]]:
    """Montage PNG of input / prediction / target / error on representative crops.

    `settings` is the evaluate section (montage_crops, montage_crop_size, ignore_label;
    block_pixels for the streaming pass); `position` is the plate/collection position shown
    (for per-position statistics). `crop_scores`: the candidate crops' errors as evaluate
    wrote them (`CropScores.write_tsv`); without it one pass over blocks of the prediction
    and target (`workers` threads) scores them. Only the chosen crops are then read.
    Returns the crops shown with their mean error.
    """
    arrays = _montage_arrays(prediction, image, target, task, channels)
    spatial = arrays["prediction"].shape[1:]
    if crop_scores is None:
        scored = _stream_crop_scores(arrays, task, settings, workers)
    else:
        scored = read_crop_scores(crop_scores)
        _check_crops(scored, spatial, settings["montage_crop_size"], crop_scores)
    crops = pick_crops(scored, settings["montage_crops"])
    low, high = display_range(position_stats(read_stats(stats_path), position))
    panels = (_segmentation_panels(settings["ignore_label"]) if task == "segmentation"
              else _regression_panels(low, high))
    panels = [(f"input (channel 0, {low:.3g} to {high:.3g})", lambda view: view["input"],
               {"cmap": "gray", "vmin": low, "vmax": high}), *panels]
    _draw_montage(panels, crops, [_read_crop(arrays, crop) for crop, _ in crops], task,
                  title, output)
    return crops


def _draw_montage(panels: list[Panel], crops: list[tuple[Crop, float]],
                  views: list[dict[str, np.ndarray]], task: str, title: str,
                  output: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(crops), len(panels), squeeze=False,
                             figsize=(2.6 * len(panels), 2.6 * len(crops) + 0.6))
    for row, ((crop, err), view) in enumerate(zip(crops, views, strict=True)):
        for col, (name, draw, style) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(draw(view), interpolation="nearest", **style)
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
