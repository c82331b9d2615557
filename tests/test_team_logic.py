"""The Team tab's handlers without a browser (issue 23): who may assign and accept, assignments and
progress, agreement over the conversations two or more annotators labelled (on characters and on
tokens), the review of one conversation (accept one version, merge region by region, stale and
refused accepts lose nothing) and the export of what was reviewed."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from models.data.align import Span
from models.hsa import GLOBAL, LANDMARK, NOISE
from workbench import agreement as A
from workbench.store import Store, import_records
from workbench.ui import team_logic as T
from workbench.users import User, Users

QUESTION = "What colour is the circle? I think it is green."
ANSWER = "The circle is red."


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "w.db") as s:
        yield s


def add(store, n: int = 3, dataset: str = "d") -> list[int]:
    records = [(f"r{i}", {"conversations": [{"from": "human", "value": f"{QUESTION} ({i})"},
                                            {"from": "gpt", "value": ANSWER}]}) for i in range(n)]
    report = import_records(store, dataset, records)
    assert not report.errors
    return report.conversation_ids


def label(store, cid: int, annotator: str, turn: int, start: int, end: int, role, done: bool = True):
    """`annotator` labels characters [start, end) of a turn in their copy (and marks it done)."""
    version = store.conversation(cid, annotator=annotator).version
    store.set_span(cid, turn, start, end, role, expected_version=version, author=annotator, annotator=annotator)
    if done:
        store.mark_labelled(cid, True, author=annotator, annotator=annotator)


def team(reviewers=("carol",), annotators=("alice", "bob")) -> Users:
    return Users([User(name, "scrypt$x", frozenset({"annotator", "reviewer"})) for name in reviewers] +
                 [User(name, "scrypt$x") for name in annotators])


NOISE_AT = QUESTION.index("I think")  # the distractor: alice says NOISE, bob leaves it GLOBAL


@pytest.fixture
def labelled(store):
    """Three conversations; alice and bob labelled the first two, alice alone the third."""
    ids = add(store)
    store.assign("d", ["alice", "bob"], 2, author="carol")
    for cid in ids[:2]:
        label(store, cid, "alice", 0, NOISE_AT, len(QUESTION), NOISE)
        label(store, cid, "bob", 1, 0, len(ANSWER), LANDMARK)
    label(store, ids[2], "alice", 0, 0, 4, LANDMARK)
    return ids


# --- who may do what --------------------------------------------------------------------------

def test_without_a_login_everyone_may_and_with_one_only_reviewers():
    users = team()
    assert T.refusal(None, None, "accept labels") is None
    assert T.refusal(users, "carol", "accept labels") is None
    assert "alice is not one" in T.refusal(users, "alice", "accept labels")
    assert "--reviewer" in T.refusal(users, "alice", "accept labels")
    assert "Log in" in T.refusal(users, "mallory", "assign conversations")
    assert T.default_annotators(users) == "alice, bob, carol" and T.default_annotators(None) == ""
    assert T.parse_names(" alice, bob\ncarol,, alice ") == ["alice", "bob", "carol"]
    assert T.acting_name("carol", "typed") == "carol" and T.acting_name(None, " dan ") == "dan"


# --- assign and progress ------------------------------------------------------------------------

def test_assign_says_what_it_added_and_only_a_reviewer_may(store):
    add(store, 4)
    users = team()
    assert T.assign(store, None, "alice", 1) == "Choose a dataset first."
    assert "Only a reviewer" in T.assign(store, "d", "alice, bob", 2, users=users, username="alice")
    assert "mallory cannot log in" in T.assign(store, "d", "alice, mallory", 2, users=users, username="carol")
    assert "Name the annotators" in T.assign(store, "d", " , ", 2)
    assert "whole number" in T.assign(store, "d", "alice", None)
    assert "only 1 were named" in T.assign(store, "d", "alice", 2)
    assert store.progress("d") == {}  # every refusal above assigned nothing
    message = T.assign(store, "d", "alice, bob, carol", 2, users=users, username="carol")
    assert "Assigned 8 more" in message and "alice +3" in message and "bob +3" in message and "carol +2" in message
    assert "Nothing to add" in T.assign(store, "d", "alice, bob, carol", 2, users=users, username="carol")


def test_progress_per_annotator_with_a_chart(store, labelled):
    rows, figure, summary = T.progress_table(store, "d")
    by_name = {row[0]: row for row in rows}
    assert by_name["alice"][1:4] == [3, 3, "100%"] and by_name["bob"][1:4] == [2, 3, "67%"]
    assert by_name["alice"][4] != "—"  # last activity
    assert "5 of 6 assignments done (83%)" in summary and "0 reviewed" in summary
    done, todo = figure.data
    assert list(done.x) == [3, 2] and list(todo.x) == [0, 1] and list(done.y) == ["alice", "bob"]
    add(store, 1, dataset="empty")
    assert T.progress_table(store, "empty")[:2] == ([], None)
    assert "No one has conversations" in T.progress_table(store, "empty")[2]


# --- agreement --------------------------------------------------------------------------------

def test_agreement_on_characters_is_the_reports_over_the_doubly_labelled_conversations(store, labelled):
    view = T.agreement(store, "d", "char")
    assert "over 2 conversations" in view.summary and "1 skipped" in view.summary and "alice, bob" in view.summary
    items = [(store.conversation(c).as_conversation(), {n: x.labels for n, x in store.copies(c).items()})
             for c in labelled[:2]]
    report = A.agreement_report(items, unit="char")
    cohen, fleiss, alpha = view.overall
    assert cohen[0] == "Cohen's κ (alice vs bob)" and cohen[1] == f"{report.cohen.value:.3f}"
    assert cohen[2] == T.kappa_reading(report.cohen) and alpha[2] == T.alpha_reading(report.alpha)
    assert fleiss[1] == f"{report.fleiss.value:.3f}" and alpha[1] == f"{report.alpha.value:.3f}"
    assert "Landis & Koch" in view.summary and "Krippendorff's thresholds" in view.summary
    (pair,) = view.pairs
    assert pair[:4] == ["alice", "bob", 2, report.units]
    assert [row[0] for row in view.roles] == ["GLOBAL", "LANDMARK", "NOISE"]
    heatmap = view.figure.data[0]
    assert np.asarray(heatmap.customdata).sum() == report.units and "alice" in view.figure.layout.title.text


def test_agreement_on_tokens_and_what_it_cannot_do(store, labelled, bpe_tokenizer):
    view = T.agreement(store, "d", "token", "tiny", processor_for=lambda name: bpe_tokenizer)
    assert "Agreement on tokens of tiny" in view.summary and view.overall
    units = sum(len(A.token_units(store.conversation(c).as_conversation(), bpe_tokenizer)) for c in labelled[:2])
    assert view.pairs[0][3] == units

    def missing(name):
        raise OSError(f"no model at {name}")

    assert "could not be loaded" in T.agreement(store, "d", "token", "/nowhere", processor_for=missing).summary
    assert "over 2 conversations" in T.agreement(store, "d", "char", done_only=True).summary
    label(store, labelled[0], "bob", 0, 0, 3, NOISE, done=False)
    store.mark_labelled(labelled[0], False, author="bob", annotator="bob")
    assert "over 1 conversations" in T.agreement(store, "d", "char", done_only=True).summary
    add(store, 2, dataset="fresh")
    assert "No conversation of **fresh** has copies" in T.agreement(store, "fresh", "char").summary
    assert T.agreement(store, None).summary == "Choose a dataset first."


def test_three_annotators_have_no_single_cohens_kappa_but_pairs(store, labelled):
    label(store, labelled[0], "carol", 0, 0, 4, NOISE)
    view = T.agreement(store, "d", "char")
    assert [row[0] for row in view.overall] == ["Fleiss' κ", "Krippendorff's α"]
    assert [row[:2] for row in view.pairs] == [["alice", "bob"], ["alice", "carol"], ["bob", "carol"]]
    assert "units have 2 to 3 annotators" in view.overall[0][2]  # Fleiss needs the same number on every unit


@pytest.mark.parametrize("value, words", [(-0.1, "poor"), (0.0, "slight"), (0.2, "slight"), (0.35, "fair"),
                                          (0.5, "moderate"), (0.7, "substantial"), (0.95, "almost perfect"),
                                          (1.0, "almost perfect")])
def test_kappa_in_plain_words(value, words):
    assert T.kappa_reading(A.Score(value, 10)).startswith(words)


def test_alpha_in_plain_words_and_undefined_says_why():
    assert T.alpha_reading(A.Score(0.85, 9)).startswith("reliable")
    assert T.alpha_reading(A.Score(0.7, 9)).startswith("tentative")
    assert T.alpha_reading(A.Score(0.3, 9)).startswith("unreliable")
    assert T.kappa_reading(A.Score(None, 9, "only one role")) == "only one role"
    assert T.number(A.Score(None, 9, "x")) == "undefined"


# --- review -----------------------------------------------------------------------------------

def test_the_review_list_and_the_side_by_side_view(store, labelled):
    rows, choices, summary = T.review_list(store, "d")
    assert [row[0] for row in rows] == [1, 2] and rows[0][2] == "alice ✓, bob ✓" and rows[0][3] == ""
    assert [value for _, value in choices] == labelled[:2] and "not reviewed" in choices[0][0]
    assert "2 conversations with two or more copies · 0 reviewed" == summary
    view = T.open_review(store, labelled[0])
    assert view.annotators == ["alice", "bob"]
    assert view.shown == {"conv_id": labelled[0], "version": 1, "copies": {"alice": 2, "bob": 2}}
    # the distractor (alice NOISE, bob GLOBAL) and the answer (alice GLOBAL, bob LANDMARK)
    assert [row[1:3] + row[4:] for row in view.regions] == [
        [0, f"{NOISE_AT}–{len(QUESTION)}", "alice NOISE, bob GLOBAL", "alice"],
        [1, f"0–{len(ANSWER)}", "alice GLOBAL, bob LANDMARK", "alice"]]
    assert view.html.count('class="who"') == 2 and view.html.count('class="turn"') == 4
    assert 'class="r2 dis" data-region="1"' in view.html and 'class="r1 dis" data-region="2"' in view.html
    assert "2 regions where they differ" in view.status and "not reviewed yet" in view.status
    assert "gone" in T.open_review(store, 10_000).status


def test_the_text_is_escaped_and_coloured_by_role_runs(store):
    (cid,) = import_records(store, "x", [("r", {"conversations": [
        {"from": "human", "value": "<b>bold</b> & more"}, {"from": "gpt", "value": "ok"}]})]).conversation_ids
    label(store, cid, "alice", 0, 0, 3, LANDMARK)
    label(store, cid, "bob", 0, 0, 11, NOISE)
    view = T.open_review(store, cid)
    assert "<b>bold" not in view.html and "&lt;b&gt;" in view.html
    regions = A.disagreements(store.conversation(cid).as_conversation(),
                              {n: c.labels for n, c in store.copies(cid).items()})
    assert [(r.start, r.end) for r in regions] == [(0, 3), (3, 11)]
    assert view.html.count('<sup class="rn">1</sup>') == 2 and view.html.count('<sup class="rn">2</sup>') == 2


def test_accepting_one_version_writes_it_as_the_reviewed_labels(store, labelled):
    view = T.open_review(store, labelled[0])
    after = T.accept(store, view.shown, "bob", view.regions, users=team(), username="carol")
    conv = store.conversation(labelled[0])
    assert conv.labels() == store.copies(labelled[0])["bob"].labels and conv.reviewed_by == "carol"
    assert store.history(labelled[0])[-1].action == "accepted bob"
    assert "✓ Accepted bob's version" in after.status and "reviewed by carol" in after.status
    rows, choices, _ = T.review_list(store, "d")
    assert rows[0][3] == "carol" and rows[0][4] != "" and "✓ reviewed by carol" in choices[0][0]


def test_merging_takes_each_region_from_whom_the_table_says(store, labelled):
    view = T.open_review(store, labelled[0])
    rows = [list(row) for row in view.regions]
    rows[1][T.TAKE] = "bob"  # the answer as bob labelled it, the distractor as alice did
    after = T.accept(store, view.shown, None, rows, typed_name="dan")
    copies = {n: c.labels for n, c in store.copies(labelled[0]).items()}
    expected = A.merge(store.conversation(labelled[0]).as_conversation(), copies,
                       {view_key(view, 1): "bob"}, default="alice")
    conv = store.conversation(labelled[0])
    assert conv.labels() == expected == [(GLOBAL, [Span(NOISE_AT, len(QUESTION), NOISE)]),
                                         (GLOBAL, [Span(0, len(ANSWER), LANDMARK)])]
    assert conv.reviewed_by == "dan" and store.history(labelled[0])[-1].action == "merged alice+bob"
    assert "the merge of alice and bob" in after.status
    assert [row[T.TAKE] for row in after.regions] == ["alice", "bob"]  # the choices stay on view
    rows = [list(row) for row in after.regions]
    rows[0][T.TAKE] = rows[1][T.TAKE] = "bob"
    T.accept(store, after.shown, None, rows, typed_name="dan")
    assert store.history(labelled[0])[-1].action == "accepted bob"  # bob in every region is bob's version


def test_what_changed_in_the_copies_in_words():
    assert T.copies_changed({"alice": 2, "bob": 2}, {"alice": 2, "bob": 2}) == ""
    assert T.copies_changed({"alice": 2, "bob": 2}, {"bob": 5, "carol": 1}) == (
        "alice's copy is gone; bob changed their copy (version 2 shown, now 5); carol has a copy now")


def view_key(view, row: int):
    turn, characters = view.regions[row][1], view.regions[row][2]
    start, end = characters.split("–")
    return (turn, int(start), int(end))


def test_refused_accepts_change_nothing_and_keep_the_choices(store, labelled):
    view = T.open_review(store, labelled[0])
    rows = [list(row) for row in view.regions]
    rows[0][T.TAKE] = "bob"
    before = store.conversation(labelled[0])

    def unchanged(result, words):
        assert words in result.status, result.status
        conv = store.conversation(labelled[0])
        assert (conv.version, conv.labels(), conv.reviewed_by) == (before.version, before.labels(), None)
        assert [row[T.TAKE] for row in result.regions] == ["bob", "alice"]

    unchanged(T.accept(store, view.shown, "alice", rows, users=team(), username="alice"), "Only a reviewer")
    unchanged(T.accept(store, view.shown, "alice", rows), "Type your name")
    unchanged(T.accept(store, view.shown, "mallory", rows, typed_name="dan"), "mallory has no copy")
    typo = [list(row) for row in rows]
    typo[1][T.TAKE] = "bobb"
    unchanged(T.accept(store, view.shown, None, typo, typed_name="dan"), "bobb in the 'take' column")
    # bob changes his copy after the view was shown: accepting what was shown is refused
    label(store, labelled[0], "bob", 1, 0, 3, NOISE)
    changed = T.accept(store, view.shown, "bob", rows, typed_name="dan")
    assert "bob changed their copy (version 2 shown, now 3) since the copies were shown" in changed.status
    assert store.conversation(labelled[0]).reviewed_by is None
    # someone else accepts meanwhile: the view's version is stale
    other = T.open_review(store, labelled[0])
    T.accept(store, other.shown, "alice", other.regions, typed_name="erin")
    stale = T.accept(store, other.shown, "bob", other.regions, typed_name="dan")
    assert "Not accepted" in stale.status and "erin" in stale.status and "choices are kept" in stale.status
    assert store.conversation(labelled[0]).reviewed_by == "erin"
    assert store.history(labelled[0])[-1].action == "accepted alice"
    assert "reviewed by erin" in stale.status and stale.shown["version"] == store.conversation(labelled[0]).version
    again = T.accept(store, stale.shown, "bob", stale.regions, typed_name="dan")  # seen it: accept over it
    assert "✓ Accepted bob's version" in again.status and store.conversation(labelled[0]).reviewed_by == "dan"


def test_a_conversation_deleted_meanwhile(store, labelled):
    view = T.open_review(store, labelled[0])
    store.delete_dataset("d")
    gone = T.accept(store, view.shown, "alice", view.regions, typed_name="dan")
    assert "gone" in gone.status and gone.shown["conv_id"] == -1
    assert "Choose a conversation" in T.accept(store, gone.shown, "alice", [], typed_name="dan").status


# --- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, turns", [("sharegpt", "conversations"), ("llamafactory", "messages")])
def test_export_reviewed_only(store, labelled, tmp_path, fmt, turns):
    exports = tmp_path / "exports"
    exports.mkdir()
    assert T.export_reviewed(store, "d", fmt, exports) == (None, "Nothing to export: no conversation of **d** is "
                                                                 "reviewed yet.")
    view = T.open_review(store, labelled[1])
    T.accept(store, view.shown, "bob", view.regions, typed_name="dan")
    archive, message = T.export_reviewed(store, "d", fmt, exports)
    assert "Exported 1 reviewed conversation of **d** (of 3) as" in message
    with zipfile.ZipFile(archive) as z:
        (records,) = [json.loads(z.read(n)) for n in z.namelist() if n == "d.json"]
    assert len(records) == 1 and f"({1})" in json.dumps(records[0][turns], ensure_ascii=False)
    second, _ = T.export_reviewed(store, "d", fmt, exports)  # within the same second: a file of its own
    assert second != archive
    assert T.export_reviewed(store, None, fmt, exports)[1] == "Choose a dataset first."
    assert "Unknown format" in T.export_reviewed(store, "d", "semantic-ids", exports)[1]


def test_a_dataset_deleted_meanwhile_is_said_plainly_everywhere(store, labelled, tmp_path):
    store.delete_dataset("d")
    assert T.assign(store, "d", "alice, bob", 2).startswith("⚠️ Not assigned:")
    assert T.progress_table(store, "d")[:2] == ([], None) and T.progress_table(store, "d")[2].startswith("⚠️")
    assert T.review_list(store, "d")[:2] == ([], []) and T.review_list(store, "d")[2].startswith("⚠️")
    assert T.agreement(store, "d").summary.startswith("⚠️")
    assert T.export_reviewed(store, "d", "sharegpt", tmp_path)[0] is None
