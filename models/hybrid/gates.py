"""The fusion gates: statistics from forward passes, and the regularizers a training loop may add.

g is the weight of the Mamba branch: fused = g * h_ssm + (1 - g) * h_attn. A layer whose g stays
near 1 hardly uses its attention; near 0, hardly its Mamba branch (models.hybrid.prune reads that).
"""
from __future__ import annotations

import math

import torch

from .modeling import FusionGate, HSAHybridModel

LOW, HIGH = 0.1, 0.9  # the fractions reported: g below LOW, g above HIGH


def hybrid_base(model) -> HSAHybridModel:
    """The HSAHybridModel inside `model` (itself, a ForCausalLM, a LLaVA VLM, a peft wrapper)."""
    if isinstance(model, HSAHybridModel):
        return model
    for module in model.modules():
        if isinstance(module, HSAHybridModel):
            return module
    raise ValueError(f"{type(model).__name__} contains no hsa_hybrid language model")


def _gates(model) -> list[FusionGate]:
    return [m for m in hybrid_base(model).modules() if isinstance(m, FusionGate)]


def _real(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The gate values of real tokens, flattened ([B, L, H] -> [N])."""
    if mask is not None and mask.shape == values.shape[:2]:
        return values[mask.to(values.device).bool()].reshape(-1)
    return values.reshape(-1)


class GateMonitor:
    """Per-layer gate statistics over the forward passes run inside it:

        with GateMonitor(model, attention_mask=batch["attention_mask"]) as monitor:
            model(**batch)
        monitor.stats()   # [{"mean", "std", "low", "high", "tokens"} or None, one per layer]

    Padding (attention_mask == 0) is left out when the mask matches the forward's [B, L]. With
    keep_values=True, `values` holds each layer's gate tensor of the last forward, graph attached,
    for the regularizers below."""

    def __init__(self, model, attention_mask: torch.Tensor | None = None, keep_values: bool = False):
        self.base = hybrid_base(model)
        self.attention_mask = attention_mask
        self.keep_values = keep_values
        self.values: dict[int, torch.Tensor] = {}
        self._handles = []
        self.reset()

    def reset(self):
        self._sums = {}  # layer -> [count, sum, sum of squares, below LOW, above HIGH] in float64
        self.values = {}

    def _observe(self, gate: FusionGate, args, output: torch.Tensor):
        if self.keep_values:
            self.values[gate.layer_idx] = output
        g = _real(output.detach(), self.attention_mask).double()
        acc = self._sums.setdefault(gate.layer_idx, [0, 0.0, 0.0, 0, 0])
        acc[0] += g.numel()
        acc[1] += g.sum().item()
        acc[2] += (g * g).sum().item()
        acc[3] += int((g < LOW).sum())
        acc[4] += int((g > HIGH).sum())

    def __enter__(self):
        self._handles = [gate.register_forward_hook(self._observe) for gate in _gates(self.base)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def stats(self) -> list[dict | None]:
        out = []
        for layer in range(len(self.base.layers)):
            acc = self._sums.get(layer)
            if not acc or not acc[0]:
                out.append(None)  # no gate (a pruned layer) or nothing seen
                continue
            n, s, s2, low, high = acc
            mean = s / n
            out.append({"mean": mean, "std": math.sqrt(max(s2 / n - mean * mean, 0.0)),
                        "low": low / n, "high": high / n, "tokens": n})
        return out


@torch.no_grad()
def gate_stats(model, **inputs) -> list[dict | None]:
    """Per-layer gate statistics of one forward pass over `inputs` (input_ids, attention_mask, ...)."""
    with GateMonitor(model, attention_mask=inputs.get("attention_mask")) as monitor:
        model(**inputs)
    return monitor.stats()


def _per_layer(gates) -> list[torch.Tensor]:
    values = list(gates.values()) if isinstance(gates, dict) else list(gates)
    if not values:
        raise ValueError("no gate values: run a forward pass inside GateMonitor(model, keep_values=True)")
    return values


def load_balance_loss(gates, target: float = 0.5, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of (mean g - target)^2: keeps each layer's mix from drifting to one branch
    (gates: a layer -> [B, L, H] dict such as GateMonitor.values, or a list)."""
    terms = [(_real(g, attention_mask).mean() - target) ** 2 for g in _per_layer(gates)]
    return torch.stack(terms).mean()


def gate_entropy(gates, attention_mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Mean binary entropy of g in nats (log 2 at g = 0.5, 0 when saturated), averaged over layers."""
    terms = []
    for g in _per_layer(gates):
        g = _real(g, attention_mask).clamp(eps, 1 - eps)
        terms.append(-(g * g.log() + (1 - g) * (1 - g).log()).mean())
    return torch.stack(terms).mean()


def gate_entropy_loss(gates, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """-gate_entropy: added to the training loss (with a small weight, early in training), it pushes g
    away from 0 and 1 so that neither branch is switched off before both have learnt something."""
    return -gate_entropy(gates, attention_mask)
