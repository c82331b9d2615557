"""Speed of one training step of the default-model build on this machine's CPU: HSA against plain
SDPA on clean batches (no NOISE: HSA's mask is the causal mask) and on noisy ones, what drawing
the batches costs, and what grouping each window of conversations by length saves against batching
them in drawing order (the same conversations). Steps alternate between the variants, on the same
fresh models and batches.

    .venv/bin/python bench/build_step.py [--steps 12] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.zoo import shapes
    from models.zoo.build import LENGTH_GROUPS, ModelSize, clean_stage, new_model, noisy_stage, training_batches
    from models.zoo.processor import build_processor
    from models.data.align import HSACollator

    processor = build_processor()
    collate = HSACollator(processor)
    size = ModelSize()
    n = -(-(args.steps + 2) // LENGTH_GROUPS) * LENGTH_GROUPS  # whole windows
    print(f"default-model build step on CPU ({torch.get_num_threads()} threads), batch 16, "
          f"median of {n - 2} (grouped / drawing order: sums over {n} batches, HSA)")
    print(f"{'batches':<8} {'draw s':>7} {'hsa s':>7} {'sdpa s':>7} {'hsa/sdpa':>9} "
          f"{'padding grouped / in order':>27} {'time grouped / in order':>24}")

    def step(model, batch) -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def padding(batches) -> float:
        return 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)

    for name, stage in (("clean", clean_stage()), ("noisy", noisy_stage())):
        batches = training_batches(processor, stage)
        start = time.perf_counter()
        grouped = [next(batches)[0] for _ in range(n)]
        draw = (time.perf_counter() - start) / n  # a mean: batches are drawn a window at a time
        samples = shapes.generate(n * stage.batch_size, seed=stage.seed, split=stage.data_split, noise=stage.noise)
        in_order = [collate([s.record for s in samples[k:k + stage.batch_size]])
                    for k in range(0, len(samples), stage.batch_size)]
        models = {attn: new_model(processor, size, hsa=attn == "hsa").train() for attn in ("hsa", "sdpa")}
        times = {attn: [] for attn in (*models, "in order")}
        for batch, ordered in zip(grouped, in_order):
            times["hsa"].append(step(models["hsa"], batch))
            times["sdpa"].append(step(models["sdpa"], {k: v for k, v in batch.items() if k != "semantic_ids"}))
            times["in order"].append(step(models["hsa"], ordered))
        hsa, sdpa = (statistics.median(times[attn][2:]) for attn in ("hsa", "sdpa"))
        paddings = f"{padding(grouped):.2f} / {padding(in_order):.2f}"
        ratio = sum(times["hsa"]) / sum(times["in order"])
        print(f"{name:<8} {draw:>7.3f} {hsa:>7.3f} {sdpa:>7.3f} {hsa / sdpa:>9.2f} {paddings:>27} {ratio:>24.2f}")


if __name__ == "__main__":
    main()
