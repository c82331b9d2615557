"""`python -m models.composed build --vision PATH_OR_ID --lm PATH_OR_ID --out DIR`: assemble a LLaVA-style
VLM from a pretrained vision encoder and a pretrained causal language model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.composed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="vision encoder + fresh projector + causal LM -> a Llava checkpoint")
    build.add_argument("--vision", required=True,
                       help="a vision encoder: directory or hub id (CLIP, SigLIP, ... vision or two-tower model)")
    build.add_argument("--lm", required=True, help="a causal language model: directory or hub id (Qwen3, Llama, ...)")
    build.add_argument("--out", required=True, type=Path)
    build.add_argument("--vision-feature-layer", type=int, default=-2,
                       help="which hidden state of the vision tower feeds the projector (LLaVA: -2, the penultimate)")
    build.add_argument("--select-strategy", choices=["default", "full"], default=None,
                       help="'default' drops the CLS token (LLaVA's default for CLIP), 'full' keeps every position; "
                            "default: 'default' for towers with a CLS token, 'full' for those without (SigLIP)")
    args = parser.parse_args(argv)

    from .assemble import ComposeError, assemble, save

    try:
        model, processor = assemble(args.vision, args.lm, vision_feature_layer=args.vision_feature_layer,
                                    select_strategy=args.select_strategy)
    except ComposeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save(model, processor, args.out)
    config = model.config
    trainable = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    print(f"wrote {args.out}: {config.vision_config.model_type} -> projector ({trainable:,} parameters, fresh) -> "
          f"{config.text_config.model_type}; {config.image_seq_length} image tokens per image, "
          f"feature layer {config.vision_feature_layer}, strategy {config.vision_feature_select_strategy!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
