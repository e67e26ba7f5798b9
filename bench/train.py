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
  trainer_vs_plain_loop_ratio       samples/s of unetflow.train.Trainer.run (augmentations off,
                                    validation pushed past the run: validate_every > steps)
                                    / samples/s of a plain PyTorch loop of the same network
                                    (build_unet, the demo's depth 3, base 16, channels-last),
                                    loss (build_loss, ce_dice), optimizer (build_optimizer),
                                    batch (8 of 64x64) and store (320 training / 80
                                    validation patches, the demo's size), read in the loop with
                                    PatchArray. Both stamp the end of every step from step 2
                                    to step --overhead-steps (construction, warm-up and the
                                    final save left out); the rate is the batch over the
                                    median step, so that a moment of load on this shared
                                    machine does not decide it; best of --repeats runs each,
                                    taking turns. Goal >= 0.9.
  trainer_defaults_vs_plain_loop_ratio
                                    the same with the trainer's defaults: augmentations on
                                    (flips, rotate90, intensity) and validate_every 50, so
                                    the 50 timed steps hold one validation, as the demo's run
                                    (the median leaves that step out; the mean below keeps it).
  ..._mean_step_ratio               both ratios over the mean step instead: every step and
                                    every outlier counts, the validation step included.
Then the trainer's overhead is broken down in seconds per demo run (600 steps, 12
validations): process start, construction, steady steps beyond the plain loop's (gradient
clipping, train mode, progress bar within them), augmentation, validation (IoU metric),
checkpoints, log and curve; plus the Dice term of the loss, which both loops pay.

Last, training on several processes (train.gpus, DistributedDataParallel):
  ranks2_vs_1_samples_ratio         samples/s of `unetflow train` with train.gpus 2 (two
                                    ranks: Gloo on the CPU, NCCL on 2 GPUs) / the same with
                                    one process; demo model with group norm, batch 8 (4 per
                                    rank), each rate from the difference of a short and a
                                    long run. On the CPU both share the same cores: no
                                    speed-up is expected, the ratio shows what the
                                    all-reduce and the split cost. On one GPU: n/a.

Usage: .venv/bin/python bench/train.py [--device auto|cpu|cuda] [--amp true|false|bf16|fp16]
       [--overhead-steps 52] [--repeats 3] [--ranks-steps 10 110]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from unetflow.augment import RICH_AUGMENT
from unetflow.config import model_section, validate_config
from unetflow.demo import synthesize_nuclei
from unetflow.losses import build_loss
from unetflow.model.checkpoint import (
    autocast_dtype,
    choose_device,
    load_checkpoint,
    save_checkpoint,
)
from unetflow.model.inference import memory_format_for
from unetflow.model.unet import build_unet, layer_settings
from unetflow.patchstore import PatchArray, create_patch_array, patches_per_shard
from unetflow.targets import network_classes
from unetflow.train import (
    PatchBatches,
    Trainer,
    build_optimizer,
    default_loss,
    make_loader,
    plot_loss_curve,
    validation_metric,
    write_log,
)


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


# --- the trainer's own overhead against a plain PyTorch loop (issue 19, item 7) ----------
DEMO_STEPS, DEMO_VALIDATE_EVERY, DEMO_PATCH, DEMO_TRAIN, DEMO_VAL = 600, 50, 64, 320, 80
AUGMENT_OFF = {"flips": False, "rotate90": False, "intensity": 0.0}


def overhead_sections(device: str, amp: bool | str, augment: bool, validate: bool
                      ) -> tuple[dict, dict]:
    """The demo's nuclei_seg model and training (600 steps, validate_every 50, lr 0.002),
    with the default augmentations or none, with validation or with it pushed past the run."""
    config = validate_config({
        "datasets": {"d": {"image": "i", "target": "t"}},
        "models": {"m": {"task": "segmentation", "train_on": ["d"]}},
        "model": {"depth": 3, "base_features": 16},
        "train": {"batch_size": 8, "steps": DEMO_STEPS, "learning_rate": 0.002,
                  "validate_every": DEMO_VALIDATE_EVERY if validate else DEMO_STEPS + 1,
                  "device": device, "amp": amp, **({} if augment else {"augment": AUGMENT_OFF})}})
    return model_section(config, "m", "model"), model_section(config, "m", "train")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rates(stamps: list[float], batch: int) -> dict[str, float]:
    """Samples/s from the ends of steps 2.. : over the median step (the headline: a loaded or
    throttled moment of this shared machine falls on one step, not on the figure) and over
    the mean step (every step, outliers included)."""
    durations = np.diff(stamps[1:])
    return {"samples_per_s": batch / float(np.median(durations)),
            "mean_samples_per_s": batch / float(durations.mean())}


