"""Training one config: data -> records aligned once (workbench.train.data) -> model (attn_implementation
"hsa" or "sdpa", LoRA / QLoRA / full) -> transformers Trainer, with metrics appended to metrics.jsonl as it goes.

The path of a labelled conversation: the dataset's records are validated up front, aligned once
(input_ids, labels, semantic_ids, image references; `workbench.train.data` keeps them on disk for the
next epoch, resume or run), padded per batch with their pixels by `data.PadCollator`, and the model's
attention reads `semantic_ids` from its keyword arguments (models.hsa). Works the same under
`torchrun` / `accelerate launch` (DDP: gloo on CPU, nccl on GPUs).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

# bitsandbytes (imported by peft) warns at import, on CPUs with AVX512-BF16, that the optional `kernels`
# package for its CPU 4-bit kernel is missing: noise in every run's log, whatever the run quantizes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

import models.hsa  # noqa: F401  (registers attn_implementation="hsa")
import models.hybrid  # noqa: F401  (registers the hsa_hybrid model type with the Auto classes)
from models.composed import PROJECTOR, freeze_for_align, projector_parameters
from models.vlm.processor import load_processor
from models.data.align import AlignError, normalize_record
from models.data.records import load_records as read_json_records

from . import data
from .config import DEFAULT_LORA_TARGETS, LORA_EXCLUDE, TrainConfig, scheduler_kwargs

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR, MODEL_DIR, MERGED_DIR = "adapter", "model", "merged"
RUN_INFO = "workbench_run.json"  # next to the adapter: what the Chat tab needs to load it
GATE_STATS = models.hybrid.prune.STATS_FILE  # a hybrid run's per-layer gate statistics, one line per log


# ---- data -------------------------------------------------------------------------------------

def load_records(config: TrainConfig) -> list:
    """The dataset's conversations, validated (an error names the record and the problem)."""
    if config.store_dataset is not None:
        return _store_records(config)
    path = Path(config.dataset)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    records = read_json_records(path)  # the one reader (models.data.records): JSON or JSONL, as the store reads
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of ShareGPT records")
    image_root = Path(config.image_root) if config.image_root else path.parent
    for index, record in enumerate(records):
        conv = normalize_record(record, index=index)
        for image in conv.images:
            if not (image_root / image).exists():
                raise AlignError(f"record {index}: image {image} not found under {image_root}")
    return records


def _store_records(config: TrainConfig) -> list:
    from workbench.store.db import Store

    db = config.store_db or os.environ.get("WORKBENCH_DB", "")
    if not db:
        raise ValueError(f"dataset {config.dataset!r} is in the annotation store, but no store_db was given")
    with Store(db) as store:
        # the main labels: in a dataset split among annotators, what a reviewer accepted
        ids = store.conversation_ids(config.store_dataset, status="reviewed" if config.reviewed_only else "all")
        conversations = [store.conversation(cid).as_conversation() for cid in ids]
    if not conversations:
        raise ValueError(f"store dataset {config.store_dataset!r} has no "
                         f"{'reviewed ' if config.reviewed_only else ''}conversations")
    return conversations


