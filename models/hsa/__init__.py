"""Hierarchical Semantic Attention: roles, the mask rule, mask builders and the attention
implementation `attn_implementation="hsa"` (registered on import)."""
from .attention import IMPLEMENTATION, eager_attention, hsa_attention_forward, register
from .generation import generate
from .probe import AttentionProbe
from .masks import allowed_mask, extend_roles, hsa_bias, hsa_block_mask, hsa_mask_mod, role_rule
from .roles import (GLOBAL, LANDMARK, NOISE, ROLE_NAMES, ROLES, SHAREGPT_NAMES, parse_role,
                    query_may_see_key, role_name, sharegpt_name)

register()

__all__ = [
    "GLOBAL", "LANDMARK", "NOISE", "ROLES", "ROLE_NAMES", "SHAREGPT_NAMES", "IMPLEMENTATION",
    "parse_role", "role_name", "sharegpt_name", "query_may_see_key",
    "allowed_mask", "extend_roles", "hsa_bias", "hsa_mask_mod", "hsa_block_mask", "role_rule",
    "hsa_attention_forward", "eager_attention", "register", "generate", "AttentionProbe",
]