def plain_loop_samples_per_s(store: str, sections: tuple[dict, dict], steps: int
                             ) -> dict[str, float]:
    """The loop a user writes by hand: random batches read with PatchArray, forward, loss,
    backward, optimizer step; the same network (channels-last, autocast as the trainer's),
    loss and optimizer; no clipping, schedule, logging or validation. First two untimed;
    every step's end stamped, as the trainer's (`step_rates`)."""
    model_settings, settings = sections
    device = choose_device(settings["device"], "device")
    group = zarr.open_group(store, mode="r")
    images, targets = PatchArray(group["train/images"]), PatchArray(group["train/targets"])
    fmt = memory_format_for(2)
    model = build_unet(layer_settings(model_settings), 2, images.shape[1],
                       network_classes(model_settings)).to(device, memory_format=fmt)
    loss_fn = build_loss("segmentation", default_loss("segmentation"), None, None)
    optimizer, amp = build_optimizer(model, settings), autocast_dtype(device, settings["amp"])
    rng, batch = np.random.default_rng(0), settings["batch_size"]
    model.train()
    stamps = []
    for _ in range(steps):
        index = np.sort(rng.choice(images.shape[0], batch, replace=False))
        x = torch.from_numpy(images.read(index)).to(device).contiguous(memory_format=fmt)
        y = torch.from_numpy(targets.read(index)).to(device).long()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        loss_fn(out.float(), y).backward()
        optimizer.step()
        synchronize(device)
        stamps.append(time.perf_counter())
    return step_rates(stamps, batch)


def fastest(repeats: int, run: Callable[[], object]) -> float:
    """Best-of-`repeats` seconds of one call of `run`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def timed_trainer_run(store: str, sections: tuple[dict, dict], steps: int) -> dict[str, float]:
    """Trainer construction, then run(until=steps) in a fresh directory with every step's
    end stamped: samples/s from the end of step 2 to the end of step `steps`, the seconds
    of construction, of the first two steps (from the call of run) and of the final save."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = Trainer(store, out, "segmentation", *sections)
        built = time.perf_counter()
        stamps, one_step = [], trainer._one_step

        def timed_step(x: torch.Tensor, y: torch.Tensor, stop_requested: bool = False) -> bool:
            stop = one_step(x, y, stop_requested)
            synchronize(trainer.device)
            stamps.append(time.perf_counter())
            return stop

        trainer._one_step = timed_step
        trainer.run(until=steps)
        done = time.perf_counter()
    batch = trainer.settings["batch_size"]
    return {**step_rates(stamps, batch),
            "construction_s": built - start, "first_two_s": stamps[1] - built,
            "final_save_s": done - stamps[-1]}


def best_of(repeats: int, runs: dict[str, Callable[[], dict[str, float]]]
            ) -> dict[str, dict[str, float]]:
    """Best of `repeats` rounds for each figure (highest rate, fewest seconds); the runs take
    turns within a round, so that load from other work falls on all of them alike."""
    rounds = [{name: run() for name, run in runs.items()} for _ in range(repeats)]
    return {name: {key: (max if key.endswith("per_s") else min)(r[name][key] for r in rounds)
                   for key in rounds[0][name]} for name in runs}


def per_call_s(repeats: int, calls: int, run: Callable[[], object]) -> float:
    """Seconds of one call of `run`: best of `repeats` timings of `calls` calls."""
    return fastest(repeats, lambda: [run() for _ in range(calls)]) / calls


def import_s(repeats: int) -> float:
    """A new process importing torch and unetflow's trainer (the job's start, before Trainer)."""
    command = [sys.executable, "-c", "import unetflow.train"]
    return fastest(repeats, lambda: subprocess.run(command, check=True))


