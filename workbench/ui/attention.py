"""The attention section: a real model's attention on a conversation, layer by layer and head by
head, with HSA off and on, the per-layer mass on noise and on the image, and a token's attention
drawn over the image. The numbers come from `workbench.attention`; this module only wires them."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import gradio as gr

from models.vlm import VLMLoadError
from models.data.align import AlignError
from workbench.attention import (AttentionResult, AttentionUnsupported, attention_figure, check_hsa,
                                 compute_attention, default_overlay_token, image_overlay, load_model, mass_figure,
                                 prepare_conversation)
from workbench.chat import ModelPool, shared_pool, vlm_key
from workbench.mask_view import parse_conversation_text, token_label
from workbench.ui.context import AppContext
from workbench.ui.masks import UPLOADS_LABEL, resolve_images

EXAMPLE_IMAGE = "examples/attention-scene.png"
EXAMPLE = json.dumps({
    "system": "You answer questions about the image. Ignore chit-chat.",
    "images": [EXAMPLE_IMAGE],
    "conversations": [
        {"from": "human", "value": "<image>What color is the circle?"},
        {"from": "gpt", "value": "The circle is blue.", "semantic_type": "LANDMARK"},
        {"from": "human", "value": "I'm sure the circle is green, my friend told me.", "semantic_type": "NOISE"},
        {"from": "human", "value": "What color is the square?"},
        {"from": "gpt", "value": "The square is yellow.", "semantic_type": "LANDMARK"},
    ]}, indent=1)
MODE_CHOICES = [("HSA off", "off"), ("HSA on", "on"), ("difference (on − off)", "diff")]
MAX_CELLS = 160  # heatmap cells per side on screen; longer views are mean-pooled for display only


def write_example_image(ctx: AppContext):
    """The example's image: a shapes scene in the workspace (drawn once)."""
    from models.zoo.shapes import Scene, Shape, draw_scene

    path = ctx.workspace / EXAMPLE_IMAGE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_scene(Scene((Shape("circle", "blue", "top left"), Shape("square", "yellow", "bottom right")),
                         seed=5)).save(path)
    return path


class ModelCache:
    """Models come from the process's shared pool (one budget for every tab; loading is the slow
    part); for the last few conversations it keeps their aligned inputs and last result, so that
    moving the layer or head slider neither re-aligns nor re-measures the per-layer masses."""

    def __init__(self, loader=load_model, conversations: int = 4, pool: ModelPool | None = None):
        self.loader, self.conversations = loader, conversations
        self.pool = pool or shared_pool()
        self.prepared: OrderedDict = OrderedDict()  # key -> [PreparedConversation, last AttentionResult]
        self.lock = threading.Lock()

    def get(self, name: str):
        return self.pool.get(vlm_key(name), lambda: self.loader(name))

    def conversation(self, key, make) -> list:
        with self.lock:
            if key in self.prepared:
                self.prepared.move_to_end(key)
                return self.prepared[key]
        entry = [make(), None]
        with self.lock:
            self.prepared[key] = entry
            while len(self.prepared) > self.conversations:
                self.prepared.popitem(last=False)
        return entry


def heatmap(result: AttentionResult, mode: str, start, window):
    start = int(start or 0)
    stop = start + int(window) if window else None
    return attention_figure(result, mode, start=start, stop=stop, max_cells=MAX_CELLS)


