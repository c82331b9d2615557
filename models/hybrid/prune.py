"""Prune plans from gate statistics, pruning a loaded model, and exporting the pruned model.

A plan is JSON: the new per-layer type list (the config's `layer_types`, which is the pruning
format) with a reason per layer. Pruning only removes: a branch (its weights leave the checkpoint
and its cache state goes with it: no KV cache without attention, no SSM state without Mamba) or
switches attention between full and sliding-window (same weights, smaller cache).

The approximation: a hybrid block outputs g * h_ssm + (1 - g) * h_attn. Removing attention replaces
g by 1 (the block outputs h_ssm alone); removing Mamba replaces g by 0. That is exact only where g
was 0 or 1, which is why the plan removes a branch only where the measured mean of g is close to it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .configuration import (MODEL_TYPE, canonical_layer_type, has_attention, has_mamba, is_sliding,
                            layer_type_for)
from .gates import gate_stats, hybrid_base

THRESHOLDS = {
    "attention_drop_above": 0.9,  # mean g at or above: attention contributes little -> drop attention
    "mamba_drop_below": 0.1,      # mean g at or below: Mamba contributes little -> drop Mamba
    "sliding_above": 0.6,         # a kept attention branch with mean g at or above -> sliding window
    "max_attention_drops": None,  # at most this many layers lose attention (None: no cap but the next)
    "min_full_attention": 1,      # keep at least this many full-attention layers
}
STATS_FILE = "gate_stats.jsonl"


# ---- gate statistics --------------------------------------------------------------------------

def read_gate_stats(path: str | Path, last: int = 10) -> tuple[list[dict | None], list]:
    """Per-layer gate statistics averaged over the last `last` logged steps of a gate_stats.jsonl
    (one JSON object per line: {"step": N, "layers": [{"mean", "std", "low", "high"} or null, ...]}),
    or of a JSON file holding one such object. Returns (per-layer stats, the steps used)."""
    text = Path(path).read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()] if str(path).endswith(".jsonl") \
        else [json.loads(text)]
    records = [r for r in records if r.get("layers")]
    if not records:
        raise ValueError(f"{path}: no gate statistics")
    records = records[-last:]
    n_layers = len(records[-1]["layers"])
    averaged = []
    for i in range(n_layers):
        seen = [r["layers"][i] for r in records if i < len(r["layers"]) and r["layers"][i]]
        averaged.append(None if not seen else
                        {k: sum(s[k] for s in seen) / len(seen) for k in ("mean", "std", "low", "high")})
    return averaged, [r.get("step") for r in records]


def synthetic_input(config, *, batch: int = 2, tokens: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token ids (no image tokens) for measuring gates when no data is supplied."""
    text_config = config.get_text_config(decoder=True)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text_config.vocab_size, (batch, tokens), generator=gen)
    image_token = getattr(config, "image_token_id", None)
    if image_token is not None:
        ids[ids == image_token] = (image_token + 1) % text_config.vocab_size
    return ids


def measure_gate_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    model.eval()
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return gate_stats(model, **kwargs)


# ---- plans ------------------------------------------------------------------------------------

def _g(stats: dict) -> str:
    return f"g mean {stats['mean']:.2f} (std {stats['std']:.2f}, {stats['low']:.0%} < 0.1, {stats['high']:.0%} > 0.9)"


