"""The first process of every run: `python -m workbench.jobs.supervise EXIT_FILE -- CMD ...`.

It starts CMD in its own process group (which the run manager created with a new session), waits
for it, and writes CMD's exit status to EXIT_FILE. The run manager that started a run may restart
while it trains; the exit file is how a later manager learns whether the run succeeded or failed
(a process that is not your child has no exit status you can read). When CMD ends, whatever it left
behind in the group (dataloader workers, DDP ranks) is terminated, so a run leaves no orphans.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from workbench.jobs.processes import group_members


def _write_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _reap_leftovers(grace_s: float = 5.0) -> None:
    me = os.getpid()
    group = os.getpgrp()
    leftovers = [p for p in group_members(group) if p != me]
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.05)
        leftovers = [p for p in group_members(group) if p != me]
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m workbench.jobs.supervise EXIT_FILE -- CMD [ARGS...]", file=sys.stderr)
        return 2
    exit_file, command = Path(argv[0]), argv[2:]
    received = []
    # Cancel signals the whole group: the command gets SIGTERM itself; this process only notes it
    # and keeps waiting, so that it can still record how the command ended.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    started = time.time()
    try:
        child = subprocess.Popen(command)
    except OSError as e:
        print(f"cannot start {command[0]!r}: {e}", file=sys.stderr, flush=True)
        _write_atomically(exit_file, {"returncode": 127, "started_at": started, "ended_at": time.time(),
                                      "error": str(e)})
        return 127
    returncode = child.wait()
    _reap_leftovers()
    _write_atomically(exit_file, {"returncode": returncode, "started_at": started, "ended_at": time.time(),
                                  "signals": received})
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
