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


def wait_for_reply(page, text: str) -> None:
    """Streams arrive piece by piece: wait for the whole expected answer (it fails if another comes)."""
    page.wait_for_function(f"() => document.querySelector('#chat-a').innerText.includes({text!r})", timeout=120_000)


def test_multi_turn_chat_with_an_image(workbench_url, page, scene_png):
    page.goto(workbench_url)
    page.get_by_role("tab", name="Chat").click()
    page.set_input_files("#chat-input input[type=file]", str(scene_png))
    page.wait_for_selector("#chat-input img, #chat-input .thumbnail-item", timeout=30_000)
    page.locator("#chat-input textarea").fill("Which shape is blue?")
    page.locator("#chat-input textarea").press("Enter")
    wait_for_reply(page, "The blue shape is a circle.")
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=120_000)
    assert "The blue shape is a circle." in page.inner_text("#chat-a")
    screenshot(page, "chat-first-answer")
    # a follow-up that only makes sense with the history
    page.locator("#chat-input textarea").fill("And the yellow one?")
    page.locator("#chat-input textarea").press("Enter")
    wait_for_reply(page, "The yellow shape is a square.")
    assert "The yellow shape is a square." in page.inner_text("#chat-a")
    screenshot(page, "chat-follow-up")
    # an empty message is refused with a message, and the conversation stays
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=120_000)
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_selector("#chat-status:has-text('the message is empty')", timeout=30_000)
    assert "The yellow shape is a square." in page.inner_text("#chat-a")


def test_chat_is_scriptable_with_gradio_client(workbench_url, scene_png):
    from gradio_client import Client, handle_file

    client = Client(workbench_url, verbose=False)
    reply = client.predict({"text": "Which shape is yellow?", "files": [handle_file(str(scene_png))]},
                           api_name="/chat")
    assert reply == "The yellow shape is a square."
    # optional history, model and decoding settings
    short = client.predict({"text": "What color is the square?", "files": [handle_file(str(scene_png))]},
                           [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Okay."}],
                           "default", {"max_new_tokens": 2}, api_name="/chat")
    from models.vlm import load_processor
    from workbench.ui.context import DEFAULT_VLM

    tokenizer = load_processor(str(DEFAULT_VLM)).tokenizer
    assert 1 <= len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2


@pytest.mark.parametrize("name", ["composed", "hybrid", "hybrid-pruned"])
def test_each_embedded_model_answers_held_out_questions_through_chat(workbench_url, tmp_path, name):
    """Held-out shapes scenes through `/chat` (upload, queue, streaming): the composed VLM and the
    hybrid, unpruned and pruned, as the Chat tab offers them."""
    from gradio_client import Client, handle_file

    from models.zoo import EMBEDDED
    from models.zoo.evaluate import held_out

    if not (EMBEDDED[name] / "config.json").is_file():
        pytest.skip(f"the embedded {name} model is not built")
    client = Client(workbench_url, verbose=False)
    asked = right = 0
    for k, sample in enumerate(held_out(6, seed=7)):
        turns = sample.record["conversations"]
        path = tmp_path / f"scene{k}.png"
        sample.record["images"][0].save(path)
        question, answer = turns[0]["value"].replace("<image>", ""), turns[1]["value"]
        reply = client.predict({"text": question, "files": [handle_file(str(path))]}, [], name, {}, api_name="/chat")
        asked, right = asked + 1, right + (reply.strip() == answer)
    assert right >= asked - 1, f"{name}: {right} of {asked} right"
