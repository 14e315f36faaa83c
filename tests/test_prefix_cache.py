"""Automatic prefix caching (infer/prefix_cache.py, Engine(prefix_cache=...)): outputs with the cache on
equal the outputs with it off, token id for token id (greedy and seeded sampling), for prompts sharing a
prefix sequentially, in one call, concurrently through the server, with n > 1, under a budget so small
that blocks are evicted, and after the weights change; the work saved is counted, never assumed."""

from __future__ import annotations

import copy
import inspect
import json.decoder
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from _serve_helpers import LiveServer
from gptlab.infer.engine import Engine
from gptlab.infer.prefix_cache import PrefixCache
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT, GPTConfig
from gptlab.serve.app import ServeConfig, create_app
from gptlab.tokenizer import train_tokenizer

SOURCE = inspect.getsource(json.decoder)
SYSTEM = SOURCE[:500]  # a shared "system prompt" of ~200 tokens
PROMPTS = [SYSTEM + f"\n# question {i}: " + "why " * i for i in range(5)]
GREEDY = SamplingParams(temperature=0, max_new_tokens=16)
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=11)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([SOURCE], vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=512)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than the init: clear argmaxes, varied text
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model


def token_ids(engine: Engine, prompts, params) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, params)]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_outputs_equal_with_the_cache_on_or_off(model, tok, params):
    on, off = Engine(model, tok), Engine(model, tok, prefix_cache=False)
    # one call whose prompts share the system prompt: it is computed once, then each question
    assert token_ids(on, PROMPTS, params) == token_ids(off, PROMPTS, params)
    stats = on.prefix_cache.stats
    assert stats.prompt_tokens == sum(len(on.encode(p)) for p in PROMPTS)
    assert stats.computed_tokens < stats.prompt_tokens / 2
    # later calls, one prompt at a time, in another order: the system prompt comes from the cache
    for prompt in reversed(PROMPTS):
        computed = on.prefill_tokens_computed
        assert token_ids(on, [prompt], params) == token_ids(off, [prompt], params)
        assert on.prefill_tokens_computed - computed < len(on.encode(SYSTEM)) / 2
    # n > 1 (self-consistency): k samples of one new prompt cost one prompt
    prompt = SYSTEM + "\n# a question never asked"
    computed = on.prefill_tokens_computed
    assert token_ids(on, [prompt] * 6, params) == token_ids(off, [prompt] * 6, params)
    assert on.prefill_tokens_computed - computed < len(on.encode(prompt))


def test_chunked_prefill_over_cached_prefixes_and_stored_blocks_stay_unwritten(model, tok):
    on, off = Engine(model, tok), Engine(model, tok, prefix_cache=False)
    on.generate(PROMPTS[:2], GREEDY)
    snapshot = {key: (b.k.clone(), b.v.clone()) for key, b in on.prefix_cache._blocks.items()}
    assert snapshot
    prompts = [PROMPTS[3], SOURCE[200:400], PROMPTS[4]]  # cached prefixes of different lengths + a stranger
    *_, batch = on.prefill_chunks(prompts, GREEDY, chunk_tokens=24)
    rows = list(batch.rows)
    while batch.rows:
        on.step(batch)
    assert [r.token_ids for r in rows] == token_ids(off, prompts, GREEDY)
    for key, (k, v) in snapshot.items():  # every block read by that prefill is bit for bit as stored
        if key in on.prefix_cache._blocks:
            block = on.prefix_cache._blocks[key]
            assert torch.equal(block.k, k) and torch.equal(block.v, v)


