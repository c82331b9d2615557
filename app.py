"""The HSA Workbench: `python app.py` opens it on http://127.0.0.1:7860 with the embedded models."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--workspace", type=Path, default=ROOT / "workspace",
                        help="where uploads, exports, runs and the database live")
    parser.add_argument("--db", type=Path, default=None, help="annotation database (default: WORKSPACE/workbench.db)")
    parser.add_argument("--default-model", type=Path, default=None,
                        help="the model used when none is chosen (default: the embedded default VLM)")
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth takes USER:PASSWORD")
    return args


def build_app(ctx):
    import gradio as gr

    from workbench.ui import annotate, attention, chat, masks, train

    with gr.Blocks(title="HSA Workbench") as app:
        gr.Markdown("# HSA Workbench\nLabel conversation tokens as **global** / **landmark** / **noise**, "
                    "see the attention mask they make, train under it, and chat with the result.")
        with gr.Tabs() as tabs:
            with gr.Tab("Annotate", id="annotate"):
                annotate.build(ctx)
            with gr.Tab("Masks & Attention", id="masks"):
                with gr.Tabs():
                    with gr.Tab("HSA mask", id="mask"):
                        masks.build(ctx)
                    with gr.Tab("Attention", id="attention"):
                        attention.build(ctx)
            with gr.Tab("Train", id="train"):
                train_tab = train.build(ctx)
            with gr.Tab("Chat", id="chat"):
                chat_model, open_in_chat = chat.build(ctx)
        # "Chat with this run" in the Train tab opens the run in the Chat tab.
        train_tab.chat_model.change(
            lambda label: (open_in_chat(label), gr.Tabs(selected="chat")) if label else (gr.skip(), gr.skip()),
            train_tab.chat_model, [chat_model, tabs])
    return app


def main(argv=None) -> None:
    args = parse_args(argv)
    workspace = args.workspace.resolve()
    # Uploads land inside the workspace, not in a system-wide temp directory.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workspace / "tmp"))
    sys.path.insert(0, str(ROOT))
    from workbench.ui.context import AppContext

    ctx = AppContext.create(workspace, db_path=args.db, default_model=args.default_model)
    app = build_app(ctx)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    app.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        allowed_paths=[str(ctx.workspace)], show_error=True, footer_links=["api"])


if __name__ == "__main__":
    main()
