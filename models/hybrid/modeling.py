"""The parallel Mamba-2 + attention hybrid on top of transformers' FalconH1.

What is FalconH1's and reused as is: the Mamba-2 mixer (PyTorch path on CPU, mamba-ssm /
causal-conv1d kernels where they import), attention projections and RoPE, MLP, RMSNorm, the cache
(`DynamicCache(config=...)` reads `config.layer_types`), `FalconH1ForCausalLM.forward`.

What differs, and why it is overridden:
- the decoder layer may lack either branch (the pruning format), normalizes each branch's output and
  fuses them with a low-rank per-channel gate instead of adding them;
- attention may be sliding-window (computed block by block), and semantic_ids always mean HSA;
- the Mamba branch's input is zeroed at NOISE tokens (as FalconH1 zeroes padding), so a NOISE token
  writes nothing into the state that later GLOBAL/LANDMARK tokens read;
- on CPU, the mixer's prefill (a leaner chunked scan, ssd.py, and conv) and single-token decode step
  (conv as a multiply-and-sum, per-head state update) are its own, held to the library's by tests.

No shared time/position signal (FusionTree's SRTE) is fed to the SSM branch: Mamba-2's input-
dependent decay already orders tokens, the attention branch has RoPE, and an extra additive signal
would change the branch's input that pruning and the NOISE masking reason about. It can be added
as a feature of the block's normalized input later without changing the layer format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.falcon_h1 import modeling_falcon_h1 as falcon
from transformers.models.falcon_h1.modeling_falcon_h1 import (
    FalconH1Attention, FalconH1DecoderLayer, FalconH1ForCausalLM, FalconH1MLP, FalconH1Mixer, FalconH1Model,
    FalconH1PreTrainedModel, FalconH1RMSNorm, FalconH1RotaryEmbedding, apply_mask_to_padding_states,
    apply_rotary_pos_emb, compute_mup_vector, eager_attention_forward)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

import models.hsa  # noqa: F401  registers attn_implementation="hsa"
from models.hsa.attention import hsa_attention_forward
from models.hsa.masks import extend_roles
from models.hsa.roles import LANDMARK, NOISE, parse_role

from .configuration import ATTENTION, HSAHybridConfig, has_attention, has_mamba, is_sliding
from .sliding import sliding_window_attention
from .ssd import chunk_scan


def generation_role(config, requested=None) -> int:
    if requested is None:
        requested = getattr(config, "hsa_generation_role", None)
    return LANDMARK if requested is None else parse_role(requested)


class HybridMixer(FalconH1Mixer):
    """FalconH1's Mamba-2 mixer. On CPU, the single-token cached step (decode_step) and the chunked scan
    of a prefill (prefill, with models/hybrid/ssd.py) are its own; elsewhere (CUDA: mamba-ssm kernels
    where they import) the library's forward runs unchanged."""

    def __init__(self, config: HSAHybridConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # FalconH1Model registers this on every layer; the hybrid's layers may have no mixer
        self.register_buffer("mup_vector", compute_mup_vector(config), persistent=False)

    def forward(self, hidden_states, cache_params: Cache | None = None, attention_mask=None, **kwargs):
        packed = any(v is not None for v in kwargs.values())  # seq_idx / cu_seqlens: the library refuses them
        if hidden_states.device.type == "cpu" and self.cpu_fast_path and not packed:
            one_cached_token = cache_params is not None and hidden_states.shape[1] == 1 \
                and cache_params.get_conv_state(self.layer_idx) is not None
            if not one_cached_token:
                return self.prefill(hidden_states, cache_params, attention_mask)
            if not cache_params.is_recording_past(self.layer_idx):
                return self.decode_step(hidden_states, cache_params, attention_mask)
        if self.training and cache_params is None and attention_mask is not None and hidden_states.is_cuda:
            # mamba-ssm's fused training kernel takes no mask: it would skip the zeroing of the conv
            # output at padding / NOISE tokens. The unfused kernels (also differentiable) do not.
            self.training = False
            try:
                return super().forward(hidden_states, attention_mask=attention_mask)
            finally:
                self.training = True
        return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask)

    # False: the library's forward on CPU too (the slow twin the tests and bench/hybrid.py compare with)
    cpu_fast_path = True

    def prefill(self, hidden_states, cache_params: Cache | None = None, attention_mask=None):
        """FalconH1Mixer.forward's chunked branch (the library's path on CPU, for several tokens, with or
        without a cache and a previous state) with ssd.chunk_scan for the library's scan and causal_conv
        for its conv1d: same outputs and cached states (tests/test_hybrid_scan.py); the mixer is 2.3-2.9x
        faster on CPU at 256-4k tokens (bench/RESULTS.md)."""
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        recurrent_state = None if cache_params is None else cache_params.get_recurrent_state(self.layer_idx)

        projected = self.project(apply_mask_to_padding_states(hidden_states, attention_mask))
        gate, xbc, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        if cache_params is not None:  # the conv state, and the previous one's window on the left
            xbc = cache_params.update_conv_state(xbc.transpose(1, 2), self.layer_idx,
                                                 conv_kernel_size=self.conv_kernel_size).transpose(1, 2)
        xbc = ACT2FN[self.activation](self.causal_conv(xbc, seq_len)).to(dtype)
        xbc = apply_mask_to_padding_states(xbc, attention_mask)
        x, B, C = torch.split(xbc, [self.intermediate_size, self.groups_time_state_size,
                                    self.groups_time_state_size], dim=-1)

        A = -torch.exp(self.A_log.float())
        scan = chunk_scan(
            x.view(batch, seq_len, -1, self.head_dim), dt, A,
            B.view(batch, seq_len, self.n_groups, -1), C.view(batch, seq_len, self.n_groups, -1),
            chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            initial_states=recurrent_state, dt_limit=self.time_step_limit,
            return_final_states=cache_params is not None)
        if cache_params is not None:
            scan, ssm_state = scan
            cache_params.update_recurrent_state(ssm_state, self.layer_idx)
        scan = scan.reshape(batch, seq_len, -1)
        if self.mamba_rms_norm:
            scan = self.norm(scan, gate)
        else:
            scan = F.silu(gate).mul_(scan)
        return self.out_proj(scan.to(dtype))

    def project(self, hidden_states):
        """in_proj with FalconH1's multipliers, each skipped where it is 1 (the default: x * 1 is x,
        and the multiplies were ~5% of a CPU prefill and of a decode step)."""
        if self.ssm_in_multiplier != 1:
            hidden_states = hidden_states * self.ssm_in_multiplier
        projected = self.in_proj(hidden_states)
        if not bool((self.mup_vector == 1).all()):
            projected = projected * self.mup_vector
        return projected

    def causal_conv(self, xbc: torch.Tensor, last: int) -> torch.Tensor:
        """The depthwise causal conv1d over xbc [B, T, C] (zeros before the first position), its last
        `last` outputs, as kernel-size shifted multiply-adds in the [B, T, C] layout: the library's
        conv1d needs a [B, C, T] copy and is several times slower (bench/RESULTS.md, "Design measurements")."""
        weight = self.conv1d.weight[:, 0]  # [C, K]
        xbc = xbc.to(weight.dtype)  # as the library's conv1d
        kernel, length = weight.shape[1], xbc.shape[1]
        xbc = xbc[:, length - last - kernel + 1:] if length - last - kernel + 1 > 0 else xbc
        length = xbc.shape[1]
        if self.conv1d.bias is not None:
            out = torch.addcmul(self.conv1d.bias, xbc[:, length - last:], weight[:, -1])
        else:
            out = xbc[:, length - last:] * weight[:, -1]
        for shift in range(1, kernel):  # weight[:, K-1-shift] reads the input `shift` positions back
            first = max(shift - (length - last), 0)  # outputs whose input there lies before the start
            if first < last:
                out[:, first:].addcmul_(xbc[:, length - last + first - shift:length - shift],
                                        weight[:, kernel - 1 - shift])
        return out

    def decode_step(self, hidden_states, cache_params: Cache, attention_mask=None):
        """FalconH1Mixer.forward's recurrent branch for one token, with the cached causal conv as a
        multiply-and-sum over the kernel window (the library's F.conv1d call on a [B, C, 5] input took
        about 10% of a CPU decode step) and the state update done per head and in place (the library's
        expands dt and A to [B, H, P, N] and makes five such tensors; ~25% of a batch-8 step of the pruned
        model). Same numbers (tests/test_hybrid_model.py and tests/test_hybrid_scan.py check)."""
        batch = hidden_states.shape[0]
        dtype = hidden_states.dtype
        conv_state = cache_params.get_conv_state(self.layer_idx)
        recurrent_state = cache_params.get_recurrent_state(self.layer_idx)

        projected = self.project(apply_mask_to_padding_states(hidden_states, attention_mask))
        gate, xbc, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        window = torch.cat([conv_state[:, :, 1:], xbc.transpose(1, 2).to(conv_state.dtype)], dim=-1)
        conv_state.copy_(window)
        xbc = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        xbc = ACT2FN[self.activation](xbc).to(dtype)[:, None]
        xbc = apply_mask_to_padding_states(xbc, attention_mask)
        x, B, C = torch.split(xbc, [self.intermediate_size, self.groups_time_state_size,
                                    self.groups_time_state_size], dim=-1)

        # mamba2_selective_state_update (the library's torch path) with dt, dA and dt B per head rather
        # than per [head, head_dim, state] element, and the state updated in place
        heads, per_group = self.num_heads, self.num_heads // self.n_groups
        dt = F.softplus(dt[:, 0] + self.dt_bias.to(dt.dtype)).float()                   # [b, H]
        decay = torch.exp(dt * -torch.exp(self.A_log.float()))
        x = x.reshape(batch, heads, self.head_dim)
        B = B.reshape(batch, self.n_groups, 1, -1).expand(-1, -1, per_group, -1).reshape(batch, heads, 1, -1)
        C = C.reshape(batch, self.n_groups, 1, -1).expand(-1, -1, per_group, -1).reshape(batch, heads, -1, 1)
        recurrent_state.mul_(decay[..., None, None]).addcmul_(x[..., None], dt[..., None, None] * B)
        out = (recurrent_state @ C.to(recurrent_state.dtype))[..., 0].to(C.dtype) + x * self.D[:, None]
        if not self.mamba_rms_norm:
            out = out * F.silu(gate.view(batch, heads, self.head_dim))
        out = out.to(dtype).view(batch, 1, heads * self.head_dim)
        if self.mamba_rms_norm:
            out = self.norm(out, gate)
        return self.out_proj(out.to(dtype))


