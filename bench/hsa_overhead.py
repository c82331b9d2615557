"""What HSA costs: forward + backward of a small decoder on CPU, side by side in one run.

  (a) plain SDPA, causal                       attn_implementation="sdpa"
  (b) HSA as built here                        attn_implementation="hsa" + semantic_ids (a boolean mask)
  (c) the first published approach             an additive float bias [B,1,L,L] recomputed and added in
                                               every layer (hsa_bias + the causal mask), then SDPA

Each (variant, length) runs in a fresh process so that peak memory (max RSS above the loaded model)
is its own. Prints time and memory, and both as ratios against (a).

    python bench/hsa_overhead.py [--lengths 512 1024 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import resource
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


def run_one(variant: str, length: int, repeats: int) -> dict:
    import torch
    from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import models.hsa  # noqa: F401  registers "hsa"

    AttentionInterface.register("hsa_bias_per_layer", additive_bias_attention)
    AttentionMaskInterface.register("hsa_bias_per_layer", sdpa_mask)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config)
    model.set_attn_implementation({"a": "sdpa", "b": "hsa", "c": "hsa_bias_per_layer"}[variant])
    model.train()
    ids = torch.randint(0, 2048, (1, length))
    roles = torch.randint(0, 3, (1, length))
    kwargs = {} if variant == "a" else {"semantic_ids": roles}

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()

    step()  # warm-up
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "length": length, "seconds": min(times),
            "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - base_rss) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward+backward, batch 1, "
          f"Qwen2 decoder 4 layers x 256, best of {args.repeats}")
    results = {}
    for length in args.lengths:
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--one", variant, str(length),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, cwd=ROOT,
                                 check=True)
            results[variant, length] = json.loads(out.stdout.strip().splitlines()[-1])
    header = f"{'length':>6} | {'variant':<22} | {'time s':>7} | {'x (a)':>6} | {'peak RSS MB':>11} | {'x (a)':>6}"
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        base = results["a", length]
        for variant, name in VARIANTS.items():
            r = results[variant, length]
            print(f"{length:>6} | {name:<22} | {r['seconds']:>7.3f} | {r['seconds'] / base['seconds']:>6.2f} | "
                  f"{r['peak_rss_mb']:>11.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:>6.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
