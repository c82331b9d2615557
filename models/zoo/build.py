"""The default VLM: a tiny Qwen2-VL trained from nothing on the shapes task, on a CPU.

`build(out_dir)` makes the tokenizer and processor, initialises a `Qwen2VLForConditionalGeneration`
from a small config, trains it on freshly generated shapes conversations (batches from
`models.data.align`'s `align_record` and `pad_batch`, as its `HSACollator` makes them, so the roles
reach the attention as `semantic_ids`), and saves model + processor with `save_pretrained`.
Training has two stages (`clean_stage`, then `noisy_stage` with HSA): the default model is the HSA
arm of the experiment in `models.zoo.experiment`, seed 0.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import models.hsa  # registers attn_implementation="hsa"
from models.data.align import IGNORE_INDEX, align_record, pad_batch, pad_token_id

from . import DEFAULT_VLM_DIR, shapes
from .processor import SPECIAL_TOKENS, build_processor

DEFAULT_DIR = DEFAULT_VLM_DIR  # where `build` writes by default
CLEAN_STEPS = 2400  # stage 1 of the default recipe
LENGTH_GROUPS = 4  # batches drawn at once and grouped by length (`training_batches`)


@dataclass
class ModelSize:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    vision_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 2


@dataclass(kw_only=True)
class BuildSettings:
    """One stage of training (`train`); `clean_stage` and `noisy_stage` give the recipe's two, and
    are the only places that say which data a stage trains on."""
    steps: int = CLEAN_STEPS
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    vision_lr_scale: float = 1.0  # the vision tower's learning rate relative to the language model's
    # Weight of an auxiliary loss during training only: a probe on each image token must tell what
    # its slot shows (`WordProbe`). Without one the tiny tower from scratch collapses within ~25 steps
    # to "something / nothing" (features of a red and a green circle at cosine 0.999+) and the model
    # was still blind to colour after 1500 steps; with it they stay apart. The probe is thrown away;
    # the saved model is a plain Qwen2-VL.
    vision_probe_weight: float = 1.0
    # Weight of a second training-only loss (`ShapeLookup`): the query that predicts an answer's word
    # about a shape must prefer that shape's image token among the image's four.
    lookup_weight: float = 3.0
    seed: int = 0
    data_split: str  # the random stream the training conversations come from
    hsa: bool = True  # train with attn_implementation="hsa" and semantic_ids
    noise: shapes.NoiseSpec
    size: ModelSize = field(default_factory=ModelSize)
    threads: int | None = None  # torch threads; None keeps torch's default

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise"] = {"rate": self.noise.rate, "kinds": list(self.noise.kinds), "max_run": self.noise.max_run}
        return d


def model_config(tokenizer, size: ModelSize) -> Qwen2VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    head_dim = size.hidden_size // size.heads
    # M-RoPE splits each head's rotary frequencies into temporal / height / width sections
    # in Qwen2-VL's proportions (16, 24, 24 of 64), with Qwen2-VL's rope_theta of 1e6. With 32-dim
    # heads a theta of 1e4 left about 5 of the 16 frequencies slow enough for an answer to find an
    # image token ~200 positions back by its content whatever the distance; 1e6 leaves about 9.
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    mrope_section = [temporal, height, half - temporal - height]
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            rope_scaling={"type": "mrope", "mrope_section": mrope_section, "rope_theta": 1e6}),
        vision_config=dict(
            depth=size.vision_depth, embed_dim=size.vision_dim, hidden_size=size.hidden_size,
            num_heads=size.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )


def new_model(processor, size: ModelSize, *, seed: int = 0, hsa: bool = True) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(model_config(processor.tokenizer, size))
    model.set_attn_implementation("hsa" if hsa else "sdpa")
    model.generation_config.eos_token_id = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


def slot_targets(scene: shapes.Scene) -> list[int]:
    """What each image token of a 56x56 scene shows, as a class: 0 for an empty slot, else
    1 + kind * len(COLORS) + colour. Image tokens run over the 2x2 slots in reading order."""
    colors = list(shapes.COLORS)
    by_slot = {s.slot: s for s in scene.shapes}
    return [0 if slot not in by_slot else
            1 + shapes.KINDS.index(by_slot[slot].kind) * len(colors) + colors.index(by_slot[slot].color)
            for slot in shapes.SLOTS]


SLOT_CLASSES = 1 + len(shapes.KINDS) * len(shapes.COLORS)


class WordProbe(torch.nn.Module):
    """The build's training-only vision probe: each image token, as the vision tower hands it to the
    language model, must tell the kind and the colour its slot shows (or that it is empty) by its
    cosine to the language model's own input embeddings of those words (" circle", " red", ...).
    So the picture arrives in the same directions as the words that name it, and an answer can find
    "the square" among the image tokens the way it finds a repeated word in the text."""

    def __init__(self, tokenizer, hidden: int):
        super().__init__()
        ids = lambda words: torch.tensor([tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0]
                                          for w in words])
        self.register_buffer("kind_ids", ids(shapes.KINDS), persistent=False)
        self.register_buffer("color_ids", ids(shapes.COLORS), persistent=False)
        self.empty = torch.nn.Parameter(torch.randn(2, hidden) * 0.02)  # "nothing here" for kind and colour
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`targets`: the `slot_targets` of the images in turn."""
        unit = torch.nn.functional.normalize
        features = unit(features, dim=-1)
        shown = targets > 0
        kind = torch.where(shown, (targets - 1) // len(self.color_ids) + 1, 0)
        color = torch.where(shown, (targets - 1) % len(self.color_ids) + 1, 0)
        loss = features.new_zeros(())
        for k, (ids, target) in enumerate(((self.kind_ids, kind), (self.color_ids, color))):
            words = unit(torch.cat([self.empty[k:k + 1], embeddings[ids]]), dim=-1)
            loss = loss + torch.nn.functional.cross_entropy(self.scale * features @ words.T, target)
        return loss


class ShapeLookup:
    """The build's training-only look-up loss. Wherever an answer says something about one shape, its
    colour, kind or cell ("The circle is| red.", "The red shape is a| circle.", "The circle is at
    the| top| left.", "A| red| circle at the| bottom| right"), the query that predicts that word must
    attend, among the image's four tokens, to the one that shows the shape. Scored as a mixture over
    the heads of every layer but the first (which cannot know yet which shape is meant): one head
    that finds the shape is enough. The loss is thrown away with the probe; it shapes where the
    model looks, and the saved model is a plain Qwen2-VL.

    Without it the model committed before answered "Where is the circle?" in scenes of 2-3 shapes no
    better than naming an occupied cell at random (teacher-forced 58 of 132), and none of its heads
    preferred the named shape's token at those queries (`scripts/slot_readout.py`)."""

    def __init__(self, tokenizer):
        word = lambda w: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0]
        self.cell_words = {word(w) for w in ("top", "bottom", "left", "right")}
        self.kinds = {word(k): k for k in shapes.KINDS}
        self.colors = {word(c): c for c in shapes.COLORS}

    @staticmethod
    def answer_tokens(batch: dict) -> torch.Tensor:
        """Where a collated batch has the tokens of real answers: trained on, and not NOISE."""
        return (batch["labels"] != IGNORE_INDEX) & (batch["semantic_ids"] != models.hsa.NOISE)

    def queries(self, input_ids: torch.Tensor, answers: torch.Tensor, scenes: list[shapes.Scene]) -> torch.Tensor:
        """(row in batch, query position, index of the shape's image token) for every colour, kind and
        cell word among the `answers` tokens. Colours and kinds name one shape of a scene each; a cell
        word belongs to the last kind word before it (at most five tokens back)."""
        found = []
        slots = list(shapes.SLOTS)
        for b, scene in enumerate(scenes):
            ids, answer = input_ids[b].tolist(), answers[b].tolist()
            for p in range(1, len(ids)):
                if not answer[p]:
                    continue
                shape = None
                if ids[p] in self.kinds:
                    shape = scene.by_kind(self.kinds[ids[p]])
                elif ids[p] in self.colors:
                    shape = scene.by_color(self.colors[ids[p]])
                elif ids[p] in self.cell_words:
                    kind = next((self.kinds[ids[k]] for k in range(p - 1, max(0, p - 6), -1) if ids[k] in self.kinds),
                                None)
                    shape = kind and scene.by_kind(kind)
                if shape is not None:
                    found.append((b, p - 1, slots.index(shape.slot)))
        return torch.tensor(found, dtype=torch.long).reshape(-1, 3)

    @staticmethod
    def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
        """(batch, 4): where each conversation's image tokens are (one 56x56 image each)."""
        return (input_ids == image_token_id).nonzero()[:, 1].view(len(input_ids), -1)

    @staticmethod
    def attention_to_named(attention, hidden: torch.Tensor, position_embeddings, image_positions: torch.Tensor,
                           queries: torch.Tensor) -> torch.Tensor:
        """(queries, heads): the attention each head of one layer gives the named image token, the softmax
        taken over the image's tokens only; `hidden` is the input of that layer's attention module.
        Queries and keys go the attention module's own way: its projections, the per-head norms of
        models that have them (Qwen3's q_norm / k_norm, before the rotation), and its module's
        `apply_rotary_pos_emb` on the cos/sin the model computed (Qwen2-VL's M-RoPE sections are
        already in them; Qwen3's are 1-D)."""
        import sys

        apply_rotary_pos_emb = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        identity = lambda x: x
        q_norm, k_norm = getattr(attention, "q_norm", identity), getattr(attention, "k_norm", identity)
        b, q, target = queries.unbind(1)
        keys_at = image_positions[b]  # (M, 4)
        cos, sin = (t.expand(len(hidden), -1, -1) for t in position_embeddings)  # 1-D RoPE shares one row
        heads, kv_heads, dim = attention.config.num_attention_heads, attention.config.num_key_value_heads, attention.head_dim
        query = q_norm(attention.q_proj(hidden[b, q]).view(len(b), heads, dim)).unsqueeze(2)
        key = k_norm(attention.k_proj(hidden[b[:, None], keys_at]).view(len(b), -1, kv_heads, dim)).transpose(1, 2)
        query, _ = apply_rotary_pos_emb(query, query, cos[b, q][:, None], sin[b, q][:, None])
        _, key = apply_rotary_pos_emb(key, key, cos[b[:, None], keys_at], sin[b[:, None], keys_at])
        key = key.repeat_interleave(heads // kv_heads, dim=1)  # grouped-query attention
        weights = ((query @ key.transpose(-1, -2)).squeeze(2) * dim ** -0.5).softmax(-1)  # (M, heads, 4)
        return weights.gather(2, target[:, None, None].expand(-1, heads, 1)).squeeze(2)

    @staticmethod
    def loss(model, layer_inputs: dict, input_ids: torch.Tensor, queries: torch.Tensor, *,
             image_token_id: int | None = None) -> torch.Tensor:
        """-log of the attention on the named image tokens, averaged over every head of the layers in
        `layer_inputs` (what `attention_inputs` caught): a mixture, so one head that finds the shape is enough.
        `image_token_id` defaults to the model config's (a language model alone has none)."""
        layers = language_layers(model)
        image_token_id = model.config.image_token_id if image_token_id is None else image_token_id
        image_positions = ShapeLookup.image_positions(input_ids, image_token_id)
        found = torch.cat([ShapeLookup.attention_to_named(layers[index].self_attn, *inputs, image_positions, queries)
                           for index, inputs in layer_inputs.items()], 1)
        return -torch.log(found.mean(1) + 1e-6).mean()


def language_layers(model):
    """The decoder layers of a VLM's language model (`model.model.language_model`), or of a causal LM."""
    inner = model.model
    return getattr(inner, "language_model", inner).layers


@contextmanager
def attention_inputs(model, layers):
    """{layer index: (hidden_states, position_embeddings)}: what the attention module of each of the
    given language-model layers received in the last forward pass inside the block."""
    seen = {}
    modules = language_layers(model)
    hooks = [modules[index].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: seen.__setitem__(
            index, (kwargs["hidden_states"], kwargs["position_embeddings"])), with_kwargs=True)
        for index in layers]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def training_batches(processor, settings: BuildSettings):
    """Endless batches of fresh conversations (a pure function of the seed), with the slot classes
    of their image tokens for the vision probe and the `ShapeLookup` queries.

    Conversations are drawn `LENGTH_GROUPS` batches at a time and batched by length, as the
    transformers Trainer does with `group_by_length`: padding falls from 25% of
    the tokens to 8% (34% to 13% with NOISE turns), and a step's forward and backward by 13-17%
    (`bench/RESULTS.md`). The groups then go in a shuffled order, so length does not climb within
    each window."""
    lookup = ShapeLookup(processor.tokenizer)
    pad_id = pad_token_id(processor)
    window = LENGTH_GROUPS * settings.batch_size
    index = 0
    while True:
        samples = shapes.generate(window, seed=settings.seed, split=settings.data_split, noise=settings.noise,
                                  start=index)
        aligned = [align_record(s.record, processor) for s in samples]
        by_length = sorted(range(window), key=lambda j: len(aligned[j]))
        groups = [by_length[k:k + settings.batch_size] for k in range(0, window, settings.batch_size)]
        random.Random(f"groups/{shapes.conversation_seed(settings.data_split, settings.seed, index)}").shuffle(groups)
        index += window
        for group in groups:
            batch = pad_batch([aligned[j] for j in group], pad_token_id=pad_id)
            targets = torch.tensor([c for j in group for c in slot_targets(samples[j].scene)])
            yield batch, targets, lookup.queries(batch["input_ids"], lookup.answer_tokens(batch),
                                                 [samples[j].scene for j in group])


