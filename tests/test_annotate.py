"""The Annotate tab's handlers without a browser: UTF-16 offsets, snapping to tokens, labelling,
stale saves, undo/redo, suggestions, navigation, import/export."""
from __future__ import annotations

import json
import re
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shapes_png
from models.hsa import GLOBAL, LANDMARK, NOISE
from models.data.align import Span, align_record
from workbench.store import Store, StoreError, import_records
from workbench.store.suggest import model_suggestions, rule_suggestions
from workbench.ui.annotate_view import (WORDS, TokenView, code_point_to_utf16, page_of_turn, render_view,
                                        selection_from_browser, snap, token_view, utf16_table, utf16_to_code_point,
                                        view_pages, word_view)
from workbench.ui.annotator import Annotator, progress_text

TRICKY = "红色的圆 🙂 👍🏽 e\u0301 👨‍👩‍👧 ok\nnext"


def utf16_len(text: str) -> int:  # an independent reference: what JavaScript's .length says
    return len(text.encode("utf-16-le")) // 2


@given(st.text(max_size=30))
@settings(max_examples=200)
def test_utf16_offsets_match_javascript_lengths(text):
    for i in range(len(text) + 1):
        assert code_point_to_utf16(text, i) == utf16_len(text[:i])
        assert utf16_to_code_point(text, utf16_len(text[:i])) == i


def test_an_offset_inside_a_surrogate_pair_rounds_down():
    text = "a🙂b"
    assert [utf16_to_code_point(text, o) for o in range(5)] == [0, 1, 1, 2, 3]


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "w.db") as s:
        yield s


def add(store, *records, dataset="d"):
    report = import_records(store, dataset, [(f"record {i}", r) for i, r in enumerate(records)])
    assert not report.errors, report.errors
    return report.conversation_ids


def rec(user=TRICKY, answer="The circle is red.", system=None):
    r = {"conversations": [{"from": "human", "value": user},
                           {"from": "gpt", "value": answer, "semantic_type": "LANDMARK"}]}
    if system:
        r["system"] = system
    return r


def test_a_browser_selection_of_emoji_and_combining_characters_lands_on_exactly_those_characters(
        store, bpe_tokenizer):
    [cid] = add(store, rec())
    annotator = Annotator(store, lambda name: bpe_tokenizer)
    for target in ("👍🏽", "e\u0301", "红色", "👨‍👩‍👧", "ok\nnext"):
        conv = store.conversation(cid)
        start = TRICKY.index(target)
        # what the browser sends: UTF-16 offsets of the target in the turn's text
        data = {"turn": 0, "a": utf16_len(TRICKY[:start]), "b": utf16_len(TRICKY[:start + len(target)]),
                "role": NOISE}
        result = annotator.edit(cid, conv.version, "ann", "tok", "label", data)
        assert result["status"].startswith("✓ Saved"), result["status"]
        conv = store.conversation(cid)
        # snapped to whole tokens: the stored span covers the target, and no more than its tokens
        view = token_view(conv, bpe_tokenizer)
        span_start, span_end, _ = snap(view, 0, start, start + len(target))
        assert conv.turns[0].spans[-1:] != [] and any(
            s.start <= start and s.end >= start + len(target) and s.role == NOISE for s in conv.turns[0].spans)
        noisy = {i for s in conv.turns[0].spans for i in range(s.start, s.end)}
        assert set(range(span_start, span_end)) <= noisy
        annotator.edit(cid, conv.version, "ann", "tok", "clear",
                       {"turn": 0, "a": 0, "b": utf16_len(TRICKY)})
    # the tokens that get NOISE are exactly those whose characters the label covers
    conv = store.conversation(cid)
    start = TRICKY.index("👍🏽")
    conv = store.set_span(cid, 0, start, start + 2, NOISE, expected_version=conv.version)
    aligned = align_record(conv.as_conversation(), bpe_tokenizer)
    for k, (t, span) in enumerate(zip(aligned.turn_index, aligned.char_spans)):
        if t == 0 and span is not None:
            covers = span[0] < start + 2 and span[1] > start
            assert (aligned.semantic_ids[k].item() == NOISE) == covers, (aligned.tokens[k], span)


