"""Training runs as real background processes on the default VLM: LoRA, QLoRA 4-bit on CPU, DDP
on two CPU processes, cancel and resume from the last checkpoint, a crash that ends failed."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import wait_for as conftest_wait_for

from workbench.jobs import CANCELLED, FAILED, FINISHED, RUNNING, SUCCEEDED, group_members
from workbench.train import DEFAULT_MODEL

pytestmark = pytest.mark.slow


def build_default_model(out_dir: Path) -> Path:
    """The embedded default VLM if it is built; otherwise the same architecture and processor,
    untrained (training mechanics do not need a trained model)."""
    if (DEFAULT_MODEL / "config.json").exists():
        return DEFAULT_MODEL
    from models.zoo import build, processor as zoo_processor

    processor = zoo_processor.build_processor()
    model = build.new_model(processor, build.ModelSize())
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def write_shapes_dataset(out_dir: Path, n: int = 12) -> Path:
    """ShareGPT records of the shapes task, with NOISE turns, images beside the JSON."""
    from models.zoo import shapes

    return shapes.export_sharegpt(shapes.generate(n, seed=0, noise=shapes.TRAIN_NOISE), out_dir, name="shapes")


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> Path:
    return build_default_model(tmp_path_factory.mktemp("default_vlm"))


@pytest.fixture(scope="session")
def shapes_json(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data"))


wait_for = functools.partial(conftest_wait_for, timeout=120.0, step=0.1)  # training takes its time


def lora_b_norm(adapter_dir: Path) -> float:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return sum(float(w.float().norm()) for name, w in weights.items() if "lora_B" in name)


def test_a_three_step_lora_run_writes_an_adapter_and_metrics(manager, default_model, shapes_json):
    config = {"dataset": str(shapes_json), "max_steps": 3, "hsa": True, "base_model": str(default_model),
              "eval_split": 0.25, "lora_r": 4, "lora_alpha": 8}
    run = manager.wait(manager.submit(config, name="three steps").id, timeout=300)
    assert run.status == SUCCEEDED, run.error
    adapter = run.output_dir / "adapter"
    # LoRA's B matrices start at zero; three optimizer steps move them
    assert lora_b_norm(adapter) > 0
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and not any("visual" in m for m in adapter_config["target_modules"])
    info = json.loads((adapter / "workbench_run.json").read_text())
    assert info["base_model"] == str(default_model) and info["hsa"] is True and info["global_step"] == 3
    metrics = manager.metrics(run.id)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert m["loss"] > 0 and m["learning_rate"] > 0 and m["grad_norm"] >= 0 and m["tokens_per_s"] > 0
    assert any("eval_loss" in m for m in metrics)
    assert (run.output_dir / "checkpoint-3" / "optimizer.pt").exists()
    assert "attention=hsa" in manager.log_tail(run.id)


def test_qlora_4bit_trains_on_cpu(manager, default_model, shapes_json):
    config = {"dataset": str(shapes_json), "max_steps": 2, "hsa": True, "base_model": str(default_model),
              "quantization": "4bit", "lora_r": 4}
    run = manager.wait(manager.submit(config).id, timeout=300)
    assert run.status == SUCCEEDED, run.error
    assert "quantization=4bit" in manager.log_tail(run.id)
    assert lora_b_norm(run.output_dir / "adapter") > 0
    assert [m["step"] for m in manager.metrics(run.id) if "loss" in m] == [1, 2]


def test_qlora_loads_nf4_double_quantized_weights_with_lora_on_top(default_model, tmp_path):
    import bitsandbytes as bnb

    from workbench.train import parse_config
    from workbench.train.run import load_model

    config = parse_config({"dataset": "d.json", "base_model": str(default_model), "quantization": "4bit"},
                          base_dir=tmp_path)
    model = load_model(config)
    q_proj = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_type == "nf4" and q_proj.base_layer.weight.quant_state.nested
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_training_and_chat_quantize_with_the_same_config(default_model, tmp_path):
    """One BitsAndBytesConfig (models.vlm.loading.bnb_config): the vision tower, projector and head stay in
    full precision whether a model is quantized for a run or for the Chat tab."""
    import torch

    from models.vlm.loading import UNQUANTIZED_MODULES, bnb_config
    from workbench.train import parse_config
    from workbench.train.run import quantization_config

    for kind in ("4bit", "8bit"):
        config = parse_config({"dataset": "d.json", "base_model": str(default_model), "quantization": kind,
                               "dtype": "float32"}, base_dir=tmp_path)
        assert quantization_config(config).to_dict() == bnb_config(kind, torch.float32).to_dict()
        assert bnb_config(kind, torch.float32).llm_int8_skip_modules == UNQUANTIZED_MODULES
    assert quantization_config(parse_config({"dataset": "d.json"}, base_dir=tmp_path)) is None


def test_ddp_on_two_cpu_processes(manager, default_model, shapes_json):
    config = {"dataset": str(shapes_json), "max_steps": 2, "hsa": True, "base_model": str(default_model),
              "batch_size": 2, "lora_r": 4}
    run = manager.submit(config, nproc=2)
    assert "torch.distributed.run" in run.command and "--nproc_per_node=2" in run.command
    run = manager.wait(run.id, timeout=400)
    assert run.status == SUCCEEDED, run.error
    steps = [m for m in manager.metrics(run.id) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]  # one writer: rank 0
    # 2 processes x batch 2 = 4 conversations per step out of 12: each step is a third of an epoch
    assert steps[0]["epoch"] == pytest.approx(4 / 12, abs=1e-3)
    assert (run.output_dir / "adapter" / "adapter_model.safetensors").exists()


def test_cancel_mid_run_then_resume_from_the_last_checkpoint(manager, default_model, shapes_json):
    config = {"dataset": str(shapes_json), "max_steps": 100000, "save_steps": 2, "hsa": True,
              "base_model": str(default_model), "lora_r": 4}
    run = manager.submit(config)
    wait_for(lambda: manager.tick() or any(m.get("step", 0) >= 5 for m in manager.metrics(run.id)), timeout=240)
    assert manager.get(run.id).status == RUNNING
    manager.cancel(run.id)
    run = manager.wait(run.id, timeout=60)
    assert run.status == CANCELLED and group_members(run.pgid) == []
    # a cancel that lands while a checkpoint is being saved leaves it unfinished: resume skips it
    (run.output_dir / "checkpoint-999999").mkdir()
    resumed_from = max(int(p.name.split("-")[1]) for p in run.output_dir.glob("checkpoint-*")
                       if (p / "trainer_state.json").is_file())
    last = run.output_dir / f"checkpoint-{resumed_from}"
    assert resumed_from >= 4

    seen = len(manager.metrics(run.id))
    run = manager.resume(run.id)
    assert run.config["resume"] is True and run.attempts == 2
    wait_for(lambda: manager.tick() or manager.get(run.id).status in FINISHED
             or len([m for m in manager.metrics(run.id)[seen:] if "loss" in m]) >= 2, timeout=240)
    assert manager.get(run.id).status == RUNNING, manager.log_tail(run.id)
    manager.cancel(run.id)
    assert manager.wait(run.id, timeout=60).status == CANCELLED
    after = [m["step"] for m in manager.metrics(run.id)[seen:] if "loss" in m]
    assert after[0] == resumed_from + 1  # continued, not restarted
    assert f"resume: from {last}" in manager.log_tail(run.id, max_lines=2000)


def test_cancel_saves_a_checkpoint_that_resume_continues_from(manager, default_model, shapes_json):
    """No periodic checkpoint at all (save_steps far away): the cancel itself leaves one after the step
    it interrupted, so Resume continues instead of starting over."""
    config = {"dataset": str(shapes_json), "max_steps": 100000, "save_steps": 100000, "hsa": True,
              "base_model": str(default_model), "lora_r": 4}
    run = manager.submit(config)
    wait_for(lambda: manager.tick() or any(m.get("step", 0) >= 3 for m in manager.metrics(run.id)), timeout=240)
    manager.cancel(run.id)
    run = manager.wait(run.id, timeout=60)
    assert run.status == CANCELLED and group_members(run.pgid) == []
    saved = [int(p.name.split("-")[1]) for p in run.output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    assert len(saved) == 1 and saved[0] >= 3, manager.log_tail(run.id)
    assert "cancel: saving a checkpoint" in manager.log_tail(run.id, max_lines=2000)
    seen = len(manager.metrics(run.id))
    manager.resume(run.id)
    wait_for(lambda: manager.tick() or manager.get(run.id).status in FINISHED
             or len([m for m in manager.metrics(run.id)[seen:] if "loss" in m]) >= 1, timeout=240)
    manager.cancel(run.id)
    manager.wait(run.id, timeout=60)
    after = [m["step"] for m in manager.metrics(run.id)[seen:] if "loss" in m]
    assert after and after[0] == saved[0] + 1  # continued from the cancel's checkpoint


def png_with_garbled_pixels(path) -> None:
    """A PNG whose chunks are whole (header, CRCs: PIL's verify passes it, so the config check does) but
    whose pixel data does not inflate: it fails only when a batch decodes it, mid-run."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 56, 56, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b"this is not deflate data" * 4) + chunk(b"IEND", b""))


def test_a_crashing_run_ends_failed_with_the_error(manager, default_model, tmp_path):
    png_with_garbled_pixels(tmp_path / "broken.png")  # found, and it passes the check, but unreadable mid-run
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "<image> what is this?"}, {"from": "gpt", "value": "x"}],
         "images": ["broken.png"]},
    ]))
    run = manager.wait(manager.submit({"dataset": str(data), "max_steps": 3, "base_model": str(default_model)}).id,
                       timeout=300)
    assert run.status == FAILED and run.exit_code == 1
    assert "AlignError" in run.error and "image 0 cannot be read" in run.error


