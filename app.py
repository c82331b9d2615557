"""The HSA Workbench: `python app.py` opens it on http://127.0.0.1:7860 with the embedded models."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# before torch is imported (OpenMP reads it once): waiting threads sleep instead of spinning, so the
# app and a run training beside it do not burn each other's cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--auth", metavar="USER:PASSWORD", action="append", default=[],
                        help="require a login; repeatable, one per person (each may annotate and review)")
    parser.add_argument("--users", type=Path, default=None, metavar="FILE",
                        help="require a login: users with hashed passwords and roles, written by "
                             "`python -m workbench.users add FILE NAME` (see README: Working as a team)")
    parser.add_argument("--workspace", type=Path, default=ROOT / "workspace",
                        help="where uploads, exports, runs and the database live")
    parser.add_argument("--db", default=None, metavar="PATH|URL",
                        help="annotation database: a file, sqlite:///PATH or postgresql://USER@HOST/DB (images then in "
                             "WORKSPACE/images unless the URL says ?image_dir=DIR; passwords in ~/.pgpass or $PGPASSWORD) "
                             "(default: WORKSPACE/workbench.db)")
    parser.add_argument("--max-upload-mb", type=float, default=64, metavar="MB",
                        help="largest file a browser may upload (default: 64)")
    parser.add_argument("--default-model", type=Path, default=None,
                        help="the model used when none is chosen (default: the embedded default VLM)")
    parser.add_argument("--allow-path", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder besides the workspace whose files forms may name (datasets, models) when "
                             "others can reach the server (--share, --auth, a --host that is not loopback); repeatable")
    args = parser.parse_args(argv)
    from workbench.users import Users, UsersError

    try:  # the logins, checked before anything starts: a typo in the file is said now, not at the first login
        users = Users.from_pairs(args.auth)
        if args.users is not None:
            from_file = Users.from_file(args.users)
            for name in from_file.names:
                if name in users:
                    raise UsersError(f"user {name!r} is in {args.users.name} and in --auth")
                users = users.with_user(from_file.get(name))
    except UsersError as error:
        parser.error(str(error))
    args.logins = users if len(users) else None
    if not args.max_upload_mb > 0:
        parser.error("--max-upload-mb takes a size in MB above 0")
    for folder in args.allow_path:
        if not folder.is_dir():
            parser.error(f"--allow-path {folder}: not a folder")
    return args


# The endpoints meant for scripts (README: "Scripting"); every other event handler is the page's own.
PUBLIC_API = ("chat", "hsa_mask", "attention")


def hide_page_endpoints(app) -> None:
    """Event handlers are private (not in the API page, not callable by clients) except PUBLIC_API."""
    for fn in app.fns.values():
        if fn.api_name not in PUBLIC_API:
            fn.api_visibility = "private"


def build_app(ctx):
    import gradio as gr

    from workbench.ui import annotate, attention, chat, evaluate, masks, team, train
    from workbench.web import UPLOAD_CLEANUP

    with gr.Blocks(title="HSA Workbench", delete_cache=UPLOAD_CLEANUP) as app:
        gr.Markdown("# HSA Workbench\nLabel conversation tokens as **global** / **landmark** / **noise**, "
                    "see the attention mask they make, train under it, and chat with the result.")
        with gr.Tabs() as tabs:
            with gr.Tab("Annotate", id="annotate"):
                annotate_tab = annotate.build(ctx, app)
            with gr.Tab("Masks & Attention", id="masks"):
                with gr.Tabs():
                    with gr.Tab("HSA mask", id="mask"):
                        masks.build(ctx)
                    with gr.Tab("Attention", id="attention"):
                        attention.build(ctx)
            with gr.Tab("Train", id="train"):
                train_tab = train.build(ctx)
            with gr.Tab("Chat", id="chat") as chat_tab_item:
                chat_tab = chat.build(ctx)
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate_tab = evaluate.build(ctx)
            with gr.Tab("Team", id="team"):
                team.build(ctx, app)
        # "Chat with this run" in the Train tab opens the run in the Chat tab.
        train_tab.chat_model.change(
            lambda label: (chat_tab.open_model(label), gr.Tabs(selected="chat")) if label else (gr.skip(), gr.skip()),
            train_tab.chat_model, [chat_tab.model, tabs])
        # a wrong answer's "open in Annotate" in the Evaluate tab opens its record there
        evaluate_tab.answers.eval_open_record(evaluate.open_in(annotate_tab.open_record, "annotate"), annotate_tab.model,
                                              [*annotate_tab.outputs, tabs])
        # runs that finished since the page was opened are offered as soon as the tab is shown
        chat_tab_item.select(chat_tab.refresh, None, chat_tab.pickers, show_progress="hidden")
    hide_page_endpoints(app)
    return app


def port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv=None) -> None:
    args = parse_args(argv)
    if port_taken(args.host, args.port):
        sys.exit(f"Port {args.port} on {args.host} is taken (another workbench?). Start with --port N, "
                 f"e.g. --port {args.port + 1}.")
    workspace = args.workspace.resolve()
    # Uploads land inside the workspace, not in a system-wide temp directory.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workspace / "tmp"))
    import torch

    from workbench.jobs.processes import thread_split
    from workbench.ui.context import AppContext
    from workbench.web import launch_options, sweep_uploads

    torch.set_num_threads(thread_split()[0])  # the rest of the cores are for runs

    from workbench.paths import reachable_by_others

    # reachable by others: forms name files in the workspace and the --allow-path folders only (workbench.paths)
    ctx = AppContext.create(workspace, db_path=args.db, default_model=args.default_model, allowed_paths=args.allow_path,
                            confined=reachable_by_others(args.host, share=args.share, auth=args.logins is not None),
                            users=args.logins)
    sweep_uploads(ctx.workspace / "tmp")  # uploads left by a server that was killed
    app = build_app(ctx)
    app.queue(default_concurrency_limit=4)
    # Gradio's own start lines speak of launch(share=True) and GRADIO_SERVER_PORT: ours speak of the options
    # served: images, exports and the example only; uploads limited, other sites refused, logins slowed
    app.launch(server_name=args.host, server_port=args.port, share=args.share, auth=args.logins.check if args.logins else None,
               quiet=True,
               show_error=True, footer_links=["api"], prevent_thread_lock=True,
               **launch_options(ctx, max_upload_mb=args.max_upload_mb, share_url=lambda: app.share_url))
    print(f"HSA Workbench on http://{args.host}:{args.port}" +
          (f" and {app.share_url}" if args.share and app.share_url else
           "" if args.share else " (--share also opens a public link; --host 0.0.0.0 serves the network)"),
          flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
