"""models.vlm: loading any image-text-to-text checkpoint and generating replies to ShareGPT records,
on the embedded default model (a real Qwen2-VL checkpoint directory)."""
from __future__ import annotations

import pytest
import torch

from models.vlm import GenerationSettings, VLMLoadError, generate_reply, load_vlm, stream_reply
from models.vlm.generation import prompt_inputs
from models.zoo import shapes
from models.zoo.build import DEFAULT_DIR


@pytest.fixture(scope="module")
def default_vlm():
    return load_vlm(DEFAULT_DIR, attn_implementation="hsa", device="cpu")


def conversation(scene: shapes.Scene, *turns: tuple[str, str]) -> dict:
    """A record about `scene` from (speaker, text) pairs; the first user turn carries the image."""
    conversations = []
    for k, (speaker, text) in enumerate(turns):
        role = "LANDMARK" if speaker == "gpt" else "GLOBAL_CONDITION"
        if speaker == "noise":
            speaker, role = "human", "NOISE"
        conversations.append({"from": speaker, "value": ("<image>" if k == 0 else "") + text, "semantic_type": role})
    return {"system": shapes.SYSTEM_PROMPT, "conversations": conversations, "images": [shapes.draw_scene(scene)]}


SCENE = shapes.Scene((shapes.Shape("circle", "red", "top left"), shapes.Shape("square", "blue", "bottom right")),
                     seed=11)


def test_loads_as_float32_with_hsa(default_vlm):
    model, processor = default_vlm
    assert model.dtype == torch.float32 and not model.training
    assert model.config._attn_implementation == "hsa"
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_multi_turn_with_an_image_gives_the_right_colours(default_vlm):
    model, processor = default_vlm
    record = conversation(SCENE, ("human", "What color is the circle?"))
    assert generate_reply(model, processor, record) == "The circle is red."
    record = conversation(SCENE, ("human", "What color is the circle?"), ("gpt", "The circle is red."),
                          ("human", "And the other one?"))
    assert generate_reply(model, processor, record) == "The square is blue."
    other = shapes.Scene((shapes.Shape("circle", "green", "bottom left"),), seed=3)
    record = conversation(other, ("human", "Where is the circle?"), ("gpt", "The circle is at the bottom left."),
                          ("human", "What color is it?"))
    assert generate_reply(model, processor, record) == "The circle is green."


def test_streaming_gives_the_greedy_reply_in_pieces(default_vlm):
    model, processor = default_vlm
    record = conversation(SCENE, ("human", "Describe the image."))
    pieces = list(stream_reply(model, processor, record))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == generate_reply(model, processor, record)


def test_sampling_and_beam_search(default_vlm):
    model, processor = default_vlm
    record = conversation(SCENE, ("human", "How many shapes are there?"))
    hot = GenerationSettings(mode="sample", temperature=1.5, top_k=0, top_p=1.0, seed=5, max_new_tokens=12)
    assert generate_reply(model, processor, record, settings=hot) == generate_reply(model, processor, record,
                                                                                  settings=hot)
    beam = GenerationSettings(mode="beam", num_beams=3, max_new_tokens=12)
    assert generate_reply(model, processor, record, settings=beam) == "There are two shapes."
    assert list(stream_reply(model, processor, record, settings=beam)) == ["There are two shapes."]
    with pytest.raises(ValueError, match="mode"):
        GenerationSettings(mode="nucleus")


def test_noise_content_is_invisible_to_an_hsa_reply(default_vlm):
    """With HSA the words of a NOISE turn do not reach the answer: two different NOISE turns of the
    same token length give identical logits; without semantic_ids they do not."""
    model, processor = default_vlm
    tokenizer = processor.tokenizer
    a, b = "I'm sure the circle is green.", "I'm sure the circle is blue."
    assert len(tokenizer(a)["input_ids"]) == len(tokenizer(b)["input_ids"])
    records = [conversation(SCENE, ("human", "How many shapes are there?"), ("gpt", "There are two shapes."),
                            ("noise", claim), ("human", "What color is the circle?")) for claim in (a, b)]
    for record in records:
        record["conversations"].insert(3, {"from": "gpt", "value": "Okay.", "semantic_type": "NOISE"})

    def last_logits(record, hsa):
        inputs = prompt_inputs(model, processor, record, hsa=hsa)
        with torch.no_grad():
            return model(**inputs).logits[0, -1]

    assert torch.allclose(last_logits(records[0], True), last_logits(records[1], True), atol=1e-5)
    assert not torch.allclose(last_logits(records[0], False), last_logits(records[1], False), atol=1e-5)
    assert generate_reply(model, processor, records[0]) == "The circle is red."


