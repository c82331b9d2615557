"""The training entry point a run executes: `python -m workbench.train CONFIG.json|.yaml`.

Under several processes: `torchrun --nproc_per_node=2 -m workbench.train CONFIG.json` (or
`accelerate launch -m workbench.train CONFIG.json`)."""
from .config import (DEFAULT_MODEL, KEYS, ConfigError, TrainConfig, check_inputs, check_output_dir, defaults,
                     load_config_file, parse_config)

__all__ = ["TrainConfig", "ConfigError", "parse_config", "load_config_file", "defaults", "KEYS", "DEFAULT_MODEL",
           "train", "main"]


def train(config: TrainConfig) -> dict:
    if config.method != "sft":  # dpo / nca on preference pairs
        from .preference import train as preference_train

        return preference_train(config)
    from .run import train as run_train  # torch/transformers only when training, not to check a config

    return run_train(config)


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path
    import json
    import os
    import sys

    parser = argparse.ArgumentParser(prog="python -m workbench.train",
                                     description="Fine-tune a VLM (LoRA / QLoRA / full) under the HSA mask.")
    parser.add_argument("config", help="a .json or .yaml config")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and what it points at (dataset, base model, LoRA targets), "
                             "print it resolved, and exit")
    args = parser.parse_args(argv)
    try:
        # relative paths in the file are relative to the file's folder, wherever the command runs
        config = parse_config(load_config_file(args.config), base_dir=Path(args.config).resolve().parent)
        check_inputs(config)
        if int(os.environ.get("RANK", 0)) == 0:  # the other ranks start when rank 0 may already write there
            check_output_dir(config, Path(args.config))
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.check:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    import warnings

    # library deprecation notices would bury the run's own lines in the log the tab shows
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    train(config)
    return 0
