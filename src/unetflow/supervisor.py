"""A stage runs in a forked child, so that a job killed by the kernel still leaves a line.

When the kernel's out-of-memory killer ends a job it sends SIGKILL, which no process can
catch: the job's log stays empty and Snakemake says only "exit status 137". So `unetflow
<stage>` (the command line, not main() called in-process by tests) forks after parsing its
arguments; the child runs the stage, the parent, which holds only the parsed command line,
waits and, when the child was killed by SIGKILL, writes one line naming the resource:

    unetflow <stage>: error: killed by the kernel (SIGKILL) at peak RSS N MB, ...

and then ends the same way (killed by the same signal), so exit statuses are unchanged.
Everything else is unchanged too: the child inherits stdout and stderr, exit codes pass
through, the peak memory line is the child's (as before: the same process image), signals
sent to the parent (SIGTERM from SLURM, Ctrl-C...) are passed on to the child (train saves
its state on SIGTERM), and the child dies with the parent (PR_SET_PDEATHSIG), so killing
the job's main process never leaves a stage running. A fork costs about a millisecond.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["FORWARDED", "oom_kills", "run_in_child"]

# what the parent passes on: what SLURM, a terminal or a user sends to stop or notify a job
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
_CRASHES = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE)
PR_SET_PDEATHSIG = 1
SI_KERNEL = 0x80  # si_code of a signal the kernel sends (a terminal's Ctrl-C), Linux


def _memory_cgroups() -> list[Path]:
    """The memory cgroup folders of this process and its ancestors (v1 or v2), innermost
    first; empty where there are none to read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
            break
    else:
        path = next((p for line in lines for _, c, p in [line.split(":", 2)] if c == ""), None)
        root = Path("/sys/fs/cgroup")
        if path is None:
            return []
    folder = root / path.lstrip("/")
    return [folder, *[p for p in folder.parents if p.is_relative_to(root)]]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def oom_kills() -> int:
    """How many processes the out-of-memory killer has ended in this process's memory
    cgroups (v1 memory.oom_control or v2 memory.events: `oom_kill N`); 0 where unknown."""
    total = 0
    for folder in _memory_cgroups():
        for name in ("memory.oom_control", "memory.events"):
            for line in _read(folder / name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    total += int(value)
    return total


def _memory_limit_mb() -> float | None:
    """The smallest memory limit of this process's cgroups in MB, None if unlimited."""
    limits = []
    for folder in _memory_cgroups():
        for name in ("memory.limit_in_bytes", "memory.max"):
            text = _read(folder / name).strip()
            if text.isdigit() and int(text) < 1 << 60:
                limits.append(int(text) / 2**20)
    return min(limits) if limits else None


def _killed_line(stage: str, peak_mb: float, seconds: float, oom_before: int) -> str:
    limit = _memory_limit_mb()
    limit_text = f"; the job's memory limit is {limit:.0f} MB" if limit else ""
    if oom_kills() > oom_before:
        what = (f"killed by the kernel (SIGKILL) after {seconds:.1f} s at peak RSS "
                f"{peak_mb:.0f} MB: out of memory (the out-of-memory killer ended it"
                f"{limit_text})")
    else:
        what = (f"killed by SIGKILL after {seconds:.1f} s at peak RSS {peak_mb:.0f} MB, most "
                f"likely by the kernel, out of memory{limit_text}")
    rerun = ("resumes training from its last saved state" if stage == "train" else
             "starts this job again")
    return (f"unetflow {stage}: error: {what}: give the job more memory (resources mem_mb; "
            f"see README \"Memory\"), or make it need less (smaller tiles, batches or fewer "
            f"workers); the rerun {rerun}")


def _libc_prctl():
    """libc's prctl (loaded before the fork: the child calls it at once), None if absent."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl, parent: int) -> None:
    """Have the kernel SIGKILL this child when the parent ends (Linux); elsewhere nothing."""
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before prctl: no signal will come
        os._exit(1)


def _end_like(status: int) -> None:
    """End this process as the child ended: the same exit code, or the same signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        time.sleep(1)  # a signal whose default is to ignore it (none of those forwarded)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


def _wait_forwarding(pid: int) -> tuple[int, object]:
    """Wait for the child, passing on the signals that processes send to this one.

    Signals the terminal sends (Ctrl-C, a hang-up: si_code SI_KERNEL) reach the whole
    foreground process group, the child among them, so they are not sent twice: a second
    KeyboardInterrupt could cut the child's clean-up short. SIGCHLD says the child changed.
    """
    waited = (*FORWARDED, signal.SIGCHLD)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        info = signal.sigwaitinfo(waited)
        if info.si_signo != signal.SIGCHLD and info.si_code != SI_KERNEL:
            _forward(pid, info.si_signo)


def run_in_child(stage: str) -> None:
    """Fork; the child returns and runs the stage, the parent never returns (see the module
    docstring). Without fork (not POSIX) the caller runs the stage itself."""
    if not hasattr(os, "fork") or not hasattr(signal, "sigwaitinfo"):
        return
    started, oom_before = time.monotonic(), oom_kills()
    sys.stdout.flush()
    sys.stderr.flush()
    parent, prctl = os.getpid(), _libc_prctl()
    # blocked from before the fork: the parent takes them with sigwaitinfo, none is lost
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (*FORWARDED, signal.SIGCHLD))
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with_parent(prctl, parent)
        from unetflow.files import name_temporaries_after

        name_temporaries_after(parent)
        return
    status, usage = _wait_forwarding(pid)  # the signals stay blocked: this process ends
    seconds = time.monotonic() - started
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGKILL:
            print(_killed_line(stage, peak_mb, seconds, oom_before), file=sys.stderr,
                  flush=True)
        elif signum in _CRASHES:
            print(f"unetflow {stage}: error: crashed ({signal.Signals(signum).name}) after "
                  f"{seconds:.1f} s at peak RSS {peak_mb:.0f} MB; this is a bug (or a broken "
                  f"library install): please report it with the job's log", file=sys.stderr,
                  flush=True)
    _end_like(status)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
