"""The embedded hybrid VLM and its pruned export: the composed VLM's recipe (`composed.py`: a tiny CLIP
tower, LLaVA's projector, picture-in-words LM pretraining, align, LoRA SFT with HSA and the look-up
loss) over the Mamba+attention hybrid LM (`models.hybrid`) instead of Qwen3, trained with the gate
regularizers, then planned and pruned by `models.hybrid.make_plan` / `export`, all in one command:
`python -m models.zoo build-hybrid`.

What differs from the composed build, and why:

- **The LM** (`hybrid_lm_config`): an `HSAHybridConfig` of the composed Qwen3's size (hidden 128, 4
  layers, 4 heads / 2 KV heads, MLP 384, tied embeddings, rope_theta 1e6) with layers
  `hybrid, hybrid, hybrid, hybrid_sliding`: a 64-token window is a turn or two of a 100-250
  token conversation, so the sliding layers' attention is local and the picture (the first tokens)
  is out of their reach from the answers; the full layers do the look-up. Mamba: 8 heads of 32
  (inner 256 = 2 x hidden), state 16, one group, conv 4, chunk 64.
- **No look-up loss** (`lm_stage`, `sft_stage`): the composed build's `ShapeLookup` loss, read on the
  hybrid's full-attention layers, stalled its LM at loss 0.27 (colours unreadable; the VLM answered
  0.37); without it the LM learnt the task (0.14 by step 350 of a short trial).
- **The gate regularizers** (`GateRegularizer`, `models.hybrid`'s `GateMonitor(keep_values=True)`,
  `load_balance_loss`, `gate_entropy_loss`): the entropy bonus only for the first steps of LM
  pretraining (no branch switched off before both have learnt something), then a balance loss per
  layer toward a target: Mamba-leaning (`SLIDING_TARGET`) in the sliding layers, even (`FULL_TARGET`)
  in the full ones. It is a prior, not a decision: the language-model loss pushes a gate back where
  its attention is needed, and the plan reads the gates measured afterwards on held-out conversations.
  Per-layer gate means are logged every 25 steps into build.json.
- **The plan** (`PLAN_THRESHOLDS` for `make_plan`): attention dropped where mean g >= 0.85, full
  attention made sliding where g >= 0.6, at least one full-attention layer kept; a plan that removes
  no attention branch is an error. `export` writes the pruned model with prune_plan.json; then a short
  healing SFT (`heal_stage`, LoRA, merged) on the pruned model, since removing attention at g ~ 0.9
  replaces g by 1, which is not exact.

What was measured while choosing this is in README.md ("The embedded hybrid VLM").
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import DEFAULT_HYBRID_DIR, DEFAULT_HYBRID_PRUNED_DIR, shapes
from . import composed as C

SLIDING_TARGET = 0.95  # balance target of the gates of the sliding layers (g = weight of Mamba)
FULL_TARGET = 0.5  # ... and of the full-attention layers
PLAN_THRESHOLDS = {"attention_drop_above": 0.85, "mamba_drop_below": 0.05, "sliding_above": 0.6,
                   "min_full_attention": 1}
GATE_SPLIT = "gates"  # the held-out conversations the plan's gate statistics are measured on
BUILD_EVAL_SEED = 9  # the build's own accuracy check (split "eval", as `python -m models.zoo eval`)


@dataclass
class HybridSize(C.ComposedSize):
    mamba_heads: int = 8
    mamba_head_dim: int = 32
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 64
    sliding_window: int = 64
    gate_rank: int = 16
    layer_types: list = field(default_factory=lambda: ["hybrid", "hybrid", "hybrid", "hybrid_sliding"])


@dataclass
class GateSettings:
    entropy_weight: float = 0.01
    entropy_steps: int = 150  # LM pretraining only
    balance_weight: float = 0.1
    sliding_target: float = SLIDING_TARGET
    full_target: float = FULL_TARGET


def lm_stage(steps: int = 1000, *, seed: int = 0) -> C.Stage:
    """The composed LM stage without the look-up loss: with it (weight 3, on the full-attention layers)
    the hybrid LM stalled, unable to read colours (models/zoo/README.md has the figures)."""
    stage = C.lm_stage(steps, seed=seed)
    stage.lookup_weight = 0.0
    return stage


def sft_stage(steps: int = 300, *, seed: int = 0) -> C.Stage:
    stage = C.sft_stage(steps, seed=seed)
    stage.lookup_weight = 0.0
    return stage


def heal_stage(steps: int = 80, *, seed: int = 0) -> C.Stage:
    """A short SFT of the pruned model (LoRA, merged), as the SFT stage but gentler and on fresh data.
    Without the look-up loss, as `sft_stage`: with it the heal cost the pruned model accuracy (README)."""
    stage = sft_stage(steps, seed=seed)
    stage.name, stage.learning_rate, stage.data_split = "heal", 1e-3, "heal"
    stage.warmup_steps = min(10, max(1, steps // 10))
    return stage


def hybrid_lm_config(tokenizer, size: HybridSize):
    import models.hybrid  # noqa: F401  (registers hsa_hybrid)
    from models.hybrid import HSAHybridConfig

    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return HSAHybridConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.hidden_size // size.heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=size.tie_word_embeddings,
        mamba_d_ssm=size.mamba_heads * size.mamba_head_dim, mamba_n_heads=size.mamba_heads,
        mamba_d_head=size.mamba_head_dim, mamba_d_state=size.mamba_d_state, mamba_n_groups=1,
        mamba_d_conv=size.mamba_d_conv, mamba_chunk_size=size.mamba_chunk_size,
        sliding_window=size.sliding_window, gate_rank=size.gate_rank, layer_types=list(size.layer_types),
        bos_token_id=pad, eos_token_id=end, pad_token_id=pad)


BRANCH_NORM_INIT = 1.0  # the branch norms' initial weight (FalconH1's); see `new_hybrid_lm`


def new_hybrid_lm(size: HybridSize, branch_norm_init: float = BRANCH_NORM_INIT):
    """An untrained hybrid LM whose branch output norms (ssm_norm, attn_norm) start at `branch_norm_init`.
    With FalconH1's 1 every block adds a unit-RMS output to a residual stream whose embeddings have
    RMS 0.02; 0.02 (Qwen-like small block outputs at init) was tried and learnt no faster (README)."""
    from models.hybrid import HSAHybridForCausalLM

    def make(tokenizer):
        model = HSAHybridForCausalLM(hybrid_lm_config(tokenizer, size))
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.ssm_norm, layer.attn_norm):
                    if norm is not None:
                        norm.weight.fill_(branch_norm_init)
        return model
    return make


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None and mask.shape == values.shape[:2]:
        values = values[mask.bool()]
    return values.float().mean().item()


class GateRegularizer:
    """The gate regularizers as an extra training loss for `composed.pretrain_lm` / `train_sft`:
    per layer `balance_weight` x (mean g - target)^2 (`load_balance_loss`, the target per layer type)
    and, for the first `entropy_steps` steps, `entropy_weight` x -entropy(g) (`gate_entropy_loss`).
    Logs per-layer gate means every `log_every` steps (`log`: [{"step", "means"}])."""

    def __init__(self, settings: GateSettings, *, entropy: bool = True, log_every: int = 25):
        self.settings = settings
        self.entropy = entropy
        self.log_every = log_every
        self.step = 0
        self.log: list[dict] = []
        self.monitor = None
        self.targets: dict[int, float] = {}

    def attach(self, model):
        from models.hybrid import GateMonitor, hybrid_base, is_sliding

        types = hybrid_base(model).config.layer_types
        self.targets = {i: self.settings.sliding_target if is_sliding(t) else self.settings.full_target
                        for i, t in enumerate(types)}
        self.monitor = GateMonitor(model, keep_values=True)
        return self.monitor

    def loss(self, batch) -> torch.Tensor:
        from models.hybrid import gate_entropy_loss, load_balance_loss

        values, mask = self.monitor.values, batch["attention_mask"]
        s = self.settings
        total = s.balance_weight * torch.stack(
            [load_balance_loss({i: v}, self.targets[i], mask) for i, v in values.items()]).mean()
        if self.entropy and self.step < s.entropy_steps:
            total = total + s.entropy_weight * gate_entropy_loss(values, mask)
        if self.step % self.log_every == 0:
            self.log.append({"step": self.step,
                             "means": [round(_masked_mean(values[i].detach(), mask), 3) for i in sorted(values)]})
        self.step += 1
        self.monitor.reset()  # the statistics' running sums are not used here
        return total


def measure_gates(model, processor, *, n_batches: int = 4, seed: int = 0) -> list[dict]:
    """Per-batch gate statistics of the VLM on held-out conversations (split `GATE_SPLIT`, training-like
    NOISE turns, HSA on): the gate_stats.jsonl records the plan reads ({"step", "layers"})."""
    from models.hybrid import GateMonitor

    stage = C.Stage(name="gates", steps=n_batches, seed=seed, data_split=GATE_SPLIT, noise=shapes.TRAIN_NOISE)
    batches = C.conversation_batches(processor, stage)
    model.eval()
    records = []
    with torch.no_grad():
        for i in range(n_batches):
            batch, _, _ = next(batches)
            with GateMonitor(model, attention_mask=batch["attention_mask"]) as monitor:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], semantic_ids=batch["semantic_ids"])
            records.append({"step": i, "split": GATE_SPLIT, "conversations": len(batch["input_ids"]),
                            "layers": monitor.stats()})
    return records


def accuracy(model_dir: Path, *, n: int, seed: int = BUILD_EVAL_SEED, progress: bool = False) -> float:
    """Held-out clean accuracy through models.vlm (load_vlm + generate_reply), as `eval` measures it."""
    from .evaluate import evaluate_model

    return round(evaluate_model(model_dir, n=n, seed=seed, progress=progress).accuracy, 4)


def _write_json(path: Path, record: dict):
    path.write_text(json.dumps(record, indent=1))


def build_hybrid(out_dir: str | Path = DEFAULT_HYBRID_DIR, pruned_dir: str | Path = DEFAULT_HYBRID_PRUNED_DIR, *,
                 seed: int = 0, threads: int | None = C.DEFAULT_THREADS, vision_steps: int | None = None,
                 lm_steps: int | None = None, align_steps: int | None = None, sft_steps: int | None = None,
                 heal_steps: int | None = None, eval_n: int = 50, size: HybridSize | None = None,
                 gates: GateSettings | None = None, plan_thresholds: dict | None = None,
                 parts_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Pretrain the vision tower and the hybrid LM, assemble, align, SFT, merge, save to `out_dir`;
    measure the gates, plan, export the pruned model to `pruned_dir`, heal it; evaluate both."""
    from models.composed import assemble
    from models.hybrid import default_lora_targets, export, load, make_plan
    from models.hybrid.prune import STATS_FILE, describe_plan

    if threads:
        torch.set_num_threads(threads)
    size = size or HybridSize()
    gates = gates or GateSettings()
    thresholds = {**PLAN_THRESHOLDS, **(plan_thresholds or {})}
    kw = lambda steps: {} if steps is None else {"steps": steps}
    stages = [C.vision_stage(seed=seed, **kw(vision_steps)), lm_stage(seed=seed, **kw(lm_steps)),
              C.align_stage(seed=seed, **kw(align_steps)), sft_stage(seed=seed, **kw(sft_steps)),
              heal_stage(seed=seed, **kw(heal_steps))]
    vision, lm, align, sft, heal = stages
    out, pruned = Path(out_dir), Path(pruned_dir)
    start = time.monotonic()
    load_before = os.getloadavg()
    seconds, losses, gate_log = {}, {}, {}

    def timed(name, began):
        seconds[name] = round(time.monotonic() - began, 1)
        if progress:
            print(f"{name}: {seconds[name]:.0f} s (total {time.monotonic() - start:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        parts = Path(parts_dir) if parts_dir is not None else Path(scratch)
        began = time.monotonic()
        _, losses["vision"] = C.pretrain_vision(vision, size, parts / "vision", progress=progress)
        timed("vision", began)
        began = time.monotonic()
        processor = C.training_processor()
        regularizer = GateRegularizer(gates)
        _, losses["lm"] = C.pretrain_lm(lm, size, processor, parts / "lm", progress=progress,
                                        new_lm=new_hybrid_lm(size), regularizer=regularizer)
        gate_log["lm"] = regularizer.log
        timed("lm", began)
        began = time.monotonic()
        model, processor = assemble(parts / "vision", parts / "lm", vision_feature_layer=C.VISION_FEATURE_LAYER)
        torch.manual_seed(seed)
        losses["align"] = C.train_align(model, processor, align, progress=progress)
        timed("align", began)
    began = time.monotonic()
    regularizer = GateRegularizer(gates, entropy=False)
    model, losses["sft"] = C.train_sft(model, processor, sft, progress=progress, lora_targets=default_lora_targets(model),
                                       regularizer=regularizer)
    gate_log["sft"] = regularizer.log
    timed("sft", began)

    # gate statistics on held-out conversations -> the plan
    began = time.monotonic()
    stats_records = measure_gates(model, processor, seed=seed)
    layer_types = list(model.config.text_config.layer_types)
    window = model.config.text_config.sliding_window
    record = {
        "model": "tiny CLIP vision tower + 2-layer GELU projector + tiny Mamba+attention hybrid "
                 "(hsa_hybrid, LlavaForConditionalGeneration)",
        "stages": [s.to_dict() for s in stages[:4]], "size": asdict(size), "gates": asdict(gates),
        "vision_feature_layer": C.VISION_FEATURE_LAYER, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpus": os.cpu_count(),
        "final_loss": {name: round(values[-1], 4) for name, values in losses.items() if values},
        "loss_every_25": {name: [round(v, 4) for v in values[::25]] for name, values in losses.items()},
        "gate_means_every_25": gate_log,
    }
    C.save(model, processor, out, record)
    (out / STATS_FILE).write_text("".join(json.dumps(r) + "\n" for r in stats_records))
    from models.hybrid import read_gate_stats

    stats, steps = read_gate_stats(out / STATS_FILE, last=len(stats_records))
    plan = make_plan(stats, layer_types, sliding_window=window, source=f"{out.name}/{STATS_FILE} (held-out "
                     f"split {GATE_SPLIT!r}, {sum(r['conversations'] for r in stats_records)} conversations)",
                     steps=steps, **thresholds)
    dropped = [d["layer"] for d in plan["layers"] if d["action"] in ("drop_attention", "drop_mamba")]
    if not dropped:
        # no gate crossed the threshold: drop attention in the one layer that leans most to Mamba (recorded)
        highest = max(d["gate"]["mean"] for d in plan["layers"] if d["gate"])
        thresholds.update(attention_drop_above=math.floor(highest * 100) / 100, max_attention_drops=1)
        plan = make_plan(stats, layer_types, sliding_window=window, source=plan["source"], steps=steps, **thresholds)
        plan["fallback"] = f"no layer had mean g >= {PLAN_THRESHOLDS['attention_drop_above']}: threshold lowered"
        if not any(d["action"] in ("drop_attention", "drop_mamba") for d in plan["layers"]):
            raise RuntimeError("the gates' plan removes no branch:\n" + describe_plan(plan))
    if progress:
        print(describe_plan(plan), flush=True)
    _write_json(out / "prune_plan.json", plan)
    export(out, plan, pruned)
    (pruned / STATS_FILE).unlink(missing_ok=True)  # the unpruned model's; the plan names its source
    timed("plan+export", began)

    losses["heal"] = []
    if heal.steps > 0:
        began = time.monotonic()
        pruned_model = load(pruned).float()
        from transformers import AutoProcessor

        pruned_processor = AutoProcessor.from_pretrained(pruned)
        pruned_model, losses["heal"] = C.train_sft(pruned_model, pruned_processor, heal, progress=progress,
                                                   lora_targets=default_lora_targets(pruned_model))
        C.save(pruned_model, pruned_processor, pruned, {})
        timed("heal", began)

    # accuracy of both, through models.vlm as `python -m models.zoo eval` measures it
    began = time.monotonic()
    acc = {"unpruned": accuracy(out, n=eval_n), "pruned": accuracy(pruned, n=eval_n)}
    timed("eval", began)
    total = time.monotonic() - start
    load_after = os.getloadavg()
    common = {"seconds": round(total), "seconds_per_stage": seconds,
              "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
              "accuracy": {**acc, "n": eval_n, "eval_seed": BUILD_EVAL_SEED, "noise": "clean"}}
    record.update(common)
    _write_json(out / "build.json", record)
    plan_summary = [{"layer": d["layer"], "before": d["before"], "after": d["after"], "action": d["action"],
                     "gate_mean": round(d["gate"]["mean"], 3) if d["gate"] else None} for d in plan["layers"]]
    _write_json(pruned / "build.json", {
        "model": record["model"] + ", pruned by its gates' plan (prune_plan.json)", "pruned_from": out.name,
        "plan": plan_summary, "thresholds": thresholds, "heal_stage": heal.to_dict(),
        "final_loss": {"heal": round(losses["heal"][-1], 4)} if losses["heal"] else {},
        "loss_every_25": {"heal": [round(v, 4) for v in losses["heal"][::25]]}, "size": asdict(size),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), **common})
    if progress:
        print(f"accuracy on {eval_n} held-out conversations (eval seed {BUILD_EVAL_SEED}): "
              f"unpruned {acc['unpruned']:.3f}, pruned {acc['pruned']:.3f}")
        print(f"saved {out} and {pruned} after {total:.0f} s")
    return out, pruned
