"""The one-pass alignment against the quadratic one it replaced: same input_ids, labels, semantic_ids
(and tokens, turns, character spans) for random conversations with spans and images, through every
chat template the project uses and a few that defeat the one-pass shortcut (and so take the
reference's path)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (CHATML_TEMPLATE, ROOT, build_bpe_tokenizer, build_qwen2vl_processor, build_wordpiece_tokenizer,
                      shapes_png)
from models.hsa import parse_role
from models.data import align as A
from models.data.align import AlignError, Conversation, align_record, normalize_record

IMAGE_DIR = Path(tempfile.mkdtemp(prefix="align-one-pass-"))
shapes_png(IMAGE_DIR / "a.png")
shapes_png(IMAGE_DIR / "b.png", color=(0, 0, 255), size=112)


# --- the quadratic alignment as it was (models/data/align.py before the one-pass change) ------------

def quadratic_char_sources(conv, processor, multimodal, add_generation_prompt):
    messages = A._messages(conv, multimodal)
    rendered = A._render(processor, messages, add_generation_prompt)
    bounds = []
    for i in range(len(messages)):
        prefix = A._render(processor, messages[: i + 1], False)
        if not rendered.startswith(prefix):
            prefix_end = bounds[-1] if bounds else 0
            bounds.append(prefix_end)
            continue
        bounds.append(len(prefix))
    turn_of = [-1] * len(rendered)
    char_of = [-1] * len(rendered)
    cursor = 0
    for i, turn in enumerate(conv.turns):
        start = bounds[i - 1] if i else 0
        offset = 0
        for piece in turn.text.split(A.IMAGE_PLACEHOLDER):
            if piece:
                found = rendered.find(piece, max(cursor, start))
                shift = 0
                if found < 0:
                    stripped = piece.strip()
                    found = rendered.find(stripped, max(cursor, start))
                    shift = piece.index(stripped) if stripped else 0
                    piece = stripped
                if found < 0:
                    raise AlignError(f"{conv.name}: the chat template changes the text of turn {i}; "
                                     "cannot locate it in the rendered prompt")
                for k in range(len(piece)):
                    char_of[found + k] = offset + shift + k
                cursor = found + len(piece)
                piece_len = len(piece) + shift
            else:
                piece_len = 0
            offset += piece_len + len(A.IMAGE_PLACEHOLDER)
        end = max(bounds[i], cursor)
        bounds[i] = end
        for c in range(start, end):
            turn_of[c] = i
    return rendered, turn_of, char_of


def quadratic_align(record, processor, *, image_root=None, max_length=None, add_generation_prompt=False,
                    generation_role=A.LANDMARK):
    conv = record if isinstance(record, Conversation) else normalize_record(record)
    tokenizer = A._tokenizer_of(processor)
    multimodal = tokenizer is not processor and hasattr(processor, "image_processor")
    if conv.images and not multimodal:
        raise AlignError(f"{conv.name}: has images but the model's tokenizer has no image processor")
    rendered, turn_of, char_of = quadratic_char_sources(conv, processor, multimodal, add_generation_prompt)
    plain = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    plain_ids, offsets = plain["input_ids"], plain["offset_mapping"]
    if multimodal and conv.images:
        out = processor(text=[rendered], images=A._load_images(conv, image_root), return_tensors="pt",
                        add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        token_offsets = A._expand_offsets(ids, plain_ids, offsets, A._image_token_ids(processor), conv.name)
    else:
        ids, token_offsets = plain_ids, offsets
    char_roles = [t.char_roles() for t in conv.turns]
    gen_role = parse_role(generation_role)
    roles, turns, spans = [], [], []
    n_turns = len(conv.turns)
    for a, b in token_offsets:
        chars = range(a, max(b, a + 1)) if a < len(rendered) else range(0)
        turn = next((turn_of[c] for c in chars if turn_of[c] >= 0), -1)
        if turn < 0:
            turn = n_turns - 1 if not add_generation_prompt else -1
        content = [char_of[c] for c in chars if char_of[c] >= 0 and turn_of[c] == turn]
        if turn < 0:
            role = gen_role
        elif content:
            role = A.token_role(conv.turns[turn], char_roles[turn], content)
        else:
            role = conv.turns[turn].role
        roles.append(role)
        turns.append(turn)
        spans.append((min(content), max(content) + 1) if content else None)
    labels = A._labels(ids, turns, spans, conv.turns)
    tokens = [rendered[a:b] for a, b in token_offsets]
    if max_length is not None and len(ids) > max_length:
        if any(i in A._image_token_ids(processor) for i in ids[max_length:]):
            raise AlignError(f"{conv.name}: max_length {max_length} would cut the image tokens "
                             f"(the conversation has {len(ids)} tokens)")
        ids, roles, labels = ids[:max_length], roles[:max_length], labels[:max_length]
        tokens, turns, spans = tokens[:max_length], turns[:max_length], spans[:max_length]
    return {"input_ids": ids, "labels": labels, "semantic_ids": roles, "tokens": tokens, "turn_index": turns,
            "char_spans": spans}


def outcome(align, record, processor, **kwargs):
    """The alignment as plain lists, or the error it raised."""
    try:
        a = align(record, processor, image_root=IMAGE_DIR, **kwargs)
    except AlignError as e:
        return f"AlignError: {e}"
    if isinstance(a, dict):
        return a
    return {"input_ids": a.input_ids.tolist(), "labels": a.labels.tolist(), "semantic_ids": a.semantic_ids.tolist(),
            "tokens": a.tokens, "turn_index": a.turn_index, "char_spans": a.char_spans}


# --- templates -------------------------------------------------------------------------------------

# Templates for which the one-pass shortcut must notice it does not apply:
NUMBERED = CHATML_TEMPLATE.replace("<|im_start|>{{ message['role'] }}\n",
                                   "<|im_start|>{{ message['role'] }} {{ loop.index }}\n")  # counts turns
LAST_CLOSED = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
               "{% if loop.last %}<|im_end|>{% else %}\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # a closing only at the end
# and one that refuses a conversation that does not alternate user/assistant after the system turn
ALTERNATING = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "[CLS]{% if system %}<<{{ system }}>> {% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }} [SEP]{% endif %}{% endfor %}"
)


def tokenizer_with(template):
    tok = build_bpe_tokenizer()
    tok.chat_template = template
    return tok


PROCESSORS = {}


def processor(name):
    """Every tokenizer/processor and chat template the project and its tests use, and three that
    the shortcut must decline."""
    if name not in PROCESSORS:
        from models.vlm.processor import load_processor

        makers = {
            "bpe-chatml": build_bpe_tokenizer,
            "wordpiece-tagged": build_wordpiece_tokenizer,
            "qwen2vl-fixture": build_qwen2vl_processor,
            "default_vlm": lambda: load_processor(str(ROOT / "models/zoo/default_vlm")),
            "default_composed": lambda: load_processor(str(ROOT / "models/zoo/default_composed")),
            "default_hybrid": lambda: load_processor(str(ROOT / "models/zoo/default_hybrid")),
            "numbered": lambda: tokenizer_with(NUMBERED),
            "last-closed": lambda: tokenizer_with(LAST_CLOSED),
            "alternating": lambda: tokenizer_with(ALTERNATING),
        }
        PROCESSORS[name] = makers[name]()
    return PROCESSORS[name]


MULTIMODAL = {"qwen2vl-fixture", "default_vlm", "default_composed", "default_hybrid"}
ALL = ["bpe-chatml", "wordpiece-tagged", "qwen2vl-fixture", "default_vlm", "default_composed", "default_hybrid",
       "numbered", "last-closed", "alternating"]


# --- random conversations --------------------------------------------------------------------------

WORDS = ["What", "color", "is", "the", "circle?", "red.", "I think", "green", "红色", "🙂", "👍🏽", "café", "e\u0301",
         "zebra", "\n", "  ", "\t", "<|im_end|>", "[SEP]", "hello there", "3", "ok", ".", "?"]
ROLES = ["GLOBAL_CONDITION", "LANDMARK", "NOISE"]


@st.composite
def conversations(draw, *, images: bool, alternating: bool):
    n = draw(st.integers(1, 9))
    turns = []
    for t in range(n):
        if alternating:
            speaker = "human" if t % 2 == 0 else "gpt"
        else:
            speaker = draw(st.sampled_from(["human", "gpt", "user", "assistant"] + ["system"] * (t > 0)))
        text = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join))
        if not text.strip():
            text = "x" + text
        if images and draw(st.integers(0, 4)) == 0:
            at = draw(st.integers(0, len(text)))
            text = text[:at] + "<image>" + text[at:]
        turn = {"from": speaker, "value": text}
        if draw(st.booleans()):
            turn["semantic_type"] = draw(st.sampled_from(ROLES))
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6, unique=True)))
        spans = []
        for start, end in zip(cuts[::2], cuts[1::2]):
            if draw(st.booleans()):
                spans.append({"start": start, "end": end, "role": draw(st.sampled_from(ROLES))})
        if spans:
            turn["spans"] = spans
        turns.append(turn)
    record = {"conversations": turns}
    if draw(st.booleans()):
        record["system"] = draw(st.sampled_from(["Answer about the image.", " Be brief. ", "系统 🙂"]))
    n_images = sum(t["value"].count("<image>") for t in turns)
    if n_images:
        record["images"] = draw(st.lists(st.sampled_from(["a.png", "b.png"]), min_size=n_images, max_size=n_images))
    return record


options = st.fixed_dictionaries({}, optional={
    "add_generation_prompt": st.booleans(),
    "generation_role": st.sampled_from(["landmark", "noise", 0]),
    "max_length": st.integers(1, 120),
})


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_one_pass_alignment_equals_the_quadratic_one(name, data):
    record = data.draw(conversations(images=name in MULTIMODAL, alternating=name == "alternating"))
    kwargs = data.draw(options)
    proc = processor(name)
    assert outcome(align_record, record, proc, **kwargs) == outcome(quadratic_align, record, proc, **kwargs)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_turn_ends_equal_the_reference(name, data):
    """The ends themselves, for longer conversations: the one-pass ends, or the reference's when a
    check failed, always equal the reference's."""
    record = data.draw(conversations(images=name in MULTIMODAL, alternating=name == "alternating"))
    turns = record["conversations"]
    if name != "alternating" or len(turns) % 2 == 0:  # an odd number repeated would not alternate
        record["conversations"] = turns * 3
    record["images"] = record.get("images", []) * 3  # (not read: the ends need the text only)
    proc = processor(name)
    add = data.draw(st.booleans())
    conv = normalize_record(record)
    tokenizer = A._tokenizer_of(proc)
    messages = A._messages(conv, tokenizer is not proc and hasattr(proc, "image_processor"))
    rendered = A._render(proc, messages, add)
    assert A._turn_ends(proc, messages, rendered, add) == A._turn_ends_reference(proc, messages, rendered)


