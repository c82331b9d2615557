"""Issue 19.1 and 19.7 in headless Chromium on `python app.py --auth ... --allow-path DIR`: the Train tab of a
server that others can reach refuses a dataset or base model outside the workspace and the allowed folder,
and an output_dir in "More keys" (the run manager picks the folder); a dataset in the allowed folder passes."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, free_port, running_server, screenshot, TINY_DATASET

pytestmark = [pytest.mark.browser, pytest.mark.slow]

USER, PASSWORD = "ada", "lovelace"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workspace, shared, outside = (tmp_path_factory.mktemp(name) for name in ("ws", "shared", "outside"))
    for folder in (shared, outside):
        (folder / "data.json").write_text(TINY_DATASET)
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workspace),
               "--auth", f"{USER}:{PASSWORD}", "--allow-path", str(shared)]
    with running_server(command, port, workspace / "server.log") as url:
        yield url, workspace, shared, outside


def preview_message(page, dataset: str, base_model: str = "default", extra: str = "") -> str:
    page.locator("#train-dataset textarea").fill(dataset)
    page.locator("#train-base-model textarea").fill(base_model)
    page.locator("#train-extra textarea").fill(extra)
    # the message's text (not its progress timer) and the config shown, once the preview has answered
    shown = "() => document.querySelector('#train-message [data-testid=markdown]').innerText.trim() + '|' +" \
            " document.querySelector('#train-config').innerText + '|' +" \
            " !!document.querySelector('#train-message [data-testid=status-tracker].hide')"
    before = page.evaluate(shown)
    page.locator("#train-preview").click()
    page.wait_for_function(f"({shown})() !== {json.dumps(before)}", timeout=60_000)  # each answer differs
    page.wait_for_function(f"({shown})().endsWith('|true')", timeout=60_000)
    return page.locator("#train-message [data-testid=markdown]").inner_text().strip()


def log_in(page, url):
    page.goto(url)
    page.wait_for_selector("input[type=password]", timeout=120_000)
    page.fill("input[type=text]", USER)
    page.fill("input[type=password]", PASSWORD)
    page.keyboard.press("Enter")


def test_a_shared_servers_train_tab_reads_only_the_workspace_and_the_allowed_folder(server, page):
    url, workspace, shared, outside = server
    log_in(page, url)
    page.get_by_role("tab", name="Train").click(timeout=120_000)
    for dataset, base_model in [("/etc/passwd", "default"), (str(outside / "data.json"), "default"),
                                ("../" * 8 + "etc/passwd", "default"), (str(shared / "data.json"), str(outside))]:
        message = preview_message(page, dataset, base_model)
        assert "outside the workspace" in message and "--allow-path" in message, (dataset, base_model, message)
    screenshot(page, "train-path-refused")
    message = preview_message(page, str(shared / "data.json"), extra=json.dumps({"output_dir": "/tmp/x"}))
    assert "output_dir is chosen by the run manager" in message, message
    screenshot(page, "train-output-dir-refused")
    assert preview_message(page, str(shared / "data.json")) == ""
    assert f'"dataset": "{shared / "data.json"}"' in page.locator("#train-config .cm-content").inner_text()
    screenshot(page, "train-allowed-folder")


def test_a_shared_servers_masks_and_chat_tabs_load_no_model_from_outside(server, page):
    """The Masks tab's tokenizer and the Chat tab's model follow the same rule: a folder outside is refused
    in the tab, with the reason on screen."""
    url, workspace, shared, outside = server
    log_in(page, url)
    page.get_by_role("tab", name="Masks & Attention").click(timeout=120_000)
    page.get_by_role("tab", name="HSA mask", exact=True).click()
    page.fill("#mask-model textarea, #mask-model input", str(outside))
    page.click("#mask-show")
    page.wait_for_selector("#mask-status:has-text('outside the workspace')", timeout=60_000)
    assert "Cannot show this conversation: model" in page.inner_text("#mask-status")
    screenshot(page, "masks-model-refused")
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-model input").fill(str(outside))
    page.locator("#chat-model input").press("Enter")
    page.locator("#chat-input textarea").fill("What color is the circle?")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_selector("#chat-status:has-text('outside the workspace')", timeout=60_000)
    assert f"Cannot load {outside}: model" in page.inner_text("#chat-status")
    screenshot(page, "chat-model-refused")
