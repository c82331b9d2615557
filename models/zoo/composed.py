"""The embedded composed VLM: a tiny CLIP vision tower and a tiny Qwen3 language model, each pretrained
here on the shapes task, joined by `models.composed.assemble` into a `LlavaForConditionalGeneration`
and trained in the two LLaVA stages (align, then SFT), all on a CPU in one command:
`python -m models.zoo build-composed`.

The parts, and why they are made this way:

- **Vision tower** (`pretrain_vision`): a `CLIPVisionModel` for 56x56 images with 28-pixel patches,
  so each patch is one cell of the shapes grid and, once LLaVA's "default" strategy drops the CLS
  token, the language model gets four image tokens, one per cell in reading order. It is trained
  alone on drawn scenes to classify what each patch shows (nothing, or one of 3 kinds x 4 colours)
  and which cell it is, from the features LLaVA hands on (`VISION_FEATURE_LAYER`: the last layer; a
  2-layer tower trained for this has no contrastive head to step around). Its PIL
  `CLIPImageProcessor` normalises with a mean on the white background (`processor.IMAGE_MEAN`), so
  a blank cell is zeros, as for the default VLM (a from-scratch tower collapsed without that).
- **Language model** (`pretrain_lm`): a `Qwen3ForCausalLM` (hidden 128, 4 layers, rope_theta 1e6)
  with the default VLM's byte-level BPE tokenizer plus the `<image>` token. It learns the task from
  text in the composed model's own token layout: the same chat template and conversations, with
  the four `<image>` positions holding *the picture in words* -- each cell's input embedding is the
  sum of the LM's own embeddings of the words that name it (" top" + " left" for its cell, and
  " red" + " circle" for what it shows). So the LM learns the task's language, the conversation
  format and, above all, the look-up the questions need ("the circle" -> the cell token that holds
  " circle" -> its colour or cell words), on exactly the four positions where the picture will
  later arrive. The look-up loss of the default build (`build.ShapeLookup`, generalised to Qwen3's
  normed queries and keys) supervises that look-up here, where it is cheap to learn. The embeddings
  are tied, so a word copied out of a picture cell is already the answer's output direction, and a
  training-only loss (`words_apart`) keeps the words of each group (colours, kinds, rows, columns)
  apart: without it the colours drifted together and colour could not be read (README).
- **Align** (`align_stage`): vision tower and LM frozen, only the projector trains, on images with
  their `shapes.describe_answer` captions ("A red circle at the top left and ..."). The LM already
  reads "words in the picture slots", so the projector's job is to turn each cell's features into
  those words' embeddings; a training-only target loss says so directly (mean squared error to the
  word-sum the LM was pretrained on, beside the caption loss).
- **SFT** (`sft_stage`): peft LoRA on the language model's attention and MLP projections (the vision
  tower excluded), the projector fully trainable (`modules_to_save`), on multi-turn conversations
  with NOISE turns before 30% of the questions, with HSA (`semantic_ids` from `align_record`) and the
  look-up loss on the real image tokens. Then LoRA is merged, and the model is saved in bfloat16 as a
  plain Llava checkpoint (`config.hsa_trained = True`) with its processor and a `build.json`.

What was measured while choosing this is in README.md ("The embedded composed VLM").
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import models.hsa  # noqa: F401  (registers attn_implementation="hsa")
from models.composed import CHAT_TEMPLATE, IMAGE_TOKEN, PROJECTOR, assemble, freeze_for_align
from models.data.align import align_record, pad_batch, pad_token_id

from . import DEFAULT_COMPOSED_DIR, shapes
from .build import LENGTH_GROUPS, ShapeLookup, language_layers, learning_rate, slot_targets
from .processor import IMAGE_MEAN, IMAGE_STD, build_tokenizer

PATCH_SIZE = shapes.SLOT_SIZE  # one patch per cell of the grid
VISION_FEATURE_LAYER = -1
DEFAULT_THREADS = 2


@dataclass
class ComposedSize:
    tie_word_embeddings: bool = True
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 128
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384


@dataclass(kw_only=True)
class Stage:
    """One stage of the build; `vision_stage`, `lm_stage`, `align_stage` and `sft_stage` give the
    recipe's four and are the only places that say what a stage trains on."""
    name: str
    steps: int
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    data_split: str = "train"
    noise: shapes.NoiseSpec = shapes.CLEAN
    hsa: bool = True
    lookup_weight: float = 0.0  # `ShapeLookup` (lm, sft)
    words_apart_weight: float = 0.0  # lm: `words_apart`
    target_weight: float = 0.0  # align: projector output vs the picture's word embeddings
    lora_rank: int = 0  # sft
    lora_alpha: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise"] = {"rate": self.noise.rate, "kinds": list(self.noise.kinds), "max_run": self.noise.max_run}
        return d


