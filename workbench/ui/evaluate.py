"""The Evaluate tab: choose models, a dataset, decoding modes and HSA settings; start an evaluation as a
background run (`python -m workbench.evaluate`, through the run manager, in WORKSPACE/evals); watch its
progress; read its table (metric × model × decoding, with intervals), plots, and the answers side by
side; list and compare earlier evaluations. The functions above `build` are the tab's logic and are
tested without a browser; `build` only wires them."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from workbench.chat import finished_runs
from workbench.evaluate import TABLE_HEADERS, ConfigError, parse_config, table_rows
from workbench.evaluate.run import RESULTS_NAME
from workbench.jobs import FINISHED, RunManager
from workbench.ui.context import AppContext
from workbench.ui.events import event_payload
from workbench.ui.train import manager_for

MODES = ["greedy", "sample", "beam"]
HSA_CHOICES = ["auto", "on", "off"]
RUN_HEADERS = ["id", "name", "status", "progress", "models", "dataset", "started"]
COMPARE_HEADERS = ["evaluation", *TABLE_HEADERS]


def evals_manager(ctx: AppContext) -> RunManager:
    """The run manager of evaluations: their own folder (WORKSPACE/evals) and table, so the Train tab
    lists training runs only."""
    return manager_for((Path(ctx.workspace) / "evals").resolve(), Path(ctx.workspace).resolve())


def model_choices(ctx: AppContext) -> list[str]:
    return [*ctx.embedded_names(), *finished_runs(ctx.runs_dir)]


def make_config(ctx: AppContext, models, dataset: str, n_shapes, shapes_seed, noise: str, grounding: bool,
                modes, temperature, top_p, num_beams, hsa_settings, max_new_tokens, limit=None,
                name: str = "") -> dict:
    """The evaluation's config from the form, checked (ConfigError / PathRefused say what is wrong).
    Models other than embedded names and finished runs, and dataset files, go through the path rule."""
    models = [m for m in (models or []) if m and m.strip()]
    if not models:
        raise ConfigError("choose at least one model")
    runs = finished_runs(ctx.runs_dir)
    for m in models:
        if m not in runs:
            ctx.model_source(m, "model")  # a path outside what this server may read: refused
    dataset = (dataset or "").strip() or "shapes"
    config: dict = {"models": models, "dataset": dataset, "max_new_tokens": int(max_new_tokens),
                    "runs_dir": str(ctx.runs_dir), "name": name or ""}
    if dataset == "shapes":
        config["shapes"] = {"n": int(n_shapes), "seed": int(shapes_seed), "noise": noise, "grounding": bool(grounding)}
    elif dataset.startswith("store:"):
        config["store_db"] = str(ctx.db_path)
    else:
        config["dataset"] = str(ctx.paths.path(dataset, "dataset"))
        if not Path(config["dataset"]).is_file():
            raise ConfigError(f"dataset {dataset}: no such file")
    if limit:
        config["limit"] = int(limit)
    decoding = []
    for mode in modes or []:
        if mode == "sample":
            decoding.append({"mode": "sample", "temperature": float(temperature), "top_p": float(top_p)})
        elif mode == "beam":
            decoding.append({"mode": "beam", "num_beams": int(num_beams)})
        else:
            decoding.append("greedy")
    if not decoding:
        raise ConfigError("choose at least one decoding mode")
    config["decoding"] = decoding
    hsa = [{"auto": "auto", "on": True, "off": False}[h] for h in (hsa_settings or [])]
    if not hsa:
        raise ConfigError("choose at least one HSA setting")
    config["hsa"] = hsa
    parse_config({**config, "output_dir": "(chosen by the run manager)"})
    return config


def start(manager: RunManager, config: dict) -> str:
    run = manager.submit(config, name=config.get("name") or None, launcher="evaluate")
    return f"Evaluation {run.id} {run.status} in {run.output_dir.name}"


def progress_of(manager: RunManager, run_id: int) -> tuple[int, int]:
    records = manager.metrics(run_id)
    return (records[-1]["step"], records[-1]["total"]) if records else (0, 0)


def runs_rows(manager: RunManager, limit: int = 100) -> list[list]:
    rows = []
    for run in manager.list(limit):
        if run.launcher != "evaluate":
            continue
        done, total = progress_of(manager, run.id)
        rows.append([run.id, run.name, run.status, f"{done}/{total}" if total else "",
                     ", ".join(run.config.get("models", [])), run.config.get("dataset", ""),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started_at)) if run.started_at else ""])
    return rows


def run_choices(manager: RunManager) -> list[tuple[str, int]]:
    return [(f"{run.id}: {run.name} ({run.status})", run.id) for run in manager.list(100) if run.launcher == "evaluate"]


def fresh_choices(manager: RunManager, shown):
    """(update, labels): new choices for the evaluation pickers when a label changed since `shown`
    (a status went from running to succeeded, a run was added), else gr.skip()."""
    labels = run_choices(manager)
    if [list(c) for c in labels] == [list(c) for c in shown or []]:
        return gr.skip(), shown
    return gr.Dropdown(choices=labels), labels


def load_results(manager: RunManager, run_id) -> dict | None:
    if run_id in (None, ""):
        return None
    path = manager.get(int(run_id)).output_dir / RESULTS_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def status_text(manager: RunManager, run_id) -> str:
    if run_id in (None, ""):
        return "No evaluation chosen."
    run = manager.get(int(run_id))
    done, total = progress_of(manager, run.id)
    text = f"**Evaluation {run.id}** ({run.name}): {run.status}"
    if total:
        text += f", {done}/{total} answers ({100 * done / total:.0f}%)"
    if run.error:
        text += f"\n\n```\n{run.error[-800:]}\n```"
    return text


def store_dataset(results: dict | None) -> str | None:
    """The store dataset an evaluation read ("store:NAME" -> NAME), else None."""
    dataset = ((results or {}).get("config") or {}).get("dataset") or ""
    return dataset[len("store:"):] if dataset.startswith("store:") else None


def record_link(dataset: str, record_id) -> str:
    """A link that opens a store record in the Annotate tab (OPEN_RECORD_JS sends the click)."""
    return (f"<br><a href='#' class='eval-open' data-dataset='{html.escape(dataset, quote=True)}' "
            f"data-conv='{html.escape(str(record_id), quote=True)}'>open in Annotate</a>")


# the answers' "open in Annotate" links: a click sends {dataset, conv_id} to Python as eval_open_record
OPEN_RECORD_JS = """
element.addEventListener('click', (e) => {
  const link = e.target.closest('a.eval-open');
  if (!link) return;
  e.preventDefault();
  trigger('eval_open_record', {dataset: link.dataset.dataset, conv_id: +link.dataset.conv});
});
"""


def open_in(open_record, tab: str):
    """The handler of a click on "open in Annotate": `open_record(dataset, conv_id, model)`'s updates,
    then the tab `tab` selected."""
    def handler(model, evt: gr.EventData):
        data = event_payload(evt, "dataset", "conv_id")
        return (*open_record(data.get("dataset"), data.get("conv_id", -1), model), gr.Tabs(selected=tab))

    return handler


def answers_html(results: dict | None, only_wrong: bool = False, limit: int = 300) -> str:
    """Each item's question, expected answer and every condition's reply side by side; wrong replies
    on a red background, boxes that could not be read marked. A record of a store dataset with a wrong
    reply links to its conversation in the Annotate tab."""
    if not results:
        return "<p>No results yet.</p>"
    store = store_dataset(results)
    keys = [c["key"] for c in results["conditions"]]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for item in results["items"]:
        answers = [item["answers"][k] for k in keys]
        if only_wrong and all(a["correct"] for a in answers):
            continue
        cells = []
        for a in answers:
            note = ""
            if a.get("parsed") is False:
                note = "<br><small>(no box could be read)</small>"
            elif a.get("iou") is not None:
                note = f"<br><small>IoU {a['iou']:.2f}</small>"
            if a.get("hallucinated"):
                note += f"<br><small>not in the image: {html.escape(', '.join(a['hallucinated']))}</small>"
            cls = "eval-right" if a["correct"] else "eval-wrong"
            cells.append(f"<td class='{cls}'>{html.escape(a['reply'])}{note}</td>")
        record = html.escape(str(item["record_id"]))
        if store and str(item["record_id"]).isdigit() and not all(a["correct"] for a in answers):
            record += record_link(store, item["record_id"])
        rows.append(f"<tr><td>{record}</td><td>{html.escape(item['qtype'])}</td>"
                    f"<td>{html.escape(item['question'])}</td><td>{html.escape(item['expected'])}</td>{''.join(cells)}</tr>")
        if len(rows) >= limit:
            break
    style = ("<style>#eval-answers table{border-collapse:collapse;font-size:13px}"
             "#eval-answers td,#eval-answers th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
             ".eval-wrong{background:#fdd}.eval-right{background:#efe}</style>")
    return (f"{style}<table><thead><tr><th>record</th><th>type</th><th>question</th><th>expected</th>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
            + ("" if rows else "<p>Every answer is right.</p>"))


def compare_text(results: dict | None) -> str:
    """The paired comparisons of conditions (accuracy difference, bootstrap interval, McNemar p)."""
    if not results or not results.get("comparisons"):
        return ""
    lines = ["| A | B | accuracy A − B | 95% interval | McNemar p | items |", "|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['diff']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] | "
                     f"{c['p_mcnemar']:.3g} | {c['n']} |")
    return "\n".join(lines)


def result_view(manager: RunManager, run_id, only_wrong: bool = False):
    """(status, table rows, accuracy plot, CHAIR plot, comparisons, answers) of one evaluation."""
    results = load_results(manager, run_id)
    status = status_text(manager, run_id)
    if results is None:
        return status, [], None, None, "", answers_html(None)
    folder = manager.get(int(run_id)).output_dir
    plots = [str(folder / p) if (folder / p).is_file() else None for p in ("accuracy_by_type.png", "chair_vs_length.png")]
    return status, table_rows(results), plots[0], plots[1], compare_text(results), answers_html(results, only_wrong)


def compare_rows(manager: RunManager, run_ids) -> list[list]:
    """The tables of several earlier evaluations one under the other, each row named by its evaluation."""
    rows = []
    for run_id in run_ids or []:
        results = load_results(manager, run_id)
        if results is not None:
            label = f"{run_id}: {manager.get(int(run_id)).name}"
            rows.extend([label, *row] for row in table_rows(results))
    return rows


def build(ctx: AppContext):
    manager = evals_manager(ctx)
    gr.Markdown("Evaluate models on the same records: accuracy per question type, hallucination on "
                "descriptions (CHAIR), grounding boxes (IoU ≥ 0.5), HSA on vs off and decoding modes, with 95% "
                "intervals. An evaluation runs in the background like a training run.")
    with gr.Row():
        with gr.Column(scale=2):
            models = gr.Dropdown(model_choices(ctx), value=["default"] if "default" in ctx.embedded_names() else [],
                                 multiselect=True, allow_custom_value=True, elem_id="eval-models",
                                 label="Models (embedded, finished runs, a path or a hub id)")
            dataset = gr.Textbox("shapes", label="Dataset: shapes, store:NAME, or a ShareGPT / LLaMA-Factory file",
                                 elem_id="eval-dataset")
            with gr.Row():
                n_shapes = gr.Number(20, precision=0, minimum=1, label="shapes: conversations", elem_id="eval-n")
                shapes_seed = gr.Number(0, precision=0, label="shapes: seed")
                noise = gr.Dropdown(["clean", "train", "heavy"], value="clean", label="shapes: noise")
                grounding = gr.Checkbox(True, label="shapes: box questions")
                limit = gr.Number(0, precision=0, minimum=0, label="records at most (files, store; 0: all)")
        with gr.Column(scale=1):
            modes = gr.CheckboxGroup(MODES, value=["greedy"], label="Decoding modes", elem_id="eval-modes")
            with gr.Row():
                temperature = gr.Number(0.7, label="temperature")
                top_p = gr.Number(0.9, label="top-p")
                num_beams = gr.Number(4, precision=0, minimum=2, label="beams")
            hsa = gr.CheckboxGroup(HSA_CHOICES, value=["on", "off"], label="HSA at inference", elem_id="eval-hsa")
            max_new_tokens = gr.Number(48, precision=0, minimum=1, label="max new tokens")
            name = gr.Textbox("", label="Name (optional)", elem_id="eval-name")
            with gr.Row():
                start_button = gr.Button("Start evaluation", variant="primary", elem_id="eval-start")
                cancel_button = gr.Button("Cancel", elem_id="eval-cancel")
    message = gr.Markdown(elem_id="eval-message")
    runs_table = gr.Dataframe(headers=RUN_HEADERS, value=runs_rows(manager), interactive=False, elem_id="eval-runs",
                              label="Evaluations")
    chosen = gr.Dropdown(run_choices(manager), value=None, label="Evaluation", elem_id="eval-chosen")
    status = gr.Markdown(elem_id="eval-status")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="eval-table", label="Metrics")
    with gr.Row():
        accuracy_plot = gr.Image(label="Accuracy per question type", type="filepath", elem_id="eval-accuracy-plot")
        chair_plot = gr.Image(label="CHAIR_i vs description length", type="filepath", elem_id="eval-chair-plot")
    comparisons = gr.Markdown(elem_id="eval-comparisons")
    only_wrong = gr.Checkbox(False, label="only records with a wrong answer")
    answers = gr.HTML(elem_id="eval-answers", js_on_load=OPEN_RECORD_JS)
    with gr.Accordion("Compare earlier evaluations", open=False):
        compare_pick = gr.Dropdown(run_choices(manager), multiselect=True, label="Evaluations", elem_id="eval-compare")
        compare_table = gr.Dataframe(headers=COMPARE_HEADERS, interactive=False, elem_id="eval-compare-table")
    timer = gr.Timer(2.0)

    def on_start(*values):
        try:
            config = make_config(ctx, *values)
            text = start(manager, config)
        except (ValueError, OSError) as error:  # ConfigError, PathRefused
            return f"⚠ {error}", gr.skip(), gr.skip()
        run_id = manager.list(1)[0].id
        return text, gr.Dropdown(choices=run_choices(manager), value=run_id), runs_rows(manager)

    def on_cancel(run_id):
        if run_id in (None, ""):
            return "No evaluation chosen."
        run = manager.cancel(int(run_id))
        return f"Evaluation {run.id}: {run.status}" + (" (stopping)" if not run.finished else "")

    def refresh(run_id, wrong, st, shown):
        """Runs table, the pickers' labels when a status changed, and the chosen evaluation (the heavy
        views only when its state changed)."""
        rows = runs_rows(manager)
        picker, shown = fresh_choices(manager, shown)
        pickers = (picker, picker, shown)
        if run_id in (None, ""):
            return rows, *pickers, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), st
        run = manager.get(int(run_id))
        seen = (run.id, run.status, run.status in FINISHED)
        if st == seen:
            return rows, *pickers, status_text(manager, run_id), *[gr.skip()] * 5, st
        return (rows, *pickers, *result_view(manager, run_id, wrong), seen if run.finished else st)

    form = [models, dataset, n_shapes, shapes_seed, noise, grounding, modes, temperature, top_p, num_beams, hsa,
            max_new_tokens, limit, name]
    seen = gr.State(None)
    labels = gr.State(run_choices(manager))  # the pickers' labels as last sent
    start_button.click(on_start, form, [message, chosen, runs_table])
    cancel_button.click(on_cancel, chosen, message)
    view = [status, table, accuracy_plot, chair_plot, comparisons, answers]
    chosen.change(lambda r, w: result_view(manager, r, w), [chosen, only_wrong], view)
    only_wrong.change(lambda r, w: answers_html(load_results(manager, r), w), [chosen, only_wrong], answers)
    timer.tick(refresh, [chosen, only_wrong, seen, labels], [runs_table, chosen, compare_pick, labels, *view, seen],
               show_progress="hidden")
    compare_pick.focus(lambda: gr.Dropdown(choices=run_choices(manager)), None, compare_pick)
    compare_pick.change(lambda ids: compare_rows(manager, ids), compare_pick, compare_table)
    return SimpleNamespace(chosen=chosen, answers=answers)  # app.py wires answers.eval_open_record to Annotate
