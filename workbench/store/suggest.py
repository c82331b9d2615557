"""Label suggestions a person can accept or reject: by rule, and from a model's attention.

Both return complete labels for a conversation (per turn: role and spans, the store's `Labels`),
so accepting one is a single `Store.set_labels` edit that undo takes back whole.
"""
from __future__ import annotations

import re

from models.hsa import GLOBAL, LANDMARK, NOISE
from models.data.align import Span

from . import labels as L

# Sentences that carry no task content: greetings, thanks, small talk, and hedged claims that
# contradict what the image shows ("I think the circle is green") in the shapes task.
CHIT_CHAT = re.compile(
    r"\b(hi|hello|hey|thanks|thank you|thx|lol|haha|by the way|btw|nice weather|good morning|good night|"
    r"how are you|have a (nice|good) day|just kidding|i think|i guess|i believe|i'm sure|i am sure|"
    r"my friend|someone told me|not sure but|whatever|anyway)\b", re.IGNORECASE)
SENTENCE = re.compile(r"[^.!?\n]*(?:[.!?]+|\n|$)")


def sentences(text: str):
    """(start, end) of each sentence without surrounding white space, in code points."""
    for match in SENTENCE.finditer(text):
        start, end = match.span()
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            yield start, end


def rule_suggestions(conv) -> list[tuple[int, list[Span]]]:
    """system → global, assistant → landmark, user → global; chit-chat sentences → noise spans
    (a turn that is nothing but chit-chat becomes a noise turn)."""
    suggested = []
    for turn in conv.turns:
        role = {"system": GLOBAL, "assistant": LANDMARK}.get(turn.speaker, GLOBAL)
        noisy = [(a, b) for a, b in sentences(turn.text) if CHIT_CHAT.search(turn.text[a:b])]
        content = [(a, b) for a, b in sentences(turn.text)]
        if turn.speaker != "system" and noisy and noisy == content:
            suggested.append((NOISE, []))
            continue
        spans = L.canonical(Span(a, b, NOISE) for a, b in noisy) if turn.speaker != "system" else []
        suggested.append((role, spans))
    return suggested


def token_usefulness(model, processor, conv):
    """Per token, the attention it receives from the tokens after it (mean over layers, heads and
    later queries), with the alignment: (scores list, Aligned). Needs attention weights, so the
    model should run with eager attention."""
    import torch

    from models.data.align import align_record, pad_batch, pad_token_id

    aligned = align_record(conv, processor)
    # a batch of one, made like training's: per-token extras (mm_token_type_ids) get their batch
    # dimension, per-image ones (pixel_values, image_grid_thw) stay as they are
    batch = pad_batch([aligned], pad_token_id=pad_token_id(processor))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "semantic_ids")}
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention weights (load it with attn_implementation='eager')")
    n = len(aligned)
    received = torch.zeros(n)
    for layer in out.attentions:
        weights = layer[0].float().mean(0).cpu()  # (queries, keys), averaged over heads
        received += weights.sum(0)
    later_queries = torch.arange(n, 0, -1, dtype=torch.float)  # key k is seen by n - k queries
    return (received / len(out.attentions) / later_queries).tolist(), aligned


def model_suggestions(model, processor, conv, *, fraction: float = 0.15) -> list[tuple[int, list[Span]]]:
    """The rule suggestions, plus: in user turns, the `fraction` of content tokens that receive the
    least attention become noise spans (whole words)."""
    suggested = rule_suggestions(conv)
    scores, aligned = token_usefulness(model, processor, conv)
    candidates = [k for k, (t, span) in enumerate(zip(aligned.turn_index, aligned.char_spans))
                  if t >= 0 and span is not None and conv.turns[t].speaker == "user"
                  and conv.turns[t].text[span[0]:span[1]].strip()]
    count = int(len(candidates) * fraction)
    for k in sorted(candidates, key=lambda k: scores[k])[:count]:
        t = aligned.turn_index[k]
        start, end = _word(conv.turns[t].text, *aligned.char_spans[k])
        role, spans = suggested[t]
        suggested[t] = (role, L.paint(spans, start, end, NOISE))
    return suggested


def _word(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen [start, end) to whole words, so a suggestion never cuts a word in two."""
    while start > 0 and not text[start - 1].isspace() and not text[start].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace() and not text[end - 1].isspace():
        end += 1
    return start, end
