"""Image metrics as sums over blocks, so evaluation reads an image one block at a time.

Each metric of `unetflow.metrics` (the in-memory oracle) splits into three steps: what one
block contributes (`of`, a few numbers or a small table), how two contributions merge
(`merge`; the empty value is the class called without arguments), and the metric at the end
(`scores` / `value`). Contributions hold no pixels: their size grows with the number of
channels, classes or objects, never with the image, and merging them in any order gives the
oracle's result to float tolerance.

- Regression: squared and absolute error sums, and Pearson r from per-block means and
  (co)moments merged with Chan et al.'s parallel formulas (raw sums of squares cancel
  catastrophically on a large image with a large mean).
- SSIM: the sum of scikit-image's SSIM map over each block's core pixels in the image's
  interior; the block is read with a halo of (win - 1) // 2 pixels so its windows are whole.
- Semantic segmentation: the confusion matrix of valid pixels.
- Instance segmentation: object areas and the pixel count of every overlapping (true,
  predicted) pair, keyed by the label images' own ids, so an object crossing blocks adds up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter

from unetflow.blockwise import Block
from unetflow.metrics import iou_dice, match_scores, ssim_window

__all__ = [
    "RegressionSums",
    "ssim_window",
    "SsimSum",
    "confusion",
    "class_scores_from_confusion",
    "ObjectOverlaps",
]


# --- regression ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RegressionSums:
    """Error sums and Pearson moments over all channels and pixels seen, in float64.

    Means and centred (co)moments rather than raw sums of squares, so Pearson r keeps its
    precision on large images with a large mean; minima and maxima, so a constant image is
    recognised exactly (and give the target's data range when it is not known in advance).
    """

    count: int = 0
    squared_error: float = 0.0
    absolute_error: float = 0.0
    pred_mean: float = 0.0
    target_mean: float = 0.0
    pred_m2: float = 0.0
    target_m2: float = 0.0
    co_moment: float = 0.0
    pred_min: float = math.inf
    pred_max: float = -math.inf
    target_min: float = math.inf
    target_max: float = -math.inf

    @classmethod
    def of(cls, pred: np.ndarray, target: np.ndarray) -> RegressionSums:
        """One block's sums; `pred` and `target` are (C, *spatial) in the same units."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from target shape "
                             f"{target.shape}")
        if pred.size == 0:
            return cls()
        p = pred.astype(np.float64).ravel()
        t = target.astype(np.float64).ravel()
        diff = p - t
        squared = float(diff @ diff)
        absolute = float(np.abs(diff, out=diff).sum())
        p_mean, t_mean = float(p.mean()), float(t.mean())
        p -= p_mean
        t -= t_mean
        return cls(p.size, squared, absolute, p_mean, t_mean, float(p @ p), float(t @ t),
                   float(p @ t), float(pred.min()), float(pred.max()), float(target.min()),
                   float(target.max()))

    def merge(self, other: RegressionSums) -> RegressionSums:
        """Both blocks' sums: Chan et al.'s update of means and (co)moments."""
        if not other.count:
            return self
        if not self.count:
            return other
        n = self.count + other.count
        d_pred, d_target = other.pred_mean - self.pred_mean, other.target_mean - self.target_mean
        weight = self.count * other.count / n
        return RegressionSums(
            n, self.squared_error + other.squared_error,
            self.absolute_error + other.absolute_error,
            self.pred_mean + d_pred * other.count / n,
            self.target_mean + d_target * other.count / n,
            self.pred_m2 + other.pred_m2 + d_pred * d_pred * weight,
            self.target_m2 + other.target_m2 + d_target * d_target * weight,
            self.co_moment + other.co_moment + d_pred * d_target * weight,
            min(self.pred_min, other.pred_min), max(self.pred_max, other.pred_max),
            min(self.target_min, other.target_min), max(self.target_max, other.target_max))

    def pearson_r(self) -> float | None:
        """Pearson correlation of all pixels seen; None when either image is constant."""
        if self.pred_min == self.pred_max or self.target_min == self.target_max:
            return None
        denominator = math.sqrt(self.pred_m2 * self.target_m2)
        return self.co_moment / denominator if denominator > 0 else None

    def scores(self, data_range: float, ssim: float) -> dict[str, Any]:
        """`metrics.regression_scores` of the whole image: PSNR for `data_range`, the SSIM
        computed separately (`SsimSum`), MAE and Pearson r. Its default data range is
        `target_max - target_min or 1.0`."""
        if not self.count:
            raise ValueError("regression scores of no pixels: merge at least one block first")
        mse = self.squared_error / self.count
        psnr = float(10 * np.log10(data_range**2 / mse)) if mse > 0 else math.inf
        return {"psnr": psnr, "ssim": float(ssim), "mae": self.absolute_error / self.count,
                "pearson_r": self.pearson_r(), "data_range": float(data_range)}


