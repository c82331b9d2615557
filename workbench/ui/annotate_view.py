"""The Annotate tab's token view, apart from Gradio: a conversation's tokens (the model's chat template, or
words when no tokenizer is at hand) with their roles, cut into pages, rendered as the HTML that the
browser script (annotate.js) selects in, and the browser's selections read back.

The browser counts UTF-16 units (what JavaScript strings count); the store keeps code points:
`utf16_to_code_point` and `code_point_to_utf16` convert, `utf16_table` does a whole turn at once.
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from models.data.align import align_record, token_role
from models.hsa import GLOBAL, LANDMARK, NOISE, ROLE_NAMES
from workbench.store import StoreError

ROLE_KEYS = {"1": GLOBAL, "2": LANDMARK, "3": NOISE}
WORDS = "words (no model)"
TURNS_PER_PAGE = 40  # the token view shows a page of whole turns: at most this many,
TOKENS_PER_PAGE = 1500  # and about this many tokens (a turn longer than that is cut into pages of its own)


# --- offsets: browser UTF-16 units <-> Python code points ---------------------------------------

def code_point_to_utf16(text: str, index: int) -> int:
    """The UTF-16 offset of code point `index` of `text` (characters beyond U+FFFF count twice)."""
    return index + sum(1 for c in text[:index] if ord(c) > 0xFFFF)


def utf16_to_code_point(text: str, offset: int) -> int:
    """The code point index at UTF-16 offset `offset`; an offset inside a surrogate pair (which
    a browser can produce) rounds down to the start of that character."""
    units = 0
    for i, c in enumerate(text):
        width = 2 if ord(c) > 0xFFFF else 1
        if units + width > offset:
            return i
        units += width
    return len(text)


def utf16_table(text: str) -> list[int] | None:
    """UTF-16 offsets of every code point of `text` (and of its end), or None when they are the
    code point indices themselves (no character beyond U+FFFF): `code_point_to_utf16` for a whole
    turn at once."""
    if all(ord(c) <= 0xFFFF for c in text):
        return None
    table, units = [], 0
    for c in text:
        table.append(units)
        units += 2 if ord(c) > 0xFFFF else 1
    table.append(units)
    return table


# --- the token view --------------------------------------------------------------------------------

@dataclass
class TokenView:
    tokens: list[str]
    turn_index: list[int]  # -1: generation prompt
    char_spans: list[tuple[int, int] | None]  # code points of that turn's text; None: template text
    roles: list[int]
    source: str  # which tokenizer made the tokens

    def __len__(self):
        return len(self.tokens)


# a word (or one other character with its combining marks / modifiers) and the spaces after it
WORD = re.compile(r"(?:\w[\w\u0300-\u036f\u200d]*|[^\w\s][\u0300-\u036f\ufe0f\u200d\U0001F3FB-\U0001F3FF]*)[ \t]*|\s+")


def word_view(conv) -> TokenView:
    """Words and spaces, when no tokenizer is at hand: labels are on characters anyway."""
    tokens, turns, spans, roles = [], [], [], []
    for t, turn in enumerate(conv.turns):
        char_roles = turn.char_roles()
        for match in WORD.finditer(turn.text):
            a, b = match.span()
            tokens.append(match.group())
            turns.append(t)
            spans.append((a, b))
            roles.append(token_role(turn, char_roles, list(range(a, b))))
    return TokenView(tokens, turns, spans, roles, WORDS)


def token_view(conv, processor=None, source: str = "") -> TokenView:
    """The tokens of the model's chat template for a stored conversation, with their roles."""
    if processor is None:
        return word_view(conv)
    aligned = align_record(conv.as_conversation(), processor)
    return TokenView(aligned.tokens, aligned.turn_index, aligned.char_spans, aligned.semantic_ids.tolist(),
                     source)


def snap(view: TokenView, turn: int, start: int, end: int) -> tuple[int, int, list[int]] | None:
    """The smallest run of whole tokens of `turn` covering characters [start, end): its character
    range and token indices; None when no token's text falls inside."""
    if start >= end:
        return None
    hit = [k for k, (t, span) in enumerate(zip(view.turn_index, view.char_spans))
           if t == turn and span is not None and span[0] < end and span[1] > start]
    if not hit:
        return None
    return min(view.char_spans[k][0] for k in hit), max(view.char_spans[k][1] for k in hit), hit


