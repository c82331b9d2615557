"""The run manager with real processes, a real SQLite database and real signals."""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import end_runs, wait_for

from workbench.jobs import (CANCELLED, FAILED, LOST, QUEUED, RUNNING, SUCCEEDED, MetricsTail, RunManager,
                            error_summary, group_members, is_alive, start_token, tail_text)


def script(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.fixture
def manager(tmp_path):
    m = RunManager(tmp_path / "runs", max_concurrent=2, grace_s=1.0, monitor=False, workdir=tmp_path)
    yield m
    end_runs(m)  # never leave a process behind, whatever a test did


def test_a_run_that_succeeds_records_its_exit_log_and_times(manager):
    run = manager.submit({"note": "hello"}, command=script("""
        import sys
        print("to stdout"); print("to stderr", file=sys.stderr)
    """))
    run = manager.wait(run.id, timeout=30)
    assert run.status == SUCCEEDED and run.exit_code == 0 and run.error is None
    assert run.started_at <= run.ended_at
    log = manager.log_tail(run.id)
    assert "to stdout" in log and "to stderr" in log
    # the full config is kept in the row and in the run's directory
    assert run.config["note"] == "hello" and Path(run.config["output_dir"]) == run.output_dir
    assert json.loads((run.output_dir / "run_config.json").read_text()) == run.config


def test_a_crash_ends_failed_with_the_error_shown(manager):
    run = manager.submit({}, command=script("""
        print("loading data")
        def load(): raise ValueError("record 3: bad data")
        load()
    """))
    run = manager.wait(run.id, timeout=30)
    assert run.status == FAILED and run.exit_code == 1
    assert run.error.startswith("Traceback") and "ValueError: record 3: bad data" in run.error
    assert "loading data" not in run.error  # the traceback, not the whole log


def test_a_command_that_cannot_start_fails(manager):
    run = manager.wait(manager.submit({}, command=["/nonexistent/trainer", "x"]).id, timeout=30)
    assert run.status == FAILED and run.exit_code == 127 and "nonexistent" in manager.log_tail(run.id)


def test_cancel_mid_run_kills_the_whole_group_even_a_child_that_ignores_sigterm(manager, tmp_path):
    ready = tmp_path / "ready"
    run = manager.submit({}, command=script(f"""
        import subprocess, sys, time, pathlib
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        kids = [subprocess.Popen([sys.executable, "-c", stubborn]),
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])]
        time.sleep(0.5)  # let the stubborn child install its handler
        pathlib.Path({str(ready)!r}).write_text(" ".join(str(k.pid) for k in kids))
        time.sleep(600)
    """))
    wait_for(ready.exists)
    run = manager.get(run.id)
    assert run.status == RUNNING and len(group_members(run.pgid)) == 4  # supervisor, script, 2 children
    t0 = time.monotonic()
    manager.cancel(run.id)
    run = manager.wait(run.id, timeout=30)
    assert run.status == CANCELLED
    assert time.monotonic() - t0 >= 1.0  # the stubborn child needed SIGKILL after the 1 s grace
    assert group_members(run.pgid) == []
    for pid in map(int, ready.read_text().split()):
        assert not is_alive(pid, start_token(pid))


def test_cancel_a_queued_run_never_starts_it(tmp_path):
    m = RunManager(tmp_path / "runs", max_concurrent=1, monitor=False, workdir=tmp_path)
    first = m.submit({}, command=script("import time; time.sleep(600)"))
    second = m.submit({}, command=script("print('must not run')"))
    assert m.get(second.id).status == QUEUED
    assert m.cancel(second.id).status == CANCELLED
    m.cancel(first.id)
    m.wait(first.id, timeout=30)
    m.tick()
    assert m.get(second.id).status == CANCELLED and m.get(second.id).started_at is None


def test_the_concurrency_limit_queues_runs_across_managers_sharing_a_database(tmp_path):
    runs_dir = tmp_path / "runs"
    # two workbench processes (or sessions) on one database, each allowing one run at a time
    a = RunManager(runs_dir, max_concurrent=1, monitor=False, workdir=tmp_path)
    b = RunManager(runs_dir, max_concurrent=1, monitor=False, workdir=tmp_path)
    job = script("import time; time.sleep(0.4)")
    ids = [a.submit({}, command=job).id, b.submit({}, command=job).id, a.submit({}, command=job).id]
    assert [a.get(i).status for i in ids] == [RUNNING, QUEUED, QUEUED]
    most_running = 0
    deadline = time.monotonic() + 60
    while not all(a.get(i).finished for i in ids):
        (a if time.monotonic() % 2 < 1 else b).tick()
        most_running = max(most_running, sum(a.get(i).status == RUNNING for i in ids))
        assert time.monotonic() < deadline
        time.sleep(0.02)
    runs = [a.get(i) for i in ids]
    assert most_running == 1 and all(r.status == SUCCEEDED for r in runs)
    # first in, first out, and never overlapping
    for earlier, later in zip(runs, runs[1:]):
        assert earlier.ended_at <= later.started_at + 0.05


def test_a_restarted_manager_reattaches_and_keeps_streaming_metrics(tmp_path):
    go = tmp_path / "go"
    job = script(f"""
        import json, os, pathlib, time
        out = pathlib.Path(os.environ["WORKBENCH_RUN_DIR"]) / "metrics.jsonl"
        def log(step):
            with open(out, "a") as f:
                f.write(json.dumps({{"step": step, "loss": 1.0 / step}}) + "\\n")
        for step in (1, 2):
            log(step)
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.05)
        for step in (3, 4, 5):
            log(step)
    """)
    first = RunManager(tmp_path / "runs", monitor=False, workdir=tmp_path)
    run = first.submit({}, command=job)
    assert run.status == RUNNING
    wait_for(lambda: len(first.metrics(run.id)) == 2)
    first.close()
    del first  # the workbench restarts; the run does not notice

    second = RunManager(tmp_path / "runs", monitor=False, workdir=tmp_path)
    again = second.get(run.id)
    assert again.status == RUNNING and again.pid == run.pid  # reattached, not restarted
    assert [m["step"] for m in second.metrics(run.id)] == [1, 2]
    tail = second._metrics[(run.id, str(run.metrics_path))]
    offset_before = tail.offset
    go.write_text("")
    wait_for(lambda: len(second.metrics(run.id)) == 5)
    assert [m["step"] for m in second.metrics(run.id)] == [1, 2, 3, 4, 5]
    assert tail.offset == run.metrics_path.stat().st_size > offset_before
    done = second.wait(run.id, timeout=30)
    # not our child, yet its exit status is known: the supervisor recorded it
    assert done.status == SUCCEEDED and done.exit_code == 0


def test_a_run_killed_while_nobody_watched_becomes_lost_with_its_log(tmp_path):
    first = RunManager(tmp_path / "runs", monitor=False, workdir=tmp_path)
    run = first.submit({}, command=script("print('epoch 1 of 3', flush=True); import time; time.sleep(600)"))
    wait_for(lambda: "epoch 1 of 3" in first.log_tail(run.id))
    first.close()
    os.killpg(run.pgid, 9)  # e.g. the machine rebooted: no exit status anywhere
    wait_for(lambda: not is_alive(run.pid, run.proc_start))
    second = RunManager(tmp_path / "runs", monitor=False, workdir=tmp_path)
    lost = second.get(run.id)
    assert lost.status == LOST and "epoch 1 of 3" in lost.error


def test_a_reused_pid_is_not_mistaken_for_the_run(tmp_path):
    first = RunManager(tmp_path / "runs", monitor=False, workdir=tmp_path)
    run = first.submit({}, command=script("import time; time.sleep(600)"))
    first.close()
    os.killpg(run.pgid, 9)
    wait_for(lambda: not group_members(run.pgid))
    # pretend the run's pid now belongs to another live process: this test process
    with sqlite3.connect(first.db_path) as db:
        db.execute("UPDATE runs SET pid = ?, pgid = NULL WHERE id = ?", (os.getpid(), run.id))
    second = RunManager(tmp_path / "runs", monitor=False, workdir=tmp_path)
    assert second.get(run.id).status == LOST  # and we are still alive to assert it


def test_clone_with_edits_makes_a_new_run_with_merged_config(manager):
    source = manager.wait(manager.submit({"lr": 1e-4, "lora": {"r": 8, "alpha": 16}, "seed": 1},
                                         command=script("pass"), name="base").id)
    clone = manager.clone(source.id, {"lora": {"r": 4}, "seed": None})
    assert clone.id != source.id and clone.parent_id == source.id and clone.output_dir != source.output_dir
    assert clone.config["lora"] == {"r": 4, "alpha": 16} and clone.config["lr"] == 1e-4 and "seed" not in clone.config
    assert manager.wait(clone.id).status == SUCCEEDED


def test_delete_removes_a_finished_runs_row_and_folder_inside_runs_dir_only(manager, tmp_path):
    inside = manager.wait(manager.submit({}, command=script("print('done')")).id)
    assert inside.output_dir.is_dir()
    assert manager.delete(inside.id) == inside.output_dir.resolve()
    assert not inside.output_dir.exists() and [r.id for r in manager.list()] == []
    with pytest.raises(KeyError):
        manager.get(inside.id)
    assert manager.runs_dir.is_dir() and manager.db_path.exists()  # the other runs' home stays
    # a folder outside runs_dir (recorded by an older workbench) was chosen by someone: the row goes, the folder stays
    elsewhere = manager.wait(manager.submit({}, command=script("pass")).id)
    (tmp_path / "mine").mkdir()
    with manager._write() as db:
        db.execute("UPDATE runs SET output_dir = ? WHERE id = ?", (str(tmp_path / "mine"), elsewhere.id))
    assert manager.delete(elsewhere.id) is None
    assert (tmp_path / "mine").is_dir() and manager.list() == []


def test_a_running_run_is_not_deleted_until_cancelled(manager):
    run = manager.submit({}, command=script("import time; time.sleep(600)"))
    wait_for(lambda: manager.get(run.id).status == RUNNING, timeout=30)
    with pytest.raises(ValueError, match="running; cancel it first"):
        manager.delete(run.id)
    assert manager.get(run.id).status == RUNNING and run.output_dir.is_dir()
    manager.cancel(run.id)
    run = manager.wait(run.id, timeout=30)
    assert run.status == CANCELLED
    assert manager.delete(run.id) == run.output_dir.resolve() and not run.output_dir.exists()


def test_a_run_gets_a_passive_openmp_wait_and_its_share_of_the_threads(manager, monkeypatch):
    from workbench.jobs.processes import thread_split

    monkeypatch.delenv("WORKBENCH_RUN_THREADS", raising=False)
    monkeypatch.delenv("WORKBENCH_APP_THREADS", raising=False)
    run = manager.wait(manager.submit({}, command=script("""
        import os
        print("OMP", os.environ["OMP_WAIT_POLICY"], os.environ["OMP_NUM_THREADS"])
    """)).id)
    assert run.status == SUCCEEDED
    assert f"OMP PASSIVE {thread_split()[1]}" in manager.log_tail(run.id)
    assert thread_split(2) == (1, 1) and thread_split(16) == (4, 12) and thread_split(1) == (1, 1)


def test_metrics_tail_reads_only_appended_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []
    path.write_text('{"step": 1}\n{"step": 2')  # the writer is mid-line
    assert tail.read_new() == [{"step": 1}] and tail.offset == len('{"step": 1}\n')
    with open(path, "a") as f:
        f.write('}\n{"step": 3}\n')
    assert tail.read_new() == [{"step": 2}, {"step": 3}]
    assert tail.read_new() == [] and [r["step"] for r in tail.all()] == [1, 2, 3]
    path.write_text('{"step": 1}\n')  # recreated: start over
    assert [r["step"] for r in tail.all()] == [1]


def test_log_tail_and_error_summary(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)) + "50%\r75%\r100%\n")
    assert tail_text(log, max_lines=2) == "line 999\n100%"
    text = "noise\nTraceback (most recent call last):\n  x\nOSError: boom\n"
    assert error_summary(text) == "Traceback (most recent call last):\n  x\nOSError: boom"


