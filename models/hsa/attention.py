"""HSA as a transformers attention implementation.

`attn_implementation="hsa"` makes every attention layer of a model that uses the attention interface
call `hsa_attention_forward`. It reads `semantic_ids` from the keyword arguments that transformers
forwards from `model(...)` down to attention, so no model class is patched and no state is kept:
two threads may run the same model with different roles. Without `semantic_ids` it is plain SDPA.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .masks import extend_roles, hsa_mask_mod, role_rule
from .roles import LANDMARK, NOISE, parse_role

IMPLEMENTATION = "hsa"


def hsa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    semantic_ids: torch.Tensor | None = None,
    hsa_generation_role: int | str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query [B, H, Q, D], key/value [B, Hkv, K, D]; attention_mask is the model's own 4D mask
    (bool, causal + padding) or None when SDPA's causal path applies."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    want_weights = bool(kwargs.get("output_attentions", False))
    probe = kwargs.pop("hsa_probe", None)
    if probe is not None and causal:  # attention maps / mass for the workbench (models.hsa.probe)
        seen = (hsa_allowed(module, query, key, attention_mask, semantic_ids, hsa_generation_role)
                if semantic_ids is not None else _plain_allowed(attention_mask, query, key, causal))
        probe.observe(module, query, key, seen, scaling)
    if semantic_ids is None or not causal:
        # Not a decoder self-attention (e.g. a vision tower), or no roles given: plain attention.
        if want_weights:
            return eager_attention(module, query, key, value, _plain_allowed(attention_mask, query, key, causal),
                                   dropout=dropout, scaling=scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    if not want_weights and not query.is_cuda and query.shape[2] == key.shape[2] == semantic_ids.shape[-1]:
        real = _plain_padding(attention_mask, query.shape[2])
        if real is not None:
            if not ((semantic_ids.to(real.device) == NOISE) & real).any():
                # Nothing to hide (e.g. a batch without NOISE turns): HSA is the model's own mask.
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
            return compacted_attention(module, query, key, value, semantic_ids.to(query.device), real,
                                       dropout=dropout, scaling=scaling), None
    allowed = hsa_allowed(module, query, key, attention_mask, semantic_ids, hsa_generation_role)
    if want_weights:
        return eager_attention(module, query, key, value, allowed, dropout=dropout, scaling=scaling)
    if query.is_cuda:
        return flex_attention_forward(module, query, key, value, allowed_roles=(semantic_ids, attention_mask),
                                      generation_role=_generation_role(module, hsa_generation_role),
                                      scaling=scaling)
    return sdpa_attention_forward(module, query, key, value, allowed, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def _generation_role(module, requested) -> int:
    if requested is None:
        requested = getattr(getattr(module, "config", None), "hsa_generation_role", LANDMARK)
    return parse_role(requested)


def hsa_allowed(module, query, key, attention_mask, semantic_ids, generation_role=None) -> torch.Tensor:
    """[B, 1, Q, K] bool: the model's mask (or causal) and the HSA role rule.

    The queries are the last Q of the K key positions (a dynamic KV cache); keys past the given
    roles are tokens generated since and take the generation role."""
    q_len, kv_len = query.shape[2], key.shape[2]
    roles = extend_roles(semantic_ids.to(query.device), kv_len, _generation_role(module, generation_role))
    if roles.shape[0] not in (1, query.shape[0]):
        raise ValueError(f"semantic_ids has batch {roles.shape[0]} but the attention has batch {query.shape[0]}")
    allowed = role_rule(roles[:, kv_len - q_len:], roles)
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        allowed = allowed & (torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None])
    elif attention_mask.dtype == torch.bool:
        allowed = allowed & attention_mask[..., :kv_len]
    else:  # an additive float mask: 0 where attending is allowed
        allowed = allowed & (attention_mask[..., :kv_len] == 0)
    # A padding query may have no visible key at all; let it see everything so softmax stays finite
    # (its output is never used). Real tokens always see themselves.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def _plain_padding(attention_mask, length: int) -> torch.Tensor | None:
    """[B, L] bool of real (non-padding) keys when the model's mask is exactly causal + key padding
    (or absent); None for anything else (sliding windows, packed sequences, ...)."""
    if attention_mask is None:
        return torch.ones(1, length, dtype=torch.bool)
    if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (length, length):
        return None
    real = attention_mask.any(dim=-2)[:, 0]  # a real key is seen at least by itself
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    if not torch.equal(attention_mask, causal & real[:, None, None, :]):
        return None
    return real


def compacted_attention(module, query, key, value, roles, real, *, dropout=0.0, scaling=None) -> torch.Tensor:
    """HSA without a dense mask in the common case (prefill / training, causal + padding):
    GLOBAL/LANDMARK queries see exactly the GLOBAL/LANDMARK keys before them, so gathering those
    tokens makes their attention plain causal SDPA (the fast kernel); NOISE queries see every real
    key before them, a mask of only (noise queries x keys). Padding queries get zeros."""
    batch, heads, length, _ = query.shape
    gqa = heads != key.shape[1]
    p = dropout if module.training else 0.0
    out = query.new_zeros(query.shape)
    roles = roles.expand(batch, -1)
    real = real.to(query.device).expand(batch, -1)
    positions = torch.arange(length, device=query.device)
    for b in range(batch):
        attend = ((roles[b] != NOISE) & real[b]).nonzero().squeeze(1)
        noise = ((roles[b] == NOISE) & real[b]).nonzero().squeeze(1)
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        if len(attend):
            out[b:b + 1, :, attend] = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, attend], k[:, :, attend], v[:, :, attend], is_causal=True, dropout_p=p, scale=scaling,
                enable_gqa=gqa)
        if len(noise):
            keys = real[b].nonzero().squeeze(1)
            seen = positions[keys][None, :] <= noise[:, None]
            out[b:b + 1, :, noise] = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, noise], k[:, :, keys], v[:, :, keys], attn_mask=seen[None, None], dropout_p=p,
                scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _plain_allowed(attention_mask, query, key, causal) -> torch.Tensor | None:
    if attention_mask is not None:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if not causal:
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
    return (torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None])[None, None]


def eager_attention(module, query, key, value, allowed, *, dropout=0.0, scaling=None):
    """Attention that also returns its probabilities [B, H, Q, K] (for attention maps)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


_compiled_flex = None


def flex_attention_forward(module, query, key, value, *, allowed_roles, generation_role, scaling=None):
    """The GPU path: FlexAttention with a block mask built from the roles (no dense L x L mask)."""
    global _compiled_flex  # a compiled kernel cache, not model state
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    semantic_ids, attention_mask = allowed_roles
    q_len, kv_len = query.shape[2], key.shape[2]
    roles = extend_roles(semantic_ids.to(query.device), kv_len, generation_role)
    pad = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        # the model's 4D mask: a key is real if some query may see it
        pad = attention_mask.any(dim=-2)[:, 0, :kv_len]
    mask_mod = hsa_mask_mod(roles, pad, query_offset=kv_len - q_len)
    block_mask = create_block_mask(mask_mod, B=roles.shape[0], H=None, Q_LEN=q_len, KV_LEN=kv_len,
                                   device=query.device)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    out = _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation="hsa"` available (idempotent). The model's padding mask is built
    the way SDPA's is: transformers builds masks per implementation name."""
    AttentionInterface.register(IMPLEMENTATION, hsa_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