class HybridAttention(FalconH1Attention):
    """FalconH1's attention, full or sliding-window. With semantic_ids, full layers use the registered
    "hsa" implementation (whatever attn_implementation says, so both branches follow the same roles)
    and sliding layers apply the same role rule inside their window."""

    def __init__(self, config: HSAHybridConfig, layer_idx: int, sliding: bool):
        super().__init__(config, layer_idx)
        self.sliding_window = config.sliding_window if sliding else None

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values: Cache | None = None,
                padding_mask: torch.Tensor | None = None, past_length: int = 0,
                semantic_ids: torch.Tensor | None = None, hsa_generation_role=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2) * self.key_multiplier
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        dropout = self.attention_dropout if self.training else 0.0

        if self.sliding_window is not None:
            q_len, kv_len = query.shape[2], key.shape[2]
            total = past_length + q_len  # keys are always the last kv_len positions
            roles = None
            if semantic_ids is not None:
                roles = extend_roles(semantic_ids, total, generation_role(self.config, hsa_generation_role))
            out = sliding_window_attention(
                query, key, value, self.sliding_window, query_start=total - q_len, key_start=total - kv_len,
                key_padding=None if padding_mask is None else padding_mask[:, total - kv_len:total],
                query_roles=None if roles is None else roles[:, total - q_len:],
                key_roles=None if roles is None else roles[:, total - kv_len:],
                scaling=self.scaling, dropout=dropout)
            weights = None
        else:
            if semantic_ids is not None:
                interface, extra = hsa_attention_forward, {"semantic_ids": semantic_ids,
                                                           "hsa_generation_role": hsa_generation_role}
            else:
                interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                  eager_attention_forward)
                extra = {}
            out, weights = interface(self, query, key, value, attention_mask, dropout=dropout,
                                     scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class FusionGate(nn.Module):
    """g = sigmoid(D tanh(U z)): a low-rank, per-channel gate computed from the block's normalized
    input z. The block's output is g * h_ssm + (1 - g) * h_attn."""

    def __init__(self, hidden_size: int, rank: int, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.u_proj = nn.Linear(hidden_size, rank, bias=False)
        self.d_proj = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.d_proj(torch.tanh(self.u_proj(z))))


class HybridDecoderLayer(FalconH1DecoderLayer):
    """One block: z = norm(x); h_ssm = norm(Mamba(z)), h_attn = norm(Attention(z)) side by side,
    fused = g h_ssm + (1 - g) h_attn; x + fused; then the MLP. A pruned layer lacks a branch (and
    the gate, folded to 1 or 0) or both (an MLP-only block)."""

    def __init__(self, config: HSAHybridConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # FalconH1's __init__ would build both branches
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        mamba, attention = has_mamba(self.layer_type), has_attention(self.layer_type)
        self.attention_in_multiplier = config.attention_in_multiplier
        self.ssm_out_multiplier = config.ssm_out_multiplier
        self.attn_out_multiplier = config.attention_out_multiplier
        if mamba or attention:
            self.input_layernorm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba = HybridMixer(config, layer_idx) if mamba else None
        self.ssm_norm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if mamba else None
        self.self_attn = HybridAttention(config, layer_idx, is_sliding(self.layer_type)) if attention else None
        self.attn_norm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if attention else None
        self.fusion_gate = FusionGate(config.hidden_size, config.gate_rank, layer_idx) if mamba and attention \
            else None
        self.feed_forward = FalconH1MLP(config)
        self.pre_ff_layernorm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, mamba_attention_mask=None, position_ids=None,
                past_key_values: Cache | None = None, use_cache=False, position_embeddings=None, **kwargs):
        if self.mamba is not None or self.self_attn is not None:
            residual = hidden_states
            z = self.input_layernorm(hidden_states)
            h_ssm = h_attn = None
            if self.mamba is not None:
                # no **kwargs: the roles are already in mamba_attention_mask
                h_ssm = self.ssm_norm(self.mamba(z, cache_params=past_key_values, attention_mask=mamba_attention_mask)
                                      * self.ssm_out_multiplier)
            if self.self_attn is not None:
                h_attn, _ = self.self_attn(z * self.attention_in_multiplier, position_embeddings=position_embeddings,
                                           attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
                h_attn = self.attn_norm(h_attn * self.attn_out_multiplier)
            if h_ssm is None:
                mixed = h_attn
            elif h_attn is None:
                mixed = h_ssm
            else:
                g = self.fusion_gate(z)
                mixed = h_attn + g * (h_ssm - h_attn)  # g h_ssm + (1 - g) h_attn
            hidden_states = residual + mixed
        residual = hidden_states
        hidden_states = residual + self.feed_forward(self.pre_ff_layernorm(hidden_states))
        return (hidden_states,)


class HSAHybridPreTrainedModel(FalconH1PreTrainedModel):
    config_class = HSAHybridConfig
    config: HSAHybridConfig
    _no_split_modules = ["HybridDecoderLayer"]
    _can_record_outputs = {"hidden_states": HybridDecoderLayer, "attentions": HybridAttention}

    @torch.no_grad()
    def _init_weights(self, module):
        PreTrainedModel._init_weights(self, module)  # FalconH1's assumes a mixer in every layer
        if isinstance(module, FalconH1Mixer):
            init.ones_(module.dt_bias)
            init.copy_(module.A_log, torch.log(torch.arange(1, module.num_heads + 1)))
            init.ones_(module.D)
            init.copy_(module.mup_vector, compute_mup_vector(self.config))


class HSAHybridModel(HSAHybridPreTrainedModel, FalconH1Model):
    def __init__(self, config: HSAHybridConfig):
        HSAHybridPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self._attn_implementation = config._attn_implementation
        self.final_layernorm = FalconH1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FalconH1RotaryEmbedding(config=config)
        self.embedding_multiplier = config.embedding_multiplier
        self.lm_head_multiplier = config.lm_head_multiplier
        self.gradient_checkpointing = False
        self.post_init()

    def _past_length(self, cache: Cache | None) -> int:
        if cache is None:
            return 0
        if any(has_attention(t) for t in self.config.layer_types):
            return cache.get_seq_length()
        # an attention-free model's cache does not count tokens; the model does
        return getattr(cache, "_hsa_hybrid_seen_tokens", 0)

    def ssm_mask(self, attention_mask, inputs_embeds, past_key_values, roles, past: int):
        """[B, q] mask for the Mamba branch (1 = the token writes into the state), or None when every
        token does: padding (as FalconH1) and, with roles, NOISE tokens."""
        mask = create_recurrent_attention_mask(self.config, inputs_embeds, attention_mask, past_key_values)
        if roles is None:
            return mask
        q_len = inputs_embeds.shape[1]
        keep = roles[:, past:past + q_len] != NOISE
        if attention_mask is not None and attention_mask.ndim == 2:
            keep = keep & attention_mask[:, -q_len:].bool()
        if bool(keep.all()):
            return None
        return keep.expand(inputs_embeds.shape[0], -1).to(inputs_embeds.dtype)

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
                inputs_embeds=None, use_cache=None, semantic_ids: torch.Tensor | None = None,
                hsa_generation_role=None, **kwargs) -> BaseModelOutputWithPast:
        """As FalconH1Model.forward, plus `semantic_ids` [B or 1, prompt length] (HSA roles; tokens past
        them take the generation role) and `hsa_generation_role`."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embedding_multiplier
        hidden_states = inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        q_len = hidden_states.shape[1]
        past = self._past_length(past_key_values)
        if position_ids is None:
            position_ids = (torch.arange(q_len, device=hidden_states.device) + past).unsqueeze(0)

        roles = None
        if semantic_ids is not None:
            semantic_ids = semantic_ids.to(hidden_states.device)
            roles = extend_roles(semantic_ids, past + q_len, generation_role(self.config, hsa_generation_role))
        padding_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        full_mask = None
        if any(t in ("hybrid", ATTENTION) for t in self.config.layer_types):
            full_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                           attention_mask=attention_mask, past_key_values=past_key_values,
                                           position_ids=position_ids)
        ssm_mask = None
        if any(has_mamba(t) for t in self.config.layer_types):
            ssm_mask = self.ssm_mask(attention_mask, inputs_embeds, past_key_values, roles, past)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=full_mask, mamba_attention_mask=ssm_mask,
                                  position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, padding_mask=padding_mask,
                                  past_length=past, semantic_ids=semantic_ids,
                                  hsa_generation_role=hsa_generation_role, **kwargs)[0]
        if past_key_values is not None:
            past_key_values._hsa_hybrid_seen_tokens = past + q_len
        hidden_states = self.final_layernorm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class HSAHybridForCausalLM(HSAHybridPreTrainedModel, FalconH1ForCausalLM):
    """FalconH1ForCausalLM over the hybrid model (its forward, loss and generation inputs are reused)."""

    def __init__(self, config: HSAHybridConfig):
        HSAHybridPreTrainedModel.__init__(self, config)
        self.model = HSAHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, past_key_values, position_ids=None, **_):
        # generate asks for precomputed masks when every cache layer is compilable (an attention-free
        # pruned model); the model builds its per-layer masks itself from the 2D mask
        return attention_mask