def test_the_shortcut_declines_templates_that_render_a_turn_by_its_context(monkeypatch):
    """The ones it must decline go to the reference (counted here), the project's do not."""
    calls = []
    reference = A._turn_ends_reference
    monkeypatch.setattr(A, "_turn_ends_reference", lambda *a: calls.append(1) or reference(*a))
    record = {"system": "Be brief.", "conversations": [
        {"from": "human" if t % 2 == 0 else "gpt", "value": f"turn {t}"} for t in range(8)]}
    for name in ("bpe-chatml", "wordpiece-tagged", "default_vlm", "default_composed", "alternating"):
        align_record(record, processor(name))
    assert calls == []
    for name in ("numbered", "last-closed"):
        align_record(record, processor(name))
    assert len(calls) == 2


def test_a_long_conversation_is_aligned_like_the_quadratic_way():
    """200 turns with spans and images through the default VLM's processor, end to end."""
    turns = []
    for t in range(200):
        text = f"turn {t}: is the circle red? I think it is green. " + ("<image>" if t % 50 == 0 else "")
        turns.append({"from": "human" if t % 2 == 0 else "gpt", "value": text, "semantic_type": ROLES[t % 3],
                      "spans": [{"start": 0, "end": 4, "role": "noise"}] if t % 7 == 0 else []})
    record = {"system": "Answer about the image.", "conversations": turns, "images": ["a.png", "b.png"] * 2}
    proc = processor("default_vlm")
    fast = outcome(align_record, record, proc, add_generation_prompt=True)
    assert fast == outcome(quadratic_align, record, proc, add_generation_prompt=True)
    assert len(fast["input_ids"]) > 4000 and set(fast["semantic_ids"]) == {0, 1, 2}
    assert torch.tensor(fast["labels"]).ne(-100).sum() > 1000
