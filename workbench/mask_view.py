"""What the HSA mask tab shows, as plain data and figures: the mask of one conversation for one
tokenizer, coloured by role pair, and how many query->key pairs HSA blocks."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch

from models.hsa import GLOBAL, LANDMARK, NOISE, ROLE_NAMES, allowed_mask
from models.data.align import AlignError, Aligned, align_record, parse_marked_text

ROLE_COLORS = {GLOBAL: "#2f6fdf", LANDMARK: "#1a9e55", NOISE: "#b0b0b0"}
# Cell categories of the heatmap: 0 future (causal), 1 blocked by HSA, 2.. allowed, by role pair.
FUTURE, BLOCKED = 0, 1
ALLOWED_PAIRS = [(q, k) for q in (GLOBAL, LANDMARK, NOISE) for k in (GLOBAL, LANDMARK, NOISE)
                 if not (q != NOISE and k == NOISE)]
CATEGORY_NAMES = ["future (causal)", "blocked by HSA"] + [
    f"{ROLE_NAMES[q]} → {ROLE_NAMES[k]}" for q, k in ALLOWED_PAIRS]
CATEGORY_COLORS = ["#ffffff", "#d62728",
                   "#9ec5fe", "#5b8def", "#a3e4bd", "#34b36b", "#e0e0e0", "#c8c8c8", "#a0a0a0"]


def parse_conversation_text(text: str) -> dict:
    """A pasted conversation: ShareGPT JSON (a record, or a list whose first record is used) or
    marked text (`[user]`, `[assistant: landmark]`, `[user: noise]` lines start turns)."""
    text = (text or "").strip()
    if not text:
        raise AlignError("paste a conversation: ShareGPT JSON or [user] / [assistant] marked text")
    if text[0] in "[{" and not text.startswith(("[system", "[user", "[human", "[assistant", "[gpt")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AlignError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(data, list):
            if not data:
                raise AlignError("the JSON list is empty")
            data = data[0]
        return data
    return parse_marked_text(text)


@dataclass
class MaskView:
    aligned: Aligned
    allowed: torch.Tensor  # [L, L] bool: causal and the HSA rule
    categories: np.ndarray  # [L, L] int8, see CATEGORY_NAMES

    @property
    def roles(self) -> list[int]:
        return self.aligned.semantic_ids.tolist()


def build_mask_view(record: dict, processor, *, image_root=None, max_length: int | None = None) -> MaskView:
    aligned = align_record(record, processor, image_root=image_root, max_length=max_length)
    roles = aligned.semantic_ids[None]
    allowed = allowed_mask(roles)[0, 0]
    causal = torch.ones_like(allowed).tril()
    categories = np.full(allowed.shape, FUTURE, dtype=np.int8)
    categories[(causal & ~allowed).numpy()] = BLOCKED
    q_roles, k_roles = roles[0][:, None], roles[0][None, :]
    for index, (q, k) in enumerate(ALLOWED_PAIRS, start=2):
        categories[(allowed & (q_roles == q) & (k_roles == k)).numpy()] = index
    return MaskView(aligned, allowed, categories)


def pair_summary(view: MaskView) -> list[list]:
    """Rows: query role, key role, causal pairs, blocked by HSA, still allowed, % blocked."""
    roles = view.aligned.semantic_ids
    causal = torch.ones_like(view.allowed).tril()
    rows = []
    for q in (GLOBAL, LANDMARK, NOISE):
        for k in (GLOBAL, LANDMARK, NOISE):
            pairs = causal & (roles[:, None] == q) & (roles[None, :] == k)
            total = int(pairs.sum())
            blocked = int((pairs & ~view.allowed).sum())
            rows.append([ROLE_NAMES[q], ROLE_NAMES[k], total, blocked, total - blocked,
                         round(100.0 * blocked / total, 1) if total else 0.0])
    total = int(causal.sum())
    blocked = int((causal & ~view.allowed).sum())
    rows.append(["all", "all", total, blocked, total - blocked, round(100.0 * blocked / total, 1) if total else 0.0])
    return rows


SUMMARY_HEADERS = ["query role", "key role", "causal pairs", "blocked by HSA", "allowed", "% blocked"]


def role_counts(view: MaskView) -> dict[str, int]:
    roles = view.aligned.semantic_ids
    return {ROLE_NAMES[r]: int((roles == r).sum()) for r in (GLOBAL, LANDMARK, NOISE)}


def token_highlights(view: MaskView) -> list[tuple[str, str]]:
    """(token, role) pairs for a gr.HighlightedText strip."""
    return [(token, ROLE_NAMES[int(role)]) for token, role in zip(view.aligned.tokens, view.roles)]


def token_label(k: int, token: str) -> str:
    shown = token.replace("\n", "⏎").replace(" ", "·")
    return f"{k}:{shown[:14]}"


def _pool(categories: np.ndarray, factor: int) -> np.ndarray:
    """Shrink for display: a cell shows 'blocked' if any pair in its block is blocked, else the
    block's most allowed-looking category (the numbers are never computed from this)."""
    n = categories.shape[0]
    m = -(-n // factor)
    padded = np.zeros((m * factor, m * factor), dtype=np.int8)
    padded[:n, :n] = categories
    blocks = padded.reshape(m, factor, m, factor).transpose(0, 2, 1, 3).reshape(m, m, factor * factor)
    pooled = blocks.max(axis=-1)
    pooled[(blocks == BLOCKED).any(axis=-1)] = BLOCKED
    return pooled


def mask_figure(view: MaskView, *, max_cells: int = 256) -> go.Figure:
    """Heatmap of the mask, tokens on both axes, each cell coloured by its role pair."""
    tokens = view.aligned.tokens
    n = len(tokens)
    factor = max(1, -(-n // max_cells))
    z = _pool(view.categories, factor) if factor > 1 else view.categories
    labels = [token_label(k * factor, tokens[k * factor]) for k in range(z.shape[0])]
    roles = view.roles
    hover = [[f"query {token_label(i * factor, tokens[i * factor])} ({ROLE_NAMES[roles[i * factor]]})<br>"
              f"key {token_label(j * factor, tokens[j * factor])} ({ROLE_NAMES[roles[j * factor]]})<br>"
              f"{CATEGORY_NAMES[z[i, j]]}" for j in range(z.shape[1])] for i in range(z.shape[0])]
    count = len(CATEGORY_NAMES)
    colorscale = []
    for index, color in enumerate(CATEGORY_COLORS):
        colorscale += [[index / count, color], [(index + 1) / count, color]]
    figure = go.Figure(go.Heatmap(
        z=z, x=labels, y=labels, zmin=-0.5, zmax=count - 0.5, colorscale=colorscale,
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", xgap=0 if factor > 1 else 0.5,
        ygap=0 if factor > 1 else 0.5,
        colorbar=dict(tickvals=list(range(count)), ticktext=CATEGORY_NAMES, title="query → key")))
    title = f"HSA mask: {n} tokens" + (f" (display pooled {factor}×{factor}; counts are exact)" if factor > 1 else "")
    figure.update_layout(
        title=title, height=760, margin=dict(l=10, r=10, t=50, b=10),
        xaxis=dict(title="key", tickangle=-60, tickfont=dict(size=9), side="top", constrain="domain"),
        yaxis=dict(title="query", autorange="reversed", tickfont=dict(size=9), scaleanchor="x"),
        plot_bgcolor="white")
    return figure


def mask_png(view: MaskView, path) -> None:
    """The mask as a PNG (matplotlib) for papers and notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n = len(view.aligned.tokens)
    size = min(24, max(6, n / 12))
    fig, ax = plt.subplots(figsize=(size + 3, size))
    image = ax.imshow(view.categories, cmap=ListedColormap(CATEGORY_COLORS), vmin=-0.5,
                      vmax=len(CATEGORY_NAMES) - 0.5, interpolation="nearest")
    if n <= 120:
        labels = [t.replace("\n", "⏎") for t in view.aligned.tokens]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    bar = fig.colorbar(image, ax=ax, ticks=range(len(CATEGORY_NAMES)))
    bar.ax.set_yticklabels(CATEGORY_NAMES)
    ax.set_title(f"HSA mask ({n} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
