"""Held-out pairwise accuracy of a reward model per task, on task-suite preferences of the test split
(disjoint from anything `gptlab rm` trains on).

    python bench/rm_accuracy.py runs/default/rm/model [--prompts 400] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from gptlab.train.preferences import default_preferences, task_names
from gptlab.reward_model import RewardModel
from gptlab.train.preference_fit import pairwise_accuracy
from gptlab.tasks import sample_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reward_model")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--seed", type=int, default=0, help="same seed as the rm run: its held-out sets")
    args = parser.parse_args()
    rm = RewardModel.load(args.reward_model)
    sets = default_preferences(args.tasks, args.prompts, "test", args.seed)
    # default_preferences draws its examples with this seed; re-draw them to know each set's task
    tasks = [e.task for e in sample_examples(task_names(args.tasks), args.prompts, "test", seed=f"{args.seed}-test")]
    margins: dict[str, list[torch.Tensor]] = defaultdict(list)
    for task, pset in zip(tasks, sets):
        scores = rm.score([pset.prompt + c for c in pset.completions()])
        pairs = torch.tensor(pset.pairs())
        margins[task].append(scores[pairs[:, 0]] - scores[pairs[:, 1]])
    everything = torch.cat([m for ms in margins.values() for m in ms])
    print(f"{'task':<15}{'sets':>6}{'pairs':>7}{'accuracy':>10}")
    for task in sorted(margins):
        m = torch.cat(margins[task])
        print(f"{task:<15}{len(margins[task]):>6}{len(m):>7}{pairwise_accuracy(m):>10.3f}")
    print(f"{'all':<15}{len(sets):>6}{len(everything):>7}{pairwise_accuracy(everything):>10.3f}")


if __name__ == "__main__":
    main()
