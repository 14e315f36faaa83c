"""What a continuous-batching server spends on batch bookkeeping (issue 20): `DecodeBatch.join` (admitting
prefilled requests), `DecodeBatch.keep` (dropping finished rows, trimming padding) and the decode forward
pass, in a server-like steady state driven directly on the engine (no HTTP, no scheduler thread).

A pool of single-row batches is prefilled first (prompts of `--prompt-tokens` MIN..MAX random tokens, each
row `--new-tokens` MIN..MAX tokens, greedy, no stop token), outside the timings. Then, for `--steps` steps:
join pool batches while the running batch has fewer than `--rows` rows, then one `Engine.step` (which
samples, drops finished rows with `keep`, and runs the decode forward). `join`, `keep` and the forward
(`Engine._decode`) are timed by wrapping them; "other" is the rest of the step (sampling, text).
The generated tokens of every row are recorded so that two versions of the code can be compared token
for token (`--tokens-out`).

    python bench/bench_batch_churn.py --model ~/.cache/gptlab/models/smollm2-135m-instruct --rows 48 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from gptlab.checkpoint import load_model_dir
from gptlab.infer.batch import DecodeBatch
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams


def timed(owner, name: str, totals: dict[str, float]):
    """Wrap `owner.name` so that the seconds spent in it add up in totals[name]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=48, help="rows kept running")
    ap.add_argument("--steps", type=int, default=60, help="steps timed")
    ap.add_argument("--warmup", type=int, default=0, help="steps run first, untimed (the batch fills up)")
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=[20, 300])
    ap.add_argument("--new-tokens", type=int, nargs=2, default=[8, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens-out", default=None, help="write every request's generated token ids (JSON) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model_dir(args.model)
    model.eval().requires_grad_(False)
    engine = Engine(model, tok, prefix_cache=False)
    rng = random.Random(args.seed)
    vocab = min(tok.vocab_size, model.config.vocab_size)
    stops = set(engine.default_stop_ids)
    words = [i for i in range(vocab) if i not in stops]

    # enough requests for the whole run: every step drains about rows / mean(new tokens) of them
    n_pool = args.rows + int((args.warmup + args.steps) * args.rows * 2 / sum(args.new_tokens)) + 8
    pool = []
    for i in range(n_pool):
        prompt = [rng.choice(words) for _ in range(rng.randint(*args.prompt_tokens))]
        params = SamplingParams(max_new_tokens=rng.randint(*args.new_tokens), temperature=0.0, stop_token_ids=())
        pool.append(engine.prefill([prompt], params, first_index=i))
    pool.reverse()

    totals = {"join": 0.0, "keep": 0.0, "_decode": 0.0, "_move_to_new_storage": 0.0}
    timed(DecodeBatch, "join", totals)
    timed(DecodeBatch, "keep", totals)
    timed(engine, "_decode", totals)
    if hasattr(DecodeBatch, "_move_to_new_storage"):  # the version with spare storage: how often it moves
        timed(DecodeBatch, "_move_to_new_storage", totals)
    batch, outputs, lengths = None, {}, []
    joins = moves = 0
    start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # the batch is full: from here on, the steady state
            totals.update((k, 0.0) for k in totals)
            joins = moves = 0
            start = time.perf_counter()
        while pool and (batch is None or len(batch.rows) < args.rows):
            new = pool.pop()
            if batch is None:
                batch = new
            else:
                storage = getattr(batch, "_storage", None)
                batch.join(new)
                joins += 1
                moves += storage is None or batch._storage is not storage if hasattr(batch, "_storage") else 1
        if batch is None:
            break
        lengths.append(batch.cache.length)
        rows = list(batch.rows)
        engine.step(batch)
        for row in rows:
            outputs[row.index] = list(row.token_ids)
        if not batch.rows:
            batch = None
    wall = time.perf_counter() - start
    other = wall - sum(v for k, v in totals.items() if k != "_move_to_new_storage")
    load = os.getloadavg()[0]
    print(f"{args.steps} steps at {args.rows} rows, {Path(args.model).name}, {args.threads} thread(s), load average "
          f"{load:.1f}: {wall * 1000 / args.steps:.1f} ms a step; forward {totals['_decode'] * 1000 / args.steps:.1f}, "
          f"join {totals['join'] * 1000 / args.steps:.1f}, keep {totals['keep'] * 1000 / args.steps:.1f}, other "
          f"{other * 1000 / args.steps:.1f} ms a step; join + keep = {(totals['join'] + totals['keep']) / wall:.0%} of "
          f"the time; {joins} joins, {moves} of them copying every row "
          f"({totals['_move_to_new_storage'] * 1000 / args.steps:.1f} ms a step); cache length mean "
          f"{sum(lengths) / len(lengths):.0f} slots, "
          f"{sum(map(len, outputs.values()))} tokens")
    if args.tokens_out:
        Path(args.tokens_out).write_text(json.dumps({str(k): v for k, v in sorted(outputs.items())}))


if __name__ == "__main__":
    main()
