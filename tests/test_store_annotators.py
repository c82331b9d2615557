"""Several annotators on one store (issue 23), on both engines: each annotator's own copy of a
conversation's labels (made at their first edit from the labels as imported, with its own version,
undo/redo, history and done mark), assignments (balanced, idempotent, topped up), queues and progress,
and review (accepted labels become the main ones, marked reviewed, exported alone on request)."""
from __future__ import annotations

import json
import threading

import pytest

from conftest import sql
from models.data.align import Span
from models.hsa import GLOBAL, LANDMARK, NOISE
from workbench.store import NotFoundError, StaleVersionError, StoreError, export_dataset, import_records
from workbench.store.__main__ import main as cli


def record(user="What colour is the circle?", answer="It is red."):
    return {"conversations": [{"from": "human", "value": user},
                              {"from": "gpt", "value": answer, "semantic_type": "LANDMARK"}]}


def add(store, n=1, dataset="d", start=0):
    report = import_records(store, dataset, [(f"record {i}", record(f"Question {i}?")) for i in range(start, start + n)])
    assert not report.errors
    return report.conversation_ids


IMPORTED = [(GLOBAL, []), (LANDMARK, [])]


# --- copies ------------------------------------------------------------------------------------------

def test_a_copy_starts_from_the_labels_as_imported_and_is_made_at_the_first_edit(store):
    [cid] = add(store)
    main = store.set_turn_role(cid, 0, NOISE, expected_version=1, author="lead")
    # reading alice's copy writes nothing: it is the labels as imported, version 1, not done
    alice = store.conversation(cid, annotator="alice")
    assert alice.labels() == IMPORTED and alice.version == 1 and not alice.labelled and alice.annotator == "alice"
    assert store.copies(cid) == {} and store.history(cid, annotator="alice") == []
    assert not store.can_undo(cid, annotator="alice")
    alice = store.set_span(cid, 1, 0, 2, NOISE, expected_version=1, author="alice", annotator="alice")
    assert alice.version == 2 and alice.labels() == [(GLOBAL, []), (LANDMARK, [Span(0, 2, NOISE)])]
    assert [(r.version, r.kind, r.annotator) for r in store.history(cid, annotator="alice")] == [
        (1, "import", "alice"), (2, "edit", "alice")]
    copy = store.copies(cid)["alice"]
    assert (copy.version, copy.done, copy.labels, copy.updated_by) == (2, False, alice.labels(), "alice")
    # the main labels did not move
    again = store.conversation(cid)
    assert again.version == main.version == 2 and again.labels() == [(NOISE, []), (LANDMARK, [])]
    assert [r.kind for r in store.history(cid)] == ["import", "edit"]
    assert {r.annotator for r in store.history(cid, every_copy=True)} == {None, "alice"}


def test_each_copy_has_its_own_version_undo_redo_and_done_mark(store):
    [cid] = add(store)
    a = store.set_span(cid, 1, 0, 2, NOISE, expected_version=1, annotator="alice")
    b = store.set_turn_role(cid, 0, LANDMARK, expected_version=1, annotator="bob")
    assert (a.version, b.version) == (2, 2)
    with pytest.raises(StaleVersionError, match="alice's copy of conversation .* version 2.*not saved") as e:
        store.set_span(cid, 1, 3, 5, GLOBAL, expected_version=1, annotator="alice")
    assert e.value.current_version == 2
    a = store.set_span(cid, 1, 3, 5, GLOBAL, expected_version=2, annotator="alice")
    a = store.undo(cid, expected_version=a.version, annotator="alice")
    assert a.labels() == [(GLOBAL, []), (LANDMARK, [Span(0, 2, NOISE)])] and store.can_redo(cid, annotator="alice")
    assert not store.can_redo(cid) and not store.can_undo(cid)  # nothing of the main labels
    assert store.conversation(cid, annotator="bob").labels() == [(LANDMARK, []), (LANDMARK, [])]
    b = store.undo(cid, annotator="bob")
    assert b.labels() == IMPORTED and not store.can_undo(cid, annotator="bob")
    with pytest.raises(StoreError, match="nothing to undo .*bob's copy"):
        store.undo(cid, annotator="bob")
    a = store.redo(cid, annotator="alice")
    assert a.labels() == [(GLOBAL, []), (LANDMARK, [Span(0, 2, NOISE), Span(3, 5, GLOBAL)])]
    store.mark_labelled(cid, True, author="alice", annotator="alice")
    assert store.copies(cid)["alice"].done and store.conversation(cid, annotator="alice").labelled
    assert not store.copies(cid)["bob"].done
    store.mark_labelled(cid, True, annotator="carol")  # done without an edit: carol's copy is made
    assert store.copies(cid)["carol"].labels == IMPORTED and store.copies(cid)["carol"].version == 1
    assert [r.version for r in store.history(cid, annotator="alice")] == [1, 2, 3, 4, 5]
    for name in ("", "  ", "x\x00y", "n" * 201):
        with pytest.raises(StoreError, match="annotator"):
            store.conversation(cid, annotator=name)


