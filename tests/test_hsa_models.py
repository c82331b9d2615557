"""attn_implementation="hsa" on tiny models of real architectures, built from configs (no download)."""
import threading

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from conftest import shapes_png, tiny_qwen2vl
from models.hsa import GLOBAL, LANDMARK, NOISE, generate
from models.data.align import HSACollator

SMALL = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def text_model(name, implementation="hsa"):
    config_cls, model_cls = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL, head_dim=8) if name == "qwen3" else config_cls(**SMALL))
    model.set_attn_implementation(implementation)
    return model.eval()


def roles_and_ids(batch=2, length=14, seed=0):
    gen = torch.Generator().manual_seed(seed)
    roles = torch.randint(0, 3, (batch, length), generator=gen)
    roles[:, -1] = LANDMARK  # the last query is a landmark that must ignore noise
    ids = torch.randint(3, 120, (batch, length), generator=gen)
    return roles, ids


def with_noise_changed(ids, roles, seed=1, low=3, high=120):
    gen = torch.Generator().manual_seed(seed)
    other = torch.randint(low, high, ids.shape, generator=gen)
    return torch.where(roles == NOISE, other, ids)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_without_semantic_ids_hsa_equals_sdpa_on_padded_batches(name, padding_side):
    roles, ids = roles_and_ids()
    mask = torch.ones_like(ids)
    if padding_side == "left":
        mask[0, :5] = 0
    else:
        mask[0, -5:] = 0
    hsa, sdpa = text_model(name, "hsa"), text_model(name, "sdpa")
    with torch.no_grad():
        a = hsa(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    if padding_side == "left":  # the padding mask really reached the custom implementation
        with torch.no_grad():
            unmasked = hsa(ids).logits
        assert not torch.allclose(a[0][real[0]], unmasked[0][real[0]], atol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_roles_without_noise_give_sdpa_logits_and_gradients(padding_side):
    # NOISE only on padding: nothing to hide, so HSA takes the model's own mask (its fast path)
    roles, ids = roles_and_ids()
    roles[roles == NOISE] = GLOBAL
    mask = torch.ones_like(ids)
    pad = slice(0, 5) if padding_side == "left" else slice(-5, None)
    mask[0, pad] = 0
    roles[0, pad] = NOISE
    hsa, sdpa = text_model("qwen2", "hsa").train(), text_model("qwen2", "sdpa").train()
    a = hsa(ids, attention_mask=mask, semantic_ids=roles, labels=ids).loss
    b = sdpa(ids, attention_mask=mask, labels=ids).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    for (name, p), q in zip(hsa.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_noise_tokens_do_not_reach_global_and_landmark_positions(name):
    roles, ids = roles_and_ids()
    changed = with_noise_changed(ids, roles)
    model = text_model(name)
    with torch.no_grad():
        a = model(ids, semantic_ids=roles).logits
        b = model(changed, semantic_ids=roles).logits
        plain_a, plain_b = model(ids).logits, model(changed).logits
    keep = roles != NOISE
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain_a[keep], plain_b[keep], atol=1e-3)  # without HSA noise leaks


def test_padded_hsa_batch_matches_each_sequence_alone():
    roles, ids = roles_and_ids(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    model = text_model("qwen2")
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, semantic_ids=roles).logits
        alone = model(ids[1:, 4:], semantic_ids=roles[1:, 4:]).logits
    torch.testing.assert_close(batch[1, 4:], alone[0], atol=1e-5, rtol=1e-5)


def test_generate_with_kv_cache_ignores_noise_step_by_step():
    roles, ids = roles_and_ids(batch=1, length=12, seed=3)
    changed = with_noise_changed(ids, roles, seed=4)
    model = text_model("llama")
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    a = generate(model, input_ids=ids, semantic_ids=roles, **kwargs)
    b = generate(model, input_ids=changed, semantic_ids=roles, **kwargs)
    assert torch.equal(a.sequences[:, 12:], b.sequences[:, 12:])
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    # the cached decode steps match a full forward pass over the same tokens
    with torch.no_grad():
        full = model(a.sequences, semantic_ids=roles).logits
    torch.testing.assert_close(full[0, -2], a.scores[-1][0], atol=1e-4, rtol=1e-4)
    plain_a = model.generate(ids, **kwargs)
    plain_b = model.generate(changed, **kwargs)
    assert not torch.allclose(plain_a.scores[0], plain_b.scores[0], atol=1e-3)
    # beam search expands the batch; the roles follow each beam
    beams = generate(model, input_ids=ids, semantic_ids=roles, num_beams=3, max_new_tokens=4, pad_token_id=0)
    beams_b = generate(model, input_ids=changed, semantic_ids=roles, num_beams=3, max_new_tokens=4,
                       pad_token_id=0)
    assert torch.equal(beams[:, 12:], beams_b[:, 12:])


def test_generation_role_is_configurable():
    roles, ids = roles_and_ids(batch=1, length=10, seed=5)
    model = text_model("qwen2")
    prefix = roles[:, :6]
    with torch.no_grad():
        default = model(ids, semantic_ids=prefix).logits
        landmark = model(ids, semantic_ids=torch.cat([prefix, torch.full((1, 4), LANDMARK)], 1)).logits
        as_noise = model(ids, semantic_ids=prefix, hsa_generation_role="noise").logits
        noise = model(ids, semantic_ids=torch.cat([prefix, torch.full((1, 4), NOISE)], 1)).logits
    torch.testing.assert_close(default, landmark)
    torch.testing.assert_close(as_noise, noise)
    model.config.hsa_generation_role = NOISE
    with torch.no_grad():
        torch.testing.assert_close(model(ids, semantic_ids=prefix).logits, noise)


def test_attention_weights_fall_back_to_eager_and_show_the_rule():
    roles = torch.tensor([[GLOBAL, NOISE, GLOBAL, NOISE, LANDMARK, NOISE]])
    ids = torch.arange(3, 9)[None]
    model = text_model("llama")
    with torch.no_grad():
        out = model(ids, semantic_ids=roles, output_attentions=True)
        reference = model(ids, semantic_ids=roles)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)
    for layer in out.attentions:
        probs = layer[0]  # [heads, q, k]
        assert torch.all(probs[:, [0, 2, 4]][:, :, [1, 3, 5]] == 0)
        assert torch.all(probs[:, 5, :6] > 0)  # a noise query sees everything before it
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


def test_threads_with_different_roles_do_not_interfere():
    roles, ids = roles_and_ids(batch=1, length=16, seed=7)
    other_roles = torch.zeros_like(roles)
    model = text_model("qwen3")
    with torch.no_grad():
        want = {0: model(ids, semantic_ids=roles).logits, 1: model(ids, semantic_ids=other_roles).logits}
    got, errors = {}, []

    def run(key, r):
        try:
            with torch.no_grad():
                for _ in range(20):
                    got[key] = model(ids, semantic_ids=r).logits
                    torch.testing.assert_close(got[key], want[key])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(0, roles)), threading.Thread(target=run, args=(1, other_roles))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors


