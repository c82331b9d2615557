"""HSA as a transformers attention implementation.

`attn_implementation="hsa"` makes every attention layer of a model that uses the attention interface
call `hsa_attention_forward`. It reads `semantic_ids` from the keyword arguments that transformers
forwards from `model(...)` down to attention, so no model class is patched and the model keeps no
state: two threads may run the same model with different roles. Without `semantic_ids` it is plain SDPA.

What the roles make of the attention (on the CPU: one additive mask, or for long sequences the gathered
rows of `compacted_attention`) is built once per forward pass, by its first layer, and shared by the
others (see `_shared`); every later forward pass, a new batch, builds its own.
"""
from __future__ import annotations

import weakref

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
        seen = (shared_allowed(module, query, key, attention_mask, semantic_ids, hsa_generation_role)
                if semantic_ids is not None else _plain_allowed(attention_mask, query, key, causal))
        probe.observe(module, query, key, seen, scaling)
    if semantic_ids is None or not causal:
        # Not a decoder self-attention (e.g. a vision tower), or no roles given: plain attention.
        if causal and not want_weights and not query.is_cuda and query.shape[2] == key.shape[2]:
            rows = _shared("segments", query, key, attention_mask, None, 0,
                           lambda: _packed_segments(attention_mask, query.shape[2]))
            if rows is not None:  # a padding-free batch: record by record
                plan = [[(start, stop, None) for start, stop in row] for row in rows]
                return segment_attention(query, key, value, plan, dropout=dropout, scaling=scaling), None
        if want_weights:
            return eager_attention(module, query, key, value, _plain_allowed(attention_mask, query, key, causal),
                                   dropout=dropout, scaling=scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    if want_weights:
        return eager_attention(module, query, key, value,
                               shared_allowed(module, query, key, attention_mask, semantic_ids, hsa_generation_role),
                               dropout=dropout, scaling=scaling)
    if query.is_cuda:
        return flex_attention_forward(module, query, key, value, allowed_roles=(semantic_ids, attention_mask),
                                      generation_role=_generation_role(module, hsa_generation_role),
                                      scaling=scaling)
    kind, plan = _cpu_plan(module, query, key, attention_mask, semantic_ids, hsa_generation_role)
    if kind == "plain":  # nothing to hide (e.g. a batch without NOISE turns): HSA is the model's own mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if kind == "segments":
        return segment_attention(query, key, value, plan, dropout=dropout, scaling=scaling), None
    if kind == "compacted":
        return compacted_attention(module, query, key, value, None, None, dropout=dropout, scaling=scaling,
                                   rows=plan), None
    # "dense": one additive mask for every layer; SDPA's grouped-query path instead of repeating K/V
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=plan, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


# ---- work done once per forward pass and shared by every layer ----------------------------------
#
# Every decoder layer of one forward pass gets the same `semantic_ids` and the same model mask (transformers
# builds it once per forward), so what HSA derives from them (the combined mask, the compacted rows) is built
# by the first layer and kept on the model's mask tensor (or on `semantic_ids` when the model passes no
# mask), where it lives exactly as long as that tensor. It is used again only while both tensors are the same
# objects, unmodified (their version counters), for the same shapes, device, dtype and generation role: a
# new batch is a new tensor, so a kept mask is never reused for different data.

_SHARED_ATTR = "_hsa_shared"


def _shared(kind: str, query, key, attention_mask, semantic_ids, generation_role: int, build):
    anchor = attention_mask if attention_mask is not None else semantic_ids
    if anchor is None or torch.compiler.is_compiling():
        return build()
    valid = (query.shape[0], query.shape[2], key.shape[2], query.device, generation_role,
             None if semantic_ids is None else semantic_ids._version,
             None if attention_mask is None else attention_mask._version)

    def same(ref, tensor):
        return ref is None if tensor is None else (ref is not None and ref() is tensor)

    slot = getattr(anchor, _SHARED_ATTR, None)
    if slot is not None:
        ref_ids, ref_mask, kept_valid, values = slot
        if kept_valid == valid and same(ref_ids, semantic_ids) and same(ref_mask, attention_mask):
            if kind not in values:
                values[kind] = build()
            return values[kind]
    value = build()
    setattr(anchor, _SHARED_ATTR, (None if semantic_ids is None else weakref.ref(semantic_ids),
                                   None if attention_mask is None else weakref.ref(attention_mask), valid,
                                   {kind: value}))
    return value


def shared_allowed(module, query, key, attention_mask, semantic_ids, generation_role=None) -> torch.Tensor:
    """`hsa_allowed`, built once per forward pass and shared by its layers."""
    role = _generation_role(module, generation_role)
    return _shared("allowed", query, key, attention_mask, semantic_ids, role,
                   lambda: hsa_allowed(module, query, key, attention_mask, semantic_ids, role))


COMPACT_FROM = 1024  # keys; below this one shared additive mask is faster than compacting (bench/RESULTS.md)


def _cpu_plan(module, query, key, attention_mask, semantic_ids, generation_role=None):
    """How this forward pass computes HSA on the CPU (decided and built by its first layer):
    ("segments", rows) for several sequences packed into a row (padding-free batches: attention within each
    one, `segment_masks`); ("plain", None) when no key that the model's mask shows is NOISE; ("compacted", rows) for long sequences under a plain causal +
    padding mask; otherwise ("dense", additive mask [B, 1, Q, K] in the query's dtype)."""
    role = _generation_role(module, generation_role)

    def plan():
        q_len, kv_len = query.shape[2], key.shape[2]
        roles = extend_roles(semantic_ids.to(query.device), kv_len, role)
        if roles.shape[0] not in (1, query.shape[0]):
            raise ValueError(f"semantic_ids has batch {roles.shape[0]} but the attention has batch {query.shape[0]}")
        noise = roles == NOISE
        if q_len == kv_len:
            rows = _packed_segments(attention_mask, q_len)
            if rows is not None:
                return "segments", segment_masks(roles.expand(query.shape[0], -1), rows, query.dtype)
        if not (noise & _visible_keys(attention_mask, kv_len)).any():
            return "plain", None
        if q_len == kv_len >= COMPACT_FROM:
            real = _plain_padding(attention_mask, q_len)
            if real is not None:
                return "compacted", compacted_rows(roles, real.to(query.device), query.shape[0])
        allowed = hsa_allowed(module, query, key, attention_mask, semantic_ids, role)
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        return "dense", bias.masked_fill_(~allowed, float("-inf"))

    return _shared(f"plan {query.dtype}", query, key, attention_mask, semantic_ids, role, plan)


def _packed_segments(attention_mask, length: int) -> list | None:
    """Per batch row, the (start, stop) of the sequences packed one after another into it, when the model's mask
    is exactly causal attention within each of them, with no padding (transformers builds it so from position
    ids that restart at 0: a padding-free batch); None for any other mask, or for one sequence a row."""
    if (attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or attention_mask.shape[-2:] != (length, length) or length < 2):
        return None
    mask = attention_mask[:, 0]
    before = torch.arange(1, length, device=mask.device)
    starts = ~mask[:, before, before - 1]  # a sequence starts where a query cannot see the key before it
    if not starts.any():
        return None
    segment = torch.cat([starts.new_zeros(mask.shape[0], 1), starts], 1).long().cumsum(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(mask, causal & (segment[:, :, None] == segment[:, None, :])):
        return None
    rows = []
    for row in starts:
        bounds = [0] + (row.nonzero().squeeze(1) + 1).tolist() + [length]
        rows.append(list(zip(bounds[:-1], bounds[1:])))
    return rows


def segment_masks(roles: torch.Tensor, rows: list, dtype: torch.dtype) -> list:
    """Per row, per packed sequence: (start, stop, additive mask [1, 1, n, n] of causal attention and the role
    rule within it, or None where the rule hides nothing there: plain causal attention)."""
    plan = []
    for b, segments in enumerate(rows):
        row = []
        for start, stop in segments:
            r = roles[b:b + 1, start:stop]
            bias = None
            if (r == NOISE).any() and (r != NOISE).any():
                allowed = role_rule(r, r) & torch.ones(stop - start, stop - start, dtype=torch.bool,
                                                       device=r.device).tril()
                bias = torch.zeros(allowed.shape, dtype=dtype, device=r.device).masked_fill_(~allowed, float("-inf"))
            row.append((start, stop, bias))
        plan.append(row)
    return plan


def segment_attention(query, key, value, plan: list, *, dropout=0.0, scaling=None) -> torch.Tensor:
    """Attention of a padding-free batch, sequence by sequence (what the model's block-diagonal mask allows,
    without computing the blocks it hides): [B, H, N, D] -> [B, N, H, D]."""
    gqa = query.shape[1] != key.shape[1]
    out = []
    for b, segments in enumerate(plan):
        sizes = [stop - start for start, stop, _ in segments]
        parts = zip(query[b:b + 1].split(sizes, 2), key[b:b + 1].split(sizes, 2), value[b:b + 1].split(sizes, 2),
                    (bias for _, _, bias in segments))
        out.append(torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=bias is None, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            for q, k, v, bias in parts], dim=2))
    return (out[0] if len(out) == 1 else torch.cat(out, 0)).transpose(1, 2).contiguous()


