"""Training as several processes with torch.distributed (Gloo on this CPU): two ranks with
half the batch each take the steps one process takes with the whole batch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from test_train import cli_args, sections, train_in_process, write_store
from unetflow.model.checkpoint import load_checkpoint

# group norm normalizes each sample on its own (batch norm would see half the batch per rank)
NETWORK = {"norm": "group", "depth": 2, "base_features": 4}


def run_cli(store: str, out_dir: Path, model: dict, train: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(store, out_dir, model, train), capture_output=True,
                          text=True, timeout=600)


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


@pytest.mark.slow
def test_sigterm_to_two_ranks_saves_once_and_a_rerun_equals_the_uninterrupted_run(tmp_path):
    """SLURM signals every process: torchrun (the job's process) and its ranks stop at the
    same step, rank 0 saves, the job exits non-zero; the rerun resumes and ends with the
    weights of an uninterrupted 2-rank run, exactly. Resuming with 1 process is refused."""
    import signal
    import time

    store = write_store(tmp_path / "p.zarr", n_train=16, n_val=4)
    model, train = sections(model=NETWORK, gpus=2, steps=40, validate_every=5, batch_size=8,
                            loss="ce")
    assert run_cli(store, tmp_path / "whole", model, train).returncode == 0
    out = tmp_path / "cut"
    proc = subprocess.Popen(cli_args(store, out, model, train), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = out / "train_state" / "last.pt"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    import os

    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM: every process of the job
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    saved = load_checkpoint(state)
    assert saved["step"] < 40 and saved["world_size"] == 2
    assert "SIGTERM at step" in stderr
    _, one = sections(model=NETWORK, gpus=1, steps=40, validate_every=5, batch_size=8,
                      loss="ce")
    refused = run_cli(store, out, model, one)
    assert refused.returncode != 0 and "set train.gpus: 2 to resume" in refused.stderr
    resumed = run_cli(store, out, model, train)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {state} at step {saved['step']}" in resumed.stdout
    want = load_checkpoint(tmp_path / "whole" / "checkpoint_last.pt")["model_state"]
    got = load_checkpoint(out / "checkpoint_last.pt")["model_state"]
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.slow
def test_the_train_rule_runs_two_ranks_through_snakemake(tmp_path, tiny_config):
    from conftest import snakemake, write_config

    tiny_config["models"] = {"seg": tiny_config["models"]["seg"]}
    tiny_config["model"].update(norm="group")
    tiny_config["train"].update(gpus=2, device="cpu")
    write_config(tmp_path, tiny_config)
    snakemake(tmp_path, "results/seg/checkpoint_best.pt", "--cores", "2",
              "--configfile", "config.yaml")
    log = (tmp_path / "logs/train/seg.log").read_text()
    assert "2 processes (DDP)" in log
    assert load_checkpoint(tmp_path / "results/seg/checkpoint_last.pt")["world_size"] == 2
