"""The Team tab: split a dataset among annotators, follow their progress, measure how much they agree,
review the conversations several of them labelled (accept one version or merge region by region) and
export what was reviewed.

This module only wires components: what a handler does is workbench.ui.team_logic (no Gradio, tested
without a browser). The logged-in name comes from the request; without a login a "Your name" box says it.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from workbench.store import Store
from workbench.ui import team_logic as T
from workbench.ui.annotate import _processor_loader

CSS = (Path(__file__).resolve().parent / "team.css").read_text(encoding="utf-8")
ACCEPT_BUTTONS = 8  # one per annotator of the conversation shown; more copies than this: merge instead


def _username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def build(ctx, blocks: gr.Blocks):
    """The tab's components and events, inside `blocks` (whose page load fills in who is logged in)."""
    store = Store(ctx.db_path)
    exports = Path(ctx.workspace) / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    processor_for = _processor_loader(ctx)

    def users():  # read when asked: the lead's AppContext gains `users` (None without a login)
        return getattr(ctx, "users", None)

    def dataset_names():
        return [d.name for d in store.datasets()]

    names = dataset_names()
    with gr.Row():
        dataset = gr.Dropdown(names, value=names[0] if names else None, label="Dataset", scale=3,
                              elem_id="team-dataset")
        typed_name = gr.Textbox("", label="Your name", placeholder="who assigns and reviews", scale=2,
                                elem_id="team-name")
        refresh_button = gr.Button("↻ Refresh", scale=0, min_width=110, elem_id="team-refresh")
    who = gr.Markdown("", elem_id="team-who")
    with gr.Tabs():
        with gr.Tab("Assign & progress", id="team-assign-tab"):
            with gr.Row():
                annotators = gr.Textbox(label="Annotators", placeholder="alice, bob, carol", scale=4,
                                        info="separated by commas", elem_id="team-annotators")
                per_conversation = gr.Number(2, label="Each conversation to N annotators", precision=0, minimum=1,
                                             scale=1, elem_id="team-per")
                assign_button = gr.Button("Assign", variant="primary", scale=1, elem_id="team-assign")
            assign_status = gr.Markdown("", elem_id="team-assign-status")
            progress_summary = gr.Markdown("", elem_id="team-progress-summary")
            with gr.Row():
                progress_table = gr.Dataframe(headers=["annotator", "done", "assigned", "share", "last activity"],
                                              interactive=False, scale=2, elem_id="team-progress")
                progress_plot = gr.Plot(label="Progress", scale=3, elem_id="team-progress-plot")
        with gr.Tab("Agreement", id="team-agreement-tab"):
            with gr.Row():
                unit = gr.Radio(list(T.UNITS), value="characters", label="Units", scale=1, elem_id="team-unit")
                model = gr.Textbox("default", label="Tokens of model", info="'default', 'composed', or a path",
                                   scale=2, elem_id="team-model")
                done_only = gr.Checkbox(False, label="Only copies marked done", scale=1, elem_id="team-done-only")
                agree_button = gr.Button("Compute agreement", variant="primary", scale=1, elem_id="team-agree")
            agreement_summary = gr.Markdown("", elem_id="team-agreement-summary")
            overall = gr.Dataframe(headers=T.OVERALL_HEADERS, interactive=False, wrap=True,
                                   column_widths=["22%", "10%", "56%", "12%"], elem_id="team-overall")
            pairs = gr.Dataframe(headers=T.PAIR_HEADERS, interactive=False, wrap=True, label="Per pair of annotators",
                                 elem_id="team-pairs")
            with gr.Row():
                roles = gr.Dataframe(headers=T.ROLE_HEADERS, interactive=False, wrap=True, label="Per role (against the "
                                     "other roles)", scale=3, elem_id="team-roles")
                confusion = gr.Plot(label="Confusion of roles", scale=2, elem_id="team-confusion")
        with gr.Tab("Review & export", id="team-review-tab"):
            review_summary = gr.Markdown("", elem_id="team-review-summary")
            with gr.Accordion("Conversations that two or more annotators labelled", open=False,
                              elem_id="team-review-list-box"):
                review_table = gr.Dataframe(headers=T.REVIEW_HEADERS, interactive=False, wrap=True,
                                            column_widths=["7%", "48%", "20%", "12%", "13%"], elem_id="team-review-list")
            conversation = gr.Dropdown([], value=None, label="Review conversation", elem_id="team-review-conv")
            review_status = gr.Markdown("", elem_id="team-review-status")
            view = gr.HTML(T.EMPTY_REVIEW, css_template=CSS, js_on_load=None, elem_id="team-review-view")
            regions = gr.Dataframe(headers=T.REGION_HEADERS, datatype=["number", "number", "str", "str", "str", "str"],
                                   type="array", interactive=True, static_columns=list(range(T.TAKE)), wrap=True,
                                   label="Where they differ: type in 'take' whose role each region gets, then merge",
                                   column_widths=["6%", "7%", "12%", "35%", "25%", "15%"], elem_id="team-regions")
            with gr.Row():
                accept_buttons = [gr.Button(visible=False, elem_id=f"team-accept-{k}") for k in range(ACCEPT_BUTTONS)]
                merge_button = gr.Button("Merge as chosen", variant="primary", visible=False, elem_id="team-merge")
            shown = gr.State({"conv_id": -1, "version": 0, "copies": {}})
            review_ids = gr.State([])  # the conversation id of each row of the review list
            with gr.Row():
                export_format = gr.Radio(list(T.EXPORT_FORMATS), value="sharegpt", label="Export format", scale=1,
                                         elem_id="team-export-format")
                export_button = gr.Button("Export reviewed conversations only", scale=1, elem_id="team-export")
                export_file = gr.File(label="Download", interactive=False, visible=False, scale=2, elem_id="team-download")
            export_status = gr.Markdown("", elem_id="team-export-status")

    # --- what a dataset shows: progress and the conversations to review ---

    def review_outputs(d, keep_open=None, progress=None):
        rows, choices, summary = T.review_list(store, d, progress=progress)
        ids = [value for _, value in choices]
        value = keep_open if keep_open in ids else None
        return rows, ids, gr.Dropdown(choices=choices, value=value), summary

    dataset_outputs = [progress_table, progress_plot, progress_summary, review_table, review_ids, conversation,
                       review_summary, agreement_summary, overall, pairs, roles, confusion]
    review_view_outputs = [view, regions, review_status, shown, merge_button, *accept_buttons]

    def present(review: T.ReviewView):
        buttons = [gr.Button(f"Accept {name}'s version", visible=True) for name in review.annotators[:ACCEPT_BUTTONS]]
        buttons += [gr.Button(visible=False)] * (ACCEPT_BUTTONS - len(buttons))
        return (review.html, review.regions, review.status, review.shown, gr.Button(visible=len(review.annotators) > 1),
                *buttons)

    def show_dataset(d, state, rows, progress):
        """Progress and the review list of dataset `d` (the agreement is computed on request); the
        conversation under review stays open, with the choices made, if it is still in the list."""
        def told(done, total):
            progress((done, total), desc="reading copies", unit="conversations")

        cid = (state or {}).get("conv_id", -1)
        listing = review_outputs(d, cid, progress=told)
        review = T.open_review(store, cid, keep=T.choices_of(rows)) if cid in listing[1] else T.no_review()
        no_agreement = ("Press **Compute agreement**." if d else "", [], [], [], None)
        return (*T.progress_table(store, d), *listing, *no_agreement, *present(review))

    def choose_dataset(d, progress=gr.Progress()):
        return show_dataset(d, None, None, progress)

    dataset.input(choose_dataset, dataset, [*dataset_outputs, *review_view_outputs])

    def who_is_here(request: gr.Request):
        name, team = _username(request), users()
        if name is None:
            return "No login: everyone may assign and review. Type your name: it goes into the history.", \
                gr.Textbox(visible=True)
        user = team.get(name) if team is not None else None
        role = "" if user is None else (" (reviewer: may assign and accept)" if user.reviewer
                                        else " (annotator: reviewers assign and accept)")
        return f"Logged in as **{name}**{role}.", gr.Textbox(visible=False)

    def on_load(d, typed_annotators, state, rows, request: gr.Request, progress=gr.Progress()):
        choices = dataset_names()
        d = d if d in choices else (choices[0] if choices else None)
        told, name_box = who_is_here(request)
        return (gr.Dropdown(choices=choices, value=d), told, name_box,
                typed_annotators or T.default_annotators(users()), *show_dataset(d, state, rows, progress))

    load_inputs = [dataset, annotators, shown, regions]
    load_outputs = [dataset, who, typed_name, annotators, *dataset_outputs, *review_view_outputs]
    blocks.load(on_load, load_inputs, load_outputs)
    refresh_button.click(on_load, load_inputs, load_outputs)

    # --- assign ---

    def do_assign(d, names_, per, typed, request: gr.Request):
        message = T.assign(store, d, names_, per, users=users(), username=_username(request), typed_name=typed)
        return (message, *T.progress_table(store, d))

    assign_button.click(do_assign, [dataset, annotators, per_conversation, typed_name],
                        [assign_status, progress_table, progress_plot, progress_summary])

    # --- agreement ---

    def do_agreement(d, unit_name, model_name, only_done, progress=gr.Progress()):
        result = T.agreement(store, d, T.UNITS.get(unit_name, unit_name), model_name, processor_for,
                             done_only=only_done,
                             progress=lambda done, total: progress((done, total), desc="comparing",
                                                                   unit="conversations"))
        return result.summary, result.overall, result.pairs, result.roles, result.figure

    agree_button.click(do_agreement, [dataset, unit, model, done_only],
                       [agreement_summary, overall, pairs, roles, confusion])

    # --- review ---

    def open_conversation(cid):
        return present(T.open_review(store, cid))

    conversation.input(open_conversation, conversation, review_view_outputs)

    def open_row(ids, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not ids or row is None or not 0 <= row < len(ids):
            return (gr.skip(),) * (1 + len(review_view_outputs))
        return (gr.Dropdown(value=ids[row]), *open_conversation(ids[row]))

    review_table.select(open_row, review_ids, [conversation, *review_view_outputs])

    def accepting(button: int | None):  # an "Accept <annotator>'s version" button, or None: "Merge as chosen"
        def handler(d, state, rows, typed, request: gr.Request):
            take = None
            if button is not None:  # the button's annotator: the copies shown are in the buttons' order
                take = (list((state or {}).get("copies", {})) + [""] * ACCEPT_BUTTONS)[button]
            review = T.accept(store, state, take, rows, users=users(), username=_username(request), typed_name=typed)
            return (*present(review), *review_outputs(d, review.shown.get("conv_id")), T.progress_table(store, d)[2])
        return handler

    accept_outputs = [*review_view_outputs, review_table, review_ids, conversation, review_summary, progress_summary]
    for k, button in enumerate(accept_buttons):
        button.click(accepting(k), [dataset, shown, regions, typed_name], accept_outputs)
    merge_button.click(accepting(None), [dataset, shown, regions, typed_name], accept_outputs)

    # --- export ---

    def do_export(d, fmt, progress=gr.Progress()):
        archive, message = T.export_reviewed(store, d, fmt, exports,
                                             progress=lambda done, total: progress((done, total), desc="exporting"))
        return gr.File(archive, visible=archive is not None), message

    export_button.click(do_export, [dataset, export_format], [export_file, export_status])
