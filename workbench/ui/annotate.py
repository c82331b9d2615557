"""The Annotate tab: browse a dataset's conversations, see the chosen model's tokens coloured by
role, select tokens and give them a role by click or key (1 global, 2 landmark, 3 noise, 0 clear),
set whole turns, undo/redo, accept or reject suggestions, import and export.

Everything a handler does is a plain function of values below (tested without a browser); `build`
only wires them to components. The browser sends selections as UTF-16 offsets (what JavaScript
strings count); they become code points (what the store keeps) in `utf16_to_code_point`.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from models.hsa import GLOBAL, LANDMARK, NOISE, ROLE_NAMES
from models.data.align import AlignError, align_record, token_role
from workbench.store import FORMATS, FileError, StaleVersionError, Store, StoreError, export_dataset, import_upload
from workbench.store.db import labels_from_json, labels_to_json
from workbench.store.suggest import model_suggestions, rule_suggestions

ROLE_KEYS = {"1": GLOBAL, "2": LANDMARK, "3": NOISE}
STATUSES = ("all", "unlabelled", "labelled")
WORDS = "words (no model)"
PAGE_SIZE = 15
TURNS_PER_PAGE = 40  # the token view shows a page of whole turns: at most this many,
TOKENS_PER_PAGE = 1500  # and about this many tokens (a turn longer than that is cut into pages of its own)
TABLE_HEADERS = ["#", "first words", "labelled", "last change by"]
UPLOAD_TYPES = [".json", ".jsonl", ".zip", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"]


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


def render_view(conv, view: TokenView, *, suggested: bool = False, page: int = 0, focus: int | None = None) -> str:
    """HTML of one page of the conversation (`view_pages`): per turn a header (speaker, turn role,
    set-turn buttons) and its tokens coloured by role, and a pager when there is more than one page.
    Tokens carry their turn and UTF-16 offsets for the selection script; runs of image tokens show
    as one chip. The browser scrolls turn `focus` into view."""
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
        parts.extend(_turn_tokens(turn, view, by_turn.get(t, [])[first:end], spans16, to16))
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


def _turn_tokens(turn, view: TokenView, ks: list[int], spans16, to16) -> list[str]:
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
        out.append(f'<span class="tok r{role}{spanned}" data-k="{k}" data-t="{view.turn_index[k]}" '
                   f'data-a="{a}" data-b="{b}">{_token_html(turn.text[span[0]:span[1]])}</span>')
    return out


def progress_text(store: Store, dataset: str | None) -> str:
    if not dataset:
        return "No dataset yet: import one below."
    info = store.dataset(dataset)
    share = f" ({100 * info.labelled / info.total:.0f}%)" if info.total else ""
    return f"**Progress:** {info.labelled} / {info.total} conversations labelled{share}"


# --- handlers: plain functions of values -------------------------------------------------------------

class Annotator:
    """The tab's behaviour over one store; `processor_for(name)` gives a tokenizer/processor or
    raises (then the view falls back to words)."""

    def __init__(self, store: Store, processor_for=None, model_for=None, exports_dir: Path | None = None):
        self.store = store
        self.processor_for = processor_for
        self.model_for = model_for
        self.exports_dir = exports_dir
        self._views: dict = {}

    # views are cached per (conversation, version, model): re-aligning is the slow part
    def view(self, conv, model: str) -> tuple[TokenView, str]:
        key = (conv.id, conv.version, model)
        if key in self._views:
            return self._views[key], ""
        note = ""
        processor = None
        if model and model != WORDS and self.processor_for is not None:
            try:
                processor = self.processor_for(model)
            except Exception as e:  # noqa: BLE001 - any load failure: show words and say why
                note = f"Tokenizer of {model!r} unavailable ({type(e).__name__}: {e}); showing words."
        try:
            view = token_view(conv, processor, model)
        except AlignError as e:
            view, note = word_view(conv), f"{e}; showing words."
        if len(self._views) > 64:
            self._views.clear()
        self._views[key] = view
        return view, note

    def ids(self, dataset, status="all", search="") -> list[int]:
        if not dataset:
            return []
        return self.store.conversation_ids(dataset, status=status, search=search or "")

    def show(self, conv_id, model: str, status: str = "", page: int = 0, focus: int | None = None) -> dict:
        """Everything the tab shows for one conversation, its tokens one page at a time."""
        if conv_id is None or conv_id < 0:
            return {"conv_id": -1, "version": 0, "html": '<div class="hsa-annot empty">No conversation.</div>',
                    "images": [], "status": status or "No conversation matches.", "history": [], "page": 0}
        conv = self.store.conversation(int(conv_id))
        view, note = self.view(conv, model)
        page = min(max(int(page or 0), 0), len(view_pages(view, len(conv.turns))) - 1)
        history = [[r.version, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)), r.author,
                    r.kind, r.action] for r in reversed(self.store.history(conv.id))][:50]
        return {"conv_id": conv.id, "version": conv.version, "html": render_view(conv, view, page=page, focus=focus),
                "page": page,
                "images": [str(p) for p in conv.images], "history": history,
                "status": " ".join(x for x in (status, note) if x) or
                f"Conversation #{conv.position + 1} · version {conv.version}"
                + (f" · last change by {conv.updated_by}" if conv.updated_by else "")}

    def turn_page(self, conv_id, model: str, data: dict) -> dict:
        """The page the browser's pager asks for: {"page": n} (0-based) or {"turn": t} (the page
        showing turn t)."""
        try:
            conv = self.store.conversation(int(conv_id))
            focus = None
            if "turn" in data:
                view, _ = self.view(conv, model)
                focus = min(max(int(data["turn"]), 0), len(conv.turns) - 1)
                page = page_of_turn(view_pages(view, len(conv.turns)), focus)
            else:
                page = int(data["page"])
        except (StoreError, KeyError, TypeError, ValueError) as e:
            shown = self.show(conv_id, model) if conv_id is not None and conv_id >= 0 else self.show(-1, model)
            shown["status"] = f"⚠️ {e}"
            return shown
        return self.show(conv_id, model, page=page, focus=focus)

    def navigate(self, dataset, status, search, conv_id, step: int | None = None, jump: int | None = None):
        """The conversation `step` away from `conv_id` in the filtered list, or number `jump`
        (1-based) of it; returns (conv_id, "i / n"). With neither, `conv_id` itself when it is in
        the list, else the first."""
        ids = self.ids(dataset, status, search)
        if not ids:
            return -1, "0 / 0"
        if jump is not None:
            index = min(max(int(jump) - 1, 0), len(ids) - 1)
        elif conv_id in ids:
            index = min(max(ids.index(conv_id) + (step or 0), 0), len(ids) - 1)
        else:
            index = 0
        return ids[index], f"{index + 1} / {len(ids)}"

    def edit(self, conv_id, version, author, model, kind: str, data: dict, page: int = 0) -> dict:
        """Apply one labelling action from the browser; a stale one is refused and the newer
        version shown (on the same page)."""
        author = (author or "").strip() or "anonymous"
        try:
            if conv_id is None or conv_id < 0:
                raise StoreError("no conversation is open")
            conv = self.store.conversation(int(conv_id))
            version = int(version)
            if kind in ("label", "clear"):
                view, _ = self.view(conv, model)
                turn, start, end = selection_from_browser(conv, view, data)
                if kind == "label":
                    role = int(data["role"])
                    self.store.set_span(conv.id, turn, start, end, role, expected_version=version, author=author)
                    message = f"Turn {turn} «{_clip(conv.turns[turn].text[start:end])}» → {ROLE_NAMES[role]}"
                else:
                    self.store.clear_span(conv.id, turn, start, end, expected_version=version, author=author)
                    message = f"Turn {turn} «{_clip(conv.turns[turn].text[start:end])}» cleared"
            elif kind == "turn_role":
                turn, role = int(data["turn"]), int(data["role"])
                self.store.set_turn_role(conv.id, turn, role, expected_version=version, author=author)
                message = f"Turn {turn} → {ROLE_NAMES[role]}"
            elif kind == "undo":
                self.store.undo(conv.id, expected_version=version, author=author)
                message = "Undone"
            elif kind == "redo":
                self.store.redo(conv.id, expected_version=version, author=author)
                message = "Redone"
            elif kind == "accept":
                labels = labels_from_json(data["labels"])
                self.store.set_labels(conv.id, labels, expected_version=version, author=author,
                                      action=f"accepted {data.get('source', 'suggestions')}")
                message = "Suggestion accepted (undo takes it back)"
            else:
                raise StoreError(f"unknown action {kind!r}")
        except StaleVersionError as e:
            return self.show(conv_id, model, status=f"⚠️ **Not saved.** {e}. Showing the current version.", page=page)
        except (StoreError, KeyError, ValueError, TypeError) as e:
            shown = self.show(conv_id, model, page=page) if conv_id is not None and conv_id >= 0 else self.show(-1, model)
            shown["status"] = f"⚠️ {e}"
            return shown
        return self.show(conv_id, model, status=f"✓ Saved. {message}.", page=page)

    def describe_selection(self, conv_id, model, data: dict) -> str:
        """Where a selection will land once applied (snapped to whole tokens)."""
        try:
            conv = self.store.conversation(int(conv_id))
            view, _ = self.view(conv, model)
            turn, start, end = selection_from_browser(conv, view, data)
        except (StoreError, TypeError, ValueError) as e:
            return f"⚠️ {e}"
        count = len(snap(view, turn, start, end)[2])
        return (f"Selected turn {turn}, characters {start}–{end} ({count} token{'s' * (count != 1)}): "
                f"«{_clip(conv.turns[turn].text[start:end], 120)}». Press 1 global, 2 landmark, 3 noise, 0 clear.")

    def suggest(self, conv_id, model, kind: str, page: int = 0):
        """(preview html of that page, suggestion json, status) for the rule or model suggestions."""
        conv = self.store.conversation(int(conv_id))
        if kind == "rules":
            labels = rule_suggestions(conv)
        else:
            if self.model_for is None:
                raise StoreError("no model is available for suggestions")
            loaded, processor = self.model_for(model)
            labels = model_suggestions(loaded, processor, conv.as_conversation())
        preview = _with_labels(conv, labels)
        view = word_view(preview) if model == WORDS else self._preview_view(preview, model)
        changed = sum(a != b for a, b in zip(conv.labels(), labels))
        payload = json.dumps({"labels": labels_to_json(labels), "source": f"{kind} suggestions",
                              "conv_id": conv.id})
        return render_view(preview, view, suggested=True, page=page or 0), payload, \
            f"Suggestion ({kind}): changes {changed} of {len(labels)} turns. Accept or reject."

    def _preview_view(self, conv, model):
        processor = None
        if self.processor_for is not None and model:
            try:
                processor = self.processor_for(model)
            except Exception:  # noqa: BLE001
                processor = None
        try:
            return token_view(conv, processor, model)
        except AlignError:
            return word_view(conv)

    def import_files(self, files, dataset, author, current=None, progress=None) -> tuple[str, str | None]:
        """(status, dataset to show) after importing uploaded files: ShareGPT JSON/JSONL with their
        images, loose or in .zip files. When nothing is imported the dataset in use stays."""
        files = [f for f in (files if isinstance(files, (list, tuple)) else [files]) if f]
        if not files:
            return "Choose a JSON or JSONL file (with its images), or a .zip of records and images, first.", current
        import tempfile

        # unpacked beside the exports (the workspace's tmp), removed once imported
        scratch = Path(self.exports_dir).parent / "tmp" if self.exports_dir else None
        if scratch:
            scratch.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="upload-", dir=scratch))
        try:
            report = import_upload(self.store, [(f, Path(f).name) for f in map(str, files)], dataset, staging,
                                   author=(author or "").strip() or "import", progress=progress)
        except FileError as e:
            return f"⚠️ Nothing imported: {e}", current
        except StoreError as e:  # the database stayed busy: what was stored stays, and a new import skips it
            return f"⚠️ Import stopped: {e} (importing the same files again adds only what is missing)", current
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if report.stored:
            lines = [f"Imported {report.stored} of {report.total} records into **{report.dataset}**."]
        elif report.skipped and not report.errors:
            lines = [f"Nothing new: all {report.total} records are in **{report.dataset}** already."]
        else:
            lines = [f"⚠️ Nothing imported: none of the {report.total} records could be stored."]
        for problems, what in ((report.errors, "⚠️ {} invalid record(s):"), (report.skipped, "{} already there, skipped:")):
            if problems:
                lines.append(what.format(len(problems)))
                lines += [f"- {e}" for e in problems[:20]]
                if len(problems) > 20:
                    lines.append(f"- … and {len(problems) - 20} more")
        if report.cleaned:
            lines.append(f"Removed {report.cleaned} image file(s) an interrupted import had left.")
        return "\n".join(lines), report.dataset if report.stored or report.skipped else current

    def rename(self, dataset, new_name) -> tuple[str, str | None]:
        """(status, dataset to show) after renaming `dataset`."""
        if not dataset:
            return "Choose a dataset first.", dataset
        try:
            name = self.store.rename_dataset(dataset, new_name or "")
        except StoreError as e:
            return f"⚠️ Not renamed: {e}", dataset
        return f"Renamed **{dataset}** to **{name}**.", name

    def delete(self, dataset, confirmation) -> tuple[str, str | None, str | None]:
        """(status, backup zip, dataset to show). Deleting needs the dataset's name typed again; the
        dataset is exported (ShareGPT with images, labels and the labelled flag) first, so importing
        that zip brings it back."""
        if not dataset:
            return "Choose a dataset first.", None, dataset
        if (confirmation or "").strip() != dataset:
            return f"⚠️ Not deleted: type the name **{dataset}** to confirm.", None, dataset
        backup, status = self.export(dataset, "sharegpt", WORDS)
        if backup is None:
            return f"⚠️ Not deleted: the backup export failed ({status})", None, dataset
        self.store.delete_dataset(dataset)
        names = [d.name for d in self.store.datasets()]
        return (f"Deleted **{dataset}**. Its backup is ready to download; import that zip to get it back "
                f"(with its labels and images, not its edit history)."), backup, (names[0] if names else None)

    def table(self, dataset, status, search, conv_id=None, page: int | None = None) -> tuple[list, list[int], str, int]:
        """One page of the conversation list: rows (#, first words, labelled, last change by), their
        ids, "page i of n · m conversations", and the page number (0-based). Without `page`, the
        page holding `conv_id`."""
        if not dataset:
            return [], [], "", 0
        try:
            summaries = self.store.conversations(dataset, status=status or "all", search=search or "")
        except StoreError:
            return [], [], "", 0
        pages = max(1, -(-len(summaries) // PAGE_SIZE))
        if page is None:
            ids = [c.id for c in summaries]
            page = ids.index(conv_id) // PAGE_SIZE if conv_id in ids else 0
        page = min(max(int(page), 0), pages - 1)
        shown = summaries[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        rows = [[("▶ " if c.id == conv_id else "") + str(c.position + 1), c.preview.replace("<image>", "🖼 "),
                 "✓" if c.labelled else "",
                 c.updated_by] for c in shown]
        return rows, [c.id for c in shown], f"page {page + 1} of {pages} · {len(summaries)} conversations", page

    def export(self, dataset, fmt, model, processor=None, progress=None) -> tuple[str | None, str]:
        """(zip path, status) of the dataset exported as `fmt`."""
        if not dataset:
            return None, "Choose a dataset first."
        if fmt not in FORMATS:
            return None, f"Unknown format {fmt!r}"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = re.sub(r"[^\w.-]+", "_", dataset)
        out = self.exports_dir / f"{safe}-{fmt}-{stamp}"
        try:
            if fmt == "semantic-ids":
                processor = processor or (self.processor_for(model) if self.processor_for else None)
            report = export_dataset(self.store, dataset, fmt, out, model=processor, progress=progress)
        except Exception as e:  # noqa: BLE001 - shown to the person, nothing half-done to clean up
            return None, f"⚠️ Export failed: {e}"
        archive = shutil.make_archive(str(out), "zip", out)
        status = f"Exported {report.exported} conversations of **{dataset}** as {fmt}."
        if report.errors:
            status += f" ⚠️ {len(report.errors)} could not be aligned: " + "; ".join(report.errors[:5])
        return archive, status


def _with_labels(conv, labels):
    from copy import deepcopy

    preview = deepcopy(conv)
    for turn, (role, spans) in zip(preview.turns, labels):
        turn.role, turn.spans = role, list(spans)
    preview.version = -1  # never cached as the stored version
    return preview


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the browser side ---------------------------------------------------------------------------------

CSS = """
.hsa-annot { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 14px; line-height: 1.9; }
.hsa-annot .bar { position: sticky; top: 0; z-index: 2; background: var(--background-fill-primary, #fff);
  padding: 4px 0; border-bottom: 1px solid #ddd; display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.hsa-annot .hint { color: #666; font-size: 12px; }
.hsa-annot button { border: 1px solid #aaa; border-radius: 4px; padding: 0 8px; cursor: pointer; font-size: 12px; }
.hsa-annot .turn { border-left: 3px solid #ccc; margin: 8px 0; padding-left: 8px; }
.hsa-annot .th { font-family: system-ui, sans-serif; font-size: 12px; color: #444; }
.hsa-annot .tb { padding: 0 4px; margin-left: 2px; }
.hsa-annot .toks { white-space: pre-wrap; word-break: break-word; }
.hsa-annot .tok, .hsa-annot .tpl, .hsa-annot .img { border-radius: 3px; margin: 0 1px; padding: 1px 0;
  box-shadow: inset 0 0 0 1px rgba(0,0,0,.08); }
.hsa-annot .tok { cursor: text; user-select: none; }
.hsa-annot .tpl { opacity: .45; font-size: 12px; }
.hsa-annot .r0 { background: #d6e4fb; } .hsa-annot .r1 { background: #cfeedd; }
.hsa-annot .r2 { background: #e4e4e4; color: #777; text-decoration: line-through rgba(0,0,0,.25); }
.hsa-annot .badge.r0, .hsa-annot .rb.r0, .hsa-annot .tb.r0 { background: #2f6fdf; color: #fff; }
.hsa-annot .badge.r1, .hsa-annot .rb.r1, .hsa-annot .tb.r1 { background: #1a9e55; color: #fff; }
.hsa-annot .badge.r2, .hsa-annot .rb.r2, .hsa-annot .tb.r2 { background: #8a8a8a; color: #fff; }
.hsa-annot .badge { border-radius: 8px; padding: 0 6px; }
.hsa-annot .sp { border-bottom: 2px solid #333; }
.hsa-annot .sel { outline: 2px solid #ff8c00; background-image: linear-gradient(rgba(255,165,0,.35), rgba(255,165,0,.35)); }
.hsa-annot .pager { margin-left: auto; display: inline-flex; gap: 4px; align-items: center; font-size: 12px; }
.hsa-annot .pager .where { color: #444; font-family: system-ui, sans-serif; }
.hsa-annot .pager button:disabled { opacity: .35; cursor: default; }
.hsa-annot .pager .goto { width: 6.5em; font-size: 12px; }
.hsa-annot .suggested { background: #fff4d6; border: 1px solid #f0c36d; padding: 2px 8px; border-radius: 4px; }
"""

# The selection lives in the browser (no round trip per mouse move, so long conversations stay
# responsive): a click picks a token, shift-click or drag extends within its turn. The snapped
# preview is the highlighted tokens; the chosen range goes to Python as UTF-16 offsets.
JS = r"""
const root = element;
let anchor = null, sel = null, dragging = false;
function turnTokens(t) { return Array.from(root.querySelectorAll('.tok[data-t="' + t + '"]')); }
function paint() {
  root.querySelectorAll('.tok.sel').forEach(x => x.classList.remove('sel'));
  if (!sel) return;
  turnTokens(sel.turn).forEach(x => { const k = +x.dataset.k; if (k >= sel.k1 && k <= sel.k2) x.classList.add('sel'); });
}
function extend(tok) {
  const t = +tok.dataset.t, k = +tok.dataset.k;
  if (!anchor || anchor.turn !== t) anchor = {turn: t, k: k};
  const k1 = Math.min(anchor.k, k), k2 = Math.max(anchor.k, k);
  let a = Infinity, b = -Infinity;
  turnTokens(t).forEach(x => { const kk = +x.dataset.k; if (kk >= k1 && kk <= k2) {
    a = Math.min(a, +x.dataset.a); b = Math.max(b, +x.dataset.b); } });
  sel = {turn: t, a: a, b: b, k1: k1, k2: k2};
  paint();
}
root.addEventListener('mousedown', e => {
  const tok = e.target.closest('.tok');
  if (!tok) return;
  e.preventDefault();  // (no focus change: leave a box of the page, so that keys label the selection)
  if (document.activeElement && root.contains(document.activeElement)) document.activeElement.blur();
  if (!(e.shiftKey && anchor)) anchor = {turn: +tok.dataset.t, k: +tok.dataset.k};
  dragging = true;
  extend(tok);
});
root.addEventListener('mouseover', e => {
  if (!dragging) return;
  const tok = e.target.closest('.tok');
  if (tok && +tok.dataset.t === anchor.turn) extend(tok);
});
root.addEventListener('keydown', e => {  // the pager's "turn #" box
  const box = e.target.closest('input.goto');
  if (box && e.key === 'Enter' && box.value !== '') { trigger('hsa_page', {turn: +box.value}); e.preventDefault(); box.blur(); }
});
new MutationObserver(() => {  // a turn asked for by number: scroll to it once it is shown
  const wrap = root.querySelector('.hsa-annot');
  const focus = wrap ? wrap.dataset.focus : undefined;
  if (focus !== undefined && focus !== root.__hsaFocus) {
    const turn = wrap.querySelector('.turn[data-t="' + focus + '"]');
    if (turn) turn.scrollIntoView({block: 'center'});
  }
  root.__hsaFocus = focus;
}).observe(root, {childList: true, subtree: true});
root.addEventListener('mouseup', () => { if (dragging) { dragging = false; if (sel) trigger('hsa_select', sel); } });
root.addEventListener('click', e => {
  const pg = e.target.closest('button[data-page]');
  if (pg) { if (!pg.disabled) trigger('hsa_page', {page: +pg.dataset.page}); return; }
  const button = e.target.closest('button[data-role]');
  if (!button) return;
  if (button.classList.contains('tb')) { trigger('hsa_turn_role', {turn: +button.dataset.t, role: +button.dataset.role}); return; }
  if (!sel) return;
  if (button.dataset.role === 'clear') trigger('hsa_clear', sel);
  else trigger('hsa_label', Object.assign({}, sel, {role: +button.dataset.role}));
  sel = null; anchor = null;
});
if (window.__hsaAnnotateKeys) document.removeEventListener('keydown', window.__hsaAnnotateKeys);
window.__hsaAnnotateKeys = e => {
  const target = e.target;
  if (target && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName))) return;
  if (!root.offsetParent) return;  // the tab is not shown
  const digit = (e.code || '').startsWith('Digit') ? e.code.slice(5) : e.key;
  if ((e.ctrlKey || e.metaKey) && (e.key === 'z' || e.key === 'Z' || e.key === 'y')) {
    trigger((e.key === 'y' || e.shiftKey) ? 'hsa_redo' : 'hsa_undo', {}); e.preventDefault(); return;
  }
  if (e.key === 'Escape') { sel = null; anchor = null; paint(); return; }
  if ((e.key === '[' || e.key === ']') && !e.ctrlKey && !e.metaKey && !e.altKey) {  // previous / next page
    const to = root.querySelector('button.pg[title^="' + (e.key === '[' ? 'previous' : 'next') + '"]');
    if (to && !to.disabled) trigger('hsa_page', {page: +to.dataset.page});
    e.preventDefault(); return;
  }
  if (!sel) return;
  if (['1', '2', '3'].includes(digit)) {
    const role = +digit - 1;
    if (e.shiftKey) trigger('hsa_turn_role', {turn: sel.turn, role: role});
    else trigger('hsa_label', Object.assign({}, sel, {role: role}));
  } else if (digit === '0' || e.key === 'Delete' || e.key === 'Backspace') {
    trigger('hsa_clear', sel);
  } else return;
  e.preventDefault();
  sel = null; anchor = null;
};
document.addEventListener('keydown', window.__hsaAnnotateKeys);
"""


def _processor_loader(ctx):
    from workbench.ui.context import cached_processor

    def load(name: str):
        return cached_processor(ctx.model_source(name, "model"))

    return load


def _model_loader(ctx):
    from workbench.chat import shared_pool, vlm_key

    def load(name: str):
        from models.vlm.loading import load_vlm

        path = ctx.model_source(name, "model")
        return shared_pool().get(vlm_key(path, None, "eager"), lambda: load_vlm(path, attn_implementation="eager"))

    return load


def build(ctx):
    store = Store(ctx.db_path)
    exports = Path(ctx.workspace) / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    annotator = Annotator(store, _processor_loader(ctx), _model_loader(ctx), exports)

    def dataset_names():
        return [d.name for d in store.datasets()]

    names = dataset_names()
    # what this browser had open, so a reload comes back to it (not to the first dataset)
    memory = gr.BrowserState({"dataset": None, "conv_id": -1}, storage_key="hsa-annotate")
    with gr.Row():
        dataset = gr.Dropdown(names, value=names[0] if names else None, label="Dataset", scale=2,
                              allow_custom_value=False, elem_id="annotate-dataset")
        status_filter = gr.Radio(list(STATUSES), value="all", label="Show", scale=2)
        search = gr.Textbox(label="Search text", placeholder="find conversations containing…", scale=2)
        model = gr.Textbox("default", label="Tokens of model", info=f"'default', 'composed', a path, or '{WORDS}'", scale=2)
        author = gr.Textbox("annotator", label="Your name", scale=1)
    with gr.Row():
        prev_button = gr.Button("◀ Previous", scale=1)
        where = gr.Textbox("0 / 0", label="Conversation", interactive=False, scale=1, elem_id="annotate-where")
        jump = gr.Number(1, label="Jump to #", precision=0, minimum=1, scale=1, elem_id="annotate-jump")
        next_button = gr.Button("Next ▶", scale=1)
        progress_md = gr.Markdown(progress_text(store, names[0] if names else None), elem_id="annotate-progress")
    with gr.Accordion("Conversations", open=False, elem_id="annotate-list"):
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True, elem_id="annotate-table",
                             column_widths=["8%", "62%", "10%", "20%"])
        with gr.Row():
            page_prev = gr.Button("◀ page", size="sm", scale=0, min_width=80)
            page_label = gr.Markdown("", elem_id="annotate-page")
            page_next = gr.Button("page ▶", size="sm", scale=0, min_width=80)
    status = gr.Markdown("", elem_id="annotate-status")
    with gr.Row():
        with gr.Column(scale=4):
            view = gr.HTML('<div class="hsa-annot empty">Choose a dataset.</div>', js_on_load=JS, css_template=CSS,
                           elem_id="annotate-view", padding=False)
        with gr.Column(scale=1, min_width=240):
            images = gr.Gallery(label="Images", columns=1, height=260, allow_preview=True)
            undo_button = gr.Button("↶ Undo (Ctrl+Z)")
            redo_button = gr.Button("↷ Redo (Ctrl+Y)")
            with gr.Accordion("Suggestions", open=False):
                rules_button = gr.Button("Suggest by rules")
                model_button = gr.Button("Suggest with the model")
                with gr.Row():
                    accept_button = gr.Button("Accept", variant="primary")
                    reject_button = gr.Button("Reject")
    conv_id = gr.Number(-1, visible=False, precision=0)
    view_page = gr.Number(0, visible=False, precision=0)  # the page of the token view shown
    version = gr.Number(0, visible=False, precision=0)
    suggestion = gr.Textbox("", visible=False)
    page_ids = gr.State([])
    page_number = gr.State(0)
    with gr.Accordion("History of this conversation", open=False):
        history = gr.Dataframe(headers=["version", "when", "who", "kind", "what"], interactive=False, wrap=True)
    with gr.Accordion("Import / export", open=False, elem_id="annotate-io"):
        with gr.Row():
            upload = gr.File(label="ShareGPT JSON/JSONL with its images, or a .zip of both (as Export writes)",
                             file_types=UPLOAD_TYPES, file_count="multiple", type="filepath", elem_id="annotate-upload")
            import_name = gr.Textbox(label="Into dataset (default: the records file's name)", elem_id="annotate-import-name")
            import_button = gr.Button("Import", elem_id="annotate-import")
        with gr.Row():
            export_format = gr.Radio(list(FORMATS), value="sharegpt", label="Export format")
            export_button = gr.Button("Export the dataset")
            export_file = gr.File(label="Download", interactive=False, elem_id="annotate-download")
        import_status = gr.Markdown("", elem_id="annotate-import-status")
    with gr.Accordion("Manage datasets", open=False, elem_id="annotate-manage"):
        with gr.Row():
            new_name = gr.Textbox(label="New name for the chosen dataset", elem_id="annotate-new-name", scale=3)
            rename_button = gr.Button("Rename", elem_id="annotate-rename", scale=1)
        with gr.Row():
            confirm_name = gr.Textbox(label="To delete the chosen dataset, type its name", elem_id="annotate-confirm",
                                      scale=3)
            delete_button = gr.Button("Delete (a backup export is made first)", variant="stop",
                                      elem_id="annotate-delete", scale=1)
        manage_status = gr.Markdown("", elem_id="annotate-manage-status")

    shown = [conv_id, version, view, images, status, history, view_page]

    def present(result: dict):
        return (result["conv_id"], result["version"], result["html"], result["images"], result["status"],
                result["history"], result["page"])

    def listing(dataset_value, status_value, search_value, cid, page=None):
        rows, ids, label, page = annotator.table(dataset_value, status_value, search_value, cid, page)
        return rows, ids, label, page

    def open_conversation(dataset_value, status_value, search_value, current, model_value, step=None, jump_to=None):
        try:
            cid, position = annotator.navigate(dataset_value, status_value, search_value, current, step, jump_to)
            return (*present(annotator.show(cid, model_value)), position, progress_text(store, dataset_value), "",
                    *listing(dataset_value, status_value, search_value, cid))
        except StoreError as e:
            return (*present(annotator.show(-1, model_value, status=f"⚠️ {e}")), "0 / 0", "", "", [], [], "", 0)

    nav_outputs = [*shown, where, progress_md, suggestion, table, page_ids, page_label, page_number]
    nav_inputs = [dataset, status_filter, search, conv_id, model]
    # .input, not .change: a dataset set by a handler (page load, import, rename) opens its own conversation
    dataset.input(lambda d, s, q, c, m: open_conversation(d, s, q, -1, m), nav_inputs, nav_outputs)
    status_filter.change(lambda d, s, q, c, m: open_conversation(d, s, q, -1, m), nav_inputs, nav_outputs)
    search.submit(lambda d, s, q, c, m: open_conversation(d, s, q, -1, m), nav_inputs, nav_outputs)
    model.submit(lambda d, s, q, c, m: open_conversation(d, s, q, c, m, 0), nav_inputs, nav_outputs)
    prev_button.click(lambda d, s, q, c, m: open_conversation(d, s, q, c, m, -1), nav_inputs, nav_outputs)
    next_button.click(lambda d, s, q, c, m: open_conversation(d, s, q, c, m, 1), nav_inputs, nav_outputs)
    jump.submit(lambda d, s, q, c, m, j: open_conversation(d, s, q, c, m, jump_to=j or 1),
                [*nav_inputs, jump], nav_outputs)
    conv_id.change(lambda d, c: {"dataset": d, "conv_id": c}, [dataset, conv_id], memory)

    def open_row(d, s, q, c, m, ids, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not ids or row is None or not 0 <= row < len(ids):
            return gr.skip()
        return open_conversation(d, s, q, ids[row], m, 0)

    table.select(open_row, [*nav_inputs, page_ids], nav_outputs)

    def turn_page(d, s, q, c, page, step):
        return listing(d, s, q, c, (page or 0) + step)

    page_prev.click(lambda d, s, q, c, p: turn_page(d, s, q, c, p, -1), [dataset, status_filter, search, conv_id, page_number],
                    [table, page_ids, page_label, page_number])
    page_next.click(lambda d, s, q, c, p: turn_page(d, s, q, c, p, 1), [dataset, status_filter, search, conv_id, page_number],
                    [table, page_ids, page_label, page_number])

    edit_inputs = [conv_id, version, author, model, view_page]

    def on_edit(kind):
        def handler(c, v, a, m, p, evt: gr.EventData):
            return present(annotator.edit(c, v, a, m, kind, evt._data or {}, page=p))
        return handler

    def after_edit(d):
        return progress_text(store, d)

    for kind in ("label", "clear", "turn_role", "undo", "redo"):
        getattr(view, f"hsa_{kind}")(on_edit(kind), edit_inputs, shown).then(after_edit, dataset, progress_md)
    def describe(c, m, evt: gr.EventData):
        return annotator.describe_selection(c, m, evt._data or {})

    view.hsa_select(describe, [conv_id, model], status)

    def page_of_tokens(c, m, evt: gr.EventData):  # not `turn_page`: the listing's pager above calls that name
        return present(annotator.turn_page(c, m, evt._data or {}))

    view.hsa_page(page_of_tokens, [conv_id, model], shown)
    undo_button.click(lambda c, v, a, m, p: present(annotator.edit(c, v, a, m, "undo", {}, page=p)), edit_inputs, shown) \
        .then(after_edit, dataset, progress_md)
    redo_button.click(lambda c, v, a, m, p: present(annotator.edit(c, v, a, m, "redo", {}, page=p)), edit_inputs, shown) \
        .then(after_edit, dataset, progress_md)

    def suggest(c, m, p, kind):
        if c is None or c < 0:
            return gr.skip(), "", "Open a conversation first."
        try:
            return annotator.suggest(c, m, kind, page=p)
        except Exception as e:  # noqa: BLE001 - e.g. no model to run: say so
            return gr.skip(), "", f"⚠️ No suggestion: {e}"

    rules_button.click(lambda c, m, p: suggest(c, m, p, "rules"), [conv_id, model, view_page], [view, suggestion, status])
    model_button.click(lambda c, m, p: suggest(c, m, p, "model"), [conv_id, model, view_page], [view, suggestion, status])

    def accept(c, v, a, m, p, payload):
        if not payload:
            return (*present(annotator.show(c, m, status="No suggestion to accept.", page=p)), "")
        data = json.loads(payload)
        if data.get("conv_id") != c:
            return (*present(annotator.show(c, m, status="The suggestion was for another conversation.", page=p)), "")
        return (*present(annotator.edit(c, v, a, m, "accept", data, page=p)), "")

    accept_button.click(accept, [*edit_inputs, suggestion], [*shown, suggestion]).then(after_edit, dataset, progress_md)
    reject_button.click(lambda c, m, p: (*present(annotator.show(c, m, status="Suggestion rejected.", page=p)), ""),
                        [conv_id, model, view_page], [*shown, suggestion])

    def choose(name):
        choices = dataset_names()
        return gr.Dropdown(choices=choices, value=name if name in choices else (choices[0] if choices else None))

    def do_import(files, name, who, current, progress=gr.Progress()):
        message, chosen = annotator.import_files(
            files, name, who, current, progress=lambda done, total: progress((done, total), desc="importing", unit="records"))
        return message, choose(chosen)

    def reopen(d, s, q, c, m):  # the conversation in use if the dataset still has it, else its first
        return open_conversation(d, s, q, c, m)

    import_button.click(do_import, [upload, import_name, author, dataset], [import_status, dataset]) \
        .then(reopen, nav_inputs, nav_outputs)

    def do_export(d, fmt, m, progress=gr.Progress()):
        return annotator.export(d, fmt, m, progress=lambda done, total: progress((done, total), desc="exporting"))

    export_button.click(do_export, [dataset, export_format, model], [export_file, import_status])

    def do_rename(d, new):
        message, chosen = annotator.rename(d, new)
        return message, choose(chosen), ""

    rename_button.click(do_rename, [dataset, new_name], [manage_status, dataset, new_name]) \
        .then(reopen, nav_inputs, nav_outputs)

    def do_delete(d, typed):
        message, backup, chosen = annotator.delete(d, typed)
        return message, backup if backup else gr.skip(), choose(chosen), ""

    delete_button.click(do_delete, [dataset, confirm_name], [manage_status, export_file, dataset, confirm_name]) \
        .then(reopen, nav_inputs, nav_outputs)

    # Every page load opens what this browser had open (kept in its local storage), with fresh choices.
    from gradio.context import Context

    def on_load(d, s, q, c, m, remembered):
        choices = dataset_names()
        remembered = remembered or {}
        if remembered.get("dataset") in choices:
            d, c = remembered["dataset"], remembered.get("conv_id", -1)
        else:
            d, c = (d if d in choices else (choices[0] if choices else None)), -1
        return (gr.Dropdown(choices=choices, value=d), *open_conversation(d, s, q, c if c is not None else -1, m))

    Context.root_block.load(on_load, [*nav_inputs, memory], [dataset, *nav_outputs])

    def open_record(d, c, m):  # another tab (Evaluate's wrong answers) opens conversation c of dataset d here
        return (gr.Dropdown(choices=dataset_names(), value=d), "all", "", *open_conversation(d, "all", "", int(c), m))

    return SimpleNamespace(open_record=open_record, model=model, outputs=[dataset, status_filter, search, *nav_outputs])
