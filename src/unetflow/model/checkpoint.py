"""The checkpoint: its format, saving, loading, the network it holds, and where it runs.

One module owns the format, so the trainer that writes checkpoints, the prediction that
reads them and the tests that build them agree by construction. A checkpoint is a dict of
tensors and plain data (loaded with ``weights_only=True``, so a file can never run code):

- ``format``: FORMAT; ``task``: "segmentation" or "regression"
- ``model_config``: the UNet's constructor arguments; ``model_state``: its weights
- ``normalization``: how inputs were normalized in training, ``{"method", "clip",
  "datasets": {dataset: statistics}}``; prediction applies ``method``/``clip`` with the
  statistics of the dataset it predicts
- ``step`` and, from the trainer, what resuming needs (optimizer, schedule, RNG states...)

Format 1 (before 2026-11) kept the method under ``normalize`` and the statistics under
``normalization``; `load_checkpoint` reads it as format 2, so existing results stay usable.

Devices and mixed precision are chosen here too, with one vocabulary for ``train.amp`` and
``predict.amp``: true (bf16 where the GPU supports it, else fp16), false, "bf16", "fp16".
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from unetflow.errors import DeviceUnavailable
from unetflow.files import atomic_path, file_sha256
from unetflow.model.unet import UNet

__all__ = [
    "FORMAT",
    "DeviceUnavailable",
    "autocast_dtype",
    "build_model",
    "choose_device",
    "file_sha256",
    "load_checkpoint",
    "new_checkpoint",
    "read_description",
    "save_checkpoint",
    "skeleton_model",
]

FORMAT = "unetflow-checkpoint-2"
_FORMAT_1 = "unetflow-checkpoint-1"


def new_checkpoint(model: UNet, task: str, normalization: dict[str, Any], step: int = 0,
                   **training_state: Any) -> dict[str, Any]:
    """A checkpoint of `model`'s weights (on the CPU), with what prediction needs.

    `normalization` is ``{"method", "clip", "datasets"}``; `training_state` holds what the
    trainer adds to resume (optimizer and schedule states, RNG, history...).
    """
    if task not in ("segmentation", "regression"):
        raise ValueError(f"task {task!r} is not one of segmentation, regression")
    missing = {"method", "clip", "datasets"} - set(normalization)
    if missing:
        raise ValueError(f"normalization lacks {sorted(missing)}; give method, clip, datasets")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "task": task, "model_config": model.config(),
            "model_state": state, "normalization": dict(normalization), "step": step,
            **training_state}


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a kill at any moment leaves the old checkpoint or the new one."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def _pickle_protocol(path: str | Path) -> int | None:
    """The protocol of a plain Python pickle file (torch writes zip files, or protocol 2)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head[1] if len(head) == 2 and head[0] == 0x80 and head[1] >= 3 else None


def _load_failure(err: Exception) -> str:
    """Why a checkpoint did not load, in one line (torch's own text advises weights_only=False,
    which would run whatever the file holds)."""
    text = str(err)
    # torch 2.13 says "Unsupported global: GLOBAL m.f was not an allowed global" or, for
    # modules it blocks (os, subprocess...), "unsupported GLOBAL posix.system whose module"
    unsafe = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if unsafe:
        return (f"it holds {unsafe.group(1)}, not only tensors and plain data; refused, since "
                f"loading it could run code: use a checkpoint written by unetflow train")
    detail = re.search(r"^(?:WeightsUnpickler error: )?(Unsupported operand .*|.*load key.*)$",
                       text, re.MULTILINE) if "Weights only load failed" in text else None
    line = detail.group(1) if detail else (text.splitlines() or [""])[0]
    first = re.split(r"(?<=\.)\s", line)[0][:160].rstrip(".")
    return (f"{err.__class__.__name__}: {first}; the file is damaged or not a checkpoint: "
            f"copy it again or retrain")


