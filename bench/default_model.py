"""Speed of the embedded default VLM on this machine's CPU: load time, time to first token and decode
tokens/s, with HSA attention (semantic_ids) and with plain SDPA, side by side in one run.

    .venv/bin/python bench/default_model.py [--model DIR] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from models.zoo import DEFAULT_VLM_DIR  # noqa: E402


def bench_record(n_questions: int = 3) -> dict:
    """A shapes conversation with an image and NOISE, up to its last question."""
    from models.zoo import shapes

    sample = shapes.generate(1, seed=0, split="bench", noise=shapes.TRAIN_NOISE,
                             n_questions=(n_questions, n_questions))[0]
    return {**sample.record, "conversations": sample.record["conversations"][:-1]}


def first_token_and_decode(model, processor, record, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first streamed token, decode tokens/s over `new_tokens` forced tokens) of one reply."""
    import torch

    from models.vlm import GenerationSettings, stream_reply
    from models.vlm.generation import _generate, _generate_kwargs, prompt_inputs

    settings = GenerationSettings(mode="greedy", max_new_tokens=new_tokens)
    start = time.perf_counter()
    next(iter(stream_reply(model, processor, record, settings=settings)))
    first = time.perf_counter() - start
    inputs = prompt_inputs(model, processor, record)
    kwargs = {**_generate_kwargs(model, processor, settings), "min_new_tokens": new_tokens}
    start = time.perf_counter()
    with torch.no_grad():
        out = _generate(model, inputs, kwargs)
    elapsed = time.perf_counter() - start
    return first, (out.shape[1] - inputs["input_ids"].shape[1]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_VLM_DIR)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.vlm import load_vlm
    from models.vlm.generation import prompt_inputs

    record = bench_record()
    rows = []
    for attn in ("hsa", "sdpa"):
        loads = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model, processor = load_vlm(args.model, attn_implementation=attn, device="cpu")
            loads.append(time.perf_counter() - start)
        prompt_len = prompt_inputs(model, processor, record)["input_ids"].shape[1]
        measured = [first_token_and_decode(model, processor, record, args.new_tokens)
                    for _ in range(args.repeats + 1)][1:]  # the first call warms up
        first, rates = zip(*measured)
        rows.append((attn, statistics.median(loads), statistics.median(first), statistics.median(rates), prompt_len))
    print(f"default VLM {args.model.name} on CPU ({torch.get_num_threads()} threads), prompt with image, "
          f"median of {args.repeats}")
    print(f"{'attention':<10} {'load s':>8} {'first token ms':>15} {'decode tok/s':>13} {'prompt tokens':>14}")
    for attn, load, ttft, rate, prompt_len in rows:
        print(f"{attn:<10} {load:>8.3f} {ttft * 1000:>15.1f} {rate:>13.1f} {prompt_len:>14}")


if __name__ == "__main__":
    main()
