"""Training stage on tiny real patch stores: preemption and resumption against an
uninterrupted run, checkpoints under weights_only, augmentation, schedule, fine-tuning."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from unetflow.config import model_section, validate_config
from unetflow.model.checkpoint import load_checkpoint
from unetflow.model.inference import memory_format_for
from unetflow.model.unet import UNet, build_unet
from unetflow.train import (
    EXECUTION_KEYS,
    LearningRateSchedule,
    PatchBatches,
    Trainer,
    batch_indices,
    build_optimizer,
    total_steps,
    train_model,
    training_fingerprint,
)

UNETFLOW = Path(sys.executable).with_name("unetflow")
STEPS, VALIDATE_EVERY = 60, 10
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def write_store(path: Path, task: str = "segmentation", n_train: int = 16, n_val: int = 4,
                shape: tuple[int, ...] = (32, 32), seed: int = 0) -> str:
    """A patch store laid out as extract_patches writes it: blobs in noise."""
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs["unetflow"] = {"task": task, "patch_shape": list(shape),
                               "normalize": {"method": "percentile", "clip": False},
                               "datasets": {"toy": {"level": 0}}}
    for split, n in (("train", n_train), ("val", n_val)):
        field = ndimage.gaussian_filter(rng.normal(size=(n, *shape)), (0,) + (2,) * len(shape))
        clean = (field > 0.5 * field.std()).astype(np.float32)
        image = (clean + rng.normal(0, 0.3, size=clean.shape)).astype(np.float32)[:, None]
        target = clean.astype(np.int32) if task == "segmentation" else clean[:, None]
        for name, data in (("images", image), ("targets", target)):
            array = group.create_array(f"{split}/{name}", shape=data.shape, dtype=data.dtype,
                                       chunks=(1, *data.shape[1:]))
            array[...] = data
    return str(path)


def sections(task: str = "segmentation", model: dict | None = None, **train) -> tuple[dict, dict]:
    """The model and train sections as validate_config fills them from the real schema."""
    model = {"depth": 2, "base_features": 4, **(model or {})}
    shape = [16] * model.get("spatial_dims", 2)
    config = validate_config({
        "datasets": {"d": {"image": "i.ome.zarr", "target": "t.ome.zarr"}},
        "models": {"m": {"task": task, "train_on": ["d"]}},
        "patches": {"shape": shape}, "predict": {"tile_shape": shape}, "model": model,
        "train": {"steps": STEPS, "validate_every": VALIDATE_EVERY, "batch_size": 4,
                  "warmup_steps": 2, "device": "cpu", "deterministic": True, **train}})
    return model_section(config, "m", "model"), model_section(config, "m", "train")


def outputs(out_dir: Path) -> dict[str, str]:
    return {name: str(out_dir / file) for name, file in (
        ("best", "checkpoint_best.pt"), ("last", "checkpoint_last.pt"),
        ("log", "training_log.csv"), ("curve", "loss_curve.png"))}


def train_in_process(store: str, out_dir: Path, task: str, model: dict, train: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    train_model(store, str(out_dir), task, model, train, threads=1, **outputs(out_dir))


def cli_args(store: str, out_dir: Path, model: dict, train: dict,
             task: str = "segmentation") -> list[str]:
    """The `unetflow train` command as the Snakemake rule runs it (out_dir made)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [str(UNETFLOW), "train", "--store", store, "--model-dir", str(out_dir),
            "--task", task, "--model-settings", json.dumps(model),
            "--settings", json.dumps(train), "--threads", "1"]
    for name, path in outputs(out_dir).items():
        args += [f"--{name}", path]
    return args


def start_cli(store: str, out_dir: Path, model: dict, train: dict,
              new_session: bool = False) -> subprocess.Popen:
    """`unetflow train` as the Snakemake rule runs it, output to files in out_dir."""
    args = cli_args(store, out_dir, model, train)
    runs = len(list(out_dir.glob("stdout*")))
    return subprocess.Popen(args, stdout=open(out_dir / f"stdout{runs}", "w"),
                            stderr=open(out_dir / f"stderr{runs}", "w"),
                            start_new_session=new_session)


def wait_for_saved_state(proc: subprocess.Popen, out_dir: Path) -> None:
    """Poll for the first saved state (a validation step), not a fixed sleep."""
    state = out_dir / "train_state" / "last.pt"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before saving"
        assert time.monotonic() < deadline, "no saved state after 300 s"
        time.sleep(0.005)