def _upgrade(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Format 1 -> 2 in memory; anything else that is not format 2 is refused."""
    kind = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if kind == _FORMAT_1:
        checkpoint = dict(checkpoint)
        method = checkpoint.pop("normalize")
        checkpoint["normalization"] = {**method, "datasets": checkpoint["normalization"]}
        checkpoint["format"] = FORMAT
        return checkpoint
    if kind != FORMAT:
        raise ValueError(f"{path}: not a unetflow checkpoint (format {kind!r}, expected "
                         f"{FORMAT!r}); use a checkpoint written by unetflow train")
    return checkpoint


def _load(path: str | Path, mmap: bool) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    protocol = _pickle_protocol(path)
    if protocol is not None:  # torch's safe loader would fail on it with a puzzling message
        raise ValueError(f"{path}: not a readable unetflow checkpoint (it is a plain Python "
                         f"pickle of protocol {protocol}, not a torch checkpoint; refused, since "
                         f"loading it could run code: use a checkpoint written by unetflow "
                         f"train)")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # files in torch's legacy (non-zip) format cannot be memory-mapped: read them
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable unetflow checkpoint "
                         f"({_load_failure(err)})") from err
    _check_records(path)
    return _upgrade(checkpoint, path)


def _check_records(path: str | Path) -> None:
    """Check the CRC-32 of every record of a zip checkpoint: torch.load does not, so bytes
    damaged inside the weights load as wrong weights without a word. Costs about one more
    read of the file (35 ms for 31 MB here); legacy (non-zip) files are left to torch."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return
    if bad is not None:
        raise ValueError(f"{path}: not a readable unetflow checkpoint (its record {bad} fails "
                         f"its CRC-32 check; the file is damaged: copy it again or retrain)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint, on the CPU (weights_only: tensors and plain data, never code)."""
    return _load(path, mmap=False)


def read_description(path: str | Path) -> dict[str, Any]:
    """What the checkpoint says of its network, without reading the weights into memory.

    The file is memory-mapped and only its plain entries are kept (task, model_config,
    normalization, step...): steps that plan or gather a prediction need no network.
    """
    checkpoint = _load(path, mmap=True)
    return {k: v for k, v in checkpoint.items() if not k.endswith("_state") and k != "rng"}


def build_model(checkpoint: dict[str, Any], device: torch.device) -> UNet:
    """The checkpoint's U-Net with its weights, on `device`, in eval mode."""
    model = UNet(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["model_state"])
    return model.to(device).eval()


def skeleton_model(description: dict[str, Any]) -> UNet:
    """The checkpoint's network without weights, on the meta device (no memory, no device).

    Enough for what depends on the architecture alone: the exact halo, the output channels.
    """
    with torch.device("meta"):
        return UNet(**description["model_config"])


def _cuda_usable() -> bool:
    """A GPU is usable when torch sees one and can allocate on it (CUDA_VISIBLE_DEVICES may
    name a GPU that the node lacks, or a driver may be broken)."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        return False
    return True


def choose_device(requested: str, key: str) -> torch.device:
    """`auto` takes CUDA when a GPU is really usable, else the CPU; `cuda` insists on it.

    `key` is the setting asked (train.device, predict.device): errors name it.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{key} {requested!r} is not one of auto, cpu, cuda")
    if requested == "cpu":
        return torch.device("cpu")
    if _cuda_usable():
        return torch.device("cuda")
    if requested == "cuda":
        raise DeviceUnavailable(
            f"{key} is 'cuda' but no usable CUDA GPU is available (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run the job on a GPU node or set "
            f"{key}: auto to fall back to the CPU")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype for `amp` (train.amp / predict.amp) on `device`; None: float32.

    Only on CUDA: CPU autocast is slower here and changes results. `true` takes bf16 where
    the GPU supports it (no gradient scaling needed), else fp16; "bf16" falls back to fp16
    with a warning on GPUs without bf16; "fp16" insists.
    """
    if amp not in (True, False, "bf16", "fp16"):
        raise ValueError(f"amp {amp!r} is not one of true, false, bf16, fp16")
    if amp is False or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if not torch.cuda.is_bf16_supported():
        if amp == "bf16":
            warnings.warn("amp 'bf16' is not supported by this GPU; using fp16", stacklevel=2)
        return torch.float16
    return torch.bfloat16
