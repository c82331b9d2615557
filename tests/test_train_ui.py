"""The Train tab's handlers, without a browser: real run manager, real processes, real files."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import end_runs, TINY_DATASET
from workbench.jobs import SUCCEEDED
from workbench.train.config import DEFAULT_LORA_TARGETS
from workbench.ui import train as tab
from workbench.ui.context import AppContext


@pytest.fixture
def ctx(tmp_path):
    context = AppContext.create(tmp_path / "ws")
    (context.workspace / "shapes.json").write_text(TINY_DATASET)  # the form's dataset (runs here never read it)
    yield context
    end_runs(tab.manager_of(context))  # its process group and its marker: nothing of a run outlives the test
    tab.manager_for.cache_clear()


def form(**overrides) -> dict:
    values = tab.preset_values(next(iter(tab.PRESETS)))
    values.update(dataset="shapes.json", extra="")
    values.update(overrides)
    return values


def test_presets_fill_the_form_and_qlora_targets_a_3b_vlm_in_4bit():
    lora = tab.preset_values("LoRA · default model (CPU friendly)")
    assert lora["base_model"] == "default" and lora["quantization"] == "none" and lora["hsa"] is True
    assert lora["lora_target"] == ", ".join(DEFAULT_LORA_TARGETS)
    qlora = tab.preset_values("QLoRA · Qwen2.5-VL-3B on one GPU")
    assert qlora["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct" and qlora["quantization"] == "4bit"
    assert qlora["finetuning"] == "lora" and qlora["max_steps"] == -1 and qlora["grad_accum"] > 1


def test_form_config_keeps_only_keys_that_apply(ctx):
    config, nproc = tab.form_config(ctx, form(max_steps=5, nproc=2))
    assert config["max_steps"] == 5 and "epochs" not in config and nproc == 2
    assert config["base_model"] == str(ctx.default_model)
    config, _ = tab.form_config(ctx, form(max_steps=-1, epochs=2))
    assert config["epochs"] == 2.0 and "max_steps" not in config
    config, _ = tab.form_config(ctx, form(finetuning="full"))
    assert not any(k.startswith("lora_") for k in config)
    config, _ = tab.form_config(ctx, form(dataset="store:labelled"))
    assert config["store_db"] == str(ctx.db_path)
    config, _ = tab.form_config(ctx, form(extra='{"save_steps": 7}', warmup=10))
    assert config["save_steps"] == 7 and config["warmup"] == 10 and isinstance(config["warmup"], int)


def test_preview_shows_the_exact_command_and_names_bad_keys(ctx):
    command, config, problems = tab.preview(ctx, form())
    assert problems == ""
    assert "-m workbench.train" in command and "run-0001/run_config.json" in command
    assert json.loads(config)["output_dir"].endswith("run-0001")
    _, _, problems = tab.preview(ctx, form(extra='{"save_stepz": 3}'))
    assert "unknown key 'save_stepz'" in problems
    command, _, _ = tab.preview(ctx, form(nproc=2))
    assert "--nproc_per_node=2" in command


def test_start_refuses_a_bad_config_without_creating_a_run(ctx):
    run_id, text = tab.start_run(ctx, form(finetuning="full", quantization="4bit"))
    assert run_id is None and "needs finetuning 'lora'" in text
    assert tab.manager_of(ctx).list() == []


def test_start_refuses_what_cannot_run_up_front(ctx):
    """Issue 20.8: no run is started (to fail 10-18 s later) for a missing dataset file, an unknown store
    dataset, a missing base model or LoRA targets that match no module; the preview says the same."""
    from workbench.store import Store

    with Store(ctx.db_path):
        pass
    for values, reason in [
        (form(dataset="nope.json"), "nope.json does not exist"),
        (form(dataset="store:nope"), "store dataset 'nope' has no conversations"),
        (form(base_model=str(ctx.workspace / "no-model")), "not found:"),
        (form(lora_target="q_proj, qkv_proj"), "lora_target qkv_proj matches no module"),
    ]:
        run_id, text = tab.start_run(ctx, values)
        assert run_id is None and reason in text, (values, text)
        assert reason in tab.preview(ctx, values)[2]
    assert tab.manager_of(ctx).list() == []
    config, _ = tab.form_config(ctx, form())  # the run's config file says where the dataset is
    assert config["dataset"] == str(ctx.workspace / "shapes.json")


def write_metrics_script(n: int, adapter: bool) -> list[str]:
    code = f"""
        import json, os, pathlib
        out = pathlib.Path(os.environ["WORKBENCH_RUN_DIR"])
        with open(out / "metrics.jsonl", "a") as f:
            for step in range(1, {n} + 1):
                f.write(json.dumps({{"step": step, "loss": 2.0 / step, "learning_rate": 1e-3 * step}}) + "\\n")
            f.write(json.dumps({{"step": {n}, "eval_loss": 0.5}}) + "\\n")
        if {adapter}:
            (out / "adapter").mkdir()
            (out / "adapter" / "adapter_config.json").write_text(json.dumps({{"base_model_name_or_path": "/m/base"}}))
    """
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_runs_table_curves_log_and_chat_target(ctx):
    manager = tab.manager_of(ctx)
    run = manager.wait(manager.submit({"note": 1}, command=write_metrics_script(4, True), name="demo").id)
    assert run.status == SUCCEEDED
    rows = tab.runs_rows(manager)
    assert rows[0][:6] == [run.id, "demo", "succeeded", 4, "0.5", "0.5"]
    summary, figure, log, config, gates = tab.run_view(manager, run.id)
    assert "succeeded" in summary and json.loads(config)["note"] == 1 and "attempt 1" in log
    loss, eval_loss, lr = figure.data
    assert list(loss.x) == [1, 2, 3, 4] and list(loss.y) == [2.0, 1.0, 2.0 / 3, 0.5]
    assert list(eval_loss.y) == [0.5] and list(lr.y) == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    target = tab.chat_target(manager, run.id)
    assert target.label == f"run: run-{run.id:04d}" and target.base_model == "/m/base"
    assert target.adapter == str(run.output_dir / "adapter")


def test_several_runs_loss_curves_on_one_plot(ctx):
    manager = tab.manager_of(ctx)
    first = manager.wait(manager.submit({}, command=write_metrics_script(4, False), name="short").id)
    second = manager.wait(manager.submit({}, command=write_metrics_script(6, False), name="long").id)
    figure = tab.compare_figure(manager, [first.id, second.id])
    names = [trace.name for trace in figure.data]
    assert names == [f"{first.id} · short", f"{first.id} · short (eval)", f"{second.id} · long",
                     f"{second.id} · long (eval)"]
    assert list(figure.data[2].x) == [1, 2, 3, 4, 5, 6] and list(figure.data[3].y) == [0.5]
    assert figure.data[0].line.color == figure.data[1].line.color != figure.data[2].line.color
    assert tab.compare_figure(manager, [first.id]).layout.showlegend  # even one run is named
    assert tab.compare_figure(manager, []).data == ()
    assert [t.name for t in tab.compare_figure(manager, [999, first.id]).data][0] == f"{first.id} · short"


def test_delete_a_run_after_confirming_and_never_a_running_one(ctx):
    from workbench.ui.chat import ChatBackend

    manager = tab.manager_of(ctx)
    done = manager.wait(manager.submit({}, command=write_metrics_script(2, True), name="done").id)
    label = f"run: run-{done.id:04d}"
    assert label in ChatBackend(ctx).model_choices()
    question, ask = tab.delete_prompt(manager, done.id)
    assert ask and f"Delete run {done.id} · done" in question and str(done.output_dir) in question
    assert tab.delete_prompt(manager, None) == ("Select a run to delete.", False)

    sleeper = manager.submit({}, command=[sys.executable, "-c", "import time; time.sleep(600)"], name="busy")
    question, ask = tab.delete_prompt(manager, sleeper.id)
    assert not ask and "cancel it first" in question
    assert "Not deleted" in tab.delete_run(manager, sleeper.id) and sleeper.output_dir.is_dir()

    text = tab.delete_run(manager, done.id)
    assert text == f"Run {done.id} deleted with `{done.output_dir.resolve()}`."
    assert not done.output_dir.exists()
    assert [row[0] for row in tab.runs_rows(manager)] == [sleeper.id]
    assert [value for _, value in tab.run_choices(manager)] == [sleeper.id]
    assert label not in ChatBackend(ctx).model_choices()  # the Chat tab's list comes from the runs' folders
    assert "Not deleted" in tab.delete_run(manager, done.id)


def test_curves_keep_the_last_record_of_a_step_after_a_resume():
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5},
               {"step": 3, "loss": 1.4}, {"step": 4, "loss": 1.2}]  # resumed from checkpoint-2
    assert tab.curves(records)["loss"] == [3.0, 2.0, 1.4, 1.2]


def test_cancel_resume_clone_and_chat_messages(ctx):
    manager = tab.manager_of(ctx)
    sleeper = manager.submit({"lr": 1.0}, command=[sys.executable, "-c", "import time; time.sleep(600)"])
    text = tab.cancel_run(manager, sleeper.id)  # a sleeper dies at once on SIGTERM: either message
    assert "asked to stop" in text or text == f"Run {sleeper.id} is cancelled."
    assert manager.wait(sleeper.id).status == "cancelled"
    assert "only training runs resume" in tab.resume_run(manager, sleeper.id)
    with pytest.raises(ValueError, match="no adapter"):
        tab.chat_target(manager, sleeper.id)
    new_id, text = tab.clone_run(ctx, sleeper.id, '{"dataset": "d.json", "lr": 2.0}')
    assert new_id is None and "unknown key 'lr'" in text  # the clone of a custom run is still checked
    assert tab.clone_run(ctx, sleeper.id, "[1]")[0] is None


def test_resume_says_whether_a_checkpoint_is_there_and_cancel_saves_one(ctx):
    """Issue 20.9: Resume does not promise a checkpoint that is not there; a cancelled run stops after its
    step with a checkpoint (SaveOnCancel), which Resume then names. 20.10: cancelling clears 'is running'."""
    from transformers import TrainerControl

    from workbench.train.run import SaveOnCancel

    manager = tab.manager_of(ctx)
    run = manager.wait(manager.submit({"dataset": "x"}, command=[sys.executable, "-c", "pass"]).id)
    with manager._write() as db:  # a training run (resume refuses custom commands)
        db.execute("UPDATE runs SET launcher = 'train' WHERE id = ?", (run.id,))
    text = tab.resume_run(manager, run.id)
    assert "no checkpoint" in text and "starts from the beginning" in text
    manager.cancel(run.id)
    manager.wait(run.id)
    (run.output_dir / "checkpoint-2").mkdir(parents=True)
    (run.output_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert "continues from checkpoint-2" in tab.resume_run(manager, run.id)
    cancel, control = SaveOnCancel(), TrainerControl()
    cancel.on_step_end(None, None, control)
    assert not control.should_save and not control.should_training_stop
    cancel.ask()
    cancel.on_step_end(None, None, control)
    assert control.should_save and control.should_training_stop


def test_the_form_cannot_choose_where_a_run_writes(ctx, tmp_path):
    """Issue 19.1 / 19.2: output_dir in "More keys" or in a clone's edits (/tmp/x, ../x, another run's folder)
    is refused by the preview, the start and the clone, naming output_dir; nothing is created there."""
    manager = tab.manager_of(ctx)
    done = manager.wait(manager.submit({}, command=[sys.executable, "-c", "pass"]).id)
    attacks = [str(tmp_path / "x"), "../x", "/tmp/x19-form", "runs", f"runs/{done.output_dir.name}",
               str(done.output_dir)]
    for target in attacks:
        extra = json.dumps({"output_dir": target})
        assert "output_dir is chosen by the run manager" in tab.preview(ctx, form(extra=extra))[2], target
        run_id, text = tab.start_run(ctx, form(extra=extra))
        assert run_id is None and "output_dir is chosen by the run manager" in text, (target, text)
        new_id, text = tab.clone_run(ctx, done.id, extra)
        assert new_id is None and "output_dir is chosen by the run manager" in text, (target, text)
    assert [run.id for run in manager.list()] == [done.id]
    assert not (tmp_path / "x").exists() and not (ctx.workspace.parent / "x").exists()
    assert not __import__("os").path.exists("/tmp/x19-form")
    # the preview says where a run will write: the manager's next folder
    command, config, problems = tab.preview(ctx, form())
    assert problems == "" and json.loads(config)["output_dir"] == str(manager.runs_dir / f"run-{done.id + 1:04d}")


def test_a_server_reachable_by_others_trains_only_on_files_in_the_workspace_or_allowed_folders(tmp_path):
    """Issue 19.7: with --share / --auth / a non-loopback --host, the form's dataset, base model and the
    paths in "More keys" (image_root, store_db, resume) lie in the workspace or an --allow-path folder;
    embedded models and hub ids stay allowed; a local server keeps reading what its user names."""
    from workbench.paths import PathRefused
    from workbench.store import Store

    outside, shared = tmp_path / "outside", tmp_path / "shared"
    for folder in (outside, shared):
        folder.mkdir()
        (folder / "data.json").write_text(TINY_DATASET)
    with Store(outside / "other.db"):
        pass
    exposed = AppContext.create(tmp_path / "ws", allowed_paths=[shared], confined=True)
    (exposed.workspace / "shapes.json").write_text(TINY_DATASET)
    try:
        attacks = [form(dataset=str(outside / "data.json")), form(dataset="../outside/data.json"),
                   form(dataset="/etc/passwd"), form(base_model=str(outside)), form(base_model="../outside"),
                   form(extra=json.dumps({"image_root": "/etc"})), form(extra=json.dumps({"image_root": "../.."})),
                   form(dataset="store:x", extra=json.dumps({"store_db": str(outside / "other.db")})),
                   form(extra=json.dumps({"resume": str(outside)}))]
        for values in attacks:
            run_id, text = tab.start_run(exposed, values)
            assert run_id is None and "outside the workspace" in text, (values, text)
            assert "outside the workspace" in tab.preview(exposed, values)[2]
        assert tab.manager_of(exposed).list() == []
        with pytest.raises(PathRefused):
            tab.confine_paths(exposed, {"dataset": "/etc/passwd", "base_model": "default"})
        for values in [form(), form(dataset=str(shared / "data.json")), form(base_model="composed")]:
            assert "outside the workspace" not in tab.preview(exposed, values)[2], values
        assert "outside the workspace" not in tab.preview(exposed, form(base_model="Qwen/Qwen2.5-VL-3B-Instruct"))[2]
        config = tab.confine_paths(exposed, {"dataset": "shapes.json", "base_model": "Qwen/Qwen2.5-VL-3B-Instruct",
                                             "image_root": "images"})
        assert config == {"dataset": str(exposed.workspace / "shapes.json"), "image_root": str(exposed.workspace / "images"),
                          "base_model": "Qwen/Qwen2.5-VL-3B-Instruct"}
        # a clone's edits follow the same rule
        manager = tab.manager_of(exposed)
        done = manager.wait(manager.submit({"dataset": str(exposed.workspace / "shapes.json")},
                                           command=[sys.executable, "-c", "pass"]).id)
        new_id, text = tab.clone_run(exposed, done.id, json.dumps({"dataset": str(outside / "data.json")}))
        assert new_id is None and "outside the workspace" in text
    finally:
        tab.manager_of(exposed).close()
        tab.manager_for.cache_clear()
    local = AppContext.create(tmp_path / "ws-local")
    assert tab.preview(local, form(dataset=str(outside / "data.json")))[2] == ""


def test_a_shared_server_trains_only_on_images_in_the_workspace_or_allowed_folders(tmp_path):
    """Gap of issue 19.7: a dataset in the workspace may name images anywhere on the disk (an absolute path,
    '..', a link in the workspace to a file outside, the annotation database's image rows); on a server that
    others can reach the preview, the start and the clone refuse it by record and image, before any run."""
    import os
    import sqlite3

    from conftest import shapes_png
    from workbench.store import Store, import_records

    outside, shared = tmp_path / "outside", tmp_path / "shared"
    for folder in (outside, shared, tmp_path / "ws" / "images"):
        folder.mkdir(parents=True)
    secret, allowed_png = shapes_png(outside / "secret.png"), shapes_png(shared / "ok.png")
    exposed = AppContext.create(tmp_path / "ws", allowed_paths=[shared], confined=True)
    ws = exposed.workspace
    shapes_png(ws / "images" / "ok.png")
    os.symlink(secret, ws / "images" / "link.png")

    def record(image):
        return {"conversations": [{"from": "human", "value": "<image>What color?"}, {"from": "gpt", "value": "Red."}],
                "images": [image]}

    good = [record("images/ok.png"), record(str(allowed_png)), record(str(ws / "images" / "ok.png"))]
    attacks = [str(secret), "../outside/secret.png", "images/link.png", "images/../../outside/secret.png",
               "/etc/passwd", str(ws / "images" / "link.png"), "/no/such/file.png"]  # existing or not: the same words
    try:
        for k, image in enumerate(attacks):
            (ws / f"data-{k}.json").write_text(json.dumps([*good, record(image)]))
            values = form(dataset=f"data-{k}.json")
            problems = tab.preview(exposed, values)[2]
            assert "record 3, image 0" in problems and "outside the workspace" in problems, (image, problems)
            run_id, text = tab.start_run(exposed, values)
            assert run_id is None and "record 3, image 0" in text, (image, text)
        # image_root in "More keys": relative images resolve there, and still only inside
        (ws / "data-root.json").write_text(json.dumps([record("ok.png"), record("../../outside/secret.png")]))
        problems = tab.preview(exposed, form(dataset="data-root.json", extra=json.dumps({"image_root": "images"})))[2]
        assert "record 1, image 0" in problems and "outside the workspace" in problems, problems
        (ws / "data-good.json").write_text(json.dumps(good))
        assert tab.preview(exposed, form(dataset="data-good.json"))[2] == ""
        # a store dataset whose database names an image outside its image folder (a database uploaded by someone)
        with Store(exposed.db_path) as store:
            import_records(store, "d", [("r", record("images/ok.png"))], base_dir=ws)
        assert tab.preview(exposed, form(dataset="store:d", eval_split=0))[2] == ""
        with sqlite3.connect(exposed.db_path) as db:
            db.execute("UPDATE images SET file = ?", (os.path.relpath(secret, ws / "images"),))
        problems = tab.preview(exposed, form(dataset="store:d", eval_split=0))[2]
        assert "image 0" in problems and "outside the workspace" in problems, problems
        # a clone whose edits point at such a dataset
        manager = tab.manager_of(exposed)
        done = manager.wait(manager.submit({"dataset": str(ws / "data-good.json")},
                                           command=[sys.executable, "-c", "pass"]).id)
        new_id, text = tab.clone_run(exposed, done.id, json.dumps({"dataset": "data-0.json"}))
        assert new_id is None and "record 3, image 0" in text, text
        assert [run.id for run in manager.list()] == [done.id]
    finally:
        tab.manager_of(exposed).close()
        tab.manager_for.cache_clear()
    local = AppContext.create(tmp_path / "ws")  # the same workspace served to its user only
    assert tab.preview(local, form(dataset="data-0.json"))[2] == ""
    tab.manager_of(local).close()
    tab.manager_for.cache_clear()


def test_the_preview_names_the_folder_the_start_gives(ctx):
    """The manager gives run-N-1 when a folder (or a link) run-N is already there, and never reuses the id of a
    deleted run: the preview says the same folder the start then uses."""
    import os

    manager = tab.manager_of(ctx)

    def previewed():
        return json.loads(tab.preview(ctx, form())[1])["output_dir"]

    (manager.runs_dir / "run-0001").mkdir()  # left by a run of an earlier database
    os.symlink(ctx.workspace, manager.runs_dir / "run-0001-1")  # a link of the next name is never followed
    expected = previewed()
    run = manager.submit({}, command=[sys.executable, "-c", "pass"])
    assert expected == str(run.output_dir) == str(manager.runs_dir / "run-0001-2")
    manager.wait(run.id)
    manager.delete(run.id)  # the newest run goes: its id is not given again
    expected = previewed()
    run = manager.submit({}, command=[sys.executable, "-c", "pass"])
    assert expected == str(run.output_dir) == str(manager.runs_dir / "run-0002")
    manager.wait(run.id)
