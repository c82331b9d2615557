"""An evaluation: models × HSA settings × decoding modes answering the same graded items.

    config = parse_config({"models": ["default"], "dataset": "data.json", "output_dir": "evals/x"})
    results = evaluate(config)     # results.json and plots in config.output_dir

An item is one answer of a conversation: the model sees the conversation up to the question
(earlier turns as written, NOISE included) and its reply is graded against the answer in the data.
Items come from the shapes world (`"dataset": "shapes"`, graded through `models.zoo.evaluate`'s
`graded_prompts`, the same items `python -m models.zoo eval` grades), a ShareGPT / LLaMA-Factory
file (read by the store's reader) or a store dataset (`"store:NAME"`). Every condition answers every
item, so conditions compare item by item.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import metrics as M

RESULTS_NAME = "results.json"
PROGRESS_NAME = "metrics.jsonl"  # the run manager's progress file
DESCRIBE_TYPES = ("describe", "answer")  # answers scored for hallucination when the record knows its objects
KEYS = ("models", "dataset", "output_dir", "store_db", "image_root", "shapes", "limit", "decoding", "hsa",
        "max_new_tokens", "synonyms", "runs_dir", "seed", "name")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


# A decoding condition is a models.vlm.GenerationSettings; the config names only these of its fields
# (max_new_tokens is the evaluation's, the sampling seed is per item).
DECODING_KEYS = ("mode", "temperature", "top_p", "top_k", "num_beams")


def _greedy() -> list:
    from models.vlm import GenerationSettings  # lazily: models.vlm imports torch

    return [GenerationSettings()]


def decoding_label(decoding) -> str:
    if decoding.mode == "sample":
        return f"sample T={decoding.temperature:g} p={decoding.top_p:g}"
    if decoding.mode == "beam":
        return f"beam {decoding.num_beams}"
    return "greedy"


def decoding_dict(decoding) -> dict:
    return {key: getattr(decoding, key) for key in DECODING_KEYS}


@dataclass
class EvalConfig:
    models: list[str]
    dataset: str
    output_dir: str
    store_db: str = ""
    image_root: str = ""
    shapes: dict = field(default_factory=dict)  # n, seed, noise (clean/train/heavy), grounding
    limit: int | None = None  # at most this many records of a file or store dataset
    decoding: list = field(default_factory=_greedy)  # GenerationSettings
    hsa: list = field(default_factory=lambda: ["auto"])  # each: true, false or "auto" (as the model was trained)
    max_new_tokens: int = 48
    synonyms: dict | None = None
    runs_dir: str = ""  # where "run: NAME" models are found
    seed: int = 0  # sampling seeds and the bootstrap
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self) | {"decoding": [decoding_dict(d) for d in self.decoding]}


def _decoding(value, i: int):
    from models.vlm import GenerationSettings

    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise ConfigError(f"decoding[{i}]: a mode name or an object with 'mode', got {value!r}")
    unknown = set(value) - set(DECODING_KEYS)
    if unknown:
        raise ConfigError(f"decoding[{i}]: unknown keys {sorted(unknown)}")
    try:
        return GenerationSettings(**value)
    except (TypeError, ValueError) as error:  # the settings' own checks: mode, temperature, beams
        raise ConfigError(f"decoding[{i}]: {error}") from None


def parse_config(raw: dict, base_dir: Path | None = None) -> EvalConfig:
    """A config dict checked; relative file paths are taken relative to `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a JSON object")
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}; known: {list(KEYS)}")
    for key in ("models", "dataset", "output_dir"):
        if key not in raw or raw[key] in (None, "", []):
            raise ConfigError(f"missing key {key!r}")
    models = raw["models"] if isinstance(raw["models"], list) else [raw["models"]]
    if not all(isinstance(m, str) and m.strip() for m in models):
        raise ConfigError("models: a list of names (default, composed, a run, a path or a hub id)")
    base = Path(base_dir) if base_dir else Path.cwd()

    def rel(value: str) -> str:
        return str(base / value) if value and not Path(value).is_absolute() else value

    dataset = raw["dataset"]
    if not isinstance(dataset, str):
        raise ConfigError("dataset: a file, store:NAME or shapes")
    if dataset != "shapes" and not dataset.startswith("store:"):
        dataset = rel(dataset)
    decoding = raw.get("decoding", ["greedy"])
    decoding = [_decoding(d, i) for i, d in enumerate(decoding if isinstance(decoding, list) else [decoding])]
    hsa = raw.get("hsa", ["auto"])
    hsa = hsa if isinstance(hsa, list) else [hsa]
    for value in hsa:
        if value not in (True, False, "auto"):
            raise ConfigError(f"hsa: each setting is true, false or \"auto\", got {value!r}")
    shapes = dict(raw.get("shapes") or {})
    unknown = set(shapes) - {"n", "seed", "noise", "grounding"}
    if unknown:
        raise ConfigError(f"shapes: unknown keys {sorted(unknown)}")
    if shapes.get("noise", "clean") not in ("clean", "train", "heavy"):
        raise ConfigError("shapes.noise: clean, train or heavy")
    max_new = raw.get("max_new_tokens", 48)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise ConfigError("max_new_tokens: an integer of at least 1")
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError("limit: an integer of at least 1")
    return EvalConfig(models=[m.strip() for m in models], dataset=dataset, output_dir=rel(raw["output_dir"]),
                      store_db=_store_location(raw.get("store_db", ""), rel), image_root=rel(raw.get("image_root", "")),
                      shapes=shapes, limit=limit, decoding=decoding, hsa=list(dict.fromkeys(hsa)),
                      max_new_tokens=max_new, synonyms=raw.get("synonyms"), runs_dir=rel(raw.get("runs_dir", "")),
                      seed=int(raw.get("seed", 0)), name=str(raw.get("name", "")))


def _store_location(value, rel) -> str:
    """The annotation store a config names: a file (relative to the config's folder) or a database URL
    (sqlite:///PATH, postgresql://USER@HOST/DB), as given."""
    from workbench.store.engine import is_url

    if value and not isinstance(value, str):
        raise ConfigError("store_db: a file path or a database URL")
    return value if is_url(value) else rel(value)


# ---- items ------------------------------------------------------------------------------------------

@dataclass
class Item:
    record: int  # index of the record in the dataset
    record_id: str  # what names it: "record 3", or a store conversation id
    qtype: str
    question: str
    expected: str
    prompt: object  # a ShareGPT dict or an align.Conversation ending with the question
    objects: list | None = None  # objects known to be in the image (hallucination metrics)
    image_root: str | None = None

    def public(self) -> dict:
        return {"record": self.record, "record_id": self.record_id, "qtype": self.qtype, "question": self.question,
                "expected": self.expected, "objects": self.objects}


def shapes_items(n: int = 20, seed: int = 0, noise: str = "clean", grounding: bool = False) -> list[Item]:
    """The held-out shapes conversations' graded answers (models.zoo.evaluate.graded_prompts)."""
    from models.zoo import shapes
    from models.zoo.evaluate import EVAL_SPLIT, NOISE_PRESETS, graded_prompts

    items = []
    samples = shapes.generate(n, seed=seed, split=EVAL_SPLIT, noise=NOISE_PRESETS[noise], grounding=grounding)
    for index, sample in enumerate(samples):
        for record, expected, qtype, question in graded_prompts(sample):
            objects = shapes.scene_objects(sample.scene) if qtype == "describe" else None
            items.append(Item(index, f"shapes {seed}:{index}", qtype, question.replace("<image>", "").strip(), expected,
                              record, objects))
    return items


def conversation_items(conversations: list, *, ids: list[str], extras: list[dict], image_root=None) -> list[Item]:
    """Graded answers of conversations (align.Conversation): every assistant turn that is not NOISE and
    follows a user turn. A record's `qtypes` (one per graded answer) names their types; otherwise an
    answer with a `<box>` is "grounding" and any other "answer". Its `objects` go with every answer
    that is scored for hallucination (types describe / answer)."""
    from models.hsa import NOISE
    from models.data.align import IMAGE_PLACEHOLDER, Conversation

    items = []
    for index, (conv, rid, extra) in enumerate(zip(conversations, ids, extras)):
        qtypes = extra.get("qtypes") if isinstance(extra.get("qtypes"), list) else None
        objects = extra.get("objects") if isinstance(extra.get("objects"), list) else None
        graded = 0
        for t, turn in enumerate(conv.turns):
            if turn.speaker != "assistant" or turn.role == NOISE or t == 0:
                continue
            previous = [u for u in conv.turns[:t] if u.speaker == "user"]
            if not previous:
                continue
            kept = conv.turns[:t]
            placeholders = sum(u.text.count(IMAGE_PLACEHOLDER) for u in kept)
            prompt = Conversation(kept, list(conv.images[:placeholders]), f"{conv.name}, turn {t}")
            if qtypes and graded < len(qtypes):
                qtype = str(qtypes[graded])
            else:
                qtype = "grounding" if M.is_grounding(turn.text) else "answer"
            question = previous[-1].text.replace(IMAGE_PLACEHOLDER, "").strip()
            items.append(Item(index, rid, qtype, question, turn.text, prompt,
                              objects if qtype in DESCRIBE_TYPES else None, image_root))
            graded += 1
    return items


def file_items(path: str, image_root: str = "", limit: int | None = None) -> list[Item]:
    """Items of a ShareGPT / LLaMA-Factory JSON or JSONL file (the store's reader)."""
    from models.data.align import normalize_record
    from models.data.records import load_records

    records = load_records(path)[:limit]
    conversations = [normalize_record(r, index=i) for i, r in enumerate(records)]
    return conversation_items(conversations, ids=[f"record {i}" for i in range(len(records))],
                              extras=[r if isinstance(r, dict) else {} for r in records],
                              image_root=image_root or str(Path(path).parent))


def store_items(db: str, dataset: str, limit: int | None = None) -> list[Item]:
    """Items of a dataset in the annotation store (images as absolute paths)."""
    from workbench.store.db import Store

    with Store(db) as store:
        ids = store.conversation_ids(dataset)[:limit]
        stored = [store.conversation(cid) for cid in ids]
    if not stored:
        raise ConfigError(f"store dataset {dataset!r} has no conversations")
    return conversation_items([s.as_conversation() for s in stored], ids=[str(s.id) for s in stored],
                              extras=[dict(getattr(s, "extra", None) or {}) for s in stored])


def load_items(config: EvalConfig) -> list[Item]:
    if config.dataset == "shapes":
        return shapes_items(**config.shapes)
    if config.dataset.startswith("store:"):
        db = config.store_db or os.environ.get("WORKBENCH_DB", "")
        if not db:
            raise ConfigError(f"dataset {config.dataset!r} is in the annotation store, but no store_db was given")
        return store_items(db, config.dataset[len("store:"):], config.limit)
    if not Path(config.dataset).is_file():
        raise ConfigError(f"dataset file {config.dataset} does not exist")
    return file_items(config.dataset, config.image_root, config.limit)


# ---- models -----------------------------------------------------------------------------------------

def resolve_model(name: str, runs_dir: str = "") -> tuple[str, str | None]:
    """(model, adapter or None) for a name: an embedded model's name, "run: NAME" (a finished run, as
    the Chat tab offers it: workbench.chat.finished_runs), a path or a hub id."""
    from models.zoo import embedded_model

    if name.startswith("run: "):
        from workbench.chat import finished_runs

        runs = finished_runs(Path(runs_dir)) if runs_dir else {}
        if name not in runs:
            raise ConfigError(f"model {name!r}: no such finished run in {runs_dir or '(no runs_dir given)'}")
        return runs[name]
    return str(embedded_model(name)), None


def trained_with_hsa(source: str) -> bool:
    """What "auto" means for a model: HSA unless its config says it was trained without it."""
    config_file = Path(source) / "config.json"
    try:
        return bool(json.loads(config_file.read_text()).get("hsa_trained", True))
    except (OSError, json.JSONDecodeError):
        return True


# ---- scoring ----------------------------------------------------------------------------------------

def grade(item: Item, reply: str, synonyms=None) -> dict:
    """One reply graded: {reply, correct} and, for grounding, the box read and its IoU; for a
    description with known objects, the objects it mentions that are not in the image."""
    graded = {"reply": reply}
    if item.qtype == "grounding" or M.is_grounding(item.expected):
        box = M.grade_box(reply, item.expected)
        graded.update(correct=box["correct"], iou=box["iou"], box=box["box"], parsed=box["parsed"])
    else:
        graded["correct"] = M.exact_match(reply, item.expected)
    if item.objects is not None:
        h = M.hallucination(reply, item.objects, synonyms)
        graded.update(mentioned=sorted(h.mentioned), hallucinated=sorted(h.hallucinated))
    return graded


def summarize(items: list[Item], graded: list[dict], synonyms=None) -> dict:
    """A condition's metrics over its graded items: accuracy (all but grounding) and per question
    type, CHAIR on descriptions with known objects, grounding accuracy; rates with Wilson intervals."""
    plain = [g["correct"] for i, g in zip(items, graded) if i.qtype != "grounding"]
    grounding = [g for i, g in zip(items, graded) if i.qtype == "grounding"]
    out = {"accuracy": M.rate(sum(plain), len(plain))}
    by_type: dict[str, list[bool]] = {}
    for item, g in zip(items, graded):
        by_type.setdefault(item.qtype, []).append(g["correct"])
    out["by_type"] = {t: M.rate(sum(v), len(v)) for t, v in by_type.items()}
    described = [(i, g) for i, g in zip(items, graded) if i.objects is not None]
    if described:
        out.update(M.chair([M.hallucination(g["reply"], i.objects, synonyms) for i, g in described]))
    if grounding:
        out["grounding_acc"] = M.rate(sum(g["correct"] for g in grounding), len(grounding))
        out["grounding_unparsed"] = sum(not g["parsed"] for g in grounding)
    return out


def condition_key(model: str, hsa: bool, decoding) -> str:
    return f"{model} · HSA {'on' if hsa else 'off'} · {decoding_label(decoding)}"


def comparisons(conditions: list[dict], graded: dict[str, list[dict]], items: list[Item], seed: int = 0) -> list[dict]:
    """Each pair of conditions on the same items: the accuracy difference with a paired bootstrap
    interval and McNemar's exact p (grounding apart)."""
    plain = [k for k, item in enumerate(items) if item.qtype != "grounding"]
    out = []
    for a in range(len(conditions)):
        for b in range(a + 1, len(conditions)):
            ka, kb = conditions[a]["key"], conditions[b]["key"]
            result = M.compare([graded[ka][k]["correct"] for k in plain], [graded[kb][k]["correct"] for k in plain],
                               seed=seed)
            out.append({"a": ka, "b": kb, "metric": "accuracy", **result})
    return out


class Progress:
    """Progress lines in metrics.jsonl (what the run manager and the Evaluate tab poll) and the log."""

    def __init__(self, output_dir: Path, total: int):
        self.path = output_dir / PROGRESS_NAME
        self.total, self.done, self.started = total, 0, time.time()

    def step(self, condition: str, correct: bool) -> None:
        self.done += 1
        record = {"step": self.done, "total": self.total, "condition": condition, "correct": bool(correct),
                  "elapsed_s": round(time.time() - self.started, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.done == self.total or self.done % 10 == 0:
            print(f"[progress] {self.done}/{self.total} {condition}", flush=True)


def evaluate(config: EvalConfig, *, pool=None) -> dict:
    """Run every condition on every item; write results.json and the plots; return the results."""
    from models.vlm import generate_reply, load_vlm

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(config)
    if not items:
        raise ConfigError(f"dataset {config.dataset}: no graded answers (assistant turns after a question)")
    resolved = {name: resolve_model(name, config.runs_dir) for name in config.models}
    plan = []
    for name in config.models:
        for hsa in config.hsa:
            on = trained_with_hsa(resolved[name][0]) if hsa == "auto" else bool(hsa)
            for decoding in config.decoding:
                plan.append((name, on, decoding))
    plan = list({condition_key(*p): p for p in plan}.values())  # "auto" may repeat true/false
    print(f"evaluating {len(items)} answers of {len({i.record for i in items})} records, "
          f"{len(plan)} condition(s)", flush=True)
    progress = Progress(out, len(items) * len(plan))
    conditions, graded = [], {}
    for name in config.models:
        source, adapter = resolved[name]
        def load(source=source, adapter=adapter):  # HSA attention; each condition passes roles or not
            return load_vlm(source, adapter=adapter, attn_implementation="hsa")

        model, processor = pool.get((source, adapter, "hsa"), load) if pool is not None else load()
        for model_name, hsa, decoding in [p for p in plan if p[0] == name]:
            key = condition_key(model_name, hsa, decoding)
            rows = []
            for k, item in enumerate(items):
                settings = replace(decoding, max_new_tokens=config.max_new_tokens,
                                   seed=config.seed + k if decoding.mode == "sample" else None)
                reply = generate_reply(model, processor, item.prompt, settings=settings, hsa=hsa,
                                       image_root=item.image_root)
                rows.append(grade(item, reply, config.synonyms))
                progress.step(key, rows[-1]["correct"])
            graded[key] = rows
            conditions.append({"key": key, "model": model_name, "hsa": hsa, "decoding": decoding_dict(decoding),
                               "decoding_label": decoding_label(decoding), "metrics": summarize(items, rows, config.synonyms)})
        del model
    results = {"name": config.name, "config": config.to_dict(), "created_at": time.time(),
               "n_records": len({i.record for i in items}), "n_items": len(items), "conditions": conditions,
               "comparisons": comparisons(conditions, graded, items, config.seed),
               "items": [{**item.public(), "answers": {c["key"]: graded[c["key"]][k] for c in conditions}}
                         for k, item in enumerate(items)]}
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=float))
    from .plots import write_plots

    results["plots"] = write_plots(results, out)
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=float))
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m workbench.evaluate",
                                     description="Evaluate models on a dataset: accuracy per question type, "
                                                 "CHAIR, grounding, HSA on/off and decoding modes side by side.")
    parser.add_argument("config", help="a .json config, e.g. "
                        '{"models": ["default"], "dataset": "data.json", "output_dir": "evals/x"}')
    args = parser.parse_args(argv)
    try:
        path = Path(args.config)
        raw = json.loads(path.read_text())
        config = parse_config(raw, base_dir=path.resolve().parent)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        results = evaluate(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    print(format_table(results), flush=True)
    print(f"wrote {Path(config.output_dir) / RESULTS_NAME}", flush=True)
    return 0


# ---- reading results ------------------------------------------------------------------------------

METRICS = ("accuracy", "grounding_acc", "chair_s", "chair_i", "recall", "mean_length")


def table_rows(results: dict) -> list[list]:
    """metric × condition rows: [condition, metric, value, 95% interval, count/total]."""
    rows = []
    for c in results["conditions"]:
        for metric in METRICS:
            value = c["metrics"].get(metric)
            if value is None or value.get("value") is None:
                continue
            if metric == "mean_length":
                rows.append([c["model"], c["decoding_label"], "on" if c["hsa"] else "off", metric,
                             round(value["value"], 2), "", str(value["count"])])
            else:
                rows.append([c["model"], c["decoding_label"], "on" if c["hsa"] else "off", metric,
                             round(value["value"], 3), f"[{value['low']:.3f}, {value['high']:.3f}]",
                             f"{value['count']}/{value['total']}"])
    return rows


TABLE_HEADERS = ["model", "decoding", "HSA", "metric", "value", "95% interval", "count"]


def format_table(results: dict) -> str:
    lines = [f"{'model':<20} {'decoding':<20} {'HSA':<4} {'metric':<14} {'value':>7}  {'95% interval':<17} count"]
    for row in table_rows(results):
        lines.append(f"{row[0]:<20} {row[1]:<20} {row[2]:<4} {row[3]:<14} {row[4]:>7}  {row[5]:<17} {row[6]}")
    return "\n".join(lines)
