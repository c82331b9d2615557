"""Conversations to training tensors: a ShareGPT record through the model's own chat template to
`input_ids`, `attention_mask`, `labels` and `semantic_ids`, all of one length.

Roles are labelled on characters (a turn's role, spans inside a turn), so the token roles are
derived here for whichever tokenizer is in use: the chat is rendered to text with the template,
every rendered character learns which turn (and which character of that turn) it came from, and
each token takes the role of the characters it covers (offset mapping).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.hsa import GLOBAL, LANDMARK, NOISE, parse_role

IMAGE_PLACEHOLDER = "<image>"
CAPTION_PROMPT = "Describe the image."  # the question a bare {"image", "caption"} pair is asked as
IGNORE_INDEX = -100
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class AlignError(ValueError):
    """A record that cannot be aligned; the message names the record and the problem."""


@dataclass
class Span:
    start: int
    end: int
    role: int


@dataclass
class Turn:
    speaker: str  # system / user / assistant
    text: str
    role: int = GLOBAL
    spans: list[Span] = field(default_factory=list)

    def char_roles(self) -> list[int]:
        roles = [self.role] * len(self.text)
        for span in self.spans:
            roles[span.start:span.end] = [span.role] * (span.end - span.start)
        return roles


@dataclass
class Conversation:
    turns: list[Turn]
    images: list = field(default_factory=list)  # paths (relative to an image root) or PIL images
    name: str = "record"


def _where(index) -> str:
    return "record" if index is None else f"record {index}"


def normalize_record(record, *, index=None) -> Conversation:
    """Validate a ShareGPT-style record and return its turns; AlignError names what is wrong."""
    where = _where(index)
    if not isinstance(record, dict):
        raise AlignError(f"{where}: expected an object with 'conversations', got {type(record).__name__}")
    record = _caption_as_conversation(record, where)
    if "conversations" in record and "messages" in record:  # one list would be dropped without a word
        raise AlignError(f"{where}: has both 'conversations' and 'messages'; give one")
    turns_in = record.get("conversations", record.get("messages"))
    if not isinstance(turns_in, list) or not turns_in:
        raise AlignError(f"{where}: 'conversations' must be a non-empty list of turns")
    turns: list[Turn] = []
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise AlignError(f"{where}: 'system' must be a string")
        turns.append(Turn("system", system, GLOBAL))
    for t, raw in enumerate(turns_in):
        at = f"{where}, turn {t}"
        if not isinstance(raw, dict):
            raise AlignError(f"{at}: a turn must be an object with from/value or role/content")
        speaker_raw = raw.get("from", raw.get("role"))
        text = raw.get("value", raw.get("content"))
        if not isinstance(speaker_raw, str) or speaker_raw not in SPEAKERS:
            raise AlignError(f"{at}: unknown speaker {speaker_raw!r} (expected one of {sorted(SPEAKERS)})")
        if not isinstance(text, str):
            raise AlignError(f"{at}: the turn's text must be a string, got {type(text).__name__}")
        if not text.replace(IMAGE_PLACEHOLDER, "").strip():
            raise AlignError(f"{at}: the turn has no text")
        try:
            role = parse_role(raw.get("semantic_type", GLOBAL))
        except ValueError as e:
            raise AlignError(f"{at}: {e}") from None
        turns.append(Turn(SPEAKERS[speaker_raw], text, role, _parse_spans(raw.get("spans") or [], text, at)))
    images = record.get("images") or []
    if not isinstance(images, list):
        raise AlignError(f"{where}: 'images' must be a list")
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(images):
        raise AlignError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
    return Conversation(turns, list(images), where)


def _caption_as_conversation(record: dict, where: str) -> dict:
    """LLaVA-pretrain style data as ShareGPT: `{"image": PATH, "caption": TEXT}` becomes one question
    (`CAPTION_PROMPT`) and the caption as the answer; a singular `"image"` becomes `"images": [PATH]`,
    with `<image>` put before the first turn's text when no turn holds it (LLaVA's own records do)."""
    if "image" not in record and "caption" not in record:
        return record
    record = dict(record)
    if "caption" in record:
        if "conversations" in record or "messages" in record:
            raise AlignError(f"{where}: has both a 'caption' and 'conversations'; give one")
        caption = record.pop("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise AlignError(f"{where}: 'caption' must be a non-empty string")
        record["conversations"] = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}{CAPTION_PROMPT}"},
                                   {"from": "gpt", "value": caption, "semantic_type": "LANDMARK"}]
    if "image" in record:
        if "images" in record:
            raise AlignError(f"{where}: has both 'image' and 'images'; give one")
        image = record.pop("image")
        record["images"] = [image] if image not in (None, "") else []
        turns = record.get("conversations", record.get("messages"))
        if record["images"] and isinstance(turns, list) and turns and isinstance(turns[0], dict) and \
                not any(IMAGE_PLACEHOLDER in str(t.get("value", t.get("content", ""))) for t in turns
                        if isinstance(t, dict)):
            first = dict(turns[0])
            key = "value" if "value" in first else "content"
            first[key] = IMAGE_PLACEHOLDER + str(first.get(key, ""))
            record["conversations" if "conversations" in record else "messages"] = [first, *turns[1:]]
    return record


def _parse_spans(raw_spans, text: str, at: str) -> list[Span]:
    if not isinstance(raw_spans, list):
        raise AlignError(f"{at}: 'spans' must be a list of {{start, end, role}}")
    spans = []
    for s in raw_spans:
        if not isinstance(s, dict) or not {"start", "end", "role"} <= s.keys():
            raise AlignError(f"{at}: a span needs start, end and role, got {s!r}")
        start, end = s["start"], s["end"]
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
            raise AlignError(f"{at}: span offsets must be integers, got {start!r}..{end!r}")
        if not 0 <= start < end <= len(text):
            raise AlignError(f"{at}: span {start}..{end} is outside the text (length {len(text)})")
        try:
            spans.append(Span(start, end, parse_role(s["role"])))
        except ValueError as e:
            raise AlignError(f"{at}: {e}") from None
    spans.sort(key=lambda s: (s.start, s.end))
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end and a.role != b.role:
            raise AlignError(f"{at}: spans {a.start}..{a.end} and {b.start}..{b.end} overlap with different roles")
    return spans


@dataclass
class Aligned:
    """One conversation as model input, with what each token came from (for the UI)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    semantic_ids: torch.Tensor
    model_inputs: dict  # pixel_values, image_grid_thw, ... for VLMs
    tokens: list[str]
    turn_index: list[int]  # -1 for generation-prompt tokens
    char_spans: list[tuple[int, int] | None]  # characters of that turn's text, None for template tokens
    turns: list[Turn]

    def __len__(self) -> int:
        return len(self.input_ids)


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _load_images(conv: Conversation, image_root) -> list:
    from PIL import Image

    loaded = []
    for i, image in enumerate(conv.images):
        if not isinstance(image, (str, Path)):
            loaded.append(image)
            continue
        path = Path(image_root or ".") / image
        try:
            with Image.open(path) as im:
                loaded.append(im.convert("RGB"))
        except FileNotFoundError:
            raise AlignError(f"{conv.name}: image {i} not found: {path}") from None
        except Exception as e:  # PIL raises several types for corrupt files
            raise AlignError(f"{conv.name}: image {i} cannot be read ({path}): {e}") from None
    return loaded


