"""Op calls per decode step (torch.profiler), by name: `Engine.step` at batch 1, greedy, 1 thread.

Counts do not depend on the machine's load, unlike times, so they are the figure to compare decode-step
changes by on a shared machine (docs/LOG.md, session 12). Top-level = the calls Python makes; all = with
the ops those run inside them (a composite such as CPU `F.rms_norm` is one top-level call and ~17 in all).
The self-CPU column is a profiled time: inflated by the profiler and by load, for where-it-goes only.

    python bench/profile_decode.py --model ~/.cache/gptlab/models/smollm2-135m-instruct --quantize int8
"""

from __future__ import annotations

import argparse
import collections
import os

import torch
from torch.profiler import ProfilerActivity, profile

from gptlab.checkpoint import load_for_inference
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="names listed per table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_for_inference(args.model, dtype=torch.float32, quantize=args.quantize)
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=args.steps + 2, temperature=0, stop_token_ids=())
    batch = engine.prefill([tok.encode("The history of the printing press begins")], params)
    engine.step(batch)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step(batch)
    top, every, self_us = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        every[event.name] += 1
        self_us[event.name] += event.self_cpu_time_total
        if event.cpu_parent is None:
            top[event.name] += 1
    n = args.steps
    print(f"{args.quantize or 'fp32'}, load average {os.getloadavg()[0]:.1f}: per step "
          f"{sum(top.values()) / n:.0f} top-level op calls, {sum(every.values()) / n:.0f} in all; "
          f"profiled self CPU {sum(self_us.values()) / n / 1e3:.1f} ms")
    print("\n| top-level op | calls a step |\n|---|---|")
    for name, count in top.most_common(args.top):
        print(f"| {name} | {count / n:.1f} |")
    print("\n| op (all) | calls a step | profiled self CPU us a step |\n|---|---|---|")
    for name, count in every.most_common(args.top):
        print(f"| {name} | {count / n:.1f} | {self_us[name] / n:.0f} |")


if __name__ == "__main__":
    main()
