"""What HSA does to a real model's attention: one layer's map (a head or the mean over heads) with
HSA off and on, per layer the attention mass that GLOBAL/LANDMARK text queries put on NOISE keys
and on image keys, and a text token's attention over the image drawn back onto the image.

The numbers come from `models.hsa.AttentionProbe`, which rides along an ordinary forward pass and
keeps only the one map asked for (never `output_attentions` for every layer). HSA off is the same
model called without `semantic_ids`; HSA on is the call with the conversation's roles.

    python -m workbench.attention CONVERSATION.json [--model PATH] --layer L --head H --out DIR
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from models.hsa import IMPLEMENTATION, NOISE, ROLE_NAMES, AttentionProbe
from models.zoo import DEFAULT_VLM_DIR as DEFAULT_MODEL
from models.zoo import embedded_model
from models.data.align import Aligned, align_record, normalize_record, pad_batch, pad_token_id
from workbench.mask_view import ROLE_COLORS, token_label

MODES = ("off", "on", "diff")


class AttentionUnsupported(RuntimeError):
    """The model cannot run with attn_implementation="hsa", so its attention cannot be probed."""


@dataclass
class AttentionResult:
    layer: int
    head: int | None  # None: the mean over heads
    num_layers: int
    num_heads: int
    tokens: list[str]
    roles: list[int]
    turn_index: list[int]
    off: np.ndarray  # [L, L] attention probabilities, HSA off
    on: np.ndarray  # [L, L] HSA on
    noise_mass: dict[str, list[float]]  # "hsa_off"/"hsa_on" -> per layer
    image_mass: dict[str, list[float]]
    image_positions: list[list[int]] = field(default_factory=list)  # per image: its token positions
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)  # per image: merged (t, rows, cols)
    images: list = field(default_factory=list)  # the PIL images of the conversation
    model_name: str = ""

    @property
    def diff(self) -> np.ndarray:
        return self.on - self.off

    def map(self, mode: str) -> np.ndarray:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.diff if mode == "diff" else getattr(self, mode)

    def __len__(self) -> int:
        return len(self.tokens)


# --- loading -----------------------------------------------------------------------------------

def load_model(path_or_id: str | Path):
    """(model, processor) with attn_implementation="hsa"; AttentionUnsupported when the model's
    class cannot take it (transformers then raises, or silently keeps its own attention)."""
    from models.vlm import VLMLoadError, load_vlm

    name = str(path_or_id)
    try:
        model, processor = load_vlm(name)
    except VLMLoadError as error:
        # load_vlm's own message always names attn_implementation; the cause says whether it was to blame
        cause = str(error.__cause__ or "")
        if "attn" in cause.lower() or "attention" in cause.lower():
            raise AttentionUnsupported(_unsupported_message(name, cause)) from error
        raise
    check_hsa(model, name)
    return model, processor


def check_hsa(model, name: str = "") -> None:
    """AttentionUnsupported unless the model is set to attn_implementation="hsa" (transformers
    keeps a class's own attention, with only a log line, when the class cannot switch)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != IMPLEMENTATION:
        raise AttentionUnsupported(_unsupported_message(name or type(model).__name__,
                                                        f"it runs with {impl!r} attention"))


def _unsupported_message(name: str, why: str) -> str:
    return (f"{name} does not support the HSA attention implementation: its model class does not route "
            f"attention through transformers' AttentionInterface ({why}). Attention maps need a model "
            "family that does, e.g. Llama, Qwen2, Qwen2-VL, Qwen2.5-VL, Qwen3.")


# --- computing ---------------------------------------------------------------------------------

def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _image_token_id(model, processor) -> int | None:
    for source in (processor, getattr(processor, "tokenizer", None), getattr(model, "config", None)):
        value = getattr(source, "image_token_id", None) if source is not None else None
        if isinstance(value, int):
            return value
    return None


def _merge_size(model, processor) -> int:
    image_processor = getattr(processor, "image_processor", None)
    value = getattr(image_processor, "merge_size", None)
    if value is None:
        value = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 1)
    return int(value)