def test_an_adapter_loads_on_top(default_vlm, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, processor = load_vlm(DEFAULT_DIR, device="cpu")
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4))
    lora.save_pretrained(tmp_path / "adapter")  # LoRA B starts at zero: the same replies
    model, processor = load_vlm(DEFAULT_DIR, adapter=tmp_path / "adapter", device="cpu")
    assert isinstance(model, PeftModel)
    record = conversation(SCENE, ("human", "Which shape is blue?"))
    assert generate_reply(model, processor, record) == "The blue shape is a square."


def test_clear_errors(tmp_path):
    with pytest.raises(VLMLoadError, match="not found: .*missing"):
        load_vlm(tmp_path / "missing", device="cpu")
    with pytest.raises(VLMLoadError, match="quantization must be one of"):
        load_vlm(DEFAULT_DIR, quantization="3bit", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(VLMLoadError, match="needs a CUDA GPU"):
            load_vlm(DEFAULT_DIR, quantization="4bit", device="cpu")
    with pytest.raises(VLMLoadError, match="adapter"):
        load_vlm(DEFAULT_DIR, adapter=tmp_path / "no_adapter", device="cpu")


def test_a_missing_model_is_named_at_once_and_the_hub_is_tried_once(monkeypatch, tmp_path):
    """Issue 20.16: a missing local path says "not found: PATH" (not a repo-id format error), and an
    unknown hub id on a machine that cannot reach the hub fails within seconds, once, then at once."""
    import time

    from models.vlm import VLMLoadError, load_vlm
    from models.vlm import hub

    missing = tmp_path / "no-such-model"
    with pytest.raises(VLMLoadError, match=f"not found: {missing}"):
        load_vlm(missing)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # .invalid never resolves
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.reset()
    start = time.monotonic()
    with pytest.raises(VLMLoadError, match="cannot reach the hub for someone/unknown-model"):
        load_vlm("someone/unknown-model")
    assert time.monotonic() - start < hub.CHECK_TIMEOUT_S + 2
    start = time.monotonic()
    with pytest.raises(VLMLoadError, match="cannot reach the hub"):
        load_vlm("someone/other-model")
    assert time.monotonic() - start < 1.0  # remembered
    hub.reset()


def test_the_default_processor_is_a_qwen2vl_processor_and_any_image_is_its_grid(tmp_path):
    """Issue 20.12/20.13: the default model's processor saves and loads as a Qwen2-VL processor (no other
    family's, no deprecation warning), and any image becomes the 2x2 token grid the model was trained on,
    so a shapes scene drawn at 224x224 is answered as at 56x56."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from models.vlm import load_processor
    from models.zoo.shapes import Scene, Shape, draw_scene

    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((DEFAULT_DIR / name).read_text())["processor_class"] == "Qwen2VLProcessor"
    code = "from models.vlm import load_processor; print(type(load_processor(%r)).__mro__[1].__name__)" % str(DEFAULT_DIR)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=DEFAULT_DIR.parents[2])
    assert done.stdout.strip() == "Qwen2VLProcessor" and "deprecated" not in done.stderr, done.stderr
    processor = load_processor(str(DEFAULT_DIR))
    for size in ((224, 224), (500, 300), (30, 30)):
        out = processor(images=[Image.new("RGB", size, "white")], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                        return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, 4, 4]], size
    model, processor = load_vlm(DEFAULT_DIR)
    big = draw_scene(Scene((Shape("circle", "red", "top left"),), seed=3)).resize((224, 224), Image.NEAREST)
    path = tmp_path / "big.png"
    big.save(path)
    record = {"conversations": [{"from": "human", "value": "<image>What color is the circle?"}], "images": [str(path)]}
    assert generate_reply(model, processor, record) == "The circle is red."


def test_a_training_run_log_has_no_bitsandbytes_kernels_warning():
    """Issue 20.12: importing the training code and peft (which imports bitsandbytes) logs nothing about
    the optional `kernels` package."""
    import subprocess
    import sys

    from models.zoo import ZOO_DIR

    done = subprocess.run([sys.executable, "-c", "import workbench.train.run, peft, bitsandbytes"], capture_output=True,
                          text=True, timeout=180, cwd=ZOO_DIR.parents[1])
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr
