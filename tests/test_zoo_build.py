"""The default VLM: its tokenizer and processor, the build command, and the committed checkpoint."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from models.zoo import shapes
from models.zoo.build import DEFAULT_DIR
from models.zoo.processor import CHAT_TEMPLATE, SPECIAL_TOKENS, build_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_tokenizer_has_qwen_special_tokens_and_chatml(processor):
    tokenizer = processor.tokenizer
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.image_token == "<|image_pad|>" and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for odd in ["What colour is the circle?", "日本語 🙂 café e\u0301", "  two  spaces\n\ttab"]:
        assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd  # byte-level: any text survives
    assert len(tokenizer("The circle is red.")["input_ids"]) <= 6  # the shapes words are single tokens


def test_processor_matches_qwen2vl_processor(processor):
    """The image-only processor gives exactly what Qwen2VLProcessor gives for the same parts."""
    from models.vlm.processor import ImageOnlyQwen2VLProcessor

    qwen = ImageOnlyQwen2VLProcessor(processor.image_processor, processor.tokenizer, chat_template=CHAT_TEMPLATE)
    sample = shapes.generate(1, seed=0)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = processor(text=[text], images=sample.record["images"], return_tensors="pt")
    theirs = qwen(text=[text], images=sample.record["images"], return_tensors="pt")
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert (ours["input_ids"] == processor.tokenizer.image_token_id).sum() == 4  # 56x56: four image tokens
    big = sample.record["images"][0].resize((640, 480))
    assert (processor(text=[text], images=[big], return_tensors="pt")["input_ids"]
            == processor.tokenizer.image_token_id).sum() <= 4  # any picture stays small


def merged_runs(processor, scene: shapes.Scene) -> torch.Tensor:
    """The processor's patches of the scene, grouped per merged image token: [slots, merge**2, pixels]."""
    pixels = processor.image_processor([shapes.draw_scene(scene)], return_tensors="pt")["pixel_values"]
    return pixels.reshape(len(shapes.SLOTS), processor.image_processor.merge_size ** 2, -1)


def test_the_grid_lines_tell_the_slots_apart(processor):
    """An empty slot's image token still says which slot it is: the grid's lines cross three of the
    slot's four patches, and the one they miss (the slot's outer corner) differs from slot to slot."""
    runs = merged_runs(processor, shapes.Scene((), seed=0))
    blank_patches = [[j for j, patch in enumerate(run) if not (patch != 0).any()] for run in runs]  # white is 0
    assert blank_patches == [[0], [1], [2], [3]]


def test_the_kth_image_token_shows_the_kth_slot(processor):
    """The build's vision probe takes merged image token k of each image to be slot k of shapes.SLOTS,
    with the class `slot_targets` gives it. Checked against the pixels the processor emits: each merged
    token is a run of merge_size**2 patches, and only the run of the shape's slot differs from the
    empty grid's."""
    from models.zoo.build import SLOT_CLASSES, slot_targets

    empty = merged_runs(processor, shapes.Scene((), seed=0))
    for k, slot in enumerate(shapes.SLOTS):
        scene = shapes.Scene((shapes.Shape("square", "blue", slot),), seed=k)
        inked = [bool((run != blank).any()) for run, blank in zip(merged_runs(processor, scene), empty)]
        assert inked == [j == k for j in range(len(shapes.SLOTS))], slot
        targets = slot_targets(scene)
        assert 0 < targets[k] < SLOT_CLASSES and all(t == 0 for j, t in enumerate(targets) if j != k)


def test_the_word_probe_wants_each_image_token_to_point_at_its_words(processor):
    """The probe's loss is small for image tokens that point (in cosine) at the embeddings of the kind
    and colour their slot shows (or at the probe's "empty" vectors), and large when a token points at
    another kind or the tokens come in another order."""
    from models.zoo.build import WordProbe, slot_targets

    torch.manual_seed(0)
    hidden = 128
    probe = WordProbe(processor.tokenizer, hidden)
    embeddings = torch.randn(len(processor.tokenizer), hidden)
    unit = lambda v: torch.nn.functional.normalize(v, dim=0)
    word = lambda w: unit(embeddings[processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.tokenize(" " + w))[0]])
    scene = shapes.Scene((shapes.Shape("square", "blue", "bottom left"),), seed=0)
    targets = torch.tensor(slot_targets(scene))
    with torch.no_grad():
        empty = unit(probe.empty[0]) + unit(probe.empty[1])
        right = torch.stack([empty, empty, word("square") + word("blue"), empty])
        wrong_kind = right.clone()
        wrong_kind[2] += word("circle") - word("square")
        assert probe(right, embeddings, targets) < 0.1 < 1.0 < probe(wrong_kind, embeddings, targets)
        assert probe(right.roll(1, dims=0), embeddings, targets) > 2.0  # the same tokens in the wrong slots


