"""The training config is checked before anything starts: defaults, refusals that name the keys."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.train import DEFAULT_MODEL, ConfigError, parse_config
from conftest import TINY_DATASET


ROOT = Path(__file__).resolve().parents[1]


def test_the_minimal_config_is_complete_and_resolves_paths(tmp_path):
    c = parse_config({"dataset": "data.json", "output_dir": "runs/x", "max_steps": 3, "hsa": True}, base_dir=tmp_path)
    assert c.dataset == str(tmp_path / "data.json") and c.output_dir == str(tmp_path / "runs" / "x")
    assert c.image_root == str(tmp_path)  # images resolve next to the dataset file
    assert c.base_model == str(DEFAULT_MODEL) and c.finetuning == "lora" and c.quantization == "none"
    assert c.max_steps == 3 and c.hsa is True and c.lora_r > 0 and c.learning_rate > 0


def test_output_dir_defaults_to_the_dataset_name(tmp_path):
    assert parse_config({"dataset": "d/shapes.json"}, base_dir=tmp_path).output_dir == str(tmp_path / "runs" / "shapes")
    store = parse_config({"dataset": "store:labelled", "store_db": "a.db"}, base_dir=tmp_path)
    assert store.store_dataset == "labelled" and store.output_dir == str(tmp_path / "runs" / "labelled")
    assert store.store_db == str(tmp_path / "a.db")


@pytest.mark.parametrize("raw, named", [
    ({"dataset": "d.json", "learning_rat": 1e-4}, ["'learning_rat'", "did you mean 'learning_rate'"]),
    ({"dataset": "d.json", "lora": {"r": 8}, "epochz": 2}, ["'lora'", "'epochz'"]),
    ({"output_dir": "x"}, ["missing key 'dataset'"]),
    ({"dataset": "d.json", "finetuning": "full", "lora_r": 8}, ["lora_r", "finetuning is 'full'"]),
    ({"dataset": "d.json", "finetuning": "full", "quantization": "4bit"}, ["quantization '4bit' needs finetuning 'lora'"]),
    ({"dataset": "d.json", "epochs": 2, "max_steps": 10}, ["both epochs and max_steps"]),
    ({"dataset": "d.json", "quantization": "3bit"}, ["quantization must be one of none, 8bit, 4bit"]),
    ({"dataset": "d.json", "lr_scheduler": "cosin"}, ["lr_scheduler must be one of"]),
    ({"dataset": "d.json", "batch_size": "4"}, ["batch_size must be int"]),
    ({"dataset": "d.json", "hsa": "yes"}, ["hsa must be bool"]),
    ({"dataset": "d.json", "eval_steps": 5}, ["eval_steps given but eval_split is 0"]),
    ({"dataset": "d.json", "eval_split": 1.5}, ["eval_split must be in [0, 1)"]),
    ({"dataset": "d.json", "warmup": 1.5}, ["warmup as a fraction"]),
    ({"dataset": "d.json", "store_db": "a.db"}, ["store_db given but dataset is a file"]),
])
def test_bad_configs_are_refused_naming_the_keys(raw, named, tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_config(raw, base_dir=tmp_path)
    for part in named:
        assert part in str(error.value)


def test_types_are_coerced_only_where_lossless(tmp_path):
    c = parse_config({"dataset": "d.json", "batch_size": 2.0, "learning_rate": 1, "warmup": 5,
                      "lora_target": "q_proj, v_proj"}, base_dir=tmp_path)
    assert c.batch_size == 2 and isinstance(c.learning_rate, float) and c.warmup == 5 and isinstance(c.warmup, int)
    assert c.lora_target == ["q_proj", "v_proj"]
    assert parse_config({"dataset": "d.json", "warmup": 0.1}, base_dir=tmp_path).warmup == 0.1


def test_the_entry_point_refuses_a_bad_config_before_loading_anything(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("dataset: data.json\nmax_step: 3\nquantization: 4bit\nfinetuning: full\n")
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "workbench.train", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 2
    assert "config error" in result.stderr and "'max_step'" in result.stderr and "did you mean 'max_steps'" in result.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "runs").exists()  # nothing started


def test_check_prints_the_resolved_config(tmp_path):
    config = tmp_path / "ok.json"
    (tmp_path / "data.json").write_text(TINY_DATASET)
    config.write_text(json.dumps({"dataset": "data.json", "output_dir": "runs/x", "max_steps": 3, "hsa": True}))
    result = subprocess.run([sys.executable, "-m", "workbench.train", str(config), "--check"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["output_dir"] == str(tmp_path / "runs" / "x") and resolved["hsa"] is True


def check(config_file: Path, cwd: Path):
    return subprocess.run([sys.executable, "-m", "workbench.train", str(config_file), "--check"], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)


def test_check_refuses_what_cannot_run_and_paths_are_the_files(tmp_path):
    """Issue 20.8: a missing dataset, an unknown store dataset, a missing base model and LoRA targets that
    match no module are refused by --check (the base model's config is read, not its weights); relative
    paths in a config file are relative to the file's folder, not to where the command runs."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "data.json").write_text(TINY_DATASET)
    ok = folder / "ok.json"
    ok.write_text(json.dumps({"dataset": "data.json", "max_steps": 1}))
    result = check(ok, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dataset"] == str(folder / "data.json")
    from workbench.store import Store

    with Store(tmp_path / "wb.db"):
        pass
    for config, reason in [
        ({"dataset": "missing.json"}, f"dataset file {folder / 'missing.json'} does not exist"),
        ({"dataset": "store:nope", "store_db": str(tmp_path / "wb.db")}, "store dataset 'nope' has no conversations"),
        ({"dataset": "store:nope", "store_db": str(tmp_path / "gone.db")}, "gone.db does not exist"),
        ({"dataset": "data.json", "base_model": str(tmp_path / "no-model")}, f"not found: {tmp_path / 'no-model'}"),
        ({"dataset": "data.json", "lora_target": ["q_proj", "qkv"]}, "lora_target qkv matches no module"),
    ]:
        bad = folder / "bad.json"
        bad.write_text(json.dumps(config))
        t0 = time.monotonic()
        result = check(bad, cwd=tmp_path)
        assert result.returncode == 2 and reason in result.stderr, (config, result.stderr)
        assert time.monotonic() - t0 < 60


def test_a_run_never_writes_into_a_folder_that_holds_something(tmp_path):
    """Issue 19.1 / 19.2 for the command line: output_dir must be new or empty (or hold only the run manager's
    run_config.json and run.log); another run's folder or a system folder (../../../../etc) is refused by
    --check and by the run itself, unless resume continues the run that is there."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "data.json").write_text(TINY_DATASET)
    other = tmp_path / "runs" / "run-0003"
    (other / "adapter").mkdir(parents=True)
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    up = "../" * len(folder.parts)
    for output_dir in [str(other), "../runs/run-0003", f"{up}etc", "/etc"]:
        bad = folder / "bad.json"
        bad.write_text(json.dumps({"dataset": "data.json", "output_dir": output_dir}))
        result = check(bad, cwd=tmp_path)
        assert result.returncode == 2 and "output_dir" in result.stderr and "not empty" in result.stderr, \
            (output_dir, result.stderr)
        result = subprocess.run([sys.executable, "-m", "workbench.train", str(bad)], cwd=tmp_path,
                                capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)
        assert result.returncode == 2 and "not empty" in result.stderr, result.stderr
    assert sorted(p.name for p in other.iterdir()) == ["adapter", "metrics.jsonl"]
    # a new folder, an empty one, one with only the run manager's files, or a resume: accepted
    (tmp_path / "empty").mkdir()
    managed = tmp_path / "runs" / "run-0004"
    managed.mkdir()
    (managed / "run.log").write_text("=== run 4\n")
    for config in [{"output_dir": "../new"}, {"output_dir": str(tmp_path / "empty")},
                   {"output_dir": str(managed)}, {"output_dir": str(other), "resume": True}]:
        ok = folder / "ok.json"
        ok.write_text(json.dumps({"dataset": "data.json", **config}))
        if config["output_dir"] == str(managed):
            ok = managed / "run_config.json"
            ok.write_text(json.dumps({"dataset": str(folder / "data.json"), **config}))
        result = check(ok, cwd=tmp_path)
        assert result.returncode == 0, (config, result.stderr)


def test_reviewed_only_trains_on_what_a_reviewer_accepted(tmp_path):
    """Issue 23: in a dataset split among annotators, reviewed_only takes the conversations a reviewer
    accepted, with the accepted labels; none accepted yet is refused by the check, before a run starts."""
    from models.hsa import NOISE
    from workbench.store import Store, import_records
    from workbench.train.config import check_inputs
    from workbench.train.run import load_records

    db = tmp_path / "wb.db"
    with Store(db) as store:
        records = [{"conversations": [{"from": "human", "value": f"Question {i}? lol"},
                                      {"from": "gpt", "value": "Yes."}]} for i in range(3)]
        ids = import_records(store, "team", [(f"r{i}", r) for i, r in enumerate(records)]).conversation_ids
        store.assign("team", ["alice", "bob"], 2)
    config = parse_config({"dataset": "store:team", "store_db": str(db), "reviewed_only": True}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="no reviewed conversations yet"):
        check_inputs(config)
    with Store(db) as store:
        store.set_turn_role(ids[1], 0, NOISE, expected_version=1, author="alice", annotator="alice")
        accepted = store.conversation(ids[1], annotator="alice").labels()
        store.accept(ids[1], accepted, reviewer="carol", expected_version=1, source="accepted alice")
    check_inputs(config)
    [conversation] = load_records(config)
    assert conversation.turns[0].text == "Question 1? lol" and conversation.turns[0].role == NOISE
    assert len(load_records(parse_config({"dataset": "store:team", "store_db": str(db)}, base_dir=tmp_path))) == 3
    with pytest.raises(ConfigError, match="reviewed_only needs a store:NAME dataset"):
        parse_config({"dataset": "d.json", "reviewed_only": True}, base_dir=tmp_path)


def test_check_refuses_an_image_that_is_there_but_is_not_an_image(tmp_path):
    """A file with an image's name and other bytes (or a cut-off PNG) fails the check, before a run starts,
    naming the record and the file; a real picture passes."""
    from conftest import shapes_png
    from workbench.train.config import check_inputs

    shapes_png(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not a picture")
    cut = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(cut[:len(cut) // 2])

    def dataset(image):
        path = tmp_path / f"data-{image}.json"
        path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image>What is it?"},
                                                       {"from": "gpt", "value": "A circle."}], "images": [image]}]))
        return parse_config({"dataset": str(path), "max_steps": 1}, base_dir=tmp_path)

    check_inputs(dataset("good.png"))
    for image in ("text.png", "cut.png"):
        with pytest.raises(ConfigError, match=f"record 0: image {image} \\(is not a readable image"):
            check_inputs(dataset(image))
