"""Mask builders for the HSA rule: boolean (SDPA), additive bias (the original formulation) and
FlexAttention mask_mod / block mask (GPU). All of them agree with `roles.query_may_see_key`."""
from __future__ import annotations

import torch

from .roles import LANDMARK, NOISE


def extend_roles(semantic_ids: torch.Tensor, kv_len: int, generation_role: int = LANDMARK) -> torch.Tensor:
    """Roles for `kv_len` keys: the given ones, then `generation_role` for tokens generated after them."""
    if semantic_ids.dim() != 2:
        raise ValueError(f"semantic_ids must be [batch, seq_len], got shape {tuple(semantic_ids.shape)}")
    have = semantic_ids.shape[1]
    if have == kv_len:
        return semantic_ids
    if have > kv_len:
        raise ValueError(f"semantic_ids has {have} positions but the attention sees only {kv_len} keys")
    tail = semantic_ids.new_full((semantic_ids.shape[0], kv_len - have), generation_role)
    return torch.cat([semantic_ids, tail], dim=1)


def role_rule(query_roles: torch.Tensor, key_roles: torch.Tensor) -> torch.Tensor:
    """[B, 1, Q, K] bool: False exactly where a GLOBAL/LANDMARK query meets a NOISE key."""
    blocked = (query_roles != NOISE)[:, None, :, None] & (key_roles == NOISE)[:, None, None, :]
    return ~blocked


def allowed_mask(semantic_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 query_offset: int = 0) -> torch.Tensor:
    """True where a query may attend a key: causal, key not padding, and the HSA role rule.

    semantic_ids: [B, K] roles of every key position. attention_mask: [B, K], 1 for real tokens.
    Queries are the last K - query_offset positions (query_offset > 0 when decoding with a KV cache).
    Returns a [B, 1, K - query_offset, K] bool tensor.
    """
    batch, kv_len = semantic_ids.shape
    device = semantic_ids.device
    q_pos = torch.arange(query_offset, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    allowed = role_rule(semantic_ids[:, query_offset:], semantic_ids)
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed


def hsa_bias(semantic_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive bias of the original formulation, [B, 1, L, L]: 0 where the role rule allows,
    the dtype's minimum where it blocks. Causality and padding stay with the model's own mask."""
    allowed = role_rule(semantic_ids, semantic_ids)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=semantic_ids.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def hsa_mask_mod(semantic_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 query_offset: int = 0):
    """A FlexAttention mask_mod(b, h, q_idx, kv_idx) for the same rule as `allowed_mask`."""
    roles = semantic_ids
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(roles, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + query_offset
        blocked = (roles[b, q_pos] != NOISE) & (roles[b, kv_idx] == NOISE)
        return (kv_idx <= q_pos) & real[b, kv_idx] & ~blocked

    return mask_mod


def hsa_block_mask(semantic_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   query_offset: int = 0, block_size: int = 128):
    """A FlexAttention BlockMask for `allowed_mask`'s rule (one per batch row, shared by heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, kv_len = semantic_ids.shape
    return create_block_mask(
        hsa_mask_mod(semantic_ids, attention_mask, query_offset=query_offset),
        B=batch, H=None, Q_LEN=kv_len - query_offset, KV_LEN=kv_len,
        device=semantic_ids.device, BLOCK_SIZE=block_size,
    )
