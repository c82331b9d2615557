"""Accuracy of a VLM on fresh shapes conversations, answered through `models.vlm` (the Chat tab's
generation code) with greedy decoding.

Every LANDMARK answer of a conversation is one graded question: the model sees the conversation up
to that question (earlier turns as written, NOISE included) and its reply must equal the exact
answer, up to case, spacing and a final full stop.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import shapes

NOISE_PRESETS = {"clean": shapes.CLEAN, "train": shapes.TRAIN_NOISE, "heavy": shapes.HEAVY_NOISE}
EVAL_SPLIT = "eval"  # never used for training data


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


@dataclass
class Graded:
    qtype: str
    question: str
    expected: str
    reply: str

    @property
    def correct(self) -> bool:
        return normalize(self.reply) == normalize(self.expected)


@dataclass
class EvalResult:
    graded: list[Graded] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(g.correct for g in self.graded) / max(1, len(self.graded))

    def by_type(self) -> dict[str, tuple[int, int]]:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for g in self.graded:
            counts[g.qtype][0] += g.correct
            counts[g.qtype][1] += 1
        return {t: tuple(counts[t]) for t in shapes.QUESTION_TYPES if t in counts}

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n_questions": len(self.graded),
                "by_type": {t: {"correct": c, "total": n, "accuracy": c / n} for t, (c, n) in self.by_type().items()}}


def graded_prompts(sample: shapes.Sample):
    """(record up to a question, expected answer, question type, question) for each LANDMARK answer."""
    turns = sample.record["conversations"]
    answers = [i for i, t in enumerate(turns) if t["from"] == "gpt" and t.get("semantic_type") == shapes.LANDMARK]
    for qtype, i in zip(sample.qtypes, answers):
        record = {**sample.record, "conversations": turns[:i]}
        yield record, turns[i]["value"], qtype, turns[i - 1]["value"]


def evaluate(model, processor, samples: list[shapes.Sample], *, hsa: bool | None = None,
             progress: bool = False, max_new_tokens: int = 48) -> EvalResult:
    from tqdm import tqdm

    from models.vlm import GenerationSettings, generate_reply

    settings = GenerationSettings(mode="greedy", max_new_tokens=max_new_tokens)
    result = EvalResult()
    for sample in tqdm(samples, desc="eval", disable=not progress, dynamic_ncols=True):
        for record, expected, qtype, question in graded_prompts(sample):
            reply = generate_reply(model, processor, record, settings=settings, hsa=hsa)
            result.graded.append(Graded(qtype, question, expected, reply))
    return result


def held_out(n: int, seed: int, noise: shapes.NoiseSpec = shapes.CLEAN) -> list[shapes.Sample]:
    return shapes.generate(n, seed=seed, split=EVAL_SPLIT, noise=noise)


def evaluate_model(model_path: str | Path | None = None, *, n: int = 100, seed: int = 0,
                   noise: shapes.NoiseSpec = shapes.CLEAN, attn_implementation: str | None = None,
                   progress: bool = False) -> EvalResult:
    """Load a model (default: the embedded Qwen2-VL; "default" and "composed" name the embedded ones)
    and evaluate it on `n` held-out conversations.
    The attention defaults to HSA for a model trained with it, plain SDPA otherwise."""
    import json

    from models.vlm import load_vlm

    from . import DEFAULT_VLM_DIR, embedded_model

    path = Path(embedded_model(model_path)) if model_path is not None else DEFAULT_VLM_DIR
    if attn_implementation is None:
        config_file = path / "config.json"
        trained_with_hsa = json.loads(config_file.read_text()).get("hsa_trained", True) if config_file.exists() else True
        attn_implementation = "hsa" if trained_with_hsa else "sdpa"
    model, processor = load_vlm(path, attn_implementation=attn_implementation, device="cpu")
    return evaluate(model, processor, held_out(n, seed, noise), progress=progress)


def print_report(result: EvalResult) -> None:
    print(f"{'question type':<14} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for qtype, (correct, total) in result.by_type().items():
        print(f"{qtype:<14} {correct:>8} {total:>6} {correct / total:>9.3f}")
    wrong = [g for g in result.graded if not g.correct][:5]
    for g in wrong:
        print(f"  wrong ({g.qtype}): {g.question!r} -> {g.reply!r} (expected {g.expected!r})")
    print(f"accuracy: {result.accuracy:.4f}")