def loss_backward_s(repeats: int, name: str, classes: int, device: torch.device) -> float:
    """Seconds of one forward and backward of loss `name` on demo-sized logits and labels."""
    rng = torch.Generator().manual_seed(0)
    shape = (8, DEMO_PATCH, DEMO_PATCH)
    logits = torch.randn((8, classes, *shape[1:]), generator=rng).to(device).requires_grad_()
    labels = torch.randint(0, classes, shape, generator=rng).to(device)
    loss_fn = build_loss("segmentation", name, None, None)

    def step() -> None:
        loss_fn(logits, labels).backward()
        synchronize(device)

    return per_call_s(repeats, 50, step)


def clip_s(repeats: int, trainer: Trainer) -> float:
    """Seconds of one clip_grad_norm_ over the model's gradients (train.grad_clip)."""
    x, y = trainer._to_device(*trainer.train_data[0])
    trainer.loss_fn(trainer.compiled(x).float(), y).backward()
    return per_call_s(repeats, 50, lambda: torch.nn.utils.clip_grad_norm_(
        trainer.model.parameters(), trainer.settings["grad_clip"]))


def augmentation_s(repeats: int, trainer: Trainer) -> float:
    """Seconds the default augmentations add to reading one training batch."""
    plain = copy.copy(trainer.train_data)
    plain.augment = None
    steps = range(20)
    with_augment = fastest(repeats, lambda: [trainer.train_data[s] for s in steps])
    return (with_augment - fastest(repeats, lambda: [plain[s] for s in steps])) / len(steps)


def tqdm_s(repeats: int, enabled: bool) -> float:
    """Seconds per step of the progress bar's update and postfix, shown or disabled."""
    from tqdm import tqdm

    def run() -> None:
        bar = tqdm(total=DEMO_STEPS, file=io.StringIO(), disable=not enabled, mininterval=0.1)
        for _ in range(DEMO_STEPS):
            bar.update(1)
            bar.set_postfix(loss=f"{0.5:.4g}", refresh=False)
        bar.close()

    return fastest(repeats, run) / DEMO_STEPS


def log_files_s(repeats: int, trainer: Trainer, out: Path) -> float:
    """Seconds of the CSV log and the loss curve of a 600-step history (train_model's end)."""
    history = [{"step": s, "loss": 1 / s, "learning_rate": 0.002,
                "val_loss": 1 / s if s % DEMO_VALIDATE_EVERY == 0 else "",
                "val_metric": 0.5 if s % DEMO_VALIDATE_EVERY == 0 else ""}
               for s in range(1, DEMO_STEPS + 1)]
    return fastest(repeats, lambda: (write_log(history, out / "log.csv"),
                                     plot_loss_curve(history, out / "curve.png", "segmentation")))


def checkpoint_s(repeats: int, trainer: Trainer, out: Path) -> tuple[float, float]:
    """Seconds of one save_checkpoint(payload()) and of one load_checkpoint."""
    path = out / "state.pt"
    save = fastest(repeats, lambda: save_checkpoint(path, trainer.payload()))
    return save, fastest(repeats, lambda: load_checkpoint(path))


def validation_s(repeats: int, trainer: Trainer) -> tuple[float, float]:
    """Seconds of one validation (all validation patches) and of its IoU metric alone."""
    whole = fastest(repeats, trainer.validate)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(trainer.val_data), trainer.settings["batch_size"]):
            x, y = trainer._to_device(*trainer.val_data.patches(start, start + 8))
            outputs.append((trainer.compiled(x).float(), y))
    metric = fastest(repeats, lambda: [validation_metric("segmentation", out, y, None)
                                       for out, y in outputs])
    return whole, metric