def make_plan(stats: list[dict | None], layer_types: list[str], *, sliding_window: int | None = None,
              source: str | None = None, steps: list | None = None, **thresholds) -> dict:
    """Which layers keep which branch, from per-layer gate statistics (g = weight of the Mamba branch).

    Only layers with both branches are changed. Mean g >= attention_drop_above drops attention (the
    highest first, up to max_attention_drops); <= mamba_drop_below drops Mamba; a kept attention
    branch with mean g >= sliding_above becomes sliding-window. At least min_full_attention layers keep
    full attention: those that rely most on attention (lowest g) are restored first."""
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown plan settings {sorted(unknown)}; known: {sorted(THRESHOLDS)}")
    t = {**THRESHOLDS, **{k: v for k, v in thresholds.items() if v is not None}}
    if not t["mamba_drop_below"] < t["attention_drop_above"]:
        raise ValueError("mamba_drop_below must be below attention_drop_above")
    layer_types = [canonical_layer_type(x) for x in layer_types]
    if len(stats) != len(layer_types):
        raise ValueError(f"gate statistics for {len(stats)} layers, but the model has {len(layer_types)}")

    decisions = []
    for i, (before, s) in enumerate(zip(layer_types, stats)):
        d = {"layer": i, "before": before, "after": before, "gate": s, "action": "keep"}
        if not (has_mamba(before) and has_attention(before)):
            d["reason"] = "one branch or none: no gate to read, kept as is"
        elif s is None:
            d["reason"] = "no gate statistics for this layer: kept as is"
        elif s["mean"] >= t["attention_drop_above"]:
            d.update(action="drop_attention", after=layer_type_for(True, False),
                     reason=f"{_g(s)}: the Mamba branch carries the output, attention contributes little")
        elif s["mean"] <= t["mamba_drop_below"]:
            d.update(action="drop_mamba", after=layer_type_for(False, True, is_sliding(before)),
                     reason=f"{_g(s)}: attention carries the output, the Mamba branch contributes little")
        elif s["mean"] >= t["sliding_above"] and not is_sliding(before):
            d.update(action="sliding", after=layer_type_for(True, True, True),
                     reason=f"{_g(s)}: Mamba carries most of the output and the long context; attention "
                            f"kept for local detail in a window")
        else:
            d["reason"] = f"{_g(s)}: both branches contribute, kept"
        decisions.append(d)

    # the cap on attention drops: the layers with the highest g keep their drop
    drops = sorted((d for d in decisions if d["action"] == "drop_attention"), key=lambda d: -d["gate"]["mean"])
    cap = t["max_attention_drops"]
    for d in drops[cap:] if cap is not None else []:
        sliding = d["gate"]["mean"] >= t["sliding_above"]
        d.update(action="sliding" if sliding and not is_sliding(d["before"]) else "keep",
                 after=layer_type_for(True, True, sliding or is_sliding(d["before"])),
                 reason=f"{_g(d['gate'])}: would drop attention, but at most {cap} layer(s) may lose it"
                        + ("; attention kept in a window" if sliding else ""))

    # keep enough full-attention layers: restore full attention where it was trained (full before),
    # on the layers that rely on it the most (lowest g); a Mamba drop decided above stays
    def full(d):
        return has_attention(d["after"]) and not is_sliding(d["after"])
    missing = t["min_full_attention"] - sum(full(d) for d in decisions)
    restorable = sorted((d for d in decisions if not full(d) and has_attention(d["before"]) and d["gate"]),
                        key=lambda d: (is_sliding(d["before"]), d["gate"]["mean"]))
    for d in restorable[:max(missing, 0)]:
        d.update(action="drop_mamba" if d["action"] == "drop_mamba" else "keep",
                 after=layer_type_for(has_mamba(d["after"]), True, False),
                 reason=f"{_g(d['gate'])}: kept with full attention, the model keeps at least "
                        f"{t['min_full_attention']} full-attention layer(s) and this layer relies on attention "
                        f"the most")
    if t["min_full_attention"] - sum(full(d) for d in decisions) > 0:
        raise ValueError(f"cannot keep {t['min_full_attention']} full-attention layer(s): the model has "
                         f"{sum(has_attention(x) for x in layer_types)} attention layer(s) with gate statistics")
    return {
        "version": 1,
        "source": source,
        "steps": steps,
        "thresholds": t,
        "sliding_window": sliding_window,
        "layer_types_before": layer_types,
        "layer_types": [d["after"] for d in decisions],
        "layers": decisions,
    }


