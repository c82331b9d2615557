"""Gate statistics and regularizers, and LoRA with the hybrid's default targets (peft)."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from models.hybrid import (GateMonitor, default_lora_targets, gate_entropy, gate_entropy_loss, gate_stats,
                           load_balance_loss)
from models.hybrid.testing import PRUNED, tiny_llava, tiny_model


def recomputed_gates(model, ids):
    """Each gate recomputed from the layer inputs (output_hidden_states) and the gate's weights."""
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    gates = {}
    for i, layer in enumerate(model.model.layers):
        if layer.fusion_gate is None:
            continue
        z = layer.input_layernorm(hidden[i])
        gates[i] = torch.sigmoid(torch.tanh(z @ layer.fusion_gate.u_proj.weight.T) @ layer.fusion_gate.d_proj.weight.T)
    return gates


def test_gate_stats_per_layer_match_a_recomputation_and_skip_padding():
    model = tiny_model(seed=1, num_hidden_layers=6, layer_types=PRUNED)
    with torch.no_grad():  # spread the gates out so that the fractions are not trivially 0
        for layer in model.model.layers:
            if layer.fusion_gate is not None:
                layer.fusion_gate.d_proj.weight.mul_(400)
    ids = torch.randint(3, 119, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    stats = gate_stats(model, input_ids=ids, attention_mask=mask)
    assert len(stats) == 6 and [s is None for s in stats] == [False, True, True, True, True, False]
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i in (0, 5):
        layer = model.model.layers[i]
        z = layer.input_layernorm(hidden[i])
        g = torch.sigmoid(torch.tanh(z @ layer.fusion_gate.u_proj.weight.T) @ layer.fusion_gate.d_proj.weight.T)
        g = g[mask.bool()].double()
        assert stats[i]["mean"] == pytest.approx(g.mean().item(), abs=1e-6)
        assert stats[i]["std"] == pytest.approx(g.std(unbiased=False).item(), abs=1e-5)
        assert stats[i]["low"] == pytest.approx((g < 0.1).double().mean().item())
        assert stats[i]["high"] == pytest.approx((g > 0.9).double().mean().item())
        assert stats[i]["tokens"] == g.numel() == 53 * 32
        assert 0 < stats[i]["low"] < 1 and 0 < stats[i]["high"] < 1


def test_monitor_accumulates_over_forwards_and_leaves_no_hooks():
    model = tiny_model(seed=2)
    a = torch.randint(3, 119, (1, 12), generator=torch.Generator().manual_seed(1))
    b = torch.randint(3, 119, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), GateMonitor(model) as monitor:
        model(a)
        model(b)
    gates_a, gates_b = recomputed_gates(model, a), recomputed_gates(model, b)
    both = torch.cat([gates_a[0].reshape(-1), gates_b[0].reshape(-1)])
    assert monitor.stats()[0]["mean"] == pytest.approx(both.mean().item(), abs=1e-6)
    assert all(not layer.fusion_gate._forward_hooks for layer in model.model.layers)


def test_regularizers():
    g = {0: torch.full((1, 4, 8), 0.8), 1: torch.full((1, 4, 8), 0.3)}
    assert load_balance_loss(g, target=0.5).item() == pytest.approx(((0.8 - 0.5) ** 2 + (0.3 - 0.5) ** 2) / 2)
    half = [torch.full((2, 3, 4), 0.5)]
    assert gate_entropy(half).item() == pytest.approx(math.log(2), abs=1e-6)
    assert gate_entropy([torch.full((2, 3, 4), 1.0)]).item() == pytest.approx(0, abs=1e-4)
    mask = torch.tensor([[1, 1, 0, 0]])
    padded = torch.tensor([[[0.6], [0.6], [0.99], [0.99]]])
    assert load_balance_loss([padded], target=0.5, attention_mask=mask).item() == pytest.approx(0.01, abs=1e-6)
    # the losses' gradients move the gates the intended way on a real model
    model = tiny_model(seed=3).train()
    ids = torch.randint(3, 119, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.fusion_gate.d_proj.weight.add_(0.5)  # push every gate up, towards saturation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = None
    for _ in range(5):
        with GateMonitor(model, keep_values=True) as monitor:
            model(ids)
        loss = load_balance_loss(monitor.values, target=0.5) + gate_entropy_loss(monitor.values)
        before = loss.item() if before is None else before
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < before


def test_default_lora_targets_train_and_merge():
    model = tiny_model(seed=4, num_hidden_layers=6, layer_types=PRUNED)
    targets = default_lora_targets(model)
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj",
                      "u_proj", "d_proj"}
    assert not any(t.endswith(("out_proj", "conv1d")) for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    wrapped = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
               if hasattr(m, "lora_A")}
    assert wrapped == set(targets)
    ids = torch.randint(3, 119, (4, 16), generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name in merged.state_dict())


def test_lora_targets_of_a_vlm_stay_in_the_language_model():
    model = tiny_llava()
    targets = default_lora_targets(model)
    assert targets and all(t.startswith("model.language_model.layers.") for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    assert not any(hasattr(m, "lora_A") for m in peft_model.base_model.model.model.vision_tower.modules())
