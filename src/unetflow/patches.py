"""Sampling training and validation patches, and writing them to a Zarr v3 patch store.

Validation patches never share a pixel with training patches: with `validation: block` each
image is split along its last axis into a training region and a held-out validation region,
separated by a gap of half a patch; with `validation: image` whole datasets are held out.
Normalization is applied once, at extraction, with each dataset's own statistics, so training
reads ready-to-use patches many times over at no extra cost, and datasets of different
intensity ranges are pooled on a common scale.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from unetflow.normalize import normalize_array, read_stats
from unetflow.ome import channel_first, open_image

__all__ = [
    "DatasetInput",
    "PatchError",
    "Region",
    "split_regions",
    "sample_origins",
    "extract_patches",
    "prepare_target",
    "read_manifest",
]

MANIFEST_FIELDS = ["index", "dataset", "split", "origin", "shape", "foreground_fraction", "kind"]


class PatchError(ValueError):
    """Patches cannot be sampled as configured from this data."""


@dataclass(frozen=True)
class DatasetInput:
    """What patch extraction needs to know of one dataset."""

    name: str
    image: str
    target: str
    stats: str
    channels: list | None = None


@dataclass(frozen=True)
class Region:
    """A box [start, stop) in spatial pixel coordinates, assigned to one split."""

    split: str
    start: tuple[int, ...]
    stop: tuple[int, ...]

    def fits(self, shape: tuple[int, ...]) -> bool:
        return all(b - a >= s for a, b, s in zip(self.start, self.stop, shape, strict=True))


def split_regions(spatial_shape: tuple[int, ...], patch_shape: tuple[int, ...], mode: str,
                  fraction: float, held_out: bool) -> list[Region]:
    """Training and validation regions of one image.

    `block`: the last `fraction` of the last axis is validation, a gap of half a patch lies
    between the two. `image`: the whole image belongs to one split (`held_out` → validation).
    """
    zeros = tuple(0 for _ in spatial_shape)
    if mode == "image":
        return [Region("val" if held_out else "train", zeros, tuple(spatial_shape))]
    width, p = spatial_shape[-1], patch_shape[-1]
    val_width = max(p, int(round(width * fraction)))
    gap = p // 2
    train_stop = width - val_width - gap
    if train_stop < p:
        raise PatchError(f"image of shape {tuple(spatial_shape)} is too small to hold a training "
                         f"block, a gap of {gap} px and a validation block of {val_width} px "
                         f"with patches of {tuple(patch_shape)}; use validation: image or "
                         f"smaller patches")
    train = Region("train", zeros, tuple(spatial_shape[:-1]) + (train_stop,))
    val = Region("val", zeros[:-1] + (width - val_width,), tuple(spatial_shape))
    return [train, val]


def prepare_target(target: np.ndarray, task: str, num_classes: int,
                   ignore_label: int | None) -> np.ndarray:
    """Segmentation targets as class indices; with 2 classes any nonzero label is foreground."""
    if task != "segmentation":
        return target.astype(np.float32)
    out = target.astype(np.int64)
    if num_classes == 2:
        binary = (out != 0).astype(np.int64)
        if ignore_label is not None:
            binary[out == ignore_label] = ignore_label
        out = binary
    return out.astype(np.int32)


def _foreground(target: np.ndarray, ignore_label: int | None) -> np.ndarray:
    fg = target != 0
    if ignore_label is not None:
        fg &= target != ignore_label
    return fg


def _chunk_slices(region: Region, chunk: tuple[int, ...]) -> list[tuple[slice, ...]]:
    ranges = [range(a, b, c) for a, b, c in zip(region.start, region.stop, chunk, strict=True)]
    grid = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(chunk))
    return [tuple(slice(s, min(s + c, b)) for s, c, b in zip(o, chunk, region.stop, strict=True))
            for o in grid]


def _foreground_chunks(labels: da.Array, region: Region, ignore_label: int | None
                       ) -> tuple[list[tuple[slice, ...]], np.ndarray]:
    """Chunk-sized boxes of the region and their foreground counts, computed chunk by chunk."""
    chunk = tuple(c[0] for c in labels.chunks)
    boxes = _chunk_slices(region, chunk)
    counts = dask.compute(*[_foreground(labels[b], ignore_label).sum() for b in boxes])
    return boxes, np.asarray(counts, dtype=np.int64)


def _origin_around(point: np.ndarray, region: Region, patch: tuple[int, ...],
                   rng: np.random.Generator) -> tuple[int, ...]:
    jitter = np.array([rng.integers(-(p // 4), p // 4 + 1) for p in patch])
    origin = point - np.array(patch) // 2 + jitter
    lo, hi = np.array(region.start), np.array(region.stop) - np.array(patch)
    return tuple(int(v) for v in np.clip(origin, lo, hi))


def _random_origin(region: Region, patch: tuple[int, ...], rng: np.random.Generator
                   ) -> tuple[int, ...]:
    return tuple(int(rng.integers(a, b - p + 1))
                 for a, b, p in zip(region.start, region.stop, patch, strict=True))


def sample_origins(labels: da.Array | None, region: Region, patch: tuple[int, ...], count: int,
                   settings: dict[str, Any], rng: np.random.Generator, dataset: str,
                   ignore_label: int | None = None) -> list[tuple[tuple[int, ...], str]]:
    """`count` patch origins inside `region`: a fraction forced onto foreground, the rest uniform.

    Returns (origin, kind) pairs, kind being 'foreground' or 'uniform'. Foreground locations
    are drawn by picking a chunk weighted by its foreground count, then a pixel inside it, so
    only one chunk of labels is in memory at a time.
    """
    n_fg = int(round(count * settings["foreground_fraction"])) if labels is not None else 0
    origins: list[tuple[tuple[int, ...], str]] = []
    if n_fg:
        boxes, counts = _foreground_chunks(labels, region, ignore_label)
        if counts.sum() == 0:
            raise PatchError(f"dataset '{dataset}': the target has no foreground in the "
                             f"{region.split} region, so foreground-oversampled patches "
                             f"(patches.foreground_fraction={settings['foreground_fraction']}) "
                             f"cannot be drawn; check the label image or set the fraction to 0")
        picks = rng.choice(len(boxes), size=n_fg, p=counts / counts.sum())
        for box_index in picks:
            box = boxes[box_index]
            block = _foreground(np.asarray(labels[box]), ignore_label)
            points = np.argwhere(block)
            point = points[rng.integers(len(points))] + np.array([s.start for s in box])
            origins.append((_origin_around(point, region, patch, rng), "foreground"))
    for _ in range(count - n_fg):
        origins.append((_random_origin(region, patch, rng), "uniform"))
    return origins


def _patch_slices(origin: tuple[int, ...], patch: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))


def _accept(target_patch: np.ndarray, settings: dict, ignore_label: int | None, task: str) -> bool:
    if task != "segmentation":
        return True
    if ignore_label is not None and np.all(target_patch == ignore_label):
        return False
    return _foreground(target_patch, ignore_label).mean() >= settings["min_foreground"]


def _open_pair(ds: DatasetInput, task: str, level: int) -> tuple[da.Array, da.Array]:
    image = channel_first(open_image(ds.image, level=level), ds.channels)
    target = channel_first(open_image(ds.target, level=level))
    if target.shape[1:] != image.shape[1:]:
        raise PatchError(f"dataset '{ds.name}': image {ds.image} has spatial shape "
                         f"{image.shape[1:]} but target {ds.target} has {target.shape[1:]}")
    if task == "segmentation":
        if not np.issubdtype(target.dtype, np.integer):
            raise PatchError(f"dataset '{ds.name}': segmentation target {ds.target} has dtype "
                             f"{target.dtype}; it must hold integer labels")
        target = target[0]
    return image, target


def _draw_dataset_patches(ds: DatasetInput, image: da.Array, target: da.Array, task: str,
                          settings: dict, rng: np.random.Generator, held_out: bool,
                          ignore_label: int | None) -> list[dict]:
    spatial = image.shape[1:]
    patch = tuple(settings["shape"])
    if len(patch) != len(spatial) or any(p > s for p, s in zip(patch, spatial, strict=True)):
        raise PatchError(f"dataset '{ds.name}': patch shape {patch} does not fit the image of "
                         f"spatial shape {spatial}; use patches.shape no larger than the image")
    n_total = settings["per_dataset"]
    if settings.get("per_megapixel"):
        n_total = max(1, int(round(settings["per_megapixel"] * np.prod(spatial) / 1e6)))
    regions = split_regions(spatial, patch, settings["validation"],
                            settings["validation_fraction"], held_out)
    labels = target if task == "segmentation" else None
    records = []
    for region in regions:
        if settings["validation"] == "block":
            share = settings["validation_fraction"] if region.split == "val" else \
                1 - settings["validation_fraction"]
        else:
            share = 1.0
        count = max(1, int(round(n_total * share)))
        accepted: list[dict] = []
        for _attempt in range(settings["max_attempts"]):
            need = count - len(accepted)
            if need == 0:
                break
            for origin, kind in sample_origins(labels, region, patch, need, settings, rng,
                                               ds.name, ignore_label):
                t = np.asarray(target[_patch_slices(origin, patch)] if labels is not None
                               else np.zeros(1))
                if _accept(t, settings, ignore_label, task):
                    accepted.append({"dataset": ds.name, "split": region.split, "origin": origin,
                                     "kind": kind})
        if len(accepted) < count:
            raise PatchError(f"dataset '{ds.name}': only {len(accepted)} of {count} "
                             f"{region.split} patches met patches.min_foreground="
                             f"{settings['min_foreground']} after {settings['max_attempts']} "
                             f"attempts; the labels are too sparse for this filter: lower it")
        records.extend(accepted)
    return records


def _create_arrays(group: zarr.Group, split: str, n: int, image_channels: int,
                   target_shape_extra: tuple[int, ...], patch: tuple[int, ...],
                   target_dtype) -> tuple[zarr.Array, zarr.Array]:
    sub = group.require_group(split)
    images = sub.create_array("images", shape=(n, image_channels, *patch), dtype="float32",
                              chunks=(1, image_channels, *patch))
    targets = sub.create_array("targets", shape=(n, *target_shape_extra, *patch),
                               dtype=target_dtype, chunks=(1, *target_shape_extra, *patch))
    return images, targets


def _write_records(records: list[dict], pairs: dict, group: zarr.Group, patch: tuple[int, ...],
                   task: str, normalize: dict, num_classes: int, ignore_label: int | None,
                   batch: int = 32) -> None:
    for split in ("train", "val"):
        chosen = [r for r in records if r["split"] == split]
        if not chosen:
            continue
        image0, target0 = pairs[chosen[0]["dataset"]][:2]
        extra = () if task == "segmentation" else (target0.shape[0],)
        images, targets = _create_arrays(group, split, len(chosen), image0.shape[0], extra, patch,
                                         "int32" if task == "segmentation" else "float32")
        for start in range(0, len(chosen), batch):
            part = chosen[start:start + batch]
            lazy = []
            for r in part:
                image, target, stats = pairs[r["dataset"]]
                sl = _patch_slices(r["origin"], patch)
                lazy.append((image[(slice(None), *sl)],
                             target[sl] if task == "segmentation" else target[(slice(None), *sl)]))
            loaded = dask.compute(*lazy)
            for offset, (r, (img, tgt)) in enumerate(zip(part, loaded, strict=True)):
                stats = pairs[r["dataset"]][2]
                i = start + offset
                images[i] = normalize_array(img, stats, normalize["method"], normalize["clip"])
                tgt = prepare_target(tgt, task, num_classes, ignore_label)
                if task != "segmentation":
                    tgt = normalize_array(tgt, stats, normalize["method"], normalize["clip"])
                targets[i] = tgt
                r["index"] = i
                r["foreground_fraction"] = (float(_foreground(tgt, ignore_label).mean())
                                            if task == "segmentation" else "")


def write_manifest(records: list[dict], path: Path, patch: tuple[int, ...]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, delimiter="\t")
        writer.writeheader()
        for r in records:
            writer.writerow({**{k: r.get(k, "") for k in MANIFEST_FIELDS},
                             "origin": ",".join(map(str, r["origin"])),
                             "shape": ",".join(map(str, patch))})


def read_manifest(path: str | Path) -> list[dict]:
    """Manifest rows with origins and shapes as int tuples."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        row["origin"] = tuple(int(v) for v in row["origin"].split(","))
        row["shape"] = tuple(int(v) for v in row["shape"].split(","))
        row["index"] = int(row["index"])
    return rows


