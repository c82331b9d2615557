"""Every HSA mask builder against a brute-force double loop."""
import pytest
import torch

from models.hsa import (GLOBAL, LANDMARK, NOISE, allowed_mask, extend_roles, hsa_bias, hsa_block_mask,
                        hsa_mask_mod, parse_role, query_may_see_key)


def brute_force(roles, real, query_offset):
    batch, kv_len = roles.shape
    out = torch.zeros(batch, 1, kv_len - query_offset, kv_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(kv_len - query_offset):
            q = i + query_offset
            for k in range(kv_len):
                out[b, 0, i, k] = (k <= q and bool(real[b, k])
                                   and query_may_see_key(int(roles[b, q]), int(roles[b, k])))
    return out


def random_batch(gen, batch, kv_len, padding):
    roles = torch.randint(0, 3, (batch, kv_len), generator=gen)
    real = torch.ones(batch, kv_len, dtype=torch.long)
    for b in range(batch):
        n_pad = int(torch.randint(0, kv_len // 2, (1,), generator=gen))
        if padding == "left":
            real[b, :n_pad] = 0
        elif padding == "right" and n_pad:
            real[b, -n_pad:] = 0
    return roles, real


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("seed", range(4))
def test_allowed_mask_matches_brute_force(padding, seed):
    gen = torch.Generator().manual_seed(seed)
    roles, real = random_batch(gen, 3, 17, padding)
    for query_offset in (0, 1, 9, 16):
        expected = brute_force(roles, real, query_offset)
        got = allowed_mask(roles, real if padding != "none" else None, query_offset=query_offset)
        assert got.dtype == torch.bool and got.shape == expected.shape
        assert torch.equal(got, expected)


@pytest.mark.parametrize("seed", range(3))
def test_mask_mod_matches_allowed_mask(seed):
    gen = torch.Generator().manual_seed(seed)
    roles, real = random_batch(gen, 2, 23, "left")
    for query_offset in (0, 5):
        mod = hsa_mask_mod(roles, real, query_offset=query_offset)
        b = torch.arange(2)[:, None, None, None]
        q = torch.arange(23 - query_offset)[None, None, :, None]
        k = torch.arange(23)[None, None, None, :]
        assert torch.equal(mod(b, 0, q, k), allowed_mask(roles, real, query_offset=query_offset))


def test_flex_attention_with_block_mask_equals_sdpa_with_boolean_mask():
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(0)
    roles, real = random_batch(gen, 2, 160, "right")
    q, k, v = (torch.randn(2, 2, 160, 16, generator=gen) for _ in range(3))
    block_mask = hsa_block_mask(roles, real, block_size=32)
    allowed = allowed_mask(roles, real)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding rows: keep softmax finite
    flex = flex_attention(q, k, v, block_mask=block_mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    rows = real.bool()[:, None, :, None].expand_as(sdpa)  # compare on real query rows
    torch.testing.assert_close(flex[rows], sdpa[rows], atol=1e-5, rtol=1e-5)


def test_bias_agrees_with_boolean_mask():
    gen = torch.Generator().manual_seed(1)
    roles = torch.randint(0, 3, (2, 19), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        bias = hsa_bias(roles, dtype=dtype)
        assert bias.shape == (2, 1, 19, 19) and bias.dtype == dtype
        causal = torch.ones(19, 19, dtype=torch.bool).tril()
        blocked = bias == torch.finfo(dtype).min
        assert torch.equal(~blocked & causal, allowed_mask(roles))
        assert set(bias.unique().tolist()) <= {0.0, torch.finfo(dtype).min}


def test_noise_queries_see_everything_before_them():
    roles = torch.tensor([[GLOBAL, NOISE, LANDMARK, NOISE, NOISE]])
    mask = allowed_mask(roles)[0, 0]
    assert mask[4].tolist() == [True, True, True, True, True]
    assert mask[2].tolist() == [True, False, True, False, False]


def test_extend_roles_gives_generated_tokens_the_generation_role():
    roles = torch.tensor([[GLOBAL, NOISE]])
    assert extend_roles(roles, 4).tolist() == [[GLOBAL, NOISE, LANDMARK, LANDMARK]]
    assert extend_roles(roles, 3, NOISE).tolist() == [[GLOBAL, NOISE, NOISE]]
    with pytest.raises(ValueError, match="3 positions"):
        extend_roles(torch.zeros(1, 3, dtype=torch.long), 2)


@pytest.mark.parametrize("value,expected", [
    (0, GLOBAL), (1, LANDMARK), (2, NOISE), ("GLOBAL_CONDITION", GLOBAL), ("LANDMARK", LANDMARK),
    ("NOISE", NOISE), ("global", GLOBAL), ("landmark", LANDMARK), ("noise", NOISE)])
def test_parse_role_accepts_ints_and_names(value, expected):
    assert parse_role(value) == expected


@pytest.mark.parametrize("bad", [3, -1, True, "Noise", "distractor", None, 1.0, ""])
def test_parse_role_names_the_bad_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(").replace(")", r"\)")):
        parse_role(bad)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_compacted_attention_equals_masked_sdpa_with_gradients(padding):
    from types import SimpleNamespace

    from models.hsa.attention import compacted_attention

    gen = torch.Generator().manual_seed(11)
    roles, real = random_batch(gen, 3, 29, padding)
    q = torch.randn(3, 4, 29, 8, generator=gen, requires_grad=True)
    k = torch.randn(3, 2, 29, 8, generator=gen, requires_grad=True)  # grouped-query attention
    v = torch.randn(3, 2, 29, 8, generator=gen, requires_grad=True)
    module = SimpleNamespace(training=False)
    fast = compacted_attention(module, q, k, v, roles, real.bool())  # [B, L, H, D]
    allowed = allowed_mask(roles, real)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    slow = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                            enable_gqa=True).transpose(1, 2)
    rows = real.bool()
    torch.testing.assert_close(fast[rows], slow[rows], atol=1e-5, rtol=1e-5)
    assert (fast[~rows] == 0).all()
    weights = torch.randn(fast[rows].shape, generator=gen)
    grads_fast = torch.autograd.grad((fast[rows] * weights).sum(), (q, k, v))
    grads_slow = torch.autograd.grad((slow[rows] * weights).sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
