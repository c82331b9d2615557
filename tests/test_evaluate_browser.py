"""The Evaluate tab in a real Chromium: start an evaluation of the default model on shapes with HSA on
and off, watch it finish, read the table, plots and answers. The tab's functions, without a browser,
come first."""
from __future__ import annotations

import sys
import textwrap
import time

import pytest

from conftest import ROOT, free_port, running_server, screenshot
from workbench.evaluate import ConfigError
from workbench.ui.context import AppContext
from workbench.ui.evaluate import answers_html, fresh_choices, make_config

SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import gradio as gr
    from workbench.ui import evaluate
    from workbench.ui.context import AppContext

    workspace, port = Path(sys.argv[1]), int(sys.argv[2])
    ctx = AppContext.create(workspace)
    with gr.Blocks(title="Evaluate tab") as demo:
        with gr.Tab("Evaluate", id="evaluate"):
            evaluate.build(ctx)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=False)
""")


def test_form_to_config(tmp_path):
    ctx = AppContext.create(tmp_path)
    config = make_config(ctx, ["default"], "shapes", 4, 1, "heavy", True, ["greedy", "beam"], 0.7, 0.9, 3,
                         ["on", "off"], 32)
    assert config["shapes"] == {"n": 4, "seed": 1, "noise": "heavy", "grounding": True}
    assert config["decoding"] == ["greedy", {"mode": "beam", "num_beams": 3}] and config["hsa"] == [True, False]
    for args, word in [(([], "shapes"), "model"), ((["default"], "nothing.json"), "no such file")]:
        with pytest.raises(ConfigError, match=word):
            make_config(ctx, *args, 4, 0, "clean", False, ["greedy"], 0.7, 0.9, 4, ["on"], 32)
    with pytest.raises(ConfigError, match="decoding"):
        make_config(ctx, ["default"], "shapes", 4, 0, "clean", False, [], 0.7, 0.9, 4, ["on"], 32)
    confined = AppContext.create(tmp_path, confined=True)
    with pytest.raises(ValueError, match="outside the workspace"):
        make_config(confined, ["default"], "/etc/passwd", 4, 0, "clean", False, ["greedy"], 0.7, 0.9, 4, ["on"], 32)


def test_answers_side_by_side_mark_the_wrong_ones():
    results = {"conditions": [{"key": "a"}, {"key": "b"}], "items": [
        {"record_id": "r0", "qtype": "color", "question": "Q<1>", "expected": "E",
         "answers": {"a": {"reply": "E", "correct": True}, "b": {"reply": "X", "correct": False}}},
        {"record_id": "r1", "qtype": "grounding", "question": "Q2", "expected": "<box>",
         "answers": {"a": {"reply": "no", "correct": False, "parsed": False},
                     "b": {"reply": "<box>", "correct": True, "iou": 0.8}}}]}
    page = answers_html(results)
    assert page.count("eval-wrong") == 2 + 1 and "Q&lt;1&gt;" in page and "no box could be read" in page
    assert "IoU 0.80" in page
    assert "r0" in answers_html(results, only_wrong=True)
    assert "eval-open" not in page  # a file's records are not in the store: no link


def test_a_wrong_answer_of_a_store_record_links_to_annotate():
    results = {"config": {"dataset": "store:my 'set'"}, "conditions": [{"key": "a"}], "items": [
        {"record_id": "7", "qtype": "color", "question": "Q", "expected": "E", "answers": {"a": {"reply": "X", "correct": False}}},
        {"record_id": "8", "qtype": "color", "question": "Q", "expected": "E", "answers": {"a": {"reply": "E", "correct": True}}}]}
    page = answers_html(results)
    assert page.count("class='eval-open'") == 1  # the wrong one only
    assert "data-dataset='my &#x27;set&#x27;' data-conv='7'" in page


def test_the_pickers_labels_follow_the_status(tmp_path):
    from workbench.jobs import RunManager

    class Run:
        def __init__(self, status):
            self.id, self.name, self.status, self.launcher = 1, "e", status, "evaluate"

    class Manager(RunManager):
        def __init__(self):
            self.status = "running"

        def list(self, limit=100):
            return [Run(self.status)]

    manager = Manager()
    update, shown = fresh_choices(manager, [])
    assert update.choices == [("1: e (running)", 1)] and shown == [("1: e (running)", 1)]
    assert fresh_choices(manager, shown)[1] is shown  # nothing changed: nothing sent
    import gradio as gr

    assert isinstance(fresh_choices(manager, [list(c) for c in shown])[0], type(gr.skip()))  # labels come back as lists
    manager.status = "succeeded"
    update, shown = fresh_choices(manager, shown)
    assert update.choices == [("1: e (succeeded)", 1)]




@pytest.fixture(scope="module")
def evaluate_tab(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("eval_ws")
    port = free_port()
    command = [sys.executable, "-c", SERVER, str(workspace), str(port)]
    with running_server(command, port, workspace / "server.log", env={"PYTHONPATH": str(ROOT)}) as url:
        yield url, workspace


@pytest.mark.browser
@pytest.mark.slow
def test_start_an_evaluation_and_read_its_results(evaluate_tab, page):
    url, workspace = evaluate_tab
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(url)
    page.locator("#eval-n input").fill("3")
    page.locator("#eval-name textarea").fill("from the browser")
    page.locator("#eval-start").click()
    page.wait_for_function("document.querySelector('#eval-message').innerText.includes('Evaluation 1')")
    deadline = time.monotonic() + 90
    while "succeeded" not in page.locator("#eval-status").inner_text():
        assert time.monotonic() < deadline, page.locator("#eval-status").inner_text()
        assert "failed" not in page.locator("#eval-status").inner_text(), (workspace / "evals").glob("*/run.log")
        time.sleep(1)
    page.wait_for_function("document.querySelector('#eval-table').innerText.includes('accuracy')", timeout=20_000)
    table = page.locator("#eval-table").inner_text()
    assert "grounding_acc" in table and "chair_i" in table and "default" in table
    assert page.locator("#eval-answers .eval-wrong").count() >= 1  # the default model never learnt boxes
    assert page.locator("#eval-accuracy-plot img").count() == 1
    assert "HSA on" in page.locator("#eval-comparisons").inner_text()
    assert "from the browser" in page.locator("#eval-runs").inner_text()
    screenshot(page, "evaluate_results")
    assert (workspace / "evals" / "run-0001" / "results.json").is_file()


@pytest.mark.browser
@pytest.mark.slow
def test_a_wrong_answer_opens_its_record_in_annotate(workbench_url, workbench_workspace, page, tmp_path):
    """The whole app: an evaluation of a store dataset, then a wrong answer's link opens that
    conversation in the Annotate tab; the picker's label follows the run to 'succeeded'."""
    from conftest import shapes_png
    from workbench.store import Store, import_records

    image = shapes_png(tmp_path / "red.png")
    records = [("right", {"images": [str(image)], "conversations": [
                   {"from": "human", "value": "<image>How many shapes are there?"},
                   {"from": "gpt", "value": "There is 1 shape."}]}),
               ("wrong", {"images": [str(image)], "conversations": [
                   {"from": "human", "value": "<image>What color is the circle?"},
                   {"from": "gpt", "value": "The circle is purple."}]})]  # no model says purple
    with Store(workbench_workspace / "workbench.db") as store:
        assert import_records(store, "eval-link", records, base_dir=tmp_path).stored == 2
        wrong_id = store.conversation_ids("eval-link")[1]
    page.goto(workbench_url)
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-dataset textarea, #eval-dataset input").first.fill("store:eval-link")
    page.locator("#eval-start").click()
    page.wait_for_function("document.querySelector('#eval-message').innerText.includes('Evaluation')")
    page.wait_for_function("document.querySelector('#eval-status').innerText.includes('succeeded')", timeout=120_000)
    # the picker's label is no longer '(running)'
    page.wait_for_function("document.querySelector('#eval-chosen input').value.includes('(succeeded)')", timeout=20_000)
    link = page.locator(f"#eval-answers a.eval-open[data-conv='{wrong_id}']").first
    link.wait_for(timeout=20_000)
    screenshot(page, "evaluate_open_in_annotate_link")
    link.click()
    page.wait_for_function("document.querySelector('#annotate-view').offsetParent !== null", timeout=20_000)
    page.wait_for_selector("#annotate-view:has-text('purple')", timeout=30_000)
    assert page.locator("#annotate-dataset input").input_value() == "eval-link"
    screenshot(page, "evaluate_opened_in_annotate")
