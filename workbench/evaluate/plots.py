"""The evaluation's figures as PNG files (matplotlib): accuracy per question type, CHAIR_i vs length."""
from __future__ import annotations

from pathlib import Path

ACCURACY_PNG, CHAIR_PNG = "accuracy_by_type.png", "chair_vs_length.png"


def accuracy_figure(results: dict):
    """Grouped bars: one group per question type, one bar per condition, Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = results["conditions"]
    types = list(dict.fromkeys(t for c in conditions for t in c["metrics"]["by_type"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(types) + 2), 4), dpi=100)
    width = 0.8 / max(1, len(conditions))
    for j, c in enumerate(conditions):
        xs, ys, lows, highs = [], [], [], []
        for i, t in enumerate(types):
            r = c["metrics"]["by_type"].get(t)
            if r is None or r["value"] is None:
                continue
            xs.append(i + (j - (len(conditions) - 1) / 2) * width)
            ys.append(r["value"])
            lows.append(r["value"] - r["low"])
            highs.append(r["high"] - r["value"])
        ax.bar(xs, ys, width, yerr=[lows, highs], capsize=2, label=c["key"])
    ax.set_xticks(range(len(types)), types)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_title("Accuracy per question type")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def chair_figure(results: dict):
    """CHAIR_i (with its interval) against mean description length, a point per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    plotted = 0
    for c in results["conditions"]:
        m = c["metrics"]
        if "chair_i" not in m or m["mean_length"]["value"] is None or m["chair_i"]["value"] is None:
            continue
        v = m["chair_i"]
        ax.errorbar([m["mean_length"]["value"]], [v["value"]], yerr=[[v["value"] - v["low"]], [v["high"] - v["value"]]],
                    fmt="o", capsize=3, label=c["key"])
        plotted += 1
    if not plotted:
        ax.text(0.5, 0.5, "no description answers with known objects", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("mean description length (words)")
    ax.set_ylabel("CHAIR_i (95% Wilson)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Hallucination vs length")
    if plotted:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def write_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib.pyplot as plt

    written = []
    for name, make in ((ACCURACY_PNG, accuracy_figure), (CHAIR_PNG, chair_figure)):
        fig = make(results)
        fig.savefig(Path(out_dir) / name, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written