def _load_images(record: dict, image_root) -> list:
    from PIL import Image

    images = []
    for image in normalize_record(record).images:
        if isinstance(image, (str, Path)):
            with Image.open(Path(image_root or ".") / image) as im:
                image = im.convert("RGB")
        images.append(image)
    return images


@dataclass
class PreparedConversation:
    """A conversation aligned for a model: the batch of one (without roles), its roles, which
    tokens are image tokens, and its images. Reused when only the layer or head changes."""
    aligned: Aligned
    batch: dict
    roles: torch.Tensor  # [1, L]
    is_image: torch.Tensor  # [1, L] bool
    images: list


def prepare_conversation(record: dict, processor, *, model=None, image_root=None,
                         max_length: int | None = None) -> PreparedConversation:
    aligned = align_record(record, processor, image_root=image_root, max_length=max_length)
    batch = pad_batch([aligned], pad_token_id=pad_token_id(processor))
    batch.pop("labels")
    roles = batch.pop("semantic_ids")
    image_id = _image_token_id(model, processor)
    is_image = batch["input_ids"] == image_id if image_id is not None else torch.zeros_like(roles, dtype=torch.bool)
    images = _load_images(record, image_root) if bool(is_image.any()) else []
    return PreparedConversation(aligned, batch, roles, is_image, images)


class _LayerSeen(Exception):
    """Raised inside the forward pass once the kept layer has reported: nothing later is needed."""


class _StopAfterLayer:
    """Passes each layer's report to the probe and ends the forward pass after `layer`'s."""

    def __init__(self, probe: AttentionProbe, layer: int):
        self.probe, self.layer = probe, layer

    def observe(self, module, *args) -> None:
        self.probe.observe(module, *args)
        if getattr(module, "layer_idx", None) == self.layer:
            raise _LayerSeen


def compute_attention(model, processor, record, *, layer: int, head: int | None = None, image_root=None,
                      max_length: int | None = None, chunk: int = 256, progress=None, model_name: str = "",
                      mass_from: AttentionResult | None = None) -> AttentionResult:
    """One layer's attention map (head `head`, or the mean over heads when None) with HSA off and
    on, and per layer the mass GLOBAL/LANDMARK text queries put on NOISE keys and on image keys.

    `record` is a ShareGPT dict or a PreparedConversation; `progress(fraction, desc)` is told when
    each forward pass starts. The per-layer masses depend on neither layer nor head: `mass_from`, a
    result for the same conversation and model, lends its masses, and then each forward pass stops
    at the chosen layer (a layer change costs a partial forward instead of a full one with every
    layer's probabilities)."""
    check_hsa(model, model_name)
    config = _text_config(model)
    num_layers, num_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{num_layers - 1}")
    if head is not None and not 0 <= head < num_heads:
        raise ValueError(f"head {head} is out of range: the model has heads 0..{num_heads - 1}")
    prepared = record if isinstance(record, PreparedConversation) else prepare_conversation(
        record, processor, model=model, image_root=image_root, max_length=max_length)
    roles, is_image = prepared.roles, prepared.is_image
    if mass_from is not None and (len(mass_from) != roles.shape[1] or
                                  len(mass_from.noise_mass["hsa_off"]) != num_layers):
        raise ValueError("mass_from is a result for another conversation or model")
    # Text queries only: image tokens looking at each other would swamp the mass on the image.
    queries = (roles != NOISE) & ~is_image
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prepared.batch.items()}

    probes = {}
    for step, (name, semantic_ids) in enumerate((("off", None), ("on", roles.to(device)))):
        if progress is not None:
            progress(0.1 + 0.4 * step, f"forward pass with HSA {name}")
        groups = {} if mass_from is not None else {"noise": (roles == NOISE).to(device),
                                                     "image": is_image.to(device)}
        probe = AttentionProbe(layer=layer, head=head, query_mask=queries.to(device), key_groups=groups, chunk=chunk)
        extra = {"semantic_ids": semantic_ids} if semantic_ids is not None else {}
        try:
            with torch.no_grad():  # logits of one position only: not [L, vocab]
                model(**inputs, **extra, logits_to_keep=1,
                      hsa_probe=probe if mass_from is None else _StopAfterLayer(probe, layer))
        except _LayerSeen:
            pass
        except TypeError as error:  # a forward() that does not pass keyword arguments down to attention
            if not any(word in str(error) for word in ("hsa_probe", "semantic_ids", "logits_to_keep")):
                raise
            raise AttentionUnsupported(_unsupported_message(model_name or type(model).__name__, str(error))) from error
        if layer not in probe.maps:
            raise AttentionUnsupported(_unsupported_message(
                model_name or type(model).__name__, f"layer {layer} never reported to the attention probe"))
        probes[name] = probe

    aligned = prepared.aligned
    positions, grids = _image_layout(prepared.batch, is_image[0], _merge_size(model, processor))
    return AttentionResult(
        layer=layer, head=head, num_layers=num_layers, num_heads=num_heads, tokens=list(aligned.tokens),
        roles=aligned.semantic_ids.tolist(), turn_index=list(aligned.turn_index),
        off=probes["off"].maps[layer][0].numpy(), on=probes["on"].maps[layer][0].numpy(),
        noise_mass=mass_from.noise_mass if mass_from is not None else {
            f"hsa_{k}": p.mass_by_layer("noise") for k, p in probes.items()},
        image_mass=mass_from.image_mass if mass_from is not None else {
            f"hsa_{k}": p.mass_by_layer("image") for k, p in probes.items()},
        image_positions=positions, image_grids=grids, images=prepared.images, model_name=model_name)


