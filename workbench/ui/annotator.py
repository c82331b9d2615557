"""What the Annotate tab does, as plain functions of values over one store (tested without a browser):
show a conversation's token view a page at a time, apply a labelling action from the browser (refusing a
stale one), undo/redo, suggestions, navigation and the conversation list, import, export, rename, delete.
`workbench.ui.annotate` only wires these to components."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from models.data.align import AlignError
from models.hsa import ROLE_NAMES
from workbench.store import FORMATS, FileError, StaleVersionError, Store, StoreError, export_dataset, import_upload
from workbench.store.db import labels_from_json, labels_to_json
from workbench.store.suggest import model_suggestions, rule_suggestions
from workbench.agreement import disagreements
from workbench.ui.annotate_view import (WORDS, TokenView, page_of_turn, render_view, selection_from_browser, snap,
                                        token_view, view_pages, word_view)

PAGE_SIZE = 15  # conversations per page of the list
QUEUES = {"my to-do": "todo", "my done": "done"}  # list filters over the person's assignments


def progress_text(store: Store, dataset: str | None, who=None) -> str:
    """The dataset's progress; where it is split among annotators, the person's queue and the team's."""
    if not dataset:
        return "No dataset yet: import one below."
    info = store.dataset(dataset)
    share = f" ({100 * info.labelled / info.total:.0f}%)" if info.total else ""
    text = f"**Progress:** {info.labelled} / {info.total} conversations labelled{share}"
    team = store.progress(dataset)
    if not team:
        return text
    who = (who or "").strip()
    mine = f"**Your queue:** {team[who][0]} / {team[who][1]} done · " if who in team else \
        ("**Your queue:** nothing assigned to you · " if who else "")
    return mine + "team: " + " · ".join(f"{name} {done}/{assigned}" for name, (done, assigned) in team.items()) \
        + f" · {len(store.conversation_ids(dataset, status='reviewed'))} reviewed"



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

    def ids(self, dataset, status="all", search="", who=None) -> list[int]:
        """The conversations the list and the arrows go through: a status of the store, or this
        person's queue ("my to-do" / "my done": what is assigned to them), narrowed by a search."""
        if not dataset:
            return []
        if status in QUEUES:
            if not (who or "").strip():
                raise StoreError("type your name (or log in) to see your queue")
            queue = [c.id for c in self.store.queue(dataset, who, QUEUES[status])]
            if not search:
                return queue
            found = set(self.store.conversation_ids(dataset, search=search))
            return [cid for cid in queue if cid in found]
        return self.store.conversation_ids(dataset, status=status, search=search or "")

    def copy_for(self, conv_id, who) -> str | None:
        """Whose labels the tab shows and edits: in a dataset split among annotators (the conversation has
        assignees) each person labels their own copy, which the others do not see; elsewhere everyone
        edits the one set of labels. A review makes a copy the conversation's labels (the Team tab)."""
        if conv_id is None or conv_id < 0 or not self.store.assignees(int(conv_id)):
            return None
        who = (who or "").strip()
        if not who:
            raise StoreError("this conversation is labelled by assigned annotators, each in their own copy: "
                             "type your name (or log in) to label yours")
        return who

    def show(self, conv_id, model: str, status: str = "", page: int = 0, focus: int | None = None, who=None,
             disagreements: bool = False) -> dict:
        """Everything the tab shows for one conversation, its tokens one page at a time: the labels
        `who` edits (`copy_for`), and where the annotators' copies disagree when asked."""
        if conv_id is None or conv_id < 0:
            return {"conv_id": -1, "version": 0, "html": '<div class="hsa-annot empty">No conversation.</div>',
                    "images": [], "status": status or "No conversation matches.", "history": [], "page": 0}
        try:
            copy = self.copy_for(conv_id, who)
        except StoreError as error:  # no name in a team dataset: show the main labels, say why edits need one
            copy, status = None, status or f"⚠️ {error}"
        conv = self.store.conversation(int(conv_id), annotator=copy)
        view, note = self.view(conv, model)
        page = min(max(int(page or 0), 0), len(view_pages(view, len(conv.turns))) - 1)
        regions, note_regions = [], ""
        if disagreements:
            regions, note_regions = self.disagreements(conv)
        history = [[r.version, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)), r.author,
                    r.kind, r.action] for r in reversed(self.store.history(conv.id, annotator=copy))][:50]
        whose = f" · {copy}'s copy{' · done ✓' if conv.labelled else ''}" if copy else (
            f" · reviewed by {conv.reviewed_by}" if conv.reviewed_by else "")
        return {"conv_id": conv.id, "version": conv.version, "page": page,
                "html": render_view(conv, view, page=page, focus=focus, disagree=regions),
                "images": [str(p) for p in conv.images], "history": history,
                "status": " · ".join(x for x in (" ".join(x for x in (status, note) if x) or
                                                 f"Conversation #{conv.position + 1}{whose} · version {conv.version}"
                                                 + (f" · last change by {conv.updated_by}" if conv.updated_by else ""),
                                                 note_regions) if x)}

    def disagreements(self, conv) -> tuple[list, str]:
        """Where the annotators' copies of `conv` give characters different roles, and a note on it."""
        copies = self.store.copies(conv.id)
        if len(copies) < 2:
            return [], f"no disagreements to show: {len(copies)} annotator cop{'y' if len(copies) == 1 else 'ies'}, two are needed"
        regions = disagreements(conv.as_conversation(), {name: c.labels for name, c in copies.items()})
        return regions, f"{len(regions)} disagreement{'s' * (len(regions) != 1)} among {', '.join(copies)}, outlined in red"

    def turn_page(self, conv_id, model: str, data: dict, who=None, disagreements: bool = False) -> dict:
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
            shown = self.show(conv_id, model, who=who) if conv_id is not None and conv_id >= 0 else self.show(-1, model)
            shown["status"] = f"⚠️ {e}"
            return shown
        return self.show(conv_id, model, page=page, focus=focus, who=who, disagreements=disagreements)

    def navigate(self, dataset, status, search, conv_id, step: int | None = None, jump: int | None = None, who=None):
        """The conversation `step` away from `conv_id` in the filtered list, or number `jump`
        (1-based) of it; returns (conv_id, "i / n"). With neither, `conv_id` itself when it is in
        the list, else the first."""
        ids = self.ids(dataset, status, search, who)
        if not ids:
            return -1, "0 / 0"
        if jump is not None:
            index = min(max(int(jump) - 1, 0), len(ids) - 1)
        elif conv_id in ids:
            index = min(max(ids.index(conv_id) + (step or 0), 0), len(ids) - 1)
        else:
            index = 0
        return ids[index], f"{index + 1} / {len(ids)}"

    def edit(self, conv_id, version, author, model, kind: str, data: dict, page: int = 0,
             disagreements: bool = False) -> dict:
        """Apply one labelling action from the browser; a stale one is refused and the newer
        version shown (on the same page)."""
        try:
            if conv_id is None or conv_id < 0:
                raise StoreError("no conversation is open")
            copy = self.copy_for(conv_id, author)  # a team dataset: the author's own copy
            author = (author or "").strip() or "anonymous"
            mine = {"annotator": copy}
            conv = self.store.conversation(int(conv_id), annotator=copy)
            version = int(version)
            if kind in ("label", "clear"):
                view, _ = self.view(conv, model)
                turn, start, end = selection_from_browser(conv, view, data)
                if kind == "label":
                    role = int(data["role"])
                    self.store.set_span(conv.id, turn, start, end, role, expected_version=version, author=author, **mine)
                    message = f"Turn {turn} «{_clip(conv.turns[turn].text[start:end])}» → {ROLE_NAMES[role]}"
                else:
                    self.store.clear_span(conv.id, turn, start, end, expected_version=version, author=author, **mine)
                    message = f"Turn {turn} «{_clip(conv.turns[turn].text[start:end])}» cleared"
            elif kind == "turn_role":
                turn, role = int(data["turn"]), int(data["role"])
                self.store.set_turn_role(conv.id, turn, role, expected_version=version, author=author, **mine)
                message = f"Turn {turn} → {ROLE_NAMES[role]}"
            elif kind == "undo":
                self.store.undo(conv.id, expected_version=version, author=author, **mine)
                message = "Undone"
            elif kind == "redo":
                self.store.redo(conv.id, expected_version=version, author=author, **mine)
                message = "Redone"
            elif kind == "accept":
                labels = labels_from_json(data["labels"])
                self.store.set_labels(conv.id, labels, expected_version=version, author=author,
                                      action=f"accepted {data.get('source', 'suggestions')}", **mine)
                message = "Suggestion accepted (undo takes it back)"
            elif kind in ("done", "not done"):
                if copy is None:
                    raise StoreError("only an annotator's copy is marked done (this conversation is not assigned)")
                if conv.version != version:
                    raise StaleVersionError(f"your copy changed meanwhile (now version {conv.version})", conv.version)
                self.store.mark_labelled(conv.id, kind == "done", author=author, **mine)
                message = "Marked done" if kind == "done" else "Marked not done"
            else:
                raise StoreError(f"unknown action {kind!r}")
        except StaleVersionError as e:
            return self.show(conv_id, model, status=f"⚠️ **Not saved.** {e}. Showing the current version.", page=page,
                             who=author, disagreements=disagreements)
        except (StoreError, KeyError, ValueError, TypeError) as e:
            shown = self.show(conv_id, model, page=page, who=author, disagreements=disagreements) \
                if conv_id is not None and conv_id >= 0 \
                else self.show(-1, model)
            shown["status"] = f"⚠️ {e}"
            return shown
        where = f" in {copy}'s copy" if copy else ""
        return self.show(conv_id, model, status=f"✓ Saved{where}. {message}.", page=page, who=author,
                         disagreements=disagreements)

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

    def suggest(self, conv_id, model, kind: str, page: int = 0, who=None):
        """(preview html of that page, suggestion json, status) for the rule or model suggestions, against
        the labels `who` edits."""
        conv = self.store.conversation(int(conv_id), annotator=self.copy_for(conv_id, who))
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

    def table(self, dataset, status, search, conv_id=None, page: int | None = None, who=None
              ) -> tuple[list, list[int], str, int]:
        """One page of the conversation list: rows (#, first words, labelled, last change by), their
        ids, "page i of n · m conversations", and the page number (0-based). Without `page`, the
        page holding `conv_id`. In a queue, "labelled" is the person's done mark on their copy."""
        if not dataset:
            return [], [], "", 0
        try:
            if status in QUEUES:
                wanted = set(self.ids(dataset, status, search, who))
                summaries = [c for c in self.store.queue(dataset, who, "all") if c.id in wanted]
            else:
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
