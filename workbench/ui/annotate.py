"""The Annotate tab: browse a dataset's conversations, see the chosen model's tokens coloured by
role, select tokens and give them a role by click or key (1 global, 2 landmark, 3 noise, 0 clear),
set whole turns, undo/redo, accept or reject suggestions, import and export.

This module only wires components: what a handler does is `Annotator` (workbench.ui.annotator), the
token view's pages and HTML are workbench.ui.annotate_view, both without Gradio and tested without a
browser; the browser side is annotate.js and annotate.css beside this file.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from workbench.store import FORMATS, Store, StoreError
from workbench.ui.annotate_view import WORDS
from workbench.ui.annotator import QUEUES, Annotator, progress_text
from workbench.ui.events import event_payload

STATUSES = ("all", "unlabelled", "labelled", "reviewed", *QUEUES)  # the last: the person's assignments
TABLE_HEADERS = ["#", "first words", "labelled", "last change by"]
UPLOAD_TYPES = [".json", ".jsonl", ".zip", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"]
SELECTION = ("turn", "a", "b", "role", "page")  # what the browser sends with the view's events (annotate.js)

HERE = Path(__file__).resolve().parent
CSS = (HERE / "annotate.css").read_text(encoding="utf-8")
JS = (HERE / "annotate.js").read_text(encoding="utf-8")


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


def build(ctx, blocks: gr.Blocks):
    """The tab's components and events, inside `blocks` (whose page load reopens what this browser had
    open); returns what other tabs wire to: `open_record`, the model box and its outputs."""
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
        author = gr.Textbox("annotator", label="Your name", scale=1, elem_id="annotate-author",
                            info="with a login: who logged in" if ctx.users is not None else "in the history; "
                            "in a dataset split among annotators, whose copy you label")
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
            with gr.Row():  # an assigned annotator's own mark: their copy is finished (their queue moves on)
                done_button = gr.Button("✓ Mark my copy done", size="sm", elem_id="annotate-done")
                not_done_button = gr.Button("Not done", size="sm", elem_id="annotate-not-done")
            outline = gr.Checkbox(False, label="Outline where annotators disagree", elem_id="annotate-outline")
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

    def listing(dataset_value, status_value, search_value, cid, page=None, who=None):
        rows, ids, label, page = annotator.table(dataset_value, status_value, search_value, cid, page, who)
        return rows, ids, label, page

    def open_conversation(dataset_value, status_value, search_value, current, model_value, who, outline,
                          step=None, jump_to=None):
        try:
            cid, position = annotator.navigate(dataset_value, status_value, search_value, current, step, jump_to, who)
            shown_now = present(annotator.show(cid, model_value, who=who, disagreements=outline))
            # this browser remembers what it has open in the same response: a reload right after lands here
            remembered = {"dataset": dataset_value, "conv_id": shown_now[0]}
            return (*shown_now, position, progress_text(store, dataset_value, who), "",
                    *listing(dataset_value, status_value, search_value, cid, who=who), remembered)
        except StoreError as e:
            return (*present(annotator.show(-1, model_value, status=f"⚠️ {e}")), "0 / 0", "", "", [], [], "", 0,
                    gr.skip())

    def navigation(current=None, step=None):
        """A handler opening a conversation: `current` -1 starts the list afresh (None: the one open),
        `step` moves along it (0: reopen)."""
        def handler(d, s, q, c, m, a, o, request: gr.Request):
            return open_conversation(d, s, q, c if current is None else current, m, ctx.person(a, request), o, step)
        return handler

    nav_outputs = [*shown, where, progress_md, suggestion, table, page_ids, page_label, page_number, memory]
    nav_inputs = [dataset, status_filter, search, conv_id, model, author, outline]
    # .input, not .change: a dataset set by a handler (page load, import, rename) opens its own conversation
    dataset.input(navigation(current=-1), nav_inputs, nav_outputs)
    status_filter.change(navigation(current=-1), nav_inputs, nav_outputs)
    search.submit(navigation(current=-1), nav_inputs, nav_outputs)
    model.submit(navigation(step=0), nav_inputs, nav_outputs)
    author.submit(navigation(step=0), nav_inputs, nav_outputs)  # another name: their copy and queue
    outline.change(navigation(step=0), nav_inputs, nav_outputs)
    prev_button.click(navigation(step=-1), nav_inputs, nav_outputs)
    next_button.click(navigation(step=1), nav_inputs, nav_outputs)

    def jump_to(d, s, q, c, m, a, o, j, request: gr.Request):
        return open_conversation(d, s, q, c, m, ctx.person(a, request), o, jump_to=j or 1)

    jump.submit(jump_to, [*nav_inputs, jump], nav_outputs)

    def open_row(d, s, q, c, m, a, o, ids, evt: gr.SelectData, request: gr.Request):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not ids or row is None or not 0 <= row < len(ids):
            return gr.skip()
        return open_conversation(d, s, q, ids[row], m, ctx.person(a, request), o, 0)

    table.select(open_row, [*nav_inputs, page_ids], nav_outputs)

    def turn_page(step):
        def handler(d, s, q, c, a, page, request: gr.Request):
            return listing(d, s, q, c, (page or 0) + step, ctx.person(a, request))
        return handler

    pager_inputs = [dataset, status_filter, search, conv_id, author, page_number]
    page_prev.click(turn_page(-1), pager_inputs, [table, page_ids, page_label, page_number])
    page_next.click(turn_page(1), pager_inputs, [table, page_ids, page_label, page_number])

    edit_inputs = [conv_id, version, author, model, view_page, outline]

    def edit(kind, payload=None):
        """A handler applying one labelling action: from the token view's event (payload None), or a button's."""
        def handler(c, v, a, m, p, o, evt: gr.EventData, request: gr.Request):
            data = event_payload(evt, *SELECTION) if payload is None else payload
            return present(annotator.edit(c, v, ctx.person(a, request), m, kind, data, page=p, disagreements=o))
        return handler

    def after_edit(d, a, request: gr.Request):
        return progress_text(store, d, ctx.person(a, request))

    for kind in ("label", "clear", "turn_role", "undo", "redo"):
        getattr(view, f"hsa_{kind}")(edit(kind), edit_inputs, shown).then(after_edit, [dataset, author], progress_md)
    for button, kind in ((undo_button, "undo"), (redo_button, "redo"), (done_button, "done"),
                         (not_done_button, "not done")):
        button.click(edit(kind, {}), edit_inputs, shown).then(after_edit, [dataset, author], progress_md)

    def describe(c, m, evt: gr.EventData):
        return annotator.describe_selection(c, m, event_payload(evt, *SELECTION))

    view.hsa_select(describe, [conv_id, model], status)

    def page_of_tokens(c, m, a, o, evt: gr.EventData, request: gr.Request):  # the token view's own pager
        return present(annotator.turn_page(c, m, event_payload(evt, *SELECTION), ctx.person(a, request), o))

    view.hsa_page(page_of_tokens, [conv_id, model, author, outline], shown)

    def suggest(kind):
        def handler(c, m, p, a, request: gr.Request):
            if c is None or c < 0:
                return gr.skip(), "", "Open a conversation first."
            try:
                return annotator.suggest(c, m, kind, page=p, who=ctx.person(a, request))
            except Exception as e:  # noqa: BLE001 - e.g. no model to run: say so
                return gr.skip(), "", f"⚠️ No suggestion: {e}"
        return handler

    rules_button.click(suggest("rules"), [conv_id, model, view_page, author], [view, suggestion, status])
    model_button.click(suggest("model"), [conv_id, model, view_page, author], [view, suggestion, status])

    def accept(c, v, a, m, p, o, payload, request: gr.Request):
        who = ctx.person(a, request)
        if not payload:
            return (*present(annotator.show(c, m, status="No suggestion to accept.", page=p, who=who)), "")
        data = json.loads(payload)
        if data.get("conv_id") != c:
            return (*present(annotator.show(c, m, status="The suggestion was for another conversation.", page=p,
                                            who=who)), "")
        return (*present(annotator.edit(c, v, who, m, "accept", data, page=p, disagreements=o)), "")

    def reject(c, m, p, a, o, request: gr.Request):
        return (*present(annotator.show(c, m, status="Suggestion rejected.", page=p, who=ctx.person(a, request),
                                        disagreements=o)), "")

    accept_button.click(accept, [*edit_inputs, suggestion], [*shown, suggestion]) \
        .then(after_edit, [dataset, author], progress_md)
    reject_button.click(reject, [conv_id, model, view_page, author, outline], [*shown, suggestion])

    def choose(name):
        choices = dataset_names()
        return gr.Dropdown(choices=choices, value=name if name in choices else (choices[0] if choices else None))

    def do_import(files, name, who, current, request: gr.Request, progress=gr.Progress()):
        message, chosen = annotator.import_files(
            files, name, ctx.person(who, request) or "import", current,
            progress=lambda done, total: progress((done, total), desc="importing", unit="records"))
        return message, choose(chosen)

    reopen = navigation()  # the conversation in use if the dataset still has it, else its first

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

    # Every page load opens what this browser had open (kept in its local storage), with fresh choices;
    # with a login, the name box shows the logged-in user (and cannot be changed: see AppContext.person).
    def on_load(d, s, q, c, m, a, o, remembered, request: gr.Request):
        choices = dataset_names()
        remembered = remembered or {}
        if remembered.get("dataset") in choices:
            d, c = remembered["dataset"], remembered.get("conv_id", -1)
        else:
            d, c = (d if d in choices else (choices[0] if choices else None)), -1
        who = ctx.person(a, request)
        name_box = gr.Textbox(value=who, interactive=False) if ctx.users is not None else gr.skip()
        return (gr.Dropdown(choices=choices, value=d), name_box,
                *open_conversation(d, s, q, c if c is not None else -1, m, who, o))

    blocks.load(on_load, [*nav_inputs, memory], [dataset, author, *nav_outputs])

    def open_record(d, c, m):  # another tab (Evaluate's wrong answers) opens conversation c of dataset d here
        return (gr.Dropdown(choices=dataset_names(), value=d), "all", "",
                *open_conversation(d, "all", "", int(c), m, "", False))

    return SimpleNamespace(open_record=open_record, model=model, outputs=[dataset, status_filter, search, *nav_outputs])
