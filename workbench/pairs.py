"""Preference pairs: a prompt conversation with a chosen and a rejected answer, as model input.

The record is LLaMA-Factory's ranking format (ShareGPT style; `messages` with role/content works too):

    {"system": "...", "images": ["a.png"],
     "conversations": [{"from": "human", "value": "<image>What color is the circle?"}],
     "chosen": {"from": "gpt", "value": "The circle is red."},
     "rejected": {"from": "gpt", "value": "The circle is green."}}

The prompt ends with the user's turn; each answer is one assistant turn and may carry a
`semantic_type` and spans like any turn. A pair is aligned as two conversations (the prompt followed
by each answer) through `models.data.align`, so both get `semantic_ids` from the same labels; the
completion mask marks the tokens of the final answer only (the ones DPO/NCA score).
"""
from __future__ import annotations

import torch

from .align import (IGNORE_INDEX, AlignError, SPEAKERS, align_record, normalize_record, pad_batch,
                    pad_token_id)

PAIR_KEYS = ("chosen", "rejected")


def is_pair(record) -> bool:
    """A record of the ranking format (it names a chosen or a rejected answer)."""
    return isinstance(record, dict) and any(k in record for k in PAIR_KEYS)


def _where(index) -> str:
    return "record" if index is None else f"record {index}"


def split_pair(record, *, index=None) -> tuple[dict, dict]:
    """The pair as two ShareGPT records, the prompt followed by the chosen answer and by the rejected
    one; AlignError names the record and what is wrong."""
    where = _where(index)
    if not isinstance(record, dict):
        raise AlignError(f"{where}: expected an object with 'conversations', 'chosen' and 'rejected'")
    key = "messages" if "messages" in record and "conversations" not in record else "conversations"
    prompt = record.get(key)
    if not isinstance(prompt, list) or not prompt:
        raise AlignError(f"{where}: a preference pair needs the prompt's turns in '{key}'")
    last = prompt[-1]
    if not isinstance(last, dict) or SPEAKERS.get(last.get("from", last.get("role"))) != "user":
        raise AlignError(f"{where}: the prompt of a preference pair must end with the user's turn")
    answers = []
    for name in PAIR_KEYS:
        answer = record.get(name)
        if not isinstance(answer, dict):
            raise AlignError(f"{where}: a preference pair needs '{name}' as one assistant turn "
                             '({"from": "gpt", "value": ...})')
        if SPEAKERS.get(answer.get("from", answer.get("role"))) != "assistant":
            raise AlignError(f"{where}: '{name}' must be the assistant's turn (from 'gpt' or role 'assistant')")
        answers.append(answer)
    rest = {k: v for k, v in record.items() if k not in PAIR_KEYS}
    both = tuple({**rest, key: [*prompt, answer]} for answer in answers)
    for name, conversation in zip(PAIR_KEYS, both):
        try:
            normalize_record(conversation, index=index)
        except AlignError as e:
            raise AlignError(f"{e} (with the {name} answer)") from None
    return both


def completion_mask(aligned) -> torch.Tensor:
    """1 on the labelled tokens of the last turn (the answer and its end token), 0 elsewhere."""
    last = len(aligned.turns) - 1
    in_last = torch.tensor([t == last for t in aligned.turn_index], dtype=torch.bool)
    return ((aligned.labels != IGNORE_INDEX) & in_last).long()


def align_pair(record, processor, *, image_root=None, max_length: int | None = None, index=None):
    """(chosen, rejected): each an Aligned conversation and its completion mask."""
    out = []
    for name, conversation in zip(PAIR_KEYS, split_pair(record, index=index)):
        aligned = align_record(conversation, processor, image_root=image_root, max_length=max_length, index=index)
        mask = completion_mask(aligned)
        if not mask.any():
            raise AlignError(f"{_where(index)}: max_length {max_length} cuts off the {name} answer "
                             f"(the conversation has more tokens)")
        out.append((aligned, mask))
    return tuple(out)


class PairCollator:
    """Pairs -> one padded batch of 2B rows, the B chosen conversations then the B rejected ones (the
    layout TRL's DPOTrainer scores), with `completion_mask`, `semantic_ids` (unless hsa is off) and the
    processor's image inputs (each row's images, in row order). No `labels`: the trainer makes them from
    the completion mask."""

    def __init__(self, processor, *, image_root=None, max_length: int | None = None, hsa: bool = True):
        self.processor, self.image_root, self.max_length, self.hsa = processor, image_root, max_length, hsa

    def __call__(self, records) -> dict:
        pairs = [align_pair(r, self.processor, image_root=self.image_root, max_length=self.max_length)
                 for r in records]
        rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
        batch = pad_batch([aligned for aligned, _ in rows], pad_token_id=pad_token_id(self.processor))
        width = batch["input_ids"].shape[1]
        batch["completion_mask"] = torch.stack([torch.cat([m, m.new_zeros(width - len(m))]) for _, m in rows])
        batch.pop("labels")
        if not self.hsa:
            batch.pop("semantic_ids")
        return batch
