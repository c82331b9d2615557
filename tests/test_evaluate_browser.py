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
from workbench.ui.evaluate import answers_html, make_config

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
