"""The training config: every key, its default, and the checks that run before anything starts.

`{"dataset": "data.json", "output_dir": "runs/x", "max_steps": 3, "hsa": true}` is complete; every
other key has a default. Unknown keys, values of the wrong type or out of range (NaN and infinities
included) and inconsistent combinations are refused with a message that names them, before a model
is loaded. The keys are a pydantic model (TrainConfig); check_inputs then reads what they point at.
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from models.zoo import DEFAULT_VLM_DIR as DEFAULT_MODEL
from workbench.paths import is_database_url
# The language model's projections (Llama/Qwen naming). The vision tower is excluded by
# LORA_EXCLUDE: Qwen2.5-VL's vision MLP reuses the names gate_proj/up_proj/down_proj.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_EXCLUDE = r".*(visual|vision_tower|vision_model|multi_modal_projector|mm_projector).*"
QUANTIZATIONS = ("none", "8bit", "4bit")
FINETUNING = ("lora", "full")
STAGES = ("align", "sft")  # models.composed.STAGES: align trains a composed VLM's projector alone
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The arguments each scheduler takes beyond warmup and the number of steps (transformers' get_scheduler),
# with their checks; what a scheduler needs and the config does not give is filled in by scheduler_kwargs.
_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
SCHEDULER_ARGS = {
    "linear": {}, "constant": {}, "constant_with_warmup": {},
    "cosine": {"num_cycles": ("a positive number", lambda v: _number(v) and v > 0)},
    "cosine_with_restarts": {"num_cycles": ("a whole number >= 1", lambda v: _integer(v) and v >= 1)},
    "polynomial": {"power": ("a positive number", lambda v: _number(v) and v > 0),
                   "lr_end": ("a number >= 0", lambda v: _number(v) and v >= 0)},
    "inverse_sqrt": {"timescale": ("a whole number >= 1", lambda v: _integer(v) and v >= 1)},
    "cosine_with_min_lr": {"min_lr": ("a number >= 0", lambda v: _number(v) and v >= 0),
                           "min_lr_rate": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
                           "num_cycles": ("a positive number", lambda v: _number(v) and v > 0)},
    "warmup_stable_decay": {"num_decay_steps": ("a whole number >= 0", lambda v: _integer(v) and v >= 0),
                            "num_stable_steps": ("a whole number >= 0", lambda v: _integer(v) and v >= 0),
                            "warmup_type": (f"one of {', '.join(_DECAY_SHAPES)}", lambda v: v in _DECAY_SHAPES),
                            "decay_type": (f"one of {', '.join(_DECAY_SHAPES)}", lambda v: v in _DECAY_SHAPES),
                            "min_lr_ratio": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
                            "num_cycles": ("a positive number", lambda v: _number(v) and v > 0)},
}
WSD_DECAY_FRACTION = 0.1  # warmup_stable_decay without num_decay_steps: the last 10% of the steps decay
STORE_PREFIX = "store:"
METHODS = ("sft", "dpo", "nca")  # dpo / nca: preference pairs, workbench.train.preference
REFERENCES = ("base", "copy")


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending keys."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(value):
    """An integral float (2.0) is the int it spells; anything else goes to the strict check as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class TrainConfig(BaseModel):
    """Every key of a run's config: its type (strict: "4" is not an int, 1 is not a bool; 2.0 is the
    int 2 and 1 the float 1.0), its default and its range. Unknown keys are refused (extra="forbid")."""
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str                                  # a ShareGPT / LLaMA-Factory .json/.jsonl file, or "store:NAME"
    output_dir: str = ""                          # default: runs/<dataset name>
    base_model: str = str(DEFAULT_MODEL)          # a local directory or a hub id
    store_db: str = ""                            # the annotation database, for "store:NAME" datasets
    reviewed_only: bool = False                   # store:NAME: only the conversations a reviewer accepted (Team tab)
    image_root: str = ""                          # where relative image paths resolve; default: the dataset's folder
    stage: Literal[STAGES] = "sft"                # "sft": conversations; "align": a composed VLM's projector alone
    finetuning: Literal[FINETUNING] = "lora"      # "lora" or "full" (stage "sft")
    train_projector: bool = True                  # a composed VLM's projector trains in full beside LoRA
    merge: bool = False                           # after LoRA: merge_and_unload into a plain checkpoint, merged/
    lora_r: Int = Field(16, ge=1)
    lora_alpha: Int = Field(32, ge=1)
    lora_dropout: Finite = Field(0.05, ge=0, lt=1)
    lora_target: list[str] | str = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    quantization: Literal[QUANTIZATIONS] = "none"  # "none", "8bit", "4bit" (NF4 + double quantization: QLoRA)
    learning_rate: Finite = Field(2e-4, gt=0)
    lr_scheduler: Literal[SCHEDULERS] = "cosine"
    lr_scheduler_kwargs: dict = Field(default_factory=dict)  # the scheduler's own arguments (SCHEDULER_ARGS)
    warmup: int | float = 0.0                     # an int: steps; a float in [0, 1): a fraction of all steps
    epochs: Finite = 1.0
    max_steps: Int = -1                           # > 0 overrides epochs
    batch_size: Int = Field(1, ge=1)              # per device
    grad_accum: Int = Field(1, ge=1)
    max_length: Int = Field(1024, ge=1)
    hsa: bool = True                              # train under the HSA mask (attn_implementation="hsa")
    seed: Int = Field(42, ge=0, le=2 ** 32 - 1)   # numpy's range
    eval_split: Finite = Field(0.0, ge=0, lt=1)   # fraction of the records held out for eval loss
    eval_steps: Int = Field(0, ge=0)              # evaluate every N steps; 0: once, at the end
    logging_steps: Int = Field(1, ge=1)
    save_steps: Int = Field(50, ge=1)             # checkpoint every N optimizer steps
    save_total_limit: Int = Field(2, ge=0)        # checkpoints kept; 0: all of them
    resume: bool | str = False                    # true: the last checkpoint in output_dir; or a checkpoint path
    dtype: Literal[DTYPES] = "auto"               # compute dtype: bf16 on GPUs that have it, else float32
    gradient_checkpointing: bool = False
    threads: Int = Field(0, ge=0)                 # torch threads of the run; 0: torch's default (OMP_NUM_THREADS)
    dataloader_num_workers: Int = Field(-1, ge=-1)  # processes loading batches; -1: chosen for the machine
    padding_free: bool = True                     # CPU, Qwen2-VL / Llama / Qwen2 / Qwen3: a batch's records in one
                                                  # row, no padding computed (same loss and gradients); false: padded
    cache_dir: str = ""                           # aligned records (workbench.train.data); "": ~/.cache/hsa-workbench
    weight_decay: Finite = Field(0.0, ge=0)
    max_grad_norm: Finite = Field(1.0, ge=0)      # 0: no clipping
    # A Mamba+attention hybrid's fusion gates (models.hybrid): regularizers added to the loss.
    gate_balance_weight: Finite = Field(0.0, ge=0)  # x (mean gate - gate_balance_target)^2, per layer
    gate_balance_target: Finite = Field(0.5, ge=0, le=1)  # a gate's mean
    gate_entropy_weight: Finite = Field(0.0, ge=0)  # x -(binary entropy of the gates): against early saturation
    gate_entropy_steps: Int = Field(0, ge=0)      # the entropy term only for the first N steps; 0: all steps
    # Preference alignment on pairs (chosen / rejected answers): DPO or NCA through TRL's DPOTrainer.
    method: Literal[METHODS] = "sft"              # "sft": conversations; "dpo" / "nca": preference pairs
    beta: Finite = Field(0.1, gt=0)               # dpo / nca: reward = beta x log(policy / reference)
    reference: Literal[REFERENCES] = "base"       # dpo / nca: "base" (the adapter disabled) or "copy" (a frozen copy)

    @field_validator("lora_target", mode="before")
    @classmethod
    def _lora_target(cls, value):
        if value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            return value
        if isinstance(value, str) and any(v.strip() for v in value.split(",")):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ValueError("lora_target must be a list of module names, a comma-separated string or 'all-linear'")

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, value):
        if isinstance(value, (bool, str)):
            return value
        raise ValueError("resume must be true/false or a checkpoint path")

    @field_validator("warmup", mode="before")
    @classmethod
    def _warmup(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"warmup must be a number of steps (int) or a fraction in [0, 1), got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"warmup must be a finite number, got {value}")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"warmup steps must be >= 0, got {value}")
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(f"warmup as a fraction must be in [0, 1), got {value} (an integer is a number of steps)")
        return value

    @field_validator("lr_scheduler_kwargs", mode="before")
    @classmethod
    def _lr_scheduler_kwargs(cls, value, info):
        if not isinstance(value, dict):
            raise ValueError(f"lr_scheduler_kwargs must be an object of the scheduler's arguments, got {value!r}")
        name = info.data.get("lr_scheduler")
        if name not in SCHEDULER_ARGS:
            return value  # the scheduler itself is refused
        allowed = SCHEDULER_ARGS[name]
        for key, item in value.items():
            if key not in allowed:
                takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
                raise ValueError(f"lr_scheduler_kwargs: {key!r} is not an argument of {name} ({takes})")
            what, ok = allowed[key]
            if not ok(item):
                raise ValueError(f"lr_scheduler_kwargs: {key} must be {what}, got {item!r}")
        if name == "cosine_with_min_lr" and {"min_lr", "min_lr_rate"} <= value.keys():
            raise ValueError("lr_scheduler_kwargs: give min_lr or min_lr_rate, not both")
        return value

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value):
        if value == 0 or value < -1:
            raise ValueError(f"max_steps must be a positive number of steps (or -1 to train for epochs), got {value}")
        return value

    def to_dict(self) -> dict:
        return self.model_dump()

    @property
    def store_dataset(self) -> str | None:
        return self.dataset[len(STORE_PREFIX):] if self.dataset.startswith(STORE_PREFIX) else None


