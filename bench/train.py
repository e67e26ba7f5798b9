"""Does the data loader keep up with training? Samples/s of each, measured side by side.

A patch store in the layout extract_patches writes (unetflow.patchstore: Zarr v3, one chunk
per patch, shards of 16 MiB; 128x128 patches cut from synthetic nuclei) is read through the same
DataLoader the trainer uses, with the same augmentation, alone (no training): that is what
the loader can deliver. Training steps of the default demo model (depth 3, base 16,
batch 8) on batches already in memory give what training consumes.

Ratios:
  loader_to_training_ratio          loader samples/s (num_workers 0, in the training process)
                                    / training-step samples/s. Goal >= 10.
  loader_workers_to_training_ratio  the same with --workers DataLoader worker processes
                                    (default 2; a GPU node has cores for more).
  loader_rich_augment_to_training_ratio
                                    loader samples/s (num_workers 0) with every augmentation
                                    of unetflow.augment.RICH_AUGMENT (rotation, scaling,
                                    elastic deformation, gamma, blur, low resolution) at
                                    probability 1 on top of the defaults: the worst case, each
                                    sample pays for all of them / training-step samples/s.
                                    Goal >= 10.
  patch_read_vs_zarr_ratio          patches/s of reading random batches of 8 (images and
                                    targets, no augmentation) with PatchArray, as the loader
                                    does / the same through zarr's get_orthogonal_selection.

Usage: .venv/bin/python bench/train.py [--device auto|cpu|cuda] [--amp true|false|bf16|fp16]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from unetflow.augment import RICH_AUGMENT
from unetflow.config import model_section, validate_config
from unetflow.demo import synthesize_nuclei
from unetflow.patchstore import PatchArray, create_patch_array, patches_per_shard
from unetflow.train import PatchBatches, Trainer, make_loader


def write_patch_store(path: Path, n_train: int, n_val: int, patch: int, seed: int = 0) -> str:
    """Patches of a synthetic nuclei image, normalized, in the patch store's layout."""
    scene = synthesize_nuclei((1024, 1024), seed)
    image = np.asarray(scene.noisy, dtype=np.float32)
    image = (image - image.mean()) / image.std()
    labels = (np.asarray(scene.labels) > 0).astype(np.int32)
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["unetflow"] = {"task": "segmentation", "patch_shape": [patch, patch],
                               "normalize": {"method": "zscore", "clip": False},
                               "datasets": {"bench": {}}}
    for split, n in (("train", n_train), ("val", n_val)):
        per_shard = patches_per_shard((1, patch, patch), "float32", n)
        images = create_patch_array(group, f"{split}/images", n, (1, patch, patch), "float32",
                                    per_shard)
        targets = create_patch_array(group, f"{split}/targets", n, (patch, patch), "int32",
                                     per_shard)
        origins = rng.integers(0, 1024 - patch, size=(n, 2))
        images[...] = np.stack([image[y:y + patch, x:x + patch] for y, x in origins])[:, None]
        targets[...] = np.stack([labels[y:y + patch, x:x + patch] for y, x in origins])
    return str(path)


def demo_sections(device: str, amp: bool | str, steps: int) -> tuple[dict, dict]:
    """The demo's model (depth 3, base 16) and train defaults (batch 8, augmentation on)."""
    config = validate_config({
        "datasets": {"d": {"image": "i", "target": "t"}},
        "models": {"m": {"task": "segmentation", "train_on": ["d"]}},
        "model": {"depth": 3, "base_features": 16},
        "train": {"batch_size": 8, "steps": steps, "device": device, "amp": amp}})
    return model_section(config, "m", "model"), model_section(config, "m", "train")


def every_augmentation(batches: PatchBatches) -> PatchBatches:
    """The same training batches with every augmentation of the rich set at probability 1."""
    rich = copy.copy(batches)
    rich.augment = {**batches.augment,
                    **{name: {**block, "p": 1.0} for name, block in RICH_AUGMENT.items()}}
    return rich


