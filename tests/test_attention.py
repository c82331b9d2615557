"""Attention maps with HSA off and on: against the eager `output_attentions` reference, noise mass,
the image overlay's geometry, and the command as a real subprocess."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (ROOT, build_qwen2vl_processor, build_wordpiece_tokenizer, save_tiny_qwen2vl, shapes_png,
                      tiny_qwen2vl)
from models.hsa import NOISE
from models.data.align import align_record, pad_batch, pad_token_id
from workbench.attention import (AttentionUnsupported, attention_figure, compute_attention, image_attention,
                                 image_overlay, mass_figure)


def record_with_image(image="scene.png"):
    return {"system": "Answer about the image.", "images": [image], "conversations": [
        {"from": "human", "value": "<image>What color is the circle?"},
        {"from": "gpt", "value": "The circle is red.", "semantic_type": "LANDMARK"},
        {"from": "human", "value": "I am sure it is green, trust me.", "semantic_type": "NOISE"},
        {"from": "human", "value": "How many shapes are there?"},
        {"from": "gpt", "value": "One.", "semantic_type": "LANDMARK"}]}


@pytest.fixture(scope="module")
def processor():
    return build_qwen2vl_processor()


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    # 112 x 56: a 2 x 4 grid of merged cells; the top-right cell is red, the rest white
    image = Image.new("RGB", (112, 56), "white")
    image.paste((255, 0, 0), (84, 0, 112, 28))
    image.save(root / "scene.png")
    return root


@pytest.fixture(scope="module")
def model(processor):
    return tiny_qwen2vl(processor, seed=3)


@pytest.fixture(scope="module")
def eager(processor):
    return tiny_qwen2vl(processor, seed=3, attn_implementation="eager")


def model_batch(processor, record, root):
    aligned = align_record(record, processor, image_root=root)
    batch = pad_batch([aligned], pad_token_id=pad_token_id(processor))
    batch.pop("labels")
    return batch, batch.pop("semantic_ids")


@pytest.mark.parametrize("head", [None, 3])
def test_maps_equal_the_output_attentions_reference(model, eager, processor, scene_dir, head):
    record = record_with_image()
    result = compute_attention(model, processor, record, layer=1, head=head, image_root=scene_dir, chunk=16)
    batch, roles = model_batch(processor, record, scene_dir)
    with torch.no_grad():
        plain = eager(**batch, output_attentions=True).attentions  # another implementation, all layers
        with_roles = model(**batch, semantic_ids=roles, output_attentions=True).attentions
    pick = (lambda a: a[1][0].mean(0)) if head is None else (lambda a: a[1][0, head])
    np.testing.assert_allclose(result.off, pick(plain).numpy(), atol=1e-5)
    np.testing.assert_allclose(result.on, pick(with_roles).numpy(), atol=1e-5)
    np.testing.assert_allclose(result.diff, result.on - result.off)
    # independent of both: HSA on gives GLOBAL/LANDMARK queries nothing on NOISE keys, rows sum to 1
    r = roles[0]
    assert result.on[np.ix_((r != NOISE).numpy(), (r == NOISE).numpy())].max() == 0.0
    assert result.off[np.ix_((r != NOISE).numpy(), (r == NOISE).numpy())].max() > 0.0
    np.testing.assert_allclose(result.on.sum(-1), 1.0, atol=1e-5)
    assert len(result.tokens) == len(result.roles) == result.on.shape[0] == len(batch["input_ids"][0])


def test_noise_mass_is_zero_with_hsa_and_image_mass_matches_the_reference(model, eager, processor, scene_dir):
    record = record_with_image()
    result = compute_attention(model, processor, record, layer=0, image_root=scene_dir)
    assert result.noise_mass["hsa_on"] == [0.0, 0.0]
    assert all(v > 0.0 for v in result.noise_mass["hsa_off"])
    batch, roles = model_batch(processor, record, scene_dir)
    is_image = (batch["input_ids"][0] == processor.image_token_id)
    queries = (roles[0] != NOISE) & ~is_image
    with torch.no_grad():
        plain = eager(**batch, output_attentions=True).attentions
    for layer, weights in enumerate(plain):
        on_image = weights[0][:, :, is_image].sum(-1)[:, queries].mean().item()
        on_noise = weights[0][:, :, roles[0] == NOISE].sum(-1)[:, queries].mean().item()
        assert result.image_mass["hsa_off"][layer] == pytest.approx(on_image, abs=1e-5)
        assert result.noise_mass["hsa_off"][layer] == pytest.approx(on_noise, abs=1e-5)
    assert result.image_grids == [(1, 2, 4)] and len(result.image_positions[0]) == 8


def test_an_image_tokens_attention_lands_in_its_patch_cell(model, processor, scene_dir):
    record = record_with_image()
    result = compute_attention(model, processor, record, layer=0, image_root=scene_dir)
    # Which image token carries the red cell, read from the processor's own pixel patches: merged
    # token j is built from patches 4j..4j+3 (merge 2x2); red patches have a low green channel.
    batch, _ = model_batch(processor, record, scene_dir)
    patches = batch["pixel_values"].reshape(len(batch["pixel_values"]), 3, 2, 14, 14)
    green = patches[:, 1].mean(dim=(1, 2, 3))
    red_tokens = set((torch.nonzero(green < green.max() - 0.5).flatten() // 4).tolist())
    assert len(red_tokens) == 1
    j = red_tokens.pop()
    # a query that looks only at that image token
    query = len(result) - 1
    result.on = result.on.copy()
    result.on[query] = 0.0
    result.on[query, result.image_positions[0][j]] = 1.0
    cells = image_attention(result, query, mode="on")
    assert cells.shape == (2, 4)
    assert np.unravel_index(cells.argmax(), cells.shape) == (0, 3)  # the red cell: top row, rightmost
    # the overlay on a twice-as-large copy of the image heats exactly that cell's pixels
    big = Image.open(scene_dir / "scene.png").resize((224, 112), Image.NEAREST)
    overlay = np.asarray(image_overlay(result, query, big, mode="on"), dtype=np.int16)
    changed = np.abs(overlay - np.asarray(big, dtype=np.int16)).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (168, 223, 0, 55)


def test_figures_pool_for_display_but_keep_exact_numbers(model, processor, scene_dir):
    result = compute_attention(model, processor, record_with_image(), layer=1, image_root=scene_dir)
    n = len(result)
    full = attention_figure(result, "on", max_cells=400)
    assert np.asarray(full.data[0].z).shape == (n, n)
    np.testing.assert_allclose(np.asarray(full.data[0].z), result.on)
    pooled = attention_figure(result, "diff", max_cells=20)
    factor = -(-n // 20)
    z = np.asarray(pooled.data[0].z)
    assert z.shape == (-(-n // factor),) * 2
    np.testing.assert_allclose(z[0, 0], result.diff[:factor, :factor].mean(), atol=1e-6)
    window = attention_figure(result, "off", start=10, stop=30)
    np.testing.assert_allclose(np.asarray(window.data[0].z), result.off[10:30, 10:30])
    assert "10:" in window.layout.yaxis.ticktext[0]
    names = [trace.name for trace in mass_figure(result).data]
    assert names == ["on noise, HSA off", "on image, HSA off", "on noise, HSA on", "on image, HSA on"]


def test_a_layer_change_reuses_the_masses_and_gives_the_same_map(model, processor, scene_dir):
    from workbench.attention import prepare_conversation

    prepared = prepare_conversation(record_with_image(), processor, model=model, image_root=scene_dir)
    first = compute_attention(model, processor, prepared, layer=1)
    full = compute_attention(model, processor, prepared, layer=0, head=1)
    quick = compute_attention(model, processor, prepared, layer=0, head=1, mass_from=first)
    np.testing.assert_array_equal(quick.on, full.on)
    np.testing.assert_array_equal(quick.off, full.off)
    assert quick.noise_mass == full.noise_mass == first.noise_mass
    assert quick.image_mass == first.image_mass and len(quick.images) == 1
    other = compute_attention(model, processor, {"conversations": [{"from": "human", "value": "Hi."}]}, layer=0)
    with pytest.raises(ValueError, match="another conversation"):
        compute_attention(model, processor, prepared, layer=0, mass_from=other)


def test_layer_and_head_are_checked(model, processor, scene_dir):
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        compute_attention(model, processor, record_with_image(), layer=2, image_root=scene_dir)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        compute_attention(model, processor, record_with_image(), layer=0, head=4, image_root=scene_dir)


def test_a_model_without_the_attention_interface_is_refused_with_a_reason(processor, scene_dir):
    from transformers import BloomConfig, BloomForCausalLM

    import models.hsa  # noqa: F401

    tokenizer = build_wordpiece_tokenizer()
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2))
    bloom.set_attn_implementation("hsa")  # transformers only logs, and keeps eager
    text = {"conversations": [{"from": "human", "value": "hello there"}]}
    with pytest.raises(AttentionUnsupported, match="does not support the HSA attention implementation"):
        compute_attention(bloom.eval(), tokenizer, text, layer=0)
    sdpa = tiny_qwen2vl(processor, attn_implementation="sdpa")
    with pytest.raises(AttentionUnsupported, match="'sdpa'"):
        compute_attention(sdpa, processor, record_with_image(), layer=0, image_root=scene_dir)


@pytest.mark.slow
def test_the_command_writes_pngs_and_json(processor, tmp_path):
    model_dir = save_tiny_qwen2vl(tmp_path / "model", processor, seed=1)
    shapes_png(tmp_path / "scene.png", size=112)
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps(record_with_image()))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "workbench.attention", str(conversation), "--model", str(model_dir),
                           "--layer", "1", "--head", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("attention_off.png", "attention_on.png", "attention_diff.png", "noise_mass.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 400 and image.size[1] > 200
    with Image.open(out / "overlay.png") as image:
        assert image.size == (112, 112)  # the conversation's image, heat on top
    data = json.loads((out / "attention.json").read_text())
    assert data["layer"] == 1 and data["head"] == 2
    assert data["noise_mass"]["hsa_on"] == [0.0, 0.0]
    assert len(data["noise_mass"]["hsa_off"]) == 2 and min(data["noise_mass"]["hsa_off"]) > 0
    assert len(data["tokens"]) == data["num_tokens"] == len(data["roles"])
    maps = np.load(out / "maps.npz")
    assert maps["on"].shape == (data["num_tokens"],) * 2
    # an unknown layer is an error message, not a traceback
    bad = subprocess.run([sys.executable, "-m", "workbench.attention", str(conversation), "--model", str(model_dir),
                          "--layer", "9", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "layer 9 is out of range" in bad.stderr and "Traceback" not in bad.stderr


def test_a_composed_vlm_gives_the_reference_maps_and_its_square_patch_grid(tmp_path):
    from conftest import save_tiny_composed
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = save_tiny_composed(tmp_path / "composed", "clip", "qwen3")
    model = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="hsa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(directory)
    image = Image.new("RGB", (56, 56), "white")
    image.paste((255, 0, 0), (28, 0, 56, 28))  # the top-right patch
    image.save(tmp_path / "scene.png")
    record = record_with_image()
    result = compute_attention(model, processor, record, layer=1, image_root=tmp_path)
    batch, roles = model_batch(processor, record, tmp_path)
    with torch.no_grad():
        plain = eager(**batch, output_attentions=True).attentions
    np.testing.assert_allclose(result.off, plain[1][0].mean(0).numpy(), atol=1e-5)
    assert result.noise_mass["hsa_on"] == [0.0, 0.0]
    # CLIP's 2x2 patches, CLS dropped: four image tokens laid out row by row
    assert result.image_grids == [(1, 2, 2)] and len(result.image_positions[0]) == 4
    query = len(result) - 1
    result.on = result.on.copy()
    result.on[query] = 0.0
    result.on[query, result.image_positions[0][1]] = 1.0  # all on the second image token: top right
    cells = image_attention(result, query, mode="on")
    assert np.unravel_index(cells.argmax(), cells.shape) == (0, 1)


def test_the_command_reads_conversations_as_the_store_and_training_do(tmp_path):
    """Issue 22: one reader of JSON and JSONL (models.data.records): a .jsonl file of several records, a
    line separator inside a string (str.splitlines would cut there), --record to choose; marked text too."""
    from models.data.records import RecordError
    from workbench.attention import read_conversation

    records = [{"conversations": [{"from": "human", "value": f"Question {i}\u2028 on two lines?"}]} for i in range(3)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    assert read_conversation(jsonl) == records[0] and read_conversation(jsonl, 2) == records[2]
    with pytest.raises(RecordError, match="no record 3 \\(the file has 3\\)"):
        read_conversation(jsonl, 3)
    marked = tmp_path / "conversation.txt"
    marked.write_text("[user]\nWhat colour is the circle?\n[assistant: landmark]\nRed.\n", encoding="utf-8")
    assert len(read_conversation(marked)["conversations"]) == 2
