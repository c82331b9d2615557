"""How much annotators agree on HSA roles, where they disagree, and the reviewer's merge.

Pure functions over conversations and labels (no database, no Gradio). Labels have the store's shape:
per turn, its default role and its spans (character offsets into the turn's text), later spans
painting over earlier ones as `workbench.store.labels.canonical` does.

Units are characters of the turns' text or tokens of one tokenizer. Token units are the tokens that
carry text of a turn, with the roles `models.data.align.align_record` gives them (the training's own
alignment); chat-template and image tokens are left out: nobody labels them (they take their turn's
role), and counting them would inflate agreement with whatever the turn roles already say. For the
same reason the characters of an `<image>` placeholder are not character units.

Coefficients: Cohen's kappa per annotator pair, Fleiss' kappa (the same number of annotators on every
unit), Krippendorff's alpha (nominal; any number, missing allowed), each overall and per role
(that role against the rest). Where a coefficient is undefined (everyone used a single role: the
agreement expected by chance is already 1) it is None with the reason, never a made-up 1.0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from models.data.align import IMAGE_PLACEHOLDER, Conversation, Span, align_record
from models.hsa import GLOBAL, LANDMARK, NOISE

ROLES = (GLOBAL, LANDMARK, NOISE)
ROLE_LABELS = ("GLOBAL", "LANDMARK", "NOISE")
MISSING = -1  # no role: the annotator did not label this unit
NO_SPAN = -1  # a character no span covers (it has the turn's role)

# The store's labels of one conversation (workbench.store.db.Labels; not imported: the store sits above
# this module in docs/ARCHITECTURE.md's layering).
Labels = list[tuple[int, list[Span]]]
Annotations = Mapping[str, Labels]  # annotator -> their labels of one conversation


# --- roles per unit ---------------------------------------------------------------------------

def _check(conversation: Conversation, labels: Labels, who: str = "labels") -> None:
    if len(labels) != len(conversation.turns):
        raise ValueError(f"{who}: {len(labels)} turn labels for {len(conversation.turns)} turns of {conversation.name}")
    for t, ((_, spans), turn) in enumerate(zip(labels, conversation.turns)):
        for s in spans:
            if not 0 <= s.start <= s.end <= len(turn.text):
                raise ValueError(f"{who}: turn {t} span {s.start}..{s.end} is outside its text "
                                 f"(length {len(turn.text)})")


def _span_roles(length: int, spans) -> np.ndarray:
    """Per character the role of the span covering it (the last one listed wins), else NO_SPAN."""
    painted = np.full(length, NO_SPAN, dtype=np.int8)
    for s in spans:
        painted[s.start:s.end] = s.role
    return painted


def char_roles(conversation: Conversation, labels: Labels) -> list[np.ndarray]:
    """Per turn, the role of each of its characters: the turn's role where no span says otherwise."""
    _check(conversation, labels)
    roles = []
    for turn, (role, spans) in zip(conversation.turns, labels):
        painted = _span_roles(len(turn.text), spans)
        roles.append(np.where(painted == NO_SPAN, role, painted).astype(np.int8))
    return roles


def _flat_char_roles(lengths: list[int], labels: Labels) -> np.ndarray:
    """The turns' character roles end to end (the fast path of `char_roles` for the report)."""
    roles = np.repeat(np.array([role for role, _ in labels], dtype=np.int8), lengths)
    offset = 0
    for length, (_, spans) in zip(lengths, labels):
        for s in spans:
            roles[offset + s.start:offset + s.end] = s.role
        offset += length
    return roles


def _text_mask(conversation: Conversation) -> np.ndarray | None:
    """Which characters (end to end) are text units: all but `<image>` placeholders; None if all."""
    texts = [turn.text for turn in conversation.turns]
    if not any(IMAGE_PLACEHOLDER in text for text in texts):
        return None
    keep = np.ones(sum(map(len, texts)), dtype=bool)
    offset = 0
    for text in texts:
        at = text.find(IMAGE_PLACEHOLDER)
        while at >= 0:
            keep[offset + at:offset + at + len(IMAGE_PLACEHOLDER)] = False
            at = text.find(IMAGE_PLACEHOLDER, at + len(IMAGE_PLACEHOLDER))
        offset += len(text)
    return keep


@dataclass(frozen=True)
class TokenUnits:
    """The text tokens of one conversation for one tokenizer: per token, its turn and the characters
    [start, end) of that turn's text it carries. The same for every annotator (labels do not change
    how text is tokenized), so a conversation is aligned once however many annotators it has."""
    turn: np.ndarray
    start: np.ndarray
    end: np.ndarray
    tokens: list[str]

    def __len__(self) -> int:
        return len(self.turn)


