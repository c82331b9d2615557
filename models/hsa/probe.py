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
        names = list(self.key_groups)
        # all key groups at once: [B, 1, K, G], so mass is one matmul per chunk
        groups = (torch.stack([self.key_groups[n][:, :kv_len] for n in names], dim=-1).float()[:, None]
                  if names else None)
        sums = torch.zeros(len(names))
        count = 0
        queries = self.query_mask[:, -q_len:] if self.query_mask is not None else None
        for start in range(0, q_len, self.chunk):
            stop = min(start + self.chunk, q_len)
            selected = (queries[:, start:stop] if queries is not None
                        else torch.ones(batch, stop - start, dtype=torch.bool))
            if not keep_map and not selected.any():
                continue  # nothing to measure in this chunk and no map to keep
            scores = torch.matmul(query[:, :, start:stop].float(), key.transpose(2, 3)).mul_(scale)
            if allowed is not None:
                scores.masked_fill_(~allowed[:, :, start:stop, :kv_len], torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)  # [B, H, chunk, K]
            if keep_map:
                kept[:, start:stop] = probs.mean(1) if self.head is None else probs[:, self.head]
            if names:
                count += int(selected.sum()) * heads
                on_groups = torch.matmul(probs, groups)  # [B, H, chunk, G]
                sums += (on_groups * selected[:, None, :, None]).sum(dim=(0, 1, 2))
        if keep_map:
            self.maps[layer] = kept
        for index, name in enumerate(names):
            self.mass.setdefault(name, {})[layer] = float(sums[index]) / count if count else 0.0

    def mass_by_layer(self, name: str) -> list[float]:
        layers = self.mass.get(name, {})
        return [layers[k] for k in sorted(layers)]
