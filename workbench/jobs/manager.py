"""The run manager: background runs as OS processes, with a table of runs in SQLite.

The database is the source of truth, not this object: several managers (workbench processes,
browser sessions sharing one, a CLI) may use one database at once; every change of a run's state
is a conditional UPDATE inside a write transaction. A run goes

    queued -> running -> succeeded | failed | cancelled | lost
    queued -> cancelled

`lost` means the process vanished without a trace of how it ended (for instance the machine
rebooted). Each run is `python -m workbench.jobs.supervise EXIT_FILE -- COMMAND` started without a
shell as the leader of a new session/process group, with stdout and stderr going to `run.log` in
the run's output directory: a file, so a run never blocks on a pipe that nobody reads.
"""
from __future__ import annotations

import copy
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workbench.sqlite import write_transaction

from . import processes
from .metrics import MetricsTail, error_summary, tail_text

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST = "queued", "running", "succeeded", "failed", "cancelled", "lost"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST)
FINISHED = (SUCCEEDED, FAILED, CANCELLED, LOST)

LOG_NAME, METRICS_NAME, CONFIG_NAME, EXIT_NAME = "run.log", "metrics.jsonl", "run_config.json", "exit.json"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled','lost')),
    launcher     TEXT NOT NULL,          -- 'train' / 'evaluate': command built from the config; 'command': given
    config       TEXT NOT NULL,          -- JSON, the full config of the run
    command      TEXT NOT NULL,          -- JSON list: argv of the command (without the supervisor)
    nproc        INTEGER NOT NULL DEFAULT 1,
    output_dir   TEXT NOT NULL,
    workdir      TEXT NOT NULL,
    pid          INTEGER,                -- the supervisor: session and process group leader
    pgid         INTEGER,
    proc_start   TEXT,                   -- start token of pid, guards against pid reuse
    host         TEXT,
    created_at   REAL NOT NULL,
    started_at   REAL,
    ended_at     REAL,
    exit_code    INTEGER,
    error        TEXT,
    cancel_requested_at REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    parent_id    INTEGER REFERENCES runs(id)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


@dataclass
class Run:
    id: int
    name: str
    status: str
    launcher: str
    config: dict
    command: list[str]
    nproc: int
    output_dir: Path
    workdir: Path
    pid: int | None
    pgid: int | None
    proc_start: str | None
    host: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    error: str | None
    cancel_requested_at: float | None
    attempts: int
    parent_id: int | None

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_NAME

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_NAME

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Run":
        values = dict(row)
        values["config"] = json.loads(values["config"])
        values["command"] = json.loads(values["command"])
        values["output_dir"] = Path(values["output_dir"])
        values["workdir"] = Path(values["workdir"])
        return cls(**values)


# launcher -> the entry point a run of that kind executes with its config file
ENTRY_POINTS = {"train": "workbench.train", "evaluate": "workbench.evaluate"}


def train_command(config_path: Path, nproc: int = 1, python: str = sys.executable) -> list[str]:
    """The argv that trains from a config file: one process, or `torchrun` with nproc processes
    (DDP; gloo on CPU, nccl on GPUs, chosen by the entry point)."""
    if nproc <= 1:
        return [python, "-m", "workbench.train", str(config_path)]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "workbench.train", str(config_path)]