def describe_plan(plan: dict) -> str:
    lines = [f"layer {d['layer']:>3}: {d['before']:>17} -> {d['after']:<17} {d['reason']}" for d in plan["layers"]]
    return "\n".join(lines)


# ---- pruning and export -----------------------------------------------------------------------

def prune_model(model, layer_types: list[str], sliding_window: int | None = None):
    """Prune the hybrid language model inside `model` (a hybrid CausalLM or a VLM over one) in place to
    `layer_types`: removed branches' modules (and the gate where one branch is left) are deleted, and
    the config's layer types rewritten. Returns the model."""
    base = hybrid_base(model)
    config = base.config
    new_types = [canonical_layer_type(x) for x in layer_types]
    if len(new_types) != len(base.layers):
        raise ValueError(f"{len(new_types)} layer types for a model of {len(base.layers)} layers")
    for i, (old, new) in enumerate(zip(config.layer_types, new_types)):
        if (has_mamba(new) and not has_mamba(old)) or (has_attention(new) and not has_attention(old)):
            raise ValueError(f"layer {i}: {old} -> {new} would add a branch; pruning only removes")
    window = sliding_window or config.sliding_window
    for layer, new in zip(base.layers, new_types):
        if not has_mamba(new):
            layer.mamba = layer.ssm_norm = None
        if not has_attention(new):
            layer.self_attn = layer.attn_norm = None
        else:
            layer.self_attn.sliding_window = window if is_sliding(new) else None
        if not (has_mamba(new) and has_attention(new)):
            layer.fusion_gate = None  # g folded to 1 (attention gone) or 0 (Mamba gone)
        if not (has_mamba(new) or has_attention(new)) and hasattr(layer, "input_layernorm"):
            del layer.input_layernorm
        layer.layer_type = new
    configs = {id(config): config}
    top = getattr(model, "config", None)
    if top is not None and top.get_text_config(decoder=True) is not top:
        configs.setdefault(id(top.get_text_config(decoder=True)), top.get_text_config(decoder=True))
    for c in configs.values():
        c.layer_types = list(new_types)
        c.sliding_window = window
    return model


def _model_class(config):
    import transformers

    import models.hybrid  # noqa: F401  (registers the model type)

    if config.model_type == MODEL_TYPE:
        return transformers.AutoModelForCausalLM
    text = config.get_text_config(decoder=True)
    if getattr(text, "model_type", None) != MODEL_TYPE:
        raise ValueError(f"{config.model_type} model whose language model is {text.model_type}, not {MODEL_TYPE}")
    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForImageTextToText


def load(model_dir: str | Path, **kwargs):
    """A hybrid CausalLM directory, or a VLM (e.g. LLaVA) directory whose text_config is the hybrid."""
    from transformers import AutoConfig

    import models.hybrid  # noqa: F401

    config = AutoConfig.from_pretrained(model_dir)
    return _model_class(config).from_pretrained(model_dir, dtype="auto", **kwargs)


_WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model.bin.index.json")


def export(model_dir: str | Path, plan: dict | str | Path, out_dir: str | Path) -> Path:
    """Write the pruned model: the remaining weights (safetensors) and the rewritten config, plus the
    directory's other files (tokenizer, processor, chat template) and the plan (prune_plan.json)."""
    if not isinstance(plan, dict):
        plan = json.loads(Path(plan).read_text())
    if "layer_types" not in plan:
        raise ValueError("the plan has no layer_types")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load(model_dir)
    prune_model(model, plan["layer_types"], plan.get("sliding_window"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.name not in _WRITTEN_BY_SAVE and not item.name.startswith("model-") \
                and not (out_dir / item.name).exists():
            shutil.copy2(item, out_dir / item.name)
    (out_dir / "prune_plan.json").write_text(json.dumps(plan, indent=2))
    return out_dir
