"""HSA's per-forward shared work (models.hsa.attention): the mask (or the compacted rows) that the first
layer of a forward pass builds and every later layer reuses must equal what each layer would build alone,
and must never be reused for another batch."""
import gc

import pytest
import torch
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import models.hsa.attention as attention
from models.hsa import NOISE, allowed_mask

SMALL = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def model(implementation="hsa"):
    torch.manual_seed(0)
    net = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    net.set_attn_implementation(implementation)
    return net


def batch(seed=0, size=3, length=23, padding="right"):
    gen = torch.Generator().manual_seed(seed)
    roles = torch.randint(0, 3, (size, length), generator=gen)
    ids = torch.randint(3, 120, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    for b in range(1, size if padding != "none" else 1):
        n = int(torch.randint(1, length // 2, (1,), generator=gen))
        if padding == "left":
            mask[b, :n] = 0
        else:
            mask[b, -n:] = 0
    roles[mask == 0] = NOISE  # as the collator pads
    return ids, roles, mask


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        semantic_ids=None, **kwargs):
    """Each layer alone: the brute-force-tested `allowed_mask` from the 2D padding mask, eager softmax."""
    padding = reference_attention.padding
    allowed = allowed_mask(semantic_ids, padding)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: any finite output (unused)
    return attention.eager_attention(module, query, key, value, allowed, scaling=scaling)[0], None


def register(name, function):
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)  # the model's mask built as for "hsa"


register("hsa_reference", reference_attention)


def loss_and_grads(net, ids, roles, mask):
    net.zero_grad(set_to_none=True)
    # a token is predicted from the position before it: never from padding (a padding query's output is
    # arbitrary: zeros in the compacted plan, a finite average in the dense one; as in training data, where
    # the first tokens of a conversation are never labelled)
    follows_padding = torch.cat([torch.ones_like(mask[:, :1]), 1 - mask[:, :-1]], 1).bool()
    labels = ids.masked_fill((mask == 0) | follows_padding, -100)
    out = net(ids, attention_mask=mask, semantic_ids=roles, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same_on_real_tokens(a, b, mask):
    logits_a, grads_a = a
    logits_b, grads_b = b
    real = mask.bool()
    torch.testing.assert_close(logits_a[real], logits_b[real], atol=2e-5, rtol=2e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=2e-5, rtol=2e-4, msg=name)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("compact_from", [10 ** 9, 1])  # the dense shared mask, then the compacted rows
def test_shared_plan_equals_each_layer_alone(monkeypatch, padding, compact_from):
    monkeypatch.setattr(attention, "COMPACT_FROM", compact_from)
    ids, roles, mask = batch(padding=padding)
    reference_attention.padding = mask
    got = loss_and_grads(model("hsa"), ids, roles, mask)
    want = loss_and_grads(model("hsa_reference"), ids, roles, mask)
    assert_same_on_real_tokens(got, want, mask)


def test_one_plan_per_forward_pass_shared_by_every_layer(monkeypatch):
    builds, layers = [], []
    real_allowed, real_forward = attention.hsa_allowed, attention.hsa_attention_forward
    monkeypatch.setattr(attention, "hsa_allowed", lambda *a, **k: builds.append(1) or real_allowed(*a, **k))
    register("hsa_counted", lambda *a, **k: layers.append(1) or real_forward(*a, **k))
    net = model("hsa_counted")
    for seed in range(3):
        ids, roles, mask = batch(seed)
        with torch.no_grad():
            net(ids, attention_mask=mask, semantic_ids=roles)
        assert len(builds) == seed + 1  # one mask per forward, not one per layer
    assert len(layers) == 3 * SMALL["num_hidden_layers"]


def test_the_dense_plan_is_the_additive_form_of_the_brute_force_mask():
    ids, roles, mask = batch(1)
    kept = {}
    real_shared = attention._shared

    def spy(kind, query, key, attention_mask, semantic_ids, role, build):
        value = real_shared(kind, query, key, attention_mask, semantic_ids, role, build)
        kept.setdefault(kind, value)
        return value
    try:
        attention._shared = spy
        with torch.no_grad():
            model()(ids, attention_mask=mask, semantic_ids=roles)
    finally:
        attention._shared = real_shared
    (kind, bias), = kept.values()
    assert kind == "dense" and bias.dtype == torch.float32
    allowed = allowed_mask(roles, mask)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    assert torch.equal(bias == 0, allowed)
    assert torch.equal(torch.isneginf(bias), ~allowed)


def forward_logits(net, ids, roles, mask):
    with torch.no_grad():
        return net(ids, attention_mask=mask, semantic_ids=roles).logits


@pytest.mark.parametrize("compact_from", [10 ** 9, 1])
def test_a_kept_plan_is_never_reused_for_another_batch(monkeypatch, compact_from):
    monkeypatch.setattr(attention, "COMPACT_FROM", compact_from)
    net, reference = model(), model("hsa_reference")

    def check(ids, roles, mask, got):
        reference_attention.padding = mask
        real = mask.bool()
        torch.testing.assert_close(got[real], forward_logits(reference, ids, roles, mask)[real],
                                   atol=2e-5, rtol=2e-5)

    # consecutive batches of the same shape: new tensors, new plans
    for seed in range(3):
        ids, roles, mask = batch(seed)
        check(ids, roles, mask, forward_logits(net, ids, roles, mask))

    # the same tensors changed in place: their version counters move, the plan is rebuilt. Without padding
    # the model passes no mask, so the plan is kept on the roles tensor itself, across forward passes
    for padding in ("none", "right"):
        ids, roles, mask = batch(5, padding=padding)
        forward_logits(net, ids, roles, mask)
        roles[roles == NOISE] = 0
        roles[:, ::3] = NOISE
        check(ids, roles, mask, forward_logits(net, ids, roles, mask))
        roles[:, 1::3] = NOISE
        check(ids, roles, mask, forward_logits(net, ids, roles, mask))
    mask[0, -4:] = 0
    roles[mask == 0] = NOISE
    check(ids, roles, mask, forward_logits(net, ids, roles, mask))


def test_a_plan_kept_on_a_mask_is_not_used_with_other_roles():
    # The plan lives on the model's 4D mask; roles are checked by identity (a weak reference) and version,
    # so another roles tensor, even one at the same address as a freed one, gets a plan of its own.
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 11, 8, generator=gen)
    key, value = torch.randn(2, 2, 11, 8, generator=gen), torch.randn(2, 2, 11, 8, generator=gen)
    real = torch.ones(2, 11, dtype=torch.bool)
    real[1, -3:] = False
    model_mask = torch.ones(11, 11, dtype=torch.bool).tril() & real[:, None, None, :]
    module = torch.nn.Module()
    module.is_causal, module.training = True, False

    def run(roles):
        return attention.hsa_attention_forward(module, query, key, value, model_mask, semantic_ids=roles)[0]

    def expected(roles):
        allowed = allowed_mask(roles, real)
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, enable_gqa=True).transpose(1, 2)

    for seed in range(20):
        roles = torch.randint(0, 3, (2, 11), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(run(roles), expected(roles), atol=1e-5, rtol=1e-5)
        del roles
        gc.collect()
        fresh = torch.randint(0, 3, (2, 11), generator=torch.Generator().manual_seed(100 + seed))
        torch.testing.assert_close(run(fresh), expected(fresh), atol=1e-5, rtol=1e-5)
        del fresh  # (CPython often hands a freed tensor's address to the next one: identity alone is no key)


def test_generation_role_and_dtype_are_part_of_the_key():
    gen = torch.Generator().manual_seed(4)
    roles = torch.randint(0, 3, (1, 9), generator=gen)
    ids = torch.randint(3, 120, (1, 12), generator=gen)  # three keys past the roles: generated tokens
    net = model()
    with torch.no_grad():
        as_landmark = net(ids, semantic_ids=roles).logits
        as_noise = net(ids, semantic_ids=roles, hsa_generation_role="noise").logits
        again = net(ids, semantic_ids=roles).logits
        noise_roles = torch.cat([roles, torch.full((1, 3), NOISE)], 1)
        torch.testing.assert_close(as_noise, net(ids, semantic_ids=noise_roles).logits)
    torch.testing.assert_close(as_landmark, again)
    assert not torch.allclose(as_landmark[0, -1], as_noise[0, -1])
    double = model().double()
    with torch.no_grad():
        torch.testing.assert_close(double(ids, semantic_ids=roles).logits.float(), as_landmark,
                                   atol=1e-4, rtol=1e-4)


def test_the_flex_path_builds_one_block_mask_per_forward_pass(monkeypatch):
    # The GPU path, run here on the CPU with FlexAttention uncompiled (forward only): every layer of a forward
    # pass gets the block mask the first one built, a new batch gets its own, and the output is the rule's.
    from torch.nn.attention import flex_attention as flex

    monkeypatch.setattr(attention, "_compiled_flex", flex.flex_attention)
    made = []
    real_create = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: made.append(1) or real_create(*a, **k))
    gen = torch.Generator().manual_seed(6)
    module = torch.nn.Module()
    for batch_index in range(2):
        roles = torch.randint(0, 3, (2, 40), generator=gen)
        real = torch.ones(2, 40, dtype=torch.bool)
        real[1, -9:] = False
        model_mask = torch.ones(40, 40, dtype=torch.bool).tril() & real[:, None, None, :]
        allowed = allowed_mask(roles, real)
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        for layer in range(3):
            q, k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(3))
            out, _ = attention.flex_attention_forward(module, q, k, v, allowed_roles=(roles, model_mask),
                                                      generation_role=1)
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
            torch.testing.assert_close(out[real], want[real], atol=1e-5, rtol=1e-5)
        assert len(made) == batch_index + 1