def assert_same_training(out_dir: Path, reference: Path) -> None:
    """Weights, optimizer state and log equal an uninterrupted run's, exactly."""
    got = load_checkpoint(out_dir / "checkpoint_last.pt")
    want = load_checkpoint(reference / "checkpoint_last.pt")
    assert got["step"] == want["step"] == STEPS
    for key, tensor in want["model_state"].items():
        assert torch.equal(got["model_state"][key], tensor), key
    for index, moments in want["optimizer_state"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(torch.as_tensor(got["optimizer_state"]["state"][index][name]),
                               torch.as_tensor(value)), (index, name)
    assert (out_dir / "training_log.csv").read_text() == \
        (reference / "training_log.csv").read_text()


# --- preemption and resumption -----------------------------------------------------------
def test_sigterm_saves_state_and_rerun_reaches_the_uninterrupted_weights(reference, tmp_path):
    store, ref = reference
    model, train = sections()
    proc = start_cli(store, tmp_path, model, train)
    wait_for_saved_state(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143
    interrupted_at = load_checkpoint(tmp_path / "train_state" / "last.pt")["step"]
    assert VALIDATE_EVERY <= interrupted_at < STEPS
    assert f"SIGTERM at step {interrupted_at}" in (tmp_path / "stderr0").read_text()
    assert not (tmp_path / "checkpoint_last.pt").exists()

    assert start_cli(store, tmp_path, model, train).wait() == 0
    stdout = (tmp_path / "stdout1").read_text()
    assert f"resumed from {tmp_path / 'train_state' / 'last.pt'} at step {interrupted_at}" \
        in stdout
    assert f"train: step {STEPS}/{STEPS} loss" in stdout  # a log line per validation
    assert_same_training(tmp_path, ref)


def test_sigkill_at_a_random_moment_replays_from_the_last_saved_state(reference, tmp_path):
    store, ref = reference
    model, train = sections()
    proc = start_cli(store, tmp_path, model, train)
    wait_for_saved_state(proc, tmp_path)
    delay = np.random.default_rng().uniform(0, 0.3)
    time.sleep(delay)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, f"finished within {delay:.3f} s"
    saved = load_checkpoint(tmp_path / "train_state" / "last.pt")["step"]
    assert saved % VALIDATE_EVERY == 0 and saved < STEPS, delay  # saved at validations only

    train_in_process(store, tmp_path, "segmentation", model, train)
    assert_same_training(tmp_path, ref)


def test_sigterm_to_the_job_with_two_loader_workers_resumes_with_none(reference, tmp_path):
    """SLURM signals every process of the job: workers must not die before the main process
    saves. Batches depend on the step only, and num_workers is not part of the fingerprint,
    so a rerun without workers continues the same run."""
    store, ref = reference
    model, train = sections(num_workers=2)
    proc = start_cli(store, tmp_path, model, train, new_session=True)
    wait_for_saved_state(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait() == 143, (tmp_path / "stderr0").read_text()[-2000:]

    train_in_process(store, tmp_path, "segmentation", *sections(num_workers=0))
    assert_same_training(tmp_path, ref)


def test_changed_training_settings_start_over(tmp_path, capsys):
    store = write_store(tmp_path / "patches.zarr", n_train=4, n_val=2)
    model, train = sections(steps=2, validate_every=2)
    train_in_process(store, tmp_path / "run", "segmentation", model, train)
    train_in_process(store, tmp_path / "run", "segmentation", model, {**train, "threads": 2})
    assert "resumed from" in capsys.readouterr().out
    train_in_process(store, tmp_path / "run", "segmentation", model,
                     {**train, "learning_rate": 0.01})
    assert "changed since" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["train_settings"][
        "learning_rate"] == 0.01


def test_fingerprint_covers_what_changes_the_result_only(tmp_path):
    store = write_store(tmp_path / "a.zarr", n_train=4, n_val=2)
    model, train = sections()
    base = training_fingerprint(model, train, store)
    for key, value in {"device": "auto", "amp": False, "compile": True, "num_workers": 3,
                       "threads": 7, "deterministic": False}.items():
        assert key in EXECUTION_KEYS
        assert training_fingerprint(model, {**train, key: value}, store) == base
    for key, value in {"learning_rate": 0.1, "steps": 5, "seed": 1, "batch_size": 2,
                       "augment": {**train["augment"], "noise": 0.1}}.items():
        assert training_fingerprint(model, {**train, key: value}, store) != base
    assert training_fingerprint({**model, "depth": 1}, train, store) != base
    other = write_store(tmp_path / "b.zarr", n_train=4, n_val=2, seed=1)
    assert training_fingerprint(model, train, other) != base


# --- checkpoints -------------------------------------------------------------------------
def test_checkpoint_round_trips_under_weights_only(reference):
    _, ref = reference
    ckpt = torch.load(ref / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    for key in ("model_config", "model_state", "optimizer_state", "scheduler_state", "step",
                "rng", "normalization", "task", "best_metric"):
        assert key in ckpt, key
    assert "normalize" not in ckpt  # one normalization key (format 2)
    model = UNet(**ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    optimizer = build_optimizer(model, ckpt["train_settings"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    assert ckpt["normalization"] == {"method": "percentile", "clip": False,
                                     "datasets": {"toy": {"level": 0}}}
    assert ckpt["step"] == STEPS and not list(ref.glob(".*.tmp"))
    best = load_checkpoint(ref / "checkpoint_best.pt")
    assert best["best_metric"] == max(r["val_metric"] for r in ckpt["history"]
                                      if r["val_metric"] != "")


# --- output ------------------------------------------------------------------------------
def test_log_holds_every_step_validations_and_learning_rate(reference):
    _, ref = reference
    with open(ref / "training_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "loss", "val_loss", "val_metric", "learning_rate"]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    validated = [int(r["step"]) for r in rows if r["val_metric"]]
    assert validated == list(range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY))
    rates = [float(r["learning_rate"]) for r in rows]
    assert rates[0] == pytest.approx(0.002 / 2) and max(rates) == pytest.approx(0.002)
    assert rates[-1] < 0.01 * max(rates)  # cosine decay to ~0 at the last step
    assert float(rows[-1]["val_metric"]) > float(rows[VALIDATE_EVERY - 1]["val_metric"])
    assert (ref / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- data and augmentation ---------------------------------------------------------------
def test_each_epoch_visits_every_patch_once_in_full_batches():
    n, size = 10, 4
    per_epoch = total_steps({"epochs": 1, "batch_size": size, "steps": 999}, n)
    assert per_epoch == 3
    assert total_steps({"epochs": None, "batch_size": size, "steps": 7}, n) == 7
    for epoch in range(2):
        batches = [batch_indices(n, size, 0, epoch * per_epoch + s) for s in range(per_epoch)]
        assert all(len(b) == size for b in batches)
        assert set(np.concatenate(batches)) == set(range(n))
    assert not np.array_equal(batch_indices(n, size, 0, 0), batch_indices(n, size, 0, 3))
    assert np.array_equal(batch_indices(n, size, 5, 4), batch_indices(n, size, 5, 4))
    assert len(batch_indices(3, 8, 0, 0)) == 8  # fewer patches than a batch: repeated


def test_training_batches_are_augmented_and_validation_patches_never(tmp_path):
    store = write_store(tmp_path / "patches.zarr", n_train=4, n_val=3)
    trainer = Trainer(store, str(tmp_path), "segmentation",
                      *sections(augment={"noise": 1.0}, num_workers=0))
    group = zarr.open_group(store, mode="r")
    x, y = trainer.val_data.patches(0, 3)
    assert np.array_equal(x.numpy(), group["val/images"][:])
    assert np.array_equal(y.numpy(), group["val/targets"][:])
    x, _ = trainer.train_data[0]
    stored = group["train/images"][:][batch_indices(4, 4, 0, 0)]
    assert x.shape == stored.shape and not np.allclose(x.numpy(), stored, atol=0.1)
    plain = PatchBatches(store, "train", 4, 0, None, "segmentation")
    assert np.array_equal(plain[0][0].numpy(), stored)


# --- optimization ------------------------------------------------------------------------
def _rates(settings: dict, steps: int, metrics: dict[int, float]) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LearningRateSchedule(optimizer, settings, steps)
    rates = []
    for done in range(1, steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_step(done)
        if done in metrics:
            schedule.after_validation(done, metrics[done])
    return rates


def test_warmup_then_cosine_decay():
    rates = _rates({"schedule": "cosine", "warmup_steps": 4}, 20, {})
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert rates[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 15 / 16)))


def test_plateau_reduces_only_after_warmup_and_patience():
    settings = {"schedule": "plateau", "warmup_steps": 4, "plateau_patience": 1,
                "plateau_factor": 0.5}
    flat = {step: 0.5 for step in range(2, 13, 2)}  # validations at 2, 4, ... never improve
    rates = _rates(settings, 14, flat)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # a bad metric in warmup: no cut
    # step 4 sets the best, 6 and 8 do not improve: patience 1 -> halved after step 8
    assert rates[4:8] == pytest.approx([1.0] * 4)
    assert rates[8] == pytest.approx(0.5) and rates[-1] == pytest.approx(0.25)


def test_weight_decay_spares_biases_and_normalization():
    model = build_unet({"depth": 1, "base_features": 4}, 2, 1, 2)
    decay, no_decay = build_optimizer(model, {"optimizer": "adamw", "learning_rate": 1e-3,
                                              "weight_decay": 0.1}).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["params"]
    assert all(p.ndim == 1 for p in no_decay["params"])


# --- fine-tuning -------------------------------------------------------------------------
def _encoder_state(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items() if k.startswith(("encoders", "downsamplings"))}


def test_fine_tuning_starts_from_the_checkpoint_and_freezes_the_encoder(reference, tmp_path):
    store, ref = reference
    start = load_checkpoint(ref / "checkpoint_last.pt")["model_state"]
    model, train = sections(init_from=str(ref / "checkpoint_last.pt"), freeze_encoder_steps=3,
                            steps=6, validate_every=3)
    trainer = Trainer(store, str(tmp_path), "segmentation", model, train, threads=1)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in start.items())
    trainer.run(progress=False, until=3)
    frozen = trainer.model.state_dict()
    for key, value in _encoder_state(start).items():
        assert torch.equal(frozen[key], value), key  # weights and normalization statistics
    assert not torch.equal(frozen["head.weight"], start["head.weight"])
    trainer.run(progress=False)
    after = trainer.model.state_dict()
    assert not all(torch.equal(after[k], v) for k, v in _encoder_state(start).items())


def test_fine_tuning_refuses_another_architecture_naming_both(reference, tmp_path):
    store, ref = reference
    model, train = sections(model={"base_features": 8}, init_from=str(ref / "checkpoint_last.pt"))
    with pytest.raises(ValueError, match="train.init_from") as err:
        Trainer(store, str(tmp_path), "segmentation", model, train)
    assert "'base_features': 4" in str(err.value) and "'base_features': 8" in str(err.value)


# --- other tasks, dimensions, devices ----------------------------------------------------
@pytest.mark.parametrize("task,spatial", [("regression", (16, 16)), ("segmentation", (8, 8, 8))])
def test_regression_and_3d_runs_write_all_outputs(tmp_path, task, spatial):
    store = write_store(tmp_path / "p.zarr", task, n_train=4, n_val=2, shape=spatial)
    model, train = sections(task, model={"spatial_dims": len(spatial), "depth": 1,
                                         "residual": task == "regression"},
                            steps=3, validate_every=3, augment={"noise": 0.05},
                            schedule="plateau" if task == "regression" else "cosine")
    train_in_process(store, tmp_path / "run", task, model, train)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_best.pt")
    assert ckpt["task"] == task and ckpt["model_config"]["spatial_dims"] == len(spatial)
    assert (ckpt["scheduler_state"]["plateau"] is not None) == (task == "regression")
    assert np.isfinite(ckpt["best_metric"])
    assert all(Path(p).exists() for p in outputs(tmp_path / "run").values())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_memory_format_fits_the_model_dimensions(spatial_dims):
    model = build_unet({"depth": 1, "base_features": 4}, spatial_dims, 1, 2).eval()
    x = torch.randn(1, 1, *[8] * spatial_dims)
    expected = model(x)
    fmt = memory_format_for(spatial_dims)
    model = model.to(memory_format=fmt)
    assert torch.allclose(model(x.contiguous(memory_format=fmt)), expected, atol=1e-5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("amp", [False, "bf16", "fp16"])
@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_cuda_training_with_mixed_precision_and_channels_last(tmp_path, amp, spatial):
    store = write_store(tmp_path / "p.zarr", n_train=8, n_val=4, shape=spatial)
    model, train = sections(model={"spatial_dims": len(spatial)}, device="cuda", amp=amp,
                            deterministic=False, steps=20, validate_every=10)
    trainer = Trainer(store, str(tmp_path), "segmentation", model, train)
    assert trainer.device.type == "cuda"
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    weight = next(p for p in trainer.model.parameters() if p.ndim == len(spatial) + 2)
    assert weight.is_contiguous(memory_format=memory_format_for(len(spatial)))
    trainer.run(progress=False)
    losses = [r["loss"] for r in trainer.history]
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (tmp_path / "train_state" / "last.pt").exists()


@pytest.mark.cuda
@cuda
def test_cuda_compiled_training_runs(tmp_path):
    store = write_store(tmp_path / "p.zarr", n_train=8, n_val=4)
    model, train = sections(device="cuda", compile=True, deterministic=False, steps=4,
                            validate_every=4)
    train_in_process(store, tmp_path / "run", "segmentation", model, train)
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["step"] == 4


@pytest.mark.cuda
@cuda
def test_cuda_resumed_run_equals_uninterrupted_in_deterministic_mode(tmp_path):
    store = write_store(tmp_path / "p.zarr", n_train=8, n_val=4)
    model, train = sections(device="cuda", amp=False, steps=12, validate_every=4)
    whole = Trainer(store, str(tmp_path / "whole"), "segmentation", model, train).run(False)
    Trainer(store, str(tmp_path / "parts"), "segmentation", model, train).run(False, until=6)
    resumed = Trainer(store, str(tmp_path / "parts"), "segmentation", model, train)
    assert resumed.resume_if_possible() and resumed.step == 6
    parts = resumed.run(False)
    for key, tensor in whole["model_state"].items():
        assert torch.equal(parts["model_state"][key], tensor), key


# --- encoder transfer (train.init_encoder_only) --------------------------------------------
def test_encoder_transfer_copies_exactly_the_encoder_and_leaves_decoder_and_head(
        reference, tmp_path):
    """A segmentation checkpoint's encoder starts a regression model (another head): the
    encoder's weights and statistics are the checkpoint's, everything else is what a fresh
    model of the same seed has; the checkpoint records where its encoder came from."""
    store, ref = reference
    source = load_checkpoint(ref / "checkpoint_last.pt")
    regression = write_store(tmp_path / "r.zarr", "regression", n_train=4, n_val=2)
    fresh = Trainer(regression, str(tmp_path / "fresh"), "regression",
                    *sections("regression", steps=2, validate_every=2)).model.state_dict()
    model, train = sections("regression", steps=2, validate_every=2, freeze_encoder_steps=2,
                            init_from=str(ref / "checkpoint_last.pt"), init_encoder_only=True)
    trainer = Trainer(regression, str(tmp_path / "run"), "regression", model, train)
    state = trainer.model.state_dict()
    encoder = _encoder_state(source["model_state"])
    assert encoder and all(torch.equal(state[k], v) for k, v in encoder.items())
    rest = [k for k in state if k not in encoder]
    assert rest and all(torch.equal(state[k], fresh[k]) for k in rest)
    bottleneck = "bottleneck.0.weight"
    assert not torch.equal(state[bottleneck], source["model_state"][bottleneck])
    final = trainer.run(progress=False)
    assert all(torch.equal(final["model_state"][k], v) for k, v in encoder.items())  # frozen
    record = final["initialized_from"]
    assert record["part"] == "encoder" and record["task"] == "segmentation"
    assert record["path"] == str(ref / "checkpoint_last.pt") and len(record["sha256"]) == 64


def test_encoder_transfer_refuses_another_encoder_naming_both(reference, tmp_path):
    store, ref = reference
    model, train = sections(model={"depth": 3}, init_from=str(ref / "checkpoint_last.pt"),
                            init_encoder_only=True)
    with pytest.raises(ValueError, match="train.init_encoder_only needs the same encoder") as err:
        Trainer(store, str(tmp_path), "segmentation", model, train)
    assert "'depth': 2" in str(err.value) and "'depth': 3" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_loss_that_is_not_finite_stops_the_run_naming_the_step_and_writes_nothing(tmp_path):
    """The loss is read once per step, after the optimizer step: a diverged run still stops
    at the first step whose loss is not finite, and leaves no state or checkpoint."""
    store = write_store(tmp_path / "p.zarr", task="regression")
    model, train = sections("regression", learning_rate=1e30, steps=20, validate_every=10)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 2; lower "
                                                 r"train.learning_rate"):
        train_in_process(store, tmp_path / "out", "regression", model, train)
    assert not list((tmp_path / "out").iterdir())
