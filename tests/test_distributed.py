"""Training as several processes with torch.distributed (Gloo on this CPU): two ranks with
half the batch each take the steps one process takes with the whole batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import outputs, sections, train_in_process, write_store
from unetflow.model.checkpoint import load_checkpoint

UNETFLOW = Path(sys.executable).with_name("unetflow")
# group norm normalizes each sample on its own (batch norm would see half the batch per rank)
NETWORK = {"norm": "group", "depth": 2, "base_features": 4}


def run_cli(store: str, out_dir: Path, model: dict, train: dict) -> subprocess.CompletedProcess:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [str(UNETFLOW), "train", "--store", store, "--model-dir", str(out_dir),
            "--task", "segmentation", "--model-settings", json.dumps(model),
            "--settings", json.dumps(train), "--threads", "1"]
    for name, path in outputs(out_dir).items():
        args += [f"--{name}", path]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_ranks_of_half_the_batch_take_the_steps_of_one_process(tmp_path):
    store = write_store(tmp_path / "p.zarr", n_train=16, n_val=4)
    common = {"steps": 12, "validate_every": 6, "batch_size": 8, "loss": "ce",
              "augment": {"flips": True, "rotate90": True, "intensity": 0.1}}
    model, one = sections(model=NETWORK, **common)
    train_in_process(store, tmp_path / "one", "segmentation", model, one)
    _, two = sections(model=NETWORK, gpus=2, **common)
    result = run_cli(store, tmp_path / "two", model, two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (DDP)" in result.stdout
    single = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")
    ranks = load_checkpoint(tmp_path / "two" / "checkpoint_last.pt")
    assert ranks["world_size"] == 2 and ranks["step"] == single["step"] == 12
    for key, value in single["model_state"].items():
        # the same samples and steps; the gradient is averaged over ranks in another order
        torch.testing.assert_close(ranks["model_state"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=key)