def token_units(conversation: Conversation, processor, *, image_root=None) -> TokenUnits:
    """The tokens of `align_record`'s alignment that carry a turn's text (`char_spans` not None)."""
    aligned = align_record(conversation, processor, image_root=image_root)
    kept = [k for k, span in enumerate(aligned.char_spans) if span is not None]
    return TokenUnits(np.array([aligned.turn_index[k] for k in kept], dtype=np.int64),
                      np.array([aligned.char_spans[k][0] for k in kept], dtype=np.int64),
                      np.array([aligned.char_spans[k][1] for k in kept], dtype=np.int64),
                      [aligned.tokens[k] for k in kept])


def _roles_of_tokens(conversation: Conversation, units: TokenUnits, labels: Labels) -> np.ndarray:
    """`models.data.align.token_role` for every unit at once: a token that spans touch takes the role
    spanning most of its characters (ties: the larger role id, NOISE first), else its turn's role."""
    lengths = [len(turn.text) for turn in conversation.turns]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    spanned = np.concatenate([_span_roles(n, spans) for n, (_, spans) in zip(lengths, labels)] or
                             [np.zeros(0, np.int8)])
    start, end = offsets[units.turn] + units.start, offsets[units.turn] + units.end
    spanned_so_far = [np.concatenate([[0], np.cumsum(spanned == r)]) for r in ROLES]
    counts = np.stack([before[end] - before[start] for before in spanned_so_far], axis=1)  # per token, per role
    most = len(ROLES) - 1 - np.argmax(counts[:, ::-1], axis=1)  # argmax takes the first: reversed, the largest id
    turn_roles = np.array([role for role, _ in labels], dtype=np.int64)
    return np.where(counts.sum(axis=1) > 0, most, turn_roles[units.turn]).astype(np.int8)


def token_roles(conversation: Conversation, labels: Labels, processor, *, image_root=None,
                units: TokenUnits | None = None) -> np.ndarray:
    """The role of each text token (see TokenUnits) under `labels`, as training would give it."""
    _check(conversation, labels)
    units = units if units is not None else token_units(conversation, processor, image_root=image_root)
    return _roles_of_tokens(conversation, units, labels)


# --- coefficients -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Score:
    """A coefficient; `value` None when it is undefined on these units, `reason` saying why."""
    value: float | None
    units: int
    reason: str = ""

    def __float__(self) -> float:
        return float("nan") if self.value is None else self.value


def confusion_matrix(first: np.ndarray, second: np.ndarray, k: int = len(ROLES)) -> np.ndarray:
    """[k, k] counts: rows the first annotator's role, columns the second's, units both labelled."""
    both = (first >= 0) & (second >= 0)
    return np.bincount(first[both].astype(np.int64) * k + second[both], minlength=k * k).reshape(k, k)


def _one_vs_rest(matrix: np.ndarray, role: int) -> np.ndarray:
    """A [k, k] confusion matrix as [2, 2]: `role` against all other roles."""
    rest = [r for r in range(len(matrix)) if r != role]
    order = [role] + rest
    m = matrix[np.ix_(order, order)]
    return np.array([[m[0, 0], m[0, 1:].sum()], [m[1:, 0].sum(), m[1:, 1:].sum()]])


def cohen_kappa(matrix: np.ndarray) -> Score:
    """Cohen's kappa from a confusion matrix of two annotators."""
    n = int(matrix.sum())
    if n == 0:
        return Score(None, 0, "no unit labelled by both annotators")
    rows, cols = matrix.sum(axis=1).astype(np.int64), matrix.sum(axis=0).astype(np.int64)
    if int(rows @ cols) == n * n:  # exact: both gave every unit one and the same role
        return Score(None, n, "both annotators gave every unit the same role: chance agreement is 1, kappa undefined")
    observed, expected = np.trace(matrix) / n, float(rows @ cols) / (n * n)
    return Score(float((observed - expected) / (1 - expected)), n)


def role_counts(roles: np.ndarray, k: int = len(ROLES)) -> np.ndarray:
    """[units, k]: how many annotators gave each unit each role; `roles` is [annotators, units]
    with MISSING where an annotator did not label the unit."""
    return np.stack([(roles == r).sum(axis=0) for r in range(k)], axis=1)


