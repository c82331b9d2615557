"""The Chat tab: several turns with images against the default model, any checkpoint or a finished
run's adapter, streaming, with an HSA role per turn, side by side with a second model if asked."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import gradio as gr

from models.hsa import ROLE_NAMES
from workbench.chat import (TABLE_HEADERS, ChatInputError, ChatTurn, ModelPool, display_messages,
                            finished_runs, history_from_api, is_out_of_memory, keep_images, preference_pair,
                            retry_last, shared_pool, to_record, turns_table, user_turn, vlm_key, without_failed)
from workbench.ui.context import AppContext

NONE = "(none)"
ROLE_CHOICES = [ROLE_NAMES[r] for r in sorted(ROLE_NAMES)]


class ChatBackend:
    """The functions the tab wires together; plain values in, plain values out."""

    def __init__(self, ctx: AppContext, pool: ModelPool | None = None):
        self.ctx = ctx
        self.pool = pool or shared_pool()

    def _load(self, name: str, adapter: str | None):
        from models.vlm import load_vlm

        return load_vlm(name, adapter=adapter)

    def model_choices(self) -> list[str]:
        return [*self.ctx.embedded_names(), *finished_runs(self.ctx.runs_dir)]

    def resolve(self, choice: str) -> tuple[str, str | None]:
        runs = finished_runs(self.ctx.runs_dir)
        if choice in runs:
            return runs[choice]
        return self.ctx.model_source(choice, "model"), None

    def model(self, choice: str):
        name, adapter = self.resolve(choice)
        return self.pool.get(vlm_key(name, adapter), lambda: self._load(name, adapter))

    def stream(self, choice: str, turns: list[ChatTurn], system: str, settings, use_hsa: bool):
        """Pieces of the reply of `choice` to `turns` (which end with a user turn)."""
        from models.vlm import stream_reply

        model, processor = self.model(choice)
        record = to_record(turns, system)
        yield from stream_reply(model, processor, record, settings=settings, hsa=use_hsa or False)


def make_settings(mode, max_new_tokens, temperature, top_p, top_k, num_beams, repetition_penalty, seed):
    from models.vlm import GenerationSettings

    return GenerationSettings(mode=mode, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              top_p=float(top_p), top_k=int(top_k), num_beams=int(num_beams),
                              repetition_penalty=float(repetition_penalty),
                              seed=int(seed) if seed not in (None, "", -1) else None)


def answer(backend: ChatBackend, st: dict, choices: list[str], system: str, hsa_on: bool, settings):
    """The reply of each chosen model ("a", then "b" when one is chosen) to the conversation's last user
    turn: yields (state, status) as the reply grows. When a model cannot load or fails, the user turn is
    marked failed (shown with the reason; kept out of what models see) so it can be retried or removed."""
    st = copy.deepcopy(st)
    if not st["a"] or st["a"][-1].speaker != "user" or st["a"][-1].failed:
        yield st, gr.skip()  # nothing to answer (e.g. the message was refused): keep the status that says why
        return
    keep_images(st["a"])  # answering uses every picture of the conversation: none may be swept meanwhile
    sides = [("a", choices[0])] + ([("b", choices[1])] if len(choices) > 1 and choices[1] not in (None, "", NONE) else [])
    for side, choice in sides:
        history = st[side]
        try:
            backend.model(choice)
        except Exception as error:  # shown to the person; the session stays usable
            history[-1].failed = f"cannot load {choice}: {error}"
            yield st, f"**Cannot load {choice}:** {error}"
            return
        reply = ChatTurn("assistant", "", model=choice, settings=asdict(settings) | {"hsa": bool(hsa_on)})
        history.append(reply)
        try:
            # the status is said once per model, not with every piece: a piece already on its way when
            # Stop cancels the stream must not overwrite the "Stopped" that Stop shows
            status = f"{choice} is answering…"
            for piece in backend.stream(choice, history[:-1], system, settings, hsa_on):
                reply.text += piece
                yield st, status
                status = gr.skip()
        except Exception as error:
            history.pop()
            reason = "ran out of memory" if is_out_of_memory(error) else f"failed: {error}"
            history[-1].failed = f"{choice} {reason}"
            yield st, f"**{choice} {reason}.** Try fewer tokens, a smaller image or model."
            return
    yield st, ""


def save_to_store(ctx: AppContext, dataset_name: str, record: dict, what: str = "conversation") -> str:
    """Store one record in a dataset of the annotation store; says where it went, that it was there
    already (the store's content key: nothing stored twice), or why it was refused."""
    from workbench.store import Store, StoreBusyError, import_records

    name = (dataset_name or "").strip() or "chat"
    try:
        with Store(ctx.db_path) as store:
            report = import_records(store, name, [("chat", record)], base_dir=ctx.workspace, author="chat",
                                    source="chat")
    except StoreBusyError as error:
        return f"**Not saved:** the annotation store stayed busy ({error}); try again."
    if report.errors:
        return f"**Not saved:** {report.errors[0]}"
    if report.skipped:
        number = report.skipped[0].split("as conversation", 1)[-1].split(";")[0].strip()  # "#N"
        return f"Already there: this {what} is conversation {number} of dataset **{name}**; nothing new saved."
    return f"Saved the {what} to dataset **{name}** in the annotation store."


def send_to_annotate(ctx: AppContext, st: dict, system: str, dataset_name: str) -> str:
    if not st["a"]:
        return "**Nothing to send:** the conversation is empty."
    return save_to_store(ctx, dataset_name, to_record(st["a"], system))


def save_preference(ctx: AppContext, st: dict, system: str, dataset_name: str, prefer: str) -> str:
    """The Compare view's two answers to the last message saved as a preference pair, `prefer`'s
    answer ("a": the first model, "b": the second) chosen, the other rejected."""
    try:
        record = preference_pair(st["a"], st["b"], prefer, system)
    except ChatInputError as error:
        return f"**No pair saved:** {error}"
    side = "first" if prefer == "a" else "second"
    return save_to_store(ctx, dataset_name, record, f"pair (the {side} answer preferred)")


DEFAULT_MODEL_NOTE = (
    "*The embedded models (default, composed, hybrid) are tiny models trained on one synthetic task, **shapes "
    "scenes**: 1–3 circles, squares or triangles (red, green, blue or yellow) in a 2×2 grid, and questions about "
    "their colour, kind, count and position. Any image is shrunk to that 56×56 grid; photos and other questions "
    "get shapes-world answers. For a general VLM, give a checkpoint's path or hub id.*")
STOPPED = "Stopped. The reply so far is kept; *Retry* asks again."


def build(ctx: AppContext, backend: ChatBackend | None = None):
    """Lays out the tab; returns a function other tabs call to open a model here (e.g. a run)."""
    backend = backend or ChatBackend(ctx)
    state = gr.State({"a": [], "b": []})
    with gr.Row():
        model_a = gr.Dropdown(backend.model_choices(), value="default", allow_custom_value=True, scale=3,
                              label="Model (default, a finished run, a path or a hub id)", elem_id="chat-model")
        model_b = gr.Dropdown([NONE, *backend.model_choices()], value=NONE, allow_custom_value=True, scale=3,
                              label="Compare with", elem_id="chat-compare")
        refresh = gr.Button("↻ runs", scale=0, size="sm")
        use_hsa = gr.Checkbox(True, label="HSA at inference (turn roles → semantic_ids)", scale=2)
    with gr.Accordion("Decoding", open=False):
        with gr.Row():
            mode = gr.Radio(["greedy", "sample", "beam"], value="greedy", label="Mode")
            max_new_tokens = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens", elem_id="chat-max-new-tokens")
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sample)")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sample)")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (sample)")
            num_beams = gr.Slider(2, 8, value=4, step=1, label="Beams (beam)")
            seed = gr.Number(-1, precision=0, label="Seed (-1: random)")
    gr.Markdown(DEFAULT_MODEL_NOTE, elem_id="chat-model-note")
    system = gr.Textbox("", label="System prompt (GLOBAL)", lines=1, placeholder="optional")
    with gr.Row():
        with gr.Column():
            chat_a = gr.Chatbot(label="Model", height=460, elem_id="chat-a", buttons=["copy"])
            prefer_a = gr.Button("✓ Prefer this answer", size="sm", visible=False, elem_id="chat-prefer-a")
        with gr.Column(visible=False) as column_b:
            chat_b = gr.Chatbot(label="Compare", height=460, elem_id="chat-b", buttons=["copy"])
            prefer_b = gr.Button("✓ Prefer this answer", size="sm", elem_id="chat-prefer-b")
    with gr.Row(visible=False) as pairs_row:
        pairs_dataset = gr.Textbox("chat-pairs", label="Preference pairs dataset (the preferred answer is "
                                   "'chosen', the other 'rejected'; for DPO / NCA training)", elem_id="chat-pairs")
    with gr.Row():
        message = gr.MultimodalTextbox(placeholder="Ask about an image (attach one or more)…", file_types=["image"],
                                       file_count="multiple", show_label=False, scale=5, stop_btn=True,
                                       elem_id="chat-input")
        role = gr.Radio(ROLE_CHOICES, value="global", label="Role of this message", scale=1)
    with gr.Row():
        regenerate = gr.Button("Retry / regenerate", size="sm", elem_id="chat-retry")
        remove_failed = gr.Button("Remove failed", size="sm", elem_id="chat-remove-failed")
        edit_last = gr.Button("Edit last message", size="sm", elem_id="chat-edit")
        clear = gr.Button("Clear", size="sm")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Accordion("Turns, roles and settings", open=False):
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True)
        with gr.Row():
            turn_index = gr.Number(0, precision=0, label="Turn #", minimum=0)
            turn_role = gr.Radio(ROLE_CHOICES, value="global", label="Mark as", elem_id="chat-turn-role")
            apply_role = gr.Button("Apply", size="sm", elem_id="chat-apply-role")
        with gr.Row():
            dataset = gr.Textbox("chat", label="Annotation dataset", scale=3, elem_id="chat-dataset")
            to_annotate = gr.Button("Send to Annotate", scale=1, elem_id="chat-to-annotate")
    decoding = [mode, max_new_tokens, temperature, top_p, top_k, num_beams, repetition_penalty, seed]

    def views(st):
        return display_messages(st["a"]), display_messages(st["b"]), turns_table(st["a"])

    def add_message(value, role_value, st):
        st = copy.deepcopy(st)
        try:
            turn = user_turn(value, role_value)
        except ChatInputError as error:
            gr.Warning(str(error))
            return (*views(st), st, gr.skip(), f"**Not sent:** {error}")
        st["a"].append(turn)
        st["b"].append(copy.deepcopy(turn))
        return (*views(st), st, gr.MultimodalTextbox(value=None, interactive=False), "")

    def respond(st, choice_a, choice_b, system_value, hsa_on, *decoding_values, progress=gr.Progress()):
        try:
            settings = make_settings(*decoding_values)
        except ValueError as error:
            yield (*views(st), st, f"**Cannot decode:** {error}")
            return
        progress(0.1, desc="answering")
        for st, text in answer(backend, st, [choice_a, choice_b], system_value, hsa_on, settings):
            yield (*views(st), st, text)

    def drop_last_reply(st):
        st = {side: retry_last(copy.deepcopy(st[side])) for side in ("a", "b")}
        return (*views(st), st)

    def drop_failed(st):
        st = {side: without_failed(copy.deepcopy(st[side])) for side in ("a", "b")}
        return (*views(st), st, "")

    def take_back_last(st):
        st = copy.deepcopy(st)
        last = None
        for side in ("a", "b"):
            while st[side]:
                turn = st[side].pop()
                if turn.speaker == "user":
                    last = last or turn
                    break
        value = {"text": last.text, "files": last.images} if last else None
        return (*views(st), st, value)

    def set_role(st, index, role_value):
        st = copy.deepcopy(st)
        index = int(index or 0)
        if not 0 <= index < len(st["a"]):
            gr.Warning(f"there is no turn {index}")
            return (*views(st), st)
        for side in ("a", "b"):
            if index < len(st[side]):
                st[side][index].role = ROLE_CHOICES.index(role_value)
        return (*views(st), st)

    shown = [chat_a, chat_b, table]
    send = message.submit(add_message, [message, role, state], [*shown, state, message, status])
    reply_event = send.then(respond, [state, model_a, model_b, system, use_hsa, *decoding],
                            [*shown, state, status])
    reply_event.then(lambda: gr.MultimodalTextbox(interactive=True), None, message)
    retry_event = regenerate.click(drop_last_reply, state, [*shown, state]).then(
        respond, [state, model_a, model_b, system, use_hsa, *decoding], [*shown, state, status])
    # Stop ends the reply (the generation stops with its stream) and says so
    message.stop(lambda: (STOPPED, gr.MultimodalTextbox(interactive=True)), None, [status, message],
                 cancels=[reply_event, retry_event])
    remove_failed.click(drop_failed, state, [*shown, state, status])
    edit_last.click(take_back_last, state, [*shown, state, message])
    for clearing in (clear.click, chat_a.clear, chat_b.clear):  # the Chatbots' own trash buttons too
        clearing(lambda: ([], [], [], {"a": [], "b": []}, ""), None, [*shown, state, status])
    apply_role.click(set_role, [state, turn_index, turn_role], [*shown, state])
    to_annotate.click(lambda st, s, d: send_to_annotate(ctx, st, s, d), [state, system, dataset], status)
    prefer_a.click(lambda st, s, d: save_preference(ctx, st, s, d, "a"), [state, system, pairs_dataset], status)
    prefer_b.click(lambda st, s, d: save_preference(ctx, st, s, d, "b"), [state, system, pairs_dataset], status)

    def show_compare(choice):
        on = choice not in (None, "", NONE)
        return gr.Column(visible=on), gr.Button(visible=on), gr.Row(visible=on)

    model_b.change(show_compare, model_b, [column_b, prefer_a, pairs_row])
    refresh.click(lambda: refresh_models(), None, [model_a, model_b])

    # Scripting: Client(url).predict({"text": ..., "files": [handle_file(...)]}, api_name="/chat")
    with gr.Row(visible=False):
        api_message = gr.MultimodalTextbox(file_types=["image"], file_count="multiple")
        api_history = gr.JSON([])
        api_model = gr.Textbox("default")
        api_settings = gr.JSON({})
        api_reply = gr.Textbox()
        api_button = gr.Button()

    def chat_api(message_value, history, model_choice, settings_value):
        """Reply of a model (default: the embedded default) to one message with images, after an
        optional text history [{"role", "content"}]; settings: GenerationSettings fields + "hsa"."""
        try:
            turns = history_from_api(history) + [user_turn(message_value)]
            options = dict(settings_value or {})
            if isinstance(settings_value, str):
                options = json.loads(settings_value)
            hsa_on = bool(options.pop("hsa", True))
            system_value = options.pop("system", "")
            from models.vlm import GenerationSettings

            settings = GenerationSettings(**options)
            backend.resolve(model_choice or "default")  # a model outside what this server may read: refused
        except (ChatInputError, ValueError, TypeError) as error:
            raise gr.Error(str(error)) from None
        # A generator: predict() returns the whole reply, submit() streams the growing text.
        text = ""
        for piece in backend.stream(model_choice or "default", turns, system_value, settings, hsa_on):
            text += piece
            yield text
        if not text:
            yield ""

    api_button.click(chat_api, [api_message, api_history, api_model, api_settings], api_reply, api_name="chat")

    def open_model(choice: str):
        """An update for the model picker that lists (and selects) `choice`."""
        choices = backend.model_choices()
        return gr.Dropdown(choices=choices if choice in choices else [*choices, choice], value=choice)

    def refresh_models():
        """The pickers' choices now (runs finished since the page was opened included)."""
        choices = backend.model_choices()
        return gr.Dropdown(choices=choices), gr.Dropdown(choices=[NONE, *choices])

    return ChatTab(model=model_a, open_model=open_model, pickers=[model_a, model_b], refresh=refresh_models)


@dataclass
class ChatTab:
    """What app.py wires: `open_model(choice)` selects a model here, `refresh` re-lists the models
    (when the tab is opened) into `pickers`."""
    model: gr.Dropdown
    open_model: object
    pickers: list
    refresh: object
