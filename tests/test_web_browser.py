"""Issue 19.3-19.6 in headless Chromium on `python app.py --auth`: with the narrowed served paths, the
middleware and the login backoff, the login page says to wait after too many wrong passwords, and the
pages still show what they need (the Annotate tab's images, the mask PNG, the Attention example's image)."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT, free_port, running_server, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]

USER, PASSWORD = "ada", "lovelace"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from workbench.store import Store, import_file

    workspace = tmp_path_factory.mktemp("ws")
    with Store(workspace / "workbench.db") as store:
        assert import_file(store, ROOT / "annotations" / "examples" / "shapes_examples.json").stored == 24
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace", str(workspace),
               "--auth", f"{USER}:{PASSWORD}"]
    with running_server(command, port, workspace / "server.log") as url:
        yield url


def log_in(page, password):
    page.fill("input[type=text]", USER)
    page.fill("input[type=password]", password)
    page.keyboard.press("Enter")


def loaded_images(page) -> list:
    """Natural widths of the page's images served by the workbench (0: did not load)."""
    return page.evaluate("""() => [...document.querySelectorAll('img')]
        .filter(i => i.src.includes('/gradio_api/file=')).map(i => i.complete ? i.naturalWidth : -1)""")


def test_login_backoff_and_the_pages_images(server, page):
    page.goto(server)
    page.wait_for_selector("input[type=password]", timeout=60_000)
    for _ in range(6):
        log_in(page, "guess")
        page.wait_for_timeout(150)
    # Gradio's page says "Incorrect credentials" for any refusal; the workbench's message says why
    page.wait_for_selector("text=/Incorrect credentials/i", timeout=10_000)
    assert "logins from your address are refused" in page.inner_text("body")
    refused = page.request.post(f"{server}/login", form={"username": USER, "password": PASSWORD})
    assert refused.status == 429 and "try again in" in refused.text()
    screenshot(page, "web-login-backoff")
    page.wait_for_timeout(2_500)  # the wait after 6 failures is 2 s
    log_in(page, PASSWORD)
    page.get_by_role("tab", name="Annotate").wait_for(timeout=60_000)

    # Annotate: the conversation's image, from the store's image folder
    page.wait_for_function("""() => [...document.querySelectorAll('img')].some(
        i => i.src.includes('/gradio_api/file=') && i.complete && i.naturalWidth > 0)""", timeout=60_000)
    assert loaded_images(page) and all(w > 0 for w in loaded_images(page)), loaded_images(page)
    screenshot(page, "web-annotate-image")

    # Masks: the mask's PNG is a download
    page.get_by_role("tab", name="Masks & Attention").click()
    page.get_by_role("tab", name="HSA mask", exact=True).click()
    page.get_by_role("button", name="Example: ShareGPT JSON").click()
    page.wait_for_selector("#mask-status:has-text('causal query')", timeout=90_000)
    link = page.locator("a[href*='/gradio_api/file='][href$='.png']").first
    link.wait_for(timeout=30_000)
    png = page.request.get(link.get_attribute("href"))
    assert png.status == 200 and png.body()[:4] == b"\x89PNG"

    # Attention: the example's image is offered as an upload
    page.get_by_role("tab", name="Attention", exact=True).click()
    page.locator("text=Images named in the JSON >> visible=true").first.click()
    page.wait_for_selector("text=attention-scene.png", timeout=30_000)
    screenshot(page, "web-attention-example-upload")
