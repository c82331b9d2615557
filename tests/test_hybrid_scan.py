"""The hybrid's CPU prefill (models/hybrid/ssd.py's chunk_scan, HybridMixer.prefill and causal_conv) held to
its slow twin, FalconH1's own PyTorch path: the scan function alone, the mixer with and without a cache
and a padding / NOISE mask, several chunk sizes and lengths that are not a multiple of the chunk, the
cached conv and SSM states, decoding and a second prefill continuing from them, gradients, and the
whole model's logits and generation."""
import pytest
import torch
from transformers import DynamicCache
from transformers.models.falcon_h1 import modeling_falcon_h1 as falcon

from models.hsa import NOISE, generate
from models.hybrid import HybridMixer
from models.hybrid.ssd import chunk_scan
from models.hybrid.testing import PRUNED, tiny_config, tiny_model

# the library's torch implementation itself, whatever kernel the wrapper would pick
library_scan = getattr(falcon.mamba2_chunk_scan, "__wrapped__", falcon.mamba2_chunk_scan)
TOL = dict(atol=2e-5, rtol=2e-5)


def scan_inputs(batch, length, heads=4, head_dim=8, groups=1, state=8, seed=0, decay=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=gen)
    dt = torch.randn(batch, length, heads, generator=gen) * 2
    A = -torch.arange(1, heads + 1).float() * decay
    B = torch.randn(batch, length, groups, state, generator=gen)
    C = torch.randn(batch, length, groups, state, generator=gen)
    D = torch.randn(heads, generator=gen)
    dt_bias = torch.randn(heads, generator=gen)
    initial = torch.randn(batch, heads, head_dim, state, generator=gen)
    return x, dt, A, B, C, D, dt_bias, initial


@pytest.mark.parametrize("length,chunk,groups,initial,decay", [
    (37, 8, 1, False, 1.0), (37, 8, 2, True, 1.0), (64, 16, 1, True, 1.0), (5, 16, 4, False, 1.0),
    (100, 32, 1, False, 20.0),  # strong decay: in-chunk decays far below the e^-60 floor
    (1, 4, 1, True, 1.0), (48, 48, 2, False, 1.0)])
def test_chunk_scan_equals_the_library_scan(length, chunk, groups, initial, decay):
    x, dt, A, B, C, D, dt_bias, init = scan_inputs(2, length, groups=groups, decay=decay)
    kwargs = dict(chunk_size=chunk, D=D, dt_bias=dt_bias, dt_softplus=True, return_final_states=True,
                  initial_states=init if initial else None, dt_limit=(0.0, float("inf")))
    y, state = chunk_scan(x, dt, A, B, C, **kwargs)
    y_ref, state_ref = library_scan(x, dt, A, B, C, **kwargs)
    assert y.shape == y_ref.shape and state.shape == state_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)
    # no D, a dt limit, no final state
    kwargs.update(D=None, dt_limit=(0.01, 0.5), return_final_states=False)
    torch.testing.assert_close(chunk_scan(x, dt, A, B, C, **kwargs), library_scan(x, dt, A, B, C, **kwargs), **TOL)


def mixer_pair(chunk=8, seed=1, **overrides):
    """Our mixer and the same weights whose forward is the library's (cpu_fast_path=False)."""
    config = tiny_config(mamba_chunk_size=chunk, **overrides)
    torch.manual_seed(seed)
    fast = HybridMixer(config, layer_idx=0).eval()
    for p in fast.parameters():  # non-trivial conv bias, D and dt
        torch.nn.init.normal_(p, std=0.3)
    slow = HybridMixer(config, layer_idx=0).eval()
    slow.load_state_dict(fast.state_dict())
    slow.cpu_fast_path = False
    return fast, slow, config


def new_cache(config):
    return DynamicCache(config=tiny_config(num_hidden_layers=1, layer_types=["mamba"]))