def test_selection_snaps_to_whole_tokens_in_one_turn(store):
    [cid] = add(store, rec("What colour is the circle?"))
    conv = store.conversation(cid)
    view = word_view(conv)
    text = conv.turns[0].text
    # "olo" inside "colour" snaps to the whole word (words carry the space after them)
    a = text.index("olo")
    assert selection_from_browser(conv, view, {"turn": 0, "a": a, "b": a + 3}) == (0, 5, 12)
    # across a space: both words
    assert selection_from_browser(conv, view, {"turn": 0, "a": 6, "b": 14}) == (0, 5, 15)


def test_render_carries_utf16_offsets_and_escapes_html(store, bpe_tokenizer):
    [cid] = add(store, rec("<b>bold</b> 🙂 x", answer="ok"))
    conv = store.conversation(cid)
    page = render_view(conv, token_view(conv, bpe_tokenizer, "tok"))
    assert "<b>bold" not in page and "</b> 🙂" not in page and "&lt;" in page
    text = conv.turns[0].text
    # the token(s) of the emoji are marked with their UTF-16 range in the turn's text
    e = text.index("🙂")
    assert f'data-a="{utf16_len(text[:e])}"' in page or f'data-b="{utf16_len(text[:e + 1])}"' in page
    assert 'data-t="0"' in page and 'data-t="1"' in page


def test_labelling_undo_redo_and_turn_role_through_the_handlers(store):
    [cid] = add(store, rec("What colour is the circle? lol nice weather"))
    annotator = Annotator(store)
    conv = store.conversation(cid)
    text = conv.turns[0].text
    a = text.index("lol")
    shown = annotator.edit(cid, conv.version, "ann", WORDS, "label", {"turn": 0, "a": a, "b": len(text), "role": 2})
    assert shown["version"] == 2 and "→ noise" in shown["status"]
    assert store.conversation(cid).turns[0].spans == [Span(a, len(text), NOISE)]
    assert 'class="tok r2 sp"' in shown["html"]
    shown = annotator.edit(cid, shown["version"], "ann", WORDS, "turn_role", {"turn": 1, "role": GLOBAL})
    assert store.conversation(cid).turns[1].role == GLOBAL
    shown = annotator.edit(cid, shown["version"], "ann", WORDS, "undo", {})
    assert store.conversation(cid).turns[1].role == LANDMARK
    shown = annotator.edit(cid, shown["version"], "ann", WORDS, "undo", {})
    assert store.conversation(cid).turns[0].spans == []
    shown = annotator.edit(cid, shown["version"], "ann", WORDS, "redo", {})
    assert store.conversation(cid).turns[0].spans == [Span(a, len(text), NOISE)]
    assert [row[3] for row in shown["history"]] == ["redo", "undo", "undo", "edit", "edit", "import"]
    shown = annotator.edit(cid, shown["version"], "ann", WORDS, "label", {"turn": 0})
    assert shown["status"].startswith("⚠️ select some tokens")


def test_a_stale_save_from_a_second_tab_is_refused_and_the_newer_version_shown(store):
    [cid] = add(store, rec("What colour is the circle?"))
    annotator = Annotator(store)
    first = annotator.show(cid, WORDS)
    second = annotator.show(cid, WORDS)
    saved = annotator.edit(cid, first["version"], "tab1", WORDS, "label", {"turn": 0, "a": 0, "b": 4, "role": 2})
    refused = annotator.edit(cid, second["version"], "tab2", WORDS, "label", {"turn": 0, "a": 0, "b": 4, "role": 1})
    assert "Not saved" in refused["status"] and "changed by tab1" in refused["status"]
    assert refused["version"] == saved["version"] == 2
    assert store.conversation(cid).turns[0].spans == [Span(0, 5, NOISE)]  # "What " snapped


def test_rule_suggestions_and_accepting_them_as_one_undoable_edit(store):
    [cid] = add(store, {"system": "Answer about the image.",
                        "conversations": [
                            {"from": "human", "value": "What colour is the circle? I think it is green."},
                            {"from": "gpt", "value": "It is red.", "semantic_type": "GLOBAL_CONDITION"},
                            {"from": "human", "value": "Hello! Thanks a lot."}]})
    conv = store.conversation(cid)
    labels = rule_suggestions(conv)
    text = conv.turns[1].text
    assert labels[0] == (GLOBAL, [])
    assert labels[1] == (GLOBAL, [Span(text.index("I think"), len(text), NOISE)])
    assert labels[2] == (LANDMARK, [])
    assert labels[3] == (NOISE, [])
    annotator = Annotator(store)
    page, payload, message = annotator.suggest(cid, WORDS, "rules")
    assert "Suggestion preview" in page and "changes 3 of 4 turns" in message
    assert store.conversation(cid).version == 1  # a suggestion is not saved until accepted
    shown = annotator.edit(cid, 1, "ann", WORDS, "accept", json.loads(payload))
    assert store.conversation(cid).labels() == labels
    assert shown["history"][0][4] == "accepted rules suggestions"
    annotator.edit(cid, shown["version"], "ann", WORDS, "undo", {})
    assert store.conversation(cid).labels() == conv.labels()


