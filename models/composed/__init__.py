"""A VLM composed from parts (LLaVA-style): any vision encoder + a 2-layer GELU projector + any causal
LM, as transformers' `LlavaForConditionalGeneration`. `python -m models.composed build --help`."""
from .assemble import (CHAT_TEMPLATE, FEATURE_LAYER, IMAGE_TOKEN, SELECT_STRATEGIES, ComposeError, assemble,
                       save)
from .stages import PROJECTOR, STAGES, freeze_for_align, projector_parameters

__all__ = ["assemble", "save", "ComposeError", "IMAGE_TOKEN", "CHAT_TEMPLATE", "FEATURE_LAYER",
           "SELECT_STRATEGIES", "STAGES", "PROJECTOR", "freeze_for_align", "projector_parameters"]
