"""Config values that used to be accepted and then fail at run time (issue 19.12) are refused before
anything starts, by name: by parse_config, by `python -m workbench.train --check` and by the Train tab."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shapes_png
from workbench.train import ConfigError, check_inputs, parse_config
from workbench.jobs.processes import check_nproc

ROOT = Path(__file__).resolve().parents[1]


def refused(raw: dict, tmp_path) -> str:
    with pytest.raises(ConfigError) as error:
        parse_config({"dataset": "d.json", **raw}, base_dir=tmp_path)
    return str(error.value)


@pytest.mark.parametrize("raw, named", [
    ({"learning_rate": math.nan}, "learning_rate must be a finite number, got nan"),
    ({"learning_rate": math.inf}, "learning_rate must be a finite number, got inf"),
    ({"learning_rate": 0}, "learning_rate must be positive"),
    ({"seed": -1}, "seed must be in [0, 4294967295], got -1"),
    ({"seed": 2 ** 32}, "seed must be in [0, 4294967295]"),
    ({"epochs": math.inf}, "epochs must be a finite number, got inf"),
    ({"epochs": -1}, "epochs must be positive"),
    ({"save_total_limit": -1}, "save_total_limit must be >= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"max_grad_norm": math.nan}, "max_grad_norm must be a finite number"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0"),
    ({"weight_decay": math.inf}, "weight_decay must be a finite number"),
    ({"lora_dropout": math.nan}, "lora_dropout must be a finite number"),
    ({"eval_split": math.nan}, "eval_split must be a finite number"),
    ({"warmup": math.nan}, "warmup must be a finite number"),
    ({"warmup": -3}, "warmup steps must be >= 0"),
    ({"gate_balance_target": math.nan}, "gate_balance_target must be a finite number"),
    ({"gate_balance_weight": -1}, "gate_balance_weight must be >= 0"),
    ({"max_steps": 0}, "max_steps must be a positive number of steps (or -1 to train for epochs), got 0"),
    ({"batch_size": True}, "batch_size must be int, got True"),
    ({"batch_size": 2.5}, "batch_size must be int, got 2.5"),
    ({"learning_rate": "1e-4"}, "learning_rate must be float, got '1e-4'"),
    ({"dataset": 3}, "dataset must be str, got 3"),
    ({"lora_target": []}, "lora_target must be a list of module names"),
    ({"resume": 3}, "resume must be true/false or a checkpoint path"),
])
def test_values_that_would_fail_at_run_time_are_refused_by_name(raw, named, tmp_path):
    assert named in refused(raw, tmp_path)


def test_every_problem_is_named_at_once(tmp_path):
    message = refused({"seed": -1, "weight_decay": -1, "learning_rat": 1, "epochs": math.nan}, tmp_path)
    for part in ("seed", "weight_decay", "'learning_rat'", "did you mean 'learning_rate'", "epochs"):
        assert part in message


def test_sound_edge_values_are_kept(tmp_path):
    c = parse_config({"dataset": "d.json", "save_total_limit": 0, "max_grad_norm": 0, "weight_decay": 0.1,
                      "seed": 0, "warmup": 0, "epochs": 0.5}, base_dir=tmp_path)
    assert (c.save_total_limit, c.max_grad_norm, c.weight_decay, c.seed, c.warmup, c.epochs) == (0, 0.0, 0.1, 0, 0, 0.5)
    assert isinstance(c.max_grad_norm, float) and isinstance(c.warmup, int)


def records(n: int) -> list:
    return [{"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": "Yes."}]}
            for i in range(n)]


def test_an_eval_split_that_leaves_no_training_data_is_refused(tmp_path):
    (tmp_path / "two.json").write_text(json.dumps(records(2)))
    with pytest.raises(ConfigError, match="eval_split 0.75 holds out 2 of the 2 records"):
        check_inputs(parse_config({"dataset": "two.json", "eval_split": 0.75}, base_dir=tmp_path))
    with pytest.raises(ConfigError, match="eval_split 0.5 holds out 1 of the 1 records"):
        (tmp_path / "one.json").write_text(json.dumps(records(1)))
        check_inputs(parse_config({"dataset": "one.json", "eval_split": 0.5}, base_dir=tmp_path))
    check_inputs(parse_config({"dataset": "two.json", "eval_split": 0.3}, base_dir=tmp_path))  # 1 train, 1 eval


@pytest.mark.parametrize("name, content, named", [
    ("picture.png", None, "is not a dataset"),
    ("config.json", {"learning_rate": 1e-4}, "record 0"),
    ("strings.json", ["a", "b"], "record 0: expected an object"),
    ("broken.json", "[{", "malformed JSON"),
    ("empty.json", [], "holds no records"),
    ("both.json", [{**records(1)[0], "messages": []}], "has both 'conversations' and 'messages'"),
    ("missing_image.json", [{"conversations": [{"from": "human", "value": "<image>Hi"}], "images": ["gone.png"]}],
     "image gone.png not found"),
])
def test_a_dataset_that_is_not_a_dataset_is_refused(name, content, named, tmp_path):
    path = tmp_path / name
    if content is None:
        shapes_png(path)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as error:
        check_inputs(parse_config({"dataset": name}, base_dir=tmp_path))
    assert "dataset" in str(error.value) and named in str(error.value), str(error.value)


def test_check_names_a_nan_learning_rate_without_a_traceback(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(records(2)))
    config = tmp_path / "nan.json"
    config.write_text('{"dataset": "data.json", "learning_rate": NaN, "seed": -1, "epochs": Infinity}')
    result = subprocess.run([sys.executable, "-m", "workbench.train", str(config), "--check"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for part in ("learning_rate must be a finite number", "seed must be in", "epochs must be a finite number"):
        assert part in result.stderr


def test_nproc_beyond_the_machine_is_refused(tmp_path):
    """By the check itself, and by the run manager whoever submits (not only the Train tab)."""
    import os

    from workbench.jobs import RunManager

    check_nproc(1)
    with pytest.raises(ValueError, match="nproc 1000: more processes than"):
        check_nproc(1000)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="nproc must be"):
            check_nproc(bad)
    check_nproc(min(2, os.cpu_count() or 1))
    manager = RunManager(tmp_path / "runs")
    with pytest.raises(ValueError, match="nproc 1000"):
        manager.submit({"dataset": "d.json"}, nproc=1000)
    assert manager.list() == []


def test_the_train_tab_refuses_them_before_starting(tmp_path):
    from workbench.ui import train as tab
    from workbench.ui.context import AppContext

    ctx = AppContext.create(tmp_path / "ws")
    (ctx.workspace / "shapes.json").write_text(json.dumps(records(3)))
    values = tab.preset_values(next(iter(tab.PRESETS)))
    values.update(dataset="shapes.json", extra="")
    try:
        for change, named in [({"nproc": 1000}, "nproc 1000"), ({"extra": '{"learning_rate": NaN}'}, "learning_rate"),
                              ({"seed": -1}, "seed"), ({"eval_split": 0.9}, "eval_split")]:
            run_id, message = tab.start_run(ctx, {**values, **change})
            assert run_id is None and named in message, message
            assert named in tab.preview(ctx, {**values, **change})[2]
        assert tab.manager_of(ctx).list() == []
    finally:
        manager = tab.manager_of(ctx)
        manager.close()
        for run in manager.list():  # before the fix, runs started: end them
            if run.pgid:
                import os
                import signal

                try:
                    os.killpg(run.pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        tab.manager_for.cache_clear()
