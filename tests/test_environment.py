"""Environmental failures end with one line naming the path or the resource, and reruns pick up.

Met for real where the machine allows it (root, Linux): a full disk is a small tmpfs filled to
the last byte, a read-only results folder is a tmpfs mounted read-only, and an out-of-memory
kill is a memory cgroup (v1) with a limit below what the stage needs. Mounts and cgroups are
removed whatever happens (fixtures with finally); the cases skip with the reason elsewhere.
Also here: signals still reach the stage run in a forked child (unetflow.supervisor), the
child dies with its parent, a pickle is refused (not called damaged) at train.init_from, and
README's order of Snakemake's messages after a kill is the order a real rerun shows.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, REPO, TINY_CONFIG, run_cli, write_config
from test_bad_input import (
    assert_cli_error,
    assert_one_clear_line,
    normalize_cli,
    train_cli,
    write_2d,
)
from unetflow import files
from unetflow.cli import _error_line, build_parser
from unetflow.files import WriteFailed, atomic_path, write_json_atomic

UNETFLOW = Path(sys.executable).with_name("unetflow")
ROOT = os.geteuid() == 0 and sys.platform.startswith("linux")


@pytest.fixture
def image(tmp_path) -> str:
    """A small NGFF 0.5 image (what rule normalize reads)."""
    data = np.random.default_rng(0).random((1, 128, 128), dtype=np.float32)
    return write_2d(tmp_path / "image.ome.zarr", data)


# --- machinery: tmpfs mounts, memory cgroups, processes ------------------------------------
@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """mount(name, size, read_only) -> a fresh tmpfs; all are unmounted at the end."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root on Linux")
    mounted: list[Path] = []

    def mount(name: str = "disk", size: str = "1m", read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> None:
    """Write files into `folder` until its file system has no byte left (unbuffered, so
    that no failing flush is left for close)."""
    for block in (1 << 16, 1 << 12):
        with open(folder / f"filler{block}", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * block)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    assert shutil.disk_usage(folder).free == 0


def unfill(folder: Path) -> None:
    for filler in folder.glob("filler*"):
        filler.unlink()


def leftovers(folder: Path) -> list[str]:
    """Files under `folder` other than the fillers (temporaries of a failed write included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith("filler"))


def _memory_cgroup_root() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[int], Path]]:
    """limit(bytes) -> a new v1 memory cgroup; removed at the end (its processes killed)."""
    parent = _memory_cgroup_root() if ROOT else None
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs root and a writable cgroup v1 memory controller")
    made: list[Path] = []

    def limit(nbytes: int) -> Path:
        group = parent / f"unetflow_test_{os.getpid()}_{len(made)}"
        group.mkdir()
        made.append(group)
        (group / "memory.limit_in_bytes").write_text(str(nbytes))
        for name, value in (("memory.swappiness", "0"), ("memory.memsw.limit_in_bytes",
                                                        str(nbytes))):
            try:
                (group / name).write_text(value)
            except OSError:
                pass  # no swap accounting: the limit alone decides
        return group

    try:
        yield limit
    finally:
        for group in made:
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.05)
            group.rmdir()


def start(*args: str, cgroup: Path | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`unetflow <args>` as a rule's shell line starts it (in `cgroup` when given)."""
    command = [str(UNETFLOW), *args]
    if cgroup is not None:
        command = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def child_of(proc: subprocess.Popen) -> int:
    """The pid of the stage's process (the `unetflow` command's forked child)."""
    deadline = time.monotonic() + 60
    path = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        pids = path.read_text().split() if path.exists() else []
        if pids:
            return int(pids[0])
        time.sleep(0.01)
    pytest.fail("the stage's child process never started")


def gone(pid: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":  # dead, not yet reaped (its parent was killed): nothing runs
            return True
        time.sleep(0.01)
    return False


def demo_args(out: Path, side: int) -> list[str]:
    return ["demo-data", "--output-dir", str(out), "--settings",
            json.dumps({"shape_2d": [side, side], "shape_3d": [32, 32, 32]})]


# --- disk full -----------------------------------------------------------------------------
def _torch_save(path: Path) -> None:
    import torch

    from unetflow.model.checkpoint import save_checkpoint

    save_checkpoint(path, {"weights": torch.zeros(200_000)})


def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    plt.imshow(np.random.default_rng(0).random((400, 400)))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _tsv(path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for i in range(200_000):
            fh.write(f"{i}\t{i * 0.5}\n")


def _zarr(path: Path) -> None:
    import zarr

    with atomic_path(path) as tmp:
        array = zarr.create_array(str(tmp), shape=(1024, 1024), chunks=(256, 256),
                                  dtype="float32", compressors=None)
        array[...] = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)


WRITERS = {"json": lambda p: write_json_atomic(list(range(300_000)), p), "tsv": _tsv,
           "png": _png, "zarr": _zarr, "torch.save": _torch_save}


@pytest.mark.parametrize("kind", WRITERS)
def test_every_kind_of_write_on_a_full_disk_names_the_path_and_the_free_space(tmpfs, kind):
    disk = tmpfs(size="1m")
    fill(disk)
    path = disk / "results" / f"out.{kind}"
    with pytest.raises(WriteFailed) as raised:
        WRITERS[kind](path)
    assert str(raised.value) == (
        f"no space left on device writing {path} ({disk} has 0.0 MB free): free space and "
        f"run Snakemake again; the rerun starts this job again")
    assert leftovers(disk) == []  # no temporary left


def test_a_stage_on_a_full_disk_is_one_line_and_its_rerun_writes_the_output(tmpfs, image):
    disk = tmpfs(size="1m")
    fill(disk)
    out = disk / "results" / "normalization" / "d.json"
    result = normalize_cli(image, out)
    assert_cli_error(result, "normalize", f"no space left on device writing {out} ({disk} has",
                     "MB free): free space and run Snakemake again; the rerun starts this "
                     "job again")
    assert leftovers(disk) == []
    unfill(disk)
    assert normalize_cli(image, out).returncode == 0
    assert json.loads(out.read_text())["channels"]


def test_a_zarr_store_on_a_full_disk_names_the_store(tmpfs, tmp_path):
    """zarr and dask raise a bare [Errno 28] naming no file: the store is named instead."""
    import tifffile

    source = tmp_path / "big.tif"
    tifffile.imwrite(source, np.random.default_rng(0).random((768, 768), dtype=np.float32))
    disk = tmpfs(size="1m")
    out = disk / "big.ome.zarr"
    result = run_cli("convert", str(source), str(out), "--axes", "yx")
    assert_cli_error(result, "convert", f"no space left on device writing {out} ({disk} has",
                     "free space and run Snakemake again")
    assert leftovers(disk) == []


def test_training_on_a_full_disk_says_the_rerun_resumes_and_it_does(tmpfs, tmp_path):
    disk = tmpfs(size="2m")
    model_dir = disk / "results" / "m"
    model_dir.mkdir(parents=True)
    fill(disk)
    result, out = _train_into(tmp_path, model_dir)
    assert_cli_error(result, "train", "no space left on device writing", str(model_dir),
                     f"({disk} has", "the rerun resumes training from its last saved state")
    unfill(disk)
    result, out = _train_into(tmp_path, model_dir)
    assert result.returncode == 0, result.stderr
    assert (model_dir / "best.pt").exists()


def _train_into(tmp_path: Path, model_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """train_cli of test_bad_input, with the model folder on the given disk."""
    from test_bad_input import ARCH, data_config, write_patch_store

    config = data_config("i", "t")
    config["train"].update(steps=2, validate_every=1, batch_size=2)
    store = tmp_path / "patches.zarr"
    if not store.exists():
        write_patch_store(store)
    files_ = {name: str(model_dir / name) for name in ("best.pt", "last.pt", "log.csv",
                                                       "curve.png")}
    result = run_cli("train", "--store", str(store), "--model-dir", str(model_dir),
                     "--task", "segmentation", "--model-settings", json.dumps(
                         {**config["model"], **ARCH}),
                     "--settings", json.dumps(config["train"]), "--threads", "1",
                     *[x for name, path in files_.items()
                       for x in (f"--{name.split('.')[0]}", path)])
    return result, model_dir


def test_a_bare_disk_error_names_the_path_the_stage_writes():
    """A shard writes its tiles into the raw store (an input of its rule): that is named."""
    args = build_parser().parse_args(
        ["predict", "shard", "--checkpoint", "c.pt", "--image", "i.ome.zarr", "--stats", "s",
         "--raw", "results/m/predictions/d.shards/raw.zarr", "--output", "shard_0.json",
         "--shard", "0", "--settings", "{}"])
    line = _error_line(OSError(errno.ENOSPC, "No space left on device"), args, 1.0)
    assert line.startswith("no space left on device writing "
                           "results/m/predictions/d.shards/raw.zarr (")
    line = _error_line(OSError(errno.EDQUOT, "Disk quota exceeded"), args, 1.0)
    assert line.startswith("disk quota exceeded writing results/m/predictions/d.shards/raw.zarr")
    assert "free space within your quota" in line


def test_a_failed_torch_write_with_space_left_is_not_called_a_full_disk(tmp_path):
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    failure = files.write_failure(err, tmp_path / "last.pt")
    assert failure is not None and "no space left" not in str(failure)
    assert str(failure).startswith(f"writing {tmp_path / 'last.pt'} failed ([enforce fail")
    assert "check the disk and your quota" in str(failure)


# --- read-only and unwritable --------------------------------------------------------------
def test_a_read_only_results_folder_is_one_line_naming_the_path(tmpfs, image):
    disk = tmpfs(read_only=True)
    out = disk / "d.json"
    result = normalize_cli(image, out)
    assert_cli_error(result, "normalize", f"cannot write {out}: {disk} is a read-only file "
                     "system: write the results on a writable file system")


def test_permission_denied_names_the_folder_but_a_refused_input_keeps_its_own_message(
        tmp_path):
    args = build_parser().parse_args(
        ["normalize", "--image", "i.ome.zarr", "--dataset", "d", "--settings", "{}",
         "--output", str(tmp_path / "results" / "d.json")])
    line = _error_line(PermissionError(errno.EACCES, "Permission denied"), args, 1.0)
    assert line.startswith(f"cannot write {tmp_path / 'results' / 'd.json'}: permission "
                           f"denied ({tmp_path} is not writable for this user)")
    refused = PermissionError(errno.EACCES, "Permission denied", "/data/i.ome.zarr/zarr.json")
    assert _error_line(refused, args, 1.0) == str(refused)  # names its file already


# --- out of memory, signals, the forked child ----------------------------------------------
def test_a_stage_killed_by_the_out_of_memory_killer_leaves_one_line(memory_cgroup, tmp_path):
    group = memory_cgroup(200 * 2**20)
    proc = start(*demo_args(tmp_path / "demo", 2048), cgroup=group)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert_one_clear_line(stderr, "unetflow demo-data: error: killed by the kernel (SIGKILL) "
                          "after", "at peak RSS", "MB: out of memory (the out-of-memory killer "
                          "ended it; the job's memory limit is 200 MB): give the job more "
                          "memory (resources mem_mb; see README \"Memory\")",
                          "the rerun starts this job again")
    peak = int(re.search(r"peak RSS (\d+) MB", stderr).group(1))
    assert 50 < peak < 400, stderr
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").rglob("zarr.json"))


def test_a_child_killed_without_an_oom_kill_is_still_named(tmp_path):
    proc = start(*demo_args(tmp_path / "demo", 1024))
    child = child_of(proc)
    time.sleep(0.5)
    os.kill(child, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_one_clear_line(stderr, "unetflow demo-data: error: killed by SIGKILL after",
                          "most likely by the kernel, out of memory")


def test_the_stage_dies_with_its_parent(tmp_path):
    proc = start(*demo_args(tmp_path / "demo", 1024))
    child = child_of(proc)
    proc.kill()
    proc.wait()
    assert gone(child), "the stage outlived the killed `unetflow` command"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_reaches_the_stage_and_the_exit_status_is_the_stages(tmp_path, signum):
    proc = start(*demo_args(tmp_path / "demo", 1024))
    child = child_of(proc)
    time.sleep(0.3)
    proc.send_signal(signum)  # the parent only, as `kill PID` does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signum, stderr
    assert gone(child)
    assert ": error: " not in stderr  # a requested stop is no error to report


def test_the_forked_command_keeps_its_output_exit_codes_and_peak_memory_line(tmp_path):
    done = subprocess.run([str(UNETFLOW), *demo_args(tmp_path / "demo", 64)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"unetflow demo-data: peak RSS \d+ MB, \d+\.\d s", last), last
    assert done.stdout.count("peak RSS") == 1
    missing = subprocess.run([str(UNETFLOW), "show", str(tmp_path / "no.tsv")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.count(": error: ") == 1
    bad = subprocess.run([str(UNETFLOW), "show"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_running_out_of_memory_in_python_is_one_line(tmp_path):
    import resource

    limit = 3 << 30  # the allocation below asks for 13 GiB at once

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([str(UNETFLOW), *demo_args(tmp_path / "demo", 60000)],
                          capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert done.returncode == 1, done.stderr
    assert_one_clear_line(done.stderr, "unetflow demo-data: error: out of memory (MemoryError:",
                          "at peak RSS", "give the job more memory (resources mem_mb")


def test_torch_allocation_failures_are_named_as_memory():
    args = build_parser().parse_args(["show", "x.tsv"])
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 34359738368 bytes.")
    assert _error_line(cpu, args, 2.0).startswith("out of memory (RuntimeError: ")
    gpu = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to ...")
    line = _error_line(gpu, args, 2.0)
    assert line.startswith("out of GPU memory (OutOfMemoryError: CUDA out of memory.")
    assert "train.batch_size" in line
    assert _error_line(RuntimeError("a bug"), args, 2.0) is None  # keeps its traceback


# --- a pickle at train.init_from -----------------------------------------------------------
class _Shell:
    """Unpickling this runs os.system (a module torch's safe loader blocks by name)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch.save", "pickle.dump"])
def test_a_pickle_at_init_from_is_refused_not_called_damaged(tmp_path, kind):
    import torch

    marker, evil = tmp_path / "payload_ran", tmp_path / "evil.pt"
    payload = {"model_state": {}, "payload": _Shell(marker)}
    if kind == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=4))
    result, out = train_cli(tmp_path, str(evil))
    assert_cli_error(result, "train", "train.init_from:", str(evil),
                     "refused, since loading it could run code",
                     "use a checkpoint written by unetflow train")
    assert "damaged" not in result.stderr
    assert not marker.exists()


# --- README's troubleshooting order after a killed Snakemake --------------------------------
def _snakemake(work: Path, *args: str) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("snakemake")), *args, "-s",
               str(REPO / "Snakefile"), "--directory", str(work), "--workflow-profile", "none",
               "--cores", "1", "--configfile", "config.yaml"]  # targets first: see FACTS
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _first_exception(work: Path, *args: str) -> str:
    output, _ = _snakemake(work, *args).communicate(timeout=300)
    found = re.findall(r"^(\w+Exception):", output, re.MULTILINE)
    return found[0] if found else ""


def test_readme_lists_the_messages_after_a_killed_snakemake_in_the_order_they_come(tmp_path):
    """Snakemake SIGKILLed while a job runs (the job goes on and ends): the rerun first says
    IncompleteFilesException; with --rerun-incomplete it then says LockException; --unlock
    and the same command again run."""
    write_config(tmp_path, {**TINY_CONFIG, "demo": {"seed": 3, "shape_2d": [512, 512],
                                                    "shape_3d": [32, 64, 64]}})
    target = "demo_data"
    proc = _snakemake(tmp_path, target)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "data").glob("demo/**/.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.kill()  # Snakemake only: its job goes on, as when a login node drops the session
    proc.wait()
    job = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    for pid in job.stdout.split():
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.05)

    assert _first_exception(tmp_path, target) == "IncompleteFilesException"
    assert _first_exception(tmp_path, target, "--rerun-incomplete") == "LockException"
    assert _first_exception(tmp_path, "--unlock") == ""
    assert _first_exception(tmp_path, target, "--rerun-incomplete") == ""
    assert (tmp_path / "data/demo/train_2d/image.ome.zarr/zarr.json").exists()

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**After a crash, a kill or a full disk.**"):]
    assert 0 < section.index("IncompleteFilesException") < section.index("LockException")