# ---- issue 19.1 / 19.2: a run writes only in the folder the manager picks, never in another run's -------

def test_a_run_writes_only_in_a_new_folder_the_manager_picks(manager, tmp_path):
    """Issue 19.1: output_dir from a config (/tmp/x, ../x, the runs folder itself) is refused before a row or
    a folder exists; a run's folder is always a new one under runs_dir."""
    for asked in [str(tmp_path / "outside"), "../escaped", "runs", str(manager.runs_dir / "mine"), "/tmp/x19"]:
        with pytest.raises(ValueError, match="output_dir is chosen by the run manager"):
            manager.submit({"output_dir": asked}, command=script("pass"))
    assert manager.list() == []
    assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (manager.runs_dir / "mine").exists()
    run = manager.wait(manager.submit({}, command=script("pass")).id)
    assert run.output_dir.parent == manager.runs_dir and run.output_dir.name == f"run-{run.id:04d}"


def test_a_new_run_never_writes_into_another_runs_folder(manager):
    """Issue 19.2: {"output_dir": "runs/run-0001"} on a new run (or a clone) is refused whatever run 1's
    state; a folder left by an earlier database is not reused either."""
    first = manager.wait(manager.submit({}, command=script("""
        import os, pathlib
        (pathlib.Path(os.environ["WORKBENCH_RUN_DIR"]) / "adapter.bin").write_text("run 1")
    """)).id)
    assert first.status == SUCCEEDED
    for asked in [str(first.output_dir), f"runs/{first.output_dir.name}", str(first.output_dir / "sub")]:
        with pytest.raises(ValueError, match="output_dir is chosen by the run manager"):
            manager.submit({"output_dir": asked}, command=script("pass"))
        with pytest.raises(ValueError, match="output_dir is chosen by the run manager"):
            manager.clone(first.id, {"output_dir": asked})
    # a folder that a forgotten run left behind (the database was reset) is someone's: not reused
    leftover = manager.runs_dir / f"run-{first.id + 1:04d}"
    leftover.mkdir()
    (leftover / "adapter.bin").write_text("old")
    second = manager.wait(manager.submit({}, command=script("""
        import os, pathlib
        (pathlib.Path(os.environ["WORKBENCH_RUN_DIR"]) / "adapter.bin").write_text("run 2")
    """)).id)
    assert second.status == SUCCEEDED and second.output_dir not in (leftover, first.output_dir)
    assert second.output_dir.parent == manager.runs_dir
    assert (leftover / "adapter.bin").read_text() == "old" and sorted(p.name for p in leftover.iterdir()) == ["adapter.bin"]
    assert (first.output_dir / "adapter.bin").read_text() == "run 1"
    assert (second.output_dir / "adapter.bin").read_text() == "run 2"


