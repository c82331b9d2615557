"""`python -m models.zoo build | build-composed | build-hybrid | eval | experiment | export`: the embedded models' commands."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_build = sub.add_parser("build", help="train the default VLM from nothing on the shapes task (CPU)")
    p_build.add_argument("--steps", type=positive_int, default=None, help="stage 1: steps on clean conversations (default 2400)")
    p_build.add_argument("--noisy-steps", type=int, default=200, help="stage 2: steps with NOISE turns (and HSA)")
    p_build.add_argument("--batch-size", type=int, default=16)
    p_build.add_argument("--seed", type=int, default=0)
    p_build.add_argument("--out", type=Path, default=None, help="output directory (default: models/zoo/default_vlm)")
    p_build.add_argument("--no-hsa", action="store_true", help="stage 2 with plain attention, no semantic_ids")
    p_build.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (default: torch's). Another count changes the float sums and "
                              "with them the model; the committed one was built with the default, 2 threads here")

    p_comp = sub.add_parser("build-composed",
                            help="the composed default VLM from nothing: tiny CLIP + tiny Qwen3, align, SFT (CPU)")
    p_comp.add_argument("--out", type=Path, default=None,
                        help="output directory (default: models/zoo/default_composed)")
    p_comp.add_argument("--seed", type=int, default=0)
    p_comp.add_argument("--threads", type=positive_int, default=2,
                        help="torch CPU threads (default 2, what the committed model was built with)")
    p_comp.add_argument("--vision-steps", type=positive_int, default=None, help="vision tower pretraining steps")
    p_comp.add_argument("--lm-steps", type=positive_int, default=None, help="language model pretraining steps")
    p_comp.add_argument("--align-steps", type=positive_int, default=None, help="align stage steps (projector only)")
    p_comp.add_argument("--sft-steps", type=positive_int, default=None, help="SFT stage steps (LoRA + projector)")
    p_comp.add_argument("--parts", type=Path, default=None,
                        help="keep the pretrained vision tower and language model here (vision/, lm/)")

    p_hyb = sub.add_parser("build-hybrid",
                           help="the hybrid default VLM from nothing: tiny CLIP + tiny Mamba+attention hybrid, "
                                "align, SFT with gate regularizers, then its gates' prune plan and pruned export (CPU)")
    p_hyb.add_argument("--out", type=Path, default=None, help="output directory (default: models/zoo/default_hybrid)")
    p_hyb.add_argument("--pruned-out", type=Path, default=None,
                       help="pruned model's directory (default: models/zoo/default_hybrid_pruned)")
    p_hyb.add_argument("--seed", type=int, default=0)
    p_hyb.add_argument("--threads", type=positive_int, default=2,
                       help="torch CPU threads (default 2, what the committed models were built with)")
    p_hyb.add_argument("--vision-steps", type=positive_int, default=None, help="vision tower pretraining steps")
    p_hyb.add_argument("--lm-steps", type=positive_int, default=None, help="hybrid LM pretraining steps")
    p_hyb.add_argument("--align-steps", type=positive_int, default=None, help="align stage steps (projector only)")
    p_hyb.add_argument("--sft-steps", type=positive_int, default=None, help="SFT stage steps (LoRA + projector)")
    p_hyb.add_argument("--heal-steps", type=int, default=None, help="healing SFT of the pruned model (0: none)")
    p_hyb.add_argument("--eval-n", type=int, default=50, help="held-out conversations for the final accuracy of both")
    p_hyb.add_argument("--parts", type=Path, default=None,
                       help="keep the pretrained vision tower and language model here (vision/, lm/)")

    p_eval = sub.add_parser("eval", help="accuracy on fresh held-out shapes conversations (greedy decoding)")
    p_eval.add_argument("--n", type=int, default=100, help="number of conversations")
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--model", default=None,
                        help="'default' (the embedded Qwen2-VL), 'composed' (the embedded composed VLM), "
                             "'hybrid' / 'hybrid-pruned' (the embedded hybrid VLM, unpruned / pruned), "
                             "or a model directory or hub id (default: 'default')")
    p_eval.add_argument("--noise", choices=["clean", "train", "heavy"], default="clean",
                        help="NOISE turns in the conversations: none, as in training, or heavier with unseen kinds")
    p_eval.add_argument("--attn", default=None, help="attention implementation (default: hsa if the model was trained with it)")

    p_exp = sub.add_parser("experiment", help="the HSA experiment: same tiny VLM trained with and without HSA")
    p_exp.add_argument("--base-steps", type=int, default=None, help="stage 1: clean training of the shared base")
    p_exp.add_argument("--steps", type=int, default=None, help="stage 2: noisy training per arm and seed")
    p_exp.add_argument("--seeds", type=int, default=None, help="training seeds per arm")
    p_exp.add_argument("--n", type=int, default=None, help="held-out conversations per evaluation")
    p_exp.add_argument("--out", type=Path, default=None)
    p_exp.add_argument("--inference-only", action="store_true",
                       help="no training: the default (or --model) model with HSA at inference on vs off")
    p_exp.add_argument("--model", type=Path, default=None, help="with --inference-only: the model directory")

    p_export = sub.add_parser("export", help="write a shapes dataset as ShareGPT / LLaMA-Factory JSON + PNGs")
    p_export.add_argument("out", type=Path)
    p_export.add_argument("--n", type=int, default=100)
    p_export.add_argument("--seed", type=int, default=0)
    p_export.add_argument("--name", default="shapes")
    p_export.add_argument("--noise", choices=["clean", "train", "heavy"], default="train")

    args = parser.parse_args(argv)
    if args.command == "build":
        from .build import CLEAN_STEPS, DEFAULT_DIR, build

        build(args.out or DEFAULT_DIR, steps=args.steps or CLEAN_STEPS, noisy_steps=args.noisy_steps, batch_size=args.batch_size,
              seed=args.seed, hsa=not args.no_hsa, threads=args.threads)
        return 0
    if args.command == "build-composed":
        import os

        # Before torch loads: two OpenMP threads that spin while waiting stalled 4x whenever another
        # process took one of the two cores; passive waiting keeps a step's time steady.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from . import DEFAULT_COMPOSED_DIR
        from .composed import build_composed

        build_composed(args.out or DEFAULT_COMPOSED_DIR, seed=args.seed, threads=args.threads,
                       vision_steps=args.vision_steps, lm_steps=args.lm_steps, align_steps=args.align_steps,
                       sft_steps=args.sft_steps, parts_dir=args.parts)
        return 0
    if args.command == "build-hybrid":
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as build-composed
        from . import DEFAULT_HYBRID_DIR, DEFAULT_HYBRID_PRUNED_DIR
        from .hybrid import build_hybrid

        build_hybrid(args.out or DEFAULT_HYBRID_DIR, args.pruned_out or DEFAULT_HYBRID_PRUNED_DIR, seed=args.seed,
                     threads=args.threads, vision_steps=args.vision_steps, lm_steps=args.lm_steps,
                     align_steps=args.align_steps, sft_steps=args.sft_steps, heal_steps=args.heal_steps,
                     eval_n=args.eval_n, parts_dir=args.parts)
        return 0
    if args.command == "eval":
        from .evaluate import NOISE_PRESETS, evaluate_model, print_report

        result = evaluate_model(args.model, n=args.n, seed=args.seed, noise=NOISE_PRESETS[args.noise],
                                attn_implementation=args.attn, progress=True)
        print_report(result)
        return 0
    if args.command == "experiment":
        from .experiment import ExperimentSettings, run_experiment, run_inference_study

        if args.inference_only:
            run_inference_study(args.model, n=args.n or 25, seeds=args.seeds or 2, out_dir=args.out)
            return 0
        settings = ExperimentSettings()
        for name in ("base_steps", "steps", "seeds", "n"):
            if getattr(args, name) is not None:
                setattr(settings, name, getattr(args, name))
        run_experiment(settings, args.out)
        return 0
    if args.command == "export":
        from . import shapes
        from .evaluate import NOISE_PRESETS

        samples = shapes.generate(args.n, seed=args.seed, noise=NOISE_PRESETS[args.noise])
        path = shapes.export_sharegpt(samples, args.out, args.name)
        print(f"wrote {len(samples)} conversations to {path}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
