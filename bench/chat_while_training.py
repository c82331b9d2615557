"""Chat while a run trains, on this machine's cores: a reply's first-token time and tokens/s with
the machine idle and with a LoRA run training in the background, and the run's steps/s alone and
while chat answers — side by side in one process, with the thread counts and OpenMP wait policy
the workbench gives the app and its runs (workbench.jobs.processes.thread_split, PASSIVE waits).

    .venv/bin/python bench/chat_while_training.py [--replies 8] [--window 25]

Targets (issue 20.24): chat within 2x of idle, the run at >= 0.8x of its solo speed.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py does, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


from default_model import bench_record, first_token_and_decode  # noqa: E402


def steps_per_second(metrics: Path, start: float, end: float) -> float | None:
    """The run's optimizer steps per second between two wall-clock times, from metrics.jsonl."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    inside = [(r["time"], r["step"]) for r in records if "loss" in r and start <= r["time"] <= end]
    if len(inside) < 2:
        return None
    (t0, s0), (t1, s1) = inside[0], inside[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--window", type=float, default=25.0, help="seconds of solo training measured")
    args = parser.parse_args()

    import torch

    from models.vlm import load_vlm
    from models.zoo import DEFAULT_VLM_DIR, shapes
    from workbench.jobs import RunManager
    from workbench.jobs.processes import thread_split

    app_threads, run_threads = thread_split()
    torch.set_num_threads(app_threads)
    model, processor = load_vlm(DEFAULT_VLM_DIR, device="cpu")
    record = bench_record()

    def chat_round() -> tuple[float, float]:
        measured = [first_token_and_decode(model, processor, record, args.new_tokens) for _ in range(args.replies)]
        return statistics.median(m[0] for m in measured), statistics.median(m[1] for m in measured)

    first_token_and_decode(model, processor, record, args.new_tokens)  # warm up
    idle = chat_round()

    work = Path(tempfile.mkdtemp(prefix="bench-chat-train-"))
    data = shapes.export_sharegpt(shapes.generate(64, seed=0, noise=shapes.TRAIN_NOISE), work / "data")
    manager = RunManager(work / "runs", max_concurrent=1, monitor=False, workdir=work)
    config = {"dataset": str(data), "max_steps": 100000, "batch_size": 2, "lora_r": 16, "logging_steps": 1,
              "save_steps": 100000, "hsa": True}
    run = manager.submit(config, name="background")
    metrics = run.output_dir / "metrics.jsonl"
    try:
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 5:  # past loading and step 1
            time.sleep(0.5)
        solo_start = time.time()
        time.sleep(args.window)
        solo_end = time.time()
        busy = chat_round()
        chat_end = time.time()
        solo = steps_per_second(metrics, solo_start, solo_end)
        shared = steps_per_second(metrics, solo_end, chat_end)
    finally:
        manager.cancel(run.id)
        manager.wait(run.id, timeout=60)
        manager.close()

    print(f"CPU with {os.cpu_count()} cores; app {app_threads} thread(s), run {run_threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; default VLM, {args.new_tokens} new tokens, "
          f"median of {args.replies} replies; LoRA run on the default VLM, batch 2")
    print(f"{'chat':<26} {'first token ms':>15} {'decode tok/s':>13}")
    print(f"{'idle':<26} {idle[0] * 1000:>15.1f} {idle[1]:>13.1f}")
    print(f"{'while the run trains':<26} {busy[0] * 1000:>15.1f} {busy[1]:>13.1f}")
    print(f"chat slowdown: first token x{busy[0] / idle[0]:.2f}, decode x{idle[1] / busy[1]:.2f} (target <= 2)")
    if solo and shared:
        print(f"run: {solo:.2f} steps/s alone, {shared:.2f} while chat answers: x{shared / solo:.2f} (target >= 0.8)")
    else:
        print("run: too few logged steps in a window to measure its speed")


if __name__ == "__main__":
    main()