KEYS = list(TrainConfig.model_fields)
_DEFAULTS = {name: info.get_default(call_default_factory=True) for name, info in TrainConfig.model_fields.items()
             if name != "dataset"}


def _problems(error: ValidationError) -> list[str]:
    """A ValidationError as one message per key, in the config's words."""
    unknown, by_key = [], {}
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else ""
        kind, value = item["type"], item.get("input")
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(key, KEYS, n=1)
            unknown.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if key in by_key:
            continue  # one message per key (a union reports each of its branches)
        if kind == "missing":
            by_key[key] = f"missing key {key!r}" + (" (a ShareGPT .json/.jsonl file or store:NAME)"
                                                    if key == "dataset" else "")
        elif kind == "value_error":
            by_key[key] = str(item["ctx"]["error"])
        elif kind == "literal_error":
            by_key[key] = f"{key} must be one of {', '.join(get_args(TrainConfig.model_fields[key].annotation))}, " \
                          f"got {value!r}"
        elif kind == "finite_number":
            by_key[key] = f"{key} must be a finite number, got {value!r}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            by_key[key] = f"{key} must be {_range(key)}, got {value!r}"
        else:  # a value of the wrong type
            by_key[key] = f"{key} must be {_type_name(key)}, got {value!r}"
    return unknown + [by_key[k] for k in KEYS if k in by_key]


