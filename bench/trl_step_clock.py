"""The step timer the TRL comparisons share (bench_rm_dpo_trl.py, bench_grpo_trl.py)."""

from __future__ import annotations

import time


def step_clock():
    """A `transformers.TrainerCallback` that times each optimizer step end to end (collation, forward,
    backward, update): HF's Trainer fetches the batch before `on_step_begin`, so the intervals between step
    ends are what gptlab's step_s covers. `ends` holds the train start and every step end; `times()` the
    intervals. transformers is imported here, not at module level: the benchmarks import it lazily."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def times(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

    return StepClock()
