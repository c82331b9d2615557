"""The Chat tab's overhead: time to first token and tokens/s through the running workbench (its
/chat endpoint, streamed over Gradio's queue as a browser gets it) vs `stream_reply` called
directly on the same model and prompt, side by side in one run.

    python bench/chat.py [--model PATH] [--new-tokens 48] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from models.zoo import DEFAULT_VLM_DIR  # noqa: E402
QUESTION = "Describe the picture."  # the longest answers the default model gives


def shapes_image(path: Path) -> Path:
    import random

    from models.zoo import shapes

    shapes.draw_scene(shapes.random_scene(random.Random(3))).save(path)
    return path


def measure(pieces, count_tokens) -> tuple[float, float, int]:
    """(seconds to the first text, tokens per second over the whole reply, tokens). `pieces`
    yields the growing reply; tokens are counted on the final text. Whole-reply throughput, since
    the tab batches stream updates and a per-update rate would mean nothing."""
    start = time.perf_counter()
    first, text = None, ""
    for piece in pieces:
        text = piece
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    tokens = count_tokens(text)
    return first - start, tokens / (end - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(DEFAULT_VLM_DIR))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from gradio_client import Client, handle_file

    from models.vlm import GenerationSettings, load_vlm, stream_reply

    workspace = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    image = shapes_image(workspace / "shapes.png")
    settings = GenerationSettings(mode="greedy", max_new_tokens=args.new_tokens)
    model, processor = load_vlm(args.model)
    record = {"conversations": [{"from": "human", "value": "<image>" + QUESTION}], "images": [str(image)]}

    tokenizer = getattr(processor, "tokenizer", processor)

    def count_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def direct():
        text = ""
        for piece in stream_reply(model, processor, record, settings=settings):
            text += piece
            yield text

    port = 7990
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace",
                               str(workspace), "--default-model", args.model], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        message = {"text": QUESTION, "files": [handle_file(str(image))]}

        def through_tab():
            job = client.submit(message, [], "default", {"max_new_tokens": args.new_tokens}, api_name="/chat")
            seen = 0
            for text in job:
                if len(text) > seen:  # each update carries the growing reply
                    seen = len(text)
                    yield text

        measure(direct(), count_tokens), measure(through_tab(), count_tokens)  # warm both paths
        rows = {"direct": [], "tab": []}
        for _ in range(args.repeats):  # interleaved so that machine noise hits both alike
            rows["direct"].append(measure(direct(), count_tokens))
            rows["tab"].append(measure(through_tab(), count_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}; "
          f"greedy, {args.new_tokens} new tokens max; median of {args.repeats}")
    print(f"{'path':<28} | {'first token s':>13} | {'tokens/s':>9} | {'tokens':>7}")
    medians = {}
    for name, label in (("direct", "stream_reply (direct)"), ("tab", "workbench /chat (streamed)")):
        ttft = statistics.median(r[0] for r in rows[name])
        rate = statistics.median(r[1] for r in rows[name])
        medians[name] = (ttft, rate)
        print(f"{label:<28} | {ttft:>13.3f} | {rate:>9.1f} | {rows[name][-1][2]:>7}")
    print(f"overhead: first token x{medians['tab'][0] / medians['direct'][0]:.2f}, "
          f"throughput x{medians['tab'][1] / medians['direct'][1]:.2f} (tab / direct)")


if __name__ == "__main__":
    main()
