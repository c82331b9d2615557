"""workbench.agreement against independent references: scikit-learn's Cohen's kappa and confusion
matrix, statsmodels' Fleiss' kappa, the krippendorff package, the store's own span arithmetic and
the training's alignment (align_record), and brute-force per-character references for the
disagreement regions and the review merge."""
from __future__ import annotations

import random
import warnings

import krippendorff
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import cohen_kappa_score, confusion_matrix as sk_confusion
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

from models.data.align import Conversation, Span, Turn, align_record
from workbench import agreement as A
from workbench.store import labels as L

TEXTS = ["<image>What color is the circle?", "The circle is red.", "I think the square is green.",
         "Okay.", "How many shapes are there?", "There are three shapes.", ""]


def conversation(rng: random.Random, turns: int | None = None) -> Conversation:
    speakers = ["user", "assistant"]
    n = turns or rng.randint(1, 5)
    texts = [rng.choice(TEXTS[1:-1]) for _ in range(n)]
    texts[0] = TEXTS[0]
    return Conversation([Turn(speakers[i % 2], text) for i, text in enumerate(texts)], [], "test")


def random_labels(rng: random.Random, conv: Conversation, paints: int = 3) -> A.Labels:
    """Labels as the store keeps them: a turn role and canonical spans (some of the turn's own role)."""
    labels = []
    for turn in conv.turns:
        spans = []
        for _ in range(rng.randint(0, paints)):
            if turn.text:
                start = rng.randrange(len(turn.text))
                spans = L.paint(spans, start, rng.randint(start + 1, len(turn.text)), rng.choice(A.ROLES))
        labels.append((rng.choice(A.ROLES), L.canonical(spans)))
    return labels


def chars_reference(conv: Conversation, labels) -> list[int]:
    """Per character, end to end, with the store's own reference function."""
    return [r for turn, (role, spans) in zip(conv.turns, labels) for r in L.char_roles(role, spans, len(turn.text))]


# --- per-unit roles ---------------------------------------------------------------------------

def test_char_roles_match_the_store_reference():
    rng = random.Random(0)
    for _ in range(200):
        conv = conversation(rng)
        labels = random_labels(rng, conv)
        got = A.char_roles(conv, labels)
        assert [len(r) for r in got] == [len(t.text) for t in conv.turns]
        assert np.concatenate(got).tolist() == chars_reference(conv, labels)
        assert A._flat_char_roles([len(t.text) for t in conv.turns], labels).tolist() == chars_reference(conv, labels)


def test_labels_that_do_not_fit_the_conversation_are_refused():
    conv = Conversation([Turn("user", "abc")])
    with pytest.raises(ValueError, match="2 turn labels for 1 turns"):
        A.char_roles(conv, [(0, []), (0, [])])
    with pytest.raises(ValueError, match="outside its text"):
        A.char_roles(conv, [(0, [Span(1, 9, 2)])])


@pytest.mark.parametrize("which", ["bpe_tokenizer", "wordpiece_tokenizer"])
def test_token_roles_are_the_trainings_semantic_ids_on_text_tokens(which, request):
    processor = request.getfixturevalue(which)
    rng = random.Random(1)
    for _ in range(40):
        conv = conversation(rng)
        units = A.token_units(conv, processor)
        for _ in range(3):
            labels = random_labels(rng, conv, paints=4)
            labelled = Conversation([Turn(t.speaker, t.text, role, list(spans))
                                     for t, (role, spans) in zip(conv.turns, labels)], [], "x")
            aligned = align_record(labelled, processor)
            text_tokens = [k for k, span in enumerate(aligned.char_spans) if span is not None]
            assert 0 < len(text_tokens) < len(aligned)  # template tokens are left out
            expected = aligned.semantic_ids[text_tokens].tolist()
            assert A.token_roles(conv, labels, processor, units=units).tolist() == expected
            assert A.token_roles(conv, labels, processor).tolist() == expected