def _image_layout(batch: dict, is_image: torch.Tensor, merge: int):
    """Token positions of each image and its merged patch grid (t, rows, cols), in the order the
    processor lays image tokens out: image by image, frame by frame, row-major over merged cells."""
    where = torch.nonzero(is_image).flatten().tolist()
    grid_thw = batch.get("image_grid_thw")
    if where and grid_thw is None and batch.get("pixel_values") is not None:
        # A LLaVA-style model: every image is the same square grid of patch features, row by row.
        images = batch["pixel_values"].shape[0]
        per_image, rest = divmod(len(where), images)
        side = math.isqrt(per_image)
        if rest or side * side != per_image:
            raise ValueError(f"{len(where)} image tokens for {images} image(s) do not make square patch grids "
                             "(a CLS token kept as an image token?)")
        return [where[k * per_image:(k + 1) * per_image] for k in range(images)], [(1, side, side)] * images
    if not where or grid_thw is None:
        return [], []
    positions, grids, start = [], [], 0
    for t, h, w in grid_thw.tolist():
        grid = (int(t), int(h) // merge, int(w) // merge)
        count = grid[0] * grid[1] * grid[2]
        positions.append(where[start:start + count])
        grids.append(grid)
        start += count
    if start != len(where):
        raise ValueError(f"{len(where)} image tokens but image_grid_thw accounts for {start}")
    return positions, grids


# --- the image overlay -------------------------------------------------------------------------

def image_attention(result: AttentionResult, token_index: int, *, mode: str = "on", image_number: int = 0
                    ) -> np.ndarray:
    """[rows, cols]: the attention token `token_index` pays to each merged patch cell of an image
    (summed over frames), from the chosen map."""
    if not result.image_positions:
        raise ValueError("the conversation has no image")
    if not 0 <= image_number < len(result.image_positions):
        raise ValueError(f"image {image_number} does not exist (the conversation has {len(result.image_positions)})")
    if not 0 <= token_index < len(result):
        raise ValueError(f"token {token_index} is out of range 0..{len(result) - 1}")
    t, rows, cols = result.image_grids[image_number]
    row = result.map(mode)[token_index, result.image_positions[image_number]]
    return row.reshape(t, rows, cols).sum(0)


def image_overlay(result: AttentionResult, token_index: int, image=None, *, mode: str = "on",
                  image_number: int = 0, alpha: float = 0.6):
    """The image with the token's attention over its patch cells as a heat overlay. The processor
    resizes the whole image onto its patch grid (no crop), so cells map proportionally onto the
    original image; each cell is drawn as a block, which is the resolution the model sees."""
    import matplotlib
    from PIL import Image

    image = (image if image is not None else result.images[image_number]).convert("RGB")
    cells = image_attention(result, token_index, mode=mode, image_number=image_number)
    peak = float(cells.max())
    scaled = cells / peak if peak > 0 else cells
    heat = Image.fromarray(np.uint8(255 * scaled)).resize(image.size, Image.NEAREST)
    level = np.asarray(heat, dtype=np.float32) / 255.0
    colours = matplotlib.colormaps["inferno"](level)[..., :3]
    weight = (alpha * level)[..., None]  # cells the token ignores leave the image as it is
    blended = (1 - weight) * np.asarray(image, dtype=np.float32) / 255.0 + weight * colours
    return Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255))