def _type_name(key: str) -> str:
    annotation = TrainConfig.model_fields[key].annotation
    return getattr(annotation, "__name__", str(annotation))


def _range(key: str) -> str:
    """A field's bounds in words: 'positive', 'at least 1', '>= 0', 'in [0, 1)'."""
    bounds = {}
    for item in TrainConfig.model_fields[key].metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low == ("(", 0):
        return "positive"
    if low == ("[", 1):
        return "at least 1"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    return f"{'<=' if high[1] == ']' else '<'} {high[0]}"


def scheduler_kwargs(c: TrainConfig, num_training_steps: int) -> dict:
    """lr_scheduler_kwargs with what the scheduler needs and was not given: cosine_with_min_lr decays to a
    tenth of the learning rate (min_lr_rate 0.1), warmup_stable_decay decays over the last tenth of the
    steps (num_decay_steps)."""
    kwargs = dict(c.lr_scheduler_kwargs)
    if c.lr_scheduler == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"} & kwargs.keys():
        kwargs["min_lr_rate"] = 0.1
    if c.lr_scheduler == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = max(1, round(WSD_DECAY_FRACTION * num_training_steps))
    return kwargs


def defaults() -> dict:
    return json.loads(json.dumps(_DEFAULTS))


def parse_config(raw: dict, *, base_dir: Path | None = None) -> TrainConfig:
    """Check a config dict and fill in defaults. Relative paths resolve against base_dir (the
    working directory when None). Raises ConfigError naming every problem found."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a JSON/YAML object of keys, got {type(raw).__name__}")
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("; ".join(_problems(error))) from None
    problems: list[str] = []
    given = set(raw)
    _check_consistency(config, given, problems)
    if problems:
        raise ConfigError("; ".join(problems))
    config = _resolve_paths(config, Path(base_dir) if base_dir else Path.cwd())
    _check_projector(config, given, problems)
    _check_hybrid(config, given, problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def model_config(base_model: str) -> dict | None:
    """The base model's config.json as a dict, read without loading weights (a local directory, or a hub
    id already in the local cache); None when it cannot be read here."""
    local = Path(base_model) / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base_model, local_files_only=True).to_dict()
    except Exception:  # not cached, not a model id, ...: the run itself will say why
        return None


def has_projector(model_config: dict) -> bool:
    """A composed (LLaVA-style) VLM: a projector between its vision tower and its language model."""
    return "vision_feature_layer" in model_config or model_config.get("model_type") == "llava"


HYBRID_TYPE = "hsa_hybrid"  # models.hybrid.MODEL_TYPE (not imported here: checking a config loads no torch)
# peft refuses LoRA on a Mamba mixer's out_proj and conv1d for the Mamba types it knows (the fused
# kernel reads out_proj's weight directly); the hybrid is not in its list, so the rule is applied here.
MAMBA_NO_LORA = ("out_proj", "conv1d")


def is_hybrid(model_config: dict) -> bool:
    """A Mamba+attention hybrid language model, alone or inside a composed VLM."""
    text = model_config.get("text_config") or {}
    return HYBRID_TYPE in (model_config.get("model_type"), text.get("model_type"))


def _check_hybrid(c: TrainConfig, given: set[str], problems: list[str]) -> None:
    gate_keys = sorted(k for k in given if k.startswith("gate_") and
                       (getattr(c, k) != 0 if k.endswith("weight") else True))
    targets = c.lora_target if isinstance(c.lora_target, list) else []
    mamba_targets = sorted({t for t in targets for name in MAMBA_NO_LORA if t == name or t.endswith("." + name)})
    if not gate_keys and not mamba_targets:
        return
    found = model_config(c.base_model)
    if found is None:
        if gate_keys:
            problems.append(f"{', '.join(gate_keys)} need a hybrid model, but the config of base_model "
                            f"{c.base_model!r} cannot be read")
        return
    if gate_keys and not is_hybrid(found):
        problems.append(f"{', '.join(gate_keys)} given but base_model {c.base_model!r} has no fusion gates "
                        f"(it is a {found.get('model_type', 'model')}, not an {HYBRID_TYPE} hybrid)")
    if mamba_targets and is_hybrid(found):
        problems.append(f"lora_target {', '.join(mamba_targets)}: LoRA cannot wrap a Mamba mixer's "
                        f"{' or '.join(MAMBA_NO_LORA)} (the fused kernel reads their weights directly); "
                        "leave lora_target unset for the hybrid's default targets")


def _check_projector(c: TrainConfig, given: set[str], problems: list[str]) -> None:
    """Keys that need a projector are refused for a model without one (read from its config.json)."""
    wants = "stage 'align'" if c.stage == "align" else \
        "train_projector" if "train_projector" in given and c.train_projector else None
    if wants is None:
        return
    found = model_config(c.base_model)
    if found is None:
        problems.append(f"{wants} needs a composed VLM, but the config of base_model {c.base_model!r} cannot be read")
    elif not has_projector(found):
        problems.append(f"{wants} needs a composed (LLaVA) VLM with a projector; base_model {c.base_model!r} is a "
                        f"{found.get('model_type', 'model')} without one")


def _check_consistency(c: TrainConfig, given: set[str], problems: list[str]) -> None:
    def choice(key, allowed):
        if getattr(c, key) not in allowed:
            problems.append(f"{key} must be one of {', '.join(allowed)}, got {getattr(c, key)!r}")

    choice("stage", STAGES)
    choice("finetuning", FINETUNING)
    choice("quantization", QUANTIZATIONS)
    choice("lr_scheduler", SCHEDULERS)
    choice("dtype", DTYPES)
    if not c.dataset:
        problems.append("dataset is empty")
    if c.finetuning == "full":
        lora_keys = sorted(k for k in given if k.startswith("lora_"))
        if lora_keys:
            problems.append(f"{', '.join(lora_keys)} given but finetuning is 'full' (LoRA keys apply to 'lora')")
        if c.quantization != "none":
            problems.append(f"quantization {c.quantization!r} needs finetuning 'lora' (a quantized model "
                            "cannot be fully fine-tuned; that is what QLoRA is for)")
    if c.stage == "align":
        sft_only = sorted(k for k in given if k.startswith("lora_") or k in ("finetuning", "train_projector", "merge"))
        if sft_only:
            problems.append(f"{', '.join(sft_only)} given but stage is 'align', which trains the projector alone "
                            "(those keys apply to stage 'sft')")
        if c.quantization != "none":
            problems.append(f"quantization {c.quantization!r} given but stage 'align' trains the projector in full "
                            "precision")
    if c.merge and c.finetuning != "lora":
        problems.append("merge given but finetuning is 'full': merging folds a LoRA adapter into its base")
    if "epochs" in given and "max_steps" in given and c.max_steps > 0:
        problems.append("both epochs and max_steps given: give one (max_steps would override epochs)")
    if c.max_steps <= 0 and c.epochs <= 0:
        problems.append("epochs must be positive when max_steps is not given")
    if c.eval_steps and c.eval_split == 0:
        problems.append("eval_steps given but eval_split is 0: there is nothing to evaluate on")
    if c.method == "sft":
        pref_keys = sorted(k for k in given if k in ("beta", "reference"))
        if pref_keys:
            problems.append(f"{', '.join(pref_keys)} given but method is 'sft' (they apply to 'dpo' and 'nca')")
    else:
        if c.stage == "align":
            problems.append(f"method {c.method!r} needs stage 'sft' (stage 'align' trains a projector on captions)")
        gated = sorted(k for k in given if k.startswith("gate_"))
        if gated:
            problems.append(f"{', '.join(gated)} given but method is {c.method!r}: gate regularizers apply to 'sft'")
        if c.finetuning == "full" and "reference" in given and c.reference == "base":
            problems.append("reference 'base' disables a LoRA adapter, but finetuning is 'full': use reference 'copy'")
    if c.store_dataset is not None and not c.store_dataset:
        problems.append("dataset 'store:' names no dataset")
    if "store_db" in given and c.store_dataset is None:
        problems.append("store_db given but dataset is a file, not store:NAME")
    if c.reviewed_only and c.store_dataset is None:
        problems.append("reviewed_only needs a store:NAME dataset (a file has no reviews)")


def _resolve_paths(c: TrainConfig, base: Path) -> TrainConfig:
    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    if c.store_dataset is None:
        c.dataset = resolve(c.dataset)
        if not c.image_root:
            c.image_root = str(Path(c.dataset).parent)
    elif c.store_db and not is_database_url(c.store_db):  # a database URL (sqlite:///, postgresql://) stays as given
        c.store_db = resolve(c.store_db)
    if c.image_root:
        c.image_root = resolve(c.image_root)
    if not c.output_dir:
        name = c.store_dataset or Path(c.dataset).stem
        c.output_dir = str(Path("runs") / name)
    c.output_dir = resolve(c.output_dir)
    # an embedded model's name ("default", "composed"), a local directory given relatively, or a hub id
    from models.zoo import embedded_model

    c.base_model = str(embedded_model(c.base_model))
    base_model = Path(c.base_model).expanduser()
    if not base_model.is_absolute() and (base / base_model).exists():
        c.base_model = str((base / base_model).resolve())
    if isinstance(c.resume, str):
        c.resume = resolve(c.resume)
    return c


def load_config_file(path: Path) -> dict:
    """A config from .json or .yaml/.yml."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is an object of keys, got {type(raw).__name__}")
    return raw


