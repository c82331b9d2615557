"""The shapes world: determinism, answers that match the drawn pixels, roles, export round trip."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from models.zoo import shapes

PALETTE = {name: np.array(rgb) for name, rgb in shapes.COLORS.items()}
WORDS = {"one": 1, "two": 2, "three": 3}


def read_scene(image: Image.Image) -> dict[str, tuple[str, str]]:
    """An independent reading of a drawn image: slot -> (colour, kind), from pixels only.
    Coloured pixels are the saturated ones (the white background and the grid's grey lines are not).
    Colour: the palette colour nearest to the slot's coloured pixels. Kind: how much of the
    coloured pixels' bounding box they fill (square ~1, circle ~0.8, triangle ~0.5)."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    found = {}
    for slot, (row, col) in shapes.SLOTS.items():
        cell = pixels[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28]
        coloured = cell.max(axis=-1) - cell.min(axis=-1) > 60
        if coloured.sum() < 20:
            continue
        mean = cell[coloured].mean(axis=0)
        colour = min(PALETTE, key=lambda c: np.abs(PALETTE[c] - mean).sum())
        ys, xs = np.nonzero(coloured)
        fill = coloured.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
        found[slot] = (colour, kind)
    return found


def slot_words(slot: str) -> set[str]:
    return set(slot.split())


def check_answer(answer: str, scene: dict[str, tuple[str, str]]) -> bool:
    """Whether an answer is true of the pixel-read scene (written without the generator's code)."""
    by_kind = {kind: (colour, slot) for slot, (colour, kind) in scene.items()}
    by_colour = {colour: (kind, slot) for slot, (colour, kind) in scene.items()}
    if m := re.fullmatch(r"The (\w+) is (red|green|blue|yellow)\.", answer):
        return by_kind.get(m[1], (None,))[0] == m[2]
    if m := re.fullmatch(r"The (\w+) shape is a (\w+)\.", answer):
        return by_colour.get(m[1], (None,))[0] == m[2]
    if m := re.fullmatch(r"There (?:is|are) (\w+) shapes?\.", answer):
        return WORDS[m[1]] == len(scene)
    if m := re.fullmatch(r"The (\w+) is (?:at|on) the ((?:top|bottom|left|right| )+)\.", answer):
        return m[1] in by_kind and slot_words(m[2]) <= slot_words(by_kind[m[1]][1])
    if answer.startswith("A "):
        parts = re.split(r", | and ", answer[:-1])
        described = {}
        for part in parts:
            m = re.fullmatch(r"an? (\w+) (\w+) at the (.+)", part.lower())
            described[m[3]] = (m[1], m[2])
        return described == scene
    raise AssertionError(f"unexpected answer form: {answer!r}")


def test_same_seed_same_data_and_different_seeds_differ():
    a = shapes.generate(6, seed=3, noise=shapes.HEAVY_NOISE)
    b = shapes.generate(6, seed=3, noise=shapes.HEAVY_NOISE)
    for x, y in zip(a, b):
        assert x.record["conversations"] == y.record["conversations"]
        assert x.record["images"][0].tobytes() == y.record["images"][0].tobytes()
    c = shapes.generate(6, seed=4, noise=shapes.HEAVY_NOISE)
    d = shapes.generate(6, seed=3, split="eval", noise=shapes.HEAVY_NOISE)
    assert [x.record["conversations"] for x in a] != [x.record["conversations"] for x in c]
    assert [x.record["conversations"] for x in a] != [x.record["conversations"] for x in d]
    pieces = shapes.generate(2, seed=3, noise=shapes.HEAVY_NOISE) + shapes.generate(4, seed=3, noise=shapes.HEAVY_NOISE,
                                                                                   start=2)
    assert [x.record["conversations"] for x in pieces] == [x.record["conversations"] for x in a]


def test_images_suit_qwen2vl_patching():
    image = shapes.generate(1, seed=0)[0].record["images"][0]
    assert image.size == (56, 56)  # 4x4 patches of 14 px, merged 2x2: one image token per slot


def test_drawn_pixels_match_the_scene():
    for sample in shapes.generate(60, seed=1):
        read = read_scene(sample.record["images"][0])
        assert read == {s.slot: (s.color, s.kind) for s in sample.scene.shapes}
        image = np.asarray(sample.record["images"][0]).astype(int)
        for shape in sample.scene.shapes:  # the slot's centre lies inside the shape, in its colour
            x, y = shape.center
            nearest = min(PALETTE, key=lambda c: np.abs(PALETTE[c] - image[y, x]).sum())
            assert nearest == shape.color and np.abs(PALETTE[nearest] - image[y, x]).max() <= 15


def test_every_answer_is_true_of_the_pixels_and_every_claim_false():
    for sample in shapes.generate(80, seed=2, noise=shapes.HEAVY_NOISE):
        scene = read_scene(sample.record["images"][0])
        turns = sample.record["conversations"]
        answers = [t for t in turns if t["semantic_type"] == "LANDMARK"]
        assert len(answers) == len(sample.qtypes) >= 2
        for turn in answers:
            assert check_answer(turn["value"], scene), (turn["value"], scene)
        for turn in turns:
            if turn["semantic_type"] == "NOISE" and turn["from"] == "gpt" and turn["value"].startswith(("The", "There")):
                assert not check_answer(turn["value"], scene), turn["value"]  # fake answers are wrong
            for span in turn.get("spans", []):
                claim = turn["value"][span["start"]:span["end"]].replace(", I am sure. ", ".")
                assert span["role"] == "NOISE" and not check_answer(claim, scene), claim


def test_roles_on_every_turn():
    for sample in shapes.generate(40, seed=5, noise=shapes.HEAVY_NOISE):
        record = sample.record
        assert record["system"] == shapes.SYSTEM_PROMPT
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for question, answer in zip(turns[::2], turns[1::2]):
            if question["semantic_type"] == "NOISE":
                assert answer["semantic_type"] == "NOISE"
            else:
                assert (question["semantic_type"], answer["semantic_type"]) == ("GLOBAL_CONDITION", "LANDMARK")
        image_turns = [t for t in turns if "<image>" in t["value"]]
        assert len(image_turns) == 1 and image_turns[0]["semantic_type"] == "GLOBAL_CONDITION"
        assert image_turns[0] is next(t for t in turns if t["semantic_type"] == "GLOBAL_CONDITION")


def test_noise_knob():
    clean = shapes.generate(30, seed=0)
    assert all(t["semantic_type"] != "NOISE" and "spans" not in t
               for s in clean for t in s.record["conversations"])
    train = shapes.generate(200, seed=0, noise=shapes.TRAIN_NOISE)
    heavy = shapes.generate(200, seed=0, noise=shapes.HEAVY_NOISE)
    noise_turns = lambda samples: sum(t["semantic_type"] == "NOISE" for s in samples for t in s.record["conversations"])  # noqa: E731
    assert 0 < noise_turns(train) < noise_turns(heavy)
    # held-out kinds never appear in training noise: no spans, no instructions, no fake answers
    train_turns = [t for s in train for t in s.record["conversations"]]
    assert not any("spans" in t for t in train_turns)
    assert not any(t["value"] == "Okay, I will." for t in train_turns)
    assert any("spans" in t for s in heavy for t in s.record["conversations"])
    with pytest.raises(ValueError, match="unknown noise kinds"):
        shapes.NoiseSpec(rate=0.5, kinds=("gossip",))


def test_followups_refer_back():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        sample = shapes.make_conversation(rng, n_questions=(3, 4))
        turns = sample.record["conversations"]
        for k, qtype in enumerate(sample.qtypes):
            if qtype == "followup":
                seen.add(turns[2 * k]["value"])
    assert "And the other one?" in seen and "What color is it?" in seen and "Where is it?" in seen


def test_export_round_trip(tmp_path):
    from models.data.align import normalize_record

    samples = shapes.generate(5, seed=7, noise=shapes.HEAVY_NOISE)
    json_path = shapes.export_sharegpt(samples, tmp_path, "shapes_test")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        **json.loads((tmp_path / "dataset_info.json").read_text()), "other": {"file_name": "other.json"}}))
    shapes.export_sharegpt(samples[:2], tmp_path, "second")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == {"shapes_test", "other", "second"}
    assert info["shapes_test"] == {
        "file_name": "shapes_test.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images", "system": "system"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}
    records = json.loads(json_path.read_text())
    assert len(records) == 5
    for record, sample in zip(records, samples):
        assert record["conversations"] == sample.record["conversations"]
        assert record["system"] == shapes.SYSTEM_PROMPT
        assert len(record["images"]) == 1 and not record["images"][0].startswith("/")
        with Image.open(tmp_path / record["images"][0]) as png:
            assert png.tobytes() == sample.record["images"][0].tobytes()
        normalize_record(record)  # valid for the workbench's aligner
    loaded = shapes.load_sharegpt(json_path)
    assert all(Image.open(r["images"][0]).size == (56, 56) for r in loaded)