def test_token_roles_with_an_image_leave_the_image_tokens_out(qwen2vl_processor, tmp_path):
    from tests.conftest import shapes_png

    image = shapes_png(tmp_path / "a.png")
    conv = Conversation([Turn("user", "<image>What color is the circle?"), Turn("assistant", "The circle is red.")],
                        [str(image)], "img")
    labels = [(0, [Span(0, 12, 2)]), (1, [Span(4, 10, 0)])]
    labelled = Conversation([Turn(t.speaker, t.text, r, s) for t, (r, s) in zip(conv.turns, labels)], conv.images)
    aligned = align_record(labelled, qwen2vl_processor)
    text_tokens = [k for k, span in enumerate(aligned.char_spans) if span is not None]
    assert "<|image_pad|>" not in [aligned.tokens[k] for k in text_tokens]
    assert A.token_roles(conv, labels, qwen2vl_processor).tolist() == aligned.semantic_ids[text_tokens].tolist()


# --- coefficients against the libraries -------------------------------------------------------

def fleiss_reference(counts) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):  # statsmodels says nan where kappa is undefined
        return sm_fleiss(counts, method="fleiss")


def random_pair(rng: np.random.Generator, n: int, agree: float):
    a = rng.integers(0, 3, n)
    b = np.where(rng.random(n) < agree, a, rng.integers(0, 3, n))
    return a.astype(np.int8), b.astype(np.int8)


