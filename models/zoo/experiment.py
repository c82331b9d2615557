"""The HSA experiment: the same tiny VLM trained twice, identical but for HSA, then both asked the
same held-out questions with more, and unseen kinds of, misleading NOISE turns.

To fit a shared 2-core CPU, training has two stages:
1. a base model learns the shapes task on clean conversations (no NOISE tokens, so the HSA mask is
   exactly the causal mask: HSA on or off is the same computation here), once;
2. from that base, each arm is trained on with NOISE turns of the training kinds (chit-chat, false
   claims) before 30% of the questions: "hsa" with attn_implementation="hsa" and semantic_ids,
   "plain" with SDPA and no roles. Same data, steps and starting weights; repeated over seeds
   (the seed picks the stage-2 data and order).
Each arm answers with the attention it was trained with.

Evaluation conditions use the same held-out scenes and questions (only the NOISE differs):
- clean:          no NOISE at all
- train-noise:    NOISE as in training
- heavy:          NOISE before every question, 1-3 items, including kinds never seen in training
                  (fake earlier answers to the same question, false claims inside the question turn
                  as a NOISE span, instructions to lie)
- heavy-neutral:  the heavy conversations with the text of every NOISE turn and span replaced by
                  neutral filler of the same number of characters (still marked NOISE). Against
                  "clean" it measures what the noise's mere length (the position shift of the tokens
                  after it) costs; against "heavy", what its content costs. (It replaces
                  "heavy-removed", the noise deleted, which is the "clean" conversation by
                  construction: the same held-out seed gives the same scenes and questions.)
The base model (stage 1 only) is evaluated too, plain and with HSA at inference only.

`run_inference_study` (`python -m models.zoo experiment --inference-only`) is the cheap companion:
no training, one trained model answering the same conditions with HSA at inference on and off.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import shapes
from .build import CLEAN_STEPS, clean_stage, noisy_stage, train
from .evaluate import evaluate, held_out
from .stats import mean_interval, wilson  # the evaluation's one implementation (workbench.evaluate.metrics too)

OUT_DIR = Path(__file__).resolve().parent / "experiment"
CONDITIONS = ("clean", "train-noise", "heavy", "heavy-neutral")
# says nothing about the scene: no colour, shape, count or position
NEUTRAL_TEXT = "Okay, let me know when you are ready. "


@dataclass
class ExperimentSettings:
    base_steps: int = CLEAN_STEPS
    steps: int = 200  # stage 2, per arm and seed
    seeds: int = 3
    n: int = 25  # held-out conversations per condition and seed
    batch_size: int = 16
    train_noise: shapes.NoiseSpec = shapes.TRAIN_NOISE
    heavy_noise: shapes.NoiseSpec = shapes.HEAVY_NOISE
    threads: int | None = 1  # the cores are shared; one thread keeps a run's speed predictable
    arms: tuple[str, ...] = ("hsa", "plain")
    extra: dict = field(default_factory=dict)


def neutral(length: int) -> str:
    """Neutral filler of exactly `length` characters."""
    return (NEUTRAL_TEXT * (length // len(NEUTRAL_TEXT) + 1))[:length]


def neutralize_noise(sample: shapes.Sample) -> shapes.Sample:
    """The same conversation with the text of every NOISE turn and NOISE span replaced by neutral
    filler of the same number of characters: roles, spans and everything else unchanged."""
    turns = []
    for turn in sample.record["conversations"]:
        turn = dict(turn)
        if turn["semantic_type"] == shapes.NOISE:
            turn["value"] = neutral(len(turn["value"]))
        for span in turn.get("spans", []):
            if span["role"] == shapes.NOISE:  # same length: the offsets of every span stay valid
                turn["value"] = (turn["value"][:span["start"]] + neutral(span["end"] - span["start"])
                                 + turn["value"][span["end"]:])
        turns.append(turn)
    return shapes.Sample({**sample.record, "conversations": turns}, sample.scene, list(sample.qtypes))


def conditions(n: int, seed: int, settings: ExperimentSettings) -> dict[str, list[shapes.Sample]]:
    heavy = held_out(n, seed, settings.heavy_noise)
    return {"clean": held_out(n, seed, shapes.CLEAN), "train-noise": held_out(n, seed, settings.train_noise),
            "heavy": heavy, "heavy-neutral": [neutralize_noise(s) for s in heavy]}


def run_experiment(settings: ExperimentSettings | None = None, out_dir: Path | None = None,
                   progress: bool = True) -> dict:
    import copy

    settings = settings or ExperimentSettings()
    out_dir = Path(out_dir or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    started = time.monotonic()
    base, processor, base_history = train(clean_stage(settings.base_steps, batch_size=settings.batch_size,
                                                      threads=settings.threads), progress=progress)
    data = {seed: conditions(settings.n, 1000 + seed, settings) for seed in range(settings.seeds)}

    def evaluate_all(model, arm: str, seed: int, hsa: bool, final_loss: float) -> None:
        run = {"seed": seed, "arm": arm, "final_loss": final_loss, "conditions": {}}
        for name, samples in data[seed].items():
            result = evaluate(model, processor, samples, hsa=hsa)
            run["conditions"][name] = {**result.to_dict(), "correct": sum(g.correct for g in result.graded)}
            if progress:
                print(f"seed {seed} {arm:<16} {name:<14} accuracy {result.accuracy:.3f}", flush=True)
        runs.append(run)
        # written after every run, so a long experiment can be inspected (and survives a stop)
        write_results(out_dir, settings, runs, time.monotonic() - started)

    for seed in range(settings.seeds):
        for arm, hsa in (("base-plain", False), ("base-hsa", True)):
            base.set_attn_implementation("hsa" if hsa else "sdpa")
            evaluate_all(base, arm, seed, hsa, base_history[-1][1])
        for arm in settings.arms:
            stage2 = noisy_stage(settings.steps, hsa=arm == "hsa", noise=settings.train_noise,
                                 batch_size=settings.batch_size, seed=seed, threads=settings.threads)
            model, _, history = train(stage2, processor=processor, model=copy.deepcopy(base), progress=progress)
            evaluate_all(model, arm, seed, arm == "hsa", history[-1][1])
    summary = write_results(out_dir, settings, runs, time.monotonic() - started)
    plot(summary, out_dir / "hsa_experiment.png")
    if progress:
        print_table(summary)
    return summary


def run_inference_study(model_path: Path | None = None, *, n: int = 25, seeds: int = 2,
                        out_dir: Path | None = None, progress: bool = True) -> dict:
    """A cheaper measurement on one trained model: the same model answering with HSA at inference
    and without it (plain SDPA, so its attention sees the NOISE), on the four conditions."""
    from models.vlm import load_vlm

    from .build import DEFAULT_DIR

    model_path = Path(model_path or DEFAULT_DIR)
    out_dir = Path(out_dir or OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = ExperimentSettings(seeds=seeds, n=n, arms=("hsa-inference", "plain-inference"))
    runs, started = [], time.monotonic()
    for seed in range(seeds):
        data = conditions(n, 1000 + seed, settings)
        for arm, attn in (("hsa-inference", "hsa"), ("plain-inference", "sdpa")):
            model, processor = load_vlm(model_path, attn_implementation=attn, device="cpu")
            run = {"seed": seed, "arm": arm, "conditions": {}}
            for name, samples in data.items():
                result = evaluate(model, processor, samples, hsa=attn == "hsa")
                run["conditions"][name] = {**result.to_dict(), "correct": sum(g.correct for g in result.graded)}
                if progress:
                    print(f"seed {seed} {arm:<15} {name:<14} accuracy {result.accuracy:.3f}", flush=True)
            runs.append(run)
    summary = write_results(out_dir, settings, runs, time.monotonic() - started, name="inference_study.json")
    summary["model"] = json.loads((model_path / "build.json").read_text()) if (model_path / "build.json").exists() else None
    (out_dir / "inference_study.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / "inference_study.png",
         title=f"One default model ({model_path.name}), HSA at inference on/off, {seeds} seeds x {n} conversations")
    if progress:
        print_table(summary)
    return summary


def summarize(runs: list[dict], settings: ExperimentSettings) -> dict:
    table = {}
    for arm in ("base-plain", "base-hsa", *settings.arms):
        for name in CONDITIONS:
            cells = [r["conditions"][name] for r in runs if r["arm"] == arm and name in r["conditions"]]
            if not cells:
                continue
            mean, low, high = mean_interval([c["accuracy"] for c in cells])
            correct, total = sum(c["correct"] for c in cells), sum(c["n_questions"] for c in cells)
            table.setdefault(arm, {})[name] = {
                "mean": mean, "ci95_seeds": [low, high], "ci95_pooled_wilson": list(wilson(correct, total)),
                "per_seed": [c["accuracy"] for c in cells], "questions": total}
    return table


def write_results(out_dir: Path, settings: ExperimentSettings, runs: list[dict], seconds: float,
                  name: str = "results.json") -> dict:
    summary = {"settings": {**asdict(settings), "train_noise": asdict(settings.train_noise),
                            "heavy_noise": asdict(settings.heavy_noise)},
               "seconds": round(seconds), "table": summarize(runs, settings), "runs": runs}
    (out_dir / name).write_text(json.dumps(summary, indent=1))
    return summary


def print_table(summary: dict) -> None:
    print(f"{'arm':<16} {'condition':<14} {'accuracy':>9}  {'95% CI (seeds)':>17}  {'95% CI (pooled)':>17}")
    for arm, rows in summary["table"].items():
        for name, row in rows.items():
            lo, hi = row["ci95_seeds"]
            plo, phi = row["ci95_pooled_wilson"]
            print(f"{arm:<16} {name:<14} {row['mean']:>9.3f}  [{lo:6.3f}, {hi:6.3f}]  [{plo:6.3f}, {phi:6.3f}]")


def plot(summary: dict, path: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    arms = list(table)
    names = [c for c in CONDITIONS if all(c in table[a] for a in arms)]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / max(1, len(arms))
    colours = {"hsa": "#2a7ab9", "plain": "#d9822b", "base-hsa": "#9cc3e0", "base-plain": "#f0c08f",
               "hsa-inference": "#2a7ab9", "plain-inference": "#d9822b"}
    for k, arm in enumerate(arms):
        xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(names))]
        means = [table[arm][c]["mean"] for c in names]
        lows = [max(0.0, m - table[arm][c]["ci95_seeds"][0]) if not math.isnan(table[arm][c]["ci95_seeds"][0]) else 0
                for m, c in zip(means, names)]
        highs = [max(0.0, table[arm][c]["ci95_seeds"][1] - m) if not math.isnan(table[arm][c]["ci95_seeds"][1]) else 0
                 for m, c in zip(means, names)]
        ax.bar(xs, means, width, yerr=[lows, highs], capsize=4, label=arm, color=colours.get(arm))
        for x, m, c in zip(xs, means, names):
            for v in table[arm][c]["per_seed"]:
                ax.plot(x, v, "k.", markersize=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("answer accuracy (exact)")
    s = summary["settings"]
    ax.set_title(title or f"HSA vs plain attention, tiny Qwen2-VL: {s['base_steps']} clean steps + {s['steps']} noisy "
                 f"steps per arm, {s['seeds']} seeds (bars: 95% CI over seeds)", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(arms), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
