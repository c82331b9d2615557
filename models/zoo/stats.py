"""The statistics of every evaluation here, as pure functions (no model, no workbench): the one
implementation that `workbench.evaluate.metrics` and the HSA experiment (`models.zoo.experiment`)
both report through, so that models/ never imports the workbench.

- `wilson`: Wilson's score interval of a proportion;
- `mean_interval`: a mean over a few seeds with its Student-t interval;
- `paired_bootstrap`, `mcnemar_p`, `compare`: two conditions answered on the same items.
"""
from __future__ import annotations

import math
import random

Z95 = 1.959963984540054
# two-sided 95% Student t quantiles by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (0, 1) for no items."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% Student-t interval (over seeds); the interval is NaN for one value."""
    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = T_975.get(k - 1, 1.96) * sd / math.sqrt(k)
    return mean, mean - half, mean + half


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Two-sided exact McNemar test on paired outcomes: binomial on the discordant pairs."""
    if len(a) != len(b):
        raise ValueError("paired outcomes need the same items")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], *, samples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) over the same items and its percentile bootstrap interval (items resampled
    together, so the pairing is kept)."""
    if len(a) != len(b):
        raise ValueError("paired outcomes need the same items")
    n = len(a)
    if n == 0:
        return 0.0, 0.0, 0.0
    diffs = [x - y for x, y in zip(a, b)]
    observed = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    cut = (1 - level) / 2
    return observed, means[int(cut * (samples - 1))], means[int(math.ceil((1 - cut) * (samples - 1)))]


def compare(a: list[bool], b: list[bool], *, seed: int = 0) -> dict:
    """A paired comparison of two conditions' outcomes on the same items."""
    diff, low, high = paired_bootstrap([float(x) for x in a], [float(y) for y in b], seed=seed)
    return {"diff": diff, "low": low, "high": high, "p_mcnemar": mcnemar_p(a, b), "n": len(a),
            "only_a": sum(x and not y for x, y in zip(a, b)), "only_b": sum(y and not x for x, y in zip(a, b))}
