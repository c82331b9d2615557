"""Evaluation without the UI: `python -m workbench.evaluate CONFIG.json` -> results.json + plots.

    {"models": ["default"], "dataset": "data.json", "output_dir": "evals/x"}

is a complete config. Models are embedded names (default, composed, hybrid, hybrid-pruned), "run: NAME"
(a finished run, as in the Chat tab; give `runs_dir`), a checkpoint folder or a hub id. The dataset is a
ShareGPT / LLaMA-Factory file, "store:NAME" (with `store_db`) or "shapes" (held-out shapes
conversations; `"shapes": {"n", "seed", "noise", "grounding"}`). `decoding` lists modes ("greedy",
{"mode": "sample", "temperature", "top_p"}, {"mode": "beam", "num_beams"}), `hsa` lists true / false /
"auto". The metric functions are in `workbench.evaluate.metrics`."""
from .run import (KEYS, METRICS, RESULTS_NAME, TABLE_HEADERS, ConfigError, EvalConfig, Item, evaluate,
                  format_table, grade, load_items, main, parse_config, resolve_model, summarize, table_rows)

__all__ = ["EvalConfig", "Item", "ConfigError", "parse_config", "load_items", "evaluate", "grade",
           "summarize", "resolve_model", "table_rows", "format_table", "main", "KEYS", "METRICS", "RESULTS_NAME",
           "TABLE_HEADERS"]