def check_inputs(c: TrainConfig) -> None:
    """What a resolved config points at, checked before a run starts: the dataset file or store dataset,
    the base model (its config, read without its weights) and the LoRA targets among its modules.
    Raises ConfigError naming every problem found."""
    problems: list[str] = []
    if c.store_dataset is None:
        if not Path(c.dataset).exists():
            problems.append(f"dataset file {c.dataset} does not exist")
        else:
            _check_dataset_file(c, problems)
    else:
        _check_store_dataset(c, problems)
    found = model_config(c.base_model)
    if found is None:
        from models.vlm.hub import ModelNotFound, locate

        try:
            locate(c.base_model)  # a hub id that is not cached yet, with the hub reachable: the run downloads it
        except ModelNotFound as error:
            problems.append(f"base_model: {error}")
        else:
            if Path(c.base_model).exists():
                problems.append(f"base_model {c.base_model} has no readable config.json: not a model directory")
    elif c.stage == "sft" and c.finetuning == "lora" and c.lora_target != "all-linear":
        unmatched = unmatched_lora_targets(found, c.lora_target)
        if unmatched:
            problems.append(unmatched)
    if problems:
        raise ConfigError("; ".join(problems))


# what the run manager writes into a run's new folder before the run starts (workbench.jobs.manager)
MANAGER_FILES = ("run_config.json", "run.log")


