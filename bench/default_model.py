"""Speed of the embedded default VLM on this machine's CPU: load time, time to first token and decode
tokens/s, with HSA attention (semantic_ids) and with plain SDPA, side by side in one run.

    .venv/bin/python bench/default_model.py [--model DIR] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "zoo" / "default_vlm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.vlm import GenerationSettings, load_vlm, stream_reply
    from models.vlm.generation import _generate, _generate_kwargs, prompt_inputs
    from models.zoo import shapes

    sample = shapes.generate(1, seed=0, split="bench", noise=shapes.TRAIN_NOISE, n_questions=(3, 3))[0]
    turns = sample.record["conversations"]
    record = {**sample.record, "conversations": turns[:-1]}  # up to the last question
    rows = []
    for attn in ("hsa", "sdpa"):
        loads = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model, processor = load_vlm(args.model, attn_implementation=attn, device="cpu")
            loads.append(time.perf_counter() - start)
        settings = GenerationSettings(mode="greedy", max_new_tokens=args.new_tokens)
        prompt_len = prompt_inputs(model, processor, record)["input_ids"].shape[1]
        first, rates = [], []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            next(iter(stream_reply(model, processor, record, settings=settings)))
            first.append(time.perf_counter() - start)
            inputs = prompt_inputs(model, processor, record)
            kwargs = {**_generate_kwargs(model, processor, settings), "min_new_tokens": args.new_tokens}
            start = time.perf_counter()
            with torch.no_grad():
                out = _generate(model, inputs, kwargs)
            elapsed = time.perf_counter() - start
            new = out.shape[1] - inputs["input_ids"].shape[1]
            rates.append(new / elapsed)
        first, rates = first[1:], rates[1:]  # the first call warms up
        rows.append((attn, statistics.median(loads), statistics.median(first), statistics.median(rates), prompt_len))
    print(f"default VLM {args.model.name} on CPU ({torch.get_num_threads()} threads), prompt with image, "
          f"median of {args.repeats}")
    print(f"{'attention':<10} {'load s':>8} {'first token ms':>15} {'decode tok/s':>13} {'prompt tokens':>14}")
    for attn, load, ttft, rate, prompt_len in rows:
        print(f"{attn:<10} {load:>8.3f} {ttft * 1000:>15.1f} {rate:>13.1f} {prompt_len:>14}")


if __name__ == "__main__":
    main()
