"""The hybrid's config: FalconH1's, plus a per-layer type list (also the pruning format), a sliding
window and the rank of the fusion gate."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.falcon_h1.configuration_falcon_h1 import FalconH1Config

MODEL_TYPE = "hsa_hybrid"

# Layer types. The names are the ones transformers' cache already maps to its cache layers
# (cache_utils.DYNAMIC_LAYER_TYPE_MAPPING), so `DynamicCache(config=...)` gives each layer exactly the
# state it needs: KV + SSM state, SSM state only, KV only, or nothing.
HYBRID = "hybrid"                          # Mamba-2 + full attention
HYBRID_SLIDING = "hybrid_sliding"          # Mamba-2 + sliding-window attention
MAMBA = "linear_attention"                 # Mamba-2 only (no KV cache)
ATTENTION = "full_attention"               # attention only (no SSM state)
ATTENTION_SLIDING = "sliding_attention"    # sliding-window attention only
MLP = "mlp"                                # neither (the cache keeps a dummy layer)
LAYER_TYPES = (HYBRID, HYBRID_SLIDING, MAMBA, ATTENTION, ATTENTION_SLIDING, MLP)
# Friendlier names accepted on input and stored under the cache's name.
ALIASES = {"mamba": MAMBA, "ssm": MAMBA, "attention": ATTENTION, "attention_sliding": ATTENTION_SLIDING}


def canonical_layer_type(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in LAYER_TYPES:
        raise ValueError(f"unknown hybrid layer type {name!r}: expected one of {LAYER_TYPES} "
                         f"or an alias {sorted(ALIASES)}")
    return name


def has_mamba(layer_type: str) -> bool:
    return layer_type in (HYBRID, HYBRID_SLIDING, MAMBA)


def has_attention(layer_type: str) -> bool:
    return layer_type in (HYBRID, HYBRID_SLIDING, ATTENTION, ATTENTION_SLIDING)


def is_sliding(layer_type: str) -> bool:
    return layer_type in (HYBRID_SLIDING, ATTENTION_SLIDING)


def layer_type_for(mamba: bool, attention: bool, sliding: bool = False) -> str:
    """The type of a layer with these branches."""
    if mamba and attention:
        return HYBRID_SLIDING if sliding else HYBRID
    if attention:
        return ATTENTION_SLIDING if sliding else ATTENTION
    return MAMBA if mamba else MLP


@strict
class HSAHybridConfig(FalconH1Config):
    r"""FalconH1 (Mamba-2 and attention side by side in every block) with:

    layer_types (`list[str]`, *optional*):
        One entry per layer: "hybrid", "hybrid_sliding", "linear_attention" (alias "mamba"),
        "full_attention" (alias "attention"), "sliding_attention" (alias "attention_sliding") or "mlp".
        Defaults to "hybrid" everywhere. Pruning rewrites this list.
    sliding_window (`int`, defaults to 256):
        Keys a sliding-window query sees, itself included.
    gate_rank (`int`, defaults to 16):
        Rank of the fusion gate g = sigmoid(D tanh(U z)).
    mamba_chunk_size: defaults to 64 here (FalconH1: 256): the PyTorch chunked scan is faster on CPU with
        64, with the same outputs (bench/RESULTS.md, "Design measurements").
    """

    model_type = MODEL_TYPE
    attribute_map = {}  # FalconH1 maps layer_types to a read-only all-"hybrid" property

    layer_types: list[str] | None = None
    sliding_window: int | None = 256
    gate_rank: int = 16
    mamba_chunk_size: int | None = 64

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = [HYBRID] * self.num_hidden_layers
        self.layer_types = [canonical_layer_type(t) for t in self.layer_types]
        self.validate_layer_type()  # here too, to raise a plain ValueError
        super().__post_init__(**kwargs)

    def validate_layer_type(self):
        # "mlp" is not in transformers' list of attention layer types; ours is narrower anyway.
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"num_hidden_layers ({self.num_hidden_layers}) must equal the number of "
                             f"layer_types ({len(self.layer_types)})")
        for t in self.layer_types:
            canonical_layer_type(t)
        if any(is_sliding(t) for t in self.layer_types) and not self.sliding_window:
            raise ValueError("sliding layers need a positive sliding_window")

    @property
    def layers_block_type(self):
        return list(self.layer_types)