def _messages(conv: Conversation, multimodal: bool) -> list[dict]:
    messages = []
    for turn in conv.turns:
        if not multimodal:
            messages.append({"role": turn.speaker, "content": turn.text})
            continue
        content = []
        for k, piece in enumerate(turn.text.split(IMAGE_PLACEHOLDER)):
            if k:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": turn.speaker, "content": content})
    return messages


def _render(processor, messages, add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


WINDOW = 2  # turns of context in `_turn_ends` windows: even (parity), and 2 measured fastest (4 and 8 slower)


def _turn_ends(processor, messages: list[dict], rendered: str, add_generation_prompt: bool) -> list[int]:
    """Where each turn's rendering ends in `rendered`, as `_turn_ends_reference` defines it, in one
    pass over the turns: what turn i adds to the text is learnt by rendering it in a short window
    (the leading system turns and up to WINDOW turns before it, the window growing by one turn a
    render), and each such piece is checked against the whole rendering at the place where it must
    start; the last end is checked against the whole conversation rendered. Turn i is the last
    turn of its window as it is of the reference's prefix, so what a template does after the last
    turn (or before the next) agrees; what it does with turns before the window (images numbered
    across turns, turns counted, ...) fails a check, and then the reference decides."""
    n = len(messages)
    head = 0  # leading system turns: every window starts with them
    while head < n and messages[head]["role"] == "system":
        head += 1
    ends, end, before = [], 0, None
    try:
        for i in range(n):
            if i <= head + 1:  # the first turns: the prefix itself, as the reference does it
                prefix = _render(processor, messages[: i + 1], False)
                if not rendered.startswith(prefix):
                    return _turn_ends_reference(processor, messages, rendered)
                end = len(prefix)
            else:
                start = head + WINDOW * ((i - 1 - head) // WINDOW)  # same parity as the conversation's start,
                if before is None or i - 1 == start:               # for templates that check alternation
                    before = _render(processor, messages[:head] + messages[start:i], False)
                after = _render(processor, messages[:head] + messages[start:i + 1], False)
                if not after.startswith(before) or not rendered.startswith(after[len(before):], end):
                    return _turn_ends_reference(processor, messages, rendered)
                end += len(after) - len(before)
                before = after
            ends.append(end)
        whole = rendered if not add_generation_prompt else _render(processor, messages, False)
    except Exception:  # noqa: BLE001 - a template that refuses a window (it rendered the whole)
        return _turn_ends_reference(processor, messages, rendered)
    if len(whole) != end or not rendered.startswith(whole):
        return _turn_ends_reference(processor, messages, rendered)
    return ends


def _turn_ends_reference(processor, messages: list[dict], rendered: str) -> list[int]:
    """Turn i owns the rendered text up to the end of the rendering of turns 0..i, when that is a
    prefix of the whole (chat templates render a prefix of the conversation as a prefix of the
    text); otherwise the end of the turn before (`_char_sources` then extends it over the turn's own
    text). One render per turn of the conversation so far: quadratic in turns, the slow and
    obviously-correct twin that `_turn_ends` is tested against."""
    ends = []
    for i in range(len(messages)):
        prefix = _render(processor, messages[: i + 1], False)
        ends.append(len(prefix) if rendered.startswith(prefix) else (ends[-1] if ends else 0))
    return ends


def _char_sources(conv: Conversation, processor, multimodal: bool, add_generation_prompt: bool):
    """Render the chat and say, for each rendered character, which turn it belongs to and which
    character of that turn's text it is (-1 for template text)."""
    messages = _messages(conv, multimodal)
    rendered = _render(processor, messages, add_generation_prompt)
    bounds = _turn_ends(processor, messages, rendered, add_generation_prompt)
    turn_of = [-1] * len(rendered)
    char_of = [-1] * len(rendered)
    cursor = 0
    for i, turn in enumerate(conv.turns):
        start = bounds[i - 1] if i else 0
        offset = 0
        for piece in turn.text.split(IMAGE_PLACEHOLDER):
            if piece:
                found = rendered.find(piece, max(cursor, start))
                shift = 0
                if found < 0:  # templates that trim the content
                    stripped = piece.strip()
                    found = rendered.find(stripped, max(cursor, start))
                    shift = piece.index(stripped) if stripped else 0
                    piece = stripped
                if found < 0:
                    raise AlignError(f"{conv.name}: the chat template changes the text of turn {i}; "
                                     "cannot locate it in the rendered prompt")
                char_of[found:found + len(piece)] = range(offset + shift, offset + shift + len(piece))
                cursor = found + len(piece)
                piece_len = len(piece) + shift
            else:
                piece_len = 0
            offset += piece_len + len(IMAGE_PLACEHOLDER)
        end = max(bounds[i], cursor)
        bounds[i] = end
        if end > start:
            turn_of[start:end] = [i] * (end - start)
    return rendered, turn_of, char_of


def align_record(record, processor, *, image_root=None, max_length: int | None = None,
                 add_generation_prompt: bool = False, generation_role=LANDMARK, index=None) -> Aligned:
    """Tokenize one conversation through the chat template with aligned labels and semantic ids.

    `record` is a ShareGPT dict (or a Conversation). Template and special tokens take their turn's
    role, image tokens the role of the turn they sit in; spans override the turn role on exactly the
    tokens whose characters they cover. Generation-prompt tokens take `generation_role`."""
    conv = record if isinstance(record, Conversation) else normalize_record(record, index=index)
    tokenizer = _tokenizer_of(processor)
    multimodal = tokenizer is not processor and hasattr(processor, "image_processor")
    if conv.images and not multimodal:
        raise AlignError(f"{conv.name}: has images but the model's tokenizer has no image processor")
    rendered, turn_of, char_of = _char_sources(conv, processor, multimodal, add_generation_prompt)

    # Tokens of the rendered text with character offsets; a processor may expand each image token
    # into many, which are matched back to the one unexpanded token below.
    plain = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    plain_ids, offsets = plain["input_ids"], plain["offset_mapping"]
    model_inputs = {}
    if multimodal and conv.images:
        images = _load_images(conv, image_root)
        out = processor(text=[rendered], images=images, return_tensors="pt", add_special_tokens=False)
        ids = out["input_ids"][0].tolist()
        # per-token extras (e.g. mm_token_type_ids) are kept 1-D so that they truncate and pad with the ids
        model_inputs = {k: (v[0] if v.dim() == 2 and v.shape == out["input_ids"].shape else v)
                        for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        token_offsets = _expand_offsets(ids, plain_ids, offsets, _image_token_ids(processor), conv.name)
    else:
        ids, token_offsets = plain_ids, offsets

    char_roles = [t.char_roles() for t in conv.turns]
    gen_role = parse_role(generation_role)
    roles, turns, spans, labels = [], [], [], []
    n_turns = len(conv.turns)
    for k, (a, b) in enumerate(token_offsets):
        b = max(b, a + 1) if a < len(rendered) else a  # the token's characters: rendered[a:b]
        turn = turn_of[a] if a < b else -1
        if turn < 0:
            turn = next((t for t in turn_of[a:b] if t >= 0), -1)
        if turn < 0:
            turn = n_turns - 1 if not add_generation_prompt else -1
        content = [c for c, t in zip(char_of[a:b], turn_of[a:b]) if c >= 0 and t == turn]
        if turn < 0:
            role = gen_role
        elif content and conv.turns[turn].spans:
            role = token_role(conv.turns[turn], char_roles[turn], content)
        else:
            role = conv.turns[turn].role
        roles.append(role)
        turns.append(turn)
        spans.append((min(content), max(content) + 1) if content else None)
    labels = _labels(ids, turns, spans, conv.turns)
    tokens = [rendered[a:b] for a, b in token_offsets]

    if max_length is not None and len(ids) > max_length:
        image_ids = _image_token_ids(processor)
        if any(i in image_ids for i in ids[max_length:]):
            raise AlignError(f"{conv.name}: max_length {max_length} would cut the image tokens "
                             f"(the conversation has {len(ids)} tokens)")
        ids, roles, labels = ids[:max_length], roles[:max_length], labels[:max_length]
        model_inputs = {k: v[:max_length] if _per_token(v, token_offsets) else v for k, v in model_inputs.items()}
        tokens, turns, spans = tokens[:max_length], turns[:max_length], spans[:max_length]
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Aligned(as_long(ids), torch.ones(len(ids), dtype=torch.long), as_long(labels), as_long(roles),
                   model_inputs, tokens, turns, spans, conv.turns)


def _per_token(value, token_offsets) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 1 and len(value) == len(token_offsets)


def token_role(turn: Turn, char_roles: list[int], content: list[int]) -> int:
    """A token covered (even partly) by a span takes the span's role; where several spans touch
    it, the one covering most of its characters (ties: the stronger restriction, NOISE)."""
    counts: dict[int, int] = {}
    for c in content:
        if any(s.start <= c < s.end for s in turn.spans):
            counts[char_roles[c]] = counts.get(char_roles[c], 0) + 1
    if not counts:
        return turn.role
    return max(counts, key=lambda r: (counts[r], r))


def _labels(ids, turns, spans, conv_turns) -> list[int]:
    """Train on assistant content and the one token that closes it (e.g. <|im_end|>)."""
    labels = [IGNORE_INDEX] * len(ids)
    for k, turn in enumerate(turns):
        if turn < 0 or conv_turns[turn].speaker != "assistant":
            continue
        if spans[k] is not None:
            labels[k] = ids[k]
        elif k > 0 and turns[k - 1] == turn and spans[k - 1] is not None:
            labels[k] = ids[k]  # the end token right after the content
    return labels


def _image_token_ids(processor) -> set[int]:
    tokenizer = _tokenizer_of(processor)
    found = set()
    for attr in ("image_token_id", "video_token_id"):
        value = getattr(processor, attr, None) or getattr(tokenizer, attr, None)
        if isinstance(value, int):
            found.add(value)
    for attr in ("image_token",):
        token = getattr(processor, attr, None)
        if isinstance(token, str):
            found.add(tokenizer.convert_tokens_to_ids(token))
    return found


def _expand_offsets(ids, plain_ids, offsets, image_ids, name):
    """Offsets for the processor's ids, where each image token may have been repeated."""
    result, i = [], 0
    for j, token in enumerate(ids):
        if i < len(plain_ids) and token == plain_ids[i]:
            result.append(offsets[i])
            i += 1
        elif i > 0 and token in image_ids and token == plain_ids[i - 1]:  # an expanded image token
            result.append(offsets[i - 1])
        else:
            raise AlignError(f"{name}: the processor's tokens do not match the tokenizer's at position {j}")
    if i != len(plain_ids):
        raise AlignError(f"{name}: the processor dropped tokens of the prompt")
    return result


class HSACollator:
    """Records -> a padded batch with `semantic_ids`, for `model(**batch)` or a Trainer."""

    def __init__(self, processor, *, image_root=None, max_length: int | None = None,
                 padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        self.processor, self.image_root = processor, image_root
        self.max_length, self.padding_side = max_length, padding_side

    def __call__(self, records) -> dict:
        aligned = [r if isinstance(r, Aligned) else
                   align_record(r, self.processor, image_root=self.image_root, max_length=self.max_length)
                   for r in records]
        return pad_batch(aligned, pad_token_id=pad_token_id(self.processor), padding_side=self.padding_side)


def pad_token_id(processor) -> int:
    tokenizer = _tokenizer_of(processor)
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if value is None else value


def pad_batch(aligned: list[Aligned], *, pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest; padding is invisible (attention_mask 0), unlabelled and NOISE."""
    width = max(len(a) for a in aligned)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        fill = t.new_full((width - len(t),), value)
        return torch.cat([fill, t] if padding_side == "left" else [t, fill])

    batch = {
        "input_ids": torch.stack([pad(a.input_ids, pad_token_id) for a in aligned]),
        "attention_mask": torch.stack([pad(a.attention_mask, 0) for a in aligned]),
        "labels": torch.stack([pad(a.labels, IGNORE_INDEX) for a in aligned]),
        "semantic_ids": torch.stack([pad(a.semantic_ids, NOISE) for a in aligned]),
    }
    keys = {k for a in aligned for k in a.model_inputs}
    for key in sorted(keys):
        with_key = [a for a in aligned if key in a.model_inputs]
        if all(a.model_inputs[key].dim() == 1 and len(a.model_inputs[key]) == len(a) for a in with_key):
            # per-token inputs pad like the ids (0 = a text token); conversations without images get zeros
            batch[key] = torch.stack([pad(a.model_inputs[key] if key in a.model_inputs
                                          else torch.zeros(len(a), dtype=torch.long), 0) for a in aligned])
        else:  # per-image inputs (pixel patches, grids) are concatenated along their first dimension
            batch[key] = torch.cat([a.model_inputs[key] for a in with_key], dim=0)
    return batch


ROLE_MARK = re.compile(r"^\s*\[(?P<speaker>system|user|human|assistant|gpt)(?:\s*[:/|]\s*(?P<role>\w+))?\]\s*$",
                       re.IGNORECASE)


def parse_marked_text(text: str) -> dict:
    """A quick way to write a conversation by hand: lines `[user: noise]`, `[assistant]`, ... start
    turns (role optional: global/landmark/noise or GLOBAL_CONDITION/...); the lines below are its text."""
    turns, current = [], None
    for line_no, line in enumerate(text.splitlines(), 1):
        match = ROLE_MARK.match(line)
        if match:
            speaker = match["speaker"].lower()
            current = {"from": speaker, "value": []}
            if match["role"]:
                try:
                    current["semantic_type"] = parse_role(match["role"])
                except ValueError:
                    try:
                        current["semantic_type"] = parse_role(match["role"].lower())
                    except ValueError as e:
                        raise AlignError(f"line {line_no}: {e}") from None
            turns.append(current)
        elif current is None:
            if line.strip():
                raise AlignError(f"line {line_no}: text before the first turn marker such as [user] or [user: noise]")
        else:
            current["value"].append(line)
    if not turns:
        raise AlignError("no turns: start each turn with a line like [system], [user], [assistant: landmark]")
    for t in turns:
        t["value"] = "\n".join(t["value"]).strip("\n")
    return {"conversations": turns}
