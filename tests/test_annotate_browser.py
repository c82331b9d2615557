"""The Annotate tab in headless Chromium: label by keyboard and find it after a reload, offsets of
emoji selected in the browser, and a stale save from a second tab refused."""
from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from conftest import ROOT, free_port, running_server, screenshot, shapes_png, tiny_qwen2vl
from models.zoo.processor import build_processor
from models.hsa import LANDMARK, NOISE
from workbench.store import Store, import_file

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHAPES = [
    {"system": "You answer questions about the image. Ignore chit-chat.", "images": ["red.png"],
     "conversations": [
         {"from": "human", "value": "<image>What colour is the circle?"},
         {"from": "gpt", "value": "The circle is red.", "semantic_type": "LANDMARK"},
         {"from": "human", "value": "I think the circle is green, my friend told me. 这个圆 🙂👍🏽 e\u0301!",
          "semantic_type": "NOISE"},
         {"from": "human", "value": "How many shapes are there?"},
         {"from": "gpt", "value": "There is one shape.", "semantic_type": "LANDMARK"}]},
    {"conversations": [{"from": "human", "value": "Is the square blue?"},
                       {"from": "gpt", "value": "There is no square.", "semantic_type": "LANDMARK"}]},
    # conversation 3: long enough that the token view comes in pages (issue 19.11)
    {"conversations": [{"from": "human" if t % 2 == 0 else "gpt", "value": f"Turn {t}: the circle is red, not green."}
                       for t in range(2000)]},
]

LAUNCHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import gradio as gr
    from workbench.ui import annotate
    from workbench.ui.context import AppContext

    ctx = AppContext.create({workspace!r}, default_model={model!r})
    with gr.Blocks(title="annotate") as demo:
        with gr.Tab("Annotate"):
            annotate.build(ctx, demo)
    demo.queue().launch(server_port={port}, allowed_paths=[str(ctx.workspace)])