def overhead_breakdown(store: str, sections: tuple[dict, dict], runs: dict[str, dict],
                       repeats: int) -> dict[str, float]:
    """Seconds per demo run (600 steps of 8, 12 validations) of each part of the trainer
    that a plain loop does not have; rows starting with '  ' are part of the row above."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(store, tmp, "segmentation", *sections)
        save, load = checkpoint_s(repeats, trainer, Path(tmp))
        validation, metric = validation_s(repeats, trainer)
        samples = DEMO_STEPS * trainer.settings["batch_size"]
        validations = DEMO_STEPS // DEMO_VALIDATE_EVERY
        step_s = trainer.settings["batch_size"] / runs["trainer"]["samples_per_s"]
        dice = (loss_backward_s(repeats, "ce_dice", 2, trainer.device)
                - loss_backward_s(repeats, "ce", 2, trainer.device))
        return {
            "process start (import torch, unetflow)": import_s(repeats),
            "Trainer construction (store checks, fingerprint, model)":
                runs["trainer"]["construction_s"],
            "first two steps beyond two steady ones": runs["trainer"]["first_two_s"] - 2 * step_s,
            "steady steps beyond the plain loop's": samples * (
                1 / runs["trainer"]["samples_per_s"] - 1 / runs["plain"]["samples_per_s"]),
            "  gradient clipping (train.grad_clip 1.0)": DEMO_STEPS * clip_s(repeats, trainer),
            "  train mode and encoder freeze check": DEMO_STEPS * per_call_s(
                repeats, 50, lambda: trainer._set_train_mode(False)),
            "  progress bar (disabled: stderr is a log file)": DEMO_STEPS * tqdm_s(repeats, False),
            "default augmentations (flips, rotate90, intensity)":
                DEMO_STEPS * augmentation_s(repeats, trainer),
            f"validation ({validations} x {len(trainer.val_data)} patches)":
                validations * validation,
            "  IoU metric": validations * metric,
            f"checkpoints at validations ({validations} last + {validations} best at most)":
                2 * validations * save,
            "end: final state, best and last checkpoints": runs["trainer"]["final_save_s"]
                + 2 * save + load,
            "end: CSV log and loss curve": log_files_s(repeats, trainer, Path(tmp)),
            "(not in the trainer's count) Dice term of ce_dice, in both loops": DEMO_STEPS * dice,
            "(not in a job) progress bar shown on a terminal": DEMO_STEPS * tqdm_s(repeats, True),
        }


def report_overhead(device: str, amp: bool | str, steps: int, repeats: int) -> None:
    """Trainer against the plain loop on a store of the demo's size, then the breakdown."""
    with tempfile.TemporaryDirectory() as tmp:
        store = write_patch_store(Path(tmp) / "demo.zarr", DEMO_TRAIN, DEMO_VAL, DEMO_PATCH)
        bare = overhead_sections(device, amp, augment=False, validate=False)
        defaults = overhead_sections(device, amp, augment=True, validate=True)
        plain_loop_samples_per_s(store, bare, 4)  # warm-up: the first run in a process lags
        runs = best_of(repeats, {
            "plain": lambda: plain_loop_samples_per_s(store, bare, steps),
            "trainer": lambda: timed_trainer_run(store, bare, steps),
            "defaults": lambda: timed_trainer_run(store, defaults, steps)})
        rows = overhead_breakdown(store, bare, runs, repeats)
    rates = {name: run["samples_per_s"] for name, run in runs.items()}
    print(f"overhead_setup: demo model and store (batch 8 of {DEMO_PATCH}x{DEMO_PATCH}, "
          f"{DEMO_TRAIN} training / {DEMO_VAL} validation patches), steps 3..{steps} timed, "
          f"best of {repeats}")
    print(f"plain_loop_samples_per_s: {rates['plain']:.1f}")
    print(f"trainer_samples_per_s: {rates['trainer']:.1f}")
    print(f"trainer_defaults_samples_per_s: {rates['defaults']:.1f}")
    means = {name: run["mean_samples_per_s"] for name, run in runs.items()}
    print(f"trainer_vs_plain_loop_ratio: {rates['trainer'] / rates['plain']:.2f}")
    print(f"trainer_defaults_vs_plain_loop_ratio: {rates['defaults'] / rates['plain']:.2f}")
    print(f"trainer_vs_plain_loop_mean_step_ratio: {means['trainer'] / means['plain']:.2f}")
    print(f"trainer_defaults_vs_plain_loop_mean_step_ratio: "
          f"{means['defaults'] / means['plain']:.2f}")
    samples = DEMO_STEPS * 8
    print(f"overhead per demo run ({DEMO_STEPS} steps), seconds; plain loop's steps "
          f"{samples / rates['plain']:.1f}:")
    for name, seconds in rows.items():
        print(f"  {name:<72} {seconds:7.2f}")
    counted = sum(s for name, s in rows.items() if not name.startswith(("  ", "(")))
    print(f"overhead_total_s_per_demo_run: {counted:.1f}")
    print(f"estimated_job_samples_per_s: {samples / (samples / rates['plain'] + counted):.1f}")