def test_model_suggestions_mark_least_attended_user_words_as_noise(store, bpe_tokenizer):
    from conftest import tiny_qwen2vl

    from conftest import build_qwen2vl_processor
    processor = build_qwen2vl_processor(bpe_tokenizer)
    model = tiny_qwen2vl(processor, attn_implementation="eager")
    [cid] = add(store, rec("What color is the circle and how many shapes are there in the image today?"))
    conv = store.conversation(cid)
    labels = model_suggestions(model, processor, conv.as_conversation(), fraction=0.3)
    text = conv.turns[0].text
    assert labels[1] == (LANDMARK, [])  # assistant turns are left to the rules
    spans = labels[0][1]
    assert spans and all(s.role == NOISE for s in spans)
    for s in spans:  # whole words
        assert (s.start == 0 or text[s.start - 1] == " ") and (s.end == len(text) or text[s.end] == " "
                                                               or text[s.end - 1] == " ")


def test_navigation_filter_search_and_progress(store):
    ids = add(store, *[rec(f"Question {i} 🙂" if i % 2 else f"Plain {i}") | {"labelled": False} for i in range(5)])
    annotator = Annotator(store)
    assert annotator.navigate("d", "all", "", -1) == (ids[0], "1 / 5")
    assert annotator.navigate("d", "all", "", ids[0], step=1) == (ids[1], "2 / 5")
    assert annotator.navigate("d", "all", "", ids[4], step=1) == (ids[4], "5 / 5")
    assert annotator.navigate("d", "all", "", ids[0], jump=4) == (ids[3], "4 / 5")
    assert annotator.navigate("d", "all", "question", -1) == (ids[1], "1 / 2")
    annotator.edit(ids[2], 1, "ann", WORDS, "turn_role", {"turn": 0, "role": 2})
    assert annotator.navigate("d", "labelled", "", -1) == (ids[2], "1 / 1")
    assert annotator.navigate("d", "unlabelled", "", ids[0], step=2) == (ids[3], "3 / 4")
    from workbench.ui.annotator import progress_text
    assert "1 / 5 conversations labelled" in progress_text(store, "d")


def test_import_with_progress_and_export_to_a_zip(store, tmp_path, bpe_tokenizer):
    shapes_png(tmp_path / "red.png")
    data = [rec(f"<image>Question {i}?") | {"images": ["red.png"]} for i in range(30)] + [{"conversations": []}]
    source = tmp_path / "upload.json"
    source.write_text(json.dumps(data))
    annotator = Annotator(store, lambda name: bpe_tokenizer, exports_dir=tmp_path / "exports")
    calls = []
    message, name = annotator.import_files([str(source), str(tmp_path / "red.png")], "", "ann",
                                           progress=lambda d, t: calls.append((d, t)))
    assert name == "upload" and "Imported 30 of 31 records" in message and "record 30" in message
    assert calls and calls[-1] == (31, 31)
    archive, status = annotator.export("upload", "sharegpt", WORDS)
    assert "Exported 30 conversations" in status
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert "upload.json" in names and "dataset_info.json" in names
        assert sum(n.startswith("images/") and not n.endswith("/") for n in names) == 1  # one image, content-addressed
    shown = annotator.show(store.conversation_ids("upload")[0], WORDS)
    assert len(shown["images"]) == 1


