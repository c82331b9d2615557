"""Prune plans from gate statistics, pruning with the gate folded away, and `python -m models.hybrid
plan/export` on a plain hybrid directory and on a LLaVA directory over the hybrid."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache, LlavaForConditionalGeneration

from models.hybrid import make_plan, prune_model, read_gate_stats
from models.hybrid.prune import measure_gate_stats, synthetic_input
from models.hybrid.__main__ import main
from models.hybrid.testing import tiny_llava, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def layer(mean, std=0.05, low=0.0, high=0.0):
    return {"mean": mean, "std": std, "low": low, "high": high}


def test_read_gate_stats_averages_the_last_steps(tmp_path):
    path = tmp_path / "gate_stats.jsonl"
    lines = [{"step": s, "layers": [layer(0.1 * s), None, layer(0.5)]} for s in range(1, 6)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    stats, steps = read_gate_stats(path, last=2)
    assert steps == [4, 5]
    assert stats[0]["mean"] == pytest.approx(0.45) and stats[1] is None and stats[2]["mean"] == 0.5


def test_plan_drops_branches_by_gate_mean_with_a_cap_and_keeps_full_attention():
    stats = [layer(0.95), layer(0.05), layer(0.7), layer(0.4), layer(0.97), layer(0.93), None]
    types = ["hybrid"] * 6 + ["linear_attention"]
    plan = make_plan(stats, types, sliding_window=256)
    assert plan["layer_types"] == ["linear_attention", "full_attention", "hybrid_sliding", "hybrid",
                                   "linear_attention", "linear_attention", "linear_attention"]
    assert all(d["reason"] for d in plan["layers"])
    assert "contributes little" in plan["layers"][0]["reason"]
    capped = make_plan(stats, types, max_attention_drops=2)
    # the two highest g drop attention; the third keeps it, in a window
    assert capped["layer_types"][:6] == ["linear_attention", "full_attention", "hybrid_sliding", "hybrid",
                                         "linear_attention", "hybrid_sliding"]
    assert "at most 2" in capped["layers"][5]["reason"]
    # everything wants to drop attention: the layer relying most on attention keeps it, full
    saturated = make_plan([layer(0.99), layer(0.95), layer(0.97)], ["hybrid"] * 3)
    assert saturated["layer_types"] == ["linear_attention", "hybrid", "linear_attention"]
    assert "at least 1 full-attention" in saturated["layers"][1]["reason"]
    sliding = make_plan([layer(0.7), layer(0.8)], ["hybrid"] * 2, min_full_attention=1)
    assert sliding["layer_types"] == ["hybrid", "hybrid_sliding"]
    strict = make_plan([layer(0.85), layer(0.5)], ["hybrid"] * 2, attention_drop_above=0.8, sliding_above=0.45)
    assert strict["layer_types"] == ["linear_attention", "hybrid"]
    with pytest.raises(ValueError, match="unknown plan settings"):
        make_plan(stats, types, drop_everything=True)


def force_gate(model, layer_idx, value):
    """A forward hook replacing one gate's output by a constant (the value pruning folds it to)."""
    gate = model.model.layers[layer_idx].fusion_gate
    return gate.register_forward_hook(lambda module, args, out: torch.full_like(out, value))