def rank_sections(device: str, amp: bool | str, gpus: int, steps: int) -> tuple[dict, dict]:
    """The demo's model with group norm (PyTorch has no SyncBatchNorm on the CPU), defaults
    otherwise (augmentation on), batch 8 over `gpus` ranks; validation only at the end."""
    config = validate_config({
        "datasets": {"d": {"image": "i", "target": "t"}},
        "models": {"m": {"task": "segmentation", "train_on": ["d"]}},
        "model": {"depth": 3, "base_features": 16, "norm": "group"},
        "train": {"batch_size": 8, "steps": steps, "learning_rate": 0.002, "gpus": gpus,
                  "validate_every": steps, "device": device, "amp": amp}})
    return model_section(config, "m", "model"), model_section(config, "m", "train")


def cli_train_s(store: str, sections: tuple[dict, dict], threads: int) -> float:
    """Wall seconds of `unetflow train` as the rule runs it, in a fresh folder."""
    import json

    model, train = sections
    with tempfile.TemporaryDirectory() as out:
        outputs = [arg for name in ("best", "last", "log", "curve")
                   for arg in (f"--{name}", str(Path(out) / name))]
        command = [str(Path(sys.executable).with_name("unetflow")), "train", "--store", store,
                   "--model-dir", out, "--task", "segmentation", "--model-settings",
                   json.dumps(model), "--settings", json.dumps(train), "--threads",
                   str(threads), *outputs]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start


def ranks_samples_per_s(store: str, device: str, amp: bool | str, gpus: int,
                        steps: tuple[int, int], repeats: int) -> float:
    """Samples/s of `unetflow train` with train.gpus ranks: (long - short steps) x batch over
    the difference of the two runs' wall times, so that process start, the rendezvous,
    construction, the one validation and the final writes cancel. The job's threads (this
    machine's cores) are shared by its ranks. Best of `repeats`."""
    threads = len(os.sched_getaffinity(0))
    short, long = steps
    seconds = [cli_train_s(store, rank_sections(device, amp, gpus, n), threads)
               for _ in range(repeats) for n in (short, long)]
    best = min(seconds[1::2]) - min(seconds[0::2])
    return (long - short) * 8 / best


def report_ranks(device: str, amp: bool | str, steps: tuple[int, int], repeats: int) -> None:
    """2 ranks against 1 process, the whole job's samples/s. On the CPU (Gloo) the two ranks
    share the cores one process has: expect no speed-up, only the cost of the all-reduce."""
    gpus_here = torch.cuda.device_count() if device != "cpu" else 0
    if device == "cuda" and gpus_here < 2:
        print(f"ranks2_vs_1_samples_ratio: n/a (2 ranks need 2 GPUs; this node has "
              f"{gpus_here})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = write_patch_store(Path(tmp) / "demo.zarr", DEMO_TRAIN, DEMO_VAL, DEMO_PATCH)
        rates = {gpus: ranks_samples_per_s(store, device, amp, gpus, steps, repeats)
                 for gpus in (1, 2)}
    where = "GPUs (NCCL)" if device == "cuda" else "CPU ranks (Gloo)"
    print(f"ranks_setup: `unetflow train`, demo model with group norm, batch 8 of "
          f"{DEMO_PATCH}x{DEMO_PATCH}, steps {steps[0]}..{steps[1]} timed by difference, "
          f"best of {repeats}, {len(os.sched_getaffinity(0))} cores")
    print(f"ranks1_samples_per_s: {rates[1]:.1f}")
    print(f"ranks2_samples_per_s: {rates[2]:.1f}  ({where})")
    print(f"ranks2_vs_1_samples_ratio: {rates[2] / rates[1]:.2f}")


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
    parser.add_argument("--overhead-steps", type=int, default=52,
                        help="steps of each trainer/plain-loop run (3.. timed; the default "
                             "times 50, one validation as in the demo's run)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each overhead measurement; the best is reported")
    parser.add_argument("--ranks-steps", type=int, nargs=2, default=[10, 110],
                        metavar=("SHORT", "LONG"),
                        help="steps of the two `unetflow train` runs whose difference times "
                             "1 process and 2 ranks")
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
    report_overhead(args.device, parse_amp(args.amp), args.overhead_steps, args.repeats)
    report_ranks(args.device, parse_amp(args.amp), tuple(args.ranks_steps), args.repeats)


if __name__ == "__main__":
    main()