def check_output_dir(c: TrainConfig, config_file: Path | None = None) -> None:
    """A new run writes only into a new or empty folder (or one holding just the run manager's files and
    this config file), never into another run's folder or a folder of other files; `resume` continues the
    run that is there. Raises ConfigError naming output_dir."""
    if c.resume is not False:
        return
    folder = Path(c.output_dir)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"output_dir {folder} is a file, not a folder")
    ours = set(MANAGER_FILES) | ({Path(config_file).name} if config_file and Path(config_file).resolve().parent
                                 == folder.resolve() else set())
    try:
        found = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    except OSError as error:
        raise ConfigError(f"output_dir {folder} cannot be read: {error}") from None
    if found:
        raise ConfigError(f"output_dir {folder} is not empty ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}): "
                          "a new run needs a new or empty folder, or resume: true to continue the run there")


def held_out(n_records: int, eval_split: float) -> int:
    """How many of n records an eval split holds out: round(eval_split * n), at least one when
    eval_split > 0 (as workbench.train.run.split_records does)."""
    return max(1, round(eval_split * n_records)) if eval_split > 0 else 0


def _check_eval_split(c: TrainConfig, n_records: int, problems: list[str]) -> None:
    n_eval = held_out(n_records, c.eval_split)
    if n_records and n_eval >= n_records:
        problems.append(f"eval_split {c.eval_split} holds out {n_eval} of the {n_records} records of the dataset: "
                        "none would be left to train on")


