"""The task suite's extraction task (gptlab/tasks/extraction.py: pull name/age/city or product/quantity/
unit_price out of a sentence as a JSON object) with and without constrained decoding: accuracy by the
task's own check, with the Wilson 95% interval (gptlab/eval/stats.py), and how many replies json.loads
reads at all.

Constrained rows get the example's JSON Schema (its keys, typed: strings, integer age/quantity, number
unit_price; all required, no others). Greedy decoding, the test split, the same examples for every model.

    python bench/bench_structured_extraction.py --model smollm2-135m-instruct --n 60
    python bench/bench_structured_extraction.py --model /work/sr_final/runs/default/sft/model --n 200
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gptlab.apps.llm import open_llm
from gptlab.chat import render_for_completion
from gptlab.eval.stats import wilson_interval
from gptlab.infer.constraints import Constraint
from gptlab.infer.sampling import SamplingParams
from gptlab.tasks import get_task, sample_examples

TYPES = {"name": "string", "age": "integer", "city": "string", "product": "string", "quantity": "integer",
         "unit_price": "number"}


def schema_for(fields: dict) -> dict:
    return {"type": "object", "properties": {key: {"type": TYPES[key]} for key in fields},
            "required": list(fields), "additionalProperties": False}


def parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=60, help="test examples")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = open_llm(args.model)
    task = get_task("extraction")
    examples = sample_examples(["extraction"], args.n, "test", seed=0)
    prompts = [render_for_completion(llm.tokenizer, e.messages) for e in examples]
    print(f"model {args.model}, {args.n} test examples, greedy, max_new_tokens {args.max_new_tokens}\n")
    print("| arm | right | accuracy | Wilson 95% | json.loads parses the reply | finish length | seconds |")
    print("|---|---|---|---|---|---|---|")
    for arm in ("unconstrained", "constrained (the example's JSON Schema)"):
        start, replies = time.perf_counter(), []
        for k in range(0, len(examples), args.batch):
            chunk = examples[k:k + args.batch]
            params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                                     constraint=Constraint.json_schema(schema_for(e.metadata["fields"]))
                                     if arm.startswith("constrained") else None) for e in chunk]
            replies += llm.engine.generate(prompts[k:k + args.batch], params)
        right = sum(task.check(e, r.text) for e, r in zip(examples, replies))
        low, high = wilson_interval(right, len(examples))
        print(f"| {arm} | {right}/{len(examples)} | {right / len(examples):.0%} | {low:.0%}-{high:.0%} | "
              f"{sum(parses(r.text) for r in replies)}/{len(examples)} | "
              f"{sum(r.finish_reason == 'length' for r in replies)} | {time.perf_counter() - start:.0f} |", flush=True)
        for e, r in list(zip(examples, replies))[:2]:
            print(f"  - {e.metadata['fields']} -> `{' '.join(r.text.split())[:100]}`", flush=True)


if __name__ == "__main__":
    main()