def split_records(records: list, eval_split: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of round(eval_split * n) records (at least one if eval_split > 0)."""
    if eval_split <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_split * len(records)))
    if n_eval >= len(records):
        raise ValueError(f"eval_split {eval_split} leaves no training records out of {len(records)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


# ---- model ------------------------------------------------------------------------------------

def compute_dtype(config: TrainConfig) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(config: TrainConfig):
    if config.quantization == "none":
        return None
    from models.vlm.loading import bnb_config

    return bnb_config(config.quantization, compute_dtype(config))


def load_model(config: TrainConfig):
    """The base model with HSA (or SDPA) attention, quantized if asked, with LoRA adapters attached."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = dict(attn_implementation="hsa" if config.hsa else "sdpa", dtype=compute_dtype(config))
    quant = quantization_config(config)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        model = AutoModelForImageTextToText.from_pretrained(config.base_model, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)  # a text-only model
    model.config.use_cache = False  # a KV cache is for generation; it only costs memory in training
    model.config.get_text_config().use_cache = False  # (a VLM's language model reads its own config)
    if not config.hsa and padding_free_positions(model, config) is not None:
        # without semantic_ids the "hsa" implementation is SDPA, except that it attends record by record in
        # padding-free batches where SDPA would compute the whole row's block-diagonal mask
        model.set_attn_implementation(models.hsa.IMPLEMENTATION)

    if config.stage == "align":  # a composed VLM's projector alone; the vision tower and the LM stay frozen
        freeze_for_align(model)
        return model
    if config.finetuning == "full":
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quant is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    # A composed VLM's projector is new to the language model: it trains in full beside the LoRA adapter
    # (peft saves it with the adapter), as in LLaVA's fine-tuning stage.
    full = [PROJECTOR] if config.train_projector and projector_parameters(model) else None
    targets = config.lora_target
    if has_gates(model) and targets == DEFAULT_LORA_TARGETS:
        targets = models.hybrid.default_lora_targets(model)  # adds the Mamba in_proj and the gate, by full name
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, exclude_modules=LORA_EXCLUDE, modules_to_save=full,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def has_gates(model) -> bool:
    """Whether the model holds a Mamba+attention hybrid (fusion gates to watch and regularize)."""
    try:
        models.hybrid.hybrid_base(model)
    except ValueError:
        return False
    return True


class GateTrainer(Trainer):
    """The Trainer, plus a hybrid's fusion gates: their regularizers join the loss, and per-layer gate
    statistics of the training batches are written at every log to gate_stats.jsonl (what the Train
    tab plots and `python -m models.hybrid plan` reads); the regularizers' values go to the metrics."""

    def __init__(self, *args, train_config: TrainConfig, stats_path: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config, self.stats_path = train_config, stats_path
        self.monitor = models.hybrid.GateMonitor(self.model)
        self._sums: dict[str, float] = {}
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        c = self.train_config
        self.monitor.attention_mask, self.monitor.keep_values = inputs.get("attention_mask"), True
        with self.monitor:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        gates, mask = self.monitor.values, inputs.get("attention_mask")
        if gates:
            balance = models.hybrid.load_balance_loss(gates, c.gate_balance_target, mask)
            entropy = models.hybrid.gate_entropy(gates, mask)
            entropy_on = c.gate_entropy_steps == 0 or self.state.global_step < c.gate_entropy_steps
            loss = loss + c.gate_balance_weight * balance - (c.gate_entropy_weight * entropy if entropy_on else 0.0)
            for name, value in (("gate_balance", balance), ("gate_entropy", entropy)):
                self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
            self._count += 1
        self.monitor.values = {}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs and self._count:
            logs.update({name: total / self._count for name, total in self._sums.items()})
            if self.is_world_process_zero():
                with open(self.stats_path, "a") as f:
                    f.write(json.dumps({"step": self.state.global_step, "layers": self.monitor.stats()}) + "\n")
            self.monitor.reset()
            self._sums, self._count = {}, 0
        super().log(logs, *args, **kwargs)


# ---- metrics ----------------------------------------------------------------------------------

class MetricsCallback(TrainerCallback):
    """Appends one JSON line per log to metrics.jsonl (rank 0 only): step, epoch, loss, learning
    rate, grad norm, tokens/s and samples/s since the previous log, eval loss when evaluated."""

    FIELDS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss",
              "train_loss": "train_loss", "gate_balance": "gate_balance", "gate_entropy": "gate_entropy"}

    def __init__(self, path: Path, samples_per_step: int):
        self.path = Path(path)
        self.samples_per_step = samples_per_step
        self._last = None  # (time, tokens seen, step) at the previous training log

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": time.time()}
        record.update({name: float(logs[key]) for key, name in self.FIELDS.items() if key in logs})
        if "train_loss" in logs:  # the end-of-training summary
            record["train_runtime"] = float(logs.get("train_runtime", 0.0))
        if "loss" in logs and self._last is not None:
            now, tokens, step = time.perf_counter(), state.num_input_tokens_seen, state.global_step
            elapsed = now - self._last[0]
            if elapsed > 0 and step > self._last[2]:
                record["tokens_per_s"] = (tokens - self._last[1]) / elapsed
                record["samples_per_s"] = (step - self._last[2]) * self.samples_per_step / elapsed
            self._last = (now, tokens, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                         if k not in ("time", "epoch"))
        print(f"[metrics] {shown}", flush=True)


class SaveOnCancel(TrainerCallback):
    """Cancelling a run (SIGTERM to its process group) ends it after the current step with a checkpoint,
    within the run manager's grace period, so that Resume continues from there."""

    def __init__(self):
        self.asked = False

    def install(self) -> "SaveOnCancel":
        import signal

        signal.signal(signal.SIGTERM, self.ask)
        return self

    def ask(self, *_):
        self.asked = True
        print("cancel: saving a checkpoint after this step, then stopping", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.asked:
            control.should_save = True
            control.should_training_stop = True
        return control


# ---- the run ----------------------------------------------------------------------------------

def training_steps(config: TrainConfig, n_train: int) -> int:
    """The optimizer steps the Trainer will take (as it counts them): max_steps, else epochs of batches."""
    if config.max_steps > 0:
        return config.max_steps
    world = int(os.environ.get("WORLD_SIZE", 1))
    batches = -(-n_train // (config.batch_size * world))
    return math.ceil(config.epochs * max(1, batches // config.grad_accum))


def dataloader_workers(config: TrainConfig) -> int:
    return data.default_workers() if config.dataloader_num_workers < 0 else config.dataloader_num_workers


def padding_free_positions(model, config: TrainConfig):
    """`data.record_positions` for this run's model where padding-free batches apply: on the CPU (the GPU's
    FlexAttention path builds its block mask from roles and padding, not from the model's mask of packed records),
    unless the config asks for padded batches (`padding_free: false`)."""
    if not config.padding_free or torch.cuda.is_available():
        return None
    return data.record_positions(model)


def training_arguments(config: TrainConfig, has_eval: bool, n_train: int = 0,
                       padding_free: bool = False) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    workers = dataloader_workers(config)
    dtype = compute_dtype(config)
    evaluate_every = has_eval and config.eval_steps > 0
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup,
        lr_scheduler_kwargs=scheduler_kwargs(config, training_steps(config, n_train)),
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs, max_steps=config.max_steps,
        logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluate_every else "no", eval_steps=config.eval_steps if evaluate_every else None,
        seed=config.seed, data_seed=config.seed,
        bf16=dtype == torch.bfloat16 and cuda and config.quantization == "none",
        fp16=dtype == torch.float16 and cuda and config.quantization == "none",
        use_cpu=not cuda, ddp_backend="gloo" if distributed and not cuda else None, ddp_find_unused_parameters=False,
        gradient_checkpointing=False,  # enabled on the model by load_model, with peft's input hook
        include_num_input_tokens_seen="all" if padding_free else "non_padding",  # (no attention mask, no padding)
        remove_unused_columns=False,  # the dataset yields aligned records for the collator
        dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0, dataloader_pin_memory=cuda,
        report_to="none", disable_tqdm=True,  # metrics lines in the log instead of redrawn bars
    )


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest checkpoint that was written to the end: a run cancelled or killed while saving
    leaves a checkpoint directory without its trainer state, which the Trainer cannot resume from."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"),
                         key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for checkpoint in reversed(checkpoints):
        if (checkpoint / "trainer_state.json").is_file():
            return str(checkpoint)
        print(f"resume: skipping {checkpoint.name}, which was not written to the end", flush=True)
    return None


def checkpoint_to_resume(config: TrainConfig) -> str | None:
    if config.resume is True:
        last = last_complete_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        if last is None:
            print(f"resume: no checkpoint in {config.output_dir}; starting from the beginning", flush=True)
        else:
            print(f"resume: from {last}", flush=True)
        return last
    if isinstance(config.resume, str):
        if not Path(config.resume).is_dir():
            raise FileNotFoundError(f"resume: checkpoint {config.resume} does not exist")
        return config.resume
    return None


def prepare_run(config: TrainConfig) -> tuple[Path, bool]:
    """What every kind of run does first: its output folder made, the config written there (rank 0), the
    seed and the thread count set. Returns (output folder, whether this process is rank 0)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    return out, rank0



def fit(trainer, config: TrainConfig, cancel: "SaveOnCancel", has_eval: bool):
    """Train (from the checkpoint to resume, if any), then evaluate. A cancel has saved a checkpoint by
    the time `train` returns: say where Resume goes on and exit 143, the run manager's 'cancelled'."""
    trainer.remove_callback(PrinterCallback)  # the metrics callback prints one line per log instead
    result = trainer.train(resume_from_checkpoint=checkpoint_to_resume(config))
    if cancel.asked:
        print(f"cancelled at step {trainer.state.global_step}; Resume continues from "
              f"{last_complete_checkpoint(Path(config.output_dir)) or 'the beginning'}", flush=True)
        raise SystemExit(143)
    if has_eval:
        trainer.evaluate()
    return result

def train(config: TrainConfig) -> dict:
    """Run one training; returns a summary (also written to output_dir/train_summary.json)."""
    out, rank0 = prepare_run(config)

    records = load_records(config)
    processor = load_processor(config.base_model)
    prepared = data.prepare(records, processor, image_root=config.image_root or None, max_length=config.max_length,
                            cache_dir=config.cache_dir or None)
    print(f"data: {len(records)} conversations {prepared.source} in {prepared.seconds:.2f} s"
          + (f" ({prepared.path})" if prepared.path else ""), flush=True)
    train_items, eval_items = split_records(prepared.items, config.eval_split, config.seed)
    print(f"data: {len(train_items)} training and {len(eval_items)} eval conversations from {config.dataset}; "
          f"torch threads {torch.get_num_threads()}, data workers {dataloader_workers(config)}", flush=True)
    model = load_model(config)
    if hasattr(model, "print_trainable_parameters") and rank0:
        model.print_trainable_parameters()
    print(f"model: {config.base_model} attention={'hsa' if config.hsa else 'sdpa'} "
          f"finetuning={config.finetuning} quantization={config.quantization}", flush=True)

    positions = padding_free_positions(model, config)
    print(f"data: {'padding-free batches (records one after another, attention within each)' if positions else 'padded batches'}",
          flush=True)
    args = training_arguments(config, has_eval=bool(eval_items), n_train=len(train_items),
                              padding_free=positions is not None)
    world = int(os.environ.get("WORLD_SIZE", 1))
    gated = has_gates(model)
    extra = dict(train_config=config, stats_path=out / GATE_STATS) if gated else {}
    trainer = (GateTrainer if gated else Trainer)(
        model=model, args=args, **extra,
        train_dataset=data.AlignedRecords(train_items),
        eval_dataset=data.AlignedRecords(eval_items) if eval_items else None,
        data_collator=data.PadCollator(processor, image_root=config.image_root or None, hsa=config.hsa,
                                       positions=positions),
        callbacks=[MetricsCallback(out / METRICS_FILE, config.batch_size * config.grad_accum * world),
                   (cancel := SaveOnCancel().install())],
    )
    result = fit(trainer, config, cancel, has_eval=bool(eval_items))

    lora = config.stage == "sft" and config.finetuning == "lora"
    target = out / (ADAPTER_DIR if lora else MODEL_DIR)
    trainer.save_model(str(target))
    summary = {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
               "saved": str(target), "base_model": config.base_model, "hsa": config.hsa, "stage": config.stage,
               "finetuning": config.finetuning if config.stage == "sft" else "projector",
               "quantization": config.quantization}
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(target))
        if not lora:
            _record_hsa(target, config.hsa)
        (target / RUN_INFO).write_text(json.dumps(summary, indent=2))
        if lora and config.merge:
            del trainer, model  # the merge loads the base afresh in full precision
            summary["merged"] = str(merge_run_adapter(out))
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {summary['finetuning']} weights to {target}", flush=True)
    return summary


def _record_hsa(model_dir: Path, hsa: bool) -> None:
    """config.hsa_trained of a saved full model: models.vlm picks its attention default from it."""
    config_file = model_dir / "config.json"
    data = json.loads(config_file.read_text())
    data["hsa_trained"] = hsa
    config_file.write_text(json.dumps(data, indent=2))


def merge_run_adapter(run_dir: Path) -> Path:
    """run_dir/adapter folded into its base: a plain checkpoint in run_dir/merged (what the Train tab's
    Merge button and the config's `merge` do)."""
    from models.vlm import merge_adapter

    target = Path(run_dir) / MERGED_DIR
    print(f"merging the adapter into its base: {target}", flush=True)
    return merge_adapter(Path(run_dir) / ADAPTER_DIR, target)
