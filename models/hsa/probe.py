"""Looking at attention without asking every layer for its weights.

An `AttentionProbe` rides along one forward pass as the keyword argument `hsa_probe` (transformers
forwards it to attention, like `semantic_ids`). Every decoder attention layer reports to it: the
probe recomputes that layer's probabilities in query chunks — never the whole [heads, L, L] at once
outside the kept layer — and keeps only what was asked for: the full map of one layer (one head or
the mean over heads) and, per layer, the attention mass chosen queries put on chosen keys.
The layer's own output is computed as usual (SDPA), so the probe does not change the model's result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import repeat_kv


@dataclass
class AttentionProbe:
    layer: int | None = None  # the layer whose map to keep (None: no map)
    head: int | None = None  # None: the mean over heads
    query_mask: torch.Tensor | None = None  # [B, Q] bool: queries whose mass is measured
    key_groups: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, K] bool keys
    chunk: int = 256
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Q, K] float32
    mass: dict[str, dict[int, float]] = field(default_factory=dict)  # group -> layer -> mean mass

    def observe(self, module, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor | None,
                scaling: float | None) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            return
        keep_map = layer == self.layer
        if not keep_map and not self.key_groups:
            return
        with torch.no_grad():
            self._observe(layer, keep_map, query, key, allowed, scaling)

    def _observe(self, layer, keep_map, query, key, allowed, scaling):
        batch, heads, q_len, _ = query.shape
        key = repeat_kv(key, heads // key.shape[1]).float()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        kv_len = key.shape[2]
        kept = torch.zeros(batch, q_len, kv_len) if keep_map else None
        sums = {name: 0.0 for name in self.key_groups}
        count = 0
        queries = self.query_mask[:, -q_len:] if self.query_mask is not None else None
        for start in range(0, q_len, self.chunk):
            stop = min(start + self.chunk, q_len)
            scores = torch.matmul(query[:, :, start:stop].float(), key.transpose(2, 3)) * scale
            if allowed is not None:
                scores = scores.masked_fill(~allowed[:, :, start:stop, :kv_len], torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)  # [B, H, chunk, K]
            if keep_map:
                kept[:, start:stop] = probs.mean(1) if self.head is None else probs[:, self.head]
            if self.key_groups:
                selected = queries[:, start:stop] if queries is not None else torch.ones(
                    batch, stop - start, dtype=torch.bool)
                count += int(selected.sum()) * heads
                for name, keys in self.key_groups.items():
                    on_group = (probs * keys[:, None, None, :kv_len].to(probs.dtype)).sum(-1)  # [B, H, chunk]
                    sums[name] += float((on_group * selected[:, None, :].to(probs.dtype)).sum())
        if keep_map:
            self.maps[layer] = kept
        for name in self.key_groups:
            self.mass.setdefault(name, {})[layer] = sums[name] / count if count else 0.0

    def mass_by_layer(self, name: str) -> list[float]:
        layers = self.mass.get(name, {})
        return [layers[k] for k in sorted(layers)]