def _check_dataset_file(c: TrainConfig, problems: list[str]) -> None:
    """The dataset file is a dataset: JSON or JSONL records that training can read (turns, roles,
    spans, images present under image_root), with records left to train on after the eval split.
    The first few bad records are named."""
    from models.data.align import AlignError, normalize_record
    from models.data.records import FileError, load_records

    where = f"dataset {c.dataset}"
    try:
        records = load_records(c.dataset)
    except FileError as e:
        reason = str(e).removeprefix(f"{c.dataset}: ")
        problems.append(f"{where} is not a dataset: {reason}")
        return
    except (OSError, ValueError) as e:
        problems.append(f"{where} cannot be read: {e}")
        return
    if not records:
        problems.append(f"{where} holds no records: nothing to train on")
        return
    image_root = Path(c.image_root or Path(c.dataset).parent)
    bad, seen = [], {}
    for index, record in enumerate(records):
        try:
            conv = normalize_record(record, index=index)
            if c.method != "sft":  # a preference pair: the prompt and both answers
                from workbench.pairs import split_pair

                split_pair(record, index=index)
            missing = [image for image in conv.images if not (image_root / image).is_file()]
            if missing:
                bad.append(f"record {index}: image {missing[0]} not found under {image_root}")
            else:
                unreadable = next((f"{image} ({why})" for image in conv.images
                                   if (why := _unreadable_image(image_root / image, seen))), None)
                if unreadable:
                    bad.append(f"record {index}: image {unreadable}")
        except AlignError as e:
            bad.append(str(e))
        if len(bad) == 3:
            break
    if bad:
        problems.append(f"{where} is not a dataset training can read: " + "; ".join(bad)
                        + ("; ..." if len(bad) == 3 else ""))
    _check_eval_split(c, len(records), problems)


