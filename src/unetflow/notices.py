"""Warnings that change what a result means, said where users look: the terminal and the report.

A job's stderr goes to its log, which nobody reads when the run ends with exit 0. So a stage
says such a warning through `warn`: one line `unetflow <stage>: warning: <message>` on stderr
(the job log, which Snakemake's onsuccess/onerror handler scans and repeats in the terminal,
see workflow/rules/common.smk), and the message is kept in this process so that the stage
records it in its output (statistics JSON, prediction store, metrics JSON), from where the
report shows it next to the numbers it qualifies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["WARNING_MARK", "forget", "job_warnings", "recorded", "set_stage", "warn"]

WARNING_MARK = ": warning: "  # what the log scan looks for in `unetflow <stage>: warning: ...`

_stage = "unetflow"
_recorded: list[str] = []


def set_stage(stage: str) -> None:
    """Name the stage this process runs (the CLI does this before the stage starts)."""
    global _stage
    _stage = f"unetflow {stage}"


def warn(message: str) -> None:
    """Say `message` on stderr as one warning line, and keep it for the stage's output."""
    message = " ".join(message.split())  # one line, whatever the message holds
    print(f"{_stage}{WARNING_MARK}{message}", file=sys.stderr, flush=True)
    if message not in _recorded:
        _recorded.append(message)


def recorded() -> list[str]:
    """The warnings said so far in this process, in order, each once."""
    return list(_recorded)


def forget() -> None:
    """Start a new record (tests run many stages in one process)."""
    _recorded.clear()


def job_warnings(log_root: str | Path, since: float) -> list[str]:
    """`<log>: <warning>` for each warning line in the job logs under `log_root` written
    since `since` (a time.time()), each message once, in log order: what Snakemake's
    onsuccess/onerror handler repeats in the terminal. Costs a stat per log (about 0.2 s for
    20,000 logs) and reads only the logs of this run."""
    found: dict[str, str] = {}
    for folder, _, names in os.walk(log_root):
        for name in sorted(names):
            path = Path(folder) / name
            try:
                if path.stat().st_mtime < since:
                    continue
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue  # a log removed or unreadable meanwhile: nothing to repeat
            for line in lines:
                stage, mark, message = line.partition(WARNING_MARK)
                if mark and stage.startswith("unetflow") and message not in found:
                    found[message] = f"{path}: {stage}: {message}"
    return list(found.values())