def test_a_record_training_cannot_read_is_refused_before_the_run_starts(manager, default_model, tmp_path):
    """Issue 19.12: it used to crash the run (AlignError after the model had loaded)."""
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "<image> what is this?"}, {"from": "gpt", "value": "x"}]},
    ]))
    run = manager.wait(manager.submit({"dataset": str(data), "max_steps": 3, "base_model": str(default_model)}).id,
                       timeout=300)
    assert run.status == FAILED and run.exit_code == 2 and "Traceback" not in run.error
    assert "record 1" in run.error and "placeholder" in run.error


def test_a_run_with_a_bad_config_key_fails_naming_it(manager, tmp_path):
    run = manager.wait(manager.submit({"dataset": "d.json", "max_stepz": 3}).id, timeout=120)
    assert run.status == FAILED and run.exit_code == 2
    assert "unknown key 'max_stepz'" in run.error and "did you mean 'max_steps'" in run.error


def test_sigkill_of_torchrun_mid_ddp_training_leaves_no_rank_and_no_late_adapter(manager, default_model, shapes_json):
    """Issue 19.8 with the real trainer: torchrun killed while its two ranks train; the ranks (each in a
    session of its own) end before the run is marked failed, and nothing is saved afterwards."""
    import os
    import signal
    import time

    import psutil

    from workbench.jobs.processes import run_marker, run_processes

    config = {"dataset": str(shapes_json), "max_steps": 100000, "save_steps": 100000, "hsa": True,
              "base_model": str(default_model), "batch_size": 1, "lora_r": 4}
    run = manager.submit(config, nproc=2)
    marker = run_marker(run.pid, run.proc_start)
    wait_for(lambda: manager.tick() or any(m.get("step", 0) >= 2 for m in manager.metrics(run.id)), timeout=400)
    ranks = [p.pid for p in psutil.process_iter() if p.pid in run_processes(run.pgid, marker)
             and os.getpgid(p.pid) != run.pgid]
    assert len(ranks) == 2, manager.log_tail(run.id)  # the two ranks, outside the run's group
    launcher = [p for p in psutil.Process(run.pid).children() if "torch.distributed.run" in " ".join(p.cmdline())]
    launcher[0].send_signal(signal.SIGKILL)
    run = manager.wait(run.id, timeout=120)
    assert run.status == FAILED and "SIGKILL" in run.error
    assert run_processes(run.pgid, marker) == []
    before = sorted(str(p) for p in run.output_dir.rglob("*"))
    time.sleep(3)
    assert sorted(str(p) for p in run.output_dir.rglob("*")) == before and not (run.output_dir / "adapter").exists()
