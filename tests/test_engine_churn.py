"""Continuous batching's bookkeeping (infer/batch.py): rows joining a running batch into its spare room,
departed rows' places refilled from the end, trimmed slots reused by a longer newcomer, storage moved when
a join does not fit. Every row must decode as it does alone: its logits at every step agree with a
single-row run to float rounding, and its greedy tokens are the same (the top-2 gaps of the reference are
checked to be far larger than the logit differences, so the token comparison holds on any CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT, GPTConfig

WINDOW = 128


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "forward"])
def engine(request, small_tokenizer, one_torch_thread):
    """Decode steps through the fused decoder and through `GPT.forward` (KVCache.update on the views)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=small_tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                       head_dim=16, intermediate_size=128, max_seq_len=WINDOW)
    model = GPT(config).eval()
    with torch.no_grad():  # a random init at std 0.02 is nearly uniform; larger weights give clear argmaxes
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return Engine(model, small_tokenizer, prefix_cache=False, fused_decode=request.param)


def request(rng: random.Random, engine: Engine, prompt_len: int, new: int) -> tuple[list[int], SamplingParams]:
    stops = engine.default_stop_ids
    words = [i for i in range(engine.n_real_tokens) if i not in stops]
    return [rng.choice(words) for _ in range(prompt_len)], SamplingParams(max_new_tokens=new, temperature=0,
                                                                          stop_token_ids=())


def alone(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits they were picked from, the request decoded by itself."""
    batch = engine.prefill([prompt], params)
    row, logits = batch.rows[0], []
    while batch.rows:
        logits.append(batch.logits[0].clone())
        engine.step(batch)
    return row.token_ids, logits


def check_against_alone(engine, requests, tokens, logits):
    for i, (prompt, params) in enumerate(requests):
        ref_tokens, ref_logits = alone(engine, prompt, params)
        assert len(logits[i]) >= len(tokens[i])
        for got, want in zip(logits[i], ref_logits):
            diff = float((got - want).abs().max())
            scale = float(want.abs().max())
            assert diff <= 1e-4 * scale, (i, diff, scale)
            top2 = want.topk(2).values
            assert float(top2[0] - top2[1]) > 100 * diff  # the greedy token is not a near tie
        assert tokens[i] == ref_tokens[:len(tokens[i])]


def test_joins_departures_and_cancellations_decode_as_alone(engine):
    rng = random.Random(1)
    # (step it arrives at, prompt length, new tokens): short rows first, a longer prompt than the batch
    # (more storage), rows leaving at different steps (holes refilled), then a newcomer longer than the
    # batch that fits into the slots trimmed meanwhile, and enough rows to outgrow the spare rows
    plan = [(0, 10, 30), (0, 6, 5), (1, 3, 12), (2, 25, 8), (3, 4, 20), (3, 9, 3), (6, 14, 6), (9, 5, 25),
            (12, 30, 6), (13, 2, 9), (13, 7, 14), (13, 11, 4), (13, 3, 7), (13, 8, 10), (13, 6, 5), (20, 16, 8)]
    requests = [request(rng, engine, n, new) for _, n, new in plan]
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(plan))}
    batch, events = None, {"fast": 0, "fast, longer": 0, "moved": 0, "holes": 0}
    cancelled = 10  # this one's client goes away after its 3rd token
    for step in range(60):
        for i, (arrives, _, _) in enumerate(plan):
            if arrives != step:
                continue
            new = engine.prefill([requests[i][0]], requests[i][1], first_index=i)
            if batch is None:
                batch = new
                continue
            storage, longer = batch._storage, new.cache.length > batch.cache.length
            batch.join(new)
            fast = storage is not None and batch._storage is storage
            events["fast" if fast else "moved"] += 1
            events["fast, longer"] += fast and longer  # into slots trimmed earlier
        if batch is None or not batch.rows:
            batch = None
            continue
        for r, row in enumerate(batch.rows):
            logits[row.index].append(batch.logits[r].clone())
        rows = list(batch.rows)
        if any(row.index == cancelled and len(row.token_ids) == 3 for row in rows):
            order = batch.keep([r for r, row in enumerate(rows) if row.index != cancelled])
            events["holes"] += order != sorted(order)
            logits[cancelled].pop()
            rows = list(batch.rows)
        engine.step(batch)
        for row in rows:
            tokens[row.index] = list(row.token_ids)
    assert batch is None or not batch.rows
    assert len(tokens[cancelled]) == 3
    print(events)
    assert events["fast"] >= 5 and events["fast, longer"] >= 1 and events["moved"] >= 2, events  # every path ran
    assert events["holes"] >= 1, events
    check_against_alone(engine, requests, [tokens[i] for i in range(len(plan))], [logits[i] for i in range(len(plan))])


def test_storage_stays_bounded_under_endless_churn(engine):
    """A server's batch may never empty: rows keep arriving for far longer than the context window, yet
    the storage stays within a few windows (trimmed slots are dropped when storage moves)."""
    rng = random.Random(2)
    batch, longest, made = None, 0, 0
    for step in range(300):
        while batch is None or len(batch.rows) < 6:
            prompt, params = request(rng, engine, rng.randint(2, 40), rng.randint(3, 20))
            new = engine.prefill([prompt], params, first_index=made)
            made += 1
            if batch is None:
                batch = new
            else:
                batch.join(new)
        engine.step(batch)
        if batch._storage is not None:
            longest = max(longest, batch._storage.k.shape[3])
            assert batch.cache.length <= WINDOW
    assert made > 100
    assert 0 < longest <= 3 * WINDOW


def test_longer_newcomer_reuses_trimmed_slots_that_held_a_departed_row(engine):
    """B leaves from the end of the batch (no row moves), its slots are trimmed, C joins into B's storage
    row (whose slots left of the view still hold B's keys), then D, longer than the batch, turns those
    trimmed slots into padding: C must not attend to B's old keys."""
    rng = random.Random(3)
    requests = [request(rng, engine, *sizes) for sizes in ((4, 30), (20, 6), (3, 20), (20, 5))]
    batch = engine.prefill([requests[0][0]], requests[0][1])
    batch.join(engine.prefill([requests[1][0]], requests[1][1], first_index=1))
    storage = batch._storage
    logits = {i: [] for i in range(4)}
    tokens = {}
    for step in range(40):
        if step == 6:
            assert [row.index for row in batch.rows] == [0] and storage.start == 16  # B gone, its slots trimmed
            for i in (2, 3):
                batch.join(engine.prefill([requests[i][0]], requests[i][1], first_index=i))
            assert batch._storage is storage and storage.start == 6  # both fit, D reusing 10 trimmed slots
        if not batch.rows:
            break
        for r, row in enumerate(batch.rows):
            logits[row.index].append(batch.logits[r].clone())
        rows = list(batch.rows)
        engine.step(batch)
        for row in rows:
            tokens[row.index] = list(row.token_ids)
    check_against_alone(engine, requests, [tokens[i] for i in range(4)], [logits[i] for i in range(4)])