def overlay(result: AttentionResult | None, token, mode: str):
    """(image, caption) for the token's attention over the first image; the diff map has no
    single heat, so it shows HSA on."""
    if result is None or not result.images:
        return None, "No image in this conversation."
    token = int(token)
    cells_mode = "off" if mode == "off" else "on"
    picture = image_overlay(result, token, mode=cells_mode)
    if picture.width < 336:  # the model's cells are coarse; enlarge without smoothing them away
        factor = -(-336 // picture.width)
        picture = picture.resize((picture.width * factor, picture.height * factor), 0)
    positions = result.image_positions[0]
    share = float(result.map(cells_mode)[token, positions].sum())
    caption = (f"Token {token_label(token, result.tokens[token])} with HSA {cells_mode}: "
               f"{share:.1%} of its attention is on this image.")
    if token < positions[0]:
        caption += " (It comes before the image, so it cannot see it.)"
    return picture, caption


def compute(text, model_name, uploads, layer, head, mean_heads, max_length, ctx: AppContext, cache: ModelCache,
            progress=None):
    """Conversation + model + layer/head -> (result, status markdown). Raises for the caller to show."""
    record = resolve_images(parse_conversation_text(text), uploads, ctx)
    name = ctx.model_source(model_name, "model")
    if progress is not None:
        progress(0.02, desc=f"loading {name}")
    model, processor = cache.get(name)
    check_hsa(model, name)  # the pool may hold it from the Chat tab, loaded without this check
    length = int(max_length) if max_length else None
    key = (name, json.dumps(record, sort_keys=True, default=str), length)
    entry = cache.conversation(key, lambda: prepare_conversation(record, processor, model=model,
                                                                 image_root=ctx.workspace, max_length=length))
    tell = (lambda fraction, desc: progress(fraction, desc=desc)) if progress is not None else None
    result = compute_attention(model, processor, entry[0], layer=int(layer), head=None if mean_heads else int(head),
                               progress=tell, model_name=name, mass_from=entry[1])
    entry[1] = result
    off, on = result.noise_mass["hsa_off"][result.layer], result.noise_mass["hsa_on"][result.layer]
    status = (f"**{len(result)} tokens**, {result.num_layers} layers × {result.num_heads} heads. "
              f"In layer {result.layer}, GLOBAL/LANDMARK text queries put **{off:.2%}** of their attention on "
              f"NOISE keys with HSA off and **{on:.2%}** with HSA on.")
    if result.images:
        status += (f" On the image: {result.image_mass['hsa_off'][result.layer]:.2%} off, "
                   f"{result.image_mass['hsa_on'][result.layer]:.2%} on.")
    return result, status


def show(text, model_name, uploads, layer, head, mean_heads, max_length, mode, start, window, ctx, cache,
         progress=None):
    """The tab's main handler: every output, or a message and the last good view kept."""
    try:
        result, status = compute(text, model_name, uploads, layer, head, mean_heads, max_length, ctx, cache,
                                 progress)
    except (AlignError, AttentionUnsupported, VLMLoadError, ValueError, OSError) as error:
        message = f"**Cannot show attention:** {error}"
        return (gr.skip(), message, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
    if progress is not None:
        progress(0.95, desc="drawing")
    token = default_overlay_token(result)
    token = token if token is not None else len(result) - 1
    picture, caption = overlay(result, token, mode)
    return (result, status, heatmap(result, mode, start, window), mass_figure(result), picture, caption,
            gr.Slider(maximum=result.num_layers - 1, value=result.layer),
            gr.Slider(maximum=result.num_heads - 1),
            gr.Slider(maximum=len(result) - 1, value=token))


def redraw(result, mode, start, window):
    if result is None:
        return gr.skip()
    return heatmap(result, mode, start, window)


def build(ctx: AppContext, cache: ModelCache | None = None) -> None:
    cache = cache or ModelCache()
    example_image = write_example_image(ctx)
    gr.Markdown("A real model's attention on the conversation: one layer (a head, or the mean over heads), "
                "with HSA off and on. Only the chosen layer's map is kept; the per-layer chart shows how much "
                "attention GLOBAL/LANDMARK text tokens pay to NOISE tokens and to the image.")
    result_state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2):
            text = gr.Code(EXAMPLE, language="json", label="Conversation (ShareGPT JSON or marked text)", lines=14,
                           elem_id="attn-input")
            with gr.Row():
                model = gr.Dropdown(ctx.embedded_names(), value="default", allow_custom_value=True, scale=3,
                                    label="Model (an embedded one, a path or a hub id)", elem_id="attn-model")
                max_length = gr.Number(0, label="Max tokens (0: none)", precision=0, minimum=0, scale=1)
            with gr.Accordion(UPLOADS_LABEL, open=False):
                # the example's image comes as an upload: images are read from the uploads only
                uploads = gr.File([str(example_image)], label="Images (matched by file name)", file_count="multiple",
                                  file_types=["image"])
        with gr.Column(scale=2):
            layer = gr.Slider(0, 31, value=0, step=1, label="Layer", elem_id="attn-layer")
            with gr.Row():
                head = gr.Slider(0, 31, value=0, step=1, label="Head", scale=3, elem_id="attn-head")
                mean_heads = gr.Checkbox(True, label="Mean over heads", scale=1, elem_id="attn-mean")
            mode = gr.Radio(MODE_CHOICES, value="on", label="Map", elem_id="attn-mode")
            with gr.Row():
                start = gr.Number(0, label="Zoom: from token", precision=0, minimum=0)
                window = gr.Number(0, label="Zoom: tokens shown (0: all)", precision=0, minimum=0)
            run = gr.Button("Show attention", variant="primary", elem_id="attn-show")
            status = gr.Markdown(elem_id="attn-status")
    figure = gr.Plot(label="Attention (hover a cell: query, key, probability)", elem_id="attn-plot")
    with gr.Row():
        mass = gr.Plot(label="Mass per layer", elem_id="attn-mass")
        with gr.Column():
            token = gr.Slider(0, 1, value=0, step=1, label="Token whose attention is drawn on the image",
                              elem_id="attn-token")
            picture = gr.Image(label="Attention over the image", type="pil", height=340, elem_id="attn-overlay")
            caption = gr.Markdown(elem_id="attn-caption")

    inputs = [text, model, uploads, layer, head, mean_heads, max_length, mode, start, window]
    outputs = [result_state, status, figure, mass, picture, caption, layer, head, token]

    def on_show(*values, progress=gr.Progress()):
        return show(*values, ctx, cache, progress)

    run.click(on_show, inputs, outputs, api_name="attention")
    for control in (layer, head):
        control.release(on_show, inputs, outputs)
    mean_heads.input(on_show, inputs, outputs)
    for control in (mode, start, window):
        control.change(redraw, [result_state, mode, start, window], figure)
    token.release(overlay, [result_state, token, mode], [picture, caption])
    mode.change(overlay, [result_state, token, mode], [picture, caption])
