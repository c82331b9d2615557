"""The same LoRA run through `workbench.train` (HSA on and off) and through LLaMA-Factory, side by side.

    python bench/train_vs_llamafactory.py --lf-python /tmp/lf523/bin/python [--rounds 3] [--steps 30]

LLaMA-Factory runs in its own venv (`--lf-python`), which must not bring its own torch: the one used here
was made with `python -m venv /tmp/lf523`, a .pth file pointing at this project's site-packages (its torch
2.13+cpu and transformers 5.23), and `pip install --no-deps llamafactory==0.9.5 peft==0.18.1 trl==0.24.0
datasets==4.0.0 accelerate==1.11.0 "tyro<0.9" fire omegaconf ...` (what it asks for; run with
DISABLE_VERSION_CHECK=1, as its pins say transformers <= 5.6). The same venv with LLaMA-Factory's own
transformers 5.6.0 (tokenizers 0.22.2, huggingface-hub 1.x) also trains, but its forward/backward took 1.5x
as long on this model, so it would measure transformers, not LLaMA-Factory. torchaudio, which has no build
for this torch, is an empty stub module (LLaMA-Factory imports it at the top of mm_plugin.py and uses it
for audio only).

Both sides: the default VLM with its config's dtype set to float32 (the committed config says bfloat16,
which LLaMA-Factory would train in), 120 shapes conversations with NOISE turns, LoRA r 16 / alpha 32 on
q/k/v/o/gate/up/down, lr 2e-4 cosine, batch 4, `--steps` steps, seed 42, no checkpoints, 2 torch threads,
no data workers, no gradient checkpointing (LLaMA-Factory turns it on unless told: 1.5x its compute here),
OMP_WAIT_POLICY=PASSIVE. LLaMA-Factory gets the workbench's own processor (Qwen2-VL's
PIL image processor with images made the fixed square the model knows; its video part, which needs
torchvision, stands in by the image processor, as LLaMA-Factory requires one to exist). Per step, a
Trainer callback times "data" (end of a step to the start of the next: fetching and collating the
batch) and "compute" (forward, backward, optimizer), in wall time and in the process's CPU time (all its
threads: what a shared machine's other work inflates least). Rounds interleave the three variants; the
workbench's first round aligns into a new cache (cold), later rounds read it (warm). Medians over steps
6..end; ratios of the medians over rounds, and the median of each round's own ratio (paired).

What still differs between the two sides, as each does it by default: LLaMA-Factory pads a batch to a
multiple of 8 tokens (the workbench to its longest record) and computes Qwen2-VL's rotary position ids in its
collator (the workbench's model computes them in its forward: data time there, compute time here); it trains
on the newline after each `<|im_end|>` (more labelled tokens, the same compute); its venv has peft 0.18.1 and
accelerate 1.11 (the workbench's 0.21.2 and 1.15; LoRA's Linear.forward is the same code in both). Both use
transformers' default optimizer, adamw_torch_fused. The workbench computes a batch without padding (padding-free:
its records one after another in one row, attention within each; the same loss and gradients, see
tests/test_train_padding_free.py, except that LoRA dropout draws its random masks for the row's shape); a fourth variant, "HSA on, padded", is the workbench with padded batches. The workbench keeps the image processor's output with the
aligned records (small image sets, as here: workbench.train.data.PIXEL_BUDGET); LLaMA-Factory processes a
batch's images in its collator at every step.
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
LORA = dict(r=16, alpha=32, dropout=0.05, target=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])


def timer_class(base):
    """A TrainerCallback (of the caller's transformers) that times data and compute per step."""
    class Timer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start, self.begin, self.end = time.perf_counter(), None, None
            self.data, self.compute, self.first = [], [], None
            self.data_cpu, self.compute_cpu = [], []  # CPU seconds of the process (all its threads)

        def on_step_begin(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            if self.end is not None:
                self.data.append(now - self.end[0])
                self.data_cpu.append(cpu - self.end[1])
            self.begin = (now, cpu)
            return super().on_step_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            self.compute.append(now - self.begin[0])
            self.compute_cpu.append(cpu - self.begin[1])
            self.end = (now, cpu)
            if self.first is None:
                self.first = now - T0
            return super().on_step_end(args, state, control, **kwargs)

        def result(self) -> dict:
            import resource

            return {"data": self.data, "compute": self.compute, "data_cpu": self.data_cpu,
                    "compute_cpu": self.compute_cpu, "first_step_s": self.first,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return Timer


T0 = time.perf_counter()


def data_s(result: dict, clock: str = "wall") -> float:
    """Median data time before steps 6..end (the first entry is the time before step 2)."""
    return statistics.median(result["data" if clock == "wall" else "data_cpu"][4:])


def compute_s(result: dict, clock: str = "wall") -> float:
    """Median compute time of steps 6..end."""
    return statistics.median(result["compute" if clock == "wall" else "compute_cpu"][5:])


def per_step(result: dict, clock: str = "wall") -> float:
    return data_s(result, clock) + compute_s(result, clock)


def run_workbench(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    from workbench.train import parse_config
    from workbench.train import run

    timer = {}

    class TimedMetrics(timer_class(run.MetricsCallback)):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            timer["it"] = self

    run.MetricsCallback = TimedMetrics
    config = parse_config({"dataset": str(Path(args.data) / "shapes.json"), "base_model": args.model,
                           "output_dir": args.out, "max_steps": args.steps, "batch_size": 4, "learning_rate": 2e-4,
                           "lr_scheduler": "cosine", "lora_r": LORA["r"], "lora_alpha": LORA["alpha"],
                           "lora_dropout": LORA["dropout"], "lora_target": LORA["target"], "hsa": args.hsa == "on",
                           "save_steps": 10 ** 6, "threads": args.threads, "dataloader_num_workers": 0,
                           "padding_free": not args.padded,  # padded: as before padding-free batches
                           "cache_dir": args.cache, "dtype": "float32", "seed": 42})
    summary = run.train(config)
    out = timer["it"].result()
    out["train_loss"] = summary["train_loss"]
    return out


def run_llamafactory(args) -> dict:
    import importlib.util

    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    import llamafactory.model.loader as lf_loader
    from llamafactory.train.tuner import run_exp

    spec = importlib.util.spec_from_file_location("wb_processor", ROOT / "models" / "vlm" / "processor.py")
    wb_processor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wb_processor)

    class WorkbenchProcessor:
        @staticmethod
        def from_pretrained(path, **kwargs):
            from transformers import AutoTokenizer
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            tokenizer = AutoTokenizer.from_pretrained(path)
            processor = wb_processor.ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(path),
                                                               tokenizer, chat_template=tokenizer.chat_template)
            processor.video_processor = processor.image_processor  # must exist for LLaMA-Factory; no videos here
            return processor

    lf_loader.AutoProcessor = WorkbenchProcessor
    timer = timer_class(TrainerCallback)()
    run_exp(dict(model_name_or_path=args.model, stage="sft", do_train=True, finetuning_type="lora",
                 lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                 lora_target=",".join(LORA["target"]), dataset="shapes", dataset_dir=args.data, template="qwen2_vl",
                 cutoff_len=1024, overwrite_cache=True, output_dir=args.out, overwrite_output_dir=True,
                 per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-4,
                 max_steps=args.steps, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                 report_to="none", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True,
                 seed=42, plot_loss=False,
                 disable_gradient_checkpointing=True),  # LLaMA-Factory's default is on; the workbench's off
            callbacks=[timer])
    return timer.result()


def prepare(scratch: Path) -> tuple[Path, Path]:
    """The default model with a float32 config, and the data with LLaMA-Factory's dataset_info.json."""
    sys.path.insert(0, str(ROOT))
    import shutil

    from models.zoo import shapes
    from workbench.train import DEFAULT_MODEL

    model = scratch / "model_fp32"
    shutil.copytree(DEFAULT_MODEL, model)
    config = json.loads((model / "config.json").read_text())

    def fp32(node):
        if isinstance(node, dict):
            for key in node:
                if key in ("dtype", "torch_dtype"):
                    node[key] = "float32"
                else:
                    fp32(node[key])
    fp32(config)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    data = scratch / "data"
    shapes.export_sharegpt(shapes.generate(120, seed=0, noise=shapes.TRAIN_NOISE), data, name="shapes")
    info = {"shapes": {"file_name": "shapes.json", "formatting": "sharegpt",
                       "columns": {"messages": "conversations", "images": "images", "system": "system"},
                       "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                                "assistant_tag": "gpt", "system_tag": "system"}}}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lf-python", default="/tmp/lf523/bin/python")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every round's per-step times to this file")
    parser.add_argument("--side", choices=["workbench", "llamafactory"], help=argparse.SUPPRESS)
    parser.add_argument("--hsa", default="on", help=argparse.SUPPRESS)
    parser.add_argument("--padded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_workbench(args) if args.side == "workbench" else run_llamafactory(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench_vs_lf_"))
    model, data = prepare(scratch)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "DISABLE_VERSION_CHECK": "1", "PYTHONPATH": str(ROOT)}
    variants = {"workbench, HSA off": (sys.executable, ["--side", "workbench", "--hsa", "off"]),
                "workbench, HSA on": (sys.executable, ["--side", "workbench", "--hsa", "on"]),
                "LLaMA-Factory": (args.lf_python, ["--side", "llamafactory"]),
                "workbench, HSA on, padded": (sys.executable, ["--side", "workbench", "--hsa", "on", "--padded"])}
    results = {name: [] for name in variants}
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores", flush=True)
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            python, extra = variants[name]
            out = scratch / f"out-{r}-{name.replace(' ', '_').replace(',', '')}"
            start = time.perf_counter()
            done = subprocess.run([python, __file__, *extra, "--model", str(model), "--data", str(data),
                                   "--out", str(out), "--cache", str(scratch / "cache"), "--steps", str(args.steps),
                                   "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT,
                                  env=env)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - start
            result["cache"] = ("cold" if "conversations aligned in" in done.stdout else "warm") \
                if name.startswith("workbench") else "-"
            results[name].append(result)
            print(f"round {r + 1} {name:<20} s/step {per_step(result):.4f} (data {data_s(result):.4f}, "
                  f"compute {compute_s(result):.4f}; CPU s/step {per_step(result, 'cpu'):.4f}), "
                  f"cache {result['cache']}, load {os.getloadavg()[0]:.1f}", flush=True)
    print()
    median = statistics.median
    print(f"| median of {args.rounds} rounds | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    rows = {
        f"s/step (steps 6-{args.steps})": lambda rs: median(per_step(x) for x in rs),
        "of which data + collate": lambda rs: median(data_s(x) for x in rs),
        "compute (forward, backward, optimizer)": lambda rs: median(compute_s(x) for x in rs),
        "CPU s/step (the process's CPU time, all threads)": lambda rs: median(per_step(x, "cpu") for x in rs),
        "start -> end of step 1 (s)": lambda rs: median(x["first_step_s"] for x in rs),
        "peak RSS (MB)": lambda rs: median(x["peak_rss_mb"] for x in rs),
    }
    for label, f in rows.items():
        values = [f(rs) for rs in results.values()]
        print(f"| {label} | {' | '.join(f'{v:.4f}' if v < 100 else f'{v:.0f}' for v in values)} |")
    # Ratios: of the medians over rounds, and the median of each round's own ratio (the variants of a round ran
    # back to back, so a round's ratio is a paired comparison that a slow minute of the machine hits less).
    off, on, lf, padded = (results[n] for n in ("workbench, HSA off", "workbench, HSA on", "LLaMA-Factory",
                                                "workbench, HSA on, padded"))
    for clock in ("wall", "cpu"):
        s_off, s_on, s_lf, s_pad = (median(per_step(x, clock) for x in rs) for rs in (off, on, lf, padded))
        paired = lambda a, b: median(per_step(y, clock) / per_step(x, clock) for x, y in zip(a, b))  # noqa: E731
        print(f"{clock:>4}: throughput vs LLaMA-Factory: HSA off {s_lf / s_off:.3f}x (paired {paired(off, lf):.3f}x), "
              f"HSA on {s_lf / s_on:.3f}x (paired {paired(on, lf):.3f}x), HSA on padded {s_lf / s_pad:.3f}x "
              f"(paired {paired(padded, lf):.3f}x); HSA on / off s/step {s_on / s_off:.3f} "
              f"(paired {1 / paired(on, off):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
