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
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def signal_group(pgid: int | None, sig: int) -> bool:
    """Send a signal to every process of a group; False if the group is already gone."""
    if not pgid or pgid <= 1:  # never signal init's group or our own by accident
        return False
    if pgid == os.getpgrp():
        raise RuntimeError("refusing to signal the workbench's own process group")
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def terminate_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group, wait up to grace_s for it to exit, then SIGKILL what is left."""
    import time

    if not signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return
        time.sleep(0.05)
    signal_group(pgid, signal.SIGKILL)