""")


@pytest.fixture(scope="module")
def annotate_app(tmp_path_factory):
    """The tab in a small Blocks of its own, on a free port, over a workspace with a dataset."""
    workspace = tmp_path_factory.mktemp("annotate-ws")
    # a real (tiny, untrained) Qwen2-VL with the default model's processor: image tokens and all
    processor = build_processor()
    processor.save_pretrained(workspace / "tok")
    tiny_qwen2vl(processor).save_pretrained(workspace / "tok")
    data = workspace / "uploads"
    data.mkdir(exist_ok=True)
    shapes_png(data / "red.png")
    (data / "shapes.json").write_text(json.dumps(SHAPES, ensure_ascii=False), encoding="utf-8")
    db = workspace / "workbench.db"
    with Store(db) as store:
        assert not import_file(store, data / "shapes.json").errors
    port = free_port()
    script = workspace / "launch.py"
    script.write_text(LAUNCHER.format(root=str(ROOT), workspace=str(workspace), model=str(workspace / "tok"),
                                      port=port))
    with running_server([sys.executable, str(script)], port, workspace / "server.log") as url:
        yield url, db


def open_tab(page, url):
    page.goto(url)
    page.locator("#annotate-view .tok").first.wait_for(timeout=60_000)


def utf16(text: str, i: int) -> int:
    return len(text[:i].encode("utf-16-le")) // 2


def covering(page, turn: int, text: str, target: str):
    """The first and last token elements of `turn` that cover `target` (found by their UTF-16
    offsets, since a tokenizer may split a word)."""
    start = text.index(target)
    a, b = utf16(text, start), utf16(text, start + len(target))
    tokens = page.locator(f'#annotate-view .tok[data-t="{turn}"]')
    hits = [k for k, t in enumerate(tokens.all())
            if int(t.get_attribute("data-a")) < b and int(t.get_attribute("data-b")) > a]
    assert hits, f"no token covers {target!r}"
    return tokens.nth(hits[0]), tokens.nth(hits[-1])


def select(page, turn: int, text: str, target: str):
    first, last = covering(page, turn, text, target)
    first.click()
    if last != first:
        last.click(modifiers=["Shift"])
    wait_status(page, f"Selected turn {turn}")


def wait_status(page, text: str):
    page.locator("#annotate-status", has_text=text).wait_for(timeout=30_000)


def spans_of(db, turn: int):
    with Store(db) as store:
        conv = store.conversation(store.conversation_ids("shapes")[0])
        return conv, conv.turns[turn].spans


def test_label_a_span_by_keyboard_and_find_it_after_a_reload(page, annotate_app):
    url, db = annotate_app
    open_tab(page, url)
    screenshot(page, "annotate-open")
    # select "green" .. "friend" in turn 3 by click and shift-click: a preview, nothing saved yet
    text = spans_of(db, 3)[0].turns[3].text
    select(page, 3, text, "green, my friend")
    assert page.locator("#annotate-view .tok.sel").count() >= 3
    screenshot(page, "annotate-selection-preview")
    assert spans_of(db, 3)[1] == []
    page.keyboard.press("2")
    wait_status(page, "Saved")
    conv, spans = spans_of(db, 3)
    assert len(spans) == 1 and spans[0].role == LANDMARK
    labelled = text[spans[0].start:spans[0].end]
    assert "green" in labelled and "friend" in labelled and "circle is" not in labelled
    screenshot(page, "annotate-labelled")
    page.reload()
    page.locator("#annotate-view .tok").first.wait_for(timeout=60_000)
    first, last = covering(page, 3, text, "green, my friend")
    assert "r1" in first.get_attribute("class") and "r1" in last.get_attribute("class")
    assert "sp" in last.get_attribute("class")


def test_emoji_and_combining_characters_selected_in_the_browser_land_on_those_characters(page, annotate_app):
    url, db = annotate_app
    open_tab(page, url)
    conv, _ = spans_of(db, 3)
    text = conv.turns[3].text
    # the tokens of "🙂👍🏽" (a byte-level BPE may split one emoji into several tokens)
    select(page, 3, text, "🙂👍🏽")
    page.keyboard.press("3")
    wait_status(page, "Saved")
    conv, spans = spans_of(db, 3)
    noise = [s for s in spans if s.role == NOISE]
    assert len(noise) == 1
    assert text[noise[0].start:noise[0].end].strip() == "🙂👍🏽"  # no more, no less (the space before may join)
    # and the combining accent: é is two code points, one character on screen
    select(page, 3, text, "e\u0301")
    page.keyboard.press("1")
    wait_status(page, "→ global")
    conv, spans = spans_of(db, 3)
    globals_ = [text[s.start:s.end] for s in spans if s.role == 0]
    assert len(globals_) == 1 and "e\u0301" in globals_[0] and len(globals_[0].strip()) <= 3
    screenshot(page, "annotate-unicode")
    # undo by keyboard takes the last label back
    page.keyboard.press("Control+z")
    wait_status(page, "Undone")
    assert [s for s in spans_of(db, 3)[1] if s.role == 0] == []


def test_a_stale_save_from_a_second_tab_is_refused(browser, annotate_app):
    url, db = annotate_app
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        first, second = context.new_page(), context.new_page()
        open_tab(first, url)
        open_tab(second, url)
        before, _ = spans_of(db, 1)
        text = before.turns[1].text
        select(first, 1, text, "colour")
        first.keyboard.press("3")
        wait_status(first, "Saved")
        # the second tab still shows the old version
        select(second, 1, text, "circle")
        second.keyboard.press("2")
        wait_status(second, "Not saved")
        screenshot(second, "annotate-stale-refused")
        conv, spans = spans_of(db, 1)
        assert conv.version == before.version + 1
        labelled = [conv.turns[1].text[s.start:s.end] for s in spans]
        assert len(spans) == 1 and spans[0].role == NOISE and "colour" in labelled[0]
        # the refused tab now shows the newer version, so a retry is saved
        assert "r2" in covering(second, 1, text, "colour")[0].get_attribute("class")
        select(second, 1, text, "circle")
        second.keyboard.press("2")
        wait_status(second, "Saved")
        assert len(spans_of(db, 1)[1]) == 2
    finally:
        context.close()


def test_a_2000_turn_conversation_opens_in_pages_and_labels_on_a_later_page(page, annotate_app):
    url, db = annotate_app
    open_tab(page, url)
    view = page.locator("#annotate-view")
    started = time.perf_counter()
    page.locator("#annotate-jump input").fill("3")
    page.locator("#annotate-jump input").press("Enter")
    view.locator(".pager", has_text="of 2000").wait_for(timeout=60_000)
    opened = time.perf_counter() - started
    size = view.locator(".hsa-annot").evaluate("e => e.outerHTML.length")
    print(f"2000 turns opened in {opened:.1f} s, {size / 1e3:.0f} kB of HTML")
    assert size < 250_000 and 1 <= view.locator(".turn").count() <= 40
    assert view.locator('.turn[data-t="0"]').count() == 1 and view.locator('.turn[data-t="1999"]').count() == 0
    screenshot(page, "annotate-long-first-page")
    # the next page, by its button and by the ] key
    view.locator("button.pg[title^='next']").click()
    view.locator('.hsa-annot[data-page="1"]').wait_for(timeout=30_000)
    assert view.locator('.turn[data-t="0"]').count() == 0
    page.keyboard.press("]")
    view.locator('.hsa-annot[data-page="2"]').wait_for(timeout=30_000)
    # a turn far away by its number, then a label there by keyboard: saved, and the page stays
    view.locator("input.goto").fill("1234")
    view.locator("input.goto").press("Enter")
    view.locator('.turn[data-t="1234"]').wait_for(timeout=30_000)
    page.wait_for_function("() => { const r = document.querySelector('#annotate-view .turn[data-t=\\'1234\\']')"
                           ".getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight; }",
                           timeout=10_000)  # scrolled into view
    with Store(db) as store:
        cid = store.conversation_ids("shapes")[2]
        text = store.conversation(cid).turns[1234].text
    first, last = covering(page, 1234, text, "green")
    first.click()
    if last != first:
        last.click(modifiers=["Shift"])
    wait_status(page, "Selected turn 1234")
    page.keyboard.press("3")  # (the "turn #" box had the focus: a click on a token leaves it)
    wait_status(page, "Saved")
    assert view.locator('.turn[data-t="1234"]').count() == 1
    assert "r2" in covering(page, 1234, text, "green")[0].get_attribute("class")
    with Store(db) as store:
        spans = store.conversation(cid).turns[1234].spans
    assert len(spans) == 1 and spans[0].role == NOISE and "green" in text[spans[0].start:spans[0].end]
    screenshot(page, "annotate-long-labelled-page")