def test_resume_refuses_a_run_whose_folder_is_outside_the_runs_folder(manager, tmp_path):
    """A run recorded by an older workbench with output_dir elsewhere (or shared) is not resumed there."""
    run = manager.wait(manager.submit({}, command=script("pass")).id)
    with manager._write() as db:
        db.execute("UPDATE runs SET launcher = 'train', output_dir = ? WHERE id = ?", (str(tmp_path / "elsewhere"), run.id))
    with pytest.raises(ValueError, match="outside the runs folder"):
        manager.resume(run.id)
    other = manager.wait(manager.submit({}, command=script("pass")).id)
    with manager._write() as db:  # two rows naming one folder: neither may write there again
        db.execute("UPDATE runs SET launcher = 'train', output_dir = ? WHERE id = ?", (str(other.output_dir), run.id))
        db.execute("UPDATE runs SET launcher = 'train' WHERE id = ?", (other.id,))
    with pytest.raises(ValueError, match=f"also the folder of run {run.id}"):
        manager.resume(other.id)
    assert manager.get(other.id).status == SUCCEEDED
    with manager._write() as db:  # an older run that wrote into the runs folder itself does not block new runs
        db.execute("UPDATE runs SET output_dir = ? WHERE id = ?", (str(manager.runs_dir), run.id))
    assert manager.wait(manager.submit({}, command=script("pass")).id).status == SUCCEEDED
    with pytest.raises(ValueError, match="outside the runs folder"):
        manager.resume(run.id)


def test_the_tests_cleanup_ends_a_process_that_left_the_runs_group(tmp_path):
    """What the `manager` fixture does after each test (conftest.end_runs) ends every process of a run: the
    group and, as DDP ranks do, a child in a session of its own (found by the run's marker)."""
    from workbench.jobs.processes import is_alive, start_token

    m = RunManager(tmp_path / "runs", max_concurrent=1, grace_s=5.0, monitor=False, workdir=tmp_path)
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(120)
    """)
    m.submit({}, command=[sys.executable, "-c", script])
    pids_text = wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=30)
    processes = [(pid, start_token(pid)) for pid in map(int, pids_text.split())]
    assert all(is_alive(*p) for p in processes)
    end_runs(m)
    assert wait_for(lambda: not any(is_alive(*p) for p in processes), timeout=10)
