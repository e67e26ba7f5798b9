"""Training a U-Net on a patch store: resumable, preemption-safe, with validation and logs.

Resume state lives in `<model dir>/train_state/last.pt`, which is not a Snakemake output:
Snakemake deletes the outputs of a failed job, and a preempted job must keep its progress.
Every source of randomness of a step is keyed by (seed, step): the patches of step `s` come
from the permutation of its epoch, drawn from (seed, epoch), and their augmentation from
(seed, step). With model, optimizer, schedule and RNG states restored, a resumed run replays
exactly the steps an uninterrupted run would have taken, whichever worker reads them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetflow.augment import augment_batch
from unetflow.config import EXECUTION_KEYS as CONFIG_EXECUTION_KEYS
from unetflow.config import training_settings
from unetflow.distributed import Ranks, agree, broadcast_value, mean_over_ranks, ranks_from_env
from unetflow.distributed import start as start_ranks
from unetflow.distributed import stop as stop_ranks
from unetflow.files import atomic_path, write_text_atomic
from unetflow.losses import build_loss
from unetflow.model.checkpoint import (
    autocast_dtype,
    choose_device,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
)
from unetflow.model.inference import memory_format_for
from unetflow.model.unet import (
    ENCODER_PARTS,
    UNet,
    build_unet,
    encoder_config,
    encoder_state,
    layer_settings,
)
from unetflow.n2v import mask_batch, masked_loss, masked_psnr
from unetflow.patchstore import PatchArray, open_patch_array, open_patch_store
from unetflow.targets import N2V, network_classes, segmentation_target, uses_n2v

__all__ = [
    "EXECUTION_KEYS",
    "LearningRateSchedule",
    "PatchBatches",
    "Preempted",
    "Trainer",
    "augment_batch",
    "batch_indices",
    "build_optimizer",
    "default_loss",
    "make_loader",
    "store_identity",
    "total_steps",
    "train_model",
    "training_fingerprint",
]

LOG_FIELDS = ["step", "loss", "val_loss", "val_metric", "learning_rate"]
# How a run is executed, not what it optimizes: changing these resumes instead of restarting
# (and reruns no Snakemake job: unetflow.config.EXECUTION_KEYS, the same keys).
EXECUTION_KEYS = CONFIG_EXECUTION_KEYS["train"]
FINGERPRINT_SAMPLES = 8
# How a batch's random draws are keyed: 2 = one generator per sample (seed, step, stream,
# position), so that ranks share a batch exactly (before: one per batch). In the fingerprint,
# so that a state saved under another keying starts over instead of resuming differently.
BATCH_STREAMS = 2


class Preempted(RuntimeError):
    """SIGTERM arrived; the last state was saved and the job should exit non-zero."""


def default_loss(task: str) -> str:
    """CE + Dice for segmentation (robust to class imbalance), MSE for regression."""
    return "ce_dice" if task == "segmentation" else "mse"


# --- data --------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Patch indices of training step `step`, sorted.

    Epoch `e` (ceil(n / batch_size) steps) visits a permutation drawn from (seed, e); its last
    batch is filled up from the permutation's start, so every batch has `batch_size` patches.
    """
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed % 2**63, epoch]).permutation(n)
    order = np.resize(order, per_epoch * batch_size)
    return np.sort(order[position * batch_size:(position + 1) * batch_size])


