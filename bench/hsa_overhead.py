"""What HSA costs: forward + backward of a small decoder on CPU, side by side in one run.

  (a) plain SDPA, causal                       attn_implementation="sdpa"
  (b) HSA as built here                        attn_implementation="hsa" + semantic_ids (a boolean mask)
  (c) the first published approach             an additive float bias [B,1,L,L] recomputed and added in
                                               every layer (hsa_bias + the causal mask), then SDPA

Times are measured with the three variants interleaved step by step in one process, so that the
noise of a shared machine hits all of them alike; peak memory (max RSS, and its growth above the
loaded model) comes from a fresh process per variant. Prints both, and ratios against (a).

    python bench/hsa_overhead.py [--lengths 512 1024 2048] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"a": "sdpa (causal)", "b": "hsa (this project)", "c": "float bias per layer"}


def additive_bias_attention(module, query, key, value, attention_mask, semantic_ids=None, **kwargs):
    """(c): the original formulation, rebuilt in every layer as a float L x L bias."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from models.hsa import hsa_bias

    length = query.shape[2]
    causal = torch.full((length, length), torch.finfo(query.dtype).min, dtype=query.dtype).triu(1)
    bias = hsa_bias(semantic_ids, dtype=query.dtype) + causal
    bias = bias.clamp(min=torch.finfo(query.dtype).min)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, bias, is_causal=False, **kwargs)


IMPLEMENTATIONS = {"a": "sdpa", "b": "hsa", "c": "hsa_bias_per_layer"}


def make_model(length: int):
    import torch
    from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import models.hsa  # noqa: F401  registers "hsa"

    AttentionInterface.register("hsa_bias_per_layer", additive_bias_attention)
    AttentionMaskInterface.register("hsa_bias_per_layer", sdpa_mask)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).train()
    ids = torch.randint(0, 2048, (1, length))
    roles = torch.randint(0, 3, (1, length))

    def step(variant):
        model.set_attn_implementation(IMPLEMENTATIONS[variant])
        model.zero_grad(set_to_none=True)
        kwargs = {} if variant == "a" else {"semantic_ids": roles}
        model(ids, labels=ids, **kwargs).loss.backward()

    return step


def time_all(length: int, repeats: int) -> dict:
    """Times of all variants, interleaved step by step in one process (noise hits all alike)."""
    step = make_model(length)
    for variant in VARIANTS:
        step(variant)  # warm-up
    times = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            step(variant)
            times[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(t) for variant, t in times.items()}


def peak_memory(variant: str, length: int) -> dict:
    """Peak RSS of one variant alone in this (fresh) process, above the loaded model."""
    import psutil

    step = make_model(length)
    base = psutil.Process().memory_info().rss / 1024  # KiB, like ru_maxrss on Linux
    step(variant)
    step(variant)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": peak / 1024, "growth_mb": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--memory", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(peak_memory(args.memory[0], int(args.memory[1]))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, batch 1, "
          f"Qwen2 decoder 4 layers x 256; time: median of {args.repeats}, variants interleaved; "
          f"memory: peak RSS of a fresh process per variant")
    header = (f"{'length':>6} | {'variant':<22} | {'time s':>7} | {'x (a)':>6} | {'peak RSS MB':>11} | "
              f"{'growth MB':>9} | {'x (a)':>6}")
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        times = time_all(length, args.repeats)
        memory = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--memory", variant, str(length)], capture_output=True,
                                 text=True, cwd=ROOT, check=True)
            memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        for variant, name in VARIANTS.items():
            m = memory[variant]
            print(f"{length:>6} | {name:<22} | {times[variant]:>7.3f} | {times[variant] / times['a']:>6.2f} | "
                  f"{m['peak_rss_mb']:>11.0f} | {m['growth_mb']:>9.0f} | "
                  f"{m['growth_mb'] / max(memory['a']['growth_mb'], 1e-9):>6.2f}")


if __name__ == "__main__":
    main()
