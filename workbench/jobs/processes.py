"""Process identity and process groups, the OS side of the run manager.

A run is identified by its pid *and* the process start time, so that a pid reused by an unrelated
process after a restart of the workbench is never mistaken for the run (and never signalled)."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import psutil

HOST = socket.gethostname()


def thread_split(cores: int | None = None) -> tuple[int, int]:
    """(torch threads for the app, torch threads for a run) sharing this machine's cores: a run
    gets all but a quarter of them (at least one each), so chat keeps cores of its own while a
    run trains. Override with WORKBENCH_APP_THREADS / WORKBENCH_RUN_THREADS."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    app = max(1, cores // 4)
    run = max(1, cores - app)
    return (int(os.environ.get("WORKBENCH_APP_THREADS", app)), int(os.environ.get("WORKBENCH_RUN_THREADS", run)))


def check_nproc(nproc) -> None:
    """The number of training processes a run may start (DDP): one per GPU on a GPU machine, at most
    one per CPU core without one. ValueError names nproc otherwise."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a whole number of processes, at least 1, got {nproc!r}")
    if nproc == 1:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    limit, what = (gpus, f"{gpus} GPU(s)") if gpus else (os.cpu_count() or 1, f"{os.cpu_count() or 1} CPU cores "
                                                                                  "and no GPU")
    if nproc > limit:
        raise ValueError(f"nproc {nproc}: more processes than this machine has devices for ({what}); at most {limit}")


def start_token(pid: int) -> str | None:
    """A value that differs between two processes that had the same pid: the start time in clock
    ticks since boot from /proc (exact) or psutil's create time elsewhere. None if no such process."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        # the command name (field 2) may contain spaces and parentheses: split after its last ')'
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat, starttime
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        return f"{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def is_alive(pid: int | None, token: str | None) -> bool:
    """Is the process that had this pid and start token still running (a zombie counts as dead)?"""
    if not pid or start_token(pid) != token or token is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return run_processes(pgid, None)


# Every process of a run carries this variable in its environment (the supervisor sets it for the command;
# children inherit it): torchrun starts each DDP rank in a session of its own, outside the run's process
# group, and the marker is how the run's processes are found anyway.
RUN_MARKER = "WORKBENCH_RUN_MARKER"


def run_marker(pid: int | None, token: str | None) -> str | None:
    """The marker of the run whose supervisor is (pid, start token): unique per launch on this host."""
    return f"{HOST}:{pid}:{token}" if pid and token else None


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    except OSError:  # no /proc: psutil's way (macOS)
        return [f"{k}={v}".encode() for k, v in psutil.Process(pid).environ().items()]


def run_processes(pgid: int | None, marker: str | None) -> list[int]:
    """Live (non-zombie) processes of a run: the members of its process group and every process that
    carries its marker (DDP ranks in sessions of their own, their children). Never this process."""
    entry = f"{RUN_MARKER}={marker}".encode() if marker else None
    me, found = os.getpid(), []
    for proc in psutil.process_iter(["status"]):
        if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if (pgid and pgid > 1 and os.getpgid(proc.pid) == pgid) or (entry and entry in _environ(proc.pid)):
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def signal_run(pgid: int | None, marker: str | None, sig: int, *, own_group: bool = False) -> bool:
    """Send a signal to every process of a run (run_processes); False if none was left. Only the run's
    supervisor, which leads the run's group, passes own_group=True."""
    if pgid == os.getpgrp() and not own_group:
        raise RuntimeError("refusing to signal the workbench's own process group")
    sent = False
    for pid in run_processes(pgid, marker):
        try:
            os.kill(pid, sig)
            sent = True
        except ProcessLookupError:
            pass
    return sent


def terminate_run(pgid: int | None, marker: str | None, grace_s: float = 5.0, *, own_group: bool = False) -> None:
    """SIGTERM every process of a run, wait up to grace_s for them to exit, then SIGKILL what is left."""
    import time

    if not signal_run(pgid, marker, signal.SIGTERM, own_group=own_group):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not run_processes(pgid, marker):
            return
        time.sleep(0.05)
    signal_run(pgid, marker, signal.SIGKILL, own_group=own_group)
