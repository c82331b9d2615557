"""The evaluation's metric functions against values computed by hand (and a published table)."""
from __future__ import annotations

import pytest

from workbench.evaluate import metrics as M


def test_wilson_matches_newcombes_table():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I: 81/263 -> 0.2553-0.3662, 15/148 -> 0.0624-0.1605
    low, high = M.wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = M.wilson(15, 148)
    assert (round(low, 4), round(high, 4)) == (0.0624, 0.1605)
    # 8/10 by hand: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2266
    assert [round(v, 4) for v in M.wilson(8, 10)] == [0.4902, 0.9433]
    assert M.wilson(0, 0) == (0.0, 1.0)
    assert M.wilson(0, 5)[0] == 0.0 and M.wilson(5, 5)[1] == 1.0


def test_rate_carries_counts():
    assert M.rate(3, 4) == {"value": 0.75, "low": pytest.approx(M.wilson(3, 4)[0]),
                            "high": pytest.approx(M.wilson(3, 4)[1]), "count": 3, "total": 4}
    assert M.rate(0, 0)["value"] is None


def test_exact_match_is_the_shapes_normalization():
    assert M.exact_match("  the Circle is RED ", "The circle is red.")
    assert not M.exact_match("The circle is blue.", "The circle is red.")


def test_chair_on_two_tiny_captions():
    synonyms = {"circle": ["circle"], "square": ["square"], "triangle": ["triangle"]}
    first = M.hallucination("A red circle and a blue square.", ["circle"], synonyms)
    second = M.hallucination("A triangle.", ["triangle", "circle"], synonyms)
    assert first.mentioned == {"circle", "square"} and first.hallucinated == {"square"}
    assert second.hallucinated == set() and second.recalled == {"triangle"}
    scores = M.chair([first, second])
    assert scores["chair_i"]["count"] == 1 and scores["chair_i"]["total"] == 3  # 1 of 3 mentions
    assert scores["chair_s"]["value"] == 0.5  # 1 of 2 captions
    assert scores["recall"]["count"] == 2 and scores["recall"]["total"] == 3  # circle, triangle of 3 objects
    assert scores["mean_length"]["value"] == (7 + 2) / 2


def test_chair_synonyms_plurals_and_phrases():
    h = M.hallucination("Two discs, a rectangle and some round shapes.", ["circle"])
    assert h.mentioned == {"circle", "square"} and h.hallucinated == {"square"}
    # an object a record names that the synonym table lacks is its own word
    h = M.hallucination("A dog next to a cat.", ["dog"], {"cat": ["kitten"]})
    assert h.mentioned == {"dog", "cat"} and h.hallucinated == {"cat"}
    # an object given by a synonym counts as its canonical object
    assert M.hallucination("a circle", ["disc"]).hallucinated == set()
    # one object counts once per caption
    assert len(M.hallucination("a square, another square, squares", ["circle"]).hallucinated) == 1


def test_iou_by_hand():
    assert M.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert M.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert M.iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5


@pytest.mark.parametrize("text, box", [
    ("<ref>the red circle</ref><box>[(100, 200), (300, 400)]</box>", (100, 200, 300, 400)),
    ("<ref>x</ref><box>(100,200),(300,400)</box>", (100, 200, 300, 400)),
    ("<box>100 200 300 400", (100, 200, 300, 400)),  # no closing tag
    ("It is here: <BOX>[[300, 400], [100, 200]]</BOX>.", (100, 200, 300, 400)),  # corners swapped
    ("<ref>the circle</ref>[(10.5, 20), (30, 40.25)]", (10.5, 20, 30, 40.25)),  # no box tag
    ("<box>[(100, 200), (300)]</box>", None),  # three numbers
    ("The circle is at the top left.", None),
    ("in 2024 there were 3 of 4 shapes", None),  # numbers, but no box
    ("", None),
])
def test_parse_box_leniently(text, box):
    assert M.parse_box(text) == (None if box is None else tuple(float(v) for v in box))


def test_grade_box_counts_unparsable_as_wrong():
    expected = "<ref>the red circle</ref><box>[(0, 0), (100, 100)]</box>"
    assert M.grade_box("<box>[(0, 0), (100, 100)]</box>", expected)["correct"]
    assert M.grade_box("<box>[(0, 0), (100, 50)]</box>", expected)["correct"]  # IoU exactly 0.5
    near = M.grade_box("<box>[(0, 0), (100, 49)]</box>", expected)
    assert not near["correct"] and near["iou"] == pytest.approx(0.49)
    bad = M.grade_box("The circle is red.", expected)
    assert bad == {"correct": False, "iou": None, "box": None, "parsed": False}
    assert M.parse_ref(expected) == "the red circle"


def test_mcnemar_and_paired_bootstrap():
    a = [True, True, True, False, True]
    b = [False, False, False, False, True]
    assert M.mcnemar_p(a, b) == pytest.approx(0.25)  # 3 discordant, all one way: 2 * (1/2)^3
    assert M.mcnemar_p(a, a) == 1.0
    diff, low, high = M.paired_bootstrap([float(x) for x in a], [float(y) for y in b], seed=1)
    assert diff == pytest.approx(0.6) and 0.0 <= low <= diff <= high <= 1.0
    same = M.paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same == (0.0, 0.0, 0.0)  # the same outcomes item by item: no difference in any resample
    result = M.compare(a, b)
    assert result["only_a"] == 3 and result["only_b"] == 0 and result["n"] == 5
    with pytest.raises(ValueError):
        M.mcnemar_p([True], [True, False])
