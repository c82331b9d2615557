"""The embedded composed VLM (tiny CLIP + projector + tiny Qwen3, as Llava): the committed checkpoint,
and the pieces of `python -m models.zoo build-composed` at tiny step counts."""
from __future__ import annotations

import json

import pytest
import torch

from models.zoo import DEFAULT_COMPOSED_DIR, embedded_model, shapes
from models.zoo import composed as C


@pytest.fixture(scope="module")
def committed():
    from models.vlm import load_vlm

    return load_vlm(DEFAULT_COMPOSED_DIR, attn_implementation="hsa", device="cpu")


def test_committed_model_is_a_llava_of_clip_and_qwen3_trained_with_hsa(committed):
    model, processor = committed
    config = model.config
    assert config.model_type == "llava"
    assert config.vision_config.model_type == "clip_vision_model" and config.text_config.model_type == "qwen3"
    assert config.hsa_trained is True and config.image_seq_length == 4
    assert type(processor).__name__ == "LlavaProcessor"
    size = sum(p.stat().st_size for p in DEFAULT_COMPOSED_DIR.iterdir())
    assert size <= 25 * 2**20
    record = json.loads((DEFAULT_COMPOSED_DIR / "build.json").read_text())
    assert [stage["name"] for stage in record["stages"]] == ["vision", "lm", "align", "sft"]
    assert record["threads"] and record["seconds"] <= 15 * 60


def test_committed_model_answers_held_out_questions(committed):
    """Through the Chat tab's generation code, greedy, on conversations no build trained on."""
    from models.vlm import GenerationSettings, generate_reply
    from models.zoo.evaluate import graded_prompts, normalize

    model, processor = committed
    settings = GenerationSettings(mode="greedy", max_new_tokens=32)
    right = total = 0
    for sample in shapes.generate(4, seed=123, split="eval"):
        for record, expected, _, _ in graded_prompts(sample):
            reply = generate_reply(model, processor, record, settings=settings)
            right += normalize(reply) == normalize(expected)
            total += 1
    assert total >= 8 and right >= total - 1, f"{right}/{total}"


def test_eval_resolves_the_embedded_names():
    from models.zoo.evaluate import evaluate_model

    assert embedded_model("composed") == DEFAULT_COMPOSED_DIR
    assert str(embedded_model("some/dir")) == "some/dir"
    result = evaluate_model("composed", n=2, seed=5)
    assert len(result.graded) >= 4 and result.accuracy >= 0.5


def test_picture_words_name_each_cell_in_reading_order():
    tokenizer = C.composed_tokenizer()
    word = lambda w: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0]
    scene = shapes.Scene((shapes.Shape("circle", "red", "bottom left"),), seed=0)
    words = C.picture_words(tokenizer)(scene)
    assert words.shape == (4, 4)
    assert words[2].tolist() == [word("bottom"), word("left"), word("red"), word("circle")]
    assert words[1].tolist() == [word("top"), word("right"), -1, -1]
    embedding = torch.randn(len(tokenizer), 8)
    summed = C.picture_embeddings(embedding, words)
    assert torch.allclose(summed[1], embedding[word("top")] + embedding[word("right")])


def test_the_training_processor_is_the_assembled_models_layout():
    """The LM pretrains on what the assembled processor makes: four <image> tokens per picture."""
    from models.data.align import align_record

    processor = C.training_processor()
    sample = shapes.generate(1, seed=0)[0]
    aligned = align_record(sample.record, processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((aligned.input_ids == image_id).sum()) == 4
    assert aligned.model_inputs["pixel_values"].shape[-2:] == (56, 56)
    pixels = aligned.model_inputs["pixel_values"][0]
    assert float(pixels[:, :2, :2].abs().max()) == 0.0  # the white background is zero


def test_shape_lookup_reads_qwen3s_own_attention():
    """`ShapeLookup.attention_to_named` (q_norm / k_norm, then 1-D RoPE) is what the LM's eager attention
    gives the named image token, renormalised over the picture's four tokens, for every head and layer."""
    from transformers import Qwen3ForCausalLM

    from models.zoo.build import ShapeLookup, attention_inputs

    processor = C.training_processor()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(C.lm_config(processor.tokenizer, C.ComposedSize())).eval()
    for name, param in model.named_parameters():  # norms away from 1, so that leaving them out would show
        if "norm" in name:
            param.data.uniform_(0.5, 1.5)
    model.set_attn_implementation("eager")
    stage = C.lm_stage(seed=2)
    stage.batch_size = 6
    batch, _, queries = next(C.conversation_batches(processor, stage))
    layers = model.model.layers
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    with torch.no_grad(), attention_inputs(model, range(len(layers))) as inputs:
        attentions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_attentions=True).attentions
    image = ShapeLookup.image_positions(batch["input_ids"], image_id)
    assert len(queries) > 5
    for i, layer in enumerate(layers):
        ours = ShapeLookup.attention_to_named(layer.self_attn, *inputs[i], image, queries)
        for m, (b, q, slot) in enumerate(queries.tolist()):
            over_image = attentions[i][b, :, q, image[b]]
            torch.testing.assert_close(ours[m], over_image[:, slot] / over_image.sum(-1), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A vision tower and an LM pretrained for a few steps each."""
    out = tmp_path_factory.mktemp("parts")
    C.pretrain_vision(C.vision_stage(3), C.ComposedSize(), out / "vision", progress=False)
    C.pretrain_lm(C.lm_stage(3), C.ComposedSize(), C.training_processor(), out / "lm", progress=False)
    return out


def test_align_trains_only_the_projector(parts):
    from models.composed import PROJECTOR, assemble

    model, processor = assemble(parts / "vision", parts / "lm", vision_feature_layer=C.VISION_FEATURE_LAYER)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    C.train_align(model, processor, C.align_stage(3), progress=False)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(f"{PROJECTOR}." in name for name in changed)
    assert {name for name in before if f"{PROJECTOR}." in name and name.endswith("weight")} <= changed


def test_a_tiny_build_saves_a_loadable_model_with_the_parts_inside(tmp_path):
    """Every stage for a few steps: the saved model loads through models.vlm and answers; its vision
    tower is the pretrained one (align freezes it, SFT's LoRA leaves it out)."""
    from safetensors.torch import load_file

    from models.vlm import generate_reply, load_vlm
    from models.zoo.evaluate import graded_prompts

    out = C.build_composed(tmp_path / "model", vision_steps=2, lm_steps=2, align_steps=2, sft_steps=2,
                           parts_dir=tmp_path / "parts", progress=False)
    record = json.loads((out / "build.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["vision", "lm", "align", "sft"]
    assert [s["steps"] for s in record["stages"]] == [2, 2, 2, 2] and record["threads"] == C.DEFAULT_THREADS
    model, processor = load_vlm(out, attn_implementation="hsa", device="cpu")
    assert model.config.hsa_trained is True
    vision = load_file(tmp_path / "parts" / "vision" / "model.safetensors")
    saved = model.model.vision_tower.state_dict()
    assert set(vision) == set(saved)
    for name, value in vision.items():
        assert torch.equal(saved[name], value.to(torch.bfloat16).float()), name  # saved in bfloat16
    assert not any("lora" in name for name in model.state_dict())
    record, _, _, _ = next(graded_prompts(shapes.generate(1, seed=0, split="eval")[0]))
    assert isinstance(generate_reply(model, processor, record), str)
