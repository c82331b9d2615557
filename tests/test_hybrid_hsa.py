"""HSA in both branches of the hybrid: change the content (token ids) of NOISE tokens, and the logits
at GLOBAL/LANDMARK positions must not move, in prefill and in cached decoding, unpruned and pruned.
Each check also shows that without roles the NOISE content does reach those positions."""
import pytest
import torch

from models.hsa import GLOBAL, LANDMARK, NOISE, generate
from models.hybrid.testing import PRUNED, tiny_llava, tiny_model

MODELS = {
    "hybrid": {},
    "pruned": dict(num_hidden_layers=6, layer_types=PRUNED),
    "mamba_only": dict(num_hidden_layers=2, layer_types=["linear_attention"] * 2),
    "sliding_only": dict(num_hidden_layers=2, layer_types=["sliding_attention"] * 2),
}


def roles_and_ids(batch=2, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    roles = torch.randint(0, 3, (batch, length), generator=gen)
    roles[:, -1] = LANDMARK
    ids = torch.randint(3, 119, (batch, length), generator=gen)
    return roles, ids


def with_noise_changed(ids, roles, seed=1):
    other = torch.randint(3, 119, ids.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(roles == NOISE, other, ids)


@pytest.mark.parametrize("name", MODELS)
def test_prefill_noise_content_does_not_reach_global_and_landmark_logits(name):
    model = tiny_model(seed=1, **MODELS[name])
    roles, ids = roles_and_ids()
    changed = with_noise_changed(ids, roles)
    keep = roles != NOISE
    with torch.no_grad():
        a = model(ids, semantic_ids=roles).logits
        b = model(changed, semantic_ids=roles).logits
        plain_a, plain_b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain_a[keep], plain_b[keep], atol=1e-4)  # without roles it leaks


def test_noise_is_masked_in_the_mamba_branch_by_a_combined_mask():
    # padding and NOISE together: the padded row still equals the row alone, roles and all
    model = tiny_model(seed=2)
    roles, ids = roles_and_ids(length=20, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, semantic_ids=roles).logits
        alone = model(ids[1:, 6:], semantic_ids=roles[1:, 6:]).logits
    torch.testing.assert_close(batch[1, 6:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hybrid", "pruned", "mamba_only"])
def test_cached_decoding_ignores_noise_step_by_step(name):
    model = tiny_model(seed=4, **MODELS[name])
    roles, ids = roles_and_ids(batch=1, length=14, seed=5)
    changed = with_noise_changed(ids, roles, seed=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    if name == "mamba_only":  # no attention layer: decode by hand with the cache
        a, b = greedy_by_hand(model, ids, roles), greedy_by_hand(model, changed, roles)
        plain = greedy_by_hand(model, ids, None), greedy_by_hand(model, changed, None)
    else:
        a = generate(model, input_ids=ids, semantic_ids=roles, **kwargs)
        b = generate(model, input_ids=changed, semantic_ids=roles, **kwargs)
        plain = model.generate(ids, **kwargs), model.generate(changed, **kwargs)
    assert torch.equal(a.sequences[:, 14:], b.sequences[:, 14:])
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[0].scores[0], plain[1].scores[0], atol=1e-4)
    # the cached steps equal a full forward where generated tokens have the generation role (LANDMARK)
    full_roles = torch.cat([roles, torch.full((1, 8), LANDMARK)], 1)
    with torch.no_grad():
        full = model(a.sequences, semantic_ids=full_roles).logits
    for step, scores in enumerate(a.scores):
        torch.testing.assert_close(full[:, 13 + step], scores, atol=1e-4, rtol=1e-4)


class _Out:
    def __init__(self, sequences, scores):
        self.sequences, self.scores = sequences, scores


@torch.no_grad()
def greedy_by_hand(model, ids, roles, steps=8):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(ids, semantic_ids=roles, past_key_values=cache, use_cache=True)
    sequences, scores = ids, []
    for _ in range(steps):
        logits = out.logits[:, -1]
        scores.append(logits)
        token = logits.argmax(-1, keepdim=True)
        sequences = torch.cat([sequences, token], 1)
        out = model(token, semantic_ids=roles, past_key_values=cache, use_cache=True)
    return _Out(sequences, scores)


def test_generation_role_noise_applies_to_both_branches():
    model = tiny_model(seed=7)
    roles, ids = roles_and_ids(batch=1, length=16, seed=8)
    prefix = roles[:, :10]
    with torch.no_grad():
        default = model(ids, semantic_ids=prefix).logits
        landmark = model(ids, semantic_ids=torch.cat([prefix, torch.full((1, 6), LANDMARK)], 1)).logits
        as_noise = model(ids, semantic_ids=prefix, hsa_generation_role="noise").logits
        noise = model(ids, semantic_ids=torch.cat([prefix, torch.full((1, 6), NOISE)], 1)).logits
    torch.testing.assert_close(default, landmark)
    torch.testing.assert_close(as_noise, noise)
    assert not torch.allclose(default, noise)


def test_llava_over_the_hybrid_ignores_noise_text():
    model = tiny_llava()
    ids = torch.randint(3, 110, (1, 16), generator=torch.Generator().manual_seed(9))
    ids[0, 1:5] = model.config.image_token_id
    roles = torch.full_like(ids, GLOBAL)
    roles[0, 7:11] = NOISE
    roles[0, 12:] = LANDMARK
    changed = with_noise_changed(ids, roles, seed=10)
    pixels = torch.randn(1, 3, 28, 28)
    keep = roles != NOISE
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels, semantic_ids=roles).logits
        b = model(input_ids=changed, pixel_values=pixels, semantic_ids=roles).logits
        pa = model(input_ids=ids, pixel_values=pixels).logits
        pb = model(input_ids=changed, pixel_values=pixels).logits
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pa[keep], pb[keep], atol=1e-4)
    ga = generate(model, input_ids=ids, pixel_values=pixels, semantic_ids=roles, max_new_tokens=5, do_sample=False,
                  pad_token_id=0)
    gb = generate(model, input_ids=changed, pixel_values=pixels, semantic_ids=roles, max_new_tokens=5,
                  do_sample=False, pad_token_id=0)
    assert torch.equal(ga[:, 16:], gb[:, 16:])
