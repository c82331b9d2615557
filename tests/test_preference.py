"""Preference alignment (issue 21): ranking records, the pair collator, DPO and NCA on the default model.

The pairs are the shapes world's: a NOISE turn claims a wrong colour, the chosen answer gives the right
one and the rejected answer repeats the claim. A few optimizer steps on eight pairs must raise the
chosen-minus-rejected reward margin (rewards/margins in metrics.jsonl) from its first value."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.hsa import NOISE
from models.zoo import DEFAULT_VLM_DIR, shapes
from models.data.align import AlignError
from workbench.pairs import PairCollator, split_pair
from workbench.train.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_json(tmp_path_factory) -> Path:
    return shapes.export_sharegpt(shapes.generate_pairs(8), tmp_path_factory.mktemp("pairs"), name="pairs")


def margins(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["rewards/margins"] for line in lines if "rewards/margins" in line]


def test_shapes_pairs_are_ranking_records_with_the_noise_claim_as_the_rejected_answer(pairs_json):
    records = json.loads(pairs_json.read_text())
    info = json.loads((pairs_json.parent / "dataset_info.json").read_text())["pairs"]
    assert info["ranking"] is True and info["columns"]["chosen"] == "chosen"
    for record in records:
        claim, question = record["conversations"][0], record["conversations"][-1]
        assert claim["semantic_type"] == "NOISE" and question["from"] == "human"
        wrong = claim["value"].split(" is ")[-1]
        assert record["rejected"]["value"].endswith(f"is {wrong}") and record["chosen"] != record["rejected"]
    again = [s.record for s in shapes.generate_pairs(2, start=3)]
    assert [r["chosen"] for r in again] == [r["chosen"] for r in records[3:5]]  # a pure function of the seed


def test_split_pair_refuses_what_is_not_a_pair():
    prompt = [{"from": "human", "value": "Hi?"}]
    good = {"conversations": prompt, "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}
    chosen, rejected = split_pair(good)
    assert chosen["conversations"][-1]["value"] == "a" and rejected["conversations"][-1]["value"] == "b"
    with pytest.raises(AlignError, match="'rejected'"):
        split_pair({"conversations": prompt, "chosen": {"from": "gpt", "value": "a"}}, index=3)
    with pytest.raises(AlignError, match="end with the user"):
        split_pair({**good, "conversations": prompt + [{"from": "gpt", "value": "x"}]})
    with pytest.raises(AlignError, match="assistant"):
        split_pair({**good, "chosen": {"from": "human", "value": "a"}})
    with pytest.raises(AlignError, match="no text"):
        split_pair({**good, "rejected": {"from": "gpt", "value": " "}})


def test_the_collator_gives_semantic_ids_for_prompt_and_both_answers(pairs_json):
    from models.vlm.processor import load_processor

    processor = load_processor(DEFAULT_VLM_DIR)
    records = json.loads(pairs_json.read_text())[:2]
    batch = PairCollator(processor, image_root=pairs_json.parent)(records)
    assert batch["input_ids"].shape[0] == 4 and "labels" not in batch
    assert batch["pixel_values"].shape[0] == 4 * batch["pixel_values"].shape[0] // 4  # one image per row
    assert batch["image_grid_thw"].shape[0] == 4
    tok = processor.tokenizer
    for row, record in enumerate(records * 2):
        answer = (record["chosen"] if row < 2 else record["rejected"])["value"]
        ids = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        assert tok.decode(ids).startswith(answer)  # the answer and its end token, nothing of the prompt
        assert (batch["semantic_ids"][row] == NOISE).any()  # the claim
        assert (batch["semantic_ids"][row][batch["completion_mask"][row].bool()] != NOISE).all()
    assert "semantic_ids" not in PairCollator(processor, image_root=pairs_json.parent, hsa=False)(records)


def test_semantic_ids_reach_the_attention_through_trls_scoring_forward(pairs_json):
    """TRL scores with model(**batch, fused_lm_head=True): the log-probabilities differ with HSA's roles."""
    from transformers import AutoModelForImageTextToText
    from trl.trainer.utils import add_fused_lm_head

    import models.hsa  # noqa: F401
    from models.vlm.processor import load_processor

    processor = load_processor(DEFAULT_VLM_DIR)
    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_VLM_DIR, attn_implementation="hsa").eval()
    add_fused_lm_head(model)
    batch = PairCollator(processor, image_root=pairs_json.parent)(json.loads(pairs_json.read_text())[:1])
    mask = batch.pop("completion_mask")
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    with torch.no_grad():
        on = model(**batch, labels=labels, fused_lm_head=True).log_probs.sum(1)
        batch.pop("semantic_ids")
        off = model(**batch, labels=labels, fused_lm_head=True).log_probs.sum(1)
    assert not torch.allclose(on, off)


