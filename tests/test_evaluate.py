"""workbench.evaluate on the embedded default model: shapes items through the same code as
`python -m models.zoo eval`, a file dataset with objects and boxes, several models on the same items,
a finished run as a model, and the background evaluation as a real run-manager subprocess."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, end_runs, wait_for
from models.zoo import DEFAULT_VLM_DIR, shapes
from models.zoo.evaluate import evaluate as zoo_evaluate
from workbench.evaluate import ConfigError, evaluate, load_items, parse_config, table_rows
from workbench.evaluate.run import RESULTS_NAME
from workbench.jobs import CANCELLED, SUCCEEDED, RunManager


def test_config_minimal_and_refusals(tmp_path):
    config = parse_config({"models": ["default"], "dataset": "data.json", "output_dir": "evals/x"}, base_dir=tmp_path)
    assert config.dataset == str(tmp_path / "data.json") and config.output_dir == str(tmp_path / "evals/x")
    assert [d.mode for d in config.decoding] == ["greedy"] and config.hsa == ["auto"]
    for bad, word in [({"dataset": "d.json", "output_dir": "o"}, "models"),
                      ({"models": ["default"], "dataset": "d.json", "output_dir": "o", "decoding": ["nucleus"]}, "mode"),
                      ({"models": ["default"], "dataset": "d.json", "output_dir": "o", "hsa": ["maybe"]}, "hsa"),
                      ({"models": ["default"], "dataset": "d.json", "output_dir": "o", "colour": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=word):
            parse_config(bad)


def test_shapes_items_are_what_models_zoo_eval_grades():
    from models.zoo.evaluate import graded_prompts, held_out

    items = load_items(parse_config({"models": ["default"], "dataset": "shapes", "shapes": {"n": 3}, "output_dir": "o"}))
    expected = [(q.replace("<image>", ""), e, t) for s in held_out(3, 0) for _, e, t, q in graded_prompts(s)]
    assert [(i.question, i.expected, i.qtype) for i in items] == expected
    assert all((i.objects is not None) == (i.qtype == "describe") for i in items)


def test_shapes_evaluation_agrees_with_models_zoo_eval(tmp_path):
    from models.vlm import load_vlm

    results = evaluate(parse_config({"models": ["default"], "dataset": "shapes", "shapes": {"n": 3, "grounding": True},
                                     "decoding": ["greedy", {"mode": "sample", "temperature": 0.7}],
                                     "hsa": [True], "output_dir": str(tmp_path)}))
    assert (tmp_path / RESULTS_NAME).is_file()
    assert {p for p in results["plots"]} == {"accuracy_by_type.png", "chair_vs_length.png"}
    assert all((tmp_path / p).stat().st_size > 1000 for p in results["plots"])
    greedy, sample = results["conditions"]
    assert greedy["key"] == "default · HSA on · greedy" and sample["decoding_label"] == "sample T=0.7 p=0.9"
    for metric in ("accuracy", "chair_s", "chair_i", "recall", "grounding_acc"):
        m = greedy["metrics"][metric]
        assert m["low"] <= (m["value"] or 0) <= m["high"] and m["total"] >= 1
    # the greedy rows without grounding are what models.zoo's evaluation answers and grades
    model, processor = load_vlm(DEFAULT_VLM_DIR, attn_implementation="hsa", device="cpu")
    zoo = zoo_evaluate(model, processor, shapes.generate(3, seed=0, split="eval", grounding=True), hsa=True)
    assert [it["answers"][greedy["key"]]["reply"] for it in results["items"]] == [g.reply for g in zoo.graded]
    plain = [it for it in results["items"] if it["qtype"] != "grounding"]
    zoo_plain = [g.correct for g in zoo.graded if g.qtype != "grounding"]
    assert greedy["metrics"]["accuracy"]["value"] == pytest.approx(sum(zoo_plain) / len(zoo_plain))
    grounded = [it for it in results["items"] if it["qtype"] == "grounding"]
    assert grounded and all("parsed" in it["answers"][greedy["key"]] for it in grounded)
    assert len(results["comparisons"]) == 1 and results["comparisons"][0]["n"] == len(plain)
    assert any(row[3] == "grounding_acc" for row in table_rows(results))


def test_file_dataset_with_objects_and_two_models_on_the_same_records(tmp_path):
    json_path = shapes.export_sharegpt(shapes.generate(2, seed=5, split="eval"), tmp_path, "set")
    records = json.loads(json_path.read_text())
    records[0]["objects"] = ["circle"]  # whatever the picture holds: CHAIR reads what the record says
    records[0]["qtypes"] = ["describe"] * 10
    records[1]["conversations"].append({"from": "human", "value": "Where is the shape? Give its box."})
    records[1]["conversations"].append({"from": "gpt", "value": "<ref>the shape</ref><box>[(0, 0), (500, 500)]</box>"})
    json_path.write_text(json.dumps(records))
    # a finished run that saved a whole model is offered as "run: NAME", as in the Chat tab
    runs = tmp_path / "runs"
    shutil.copytree(DEFAULT_VLM_DIR, runs / "run-0001" / "model")
    results = evaluate(parse_config({"models": ["default", "run: run-0001"], "dataset": "set.json",
                                     "runs_dir": "runs", "output_dir": "out", "max_new_tokens": 24},
                                    base_dir=tmp_path))
    a, b = [c["key"] for c in results["conditions"]]
    assert results["n_records"] == 2
    for item in results["items"]:  # the same model under two names: the same reply on every item
        assert item["answers"][a]["reply"] == item["answers"][b]["reply"]
    assert results["comparisons"][0]["diff"] == 0 and results["comparisons"][0]["p_mcnemar"] == 1.0
    metrics = results["conditions"][0]["metrics"]
    assert "chair_i" in metrics and metrics["grounding_acc"]["total"] == 1
    assert metrics["grounding_unparsed"] == 1  # the default model never learnt boxes: shown as unparsed
    described = [it for it in results["items"] if it["objects"]]
    assert described and all("hallucinated" in it["answers"][a] for it in described)


def test_cli_refuses_a_bad_config_without_a_traceback(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"models": ["default"], "dataset": "missing.json", "output_dir": "o"}))
    done = subprocess.run([sys.executable, "-m", "workbench.evaluate", str(tmp_path / "c.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing.json does not exist" in done.stderr and "Traceback" not in done.stderr


def test_background_evaluation_is_a_run(tmp_path):
    manager = RunManager(tmp_path / "evals", monitor=False, workdir=ROOT, poll_s=0.2)
    try:
        config = {"models": ["default"], "dataset": "shapes", "shapes": {"n": 2}, "hsa": [True, False]}
        run = manager.submit(config, name="eval", launcher="evaluate")
        assert run.command[1:3] == ["-m", "workbench.evaluate"]
        run = manager.wait(run.id, timeout=120)
        assert run.status == SUCCEEDED, manager.log_tail(run.id)
        results = json.loads((run.output_dir / RESULTS_NAME).read_text())
        assert [c["hsa"] for c in results["conditions"]] == [True, False]
        progress = manager.metrics(run.id)
        assert progress[-1]["step"] == progress[-1]["total"] == 2 * results["n_items"]
        # a longer one is cancelled while it runs, and a clone evaluates again
        long = manager.submit({**config, "shapes": {"n": 200}}, name="long", launcher="evaluate")
        wait_for(lambda: (manager.tick(), manager.metrics(long.id))[1], timeout=90)
        assert manager.cancel(long.id).status in ("running", CANCELLED)
        assert manager.wait(long.id, timeout=60).status == CANCELLED
        clone = manager.clone(run.id)
        assert clone.launcher == "evaluate" and clone.command[1:3] == ["-m", "workbench.evaluate"]
        manager.cancel(clone.id)
    finally:
        end_runs(manager)
        manager.close()
