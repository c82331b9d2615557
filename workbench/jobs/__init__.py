"""Background runs: one OS process (group) per run, a SQLite table of runs, logs, metrics, cancel.

    manager = RunManager(runs_dir, max_concurrent=1)
    run = manager.submit({"dataset": "data.json", "max_steps": 3, "hsa": True})
    manager.metrics(run.id)      # records of metrics.jsonl so far, read incrementally
    manager.cancel(run.id)       # SIGTERM to the group, SIGKILL after the grace period
"""
from .manager import (CANCELLED, FAILED, FINISHED, LOST, QUEUED, RUNNING, STATES, SUCCEEDED, Run, RunManager,
                      deep_merge, train_command)
from .metrics import MetricsTail, error_summary, tail_text
from .processes import group_members, is_alive, start_token

__all__ = ["RunManager", "Run", "STATES", "FINISHED", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
           "LOST", "train_command", "deep_merge", "MetricsTail", "tail_text", "error_summary", "group_members",
           "is_alive", "start_token"]
