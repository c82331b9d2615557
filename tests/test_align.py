"""Conversation -> input_ids / labels / semantic_ids, checked with two unrelated tokenizers."""
import pytest
import torch

from conftest import shapes_png
from models.hsa import GLOBAL, LANDMARK, NOISE
from models.data.align import AlignError, HSACollator, align_record, normalize_record, parse_marked_text

TEXT = "Is the zebra 红色 🙂 or café\nblue? I think the giraffe is green."


def record():
    return {
        "system": "Answer about the image.",
        "conversations": [
            {"from": "human", "value": TEXT,
             "spans": [{"start": TEXT.index("zebra"), "end": TEXT.index("zebra") + 5, "role": "landmark"},
                       {"start": TEXT.index("I think"), "end": len(TEXT), "role": "NOISE"},
                       {"start": TEXT.index("🙂"), "end": TEXT.index("café") + 4, "role": 2}]},
            {"from": "gpt", "value": "The zebra is blue.", "semantic_type": "LANDMARK"},
            {"from": "human", "value": "hello there", "semantic_type": "NOISE"},
            {"role": "user", "content": "And the giraffe?"},
            {"role": "assistant", "content": "Green.", "semantic_type": "LANDMARK"},
        ],
    }


def expected_char_role(turn, c):
    for span in turn.spans:
        if span.start <= c < span.end:
            return span.role
    return turn.role


@pytest.fixture(params=["bpe", "wordpiece"])
def tokenizer(request, bpe_tokenizer, wordpiece_tokenizer):
    return {"bpe": bpe_tokenizer, "wordpiece": wordpiece_tokenizer}[request.param]


def test_all_four_are_aligned_and_tokens_take_the_role_of_their_characters(tokenizer):
    a = align_record(record(), tokenizer)
    n = len(a.input_ids)
    assert len(a.attention_mask) == len(a.labels) == len(a.semantic_ids) == len(a.tokens) == n
    turns = normalize_record(record()).turns
    checked = 0
    for k in range(n):
        turn, span = a.turn_index[k], a.char_spans[k]
        assert 0 <= turn < len(turns)
        if span is None:  # template and special tokens take their turn's role
            assert a.semantic_ids[k] == turns[turn].role
            continue
        roles = {expected_char_role(turns[turn], c) for c in range(*span) if not turns[turn].text[c].isspace()}
        if len(roles) == 1:  # a token inside one role's characters has that role
            assert a.semantic_ids[k] == roles.pop(), (a.tokens[k], span)
            checked += 1
    assert checked > 20
    # every span reaches at least one token of its role
    text_tokens = [k for k in range(n) if a.turn_index[k] == 1 and a.char_spans[k]]
    assert {int(a.semantic_ids[k]) for k in text_tokens} == {GLOBAL, LANDMARK, NOISE}


def test_labels_are_the_assistant_content_and_its_end_token(tokenizer):
    a = align_record(record(), tokenizer)
    labelled = [k for k in range(len(a.labels)) if a.labels[k] != -100]
    assert all(a.labels[k] == a.input_ids[k] for k in labelled)
    turns = normalize_record(record()).turns
    for t, turn in enumerate(turns):
        tokens = [k for k in labelled if a.turn_index[k] == t]
        if turn.speaker != "assistant":
            assert not tokens
            continue
        content = [k for k in tokens if a.char_spans[k] is not None]
        text = "".join(a.tokens[k] for k in content)
        assert text.replace(" ", "").lower() == turn.text.replace(" ", "").lower()
        closing = [k for k in tokens if a.char_spans[k] is None]
        assert len(closing) == 1 and closing[0] == content[-1] + 1
        assert a.tokens[closing[0]] in ("<|im_end|>", "[SEP]")


def test_bpe_tokens_reproduce_the_rendered_chat(bpe_tokenizer):
    a = align_record(record(), bpe_tokenizer, add_generation_prompt=True)
    rendered = bpe_tokenizer.apply_chat_template(
        [{"role": t.speaker, "content": t.text} for t in normalize_record(record()).turns],
        tokenize=False, add_generation_prompt=True)
    assert bpe_tokenizer.decode(a.input_ids) == rendered
    # the generation prompt takes the generation role
    tail = [k for k in range(len(a)) if a.turn_index[k] == -1]
    assert "".join(a.tokens[k] for k in tail) == "<|im_start|>assistant\n"
    assert all(a.semantic_ids[k] == LANDMARK for k in tail)
    assert align_record(record(), bpe_tokenizer, add_generation_prompt=True,
                        generation_role="noise").semantic_ids[-1] == NOISE


