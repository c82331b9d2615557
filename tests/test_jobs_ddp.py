"""Issue 19.8: a DDP run's ranks end with the run. torchrun starts every rank in a session of its own, so
signalling the run's process group does not reach them; the run manager and the supervisor find them by
the run's marker in their environment. Real torchrun, two real ranks (CPU, gloo), real signals."""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import wait_for

from workbench.jobs import CANCELLED, FAILED, RUNNING, RunManager
from workbench.jobs.processes import is_alive, run_marker, run_processes, start_token

RANK = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    import torch
    import torch.distributed as dist

    if sys.argv[1] == "ignore-sigterm":  # a rank deaf to SIGTERM: only SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = pathlib.Path(os.environ["WORKBENCH_RUN_DIR"])
    (out / f"rank{rank}.pid").write_text(f"{os.getpid()} {os.getsid(0)}")
    step = torch.zeros(1)
    while True:  # train: a collective per step, and a file written after every step (as an adapter would be)
        dist.all_reduce(step)
        (out / f"rank{rank}.step").write_text(str(time.time()))
        time.sleep(0.2)
""")


def torchrun(script: Path, mode: str) -> list[str]:
    """The command the run manager builds for nproc=2 (train_command), with a rank script for a trainer."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), mode]


@pytest.fixture
def manager(tmp_path):
    m = RunManager(tmp_path / "runs", max_concurrent=1, grace_s=1.0, monitor=False, workdir=tmp_path)
    yield m
    m.close()
    for run in m.list():  # whatever a test did, nothing of its runs outlives it
        for pid in run_processes(run.pgid, run_marker(run.pid, run.proc_start)):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def rank_script(tmp_path) -> Path:
    path = tmp_path / "rank.py"
    path.write_text(RANK)
    return path


def start_two_ranks(manager, rank_script, mode):
    run = manager.submit({}, command=torchrun(rank_script, mode))
    pid_files = [run.output_dir / f"rank{r}.pid" for r in (0, 1)]
    wait_for(lambda: all(f.exists() and f.read_text() for f in pid_files) and
             all((run.output_dir / f"rank{r}.step").exists() for r in (0, 1)), timeout=180, step=0.2)
    ranks = [int(f.read_text().split()[0]) for f in pid_files]
    run = manager.get(run.id)
    assert run.status == RUNNING
    # the bug's premise: each rank leads a session of its own, outside the run's process group
    assert all(os.getsid(pid) == pid and os.getpgid(pid) != run.pgid for pid in ranks)
    marker = run_marker(run.pid, run.proc_start)
    assert set(ranks) <= set(run_processes(run.pgid, marker))
    return run, ranks, marker


def assert_nothing_left(run, ranks, marker):
    tokens = {pid: start_token(pid) for pid in ranks}
    assert [pid for pid in ranks if is_alive(pid, tokens[pid])] == []
    assert run_processes(run.pgid, marker) == []
    steps = {p: p.read_text() for p in run.output_dir.glob("rank*.step")}
    time.sleep(1.5)  # nothing trains on after the run has ended: no rank writes another step
    assert {p: p.read_text() for p in run.output_dir.glob("rank*.step")} == steps


def test_cancel_ends_every_rank_even_ranks_deaf_to_sigterm(manager, rank_script):
    run, ranks, marker = start_two_ranks(manager, rank_script, "ignore-sigterm")
    manager.cancel(run.id)
    run = manager.wait(run.id, timeout=60)
    assert run.status == CANCELLED
    assert_nothing_left(run, ranks, marker)


def test_sigkill_of_torchrun_ends_its_ranks_before_the_run_is_marked_failed(manager, rank_script):
    run, ranks, marker = start_two_ranks(manager, rank_script, "ignore-sigterm")
    launcher = [p for p in psutil.Process(run.pid).children() if "torch.distributed.run" in " ".join(p.cmdline())]
    assert len(launcher) == 1
    launcher[0].kill()
    run = manager.wait(run.id, timeout=60)
    assert run.status == FAILED and "SIGKILL" in run.error
    assert_nothing_left(run, ranks, marker)


def test_a_killed_supervisor_takes_the_ranks_with_it(manager, rank_script):
    """The supervisor itself killed (the OOM killer, kill -9 of the group's leader): the manager ends the ranks."""
    run, ranks, marker = start_two_ranks(manager, rank_script, "default-sigterm")
    os.killpg(run.pgid, signal.SIGKILL)  # the group: supervisor and torchrun; the ranks are elsewhere
    run = manager.wait(run.id, timeout=60)
    assert run.status == FAILED
    assert_nothing_left(run, ranks, marker)