# --- SSIM ---------------------------------------------------------------------------------
def _window_mean(image: np.ndarray, win: int) -> np.ndarray:
    """The uniform window's mean, cropped by (win - 1) // 2 on every side: only where every
    window lies inside the array."""
    pad = (win - 1) // 2
    return uniform_filter(image, win)[(slice(pad, -pad),) * image.ndim]


def _target_moments(y: np.ndarray, win: int) -> tuple[np.ndarray, np.ndarray]:
    """The target's window mean and (sample) variance: the half of SSIM's filters that do
    not depend on the prediction, computed once for every method scored against it."""
    uy = _window_mean(y, win)
    vy = _window_mean(y * y, win)
    vy -= uy * uy
    vy *= win**y.ndim / (win**y.ndim - 1)
    return uy, vy


def _ssim_map(x: np.ndarray, y: np.ndarray, win: int, data_range: float,
              target: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """scikit-image's SSIM map of two single-channel float64 images (uniform window, sample
    covariance, K1 = 0.01, K2 = 0.03), cropped by (win - 1) // 2 on every side; `target` is
    `_target_moments(y, win)` (read only)."""
    uy, vy = target
    ux = _window_mean(x, win)
    cov_norm = win**x.ndim / (win**x.ndim - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    # skimage's formula, evaluated in place: a block's arrays are megapixels
    vx, vxy = _window_mean(x * x, win), _window_mean(x * y, win)
    for v, (a, b) in ((vx, (ux, ux)), (vxy, (ux, uy))):
        v -= a * b
        v *= cov_norm
    a1 = ux * uy
    a1 *= 2
    a1 += c1
    vxy *= 2
    vxy += c2  # A2
    b1 = ux * ux
    b1 += uy * uy
    b1 += c1
    vx += vy
    vx += c2  # B2
    a1 *= vxy
    b1 *= vx
    a1 /= b1
    return a1


def _interior_of_core(block: Block, spatial_shape: tuple[int, ...],
                      pad: int) -> tuple[slice, ...] | None:
    """The block's core pixels at least `pad` from every image border (skimage averages SSIM
    over those only), in image coordinates; None when there are none."""
    region = tuple(slice(max(c.start, pad), min(c.stop, s - pad))
                   for c, s in zip(block.core, spatial_shape, strict=True))
    return region if all(r.start < r.stop for r in region) else None


@dataclass(frozen=True)
class SsimSum:
    """The SSIM map summed over the image's interior pixels of every channel, and their count:
    the mean over channels of scikit-image's SSIM is total / count, as every channel has the
    same interior."""

    total: float = 0.0
    count: int = 0

    @classmethod
    def of(cls, pred_ext: np.ndarray, target_ext: np.ndarray, block: Block,
           spatial_shape: tuple[int, ...], data_range: float, win: int) -> SsimSum:
        """One block's SSIM sum; `pred_ext`, `target_ext` are (C, *spatial) read over
        `block.extended`, whose halo must be at least (win - 1) // 2 (`ssim_window`)."""
        return cls.of_each({"": pred_ext}, target_ext, block, spatial_shape, data_range,
                           win)[""]

    @classmethod
    def of_each(cls, preds_ext: dict[str, np.ndarray], target_ext: np.ndarray, block: Block,
                spatial_shape: tuple[int, ...], data_range: float,
                win: int) -> dict[str, SsimSum]:
        """`of` for several predictions of one target (the model and the baselines): the
        target's window statistics are filtered once per channel, not once per prediction."""
        for pred_ext in preds_ext.values():
            if pred_ext.shape != target_ext.shape:
                raise ValueError(f"prediction shape {pred_ext.shape} differs from target "
                                 f"shape {target_ext.shape}")
        extended = tuple(e.stop - e.start for e in block.extended)
        if target_ext.shape[1:] != extended:
            raise ValueError(f"arrays of spatial shape {target_ext.shape[1:]} were not read "
                             f"over the block's extended region {block.extended}")
        if win < 3 or win % 2 == 0:
            raise ValueError(f"SSIM window {win}: must be odd and at least 3 (ssim_window)")
        pad = (win - 1) // 2
        region = _interior_of_core(block, spatial_shape, pad)
        if region is None:
            return {name: cls() for name in preds_ext}
        read = tuple(slice(r.start - pad - e.start, r.stop + pad - e.start)
                     for r, e in zip(region, block.extended, strict=True))
        if any(r.start < 0 or r.stop > n for r, n in zip(read, extended, strict=True)):
            raise ValueError(f"block {block.core} read over {block.extended}: SSIM's window "
                             f"{win} needs a halo of at least {pad} pixels")
        totals = dict.fromkeys(preds_ext, 0.0)
        for c, target in enumerate(target_ext):  # one channel's memory at a time
            y = target[read].astype(np.float64)
            moments = _target_moments(y, win)
            for name, pred_ext in preds_ext.items():
                ssim_map = _ssim_map(pred_ext[c][read].astype(np.float64), y, win, data_range,
                                     moments)
                totals[name] += float(ssim_map.sum())
        count = len(target_ext) * math.prod(r.stop - r.start for r in region)
        return {name: cls(total, count) for name, total in totals.items()}

    def merge(self, other: SsimSum) -> SsimSum:
        return SsimSum(self.total + other.total, self.count + other.count)

    def value(self) -> float:
        """`metrics.ssim` of the whole image."""
        if not self.count:
            raise ValueError("SSIM of no pixels: merge at least one block first")
        return self.total / self.count


# --- semantic segmentation ----------------------------------------------------------------
def confusion(pred_classes: np.ndarray, true_classes: np.ndarray, valid: np.ndarray | None,
              num_classes: int) -> np.ndarray:
    """(K, K) int64 pixel counts of valid pixels: rows the true class, columns the predicted.

    Confusion matrices of blocks add up to the image's. A class outside 0..K-1 among valid
    pixels is an error: the matrix could not hold it, and the scores would silently differ.
    """
    if pred_classes.shape != true_classes.shape:
        raise ValueError(f"class map shapes differ: target {true_classes.shape}, "
                         f"prediction {pred_classes.shape}")
    if valid is not None:
        pred_classes, true_classes = pred_classes[valid], true_classes[valid]
    counts = np.zeros((num_classes, num_classes), np.int64)
    if pred_classes.size == 0:
        return counts
    for name, classes in (("predicted", pred_classes), ("true", true_classes)):
        low, high = classes.min(), classes.max()
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} class {low if low < 0 else high} is outside "
                             f"0..{num_classes - 1} (num_classes {num_classes})")
    flat = true_classes.astype(np.int64).ravel() * num_classes + pred_classes.ravel()
    counts += np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)
    return counts


