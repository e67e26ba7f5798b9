"""Training a U-Net on a patch store: resumable, preemption-safe, with validation and logs.

Resume state lives in `<model dir>/train_state/last.pt`, which is not a Snakemake output:
Snakemake deletes the outputs of a failed job, and a preempted job must keep its progress.
Each step's batch and augmentation are drawn from a generator seeded by (seed, step), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from unetflow.losses import build_loss
from unetflow.model.unet import UNet, build_unet

__all__ = [
    "PatchBatches",
    "Preempted",
    "augment_batch",
    "choose_device",
    "load_checkpoint",
    "save_checkpoint",
    "train_model",
    "default_loss",
]

LOG_FIELDS = ["step", "loss", "val_loss", "val_metric", "learning_rate"]


class Preempted(RuntimeError):
    """SIGTERM arrived; the last state was saved and the job should exit non-zero."""


def default_loss(task: str) -> str:
    return "ce_dice" if task == "segmentation" else "mse"


def choose_device(requested: str) -> torch.device:
    """`auto` takes CUDA when a GPU is really usable, else the CPU (SLURM may set
    CUDA_VISIBLE_DEVICES on nodes without a working GPU)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is available; use 'auto'")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class PatchBatches(torch.utils.data.Dataset):
    """Item `step` is the batch for that training step, read lazily from the patch store."""

    def __init__(self, store: str, split: str, batch_size: int, seed: int,
                 augment: dict[str, Any] | None, task: str, ignore_label: int | None) -> None:
        self.store, self.split, self.batch_size, self.seed = store, split, batch_size, seed
        self.augment, self.task, self.ignore_label = augment, task, ignore_label
        self._arrays: tuple[zarr.Array, zarr.Array] | None = None

    def arrays(self) -> tuple[zarr.Array, zarr.Array]:
        if self._arrays is None:  # opened in each worker process, never pickled open
            group = zarr.open_group(self.store, mode="r")
            self._arrays = (group[f"{self.split}/images"], group[f"{self.split}/targets"])
        return self._arrays

    def __len__(self) -> int:
        return self.arrays()[0].shape[0]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.arrays()
        rng = np.random.default_rng([self.seed, step])
        index = np.sort(rng.choice(images.shape[0], size=self.batch_size,
                                   replace=images.shape[0] < self.batch_size))
        x = images.get_orthogonal_selection((index,))
        y = targets.get_orthogonal_selection((index,))
        if self.augment:
            x, y = augment_batch(x, y, self.augment, rng, self.task, self.ignore_label)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def all_patches(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.arrays()
        return torch.from_numpy(images[start:stop]), torch.from_numpy(targets[start:stop])


def augment_batch(x: np.ndarray, y: np.ndarray, settings: dict[str, Any],
                  rng: np.random.Generator, task: str, ignore_label: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Flips and 90-degree rotations in the image plane applied identically to image and target;
    intensity scale/shift and Gaussian noise on the image only."""
    spatial_x = tuple(range(2, x.ndim))
    spatial_y = tuple(range(y.ndim - len(spatial_x), y.ndim))
    if settings.get("flips"):
        for ax_x, ax_y in zip(spatial_x, spatial_y, strict=True):
            if rng.random() < 0.5:
                x, y = np.flip(x, ax_x), np.flip(y, ax_y)
    if settings.get("rotate90") and x.shape[-1] == x.shape[-2]:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=spatial_x[-2:]), np.rot90(y, k, axes=spatial_y[-2:])
    x = np.array(x, dtype=np.float32)
    amount = settings.get("intensity", 0.0)
    if amount:
        n = x.shape[0]
        scale = 1 + rng.uniform(-amount, amount, size=(n,) + (1,) * (x.ndim - 1))
        shift = rng.uniform(-amount, amount, size=(n,) + (1,) * (x.ndim - 1))
        x = x * scale.astype(np.float32) + shift.astype(np.float32)
        if task == "regression":  # the target must follow the same intensity mapping
            y = np.array(y, dtype=np.float32) * scale.astype(np.float32) + shift.astype(np.float32)
    if settings.get("noise"):
        x = x + rng.normal(0, settings["noise"], size=x.shape).astype(np.float32)
    return x, np.array(y)


def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": list(random.getstate()[1])}


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate((3, tuple(states["python"]), None))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True: a checkpoint can hold tensors and plain data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable unetflow checkpoint ({err.__class__.__name__}:"
                         f" {str(err).splitlines()[0][:200]})") from err


def settings_fingerprint(*sections: dict[str, Any]) -> str:
    text = json.dumps(sections, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build_scheduler(optimizer, settings: dict[str, Any]):
    warmup, total = settings["warmup_steps"], settings["steps"]
    if settings["schedule"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=3,
                                                          factor=0.5)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings["schedule"] == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _validation_metric(task: str, output: torch.Tensor, target: torch.Tensor,
                       ignore_label: int | None) -> tuple[float, float]:
    """(sum of the per-patch metric, count): foreground IoU for segmentation, PSNR for regression
    (data range of the normalized target)."""
    if task == "segmentation":
        pred = output.argmax(1)
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_label is None \
            else target != ignore_label
        fg_p, fg_t = (pred > 0) & valid, (target > 0) & valid
        inter = (fg_p & fg_t).flatten(1).sum(1).float()
        union = (fg_p | fg_t).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        return float(iou.sum()), len(iou)
    mse = ((output - target) ** 2).flatten(1).mean(1)
    data_range = (target.flatten(1).max(1).values - target.flatten(1).min(1).values).clamp(min=1e-6)
    psnr = 10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))
    return float(psnr.sum()), len(psnr)


class _SigtermFlag:
    """Turns SIGTERM into a flag checked between steps, so the state saved is consistent."""

    def __init__(self) -> None:
        self.raised = False

    def __enter__(self) -> _SigtermFlag:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class Trainer:
    """One training run; small methods so each concern (step, validation, state) stays apart."""

    def __init__(self, store: str, out_dir: str, task: str, model_settings: dict[str, Any],
                 settings: dict[str, Any], threads: int | None = None) -> None:
        self.store, self.out_dir, self.task = store, Path(out_dir), task
        self.settings, self.model_settings = settings, model_settings
        if threads or settings.get("threads"):
            torch.set_num_threads(int(settings.get("threads") or threads))
        if settings["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(settings["seed"])
        np.random.seed(settings["seed"] % 2**32)
        random.seed(settings["seed"])
        self.device = choose_device(settings["device"])
        self.meta = dict(zarr.open_group(store, mode="r").attrs["unetflow"])
        self.ignore_label = settings["ignore_label"]
        self.train_data = PatchBatches(store, "train", settings["batch_size"], settings["seed"],
                                       settings["augment"], task, self.ignore_label)
        self.val_data = PatchBatches(store, "val", settings["batch_size"], settings["seed"],
                                     None, task, self.ignore_label)
        self.model = self._build_model().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(task, settings["loss"] or default_loss(task), self.ignore_label,
                                  settings["class_weights"])
        opt = torch.optim.AdamW if settings["optimizer"] == "adamw" else torch.optim.Adam
        self.optimizer = opt(self.model.parameters(), lr=settings["learning_rate"],
                             weight_decay=settings["weight_decay"])
        self.scheduler = _build_scheduler(self.optimizer, settings)
        amp_fp16 = (settings["amp"] and self.device.type == "cuda"
                    and not torch.cuda.is_bf16_supported())
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_fp16)
        self.step, self.best_metric, self.history = 0, -float("inf"), []
        self.fingerprint = settings_fingerprint(model_settings, settings, self.meta)
        self.state_path = self.out_dir / "train_state" / "last.pt"
        self.compiled = torch.compile(self.model) if settings["compile"] else self.model

    def _build_model(self) -> UNet:
        group = zarr.open_group(self.store, mode="r")
        in_channels = group["train/images"].shape[1]
        if self.task == "segmentation":
            out_channels = self.model_settings["num_classes"]
        else:
            out_channels = group["train/targets"].shape[1]
        arch = {k: v for k, v in self.model_settings.items()
                if k not in ("num_classes", "spatial_dims")}
        model = build_unet(arch, self.model_settings["spatial_dims"], in_channels, out_channels)
        if self.settings.get("init_from"):
            self._init_weights(model, self.settings["init_from"])
        return model

    def _init_weights(self, model: UNet, path: str) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("model_config") != model.config():
            raise ValueError(f"train.init_from: checkpoint {path} was trained with model "
                             f"{ckpt.get('model_config')}, which differs from this model "
                             f"{model.config()}; fine-tuning needs the same architecture")
        model.load_state_dict(ckpt["model_state"])

    def payload(self) -> dict[str, Any]:
        model = self.model
        return {
            "format": "unetflow-checkpoint-1", "task": self.task,
            "model_config": model.config(), "model_state": model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(), "step": self.step,
            "best_metric": self.best_metric, "rng": _rng_states(), "history": self.history,
            "normalization": self.meta["datasets"], "normalize": self.meta["normalize"],
            "train_settings": self.settings, "model_settings": self.model_settings,
            "fingerprint": self.fingerprint,
        }

    def resume_if_possible(self) -> bool:
        if not self.state_path.exists():
            return False
        state = load_checkpoint(self.state_path)
        if state.get("fingerprint") != self.fingerprint:
            print(f"train: settings changed since {self.state_path}; starting over", flush=True)
            return False
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        self.step, self.best_metric = state["step"], state["best_metric"]
        self.history = state["history"]
        _restore_rng_states(state["rng"])
        print(f"train: resumed from {self.state_path} at step {self.step}", flush=True)
        return True

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.train()
        self._freeze_encoder(self.step < self.settings["freeze_encoder_steps"])
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.task == "segmentation":
            y = y.long()
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.settings["amp"]):
            out = self.compiled(x)
        loss = self.loss_fn(out.float(), y)
        self.scaler.scale(loss).backward()
        if self.settings["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        return float(loss.detach())

    def _freeze_encoder(self, frozen: bool) -> None:
        for part in (self.model.encoders, self.model.downsamplings):
            for p in part.parameters():
                p.requires_grad_(not frozen)

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        self.model.eval()
        n = len(self.val_data)
        loss_sum, metric_sum, count = 0.0, 0.0, 0
        for start in range(0, n, self.settings["batch_size"]):
            x, y = self.val_data.all_patches(start, start + self.settings["batch_size"])
            x, y = x.to(self.device), y.to(self.device)
            if self.task == "segmentation":
                y = y.long()
            with _autocast(self.device, self.settings["amp"]):
                out = self.compiled(x)
            out = out.float()
            loss_sum += float(self.loss_fn(out, y)) * len(x)
            m, c = _validation_metric(self.task, out, y, self.ignore_label)
            metric_sum, count = metric_sum + m, count + c
        return loss_sum / max(count, 1), metric_sum / max(count, 1)

    def _loader(self):
        steps = range(self.step, self.settings["steps"])
        workers = self.settings["num_workers"]
        return torch.utils.data.DataLoader(
            self.train_data, sampler=steps, batch_size=None, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers else None)

    def run(self, progress: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        self.resume_if_possible()
        total = self.settings["steps"]
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step",
                   disable=not (progress and sys.stderr.isatty()))
        with _SigtermFlag() as sigterm:
            for x, y in self._loader():
                loss = self.train_step(x, y)
                self.step += 1
                bar.update(1)
                row = {"step": self.step, "loss": loss, "val_loss": "", "val_metric": "",
                       "learning_rate": self.optimizer.param_groups[0]["lr"]}
                if self.step % self.settings["validate_every"] == 0 or self.step == total:
                    self._validate_and_keep_best(row)
                self.history.append(row)
                if sigterm.raised:
                    save_checkpoint(self.state_path, self.payload())
                    raise Preempted(f"SIGTERM at step {self.step}; state saved to "
                                    f"{self.state_path}, rerun to resume")
        bar.close()
        save_checkpoint(self.state_path, self.payload())
        return self.payload()

    def _validate_and_keep_best(self, row: dict[str, Any]) -> None:
        val_loss, metric = self.validate()
        row["val_loss"], row["val_metric"] = val_loss, metric
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metric)
        if metric > self.best_metric:
            self.best_metric = metric
            save_checkpoint(self.out_dir / "train_state" / "best.pt", self.payload())
        save_checkpoint(self.state_path, self.payload())
        print(f"train: step {self.step} loss {row['loss']:.4f} val_loss {val_loss:.4f} "
              f"val_metric {metric:.4f}", flush=True)


def write_log(history: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in history]
    ax1.plot(steps, [r["loss"] for r in history], lw=0.8, label="train")
    val = [r for r in history if r["val_loss"] != ""]
    ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax1.legend()
    ax2.plot([r["step"] for r in val], [r["val_metric"] for r in val], "o-", color="C1")
    ax2.set(xlabel="step", title="validation " + ("foreground IoU" if task == "segmentation"
                                                  else "PSNR (dB)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_model(store: str, out_dir: str, task: str, model_settings: dict[str, Any],
                settings: dict[str, Any], best: str, last: str, log: str, curve: str,
                threads: int | None = None) -> None:
    """Train (or resume) and write the best and last checkpoints, the CSV log and the curve."""
    trainer = Trainer(store, out_dir, task, model_settings, settings, threads)
    final = trainer.run()
    best_state = trainer.out_dir / "train_state" / "best.pt"
    save_checkpoint(best, load_checkpoint(best_state) if best_state.exists() else final)
    save_checkpoint(last, final)
    write_log(trainer.history, log)
    plot_loss_curve(trainer.history, curve, task)