def test_a_long_conversation_renders_every_token_once_over_its_pages(store, bpe_tokenizer):
    turns = []
    for i in range(40):
        turns.append({"from": "human", "value": f"Question {i}: what colour is the circle? " * 5})
        turns.append({"from": "gpt", "value": "The circle is red. " * 5, "semantic_type": "LANDMARK"})
    [cid] = add(store, {"conversations": turns})
    annotator = Annotator(store, lambda name: bpe_tokenizer)
    conv = store.conversation(cid)
    view = annotator.view(conv, "tok")[0]
    assert len(view) > 2000
    pages = view_pages(view, len(conv.turns))
    assert len(pages) > 1
    shown = [annotator.show(cid, "tok", page=p)["html"] for p in range(len(pages))]
    keys = [int(k) for html in shown for k in re.findall(r'class="tok [^"]*" data-k="(\d+)"', html)]
    assert keys == [k for k, s in enumerate(view.char_spans) if s is not None]  # each once, in order
    assert [int(t) for html in shown for t in re.findall(r'<div class="turn" data-t="(\d+)"', html)] == list(range(80))
    assert all(len(html) < 250_000 for html in shown)
    assert annotator.show(cid, "tok", page=99)["page"] == len(pages) - 1  # out of range: the nearest page


def test_pages_hold_whole_turns_cut_long_ones_and_count_an_image_once():
    tokens, turns, spans = [], [], []

    def turn(t, n, image=0):
        for i in range(n):
            tokens.append(f"w{i} ")
            turns.append(t)
            spans.append((i, i + 1))
        for _ in range(image):
            tokens.append("<|image_pad|>")
            turns.append(t)
            spans.append(None)

    turn(0, 3)
    turn(1, 4, image=500)  # 4 words + one image: 5 on the page
    turn(2, 25)  # longer than a page: cut
    turn(3, 2)
    tokens.append("<|im_start|>")
    turns.append(-1)
    spans.append(None)
    view = TokenView(tokens, turns, spans, [0] * len(tokens), "t")
    pages = view_pages(view, 5, turns_per_page=3, tokens_per_page=10)
    assert pages == [[(0, 0, 3), (1, 0, 504)], [(2, 0, 10)], [(2, 10, 20)], [(2, 20, 25), (3, 0, 2), (4, 0, 0)]]
    assert [page_of_turn(pages, t) for t in (-5, 0, 1, 2, 3, 4, 99)] == [0, 0, 0, 1, 3, 3, 3]
    assert view_pages(view, 5, turns_per_page=2, tokens_per_page=100) == \
        [[(0, 0, 3), (1, 0, 504)], [(2, 0, 25), (3, 0, 2)], [(4, 0, 0)]]


def test_the_pager_moves_pages_edits_stay_on_their_page_and_a_turn_is_found(store):
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": f"turn {i} says the circle is red"} for i in range(2000)]
    [cid] = add(store, {"conversations": turns})
    annotator = Annotator(store)
    first = annotator.show(cid, WORDS)
    assert 'data-page="0"' in first["html"] and "page 1 of " in first["html"] and len(first["html"]) < 250_000
    shown = annotator.turn_page(cid, WORDS, {"turn": 1234})
    assert '<div class="turn" data-t="1234">' in shown["html"] and shown["page"] > 0 and 'data-focus="1234"' in shown["html"]
    text = store.conversation(cid).turns[1234].text
    a = text.index("circle")
    edited = annotator.edit(cid, shown["version"], "ann", WORDS, "label", {"turn": 1234, "a": a, "b": a + 6, "role": 2},
                            page=shown["page"])
    assert edited["page"] == shown["page"] and "✓ Saved" in edited["status"]
    assert 'class="tok r2 sp"' in edited["html"]
    assert annotator.turn_page(cid, WORDS, {"page": 0})["page"] == 0
    assert annotator.turn_page(cid, WORDS, {"page": "x"})["status"].startswith("⚠️")


@given(st.text(max_size=30))
@settings(max_examples=100)
def test_the_utf16_table_is_code_point_to_utf16_for_every_index(text):
    table = utf16_table(text)
    assert [code_point_to_utf16(text, i) for i in range(len(text) + 1)] == \
        (list(range(len(text) + 1)) if table is None else table)


def test_model_suggestions_work_on_a_conversation_with_an_image(store, tmp_path):
    """Issue 20.1: the default model's processor gives per-token `mm_token_type_ids`; they reach the
    model with their batch dimension."""
    from conftest import tiny_qwen2vl
    from models.zoo.processor import build_processor

    processor = build_processor()
    model = tiny_qwen2vl(processor, attn_implementation="eager")
    shapes_png(tmp_path / "red.png")
    [cid] = add(store, rec("<image>What color is the circle and how many shapes are there?") | {"images": [
        str(tmp_path / "red.png")]})
    conv = store.conversation(cid)
    labels = model_suggestions(model, processor, conv.as_conversation(), fraction=0.3)
    assert len(labels) == 2 and labels[0][1] and all(s.role == NOISE for s in labels[0][1])
    annotator = Annotator(store, lambda name: processor, lambda name: (model, processor))
    page, payload, message = annotator.suggest(cid, "tok", "model")
    assert "Suggestion preview" in page and "🖼 image" in page