def vision_stage(steps: int = 300, *, seed: int = 0) -> Stage:
    return Stage(name="vision", steps=steps, batch_size=32, learning_rate=3e-3, seed=seed, data_split="vision",
                 warmup_steps=min(30, max(1, steps // 10)))


def lm_stage(steps: int = 1200, *, seed: int = 0) -> Stage:
    return Stage(name="lm", steps=steps, learning_rate=3e-3, seed=seed, data_split="lm", lookup_weight=3.0,
                 words_apart_weight=1.0, warmup_steps=min(60, max(1, steps // 10)))


def align_stage(steps: int = 200, *, seed: int = 0) -> Stage:
    return Stage(name="align", steps=steps, learning_rate=3e-3, seed=seed, data_split="align", hsa=False,
                 target_weight=1.0, warmup_steps=min(20, max(1, steps // 10)))


def sft_stage(steps: int = 300, *, seed: int = 0) -> Stage:
    return Stage(name="sft", steps=steps, learning_rate=2e-3, seed=seed, data_split="sft",
                 noise=shapes.TRAIN_NOISE, lookup_weight=3.0, lora_rank=16, lora_alpha=32,
                 warmup_steps=min(30, max(1, steps // 10)))


# --- the parts' configs and processors -----------------------------------------------------------

def composed_tokenizer():
    """The default VLM's byte-level BPE with the composed model's image token and ChatML template."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.image_token = IMAGE_TOKEN  # LlavaProcessor takes the tokenizer's image token when it names one
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor():
    """CLIP's PIL image processor for 56x56 pictures, normalised around the white background."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = shapes.IMAGE_SIZE
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def training_processor(tokenizer=None):
    """The processor the assembled model will have (LlavaProcessor: four `<image>` tokens per picture),
    made before there is a model, so the LM pretrains on exactly the composed model's token layout."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer or composed_tokenizer(),
                          patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def vision_config(size: ComposedSize):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
                            num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                            image_size=shapes.IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3)


def lm_config(tokenizer, size: ComposedSize):
    from transformers import Qwen3Config

    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # rope_theta 1e6 (Qwen's own): with 32-dim heads it leaves enough slow rotary frequencies for an
    # answer to find an image token ~100-200 positions back by its content (see README, default VLM).
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=size.hidden_size,
                       intermediate_size=size.intermediate_size, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                       head_dim=size.hidden_size // size.heads, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=size.tie_word_embeddings,
                       bos_token_id=pad, eos_token_id=end, pad_token_id=pad)


# --- data ----------------------------------------------------------------------------------------

def picture_words(tokenizer):
    """A function scene -> (4 cells, 4 words) token ids, -1 where a cell has fewer words: the words
    that name each cell of the picture, in reading order (" top" " left" [" red" " circle"])."""
    word = lambda w: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0]
    ids = {w: word(w) for w in ("top", "bottom", "left", "right", *shapes.KINDS, *shapes.COLORS)}

    def words(scene: shapes.Scene) -> torch.Tensor:
        by_slot = {s.slot: s for s in scene.shapes}
        rows = []
        for slot in shapes.SLOTS:
            row = [ids[w] for w in slot.split()]
            if slot in by_slot:
                row += [ids[by_slot[slot].color], ids[by_slot[slot].kind]]
            rows.append(row + [-1] * (4 - len(row)))
        return torch.tensor(rows)
    return words


def picture_embeddings(embedding: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """(..., 4 cells, hidden): each cell's words' input embeddings, summed."""
    present = (words >= 0).unsqueeze(-1).to(embedding.dtype)
    return (embedding[words.clamp(min=0)] * present).sum(-2)


def words_apart(embedding: torch.Tensor, groups: list[torch.Tensor], scale: float = 10.0) -> torch.Tensor:
    """A training-only loss that keeps the words a picture is written in apart: within each group
    (colours, kinds, rows, columns), each word's input embedding must be nearest, by cosine, to itself.
    Without it the four colours' embeddings drifted together (cosine 0.8-0.96 after 600-800 steps,
    tied or not): an answer cannot copy a colour out of a sum that barely holds it, and the LM answered
    colour questions 0.20-0.28 while kinds and cells were 0.92-1.0."""
    unit = torch.nn.functional.normalize
    loss = embedding.new_zeros(())
    for ids in groups:
        words = unit(embedding[ids], dim=-1)
        loss = loss + torch.nn.functional.cross_entropy(scale * words @ words.T, torch.arange(len(ids)))
    return loss / len(groups)


def picture_word_groups(tokenizer) -> list[torch.Tensor]:
    word = lambda w: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0]
    return [torch.tensor([word(w) for w in group])
            for group in (shapes.COLORS, shapes.KINDS, ("top", "bottom"), ("left", "right"))]


def caption_samples(n: int, *, seed: int, split: str, start: int = 0) -> list[shapes.Sample]:
    """Image-caption pairs for the align stage: one picture, "Describe the image." (or a variant) and
    the `describe` answer, with the task's system prompt so that the picture sits where it will."""
    samples = []
    for i in range(start, start + n):
        rng = random.Random(shapes.conversation_seed(split, seed, i))
        scene = shapes.random_scene(rng)
        question = rng.choice(["Describe the image.", "What is in the picture?", "Describe the picture briefly."])
        record = {"conversations": [
            {"from": "human", "value": IMAGE_TOKEN + question, "semantic_type": shapes.GLOBAL_CONDITION},
            {"from": "gpt", "value": shapes.describe_answer(scene), "semantic_type": shapes.LANDMARK}],
            "images": [shapes.draw_scene(scene)], "system": shapes.SYSTEM_PROMPT}
        samples.append(shapes.Sample(record, scene, ["describe"]))
    return samples


def conversation_batches(processor, stage: Stage):
    """Endless (batch, picture words, look-up queries) of fresh conversations, drawn `LENGTH_GROUPS`
    batches at a time and batched by length, as `build.training_batches` does."""
    lookup = ShapeLookup(processor.tokenizer)
    words = picture_words(processor.tokenizer)
    pad_id = pad_token_id(processor)
    window = LENGTH_GROUPS * stage.batch_size
    index = 0
    while True:
        if stage.name == "align":
            samples = caption_samples(window, seed=stage.seed, split=stage.data_split, start=index)
        else:
            samples = shapes.generate(window, seed=stage.seed, split=stage.data_split, noise=stage.noise, start=index)
        aligned = [align_record(s.record, processor) for s in samples]
        by_length = sorted(range(window), key=lambda j: len(aligned[j]))
        groups = [by_length[k:k + stage.batch_size] for k in range(0, window, stage.batch_size)]
        random.Random(f"groups/{shapes.conversation_seed(stage.data_split, stage.seed, index)}").shuffle(groups)
        index += window
        for group in groups:
            batch = pad_batch([aligned[j] for j in group], pad_token_id=pad_id)
            scenes = [samples[j].scene for j in group]
            queries = (lookup.queries(batch["input_ids"], lookup.answer_tokens(batch), scenes)
                       if stage.lookup_weight > 0 else None)
            yield batch, torch.stack([words(scene) for scene in scenes]), queries


def scene_batches(image_processor, stage: Stage):
    """Endless (pixel_values, patch classes, cells) of fresh scenes for the vision tower."""
    index = 0
    cells = torch.arange(len(shapes.SLOTS))
    while True:
        rng = random.Random(shapes.conversation_seed(stage.data_split, stage.seed, index))
        scenes = [shapes.random_scene(rng) for _ in range(stage.batch_size)]
        index += 1
        pixels = image_processor([shapes.draw_scene(s) for s in scenes], return_tensors="pt")["pixel_values"]
        yield pixels, torch.tensor([slot_targets(s) for s in scenes]), cells.repeat(len(scenes), 1)


# --- training --------------------------------------------------------------------------------------

def _optimizer(params, stage: Stage):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": stage.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=stage.learning_rate, betas=(0.9, 0.98))


def _run(stage: Stage, params, step_loss, *, progress: bool):
    """The loop every stage shares: warm-up + cosine schedule, clipping, a tqdm bar; returns losses."""
    from tqdm import tqdm

    optimizer = _optimizer(params, stage)
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    smoothed = None
    bar = tqdm(range(stage.steps), desc=stage.name, disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, stage)
        loss, total = step_loss()
        total.backward()
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        history.append(value)
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.set_postfix(loss=f"{smoothed:.3f}")
    return history


def pretrain_vision(stage: Stage, size: ComposedSize, out_dir: Path, *, progress: bool = True):
    """A CLIPVisionModel trained to say what each patch (= cell) shows and where it is; saved with
    its image processor. Returns (out_dir, losses)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(stage.seed)
    tower = CLIPVisionModel(vision_config(size))
    hidden = size.vision_hidden
    heads = torch.nn.ModuleDict({"what": torch.nn.Linear(hidden, len(shapes.KINDS) * len(shapes.COLORS) + 1),
                                 "where": torch.nn.Linear(hidden, len(shapes.SLOTS))})
    processor = image_processor()
    batches = scene_batches(processor, stage)
    tower.train()

    def step_loss():
        pixels, what, where = next(batches)
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER][:, 1:]
        ce = torch.nn.functional.cross_entropy
        loss = ce(heads["what"](states).flatten(0, 1), what.flatten())
        return loss, loss + ce(heads["where"](states).flatten(0, 1), where.flatten())

    history = _run(stage, [*tower.parameters(), *heads.parameters()], step_loss, progress=progress)
    tower.eval()
    tower.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir, history


def lookup_layers(model) -> list[int]:
    """The language-model layers the look-up loss reads: every one but the first (which cannot know yet
    which shape is meant) whose attention sees the whole context (not sliding-window, not pruned away):
    all of Qwen3's, the hybrid's full-attention ("hybrid") layers."""
    return [i for i, layer in enumerate(language_layers(model)) if i > 0
            and getattr(layer, "self_attn", None) is not None and getattr(layer.self_attn, "sliding_window", None) is None]


@contextmanager
def attention_inputs(model, layers):
    """{layer index: (hidden_states, position_embeddings)}: what the attention module of each of the
    given layers received in the last forward inside the block (`build.attention_inputs`, also where
    the hidden states come positionally, as in the hybrid's decoder layer)."""
    seen = {}
    modules = language_layers(model)

    def hook(module, args, kwargs, index):
        seen[index] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs["position_embeddings"])

    hooks = [modules[index].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: hook(module, args, kwargs, index), with_kwargs=True)
        for index in layers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _regularized(regularizer, model):
    """The context an optional training regularizer (e.g. `hybrid.GateRegularizer`) hooks the model in."""
    return regularizer.attach(model) if regularizer is not None else nullcontext()


def _lookup_loss(model, layer_inputs, batch, queries, image_token_id):
    if queries is None or not len(queries):
        return 0.0
    return ShapeLookup.loss(model, layer_inputs, batch["input_ids"], queries, image_token_id=image_token_id)


def pretrain_lm(stage: Stage, size: ComposedSize, processor, out_dir: Path, *, progress: bool = True,
                new_lm=None, regularizer=None):
    """A causal LM trained on shapes conversations whose picture is given in words at the four
    image positions (`picture_embeddings`); saved with its tokenizer. Returns (out_dir, losses).
    `new_lm(tokenizer)` makes the untrained LM (default: the Qwen3 of `lm_config`); `regularizer`, an
    extra training loss with `attach(model)` and `loss(batch)` (the hybrid's gate regularizers)."""
    from transformers import Qwen3ForCausalLM

    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(stage.seed)
    model = new_lm(tokenizer) if new_lm is not None else Qwen3ForCausalLM(lm_config(tokenizer, size))
    model.set_attn_implementation("hsa" if stage.hsa else "sdpa")
    model.train()
    batches = conversation_batches(processor, stage)
    groups = picture_word_groups(tokenizer)
    layers = lookup_layers(model) if stage.lookup_weight > 0 else []

    with attention_inputs(model, layers) as layer_inputs, _regularized(regularizer, model):
        def step_loss():
            batch, words, queries = next(batches)
            embedding = model.get_input_embeddings().weight
            embeds = embedding[batch["input_ids"]]
            image = batch["input_ids"] == image_id
            embeds = embeds.masked_scatter(image.unsqueeze(-1),
                                           picture_embeddings(embedding, words).reshape(-1, embedding.shape[1]))
            kwargs = {"semantic_ids": batch["semantic_ids"]} if stage.hsa else {}
            loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                         **kwargs).loss
            total = loss + stage.lookup_weight * _lookup_loss(model, layer_inputs, batch, queries, image_id)
            if stage.words_apart_weight > 0:
                total = total + stage.words_apart_weight * words_apart(embedding, groups)
            if regularizer is not None:
                total = total + regularizer.loss(batch)
            return loss, total

        history = _run(stage, model.parameters(), step_loss, progress=progress)
    model.eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, history


def _vlm_step(model, batch, stage: Stage):
    kwargs = {"semantic_ids": batch["semantic_ids"]} if stage.hsa else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], labels=batch["labels"], **kwargs)


def train_align(model, processor, stage: Stage, *, progress: bool = True):
    """The align stage on the assembled model: only the projector trains (`freeze_for_align`), on
    image-caption pairs, with the training-only target loss. Returns the losses."""
    freeze_for_align(model)
    model.set_attn_implementation({"text_config": "hsa" if stage.hsa else "sdpa", "vision_config": "sdpa"})
    model.train()
    projector = getattr(model.model, PROJECTOR)
    batches = conversation_batches(processor, stage)
    projected = []
    hook = projector.register_forward_hook(lambda module, args, output: projected.append(output))

    def step_loss():
        batch, words, _ = next(batches)
        projected.clear()
        loss = _vlm_step(model, batch, stage).loss
        total = loss
        if stage.target_weight > 0:
            with torch.no_grad():
                target = picture_embeddings(model.get_input_embeddings().weight, words)
            total = total + stage.target_weight * ((projected[0] - target) ** 2).sum(-1).mean() / target.pow(2).sum(-1).mean()
        return loss, total

    try:
        history = _run(stage, projector.parameters(), step_loss, progress=progress)
    finally:
        hook.remove()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return history


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def train_sft(model, processor, stage: Stage, *, progress: bool = True, lora_targets=LORA_TARGETS,
              regularizer=None):
    """The SFT stage: LoRA on the language model's projections (`lora_targets`: a peft target_modules),
    the projector trained in full, on conversations with NOISE turns under HSA plus the look-up loss
    (and an optional `regularizer`, as in `pretrain_lm`); LoRA merged back at the end.
    Returns (merged model, losses)."""
    from peft import LoraConfig, get_peft_model

    model.set_attn_implementation({"text_config": "hsa" if stage.hsa else "sdpa", "vision_config": "sdpa"})
    config = LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha, lora_dropout=0.0,
                        target_modules=lora_targets, modules_to_save=[PROJECTOR])
    torch.manual_seed(stage.seed)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    base = peft_model.get_base_model()
    image_id = base.config.image_token_id
    batches = conversation_batches(processor, stage)
    layers = lookup_layers(base) if stage.lookup_weight > 0 else []

    with attention_inputs(base, layers) as layer_inputs, _regularized(regularizer, base):
        def step_loss():
            batch, _, queries = next(batches)
            loss = _vlm_step(peft_model, batch, stage).loss
            total = loss + stage.lookup_weight * _lookup_loss(base, layer_inputs, batch, queries, image_id)
            if regularizer is not None:
                total = total + regularizer.loss(batch)
            return loss, total

        history = _run(stage, peft_model.parameters(), step_loss, progress=progress)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, history


# --- the build -------------------------------------------------------------------------------------

def save(model, processor, out_dir: str | Path, record: dict) -> Path:
    """save_pretrained in bfloat16 (it loads as float32 on CPU), the processor, and build.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.hsa_trained = True  # read by models.vlm / the eval to pick the attention default
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(record, indent=1))
    return out


def build_composed(out_dir: str | Path = DEFAULT_COMPOSED_DIR, *, seed: int = 0, threads: int | None = DEFAULT_THREADS,
                   vision_steps: int | None = None, lm_steps: int | None = None, align_steps: int | None = None,
                   sft_steps: int | None = None, size: ComposedSize | None = None, parts_dir: str | Path | None = None,
                   progress: bool = True) -> Path:
    """Pretrain the parts, assemble, align, SFT, merge and save to `out_dir`. `parts_dir` keeps the
    pretrained vision tower (`vision/`) and LM (`lm/`); by default they go to a temporary directory."""
    if threads:
        torch.set_num_threads(threads)
    size = size or ComposedSize()
    kw = lambda steps: {} if steps is None else {"steps": steps}
    stages = [vision_stage(seed=seed, **kw(vision_steps)), lm_stage(seed=seed, **kw(lm_steps)),
              align_stage(seed=seed, **kw(align_steps)), sft_stage(seed=seed, **kw(sft_steps))]
    vision, lm, align, sft = stages
    start = time.monotonic()
    load_before = os.getloadavg()
    seconds, losses = {}, {}

    def timed(name, began):
        seconds[name] = round(time.monotonic() - began, 1)
        if progress:
            print(f"{name}: {seconds[name]:.0f} s")

    with tempfile.TemporaryDirectory() as scratch:
        parts = Path(parts_dir) if parts_dir is not None else Path(scratch)
        began = time.monotonic()
        _, losses["vision"] = pretrain_vision(vision, size, parts / "vision", progress=progress)
        timed("vision", began)
        began = time.monotonic()
        processor = training_processor()
        _, losses["lm"] = pretrain_lm(lm, size, processor, parts / "lm", progress=progress)
        timed("lm", began)
        began = time.monotonic()
        model, processor = assemble(parts / "vision", parts / "lm", vision_feature_layer=VISION_FEATURE_LAYER)
        torch.manual_seed(seed)
        losses["align"] = train_align(model, processor, align, progress=progress)
        timed("align", began)
    began = time.monotonic()
    model, losses["sft"] = train_sft(model, processor, sft, progress=progress)
    timed("sft", began)
    total = time.monotonic() - start
    record = {
        "model": "tiny CLIP vision tower + 2-layer GELU projector + tiny Qwen3 (LlavaForConditionalGeneration)",
        "stages": [s.to_dict() for s in stages], "size": asdict(size), "vision_feature_layer": VISION_FEATURE_LAYER,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpus": os.cpu_count(), "seconds": round(total),
        "seconds_per_stage": seconds,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "final_loss": {name: round(values[-1], 4) for name, values in losses.items() if values},
        "loss_every_25": {name: [round(v, 4) for v in values[::25]] for name, values in losses.items()},
    }
    path = save(model, processor, out_dir, record)
    if progress:
        print(f"saved {path} after {total:.0f} s")
    return path
