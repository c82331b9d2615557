"""Sliding-window attention computed block by block (no dense L x L mask), with the HSA role rule.

A query at position i sees the keys at positions j with i - window < j <= i (itself included), the
convention of transformers' sliding-window masks and caches. Queries are processed in blocks; a block
of queries [s, e) only needs the keys [s - window + 1, e), so the work is O(L * (window + block))
instead of O(L^2), faster than a dense masked L x L softmax at long lengths (bench/RESULTS.md,
"Design measurements").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.hsa.masks import role_rule

DEFAULT_BLOCK = 64  # 64 query rows per SDPA call: 13-17% faster than 128 at 1k-4k tokens, window 256 (CPU)


def sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, *,
                             query_start: int = 0, key_start: int = 0,
                             key_padding: torch.Tensor | None = None,
                             query_roles: torch.Tensor | None = None, key_roles: torch.Tensor | None = None,
                             scaling: float | None = None, dropout: float = 0.0,
                             block_size: int | None = None) -> torch.Tensor:
    """query [B, H, Q, D] at absolute positions query_start + (0..Q-1); key/value [B, Hkv, K, D] at
    key_start + (0..K-1) (a prompt, or a sliding cache's last keys plus the new ones).

    key_padding [B, K] is True for real keys; query_roles [B, Q] / key_roles [B, K] are HSA roles
    (a GLOBAL/LANDMARK query never sees a NOISE key). Returns [B, Q, H, D] like transformers'
    attention functions."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    if (query_roles is None) != (key_roles is None):
        raise ValueError("give both query_roles and key_roles, or neither")
    q_len, k_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if q_len == 1 and key_padding is None and query_roles is None and query_start - key_start < window:
        # a decode step whose keys all lie in its window (a sliding cache keeps window - 1 past keys)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()
    block = block_size or min(window, DEFAULT_BLOCK)
    device = query.device
    outputs = []
    for qs in range(0, q_len, block):
        qe = min(qs + block, q_len)
        first_q, last_q = query_start + qs, query_start + qe - 1
        # keys this block can see: from the window start of its first query to its last query
        lo = max(first_q - window + 1, key_start) - key_start
        hi = min(last_q + 1, key_start + k_len) - key_start
        q_pos = torch.arange(first_q, last_q + 1, device=device)
        k_pos = torch.arange(key_start + lo, key_start + hi, device=device)
        distance = q_pos[:, None] - k_pos[None, :]
        mask = ((distance >= 0) & (distance < window))[None, None]
        if key_padding is not None:
            mask = mask & key_padding[:, None, None, lo:hi].to(device=device, dtype=torch.bool)
        if query_roles is not None:
            mask = mask & role_rule(query_roles[:, qs:qe].to(device), key_roles[:, lo:hi].to(device))
        if bool(mask.all()):
            mask = None  # e.g. one decode step inside the window: SDPA's unmasked path
        else:
            # a padding query may see no key at all: let it see every key so softmax stays finite
            # (its output is never used); a real query always sees itself
            mask = mask | ~mask.any(dim=-1, keepdim=True)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, qs:qe], key[:, :, lo:hi], value[:, :, lo:hi], attn_mask=mask, dropout_p=dropout,
            scale=scaling, enable_gqa=gqa))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous()
