"""The HSA mask tab: paste a conversation, see the mask its roles make for a model's tokenizer."""
from __future__ import annotations

import hashlib
from pathlib import Path

import gradio as gr

from models.data.align import AlignError
from workbench.mask_view import (SUMMARY_HEADERS, build_mask_view, mask_figure, mask_png, pair_summary,
                                 parse_conversation_text, role_counts, token_highlights)
from workbench.ui.context import AppContext, cached_processor

UPLOADS_LABEL = "Images named in the JSON"
WARNING_SECONDS = 8  # a warning toast closes itself; toasts that never expire pile up

EXAMPLE_MARKED = """[system]
You answer questions about the image. Ignore chit-chat.
[user]
What color is the circle?
[assistant: landmark]
The circle is red.
[user: noise]
I'm sure the circle is green, my friend told me.
[user]
And how many shapes are there?
[assistant: landmark]
There are two shapes."""

EXAMPLE_SHAREGPT = """{
  "system": "You answer questions about the image.",
  "conversations": [
    {"from": "human", "value": "What color is the square? lol nice weather today",
     "spans": [{"start": 26, "end": 48, "role": "noise"}]},
    {"from": "gpt", "value": "The square is blue.", "semantic_type": "LANDMARK"},
    {"from": "human", "value": "I think it is yellow.", "semantic_type": "NOISE"},
    {"from": "human", "value": "Is it on the left?"},
    {"from": "gpt", "value": "Yes, it is on the left.", "semantic_type": "LANDMARK"}
  ]
}"""


def resolve_images(record: dict, uploads: list | None, ctx: AppContext | None = None) -> dict:
    """The record's images are this request's uploads, found by Annotate's import rule
    (`workbench.store.io.image_in_upload`): a relative path without '..', matched by its file name (a
    browser sends files without their folders) when exactly one uploaded file has it. Nothing else on the
    server is read, and what the error says depends on the name as written only, not on the disk."""
    from workbench.store.io import image_in_upload

    images = record.get("images") or []
    if not isinstance(images, list):
        return record  # align names the problem
    uploaded = [Path(str(path)) for path in uploads or []]
    return dict(record, images=[str(image_in_upload(image, f"image {k}", uploaded, how=f"add it under {UPLOADS_LABEL!r}",
                                                    same_name="rename one"))
                                for k, image in enumerate(images)])


def show_mask(text: str, model_name: str, uploads, max_length, ctx: AppContext,
              progress=gr.Progress()):
    """Conversation text -> (figure, summary rows, token strip, status markdown, png path)."""
    try:
        record = resolve_images(parse_conversation_text(text), uploads, ctx)
        progress(0.2, desc="loading the tokenizer")
        processor = cached_processor(ctx.model_source(model_name, "model"))
        progress(0.5, desc="aligning roles to tokens")
        view = build_mask_view(record, processor, image_root=ctx.workspace,
                               max_length=int(max_length) if max_length else None)
    except (AlignError, ValueError, OSError) as error:
        # Say what is wrong and keep the last good mask on screen.
        gr.Warning(str(error), duration=WARNING_SECONDS)
        return gr.skip(), gr.skip(), gr.skip(), f"**Cannot show this conversation:** {error}", gr.skip()
    progress(0.8, desc="drawing")
    counts = role_counts(view)
    rows = pair_summary(view)
    total = rows[-1]
    status = (f"**{len(view.aligned.tokens)} tokens** — global {counts['global']}, landmark {counts['landmark']}, "
              f"noise {counts['noise']}. HSA blocks **{total[3]}** of {total[2]} causal query→key pairs "
              f"({total[5]}%).")
    digest = hashlib.sha1(f"{text}|{model_name}|{max_length}".encode()).hexdigest()[:12]
    png = ctx.workspace / "exports" / f"hsa-mask-{digest}.png"
    mask_png(view, png)
    return mask_figure(view), rows, token_highlights(view), status, str(png)


def build(ctx: AppContext) -> None:
    gr.Markdown("Paste a conversation — ShareGPT JSON (with `semantic_type` per turn and `spans`), or "
                "marked text where `[user]`, `[assistant: landmark]`, `[user: noise]` lines start turns — "
                "and see the attention mask its roles make for the model's tokenizer. "
                "GLOBAL and LANDMARK queries never see NOISE keys; noise sees everything before it.")
    with gr.Row():
        with gr.Column(scale=2):
            text = gr.Code(EXAMPLE_MARKED, language=None, label="Conversation", lines=16, elem_id="mask-input")
            with gr.Row():
                model = gr.Textbox("default", label="Tokenizer of model (default, composed, a path or a hub id)", scale=3,
                                   elem_id="mask-model")
                max_length = gr.Number(0, label="Max length (0: none)", precision=0, scale=1, minimum=0)
            with gr.Accordion(UPLOADS_LABEL, open=False):
                uploads = gr.File(label="Images (matched by file name)", file_count="multiple",
                                  file_types=["image"])
            with gr.Row():
                show = gr.Button("Show mask", variant="primary", elem_id="mask-show")
                example_a = gr.Button("Example: marked text", size="sm")
                example_b = gr.Button("Example: ShareGPT JSON", size="sm")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id="mask-status")
            tokens = gr.HighlightedText(label="Tokens by role", show_legend=True, combine_adjacent=False,
                                        color_map={"global": "#9ec5fe", "landmark": "#a3e4bd",
                                                   "noise": "#d0d0d0"}, elem_id="mask-tokens")
    figure = gr.Plot(label="Mask (hover a cell for its tokens)", elem_id="mask-plot")
    with gr.Row():
        summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="Query role → key role", interactive=False,
                               elem_id="mask-summary", scale=3)
        png = gr.File(label="PNG", scale=1)

    def run(text_value, model_value, files, length, progress=gr.Progress()):
        return show_mask(text_value, model_value, files, length, ctx, progress)

    outputs = [figure, summary, tokens, status, png]
    show.click(run, [text, model, uploads, max_length], outputs, api_name="hsa_mask")
    example_a.click(lambda: EXAMPLE_MARKED, None, text).then(run, [text, model, uploads, max_length], outputs)
    example_b.click(lambda: EXAMPLE_SHAREGPT, None, text).then(run, [text, model, uploads, max_length], outputs)
