"""The first process of every run: `python -m workbench.jobs.supervise EXIT_FILE -- CMD ...`.

It starts CMD in its own process group (which the run manager created with a new session), waits
for it, and writes CMD's exit status to EXIT_FILE. The run manager that started a run may restart
while it trains; the exit file is how a later manager learns whether the run succeeded or failed
(a process that is not your child has no exit status you can read). When CMD ends, whatever it left
behind (dataloader workers, DDP ranks: in the group or carrying the run's marker) is terminated, so a
run leaves no orphans.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from workbench.jobs.processes import RUN_MARKER, run_marker, start_token, terminate_run


def _write_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


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
    # the command and everything it starts carry the run's marker: DDP ranks that torchrun puts in sessions
    # of their own are found by it (the run manager computes the same marker from this process's pid)
    marker = run_marker(os.getpid(), start_token(os.getpid()))
    try:
        child = subprocess.Popen(command, env={**os.environ, RUN_MARKER: marker})
    except OSError as e:
        print(f"cannot start {command[0]!r}: {e}", file=sys.stderr, flush=True)
        _write_atomically(exit_file, {"returncode": 127, "started_at": started, "ended_at": time.time(),
                                      "error": str(e)})
        return 127
    returncode = child.wait()
    terminate_run(os.getpgrp(), marker, own_group=True)  # what the command left behind: workers, DDP ranks
    _write_atomically(exit_file, {"returncode": returncode, "started_at": started, "ended_at": time.time(),
                                  "signals": received})
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
