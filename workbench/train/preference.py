"""Preference alignment (`"method": "dpo"` or `"nca"`): pairs -> PairCollator -> TRL's DPOTrainer.

The pairs are LLaMA-Factory's ranking records (workbench.pairs), from a file or a store dataset whose
records carry `chosen` and `rejected`. Each pair is aligned twice (the prompt with each answer) by the
same code as SFT, so `semantic_ids` cover the prompt and both answers and HSA applies as in SFT; TRL's
trainer passes every batch key it does not know (semantic_ids, pixel_values, image_grid_thw) on to the
model, for the policy and the reference alike. The losses are TRL's (trl/trainer/dpo_trainer.py):

    DPO (loss_type "sigmoid"):  -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
    NCA (loss_type "nca_pair"): -log sigmoid(rc) - 0.5 log sigmoid(-rc) - 0.5 log sigmoid(-rr),
                                rc = beta * (log pi(c) - log ref(c)), rr = beta * (log pi(r) - log ref(r))

The reference is the base model: with LoRA, the same model with its adapter disabled ("base"), or a
frozen copy loaded beside it ("copy", also what full fine-tuning uses). Rewards (beta x log-ratio) of the
chosen and rejected answers, their margin and how often chosen wins go to metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import os

from transformers import TrainingArguments

from models.vlm.processor import load_processor
from models.data.align import AlignError
from workbench.pairs import PairCollator, is_pair, split_pair

from . import run
from .config import TrainConfig

LOSS_TYPES = {"dpo": "sigmoid", "nca": "nca_pair"}  # TRL's names
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def load_pairs(config: TrainConfig) -> list[dict]:
    """The dataset's preference pairs, validated (an error names the record and the problem). A store
    dataset's conversation is the prompt; its chosen and rejected answers ride in its extra fields."""
    if config.store_dataset is None:
        records = run.load_records(config)
    else:
        records = _store_pairs(config)
    for index, record in enumerate(records):
        if not is_pair(record):
            raise AlignError(f"record {index}: not a preference pair (method {config.method!r} needs "
                             "'chosen' and 'rejected' answers)")
        split_pair(record, index=index)
    return records


def _store_pairs(config: TrainConfig) -> list[dict]:
    from workbench.store.db import Store
    from workbench.store.io import conversation_record

    db = config.store_db or os.environ.get("WORKBENCH_DB", "")
    if not db:
        raise ValueError(f"dataset {config.dataset!r} is in the annotation store, but no store_db was given")
    with Store(db) as store:
        convs = [store.conversation(cid) for cid in store.conversation_ids(config.store_dataset)]
    if not convs:
        raise ValueError(f"store dataset {config.store_dataset!r} has no conversations")
    return [conversation_record(conv, [str(p) for p in conv.images]) for conv in convs]


class IndexedPairs:
    """TRL wants a `datasets.Dataset`; it holds record numbers, and this collator looks the records up."""

    def __init__(self, records: list, inner: PairCollator):
        self.records, self.inner = records, inner

    def __call__(self, items) -> dict:
        return self.inner([self.records[item["index"]] for item in items])


def _dataset(indices):
    from datasets import Dataset

    return Dataset.from_dict({"index": list(indices)})


def dpo_arguments(config: TrainConfig, has_eval: bool):
    """The SFT run's TrainingArguments (workbench.train.run.training_arguments) as TRL's DPOConfig, plus
    the loss, beta and what TRL must leave to this collator."""
    from trl import DPOConfig

    base = run.training_arguments(config, has_eval)
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    values = {k: v for k, v in base.to_dict().items() if k in names and not k.startswith("_")}
    values.update(beta=config.beta, loss_type=[LOSS_TYPES[config.method]], max_length=None,
                  precompute_ref_log_probs=False, remove_unused_columns=False, gradient_checkpointing=False)
    return DPOConfig(**values)


def _trainer_class():
    from trl import DPOTrainer

    class PairTrainer(DPOTrainer):
        """DPOTrainer on batches PairCollator makes: TRL's own tokenization of the dataset is skipped."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    return PairTrainer


class PreferenceMetrics(run.MetricsCallback):
    """The SFT metrics plus the rewards: rewards/chosen, rewards/rejected, rewards/margins (chosen minus
    rejected) and rewards/accuracies (the share of pairs whose chosen reward is higher), eval_ ones too."""

    FIELDS = {**run.MetricsCallback.FIELDS, **{k: k for k in REWARD_KEYS},
              **{f"eval_{k}": f"eval_{k}" for k in REWARD_KEYS}}


def load_reference(config: TrainConfig):
    """A frozen copy of the base model (the reference "copy", and the reference of full fine-tuning)."""
    frozen = config.model_copy(update={"finetuning": "full", "gradient_checkpointing": False})
    model = run.load_model(frozen)
    model.eval()
    model.requires_grad_(False)
    return model


def train(config: TrainConfig) -> dict:
    """One DPO / NCA run; returns a summary (also written to output_dir/train_summary.json)."""
    out, rank0 = run.prepare_run(config)  # the threads key applies here too

    records = load_pairs(config)
    train_records, eval_records = run.split_records(records, config.eval_split, config.seed)
    print(f"data: {len(train_records)} training and {len(eval_records)} eval preference pairs from {config.dataset}",
          flush=True)
    processor = load_processor(config.base_model)
    model = run.load_model(config)
    lora = config.finetuning == "lora"
    ref_model = load_reference(config) if config.reference == "copy" or not lora else None
    if hasattr(model, "print_trainable_parameters") and rank0:
        model.print_trainable_parameters()
    print(f"model: {config.base_model} method={config.method} beta={config.beta} "
          f"reference={'a frozen copy' if ref_model is not None else 'the base (adapter disabled)'} "
          f"attention={'hsa' if config.hsa else 'sdpa'} finetuning={config.finetuning} "
          f"quantization={config.quantization}", flush=True)

    world = int(os.environ.get("WORLD_SIZE", 1))
    pairs = PairCollator(processor, image_root=config.image_root or None, max_length=config.max_length, hsa=config.hsa)
    n_train = len(train_records)  # the datasets hold numbers into train_records + eval_records
    trainer = _trainer_class()(
        model=model, ref_model=ref_model, args=dpo_arguments(config, has_eval=bool(eval_records)),
        processing_class=processor, train_dataset=_dataset(range(n_train)),
        eval_dataset=_dataset(range(n_train, n_train + len(eval_records))) if eval_records else None,
        data_collator=IndexedPairs(train_records + eval_records, pairs),
        callbacks=[PreferenceMetrics(out / run.METRICS_FILE, config.batch_size * config.grad_accum * world),
                   (cancel := run.SaveOnCancel().install())],
    )
    result = run.fit(trainer, config, cancel, has_eval=bool(eval_records))

    target = out / (run.ADAPTER_DIR if lora else run.MODEL_DIR)
    trainer.save_model(str(target))
    summary = {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
               "saved": str(target), "base_model": config.base_model, "hsa": config.hsa, "stage": config.stage,
               "method": config.method, "beta": config.beta, "finetuning": config.finetuning,
               "quantization": config.quantization}
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(target))
        if not lora:
            run._record_hsa(target, config.hsa)
        (target / run.RUN_INFO).write_text(json.dumps(summary, indent=2))
        if lora and config.merge:
            del trainer, model, ref_model
            summary["merged"] = str(run.merge_run_adapter(out))
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {config.method} {config.finetuning} weights to {target}", flush=True)
    return summary