def assert_same_states(cache_a, cache_b):
    assert cache_a.layers[0].recurrent_states[0].is_contiguous()  # the decode step views it
    torch.testing.assert_close(cache_a.layers[0].conv_states[0], cache_b.layers[0].conv_states[0], **TOL)
    torch.testing.assert_close(cache_a.layers[0].recurrent_states[0], cache_b.layers[0].recurrent_states[0], **TOL)


@pytest.mark.parametrize("chunk,length", [(8, 21), (4, 16), (16, 3), (64, 50)])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_mixer_prefill_then_decode_equals_the_library(chunk, length, masked):
    fast, slow, config = mixer_pair(chunk)
    x = torch.randn(3, length, 32, generator=torch.Generator().manual_seed(2))
    mask = None
    if masked:  # left padding in row 0, scattered NOISE tokens in row 2 (the model's combined mask)
        mask = torch.ones(3, length)
        mask[0, :min(4, length - 1)] = 0
        mask[2, 1::3] = 0
    cache_a, cache_b = new_cache(config), new_cache(config)
    with torch.no_grad():
        assert fast.cpu_fast_path and not slow.cpu_fast_path
        torch.testing.assert_close(fast(x, attention_mask=mask), slow(x, attention_mask=mask), **TOL)
        torch.testing.assert_close(fast(x, cache_params=cache_a, attention_mask=mask),
                                   slow(x, cache_params=cache_b, attention_mask=mask), **TOL)
        assert_same_states(cache_a, cache_b)
        for step in range(3):  # decoding continues from the prefill's states
            token = torch.randn(3, 1, 32)
            step_mask = torch.tensor([[1.0], [0.0], [1.0]]) if step == 1 else None
            torch.testing.assert_close(fast(token, cache_params=cache_a, attention_mask=step_mask),
                                       slow(token, cache_params=cache_b, attention_mask=step_mask), **TOL)
            assert_same_states(cache_a, cache_b)
        # a second prefill from the states (initial state of the scan, the conv window on the left)
        more = torch.randn(3, chunk + 3, 32)
        torch.testing.assert_close(fast(more, cache_params=cache_a), slow(more, cache_params=cache_b), **TOL)
        assert_same_states(cache_a, cache_b)


def test_mixer_without_rms_norm_and_with_groups():
    fast, slow, config = mixer_pair(8, mamba_rms_norm=False, mamba_n_groups=2)
    x = torch.randn(2, 19, 32)
    cache_a, cache_b = new_cache(config), new_cache(config)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, cache_params=cache_a), slow(x, cache_params=cache_b), **TOL)
    assert_same_states(cache_a, cache_b)


def test_gradients_equal_the_library():
    fast, slow, _ = mixer_pair(8)
    x = torch.randn(2, 21, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(2, 21, 32)
    ((fast(xa) - target) ** 2).sum().backward()
    ((slow(xb) - target) ** 2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


def set_fast(model, flag):
    for module in model.modules():
        if isinstance(module, HybridMixer):
            module.cpu_fast_path = flag


@pytest.mark.parametrize("layer_types", [None, PRUNED], ids=["hybrid", "pruned"])
def test_model_logits_and_generation_equal_the_library_path(layer_types):
    extra = {} if layer_types is None else dict(num_hidden_layers=6, layer_types=layer_types)
    model = tiny_model(seed=3, mamba_chunk_size=8, **extra)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 119, (2, 30), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    roles = torch.randint(0, 3, (2, 30), generator=gen)
    roles[:, -1] = 1
    assert (roles == NOISE).any()
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, semantic_ids=roles).logits
        fast_plain = model(ids, attention_mask=mask).logits
        set_fast(model, False)
        slow = model(ids, attention_mask=mask, semantic_ids=roles).logits
        slow_plain = model(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(fast[keep], slow[keep], **TOL)
        torch.testing.assert_close(fast_plain[keep], slow_plain[keep], **TOL)
        kwargs = dict(input_ids=ids, attention_mask=mask, semantic_ids=roles, max_new_tokens=4, do_sample=False,
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        b = generate(model, **kwargs)
        set_fast(model, True)
        a = generate(model, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, **TOL)