def deep_merge(base: dict, edits: dict) -> dict:
    """base updated with edits; nested dicts merge, a None value removes the key."""
    merged = copy.deepcopy(base)
    for key, value in edits.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class RunManager:
    """Starts, watches, cancels and reconciles runs. Safe to share between threads; several
    managers (processes) may share one database.

    runs_dir: where every run gets its own new folder (runs_dir/run-0007).
    max_concurrent: how many runs may be running at once; the rest wait queued.
    grace_s: how long a cancelled run has between SIGTERM and SIGKILL.
    monitor: poll in a background thread (the workbench); tests may call `tick()` themselves.
    """

    def __init__(self, runs_dir: Path, *, db_path: Path | None = None, max_concurrent: int = 1,
                 grace_s: float = 10.0, poll_s: float = 1.0, monitor: bool = True,
                 workdir: Path | None = None, python: str = sys.executable, env: dict | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(db_path) if db_path else self.runs_dir / "runs.sqlite"
        self.max_concurrent = max(1, int(max_concurrent))
        self.grace_s, self.poll_s = grace_s, poll_s
        self.workdir = Path(workdir or Path.cwd()).resolve()
        self.python, self.env = python, env
        self._children: dict[int, subprocess.Popen] = {}  # run id -> the process we started
        self._metrics: dict[tuple[int, str], MetricsTail] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        self.tick()  # reconcile what an earlier workbench left behind, then start queued runs
        self._thread = None
        if monitor:
            self._thread = threading.Thread(target=self._monitor, name="run-manager", daemon=True)
            self._thread.start()

    # ---- database -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _write(self):
        """A write transaction: BEGIN IMMEDIATE takes the database's write lock up front, so two
        managers never both start the same queued run or exceed the concurrency limit."""
        db = self._connect()
        try:
            with write_transaction(db):
                yield db
        finally:
            db.close()

    def get(self, run_id: int) -> Run:
        db = self._connect()
        try:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (int(run_id),)).fetchone()
        finally:
            db.close()
        if row is None:
            raise KeyError(f"no run with id {run_id}")
        return Run.from_row(row)

    def list(self, limit: int | None = None) -> list[Run]:
        """Runs, newest first."""
        db = self._connect()
        try:
            sql = "SELECT * FROM runs ORDER BY id DESC" + (" LIMIT ?" if limit else "")
            rows = db.execute(sql, (limit,) if limit else ()).fetchall()
        finally:
            db.close()
        return [Run.from_row(r) for r in rows]

    # ---- submitting ----------------------------------------------------------------------
    def submit(self, config: dict, *, name: str | None = None, command: list[str] | None = None,
               nproc: int = 1, parent_id: int | None = None, launcher: str = "train") -> Run:
        """Queue a run (it starts as soon as a slot is free). Without `command` the run trains:
        `python -m workbench.train run_config.json` (torchrun when nproc > 1); with launcher="evaluate"
        it evaluates: `python -m workbench.evaluate run_config.json`. The config is stored
        in full and written to the run's folder, which this manager picks: a new runs_dir/run-N.
        A config that names its own output_dir is refused: no run writes outside runs_dir or into
        another run's folder."""
        config = copy.deepcopy(dict(config))
        self.check_output_dir(config)
        if launcher not in ENTRY_POINTS:
            raise ValueError(f"launcher must be one of {list(ENTRY_POINTS)}, got {launcher!r}")
        launcher = launcher if command is None else "command"
        if launcher == "train":
            processes.check_nproc(nproc)  # whoever submits (a tab, a script): no more processes than devices
        if launcher == "train" and not config.get("threads"):
            # the run's share of the cores (processes.thread_split), divided among its processes, so chat
            # keeps cores of its own while it trains
            config["threads"] = max(1, processes.thread_split()[1] // max(1, int(nproc)))
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO runs (name, status, launcher, config, command, nproc, output_dir, workdir, created_at,"
                " parent_id) VALUES (?, 'queued', ?, '{}', '[]', ?, '', ?, ?, ?)",
                (name or "", launcher, int(nproc), str(self.workdir), now, parent_id))
            run_id = cur.lastrowid
            output_dir = self._new_folder(run_id)
            try:
                self._refuse_shared_output_dir(db, run_id, output_dir)
            except ValueError:
                output_dir.rmdir()  # new and empty: nothing of anyone's is lost
                raise
            config["output_dir"] = str(output_dir)
            config_path = output_dir / CONFIG_NAME
            if command is not None:
                argv = [str(a) for a in command]
            elif launcher == "train":
                argv = train_command(config_path, nproc, self.python)
            else:
                argv = [self.python, "-m", ENTRY_POINTS[launcher], str(config_path)]
            db.execute("UPDATE runs SET name = ?, config = ?, command = ?, output_dir = ? WHERE id = ?",
                       (name or f"run-{run_id:04d}", json.dumps(config), json.dumps(argv), str(output_dir), run_id))
            config_path.write_text(json.dumps(config, indent=2))
        self.tick()
        return self.get(run_id)

    def check_output_dir(self, config: dict) -> None:
        """Refuse a config that names its output_dir: the manager picks every run's folder."""
        if config.get("output_dir"):
            raise ValueError(f"output_dir is chosen by the run manager (a new folder in {self.runs_dir}); "
                             f"remove output_dir {config['output_dir']!r} from the config")

    def folder_for(self, run_id: int) -> Path:
        """The folder a run with this id gets (the one place that decides it): runs_dir/run-N, or run-N-1,
        run-N-2, ... when something of that name is there already (left by a run of an earlier database:
        someone else's; a link too, never followed)."""
        for attempt in range(1000):
            folder = self.runs_dir / (f"run-{run_id:04d}" + (f"-{attempt}" if attempt else ""))
            if not (folder.exists() or folder.is_symlink()):
                return folder
        raise RuntimeError(f"no free folder name for run {run_id} in {self.runs_dir}")

    def next_folder(self) -> Path:
        """The folder the next submitted run would get, as a preview shows it (a run submitted meanwhile,
        from another session, takes it first)."""
        db = self._connect()
        try:
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'").fetchone()
            top = db.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        finally:
            db.close()
        return self.folder_for(max(seq[0] if seq else 0, top or 0) + 1)  # AUTOINCREMENT: ids are not reused

    def _new_folder(self, run_id: int) -> Path:
        """`folder_for(run_id)`, created now (another process may create that name first: then the next)."""
        for _ in range(1000):
            folder = self.folder_for(run_id)
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder
        raise RuntimeError(f"no free folder name for run {run_id} in {self.runs_dir}")

    def _refuse_shared_output_dir(self, db, run_id: int, output_dir: Path) -> None:
        """A run writes only in its own folder: strictly inside runs_dir, and no other run's folder
        (whatever its state) is the same, inside it or around it."""
        folder = Path(output_dir).resolve()
        if folder == self.runs_dir or not folder.is_relative_to(self.runs_dir):
            raise ValueError(f"run {run_id}'s folder {output_dir} is outside the runs folder {self.runs_dir}")
        for row in db.execute("SELECT id, output_dir FROM runs WHERE id != ? AND output_dir != ''", (run_id,)):
            other = Path(row["output_dir"])
            if other == self.runs_dir or not other.is_relative_to(self.runs_dir):
                continue  # an older workbench's run outside the runs folder: it never runs again (resume refuses it)
            if other == folder or other.is_relative_to(folder) or folder.is_relative_to(other):
                raise ValueError(f"run {run_id}'s folder {output_dir} is also the folder of run {row['id']}")

    def clone(self, run_id: int, edits: dict | None = None, *, name: str | None = None) -> Run:
        """A new run with the config of run_id, edited (nested keys merge; None removes a key).
        It gets its own new folder (edits that name an output_dir are refused); it does not resume."""
        source = self.get(run_id)
        config = deep_merge(source.config, {"output_dir": None, "resume": None, **(edits or {})})
        command = None if source.launcher in ENTRY_POINTS else source.command
        return self.submit(config, name=name or f"{source.name} (clone)", command=command,
                           nproc=source.nproc, parent_id=source.id,
                           launcher=source.launcher if source.launcher in ENTRY_POINTS else "train")

    def resume(self, run_id: int) -> Run:
        """Queue a finished run again in its own output directory with `resume: true`, so the
        trainer continues from its last checkpoint; metrics and log are appended to."""
        with self._write() as db:
            run = Run.from_row(db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
            if not run.finished:
                raise ValueError(f"run {run_id} is {run.status}; only a finished run can be resumed")
            if run.launcher != "train":
                raise ValueError(f"run {run_id} runs a custom command; only training runs resume")
            self._refuse_shared_output_dir(db, run_id, run.output_dir)
            config = dict(run.config, resume=True)
            (run.output_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            db.execute("UPDATE runs SET status = 'queued', config = ?, pid = NULL, pgid = NULL, proc_start = NULL,"
                       " ended_at = NULL, exit_code = NULL, error = NULL, cancel_requested_at = NULL"
                       " WHERE id = ? AND status = ?", (json.dumps(config), run_id, run.status))
        self.tick()
        return self.get(run_id)

    # ---- cancelling ----------------------------------------------------------------------
    def cancel(self, run_id: int) -> Run:
        """A queued run is cancelled at once; a running one gets SIGTERM (every process of it: its process
        group and the processes carrying its marker, such as DDP ranks) and SIGKILL after grace_s if any is
        still there. Finished runs are left as they are."""
        now = time.time()
        with self._write() as db:
            run = Run.from_row(db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
            if run.status == QUEUED:
                db.execute("UPDATE runs SET status = 'cancelled', ended_at = ? WHERE id = ? AND status = 'queued'",
                           (now, run_id))
            elif run.status == RUNNING:
                if run.cancel_requested_at is None:
                    db.execute("UPDATE runs SET cancel_requested_at = ? WHERE id = ?", (now, run_id))
                if self._is_alive(run):
                    processes.signal_run(run.pgid, _marker(run), signal.SIGTERM)
        self.tick()
        return self.get(run_id)

    # ---- deleting ------------------------------------------------------------------------
    def delete(self, run_id: int) -> Path | None:
        """Forget a finished run: its row goes, and its output folder when that folder lies inside
        runs_dir and no other run writes there (a folder elsewhere was chosen by someone, and is left).
        Returns the folder removed, or None. A queued or running run is refused: cancel it first."""
        with self._write() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (int(run_id),)).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id}")
            run = Run.from_row(row)
            if not run.finished:
                raise ValueError(f"run {run_id} is {run.status}; cancel it first")
            shared = db.execute("SELECT id FROM runs WHERE output_dir = ? AND id != ?",
                                (str(run.output_dir), run.id)).fetchone()
            db.execute("DELETE FROM runs WHERE id = ? AND status = ?", (run.id, run.status))
        with self._lock:
            self._children.pop(run.id, None)
            for key in [k for k in self._metrics if k[0] == run.id]:
                del self._metrics[key]
        folder = run.output_dir.resolve()
        if shared or not folder.is_relative_to(self.runs_dir) or folder == self.runs_dir or not folder.is_dir():
            return None
        shutil.rmtree(folder)
        return folder

    # ---- watching ------------------------------------------------------------------------
    def _is_alive(self, run: Run) -> bool:
        child = self._children.get(run.id)
        if child is not None and child.pid == run.pid and child.poll() is not None:
            return False  # reaped: it was ours and it has exited
        return run.host == processes.HOST and processes.is_alive(run.pid, run.proc_start)

    def tick(self) -> None:
        """One round of bookkeeping: finish runs whose process ended, escalate cancels past
        their grace period, start queued runs while slots are free."""
        with self._lock:
            self._check_running()
            self._start_queued()

    def _check_running(self) -> None:
        now = time.time()
        with self._write() as db:
            rows = db.execute("SELECT * FROM runs WHERE status = 'running'").fetchall()
            for run in map(Run.from_row, rows):
                if run.host != processes.HOST:
                    continue  # another machine's run (shared database): it is that machine's to judge
                if self._is_alive(run):
                    if run.cancel_requested_at is not None and now - run.cancel_requested_at > self.grace_s:
                        processes.signal_run(run.pgid, _marker(run), signal.SIGKILL)
                    continue
                self._finish(db, run, now)

    def _finish(self, db, run: Run, now: float) -> None:
        """Record how a run whose supervisor has gone ended. What it left (its group, DDP ranks in sessions of
        their own) is killed first; while any of it still lives, the run stays running until a later round."""
        marker = _marker(run)
        if processes.signal_run(run.pgid, marker, signal.SIGKILL):
            deadline = time.monotonic() + 0.5
            while processes.run_processes(run.pgid, marker):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
        child = self._children.pop(run.id, None)
        supervisor_code = child.poll() if child is not None else None
        outcome = _read_json(run.output_dir / EXIT_NAME)
        code = outcome.get("returncode") if outcome else None
        log = tail_text(run.log_path, max_lines=300)
        error = None
        if run.cancel_requested_at is not None:
            status = CANCELLED
        elif code == 0:
            status = SUCCEEDED
        elif code is not None:
            status = FAILED
            error = error_summary(log) or f"exited with code {code}"
            if code < 0:
                error = f"killed by {_signal_name(-code)}\n{error}"
        elif supervisor_code is not None:
            # ours, ended without recording an outcome: killed from outside (e.g. the OOM killer)
            status, code = FAILED, supervisor_code
            error = f"the run's process ended ({_describe_code(supervisor_code)}) without recording an outcome " \
                    f"(killed from outside, e.g. out of memory?)\n{error_summary(log)}"
        else:
            status = LOST
            error = f"the run's process is gone and left no exit status (machine restarted?)\n{error_summary(log)}"
        ended = (outcome or {}).get("ended_at") or now
        db.execute("UPDATE runs SET status = ?, exit_code = ?, error = ?, ended_at = ? WHERE id = ? AND status = 'running'",
                   (status, code, error, ended, run.id))

    def _start_queued(self) -> None:
        with self._write() as db:
            running = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'running'").fetchone()[0]
            free = self.max_concurrent - running
            if free <= 0:
                return
            rows = db.execute("SELECT * FROM runs WHERE status = 'queued' ORDER BY id LIMIT ?", (free,)).fetchall()
            for run in map(Run.from_row, rows):
                self._launch(db, run)

    def _launch(self, db, run: Run) -> None:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        exit_file = run.output_dir / EXIT_NAME
        exit_file.unlink(missing_ok=True)
        argv = [self.python, "-m", "workbench.jobs.supervise", str(exit_file), "--", *run.command]
        env = _child_env(self.env)
        env.update(WORKBENCH_RUN_ID=str(run.id), WORKBENCH_RUN_DIR=str(run.output_dir))
        now = time.time()
        with open(run.log_path, "ab") as log:
            log.write(f"\n=== run {run.id} attempt {run.attempts + 1} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(run.command)}\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(argv, cwd=run.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            except OSError as e:
                db.execute("UPDATE runs SET status = 'failed', error = ?, started_at = ?, ended_at = ?,"
                           " attempts = attempts + 1 WHERE id = ?", (f"could not start: {e}", now, now, run.id))
                return
        self._children[run.id] = child
        db.execute("UPDATE runs SET status = 'running', pid = ?, pgid = ?, proc_start = ?, host = ?, started_at = ?,"
                   " attempts = attempts + 1 WHERE id = ?",
                   (child.pid, child.pid, processes.start_token(child.pid), processes.HOST, now, run.id))

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except sqlite3.OperationalError as e:  # a busy database: try again next round
                print(f"run manager: {e}", file=sys.stderr)

    def wait(self, run_id: int, timeout: float = 60.0, poll_s: float = 0.1) -> Run:
        """Block until the run has finished (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            self.tick()
            run = self.get(run_id)
            if run.finished:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run.status} after {timeout} s")
            time.sleep(poll_s)

    def close(self) -> None:
        """Stop watching. Runs keep going; a later manager reattaches to them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- reading a run's output ------------------------------------------------------------
    def metrics(self, run_id: int) -> list[dict]:
        """All metrics records of a run so far; each call reads only what was appended since."""
        return self.records(run_id, METRICS_NAME)

    def records(self, run_id: int, name: str) -> list[dict]:
        """The records of a JSON-lines file in the run's folder (metrics.jsonl, a hybrid's
        gate_stats.jsonl), read incrementally like the metrics."""
        path = self.get(run_id).output_dir / name
        key = (run_id, str(path))
        with self._lock:
            tail = self._metrics.get(key)
            if tail is None:
                tail = self._metrics[key] = MetricsTail(path)
        return tail.all()

    def log_tail(self, run_id: int, max_lines: int = 200) -> str:
        return tail_text(self.get(run_id).log_path, max_lines=max_lines)


def _marker(run: Run) -> str | None:
    """The marker in the environment of every process of the run (its supervisor sets it)."""
    return processes.run_marker(run.pid, run.proc_start) if run.host == processes.HOST else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _child_env(extra: dict | None) -> dict:
    import os

    env = dict(os.environ)  # the project is installed (pip install -e .): runs import it from any folder
    env["PYTHONUNBUFFERED"] = "1"  # the log shows progress as it happens
    # OpenMP's default active wait spins idle threads at 100%, slowing the app's chat several-fold:
    # threads that wait sleep, and the run leaves the app a share of the cores (processes.thread_split)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["OMP_NUM_THREADS"] = str(processes.thread_split()[1])
    env.update(extra or {})
    return env


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe_code(code: int) -> str:
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if code > 128:
        return f"exit code {code}, probably {_signal_name(code - 128)}"
    return f"exit code {code}"
