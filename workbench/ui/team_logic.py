"""What the Team tab does, as plain functions of values over one store (tested without a browser):
assign a dataset's conversations to annotators, their progress, how much they agree, the review of
one conversation's copies side by side (accept one annotator's version or merge region by region),
and the export of what was reviewed. `workbench.ui.team` only wires these to components.

Who may do what: without a login (`users` None) everyone may; with one, assigning and accepting are
for reviewers (`workbench.users`), and the name written into the history is the logged-in one.
"""
from __future__ import annotations

import html
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.data.align import AlignError
from workbench.agreement import ROLE_LABELS, Score, agreement_report, confusion_figure, disagreements, merge
from workbench.store import NotFoundError, StaleVersionError, StoreError, export_dataset

EXPORT_FORMATS = ("sharegpt", "llamafactory")
UNITS = {"characters": "char", "tokens": "token"}
REVIEW_HEADERS = ["#", "first words", "annotators (✓ done)", "reviewed by", "when"]
REGION_HEADERS = ["#", "turn", "characters", "text", "roles", "take"]
TAKE = REGION_HEADERS.index("take")
BAR_COLOURS = {"done": "#1a9e55", "to do": "#d9d9d9"}


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "—"


def clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- who may do what --------------------------------------------------------------------------

def refusal(users, username: str | None, action: str) -> str | None:
    """Why `username` may not `action` ("assign conversations", "accept labels"), or None when they
    may: everyone without a login, reviewers only with one."""
    if users is None:
        return None
    user = users.get(username)
    if user is None:
        return f"⚠️ Log in as a reviewer to {action}."
    if not user.reviewer:
        return (f"⚠️ Only a reviewer may {action}, and {username} is not one (whoever keeps the users file can "
                f"make them one: `python -m workbench.users add FILE {username} --reviewer`).")
    return None


def acting_name(username: str | None, typed: str | None) -> str:
    """The logged-in name; without a login, the name typed in the tab."""
    return username or (typed or "").strip()


def parse_names(text: str | None) -> list[str]:
    """Annotator names from 'alice, bob' (commas or new lines), each once, in order."""
    return list(dict.fromkeys(n.strip() for n in re.split(r"[,\n]", text or "") if n.strip()))


def default_annotators(users) -> str:
    """The assign box's first value: every user of a login, else nothing (names are typed)."""
    return ", ".join(users.names) if users is not None else ""


# --- assign -----------------------------------------------------------------------------------

def assign(store, dataset, annotators: str, per_conversation, *, users=None, username=None, typed_name="") -> str:
    if not dataset:
        return "Choose a dataset first."
    refused = refusal(users, username, "assign conversations")
    if refused:
        return refused
    names = parse_names(annotators)
    if not names:
        return "⚠️ Name the annotators first, separated by commas (e.g. alice, bob)."
    if users is not None:
        strangers = [n for n in names if n not in users]
        if strangers:
            return (f"⚠️ Not assigned: {', '.join(strangers)} cannot log in to this workbench (its users: "
                    f"{', '.join(users.names)}).")
    try:
        per = int(per_conversation)
    except (TypeError, ValueError):
        return "⚠️ Say how many annotators each conversation goes to (a whole number, 1 or more)."
    try:
        added = store.assign(dataset, names, per, author=acting_name(username, typed_name) or "anonymous")
    except StoreError as e:
        return f"⚠️ Not assigned: {e}"
    total = sum(added.values())
    if not total:
        return f"Nothing to add: every conversation of **{dataset}** already goes to {per} or more annotators."
    shares = ", ".join(f"{name} +{n}" for name, n in added.items())
    return (f"✓ Assigned {total} more: {shares}. Each conversation of **{dataset}** now goes to {per} "
            f"annotator{'s' * (per != 1)}.")


# --- progress ---------------------------------------------------------------------------------

