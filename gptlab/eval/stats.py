"""Accuracy figures with their uncertainty: n is small (tens of questions) on a laptop, so every
accuracy is reported with n and its binomial standard error sqrt(p(1-p)/n)."""

from __future__ import annotations

import math


def accuracy_stats(correct: float, n: int) -> dict[str, float]:
    """{n, correct, accuracy, stderr}; `correct` may be fractional (ties credited 1/k)."""
    p = correct / n if n else 0.0
    return {"n": n, "correct": correct, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}
