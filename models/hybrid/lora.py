"""LoRA targets for the hybrid.

peft has no default targets for a new model type. Its LoRA refuses the Mamba mixer's `out_proj` and
`conv1d` for the Mamba model types it knows (the fused mamba-ssm training kernel reads out_proj's
weight directly, bypassing an adapter), and our type is not in its list, so the rule is kept here:
attention projections, the MLP, the mixer's in_proj and the fusion gate, nothing else.
"""
from __future__ import annotations

from torch import nn

from .gates import hybrid_base

LORA_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj",
                     "u_proj", "d_proj")


def default_lora_targets(model) -> list[str]:
    """Full module names for peft's `target_modules`, inside the hybrid language model only (a VLM's
    vision tower and projector have modules of the same short names)."""
    base = hybrid_base(model)
    prefix = {id(m): name for name, m in model.named_modules()}[id(base)]
    targets = []
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGET_NAMES:
            targets.append(f"{prefix}.{name}" if prefix else name)
    return targets
