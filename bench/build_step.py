"""Speed of one training step of the default-model build on this machine's CPU: HSA against plain
SDPA on clean batches (no NOISE: HSA's mask is the causal mask) and on noisy ones, and what drawing
the batches costs. Steps alternate between the variants, on the same fresh model and batches.

    .venv/bin/python bench/build_step.py [--steps 12] [--threads N]
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
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.zoo.build import ModelSize, clean_stage, new_model, noisy_stage, training_batches
    from models.zoo.processor import build_processor

    processor = build_processor()
    size = ModelSize()
    print(f"default-model build step on CPU ({torch.get_num_threads()} threads), batch 16, "
          f"median of {args.steps}")
    print(f"{'batches':<8} {'draw s':>7} {'hsa s':>7} {'sdpa s':>7} {'hsa/sdpa':>9}")
    for name, stage in (("clean", clean_stage()), ("noisy", noisy_stage())):
        batches, draws, drawn = training_batches(processor, stage), [], []
        for _ in range(args.steps + 2):
            start = time.perf_counter()
            drawn.append(next(batches)[0])
            draws.append(time.perf_counter() - start)
        models = {attn: new_model(processor, size, hsa=attn == "hsa").train() for attn in ("hsa", "sdpa")}
        times = {attn: [] for attn in models}
        for batch in drawn:
            for attn, model in models.items():
                inputs = dict(batch) if attn == "hsa" else {k: v for k, v in batch.items() if k != "semantic_ids"}
                start = time.perf_counter()
                model(**inputs).loss.backward()
                model.zero_grad(set_to_none=True)
                times[attn].append(time.perf_counter() - start)
        hsa, sdpa = (statistics.median(times[attn][2:]) for attn in ("hsa", "sdpa"))
        print(f"{name:<8} {statistics.median(draws[2:]):>7.3f} {hsa:>7.3f} {sdpa:>7.3f} {hsa / sdpa:>9.2f}")


if __name__ == "__main__":
    main()
