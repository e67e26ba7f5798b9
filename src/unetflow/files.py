"""Writing files and folders atomically: the one helper every writer of the package uses.

A job killed at any moment (SLURM preemption, OOM, Ctrl-C) must leave either the old result
or the new one, never a complete-looking half. Everything is written under a temporary name
in the same folder (same file system, so the final rename is atomic) and renamed into place
only when complete; on an error the temporary file or folder is removed.

A write that fails for a reason outside the program (a full disk, a quota, a read-only or
unwritable folder) is raised as `WriteFailed`: one line naming the final path, the file
system and its free space, and what to do. Errors of zarr, dask and matplotlib carry no
file name (a bare `[Errno 28]`), and torch.save says `unexpected pos` when the disk is full.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["WriteFailed", "atomic_path", "file_sha256", "write_failure", "write_json_atomic",
           "write_text_atomic"]


RERUN = "the rerun starts this job again"
# torch.save reports a failed write (a full disk among others) as a RuntimeError with these
TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
# below this, a write that failed without saying why is taken for a full file system
NEARLY_FULL = 1 << 20


class WriteFailed(OSError):
    """A write failed for a reason outside the program; one line: the path, the cause, the fix.

    `rerun` says what running Snakemake again does for the job (the CLI sets it per stage).
    """

    def __init__(self, code: int, path: str | Path, what: str, fix: str) -> None:
        super().__init__(code, what, str(path))
        self.path, self.what, self.fix, self.rerun = str(path), what, fix, RERUN

    def __str__(self) -> str:
        return f"{self.what}: {self.fix} and run Snakemake again; {self.rerun}"


def _existing(path: Path) -> Path:
    """`path` or its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system that holds `path` (or would hold it)."""
    path = _existing(Path(path))
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes available to this user on the file system of `path`."""
    return shutil.disk_usage(_existing(Path(path))).free


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}" if n < 10e6 else f"{n / 1e6:.0f}"


def _no_space(path: str | Path, code: int = errno.ENOSPC) -> WriteFailed:
    mount, free = mount_point(path), free_bytes(path)
    if code == errno.EDQUOT:
        return WriteFailed(code, path, f"disk quota exceeded writing {path} (on {mount}, "
                           f"{_megabytes(free)} MB free)", "free space within your quota "
                           "(or ask for a larger one)")
    return WriteFailed(code, path, f"no space left on device writing {path} ({mount} has "
                       f"{_megabytes(free)} MB free)", "free space")


def _about(err: OSError, written: tuple[str, ...]) -> bool:
    """Whether `err` is about what is written: it names no file, or one under `written`
    (a read of an input refused while writing an output keeps its own message)."""
    name = err.filename
    return name is None or any(os.path.abspath(str(name)).startswith(os.path.abspath(w))
                               for w in written)


def write_failure(err: BaseException, path: str | Path,
                  written: tuple[str | Path, ...] = ()) -> WriteFailed | None:
    """`err`, raised while writing `path`, as a one-line WriteFailed when its cause is the
    environment (full disk, quota, read-only or unwritable folder); None when it is not.
    A permission error naming a file outside `written` (default: `path`) is not about this
    write: a refused read keeps its own message."""
    if isinstance(err, WriteFailed):
        return err
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code in (errno.EACCES, errno.EPERM) and not _about(
            err, tuple(str(w) for w in (written or (path,)))):
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return _no_space(path, code)
    if code == errno.EROFS:
        return WriteFailed(code, path, f"cannot write {path}: {mount_point(path)} is a "
                           "read-only file system", "write the results on a writable file "
                           "system (run Snakemake in a folder there)")
    if code in (errno.EACCES, errno.EPERM):
        folder = _existing(Path(path).parent)
        return WriteFailed(code, path, f"cannot write {path}: permission denied "
                           f"({folder} is not writable for this user)",
                           f"make {folder} writable (chmod u+w), or run Snakemake in a "
                           "folder you can write")
    if isinstance(err, RuntimeError) and any(t in str(err) for t in TORCH_WRITE_FAILED):
        if free_bytes(path) < NEARLY_FULL:
            return _no_space(path)
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        return WriteFailed(errno.EIO, path, f"writing {path} failed ({first}; "
                           f"{mount_point(path)} has {_megabytes(free_bytes(path))} MB free)",
                           "check the disk and your quota")
    return None


# (the pid of the forked child that runs a stage, the pid of the `unetflow` command)
_pid_alias: tuple[int, int] | None = None


def name_temporaries_after(command_pid: int) -> None:
    """Called in the forked child that runs a stage (unetflow.supervisor): its temporaries
    carry the pid of the `unetflow` command that Snakemake started, which lives exactly as
    long as the child does; processes the child starts keep their own pids."""
    global _pid_alias
    _pid_alias = (os.getpid(), command_pid)


def _writer_pid() -> int:
    pid = os.getpid()
    return _pid_alias[1] if _pid_alias is not None and _pid_alias[0] == pid else pid


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(final: Path) -> None:
    """Temporary siblings left by killed writers (their process is gone) can be large stores."""
    prefix = f".{final.name}."
    for stale in final.parent.glob(f"{prefix}*.tmp"):
        pid = stale.name[len(prefix):-len(".tmp")]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(stale)


@contextmanager
def _named(final: Path, tmp: Path) -> Iterator[None]:
    """An OSError of the environment inside, as WriteFailed naming `final`."""
    try:
        yield
    except OSError as err:
        failure = write_failure(err, final, (tmp, final))
        if failure is None or failure is err:
            raise
        raise failure from err


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write a file or a folder (store) into.

    On success the temporary path replaces `path` (an existing file or folder there is
    removed first); on any error it is removed and `path` is left as it was. The temporary
    name carries the process id, so two processes never share it, and starts with a dot;
    temporaries of writers that were killed (their process is gone) are removed first.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{_writer_pid()}.tmp")
    with _named(final, tmp):
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(final)
        _remove(tmp)
    try:
        yield tmp
    except BaseException as err:
        failure = write_failure(err, final, (tmp, final))  # before the removal
        _remove(tmp)
        if failure is not None and failure is not err:
            raise failure from err
        raise
    with _named(final, tmp):
        try:
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError:
            _remove(tmp)
            raise


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON atomically (a killed job never leaves a complete-looking file)."""
    write_text_atomic(json.dumps(data, indent=2), path)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints can be large); here, without
    torch, so that stages that only check a checkpoint's identity start fast. A folder (a
    bioimage.io package unzipped) hashes its files' relative paths and digests, in order."""
    if Path(path).is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n"
                          .encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