def class_scores_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """`metrics.class_scores` (IoU and Dice per class and of the foreground) from the
    confusion matrix of the whole image."""
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or not confusion.size:
        raise ValueError(f"confusion matrix of shape {confusion.shape}: must be (K, K), K >= 1")
    foreground = iou_dice(int(confusion[1:, 1:].sum()), int(confusion[:, 1:].sum()),
                          int(confusion[1:, :].sum()))
    scores = {"foreground_iou": foreground[0], "foreground_dice": foreground[1]}
    for k in range(confusion.shape[0]):
        iou, dice = iou_dice(int(confusion[k, k]), int(confusion[:, k].sum()),
                             int(confusion[k, :].sum()))
        scores[f"iou_class_{k}"], scores[f"dice_class_{k}"] = iou, dice
    return scores


# --- instance segmentation ----------------------------------------------------------------
def _sum_by_key(keys: list[np.ndarray], counts: np.ndarray) -> tuple[list[np.ndarray],
                                                                      np.ndarray]:
    """Rows with equal keys (one array per key column) summed, sorted by the keys in order."""
    if counts.size == 0:
        return keys, counts
    order = np.lexsort(keys[::-1])
    keys = [k[order] for k in keys]
    changed = np.zeros(counts.size, bool)
    changed[0] = True
    for k in keys:
        changed[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(changed)
    return [k[starts] for k in keys], np.add.reduceat(counts[order], starts)


@dataclass(frozen=True)
class _Table:
    """Areas of true and predicted objects and pixel counts of overlapping pairs, by id
    (uint64), each sorted by its ids (pairs by true id, then predicted id)."""

    true_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    true_areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pred_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    pred_areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pair_true: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    pair_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    pair_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def rows(self) -> int:
        return len(self.true_ids) + len(self.pred_ids) + len(self.pair_counts)

    @staticmethod
    def combined(tables: list[_Table]) -> _Table:
        """One table holding the sums of all."""
        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(t, name) for t in tables])

        (true_ids,), true_areas = _sum_by_key([cat("true_ids")], cat("true_areas"))
        (pred_ids,), pred_areas = _sum_by_key([cat("pred_ids")], cat("pred_areas"))
        (pair_true, pair_pred), pair_counts = _sum_by_key(
            [cat("pair_true"), cat("pair_pred")], cat("pair_counts"))
        return _Table(true_ids, true_areas, pred_ids, pred_areas, pair_true, pair_pred,
                      pair_counts)


