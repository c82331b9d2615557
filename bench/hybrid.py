"""Attention-only vs the hybrid vs a pruned hybrid on CPU, side by side in one run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/hybrid.py [--quick] [--threads 2] [--library]

Same width and depth for all three (hidden 256, 8 layers, 4 heads of 64 with 2 KV heads, MLP 512):
  attention  Qwen3 (full attention in every layer)
  hybrid     models.hybrid, "hybrid" in every layer (Mamba-2 + full attention, fused by the gate)
  pruned     the same hybrid after a typical plan: 1 hybrid layer with full attention, 2 hybrid_sliding
             (window 256), 5 Mamba-only ("linear_attention")
  pruned-lib (--library) the same pruned model with the mixer's CPU fast path off (HybridMixer.cpu_fast_path =
             False): FalconH1's own torch forward for prefill (its chunked scan: the code before ssd.py) and for
             the one-token step (a little slower than the old decode_step, which already had its own conv)
Measured: prefill time (256 / 1k / 4k tokens, batch 1), decode tokens/s after a 1k and a 4k prompt
(batch 1 and 8, greedy steps with the cache) and the cache's bytes after a 4k prompt. The models take
turns within each measurement (medians over rounds), because the CPU is shared with other work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import torch  # noqa: E402

from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from models.hybrid import HSAHybridConfig, HSAHybridForCausalLM, HybridMixer, prune_model  # noqa: E402

WIDTH = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192)
PRUNED = ["hybrid", "hybrid_sliding", "linear_attention", "linear_attention", "hybrid_sliding",
          "linear_attention", "linear_attention", "linear_attention"]


def build_models(library: bool = False) -> dict:
    torch.manual_seed(0)
    attention = Qwen3ForCausalLM(Qwen3Config(**WIDTH, head_dim=64))
    config = HSAHybridConfig(**WIDTH, mamba_d_ssm=512, mamba_n_heads=8, mamba_d_head="auto", mamba_d_state=64,
                             mamba_d_conv=4, sliding_window=256, gate_rank=16)
    torch.manual_seed(0)
    hybrid = HSAHybridForCausalLM(config)
    torch.manual_seed(0)
    pruned = prune_model(HSAHybridForCausalLM(HSAHybridConfig(**config.to_dict())), PRUNED)
    models = {"attention": attention, "hybrid": hybrid, "pruned": pruned}
    if library:
        torch.manual_seed(0)
        models["pruned-lib"] = prune_model(HSAHybridForCausalLM(HSAHybridConfig(**config.to_dict())), PRUNED)
        for module in models["pruned-lib"].modules():
            if isinstance(module, HybridMixer):
                module.cpu_fast_path = False
    for model in models.values():
        model.set_attn_implementation("sdpa")
        model.eval()
    return models


def prompt(batch, length, seed=0):
    return torch.randint(3, WIDTH["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill(model, ids):
    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1]


@torch.no_grad()
def time_prefill(model, ids) -> float:
    start = time.perf_counter()
    prefill(model, ids)
    return time.perf_counter() - start


@torch.no_grad()
def decode_rate(model, ids, steps) -> float:
    """Tokens/s (batch x steps / seconds) of greedy cached decoding after the prompt."""
    cache, logits = prefill(model, ids)
    token = logits.argmax(-1, keepdim=True)
    model(token, past_key_values=cache, use_cache=True)  # first step outside the timing (allocations)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
    return ids.shape[0] * steps / (time.perf_counter() - start)


def cache_bytes(model, ids) -> int:
    cache, _ = prefill(model, ids)
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            total += tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            total += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
    return total


def interleaved(models, measure, rounds):
    results = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            results[name].append(measure(model))
    return {name: statistics.median(values) for name, values in results.items()}


def row(label, values, unit):
    """One table row; the ratios divide the pruned model's value by the others' (for seconds and
    bytes below 1 is better, for tokens/s above 1)."""
    a, h, p = values["attention"], values["hybrid"], values["pruned"]
    ratios = f"pruned/hybrid {p / h:.2f}x, pruned/attention {p / a:.2f}x"
    cells = [a, h, p]
    if "pruned-lib" in values:
        lib = values["pruned-lib"]
        cells.append(lib)
        ratios += f", pruned-lib/attention {lib / a:.2f}x, pruned/pruned-lib {p / lib:.2f}x"
    print(f"| {label} | " + " | ".join(f"{v:{unit}}" for v in cells) + f" | {ratios} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer lengths, steps and rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--library", action="store_true",
                        help="add pruned-lib: the pruned model on FalconH1's own torch path (the code before ssd.py)")
    parser.add_argument("--lengths", type=int, nargs="*", help="prefill lengths (default 256 1024 4096)")
    parser.add_argument("--no-decode", action="store_true", help="prefill only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = build_models(args.library)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    print(f"threads {args.threads}; parameters: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in params.items()))
    lengths = args.lengths or ([256, 1024] if args.quick else [256, 1024, 4096])
    long = lengths[-1]
    rounds = 1 if args.quick else 3
    steps = 8 if args.quick else 32
    header = ["attention", "hybrid", "pruned"] + (["pruned-lib"] if args.library else [])
    print(f"| measure | {' | '.join(header)} | ratios |\n|---|{'---|' * len(header)}---|")
    for length in lengths:
        ids = prompt(1, length)
        prefill(models["pruned"], prompt(1, 64))  # warm-up
        row(f"prefill {length} tokens (s)", interleaved(models, lambda m: time_prefill(m, ids), rounds), ".3f")
    for length in ([] if args.no_decode else [1024, long] if long != 1024 else [1024]):
        for batch in (1, 8):
            ids = prompt(batch, length, seed=1)
            row(f"decode after {length}, batch {batch} (tokens/s)",
                interleaved(models, lambda m: decode_rate(m, ids, steps), rounds), ".1f")
    sizes = {n: cache_bytes(m, prompt(1, long)) / 2 ** 20 for n, m in models.items()}
    row(f"cache after {long} tokens, batch 1 (MiB)", sizes, ".2f")


if __name__ == "__main__":
    main()
