"""Shared fixtures: a tiny but complete workflow config, and a way to run Snakemake for real."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unetflow.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_CONFIG = {
    "demo": {"seed": 3, "shape_2d": [192, 192], "shape_3d": [32, 64, 64]},
    "datasets": {
        "tr_seg": {"image": "data/demo/train_2d/image.ome.zarr",
                   "target": "data/demo/train_2d/labels.ome.zarr"},
        "te_seg": {"image": "data/demo/test_2d/image.ome.zarr",
                   "target": "data/demo/test_2d/labels.ome.zarr"},
        "tr_dn": {"image": "data/demo/train_2d/image.ome.zarr",
                  "target": "data/demo/train_2d/clean.ome.zarr"},
        "te_dn": {"image": "data/demo/test_2d/image.ome.zarr",
                  "target": "data/demo/test_2d/clean.ome.zarr"},
    },
    "models": {
        "seg": {"task": "segmentation", "train_on": ["tr_seg"], "predict_on": ["te_seg"]},
        "dn": {"task": "regression", "train_on": ["tr_dn"], "predict_on": ["te_dn"],
               "model": {"residual": True}},
    },
    "patches": {"shape": [32, 32], "per_dataset": 16},
    "model": {"depth": 2, "base_features": 4},
    "train": {"steps": 4, "validate_every": 2, "batch_size": 4, "warmup_steps": 1},
    "predict": {"tile_shape": [64, 64], "pyramid_levels": 2},
}


@pytest.fixture(autouse=True)
def fresh_notices():
    """A stage records the warnings said in its process (unetflow.notices), and a job is one
    process; tests run many stages in one, so each test starts with an empty record."""
    from unetflow import notices

    notices.forget()


@pytest.fixture
def one_torch_thread():
    """The CPU is shared: one torch thread per worker is fast and predictable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config() -> dict:
    """A fresh copy of the tiny config (edit freely)."""
    return copy.deepcopy(TINY_CONFIG)


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run the real Snakemake of this venv on the repository's Snakefile in `workdir`."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--workflow-profile", "none", *args]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


JOB_RE = re.compile(r"^(?:local)?rule (\w+):$")


def planned_jobs(output: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job that a dry run's output says it would execute."""
    jobs, current = set(), None
    for line in output.splitlines():
        match = JOB_RE.match(line.strip())
        if match:
            if current:
                jobs.add(tuple(current))
            current = [match.group(1), ""]
        elif current and line.strip().startswith("wildcards:"):
            current[1] = line.strip().removeprefix("wildcards:").strip()
    if current:
        jobs.add(tuple(current))
    return jobs


@pytest.fixture(scope="session")
def completed_tiny_run(tmp_path_factory) -> Path:
    """A workdir in which the tiny config has run to completion once (shared, do not modify)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    write_config(workdir, TINY_CONFIG)
    snakemake(workdir, "--cores", "2", "--configfile", "config.yaml")
    return workdir


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[str, Path]:
    """An uninterrupted deterministic CPU training run: the oracle of the resumption tests
    in test_train.py and test_faults.py (trained once for both)."""
    from test_train import sections, train_in_process, write_store

    root = tmp_path_factory.mktemp("reference")
    store = write_store(root / "patches.zarr")
    train_in_process(store, root / "run", "segmentation", *sections())
    return store, root / "run"


@pytest.fixture
def tiny_run_copy(completed_tiny_run, tmp_path) -> Path:
    """A private copy of the completed tiny run, with Snakemake's metadata, to modify freely."""
    workdir = tmp_path / "run"
    shutil.copytree(completed_tiny_run, workdir, symlinks=True)
    return workdir


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`unetflow <args>` as a rule's shell line runs it: its main() with these arguments, in
    this process (the same code path, without a second start-up of torch per case)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(list(args))
            code = 0
        except SystemExit as stop:
            code = stop.code
    return subprocess.CompletedProcess(["unetflow", *args], code, out.getvalue(), err.getvalue())
