"""The Chat tab in headless Chromium on the embedded default model, and its scripting API."""
import pytest

from conftest import screenshot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    from models.zoo.shapes import Scene, Shape, draw_scene

    path = tmp_path_factory.mktemp("chat") / "scene.png"
    draw_scene(Scene((Shape("circle", "blue", "top left"), Shape("square", "yellow", "bottom right")), seed=5)
               ).save(path)
    return path


def last_reply(page) -> str:
    return page.locator("#chat-a .message-row.bot-row, #chat-a [data-testid='bot']").last.inner_text()


def test_multi_turn_chat_with_an_image(workbench_url, page, scene_png):
    page.goto(workbench_url)
    page.get_by_role("tab", name="Chat").click()
    page.set_input_files("#chat-input input[type=file]", str(scene_png))
    page.wait_for_selector("#chat-input img, #chat-input .thumbnail-item", timeout=30_000)
    page.locator("#chat-input textarea").fill("What color is the circle?")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#chat-a').innerText.includes('The circle is')",
                           timeout=120_000)
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=120_000)
    assert "The circle is blue." in page.inner_text("#chat-a")
    screenshot(page, "chat-first-answer")
    # a follow-up that only makes sense with the history
    page.locator("#chat-input textarea").fill("And the square?")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#chat-a').innerText.includes('The square is')",
                           timeout=120_000)
    assert "The square is yellow." in page.inner_text("#chat-a")
    screenshot(page, "chat-follow-up")
    # an empty message is refused with a message, and the conversation stays
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=120_000)
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_selector("#chat-status:has-text('the message is empty')", timeout=30_000)
    assert "The square is yellow." in page.inner_text("#chat-a")


def test_chat_is_scriptable_with_gradio_client(workbench_url, scene_png):
    from gradio_client import Client, handle_file

    client = Client(workbench_url, verbose=False)
    reply = client.predict({"text": "What color is the square?", "files": [handle_file(str(scene_png))]},
                           api_name="/chat")
    assert reply == "The square is yellow."
    # optional history, model and decoding settings
    short = client.predict({"text": "What color is the square?", "files": [handle_file(str(scene_png))]},
                           [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Okay."}],
                           "default", {"max_new_tokens": 2}, api_name="/chat")
    from models.vlm import load_processor
    from workbench.ui.context import DEFAULT_VLM

    tokenizer = load_processor(str(DEFAULT_VLM)).tokenizer
    assert 1 <= len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2
