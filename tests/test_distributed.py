"""Training as several processes with torch.distributed (Gloo on this CPU): two ranks with
half the batch each take the steps one process takes with the whole batch; SIGTERM to the
job and SIGKILL of one rank stop every rank, and a rerun resumes exactly; rank 0 alone
writes. The ranks' file writes are observed with a Python audit hook (`sitecustomize` on the
PYTHONPATH of the real processes), not by replacing any function."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from test_train import cli_args, sections, train_in_process, write_store
from unetflow.model.checkpoint import load_checkpoint

# group norm normalizes each sample on its own (batch norm would see half the batch per rank)
NETWORK = {"norm": "group", "depth": 2, "base_features": 4}
STEPS, VALIDATE_EVERY = 30, 5
RUN = {"steps": STEPS, "validate_every": VALIDATE_EVERY, "batch_size": 8, "loss": "ce"}

# Every process of the job records, in <log dir>/<RANK or "launcher">.<pid>.txt, each file it
# opens for writing and each rename (os.replace: how atomic_path puts a file in place) under
# AUDIT_WRITES_UNDER. The log is written with os.write on a descriptor opened before the
# hook, so the hook never sees its own writes.
SITECUSTOMIZE = '''
import os, sys
_root = os.environ.get("AUDIT_WRITES_UNDER")
if _root:
    _name = f"{os.environ.get('RANK', 'launcher')}.{os.getpid()}.txt"
    _fd = os.open(os.path.join(os.environ["AUDIT_LOG_DIR"], _name),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def _audit(event, args):
        if event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = [args[1]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.realpath(os.fsdecode(path))
                if path.startswith(_root):
                    os.write(_fd, f"{event} {path}\\n".encode())

    sys.addaudithook(_audit)
'''


@dataclass
class AuditedRun:
    """A `unetflow train` run whose processes' writes are logged per rank."""

    store: str
    out: Path
    logs: Path
    result: subprocess.CompletedProcess | None = None

    def writes(self) -> dict[str, list[tuple[str, Path]]]:
        """(event, path relative to out) per process label (rank or launcher)."""
        found: dict[str, list[tuple[str, Path]]] = {}
        for log in sorted(self.logs.glob("*.txt")):
            label = log.name.split(".")[0]
            for line in log.read_text().splitlines():
                event, path = line.split(" ", 1)
                found.setdefault(label, []).append((event, Path(path).relative_to(self.out)))
        return found

    def pid_of(self, rank: int) -> int:
        (log,) = self.logs.glob(f"{rank}.*.txt")
        return int(log.name.split(".")[1])


