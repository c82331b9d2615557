"""A VLM composed from parts (models.composed): tiny random vision encoders (CLIP, SigLIP) and language
models (Qwen3, Llama) assembled into transformers' Llava class, saved and loaded like any checkpoint,
with HSA reaching the language model's attention and only there."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import save_language_part, save_tiny_composed, save_vision_part, shapes_png

from models.composed import ComposeError, assemble
from models.composed.__main__ import main as composed_main
from models.hsa import NOISE, generate
from models.data.align import HSACollator, align_record, pad_batch, pad_token_id

PARTS = [("clip", "qwen3"), ("siglip", "llama")]


def load(directory, attn="hsa"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(directory, attn_implementation=attn).eval(), \
        AutoProcessor.from_pretrained(directory)


@pytest.mark.parametrize("vision,lm", PARTS)
def test_build_command_assembles_saves_and_loads_with_the_parts_weights(tmp_path, vision, lm, capsys):
    vision_dir = save_vision_part(tmp_path / vision, vision)
    lm_dir = save_language_part(tmp_path / lm, lm)
    out = tmp_path / "composed"
    assert composed_main(["build", "--vision", str(vision_dir), "--lm", str(lm_dir), "--out", str(out)]) == 0
    assert "4 image tokens" in capsys.readouterr().out
    assert (out / "model.safetensors").exists()
    model, processor = load(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == ("default" if vision == "clip" else "full")
    assert config["text_config"]["model_type"] == lm

    # every tensor of both parts comes back from disk unchanged; the projector is new
    from transformers import AutoModel, AutoModelForCausalLM

    tower = AutoModel.from_pretrained(vision_dir).state_dict()
    for name, tensor in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(tensor, tower[name])
    language = AutoModelForCausalLM.from_pretrained(lm_dir)
    for name, tensor in language.model.state_dict().items():
        ours = model.model.language_model.state_dict()[name]
        if "embed_tokens" in name:
            ours = ours[:tensor.shape[0]]  # <image> was added to the vocabulary
        torch.testing.assert_close(ours, tensor)
    torch.testing.assert_close(model.lm_head.weight[:language.lm_head.weight.shape[0]], language.lm_head.weight)
    assert sum(p.numel() for p in model.model.multi_modal_projector.parameters()) > 0
    assert (out / "model.safetensors").stat().st_size > 0

    # one image is as many <image> tokens as the tower has patches (CLS dropped by LLaVA's default)
    shapes_png(tmp_path / "red.png")
    aligned = align_record({"conversations": [{"from": "human", "value": "<image>What color?"}],
                            "images": ["red.png"]}, processor, image_root=tmp_path, add_generation_prompt=True)
    assert sum(t == "<image>" for t in aligned.tokens) == 4
    assert (aligned.input_ids == model.config.image_token_id).sum() == 4


def test_bad_parts_are_refused_with_the_reason(tmp_path):
    siglip = save_vision_part(tmp_path / "siglip", "siglip")
    qwen = save_language_part(tmp_path / "qwen3", "qwen3")
    with pytest.raises(ComposeError, match="no CLS token"):
        assemble(siglip, qwen, select_strategy="default")
    with pytest.raises(ComposeError, match="feature layer 7"):
        assemble(siglip, qwen, vision_feature_layer=7)
    with pytest.raises(ComposeError, match="language model"):
        assemble(siglip, tmp_path / "missing")
    with pytest.raises(ComposeError, match="vision encoder"):
        assemble(tmp_path / "missing", qwen)
    assert composed_main(["build", "--vision", str(siglip), "--lm", str(qwen), "--out", str(tmp_path / "x"),
                          "--select-strategy", "default"]) == 2
    assert not (tmp_path / "x").exists()


def noise_record(noise_text: str, noise_image: str):
    """A conversation with an image in a GLOBAL turn and another image inside a NOISE turn."""
    return {"conversations": [
        {"from": "human", "value": "<image>What color is the circle?"},
        {"from": "gpt", "value": "The circle is red.", "semantic_type": "LANDMARK"},
        {"from": "human", "value": f"<image>{noise_text}", "semantic_type": "NOISE"},
        {"from": "human", "value": "And how many shapes are there?"},
        {"from": "gpt", "value": "There is one shape.", "semantic_type": "LANDMARK"}],
        "images": ["red.png", noise_image]}


def noise_pair(tmp_path, processor, image_token: int, *, prompt_only: bool = False):
    """Two batches of one conversation that differ only in its NOISE turn: other words at the same
    positions, and another picture (so that RoPE positions line up and only content differs)."""
    shapes_png(tmp_path / "red.png")
    shapes_png(tmp_path / "green.png", color=(0, 200, 0))
    shapes_png(tmp_path / "blue.png", color=(0, 0, 255))

    def batch(noise_image):
        record = noise_record("I think the circle is green.", noise_image)
        if prompt_only:
            record["conversations"] = record["conversations"][:4]
        aligned = align_record(record, processor, image_root=tmp_path, add_generation_prompt=prompt_only)
        return pad_batch([aligned], pad_token_id=pad_token_id(processor))

    a, b = batch("green.png"), batch("blue.png")
    words = (a["semantic_ids"] == NOISE) & (a["input_ids"] != image_token)
    random_ids = torch.randint(10, 300, a["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    b["input_ids"] = torch.where(words, random_ids, a["input_ids"])
    assert not torch.equal(a["pixel_values"], b["pixel_values"]) and not torch.equal(a["input_ids"], b["input_ids"])
    return a, b


@pytest.mark.parametrize("vision,lm", PARTS)
def test_noise_text_and_noise_images_are_invisible_to_global_and_landmark_logits(tmp_path, vision, lm):
    model, processor = load(save_tiny_composed(tmp_path / "m", vision, lm))
    image_token = model.config.image_token_id
    a, b = noise_pair(tmp_path, processor, image_token)
    assert a["semantic_ids"][a["input_ids"] == image_token].tolist() == [0] * 4 + [NOISE] * 4  # its turn's role
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
        plain_a = model(**{k: v for k, v in a.items() if k != "semantic_ids"}).logits
        plain_b = model(**{k: v for k, v in b.items() if k != "semantic_ids"}).logits
    keep = a["semantic_ids"] != NOISE
    torch.testing.assert_close(la[keep], lb[keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain_a[keep], plain_b[keep], atol=1e-4)  # without HSA the noise gets through


def test_vision_tower_stays_plain_attention_and_hsa_without_roles_is_sdpa(tmp_path):
    directory = save_tiny_composed(tmp_path / "m")
    hsa, processor = load(directory, "hsa")
    sdpa, _ = load(directory, "sdpa")
    shapes_png(tmp_path / "red.png")
    batch = HSACollator(processor, image_root=tmp_path)([noise_record("lol", "red.png")])
    with torch.no_grad():
        features_hsa = hsa.get_image_features(batch["pixel_values"]).pooler_output
        features_sdpa = sdpa.get_image_features(batch["pixel_values"]).pooler_output
        plain = {k: v for k, v in batch.items() if k != "semantic_ids"}
        torch.testing.assert_close(hsa(**plain).logits, sdpa(**plain).logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(features_hsa, features_sdpa):
        torch.testing.assert_close(x, y)


def test_cached_generation_follows_the_roles_and_matches_a_full_forward(tmp_path):
    model, processor = load(save_tiny_composed(tmp_path / "m", "siglip", "qwen3"))
    a, b = noise_pair(tmp_path, processor, model.config.image_token_id, prompt_only=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=None)
    inputs = lambda batch: {k: v for k, v in batch.items() if k != "labels"}  # noqa: E731
    out_a, out_b = generate(model, **inputs(a), **kwargs), generate(model, **inputs(b), **kwargs)
    length = a["input_ids"].shape[1]
    assert torch.equal(out_a.sequences[:, length:], out_b.sequences[:, length:])
    for sa, sb in zip(out_a.scores, out_b.scores):
        torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the cached steps equal one forward pass over prompt + reply
        full = model(input_ids=out_a.sequences, pixel_values=a["pixel_values"], semantic_ids=a["semantic_ids"]).logits
        plain_a, plain_b = (model.generate(**{k: v for k, v in inputs(x).items() if k != "semantic_ids"}, **kwargs)
                            for x in (a, b))
    torch.testing.assert_close(full[0, -2], out_a.scores[-1][0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain_a.scores[0], plain_b.scores[0], atol=1e-4)  # without roles the noise counts
