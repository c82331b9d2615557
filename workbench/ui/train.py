"""The Train tab: a config form with presets, a preview of the exact command, runs in the
background (workbench.jobs), a runs table, live loss / learning-rate curves, the log tail, cancel,
resume, clone with edits, and "chat with this run".

The functions above `build` are plain values in, values out; `build` only wires them to widgets.
One RunManager per workbench process is shared by every browser session: the runs table is the
database's, so a run started in one tab is seen (and can be cancelled) from any other.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from workbench.jobs import FINISHED, RUNNING, RunManager, train_command
from workbench.jobs.manager import CONFIG_NAME
from workbench.jobs.processes import check_nproc
from workbench.train.config import (SCHEDULERS, STORE_PREFIX, ConfigError, check_inputs, defaults,
                                    parse_config)
from workbench.train.run import ADAPTER_DIR, GATE_STATS, MODEL_DIR, merge_run_adapter
from workbench.ui.context import AppContext

if TYPE_CHECKING:  # plotly is imported where a figure is drawn
    import plotly.graph_objects as go

DEFAULTS = defaults()
PRESETS: dict[str, dict] = {
    "LoRA · default model (CPU friendly)": {
        "base_model": "default", "finetuning": "lora", "quantization": "none", "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.05, "learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup": 0.0, "epochs": 1.0,
        "max_steps": 30, "batch_size": 2, "grad_accum": 1, "max_length": 1024, "hsa": True, "eval_split": 0.1,
        "nproc": 1,
    },
    "QLoRA · Qwen2.5-VL-3B on one GPU": {
        "base_model": "Qwen/Qwen2.5-VL-3B-Instruct", "finetuning": "lora", "quantization": "4bit", "lora_r": 16,
        "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 1e-4, "lr_scheduler": "cosine", "warmup": 0.03,
        "epochs": 2.0, "max_steps": -1, "batch_size": 1, "grad_accum": 8, "max_length": 2048, "hsa": True,
        "eval_split": 0.05, "nproc": 1,
    },
    "Align · composed default (projector only)": {
        "base_model": "composed", "stage": "align", "learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup": 0.03,
        "epochs": 1.0, "max_steps": 30, "batch_size": 4, "grad_accum": 1, "max_length": 1024, "hsa": True,
        "eval_split": 0.1, "nproc": 1,
    },
    "LoRA · composed default (projector in full)": {
        "base_model": "composed", "stage": "sft", "finetuning": "lora", "quantization": "none", "lora_r": 16,
        "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup": 0.0,
        "epochs": 1.0, "max_steps": 30, "batch_size": 2, "grad_accum": 1, "max_length": 1024, "hsa": True,
        "eval_split": 0.1, "nproc": 1,
    },
    "Full fine-tuning · default model": {
        "base_model": "default", "finetuning": "full", "quantization": "none", "learning_rate": 5e-5,
        "lr_scheduler": "cosine", "warmup": 0.05, "epochs": 1.0, "max_steps": 50, "batch_size": 2, "grad_accum": 1,
        "max_length": 1024, "hsa": True, "eval_split": 0.1, "nproc": 1,
    },
}
# the form's fields: `build` makes one widget per name, and handlers get and give values by these names
FORM_FIELDS = ["base_model", "dataset", "stage", "finetuning", "quantization", "merge", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target", "learning_rate", "lr_scheduler", "warmup", "epochs", "max_steps", "batch_size",
               "grad_accum", "max_length", "hsa", "seed", "eval_split", "nproc", "extra"]
RUN_HEADERS = ["id", "name", "status", "step", "loss", "eval loss", "started", "duration", "output"]


@functools.lru_cache(maxsize=8)
def manager_for(runs_dir: Path, workdir: Path) -> RunManager:
    """The one run manager of this workbench process for these directories (shared by sessions)."""
    limit = int(os.environ.get("WORKBENCH_MAX_RUNS", "1"))
    return RunManager(runs_dir, max_concurrent=limit, workdir=workdir, monitor=True, poll_s=1.0)


def manager_of(ctx: AppContext) -> RunManager:
    return manager_for(Path(ctx.runs_dir).resolve(), Path(ctx.workspace).resolve())


# ---- the form -----------------------------------------------------------------------------------

def preset_values(name: str) -> dict:
    """A preset's form values by field name (dataset and extra are not a preset's: they stay as they are)."""
    preset = {**DEFAULTS, "nproc": 1, **PRESETS[name]}
    values = {key: preset[key] for key in FORM_FIELDS if key not in ("dataset", "extra")}
    if not isinstance(values["lora_target"], str):
        values["lora_target"] = ", ".join(values["lora_target"])
    return values


def form_config(ctx: AppContext, values: dict) -> tuple[dict, int]:
    """The config dict (as it will be stored) and the number of processes, from the form.
    Keys that do not apply are left out: epochs when max_steps is set, LoRA keys for full tuning."""
    config: dict = {"base_model": ctx.resolve_model(values.get("base_model")),
                    "dataset": (values.get("dataset") or "").strip()}
    if config["dataset"].startswith("store:"):
        config["store_db"] = str(ctx.db_path)
    elif config["dataset"]:  # a path in the workspace: stored absolute, as the run's config file must say
        config["dataset"] = str((ctx.workspace / Path(config["dataset"]).expanduser()).resolve())
    local_model = ctx.workspace / config["base_model"]
    if not Path(config["base_model"]).is_absolute() and local_model.exists():
        config["base_model"] = str(local_model.resolve())
    stage = values.get("stage") or "sft"
    if stage == "align":  # the projector alone: no fine-tuning method, LoRA or quantization keys apply
        config["stage"] = "align"
    else:
        config["finetuning"] = values["finetuning"]
        config["quantization"] = values["quantization"]
        if values.get("merge") and values["finetuning"] == "lora":
            config["merge"] = True
    if stage != "align" and values["finetuning"] == "lora":
        config.update(lora_r=int(values["lora_r"]), lora_alpha=int(values["lora_alpha"]),
                      lora_dropout=float(values["lora_dropout"]))
        target = (values.get("lora_target") or "").strip()
        if target:
            config["lora_target"] = target if target == "all-linear" else \
                [t.strip() for t in target.split(",") if t.strip()]
    config.update(learning_rate=float(values["learning_rate"]), lr_scheduler=values["lr_scheduler"])
    warmup = float(values["warmup"] or 0)
    config["warmup"] = int(warmup) if warmup >= 1 else warmup
    max_steps = int(values.get("max_steps") or -1)
    if max_steps > 0:
        config["max_steps"] = max_steps
    else:
        config["epochs"] = float(values["epochs"])
    config.update(batch_size=int(values["batch_size"]), grad_accum=int(values["grad_accum"]),
                  max_length=int(values["max_length"]), hsa=bool(values["hsa"]), seed=int(values["seed"]),
                  eval_split=float(values["eval_split"] or 0))
    extra = (values.get("extra") or "").strip()
    if extra:
        try:
            more = json.loads(extra)
        except json.JSONDecodeError as e:
            raise ConfigError(f"extra keys: not valid JSON: {e}") from None
        if not isinstance(more, dict):
            raise ConfigError("extra keys: a JSON object, e.g. {\"save_steps\": 20}")
        config.update(more)
    nproc = values.get("nproc") or 1
    nproc = int(nproc) if isinstance(nproc, float) and nproc.is_integer() else nproc
    check_nproc(nproc)
    return confine_paths(ctx, config), nproc


def confine_paths(ctx: AppContext, config: dict) -> dict:
    """The config with the files a run would read (dataset, annotation database, image folder, checkpoint,
    base model) resolved against the workspace and checked by the workbench's path rule: on a server that
    others can reach, only the workspace and the folders the operator allowed (workbench.paths)."""
    rule, config = ctx.paths, dict(config)
    for key in ("dataset", "store_db", "image_root", "resume"):
        value = config.get(key)
        if isinstance(value, str) and value and not (key == "dataset" and value.startswith(STORE_PREFIX)):
            config[key] = str(rule.path(value, key))
    if isinstance(config.get("base_model"), str) and config["base_model"]:
        config["base_model"] = rule.model(config["base_model"])
    return config


def check_run(ctx: AppContext, config: dict, base_dir: Path | None = None) -> None:
    """What Preview, Start and Clone check before a run exists: the config's keys and values, the files it
    reads (workbench.train.config.check_inputs) and, on a server that others can reach, the dataset's images.
    Raises ConfigError / ValueError (PathRefused) naming the problem. The images go first: whether a file
    outside exists is nothing a refusal may tell."""
    parsed = parse_config(config, base_dir=base_dir or ctx.workspace)
    check_dataset_images(ctx, parsed)
    check_inputs(parsed)


MAX_NAMED = 5  # image refusals named in one message


def check_dataset_images(ctx: AppContext, c) -> None:
    """On a server that others can reach, every image the dataset names must resolve (links followed) inside
    the workspace or an allowed folder (the dataset's image_root is one of them: confine_paths checked it),
    as the run would read it: image_root / image for a file, the store's image folder for store:NAME.
    A dataset file that cannot be read is left to the run's own checks. Raises PathRefused naming the
    record and the image; a local server reads what its user names."""
    if not ctx.confined:
        return
    from models.data.align import normalize_record
    from workbench.paths import PathRefused
    from models.data.records import read_records

    rule, refused = ctx.paths, []

    def check(where: str, path: Path):
        try:
            rule.path(path, where)
        except PathRefused as error:
            refused.append(str(error))

    if c.store_dataset is None:
        image_root = Path(c.image_root) if c.image_root else Path(c.dataset).parent
        try:
            records = read_records(c.dataset)
        except ValueError:
            return
        for index, (name, record) in enumerate(records):
            try:
                images = normalize_record(record, index=index).images
            except Exception:  # noqa: BLE001 - a record the run refuses anyway: not this check's business
                continue
            for k, image in enumerate(images):
                path = image_root / str(image)
                check(f"{name}, image {k}" + (f" {image!r} read as" if str(path) != str(image) else ""), path)
    else:
        from workbench.store.db import Store

        with Store(c.store_db) as store:
            for cid in store.conversation_ids(c.store_dataset):
                for k, image in enumerate(store.conversation(cid).images):
                    check(f"dataset {c.store_dataset!r}, conversation {cid}, image {k}", image)
    if refused:
        more = f" (and {len(refused) - MAX_NAMED} more images outside)" if len(refused) > MAX_NAMED else ""
        raise PathRefused("; ".join(refused[:MAX_NAMED]) + more)


def preview(ctx: AppContext, values: dict) -> tuple[str, str, str]:
    """(command, config JSON, problems) exactly as a start would run them; problems is '' when the
    config is valid."""
    try:
        config, nproc = form_config(ctx, values)
    except (ConfigError, ValueError, TypeError) as e:
        return "", "", f"**Cannot start:** {e}"
    problems = ""
    manager = manager_of(ctx)
    try:
        manager.check_output_dir(config)
        check_run(ctx, config)
    except ValueError as e:  # ConfigError too
        problems = f"**Cannot start:** {e}"
    next_dir = manager.next_folder()
    shown = dict(config, output_dir=str(next_dir))
    command = shlex.join(train_command(next_dir / CONFIG_NAME, nproc))
    return f"cd {shlex.quote(str(manager.workdir))}\n{command}", json.dumps(shown, indent=2), problems


def start_run(ctx: AppContext, values: dict, name: str = "") -> tuple[int | None, str]:
    """Queue a run from the form; (run id, message). A config that cannot run is refused here,
    naming the keys, before any process starts."""
    try:
        config, nproc = form_config(ctx, values)
        manager_of(ctx).check_output_dir(config)
        check_run(ctx, config)
        run = manager_of(ctx).submit(config, name=name.strip() or None, nproc=nproc)
    except (ConfigError, ValueError, TypeError) as e:
        return None, f"**Not started:** {e}"
    return run.id, f"Run {run.id} ({run.name}) is {run.status}."


# ---- runs -----------------------------------------------------------------------------------------

# a DPO / NCA run's rewards (workbench.train.preference): metrics key -> the curve's name
REWARD_CURVES = {"rewards/chosen": "reward chosen", "rewards/rejected": "reward rejected",
                 "rewards/margins": "margin", "rewards/accuracies": "accuracy"}


def curves(records: list[dict]) -> dict[str, list]:
    """Train loss, eval loss and learning rate by step, and a preference run's rewards (under
    "rewards": key -> (steps, values)); the last record of a step wins (a resumed run logs again the
    steps after its checkpoint)."""
    train, evals, lr = {}, {}, {}
    rewards: dict[str, dict] = {key: {} for key in REWARD_CURVES}
    for r in records:
        step = r.get("step")
        if step is None:
            continue
        if "loss" in r:
            train[step] = r["loss"]
        if "learning_rate" in r:
            lr[step] = r["learning_rate"]
        if "eval_loss" in r:
            evals[step] = r["eval_loss"]
        for key in REWARD_CURVES:
            if key in r:
                rewards[key][step] = r[key]

    def xy(d):
        steps = sorted(d)
        return steps, [d[s] for s in steps]

    (ts, tl), (es, el), (ls, lv) = xy(train), xy(evals), xy(lr)
    return {"step": ts, "loss": tl, "eval_step": es, "eval_loss": el, "lr_step": ls, "learning_rate": lv,
            "rewards": {key: xy(d) for key, d in rewards.items() if d}}


def curves_figure(records: list[dict], title: str = ""):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    c = curves(records)
    preference = bool(c["rewards"])
    fig = make_subplots(rows=1, cols=3 if preference else 2,
                        subplot_titles=("loss", "learning rate") + (("rewards (beta x log-ratio)",) if preference else ()))
    fig.add_trace(go.Scatter(x=c["step"], y=c["loss"], mode="lines+markers", name="train loss"), row=1, col=1)
    if c["eval_step"]:
        fig.add_trace(go.Scatter(x=c["eval_step"], y=c["eval_loss"], mode="lines+markers", name="eval loss"),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=c["lr_step"], y=c["learning_rate"], mode="lines", name="learning rate"),
                  row=1, col=2)
    for key, (steps, values) in c["rewards"].items():
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=REWARD_CURVES[key],
                                 line=dict(dash="dot") if key == "rewards/accuracies" else None), row=1, col=3)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=320, margin=dict(l=40, r=20, t=50, b=40), title=title or None,
                      legend=dict(orientation="h", y=-0.25), uirevision="keep")
    return fig


def runs_rows(manager: RunManager, limit: int = 100) -> list[list]:
    rows = []
    for run in manager.list(limit=limit):
        records = manager.metrics(run.id) if run.status != "queued" else []
        c = curves(records)
        rows.append([run.id, run.name, run.status, c["step"][-1] if c["step"] else "",
                     _fmt(c["loss"][-1]) if c["loss"] else "", _fmt(c["eval_loss"][-1]) if c["eval_loss"] else "",
                     time.strftime("%m-%d %H:%M:%S", time.localtime(run.started_at)) if run.started_at else "",
                     f"{run.duration_s:.0f} s" if run.duration_s is not None else "", str(run.output_dir)])
    return rows


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def run_choices(manager: RunManager) -> list[tuple[str, int]]:
    return [(f"{run.id} · {run.name} · {run.status}", run.id) for run in manager.list(limit=200)]


def run_summary(manager: RunManager, run_id: int | None) -> str:
    if run_id is None:
        return "Select a run."
    run = manager.get(int(run_id))
    lines = [f"**Run {run.id} · {run.name}** — {run.status}" + (f" (exit code {run.exit_code})"
                                                                 if run.exit_code is not None else ""),
             f"output: `{run.output_dir}` · attempts: {run.attempts}" + (f" · cloned from run {run.parent_id}"
                                                                         if run.parent_id else ""),
             f"command: `{shlex.join(run.command)}`"]
    if run.error:
        lines.append(f"```\n{run.error}\n```")
    return "\n\n".join(lines)


def run_view(manager: RunManager, run_id: int | None, log_lines: int = 80):
    """(summary markdown, curves figure, log tail, config JSON, gate figure) of a run."""
    if run_id is None:
        return "Select a run.", curves_figure([]), "", "", gate_figure([])
    run = manager.get(int(run_id))
    return (run_summary(manager, run.id), curves_figure(manager.metrics(run.id), f"run {run.id}"),
            manager.log_tail(run.id, max_lines=log_lines), json.dumps(run.config, indent=2),
            gate_figure(manager.records(run.id, GATE_STATS)))


def compare_figure(manager: RunManager, run_ids) -> "go.Figure":
    """The loss curves of several runs on one plot: a line per run named after it, its eval loss
    (where it has one) dashed in the same colour."""
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS

    fig = go.Figure()
    for i, run_id in enumerate(run_ids or []):
        try:
            run = manager.get(int(run_id))
        except KeyError:  # deleted meanwhile
            continue
        c, color, label = curves(manager.metrics(run.id)), DEFAULT_PLOTLY_COLORS[i % 10], f"{run.id} · {run.name}"
        fig.add_trace(go.Scatter(x=c["step"], y=c["loss"], mode="lines", name=label, line=dict(color=color)))
        if c["eval_step"]:
            fig.add_trace(go.Scatter(x=c["eval_step"], y=c["eval_loss"], mode="lines+markers", name=f"{label} (eval)",
                                     line=dict(color=color, dash="dash")))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss")
    # a legend even for one run (plotly leaves it out for a single line): it names the runs
    fig.update_layout(height=320, margin=dict(l=40, r=20, t=30, b=40), legend=dict(orientation="h", y=-0.25),
                      showlegend=True, uirevision="keep")
    return fig


def delete_prompt(manager: RunManager, run_id: int | None) -> tuple[str, bool]:
    """(question, whether to show the confirmation) before a run is deleted."""
    if run_id is None:
        return "Select a run to delete.", False
    run = manager.get(int(run_id))
    if not run.finished:
        return f"Run {run.id} is {run.status}: cancel it first, then delete it.", False
    inside = run.output_dir.resolve().is_relative_to(manager.runs_dir)
    folder = (f"and its folder `{run.output_dir}`" if inside
              else f"(its folder `{run.output_dir}` is outside the runs folder and stays)")
    return f"**Delete run {run.id} · {run.name}** {folder}? This cannot be undone.", True


def delete_run(manager: RunManager, run_id: int | None) -> str:
    if run_id is None:
        return "Select a run to delete."
    try:
        folder = manager.delete(int(run_id))
    except (KeyError, ValueError) as e:
        return f"**Not deleted:** {e}"
    return f"Run {run_id} deleted" + (f" with `{folder}`." if folder else "; its folder was left where it is.")


def cancel_run(manager: RunManager, run_id: int | None) -> str:
    if run_id is None:
        return "Select a run to cancel."
    run = manager.cancel(int(run_id))
    if run.status == RUNNING:
        return f"Run {run.id}: asked to stop (SIGTERM; SIGKILL after {manager.grace_s:.0f} s)."
    return f"Run {run.id} is {run.status}."


def resume_run(manager: RunManager, run_id: int | None) -> str:
    if run_id is None:
        return "Select a run to resume."
    from workbench.train.run import last_complete_checkpoint

    try:
        run = manager.resume(int(run_id))
    except ValueError as e:
        return f"**Cannot resume:** {e}"
    checkpoint = last_complete_checkpoint(run.output_dir) if run.output_dir.is_dir() else None
    if checkpoint is None:
        return f"Run {run.id} is {run.status} again; it has no checkpoint, so it starts from the beginning."
    return f"Run {run.id} is {run.status} again; it continues from {Path(checkpoint).name}."


def clone_run(ctx: AppContext, run_id: int | None, edits_text: str) -> tuple[int | None, str]:
    """A new run with the selected run's config and the edits (a JSON object; null removes a key)."""
    if run_id is None:
        return None, "Select a run to clone."
    manager = manager_of(ctx)
    try:
        edits = json.loads(edits_text) if (edits_text or "").strip() else {}
        if not isinstance(edits, dict):
            raise ValueError("edits are a JSON object, e.g. {\"learning_rate\": 1e-4, \"hsa\": false}")
        source = manager.get(int(run_id))
        from workbench.jobs import deep_merge

        manager.check_output_dir(edits)
        edits = confine_paths(ctx, edits)
        check_run(ctx, confine_paths(ctx, deep_merge(source.config, {"output_dir": None, "resume": None, **edits})),
                  base_dir=source.workdir)
        run = manager.clone(int(run_id), edits)
    except (json.JSONDecodeError, ValueError) as e:
        return None, f"**Not cloned:** {e}"
    return run.id, f"Run {run.id} ({run.name}) is {run.status}."


