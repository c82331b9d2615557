"""Issue 24: every scheduler the config and the Train tab offer trains (cosine_with_min_lr and
warmup_stable_decay used to pass --check and crash at train start), with its own arguments checked
by name; `threads` and `dataloader_num_workers` reach the run; a second run reads its aligned
records from the cache instead of aligning them again."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.train import ConfigError, DEFAULT_MODEL, parse_config
from workbench.train.config import SCHEDULER_ARGS, SCHEDULERS, scheduler_kwargs

ROOT = Path(__file__).resolve().parents[1]


def refused(raw: dict, tmp_path) -> str:
    with pytest.raises(ConfigError) as error:
        parse_config({"dataset": "d.json", **raw}, base_dir=tmp_path)
    return str(error.value)


def test_every_offered_scheduler_has_its_arguments_listed():
    assert set(SCHEDULER_ARGS) == set(SCHEDULERS)


@pytest.mark.parametrize("raw, named", [
    ({"lr_scheduler_kwargs": 3}, "lr_scheduler_kwargs must be an object of the scheduler's arguments, got 3"),
    ({"lr_scheduler": "linear", "lr_scheduler_kwargs": {"power": 2}},
     "lr_scheduler_kwargs: 'power' is not an argument of linear (it takes none)"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_ratio": 0.1}},
     "'min_lr_ratio' is not an argument of cosine_with_min_lr (it takes min_lr, min_lr_rate, num_cycles)"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 1.5}},
     "lr_scheduler_kwargs: min_lr_rate must be a number in [0, 1], got 1.5"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": math.nan}},
     "min_lr_rate must be a number in [0, 1], got nan"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-6, "min_lr_rate": 0.1}},
     "give min_lr or min_lr_rate, not both"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 2.5}},
     "num_decay_steps must be a whole number >= 0, got 2.5"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_kwargs": {"decay_type": "exp"}},
     "decay_type must be one of linear, cosine, 1-sqrt, got 'exp'"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": True}},
     "num_cycles must be a whole number >= 1, got True"),
    ({"threads": -1}, "threads must be >= 0"),
    ({"threads": 1.5}, "threads must be int, got 1.5"),
    ({"dataloader_num_workers": -2}, "dataloader_num_workers must be >= -1"),
    ({"cache_dir": 3}, "cache_dir must be str, got 3"),
])
def test_values_that_would_fail_at_run_time_are_refused_by_name(raw, named, tmp_path):
    assert named in refused(raw, tmp_path)


def test_what_a_scheduler_needs_is_filled_in(tmp_path):
    config = lambda **kw: parse_config({"dataset": "d.json", **kw}, base_dir=tmp_path)  # noqa: E731
    assert scheduler_kwargs(config(lr_scheduler="cosine_with_min_lr"), 100) == {"min_lr_rate": 0.1}
    assert scheduler_kwargs(config(lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-6}), 100) \
        == {"min_lr": 1e-6}
    assert scheduler_kwargs(config(lr_scheduler="warmup_stable_decay"), 100) == {"num_decay_steps": 10}
    assert scheduler_kwargs(config(lr_scheduler="warmup_stable_decay"), 3) == {"num_decay_steps": 1}
    assert scheduler_kwargs(config(lr_scheduler="cosine"), 100) == {}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from models.zoo import shapes

    return shapes.export_sharegpt(shapes.generate(4, seed=1, noise=shapes.TRAIN_NOISE),
                                  tmp_path_factory.mktemp("data"), name="shapes")


@pytest.fixture
def in_process():
    """A run inside the test process sets the thread count and a SIGTERM handler: both put back after."""
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_offered_scheduler_trains(scheduler, tiny_data, tmp_path, in_process):
    from workbench.train import train

    kwargs = {"lr_scheduler_kwargs": {"num_decay_steps": 2}} if scheduler == "warmup_stable_decay" else {}
    config = parse_config({"dataset": str(tiny_data), "output_dir": str(tmp_path / "run"), "max_steps": 3,
                           "lr_scheduler": scheduler, "warmup": 1, "lora_r": 2, "lora_alpha": 4, "save_steps": 100,
                           "threads": 1, "cache_dir": str(tmp_path.parent / "align-cache"), **kwargs})
    summary = train(config)
    assert summary["global_step"] == 3
    rates = [m["learning_rate"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "learning_rate" in m]
    assert len(rates) == 3 and all(math.isfinite(r) and r >= 0 for r in rates)
    if scheduler in ("cosine_with_min_lr", "warmup_stable_decay", "linear", "cosine"):
        assert rates[-1] < max(rates)  # it decays


def test_a_second_run_reads_the_aligned_records_from_the_cache(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    logs = []
    for name, threads in (("first", 1), ("second", 2)):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps({"dataset": str(tiny_data), "output_dir": str(tmp_path / name), "max_steps": 1,
                                      "lora_r": 2, "threads": threads, "dataloader_num_workers": 1,
                                      "cache_dir": str(cache)}))
        done = subprocess.run([sys.executable, "-m", "workbench.train", str(config)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(done.stdout)
    assert "4 conversations aligned in" in logs[0] and "4 conversations cache in" in logs[1]
    assert "torch threads 1, data workers 1" in logs[0] and "torch threads 2, data workers 1" in logs[1]
    assert len(list(cache.glob("*.pt"))) == 1


def test_the_run_manager_gives_a_training_run_its_share_of_the_threads(manager, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUN_THREADS", "6")
    # the runs are refused at once by the config check (exit 2): only the stored config matters here
    one, two = manager.submit({"dataset": "missing.json"}), manager.submit({"dataset": "missing.json"}, nproc=2)
    mine = manager.submit({"dataset": "missing.json", "threads": 1})
    stored = lambda run: json.loads((run.output_dir / "run_config.json").read_text())["threads"]  # noqa: E731
    assert (stored(one), stored(two), stored(mine)) == (6, 3, 1)
