"""The Annotate tab's dataset handling in headless Chromium (issue 20): import a .zip of records and
images, the status line and counter agree, the conversation list opens a conversation on click, a
reload comes back to the dataset and conversation in use, a failed import keeps the dataset
dropdown, rename and delete (with confirmation and a backup)."""
from __future__ import annotations

import json
import sys
import zipfile

import pytest

from conftest import ROOT, free_port, running_server, screenshot
from test_annotate_browser import LAUNCHER
from workbench.store import Store, import_records

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXAMPLES = ROOT / "annotations" / "examples"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The tab over a workspace holding one small dataset "other"; yields (url, db, folder of files)."""
    from models.zoo.processor import build_processor

    workspace = tmp_path_factory.mktemp("manage-ws")
    build_processor().save_pretrained(workspace / "tok")
    db = workspace / "workbench.db"
    with Store(db) as store:
        import_records(store, "other", [("r", {"conversations": [{"from": "human", "value": "Is the square blue?"},
                                                                 {"from": "gpt", "value": "No."}]})])
    files = tmp_path_factory.mktemp("files")
    with zipfile.ZipFile(files / "shapes.zip", "w") as z:
        z.write(EXAMPLES / "shapes_examples.json", "shapes_examples.json")
        for image in sorted((EXAMPLES / "shapes_examples").iterdir()):
            z.write(image, f"shapes_examples/{image.name}")
    (files / "broken.json").write_text('[{"conversations": [', encoding="utf-8")
    port = free_port()
    script = workspace / "launch.py"
    script.write_text(LAUNCHER.format(root=str(ROOT), workspace=str(workspace), model=str(workspace / "tok"),
                                      port=port))
    with running_server([sys.executable, str(script)], port, workspace / "server.log") as url:
        yield url, db, files


def dataset_value(page) -> str:
    return page.locator("#annotate-dataset input").input_value()


def wait_text(page, selector: str, text: str, timeout: float = 60_000):
    try:
        page.locator(selector, has_text=text).first.wait_for(timeout=timeout)
    except Exception:
        raise AssertionError(f"{selector} never showed {text!r}; it shows {page.locator(selector).first.inner_text()!r}")


def where(page) -> str:
    return page.locator("#annotate-where textarea, #annotate-where input").first.input_value()


def wait_where(page, value: str):
    page.wait_for_function(
        "v => { const e = document.querySelector('#annotate-where textarea, #annotate-where input');"
        " return e && e.value === v; }", arg=value, timeout=60_000)


def upload(page, path):
    page.locator("#annotate-io").get_by_text("Import / export").first.click() \
        if not page.locator("#annotate-upload").is_visible() else None
    page.locator("#annotate-upload input[type=file]").set_input_files(str(path))
    wait_text(page, "#annotate-upload", path.name)
    page.locator("#annotate-import").click()


def test_import_a_zip_browse_the_list_and_come_back_after_a_reload(page, app):
    url, db, files = app
    page.goto(url)
    page.locator("#annotate-view .tok").first.wait_for(timeout=60_000)
    assert dataset_value(page) == "other"
    upload(page, files / "shapes.zip")
    wait_text(page, "#annotate-import-status", "Imported 24 of 24 records into shapes_examples")
    page.wait_for_function("() => document.querySelector('#annotate-dataset input').value === 'shapes_examples'",
                           timeout=60_000)
    wait_where(page, "1 / 24")
    # the examples carry roles: they count as labelled
    wait_text(page, "#annotate-progress", "24 / 24 conversations labelled (100%)")
    screenshot(page, "annotate-imported-zip")
    # the status line and the counter name the same conversation
    page.get_by_role("button", name="Next ▶").click()
    wait_where(page, "2 / 24")
    wait_text(page, "#annotate-status", "Conversation #2 ")
    # the list: number, first words, labelled, last editor; a click opens that conversation
    page.locator("#annotate-list").get_by_text("Conversations").first.click()
    table = page.locator("#annotate-table")
    wait_text(page, "#annotate-table", "▶ 2")
    wait_text(page, "#annotate-table", "🖼 Where is the circle?")  # the image placeholder shows as a picture
    wait_text(page, "#annotate-page", "page 1 of 2 · 24 conversations")
    screenshot(page, "annotate-list")
    # the list's pager turns pages (its handler was once shadowed by the token view's pager)
    page.locator("#annotate-list").get_by_role("button", name="page ▶").click()
    wait_text(page, "#annotate-page", "page 2 of 2 · 24 conversations")
    wait_text(page, "#annotate-table", "16")
    page.locator("#annotate-list").get_by_role("button", name="◀ page").click()
    wait_text(page, "#annotate-page", "page 1 of 2 · 24 conversations")
    table.get_by_text("Thanks for the help so far.").first.click()  # conversation 5
    wait_where(page, "5 / 24")
    wait_text(page, "#annotate-status", "Conversation #5 ")
    wait_text(page, "#annotate-table", "▶ 5")
    # a reload comes back to this dataset and this conversation, not the first dataset
    page.reload()
    page.locator("#annotate-view .tok").first.wait_for(timeout=60_000)
    wait_where(page, "5 / 24")
    assert dataset_value(page) == "shapes_examples"
    # malformed JSON: said so, and the dropdown keeps the dataset in use
    upload(page, files / "broken.json")
    wait_text(page, "#annotate-import-status", "Nothing imported: broken.json: malformed JSON")
    page.wait_for_timeout(1000)
    assert dataset_value(page) == "shapes_examples"
    assert "No dataset yet" not in page.locator("#annotate-progress").inner_text()
    assert "/tmp/" not in page.locator("#annotate-import-status").inner_text()
    screenshot(page, "annotate-import-failed")
    with Store(db) as store:
        assert sorted(d.name for d in store.datasets()) == ["other", "shapes_examples"]


def test_rename_then_delete_with_confirmation(page, app):
    url, db, files = app
    with Store(db) as store:
        if "shapes_examples" not in [d.name for d in store.datasets()]:
            pytest.skip("needs the import of the test above")
    page.goto(url)
    page.locator("#annotate-view .tok").first.wait_for(timeout=60_000)
    # a new browser (no remembered state) starts on the first dataset; choose the other one
    assert dataset_value(page) == "other"
    page.locator("#annotate-dataset input").click()
    page.get_by_role("option", name="shapes_examples").click()
    wait_where(page, "1 / 24")
    page.locator("#annotate-manage").get_by_text("Manage datasets").first.click()
    page.locator("#annotate-new-name textarea, #annotate-new-name input").first.fill("shapes")
    page.locator("#annotate-rename").click()
    wait_text(page, "#annotate-manage-status", "Renamed shapes_examples to shapes")
    page.wait_for_function("() => document.querySelector('#annotate-dataset input').value === 'shapes'",
                           timeout=30_000)
    # delete without typing the name: refused
    page.locator("#annotate-delete").click()
    wait_text(page, "#annotate-manage-status", "type the name shapes to confirm")
    page.locator("#annotate-confirm textarea, #annotate-confirm input").first.fill("shapes")
    page.locator("#annotate-delete").click()
    wait_text(page, "#annotate-manage-status", "Deleted shapes")
    page.wait_for_function("() => document.querySelector('#annotate-dataset input').value === 'other'",
                           timeout=30_000)
    page.locator("#annotate-io").get_by_text("Import / export").first.click()  # the backup is offered there
    wait_text(page, "#annotate-download", "shapes-sharegpt")
    screenshot(page, "annotate-deleted")
    with Store(db) as store:
        assert [d.name for d in store.datasets()] == ["other"]
