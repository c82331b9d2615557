"""Training throughput and peak memory on the default VLM: HSA on vs off, LoRA vs QLoRA (4-bit).

    python bench/train.py [--steps 12] [--batch-size 4] [--model PATH]

LoRA and QLoRA each train in their own process (peak memory is then the process's own: max RSS on
CPU; on a GPU torch.cuda.max_memory_allocated per step). Within a process HSA on and off alternate
step by step on the same model and pre-collated batches of the shapes task, and the median step
time is kept, so the HSA ratio compares like with like on a busy machine. The training step is the one workbench.train runs: forward with semantic_ids (HSA)
or without (SDPA), backward, AdamW on the trainable (LoRA) parameters.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUANTIZATIONS = {"lora": "none", "qlora": "4bit"}


def model_path(requested: str | None, scratch: Path) -> tuple[Path, str]:
    from workbench.train import DEFAULT_MODEL

    if requested:
        return Path(requested), "given"
    if (DEFAULT_MODEL / "config.json").exists():
        return DEFAULT_MODEL, "embedded default VLM"
    from models.zoo import build, processor as zoo_processor

    processor = zoo_processor.build_processor()
    model = build.new_model(processor, build.ModelSize())
    model.save_pretrained(scratch / "model")
    processor.save_pretrained(scratch / "model")
    return scratch / "model", "default VLM architecture, untrained (models/zoo/default_vlm not built yet)"


def measure(kind: str, model: str, data: str, steps: int, batch_size: int, warmup: int = 2) -> dict:
    """One quantization kind in this process; HSA on and off alternate step by step on the same
    model and batches (attn_implementation "hsa" without semantic_ids is exactly SDPA), so drift in
    the machine's load hits both alike."""
    import resource

    import torch

    from workbench.train import parse_config
    from models.vlm.processor import load_processor
    from workbench.train.run import Collator, load_model

    config = parse_config({"dataset": data, "base_model": model, "batch_size": batch_size, "max_steps": steps,
                           "quantization": QUANTIZATIONS[kind], "hsa": True})
    records = json.loads(Path(data).read_text())
    processor = load_processor(model)
    collate = Collator(processor, image_root=str(Path(data).parent), max_length=config.max_length, hsa=True)
    batches = [collate(records[i:i + batch_size]) for i in range(0, len(records) - batch_size + 1, batch_size)]
    net = load_model(config)
    net.train()
    device = next(p for p in net.parameters() if p.requires_grad).device
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step(batch, hsa: bool) -> tuple[float, int, float]:
        batch = {k: v.to(device) for k, v in batch.items() if hsa or k != "semantic_ids"}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        net(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        return time.perf_counter() - start, int(batch["attention_mask"].sum()), peak

    for i in range(warmup):
        step(batches[i % len(batches)], hsa=i % 2 == 0)
    times = {True: [], False: []}
    tokens = {True: [], False: []}
    peaks = {True: [], False: []}
    for i in range(steps):
        batch = batches[i % len(batches)]
        for hsa in ((True, False) if i % 2 == 0 else (False, True)):  # ABBA: neither always goes first
            t, n, peak = step(batch, hsa)
            times[hsa].append(t)
            tokens[hsa].append(n)
            peaks[hsa].append(peak)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    result = {"kind": kind, "device": device.type, "process_peak_rss_mb": process_peak}
    for hsa in (True, False):
        t = statistics.median(times[hsa])
        name = "hsa" if hsa else "sdpa"
        result[name] = {"samples_per_s": batch_size / t, "tokens_per_s": statistics.median(tokens[hsa]) / t,
                        "peak_mb": max(peaks[hsa]) if cuda else process_peak}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant in this process
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.model, args.data, args.steps, args.batch_size)))
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model, origin = model_path(args.model, scratch)
    from models.zoo import shapes

    data = shapes.export_sharegpt(shapes.generate(args.batch_size * 4, seed=0, noise=shapes.TRAIN_NOISE),
                                  scratch / "data", name="shapes")
    print(f"model: {model} ({origin})\nsteps per measurement: {args.steps} each for HSA on and off, "
          f"batch size {args.batch_size}\n")
    results = {}
    for kind in QUANTIZATIONS:
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--model", str(model), "--data", str(data),
                              "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
        results[kind] = json.loads(line[len("RESULT "):])

    device = results["lora"]["device"]
    memory = "peak MB (CUDA allocated)" if device == "cuda" else "peak MB (process RSS)"
    print(f"device: {device}")
    print(f"{'variant':<12} {'samples/s':>10} {'tokens/s':>10} {memory:>26}")
    for kind, r in results.items():
        for name in ("hsa", "sdpa"):
            m = r[name]
            print(f"{kind + '+' + name:<12} {m['samples_per_s']:>10.2f} {m['tokens_per_s']:>10.1f} {m['peak_mb']:>26.0f}")
    print()
    for kind, r in results.items():
        ratio = r["hsa"]["tokens_per_s"] / r["sdpa"]["tokens_per_s"]
        line = f"{kind}: HSA / SDPA throughput = {ratio:.3f} (HSA costs {100 * (1 - ratio):+.1f}%; target <= 10%)"
        if device == "cuda":
            line += f", peak memory ratio {r['hsa']['peak_mb'] / r['sdpa']['peak_mb']:.3f}"
        print(line)
    q, l = results["qlora"]["hsa"], results["lora"]["hsa"]
    print(f"QLoRA / LoRA (HSA on): throughput {q['tokens_per_s'] / l['tokens_per_s']:.3f}, "
          f"peak memory {q['peak_mb'] / l['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
