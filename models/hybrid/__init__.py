"""The parallel Mamba-2 + attention hybrid language model (model type "hsa_hybrid"), built on
transformers' FalconH1: its config and classes, registered with AutoConfig / AutoModel /
AutoModelForCausalLM on import (so LlavaConfig(text_config=...) and from_pretrained find them)."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import (ATTENTION, ATTENTION_SLIDING, HYBRID, HYBRID_SLIDING, LAYER_TYPES, MAMBA, MLP,
                            MODEL_TYPE, HSAHybridConfig, canonical_layer_type, has_attention, has_mamba,
                            is_sliding, layer_type_for)
from .modeling import (FusionGate, HSAHybridForCausalLM, HSAHybridModel, HSAHybridPreTrainedModel,
                       HybridAttention, HybridDecoderLayer, HybridMixer)
from .sliding import sliding_window_attention
from .gates import GateMonitor, gate_entropy, gate_entropy_loss, gate_stats, hybrid_base, load_balance_loss
from .lora import LORA_TARGET_NAMES, default_lora_targets
from .prune import THRESHOLDS, export, load, make_plan, prune_model, read_gate_stats


def register() -> None:
    """Register the model type with the Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, HSAHybridConfig, exist_ok=True)
    AutoModel.register(HSAHybridConfig, HSAHybridModel, exist_ok=True)
    AutoModelForCausalLM.register(HSAHybridConfig, HSAHybridForCausalLM, exist_ok=True)


register()

__all__ = [
    "MODEL_TYPE", "HSAHybridConfig", "HSAHybridModel", "HSAHybridForCausalLM", "HSAHybridPreTrainedModel",
    "HybridDecoderLayer", "HybridMixer", "HybridAttention", "FusionGate", "sliding_window_attention",
    "LAYER_TYPES", "HYBRID", "HYBRID_SLIDING", "MAMBA", "ATTENTION", "ATTENTION_SLIDING", "MLP",
    "canonical_layer_type", "has_mamba", "has_attention", "is_sliding", "layer_type_for", "register",
    "GateMonitor", "gate_stats", "hybrid_base", "load_balance_loss", "gate_entropy", "gate_entropy_loss",
    "LORA_TARGET_NAMES", "default_lora_targets",
    "THRESHOLDS", "make_plan", "read_gate_stats", "prune_model", "export", "load",
]