def test_pruning_folds_the_gate_to_one_or_zero():
    reference = tiny_model(seed=1)
    pruned = tiny_model(seed=1)
    prune_model(pruned, ["linear_attention", "sliding_attention", "hybrid", "hybrid_sliding"])
    handles = [force_gate(reference, 0, 1.0), force_gate(reference, 1, 0.0)]
    ids = torch.randint(3, 119, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        got = pruned(ids).logits
    [h.remove() for h in handles]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(reference(ids).logits, got, atol=1e-4)  # the gate did matter
    assert pruned.model.layers[0].self_attn is None and pruned.model.layers[0].fusion_gate is None
    assert pruned.model.layers[1].mamba is None and pruned.model.layers[1].fusion_gate is None
    with pytest.raises(ValueError, match="would add a branch"):
        prune_model(pruned, ["hybrid"] * 4)


def test_pruned_cache_follows_the_layer_types():
    full = tiny_model(seed=2)
    pruned = prune_model(tiny_model(seed=2), ["linear_attention", "sliding_attention", "hybrid", "mlp"])
    ids = torch.randint(3, 119, (1, 30), generator=torch.Generator().manual_seed(1))
    sizes = {}
    for name, model in (("full", full), ("pruned", pruned)):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        kv = [getattr(l, "keys", None) for l in cache.layers]
        ssm = [getattr(l, "recurrent_states", {0: None})[0] for l in cache.layers]
        sizes[name] = (kv, ssm)
    kv, ssm = sizes["pruned"]
    assert kv[0] is None and ssm[0] is not None       # Mamba only: no KV cache
    assert kv[1].shape[2] == 5 and ssm[1] is None      # sliding attention only: window - 1 keys, no SSM state
    assert kv[2].shape[2] == 30 and ssm[2] is not None
    assert kv[3] is None and ssm[3] is None            # MLP only: nothing


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "models.hybrid", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def safetensor_keys(directory):
    with safe_open(str(Path(directory) / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_plan_and_export_a_hybrid_directory(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")  # travels with the export
    stats = tmp_path / "run" / "gate_stats.jsonl"
    stats.parent.mkdir()
    stats.write_text("\n".join(json.dumps({"step": s, "layers": [layer(0.95), layer(0.05), layer(0.7), layer(0.3)]})
                               for s in range(3)))
    assert main(["plan", str(tmp_path / "run"), "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    # layer 2 (g 0.7) would slide, but one full-attention layer stays: it relies on attention the most
    # among the layers trained with full attention
    assert plan["layer_types"] == ["linear_attention", "sliding_attention", "hybrid", "hybrid_sliding"]
    assert "at least 1 full-attention" in plan["layers"][2]["reason"]
    done = run_cli("export", tmp_path / "model", "--plan", tmp_path / "plan.json", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    keys = safetensor_keys(tmp_path / "out")
    assert not any(k.startswith("model.layers.0.self_attn") for k in keys)
    assert not any(k.startswith("model.layers.1.mamba") for k in keys)
    assert not any(k.startswith(("model.layers.0.fusion_gate", "model.layers.1.fusion_gate")) for k in keys)
    assert any(k.startswith("model.layers.2.fusion_gate") for k in keys)
    assert len(keys) < len(safetensor_keys(tmp_path / "model"))
    assert (tmp_path / "out" / "tokenizer_config.json").exists() and (tmp_path / "out" / "prune_plan.json").exists()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.layer_types == plan["layer_types"]
    ids = torch.randint(3, 119, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, prune_model(model, plan["layer_types"])(ids).logits)
    out = loaded.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 22)


def test_plan_measures_a_model_without_statistics_and_export_prunes_a_llava_dir(tmp_path):
    vlm = tiny_llava()
    vlm.save_pretrained(tmp_path / "vlm")
    # the plan command on a model directory without statistics measures the gates on synthetic input
    assert main(["plan", str(tmp_path / "vlm"), "--out", str(tmp_path / "measured.json"), "--tokens", "24"]) == 0
    measured = json.loads((tmp_path / "measured.json").read_text())
    assert len(measured["layers"]) == 4 and all(d["gate"]["tokens"] == 2 * 24 * 32 for d in measured["layers"])
    assert measured["layer_types_before"] == vlm.config.text_config.layer_types
    # gates pinned near 1 (layer 0) and 0 (layer 1) in memory: the measured plan prunes those branches
    language = vlm.model.language_model
    language.layers[0].fusion_gate.forward = lambda z: torch.full_like(z, 0.97)
    language.layers[1].fusion_gate.forward = lambda z: torch.full_like(z, 0.02)
    stats = measure_gate_stats(vlm, synthetic_input(vlm.config, tokens=32))
    plan = make_plan(stats, vlm.config.text_config.layer_types, sliding_window=6)
    assert plan["layer_types"] == ["linear_attention", "sliding_attention", "hybrid", "hybrid_sliding"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["export", str(tmp_path / "vlm"), "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "out")]) == 0
    keys = safetensor_keys(tmp_path / "out")  # LLaVA's checkpoint names: language_model.model.layers...
    language = {k for k in keys if k.startswith("language_model.")}
    assert not any(".layers.0.self_attn." in k or ".layers.0.fusion_gate." in k for k in language)
    assert not any(".layers.1.mamba." in k for k in language)
    assert any(".layers.0.mamba." in k for k in language) and any(".layers.1.self_attn." in k for k in language)
    assert any(k.startswith("vision_tower.") for k in keys)
    assert keys < safetensor_keys(tmp_path / "vlm")
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.text_config.layer_types == plan["layer_types"]
    ids = torch.randint(3, 110, (1, 12), generator=torch.Generator().manual_seed(5))
    ids[0, 1:5] = loaded.config.image_token_id
    out = loaded.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)
    assert out.shape == (1, 18)
