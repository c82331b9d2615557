"""The evaluation's metrics as pure functions: plain values in, plain values out, no model.

- accuracy: normalized exact match (`models.zoo.evaluate.normalize`, the one the shapes evaluation
  uses), per question type;
- hallucination on descriptions (CHAIR, Rohrbach et al. 2018): an answer mentions objects (words of a
  vocabulary, with synonyms); CHAIR_i = mentioned objects not in the image / mentioned objects,
  CHAIR_s = answers with at least one such object / answers, recall = objects of the image mentioned /
  objects of the image; each object counts once per answer;
- grounding: `<ref>...</ref><box>[(x1, y1), (x2, y2)]</box>` on a 0-1000 grid, right when the IoU with
  the expected box is at least 0.5; boxes are parsed leniently, an answer without one is wrong;
- intervals: Wilson's for proportions; for two models on the same items a paired bootstrap interval of
  the difference and McNemar's exact test (all in `models.zoo.stats`, which the HSA experiment uses too).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from models.zoo.evaluate import normalize
from models.zoo.stats import Z95, compare, mcnemar_p, paired_bootstrap, wilson  # noqa: F401 (re-exported)

IOU_THRESHOLD = 0.5

# canonical object -> words that name it (the canonical word itself always does; plurals are added)
DEFAULT_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "disk", "ring", "round shape", "ball", "dot"],
    "square": ["square", "rectangle", "cube"],
    "triangle": ["triangle", "pyramid"],
}


def exact_match(reply: str, expected: str) -> bool:
    """The reply equals the expected answer up to case, spacing and a final full stop."""
    return normalize(reply) == normalize(expected)


# ---- intervals (models.zoo.stats: the one implementation, shared with the HSA experiment) ------

def rate(count: int, total: int) -> dict:
    """A proportion with its Wilson interval and counts: {value, low, high, count, total}."""
    low, high = wilson(count, total)
    return {"value": count / total if total else None, "low": low, "high": high, "count": count, "total": total}


# ---- hallucination (CHAIR) ------------------------------------------------------------------------

def _plural(word: str) -> str:
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    return word + "s"


def _patterns(synonyms: dict[str, list[str]]) -> list[tuple[str, re.Pattern]]:
    """(object, pattern) pairs, longest phrases first so 'round shape' is read before 'shape'."""
    pairs = []
    for name, words in synonyms.items():
        for word in {name, *words}:
            word = word.lower().strip()
            if word:
                pairs.append((name, word))
    pairs.sort(key=lambda p: -len(p[1]))
    return [(name, re.compile(r"\b(?:" + re.escape(word) + "|" + re.escape(_plural(word)) + r")\b"))
            for name, word in pairs]


def canonical_objects(objects, synonyms: dict[str, list[str]]) -> set[str]:
    """The objects of an image, by their canonical names (a synonym given as an object counts as its object)."""
    lookup = {w.lower(): name for name, words in synonyms.items() for w in (name, *words)}
    return {lookup.get(str(o).lower().strip(), str(o).lower().strip()) for o in objects}


def mentioned_objects(text: str, synonyms: dict[str, list[str]]) -> set[str]:
    """Canonical objects an answer mentions (whole words or phrases, singular or plural); a phrase
    that matched is blanked out so a shorter word inside it does not count again."""
    text = " " + text.lower() + " "
    found = set()
    for name, pattern in _patterns(synonyms):
        if pattern.search(text):
            found.add(name)
            text = pattern.sub(" ", text)
    return found


def with_objects(synonyms: dict[str, list[str]] | None, objects=()) -> dict[str, list[str]]:
    """The synonym table with every known object of the records in it (an object named only by a
    record is its own single word)."""
    table = {k.lower(): list(v) for k, v in (synonyms or DEFAULT_SYNONYMS).items()}
    known = {w.lower() for name, words in table.items() for w in (name, *words)}
    for o in objects:
        o = str(o).lower().strip()
        if o and o not in known:
            table[o] = [o]
            known.add(o)
    return table


@dataclass
class Hallucination:
    mentioned: set[str]
    hallucinated: set[str]
    recalled: set[str]
    truth: set[str]
    words: int


def hallucination(answer: str, objects, synonyms: dict[str, list[str]] | None = None) -> Hallucination:
    """What one description answer mentions against the objects known to be in the image."""
    table = with_objects(synonyms, objects)
    truth = canonical_objects(objects, table)
    mentioned = mentioned_objects(answer, table)
    return Hallucination(mentioned, mentioned - truth, mentioned & truth, truth, len(answer.split()))


def chair(items: list[Hallucination]) -> dict:
    """CHAIR_s, CHAIR_i, recall (each a rate with its interval and counts) and mean length in words."""
    mentioned = sum(len(h.mentioned) for h in items)
    hallucinated = sum(len(h.hallucinated) for h in items)
    n = len(items)
    lengths = [h.words for h in items]
    return {"chair_s": rate(sum(bool(h.hallucinated) for h in items), n),
            "chair_i": rate(hallucinated, mentioned),
            "recall": rate(sum(len(h.recalled) for h in items), sum(len(h.truth) for h in items)),
            "mean_length": {"value": sum(lengths) / n if n else None, "count": n}}


# ---- grounding ------------------------------------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_BOX = re.compile(r"<box>(.*?)(?:</box>|$)", re.S | re.I)
_REF = re.compile(r"<ref>(.*?)(?:</ref>|<box>|$)", re.S | re.I)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first box of an answer as (x1, y1, x2, y2), or None when there is none to read.
    Lenient: `<box>[(x1, y1), (x2, y2)]</box>`, `<box>(x1,y1),(x2,y2)</box>`, `<box>x1 y1 x2 y2`,
    a missing `</box>`, brackets of any kind, or four numbers after `<ref>...</ref>` without tags.
    Corners given in the wrong order are put right; fewer than four numbers is no box."""
    if not isinstance(text, str):
        return None
    match = _BOX.search(text)
    if match:
        body = match.group(1)
    else:
        ref = re.search(r"</ref>(.*)", text, re.S | re.I)
        body = ref.group(1) if ref else text
        if not re.search(r"[\[(]", body):  # plain text without any bracket: not a box
            return None
    numbers = [float(n) for n in re.findall(_NUMBER, body)]
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = numbers[:4]
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def parse_ref(text: str) -> str | None:
    match = _REF.search(text or "")
    return match.group(1).strip() if match else None


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (continuous coordinates)."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = w * h
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def grade_box(reply: str, expected: str, threshold: float = IOU_THRESHOLD) -> dict:
    """{correct, iou, box, parsed}: an unparsable reply is wrong (parsed False, iou None)."""
    want = parse_box(expected)
    got = parse_box(reply)
    if want is None:
        raise ValueError(f"the expected answer has no box: {expected!r}")
    if got is None:
        return {"correct": False, "iou": None, "box": None, "parsed": False}
    overlap = iou(got, want)
    return {"correct": overlap >= threshold, "iou": overlap, "box": list(got), "parsed": True}


def is_grounding(expected: str) -> bool:
    return bool(re.search(r"<box>", expected or "", re.I))