def _visible_keys(attention_mask, kv_len: int):
    """[B, K] bool (or True): the keys that some query may see under the model's mask (padding is not)."""
    if attention_mask is None:
        return True
    seen = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return seen[..., :kv_len].flatten(1, -2).any(dim=1)


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


def compacted_rows(roles: torch.Tensor, real: torch.Tensor, batch: int) -> list:
    """Per batch row, what `compacted_attention` gathers: the positions of the real GLOBAL/LANDMARK tokens,
    of the real NOISE tokens, of all real tokens, and the [noise, keys] causal mask of the noise queries."""
    roles, real = roles.expand(batch, -1), real.expand(batch, -1)
    positions = torch.arange(roles.shape[1], device=roles.device)
    rows = []
    for b in range(batch):
        attend = ((roles[b] != NOISE) & real[b]).nonzero().squeeze(1)
        noise = ((roles[b] == NOISE) & real[b]).nonzero().squeeze(1)
        keys = real[b].nonzero().squeeze(1)
        rows.append((attend, noise, keys, (positions[keys][None, :] <= noise[:, None])[None, None]))
    return rows


def compacted_attention(module, query, key, value, roles, real, *, dropout=0.0, scaling=None,
                        rows=None) -> torch.Tensor:
    """HSA without a dense mask for long sequences (prefill / training, causal + padding):
    GLOBAL/LANDMARK queries see exactly the GLOBAL/LANDMARK keys before them, so gathering those
    tokens makes their attention plain causal SDPA (the fast kernel); NOISE queries see every real
    key before them, a mask of only (noise queries x keys). Padding queries get zeros.
    `rows` (from `compacted_rows`, shared by the layers of a forward pass) replaces roles and real."""
    batch, heads, length, _ = query.shape
    gqa = heads != key.shape[1]
    p = dropout if module.training else 0.0
    out = query.new_zeros(query.shape)
    if rows is None:
        rows = compacted_rows(roles.to(query.device), real.to(query.device), batch)
    for b, (attend, noise, keys, seen) in enumerate(rows):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        if len(attend):
            out[b:b + 1, :, attend] = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, attend], k[:, :, attend], v[:, :, attend], is_causal=True, dropout_p=p, scale=scaling,
                enable_gqa=gqa)
        if len(noise):
            out[b:b + 1, :, noise] = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, noise], k[:, :, keys], v[:, :, keys], attn_mask=seen, dropout_p=p,
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

    def build():
        roles = extend_roles(semantic_ids.to(query.device), kv_len, generation_role)
        pad = None
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # the model's 4D mask: a key is real if some query may see it
            pad = attention_mask.any(dim=-2)[:, 0, :kv_len]
        mask_mod = hsa_mask_mod(roles, pad, query_offset=kv_len - q_len)
        return create_block_mask(mask_mod, B=roles.shape[0], H=None, Q_LEN=q_len, KV_LEN=kv_len,
                                 device=query.device)

    # one block mask per forward pass, shared by its layers (building one evaluates the rule on every block)
    block_mask = _shared("flex", query, key, attention_mask, semantic_ids, generation_role, build)
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