def _without_hopeless_pairs(table: _Table, whole_pred_ids: np.ndarray,
                            min_iou: float) -> tuple[_Table, int]:
    """`table` less the pairs that cannot reach IoU `min_iou` and the predicted objects left
    with no pair, when those objects lie wholly in this block (`whole_pred_ids`): their
    overlaps and areas are then final, and IoU <= overlap / max(its area, the true
    object's area here), since the true object is at least that big. Returns the table
    and how many predicted objects were taken out (they only count)."""
    whole = np.isin(table.pred_ids, whole_pred_ids)
    ti = np.searchsorted(table.true_ids, table.pair_true)
    pi = np.searchsorted(table.pred_ids, table.pair_pred)
    bound = table.pair_counts / np.maximum(table.true_areas[ti], table.pred_areas[pi])
    keep_pair = ~whole[pi] | (bound >= min_iou)
    paired = np.zeros(len(table.pred_ids), bool)
    paired[pi[keep_pair]] = True
    keep_pred = ~whole | paired
    return _Table(table.true_ids, table.true_areas, table.pred_ids[keep_pred],
                  table.pred_areas[keep_pred], table.pair_true[keep_pair],
                  table.pair_pred[keep_pair], table.pair_counts[keep_pair]), \
        int(np.count_nonzero(~keep_pred))


def _object_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct object ids of a flat label array (sorted, uint64, 0 left out), each
    pixel's index (0 for background, i for ids[i - 1]) and each id's pixel count. Counted
    directly when the ids span little more than the pixels (a block's objects usually do,
    whatever their offset), sorted otherwise (ids up to 2**64 - 1)."""
    objects = labels != 0
    if not objects.any():
        return np.zeros(0, np.uint64), np.zeros(labels.size, np.intp), np.zeros(0, np.int64)
    low = int(labels.min(where=objects, initial=np.iinfo(labels.dtype).max))
    span = int(labels.max()) - low + 1
    if span > 4 * labels.size + 1024:
        ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if ids[0] == 0:
            return ids[1:].astype(np.uint64), inverse.ravel(), counts[1:]
        return ids.astype(np.uint64), inverse.ravel() + 1, counts
    offset = labels - labels.dtype.type(low - 1)  # objects 1..span; background wraps
    offset[~objects] = 0
    offset = offset.astype(np.intp)
    counts = np.bincount(offset, minlength=span + 1)
    present = np.flatnonzero(counts[1:]) + 1
    lookup = np.zeros(span + 1, np.intp)
    lookup[present] = np.arange(1, len(present) + 1)
    return present.astype(np.uint64) + np.uint64(low - 1), lookup[offset], counts[present]


def _pair_counts(true_index: np.ndarray, pred_index: np.ndarray,
                 n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (true index, predicted index) pairs of pixels in both objects (indices from
    1), as keys (true - 1) * n_pred + (pred - 1), sorted, with their pixel counts."""
    both = (true_index != 0) & (pred_index != 0)
    keys = (true_index[both] - 1).astype(np.int64) * n_pred + (pred_index[both] - 1)
    if keys.size and int(keys.max()) < 4 * keys.size + 1024:
        counts = np.bincount(keys)
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(keys, return_counts=True)


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} labels have dtype {labels.dtype}; object ids are integers")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError(f"{name} labels hold the negative id {labels.min()}; object ids are "
                         f"positive (0 is background)")
    return labels


