"""The Train tab in a real Chromium: start a run on the default model, watch the loss curve grow,
cancel it. The tab runs in its own `gr.Blocks` server process on a free port."""
from __future__ import annotations

import sys
import textwrap
import time

import pytest

from conftest import ROOT, free_port, running_server, screenshot
from test_train import build_default_model, write_shapes_dataset

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import gradio as gr
    from workbench.ui import train
    from workbench.ui.context import AppContext

    workspace, model, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ctx = AppContext.create(workspace, default_model=model)
    with gr.Blocks(title="Train tab") as demo:
        with gr.Tab("Train", id="train"):
            train.build(ctx)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=False)
""")


@pytest.fixture(scope="module")
def train_tab(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("train_ws")
    model = build_default_model(tmp_path_factory.mktemp("model"))
    write_shapes_dataset(workspace, n=16)
    port = free_port()
    command = [sys.executable, "-c", SERVER, str(workspace), str(model), str(port)]
    with running_server(command, port, workspace / "server.log", env={"PYTHONPATH": str(ROOT)}) as url:
        yield url, workspace


def points(page) -> int:
    """Markers drawn on the train-loss trace of the curves plot."""
    return page.locator("#train-curves .scatterlayer .trace").first.locator(".point").count()


def test_start_a_run_and_watch_the_loss_curve_grow(train_tab, page):
    url, workspace = train_tab
    page.goto(url)
    page.locator("#train-dataset textarea").fill("shapes.json")
    # a preset fills the form by field name and leaves the dataset alone
    page.locator("#train-preset input").click()
    page.get_by_role("option", name="QLoRA · Qwen2.5-VL-3B on one GPU").click()
    page.wait_for_function("document.querySelector('#train-base-model textarea').value === 'Qwen/Qwen2.5-VL-3B-Instruct'")
    assert page.locator("#train-dataset textarea").input_value() == "shapes.json"
    page.locator("#train-preset input").click()
    page.get_by_role("option", name="LoRA · default model (CPU friendly)").click()
    page.wait_for_function("document.querySelector('#train-base-model textarea').value === 'default'")
    page.locator("#train-max-steps input").fill("2000")
    page.locator("#train-name textarea").fill("from the browser")
    page.locator("#train-preview").click()
    page.wait_for_function("document.querySelector('#train-command').innerText.includes('workbench.train')")
    assert "run-0001/run_config.json" in page.locator("#train-command").inner_text()
    # the command is one long line: it wraps instead of running off the box's right edge
    assert page.locator("#train-command .cm-scroller").evaluate("s => s.scrollWidth <= s.clientWidth + 1")
    screenshot(page, "train_preview")

    page.locator("#train-start").click()
    page.wait_for_function("document.querySelector('#train-message').innerText.includes('Run 1')")
    deadline = time.monotonic() + 240
    while points(page) < 2:
        assert time.monotonic() < deadline, page.locator("#train-summary").inner_text()
        time.sleep(1)
    first = points(page)
    screenshot(page, "train_curve_early")
    time.sleep(6)  # a few timer refreshes later
    later = points(page)
    assert later > first, (first, later)
    assert "[metrics] step=" in page.locator("#train-log textarea").input_value()
    assert "running" in page.locator("#train-runs").inner_text()
    screenshot(page, "train_curve_later")
    # the log tail shows its newest lines: once it overflows, it is scrolled to its end
    page.wait_for_function("(() => { const t = document.querySelector('#train-log textarea');"
                           " return t.scrollHeight > t.clientHeight + 20; })()", timeout=60_000)
    time.sleep(3)  # a timer refresh replaces the text
    at_end = "t => t.scrollHeight - t.scrollTop - t.clientHeight < 4"
    assert page.locator("#train-log textarea").evaluate(at_end), page.locator("#train-log textarea").evaluate(
        "t => [t.scrollTop, t.clientHeight, t.scrollHeight]")
    screenshot(page, "train_log_tail")
    assert "Run 1 (from the browser)" in page.locator("#train-message").inner_text()

    page.locator("#train-cancel").click()
    page.wait_for_function("document.querySelector('#train-runs').innerText.includes('cancelled')", timeout=60_000)
    screenshot(page, "train_cancelled")
    # "Run 1 (from the browser) is running." no longer holds once it is cancelled
    assert "Run 1 (from the browser)" not in page.locator("#train-message").inner_text()
    assert (workspace / "runs" / "run-0001" / "metrics.jsonl").exists()


def test_compare_runs_and_delete_one_after_confirming(train_tab, page):
    """After the run above was cancelled: its curve on the compare plot, then Delete asks, Keep keeps,
    Delete removes the run's row and folder."""
    url, workspace = train_tab
    page.goto(url)
    page.locator("#train-compare-box").get_by_text("Compare runs").click()
    page.locator("#train-compare input").click()
    page.get_by_role("option", name="1 · from the browser").click()
    page.keyboard.press("Escape")
    # the legend (SVG text) names the run
    page.wait_for_function("document.querySelector('#train-compare-plot').textContent.includes('1 · from the browser')")
    screenshot(page, "train_compare")

    page.locator("#train-run input").click()
    page.get_by_role("option", name="1 · from the browser").click()
    page.wait_for_function("document.querySelector('#train-summary').innerText.includes('Run 1')")
    page.locator("#train-delete").click()
    page.locator("#train-delete-question").get_by_text("Delete run 1").wait_for()
    screenshot(page, "train_delete_confirm")
    page.locator("#train-delete-no").click()
    page.wait_for_function("document.querySelector('#train-action').innerText.includes('Kept')")
    assert (workspace / "runs" / "run-0001").is_dir()

    page.locator("#train-delete").click()
    page.locator("#train-delete-yes").click()
    page.wait_for_function("document.querySelector('#train-action').innerText.includes('Run 1 deleted')")
    page.wait_for_function("!document.querySelector('#train-runs').innerText.includes('from the browser')")
    screenshot(page, "train_deleted")
    assert not (workspace / "runs" / "run-0001").exists()