def progress_table(store, dataset) -> tuple[list[list], object | None, str]:
    """(rows: annotator, done, assigned, share, last activity; a bar chart; a summary line)."""
    if not dataset:
        return [], None, "Choose a dataset first."
    try:
        counts = store.progress(dataset)
        info = store.dataset(dataset)
        # last activity: the latest change to a copy in the annotator's queue
        last = {name: max((c.updated_at for c in store.queue(dataset, name, "all")), default=0.0) for name in counts}
    except StoreError as e:
        return [], None, f"⚠️ {e}"
    if not counts:
        return [], None, f"No one has conversations of **{dataset}** assigned yet: assign them above."
    rows = [[name, done, assigned, f"{100 * done / assigned:.0f}%" if assigned else "—", when(last[name])]
            for name, (done, assigned) in counts.items()]
    done, assigned = sum(d for d, _ in counts.values()), sum(a for _, a in counts.values())
    summary = (f"**{dataset}**: {info.total} conversations · {done} of {assigned} assignments done "
               f"({100 * done / assigned:.0f}%) · {info.reviewed} reviewed")
    return rows, progress_figure(counts), summary


def progress_figure(counts: dict[str, tuple[int, int]]):
    """Per annotator a bar of their assignments, the done part green."""
    import plotly.graph_objects as go

    names = list(counts)
    done = [d for d, _ in counts.values()]
    todo = [a - d for d, a in counts.values()]
    figure = go.Figure()
    figure.add_bar(y=names, x=done, name="done", orientation="h", marker_color=BAR_COLOURS["done"],
                   text=[f"{d} / {a}" for d, a in counts.values()], textposition="inside")
    figure.add_bar(y=names, x=todo, name="to do", orientation="h", marker_color=BAR_COLOURS["to do"])
    most = max((a for _, a in counts.values()), default=0)
    figure.update_layout(barmode="stack", height=120 + 36 * len(names), margin=dict(l=10, r=10, t=40, b=10),
                         title="Assignments done per annotator",
                         xaxis=dict(title="conversations", dtick=1 if most <= 10 else None),
                         yaxis=dict(autorange="reversed"), plot_bgcolor="white",
                         legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return figure


# --- conversations that several annotators labelled ---------------------------------------------

@dataclass
class Copied:
    """A conversation with annotators' copies of its labels."""
    id: int
    position: int
    preview: str
    copies: dict  # annotator -> workbench.store.db.AnnotatorCopy
    reviewed_by: str | None = None
    reviewed_at: float | None = None


def copied_conversations(store, dataset, *, minimum: int = 2, done_only: bool = False, progress=None) -> list[Copied]:
    """The conversations of `dataset` with copies from `minimum` or more annotators (with `done_only`,
    copies their annotator marked done), in order; `progress(done, total)` is told as it goes."""
    summaries = store.conversations(dataset)
    every_copy = store.dataset_copies(dataset)
    found = []
    for k, summary in enumerate(summaries):
        if progress:
            progress(k, len(summaries))
        try:
            copies = _only_done(every_copy.get(summary.id, {}), done_only)
            if len(copies) < minimum:
                continue
            item = Copied(summary.id, summary.position, summary.preview, copies)
            if summary.reviewed:
                conv = store.conversation(summary.id)
                item.reviewed_by, item.reviewed_at = conv.reviewed_by, conv.reviewed_at
        except NotFoundError:  # deleted while we read
            continue
        found.append(item)
    return found


def _only_done(copies: dict, done_only: bool) -> dict:
    return {name: c for name, c in copies.items() if c.done} if done_only else copies


def review_list(store, dataset, progress=None) -> tuple[list[list], list[tuple[str, int]], str]:
    """The conversations to review: (table rows, dropdown choices (label, id), a summary line)."""
    if not dataset:
        return [], [], "Choose a dataset first."
    try:
        items = copied_conversations(store, dataset, progress=progress)
    except StoreError as e:
        return [], [], f"⚠️ {e}"
    rows, choices = [], []
    for item in items:
        names = ", ".join(name + (" ✓" if c.done else "") for name, c in item.copies.items())
        rows.append([item.position + 1, clip(item.preview.replace("<image>", "🖼 "), 70), names,
                     item.reviewed_by or "", when(item.reviewed_at) if item.reviewed_at else ""])
        state = f"✓ reviewed by {item.reviewed_by}" if item.reviewed_by else "not reviewed"
        choices.append((f"#{item.position + 1} · {clip(item.preview, 40)} · {state}", item.id))
    if not items:
        return [], [], (f"No conversation of **{dataset}** has copies from two annotators yet: assign each "
                        "conversation to 2 or more annotators and let them label.")
    reviewed = sum(1 for item in items if item.reviewed_by)
    return rows, choices, f"{len(items)} conversations with two or more copies · {reviewed} reviewed"


# --- agreement --------------------------------------------------------------------------------

LANDIS_KOCH = ((0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial"), (1.0, "almost perfect"))


def kappa_reading(score: Score) -> str:
    """Landis & Koch's (1977) bands for a kappa."""
    if score.value is None:
        return score.reason
    if score.value < 0:
        return "poor: below chance"
    return next(words for upper, words in LANDIS_KOCH if score.value <= upper or upper == 1.0)


def alpha_reading(score: Score) -> str:
    """Krippendorff's own thresholds: 0.800 to rely on, 0.667 for tentative conclusions."""
    if score.value is None:
        return score.reason
    if score.value >= 0.8:
        return "reliable (≥ 0.800)"
    if score.value >= 0.667:
        return "tentative conclusions only (0.667–0.800)"
    return "unreliable (< 0.667)"


def number(score: Score | float | None) -> str:
    value = score.value if isinstance(score, Score) else score
    return "undefined" if value is None else f"{value:.3f}"


@dataclass
class AgreementView:
    summary: str
    overall: list[list] = field(default_factory=list)  # coefficient, value, reading, units
    pairs: list[list] = field(default_factory=list)
    roles: list[list] = field(default_factory=list)
    figure: object | None = None


OVERALL_HEADERS = ["coefficient", "value", "reading", "units"]
PAIR_HEADERS = ["annotator", "annotator", "conversations", "units", "same role", "Cohen's κ", "reading",
                *(f"κ {role}" for role in ROLE_LABELS)]
ROLE_HEADERS = ["role", "given to units", "Fleiss' κ", "Krippendorff's α", "reading of α"]
READINGS = ("Readings: κ in Landis & Koch's bands (slight ≤ 0.2 < fair ≤ 0.4 < moderate ≤ 0.6 < substantial ≤ 0.8 "
            "< almost perfect); α by Krippendorff's thresholds (rely on ≥ 0.800, tentative conclusions from 0.667). "
            "Per role: that role against the other two.")


def agreement(store, dataset, unit: str = "char", model: str = "default", processor_for=None, *,
              done_only: bool = False, progress=None) -> AgreementView:
    """Agreement on roles over the conversations of `dataset` that two or more annotators labelled,
    on characters or on the tokens of `model` (`processor_for(model)` loads its processor)."""
    if not dataset:
        return AgreementView("Choose a dataset first.")
    if unit not in UNITS.values():
        return AgreementView(f"⚠️ Unit must be characters or tokens, not {unit!r}.")
    processor = None
    if unit == "token":
        try:
            processor = processor_for(model)
        except Exception as e:  # noqa: BLE001 - any load failure is the person's to fix: say what it was
            return AgreementView(f"⚠️ The tokenizer of {model!r} could not be loaded ({type(e).__name__}: {e}); "
                                 "characters need none.")
    try:
        ids = store.conversation_ids(dataset)
        every_copy = store.dataset_copies(dataset)
    except StoreError as e:
        return AgreementView(f"⚠️ {e}")
    current = {"position": None}

    def items():  # read as the report goes, so progress follows the (slow) token alignment
        for k, cid in enumerate(ids):
            if progress:
                progress(k, len(ids))
            try:
                copies = _only_done(every_copy.get(cid, {}), done_only)
                if len(copies) < 2:
                    continue
                conv = store.conversation(cid)
            except NotFoundError:
                continue
            current["position"] = conv.position
            yield conv.as_conversation(), {name: c.labels for name, c in copies.items()}

    try:
        report = agreement_report(items(), unit=unit, processor=processor)
    except (AlignError, ValueError) as e:
        where = f" (conversation #{current['position'] + 1})" if current["position"] is not None else ""
        return AgreementView(f"⚠️ Agreement not computed{where}: {e}")
    skipped = len(ids) - report.conversations
    which = "copies marked done" if done_only else "copies"
    if not report.conversations:
        return AgreementView(f"No conversation of **{dataset}** has {which} from two or more annotators yet "
                             f"({skipped} skipped): assign each conversation to 2 or more annotators and let them label.")
    what = "characters" if unit == "char" else f"tokens of {model}"
    summary = (f"**Agreement on {what}** over {report.conversations} conversations with {which} from two or more "
               f"annotators ({', '.join(report.annotators)}); {skipped} skipped (fewer than two). "
               f"{report.units:,} units compared")
    if report.unanimous is not None:
        summary += f"; on {report.unanimous:.1%} of them all their annotators gave the same role"
    overall = []
    if len(report.annotators) == 2:
        overall.append([f"Cohen's κ ({' vs '.join(report.annotators)})", number(report.cohen),
                        kappa_reading(report.cohen), report.cohen.units])
    overall += [["Fleiss' κ", number(report.fleiss), kappa_reading(report.fleiss), report.fleiss.units],
                ["Krippendorff's α", number(report.alpha), alpha_reading(report.alpha), report.alpha.units]]
    pairs = [[a, b, p.conversations, p.units, f"{p.observed:.1%}" if p.observed is not None else "—",
              number(p.kappa), kappa_reading(p.kappa), *(number(p.per_role[r]) for r in ROLE_LABELS)]
             for (a, b), p in report.pairs.items()]
    given = sum(report.role_totals.values()) or 1
    roles = [[r, f"{report.role_totals[r]:,} ({report.role_totals[r] / given:.0%})", number(report.fleiss_per_role[r]),
              number(report.alpha_per_role[r]), alpha_reading(report.alpha_per_role[r])] for r in ROLE_LABELS]
    if len(report.annotators) == 2:
        (a, b), pair = next(iter(report.pairs.items()))
        figure = confusion_figure(pair.confusion, title=f"Roles: {a} (rows) vs {b} (columns)", rows=a, columns=b)
    else:
        figure = confusion_figure(report.confusion, title="Roles of every pair of annotators (both ways)",
                                  rows="one annotator", columns="another")
    return AgreementView(f"{summary}.\n\n{READINGS}", overall, pairs, roles, figure)


# --- review -----------------------------------------------------------------------------------

@dataclass
class ReviewView:
    """One conversation's copies side by side, and what the accept buttons act on (`shown`: the
    conversation id, the main labels' version and each copy's version as shown)."""
    html: str
    regions: list[list]
    annotators: list[str]
    shown: dict
    status: str


EMPTY_REVIEW = '<div class="hsa-review empty">Choose a conversation that two or more annotators labelled.</div>'


def no_review(status: str = "") -> ReviewView:
    return ReviewView(EMPTY_REVIEW, [], [], {"conv_id": -1, "version": 0, "copies": {}}, status)


def open_review(store, conv_id, *, keep: dict | None = None, status: str = "") -> ReviewView:
    """The copies of conversation `conv_id` side by side; in the regions table each region takes the
    annotator `keep` chose for it (by region key) if any, else the first annotator."""
    if conv_id is None or int(conv_id) < 0:
        return no_review(status)
    try:
        conv = store.conversation(int(conv_id))
        copies = store.copies(conv.id)
        history = store.history(conv.id) if conv.reviewed else []
    except NotFoundError:
        return no_review(status or f"⚠️ Conversation {conv_id} is gone (deleted meanwhile?).")
    names = list(copies)
    shown = {"conv_id": conv.id, "version": conv.version, "copies": {n: c.version for n, c in copies.items()}}
    if len(names) < 2:
        return ReviewView(EMPTY_REVIEW, [], [], shown, status or
                          f"⚠️ Conversation #{conv.position + 1} has {len(names)} cop{'y' if len(names) == 1 else 'ies'}: "
                          "nothing to compare yet.")
    annotations = {name: c.labels for name, c in copies.items()}
    regions = disagreements(conv.as_conversation(), annotations)
    keep = keep or {}
    rows = [[k + 1, r.turn, f"{r.start}–{r.end}", clip(conv.turns[r.turn].text[r.start:r.end]),
             ", ".join(f"{name} {ROLE_LABELS[role]}" for name, role in r.roles.items()),
             keep.get(r.key) if keep.get(r.key) in annotations else names[0]] for k, r in enumerate(regions)]
    if conv.reviewed:
        how = next((rev.action for rev in reversed(history) if rev.kind == "review"), "")
        state = f"reviewed by {conv.reviewed_by} at {when(conv.reviewed_at)}" + (f" ({how})" if how else "")
    else:
        state = "not reviewed yet"
    differ = sum(r.end - r.start for r in regions)
    line = (f"Conversation #{conv.position + 1} · {state} · labels version {conv.version} · "
            + (f"{len(regions)} region{'s' * (len(regions) != 1)} where they differ ({differ} characters)"
               if regions else "the annotators agree everywhere"))
    return ReviewView(side_by_side(conv, copies, regions), rows, names, shown,
                      f"{status}\n\n{line}" if status else line)


def side_by_side(conv, copies: dict, regions) -> str:
    """Each annotator's copy in a column, a row per turn (so turns line up), the text coloured by role
    and the disagreement regions outlined and numbered as in the regions table."""
    names = list(copies)
    number_of = {r.key: k + 1 for k, r in enumerate(regions)}
    parts = [f'<div class="hsa-review" style="grid-template-columns: repeat({len(names)}, minmax(0, 1fr))">',
             '<div class="legend"><span class="r0">GLOBAL</span><span class="r1">LANDMARK</span><span class="r2">NOISE'
             '</span><span class="dis">they differ</span> numbered as the rows of the table below</div>']
    for name, c in copies.items():
        parts.append(f'<div class="who" data-annotator="{html.escape(name)}"><b>{html.escape(name)}</b> · version '
                     f'{c.version}{" · done ✓" if c.done else ""} · {when(c.updated_at)}</div>')
    for t, turn in enumerate(conv.turns):
        here = [r for r in regions if r.turn == t]
        for name, c in copies.items():
            role, spans = c.labels[t]
            parts.append(f'<div class="turn" data-t="{t}"><div class="th">{t} {html.escape(turn.speaker)} · '
                         f'<span class="badge r{role}">{ROLE_LABELS[role]}</span></div><div class="text">'
                         + _coloured(turn.text, role, spans, here, number_of) + "</div></div>")
    parts.append("</div>")
    return "".join(parts)


def _coloured(text: str, role: int, spans, regions, number_of) -> str:
    """`text` in runs of one role (spans painting over the turn's role, the last one winning), cut
    also at the regions' ends so each region is its own outlined run."""
    roles = [role] * len(text)
    for s in spans:
        roles[s.start:s.end] = [s.role] * (s.end - s.start)
    region_at = [None] * len(text)
    for r in regions:
        region_at[r.start:r.end] = [r] * (r.end - r.start)
    out, start = [], 0
    for i in range(1, len(text) + 1):
        if i < len(text) and roles[i] == roles[start] and region_at[i] is region_at[start]:
            continue
        region = region_at[start]
        piece = html.escape(text[start:i])
        if region is None:
            out.append(f'<span class="r{roles[start]}">{piece}</span>')
        else:
            k = number_of[region.key]
            first = start == region.start
            out.append((f'<sup class="rn">{k}</sup>' if first else "")
                       + f'<span class="r{roles[start]} dis" data-region="{k}" title="region {k}: '
                       + html.escape(", ".join(f"{n} {ROLE_LABELS[v]}" for n, v in region.roles.items()))
                       + f'">{piece}</span>')
        start = i
    return "".join(out)


def choices_of(rows) -> dict:
    """The regions table's choices by region key (turn, start, end): {key: annotator}; empty cells left out."""
    chosen = {}
    for row in rows or []:
        try:
            who = str(row[TAKE] or "").strip()
            start, _, end = str(row[2]).partition("–")
            key = (int(row[1]), int(start), int(end))
        except (TypeError, ValueError, IndexError):  # not a region row (an empty table's filler)
            continue
        if who:
            chosen[key] = who
    return chosen


def accept(store, shown: dict, take: str | None, rows, *, users=None, username=None, typed_name="") -> ReviewView:
    """Accept annotator `take`'s copy as the conversation's labels, or (`take` None) merge the copies
    as the regions table `rows` chose. Refused (the view shown again, the choices kept) without the
    reviewer role, without a name, when a copy changed since it was shown, or when the labels were
    changed meanwhile (a stale version)."""
    shown = shown or {}
    cid = shown.get("conv_id", -1)
    keep = choices_of(rows)

    def again(message):
        return open_review(store, cid, keep=keep, status=message)

    if cid is None or cid < 0:
        return no_review("Choose a conversation first.")
    refused = refusal(users, username, "accept labels")
    if refused:
        return again(refused)
    reviewer = acting_name(username, typed_name)
    if not reviewer:
        return again("⚠️ Type your name (the reviewer's) first: it goes into the history.")
    try:
        conv = store.conversation(cid)
        copies = store.copies(cid)
    except NotFoundError:
        return no_review(f"⚠️ Not accepted: conversation {cid} is gone (deleted meanwhile?).")
    changed = copies_changed(shown.get("copies", {}), {name: c.version for name, c in copies.items()})
    if changed:
        return again(f"⚠️ Not accepted: {changed} since the copies were shown. Here they are as they are now; "
                     "your choices are kept where the regions are the same.")
    annotations = {name: c.labels for name, c in copies.items()}
    try:
        if take is not None:
            if take not in annotations:
                return again(f"⚠️ Not accepted: {take} has no copy of this conversation.")
            labels, source, said = annotations[take], f"accepted {take}", f"{take}'s version"
        else:
            strangers = sorted({who for who in keep.values() if who not in annotations})
            if strangers:
                return again(f"⚠️ Not merged: {', '.join(strangers)} in the 'take' column is not one of "
                             f"{', '.join(annotations)}.")
            names = list(annotations)
            labels = merge(conv.as_conversation(), annotations, keep, default=names[0])
            # whose labels the merge took: the chosen annotator of every region (the first where none is chosen)
            taken = {keep.get(r.key, names[0]) for r in disagreements(conv.as_conversation(), annotations)}
            taken = [n for n in names if n in taken] or names  # no region: they agree, all of them
            if len(taken) == 1:
                source, said = f"accepted {taken[0]}", f"{taken[0]}'s version (chosen in every region)"
            else:
                source, said = "merged " + "+".join(taken), f"the merge of {' and '.join(taken)}"
        store.accept(cid, labels, reviewer=reviewer, expected_version=int(shown["version"]), source=source,
                     expected_copies=shown.get("copies") or None)  # checked again where the labels are written
    except StaleVersionError as e:
        return again(f"⚠️ Not accepted: {e}. Here is the conversation as it is now; your choices are kept: accept "
                     "again to replace what is there.")
    except (StoreError, ValueError) as e:
        return again(f"⚠️ Not accepted: {e}")
    return open_review(store, cid, keep=keep, status=f"✓ Accepted {said} as the labels for training, reviewed by "
                                                      f"{reviewer}.")


def copies_changed(shown: dict, now: dict) -> str:
    """What changed between the copy versions shown and those `now` ({annotator: version}), in words; '' if nothing."""
    said = []
    for name in sorted(set(shown) | set(now)):
        if name not in now:
            said.append(f"{name}'s copy is gone")
        elif name not in shown:
            said.append(f"{name} has a copy now")
        elif now[name] != shown[name]:
            said.append(f"{name} changed their copy (version {shown[name]} shown, now {now[name]})")
    return "; ".join(said)


# --- export -----------------------------------------------------------------------------------

def export_reviewed(store, dataset, fmt: str, exports_dir: Path, progress=None) -> tuple[str | None, str]:
    """(zip path, status) of the reviewed conversations of `dataset` exported as `fmt`."""
    if not dataset:
        return None, "Choose a dataset first."
    if fmt not in EXPORT_FORMATS:
        return None, f"⚠️ Unknown format {fmt!r}: {' or '.join(EXPORT_FORMATS)}."
    try:
        info = store.dataset(dataset)
    except StoreError as e:
        return None, f"⚠️ {e}"
    if not info.reviewed:
        return None, f"Nothing to export: no conversation of **{dataset}** is reviewed yet."
    safe = re.sub(r"[^\w.-]+", "_", dataset)
    stem = f"{safe}-reviewed-{fmt}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = Path(exports_dir) / stem, 1
    while out.exists() or out.with_suffix(".zip").exists():  # two exports in one second
        n += 1
        out = Path(exports_dir) / f"{stem}-{n}"
    try:
        report = export_dataset(store, dataset, fmt, out, progress=progress, reviewed_only=True)
    except (StoreError, OSError) as e:
        shutil.rmtree(out, ignore_errors=True)
        return None, f"⚠️ Export failed: {e}"
    archive = shutil.make_archive(str(out), "zip", out)
    n = report.exported
    return archive, f"✓ Exported {n} reviewed conversation{'s' * (n != 1)} of **{dataset}** (of {info.total}) as {fmt}."