def test_finished_rows_store_their_reply_for_the_next_turn(model, tok):
    """A finished row's prompt + generated tokens are stored: the next turn, which sends the reply back,
    computes only what follows it, with the same output as with the cache off."""
    on, off = Engine(model, tok), Engine(model, tok, prefix_cache=False)
    B = on.prefix_cache.block_tokens
    lengths = [24, 40, 33]  # rows finishing at different steps of one batch
    params = [SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=()) for n in lengths]
    first = on.generate(PROMPTS[:3], params)
    assert [c.token_ids for c in first] == token_ids(off, PROMPTS[:3], params)
    tail = on.encode("\n# and then: why not")[1:]  # no second BOS
    for prompt, reply in zip(PROMPTS[:3], first):
        ids = on.encode(prompt) + reply.token_ids + tail
        # every full block of the prompt and the reply but its last token (sampled, never run) is cached
        cached = (len(ids) - len(tail) - 1) // B * B
        computed = on.prefill_tokens_computed
        assert token_ids(on, [ids], GREEDY) == token_ids(off, [ids], GREEDY)
        assert on.prefill_tokens_computed - computed == len(ids) - cached
        assert token_ids(on, [ids], SEEDED) == token_ids(off, [ids], SEEDED)


def test_rows_of_a_joined_batch_store_the_right_slots(model, tok):
    """Rows that joined a running batch (padding, shifted slots, holes filled by later rows) store exactly
    their own keys/values: each stored block matches a fresh prefill of the same tokens."""
    on, fresh = Engine(model, tok), Engine(model, tok, prefix_cache=False)
    B = on.prefix_cache.block_tokens
    batch = on.prefill(PROMPTS[:2], [SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=()) for n in (20, 45)])
    rows = list(batch.rows)
    for _ in range(5):
        on.step(batch)
    newcomers = on.prefill([SOURCE[600:700], PROMPTS[4]],
                           [SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=()) for n in (30, 12)])
    rows += newcomers.rows
    batch.join(newcomers)
    while batch.rows:
        on.step(batch)
    for row in rows:
        ids = list(row.prompt_ids) + row.token_ids[:-1]
        blocks = on.prefix_cache.match(ids + [0])
        assert len(blocks) == len(ids) // B
        reference = fresh.prefill([ids], GREEDY).cache
        for n, block in enumerate(blocks):
            torch.testing.assert_close(block.k, reference.k[:, 0, :, n * B:(n + 1) * B], rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(block.v, reference.v[:, 0, :, n * B:(n + 1) * B], rtol=1e-3, atol=1e-3)


def test_an_inference_model_keeps_its_cache_after_the_decoder_is_built(model, tok):
    """A model that requires no grad has its parameters re-pointed into the fused decoder's layout at the
    first prefill; that must not count as changed weights (it emptied the cache at the second prefill)."""
    frozen = copy.deepcopy(model).requires_grad_(False)
    engine = Engine(frozen, tok)
    engine.generate([PROMPTS[0]], GREEDY)
    computed = engine.prefill_tokens_computed
    engine.generate([PROMPTS[0]], GREEDY)
    assert engine.prefill_tokens_computed - computed < engine.prefix_cache.block_tokens
    assert engine.prefix_cache.stats.cleared == 0


def test_tiny_budget_evicts_and_never_fails(model, tok):
    block_bytes = 2 * model.config.n_layer * model.config.n_kv_head * 16 * model.config.head_dim * 4
    on = Engine(model, tok, prefix_cache_mb=3.5 * block_bytes / 2**20)  # room for 3 blocks
    off = Engine(model, tok, prefix_cache=False)
    prompts = [SOURCE[i * 150:i * 150 + 300] for i in range(6)] + PROMPTS[:2]
    for params in (GREEDY, SEEDED):
        assert token_ids(on, prompts, params) == token_ids(off, prompts, params)
        for prompt in prompts:
            assert token_ids(on, [prompt], params) == token_ids(off, [prompt], params)
    cache = on.prefix_cache
    assert cache.stats.evicted_blocks > 0 and len(cache) <= 3 and cache.bytes <= cache.max_bytes
    # no budget at all: nothing is stored, identical prompts of one call are still computed once
    none = Engine(model, tok, prefix_cache_mb=0)
    assert token_ids(none, [PROMPTS[0]] * 3, GREEDY) == token_ids(off, [PROMPTS[0]] * 3, GREEDY)
    assert len(none.prefix_cache) == 0 and none.prefill_tokens_computed == len(none.encode(PROMPTS[0]))


def test_lru_keeps_recent_prefixes_and_evicts_leaves_first():
    cache = PrefixCache(max_bytes=5 * 2 * 4 * 2, block_tokens=2)  # blocks of 2 tokens, 16 bytes each: 5 fit
    kv = torch.zeros(1, 1, 8, 1)
    cache.store([1, 2, 3, 4, 5, 6], kv[:, :, :6], kv[:, :, :6])  # blocks A B C
    cache.store([7, 8, 9, 10], kv[:, :, :4], kv[:, :, :4])  # blocks D E
    assert len(cache.match([1, 2, 3, 4, 5, 6, 0])) == 3  # A B C used again: D E are now the oldest
    cache.store([1, 2, 11, 12], kv[:, :, :4], kv[:, :, :4])  # A + a new block F: one must go
    assert cache.stats.evicted_blocks == 1
    assert len(cache.match([7, 8, 9, 10, 0])) == 1  # E (D's leaf) went, D stayed
    assert len(cache.match([1, 2, 3, 4, 5, 6, 0])) == 3 and len(cache.match([1, 2, 11, 12, 0])) == 2
    assert cache.match([1, 2]) == []  # at least one token is always left to compute


def test_changed_weights_empty_the_cache(model, tok):
    trained = GPT(model.config).eval()
    trained.load_state_dict(model.state_dict())
    on = Engine(trained, tok)
    before = token_ids(on, PROMPTS[:2], GREEDY)
    with torch.no_grad():  # an optimizer step would do this in place
        trained.model.layers[0].self_attn.k_proj.weight.mul_(-1)
    after = token_ids(on, PROMPTS[:2], GREEDY)
    assert after == token_ids(Engine(trained, tok, prefix_cache=False), PROMPTS[:2], GREEDY)
    assert after != before and on.prefix_cache.stats.cleared == 1


def test_concurrent_requests_sharing_a_prefix_through_the_server(model, tok):
    """Requests with one long system prompt, sent at once (greedy and seeded, n = 3), answer as a server
    without the cache does, and the prefix is computed about once, not once per request."""
    system = {"role": "system", "content": SYSTEM}
    chats = [[system, {"role": "user", "content": f"question {i}" + "?" * i}] for i in range(6)]
    answers, computed = {}, {}
    for cached in (True, False):
        engine = Engine(model, tok, strict_context=True, prefix_cache=cached)
        live = LiveServer(create_app(engine, ServeConfig(model_name="tiny", max_batch=32)))
        try:
            client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)

            def ask(i):
                kwargs = {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": 5, "n": 3}
                reply = client.chat.completions.create(model="tiny", messages=chats[i], max_tokens=8, **kwargs)
                return [c.message.content for c in reply.choices]

            with ThreadPoolExecutor(len(chats)) as pool:
                answers[cached] = list(pool.map(ask, range(len(chats))))
        finally:
            live.stop()
        computed[cached] = engine.prefill_tokens_computed
    assert answers[True] == answers[False]
    assert computed[True] < computed[False] / 3


def test_rows_of_very_different_lengths_are_prefilled_in_groups(model, tok):
    """A short prompt beside a long one is not padded to the long one's width: each computes its own
    columns (with or without the cache), and the answers are those of each prompt alone."""
    off = Engine(model, tok, prefix_cache=False)
    prompts = [SOURCE[:20], SOURCE[:600], SOURCE[30:60]]  # ~250 tokens beside ~10
    together = token_ids(off, prompts, GREEDY)
    short_a, long, short_b = (len(off.encode(p)) for p in prompts)
    assert long > 4 * max(short_a, short_b, 32)
    # the long prompt alone, the two short ones together (each padded to the longer of the two)
    assert off.prefill_tokens_computed == long + 2 * max(short_a, short_b)
    assert together == [token_ids(off, [p], GREEDY)[0] for p in prompts]