def loader_samples_per_s(batches: PatchBatches, steps: int, workers: int) -> float:
    """Iterate the training DataLoader alone; the first batches (worker start) not timed."""
    warmup = 2 * workers + 2
    loader = iter(make_loader(batches, 0, steps + warmup, workers))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    samples = sum(len(x) for x, _ in loader)
    return samples / (time.perf_counter() - start)


def training_samples_per_s(trainer: Trainer, steps: int) -> float:
    """Optimizer steps on batches already in memory (the first two not timed)."""
    batches = [trainer.train_data[s] for s in range(steps + 2)]
    for x, y in batches[:2]:
        trainer.train_step(x, y)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for x, y in batches[2:]:
        trainer.train_step(x, y)
    sync()
    return sum(len(x) for x, _ in batches[2:]) / (time.perf_counter() - start)


def patch_reads_per_s(store: str, batches: int, through_zarr: bool) -> float:
    """Patches/s of reading random batches of 8 images and targets (no augmentation), with
    PatchArray as the loader does or through zarr's `get_orthogonal_selection`."""
    group = zarr.open_group(store, mode="r")
    arrays = [group["train/images"], group["train/targets"]]
    readers = [PatchArray(a) for a in arrays]
    rng = np.random.default_rng(0)
    picks = [np.sort(rng.choice(arrays[0].shape[0], 8, replace=False)) for _ in range(batches)]
    start = time.perf_counter()
    for index in picks:
        for array, reader in zip(arrays, readers, strict=True):
            if through_zarr:
                array.get_orthogonal_selection((index,))
            else:
                reader.read(index)
    return 8 * batches / (time.perf_counter() - start)


def parse_amp(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="true", choices=["true", "false", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--train-patches", type=int, default=512)
    parser.add_argument("--loader-steps", type=int, default=100)
    parser.add_argument("--training-steps", type=int, default=None,
                        help="default: 10 on CPU, 100 on CUDA")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = write_patch_store(Path(tmp) / "patches.zarr", args.train_patches, 32, args.patch)
        trainer = Trainer(store, tmp, "segmentation",
                          *demo_sections(args.device, parse_amp(args.amp), 1000))
        steps = args.training_steps or (100 if trainer.device.type == "cuda" else 10)
        print(f"device {trainer.device}, AMP {trainer.amp_dtype}, torch threads "
              f"{torch.get_num_threads()}, model {trainer.model.parameter_count()} parameters, "
              f"batch 8 of {args.patch}x{args.patch}", flush=True)
        reads = {way: max(patch_reads_per_s(store, 100, way == "zarr") for _ in range(3))
                 for way in ("patcharray", "zarr")}
        loader0 = loader_samples_per_s(trainer.train_data, args.loader_steps, 0)
        loader_n = loader_samples_per_s(trainer.train_data, args.loader_steps, args.workers)
        loader_rich = loader_samples_per_s(every_augmentation(trainer.train_data),
                                           args.loader_steps, 0)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        training = training_samples_per_s(trainer, steps)
    print(f"patch_reads_per_s: {reads['patcharray']:.0f}")
    print(f"patch_reads_zarr_per_s: {reads['zarr']:.0f}")
    print(f"patch_read_vs_zarr_ratio: {reads['patcharray'] / reads['zarr']:.1f}")
    print(f"loader_samples_per_s: {loader0:.1f}")
    print(f"loader_workers: {args.workers}")
    print(f"loader_workers_samples_per_s: {loader_n:.1f}")
    print(f"loader_rich_augment_samples_per_s: {loader_rich:.1f}")
    print(f"training_samples_per_s: {training:.2f}")
    print(f"loader_to_training_ratio: {loader0 / training:.1f}")
    print(f"loader_workers_to_training_ratio: {loader_n / training:.1f}")
    print(f"loader_rich_augment_to_training_ratio: {loader_rich / training:.1f}")
    if trainer.device.type == "cuda":
        print(f"gpu_peak_memory_mib: {torch.cuda.max_memory_allocated() / 2**20:.0f}")


if __name__ == "__main__":
    main()
