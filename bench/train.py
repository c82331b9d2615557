"""Training throughput on the default VLM: seconds per step split into data and compute, HSA on and
off, records aligned in the collator at every step (the path before issue 24) and aligned once
through the cache (`workbench.train.data`) cold and warm; optionally QLoRA (4-bit) beside LoRA.

    python bench/train.py [--steps 30] [--batch-size 4] [--threads 2] [--workers 0] [--kinds lora,qlora]

Each kind trains in its own process. Within it, one model takes every step: for each step, a batch is
drawn from each data path (a DataLoader over the records, as the Trainer draws them; the time to get it
is "data"), and the training step (forward with semantic_ids for HSA or without them, which is SDPA;
backward; AdamW on the LoRA parameters: "compute") runs with HSA on and off in ABBA order, so drift in
the machine's load hits every variant alike. Medians over the steps after two warm-up steps.
"Prepare" is the one-time cost before step 1: aligning every record and writing the cache (cold), or
reading it back (warm: a later epoch's, resume's or run's). "s/step in a run" spreads it over the run's
steps: (prepare + steps x (data + compute)) / steps. "free": the warm records in padding-free batches (one
row, no padding: what `workbench.train` uses on the CPU for this model), HSA on and off, in the same ABBA
rotation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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


def measure(kind: str, model: str, data: str, steps: int, batch_size: int, threads: int, workers: int,
            cache_dir: str, warmup: int = 2) -> dict:
    import resource

    import torch

    from models.vlm.processor import load_processor
    from workbench.train import data as train_data
    from workbench.train import parse_config
    from workbench.train.run import load_model, padding_free_positions

    torch.set_num_threads(threads)
    config = parse_config({"dataset": data, "base_model": model, "batch_size": batch_size, "max_steps": steps,
                           "quantization": QUANTIZATIONS[kind], "hsa": True})
    records = json.loads(Path(data).read_text())
    image_root = str(Path(data).parent)
    processor = load_processor(model)

    prepared = {}
    for path in ("cold", "warm"):  # the cache folder is new: the first prepare aligns, the second reads
        prepared[path] = train_data.prepare(records, processor, image_root=image_root, max_length=config.max_length,
                                            cache_dir=cache_dir)
    assert (prepared["cold"].source, prepared["warm"].source) == ("aligned", "cache"), \
        (prepared["cold"].source, prepared["warm"].source)

    def loader(dataset, collate):
        # the Trainer's loader: shuffled with a fixed seed (same order for every path), workers as configured
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                           num_workers=workers, persistent_workers=workers > 0, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    net = load_model(config)
    net.train()
    positions = padding_free_positions(net, config)
    sources = {
        "uncached": loader(records, train_data.uncached_collator(processor, image_root=image_root,
                                                                 max_length=config.max_length)),
        "cold": loader(train_data.AlignedRecords(prepared["cold"].items),
                       train_data.PadCollator(processor, image_root=image_root)),
        "warm": loader(train_data.AlignedRecords(prepared["warm"].items),
                       train_data.PadCollator(processor, image_root=image_root)),
    }
    if positions is not None:  # the same batches without padding (what a run on this machine uses)
        sources["free"] = loader(train_data.AlignedRecords(prepared["warm"].items),
                                 train_data.PadCollator(processor, image_root=image_root, positions=positions))
    paths = list(sources)
    iterators = {path: iter(source) for path, source in sources.items()}

    def next_batch(path):
        try:
            return next(iterators[path])
        except StopIteration:  # a new epoch
            iterators[path] = iter(sources[path])
            return next(iterators[path])

    device = next(p for p in net.parameters() if p.requires_grad).device
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step(batch, hsa: bool) -> float:
        batch = {k: v.to(device) for k, v in batch.items() if hsa or k != "semantic_ids"}
        start = time.perf_counter()
        net(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    data_times = {path: [] for path in paths}
    shapes = [p for p in ("warm", "free") if p in sources]  # padded batches, and padding-free ones where they apply
    compute = {(shape, hsa): [] for shape in shapes for hsa in (True, False)}
    for i in range(warmup + steps):
        batches = {}
        for path in paths:
            start = time.perf_counter()
            batches[path] = next_batch(path)
            if i >= warmup:
                data_times[path].append(time.perf_counter() - start)
        if i == 0:  # every path gives the same batches
            for path in ("cold", "warm"):
                assert all(torch.equal(batches[path][k], batches["uncached"][k]) for k in batches["uncached"])
        variants = [(shape, hsa) for shape in shapes for hsa in (True, False)]
        for shape, hsa in (variants if i % 2 == 0 else variants[::-1]):  # ABBA: none always goes first
            t = step(batches[shape], hsa)
            if i >= warmup:
                compute[shape, hsa].append(t)
    median = statistics.median
    return {"kind": kind, "device": device.type, "threads": torch.get_num_threads(), "workers": workers,
            "records": len(records), "steps": steps,
            "prepare_s": {"uncached": 0.0, "cold": prepared["cold"].seconds, "warm": prepared["warm"].seconds,
                          "free": prepared["warm"].seconds},
            "data_s": {path: median(data_times[path]) for path in paths},
            "compute_s": {f"{'hsa' if hsa else 'sdpa'}{'' if shape == 'warm' else ' free'}": median(times)
                          for (shape, hsa), times in compute.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def report(r: dict) -> None:
    steps = r["steps"]
    print(f"{r['kind']}: {r['records']} records, batch {args_batch}, {r['threads']} threads, {r['workers']} data "
          f"workers, {steps} steps measured, device {r['device']}, peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"{'data path':<10} {'attention':<9} {'prepare s':>10} {'data s/step':>12} {'compute s/step':>15} "
          f"{'s/step':>8} {'s/step in a run':>16}")
    for path in r["data_s"]:
        for name in ("hsa", "sdpa"):
            data, prep = r["data_s"][path], r["prepare_s"][path]
            comp = r["compute_s"][f"{name} free" if path == "free" else name]
            print(f"{path:<10} {name:<9} {prep:>10.3f} {data:>12.4f} {comp:>15.4f} {data + comp:>8.4f} "
                  f"{(prep + steps * (data + comp)) / steps:>16.4f}")
    warm = {name: r["data_s"]["warm"] + r["compute_s"][name] for name in ("hsa", "sdpa")}
    before = {name: r["data_s"]["uncached"] + r["compute_s"][name] for name in ("hsa", "sdpa")}
    print(f"HSA on / off, s/step: {warm['hsa'] / warm['sdpa']:.3f} (cached data), "
          f"{before['hsa'] / before['sdpa']:.3f} (aligned in the collator); "
          f"HSA on, uncached / cached s/step: {before['hsa'] / warm['hsa']:.3f}")
    if "free" in r["data_s"]:
        free = {name: r["data_s"]["free"] + r["compute_s"][f"{name} free"] for name in ("hsa", "sdpa")}
        print(f"padding-free batches: HSA on / off s/step {free['hsa'] / free['sdpa']:.3f}; padded / padding-free "
              f"s/step, HSA on {warm['hsa'] / free['hsa']:.3f}, HSA off {warm['sdpa'] / free['sdpa']:.3f}")
    print()


args_batch = 0


def main() -> None:
    global args_batch
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--records", type=int, default=120, help="conversations in the dataset (default 120)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (the CPU default is 0)")
    parser.add_argument("--kinds", default="lora", help="lora, qlora or lora,qlora")
    parser.add_argument("--model", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one kind in this process
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args_batch = args.batch_size

    if args.one:
        result = measure(args.one, args.model, args.data, args.steps, args.batch_size, args.threads, args.workers,
                         args.cache)
        print("RESULT " + json.dumps(result))
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model, origin = model_path(args.model, scratch)
    from models.zoo import shapes

    data = shapes.export_sharegpt(shapes.generate(args.records, seed=0, noise=shapes.TRAIN_NOISE),
                                  scratch / "data", name="shapes")
    load = os.getloadavg()
    print(f"model: {model} ({origin})\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} cores\n")
    for kind in args.kinds.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--model", str(model), "--data", str(data),
                              "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                              "--threads", str(args.threads), "--workers", str(args.workers),
                              "--cache", str(scratch / f"cache-{kind}")],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
        report(json.loads(line[len("RESULT "):]))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