def test_a_failed_import_keeps_the_dataset_in_use_and_creates_none(store, tmp_path):
    """Issue 20.3/20.4: malformed JSON or only invalid records: nothing new, the dataset in use stays."""
    add(store, rec("Plain"), dataset="mine")
    annotator = Annotator(store, exports_dir=tmp_path / "exports")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    message, chosen = annotator.import_files([str(bad)], "", "ann", "mine")
    assert message.startswith("⚠️ Nothing imported: bad.json: malformed JSON") and chosen == "mine"
    (tmp_path / "empty.json").write_text(json.dumps([{"conversations": []}]))
    message, chosen = annotator.import_files([str(tmp_path / "empty.json")], "new", "ann", "mine")
    assert "Nothing imported" in message and "record 0" in message and chosen == "mine"
    assert [d.name for d in store.datasets()] == ["mine"]
    assert str(tmp_path) not in message


def test_rename_and_delete_with_confirmation_and_a_backup_that_imports_back(store, tmp_path):
    shapes_png(tmp_path / "red.png")
    ids = add(store, rec("<image>Question?") | {"images": [str(tmp_path / "red.png")]}, rec("Other"), dataset="a")
    add(store, rec("B"), dataset="b")
    annotator = Annotator(store, exports_dir=tmp_path / "exports")
    store.set_span(ids[1], 0, 0, 3, NOISE, expected_version=1, author="ann")
    message, chosen = annotator.rename("a", "shapes")
    assert chosen == "shapes" and "Renamed" in message
    assert annotator.rename("shapes", "b") == ("⚠️ Not renamed: a dataset named 'b' exists already", "shapes")
    message, backup, chosen = annotator.delete("shapes", "wrong")
    assert backup is None and chosen == "shapes" and "type the name" in message
    assert [d.name for d in store.datasets()] == ["b", "shapes"]
    message, backup, chosen = annotator.delete("shapes", "shapes")
    assert "Deleted" in message and backup.endswith(".zip") and chosen == "b"
    assert [d.name for d in store.datasets()] == ["b"]
    message, chosen = annotator.import_files([backup], "shapes", "ann", "b")
    assert chosen == "shapes" and "Imported 2 of 2" in message
    back = [store.conversation(c) for c in store.conversation_ids("shapes")]
    assert len(back[0].images) == 1 and back[1].turns[0].spans == [Span(0, 3, NOISE)]
    assert [c.labelled for c in back] == [True, True]


def test_the_conversation_table_pages_and_marks_the_open_one(store):
    """Issue 20.5: number, first words, labelled or not, last editor; the page of the open one."""
    from workbench.ui.annotator import PAGE_SIZE

    ids = add(store, *[rec(f"Question number {i} about the circle") | {"labelled": False} for i in range(PAGE_SIZE + 3)])
    store.set_span(ids[PAGE_SIZE + 1], 0, 0, 3, NOISE, expected_version=1, author="ann")
    annotator = Annotator(store)
    rows, row_ids, label, page = annotator.table("d", "all", "", ids[PAGE_SIZE + 1])
    assert page == 1 and label == f"page 2 of 2 · {PAGE_SIZE + 3} conversations" and row_ids == ids[PAGE_SIZE:]
    assert rows[1] == [f"▶ {PAGE_SIZE + 2}", f"Question number {PAGE_SIZE + 1} about the circle", "✓", "ann"]
    assert rows[0][2] == "" and rows[0][3] == "import"
    rows, row_ids, label, page = annotator.table("d", "all", "", ids[0], page=0)
    assert len(rows) == PAGE_SIZE and rows[0][0] == "▶ 1"
    assert annotator.table("d", "labelled", "", -1)[1] == [ids[PAGE_SIZE + 1]]
    # opening a row's conversation: the status line and the counter agree (issue 20.6)
    cid, where = annotator.navigate("d", "all", "", ids[1])
    assert where == f"2 / {PAGE_SIZE + 3}" and annotator.show(cid, WORDS)["status"].startswith("Conversation #2 ")