def test_qwen2vl_with_an_image_ignores_noise_turns(qwen2vl_processor, tmp_path):
    shapes_png(tmp_path / "red.png")

    def record(noise_text):
        return {"conversations": [
            {"from": "human", "value": "<image>What color is the circle?"},
            {"from": "gpt", "value": "The circle is red.", "semantic_type": "LANDMARK"},
            {"from": "human", "value": noise_text, "semantic_type": "NOISE"},
            {"from": "human", "value": "And how many shapes are there?"},
            {"from": "gpt", "value": "There is one shape.", "semantic_type": "LANDMARK"}],
            "images": ["red.png"]}
    a = HSACollator(qwen2vl_processor, image_root=tmp_path)([record("I think the circle is green.")])
    b = dict(a, input_ids=with_noise_changed(a["input_ids"], a["semantic_ids"], low=10, high=300))
    assert not torch.equal(a["input_ids"], b["input_ids"])
    model = tiny_qwen2vl(qwen2vl_processor)
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
        pa = model(**{k: v for k, v in a.items() if k != "semantic_ids"}).logits
        pb = model(**{k: v for k, v in b.items() if k != "semantic_ids"}).logits
    keep = a["semantic_ids"] != NOISE
    torch.testing.assert_close(la[keep], lb[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pa[keep], pb[keep], atol=1e-3)
    sdpa = tiny_qwen2vl(qwen2vl_processor, attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(pa, sdpa(**{k: v for k, v in a.items() if k != "semantic_ids"}).logits,
                                   atol=1e-5, rtol=1e-5)


def test_probe_keeps_one_layer_and_measures_mass_without_changing_outputs():
    from models.hsa import AttentionProbe

    roles, ids = roles_and_ids(batch=1, length=20, seed=9)
    model = text_model("llama")
    attend = roles != NOISE
    with torch.no_grad():
        reference = model(ids, semantic_ids=roles, output_attentions=True)
        plain = model(ids, output_attentions=True)
        for semantic_ids, expected in ((roles, reference), (None, plain)):
            probe = AttentionProbe(layer=1, head=None, query_mask=attend, key_groups={"noise": roles == NOISE},
                                   chunk=7)
            out = model(ids, semantic_ids=semantic_ids, hsa_probe=probe)
            torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
            assert list(probe.maps) == [1]
            torch.testing.assert_close(probe.maps[1][0], expected.attentions[1][0].mean(0), atol=1e-5, rtol=1e-5)
            for layer, weights in enumerate(expected.attentions):
                on_noise = (weights[0] * (roles[0] == NOISE)).sum(-1)  # [heads, q]
                want = on_noise[:, attend[0]].mean().item()
                assert probe.mass["noise"][layer] == pytest.approx(want, abs=1e-5)
        assert probe.mass_by_layer("noise")[0] > 0.01  # without HSA, landmarks look at noise
        probe_on = AttentionProbe(layer=0, head=2, query_mask=attend, key_groups={"noise": roles == NOISE})
        model(ids, semantic_ids=roles, hsa_probe=probe_on)
    assert probe_on.mass_by_layer("noise") == [0.0, 0.0]
    torch.testing.assert_close(probe_on.maps[0][0], reference.attentions[0][0, 2], atol=1e-5, rtol=1e-5)