class PrefetchedBatches(torch.utils.data.IterableDataset):
    """`training_batches` made in a worker process, so drawing and tokenizing the next batches
    (about 0.05 s each, `bench/build_step.py`) runs on a core that torch leaves free. Only then: with
    two torch threads on two cores the worker made steps stall (0.46 s a step against 0.33 inline)."""

    def __init__(self, processor, settings: BuildSettings):
        self.processor, self.settings = processor, settings

    def __iter__(self):
        return training_batches(self.processor, self.settings)

    def loader(self):
        if torch.get_num_threads() >= (os.cpu_count() or 1):
            return iter(self)
        return iter(torch.utils.data.DataLoader(self, batch_size=None, num_workers=1, prefetch_factor=8))


def clean_stage(steps: int = CLEAN_STEPS, *, batch_size: int = 16, seed: int = 0, threads: int | None = None) -> BuildSettings:
    """Stage 1: the shapes task on conversations without NOISE (HSA's mask is then the causal mask, so
    this stage is the same with or without it)."""
    return BuildSettings(steps=steps, batch_size=batch_size, seed=seed, hsa=True, noise=shapes.CLEAN, threads=threads,
                         data_split="base", warmup_steps=min(60, max(1, steps // 10)))


def noisy_stage(steps: int = 200, *, hsa: bool = True, noise: shapes.NoiseSpec = shapes.TRAIN_NOISE,
                batch_size: int = 16, seed: int = 0, threads: int | None = None) -> BuildSettings:
    """Stage 2: NOISE turns of the training kinds (chit-chat, false claims) before 30% of the questions,
    at a third of the learning rate, with HSA or plain attention. It keeps clean accuracy while teaching
    the model to answer past NOISE, which a one-stage build on noisy data from the start did not
    (models/zoo/README.md has the figures)."""
    return BuildSettings(steps=steps, batch_size=batch_size, seed=seed, hsa=hsa, noise=noise, threads=threads,
                         data_split="noisy", learning_rate=1e-3, warmup_steps=min(30, steps // 10))


def learning_rate(step: int, settings: BuildSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(settings: BuildSettings, *, processor=None, model=None, progress: bool = True, log=None):
    """Train a fresh model (or go on training `model`); returns (model, processor, history of (step, loss))."""
    from tqdm import tqdm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    processor = processor or build_processor()
    if model is None:
        model = new_model(processor, settings.size, seed=settings.seed, hsa=settings.hsa)
    else:
        model.set_attn_implementation("hsa" if settings.hsa else "sdpa")
    torch.manual_seed(settings.seed)
    model.train()
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        decays = param.ndim >= 2 and "embed_tokens" not in name
        groups.setdefault(("visual" in name, decays), []).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": settings.weight_decay if decays else 0.0,
          "lr_scale": settings.vision_lr_scale if visual else 1.0}
         for (visual, decays), params in groups.items()],
        lr=settings.learning_rate, betas=(0.9, 0.98))
    probe = WordProbe(processor.tokenizer, model.config.text_config.hidden_size)
    optimizer.add_param_group({"params": list(probe.parameters()), "weight_decay": settings.weight_decay,
                               "lr_scale": 1.0})
    merged = []
    hook = model.model.visual.merger.register_forward_hook(lambda module, args, output: merged.append(output))
    layers = model.model.language_model.layers
    looked_at = range(1, len(layers)) if settings.lookup_weight > 0 else range(0)  # layer 0 cannot know the shape
    history = []
    batches = PrefetchedBatches(processor, settings).loader()
    bar = tqdm(range(settings.steps), desc="hsa" if settings.hsa else "plain", disable=not progress,
               dynamic_ncols=True)
    smoothed = None
    with attention_inputs(model, looked_at) as layer_inputs:
        for step in bar:
            batch, targets, lookups = next(batches)
            if not settings.hsa:
                batch.pop("semantic_ids")
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings) * group["lr_scale"]
            merged.clear()
            loss = model(**batch).loss
            total = loss
            if settings.vision_probe_weight > 0:
                probe_loss = probe(merged[0], model.get_input_embeddings().weight, targets)
                total = loss + settings.vision_probe_weight * probe_loss
            if looked_at and len(lookups):
                total = total + settings.lookup_weight * ShapeLookup.loss(model, layer_inputs, batch["input_ids"], lookups)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            history.append((step, value))
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            bar.set_postfix(loss=f"{smoothed:.3f}")
            if log is not None and (step % 50 == 0 or step == settings.steps - 1):
                log(f"step {step} loss {value:.4f} smoothed {smoothed:.4f}")
    hook.remove()
    model.eval()
    return model, processor, history


def save(model, processor, out_dir: str | Path, stages: list[BuildSettings], history, seconds: float | None = None) -> Path:
    """save_pretrained in bfloat16 (loads as float32 with dtype=torch.float32), plus the build record:
    each stage's settings, the loss every 50 steps over both, and the training time."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.hsa_trained = stages[-1].hsa  # read by models.vlm to pick the attention default
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.to(torch.float32)
    processor.save_pretrained(out_dir)
    (out_dir / "build.json").write_text(json.dumps(
        {"stages": [stage.to_dict() for stage in stages], "seconds": None if seconds is None else round(seconds),
         "threads": torch.get_num_threads(),  # what the build ran with (a stage's `threads` None: torch's default)
         "final_loss": history[-1][1] if history else None,
         "loss_every_50": [round(loss, 4) for step, loss in history if step % 50 == 0]}, indent=1))
    return out_dir


def build(out_dir: str | Path = DEFAULT_DIR, *, steps: int = CLEAN_STEPS, noisy_steps: int = 200, batch_size: int = 16,
          seed: int = 0, hsa: bool = True, threads: int | None = None, progress: bool = True) -> Path:
    """Train the default model from nothing in two stages and save it to `out_dir`."""
    start = time.monotonic()
    clean = clean_stage(steps, batch_size=batch_size, seed=seed, threads=threads)
    noisy = noisy_stage(noisy_steps, hsa=hsa, batch_size=batch_size, seed=seed, threads=threads)
    model, processor, history = train(clean, progress=progress)
    model, _, more = train(noisy, processor=processor, model=model, progress=progress)
    history += [(steps + step, loss) for step, loss in more]
    seconds = time.monotonic() - start
    path = save(model, processor, out_dir, [clean, noisy], history, seconds)
    if progress:
        print(f"saved {path} after {seconds:.0f} s (final loss {history[-1][1]:.4f})")
    return path
