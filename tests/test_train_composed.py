"""The two training stages of a composed VLM as real background runs (`python -m workbench.train`):
"align" trains the projector alone on image-caption pairs, "sft" LoRA on the language model with the
projector in full; a finished LoRA run merges into a plain checkpoint. Configs that cannot work are
refused by name before anything starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_composed, save_tiny_qwen2vl

from workbench.jobs import SUCCEEDED
from workbench.train import ConfigError, parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> Path:
    return save_tiny_composed(tmp_path_factory.mktemp("composed") / "model", "clip", "qwen3")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """Conversations (ShareGPT, with NOISE turns) and LLaVA-pretrain style captions of the same pictures."""
    from models.zoo import shapes

    out = tmp_path_factory.mktemp("data")
    samples = shapes.generate(8, seed=0, noise=shapes.TRAIN_NOISE)
    conversations = shapes.export_sharegpt(samples, out, name="shapes")
    records = json.loads(conversations.read_text())
    captions = [{"image": record["images"][0], "caption": shapes.describe_answer(sample.scene)}
                for record, sample in zip(records, samples)]
    (out / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    return out


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory).state_dict()


def test_align_stage_changes_only_the_projector(manager, composed, shapes_data):
    config = {"dataset": str(shapes_data / "captions.jsonl"), "base_model": str(composed), "stage": "align",
              "max_steps": 3, "batch_size": 2, "learning_rate": 1e-2}
    run = manager.wait(manager.submit(config, name="align").id, timeout=300)
    assert run.status == SUCCEEDED, manager.log_tail(run.id)
    before, after = weights(composed), weights(run.output_dir / "model")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    projector = {name for name in before if "multi_modal_projector" in name}
    assert changed == projector  # every projector tensor moved, and nothing else did
    info = json.loads((run.output_dir / "model" / "workbench_run.json").read_text())
    assert info["stage"] == "align" and info["finetuning"] == "projector"
    assert json.loads((run.output_dir / "model" / "config.json").read_text())["hsa_trained"] is True


def test_sft_stage_writes_a_lora_adapter_with_the_projector_and_merges(manager, composed, shapes_data):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    config = {"dataset": str(shapes_data / "shapes.json"), "base_model": str(composed), "max_steps": 3,
              "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2, "merge": True}
    run = manager.wait(manager.submit(config, name="sft").id, timeout=300)
    assert run.status == SUCCEEDED, manager.log_tail(run.id)
    adapter = run.output_dir / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]
    assert not any("vision" in m or "projector" in m for m in adapter_config["target_modules"])
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in name and "language_model" in name for name in saved)
    assert any("multi_modal_projector" in name and "lora" not in name for name in saved)

    # the merged checkpoint is the base with the adapter folded in: same logits, no peft needed
    merged = AutoModelForImageTextToText.from_pretrained(run.output_dir / "merged").eval()
    assert json.loads((run.output_dir / "merged" / "config.json").read_text())["hsa_trained"] is True
    with_adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(composed), adapter).eval()
    ids = torch.tensor([[1, 5, 9, 30, 31, 32]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    assert not torch.equal(weights(composed)["model.multi_modal_projector.linear_1.weight"],
                           merged.state_dict()["model.multi_modal_projector.linear_1.weight"])


def test_stage_keys_that_cannot_work_are_refused_by_name(tmp_path, composed, shapes_data):
    qwen2vl = save_tiny_qwen2vl(tmp_path / "qwen2vl")
    data = str(shapes_data / "shapes.json")
    with pytest.raises(ConfigError, match="stage 'align' needs a composed .* qwen2_vl without one"):
        parse_config({"dataset": data, "base_model": str(qwen2vl), "stage": "align"})
    with pytest.raises(ConfigError, match="train_projector needs a composed"):
        parse_config({"dataset": data, "base_model": str(qwen2vl), "train_projector": True})
    with pytest.raises(ConfigError, match="lora_r given but stage is 'align'"):
        parse_config({"dataset": data, "base_model": str(composed), "stage": "align", "lora_r": 8})
    with pytest.raises(ConfigError, match="quantization '4bit' given but stage 'align'"):
        parse_config({"dataset": data, "base_model": str(composed), "stage": "align", "quantization": "4bit"})
    with pytest.raises(ConfigError, match="stage must be one of align, sft"):
        parse_config({"dataset": data, "stage": "pretrain"})
    with pytest.raises(ConfigError, match="merge given but finetuning is 'full'"):
        parse_config({"dataset": data, "finetuning": "full", "merge": True})
    assert parse_config({"dataset": data, "base_model": str(composed), "stage": "align"}).stage == "align"
    # the embedded models go by name
    from models.zoo import DEFAULT_COMPOSED_DIR, DEFAULT_VLM_DIR

    assert parse_config({"dataset": data, "base_model": "default"}).base_model == str(DEFAULT_VLM_DIR)
    assert parse_config({"dataset": data, "base_model": "composed"}).base_model == str(DEFAULT_COMPOSED_DIR)


def test_caption_records_align_as_one_question_and_answer():
    from models.data.align import CAPTION_PROMPT, AlignError, normalize_record

    conversation = normalize_record({"image": "a.png", "caption": "A red circle."})
    assert conversation.images == ["a.png"]
    assert [(t.speaker, t.text) for t in conversation.turns] == [("user", f"<image>{CAPTION_PROMPT}"),
                                                                  ("assistant", "A red circle.")]
    llava = normalize_record({"image": "a.png", "conversations": [{"from": "human", "value": "What is it?"},
                                                                  {"from": "gpt", "value": "A circle."}]})
    assert llava.turns[0].text == "<image>What is it?" and llava.images == ["a.png"]
    with pytest.raises(AlignError, match="record 3: has both a 'caption' and 'conversations'"):
        normalize_record({"image": "a.png", "caption": "x", "conversations": []}, index=3)
    with pytest.raises(AlignError, match="'caption' must be a non-empty string"):
        normalize_record({"image": "a.png", "caption": ""})


def test_the_train_tab_runs_both_stages_merges_and_offers_each_result_in_chat(tmp_path, composed, shapes_data):
    import shutil

    from workbench.ui import train as tab
    from workbench.ui.chat import ChatBackend
    from workbench.ui.context import AppContext

    ctx = AppContext.create(tmp_path / "ws")
    for name in ("captions.jsonl", "shapes.json"):
        shutil.copy(shapes_data / name, ctx.workspace / name)
    shutil.copytree(shapes_data / "shapes", ctx.workspace / "shapes")
    manager = tab.manager_of(ctx)
    try:
        presets = {name: tab.preset_values(name) for name in tab.PRESETS}
        align = presets["Align · composed default (projector only)"]
        align.update(base_model=str(composed), dataset="captions.jsonl", max_steps=2, extra="", eval_split=0)
        config, _ = tab.form_config(ctx, align)
        assert config["stage"] == "align" and not {"finetuning", "quantization", "lora_r", "merge"} & set(config)
        lora = presets["LoRA · composed default (projector in full)"]
        lora.update(base_model=str(composed), dataset="shapes.json", max_steps=2, extra="", eval_split=0,
                    lora_r=4, merge=False)
        ids = [tab.start_run(ctx, values)[0] for values in (align, lora)]
        runs = [manager.wait(run_id, timeout=300) for run_id in ids]
        assert [r.status for r in runs] == [SUCCEEDED, SUCCEEDED], [manager.log_tail(r.id) for r in runs]
        # the align run saved a whole model: chat with it as it is
        target = tab.chat_target(manager, runs[0].id)
        assert target.adapter is None and target.base_model == str(runs[0].output_dir / "model")
        text, label = tab.merge_run(manager, runs[0].id)
        assert "no LoRA adapter" in text and label == ""
        text, label = tab.merge_run(manager, runs[1].id)
        assert label == f"run: run-{runs[1].id:04d} · merged", text
        choices = ChatBackend(ctx).model_choices()
        assert {f"run: run-{runs[0].id:04d}", f"run: run-{runs[1].id:04d}", label} <= set(choices)
        assert ChatBackend(ctx).resolve(label) == (str(runs[1].output_dir / "merged"), None)
    finally:
        manager.close()
        tab.manager_for.cache_clear()


def test_a_hybrid_vlm_trains_with_gate_regularizers_and_logs_gate_statistics(manager, tmp_path, shapes_data):
    composed = save_tiny_composed(tmp_path / "hybrid-vlm", "clip", "hybrid")
    config = {"dataset": str(shapes_data / "shapes.json"), "base_model": str(composed), "max_steps": 3,
              "batch_size": 2, "lora_r": 4, "lora_alpha": 8, "gate_balance_weight": 0.1, "gate_entropy_weight": 0.01,
              "gate_entropy_steps": 2}
    run = manager.wait(manager.submit(config, name="hybrid").id, timeout=300)
    assert run.status == SUCCEEDED, manager.log_tail(run.id)
    # LoRA reaches the attention, the MLP, the Mamba in_proj and the gate, never out_proj or conv1d
    targets = json.loads((run.output_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]
    names = {t.rsplit(".", 1)[-1] for t in targets}
    assert {"q_proj", "in_proj", "gate_proj"} <= names and not names & {"out_proj", "conv1d"}
    from safetensors.torch import load_file

    wrapped = {name.split(".lora_")[0] for name in load_file(run.output_dir / "adapter" / "adapter_model.safetensors")
               if ".lora_" in name}
    assert wrapped and all("language_model" in name for name in wrapped)  # peft shortens target names; the
    assert any(name.endswith("mamba.in_proj") for name in wrapped)       # weights say what it wrapped
    metrics = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "loss" in m]
    assert len(logged) == 3 and all(0.0 <= m["gate_entropy"] <= 0.6932 and m["gate_balance"] >= 0 for m in logged)
    stats = [json.loads(line) for line in (run.output_dir / "gate_stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3]
    layers = stats[-1]["layers"]
    assert len(layers) == 2 and all(0.0 <= layer["mean"] <= 1.0 and layer["tokens"] > 0 for layer in layers)
    # the prune planner reads the run directory as it is
    from models.hybrid import make_plan, read_gate_stats

    averaged, steps = read_gate_stats(run.output_dir / "gate_stats.jsonl")
    assert steps == [1, 2, 3] and len(make_plan(averaged, ["hybrid"] * 2)["layer_types"]) == 2

    # the Train tab: the gates over steps, a plan from them, the pruned export, and chat with it
    from workbench.ui import train as tab
    from workbench.chat import finished_runs

    heatmap, bars = tab.run_view(manager, run.id)[-1].data
    assert list(heatmap.x) == [1, 2, 3] and len(heatmap.z) == 2 and len(bars.y) == 2
    assert heatmap.z[0][-1] == pytest.approx(layers[0]["mean"])
    text, plan_json = tab.plan_run(manager, run.id)
    plan = json.loads(plan_json)
    assert plan["layer_types_before"] == ["hybrid", "hybrid_sliding"] and "layer   0" in text
    # force a real pruning, as a plan from trained gates would: layer 1 loses its attention
    plan["layer_types"] = ["hybrid", "linear_attention"]
    (run.output_dir / tab.PLAN_FILE).write_text(json.dumps(plan))
    text, label = tab.export_pruned_run(manager, run.id)
    assert label == f"run: run-{run.id:04d} · pruned", text
    pruned = run.output_dir / "pruned"
    assert json.loads((pruned / "config.json").read_text())["text_config"]["layer_types"] == plan["layer_types"]
    assert (run.output_dir / "merged" / "config.json").is_file()  # the LoRA run was merged first
    assert finished_runs(manager.runs_dir)[label] == (str(pruned), None)
    from models.vlm import generate_reply, load_vlm

    model, processor = load_vlm(pruned, device="cpu")
    record = json.loads((shapes_data / "shapes.json").read_text())[0]
    record["conversations"] = record["conversations"][:1]
    assert isinstance(generate_reply(model, processor, record, image_root=shapes_data), str)
    assert tab.plan_run(manager, None)[0] == "Select a hybrid run."


def test_gate_keys_need_a_hybrid_and_mamba_out_proj_is_refused(tmp_path, composed, shapes_data):
    data = str(shapes_data / "shapes.json")
    with pytest.raises(ConfigError, match="gate_balance_weight given but base_model .* has no fusion gates"):
        parse_config({"dataset": data, "base_model": str(composed), "gate_balance_weight": 0.1})
    hybrid = save_tiny_composed(tmp_path / "hybrid-vlm", "siglip", "hybrid")
    with pytest.raises(ConfigError, match="lora_target out_proj: LoRA cannot wrap a Mamba mixer"):
        parse_config({"dataset": data, "base_model": str(hybrid), "lora_target": ["q_proj", "out_proj"]})
    with pytest.raises(ConfigError, match="gate_balance_target must be in"):
        parse_config({"dataset": data, "base_model": str(hybrid), "gate_balance_target": 2.0})
    assert parse_config({"dataset": data, "base_model": str(hybrid), "gate_entropy_weight": 0.01}).gate_entropy_weight