def test_cohen_kappa_and_confusion_match_scikit_learn():
    rng = np.random.default_rng(0)
    for n, agree in [(1, 0.5), (2, 0.5), (7, 0.3), (100, 0.8), (5000, 0.95), (300, 0.0)]:
        a, b = random_pair(rng, n, agree)
        matrix = A.confusion_matrix(a, b)
        assert (matrix == sk_confusion(a, b, labels=[0, 1, 2])).all()
        score = A.cohen_kappa(matrix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = cohen_kappa_score(a, b, labels=[0, 1, 2])
        if np.isnan(expected):
            assert score.value is None and score.reason
        else:
            assert score.value == pytest.approx(expected, abs=1e-12) and score.units == n
        for r in A.ROLES:  # one role against the rest
            per_role = A.cohen_kappa(A._one_vs_rest(matrix, r))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = cohen_kappa_score(a == r, b == r)
            assert (per_role.value is None) == bool(np.isnan(expected))
            if per_role.value is not None:
                assert per_role.value == pytest.approx(expected, abs=1e-12)


def test_cohen_kappa_when_both_say_one_role_everywhere_is_undefined_not_one():
    a = np.full(50, A.GLOBAL, np.int8)
    score = A.cohen_kappa(A.confusion_matrix(a, a))
    assert score.value is None and "chance agreement is 1" in score.reason and score.units == 50
    assert np.isnan(float(score))
    assert A.cohen_kappa(np.zeros((3, 3), int)) == A.Score(None, 0, "no unit labelled by both annotators")
    # one annotator varies, the other does not: defined, and 0 (no agreement beyond chance)
    b = a.copy()
    b[:10] = A.NOISE
    assert A.cohen_kappa(A.confusion_matrix(a, b)).value == pytest.approx(cohen_kappa_score(a, b))


def test_fleiss_kappa_matches_statsmodels():
    rng = np.random.default_rng(1)
    for raters, units in [(2, 10), (3, 50), (5, 400), (4, 1)]:
        truth = rng.integers(0, 3, units)
        roles = np.where(rng.random((raters, units)) < 0.7, truth, rng.integers(0, 3, (raters, units)))
        counts = A.role_counts(roles)
        score = A.fleiss_kappa(counts)
        expected = fleiss_reference(counts)
        if np.isnan(expected) or np.isinf(expected):
            assert score.value is None
        else:
            assert score.value == pytest.approx(expected, abs=1e-12) and score.units == units
        for r in A.ROLES:
            binary = np.stack([counts[:, r], raters - counts[:, r]], axis=1)
            expected = fleiss_reference(binary)
            got = A.fleiss_kappa(binary)
            assert (got.value is None) == bool(np.isnan(expected) or np.isinf(expected))
            if got.value is not None:
                assert got.value == pytest.approx(expected, abs=1e-12)


def test_fleiss_kappa_says_why_it_is_undefined():
    same = A.role_counts(np.full((3, 20), A.NOISE))
    assert A.fleiss_kappa(same).value is None and "same role" in A.fleiss_kappa(same).reason
    roles = np.array([[0, 1, 2, 0], [0, 1, 1, 0], [A.MISSING, 1, 2, 2]])  # 2 or 3 annotators per unit
    score = A.fleiss_kappa(A.role_counts(roles))
    assert score.value is None and "2 to 3 annotators" in score.reason
    alone = np.array([[0, 1], [A.MISSING, A.MISSING]])
    assert A.fleiss_kappa(A.role_counts(alone)) == A.Score(None, 0, "no unit has two annotators")


def krippendorff_reference(roles: np.ndarray) -> float:
    data = roles.astype(float)
    data[roles == A.MISSING] = np.nan
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            return krippendorff.alpha(reliability_data=data, level_of_measurement="nominal", value_domain=[0, 1, 2])
    except ValueError:  # the package refuses data with no pairable unit
        return float("nan")


def test_krippendorff_alpha_matches_the_package_with_missing_values_and_varying_counts():
    rng = np.random.default_rng(2)
    for raters, units, missing in [(2, 30, 0.0), (3, 200, 0.3), (6, 500, 0.6), (2, 5, 0.4)]:
        truth = rng.integers(0, 3, units)
        roles = np.where(rng.random((raters, units)) < 0.75, truth, rng.integers(0, 3, (raters, units)))
        roles = np.where(rng.random((raters, units)) < missing, A.MISSING, roles)
        counts = A.role_counts(roles)
        score = A.krippendorff_alpha(counts)
        assert score.units == int((counts.sum(axis=1) >= 2).sum())
        expected = krippendorff_reference(roles)
        assert (score.value is None) == bool(np.isnan(expected))
        if score.value is not None:
            assert score.value == pytest.approx(expected, abs=1e-10)
        for r in A.ROLES:
            binary = np.where(roles == A.MISSING, A.MISSING, (roles != r).astype(int))
            got = A.krippendorff_alpha(np.stack([counts[:, r], counts.sum(axis=1) - counts[:, r]], axis=1))
            try:
                expected = krippendorff.alpha(reliability_data=np.where(binary < 0, np.nan, binary.astype(float)),
                                              level_of_measurement="nominal", value_domain=[0, 1])
            except ValueError:
                expected = float("nan")
            assert (got.value is None) == bool(np.isnan(expected))
            if got.value is not None:
                assert got.value == pytest.approx(expected, abs=1e-10)


def test_unit_profiles_are_the_counts_compressed():
    rng = np.random.default_rng(3)
    for raters in (2, 3, 7):
        roles = np.where(rng.random((raters, 2000)) < 0.3, A.MISSING, rng.integers(0, 3, (raters, 2000)))
        counts, weights = A.unit_profiles(roles)
        expanded = np.repeat(counts, weights, axis=0)
        rows = A.role_counts(roles)
        assert sorted(map(tuple, expanded)) == sorted(map(tuple, rows)) and weights.sum() == 2000
        assert A.krippendorff_alpha(counts, weights).value == pytest.approx(A.krippendorff_alpha(rows).value, abs=1e-12)
        full = roles[:, (roles >= 0).all(axis=0)]  # every annotator on every unit: Fleiss defined
        assert A.fleiss_kappa(*A.unit_profiles(full)).value == pytest.approx(fleiss_reference(A.role_counts(full)))


def test_krippendorff_alpha_undefined_cases():
    same = np.full((2, 10), A.LANDMARK)
    assert np.isnan(krippendorff_reference(same))  # the package says nan (0/0) too
    score = A.krippendorff_alpha(A.role_counts(same))
    assert score.value is None and "only one role" in score.reason
    lonely = np.array([[0, A.MISSING], [A.MISSING, 1]])  # no unit has two values
    assert A.krippendorff_alpha(A.role_counts(lonely)).value is None
    # a textbook case (Krippendorff 2011, nominal, 4 coders x 12 units with gaps): alpha = 0.743
    data = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, -1, -1, -1],
                     [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, -1, 3],
                     [-1, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, -1],
                     [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, -1]])
    counts = np.stack([(data == v).sum(axis=0) for v in range(1, 6)], axis=1)
    assert A.krippendorff_alpha(counts).value == pytest.approx(0.743, abs=5e-4)


# --- the report -------------------------------------------------------------------------------

