"""The hybrid language model (models.hybrid): config and registration, the block's fusion, sliding-window
attention against a dense reference, the CPU decode step against FalconH1's, caches and generation,
save/load, and a LLaVA VLM over it. Tiny models from configs, no download."""
import pytest
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, LlavaConfig)
from transformers.cache_utils import (DummyLayer, DynamicLayer, DynamicSlidingWindowLayer,
                                      LinearAttentionAndFullAttentionLayer,
                                      LinearAttentionAndSlidingWindowAttentionLayer, LinearAttentionLayer)
from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer

import models.hybrid as hybrid
from models.hybrid import HSAHybridConfig, HSAHybridForCausalLM, HSAHybridModel, sliding_window_attention
from models.hybrid.testing import PRUNED, tiny_config, tiny_llava, tiny_model


def ids_for(batch=2, length=20, seed=0, vocab=119):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_names_registration_and_cache_layers():
    config = tiny_config(num_hidden_layers=6, layer_types=["hybrid", "mamba", "attention_sliding", "attention",
                                                           "mlp", "hybrid_sliding"])
    assert config.layer_types == PRUNED  # aliases stored under the cache's names
    assert HSAHybridConfig().mamba_chunk_size == 64
    assert AutoConfig.for_model("hsa_hybrid").__class__ is HSAHybridConfig
    assert isinstance(AutoModel.from_config(tiny_config()), HSAHybridModel)
    assert isinstance(AutoModelForCausalLM.from_config(tiny_config()), HSAHybridForCausalLM)
    llava = LlavaConfig(text_config=config.to_dict(), vision_config={"model_type": "clip_vision_model"})
    assert isinstance(llava.text_config, HSAHybridConfig) and llava.text_config.layer_types == PRUNED
    cache = DynamicCache(config=config)
    assert [type(layer) for layer in cache.layers] == [
        LinearAttentionAndFullAttentionLayer, LinearAttentionLayer, DynamicSlidingWindowLayer, DynamicLayer,
        DummyLayer, LinearAttentionAndSlidingWindowAttentionLayer]
    assert cache.layers[2].sliding_window == config.sliding_window
    with pytest.raises(ValueError, match="unknown hybrid layer type"):
        tiny_config(num_hidden_layers=2, layer_types=["hybrid", "transformer"])
    with pytest.raises(ValueError, match="must equal the number"):
        tiny_config(num_hidden_layers=3, layer_types=["hybrid"])


def test_modules_follow_the_layer_types():
    model = tiny_model(num_hidden_layers=6, layer_types=PRUNED)
    names = set(model.state_dict())
    for i, kind in enumerate(PRUNED):
        prefix = f"model.layers.{i}."
        assert (prefix + "mamba.in_proj.weight" in names) == hybrid.has_mamba(kind), kind
        assert (prefix + "self_attn.q_proj.weight" in names) == hybrid.has_attention(kind), kind
        assert (prefix + "fusion_gate.u_proj.weight" in names) == (kind in ("hybrid", "hybrid_sliding")), kind
        assert prefix + "feed_forward.up_proj.weight" in names
    assert [l.self_attn.sliding_window if l.self_attn else None for l in model.model.layers] == [
        None, None, 6, None, None, 6]


def test_block_fuses_normalized_branches_with_the_low_rank_gate():
    # an independent recomputation of one block from its parts
    model = tiny_model(num_hidden_layers=1, layer_types=["hybrid"])
    layer = model.model.layers[0]
    x = torch.randn(2, 11, 32)
    position_ids = torch.arange(11)[None]
    rope = model.model.rotary_emb(x, position_ids)
    with torch.no_grad():
        got = layer(x, position_embeddings=rope, position_ids=position_ids)[0]
        z = layer.input_layernorm(x)
        h_ssm = layer.ssm_norm(layer.mamba(z))
        h_attn = layer.attn_norm(layer.self_attn(z, rope, None)[0])
        g = torch.sigmoid(torch.tanh(z @ layer.fusion_gate.u_proj.weight.T) @ layer.fusion_gate.d_proj.weight.T)
        mixed = x + g * h_ssm + (1 - g) * h_attn
        want = mixed + layer.feed_forward(layer.pre_ff_layernorm(mixed))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert g.shape == (2, 11, 32) and 0 < g.min() and g.max() < 1


def dense_reference(q, k, v, window, q_start, k_start, key_padding=None, q_roles=None, k_roles=None, scale=None):
    """Brute force: repeat kv heads, full score matrix, mask from the definition, softmax."""
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            for j in range(k.shape[2]):
                qi, kj = q_start + i, k_start + j
                ok = qi - window < kj <= qi
                if key_padding is not None:
                    ok = ok and bool(key_padding[b, j])
                if q_roles is not None:
                    ok = ok and not (q_roles[b, i] != 2 and k_roles[b, j] == 2)
                if not ok:
                    scores[b, :, i, j] = float("-inf")
            if torch.isinf(scores[b, :, i]).all():
                continue  # no visible key (a padding query): output unused
            out[b, :, i] = (torch.softmax(scores[b, :, i], -1)[:, None] @ v[b])[:, 0]
    return out.transpose(1, 2)


