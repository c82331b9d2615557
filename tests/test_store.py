"""The annotation store against real SQLite files: import checks, edits, optimistic versions,
undo/redo, history, export round trips, offsets in any script."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, shapes_png, table_counts
from models.hsa import GLOBAL, LANDMARK, NOISE
from models.data.align import Span, align_record, normalize_record
from workbench.store import (FileError, StaleVersionError, Store, StoreError, export_dataset, import_file,
                             import_records, read_records)
from workbench.store.__main__ import main as cli
from workbench.store.labels import canonical, char_roles


def record(user="What colour is the circle?", answer="It is red.", **extra):
    return {"conversations": [{"from": "human", "value": user},
                              {"from": "gpt", "value": answer, "semantic_type": "LANDMARK"}], **extra}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    shapes_png(d / "red.png")
    shapes_png(d / "blue.png", color=(0, 0, 255))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return d


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


counts = table_counts

# --- import --------------------------------------------------------------------------------------

def test_import_stores_turns_roles_spans_and_images(store, data_dir):
    rec = {"system": "Answer exactly.", "id": "r1", "images": ["red.png"],
           "conversations": [
               {"role": "user", "content": "<image>What colour is it?"},
               {"role": "assistant", "content": "Red, I think.", "semantic_type": "LANDMARK",
                "spans": [{"start": 4, "end": 13, "role": "NOISE"}]}]}
    report = import_file(store, write_json(data_dir / "set.json", [rec]))
    assert (report.stored, report.errors, report.dataset) == (1, [], "set")
    conv = store.conversation(report.conversation_ids[0])
    assert [(t.speaker, t.text, t.role) for t in conv.turns] == [
        ("system", "Answer exactly.", GLOBAL), ("user", "<image>What colour is it?", GLOBAL),
        ("assistant", "Red, I think.", LANDMARK)]
    assert conv.turns[2].spans == [Span(4, 13, NOISE)]
    assert conv.extra == {"id": "r1"} and conv.version == 1 and conv.labelled
    # the image is copied into the store, content-addressed
    assert len(conv.images) == 1 and conv.images[0].is_file()
    assert conv.images[0].read_bytes() == (data_dir / "red.png").read_bytes()
    assert store.image_dir in conv.images[0].parents


@pytest.mark.parametrize("bad, problem", [
    ({"conversations": [{"from": "human", "value": "hi", "semantic_type": "IMPORTANT"}]}, "unknown semantic role"),
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker"),
    ({"conversations": [{"from": "human", "value": "hi", "spans": [{"start": 1, "end": 9, "role": "NOISE"}]}]},
     "outside the text"),
    ({"conversations": [{"from": "human", "value": "hi", "spans": [{"start": 0, "end": 1, "role": "X"}]}]},
     "unknown semantic role"),
    ({"conversations": [{"from": "human", "value": "<image>hi"}], "images": ["nowhere.png"]}, "not found"),
    ({"conversations": [{"from": "human", "value": "<image>hi"}], "images": ["broken.png"]},
     "image 0 ('broken.png') is not an image"),
    ({"conversations": [{"from": "human", "value": "<image>hi"}], "images": ["."]}, "is a folder"),
    ({"conversations": [{"from": "human", "value": "<image>hi"}], "images": ["red.png", "blue.png"]},
     "1 <image> placeholder(s) but 2 image(s)"),
    ({"conversations": [{"from": "human", "value": "hi"}], "images": ["red.png"]},
     "0 <image> placeholder(s) but 1 image(s)"),
    ({"conversations": [{"from": "human", "value": "  "}]}, "no text"),
    ({"conversations": [{"from": "human", "value": "<image>"}], "images": ["red.png"]}, "no text"),
    ({"conversations": []}, "non-empty list"),
    ("just a string", "expected an object"),
])
def test_each_bad_record_is_named_with_its_problem_and_nothing_of_it_is_stored(store, data_dir, bad, problem):
    report = import_file(store, write_json(data_dir / "mixed.json", [record(), bad, record("Second?")]))
    assert report.stored == 2
    assert len(report.errors) == 1
    assert report.errors[0].startswith("record 1") and problem in report.errors[0], report.errors
    # in the person's terms: no server path, no Python object (issue 20.7)
    assert str(data_dir) not in report.errors[0] and "<_io." not in report.errors[0]
    assert counts(store)["conversations"] == 2 and counts(store)["turns"] == 4


def test_oversized_images_are_refused_by_bytes_and_by_pixels(store, data_dir):
    rec = {"conversations": [{"from": "human", "value": "<image>hi"}], "images": ["red.png"]}
    size = (data_dir / "red.png").stat().st_size
    report = import_records(store, "d", [("record 0", rec)], base_dir=data_dir, max_image_bytes=size - 1)
    assert "too large" in report.errors[0] and "bytes" in report.errors[0]
    report = import_records(store, "d", [("record 0", rec)], base_dir=data_dir, max_image_pixels=56 * 56 - 1)
    assert "too large" in report.errors[0] and "pixels" in report.errors[0]
    assert counts(store)["conversations"] == 0


def test_malformed_json_file_is_refused_whole_and_jsonl_lines_one_by_one(store, data_dir):
    bad = data_dir / "bad.json"
    bad.write_text('[{"conversations": [}]')
    with pytest.raises(FileError, match="malformed JSON at line 1"):
        read_records(bad)
    lines = data_dir / "lines.jsonl"
    lines.write_text(json.dumps(record()) + "\n{not json\n\n" + json.dumps(record("Again?")) + "\n")
    report = import_file(store, lines)
    assert report.stored == 2
    assert report.errors == [report.errors[0]] and report.errors[0].startswith("record 1 (line 2): malformed JSON")


def test_cli_exit_codes_and_messages(tmp_path, data_dir, capsys, store_url):
    db = store_url
    good = write_json(data_dir / "good.json", [record(), record("More?")])
    assert cli(["import", str(good), "--db", str(db)]) == 0
    mixed = write_json(data_dir / "mixed.json", [record("Third?"), {"conversations": [{"from": "x", "value": "y"}]}])
    assert cli(["import", str(mixed), "--dataset", "good", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert "record 1, turn 0: unknown speaker 'x'" in err
    (data_dir / "broken.json").write_text("[")
    assert cli(["import", str(data_dir / "broken.json"), "--db", str(db)]) == 2
    assert cli(["export", "nope", "--format", "sharegpt", "--out", str(tmp_path / "o"), "--db", str(db)]) == 2
    with Store(db) as s:
        assert s.dataset("good").total == 3


def test_cli_in_a_real_process(tmp_path, data_dir, store_url):
    db, out = store_url, tmp_path / "out"
    src = write_json(data_dir / "shapes.json", [record(), {"conversations": "nope"}])
    run = lambda *a: subprocess.run([sys.executable, "-m", "workbench.store", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    done = run("import", str(src), "--db", str(db))
    assert done.returncode == 1 and "record 1: 'conversations' must be a non-empty list" in done.stderr
    assert "stored 1 of 2" in done.stdout
    done = run("export", "shapes", "--format", "llamafactory", "--out", str(out), "--db", str(db))
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["shapes"]["file_name"] == "shapes.json"


# --- edits, versions, history -----------------------------------------------------------------------

def one(store, rec=None):
    report = import_records(store, "d", [("record 0", rec or record())])
    assert not report.errors
    return store.conversation(report.conversation_ids[0])


def test_span_edit_bumps_version_and_a_stale_save_is_refused(store):
    conv = one(store)
    tab_a = store.set_span(conv.id, 1, 0, 2, "noise", expected_version=conv.version, author="ann")
    assert tab_a.version == 2 and tab_a.turns[1].spans == [Span(0, 2, NOISE)]
    # a second tab still showing version 1 tries to save
    with pytest.raises(StaleVersionError, match="changed by ann.*version 2.*not saved") as info:
        store.set_turn_role(conv.id, 0, "landmark", expected_version=conv.version, author="bob")
    assert info.value.current_version == 2
    kept = store.conversation(conv.id)
    assert kept.version == 2 and kept.turns[0].role == GLOBAL and kept.turns[1].spans == [Span(0, 2, NOISE)]
    assert [r.author for r in store.history(conv.id)] == ["import", "ann"]


def test_concurrent_writers_with_the_same_version_one_wins(store):
    conv = one(store)
    outcomes = []

    def save(role):
        try:
            store.set_span(conv.id, 0, 0, 4, role, expected_version=conv.version, author=role)
            outcomes.append("saved")
        except StaleVersionError:
            outcomes.append("stale")

    threads = [threading.Thread(target=save, args=(r,)) for r in ("global", "landmark", "noise")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes) == ["saved", "stale", "stale"]
    assert store.conversation(conv.id).version == 2


def test_edit_arguments_are_checked(store):
    conv = one(store)
    with pytest.raises(StoreError, match="outside turn 1"):
        store.set_span(conv.id, 1, 5, 99, "noise", expected_version=1)
    with pytest.raises(StoreError, match="has no turn 7"):
        store.set_turn_role(conv.id, 7, "noise", expected_version=1)
    with pytest.raises(StoreError, match="unknown semantic role"):
        store.set_span(conv.id, 1, 0, 1, "bogus", expected_version=1)
    assert store.conversation(conv.id).version == 1


def test_spans_paint_over_each_other_and_clear(store):
    conv = one(store, record(answer="abcdefghij"))
    v = conv.version
    for start, end, role in [(0, 6, NOISE), (3, 8, GLOBAL), (8, 10, GLOBAL)]:
        v = store.set_span(conv.id, 1, start, end, role, expected_version=v).version
    assert store.conversation(conv.id).turns[1].spans == [Span(0, 3, NOISE), Span(3, 10, GLOBAL)]
    conv = store.clear_span(conv.id, 1, 2, 5, expected_version=v)
    assert conv.turns[1].spans == [Span(0, 2, NOISE), Span(5, 10, GLOBAL)]
    assert char_roles(LANDMARK, conv.turns[1].spans, 10) == [2, 2, 1, 1, 1, 0, 0, 0, 0, 0]
    conv = store.set_turn_role(conv.id, 1, NOISE, expected_version=conv.version)
    assert conv.turns[1].role == NOISE and conv.turns[1].spans == []


def test_undo_redo_follow_a_reference_stack(store):
    conv = one(store, record(answer="abcdefghij"))
    states = [store.conversation(conv.id).labels()]  # reference: the labels after each edit in effect
    undone = []
    v = conv.version
    for start, role in [(0, NOISE), (2, GLOBAL), (4, NOISE)]:
        v = store.set_span(conv.id, 1, start, start + 3, role, expected_version=v).version
        states.append(store.conversation(conv.id).labels())
    for _ in range(2):
        conv = store.undo(conv.id, expected_version=v, author="ann")
        v = conv.version
        undone.append(states.pop())
        assert conv.labels() == states[-1]
    conv = store.redo(conv.id, expected_version=v)
    v = conv.version
    states.append(undone.pop())
    assert conv.labels() == states[-1]
    # a new edit drops what could still be redone
    conv = store.set_turn_role(conv.id, 0, LANDMARK, expected_version=v)
    assert not store.can_redo(conv.id)
    with pytest.raises(StoreError, match="nothing to redo"):
        store.redo(conv.id)
    for _ in range(3):
        conv = store.undo(conv.id)
    assert conv.labels() == store.conversation(conv.id).labels() == [(GLOBAL, []), (LANDMARK, [])]
    assert not store.can_undo(conv.id)
    with pytest.raises(StoreError, match="nothing to undo"):
        store.undo(conv.id)
    history = store.history(conv.id)
    assert [r.kind for r in history] == ["import", "edit", "edit", "edit", "undo", "undo", "redo", "edit",
                                         "undo", "undo", "undo"]
    assert history[4].action == f"undo: {history[3].action}" and history[4].author == "ann"
    assert [r.version for r in history] == list(range(1, 12))


def test_undo_is_refused_when_stale(store):
    conv = one(store)
    store.set_span(conv.id, 0, 0, 3, NOISE, expected_version=1)
    with pytest.raises(StaleVersionError):
        store.undo(conv.id, expected_version=1)
    assert store.conversation(conv.id).turns[0].spans == [Span(0, 3, NOISE)]


def without_roles(rec):
    for turn in rec["conversations"]:
        turn.pop("semantic_type", None)
    return rec


def test_navigation_filter_and_search(store):
    import_records(store, "d", [(f"record {i}", without_roles(record(f"Question {i}: 这个圆? 🙂" if i % 2
                                                                     else f"Plain {i}"))) for i in range(6)])
    ids = store.conversation_ids("d")
    conv = store.conversation(ids[2])
    store.set_span(conv.id, 0, 0, 2, NOISE, expected_version=1)
    assert [c.id for c in store.conversations("d", status="labelled")] == [ids[2]]
    assert len(store.conversations("d", status="unlabelled")) == 5
    assert [c.position for c in store.conversations("d", search="这个圆")] == [1, 3, 5]
    assert [c.position for c in store.conversations("d", search="PLAIN 4")] == [4]
    assert store.conversations("d")[0].preview == "Plain 0"
    assert store.dataset("d").labelled == 1 and store.dataset("d").total == 6


# --- offsets in any script ----------------------------------------------------------------------------

def test_code_point_offsets_for_chinese_emoji_and_combining_characters(store):
    text = "红色的圆 🙂👍🏽 e\u0301te\nnext line"
    conv = one(store, record(answer=text))
    # label exactly the thumbs-up with its skin tone (two code points) and the combining "é"
    thumbs = text.index("👍🏽")
    accent = text.index("e\u0301")
    v = store.set_span(conv.id, 1, thumbs, thumbs + 2, NOISE, expected_version=1).version
    conv = store.set_span(conv.id, 1, accent, accent + 2, GLOBAL, expected_version=v)
    roles = char_roles(LANDMARK, conv.turns[1].spans, len(text))
    assert "".join(c for c, r in zip(text, roles) if r == NOISE) == "👍🏽"
    assert "".join(c for c, r in zip(text, roles) if r == GLOBAL) == "e\u0301"
    # a span across the line break
    conv = store.set_span(conv.id, 1, text.index("te\n"), text.index("line"), NOISE, expected_version=conv.version)
    roles = char_roles(LANDMARK, conv.turns[1].spans, len(text))
    assert "".join(c for c, r in zip(text, roles) if r == NOISE) == "👍🏽te\nnext "


# --- export round trips -------------------------------------------------------------------------------

def rich_records():
    return [
        {"system": "Answer exactly.", "id": 7, "images": ["red.png"],
         "conversations": [
             {"from": "human", "value": "<image>What colour is the circle? 这个 🙂"},
             {"from": "gpt", "value": "Red. 👍🏽 e\u0301", "semantic_type": "LANDMARK",
              "spans": [{"start": 0, "end": 3, "role": "NOISE"}, {"start": 2, "end": 4, "role": "NOISE"}]},
             {"from": "human", "value": "I think the square is green.\nOK?", "semantic_type": "NOISE"},
             {"from": "gpt", "value": "There is no square.", "semantic_type": 1}]},
        {"messages": [{"role": "user", "content": "<image><image>Two images?"},
                      {"role": "assistant", "content": "Yes."}], "images": ["red.png", "blue.png"]},
    ]


@pytest.mark.parametrize("fmt", ["sharegpt", "llamafactory"])
def test_export_then_import_gives_back_the_same_records(store, data_dir, tmp_path, fmt):
    import_file(store, write_json(data_dir / "rich.json", rich_records()), dataset="rich")
    first = tmp_path / "first"
    report = export_dataset(store, "rich", fmt, first)
    exported = json.loads((first / "rich.json").read_text())
    info = json.loads((first / "dataset_info.json").read_text())
    assert info["rich"]["file_name"] == "rich.json" and info["rich"]["formatting"] == "sharegpt"
    assert report.exported == 2
    # the stored records are the validated originals (spans merged to canonical form)
    for original, out in zip(rich_records(), exported):
        a, b = normalize_record(original), normalize_record(out)
        assert [(t.speaker, t.text, t.role, canonical(t.spans)) for t in a.turns] == \
               [(t.speaker, t.text, t.role, t.spans) for t in b.turns]
        assert [(data_dir / p).read_bytes() for p in a.images] == [(first / p).read_bytes() for p in b.images]
    assert exported[0]["id"] == 7
    # ... and a second round gives back exactly the same file
    report = import_file(store, first / "rich.json", dataset="again")
    assert not report.errors
    second = tmp_path / "second"
    export_dataset(store, "again", fmt, second)
    assert json.loads((second / "again.json").read_text()) == exported


def test_llamafactory_entry_uses_the_files_column_names(store, data_dir, tmp_path):
    import_file(store, write_json(data_dir / "rich.json", rich_records()), dataset="rich")
    out = tmp_path / "lf"
    (out).mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "other.json"}}))
    export_dataset(store, "rich", "llamafactory", out)
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"other", "rich"}
    entry = info["rich"]
    data = json.loads((out / entry["file_name"]).read_text())
    messages = data[0][entry["columns"]["messages"]]
    assert messages[0][entry["tags"]["role_tag"]] == entry["tags"]["system_tag"]
    assert messages[1][entry["tags"]["role_tag"]] == entry["tags"]["user_tag"]
    assert messages[2][entry["tags"]["content_tag"]].startswith("Red.")
    assert all((out / p).is_file() for p in data[1][entry["columns"]["images"]])


def test_semantic_ids_export_matches_alignment_with_a_local_tokenizer(store, tmp_path, bpe_tokenizer):
    model_dir = tmp_path / "tok"
    bpe_tokenizer.save_pretrained(model_dir)
    recs = [r for r in rich_records()[:1]]
    recs[0] = {k: v for k, v in recs[0].items() if k != "images"}
    recs[0]["conversations"][0]["value"] = "What colour is the circle? 这个 🙂"
    recs.append(record())
    report = import_records(store, "ids", [(f"record {i}", r) for i, r in enumerate(recs)])
    assert not report.errors
    assert cli(["export", "ids", "--format", "semantic-ids", "--model", str(model_dir),
                "--out", str(tmp_path / "o"), "--db", store.url]) == 0
    lines = [json.loads(line) for line in (tmp_path / "o" / "ids.semantic_ids.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for rec, line in zip(recs, lines):
        expected = align_record(rec, bpe_tokenizer)
        assert line["input_ids"] == expected.input_ids.tolist()
        assert line["semantic_ids"] == expected.semantic_ids.tolist()
        assert line["labels"] == expected.labels.tolist()
    assert NOISE in lines[0]["semantic_ids"] and LANDMARK in lines[0]["semantic_ids"]


def test_a_record_the_database_refuses_is_named_and_the_others_of_its_batch_are_stored(store, monkeypatch):
    """Records are written together at the end of a batch; when the database refuses that write (here a
    role its CHECK constraint rejects, which the importer's checks would have caught), each record is
    written again on its own: the refused one is an error by name, nothing of it stays, the rest are stored."""
    from workbench.store.db import Store as StoreClass

    make = StoreClass._record

    def broken(self, cid, dataset_id, position, conversation, *args):
        made = make(self, cid, dataset_id, position, conversation, *args)
        if conversation.turns[0].text == "Broken?":
            made.turns[0]["role"] = 7
        return made

    monkeypatch.setattr(StoreClass, "_record", broken)
    report = import_records(store, "d", [("record 0", record("First?")), ("record 1", record("Broken?")),
                                         ("record 2", record("Third?"))])
    assert report.stored == 2 and len(report.errors) == 1 and report.errors[0].startswith("record 1: "), report
    assert "check" in report.errors[0].lower() and "INSERT" not in report.errors[0] and "COPY" not in report.errors[0]
    assert [store.conversation(c).turns[0].text for c in report.conversation_ids] == ["First?", "Third?"]
    assert counts(store) == {"conversations": 2, "turns": 4, "spans": 0, "images": 0, "revisions": 2}
    again = import_records(store, "d", [("record 0", record("First?")), ("record 3", record("Fourth?"))])
    assert again.stored == 1 and again.skipped and store.dataset("d").total == 3
