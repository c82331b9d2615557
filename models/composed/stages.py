"""The two training stages of a composed VLM, as which parameters train.

"align": the vision tower and the language model frozen, only the projector learns (on image-caption
pairs), so the LM's input space is met without disturbing either pretrained part.
"sft": LoRA on the language model (the projector optionally trained in full, as a peft
`modules_to_save`), on conversations; workbench.train builds that with peft.
"""
from __future__ import annotations

STAGES = ("align", "sft")
PROJECTOR = "multi_modal_projector"  # the Llava module name of the projector


def projector_parameters(model) -> dict:
    """name -> parameter of the projector (empty for a model without one)."""
    return {name: param for name, param in model.named_parameters() if f"{PROJECTOR}." in name}


def freeze_for_align(model) -> int:
    """Freeze everything but the projector; returns the number of trainable parameters.
    Raises ValueError for a model that has no projector (nothing to align)."""
    projector = projector_parameters(model)
    if not projector:
        raise ValueError(f"{type(model).__name__} has no {PROJECTOR}: the align stage trains a composed "
                         "(LLaVA) VLM's projector")
    for name, param in model.named_parameters():
        param.requires_grad_(name in projector)
    return sum(p.numel() for p in projector.values())