def selection_from_browser(conv, view: TokenView, data: dict) -> tuple[int, int, int]:
    """(turn, start, end) in code points, snapped to whole tokens, from the browser's
    {"turn", "a", "b"} in UTF-16 units of that turn's text."""
    try:
        turn, a, b = int(data["turn"]), int(data["a"]), int(data["b"])
    except (KeyError, TypeError, ValueError):
        raise StoreError("select some tokens first (click a token, shift-click another)") from None
    if not 0 <= turn < len(conv.turns):
        raise StoreError(f"there is no turn {turn}")
    text = conv.turns[turn].text
    start, end = utf16_to_code_point(text, a), utf16_to_code_point(text, b)
    if b > a and end == start:  # a selection inside one astral character
        end = start + 1
    snapped = snap(view, turn, start, end)
    if snapped is None:
        raise StoreError("the selection covers no token of the turn's text")
    return turn, snapped[0], snapped[1]


def _token_html(text: str) -> str:
    shown = text.replace("\n", "↵\n")
    if shown and unicodedata.category(shown[0]) in ("Mn", "Me", "Cf"):
        shown = "◌" + shown  # a token of only a combining mark / joiner would have no width to click
    return html.escape(shown) if shown.strip() else html.escape(shown).replace(" ", "\u00b7")


IMAGE_PAD = re.compile(r"<\|(image|video)_pad\|>|<image>")


def tokens_by_turn(view: TokenView) -> dict[int, list[int]]:
    """The view's token indices per turn (-1: the generation prompt), in order."""
    by_turn: dict[int, list[int]] = {}
    for k, t in enumerate(view.turn_index):
        by_turn.setdefault(t, []).append(k)
    return by_turn


def view_pages(view: TokenView, n_turns: int, by_turn: dict | None = None, *, turns_per_page: int | None = None,
               tokens_per_page: int | None = None) -> list[list[tuple[int, int, int]]]:
    """The token view cut into pages, so that a long conversation opens quickly: a page holds whole
    turns, at most `turns_per_page` of them and about `tokens_per_page` tokens (a run of image
    tokens counts once: it shows as one chip); a turn longer than that gets pages of its own. Each
    page is a list of (turn, first, end): that turn's tokens by_turn[turn][first:end]. Every turn
    is on some page, also one without tokens; the generation prompt goes with the last page."""
    by_turn = tokens_by_turn(view) if by_turn is None else by_turn
    turns_per_page = turns_per_page or TURNS_PER_PAGE
    tokens_per_page = tokens_per_page or TOKENS_PER_PAGE
    pages: list[list[tuple[int, int, int]]] = []
    page: list[tuple[int, int, int]] = []
    used = 0
    for t in range(n_turns):
        ks = by_turn.get(t, [])
        weights = [0 if i and view.tokens[k] == view.tokens[ks[i - 1]] and IMAGE_PAD.fullmatch(view.tokens[k].strip())
                   else 1 for i, k in enumerate(ks)]  # 0: the rest of a run of image tokens
        total = sum(weights)
        if page and (len(page) >= turns_per_page or used + total > tokens_per_page):
            pages.append(page)
            page, used = [], 0
        if total <= tokens_per_page:
            page.append((t, 0, len(ks)))
            used += total
            continue
        first, count = 0, 0  # a long turn: pages of its own
        for i, w in enumerate(weights):
            if count + w > tokens_per_page:
                pages.append([(t, first, i)])
                first, count = i, 0
            count += w
        page, used = [(t, first, len(ks))], count
    if page or not pages:
        pages.append(page)
    return pages


def page_of_turn(pages: list[list[tuple[int, int, int]]], turn: int) -> int:
    """The (first) page that shows `turn`; the nearest page for a turn out of range."""
    for p, page in enumerate(pages):
        if any(t == turn for t, _, _ in page) or (page and page[0][0] > turn):
            return p
    return len(pages) - 1