def test_report_pools_conversations_and_matches_references_at_the_char_level():
    rng = random.Random(3)
    items, a_all, b_all, c_ab = [], [], [], 0
    for i in range(60):
        conv = conversation(rng)
        ann = random_labels(rng, conv)
        labels = {"ann": ann}
        if i % 5:  # every fifth conversation has one annotator only: skipped
            labels["bob"] = ann if i % 7 == 0 else random_labels(rng, conv)
            keep = [not (turn.text[:len("<image>")] == "<image>" and c < 7)
                    for turn in conv.turns for c in range(len(turn.text))]
            a_all += [r for r, k in zip(chars_reference(conv, labels["ann"]), keep) if k]
            b_all += [r for r, k in zip(chars_reference(conv, labels["bob"]), keep) if k]
            c_ab += 1
        items.append((conv, labels))
    report = A.agreement_report(items, unit="char")
    a, b = np.array(a_all), np.array(b_all)
    assert report.unit == "char" and report.annotators == ("ann", "bob")
    assert report.conversations == c_ab == 48 and report.skipped == 12 and report.units == len(a)
    pair = report.pairs[("ann", "bob")]
    assert pair.units == len(a) and pair.conversations == c_ab
    assert (pair.confusion == sk_confusion(a, b, labels=[0, 1, 2])).all()
    assert pair.kappa.value == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert report.cohen == pair.kappa
    assert pair.observed == pytest.approx((a == b).mean())
    assert report.unanimous == pytest.approx((a == b).mean())
    for r, name in zip(A.ROLES, A.ROLE_LABELS):
        assert pair.per_role[name].value == pytest.approx(cohen_kappa_score(a == r, b == r), abs=1e-12)
        assert report.role_totals[name] == int((a == r).sum() + (b == r).sum())
    counts = A.role_counts(np.stack([a, b]))
    assert report.fleiss.value == pytest.approx(fleiss_reference(counts), abs=1e-12)
    assert report.alpha.value == pytest.approx(krippendorff_reference(np.stack([a, b])), abs=1e-10)
    assert (report.confusion == pair.confusion + pair.confusion.T).all()


def test_report_with_annotators_missing_here_and_there():
    """Three annotators, each conversation labelled by two or three of them: Fleiss is refused
    (the count varies), alpha takes every unit, each pair's kappa its shared conversations."""
    rng = random.Random(4)
    items, rows = [], {"a": [], "b": [], "c": []}
    for i in range(30):
        conv = conversation(rng)
        who = ["a", "b", "c"] if i % 3 == 0 else (["a", "b"] if i % 3 == 1 else ["b", "c"])
        labels = {w: random_labels(rng, conv) for w in who}
        items.append((conv, labels))
        keep = np.array([not (t.text.startswith("<image>") and c < 7) for t in conv.turns for c in range(len(t.text))])
        for w in rows:
            rows[w].append(np.array(chars_reference(conv, labels[w]))[keep] if w in labels
                           else np.full(int(keep.sum()), A.MISSING))
    matrix = np.stack([np.concatenate(rows[w]) for w in "abc"])
    report = A.agreement_report(items)
    assert report.fleiss.value is None and "2 to 3 annotators" in report.fleiss.reason
    assert report.alpha.value == pytest.approx(krippendorff_reference(matrix), abs=1e-10)
    assert report.cohen.value is None and "per pair" in report.cohen.reason
    assert report.pairs[("a", "b")].conversations == 20 and report.pairs[("a", "c")].conversations == 10
    for (x, y), pair in report.pairs.items():
        both = (matrix["abc".index(x)] >= 0) & (matrix["abc".index(y)] >= 0)
        first, second = matrix["abc".index(x)][both], matrix["abc".index(y)][both]
        assert pair.units == both.sum()
        assert pair.kappa.value == pytest.approx(cohen_kappa_score(first, second), abs=1e-12)


def test_report_where_everyone_agrees_on_one_role():
    conv = Conversation([Turn("user", "hello"), Turn("assistant", "hi there")])
    same = [(A.GLOBAL, []), (A.GLOBAL, [])]
    report = A.agreement_report([(conv, {"x": same, "y": same})] * 3)
    assert report.units == 39 and report.unanimous == 1.0
    for score in (report.cohen, report.fleiss, report.alpha):
        assert score.value is None and score.reason
    assert report.alpha_per_role["GLOBAL"].value is None
    # agreement on two roles: every coefficient is exactly 1
    mixed = [(A.GLOBAL, []), (A.NOISE, [Span(0, 2, A.LANDMARK)])]
    report = A.agreement_report([(conv, {"x": mixed, "y": mixed})])
    assert report.cohen.value == report.fleiss.value == report.alpha.value == 1.0
    assert report.pairs[("x", "y")].per_role["NOISE"].value == 1.0


