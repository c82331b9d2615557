"""Evaluation on held-out shapes conversations, and the experiment's noise removal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.zoo import shapes
from models.zoo.evaluate import Graded, graded_prompts, held_out, normalize
from models.zoo.experiment import mean_interval, strip_noise, wilson

ROOT = Path(__file__).resolve().parents[1]


def test_graded_prompts_stop_at_each_question():
    for sample in held_out(20, seed=3, noise=shapes.HEAVY_NOISE):
        turns = sample.record["conversations"]
        prompts = list(graded_prompts(sample))
        answers = [t["value"] for t in turns if t["semantic_type"] == "LANDMARK"]
        assert [expected for _, expected, _, _ in prompts] == answers
        for record, expected, qtype, question in prompts:
            last = record["conversations"][-1]
            assert last["from"] == "human" and last["semantic_type"] == "GLOBAL_CONDITION"
            assert last["value"] == question and qtype in shapes.QUESTION_TYPES
            assert record["images"] == sample.record["images"]


def test_held_out_conversations_are_not_training_conversations():
    train = [s.record["conversations"] for s in shapes.generate(30, seed=0, noise=shapes.TRAIN_NOISE)]
    evals = [s.record["conversations"] for s in held_out(30, seed=0, noise=shapes.TRAIN_NOISE)]
    assert not any(conv in train for conv in evals)


def test_exact_match_ignores_only_case_space_and_final_stop():
    assert Graded("color", "q", "The circle is red.", " the circle  is red").correct
    assert not Graded("color", "q", "The circle is red.", "The circle is green.").correct
    assert not Graded("color", "q", "The circle is red.", "The circle is red. The square is blue.").correct
    assert normalize("A b.") == "a b"


def test_strip_noise_keeps_the_questions_and_answers():
    for sample in held_out(30, seed=4, noise=shapes.HEAVY_NOISE):
        stripped = strip_noise(sample).record["conversations"]
        assert all(t["semantic_type"] != "NOISE" and "spans" not in t for t in stripped)
        assert stripped[0]["value"].startswith("<image>")
        assert sum("<image>" in t["value"] for t in stripped) == 1
        kept = [t["value"].replace("<image>", "") for t in stripped]
        original = [t for t in sample.record["conversations"] if t["semantic_type"] != "NOISE"]
        for text, turn in zip(kept, original):
            assert turn["value"].replace("<image>", "").endswith(text)
            assert "I am sure" not in text


def test_intervals():
    mean, low, high = mean_interval([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and low < 0.6 < high
    assert high - low == pytest.approx(2 * 4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    low, high = wilson(95, 100)
    assert 0.88 < low < 0.95 < high < 0.98


@pytest.mark.slow
def test_eval_command_on_the_default_model():
    done = subprocess.run([sys.executable, "-m", "models.zoo", "eval", "--n", "12", "--seed", "123"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["question", "type", "correct", "total", "accuracy"]
    assert lines[-1].startswith("accuracy: ")
    # far above what a model blind to the image gets (about 0.3: counts only)
    assert float(lines[-1].split()[1]) >= 0.45


@pytest.mark.slow
def test_default_model_meets_the_accuracy_target():
    from models.zoo.evaluate import evaluate_model

    assert evaluate_model(n=20, seed=321).accuracy >= 0.95
