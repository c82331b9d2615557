"""Property tests: random and broken records thrown at the importer give clean, named errors, never
a crash, and never a partial write (what is stored is exactly the valid records, whole)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import check_integrity, empty_store, shapes_png, sql
from models.data.align import AlignError, normalize_record
from workbench.store import Store, import_file, import_records, read_records
from workbench.store.labels import canonical

IMAGE_DIR = Path(tempfile.mkdtemp(prefix="store-props-"))
shapes_png(IMAGE_DIR / "red.png")
(IMAGE_DIR / "broken.png").write_bytes(b"not an image at all")

text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["<image>", "<image>What?", "红色 🙂", "e\u0301", "a\nb", "  ", ""])
role = st.sampled_from(["GLOBAL_CONDITION", "LANDMARK", "NOISE", 0, 1, 2, "noise", "IMPORTANT", -1, 3, None,
                        True, 1.5, [0], {"r": 1}])
speaker = st.sampled_from(["human", "gpt", "user", "assistant", "system", "robot", "", None, 1, ["human"]])
span = st.fixed_dictionaries({"start": st.integers(-2, 14), "end": st.integers(-2, 14), "role": role}) | \
    st.sampled_from([{}, {"start": 0}, "0..3", None, {"start": "0", "end": 2, "role": 0}])
turn = st.fixed_dictionaries(
    {"from": speaker, "value": text | st.sampled_from([None, 3, ["x"]])},
    optional={"semantic_type": role, "spans": st.lists(span, max_size=3) | st.sampled_from([None, "x", {}])},
) | st.sampled_from([None, "turn", 3, [], {}])
record = st.fixed_dictionaries(
    {"conversations": st.lists(turn, max_size=4) | st.sampled_from([None, "x", {}, []])},
    optional={"images": st.lists(st.sampled_from(["red.png", "broken.png", "missing.png", "", 3, None]),
                                 max_size=2) | st.sampled_from(["red.png", None, {}]),
              "system": text | st.sampled_from([None, 3]),
              "id": st.integers() | st.text(max_size=5)},
) | st.sampled_from([None, 3, "record", [], {}]) | st.recursive(st.none() | st.integers() | st.text(max_size=3),
                                                                 lambda c: st.lists(c, max_size=3), max_leaves=5)


def stored_turns(store, cid):
    conv = store.conversation(cid)
    return [(t.speaker, t.text, t.role, t.spans) for t in conv.turns]


def expected_turns(rec):
    return [(t.speaker, t.text, t.role, canonical(t.spans)) for t in normalize_record(rec).turns]


def check_no_partial_write(store, report, records):
    """Everything stored is a whole valid record; every other record has an error naming it."""
    assert report.stored + len(report.errors) == len(records)
    names = [name for name, _ in records]
    errored = {e.split(":")[0].split(",")[0] for e in report.errors}
    assert errored <= set(names), report.errors
    stored_names = [n for n in names if n not in errored]
    assert len(stored_names) == report.stored == len(report.conversation_ids)
    by_name = dict(records)
    for name, cid in zip(stored_names, report.conversation_ids):
        assert stored_turns(store, cid) == expected_turns(by_name[name])
    assert sql(store, "SELECT COUNT(*) FROM conversations")[0][0] == report.stored
    n_turns = sum(len(normalize_record(by_name[n]).turns) for n in stored_names)
    assert sql(store, "SELECT COUNT(*) FROM turns")[0][0] == n_turns
    n_images = sum(len(normalize_record(by_name[n]).images) for n in stored_names)
    assert sql(store, "SELECT COUNT(*) FROM images")[0][0] == n_images
    check_integrity(store)


@pytest.fixture
def one_store(store_url):
    """One store per test (per engine); each example starts from an empty one (a new SQLite file or
    PostgreSQL database per example would be slow)."""
    with Store(store_url) as store:
        yield store


STATE = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=60, deadline=None, **STATE)
@given(records=st.lists(record, min_size=1, max_size=5))
def test_random_records_are_stored_whole_or_refused_with_a_named_error(one_store, records):
    store = one_store
    empty_store(store)
    named = [(f"record {i}", r) for i, r in enumerate(records)]
    report = import_records(store, "fuzz", named, base_dir=IMAGE_DIR, batch_size=3)
    for error in report.errors:
        assert error.startswith("record "), error
    check_no_partial_write(store, report, named)
    # the valid ones are exactly those the validator accepts with readable images
    for name, rec in named:
        try:
            conv = normalize_record(rec)
            valid = all(isinstance(p, str) and p == "red.png" for p in conv.images)
        except (AlignError, TypeError, AttributeError):
            valid = False
        assert valid == (not any(e.startswith(name + ":") or e.startswith(name + ",")
                                 for e in report.errors)), (name, rec, report.errors)


@settings(max_examples=40, deadline=None, **STATE)
@given(lines=st.lists(st.text(max_size=40) | record.map(lambda r: json.dumps(r)), min_size=1, max_size=6))
def test_random_jsonl_lines_never_crash_the_importer(one_store, lines):
    store = one_store
    empty_store(store)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines), encoding="utf-8")
        records = read_records(path)
        report = import_file(store, path)
        for error in report.errors:
            assert error.startswith("record "), error
        check_no_partial_write(store, report, [(n, r) for n, r in records])
