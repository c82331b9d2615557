"""Span arithmetic on one turn's labels: character intervals [start, end) of Python code points,
each with a role. Labels are kept canonical: sorted, non-overlapping, neighbours of the same role
merged, so two equal labellings have one representation (and compare equal)."""
from __future__ import annotations

from models.data.align import Span


def canonical(spans) -> list[Span]:
    """Sorted, merged spans. Where spans of different roles overlap, the later one in the list wins
    (it was applied last)."""
    result: list[Span] = []
    for span in spans:
        result = paint(result, span.start, span.end, span.role)
    return result


def _cut(spans: list[Span], start: int, end: int) -> list[Span]:
    """The spans with the characters [start, end) removed (a span may split in two)."""
    kept = []
    for s in spans:
        if s.end <= start or s.start >= end:
            kept.append(Span(s.start, s.end, s.role))
            continue
        if s.start < start:
            kept.append(Span(s.start, start, s.role))
        if s.end > end:
            kept.append(Span(end, s.end, s.role))
    return kept


def _merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start, s.end)):
        if merged and merged[-1].role == s.role and s.start <= merged[-1].end:
            merged[-1] = Span(merged[-1].start, max(merged[-1].end, s.end), s.role)
        else:
            merged.append(Span(s.start, s.end, s.role))
    return merged


def paint(spans, start: int, end: int, role: int) -> list[Span]:
    """Give the characters [start, end) the role `role`, overriding whatever covered them."""
    if start >= end:
        return _merge(list(spans))
    return _merge(_cut(list(spans), start, end) + [Span(start, end, role)])


def erase(spans, start: int, end: int) -> list[Span]:
    """Remove any span from the characters [start, end): they fall back to the turn's role."""
    return _merge(_cut(list(spans), start, end))


def char_roles(turn_role: int, spans, length: int) -> list[int]:
    """The role of every character of a turn (the obviously-correct reference for tests)."""
    roles = [turn_role] * length
    for s in spans:
        roles[s.start:s.end] = [s.role] * (s.end - s.start)
    return roles