class PatchBatches(torch.utils.data.Dataset):
    """Item `step` is the (augmented) batch of that training step, read lazily from the store.

    The arrays are opened on first use in each process (a DataLoader worker re-opens them)
    and read patch by patch (unetflow.patchstore), so nothing but the patches of the current
    batches is ever in memory. With `blind_spot` (train.blind_spot of a model.target n2v
    model) the store holds images only: each batch is masked (`unetflow.n2v.mask_batch`,
    after augmentation) with a generator drawn from (seed, step), and validation patches
    from (seed, first patch), so every validation masks the same pixels.

    Each sample of a batch is augmented and masked with its own generator, drawn from
    (seed, step, its position in the global batch): rank `rank` of `world` training
    processes takes positions rank, rank + world, ... of the global batch of `batch_size`
    and gets exactly the samples one process would give it (unetflow.distributed).
    """

    def __init__(self, store: str, split: str, batch_size: int, seed: int,
                 augment: dict[str, Any] | None, task: str,
                 blind_spot: dict[str, Any] | None = None, rank: int = 0,
                 world: int = 1) -> None:
        self.store, self.split, self.batch_size, self.seed = store, split, batch_size, seed
        self.augment, self.task, self.blind_spot = augment, task, blind_spot
        self.rank, self.world = rank, world
        self._arrays: tuple[PatchArray, PatchArray | None] | None = None

    def arrays(self) -> tuple[PatchArray, PatchArray | None]:
        """(images, targets); targets None for n2v (the images are their own)."""
        if self._arrays is None:
            group = open_patch_store(self.store)
            self._arrays = (open_patch_array(group, f"{self.split}/images"),
                            None if self.blind_spot else
                            open_patch_array(group, f"{self.split}/targets"))
        return self._arrays

    def reopen(self) -> None:
        """Forget open arrays (each DataLoader worker opens its own)."""
        self._arrays = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        """Number of patches in the split."""
        return self.arrays()[0].shape[0]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.arrays()
        index = batch_indices(images.shape[0], self.batch_size, self.seed, step)
        positions = np.arange(self.rank, len(index), self.world)  # this rank's share
        x = images.read(index[positions])
        y = x if targets is None else targets.read(index[positions])
        if self.augment or self.blind_spot:
            pairs = [self._sample(x[k:k + 1], y[k:k + 1], step, int(p))
                     for k, p in enumerate(positions)]
            x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def _sample(self, x: np.ndarray, y: np.ndarray, step: int, position: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """One sample (a batch of 1) augmented, then masked (n2v), each from its own
        generator keyed by (seed, step, stream, position in the global batch)."""
        key = self.seed % 2**63
        if self.augment:
            x, y = augment_batch(x, y, self.augment,
                                 np.random.default_rng([key, step, 1, position]), self.task)
        if self.blind_spot:
            x, y = mask_batch(x, self.blind_spot,
                              np.random.default_rng([key, step, 2, position]))
        return x, y

    def patches(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches [start, stop) as stored, never augmented (validation); n2v: masked."""
        images, targets = self.arrays()
        x = images.read_range(start, stop)
        if self.blind_spot:
            x, y = mask_batch(x, self.blind_spot,
                              np.random.default_rng([self.seed % 2**63, start, 3]))
            return torch.from_numpy(x), torch.from_numpy(y)
        return torch.from_numpy(x), torch.from_numpy(targets.read_range(start, stop))


def _worker_init(worker_id: int) -> None:
    """SLURM signals every process of the job: workers ignore SIGTERM and let the main process
    save and stop them; each opens its own handle on the store."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.utils.data.get_worker_info().dataset.reopen()


def make_loader(batches: PatchBatches, start: int, stop: int, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The batches of steps [start, stop) in order, read by `num_workers` processes (0: the
    main process). Each item is already a batch, so the DataLoader does not batch again."""
    return torch.utils.data.DataLoader(
        batches, sampler=range(start, stop), batch_size=None, num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        prefetch_factor=4 if num_workers else None)


# --- checkpoints -------------------------------------------------------------------------
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


# --- settings ----------------------------------------------------------------------------
def total_steps(settings: dict[str, Any], n_train: int) -> int:
    """`train.epochs` (when set) as steps: epochs * ceil(n_train / batch_size); else `steps`."""
    if settings["epochs"]:
        return settings["epochs"] * math.ceil(n_train / settings["batch_size"])
    return settings["steps"]


def store_identity(store: str) -> dict[str, Any]:
    """What identifies a patch store's content cheaply: its attributes (normalization, patch
    shape), array shapes and dtypes, and a hash of a few patches spread over each array (a
    re-extraction with other sampling changes them)."""
    group = open_patch_store(store)
    identity: dict[str, Any] = {"attrs": group.attrs.asdict()}
    digest = hashlib.sha256()
    for key in ("train/images", "train/targets", "val/images", "val/targets"):
        try:
            array = open_patch_array(group, key)
        except KeyError:  # a store of images alone (n2v)
            continue
        identity[key] = [list(array.shape), str(array.dtype)]
        picks = np.unique(np.linspace(0, array.shape[0] - 1,
                                      min(array.shape[0], FINGERPRINT_SAMPLES)).astype(int))
        digest.update(np.ascontiguousarray(array.read(picks)).tobytes())
    identity["samples_sha256"] = digest.hexdigest()
    return identity


def training_fingerprint(model_settings: dict[str, Any], settings: dict[str, Any],
                         store: str) -> str:
    """Hash of what decides the trained weights: model, training problem (with the content of
    the checkpoint it starts from), patch store.

    EXECUTION_KEYS are left out: device, AMP, compile, workers, threads and deterministic
    mode change speed or floating-point rounding, not what is optimized, and a job moved
    to another node or given more workers should resume, not start over.
    """
    problem = {k: v for k, v in training_settings(settings, model_settings).items()
               if k not in EXECUTION_KEYS}
    if settings["init_from"]:  # a retrained starting point is another problem
        problem["init_from_sha256"] = _file_sha256(settings["init_from"])
    problem["batch_streams"] = BATCH_STREAMS
    text = json.dumps([model_settings, problem, store_identity(store)], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_encoder(model: UNet, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Copy the encoder (`unet.encoder_state`: the parts train.freeze_encoder_steps holds)
    of `checkpoint` into `model`, leaving its decoder and head as initialized; refused in
    one line naming both architectures when the encoders differ in shape."""
    held = checkpoint.get("model_config") or {}
    if encoder_config(held) != encoder_config(model.config()):
        raise ValueError(f"train.init_from: the encoder of checkpoint {path} "
                         f"({encoder_config(held)}, a {checkpoint.get('task')} model) differs "
                         f"from this model's ({encoder_config(model.config())}); "
                         f"train.init_encoder_only needs the same encoder")
    source = encoder_state(checkpoint["model_state"])
    target = encoder_state(model.state_dict())
    if {k: tuple(v.shape) for k, v in source.items()} != \
            {k: tuple(v.shape) for k, v in target.items()}:
        raise ValueError(f"train.init_from: the encoder weights of checkpoint {path} do not "
                         f"have the shapes of this model's ({model.config()}); the file may "
                         f"come from another version of unetflow")
    model.load_state_dict(source, strict=False)


def _read_store_meta(store: str) -> dict[str, Any]:
    group = open_patch_store(store)
    own_targets = (group.attrs["unetflow"].get("target") or {}).get("target") == N2V
    for split in ("train", "val"):
        for name in ("images",) if own_targets else ("images", "targets"):
            try:
                open_patch_array(group, f"{split}/{name}")
            except KeyError:
                raise ValueError(f"patch store {store} has no {split}/{name}; re-extract the "
                                 f"patches (validation needs patches.validation_fraction > 0 "
                                 f"or patches.validation_datasets)") from None
    return dict(group.attrs["unetflow"])


def _check_store_target(meta: dict[str, Any], task: str, model_settings: dict[str, Any],
                        store: str) -> None:
    """The patches hold the targets this model learns (model.target): classes of a store
    extracted for `boundaries` would train a 3-class network on 2-class labels; a store of
    images alone (n2v) has no targets for a supervised model, and the reverse."""
    stored = segmentation_target(meta.get("target") or {})
    if task != "segmentation":
        if (stored["target"] == N2V) != uses_n2v(model_settings):
            wanted = N2V if uses_n2v(model_settings) else "the datasets' target images"
            raise ValueError(f"patch store {store} was extracted for model.target "
                             f"{stored['target']!r} but this model learns from {wanted} "
                             f"(model.target); re-extract the patches")
        return
    wanted = segmentation_target(model_settings)
    if stored["target"] == "classes" and wanted["target"] == "classes":
        return
    if stored != wanted:
        raise ValueError(f"patch store {store} holds targets {stored} but the model section "
                         f"asks for {wanted} (model.target, model.boundary_width); "
                         f"re-extract the patches")


# --- optimization ------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam or AdamW; weight decay on weights only, not on biases and normalization scales
    (decaying them only shifts features and fights the normalization)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW if settings["optimizer"] == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=settings["learning_rate"])


class LearningRateSchedule:
    """Linear warmup, then cosine decay to 0 at the last step, a constant rate, or
    reduce-on-plateau of the validation metric (which only starts after warmup, so that
    warmup never overwrites a reduction nor a reduction cuts warmup short)."""

    def __init__(self, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
                 steps: int) -> None:
        self.kind, self.warmup, self.steps = settings["schedule"], settings["warmup_steps"], steps
        self.warmup_cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
        self.plateau = None
        if self.kind == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", patience=settings["plateau_patience"],
                factor=settings["plateau_factor"])

    def factor(self, step: int) -> float:
        """Learning rate of step `step` (0-based) relative to train.learning_rate."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind != "cosine":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def after_step(self, steps_done: int) -> None:
        if self.plateau is None or steps_done <= self.warmup:
            self.warmup_cosine.step()

    def after_validation(self, steps_done: int, metric: float) -> None:
        if self.plateau is not None and steps_done >= self.warmup:
            self.plateau.step(metric)

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_cosine": self.warmup_cosine.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup_cosine.load_state_dict(state["warmup_cosine"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])


def validation_metric(task: str, output: torch.Tensor, target: torch.Tensor,
                      ignore_label: int | None) -> tuple[float, int]:
    """(sum of the per-patch metric, count): foreground IoU for segmentation (ignored pixels
    left out), PSNR in dB for regression (data range of each normalized target patch)."""
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


def _check_ranks(ranks: Ranks, settings: dict[str, Any]) -> Ranks:
    """This process's place among train.gpus ranks: the batch must split evenly, and the
    processes torchrun started must be the ones the settings ask for."""
    if ranks.world != settings["gpus"]:
        raise ValueError(f"train.gpus is {settings['gpus']} but this process is one of "
                         f"{ranks.world} (WORLD_SIZE); run `unetflow train`, which starts "
                         f"train.gpus processes itself")
    if settings["batch_size"] % ranks.world:
        raise ValueError(f"train.batch_size {settings['batch_size']} does not split over "
                         f"train.gpus {ranks.world} processes; give a multiple of "
                         f"{ranks.world} (it is the global batch)")
    return ranks


def _configure_torch(settings: dict[str, Any], threads: int | None, ranks: Ranks) -> None:
    """Threads, determinism and seeds. The job's threads are shared by its ranks (torchrun
    would give each one thread), so that N ranks on the CPU do not oversubscribe it."""
    if settings["threads"] or threads:
        torch.set_num_threads(max(1, int(settings["threads"] or threads) // ranks.world))
    if settings["deterministic"]:  # cuBLAS needs this before CUDA starts to be reproducible
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if settings["deterministic"] != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(settings["deterministic"], warn_only=True)
    torch.backends.cudnn.benchmark = not settings["deterministic"]
    torch.manual_seed(settings["seed"])
    np.random.seed(settings["seed"] % 2**32)
    random.seed(settings["seed"])


# --- the trainer -------------------------------------------------------------------------
class Trainer:
    """One training run; small methods so each concern (step, validation, state) stays apart."""

    def __init__(self, store: str, out_dir: str, task: str, model_settings: dict[str, Any],
                 settings: dict[str, Any], threads: int | None = None) -> None:
        self.store, self.out_dir, self.task = store, Path(out_dir), task
        self.settings, self.model_settings = settings, model_settings
        self.init_source: dict[str, Any] | None = None  # train.init_from, when given
        self.ranks = _check_ranks(ranks_from_env(), settings)
        _configure_torch(settings, threads, self.ranks)
        self.device = choose_device(settings["device"], "train.device")
        if self.ranks.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.ranks.local_rank)
            torch.cuda.set_device(self.device)
        start_ranks(self.ranks, self.device)
        self.meta = _read_store_meta(store)
        _check_store_target(self.meta, task, model_settings, store)
        self.ignore_label = settings["ignore_label"]
        self.n2v = uses_n2v(model_settings)
        blind_spot = settings["blind_spot"] if self.n2v else None
        self.train_data = PatchBatches(store, "train", settings["batch_size"], settings["seed"],
                                       settings["augment"], task, blind_spot,
                                       self.ranks.rank, self.ranks.world)
        self.val_data = PatchBatches(store, "val", settings["batch_size"], settings["seed"],
                                     None, task, blind_spot)
        self.total_steps = total_steps(settings, len(self.train_data))
        self.model = self._build_model().to(self.device)
        # channels-last on every device: on the 2-core CPU box the demo model trained 1.44x
        # faster (28.2 against 19.6 samples/s, bench/train.py), as on GPUs
        self.memory_format = memory_format_for(self.model.spatial_dims)
        self.model = self.model.to(memory_format=self.memory_format)
        # validation (rank 0 alone) takes the loss without collectives: it would wait for
        # ranks that do not validate
        self.val_loss_fn = self._loss()
        self.loss_fn = self._loss(mean_over_ranks if self.ranks.distributed else None)
        self._train_mode: bool | None = None  # the encoder_frozen state the model is in
        self.optimizer = build_optimizer(self.model, settings)
        self.schedule = LearningRateSchedule(self.optimizer, settings, self.total_steps)
        self.amp_dtype = autocast_dtype(self.device, settings["amp"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step, self.best_metric, self.history = 0, -float("inf"), []
        self.fingerprint = training_fingerprint(model_settings, settings, store)
        self.state_path = self.out_dir / "train_state" / "last.pt"
        self.best_state_path = self.out_dir / "train_state" / "best.pt"
        # the model that trains: wrapped for DDP first, then compiled (as PyTorch advises);
        # self.model stays the plain network that validation runs and checkpoints hold
        self.compiled = self._distributed(self.model) if self.ranks.distributed else self.model
        if settings["compile"]:
            self.compiled = torch.compile(self.compiled)

    def _loss(self, across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.n2v:  # the same number of masked pixels in every patch: equal shares
            return masked_loss(self.settings["loss"] or "mse")
        return build_loss(self.task, self.settings["loss"] or default_loss(self.task),
                          self.ignore_label, self.settings["class_weights"], across_ranks)

    def _distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model wrapped for DistributedDataParallel: gradients averaged across ranks.
        Batch norm becomes SyncBatchNorm on GPUs (statistics over the global batch);
        PyTorch has none for the CPU, where `_check_ranks` refuses batch norm. With
        freeze_encoder_steps some parameters get no gradient for a while, which DDP must
        be told."""
        if self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif self.model_settings.get("norm", "batch") == "batch":
            raise ValueError(f"train.gpus {self.ranks.world} on the CPU with model.norm "
                             f"batch: PyTorch synchronizes batch statistics only between "
                             f"GPUs; use model.norm group, instance or none (they normalize "
                             f"each sample on its own), or one process")
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.settings["freeze_encoder_steps"] > 0)

    def _build_model(self) -> UNet:
        images, targets = self.train_data.arrays()
        in_channels = images.shape[1]
        if self.task == "segmentation":
            out_channels = network_classes(self.model_settings)
        else:  # n2v: the image is the target
            out_channels = (images if targets is None else targets).shape[1]
        model = build_unet(layer_settings(self.model_settings),
                           self.model_settings["spatial_dims"], in_channels, out_channels)
        if self.settings["init_from"]:
            self._init_weights(model, self.settings["init_from"])
        return model

    def _init_weights(self, model: UNet, path: str) -> None:
        """Fine-tuning starts from a checkpoint of the same architecture and task, or with
        train.init_encoder_only from the encoder of any checkpoint whose encoder has this
        model's shape (a denoiser or an n2v model starts a segmentation model)."""
        try:
            ckpt = load_checkpoint(path)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"train.init_from: {err}") from err
        self.init_source = {"path": str(path), "sha256": _file_sha256(path),
                            "task": ckpt.get("task"), "model_config": ckpt.get("model_config"),
                            "model_settings": ckpt.get("model_settings"),
                            "part": "encoder" if self.settings["init_encoder_only"] else "all"}
        if self.settings["init_encoder_only"]:
            load_encoder(model, ckpt, path)
            return
        if ckpt.get("task") != self.task or ckpt.get("model_config") != model.config():
            raise ValueError(
                f"train.init_from: checkpoint {path} holds a {ckpt.get('task')} model "
                f"{ckpt.get('model_config')}, which differs from this {self.task} model "
                f"{model.config()}; fine-tuning needs the same task and architecture")
        model.load_state_dict(ckpt["model_state"])

    def payload(self) -> dict[str, Any]:
        """Everything needed to predict with the model and to resume training exactly."""
        normalization = {**self.meta["normalize"], "datasets": self.meta["datasets"]}
        return new_checkpoint(
            self.model, self.task, normalization, step=self.step,
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.schedule.state_dict(),
            scaler_state=self.scaler.state_dict(), total_steps=self.total_steps,
            best_metric=self.best_metric, rng=_rng_states(), history=self.history,
            train_settings=self.settings, model_settings=self.model_settings,
            fingerprint=self.fingerprint, initialized_from=self.init_source,
            world_size=self.ranks.world)

    def _save(self, path: Path, payload: dict[str, Any] | None = None) -> None:
        """Rank 0 alone writes (every rank holds the same weights and states)."""
        if self.ranks.main:
            save_checkpoint(path, payload or self.payload())

    def _saved_state(self) -> dict[str, Any] | None:
        if not self.state_path.exists():
            return None
        try:
            state = load_checkpoint(self.state_path)
        except ValueError as err:
            print(f"train: {err}; starting over", flush=True)
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"train: model, training settings or patches changed since "
                  f"{self.state_path} was saved; starting over", flush=True)
            return None
        saved_world = state.get("world_size", 1)
        if saved_world != self.ranks.world:
            raise ValueError(f"{self.state_path} was saved by a run on {saved_world} "
                             f"process(es) (train.gpus) and this one has {self.ranks.world}: "
                             f"set train.gpus: {saved_world} to resume, or delete "
                             f"{self.state_path.parent} to start over")
        return state

    def resume_if_possible(self) -> bool:
        """Restore the saved state of this same training problem, if there is one."""
        state = self._saved_state()
        if state is None:
            self.best_state_path.unlink(missing_ok=True)  # a best of another problem
            return False
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.schedule.load_state_dict(state["scheduler_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        self.step, self.best_metric = state["step"], state["best_metric"]
        self.history = state["history"]
        _restore_rng_states(state["rng"])
        print(f"train: resumed from {self.state_path} at step {self.step}", flush=True)
        return True

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        return x, (y.long() if self.task == "segmentation" else y)

    def _set_train_mode(self, encoder_frozen: bool) -> None:
        """Frozen encoder: no gradients and normalization statistics kept as loaded. Walks
        the modules only when the state changes (after validation, at the step the encoder
        thaws), not every step."""
        if encoder_frozen is self._train_mode:
            return
        self.compiled.train()
        for part in (getattr(self.model, name) for name in ENCODER_PARTS):
            part.train(not encoder_frozen)
            for p in part.parameters():
                p.requires_grad_(not encoder_frozen)
        self._train_mode = encoder_frozen

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on one batch; returns the loss, still on the device (reading
        it waits for the GPU: `_one_step` does it once per step)."""
        self._set_train_mode(self.step < self.settings["freeze_encoder_steps"])
        x, y = self._to_device(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.compiled(x)
        loss = self.loss_fn(out.float(), y)
        self.scaler.scale(loss).backward()
        if self.settings["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _check_finite(self, loss: float) -> None:
        """A loss that is not finite ends the run (the weights of this step are not saved;
        the state of the last validation stays). With fp16 the GradScaler skips such steps."""
        if not self.scaler.is_enabled() and not math.isfinite(loss):
            raise FloatingPointError(f"train: loss is {loss} at step {self.step + 1}; lower "
                                     f"train.learning_rate or set train.grad_clip")

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Mean loss and mean metric over all validation patches, never augmented."""
        self.model.eval()
        self._train_mode = None  # the next step sets the training mode again
        # the plain network: DDP's forward would wait for the other ranks, which do not
        # validate (rank 0 alone does)
        net = self.model if self.ranks.distributed else self.compiled
        loss_sum, metric_sum, count = 0.0, 0.0, 0
        size = self.settings["batch_size"]
        for start in range(0, len(self.val_data), size):
            x, y = self._to_device(*self.val_data.patches(start, start + size))
            with self._autocast():
                out = net(x).float()
            loss_sum += float(self.val_loss_fn(out, y)) * len(x)
            m, c = masked_psnr(out, y) if self.n2v else \
                validation_metric(self.task, out, y, self.ignore_label)
            metric_sum, count = metric_sum + m, count + c
        return loss_sum / max(count, 1), metric_sum / max(count, 1)

    def _loader(self, until: int | None = None) -> torch.utils.data.DataLoader:
        stop = self.total_steps if until is None else min(until, self.total_steps)
        return make_loader(self.train_data, self.step, stop, self.settings["num_workers"],
                           pin_memory=self.device.type == "cuda")

    def _announce(self) -> None:
        if not self.ranks.main:
            return
        ranks = f", {self.ranks.world} processes (DDP)" if self.ranks.distributed else ""
        print(f"train: {self.task} U-Net{ranks}, {self.model.parameter_count()} parameters, "
              f"{len(self.train_data)} training / {len(self.val_data)} validation patches, "
              f"device {self.device}, AMP {self.amp_dtype}, step {self.step} of "
              f"{self.total_steps}", flush=True)

    def run(self, progress: bool = True, until: int | None = None) -> dict[str, Any]:
        """Train to `total_steps` (or stop after step `until`) and save the state; on SIGTERM
        save the state and raise Preempted."""
        from tqdm import tqdm

        with _SigtermFlag() as sigterm:
            self.resume_if_possible()
            self._announce()
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                       disable=not (progress and sys.stderr.isatty()))
            try:
                for x, y in self._loader(until):
                    stop = self._one_step(x, y, sigterm.raised)
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.history[-1]['loss']:.4g}", refresh=False)
                    if stop and self.step < self.total_steps:
                        self._save(self.state_path)
                        raise Preempted(f"SIGTERM at step {self.step}; state saved to "
                                        f"{self.state_path}, rerun to resume")
            finally:
                bar.close()
        payload = self.payload()
        self._save(self.state_path, payload)
        return payload

    def _one_step(self, x: torch.Tensor, y: torch.Tensor, stop_requested: bool = False
                  ) -> bool:
        """One training step, logged; True when any rank was asked to stop (SIGTERM): all
        ranks learn it in the same step, so they stop together."""
        learning_rate = self.optimizer.param_groups[0]["lr"]
        loss, stop = agree(self.train_step(x, y), stop_requested, self.ranks)
        self._check_finite(loss)
        self.step += 1
        self.schedule.after_step(self.step)
        self.history.append({"step": self.step, "loss": loss, "val_loss": "", "val_metric": "",
                             "learning_rate": learning_rate})
        if self.step % self.settings["validate_every"] == 0 or self.step == self.total_steps:
            self._validate_and_save(self.history[-1])
        return stop

    def leave_ranks(self) -> None:
        """Leave the process group, the DistributedDataParallel wrapper first: freed after
        its group was destroyed, DDP joins the group's threads in its destructor, and a
        rank was once left hanging there after SIGTERM (on a heavily loaded machine)."""
        self.compiled = self.model
        stop_ranks()

    def _validate_and_save(self, row: dict[str, Any]) -> None:
        """Rank 0 validates; every rank takes its figures (they drive the schedule)."""
        val_loss, metric = self.validate() if self.ranks.main else (0.0, 0.0)
        val_loss = broadcast_value(val_loss, self.ranks, self.device)
        metric = broadcast_value(metric, self.ranks, self.device)
        row["val_loss"], row["val_metric"] = val_loss, metric
        self.schedule.after_validation(self.step, metric)
        if metric > self.best_metric:
            self.best_metric = metric
            self._save(self.best_state_path)
        self._save(self.state_path)
        if not self.ranks.main:
            return
        from tqdm import tqdm

        tqdm.write(f"train: step {self.step}/{self.total_steps} loss {row['loss']:.4f} "
                   f"val_loss {val_loss:.4f} val_metric {metric:.4f} "
                   f"lr {row['learning_rate']:.3g}", file=sys.stdout)
        sys.stdout.flush()


# --- outputs -----------------------------------------------------------------------------
def write_log(history: list[dict[str, Any]], path: str | Path) -> None:
    """CSV: step, training loss, validation loss and metric (at validation steps), LR."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(text.getvalue(), path)


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def train_model(store: str, out_dir: str, task: str, model_settings: dict[str, Any],
                settings: dict[str, Any], best: str, last: str, log: str, curve: str,
                threads: int | None = None) -> None:
    """Train (or resume) and write the best and last checkpoints, the CSV log and the curve."""
    trainer = Trainer(store, out_dir, task, model_settings, settings, threads)
    try:
        final = trainer.run()
    finally:
        trainer.leave_ranks()
    if not trainer.ranks.main:
        return
    best_state = trainer.best_state_path
    save_checkpoint(best, load_checkpoint(best_state) if best_state.exists() else final)
    save_checkpoint(last, final)
    write_log(trainer.history, log)
    plot_loss_curve(trainer.history, curve, task)