def test_truncation_keeps_everything_aligned(tokenizer):
    full = align_record(record(), tokenizer)
    cut = align_record(record(), tokenizer, max_length=25)
    assert len(cut.input_ids) == len(cut.labels) == len(cut.semantic_ids) == len(cut.tokens) == 25
    for name in ("input_ids", "labels", "semantic_ids"):
        assert torch.equal(getattr(cut, name), getattr(full, name)[:25])


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_invisibly(tokenizer, side):
    short = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]}
    batch = HSACollator(tokenizer, padding_side=side)([record(), short])
    alone = align_record(short, tokenizer)
    n = len(alone)
    real = batch["attention_mask"][1].bool()
    assert int(real.sum()) == n
    assert (real[-n:] if side == "left" else real[:n]).all()
    for name in ("input_ids", "labels", "semantic_ids"):
        assert torch.equal(batch[name][1][real], getattr(alone, name))
    assert (batch["labels"][1][~real] == -100).all()


def test_images_expand_and_take_their_turns_role(qwen2vl_processor, tmp_path):
    shapes_png(tmp_path / "a.png")
    shapes_png(tmp_path / "b.png", color=(0, 0, 255), size=112)
    rec = {"conversations": [
        {"from": "human", "value": "<image>What color is the circle?"},
        {"from": "gpt", "value": "Red.", "semantic_type": "LANDMARK"},
        {"from": "human", "value": "Compare with this one <image>", "semantic_type": "NOISE"},
        {"from": "gpt", "value": "Blue.", "semantic_type": "LANDMARK"}], "images": ["a.png", "b.png"]}
    a = align_record(rec, qwen2vl_processor, image_root=tmp_path)
    image_id = qwen2vl_processor.image_token_id
    positions = (a.input_ids == image_id).nonzero().flatten().tolist()
    grid = a.model_inputs["image_grid_thw"]
    assert len(positions) == int(grid.prod(-1).sum()) // 4 == 4 + 16
    assert [a.turn_index[k] for k in positions] == [0] * 4 + [2] * 16
    assert [int(a.semantic_ids[k]) for k in positions] == [GLOBAL] * 4 + [NOISE] * 16
    # the text after the second image still maps to its characters
    k = next(k for k in range(len(a)) if a.turn_index[k] == 2 and a.char_spans[k])
    assert rec["conversations"][2]["value"][slice(*a.char_spans[k])] == a.tokens[k]
    batch = HSACollator(qwen2vl_processor, image_root=tmp_path)([rec, rec])
    assert batch["pixel_values"].shape[0] == 2 * a.model_inputs["pixel_values"].shape[0]
    with pytest.raises(AlignError, match="cut the image tokens"):
        align_record(rec, qwen2vl_processor, image_root=tmp_path, max_length=positions[-1])


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["conversations"][0].update(semantic_type="DISTRACTOR"), "turn 0: unknown semantic role 'DISTRACTOR'"),
    (lambda r: r["conversations"][0].update(spans=[{"start": 3, "end": 999, "role": "noise"}]), "outside the text"),
    (lambda r: r["conversations"][0].update(spans=[{"start": 0, "end": 5, "role": "noise"},
                                                   {"start": 3, "end": 8, "role": "landmark"}]), "overlap"),
    (lambda r: r["conversations"][1].update(value="   "), "turn 1: the turn has no text"),
    (lambda r: r["conversations"][1].update({"from": "robot"}), "unknown speaker 'robot'"),
    (lambda r: r["conversations"][1].update({"from": ["human"]}), "unknown speaker ['human']"),
    (lambda r: r.update(images=["x.png"]), "0 <image> placeholder"),
    (lambda r: r.update(conversations=[]), "non-empty list"),
    (lambda r: r.update(messages=[{"role": "user", "content": "Hi"}]), "both 'conversations' and 'messages'"),
])
def test_errors_name_the_record_and_the_problem(bpe_tokenizer, mutate, message):
    rec = record()
    mutate(rec)
    with pytest.raises(AlignError) as error:
        align_record(rec, bpe_tokenizer, index=7)
    assert "record 7" in str(error.value) and message in str(error.value)


def test_missing_and_corrupt_images_are_named(qwen2vl_processor, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for name, message in (("nope.png", "not found"), ("bad.png", "cannot be read")):
        rec = {"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "x"}],
               "images": [name]}
        with pytest.raises(AlignError, match=f"record 3: image 0 {message}"):
            align_record(rec, qwen2vl_processor, image_root=tmp_path, index=3)


def test_marked_text_format():
    rec = parse_marked_text("[system]\nBe brief.\n[user]\nWhat color?\nSay it.\n[user: noise]\nlol\n"
                            "[assistant: landmark]\nRed.")
    assert [t["from"] for t in rec["conversations"]] == ["system", "user", "user", "assistant"]
    assert rec["conversations"][1]["value"] == "What color?\nSay it."
    assert rec["conversations"][2]["semantic_type"] == NOISE
    with pytest.raises(AlignError, match="line 1"):
        parse_marked_text("hello\n[user]\nx")
    with pytest.raises(AlignError, match="unknown semantic role"):
        parse_marked_text("[user: chatter]\nx")
