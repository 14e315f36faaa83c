"""Accuracy figures with their uncertainty: n is small (tens of questions) on a laptop, so every
accuracy is reported with n and its binomial standard error sqrt(p(1-p)/n), or (the application layer's
tables) with its Wilson score interval."""

from __future__ import annotations

import math


def accuracy_stats(correct: float, n: int) -> dict[str, float]:
    """{n, correct, accuracy, stderr}; `correct` may be fractional (ties credited 1/k)."""
    p = correct / n if n else 0.0
    return {"n": n, "correct": correct, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% for z=1.96): unlike p +- z*stderr it stays
    inside [0, 1] and is not zero-width at 0 or n successes, which matters at the n of a laptop run."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval always contains p; min/max only undo float rounding at p = 0 or 1
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