def test_report_with_nothing_to_compare():
    conv = Conversation([Turn("user", "hello")])
    report = A.agreement_report([(conv, {"x": [(0, [])]})])
    assert report.conversations == 0 and report.skipped == 1 and report.units == 0 and report.pairs == {}
    assert report.unanimous is None and report.alpha.value is None and report.fleiss.value is None
    with pytest.raises(ValueError, match="unit must be"):
        A.agreement_report([], unit="word")
    with pytest.raises(ValueError, match="tokenizer or processor"):
        A.agreement_report([], unit="token")


def test_report_on_tokens_uses_the_token_roles(bpe_tokenizer):
    rng = random.Random(5)
    items, a_all, b_all = [], [], []
    for _ in range(15):
        conv = conversation(rng)
        labels = {"ann": random_labels(rng, conv), "bob": random_labels(rng, conv)}
        items.append((conv, labels))
        a_all += A.token_roles(conv, labels["ann"], bpe_tokenizer).tolist()
        b_all += A.token_roles(conv, labels["bob"], bpe_tokenizer).tolist()
    report = A.agreement_report(items, unit="token", processor=bpe_tokenizer)
    assert report.unit == "token" and report.units == len(a_all)
    assert report.cohen.value == pytest.approx(cohen_kappa_score(a_all, b_all), abs=1e-12)


def test_confusion_figure_shows_counts_and_row_shares():
    matrix = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    figure = A.confusion_figure(matrix, title="ann vs bob")
    heatmap = figure.data[0]
    assert heatmap.type == "heatmap" and list(heatmap.x) == list(A.ROLE_LABELS)
    assert heatmap.text[0][0] == "8<br>80.0%" and heatmap.text[1][1] == "3<br>75.0%"
    assert heatmap.text[2][2] == "0<br>—"  # nobody gave that role: no share to show
    assert np.allclose(np.array(heatmap.z, dtype=float)[0], [0.8, 0.2, 0.0])
    assert "ann vs bob: 14 units" in figure.layout.title.text


# --- disagreements and merge: brute force per character ---------------------------------------

def regions_reference(conv: Conversation, annotations) -> list[tuple]:
    """Walk every character; a region grows while the tuple of roles stays the same."""
    names, found = list(annotations), []
    for t, turn in enumerate(conv.turns):
        columns = [tuple(L.char_roles(*annotations[w][t], len(turn.text))[c] for w in names)
                   for c in range(len(turn.text))]
        c = 0
        while c < len(columns):
            end = c
            while end < len(columns) and columns[end] == columns[c]:
                end += 1
            if len(set(columns[c])) > 1:
                found.append((t, c, end, dict(zip(names, columns[c]))))
            c = end
    return found


def merge_reference(conv, annotations, choices, default) -> list[list[int]]:
    regions = regions_reference(conv, annotations)
    result = []
    for t, turn in enumerate(conv.turns):
        roles = {w: L.char_roles(*annotations[w][t], len(turn.text)) for w in annotations}
        row = []
        for c in range(len(turn.text)):
            column = {roles[w][c] for w in annotations}
            if len(column) == 1:
                row.append(column.pop())
            else:
                key = next((r[0], r[1], r[2]) for r in regions if r[0] == t and r[1] <= c < r[2])
                row.append(roles[choices.get(key, default)][c])
        result.append(row)
    return result


