"""python -m models.hybrid plan SOURCE --out plan.json      (a prune plan from gate statistics)
python -m models.hybrid export DIR --plan plan.json --out OUT  (write the pruned model)

SOURCE is a gate_stats.jsonl (or a JSON of one {"layers": [...]} record), a run directory holding
gate_stats.jsonl, or a model directory without statistics: then its gates are measured on --input
(a JSON list of token-id lists) or on synthetic token ids."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .prune import (STATS_FILE, THRESHOLDS, describe_plan, export, load, make_plan, measure_gate_stats,
                    read_gate_stats, synthetic_input)


def _model_config(path: Path | None):
    if path is None or not (path / "config.json").exists():
        return None
    from transformers import AutoConfig

    import models.hybrid  # noqa: F401

    return AutoConfig.from_pretrained(path)


def plan_command(args) -> dict:
    source = Path(args.source)
    stats_path = source / STATS_FILE if source.is_dir() else source
    config = _model_config(Path(args.model) if args.model else (source if source.is_dir() else None))
    if stats_path.is_file():
        stats, steps = read_gate_stats(stats_path, last=args.last)
        origin = str(stats_path)
    elif config is not None:
        import torch

        model = load(source)
        if args.input:
            rows = json.loads(Path(args.input).read_text())
            longest = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):  # left padding
                ids[i, longest - len(row):] = torch.tensor(row)
                mask[i, longest - len(row):] = 1
        else:
            ids, mask = synthetic_input(config, batch=args.batch, tokens=args.tokens, seed=args.seed), None
        stats, steps = measure_gate_stats(model, ids, mask), None
        origin = f"{source} (measured on {'--input ' + args.input if args.input else 'synthetic token ids'})"
    else:
        raise SystemExit(f"{source}: neither gate statistics ({STATS_FILE}) nor a model directory")
    text = config.get_text_config(decoder=True) if config is not None else None
    layer_types = list(text.layer_types) if text is not None else ["hybrid"] * len(stats)
    window = args.sliding_window or (text.sliding_window if text is not None else None)
    plan = make_plan(stats, layer_types, sliding_window=window, source=origin, steps=steps,
                     **{k: getattr(args, k) for k in THRESHOLDS})
    Path(args.out).write_text(json.dumps(plan, indent=2))
    print(describe_plan(plan))
    print(f"plan written to {args.out}")
    return plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.hybrid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="draw a prune plan from gate statistics")
    p.add_argument("source", help="gate_stats.jsonl, a run directory, or a model directory")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="model directory for the layer types (when SOURCE is only statistics)")
    p.add_argument("--last", type=int, default=10, help="average the last K logged steps (default 10)")
    p.add_argument("--attention-drop-above", dest="attention_drop_above", type=float)
    p.add_argument("--mamba-drop-below", dest="mamba_drop_below", type=float)
    p.add_argument("--sliding-above", dest="sliding_above", type=float)
    p.add_argument("--max-attention-drops", dest="max_attention_drops", type=int)
    p.add_argument("--min-full-attention", dest="min_full_attention", type=int)
    p.add_argument("--sliding-window", dest="sliding_window", type=int)
    p.add_argument("--input", help="JSON list of token-id lists to measure the gates on")
    p.add_argument("--tokens", type=int, default=256, help="synthetic input length (default 256)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("export", help="write the model pruned by a plan")
    e.add_argument("model_dir")
    e.add_argument("--plan", required=True)
    e.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            plan_command(args)
        else:
            out = export(args.model_dir, args.plan, args.out)
            print(f"pruned model written to {out}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
