"""Faults lose nothing: stages killed mid-way rerun to the same files as uninterrupted runs,
Snakemake never takes a killed job's output for complete, and concurrent predictions of
different datasets do not interfere.

Kills are real signals to real `unetflow` / `snakemake` processes, timed by watching the files
a stage writes (its temporary store, its scratch folder, its saved state), not by sleeps. The
oracle is always an uninterrupted run of the same stage on the same data.

Training preemption is also covered by tests/test_train.py (SIGTERM at the first saved state,
SIGKILL at a random moment after it, SIGTERM to the whole job with loader workers); the
parametrized test here adds later and earlier moments.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import BIN, REPO, TINY_CONFIG, planned_jobs, snakemake, write_config
from test_train import (
    STEPS,
    VALIDATE_EVERY,
    assert_same_training,
    sections,
    start_cli,
    train_in_process,
)
from unetflow.cli import main as cli_main
from unetflow.config import execution_settings, model_section, result_settings, validate_config
from unetflow.model.checkpoint import load_checkpoint
from unetflow.ome import write_image

UNETFLOW = Path(sys.executable).with_name("unetflow")
TIMEOUT = 300


# --- helpers -------------------------------------------------------------------------------
def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll `condition` every few milliseconds while `proc` runs; fail if it ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT} s"
        time.sleep(0.002)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the process finished before it was killed"


def run_cli_here(*args: str) -> None:
    """`unetflow <args>` in this process (its main(), as the rule's shell line calls it)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli_main(list(args))


def start(*args: str, cwd: Path, new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(list(args), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=new_session)


def zarr_content(path: Path) -> dict[str, object]:
    """Every group's and array's attributes, and every array's shape, dtype, chunks and values,
    by path inside the store. Timings (provenance shards[].seconds) are left out."""
    content: dict[str, object] = {}
    root = zarr.open_group(str(path), mode="r")
    nodes = [("", root), *root.members(max_depth=None)]
    for name, node in nodes:
        attrs = json.loads(json.dumps(node.attrs.asdict()))
        for shard in attrs.get("unetflow", {}).get("shards", []) if name == "" else []:
            shard.pop("seconds", None)
        content[f"{name}/attrs"] = attrs
        if isinstance(node, zarr.Array):
            content[f"{name}/array"] = (node.shape, str(node.dtype), node.chunks)
            content[f"{name}/values"] = node[...].tobytes()
    return content


def assert_same_store(got: Path, want: Path, arrays_only: bool = False) -> None:
    a, b = zarr_content(got), zarr_content(want)
    if arrays_only:
        a = {k: v for k, v in a.items() if not k.endswith("/attrs")}
        b = {k: v for k, v in b.items() if not k.endswith("/attrs")}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


# --- training ------------------------------------------------------------------------------
def saved_step(out_dir: Path) -> int:
    path = out_dir / "train_state" / "last.pt"
    return load_checkpoint(path)["step"] if path.exists() else 0


@pytest.mark.parametrize("signum, after_save", [
    (signal.SIGKILL, 0),  # during start-up or the first steps: nothing saved yet
    (signal.SIGKILL, 3),  # half-way, at a random moment after the third saved state
    (signal.SIGTERM, 4),  # later: the job is asked to stop and saves where it is
], ids=["SIGKILL-at-start", "SIGKILL-after-save-3", "SIGTERM-after-save-4"])
def test_training_killed_at_several_moments_reruns_to_the_uninterrupted_weights(
        reference, tmp_path, signum, after_save):
    store, ref = reference
    model, train = sections()
    proc = start_cli(store, tmp_path, model, train)
    if after_save:
        wait_until(lambda: saved_step(tmp_path) >= after_save * VALIDATE_EVERY, proc,
                   f"saved state {after_save}")
        time.sleep(np.random.default_rng().uniform(0, 0.05))
    proc.send_signal(signum)
    code = proc.wait()
    assert code == (143 if signum == signal.SIGTERM else -signal.SIGKILL), code
    assert not (tmp_path / "checkpoint_last.pt").exists()  # no output looks complete
    saved = saved_step(tmp_path)
    assert saved < STEPS and (saved % VALIDATE_EVERY == 0 or signum == signal.SIGTERM)
    train_in_process(store, tmp_path, "segmentation", model, train)
    assert_same_training(tmp_path, ref)


# --- prediction ----------------------------------------------------------------------------
CONFIG = validate_config(TINY_CONFIG)
PREDICT_SETTINGS = model_section(CONFIG, "seg", "predict")  # what rule predict gets


def predict_args(run: Path, dataset: str, output: Path) -> list[str]:
    """`unetflow predict run` (create, shard, gather in one process): the oracle's form."""
    image = {"te_seg": "test_2d", "tr_seg": "train_2d"}[dataset]
    return ["predict", "run", "--checkpoint", str(run / "results/seg/checkpoint_best.pt"),
            "--image", str(run / f"data/demo/{image}/image.ome.zarr"),
            "--stats", str(run / f"results/normalization/{dataset}.json"),
            "--settings", json.dumps(PREDICT_SETTINGS), "--output", str(output),
            "--model", "seg", "--dataset", dataset, "--threads", "1"]


def predict_steps(run: Path, dataset: str, output: Path) -> dict[str, list[str]]:
    """The three commands rules predict_create, predict_shard and predict run for `dataset`
    (one shard), with the settings they pass (result settings apart from execution ones)."""
    image = {"te_seg": "test_2d", "tr_seg": "train_2d"}[dataset]
    common = ["--checkpoint", str(run / "results/seg/checkpoint_best.pt"),
              "--image", str(run / f"data/demo/{image}/image.ome.zarr"),
              "--settings", json.dumps(result_settings("predict", PREDICT_SETTINGS)),
              "--execution", json.dumps(execution_settings("predict", PREDICT_SETTINGS))]
    stats = ["--stats", str(run / f"results/normalization/{dataset}.json")]
    raw, record = scratch_of(output)
    return {"create": ["predict", "create", *common, "--output", str(raw)],
            "shard": ["predict", "shard", *common, *stats, "--raw", str(raw), "--shard", "0",
                      "--threads", "1", "--output", str(record)],
            "gather": ["predict", "gather", *common, *stats, "--raw", str(raw),
                       "--model", "seg", "--dataset", dataset, "--threads", "1",
                       "--output", str(output), str(record)]}


def scratch_of(output: Path) -> tuple[Path, Path]:
    """The raw store and the shard record the steps write next to `output`."""
    return (output.with_name(output.name + ".raw.zarr"),
            output.with_name(output.name + ".shard_0.json"))


@pytest.fixture(scope="module")
def predicted_alone(completed_tiny_run, tmp_path_factory) -> dict[str, Path]:
    """Each dataset predicted on its own, uninterrupted: the oracle of the fault tests."""
    root = tmp_path_factory.mktemp("predicted_alone")
    for dataset in ("te_seg", "tr_seg"):
        run_cli_here(*predict_args(completed_tiny_run, dataset, root / f"{dataset}.ome.zarr"))
    return {d: root / f"{d}.ome.zarr" for d in ("te_seg", "tr_seg")}


def _raw_chunks(output: Path) -> list[Path]:
    chunks = scratch_of(output)[0] / "output" / "c"
    return [p for p in chunks.rglob("*") if p.is_file()] if chunks.exists() else []


@pytest.mark.parametrize("moment", ["predicting tiles", "writing the output"])
def test_prediction_killed_mid_way_reruns_to_the_uninterrupted_store(
        completed_tiny_run, predicted_alone, tmp_path, moment):
    """The commands the rules run, SIGKILLed: the shard while it predicts tiles (no record
    appears), or the gather while it writes (no store appears); each rerun gives the store
    of an uninterrupted prediction."""
    output = tmp_path / "te_seg.ome.zarr"
    steps = predict_steps(completed_tiny_run, "te_seg", output)
    raw, record = scratch_of(output)
    run_cli_here(*steps["create"])
    if moment == "predicting tiles":
        proc = start(str(UNETFLOW), *steps["shard"], cwd=tmp_path)
        wait_until(lambda: bool(_raw_chunks(output)), proc, "a predicted tile")
        kill(proc)
        assert not record.exists()  # the shard's record appears only when it is complete
        assert 0 < len(_raw_chunks(output)) < 9  # killed with some of the 3 x 3 tiles done
        run_cli_here(*steps["shard"])
    else:
        run_cli_here(*steps["shard"])
        proc = start(str(UNETFLOW), *steps["gather"], cwd=tmp_path)
        wait_until(output.with_name(output.name + ".work").exists, proc, "the gather")
        kill(proc)
        assert not output.exists()  # the store appears only when complete
    run_cli_here(*steps["gather"])
    assert_same_store(output, predicted_alone["te_seg"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([output.name, raw.name, record.name])  # no scratch left


def test_two_datasets_predicted_at_once_into_one_folder_do_not_interfere(
        completed_tiny_run, predicted_alone, tmp_path):
    outputs = {d: tmp_path / f"{d}.ome.zarr" for d in ("te_seg", "tr_seg")}
    chains = [" && ".join(shlex.join([str(UNETFLOW), *step]) for step in
                          predict_steps(completed_tiny_run, d, out).values())
              for d, out in outputs.items()]
    procs = [start("bash", "-c", chain, cwd=tmp_path) for chain in chains]
    assert [p.wait(TIMEOUT) for p in procs] == [0, 0]
    for dataset, output in outputs.items():
        assert_same_store(output, predicted_alone[dataset])
    expected = [p.name for out in outputs.values() for p in (out, *scratch_of(out))]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--workflow-profile", "none", *args]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_orphans(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _session_alive(proc.pid):
        assert time.monotonic() < deadline, "orphaned jobs still running"
        time.sleep(0.05)


def _kill_during_gather(work: Path, targets: tuple[str, ...], options: tuple[str, ...],
                        store: Path, scratch: Path, whole_run: bool) -> subprocess.Popen:
    """Run Snakemake and SIGKILL it (its whole session, or Snakemake alone) once te_seg's
    gather has begun writing, while the store does not exist yet. The tiny image is gathered
    in milliseconds, so the kill can come after the store is complete: then the run is
    repeated (at most 5 times) until the kill lands during the gather."""
    for _attempt in range(5):
        for leftover in (scratch, store):
            if leftover.exists():
                shutil.rmtree(leftover)
        proc = start_snakemake(work, *targets, *options)
        wait_until(scratch.exists, proc, "te_seg's gather")
        if whole_run:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()  # Snakemake only: its jobs go on as orphans
        proc.wait()
        if not store.exists():
            return proc
        _wait_for_orphans(proc)  # too late: the gather had finished; run it again
        snakemake(work, "--unlock", *options)
    pytest.fail("te_seg's gather finished before every one of 5 kills")


def test_snakemake_never_takes_a_killed_prediction_for_complete(
        tiny_run_copy, tiny_config, completed_tiny_run, predicted_alone):
    """Two datasets predicted by concurrent jobs (--cores 2, one thread each). (1) The whole
    run is killed while te_seg's output is written: no store, and a dry run plans it again.
    (2) Only Snakemake is killed and the orphaned job completes the store: Snakemake marks it
    incomplete and refuses it until --rerun-incomplete, which remakes it identically."""
    work = tiny_run_copy
    tiny_config["datasets"]["tr_seg2"] = dict(tiny_config["datasets"]["tr_seg"])
    tiny_config["models"]["seg"]["predict_on"].append("tr_seg2")
    write_config(work, tiny_config)
    store = work / "results/seg/predictions/te_seg.ome.zarr"
    other = work / "results/seg/predictions/tr_seg2.ome.zarr"
    scratch = store.with_name(store.name + ".work")
    shutil.rmtree(store)
    options = ("--cores", "2", "--configfile", "config.yaml", "--set-threads",
               "predict_shard=1", "predict=1")
    targets = (str(store.relative_to(work)), str(other.relative_to(work)))

    _kill_during_gather(work, targets, options, store, scratch, whole_run=True)
    assert not store.exists()
    # the kill may also cut tr_seg2's shard job short (it runs beside the gather): Snakemake
    # then marks its record incomplete, and a user reruns with --rerun-incomplete
    dry = snakemake(work, "-n", "--rerun-incomplete", *options)
    assert ("predict", "model=seg, dataset=te_seg") in planned_jobs(dry.stdout + dry.stderr)

    snakemake(work, "--unlock", *options)
    # finish what the kill cut short besides te_seg (tr_seg2), so that only te_seg's gather
    # is in flight when Snakemake alone is killed next
    snakemake(work, targets[1], "--rerun-incomplete", *options)
    proc = _kill_during_gather(work, targets, options, store, scratch, whole_run=False)
    _wait_for_orphans(proc)
    assert store.exists() and not scratch.exists()  # the orphan finished it
    dry = snakemake(work, "-n", *options, check=False)
    assert dry.returncode != 0
    assert "IncompleteFilesException" in dry.stdout + dry.stderr
    assert str(store.relative_to(work)) in dry.stdout + dry.stderr
    assert "--rerun-incomplete" in dry.stdout + dry.stderr

    snakemake(work, "--unlock", *options)
    snakemake(work, *targets, "--rerun-incomplete", *options)
    assert_same_store(store, completed_tiny_run / store.relative_to(work))
    assert_same_store(other, predicted_alone["tr_seg"], arrays_only=True)  # same image
    assert planned_jobs(snakemake(work, "-n", *targets, *options).stdout) == set()


# --- patch extraction and normalization ----------------------------------------------------
def extract_args(run: Path, out: Path) -> list[str]:
    """`unetflow extract-patches` as rule extract_patches runs it for model seg, with more
    patches than the tiny config so that writing them takes a moment."""
    settings = {**model_section(CONFIG, "seg", "patches"), "per_dataset": 400}
    datasets = [{"name": "tr_seg", "image": str(run / "data/demo/train_2d/image.ome.zarr"),
                 "target": str(run / "data/demo/train_2d/labels.ome.zarr"),
                 "stats": str(run / "results/normalization/tr_seg.json"), "channels": None}]
    return ["extract-patches", "--datasets", json.dumps(datasets), "--task", "segmentation",
            "--settings", json.dumps(settings),
            "--normalize", json.dumps({"method": "percentile", "clip": False}),
            "--num-classes", "2", "--store", str(out / "patches.zarr"),
            "--manifest", str(out / "manifest.tsv")]


def test_patch_extraction_killed_while_writing_reruns_to_the_same_files(
        completed_tiny_run, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    reference.mkdir()
    out.mkdir()
    run_cli_here(*extract_args(completed_tiny_run, reference))
    args = extract_args(completed_tiny_run, out)
    proc = start(str(UNETFLOW), *args, cwd=out)
    temporary = out / f".patches.zarr.{proc.pid}.tmp"  # files.atomic_path's name
    wait_until(temporary.exists, proc, "the temporary patch store")
    kill(proc)
    assert not (out / "patches.zarr").exists()
    run_cli_here(*args)
    assert (out / "manifest.tsv").read_text() == (reference / "manifest.tsv").read_text()
    assert_same_store(out / "patches.zarr", reference / "patches.zarr")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.tsv", "patches.zarr"]


NORMALIZE_SETTINGS = {"level": 0, "percentiles": [1.0, 99.8], "histogram_bins": 4096,
                      "mask": None}


def cpu_seconds(proc: subprocess.Popen) -> float:
    """CPU time (user + system, all threads) a command has used so far, with the stage it
    runs in a forked child (unetflow.supervisor): a measure of its progress that, unlike
    wall time, hardly depends on what else the machine runs."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    total = 0
    for pid in [str(proc.pid), *(children.read_text().split() if children.exists() else [])]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the child ended just now: counted in the parent's below
            continue
        total += int(fields[11]) + int(fields[12])
        if pid == str(proc.pid):  # its children that ended (and were waited for)
            total += int(fields[13]) + int(fields[14])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_when_written(args: list[str], output: Path, cwd: Path) -> tuple[int, float | None]:
    """Exit status of a whole run, and the CPU seconds it had used when `output` appeared
    (None if it never did)."""
    proc, used = start(*args, cwd=cwd), None
    while proc.poll() is None:
        if used is None and output.exists():
            used = cpu_seconds(proc)
        time.sleep(0.002)
    return proc.returncode, used


def normalize_args(image: str, output: Path) -> list[str]:
    return ["normalize", "--image", image, "--dataset", "large", "--settings",
            json.dumps(NORMALIZE_SETTINGS), "--output", str(output)]


@pytest.fixture(scope="module")
def normalized_alone(tmp_path_factory) -> dict[str, object]:
    """A 3072 x 3072 float image (128-pixel chunks), its statistics from an uninterrupted
    `unetflow normalize`, and the CPU seconds of start-up and of the whole run."""
    root = tmp_path_factory.mktemp("large")
    image = str(root / "image.ome.zarr")
    data = np.random.default_rng(7).gamma(2.0, 100.0, size=(1, 3072, 3072)).astype(np.float32)
    write_image(image, data, ["c", "y", "x"], chunks=(1, 128, 128))
    before = sum(os.times()[2:4])
    code, _ = cpu_when_written([str(UNETFLOW), *normalize_args(
        str(root / "missing.ome.zarr"), root / "x.json")], root / "x.json", root)
    startup = sum(os.times()[2:4]) - before
    assert code == 1  # fails right after start-up: what starting costs
    code, written = cpu_when_written([str(UNETFLOW), *normalize_args(image, root / "ref.json")],
                                     root / "ref.json", root)
    assert code == 0 and written > startup + 0.3, (startup, written)
    return {"image": image, "stats": (root / "ref.json").read_text(), "startup": startup,
            "written": written}


@pytest.mark.parametrize("fraction", [0.15, 0.45])
def test_normalization_killed_mid_way_reruns_to_the_same_file(normalized_alone, tmp_path,
                                                              fraction):
    """Killed when it has done `fraction` of its computing (CPU time between start-up and
    the JSON's appearance in an uninterrupted run): no JSON, and the rerun writes the same
    file."""
    ref = normalized_alone
    args = normalize_args(ref["image"], tmp_path / "stats.json")
    proc = start(str(UNETFLOW), *args, cwd=tmp_path)
    at = ref["startup"] + fraction * (ref["written"] - ref["startup"])
    budget = {k: ref[k] for k in ("startup", "written")}
    wait_until(lambda: cpu_seconds(proc) >= at, proc, f"{at:.2f} CPU seconds {budget}")
    used = cpu_seconds(proc)
    kill(proc)
    assert not (tmp_path / "stats.json").exists(), (used, budget)
    run_cli_here(*args)
    assert (tmp_path / "stats.json").read_text() == ref["stats"]