def extract_patches(datasets: list[DatasetInput], task: str, settings: dict[str, Any],
                    normalize: dict[str, Any], num_classes: int, ignore_label: int | None,
                    store: str | Path, manifest: str | Path) -> list[dict]:
    """Sample patches of all `datasets`, normalize them and write store and manifest.

    The store is written under a temporary name and renamed when complete.
    """
    rng = np.random.default_rng(settings["seed"])
    pairs, records = {}, []
    for ds in datasets:
        stats = read_stats(ds.stats)
        image, target = _open_pair(ds, task, stats["level"])
        pairs[ds.name] = (image, target, stats)
        held_out = ds.name in settings.get("validation_datasets", [])
        records += _draw_dataset_patches(ds, image, target, task, settings, rng, held_out,
                                         ignore_label)
    if settings["validation"] == "image" and not any(r["split"] == "val" for r in records):
        raise PatchError("patches.validation is 'image' but patches.validation_datasets names "
                         "none of the training datasets; list the held-out ones there")
    store, manifest = Path(store), Path(manifest)
    tmp = store.with_name(store.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    group.attrs["unetflow"] = {"task": task, "patch_shape": list(settings["shape"]),
                               "normalize": normalize,
                               "datasets": {n: p[2] for n, p in pairs.items()}}
    patch = tuple(settings["shape"])
    _write_records(records, pairs, group, patch, task, normalize, num_classes, ignore_label)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(records, manifest, patch)
    if store.exists():
        shutil.rmtree(store)
    tmp.rename(store)
    return records
