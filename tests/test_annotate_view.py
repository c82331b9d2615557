"""The Annotate tab's token view and its behaviour apart from Gradio: the modules import without it, a
view renders and reads selections back from plain values, the browser script triggers exactly the events
the tab listens to, and a custom event's data reaches a handler through gr.EventData's public attributes."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from models.data.align import Span, Turn
from models.hsa import GLOBAL, LANDMARK, NOISE
from workbench.ui.annotate_view import (TokenView, page_of_turn, render_view, selection_from_browser, view_pages,
                                        word_view)

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "workbench" / "ui"


def conversation(*texts, spans=()):
    turns = [Turn("user" if i % 2 == 0 else "assistant", text, GLOBAL if i % 2 == 0 else LANDMARK)
             for i, text in enumerate(texts)]
    for turn, start, end, role in spans:
        turns[turn].spans.append(Span(start, end, role))
    return SimpleNamespace(id=7, version=3, turns=turns)


def test_the_token_view_and_the_annotator_import_without_gradio():
    code = ("import sys, workbench.ui.annotate_view, workbench.ui.annotator, workbench.ui.events; "
            "print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_word_view_renders_roles_offsets_and_turn_buttons_without_a_tokenizer():
    conv = conversation("a 🙂 b", "yes", spans=[(0, 2, 3, NOISE)])
    view = word_view(conv)
    assert view.tokens == ["a ", "🙂 ", "b", "yes"] and view.turn_index == [0, 0, 0, 1]  # words and their spaces
    assert view.roles == [GLOBAL, NOISE, GLOBAL, LANDMARK]
    page = render_view(conv, view)
    assert 'data-conv="7" data-version="3" data-page="0"' in page
    # "b" follows an astral character: its UTF-16 offsets are one more than its code points
    assert 'data-t="0" data-a="5" data-b="6">b</span>' in page
    assert 'class="tok r2 sp"' in page  # the emoji carries its span's role and the span mark
    assert page.count('class="tb r') == 3 * len(conv.turns)  # whole-turn buttons: one per role and turn


def test_a_browser_selection_reads_back_in_code_points_and_refuses_what_is_not_a_selection():
    conv = conversation("a 🙂 b")
    view = word_view(conv)
    assert selection_from_browser(conv, view, {"turn": 0, "a": 5, "b": 6}) == (0, 4, 5)
    assert selection_from_browser(conv, view, {"turn": 0, "a": 2, "b": 3}) == (0, 2, 4)  # half the emoji: all of it
    for bad in ({}, {"turn": "x", "a": 0, "b": 1}, {"turn": 3, "a": 0, "b": 1}, {"turn": 0, "a": 1, "b": 1}):
        try:
            selection_from_browser(conv, view, bad)
        except Exception as e:  # noqa: BLE001
            assert type(e).__name__ == "StoreError", (bad, e)
        else:
            raise AssertionError(f"{bad} was taken as a selection")


def test_blank_and_combining_tokens_stay_visible_and_clickable():
    conv = conversation("x")
    view = TokenView(tokens=["\u0301", "  ", "\n", "<b>"], turn_index=[0, 0, 0, -1], char_spans=[None] * 4,
                     roles=[GLOBAL] * 4, source="t")
    page = render_view(conv, view)
    assert "◌\u0301" in page and "\u00b7\u00b7" in page and "↵\n" in page and "&lt;b&gt;" in page
    assert "generation prompt" in page


def test_pages_of_an_empty_conversation_and_a_turn_out_of_range():
    conv = conversation()
    view = word_view(conv)
    assert view_pages(view, 0) == [[]]
    assert 'class="hsa-annot"' in render_view(conv, view)
    pages = view_pages(word_view(conversation(*["w"] * 5)), 5, turns_per_page=2)
    assert pages == [[(0, 0, 1), (1, 0, 1)], [(2, 0, 1), (3, 0, 1)], [(4, 0, 1)]]
    assert [page_of_turn(pages, t) for t in (-3, 0, 3, 4, 99)] == [0, 0, 1, 2, 2]


def test_the_browser_script_triggers_exactly_the_events_the_tab_listens_to():
    script = (UI / "annotate.js").read_text()
    triggered = set(re.findall(r"'(hsa_\w+)'", script))  # (Gradio finds a custom event by its quoted name too)
    wiring = (UI / "annotate.py").read_text()
    listened = set(re.findall(r"view\.(hsa_\w+)\(", wiring))
    listened |= {f"hsa_{kind}" for kind in re.search(r'for kind in \(([^)]*)\)', wiring).group(1)
                 .replace('"', "").replace(" ", "").split(",") if kind}
    assert triggered == listened == {"hsa_label", "hsa_clear", "hsa_turn_role", "hsa_undo", "hsa_redo",
                                     "hsa_select", "hsa_page"}
    assert "evt._data" not in wiring and "root_block" not in wiring


def test_a_custom_events_data_reaches_a_handler_through_public_attributes():
    import gradio as gr

    from workbench.ui.events import event_payload

    sent = gr.EventData(None, {"turn": 1, "a": 0, "b": 3, "k1": 2, "k2": 4, "role": NOISE})
    assert event_payload(sent, "turn", "a", "b", "role", "page") == {"turn": 1, "a": 0, "b": 3, "role": NOISE}
    assert event_payload(gr.EventData(None, {}), "turn") == {}
    assert event_payload(gr.EventData(None, None), "turn") == {}  # a trigger without data