def _table_of(true_labels: np.ndarray, pred_labels: np.ndarray) -> _Table:
    """One block's table from flat label arrays (ids > 0 are objects)."""
    true_ids, true_index, true_areas = _object_index(true_labels)
    pred_ids, pred_index, pred_areas = _object_index(pred_labels)
    keys, pair_counts = _pair_counts(true_index, pred_index, len(pred_ids))
    n_pred = max(len(pred_ids), 1)
    return _Table(true_ids, true_areas.astype(np.int64), pred_ids, pred_areas.astype(np.int64),
                  true_ids[keys // n_pred], pred_ids[keys % n_pred], pair_counts.astype(np.int64))


class ObjectOverlaps:
    """Areas of true and predicted objects and the pixel count of every overlapping (true id,
    predicted id) pair, summed over blocks: instance matching of an image that is never in
    memory. Ids are the label images' own (any positive integers up to 2**64 - 1, e.g. the
    global ids of out-of-core connected components), so an object crossing blocks adds up.

    Memory is O(objects + pairs): merged tables are buffered and compacted (equal ids summed)
    once the buffer outgrows the largest table, so a fold over many blocks costs about
    O(n log n) in their rows, not O(blocks * rows).
    """

    def __init__(self) -> None:
        self._tables: tuple[_Table, ...] = ()
        self._lone_predicted = 0

    @classmethod
    def _holding(cls, tables: tuple[_Table, ...], lone_predicted: int = 0) -> ObjectOverlaps:
        overlaps = cls()
        overlaps._tables = tables
        overlaps._lone_predicted = lone_predicted
        return overlaps

    @classmethod
    def of(cls, true_labels: np.ndarray, pred_labels: np.ndarray,
           valid: np.ndarray | None = None, whole_pred_ids: np.ndarray | None = None,
           min_iou: float = 0.5) -> ObjectOverlaps:
        """One block's objects and overlaps; pixels where `valid` is False are background in
        both label images (as `metrics.instance_overlaps` does).

        `whole_pred_ids`: predicted objects known to lie wholly in this block. Their pairs
        that cannot reach `min_iou` (the lowest threshold that will be scored) are dropped,
        and those left with no pair are only counted (false positives at every threshold):
        without this, the speckles of a noisy Otsu baseline are most of the rows (3.4
        million on a 16384^2 image) and memory grows with the image.
        """
        if true_labels.shape != pred_labels.shape:
            raise ValueError(f"label shapes differ: target {true_labels.shape}, "
                             f"prediction {pred_labels.shape}")
        true_labels = _check_labels("true", true_labels).ravel()
        pred_labels = _check_labels("predicted", pred_labels).ravel()
        if valid is not None:
            valid = np.asarray(valid, bool).ravel()
            true_labels, pred_labels = np.where(valid, true_labels, 0), np.where(valid,
                                                                                 pred_labels, 0)
        if true_labels.size == 0:
            return cls()
        table = _table_of(true_labels, pred_labels)
        if whole_pred_ids is None or not len(whole_pred_ids):
            return cls._holding((table,))
        table, lone = _without_hopeless_pairs(table, whole_pred_ids, min_iou)
        return cls._holding((table,), lone)

    def merge(self, other: ObjectOverlaps) -> ObjectOverlaps:
        """Both blocks' objects and overlaps (ids equal across blocks are one object)."""
        tables = self._tables + other._tables
        rows = [t.rows for t in tables]
        if len(tables) > 1 and sum(rows) - max(rows) >= max(rows):
            tables = (_Table.combined(list(tables)),)
        return self._holding(tables, self._lone_predicted + other._lone_predicted)

    def _compacted(self) -> _Table:
        if not self._tables:
            return _Table()
        if len(self._tables) > 1:
            self._tables = (_Table.combined(list(self._tables)),)
        return self._tables[0]

    @property
    def true_objects(self) -> int:
        """Distinct true ids with area > 0."""
        return len(self._compacted().true_ids)

    def scores(self, threshold: float) -> dict[str, Any]:
        """`metrics.instance_scores` of the whole image at `threshold`, ties included: pairs
        come in (true id, predicted id) order, as the oracle's renumbered pairs do."""
        table = self._compacted()
        ti = np.searchsorted(table.true_ids, table.pair_true)
        pi = np.searchsorted(table.pred_ids, table.pair_pred)
        inter = table.pair_counts
        iou = inter / (table.true_areas[ti] + table.pred_areas[pi] - inter)
        return match_scores(ti + 1, pi + 1, iou, len(table.true_ids),
                            len(table.pred_ids) + self._lone_predicted, threshold)
