"""Does a base model know the knowledge task's facts? For every fact of the table, the relation's reference
sentence cut before the answer ("The capital of Denmark is") is scored with each answer of that relation
(" Copenhagen", " Oslo", ...) by log-likelihood; the fact counts as known when its own answer ranks first
(chance: one over the relation's size, 4% averaged over facts). Train and test facts are reported apart.

    python bench/knowledge_probe.py runs/default/pretrain/model [more model dirs or checkpoints]
"""

from __future__ import annotations

import argparse

import torch

from gptlab.checkpoint import load_model_dir
from gptlab.infer.engine import Engine
from gptlab.tasks import get_task
from gptlab.tasks.knowledge import FACTS, RELATIONS


def probe(model_dir: str) -> dict[str, tuple[int, int]]:
    model, tokenizer = load_model_dir(model_dir)
    engine = Engine(model.eval(), tokenizer)
    task = get_task("knowledge")
    known = {"train": [0, 0], "test": [0, 0]}
    for fact in FACTS:
        prefix = RELATIONS[fact.relation][2].split("{a}")[0].format(s=fact.subject).rstrip()
        prefix = prefix[:1].upper() + prefix[1:]
        rivals = [f for f in FACTS if f.relation == fact.relation]
        with torch.no_grad():
            scores = engine.score([prefix] * len(rivals), [" " + f.answers[0] for f in rivals])
        best = max(zip(scores, rivals), key=lambda pair: pair[0].logprob)[1]
        split = "train" if fact in task.train_facts(fact.relation) else "test"  # the task's own split
        known[split][0] += best is fact
        known[split][1] += 1
    return {split: (k, n) for split, (k, n) in known.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories (or checkpoint directories)")
    args = parser.parse_args()
    chance = sum(1 / sum(g.relation == f.relation for g in FACTS) for f in FACTS) / len(FACTS)
    for model_dir in args.models:
        result = probe(model_dir)
        print(f"{model_dir}: " + ", ".join(f"{split} facts {k}/{n} ({k / n:.0%})" for split, (k, n) in result.items())
              + f"; chance {chance:.0%}")


if __name__ == "__main__":
    main()