def test_shape_lookup_finds_every_word_about_a_shape(processor):
    """Every colour, kind and cell word of every answer gets one query (the token before it) and the
    slot of the shape the word is about; NOISE turns and questions get none."""
    import random

    from models.zoo.build import ShapeLookup
    from models.data.align import HSACollator

    tokenizer = processor.tokenizer
    scene = shapes.Scene((shapes.Shape("circle", "red", "bottom right"), shapes.Shape("square", "blue", "top left")), 0)
    turns = [("Where is the circle?", "The circle is at the bottom right."),
             ("Is the square on the left or on the right?", "The square is on the left."),
             ("Which shape is blue?", "The blue shape is a square."),
             ("Describe the image.", "A blue square at the top left and a red circle at the bottom right."),
             ("How many shapes are there?", "There are two shapes.")]
    conversations = []
    for question, answer in turns:
        conversations += [{"from": "human", "value": question, "semantic_type": "GLOBAL_CONDITION"},
                          {"from": "gpt", "value": answer, "semantic_type": "LANDMARK"}]
    conversations[0]["value"] = "<image>" + conversations[0]["value"]
    conversations[2:2] = [{"from": "human", "value": "I'm sure the circle is at the top left.", "semantic_type": "NOISE"},
                          {"from": "gpt", "value": "The square is red.", "semantic_type": "NOISE"}]
    record = {"conversations": conversations, "images": [shapes.draw_scene(scene)], "system": shapes.SYSTEM_PROMPT}
    batch = HSACollator(processor)([record])
    queries = ShapeLookup(tokenizer).queries(batch["input_ids"], ShapeLookup.answer_tokens(batch), [scene])
    ids = batch["input_ids"][0]
    seen = [(tokenizer.decode(ids[q + 1]).strip(), list(shapes.SLOTS)[slot]) for _, q, slot in queries.tolist()]
    circle, square = "bottom right", "top left"
    assert seen == [("circle", circle), ("bottom", circle), ("right", circle),
                    ("square", square), ("left", square),
                    ("blue", square), ("square", square),
                    ("blue", square), ("square", square), ("top", square), ("left", square),
                    ("red", circle), ("circle", circle), ("bottom", circle), ("right", circle)]
    # on generated conversations: one query per such word in the answers
    samples = [shapes.make_conversation(random.Random(k), noise=shapes.HEAVY_NOISE) for k in range(20)]
    batch = HSACollator(processor)([s.record for s in samples])
    queries = ShapeLookup(tokenizer).queries(batch["input_ids"], ShapeLookup.answer_tokens(batch), [s.scene for s in samples])
    words = "|".join([*shapes.KINDS, *shapes.COLORS, "top", "bottom", "left", "right"])
    in_answers = sum(len(re.findall(rf"\b({words})\b", t["value"], flags=re.IGNORECASE))
                     for s in samples for t in s.record["conversations"]
                     if t["from"] == "gpt" and t["semantic_type"] == "LANDMARK")
    assert len(queries) == in_answers > 50


def test_shape_lookup_reads_the_models_own_attention(processor):
    """`attention_to_named` is what the model's eager attention gives the named image token,
    renormalised over the image's tokens, for every head of every layer."""
    from models.zoo.build import ModelSize, ShapeLookup, attention_inputs, clean_stage, new_model, training_batches

    model = new_model(processor, ModelSize(), seed=3, hsa=False).eval()
    model.set_attn_implementation("eager")
    batch, _, queries = next(training_batches(processor, clean_stage(batch_size=6, seed=2)))
    batch.pop("semantic_ids")
    layers = model.model.language_model.layers
    with torch.no_grad(), attention_inputs(model, range(len(layers))) as inputs:
        attentions = model(**batch, output_attentions=True).attentions
    image = ShapeLookup.image_positions(batch["input_ids"], model.config.image_token_id)
    assert len(queries) > 5
    for i, layer in enumerate(layers):
        ours = ShapeLookup.attention_to_named(layer.self_attn, *inputs[i], image, queries)
        for m, (b, q, slot) in enumerate(queries.tolist()):
            over_image = attentions[i][b, :, q, image[b]]
            torch.testing.assert_close(ours[m], over_image[:, slot] / over_image.sum(-1), rtol=1e-4, atol=1e-6)


