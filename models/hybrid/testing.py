"""Tiny hybrids built from configs (no download), for tests and benchmarks."""
from __future__ import annotations

import torch

from .configuration import HSAHybridConfig
from .modeling import HSAHybridForCausalLM

TINY = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head="auto", mamba_d_state=8,
            mamba_d_conv=4, mamba_chunk_size=8, sliding_window=6, gate_rank=4, max_position_embeddings=1024,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
MIXED = ["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"]
# every kind of layer the pruning format has, from a 6-layer MIXED-like model
PRUNED = ["hybrid", "linear_attention", "sliding_attention", "full_attention", "mlp", "hybrid_sliding"]


def tiny_config(**overrides) -> HSAHybridConfig:
    settings = {**TINY, **overrides}
    settings.setdefault("layer_types", (MIXED * 2)[:settings["num_hidden_layers"]])
    return HSAHybridConfig(**settings)


def tiny_model(seed: int = 0, attn_implementation: str = "hsa", **overrides) -> HSAHybridForCausalLM:
    torch.manual_seed(seed)
    model = HSAHybridForCausalLM(tiny_config(**overrides))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_llava(text_config: HSAHybridConfig | None = None, seed: int = 0):
    """A LLaVA VLM: a one-layer CLIP tower (28 px, 4 patches -> 4 image tokens) over the hybrid."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = text_config or tiny_config()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, num_channels=3)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=text_config.vocab_size - 1,
                         image_seq_length=4, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()