def _unreadable_image(path: Path, seen: dict) -> str:
    """'' when `path` is an image PIL can read (its header and structure: verify), else why not. Each
    file is looked at once however many records name it."""
    if path not in seen:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.verify()
            seen[path] = ""
        except Exception as error:  # noqa: BLE001 - PIL raises several kinds for a file that is not an image
            seen[path] = f"is not a readable image: {type(error).__name__}: {error}"[:200]
    return seen[path]


def _check_store_dataset(c: TrainConfig, problems: list[str]) -> None:
    import os

    db = c.store_db or os.environ.get("WORKBENCH_DB", "")
    if not db:
        problems.append(f"dataset {c.dataset!r} is in the annotation store, but no store_db was given")
        return
    from workbench.store.engine import LocationError, locate

    try:
        location = locate(db)
    except LocationError as e:
        problems.append(f"store_db: {e}")
        return
    if location.path is not None and not location.path.is_file():  # a PostgreSQL database is asked below
        problems.append(f"annotation database {db} does not exist")
        return
    from workbench.store.db import Store, StoreError

    try:
        with Store(db) as store:
            try:
                ids = store.conversation_ids(c.store_dataset)
            except StoreError:  # NotFoundError: no dataset of that name
                ids = []
            if ids and c.reviewed_only:
                ids = store.conversation_ids(c.store_dataset, status="reviewed")
                if not ids:
                    problems.append(f"store dataset {c.store_dataset!r} has no reviewed conversations yet "
                                    "(reviewed_only: accept labels in the Team tab first)")
                    return
            if ids:
                _check_eval_split(c, len(ids), problems)
                return
            names = [getattr(d, "name", str(d)) for d in store.datasets()]
    except StoreError as e:  # not an annotation database, or busy
        problems.append(f"store_db: {e}")
        return
    known = f" (datasets: {', '.join(names)})" if names else " (the store has no datasets)"
    problems.append(f"store dataset {c.store_dataset!r} has no conversations{known}")


def unmatched_lora_targets(found: dict, targets: list[str]) -> str:
    """'' when LoRA's target modules are found in the model the config describes (built on the meta device:
    no weights read), else a message naming those that match nothing. Given targets must each match a module
    of the language model; the default list needs one match (models name their projections differently)."""
    import re
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    import models.hybrid  # noqa: F401  (registers the hybrid's model type)

    try:
        config = AutoConfig.for_model(**found)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = AutoModelForImageTextToText.from_config(config)
            except ValueError:
                model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture this check cannot build: the run will say
        return ""
    exclude = re.compile(LORA_EXCLUDE)
    names = [name for name, _ in model.named_modules() if name and not exclude.fullmatch(name)]
    matched = {t for t in targets if any(n == t or n.endswith("." + t) for n in names)}
    if targets == DEFAULT_LORA_TARGETS:
        missing = [] if matched or is_hybrid(found) else targets
    else:
        missing = [t for t in targets if t not in matched]
    if not missing:
        return ""
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if n and not exclude.fullmatch(n) and isinstance(m, torch.nn.Linear)})
    return (f"lora_target {', '.join(missing)} match{'es' if len(missing) == 1 else ''} no module of the base "
            f"model; its linear layers are named {', '.join(leaves[:20])}")