@pytest.mark.parametrize("block", [None, 1, 3, 8])
@pytest.mark.parametrize("case", ["prefill", "cache", "padding_roles", "decode"])
def test_sliding_window_attention_matches_a_dense_masked_softmax(block, case):
    gen = torch.Generator().manual_seed(3)
    window, q_len = 5, 13
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k_len, q_start, k_start = q_len, 0, 0
    if case == "cache":  # a sliding cache: the last window-1 keys of 40 past tokens plus the new ones
        k_len, q_start = window - 1 + q_len, 40
        k_start = q_start - (window - 1)
    if case == "decode":  # one query over a full sliding cache: the unmasked fast path
        q, q_len, q_start, k_len = q[:, :, :1], 1, 40, window
        k_start = q_start - (window - 1)
    k = torch.randn(2, 2, k_len, 8, generator=gen)
    v = torch.randn(2, 2, k_len, 8, generator=gen)
    pad = q_roles = k_roles = None
    if case == "padding_roles":
        pad = torch.ones(2, k_len, dtype=torch.bool)
        pad[1, :4] = False  # left padding
        roles = torch.randint(0, 3, (2, k_len), generator=gen)
        q_roles, k_roles = roles, roles
    got = sliding_window_attention(q, k, v, window, query_start=q_start, key_start=k_start, key_padding=pad,
                                   query_roles=q_roles, key_roles=k_roles, block_size=block)
    want = dense_reference(q, k, v, window, q_start, k_start, pad, q_roles, k_roles)
    real = slice(None) if pad is None else pad[:, -q_len:]
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_sliding_layers_use_the_window():
    # a token further back than the window cannot reach a sliding-only model's output ...
    model = tiny_model(num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    ids = ids_for(1, 16)
    changed = ids.clone()
    changed[0, 2] = 7 if ids[0, 2] != 7 else 8
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    reach = 2 + 2 * (6 - 1)  # two layers of window 6
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:])
    assert not torch.allclose(a[0, reach], b[0, reach])
    # ... a full-attention one it does
    full = tiny_model(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    with torch.no_grad():
        assert not torch.allclose(full(ids).logits[0, -1], full(changed).logits[0, -1])


def test_decode_step_equals_the_library_mixer():
    config = tiny_config()
    torch.manual_seed(1)
    ours = hybrid.HybridMixer(config, layer_idx=0).eval()
    for p in ours.parameters():  # non-trivial conv bias, D and dt
        torch.nn.init.normal_(p, std=0.3)
    library = FalconH1Mixer(config, layer_idx=0).eval()
    library.register_buffer("mup_vector", ours.mup_vector.clone(), persistent=False)
    library.load_state_dict(ours.state_dict())
    cache_a = DynamicCache(config=tiny_config(num_hidden_layers=1, layer_types=["mamba"]))
    cache_b = DynamicCache(config=tiny_config(num_hidden_layers=1, layer_types=["mamba"]))
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cache_params=cache_a), library(x, cache_params=cache_b))
        for step in range(5):
            token = torch.randn(3, 1, 32)
            mask = torch.tensor([[1.0], [0.0], [1.0]]) if step == 2 else None  # a masked (NOISE) token
            a = ours.decode_step(token, cache_a, mask)
            b = library(token, cache_params=cache_b, attention_mask=mask)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(cache_a.layers[0].conv_states[0], cache_b.layers[0].conv_states[0])
            torch.testing.assert_close(cache_a.layers[0].recurrent_states[0], cache_b.layers[0].recurrent_states[0],
                                       atol=1e-6, rtol=1e-5)


def test_chunk_size_does_not_change_outputs():
    model = tiny_model(seed=2)
    ids = ids_for(2, 40)
    with torch.no_grad():
        a = model(ids).logits
        for layer in model.model.layers:
            layer.mamba.chunk_size = 256
        b = model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_types", [None, PRUNED], ids=["hybrid", "pruned"])
def test_cached_generation_matches_full_forward(layer_types):
    overrides = {} if layer_types is None else dict(num_hidden_layers=6, layer_types=layer_types)
    model = tiny_model(seed=3, **overrides)
    ids = ids_for(2, 10, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 18)  # past the sliding window of 6
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(full[:, 9 + step], scores, atol=1e-4, rtol=1e-4)
    # the padded row decodes as it does alone
    alone = model.generate(input_ids=ids[1:, 3:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(alone[0, 7:], out.sequences[1, 10:])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hsa_without_semantic_ids_is_plain_attention(implementation):
    ids = ids_for(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    hsa, plain = tiny_model(seed=5), tiny_model(seed=5, attn_implementation=implementation)
    with torch.no_grad():
        a = hsa(ids, attention_mask=mask).logits
        b = plain(ids, attention_mask=mask).logits
        all_global = hsa(ids, attention_mask=mask, semantic_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[mask.bool()], all_global[mask.bool()], atol=1e-5, rtol=1e-5)


def test_save_and_load_safetensors(tmp_path):
    model = tiny_model(seed=6, num_hidden_layers=6, layer_types=PRUNED)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert isinstance(loaded, HSAHybridForCausalLM) and loaded.config.layer_types == PRUNED
    ids = ids_for(1, 15)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)


def test_llava_over_the_hybrid_runs_trains_and_generates(tmp_path):
    model = tiny_llava()
    assert isinstance(model.model.language_model, HSAHybridModel)
    ids = ids_for(1, 12)
    ids[0, 1:5] = model.config.image_token_id  # the 4 image tokens
    pixels = torch.randn(1, 3, 28, 28)
    model.train()
    loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    assert model.model.language_model.layers[0].fusion_gate.u_proj.weight.grad is not None
    assert next(model.model.vision_tower.parameters()).grad is not None
    model.eval()
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=9, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(input_ids=out.sequences, pixel_values=pixels).logits
    torch.testing.assert_close(full[0, -2], out.scores[-1][0], atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert again.config.text_config.model_type == "hsa_hybrid"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits,
                                   model(input_ids=ids, pixel_values=pixels).logits)
