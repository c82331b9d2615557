"""The training config: every key, its default, and the checks that run before anything starts.

`{"dataset": "data.json", "output_dir": "runs/x", "max_steps": 3, "hsa": true}` is complete; every
other key has a default. Unknown keys and inconsistent combinations are refused with a message that
names them, before a model is loaded.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from models.zoo import DEFAULT_VLM_DIR as DEFAULT_MODEL
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
STORE_PREFIX = "store:"


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending keys."""


@dataclass
class TrainConfig:
    dataset: str                                  # a ShareGPT / LLaMA-Factory .json/.jsonl file, or "store:NAME"
    output_dir: str = ""                          # default: runs/<dataset name>
    base_model: str = str(DEFAULT_MODEL)          # a local directory or a hub id
    store_db: str = ""                            # the annotation database, for "store:NAME" datasets
    image_root: str = ""                          # where relative image paths resolve; default: the dataset's folder
    stage: str = "sft"                            # "sft": conversations; "align": a composed VLM's projector alone
    finetuning: str = "lora"                      # "lora" or "full" (stage "sft")
    train_projector: bool = True                  # a composed VLM's projector trains in full beside LoRA
    merge: bool = False                           # after LoRA: merge_and_unload into a plain checkpoint, merged/
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target: list[str] | str = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    quantization: str = "none"                    # "none", "8bit", "4bit" (NF4 + double quantization: QLoRA)
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.0                           # an int: steps; a float in [0, 1): a fraction of all steps
    epochs: float = 1.0
    max_steps: int = -1                           # > 0 overrides epochs
    batch_size: int = 1                           # per device
    grad_accum: int = 1
    max_length: int = 1024
    hsa: bool = True                              # train under the HSA mask (attn_implementation="hsa")
    seed: int = 42
    eval_split: float = 0.0                       # fraction of the records held out for eval loss
    eval_steps: int = 0                           # evaluate every N steps; 0: once, at the end
    logging_steps: int = 1
    save_steps: int = 50                          # checkpoint every N optimizer steps
    save_total_limit: int = 2
    resume: bool | str = False                    # true: the last checkpoint in output_dir; or a checkpoint path
    dtype: str = "auto"                           # compute dtype: bf16 on GPUs that have it, else float32
    gradient_checkpointing: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # A Mamba+attention hybrid's fusion gates (models.hybrid): regularizers added to the loss.
    gate_balance_weight: float = 0.0              # x (mean gate - gate_balance_target)^2, per layer
    gate_balance_target: float = 0.5
    gate_entropy_weight: float = 0.0              # x -(binary entropy of the gates): against early saturation
    gate_entropy_steps: int = 0                   # the entropy term only for the first N steps; 0: all steps

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def store_dataset(self) -> str | None:
        return self.dataset[len(STORE_PREFIX):] if self.dataset.startswith(STORE_PREFIX) else None


KEYS = [f.name for f in fields(TrainConfig)]
_DEFAULTS = {f.name: (f.default_factory() if callable(f.default_factory) else f.default) for f in fields(TrainConfig)
             if f.name != "dataset"}
_TYPES = {
    "dataset": str, "output_dir": str, "base_model": str, "store_db": str, "image_root": str, "stage": str, "finetuning": str,
    "train_projector": bool, "merge": bool,
    "lora_r": int, "lora_alpha": int, "lora_dropout": float, "quantization": str, "learning_rate": float,
    "lr_scheduler": str, "warmup": float, "epochs": float, "max_steps": int, "batch_size": int, "grad_accum": int,
    "max_length": int, "hsa": bool, "seed": int, "eval_split": float, "eval_steps": int, "logging_steps": int,
    "save_steps": int, "save_total_limit": int, "dtype": str, "gradient_checkpointing": bool,
    "weight_decay": float, "max_grad_norm": float, "gate_balance_weight": float, "gate_balance_target": float,
    "gate_entropy_weight": float, "gate_entropy_steps": int,
}


def defaults() -> dict:
    return json.loads(json.dumps(_DEFAULTS))