@st.composite
def reviews(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    conv = conversation(rng)
    names = ["ann", "bob", "cy"][:draw(st.integers(2, 3))]
    annotations = {w: random_labels(rng, conv, paints=draw(st.integers(0, 4))) for w in names}
    if draw(st.booleans()):  # annotators copying each other's turns: agreement with different representations
        annotations[names[1]][0] = annotations[names[0]][0]
    regions = A.disagreements(conv, annotations)
    choices = {r.key: rng.choice(names) for r in regions if rng.random() < draw(st.floats(0, 1))}
    return conv, annotations, choices, rng.choice(names)


@settings(max_examples=300, deadline=None)
@given(reviews())
def test_disagreements_are_the_brute_force_regions(review):
    conv, annotations, _, _ = review
    got = [(r.turn, r.start, r.end, r.roles) for r in A.disagreements(conv, annotations)]
    assert got == regions_reference(conv, annotations)


@settings(max_examples=300, deadline=None)
@given(reviews())
def test_merge_gives_the_chosen_roles_in_canonical_store_form(review):
    conv, annotations, choices, default = review
    merged = A.merge(conv, annotations, choices, default)
    assert len(merged) == len(conv.turns)
    expected = merge_reference(conv, annotations, choices, default)
    for turn, (role, spans), want in zip(conv.turns, merged, expected):
        assert L.char_roles(role, spans, len(turn.text)) == want
        assert L.canonical(spans) == spans  # what the store would keep, unchanged
        assert all(0 <= s.start < s.end <= len(turn.text) and s.role in A.ROLES for s in spans)
        assert role in A.ROLES
    # accepting one annotator wholesale returns exactly their labels (representation included)
    for who in annotations:
        assert A.merge(conv, annotations, {}, who) == annotations[who]
        everywhere = {r.key: who for r in A.disagreements(conv, annotations)}
        assert A.merge(conv, annotations, everywhere, who) == annotations[who]
        # chosen everywhere over another default: their turns wherever there was something to choose
        other = next(w for w in annotations if w != who)
        turns_with_regions = {key[0] for key in everywhere}
        got = A.merge(conv, annotations, everywhere, other)
        assert [got[t] for t in sorted(turns_with_regions)] == [annotations[who][t] for t in sorted(turns_with_regions)]


def test_merge_span_by_span_example():
    conv = Conversation([Turn("user", "I think it is red. What color?"), Turn("assistant", "Blue.")])
    ann = [(A.GLOBAL, [Span(0, 18, A.NOISE)]), (A.LANDMARK, [])]
    bob = [(A.GLOBAL, [Span(0, 8, A.NOISE)]), (A.NOISE, [])]
    regions = A.disagreements(conv, {"ann": ann, "bob": bob})
    assert [(r.key, r.roles) for r in regions] == [((0, 8, 18), {"ann": A.NOISE, "bob": A.GLOBAL}),
                                                   ((1, 0, 5), {"ann": A.LANDMARK, "bob": A.NOISE})]
    merged = A.merge(conv, {"ann": ann, "bob": bob}, {(1, 0, 5): "bob"}, default="ann")
    assert merged == [(A.GLOBAL, [Span(0, 18, A.NOISE)]), (A.NOISE, [])]
    merged = A.merge(conv, {"ann": ann, "bob": bob}, {(0, 8, 18): "bob"}, default="ann")
    assert merged == [(A.GLOBAL, [Span(0, 8, A.NOISE)]), (A.LANDMARK, [])]


def test_merge_refuses_unknown_regions_and_annotators():
    conv = Conversation([Turn("user", "abcdef")])
    annotations = {"ann": [(0, [Span(0, 3, 2)])], "bob": [(0, [])]}
    with pytest.raises(ValueError, match="no disagreement region"):
        A.merge(conv, annotations, {(0, 0, 2): "bob"}, "ann")
    with pytest.raises(ValueError, match="'zed' has no labels"):
        A.merge(conv, annotations, {(0, 0, 3): "zed"}, "ann")
    with pytest.raises(ValueError, match="default annotator"):
        A.merge(conv, annotations, {}, "zed")


def test_spans_of_the_turns_own_role_can_split_tokens_where_characters_agree(bpe_tokenizer):
    """A span of the turn's role changes nothing per character but can win a token that a NOISE span
    touches (align's token_role counts spanned characters): the char units see full agreement, the
    token units do not, and the merge keeps whichever version it starts from as it is."""
    conv = Conversation([Turn("user", "The circle is red.")])
    ann = [(A.GLOBAL, [Span(0, 8, A.GLOBAL), Span(8, 10, A.NOISE)])]
    bob = [(A.GLOBAL, [Span(8, 10, A.NOISE)])]
    annotations = {"ann": ann, "bob": bob}
    assert A.disagreements(conv, annotations) == []
    assert A.agreement_report([(conv, annotations)]).unanimous == 1.0
    assert A.token_roles(conv, ann, bpe_tokenizer).tolist() != A.token_roles(conv, bob, bpe_tokenizer).tolist()
    assert A.agreement_report([(conv, annotations)], unit="token", processor=bpe_tokenizer).unanimous < 1.0
    assert A.merge(conv, annotations, {}, "ann") == ann and A.merge(conv, annotations, {}, "bob") == bob
