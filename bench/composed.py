"""The embedded composed VLM (tiny vision encoder + projector + Qwen3, as Llava) against the embedded
default Qwen2-VL on this machine's CPU: time to first token and decode tokens/s with HSA, the two
models measured in alternation in one run so that the machine's drift hits both alike.

    .venv/bin/python bench/composed.py [--repeats 7] [--new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no busy-waiting threads on a shared CPU

import argparse  # noqa: E402
import statistics  # noqa: E402


from default_model import bench_record, first_token_and_decode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from models.vlm import load_vlm
    from models.vlm.generation import prompt_inputs
    from models.zoo import EMBEDDED

    record = bench_record()
    names = ("default", "composed")
    loaded = {name: load_vlm(EMBEDDED[name], attn_implementation="hsa", device="cpu") for name in names}
    results = {name: [] for name in names}
    for round_ in range(args.repeats + 1):
        for name in names:  # alternate, so slow moments of the machine fall on both
            measured = first_token_and_decode(*loaded[name], record, args.new_tokens)
            if round_:  # round 0 warms up
                results[name].append(measured)
    print(f"CPU, {args.threads} threads, HSA attention, a shapes conversation with one image and NOISE, "
          f"{args.new_tokens} new tokens, median of {args.repeats} alternating rounds")
    print(f"{'model':<10} {'parameters':>11} {'prompt tokens':>14} {'first token ms':>15} {'decode tok/s':>13}")
    medians = {}
    for name in names:
        model, processor = loaded[name]
        first = statistics.median(m[0] for m in results[name])
        rate = statistics.median(m[1] for m in results[name])
        medians[name] = (first, rate)
        prompt = prompt_inputs(model, processor, record)["input_ids"].shape[1]
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<10} {params:>11,} {prompt:>14} {first * 1000:>15.1f} {rate:>13.1f}")
    (f0, r0), (f1, r1) = medians["default"], medians["composed"]
    print(f"composed / default: first token x{f1 / f0:.2f}, decode tokens/s x{r1 / r0:.2f}")


if __name__ == "__main__":
    main()
