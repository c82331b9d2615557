"""What one attention map costs: `workbench.attention.compute_attention` (the AttentionProbe keeps one
layer's map, HSA off and on, plus the per-layer mass) against asking every layer for its weights
(`output_attentions=True`, HSA off and on), on the default VLM, side by side in one run.

  probe        compute_attention(layer=last, mean over heads): two forward passes with the probe,
               which also measures every layer's mass on noise and image keys (the first map of a
               conversation)
  next         the same with mass_from=(the first result): the masses are reused, so each pass stops
               at the chosen layer (what moving the layer or head slider costs; the last layer: the worst case)
  all layers   the same two forward passes with output_attentions=True (what the map would cost without it)
  forward      the two forward passes alone (no map): the floor

Each (variant, length) runs in a fresh process so that peak memory (max RSS) is its own. The input is
a shapes conversation (one image, noise turns) grown with more turns to the length and cut there.
Without the trained default model (models/zoo/default_vlm) a randomly initialised Qwen2-VL of the
same shape stands in: the cost does not depend on the weights.

    .venv/bin/python bench/attention.py [--model DIR] [--lengths 512 1024 2048] [--rounds 2] [--repeats 2]
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
from models.zoo import DEFAULT_VLM_DIR as DEFAULT_MODEL  # noqa: E402
VARIANTS = {"probe": "probe: first map", "next": "probe: next map", "all": "output_attentions",
            "forward": "forward only"}


def load(model_dir: Path):
    if model_dir.exists():
        from workbench.attention import load_model

        return (*load_model(model_dir), str(model_dir))
    from models.zoo.build import ModelSize, new_model
    from models.zoo.processor import build_processor

    processor = build_processor()
    return new_model(processor, ModelSize(), seed=0, hsa=True).eval(), processor, "random Qwen2-VL, default shape"


def long_record(length: int) -> dict:
    """A shapes conversation with its image, grown with turns of other conversations to a little
    past `length` tokens (the caller cuts it with max_length)."""
    from models.zoo import shapes

    samples = iter(shapes.generate(1 + length // 8, seed=0, split="bench", noise=shapes.TRAIN_NOISE,
                                   n_questions=(3, 4)))
    record = dict(next(samples).record)
    turns = list(record["conversations"])
    while sum(len(t["value"]) + 8 for t in turns) < 3 * length:  # about 2 characters a token here
        turns += [dict(t, value=t["value"].replace("<image>", "")) for t in next(samples).record["conversations"]]
    record["conversations"] = turns
    return record


def run_one(variant: str, length: int, repeats: int, model_dir: Path) -> dict:
    import torch

    from workbench.attention import compute_attention, prepare_conversation

    model, processor, name = load(model_dir)
    # aligning the conversation is the same for every variant; it is done once, outside the timing
    prepared = prepare_conversation(long_record(length), processor, model=model, max_length=length)
    if len(prepared.aligned) < length:
        raise SystemExit(f"the conversation has only {len(prepared.aligned)} tokens")
    layer = model.config.get_text_config().num_hidden_layers - 1
    batch, roles = prepared.batch, prepared.roles

    first = compute_attention(model, processor, prepared, layer=layer) if variant == "next" else None

    def step():
        if variant in ("probe", "next"):
            compute_attention(model, processor, prepared, layer=layer, mass_from=first)
            return
        with torch.no_grad():
            for extra in ({}, {"semantic_ids": roles}):
                if variant == "all":
                    out = model(**batch, **extra, output_attentions=True, logits_to_keep=1)
                    _ = out.attentions[layer][0].mean(0)  # the map the tab would show
                else:
                    model(**batch, **extra, logits_to_keep=1)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "length": len(prepared.aligned), "seconds": min(times), "model": name,
            "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - base_rss) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2, help="timed maps per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per (variant, length)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats, args.model)))
        return
    import torch

    results = {}
    # rounds interleave the variants, so that the load of a shared machine falls on all of them alike
    for round_ in range(args.rounds):
        for length in args.lengths:
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--one", variant, str(length), "--repeats",
                                      str(args.repeats), "--model", str(args.model)],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    raise SystemExit(f"{variant} at {length} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                best = results.setdefault((variant, length), r)
                for key in ("seconds", "peak_rss_mb", "rss_growth_mb"):
                    best[key] = min(best[key], r[key])
    model = results[next(iter(results))]["model"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {model}; one map = HSA off + on, "
          f"last layer, mean over heads; best of {args.rounds} processes x {args.repeats} maps; "
          "RSS growth = peak RSS above the loaded model (not shown for 'next map': its first map set the peak)")
    header = (f"{'length':>6} | {'variant':<18} | {'time s':>7} | {'x probe':>7} | {'peak RSS MB':>11} | "
              f"{'RSS growth MB':>13} | {'x probe':>7}")
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        probe = results["probe", length]
        for variant, name in VARIANTS.items():
            r = results[variant, length]
            growth = r["rss_growth_mb"] / probe["rss_growth_mb"] if probe["rss_growth_mb"] > 0 else float("nan")
            memory = (f"{'—':>11} | {'—':>13} | {'—':>7}" if variant == "next" else
                      f"{r['peak_rss_mb']:>11.0f} | {r['rss_growth_mb']:>13.0f} | {growth:>7.2f}")
            print(f"{r['length']:>6} | {name:<18} | {r['seconds']:>7.3f} | {r['seconds'] / probe['seconds']:>7.2f} | "
                  f"{memory}")


if __name__ == "__main__":
    main()