def unit_profiles(roles: np.ndarray, k: int = len(ROLES)) -> tuple[np.ndarray, np.ndarray]:
    """`role_counts` compressed: the distinct rows of counts and how many units have each. The
    coefficients depend on nothing else, and there are few distinct rows however many units (one
    pass over millions of characters, not one per coefficient)."""
    base = roles.shape[0] + 1  # a count lies in 0..annotators: one digit of this base per role
    code = np.zeros(roles.shape[1], dtype=np.int64)
    for row in roles:
        code += np.where(row >= 0, base ** np.maximum(row, 0).astype(np.int64), 0)
    frequency = np.bincount(code, minlength=1)
    present = np.flatnonzero(frequency)
    counts = np.stack([(present // base ** r) % base for r in range(k)], axis=1)
    return counts, frequency[present]


def _weighted(counts: np.ndarray, weights) -> tuple[np.ndarray, np.ndarray]:
    """Units with two or more annotators, as (counts, how many units each row stands for)."""
    counts = np.asarray(counts, dtype=np.int64)
    weights = np.ones(len(counts), dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
    keep = (counts.sum(axis=1) >= 2) & (weights > 0)
    return counts[keep], weights[keep]


def fleiss_kappa(counts: np.ndarray, weights=None) -> Score:
    """Fleiss' kappa from [units, roles] counts (each row standing for `weights` units, default 1);
    units with fewer than two annotators are left out, the rest must all have the same number."""
    counts, weights = _weighted(counts, weights)
    units = int(weights.sum())
    if units == 0:
        return Score(None, 0, "no unit has two annotators")
    raters = counts.sum(axis=1)
    n = int(raters[0])
    if (raters != n).any():
        return Score(None, units, f"units have {raters.min()} to {raters.max()} annotators; Fleiss' kappa needs "
                                  "the same number on every unit (Krippendorff's alpha does not)")
    totals = weights @ counts
    if int(totals @ totals) == (units * n) ** 2:  # exact: one role holds every value
        return Score(None, units, "every annotator gave every unit the same role: chance agreement is 1, "
                                  "kappa undefined")
    per_unit = ((counts ** 2).sum(axis=1) - n) / (n * (n - 1))  # agreeing pairs of annotators, as a share
    shares = totals / (units * n)
    observed, expected = float(weights @ per_unit) / units, float(shares @ shares)
    return Score((observed - expected) / (1 - expected), units)


def krippendorff_alpha(counts: np.ndarray, weights=None) -> Score:
    """Krippendorff's alpha, nominal, from [units, roles] counts (each row standing for `weights`
    units, default 1); any number of annotators per unit (units with fewer than two have no pair and
    are left out)."""
    counts, weights = _weighted(counts, weights)
    units = int(weights.sum())
    if units == 0:
        return Score(None, 0, "no unit has two annotators")
    scaled = counts * (weights / (counts.sum(axis=1) - 1))[:, None]
    coincidences = scaled.T @ counts - np.diag(scaled.sum(axis=0))  # o_ck: ordered pairs of values within units
    totals = weights @ counts  # n_c, exact (each row of o sums to it)
    n = int(totals.sum())
    expected_pairs = n * n - int(totals @ totals)  # sum over c != k of n_c n_k
    if expected_pairs == 0:
        return Score(None, units, "only one role was given: expected disagreement is 0, alpha undefined")
    observed_pairs = coincidences.sum() - np.trace(coincidences)
    return Score(float(1 - (n - 1) * observed_pairs / expected_pairs), units)


# --- the report -------------------------------------------------------------------------------

@dataclass
class PairAgreement:
    annotators: tuple[str, str]
    conversations: int  # conversations both labelled
    units: int  # units both labelled
    observed: float | None  # share of those units given the same role
    kappa: Score  # Cohen's
    per_role: dict[str, Score]  # Cohen's kappa of ROLE_LABELS[r] against the other roles
    confusion: np.ndarray  # [3, 3]: rows the first annotator's role, columns the second's


@dataclass
class AgreementReport:
    unit: str  # "char" or "token"
    annotators: tuple[str, ...]
    conversations: int  # conversations with two or more annotators (the others are `skipped`)
    units: int  # units labelled by two or more annotators
    unanimous: float | None  # share of those units on which all their annotators agree
    cohen: Score  # the one pair's kappa when there are two annotators in all (else see `pairs`)
    fleiss: Score
    alpha: Score
    fleiss_per_role: dict[str, Score]
    alpha_per_role: dict[str, Score]
    pairs: dict[tuple[str, str], PairAgreement]
    confusion: np.ndarray  # [3, 3], every pair of annotators on a unit counted in both orders (symmetric)
    skipped: int = 0
    role_totals: dict[str, int] = field(default_factory=dict)  # roles given, over all annotators and units


def agreement_report(items: Iterable[tuple[Conversation, Annotations]], *, unit: str = "char",
                     processor=None, image_root=None) -> AgreementReport:
    """Agreement over a dataset: `items` are (conversation, {annotator: labels}); units of all
    conversations are pooled. `unit="token"` needs `processor` (a tokenizer or processor, as
    `align_record` takes it; images are loaded from `image_root` as in training)."""
    if unit not in ("char", "token"):
        raise ValueError(f"unit must be 'char' or 'token', not {unit!r}")
    if unit == "token" and processor is None:
        raise ValueError("token agreement needs the tokenizer or processor whose tokens to compare")
    blocks, skipped = [], 0  # per conversation: {annotator: roles of its units}
    for conversation, by_annotator in items:
        if len(by_annotator) < 2:
            skipped += 1
            continue
        for who, labels in by_annotator.items():
            _check(conversation, labels, f"{who}'s labels")
        if unit == "char":
            lengths = [len(turn.text) for turn in conversation.turns]
            keep = _text_mask(conversation)
            roles = {who: _flat_char_roles(lengths, labels) for who, labels in by_annotator.items()}
            if keep is not None:
                roles = {who: r[keep] for who, r in roles.items()}
        else:
            units = token_units(conversation, processor, image_root=image_root)
            roles = {who: _roles_of_tokens(conversation, units, labels) for who, labels in by_annotator.items()}
        blocks.append(roles)

    annotators = tuple(sorted({who for block in blocks for who in block}))
    index = {who: i for i, who in enumerate(annotators)}
    sizes = [len(next(iter(block.values()))) for block in blocks]
    matrix = np.full((len(annotators), sum(sizes)), MISSING, dtype=np.int8)  # [annotators, units]
    offset = 0
    for block, size in zip(blocks, sizes):
        for who, roles in block.items():
            matrix[index[who], offset:offset + size] = roles
        offset += size

    counts, weights = unit_profiles(matrix)
    labelled = counts.sum(axis=1)
    units = int(weights[labelled >= 2].sum())
    pairs = {}
    for a, b in combinations(annotators, 2):
        confusion = confusion_matrix(matrix[index[a]], matrix[index[b]])
        n = int(confusion.sum())
        pairs[(a, b)] = PairAgreement(
            (a, b), sum(a in block and b in block for block in blocks), n,
            float(np.trace(confusion) / n) if n else None, cohen_kappa(confusion),
            {ROLE_LABELS[r]: cohen_kappa(_one_vs_rest(confusion, r)) for r in ROLES}, confusion)
    pooled = sum((p.confusion + p.confusion.T for p in pairs.values()), np.zeros((3, 3), dtype=np.int64))
    binary = {r: np.stack([counts[:, r], labelled - counts[:, r]], axis=1) for r in ROLES}
    unanimous = weights[(labelled >= 2) & (counts.max(axis=1) == labelled)].sum()
    if len(annotators) == 2:
        cohen = next(iter(pairs.values())).kappa
    else:
        cohen = Score(None, units, f"{len(annotators)} annotators: Cohen's kappa is per pair (see pairs)")
    return AgreementReport(
        unit=unit, annotators=annotators, conversations=len(blocks), units=units,
        unanimous=float(unanimous / units) if units else None,
        cohen=cohen, fleiss=fleiss_kappa(counts, weights), alpha=krippendorff_alpha(counts, weights),
        fleiss_per_role={ROLE_LABELS[r]: fleiss_kappa(binary[r], weights) for r in ROLES},
        alpha_per_role={ROLE_LABELS[r]: krippendorff_alpha(binary[r], weights) for r in ROLES},
        pairs=pairs, confusion=pooled, skipped=skipped,
        role_totals={ROLE_LABELS[r]: int(weights @ counts[:, r]) for r in ROLES})


def confusion_figure(matrix, labels=ROLE_LABELS, *, title: str = "Role confusion",
                     rows: str = "first annotator", columns: str = "second annotator"):
    """A plotly heatmap of a confusion matrix: each cell shows its count and its share of the row
    (coloured by that share, so rows with different totals compare)."""
    import plotly.graph_objects as go

    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    text = [[f"{counts[i, j]:,}<br>{shares[i, j]:.1%}" if totals[i, 0] else "0<br>—"
             for j in range(counts.shape[1])] for i in range(counts.shape[0])]
    figure = go.Figure(go.Heatmap(
        z=shares, x=list(labels), y=list(labels), zmin=0, zmax=1, colorscale="Blues", text=text,
        texttemplate="%{text}", customdata=counts,
        hovertemplate=f"{rows}: %{{y}}<br>{columns}: %{{x}}<br>%{{customdata:,}} units, %{{z:.1%}} of the row"
                      "<extra></extra>", xgap=1, ygap=1, colorbar=dict(title="share of row", tickformat=".0%")))
    figure.update_layout(
        title=f"{title}: {int(counts.sum()):,} units", height=420, margin=dict(l=10, r=10, t=50, b=10),
        xaxis=dict(title=columns, side="top", constrain="domain"),
        yaxis=dict(title=rows, autorange="reversed", scaleanchor="x"), plot_bgcolor="white")
    return figure


# --- disagreements and the review merge -------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """Characters [start, end) of a turn where every annotator's role is constant, not all equal."""
    turn: int
    start: int
    end: int
    roles: dict[str, int]  # annotator -> role

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.turn, self.start, self.end)


def _runs(columns: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of equal columns of a [rows, n] array."""
    n = columns.shape[1]
    if n == 0:
        return []
    cuts = np.flatnonzero((columns[:, 1:] != columns[:, :-1]).any(axis=0)) + 1
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:]))


def disagreements(conversation: Conversation, annotations: Annotations) -> list[Region]:
    """Every maximal character range, turn by turn, on which the annotators disagree."""
    names = list(annotations)
    per_annotator = [char_roles(conversation, annotations[who]) for who in names]
    regions = []
    for t in range(len(conversation.turns)):
        stacked = np.stack([roles[t] for roles in per_annotator]) if names else np.zeros((0, 0), np.int8)
        for start, end in _runs(stacked):
            column = stacked[:, start]
            if column.min() != column.max():
                regions.append(Region(t, start, end, {who: int(r) for who, r in zip(names, column)}))
    return regions


def _spans_of(painted: np.ndarray) -> list[Span]:
    """Canonical spans (sorted, disjoint, same-role neighbours joined) from per-character span roles."""
    return [Span(start, end, int(painted[start])) for start, end in _runs(painted[None, :])
            if painted[start] != NO_SPAN]


def merge(conversation: Conversation, annotations: Annotations, choices: Mapping[tuple[int, int, int], str],
          default: str) -> Labels:
    """The reviewed labels: where the annotators agree, their common role; in each disagreement
    region (`Region.key` -> annotator) the chosen annotator's role, the default's where none is chosen.

    Each turn is built on one annotator's labels (its turn role and spans): the one chosen for most
    of the turn's disagreeing characters (ties: the default), the default where the turn has none;
    regions chosen from another annotator take that annotator's spans there. So accepting one annotator
    wholesale (`merge(conversation, annotations, {}, default=who)`, or choosing them in every region)
    returns exactly their labels, and every result is canonical as the store keeps it (sorted,
    disjoint, same-role neighbours joined; spans of the turn's own role are kept, as the store keeps
    them: they matter to the token roles, see `models.data.align.token_role`)."""
    if default not in annotations:
        raise ValueError(f"default annotator {default!r} has no labels here (annotators: {sorted(annotations)})")
    regions = disagreements(conversation, annotations)
    known = {region.key for region in regions}
    for key, who in choices.items():
        if tuple(key) not in known:
            raise ValueError(f"no disagreement region {tuple(key)} (labels changed since it was shown?)")
        if who not in annotations:
            raise ValueError(f"region {tuple(key)}: {who!r} has no labels here")
    chosen = {region.key: choices.get(region.key, default) for region in regions}
    order = [default] + [who for who in annotations if who != default]  # tie-break: the default first

    merged: Labels = []
    for t, turn in enumerate(conversation.turns):
        here = [region for region in regions if region.turn == t]
        weight = {who: sum(r.end - r.start for r in here if chosen[r.key] == who) for who in order}
        base = max(order, key=lambda who: weight[who]) if here else default  # max keeps the first of ties
        base_role, base_spans = annotations[base][t]
        painted = _span_roles(len(turn.text), base_spans)
        for region in here:
            who = chosen[region.key]
            if who == base:
                continue
            role, spans = annotations[who][t]
            theirs = _span_roles(len(turn.text), spans)[region.start:region.end]
            # their unspanned characters have their turn role: a span unless that is the base's turn role
            fill = NO_SPAN if role == base_role else role
            painted[region.start:region.end] = np.where(theirs == NO_SPAN, fill, theirs)
        merged.append((int(base_role), _spans_of(painted)))
    return merged
