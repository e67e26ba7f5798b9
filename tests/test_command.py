"""Without the `unetflow` command on PATH (environment not activated) and without --sdm conda,
Snakemake stops before any job with one line saying what to do, instead of failing every job
with exit 127 said only in its log (common.smk, unetflow.checks.command_problem).

The real Snakemake of this venv runs by its full path, as `.venv/bin/snakemake` does when the
venv is not activated, on a PATH without the venv's bin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO, TINY_CONFIG, planned_jobs, write_config
from unetflow.checks import command_problem

MESSAGE = ("unetflow: the 'unetflow' command is not on PATH: activate the environment first "
           "(source .venv/bin/activate) or run with --sdm conda")
# The PATH of a shell where the venv is not activated: every folder holding a `unetflow` left out.
PATH_WITHOUT_VENV = os.pathsep.join(
    folder for folder in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    if folder and not (Path(folder) / "unetflow").exists())


def run_snakemake(workdir: Path, *args: str, path: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--workflow-profile", "none", "--configfile", "config.yaml", *args]
    return subprocess.run(cmd, cwd=workdir, env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def workdir(tmp_path) -> Path:
    write_config(tmp_path, TINY_CONFIG)
    return tmp_path


def test_command_problem_names_the_fix_unless_conda_brings_the_command():
    assert command_problem("sh") is None
    missing = "unetflow-no-such-command"
    assert command_problem(missing) == MESSAGE.replace("'unetflow'", f"'{missing}'")
    assert command_problem(missing, conda=True) is None


def test_a_run_without_the_command_stops_before_any_job_with_one_line(workdir):
    assert shutil.which("unetflow", path=PATH_WITHOUT_VENV) is None
    result = run_snakemake(workdir, "--cores", "1", path=PATH_WITHOUT_VENV)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert MESSAGE in output.splitlines(), output
    assert "command not found" not in output
    assert planned_jobs(output) == set(), output  # no job started
    for folder in ("data", "results", "logs", "benchmarks"):
        assert not (workdir / folder).exists(), folder


def test_a_dry_run_without_the_command_still_plans_the_jobs(workdir):
    """A dry run runs no command: it shows the plan whether or not the venv is active."""
    result = run_snakemake(workdir, "-n", "--cores", "1", path=PATH_WITHOUT_VENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert ("demo_data", "") in planned_jobs(output)
    assert MESSAGE not in output


@pytest.mark.parametrize("conda", [False, True])
def test_a_cluster_job_step_checks_when_it_parses_the_workflow(workdir, conda):
    """Job steps run with --mode remote and --no-hooks (no onstart) on the PATH the cluster
    gives them: they check at parse time (here through --lint, which only parses), and
    --sdm conda, which the main process passes on to them, brings the command."""
    sdm = ["--sdm", "conda"] if conda else []
    result = run_snakemake(workdir, "--mode", "remote", *sdm, "--lint", path=PATH_WITHOUT_VENV)
    output = result.stdout + result.stderr
    assert (MESSAGE in output.splitlines()) is not conda, output
    assert (result.returncode == 0) is conda, output


@pytest.mark.slow
def test_with_the_venv_bin_on_path_the_same_run_runs_its_jobs(workdir):
    path = f"{BIN}{os.pathsep}{PATH_WITHOUT_VENV}"
    result = run_snakemake(workdir, "--cores", "1", "demo_data", path=path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workdir / "data" / "demo" / "train_2d" / "image.ome.zarr").is_dir()