def default_overlay_token(result: AttentionResult) -> int | None:
    """The last GLOBAL/LANDMARK text token after the first image (where the question is), if any."""
    if not result.image_positions:
        return None
    first_image_end = result.image_positions[0][-1]
    image = {p for positions in result.image_positions for p in positions}
    for k in range(len(result) - 1, first_image_end, -1):
        if k not in image and result.roles[k] != NOISE and result.tokens[k].strip():
            return k
    return None


# --- figures (plotly for the tab) --------------------------------------------------------------

def _mean_pool(values: np.ndarray, factor: int) -> np.ndarray:
    """Block means for display only (the numbers are never computed from this)."""
    n = values.shape[0]
    m = -(-n // factor)
    padded = np.zeros((m * factor, m * factor), dtype=np.float64)
    counts = np.zeros_like(padded)
    padded[:n, :n] = values
    counts[:n, :n] = 1
    sums = padded.reshape(m, factor, m, factor).sum(axis=(1, 3))
    return (sums / counts.reshape(m, factor, m, factor).sum(axis=(1, 3))).astype(np.float32)


def _sqrt_colorscale(name: str = "Viridis", steps: int = 12) -> list:
    """A colour scale that follows sqrt(p): small probabilities stay visible, hover shows p itself."""
    import plotly.colors as pc

    scale = pc.get_colorscale(name)
    return [[(k / steps) ** 2, pc.sample_colorscale(scale, k / steps)[0]] for k in range(steps + 1)]


def attention_figure(result: AttentionResult, mode: str = "on", *, start: int = 0, stop: int | None = None,
                     max_cells: int = 200, max_labels: int = 64) -> go.Figure:
    """Heatmap of tokens start..stop (queries and keys), pooled for display when there are more
    than `max_cells`; axis labels are tokens coloured by role."""
    values = result.map(mode)
    n = len(result)
    stop = n if stop is None else min(stop, n)
    start = max(0, min(start, stop - 1))
    window = values[start:stop, start:stop]
    size = stop - start
    factor = max(1, -(-size // max_cells))
    z = _mean_pool(window, factor) if factor > 1 else window
    idx = [start + k * factor for k in range(z.shape[0])]
    labels = [token_label(i, result.tokens[i]) for i in idx]
    roles = [result.roles[i] for i in idx]
    ticks = [f"<span style='color:{ROLE_COLORS[r]}'>{label}</span>" for label, r in zip(labels, roles)]
    hover = [[f"query {labels[i]} ({ROLE_NAMES[roles[i]]})<br>key {labels[j]} ({ROLE_NAMES[roles[j]]})"
              for j in range(z.shape[1])] for i in range(z.shape[0])]
    if mode == "diff":
        bound = float(np.abs(z).max()) or 1.0
        colour = dict(colorscale="RdBu", reversescale=True, zmin=-bound, zmax=bound, zmid=0)
        bar = "on − off"
    else:
        colour = dict(colorscale=_sqrt_colorscale(), zmin=0, zmax=float(z.max()) or 1.0)
        bar = "probability"
    figure = go.Figure(go.Heatmap(
        z=z, x=list(range(z.shape[1])), y=list(range(z.shape[0])), customdata=hover,
        hovertemplate="%{customdata}<br>%{z:.4f}<extra></extra>", colorbar=dict(title=bar), **colour))
    what = "mean over heads" if result.head is None else f"head {result.head}"
    title = {"off": "HSA off", "on": "HSA on", "diff": "HSA on − off"}[mode]
    pooled = f"; display pooled {factor}×{factor} (mean), numbers exact" if factor > 1 else ""
    shown = f"tokens {start}..{stop - 1} of {n}" if size < n else f"{n} tokens"
    every = max(1, -(-len(ticks) // max_labels))  # readable labels; hover names every cell
    axis_ticks = dict(tickmode="array", tickvals=list(range(0, len(ticks), every)), ticktext=ticks[::every],
                      tickfont=dict(size=9))
    figure.update_layout(
        title=f"{title}: layer {result.layer}, {what} — {shown}{pooled}", height=760,
        margin=dict(l=10, r=10, t=60, b=10), plot_bgcolor="white",
        xaxis=dict(title="key", tickangle=-60, side="top", constrain="domain", **axis_ticks),
        yaxis=dict(title="query", autorange="reversed", scaleanchor="x", **axis_ticks))
    return figure


def mass_figure(result: AttentionResult) -> go.Figure:
    """Per layer: the mass GLOBAL/LANDMARK text queries put on NOISE keys and on image keys."""
    layers = list(range(result.num_layers))
    figure = go.Figure()
    for key, dash, name in (("hsa_off", "solid", "HSA off"), ("hsa_on", "dash", "HSA on")):
        figure.add_trace(go.Scatter(x=layers, y=result.noise_mass[key], mode="lines+markers",
                                    line=dict(color="#d62728", dash=dash), name=f"on noise, {name}"))
        if result.image_positions:
            figure.add_trace(go.Scatter(x=layers, y=result.image_mass[key], mode="lines+markers",
                                        line=dict(color="#1f77b4", dash=dash), name=f"on image, {name}"))
    figure.update_layout(title="Attention mass of GLOBAL/LANDMARK text queries, per layer", height=340,
                         xaxis=dict(title="layer", dtick=1), yaxis=dict(title="mean mass", rangemode="tozero"),
                         margin=dict(l=10, r=10, t=50, b=10))
    return figure


# --- files (matplotlib PNGs and JSON) ----------------------------------------------------------

def _heatmap_png(result: AttentionResult, mode: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm, TwoSlopeNorm
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    values = result.map(mode)
    n = len(result)
    size = min(24, max(6, n / 12))
    fig, ax = plt.subplots(figsize=(size + 2, size))
    if mode == "diff":
        bound = float(np.abs(values).max()) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(0, -bound, bound), interpolation="nearest")
    else:
        image = ax.imshow(values, cmap="viridis", norm=PowerNorm(0.5, 0, float(values.max()) or 1.0),
                          interpolation="nearest")
    colours = [ROLE_COLORS[r] for r in result.roles]
    if n <= 120:
        labels = [t.replace("\n", "⏎") for t in result.tokens]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for label, colour in zip(ticks, colours):
                label.set_color(colour)
    # a strip of role colours along both axes, readable at any length
    from matplotlib.colors import to_rgb

    strip = np.array([to_rgb(c) for c in colours])
    divider = make_axes_locatable(ax)
    top = divider.append_axes("top", size="2%", pad=0.02, sharex=ax)
    top.imshow(strip[None], aspect="auto", interpolation="nearest")
    left = divider.append_axes("left", size="2%", pad=0.02, sharey=ax)
    left.imshow(strip[:, None], aspect="auto", interpolation="nearest")
    for strip_ax in (top, left):
        strip_ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)
        strip_ax.set_frame_on(False)
    if n <= 120:
        ax.yaxis.set_ticks_position("right")
    ax.set_xlabel("key")
    left.set_ylabel("query")
    cax = divider.append_axes("right", size="3%", pad=0.9 if n <= 120 else 0.1)
    fig.colorbar(image, cax=cax, label="on − off" if mode == "diff" else "probability (sqrt scale)")
    what = "mean over heads" if result.head is None else f"head {result.head}"
    top.set_title(f"{ {'off': 'HSA off', 'on': 'HSA on', 'diff': 'HSA on − off'}[mode]}: layer {result.layer}, "
                  f"{what} ({n} tokens; blue global, green landmark, grey noise)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _mass_png(result: AttentionResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    layers = list(range(result.num_layers))
    groups = [("noise", result.noise_mass)] + ([("image", result.image_mass)] if result.image_positions else [])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (name, mass) in zip(axes[0], groups):
        ax.plot(layers, mass["hsa_off"], "o-", label="HSA off")
        ax.plot(layers, mass["hsa_on"], "s--", label="HSA on")
        ax.set_title(f"mass on {name} keys")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(bottom=0)
        ax.legend()
    axes[0][0].set_ylabel("mean over GLOBAL/LANDMARK text queries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: AttentionResult) -> dict:
    return {
        "model": result.model_name, "layer": result.layer,
        "head": "mean" if result.head is None else result.head,
        "num_layers": result.num_layers, "num_heads": result.num_heads, "num_tokens": len(result),
        "queries": "GLOBAL and LANDMARK text tokens (image tokens excluded)",
        "noise_mass": result.noise_mass, "image_mass": result.image_mass,
        "tokens": result.tokens, "roles": [ROLE_NAMES[r] for r in result.roles],
        "image_positions": result.image_positions, "image_grids": [list(g) for g in result.image_grids],
    }


def save_outputs(result: AttentionResult, out_dir, *, overlay_token: int | None = None) -> dict[str, Path]:
    """attention_{off,on,diff}.png, noise_mass.png, overlay.png (when there is an image),
    maps.npz (the exact maps) and attention.json; returns the paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode in MODES:
        paths[f"attention_{mode}"] = out / f"attention_{mode}.png"
        _heatmap_png(result, mode, paths[f"attention_{mode}"])
    paths["noise_mass"] = out / "noise_mass.png"
    _mass_png(result, paths["noise_mass"])
    data = summary(result)
    token = overlay_token if overlay_token is not None else default_overlay_token(result)
    if result.images and token is not None:
        paths["overlay"] = out / "overlay.png"
        image_overlay(result, token).save(paths["overlay"])
        data["overlay"] = {"token": token, "text": result.tokens[token], "map": "on",
                           "cells": image_attention(result, token).tolist()}
    paths["maps"] = out / "maps.npz"
    np.savez_compressed(paths["maps"], off=result.off, on=result.on)
    paths["json"] = out / "attention.json"
    paths["json"].write_text(json.dumps(data, indent=1, ensure_ascii=False))
    return paths


# --- the command -------------------------------------------------------------------------------

def read_conversation(path: Path, index: int = 0):
    """Record `index` of a .json / .jsonl file (read as the store and training read them), or the
    conversation of a marked-text file."""
    from models.data.records import RecordError, load_records
    from workbench.mask_view import parse_conversation_text

    if path.suffix.lower() not in (".json", ".jsonl", ".ndjson"):
        return parse_conversation_text(path.read_text(encoding="utf-8"))
    records = load_records(path)
    if not -len(records) <= index < len(records):
        raise RecordError(f"{path}: no record {index} (the file has {len(records)})")
    return records[index]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("conversation", type=Path, help="a ShareGPT / LLaMA-Factory .json or .jsonl file (images "
                        "relative to the file), or a text file of [user] / [assistant: noise] marked turns")
    parser.add_argument("--record", type=int, default=0, help="which record of a file of several (default: 0)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory, hub id, or an "
                        "embedded model's name: default, composed (default: the embedded default VLM)")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--head", default="mean", help="a head number, or 'mean' for the mean over heads")
    parser.add_argument("--token", type=int, default=None, help="token whose attention to overlay on the image")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from models.data.align import AlignError

    try:
        head = None if args.head == "mean" else int(args.head)
        record = read_conversation(args.conversation, args.record)
        model, processor = load_model(str(embedded_model(args.model)))
        result = compute_attention(model, processor, record, layer=args.layer, head=head,
                                   image_root=args.conversation.resolve().parent, max_length=args.max_length,
                                   model_name=str(args.model))
        paths = save_outputs(result, args.out, overlay_token=args.token)
    except (AlignError, AttentionUnsupported, ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    off, on = result.noise_mass["hsa_off"], result.noise_mass["hsa_on"]
    print(f"{len(result)} tokens, layer {result.layer}; mass on noise per layer, HSA off: "
          f"{', '.join(f'{v:.4f}' for v in off)}; HSA on: {', '.join(f'{v:.4f}' for v in on)}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
