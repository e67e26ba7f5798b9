"""Writing files and folders atomically: the one helper every writer of the package uses.

A job killed at any moment (SLURM preemption, OOM, Ctrl-C) must leave either the old result
or the new one, never a complete-looking half. Everything is written under a temporary name
in the same folder (same file system, so the final rename is atomic) and renamed into place
only when complete; on an error the temporary file or folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "file_sha256", "write_json_atomic", "write_text_atomic"]


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
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write a file or a folder (store) into.

    On success the temporary path replaces `path` (an existing file or folder there is
    removed first); on any error it is removed and `path` is left as it was. The temporary
    name carries the process id, so two processes never share it, and starts with a dot;
    temporaries of writers that were killed (their process is gone) are removed first.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    _remove_stale_siblings(final)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON atomically (a killed job never leaves a complete-looking file)."""
    write_text_atomic(json.dumps(data, indent=2), path)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints can be large); here, without
    torch, so that stages that only check a checkpoint's identity start fast."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