def render_view(conv, view: TokenView, *, suggested: bool = False, page: int = 0, focus: int | None = None,
                disagree=()) -> str:
    """HTML of one page of the conversation (`view_pages`): per turn a header (speaker, turn role,
    set-turn buttons) and its tokens coloured by role, and a pager when there is more than one page.
    Tokens carry their turn and UTF-16 offsets for the selection script; runs of image tokens show
    as one chip. The browser scrolls turn `focus` into view. Tokens touching a region of `disagree`
    (workbench.agreement.Region: turn, character range, each annotator's role) are outlined, and say
    who gave which role."""
    by_turn = tokens_by_turn(view)
    pages = view_pages(view, len(conv.turns), by_turn)
    page = min(max(int(page), 0), len(pages) - 1)
    focused = f' data-focus="{int(focus)}"' if focus is not None else ""
    parts = [f'<div class="hsa-annot" data-conv="{conv.id}" data-version="{conv.version}" data-page="{page}"{focused}>']
    parts.append('<div class="bar">'
                 + "".join(f'<button class="rb r{r}" data-role="{r}">{k} {ROLE_NAMES[r]}</button>'
                           for k, r in ROLE_KEYS.items())
                 + '<button class="rb clear" data-role="clear">0 clear</button>'
                 f'<span class="hint">{len(view)} tokens · {html.escape(view.source)} · click a token, '
                 'shift-click or drag to extend, then 1/2/3 (shift: whole turn), 0 clear, Esc cancel</span>'
                 + _pager(pages, page, len(conv.turns)) + '</div>')
    if suggested:
        parts.append('<div class="suggested">Suggestion preview: accept or reject it below.</div>')
    for t, first, end in pages[page]:
        turn = conv.turns[t]
        table = utf16_table(turn.text)
        to16 = (lambda i: i) if table is None else table.__getitem__
        spans16 = [(to16(s.start), to16(s.end)) for s in turn.spans]
        continued = f" (continued, tokens {first + 1}–{end})" if first else ""
        parts.append(f'<div class="turn" data-t="{t}"><div class="th"><b>{t}</b> {turn.speaker}{continued} · '
                     f'<span class="badge r{turn.role}">{ROLE_NAMES[turn.role]}</span>'
                     + "".join(f'<button class="tb r{r}" data-t="{t}" data-role="{r}" title="whole turn {ROLE_NAMES[r]}">'
                               f'{ROLE_NAMES[r][0].upper()}</button>' for r in ROLE_KEYS.values())
                     + (f' <span class="nspans">{len(turn.spans)} span(s)</span>' if turn.spans else "")
                     + '</div><div class="toks">')
        parts.extend(_turn_tokens(turn, view, by_turn.get(t, [])[first:end], spans16, to16,
                                  [r for r in disagree if r.turn == t]))
        parts.append("</div></div>")
    if by_turn.get(-1) and page == len(pages) - 1:
        parts.append('<div class="turn gen"><div class="th">generation prompt</div><div class="toks">')
        parts.extend(f'<span class="tpl r{view.roles[k]}">{_token_html(view.tokens[k])}</span>' for k in by_turn[-1])
        parts.append("</div></div>")
    parts.append("</div>")
    return "".join(parts)


def _pager(pages, page: int, n_turns: int) -> str:
    if len(pages) < 2:
        return ""
    turns = [t for t, _, _ in pages[page]]
    last = len(pages) - 1

    def button(label, to, title):
        disabled = " disabled" if to == page or not 0 <= to <= last else ""
        return f'<button class="pg" data-page="{to}" title="{title}"{disabled}>{label}</button>'

    return ('<span class="pager">'
            + button("«", 0, "first page") + button("◀", page - 1, "previous page ([)")
            + f'<span class="where">turns {turns[0]}–{turns[-1]} of {n_turns} · page {page + 1} of {last + 1}</span>'
            + button("▶", page + 1, "next page (])") + button("»", last, "last page")
            + f'<input class="goto" type="number" min="0" max="{n_turns - 1}" placeholder="turn #" title="show turn #">'
            + '</span>')


def _disagreement(regions, start: int, end: int) -> str:
    """The class and tooltip of a token over characters start..end where annotators disagree."""
    found = [r for r in regions if r.start < end and r.end > start]
    if not found:
        return ""
    says = "; ".join(" · ".join(f"{name}: {ROLE_NAMES[role]}" for name, role in r.roles.items()) for r in found[:3])
    return f' dis" title="{html.escape(says, quote=True)}'


def _turn_tokens(turn, view: TokenView, ks: list[int], spans16, to16, regions=()) -> list[str]:
    out = []
    k_iter = iter(range(len(ks)))
    for i in k_iter:
        k = ks[i]
        text, span, role = view.tokens[k], view.char_spans[k], view.roles[k]
        if IMAGE_PAD.fullmatch(text.strip() or "x"):
            run = 1
            while i + run < len(ks) and view.tokens[ks[i + run]] == text:
                run += 1
            for _ in range(run - 1):
                next(k_iter, None)
            out.append(f'<span class="img r{role}">🖼 image × {run}</span>')
            continue
        if span is None:
            out.append(f'<span class="tpl r{role}">{_token_html(text)}</span>')
            continue
        a, b = to16(span[0]), to16(span[1])
        spanned = " sp" if any(s < b and e > a for s, e in spans16) else ""
        out.append(f'<span class="tok r{role}{spanned}{_disagreement(regions, *span)}" data-k="{k}" data-t="{view.turn_index[k]}" '
                   f'data-a="{a}" data-b="{b}">{_token_html(turn.text[span[0]:span[1]])}</span>')
    return out