@dataclass
class ChatTarget:
    label: str       # the Chat tab's model choice for this run ("run: run-0003")
    base_model: str  # the model to load: the run's base for an adapter, else the run's own saved model
    adapter: str | None


def chat_target(manager: RunManager, run_id: int) -> ChatTarget:
    """What the Chat tab needs to talk to a finished run: its adapter on its base, or the whole model
    it saved (full fine-tuning, a composed VLM's align stage)."""
    run = manager.get(int(run_id))
    adapter, model = run.output_dir / ADAPTER_DIR, run.output_dir / MODEL_DIR
    try:
        label = f"run: {run.output_dir.relative_to(manager.runs_dir).parts[0]}"
    except ValueError:
        label = str(adapter if adapter.is_dir() else model)
    if run.status in FINISHED and (model / "config.json").is_file():
        return ChatTarget(label=label, base_model=str(model), adapter=None)
    if run.status not in FINISHED or not (adapter / "adapter_config.json").exists():
        raise ValueError(f"run {run.id} has no adapter or model yet ({run.status}); chat with it when it has succeeded")
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") \
        or run.config.get("base_model")
    return ChatTarget(label=label, base_model=base, adapter=str(adapter))


def merge_run(manager: RunManager, run_id: int | None) -> tuple[str, str]:
    """Fold a finished LoRA run's adapter into its base (`merge_and_unload`) as run/merged, a plain
    checkpoint; (message, the Chat tab's model choice for it)."""
    if run_id is None:
        return "Select a finished LoRA run to merge.", ""
    run = manager.get(int(run_id))
    if run.status not in FINISHED or not (run.output_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return f"Run {run.id} has no LoRA adapter to merge ({run.status}).", ""
    from models.vlm import VLMLoadError

    try:
        target = merge_run_adapter(run.output_dir)
    except (VLMLoadError, OSError, ValueError) as error:
        return f"**Not merged:** {error}", ""
    label = f"{chat_target(manager, run.id).label} · merged"
    return f"Run {run.id} merged into `{target}`: a plain checkpoint (no peft needed). In the Chat tab: **{label}**.", label


# ---- a hybrid's gates: monitor, prune plan, pruned export -------------------------------------------

def gate_figure(records: list[dict]):
    """A hybrid run's fusion gates: mean g (the Mamba branch's weight) per layer over the logged steps
    as a heatmap, and the latest step's per-layer means with their spread as bars."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38],
                        subplot_titles=("gate mean per layer over steps (1 = Mamba only, 0 = attention only)",
                                        "latest step"))
    records = [r for r in records if r.get("layers")]
    if records:
        layers = len(records[-1]["layers"])
        steps = [r["step"] for r in records]
        mean = lambda r, i: r["layers"][i]["mean"] if i < len(r["layers"]) and r["layers"][i] else None  # noqa: E731
        fig.add_trace(go.Heatmap(x=steps, y=list(range(layers)), z=[[mean(r, i) for r in records] for i in range(layers)],
                                 zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="g", x=1.02, len=0.9, thickness=12),
                                 hovertemplate="step %{x}, layer %{y}: g %{z:.3f}<extra></extra>"), row=1, col=1)
        last = records[-1]["layers"]
        fig.add_trace(go.Bar(x=list(range(layers)), y=[s["mean"] if s else None for s in last],
                             marker=dict(color=[s["mean"] if s else 0 for s in last], colorscale="Viridis", cmin=0,
                                         cmax=1),
                             error_y=dict(array=[s["std"] if s else 0 for s in last]), name="mean g",
                             customdata=[[s["low"], s["high"]] if s else [None, None] for s in last],
                             hovertemplate="layer %{x}: g %{y:.3f}<br>below 0.1: %{customdata[0]:.0%}, above 0.9: "
                                           "%{customdata[1]:.0%}<extra></extra>"), row=1, col=2)
        fig.update_yaxes(title_text="layer", row=1, col=1, dtick=1)
        fig.update_yaxes(range=[0, 1], row=1, col=2)
        fig.update_xaxes(title_text="step", row=1, col=1)
        fig.update_xaxes(title_text="layer", row=1, col=2, dtick=1)
    else:
        fig.add_annotation(text="no gate statistics: not a hybrid run, or nothing logged yet", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(height=300, margin=dict(l=40, r=20, t=50, b=40), showlegend=False, uirevision="keep")
    return fig


PLAN_FILE, PRUNED_DIR = "prune_plan.json", "pruned"


def _run_model_dir(run) -> Path:
    """The run's trained model as a plain checkpoint: its whole model, its merged adapter (merging
    first if needed)."""
    if (run.output_dir / MODEL_DIR / "config.json").is_file():
        return run.output_dir / MODEL_DIR
    if not (run.output_dir / "merged" / "config.json").is_file():
        merge_run_adapter(run.output_dir)
    return run.output_dir / "merged"


def plan_run(manager: RunManager, run_id: int | None) -> tuple[str, str]:
    """A prune plan from a hybrid run's gate statistics (models.hybrid.make_plan), written to the
    run's folder; (message, plan JSON)."""
    from models.hybrid import make_plan, read_gate_stats
    from models.hybrid.prune import describe_plan
    from workbench.train.config import model_config

    if run_id is None:
        return "Select a hybrid run.", ""
    run = manager.get(int(run_id))
    stats_file = run.output_dir / GATE_STATS
    if not stats_file.is_file():
        return f"Run {run.id} has no gate statistics ({GATE_STATS}): only a hybrid run has fusion gates.", ""
    found = model_config(str(run.config.get("base_model", ""))) or {}
    text = found.get("text_config") or found
    stats, steps = read_gate_stats(stats_file)
    layer_types = text.get("layer_types") or ["hybrid"] * len(stats)
    try:
        plan = make_plan(stats, layer_types, sliding_window=text.get("sliding_window"), source=str(stats_file),
                         steps=steps)
    except ValueError as error:
        return f"**No plan:** {error}", ""
    (run.output_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    changed = sum(d["before"] != d["after"] for d in plan["layers"])
    return (f"Plan for run {run.id} ({changed} of {len(plan['layers'])} layers change), from the last "
            f"{len(steps)} logged steps:\n```\n{describe_plan(plan)}\n```"), json.dumps(plan, indent=2)


def export_pruned_run(manager: RunManager, run_id: int | None) -> tuple[str, str]:
    """The run's model pruned by its plan (models.hybrid.export) into run/pruned; (message, the Chat
    tab's model choice for it)."""
    from models.hybrid import export

    if run_id is None:
        return "Select a hybrid run.", ""
    run = manager.get(int(run_id))
    plan = run.output_dir / PLAN_FILE
    if not plan.is_file():
        return f"Run {run.id} has no prune plan yet: press Plan pruning first.", ""
    if run.status not in FINISHED:
        return f"Run {run.id} is {run.status}: export its pruned model when it has succeeded.", ""
    try:
        target = export(_run_model_dir(run), plan, run.output_dir / PRUNED_DIR)
    except (ValueError, OSError) as error:
        return f"**Not exported:** {error}", ""
    label = f"{chat_target(manager, run.id).label} · pruned"
    size = sum(f.stat().st_size for f in target.glob("*.safetensors")) / 1e6
    return f"Pruned model of run {run.id} in `{target}` ({size:.1f} MB of weights). In the Chat tab: **{label}**.", label


# ---- the tab --------------------------------------------------------------------------------------

@dataclass
class TrainTab:
    """Components other tabs may wire to: `chat_button` fills `chat_model` with the Chat tab's
    model choice for the selected run (app.py can then switch to the Chat tab)."""
    chat_button: gr.Button
    chat_model: gr.Textbox
    selected_run: gr.Dropdown


def build(ctx: AppContext) -> TrainTab:
    manager = manager_of(ctx)
    first_preset = next(iter(PRESETS))
    p = {**DEFAULTS, "nproc": 1, **PRESETS[first_preset]}

    with gr.Row():
        with gr.Column(scale=3):
            preset = gr.Dropdown(list(PRESETS), value=first_preset, label="Preset", elem_id="train-preset")
            with gr.Row():
                base_model = gr.Textbox(p["base_model"], label="Base model (default, composed, a path or a hub id)",
                                        scale=2, elem_id="train-base-model")
                dataset = gr.Textbox("", label="Dataset: a ShareGPT .json/.jsonl (path in the workspace) or "
                                     "store:NAME", placeholder="shapes.json or store:my-dataset", scale=2,
                                     elem_id="train-dataset")
            with gr.Row():
                stage = gr.Radio(["sft", "align"], value=p.get("stage", "sft"), elem_id="train-stage",
                                 label="Stage (align: a composed VLM's projector alone, on captions)")
                finetuning = gr.Radio(["lora", "full"], value=p["finetuning"], label="Fine-tuning")
                quantization = gr.Radio(["none", "8bit", "4bit"], value=p["quantization"],
                                        label="Quantization (4bit = QLoRA, NF4 + double quant)")
                hsa = gr.Checkbox(p["hsa"], label="HSA mask during training", elem_id="train-hsa")
                merge = gr.Checkbox(p.get("merge", False), label="Merge the adapter when done",
                                    elem_id="train-merge")
            with gr.Row():
                lora_r = gr.Number(p["lora_r"], precision=0, label="LoRA r")
                lora_alpha = gr.Number(p["lora_alpha"], precision=0, label="LoRA alpha")
                lora_dropout = gr.Number(p["lora_dropout"], label="LoRA dropout")
                lora_target = gr.Textbox(", ".join(p["lora_target"]), label="LoRA target modules (or all-linear)")
            with gr.Row():
                learning_rate = gr.Number(p["learning_rate"], label="Learning rate")
                lr_scheduler = gr.Dropdown(list(SCHEDULERS), value=p["lr_scheduler"], label="Scheduler")
                warmup = gr.Number(p["warmup"], label="Warmup (steps, or a fraction < 1)")
                epochs = gr.Number(p["epochs"], label="Epochs")
                max_steps = gr.Number(p["max_steps"], precision=0, label="Max steps (-1: epochs)",
                                      elem_id="train-max-steps")
            with gr.Row():
                batch_size = gr.Number(p["batch_size"], precision=0, label="Batch size / device")
                grad_accum = gr.Number(p["grad_accum"], precision=0, label="Grad accumulation")
                max_length = gr.Number(p["max_length"], precision=0, label="Max length")
                seed = gr.Number(p["seed"], precision=0, label="Seed")
                eval_split = gr.Number(p["eval_split"], label="Eval split")
                nproc = gr.Number(1, precision=0, label="Processes (DDP)", minimum=1)
            extra = gr.Textbox("", label="More keys (JSON), e.g. {\"save_steps\": 20, \"gradient_checkpointing\": true}",
                               lines=1, elem_id="train-extra")
            name = gr.Textbox("", label="Run name (optional)", elem_id="train-name")
            with gr.Row():
                preview_button = gr.Button("Preview command", elem_id="train-preview")
                start_button = gr.Button("Start", variant="primary", elem_id="train-start")
            message = gr.Markdown(elem_id="train-message")
        with gr.Column(scale=2):
            command_box = gr.Code(label="Command", language="shell", interactive=False, elem_id="train-command",
                                  wrap_lines=True)
            config_box = gr.Code(label="Config", language="json", interactive=False, elem_id="train-config")

    gr.Markdown("### Runs")
    runs_table = gr.Dataframe(headers=RUN_HEADERS, value=runs_rows(manager), interactive=False, wrap=True,
                              elem_id="train-runs")
    with gr.Row():
        selected = gr.Dropdown(run_choices(manager), value=None, label="Run", scale=3, elem_id="train-run")
        cancel_button = gr.Button("Cancel", scale=1, elem_id="train-cancel")
        resume_button = gr.Button("Resume", scale=1, elem_id="train-resume")
        chat_button = gr.Button("Chat with this run", scale=1, elem_id="train-chat")
        merge_button = gr.Button("Merge adapter", scale=1, elem_id="train-merge-run")
        delete_button = gr.Button("Delete…", scale=1, variant="stop", elem_id="train-delete")
    with gr.Row(visible=False, elem_id="train-delete-confirm") as confirm_row:
        confirm_text = gr.Markdown(elem_id="train-delete-question")
        confirm_button = gr.Button("Delete", variant="stop", scale=0, elem_id="train-delete-yes")
        keep_button = gr.Button("Keep", scale=0, elem_id="train-delete-no")
    action = gr.Markdown(elem_id="train-action")
    summary = gr.Markdown(elem_id="train-summary")
    plot = gr.Plot(curves_figure([]), label="Loss and learning rate", elem_id="train-curves")
    with gr.Accordion("Compare runs", open=False, elem_id="train-compare-box"):
        compare = gr.Dropdown(run_choices(manager), value=[], multiselect=True, label="Runs to compare",
                              elem_id="train-compare")
        compare_plot = gr.Plot(compare_figure(manager, []), label="Loss by run", elem_id="train-compare-plot")
    with gr.Accordion("Hybrid: fusion gates, prune plan, pruned export", open=False, elem_id="train-gates-box"):
        gates_plot = gr.Plot(gate_figure([]), label="Fusion gates", elem_id="train-gates")
        with gr.Row():
            plan_button = gr.Button("Plan pruning", elem_id="train-plan")
            export_button = gr.Button("Export pruned model", elem_id="train-export")
        plan_box = gr.Code(label="Prune plan", language="json", interactive=False, max_lines=16,
                           elem_id="train-plan-json")
    with gr.Row():
        log = gr.Textbox("", label="Log (tail)", lines=14, max_lines=14, autoscroll=True, elem_id="train-log",
                         scale=3)
        with gr.Column(scale=2):
            run_config = gr.Code(label="Run config", language="json", interactive=False)
            edits = gr.Textbox("", label="Clone with edits (JSON)", placeholder="{\"learning_rate\": 1e-4, \"hsa\": false}")
            clone_button = gr.Button("Clone into a new run", elem_id="train-clone")
            chat_model = gr.Textbox("", label="Chat tab model for this run", interactive=False,
                                    elem_id="train-chat-model")
    timer = gr.Timer(2.0)

    # the form by field name; handlers take it as a set of inputs (Gradio passes {component: value})
    form = dict(base_model=base_model, dataset=dataset, stage=stage, finetuning=finetuning, quantization=quantization,
                merge=merge, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target=lora_target,
                learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup=warmup, epochs=epochs,
                max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, hsa=hsa,
                seed=seed, eval_split=eval_split, nproc=nproc, extra=extra)
    assert set(form) == set(FORM_FIELDS), "the form's widgets and FORM_FIELDS disagree"

    def values_of(data: dict) -> dict:
        return {key: data[widget] for key, widget in form.items()}

    def on_preset(name):
        return {form[key]: value for key, value in preset_values(name).items()}

    def on_preview(data):
        command, config, problems = preview(ctx, values_of(data))
        return command, config, problems

    def on_start(data):
        run_name = data[name]
        command, config, problems = preview(ctx, values_of(data))
        run_id, text = start_run(ctx, values_of(data), run_name)
        if run_id is None:
            return command, config, text, gr.update(), gr.update(), gr.update()
        run = manager.get(run_id)
        return (shlex.join(run.command), json.dumps(run.config, indent=2), text, runs_rows(manager),
                gr.update(choices=run_choices(manager), value=run_id), "")

    def on_select_row(evt: gr.SelectData, table):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            run_id = int(table.iloc[row, 0]) if hasattr(table, "iloc") else int(table[row][0])
        except (ValueError, IndexError, TypeError):
            return gr.update()
        return gr.update(value=run_id)

    def on_refresh(run_id, compared):
        # one poll: the table for everyone, the selected run's curves and log for this session
        view = run_view(manager, run_id)
        choices = run_choices(manager)
        compared_plot = compare_figure(manager, compared) if compared else gr.skip()
        return (runs_rows(manager), gr.update(choices=choices), gr.update(choices=choices), compared_plot, *view)

    def on_delete_ask(run_id):
        question, ask = delete_prompt(manager, run_id)
        if not ask:  # nothing to confirm: say why in the action line
            return question, gr.skip(), gr.Row(visible=False)
        return "", question, gr.Row(visible=True)

    def on_delete(run_id, compared):
        text = delete_run(manager, run_id)
        choices = run_choices(manager)
        ids = {value for _, value in choices}
        kept = [i for i in (compared or []) if i in ids]
        selected_now = run_id if run_id in ids else None
        return (text, gr.Row(visible=False), runs_rows(manager), gr.update(choices=choices, value=selected_now),
                gr.update(choices=choices, value=kept), compare_figure(manager, kept))

    def on_cancel(run_id):
        return cancel_run(manager, run_id), ""  # "Run N is running." no longer holds

    def on_resume(run_id):
        return resume_run(manager, run_id)

    def on_clone(run_id, edits_text):
        new_id, text = clone_run(ctx, run_id, edits_text)
        if new_id is None:
            return text, gr.update()
        return text, gr.update(choices=run_choices(manager), value=new_id)

    def on_chat(run_id):
        if run_id is None:
            return "Select a finished run.", ""
        try:
            target = chat_target(manager, run_id)
        except ValueError as e:
            return str(e), ""
        if target.adapter is None:
            return f"In the Chat tab, pick **{target.label}** (the model `{target.base_model}`).", target.label
        return (f"In the Chat tab, pick **{target.label}** (base `{target.base_model}`, adapter "
                f"`{target.adapter}`)."), target.label

    def on_merge(run_id, progress=gr.Progress()):
        progress(0.1, desc="merging the adapter into its base…")
        return merge_run(manager, run_id)

    preset.change(on_preset, preset, list(form.values()))
    preview_button.click(on_preview, set(form.values()), [command_box, config_box, message])
    start_button.click(on_start, {name, *form.values()}, [command_box, config_box, message, runs_table, selected, chat_model])
    runs_table.select(on_select_row, runs_table, selected)
    view_outputs = [summary, plot, log, run_config, gates_plot]
    selected.change(lambda run_id: run_view(manager, run_id), selected, view_outputs)
    # the log tail shows its newest lines: scrolled to the end whenever it changes
    log.change(None, None, None, js="() => { const t = document.querySelector('#train-log textarea');"
                                     " if (t) t.scrollTop = t.scrollHeight; }")
    timer.tick(on_refresh, [selected, compare], [runs_table, selected, compare, compare_plot, *view_outputs],
               show_progress="hidden")
    compare.change(lambda ids: compare_figure(manager, ids), compare, compare_plot)
    delete_button.click(on_delete_ask, selected, [action, confirm_text, confirm_row])
    keep_button.click(lambda: ("Kept.", gr.Row(visible=False)), None, [action, confirm_row])
    confirm_button.click(on_delete, [selected, compare],
                         [action, confirm_row, runs_table, selected, compare, compare_plot])
    cancel_button.click(on_cancel, selected, [action, message])
    resume_button.click(on_resume, selected, action)
    clone_button.click(on_clone, [selected, edits], [action, selected])
    chat_button.click(on_chat, selected, [action, chat_model])
    merge_button.click(on_merge, selected, [action, chat_model])

    def on_plan(run_id):
        return plan_run(manager, run_id)

    def on_export(run_id, progress=gr.Progress()):
        progress(0.1, desc="pruning and saving…")
        return export_pruned_run(manager, run_id)

    plan_button.click(on_plan, selected, [action, plan_box])
    export_button.click(on_export, selected, [action, chat_model])
    return TrainTab(chat_button=chat_button, chat_model=chat_model, selected_run=selected)