def test_dpo_as_a_real_training_run_raises_the_reward_margin(pairs_json, tmp_path):
    config = {"dataset": str(pairs_json), "output_dir": str(tmp_path / "dpo"), "method": "dpo", "beta": 0.5,
              "max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "lr_scheduler": "constant", "save_steps": 1000}
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "workbench.train", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = margins(tmp_path / "dpo")
    assert len(found) >= 3 and found[0] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1
    assert found[-1] > found[0] + 0.2, found
    summary = json.loads((tmp_path / "dpo" / "train_summary.json").read_text())
    assert summary["method"] == "dpo" and (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_nca_from_a_store_dataset_with_a_frozen_copy_raises_the_reward_margin(pairs_json, tmp_path):
    from workbench.store.db import Store
    from workbench.store.io import export_dataset, import_file
    from workbench.train.preference import train

    db = tmp_path / "store.db"
    with Store(db) as store:
        report = import_file(store, pairs_json, dataset="pairs")
        assert report.stored == 8 and not report.errors
        again = import_file(store, pairs_json, dataset="pairs")
        assert again.stored == 0 and len(again.skipped) == 8  # the content key holds chosen / rejected
        changed = json.loads(pairs_json.read_text())[:1]
        changed[0]["rejected"]["value"] = "The triangle is green."
        other = pairs_json.parent / "changed.json"
        other.write_text(json.dumps(changed))
        assert import_file(store, other, dataset="changed-copy").stored == 1
        exported = export_dataset(store, "pairs", "llamafactory", tmp_path / "export")
        records = json.loads(exported.files[0].read_text())
        assert records[0]["chosen"]["role"] == "assistant" and "content" in records[0]["rejected"]
        info = json.loads(exported.files[1].read_text())["pairs"]
        assert info["ranking"] is True and info["columns"]["rejected"] == "rejected"
    config = parse_config({"dataset": "store:pairs", "store_db": str(db), "output_dir": str(tmp_path / "nca"),
                           "method": "nca", "beta": 0.5, "reference": "copy", "max_steps": 4, "batch_size": 4,
                           "learning_rate": 5e-3, "lr_scheduler": "constant", "save_steps": 1000})
    summary = train(config)
    found = margins(tmp_path / "nca")
    assert summary["method"] == "nca" and found[-1] > found[0] + 0.05, found


def test_import_refuses_a_broken_pair_by_name(tmp_path):
    from workbench.store.db import Store
    from workbench.store.io import import_file

    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi?"}],
                                 "chosen": {"from": "gpt", "value": "Hello."}}]))
    with Store(tmp_path / "s.db") as store:
        report = import_file(store, data)
    assert report.stored == 0 and "'rejected'" in report.errors[0]


def test_the_config_keys_of_preference_training(pairs_json):
    base = {"dataset": str(pairs_json)}
    c = parse_config({**base, "method": "nca", "beta": 0.2, "reference": "copy"})
    assert (c.method, c.beta, c.reference) == ("nca", 0.2, "copy")
    assert parse_config(base).method == "sft"
    for bad, words in [({"beta": 0.3}, "method is 'sft'"), ({"method": "dpo", "beta": 0}, "beta"),
                       ({"method": "ppo"}, "method must be one of"), ({"method": "dpo", "reference": "x"}, "reference"),
                       ({"method": "dpo", "finetuning": "full", "reference": "base"}, "use reference 'copy'")]:
        with pytest.raises(ConfigError, match=words):
            parse_config({**base, **bad})


def test_the_train_tab_draws_a_preference_runs_rewards():
    from workbench.ui.train import curves, curves_figure

    records = [{"step": s, "loss": 0.7 - s / 10, "learning_rate": 1e-3, "rewards/chosen": 0.0, "rewards/rejected": -s,
                "rewards/margins": float(s), "rewards/accuracies": 1.0} for s in (1, 2, 3)]
    assert curves(records)["rewards"]["rewards/margins"] == ([1, 2, 3], [1.0, 2.0, 3.0])
    names = {trace.name for trace in curves_figure(records).data}
    assert {"reward chosen", "reward rejected", "margin", "accuracy"} <= names
    assert not curves([{"step": 1, "loss": 1.0}])["rewards"] and len(curves_figure([{"step": 1, "loss": 1.0}]).data) == 2