def test_in_a_dataset_split_among_annotators_each_labels_their_own_copy_and_queue(store):
    """Issue 23: assigned conversations are labelled in each annotator's copy (the main labels and the
    other copies stay as they were); the queue lists what is assigned, done marks move it on, and the
    progress line counts the person's queue and the team's."""
    ids = add(store, rec("What colour is the circle? lol"), rec("Where is the square?"), rec("Count them."))
    store.assign("d", ["alice", "bob"], 2)
    annotator = Annotator(store)
    first = ids[0]
    text = store.conversation(first).turns[0].text
    a = text.index("lol")
    shown = annotator.edit(first, annotator.show(first, WORDS, who="alice")["version"], "alice", WORDS, "label",
                           {"turn": 0, "a": a, "b": len(text), "role": NOISE})
    assert "alice's copy" in shown["status"] and 'class="tok r2 sp"' in shown["html"]
    assert store.conversation(first).turns[0].spans == []  # the main labels: untouched
    assert store.conversation(first, annotator="alice").turns[0].spans == [Span(a, len(text), NOISE)]
    assert store.conversation(first, annotator="bob").turns[0].spans == []  # bob does not see alice's work
    assert 'class="tok r2' not in annotator.show(first, WORDS, who="bob")["html"]
    # without a name nothing is edited in a team dataset, and the view says why
    refused = annotator.edit(first, 1, "", WORDS, "label", {"turn": 0, "a": 0, "b": 4, "role": NOISE})
    assert "type your name" in refused["status"] and store.conversation(first).version == 1
    # undo is per copy
    annotator.edit(first, shown["version"], "alice", WORDS, "undo", {})
    assert store.conversation(first, annotator="alice").turns[0].spans == []
    # the queue, done marks and progress
    assert annotator.ids("d", "my to-do", who="alice") == ids
    shown = annotator.show(first, WORDS, who="alice")
    done = annotator.edit(first, shown["version"], "alice", WORDS, "done", {})
    assert "Saved in alice's copy. Marked done" in done["status"]
    assert "done ✓" in annotator.show(first, WORDS, who="alice")["status"]
    assert annotator.ids("d", "my to-do", who="alice") == ids[1:]
    assert annotator.ids("d", "my done", who="alice") == [first]
    assert annotator.ids("d", "my to-do", search="square", who="alice") == [ids[1]]
    rows, row_ids, _, _ = annotator.table("d", "my done", "", who="alice")
    assert row_ids == [first] and rows[0][2] == "✓"
    assert "Your queue:** 1 / 3 done" in progress_text(store, "d", "alice")
    assert "alice 1/3 · bob 0/3" in progress_text(store, "d", "bob")
    assert annotator.navigate("d", "my to-do", "", -1, who="bob") == (ids[0], "1 / 3")
    with pytest.raises(StoreError, match="type your name"):
        annotator.ids("d", "my to-do", who="")
    # in a dataset nobody is assigned to, edits go to the one set of labels, as before
    [solo] = add(store, rec("Hello there."), dataset="solo")
    annotator.edit(solo, 1, "carol", WORDS, "turn_role", {"turn": 0, "role": NOISE})
    assert store.conversation(solo).turns[0].role == NOISE
    assert "only an annotator's copy" in annotator.edit(solo, 2, "carol", WORDS, "done", {})["status"]


def test_disagreements_between_copies_are_outlined_with_who_said_what(store):
    [cid] = add(store, rec("What colour is the circle? lol nice weather"))
    store.assign("d", ["alice", "bob"], 2)
    text = store.conversation(cid).turns[0].text
    a = text.index("lol")
    store.set_span(cid, 0, a, len(text), NOISE, expected_version=1, author="alice", annotator="alice")
    store.set_span(cid, 0, 0, 4, NOISE, expected_version=1, author="bob", annotator="bob")
    annotator = Annotator(store)
    plain = annotator.show(cid, WORDS, who="carol")
    assert " dis" not in plain["html"]
    shown = annotator.show(cid, WORDS, who="carol", disagreements=True)
    assert "2 disagreements among alice, bob" in shown["status"]
    outlined = re.findall(r'class="tok [^"]* dis" title="([^"]*)"[^>]*>([^<]*)<', shown["html"])
    words = "".join(word for _, word in outlined)
    assert "lol" in words and "What" in words and "circle" not in words
    assert any("alice: noise · bob: global" in title for title, _ in outlined)
