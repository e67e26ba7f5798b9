"""The workflow on a real single-node SLURM cluster, through `snakemake --profile slurm`.

`slurm_cluster` starts SLURM with tests/slurm/cluster.sh (munged, MariaDB, slurmdbd,
slurmctld, slurmd; apt-get installs them when missing). The test runs the segmentation
model of the tiny config up to its metrics through the `slurm` profile and, at the same
time, through `profiles/local` in a second copy of the workflow. The oracle is the local
run: both must compute the same metrics and the same trained weights. sacct must show one
SLURM job per rule instance, with a GPU for the rules that run the network and none for
the others.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import TINY_CONFIG
from unetflow.plates import write_demo_plate

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
# Rules that run the network: the profile gives them a GPU partition and `gpu: 1`; train
# asks for the model's train.gpus, here 2 (two ranks in one task, DDP).
GPU_RULES = {"train", "predict_shard", "predict_positions"}
TRAIN_GPUS = 2
# A small plate predicted too: 2 wells x 2 fields in batches of 2 positions -> 2 jobs.
PLATE = "data/plate.ome.zarr"
PLATE_BATCHES = 2
RUN_LIMIT_S = 420  # the SLURM run takes about 150 s; it is killed after this


def seg_config() -> tuple[dict, list[str]]:
    """The tiny config cut to its segmentation model, and that model's metrics as targets.

    One model keeps the chain of SLURM jobs (demo_data to evaluate, 8 deep) within budget;
    the rules after evaluate (montage, summarize, compare) add depth and nothing new. The
    model also predicts a small plate (copy_workflow writes it), in PLATE_BATCHES jobs. It
    trains on TRAIN_GPUS ranks (group norm: the CPU has no SyncBatchNorm).
    """
    config = copy.deepcopy(TINY_CONFIG)
    model = config["models"]["seg"]
    model["train"] = {"gpus": TRAIN_GPUS}
    model["model"] = {"norm": "group"}
    config["models"] = {"seg": model}
    used = set(model["train_on"]) | set(model["predict_on"])
    config["datasets"] = {k: v for k, v in config["datasets"].items() if k in used}
    config["datasets"]["plate"] = {"plate": PLATE, "wells": ["A01", "B02"],
                                   "labels": "nuclei"}
    model["predict_on"] = [*model["predict_on"], "plate"]
    config["predict"]["positions_per_job"] = 2
    return config, [f"results/seg/metrics/{d}.json" for d in model["predict_on"]]


def slurm_job_threads() -> list[str]:
    """--set-threads that give a local run the threads each rule gets in a SLURM job here:
    the profile's, capped by Snakemake inside the job at this machine's CPUs."""
    import yte

    with open(REPO / "profiles" / "slurm" / "config.yaml") as f:
        profile = yte.process_yaml(f, require_use_yte=True)
    cpus = len(os.sched_getaffinity(0))
    return [f"{rule}={min(n, cpus)}" for rule, n in profile["set-threads"].items()]


def _packages_installed() -> bool:
    query = ["dpkg-query", "-W", "-f=${Status}\n", *SLURM_PACKAGES]
    result = subprocess.run(query, capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.count("install ok installed") == len(
        SLURM_PACKAGES
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running single-node cluster; stops it afterwards if it started it."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test starts slurmd and munged: it needs root")
    if not _packages_installed() and shutil.which("apt-get") is None:
        pytest.skip(f"SLURM is not installed and apt-get is unavailable: {SLURM_PACKAGES}")
    running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    if not running:
        result = subprocess.run(
            [CLUSTER, "start"], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            pytest.fail(f"tests/slurm/cluster.sh start failed:\n{result.stdout}{result.stderr}")
    conf = subprocess.run([CLUSTER, "env"], capture_output=True, text=True, check=True)
    yield conf.stdout.strip().removeprefix("export SLURM_CONF=")
    if not running:
        subprocess.run([CLUSTER, "stop"], timeout=120)


def copy_workflow(dest: Path) -> Path:
    """The workflow as a user checks it out: Snakefile, rules, config, profiles, ./slurm."""
    dest.mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", dest)
    for name in ("workflow", "config", "profiles", "envs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, symlinks=True)
    os.symlink(os.readlink(REPO / "slurm"), dest / "slurm")
    (dest / "tiny.yaml").write_text(yaml.safe_dump(seg_config()[0]))
    write_demo_plate(dest / PLATE, rows=2, columns=2, fields=2, shape=(64, 64), seed=1,
                     clean=False)
    return dest


def workflow_env(slurm_conf: str | None = None) -> dict[str, str]:
    """Environment of a user whose PATH has this venv (jobs inherit it: sbatch --export=ALL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNETFLOW_SLURM_", "SLURM_"))}
    env.pop("SNAKEMAKE_PROFILE", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


def snakemake_command(*args: str) -> list[str]:
    return ["timeout", "-k", "10", str(RUN_LIMIT_S), sys.executable, "-m", "snakemake", *args]


def job_stats(log: str) -> Counter:
    """Jobs per rule from the `Job stats:` table Snakemake prints before it starts."""
    table = log.split("Job stats:", 1)[1].splitlines()
    counts = Counter()
    for line in table[3:]:  # after "job  count" and "-----  -----"
        rule, _, count = line.rpartition(" ")
        if rule.strip() == "total" or not count.isdigit():
            break
        counts[rule.strip()] = int(count)
    return counts


def sacct_jobs(job_ids: list[str], slurm_conf: str) -> list[dict[str, str]]:
    fields = ["JobID", "Comment", "Partition", "State", "ReqTRES", "AllocTRES"]
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), "-o", ",".join(fields)],
        capture_output=True, text=True, check=True, env={**os.environ, "SLURM_CONF": slurm_conf},
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def rule_of(comment: str) -> str:
    """The plugin sets --comment rule_<rule>[_wildcards_<values>]."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def assert_close(a, b, path: str = "") -> None:
    """Equal JSON-like values, floats within 1e-6 relative."""
    assert type(a) is type(b), f"{path}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or (
            math.isnan(a) and math.isnan(b)
        ), f"{path}: {a} vs {b}"
    else:
        assert a == b, path


def assert_same_results(slurm_dir: Path, local_dir: Path) -> None:
    import torch

    metrics = sorted(p.relative_to(local_dir) for p in local_dir.glob("results/*/metrics/*.json"))
    assert metrics, "the local run wrote no metrics"
    for rel in metrics:
        assert_close(
            json.loads((slurm_dir / rel).read_text()),
            json.loads((local_dir / rel).read_text()),
            str(rel),
        )
    for local_ckpt in local_dir.glob("results/*/checkpoint_last.pt"):
        rel = local_ckpt.relative_to(local_dir)
        a = torch.load(slurm_dir / rel, map_location="cpu", weights_only=False)["model_state"]
        b = torch.load(local_ckpt, map_location="cpu", weights_only=False)["model_state"]
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{rel} {name}")


@pytest.mark.slurm
def test_workflow_on_slurm_equals_local_run(slurm_cluster, tmp_path):
    slurm_dir = copy_workflow(tmp_path / "slurm_run")
    local_dir = copy_workflow(tmp_path / "local_run")
    targets = seg_config()[1]
    # The local run is the oracle. It runs meanwhile, niced: the SLURM run mostly waits on
    # polls, and its jobs are the critical path.
    with open(local_dir / "snakemake.log", "w") as local_log:
        local = subprocess.Popen(
            ["nice", "-n", "10", *snakemake_command(
                "--profile", "profiles/local", "--configfile", "tiny.yaml",
                "--set-threads", *slurm_job_threads(), "--", *targets,
            )],
            cwd=local_dir, env=workflow_env(), stdout=local_log, stderr=subprocess.STDOUT,
        )
        slurm = subprocess.run(
            snakemake_command(
                "--profile", "slurm", "--configfile", "tiny.yaml",
                # Poll sacct 5 s after submitting, not 40: jobs here take seconds. A failing
                # job fails the test at once instead of after the profile's retries.
                "--slurm-init-seconds-before-status-checks", "5", "--retries", "0",
                "--", *targets,
            ),
            cwd=slurm_dir, env=workflow_env(slurm_cluster), capture_output=True, text=True,
        )
        local.wait()
    log = slurm.stdout + slurm.stderr
    assert slurm.returncode == 0, f"snakemake --profile slurm failed:\n{log[-6000:]}"
    assert local.returncode == 0, (local_dir / "snakemake.log").read_text()[-6000:]
    assert "SLURM run ID" in log, "the run did not go through the SLURM executor"

    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
    jobs = sacct_jobs(job_ids, slurm_cluster)
    table = "\n".join("|".join(job.values()) for job in jobs)
    assert len(jobs) == len(job_ids), table
    # One SLURM job per rule instance: per rule, as many jobs as Snakemake planned, and no
    # rule instance (rule + wildcards) twice.
    local_rules = set(re.findall(r"^localrule (\w+):", log, re.MULTILINE))
    planned = Counter({r: n for r, n in job_stats(log).items() if r not in local_rules})
    assert Counter(rule_of(job["Comment"]) for job in jobs) == planned, table
    assert len({job["Comment"] for job in jobs}) == len(jobs), table
    assert GPU_RULES <= planned.keys()
    assert planned["predict_positions"] == PLATE_BATCHES, table
    for job in jobs:
        assert job["State"] == "COMPLETED", table
        gpus = re.findall(r"gres/gpu=(\d+)", job["AllocTRES"])
        if rule_of(job["Comment"]) in GPU_RULES:
            want = TRAIN_GPUS if rule_of(job["Comment"]) == "train" else 1
            assert gpus == [str(want)] and "gres/gpu" in job["ReqTRES"], table
            assert job["Partition"] == "gpu", table
        else:
            assert not gpus and job["Partition"] == "cpu", table
    # the train job ran its command once (one task), which started both ranks
    train_log = (slurm_dir / "logs/train/seg.log").read_text()
    assert train_log.count(f"{TRAIN_GPUS} processes (DDP)") == 1, train_log[-3000:]

    assert_same_results(slurm_dir, local_dir)


def test_profile_slurm_dry_run_from_repo_root(tmp_path):
    """`snakemake --profile slurm -n` typed at the root finds ./slurm and its GPU resources;
    partitions and account come from the environment."""
    root = copy_workflow(tmp_path / "repo")
    env = workflow_env()
    env.update(UNETFLOW_SLURM_GPU_PARTITION="a100", UNETFLOW_SLURM_ACCOUNT="my_lab")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "--configfile",
         "tiny.yaml"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    resources = dict(re.findall(r"\nrule (\w+):\n(?:    .*\n)*?    resources: (.*)", log))
    for rule in GPU_RULES:
        gpus = TRAIN_GPUS if rule == "train" else 1
        assert re.search(rf"\bgpu={gpus}\b", resources[rule]), resources[rule]
        assert "cpus_per_gpu=8" in resources[rule], resources[rule]
        assert "slurm_partition=a100" in resources[rule], resources[rule]
        # no tasks or tasks_per_gpu: the plugin would add --ntasks-per-gpu and start the
        # command once per GPU (each a torchrun of its own)
        assert "tasks" not in resources[rule], resources[rule]
    for rule in resources.keys() - GPU_RULES:
        assert "gpu=" not in resources[rule] and "slurm_partition=cpu" in resources[rule]
    assert all("slurm_account=my_lab" in r for r in resources.values()), resources