def test_two_annotators_editing_one_conversation_at_once_never_conflict(store):
    [cid] = add(store, dataset="d")
    text_length = len(store.conversation(cid).turns[1].text)
    errors, barrier = [], threading.Barrier(3)

    def annotate(name):
        barrier.wait()
        version = 1
        try:
            for k in range(12):  # each edit changes something: a version each
                version = store.set_span(cid, 1, 0, text_length, (NOISE, GLOBAL)[k % 2], expected_version=version,
                                         author=name, annotator=name).version
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=annotate, args=(name,)) for name in ("alice", "bob", "carol")]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert errors == []
    copies = store.copies(cid)
    assert sorted(copies) == ["alice", "bob", "carol"] and all(c.version == 13 for c in copies.values())
    assert store.conversation(cid).version == 1


def test_a_stale_save_to_one_copy_is_refused_when_several_race(store):
    [cid] = add(store)
    store.set_span(cid, 1, 0, 1, NOISE, expected_version=1, annotator="alice")  # alice's copy now at version 2
    outcomes, barrier = [], threading.Barrier(4)

    def save(role):
        barrier.wait()
        try:
            store.set_span(cid, 0, 0, 3, role, expected_version=2, annotator="alice")
            outcomes.append("saved")
        except StaleVersionError:
            outcomes.append("stale")

    threads = [threading.Thread(target=save, args=(role,)) for role in (0, 1, 2, 1)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert sorted(outcomes) == ["saved", "stale", "stale", "stale"]
    assert store.copies(cid)["alice"].version == 3


def test_the_first_edits_of_one_copy_in_two_tabs_make_it_once(store):
    [cid] = add(store)
    outcomes, barrier = [], threading.Barrier(3)

    def first_edit(k):
        barrier.wait()
        try:
            store.set_span(cid, 1, k, k + 1, NOISE, expected_version=1, annotator="alice")
            outcomes.append("saved")
        except StaleVersionError:
            outcomes.append("stale")

    threads = [threading.Thread(target=first_edit, args=(k,)) for k in range(3)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert sorted(outcomes) == ["saved", "stale", "stale"]
    assert [(r.version, r.kind) for r in store.history(cid, annotator="alice")] == [(1, "import"), (2, "edit")]


# --- assignments, queues, progress ----------------------------------------------------------------------

def assignments(store, dataset="d") -> dict[int, set]:
    found: dict[int, set] = {}
    for cid in store.conversation_ids(dataset):
        found[cid] = set(store.assignees(cid))
    return found


def loads(store, dataset="d") -> dict[str, int]:
    return {name: assigned for name, (_, assigned) in store.progress(dataset).items()}


def test_assignments_are_balanced_idempotent_and_topped_up(store):
    add(store, 10)
    assert store.assign("d", ["alice", "bob", "carol"], 2, author="lead") == {"alice": 7, "bob": 7, "carol": 6}
    given = assignments(store)
    assert all(len(names) == 2 for names in given.values())
    assert max(loads(store).values()) - min(loads(store).values()) <= 1
    # again: nothing changes
    assert store.assign("d", ["alice", "bob", "carol"], 2, author="lead") == {"alice": 0, "bob": 0, "carol": 0}
    assert assignments(store) == given
    # new conversations get theirs; the old ones keep theirs
    add(store, 5, start=10)
    added = store.assign("d", ["alice", "bob", "carol"], 2, author="lead")
    assert sum(added.values()) == 10 and max(added.values()) - min(added.values()) <= 1
    assert {cid: names for cid, names in assignments(store).items() if cid in given} == given
    # someone who joins later gets a fair share of what is added, not of what was assigned before
    add(store, 6, start=15)
    added = store.assign("d", ["alice", "bob", "carol", "dan"], 2, author="lead")
    assert added == {"alice": 3, "bob": 3, "carol": 3, "dan": 3}
    # three annotators a conversation: each is topped up by one
    added = store.assign("d", ["alice", "bob", "carol", "dan"], 3, author="lead")
    assert sum(added.values()) == 21 and max(added.values()) - min(added.values()) <= 1
    assert all(len(names) == 3 for names in assignments(store).values())
    with pytest.raises(StoreError, match="3 different annotators, but only 2"):
        store.assign("d", ["alice", "bob"], 3)
    with pytest.raises(StoreError, match="at least 1"):
        store.assign("d", ["alice"], 0)
    with pytest.raises(StoreError, match="at least one annotator"):
        store.assign("d", [], 1)
    with pytest.raises(NotFoundError):
        store.assign("nope", ["alice"], 1)


def test_queues_and_progress_follow_the_done_marks(store):
    ids = add(store, 4)
    store.assign("d", ["alice", "bob"], 1)
    mine = [c.id for c in store.queue("d", "alice", "all")]
    assert len(mine) == 2 and mine == sorted(mine, key=ids.index)
    assert store.progress("d") == {"alice": (0, 2), "bob": (0, 2)}
    first = store.set_span(mine[0], 1, 0, 2, NOISE, expected_version=1, annotator="alice")
    store.mark_labelled(mine[0], True, annotator="alice")
    assert [c.id for c in store.queue("d", "alice")] == mine[1:]  # to do by default
    done = store.queue("d", "alice", "done")
    assert [(c.id, c.version, c.labelled) for c in done] == [(mine[0], first.version, True)]
    assert done[0].preview.startswith("Question")
    assert store.progress("d") == {"alice": (1, 2), "bob": (0, 2)}
    assert store.queue("d", "nobody", "all") == []
    with pytest.raises(StoreError, match="todo, done or all"):
        store.queue("d", "alice", "finished")


def test_deleting_a_dataset_takes_its_copies_and_assignments(store):
    [cid] = add(store)
    store.assign("d", ["alice"], 1)
    store.set_span(cid, 1, 0, 2, NOISE, expected_version=1, annotator="alice")
    store.delete_dataset("d")
    assert [sql(store, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("copies", "assignments", "revisions")] == [0, 0, 0]


# --- review --------------------------------------------------------------------------------------------

def test_accepting_a_copy_makes_it_the_main_labels_marked_reviewed(store, tmp_path):
    first, second = add(store, 2)
    store.set_turn_role(first, 0, LANDMARK, expected_version=1, author="lead")  # main labels at version 2
    alice = store.set_span(first, 1, 0, 2, NOISE, expected_version=1, author="alice", annotator="alice")
    with pytest.raises(StaleVersionError):
        store.accept(first, alice.labels(), reviewer="rev", expected_version=1, source="accepted alice")
    conv = store.accept(first, alice.labels(), reviewer="rev", expected_version=2, source="accepted alice")
    assert conv.labels() == alice.labels() and conv.version == 3 and conv.reviewed_by == "rev" and conv.reviewed
    last = store.history(first)[-1]
    assert (last.kind, last.author, last.action, last.version, last.annotator) == ("review", "rev", "accepted alice", 3, None)
    assert store.conversation(first).reviewed_at == conv.reviewed_at
    assert store.conversation(first, annotator="alice").labels() == alice.labels()  # the copy stays as it was
    assert [c.id for c in store.conversations("d", status="reviewed")] == [first]
    assert [c.id for c in store.conversations("d", status="unreviewed")] == [second]
    assert store.conversations("d")[0].reviewed and store.dataset("d").reviewed == 1
    # edits before the review are not undone past it
    assert not store.can_undo(first) and not store.can_redo(first)
    # accepting what the main labels already are is still a review, with a version of its own
    again = store.accept(second, store.conversation(second).labels(), reviewer="rev", expected_version=1,
                         source="merged alice+bob")
    assert again.version == 2 and [r.kind for r in store.history(second)] == ["import", "review"]
    # export: the reviewed ones only, with the labels the reviewer accepted
    report = export_dataset(store, "d", "sharegpt", tmp_path / "out", reviewed_only=True)
    exported = json.loads((tmp_path / "out" / "d.json").read_text())
    assert report.exported == 2 and exported[0]["conversations"][1]["spans"] == [{"start": 0, "end": 2, "role": "NOISE"}]
    # a later edit of the main labels takes the mark off: the accepted labels are no longer what is there
    store.set_span(second, 0, 0, 1, NOISE, expected_version=2, author="lead")
    assert not store.conversation(second).reviewed
    assert [c.id for c in store.conversations("d", status="reviewed")] == [first]
    assert cli(["export", "d", "--format", "sharegpt", "--out", str(tmp_path / "cli"), "--reviewed-only",
                "--db", store.url]) == 0
    assert len(json.loads((tmp_path / "cli" / "d.json").read_text())) == 1
    assert len(export_dataset(store, "d", "sharegpt", tmp_path / "all").files) == 2  # all conversations by default
    assert len(json.loads((tmp_path / "all" / "d.json").read_text())) == 2


def test_accept_checks_what_it_is_given(store):
    [cid] = add(store)
    labels = store.conversation(cid).labels()
    with pytest.raises(StoreError, match="where the accepted labels come from"):
        store.accept(cid, labels, reviewer="rev", expected_version=1, source=" ")
    with pytest.raises(StoreError, match="annotator needs a non-empty name"):
        store.accept(cid, labels, reviewer="", expected_version=1, source="accepted alice")
    with pytest.raises(StoreError, match="1 turn labels given for 2 turns"):
        store.accept(cid, labels[:1], reviewer="rev", expected_version=1, source="accepted alice")
    with pytest.raises(StoreError, match="outside turn 1"):
        store.accept(cid, [labels[0], (LANDMARK, [Span(0, 99, NOISE)])], reviewer="rev", expected_version=1,
                     source="accepted alice")
    assert store.conversation(cid).version == 1 and not store.conversation(cid).reviewed


def test_accept_refuses_copies_changed_since_the_reviewer_saw_them_and_a_dataset_reads_in_one_go(store):
    """The review's check of the copies it showed is in the accept's own transaction (no window between a
    check and the write); `dataset_copies` reads every copy of a dataset at once."""
    first, second = add(store, 2)
    alice = store.set_span(first, 1, 0, 2, NOISE, expected_version=1, author="alice", annotator="alice")
    store.set_span(first, 1, 0, 2, LANDMARK, expected_version=1, author="bob", annotator="bob")
    seen = {name: c.version for name, c in store.copies(first).items()}
    store.set_span(first, 1, 0, 3, NOISE, expected_version=2, author="alice", annotator="alice")  # meanwhile
    with pytest.raises(StaleVersionError, match="alice's copy changed since it was shown"):
        store.accept(first, alice.labels(), reviewer="rev", expected_version=1, source="accepted alice",
                     expected_copies=seen)
    assert not store.conversation(first).reviewed and store.conversation(first).version == 1
    seen = {name: c.version for name, c in store.copies(first).items()}
    store.accept(first, alice.labels(), reviewer="rev", expected_version=1, source="accepted alice", expected_copies=seen)
    assert store.conversation(first).reviewed_by == "rev"
    store.set_turn_role(second, 0, NOISE, expected_version=1, author="carol", annotator="carol")
    copies = store.dataset_copies("d")
    assert list(copies) == [first, second] and list(copies[first]) == ["alice", "bob"]
    assert copies[second]["carol"].labels == store.copies(second)["carol"].labels
    assert copies[first] == store.copies(first)
    with pytest.raises(NotFoundError):
        store.dataset_copies("nope")