def audited_env(tmp: Path, out: Path) -> tuple[dict[str, str], Path]:
    hook, logs = tmp / "audit_hook", tmp / f"audit_{out.name}"
    hook.mkdir(exist_ok=True)
    logs.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out.mkdir(parents=True)
    env = {**os.environ, "AUDIT_WRITES_UNDER": str(out.resolve()), "AUDIT_LOG_DIR": str(logs),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    return env, logs


def start_audited(store: str, tmp: Path, name: str, model: dict, train: dict
                  ) -> tuple[subprocess.Popen, AuditedRun]:
    out = tmp / name
    env, logs = audited_env(tmp, out)
    proc = subprocess.Popen(cli_args(store, out, model, train), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    return proc, AuditedRun(store, out, logs)


def run_cli(store: str, out_dir: Path, model: dict, train: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(store, out_dir, model, train), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> AuditedRun:
    """One uninterrupted 2-rank run, its writes audited: the reference of the resume tests."""
    tmp = tmp_path_factory.mktemp("ranks")
    store = write_store(tmp / "p.zarr", n_train=16, n_val=4)
    model, train = sections(model=NETWORK, gpus=2, **RUN)
    proc, run = start_audited(store, tmp, "whole", model, train)
    stdout, stderr = proc.communicate(timeout=600)
    run.result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode == 0, stderr[-3000:]
    return run


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint_last.pt")["model_state"]


def ignore_regions(store: str, label: int, seed: int = 1) -> None:
    """Mark a box of random size in every training patch as unlabelled (`label`), so the
    ranks' shares count different numbers of pixels."""
    rng = np.random.default_rng(seed)
    targets = zarr.open_group(store, mode="r+")["train/targets"]
    data = targets[...]
    for patch in data:
        h, w = rng.integers(0, 24, size=2)
        patch[:h, :w] = label
    targets[...] = data


@pytest.mark.slow
def test_two_ranks_of_half_the_batch_take_the_steps_of_one_process(tmp_path):
    """ce + Dice with unlabelled pixels and class weights: each rank counts other pixels,
    and the cross-entropy divides by the count of the whole batch (mean over ranks)."""
    store = write_store(tmp_path / "p.zarr", n_train=16, n_val=4)
    ignore_regions(store, label=2)
    common = {"steps": 12, "validate_every": 6, "batch_size": 8, "loss": "ce_dice",
              "ignore_label": 2, "class_weights": [1.0, 3.0],
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
    logged = [float(row.split(",")[1]) for row in
              (tmp_path / "two" / "training_log.csv").read_text().splitlines()[1:]]
    expected = [r["loss"] for r in single["history"]]
    np.testing.assert_allclose(logged, expected, rtol=1e-4)  # the loss of the whole batch


@pytest.mark.slow
def test_only_rank_zero_writes_and_each_file_once(uninterrupted):
    """Rank 1 and torchrun write nothing in the model's folder; rank 0 puts every output in
    place once, and the resume state once per validation and at the end."""
    writes = uninterrupted.writes()
    assert set(writes) <= {"0", "1", "launcher"} and "0" in writes
    assert not writes.get("1") and not writes.get("launcher"), writes
    placed = Counter(path for event, path in writes["0"] if event == "os.rename")
    validations = STEPS // VALIDATE_EVERY
    assert placed[Path("train_state/last.pt")] == validations + 1, placed
    for name in ("checkpoint_best.pt", "checkpoint_last.pt", "training_log.csv",
                 "loss_curve.png"):
        assert placed[Path(name)] == 1, placed
    assert 1 <= placed[Path("train_state/best.pt")] <= validations, placed
    # nothing else is put in place, and every file opened for writing is a temporary
    assert set(placed) == {Path("train_state/last.pt"), Path("train_state/best.pt"),
                           Path("checkpoint_best.pt"), Path("checkpoint_last.pt"),
                           Path("training_log.csv"), Path("loss_curve.png")}, placed
    opened = [path for event, path in writes["0"] if event == "open"]
    assert all(path.name.startswith(".") and path.name.endswith(".tmp") for path in opened)


def processes_writing_to(out: Path) -> list[int]:
    """Pids of the processes whose command line names `out` (torchrun, ranks, their
    supervisors)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def assert_no_rank_left(out: Path, within_s: float = 60) -> None:
    """Every process of the job ends: none waits in a collective or a teardown for a rank
    that is gone (torchrun may return before its ranks have exited)."""
    deadline = time.monotonic() + within_s
    while processes_writing_to(out):
        assert time.monotonic() < deadline, f"left running: {processes_writing_to(out)}"
        time.sleep(0.1)


def resume_to_the_uninterrupted_weights(uninterrupted: AuditedRun, run: AuditedRun,
                                        step: int, model: dict, train: dict) -> None:
    """Rerun the stopped job: it resumes at `step` and ends with the weights of the
    uninterrupted run, exactly."""
    resumed = run_cli(uninterrupted.store, run.out, model, train)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = run.out / "train_state" / "last.pt"
    assert f"resumed from {state} at step {step}" in resumed.stdout
    want, got = final_weights(uninterrupted.out), final_weights(run.out)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def wait_for_state(proc: subprocess.Popen, state: Path) -> None:
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_to_two_ranks_saves_once_and_a_rerun_equals_the_uninterrupted_run(
        uninterrupted, tmp_path):
    """SLURM signals every process: torchrun (the job's process) and its ranks stop at the
    same step, rank 0 saves, the job exits non-zero; the rerun resumes and ends with the
    weights of an uninterrupted 2-rank run, exactly. Resuming with 1 process is refused."""
    model, train = sections(model=NETWORK, gpus=2, **RUN)
    proc, run = start_audited(uninterrupted.store, tmp_path, "cut", model, train)
    state = run.out / "train_state" / "last.pt"
    wait_for_state(proc, state)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM: every process of the job
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert_no_rank_left(run.out)
    saved = load_checkpoint(state)
    assert saved["step"] < STEPS and saved["world_size"] == 2
    assert "SIGTERM at step" in stderr
    assert not run.writes().get("1")
    _, one = sections(model=NETWORK, gpus=1, **RUN)
    refused = run_cli(uninterrupted.store, run.out, model, one)
    assert refused.returncode != 0 and "set train.gpus: 2 to resume" in refused.stderr
    resume_to_the_uninterrupted_weights(uninterrupted, run, saved["step"], model, train)


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_job_and_a_rerun_resumes(uninterrupted, tmp_path):
    """A rank killed outright (out of memory, a lost GPU): torchrun ends the other rank and
    exits non-zero, none hangs in a collective; the state of the last validation is intact
    and the rerun ends with the uninterrupted run's weights, exactly."""
    model, train = sections(model=NETWORK, gpus=2, **RUN)
    proc, run = start_audited(uninterrupted.store, tmp_path, "killed", model, train)
    state = run.out / "train_state" / "last.pt"
    wait_for_state(proc, state)
    os.kill(run.pid_of(1), signal.SIGKILL)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stderr[-3000:]
    assert time.monotonic() - started < 120, "the job outlived its killed rank"
    assert_no_rank_left(run.out)
    saved = load_checkpoint(state)
    assert saved["step"] % VALIDATE_EVERY == 0 and saved["world_size"] == 2
    assert saved["step"] < STEPS, "the rank was killed after the run ended"
    resume_to_the_uninterrupted_weights(uninterrupted, run, saved["step"], model, train)


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


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_sync_batch_norm_take_the_steps_of_one_gpu(tmp_path):
    """NCCL, batch norm as SyncBatchNorm (statistics over the global batch of 8): 2 GPUs x 4
    equal 1 GPU x 8 up to the order of float32 reductions (bench/gpu_check.sh runs it)."""
    store = write_store(tmp_path / "p.zarr", n_train=16, n_val=4)
    common = {"steps": 12, "validate_every": 6, "batch_size": 8, "loss": "ce_dice",
              "device": "cuda", "amp": False}
    batch_norm = {**NETWORK, "norm": "batch"}
    model, one = sections(model=batch_norm, **common)
    train_in_process(store, tmp_path / "one", "segmentation", model, one)
    _, two = sections(model=batch_norm, gpus=2, **common)
    result = run_cli(store, tmp_path / "two", model, two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (DDP)" in result.stdout and "device cuda:0" in result.stdout
    single = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")["model_state"]
    ranks = load_checkpoint(tmp_path / "two" / "checkpoint_last.pt")["model_state"]
    assert ranks.keys() == single.keys()  # SyncBatchNorm saves the BatchNorm's names
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-3, atol=1e-4, msg=key)