def test_training_batches_are_each_window_of_conversations_grouped_by_length(processor):
    """The first LENGTH_GROUPS batches hold the window's conversations, each once; each batch is what
    HSACollator makes of its records, with their slot classes; and the batches split the window by
    length (no batch has a conversation longer than one in a batch of longer conversations)."""
    from models.zoo.build import LENGTH_GROUPS, clean_stage, slot_targets, training_batches
    from models.data.align import HSACollator

    stage = clean_stage(batch_size=3, seed=7)
    drawn = training_batches(processor, stage)
    samples = shapes.generate(3 * LENGTH_GROUPS, seed=7, split=stage.data_split, noise=stage.noise)
    collate = HSACollator(processor)
    alone = [collate([s.record])["input_ids"][0] for s in samples]
    groups = []
    for _ in range(LENGTH_GROUPS):
        batch, targets, _ = next(drawn)
        rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        group = [next(j for j, ids in enumerate(alone) if torch.equal(ids, row)) for row in rows]
        expected = collate([samples[j].record for j in group])
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[key], expected[key]) for key in batch), group
        assert torch.equal(targets, torch.tensor([c for j in group for c in slot_targets(samples[j].scene)]))
        groups.append(group)
    assert sorted(j for group in groups for j in group) == list(range(len(samples)))
    lengths = sorted(sorted(len(alone[j]) for j in group) for group in groups)
    assert all(shorter[-1] <= longer[0] for shorter, longer in zip(lengths, lengths[1:])), lengths


def test_prefetched_batches_are_the_training_batches(processor):
    """The worker process draws exactly the batches the build would draw itself (a pure function of the seed)."""
    from models.zoo.build import PrefetchedBatches, clean_stage, noisy_stage, training_batches

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: the build draws its batches inline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a core left free: the loader uses a worker process
    try:
        loaders = [(training_batches(processor, s), PrefetchedBatches(processor, s).loader())
                   for s in (clean_stage(batch_size=3, seed=5), noisy_stage(batch_size=3, seed=5))]
    finally:
        torch.set_num_threads(threads)
    for inline, prefetched in loaders:
        assert not isinstance(prefetched, types.GeneratorType)  # batches come from the worker
        for _ in range(3):
            (batch, *targets), (other, *other_targets) = next(inline), next(prefetched)
            assert batch.keys() == other.keys()
            for key in batch:
                assert torch.equal(batch[key], other[key]), key
            assert all(torch.equal(a, b) for a, b in zip(targets, other_targets, strict=True))


# As any other program loads a Qwen2-VL checkpoint: the Auto classes. transformers' Qwen2-VL processor
# always builds a video processor, which needs torchvision; where that is missing (this CPU setup),
# the processor comes from models.vlm.load_processor: the same Qwen2-VL processor without its video part.
LOAD_WITH_AUTO_CLASSES = """
import importlib.util, json, sys, torch
from pathlib import Path
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image
path = sys.argv[1]
assert json.loads((Path(path) / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
if importlib.util.find_spec("torchvision"):
    processor = AutoProcessor.from_pretrained(path)
else:
    sys.path.insert(0, sys.argv[2])
    from models.vlm import load_processor
    processor = load_processor(path)
model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.new("RGB", (56, 56), "white")], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
assert logits.shape[-1] == len(processor.tokenizer), logits.shape
print(type(model).__name__, type(processor).__name__, model.dtype)
"""


def load_in_fresh_interpreter(path: Path) -> str:
    """Auto classes, as any other program would load it (the processor through the project only where
    torchvision is missing)."""
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_AUTO_CLASSES, str(path), str(ROOT)], capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_build_command_makes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "vlm"
    done = subprocess.run([sys.executable, "-m", "models.zoo", "build", "--steps", "3", "--noisy-steps", "2",
                           "--batch-size", "2", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3/3" in done.stderr and "2/2" in done.stderr  # both stages' progress bars ran to the end
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "build.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "build.json").read_text())
    clean, noisy = record["stages"]
    assert record["threads"] == 1  # what it ran with, not the stages' null for "torch's default"
    assert (clean["steps"], clean["noise"]["rate"]) == (3, 0.0)
    assert (noisy["steps"], noisy["hsa"], noisy["noise"]["rate"]) == (2, True, shapes.TRAIN_NOISE.rate)
    assert "Qwen2VLForConditionalGeneration ImageOnlyQwen2VLProcessor torch.float32" in load_in_fresh_interpreter(out)


def test_committed_default_model_is_small():
    weights = DEFAULT_DIR / "model.safetensors"
    assert weights.exists(), "the default model is missing: python -m models.zoo build"
    assert weights.stat().st_size <= 25 * 2**20
    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["hsa_trained"] is True


@pytest.mark.slow
def test_committed_default_model_loads_with_auto_classes():
    assert "Qwen2VLForConditionalGeneration" in load_in_fresh_interpreter(DEFAULT_DIR)