def parse_config(raw: dict, *, base_dir: Path | None = None) -> TrainConfig:
    """Check a config dict and fill in defaults. Relative paths resolve against base_dir (the
    working directory when None). Raises ConfigError naming every problem found."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a JSON/YAML object of keys, got {type(raw).__name__}")
    problems: list[str] = []
    unknown = [k for k in raw if k not in KEYS]
    for key in unknown:
        close = difflib.get_close_matches(key, KEYS, n=1)
        problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    values = {}
    for key, value in raw.items():
        if key in unknown:
            continue
        checked = _check_type(key, value, problems)
        if checked is not None:
            values[key] = checked
    if "dataset" not in raw:
        problems.append("missing key 'dataset' (a ShareGPT .json/.jsonl file or store:NAME)")
    if problems:
        raise ConfigError("; ".join(problems))

    given = set(values)
    config = TrainConfig(**values)
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


def _check_type(key: str, value, problems: list[str]):
    if key == "lora_target":
        if value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        if isinstance(value, str) and value:
            return [v.strip() for v in value.split(",") if v.strip()]
        problems.append("lora_target must be a list of module names, a comma-separated string or 'all-linear'")
        return None
    if key == "resume":
        if isinstance(value, (bool, str)):
            return value
        problems.append("resume must be true/false or a checkpoint path")
        return None
    want = _TYPES[key]
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value if key == "warmup" and isinstance(value, int) else float(value)
    elif isinstance(value, str):
        return value
    problems.append(f"{key} must be {want.__name__}, got {value!r}")
    return None


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
    for key in ("gate_balance_weight", "gate_entropy_weight", "gate_entropy_steps"):
        if getattr(c, key) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(c, key)}")
    if not 0.0 <= c.gate_balance_target <= 1.0:
        problems.append(f"gate_balance_target must be in [0, 1] (a gate's mean), got {c.gate_balance_target}")
    if c.merge and c.finetuning != "lora":
        problems.append("merge given but finetuning is 'full': merging folds a LoRA adapter into its base")
    if "epochs" in given and "max_steps" in given and c.max_steps > 0:
        problems.append("both epochs and max_steps given: give one (max_steps would override epochs)")
    for key in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
        if getattr(c, key) < 1:
            problems.append(f"{key} must be at least 1, got {getattr(c, key)}")
    if c.max_steps == 0 or c.max_steps < -1:
        problems.append(f"max_steps must be a positive number of steps (or -1 to train for epochs), got {c.max_steps}")
    if c.max_steps <= 0 and c.epochs <= 0:
        problems.append("epochs must be positive when max_steps is not given")
    if not 0.0 <= c.lora_dropout < 1.0:
        problems.append(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if not 0.0 <= c.eval_split < 1.0:
        problems.append(f"eval_split must be in [0, 1), got {c.eval_split}")
    if c.eval_steps and c.eval_split == 0:
        problems.append("eval_steps given but eval_split is 0: there is nothing to evaluate on")
    if c.eval_steps < 0:
        problems.append(f"eval_steps must be >= 0, got {c.eval_steps}")
    if c.learning_rate <= 0:
        problems.append(f"learning_rate must be positive, got {c.learning_rate}")
    if isinstance(c.warmup, float) and not 0.0 <= c.warmup < 1.0:
        problems.append(f"warmup as a fraction must be in [0, 1), got {c.warmup} (an integer is a number of steps)")
    if isinstance(c.warmup, int) and c.warmup < 0:
        problems.append(f"warmup steps must be >= 0, got {c.warmup}")
    if c.store_dataset is not None and not c.store_dataset:
        problems.append("dataset 'store:' names no dataset")
    if "store_db" in given and c.store_dataset is None:
        problems.append("store_db given but dataset is a file, not store:NAME")


def _resolve_paths(c: TrainConfig, base: Path) -> TrainConfig:
    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    if c.store_dataset is None:
        c.dataset = resolve(c.dataset)
        if not c.image_root:
            c.image_root = str(Path(c.dataset).parent)
    elif c.store_db:
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
        if not Path(c.dataset).is_file():
            problems.append(f"dataset file {c.dataset} does not exist")
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


def _check_store_dataset(c: TrainConfig, problems: list[str]) -> None:
    import os

    db = c.store_db or os.environ.get("WORKBENCH_DB", "")
    if not db:
        problems.append(f"dataset {c.dataset!r} is in the annotation store, but no store_db was given")
        return
    if not Path(db).is_file():
        problems.append(f"annotation database {db} does not exist")
        return
    from workbench.store.db import Store

    with Store(db) as store:
        try:
            if store.conversation_ids(c.store_dataset):
                return
        except ValueError:  # the store's NotFoundError: no dataset of that name
            pass
        names = [getattr(d, "name", str(d)) for d in store.datasets()]
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
