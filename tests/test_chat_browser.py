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


def open_chat(page, url):
    page.goto(url)
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_selector("#chat-input textarea")


def send(page, text: str, image=None):
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=120_000)
    if image is not None:
        page.set_input_files("#chat-input input[type=file]", str(image))
        page.wait_for_selector("#chat-input img, #chat-input .thumbnail-item", timeout=30_000)
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def pick(page, selector: str, value: str):
    box = page.locator(f"{selector} input")
    box.fill(value)
    box.press("Enter")


def test_the_tab_says_what_the_default_model_understands(workbench_url, page):
    """Issue 20.13: nobody takes the tiny default for a general VLM."""
    open_chat(page, workbench_url)
    assert "shapes scenes" in page.inner_text("#chat-model-note")


def test_a_model_that_cannot_load_marks_the_message_failed(workbench_url, page, scene_png, tmp_path):
    """Issue 20.15: the message gets a 'not answered' reply of its own, the next message is not merged
    into it, and the failed message can be removed; 20.16: a missing path is named as such."""
    import shutil

    again = shutil.copy(scene_png, tmp_path / "again.png")  # the file input only notices a new file
    open_chat(page, workbench_url)
    pick(page, "#chat-model", "/no/such/model")
    send(page, "Which shape is blue?", scene_png)
    page.wait_for_selector("#chat-a:has-text('Not answered')", timeout=60_000)
    assert "not found: /no/such/model" in page.inner_text("#chat-a")
    screenshot(page, "chat-failed-turn")
    pick(page, "#chat-model", "default")
    send(page, "Which shape is blue?", again)
    wait_for_reply(page, "The blue shape is a circle.")
    bubbles = page.locator("#chat-a .message-row").count()
    assert bubbles == 4, bubbles  # question, failure, question, answer: no merged user turns
    page.click("#chat-remove-failed")
    page.wait_for_function("() => !document.querySelector('#chat-a').innerText.includes('Not answered')",
                           timeout=30_000)
    assert "The blue shape is a circle." in page.inner_text("#chat-a")


@pytest.fixture(scope="module")
def long_winded_model(tmp_path_factory):
    """The default VLM with `min_new_tokens` in its generation config: every reply runs to the token
    limit (seconds), so a Stop always lands while the model is still answering."""
    import json
    import shutil

    from workbench.ui.context import DEFAULT_VLM

    model = shutil.copytree(DEFAULT_VLM, tmp_path_factory.mktemp("slow") / "model")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"min_new_tokens": 1024}))
    return model


def test_stop_says_the_reply_stopped(workbench_url, page, scene_png, long_winded_model):
    """Issue 20.14: after Stop the status no longer says the model is answering, and the reply stops
    growing (the generation ended, not just its display)."""
    open_chat(page, workbench_url)
    pick(page, "#chat-model", str(long_winded_model))
    page.get_by_text("Decoding", exact=True).click()
    tokens = page.locator("#chat-max-new-tokens input[type=number]")
    tokens.fill("1024")
    tokens.press("Enter")
    send(page, "Describe the picture.", scene_png)
    page.wait_for_selector("#chat-status:has-text('is answering')", timeout=60_000)
    page.locator("#chat-input button.stop-button, #chat-input button[aria-label*='top' i]").first.click()
    page.wait_for_selector("#chat-status:has-text('Stopped')", timeout=30_000)
    reply = page.inner_text("#chat-a")
    page.wait_for_timeout(2000)
    assert "is answering" not in page.inner_text("#chat-status")
    assert page.inner_text("#chat-a") == reply, "the reply kept growing after Stop"
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=30_000)


def test_a_run_finished_after_the_page_opened_is_offered(workbench_url, workbench_workspace, page):
    """Issue 20.17: opening the Chat tab lists the runs that finished since, without '↻ runs'."""
    import shutil

    from workbench.ui.context import DEFAULT_VLM

    page.goto(workbench_url)
    page.get_by_role("tab", name="Chat").wait_for()
    run = workbench_workspace / "runs" / "run-late"
    (run / "model").mkdir(parents=True)
    shutil.copy(DEFAULT_VLM / "config.json", run / "model" / "config.json")
    try:
        page.get_by_role("tab", name="Chat").click()
        page.wait_for_timeout(1500)
        page.locator("#chat-model input").click()
        page.wait_for_selector("ul[role=listbox] li:has-text('run: run-late')", timeout=15_000)
    finally:
        shutil.rmtree(run)


def test_regenerate_edit_roles_annotate_and_compare(workbench_url, workbench_workspace, page, scene_png):
    """Issue 20.19: the tab's other controls, each doing what it says."""
    open_chat(page, workbench_url)
    send(page, "Which shape is blue?", scene_png)
    wait_for_reply(page, "The blue shape is a circle.")
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=120_000)
    # regenerate: the reply is produced again (greedy: the same), not appended
    page.click("#chat-retry")
    page.wait_for_timeout(500)
    wait_for_reply(page, "The blue shape is a circle.")
    page.wait_for_function("() => document.querySelector('#chat-status').innerText.trim() === ''", timeout=60_000)
    assert page.inner_text("#chat-a").count("The blue shape is a circle.") == 1
    # per-turn role: turn 0 marked noise shows in the conversation and the table
    page.get_by_text("Turns, roles and settings").click()
    page.locator("#chat-turn-role").get_by_text("noise", exact=True).click()
    page.click("#chat-apply-role")
    page.wait_for_selector("#chat-a:has-text('[noise]')", timeout=30_000)
    # send to Annotate: a dataset in the store
    page.locator("#chat-dataset textarea, #chat-dataset input").first.fill("from-chat")
    page.click("#chat-to-annotate")
    page.wait_for_selector("#chat-status:has-text('Saved the conversation to dataset')", timeout=30_000)
    page.click("#chat-to-annotate")  # the same conversation again: the store has it already, and says so
    page.wait_for_selector("#chat-status:has-text('Already there')", timeout=30_000)
    from workbench.store import Store

    with Store(workbench_workspace / "workbench.db") as store:
        assert store.conversation_ids("from-chat")
    # edit the last message: it comes back into the box, its turn and reply leave the conversation
    page.click("#chat-edit")
    page.wait_for_function("() => document.querySelector('#chat-input textarea').value === 'Which shape is blue?'",
                           timeout=30_000)
    assert "The blue shape is a circle." not in page.inner_text("#chat-a")
    # compare: a second model answers the same message beside the first
    pick(page, "#chat-compare", "default")
    page.wait_for_selector("#chat-b", state="visible", timeout=30_000)
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_function("() => document.querySelector('#chat-b').innerText.includes('The blue shape is a circle.')",
                           timeout=120_000)
    wait_for_reply(page, "The blue shape is a circle.")
    screenshot(page, "chat-compare")
    # prefer the second answer: saved as a preference pair in the named dataset, once
    page.locator("#chat-pairs textarea, #chat-pairs input").first.fill("chat-prefs")
    page.click("#chat-prefer-b")
    page.wait_for_selector("#chat-status:has-text('Saved the pair (the second answer preferred)')", timeout=30_000)
    screenshot(page, "chat-preference-saved")
    page.click("#chat-prefer-b")
    page.wait_for_selector("#chat-status:has-text('Already there')", timeout=30_000)
    with Store(workbench_workspace / "workbench.db") as store:
        (pair_id,) = store.conversation_ids("chat-prefs")
        saved = store.conversation(pair_id)
        assert saved.extra["chosen"]["value"] == saved.extra["rejected"]["value"] == "The blue shape is a circle."
