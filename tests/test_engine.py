"""Inference engine: KV-cache decode vs full recompute, sampling filters vs hand computations, beam search,
batching, streaming, scoring and the context-window policy, on a small random-init GPT and a tiny BPE
tokenizer trained on real text (the `json` package's source plus some non-ASCII lines)."""

from __future__ import annotations

import copy
import inspect
import json.decoder
import json.encoder
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.checkpoint import save_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.infer.batch import TextStream
from gptlab.infer.engine import Engine, default_batch_size
from gptlab.infer.fused import _rms_norm, _rotate
from gptlab.infer.sampling import SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p
from gptlab.lora import add_lora
from gptlab.model import GPT, GPTConfig, apply_rotary, rotary_cos_sin
from gptlab.tokenizer import train_tokenizer

MULTILINGUAL = "naïve café, Grüße aus Köln; 日本語のテキスト; emoji 🙂🚀; Ελληνικά; русский текст\n"
PROMPTS = ["def decode(self, s):", "class JSONDecoder", "x", "    return _w(s, end).end() == len(s) and ok"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-64 matmuls gain nothing from threads, and on a shared CPU 2 OpenMP threads waiting on each
    other made small ops 10-100x slower (bench/results/decode.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok():
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder) + MULTILINGUAL * 30
    return train_tokenizer([text], vocab_size=400)


@pytest.fixture(scope="session")
def model(tok):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=96)
    model = GPT(config).eval()
    with torch.no_grad():  # a random init at std 0.02 is nearly uniform; larger weights give clear argmaxes
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model


@pytest.fixture(scope="session")
def engine(model, tok):
    return Engine(model, tok)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def reference_decode(model, ids: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding by full recompute (no cache), penalty applied by hand in float64."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].double().tolist()
            if penalty != 1:
                seen = set(ids)
                logits = [(x / penalty if x > 0 else x * penalty) if t in seen else x for t, x in enumerate(logits)]
            out.append(max(range(len(logits)), key=logits.__getitem__))
            ids.append(out[-1])
    return out


def test_kv_cache_greedy_equals_full_recompute(engine, model):
    for prompt in PROMPTS[:2]:
        got = engine.generate([prompt], greedy(max_new_tokens=25, stop_token_ids=()))[0]
        assert got.finish_reason == "length" and len(got.token_ids) == 25
        assert got.token_ids == reference_decode(model, engine.encode(prompt), 25)


def test_repetition_penalty_hand_computation(engine, model):
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -2.0, 0.0]])
    seen = torch.tensor([[True, True, False, False], [False, True, True, True]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0], [4.0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0], [1.0, 0.25, -8.0, 0.0]]
    # inside the engine: greedy decoding with the penalty equals the hand-penalised full recompute
    prompt = PROMPTS[3]
    plain = engine.generate([prompt], greedy(max_new_tokens=20, stop_token_ids=()))[0]
    got = engine.generate([prompt], greedy(max_new_tokens=20, stop_token_ids=(), repetition_penalty=3.0))[0]
    assert got.token_ids == reference_decode(model, engine.encode(prompt), 20, penalty=3.0)
    assert got.token_ids != plain.token_ids


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    out = filter_top_k(logits, torch.tensor([2, 0]))
    assert out[0].tolist() == [-math.inf, 3.0, 2.0, -math.inf] and out[1].tolist() == logits[1].tolist()
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    kept = filter_top_p(probs.log(), torch.tensor([[0.6], [0.5], [1.0]])).isfinite()
    # smallest set whose mass reaches p: 0.5 + 0.3 >= 0.6; 0.5 alone reaches 0.5; p = 1 keeps everything
    assert kept.tolist() == [[True, True, False], [True, False, False], [True, True, True]]


def test_sampling_limits_equal_greedy(engine):
    reference = engine.generate(PROMPTS[:2], greedy(max_new_tokens=20))
    for params in [SamplingParams(max_new_tokens=20, top_k=1, seed=1),
                   SamplingParams(max_new_tokens=20, top_p=1e-6, seed=2),
                   SamplingParams(max_new_tokens=20, temperature=1e-6, seed=3)]:
        got = engine.generate(PROMPTS[:2], params)
        assert [c.token_ids for c in got] == [c.token_ids for c in reference], params
    hot = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=20, temperature=1.5, seed=4))
    assert [c.token_ids for c in hot] != [c.token_ids for c in reference]


def test_seeded_sampling_is_deterministic(engine):
    def run(seed):
        params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=seed)
        return [c.token_ids for c in engine.generate(PROMPTS, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_strings_and_stop_tokens(engine):
    full = engine.generate([PROMPTS[0]], greedy(max_new_tokens=40, stop_token_ids=()))[0]
    stop = full.text[12:15]
    got = engine.generate([PROMPTS[0]], greedy(max_new_tokens=40, stop_token_ids=(), stop=(stop, "\x00never")))[0]
    assert got.text == full.text[:full.text.index(stop)]
    assert got.finish_reason == "stop" and got.stop == stop
    assert full.token_ids[:len(got.token_ids)] == got.token_ids
    # a stop token ends the row at its first occurrence and is not part of the output
    token = full.token_ids[10]
    got = engine.generate([PROMPTS[0]], greedy(max_new_tokens=40, stop_token_ids=(token,)))[0]
    assert got.token_ids == full.token_ids[:full.token_ids.index(token)]
    assert (got.finish_reason, got.stop) == ("stop", token)


def test_beam_search(engine):
    for prompt in PROMPTS[:3]:
        base = greedy(max_new_tokens=12, stop_token_ids=())
        reference = engine.generate([prompt], base)[0]
        one = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(), num_beams=1,
                                                       temperature=0))[0]
        beam1 = engine.beam_search(prompt, base)
        assert beam1.token_ids == one.token_ids == reference.token_ids
        beam4 = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(), num_beams=4))[0]
        assert len(beam4.token_ids) == 12
        s_greedy, s_beam = engine.score([prompt, prompt], [reference.token_ids, beam4.token_ids])
        assert s_beam.logprob >= s_greedy.logprob - 1e-5
        if beam4.token_ids != reference.token_ids:
            assert not s_beam.is_greedy


def test_beam_search_stops_on_stop_token(engine):
    free = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, stop_token_ids=(), num_beams=1))[0]
    token = free.token_ids[3]
    got = engine.beam_search(PROMPTS[1], SamplingParams(max_new_tokens=12, stop_token_ids=(token,), num_beams=3))
    assert token not in got.token_ids
    assert got.finish_reason == "stop" or len(got.token_ids) == 12


def test_batched_equals_single(engine):
    params = [greedy(max_new_tokens=n, stop_token_ids=stops) for n, stops in
              [(30, ()), (7, ()), (30, None), (18, ())]]
    batched = engine.generate(PROMPTS, params)
    lengths = [len(c.token_ids) for c in batched]
    assert len(set(lengths)) > 1 and len({len(engine.encode(p)) for p in PROMPTS}) > 1
    for prompt, p, got in zip(PROMPTS, params, batched):
        assert got == engine.generate([prompt], p)[0]
    # sampled rows depend only on their own seed (row r uses seed + r), not on their neighbours
    sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, seed=11))
    for r, prompt in enumerate(PROMPTS):
        assert sampled[r] == engine.generate([prompt], SamplingParams(max_new_tokens=20, seed=11 + r))[0]


def test_rows_join_and_leave_between_steps(engine):
    """The continuous-batching path: a request joins a running batch and finishes on its own."""
    p_long, p_short = greedy(max_new_tokens=20, stop_token_ids=()), greedy(max_new_tokens=6, stop_token_ids=())
    batch = engine.prefill([PROMPTS[3]], p_long)
    rows = list(batch.rows)
    for _ in range(4):
        engine.step(batch)
    newcomer = engine.prefill([PROMPTS[2], PROMPTS[0]], [p_short, p_long], first_index=1)
    rows += newcomer.rows
    batch.join(newcomer)
    seen_rows = set()
    while batch.rows:
        seen_rows |= {e.row for e in engine.step(batch)}
    assert seen_rows == {0, 1, 2}
    for row, prompt, p in zip(rows, [PROMPTS[3], PROMPTS[2], PROMPTS[0]], [p_long, p_short, p_long]):
        assert row.completion() == engine.generate([prompt], p)[0]


def test_rows_with_and_without_repetition_penalty_join(engine):
    """Only batches with a penalised row track seen tokens; a join mixes the two, either way round."""
    plain = greedy(max_new_tokens=20, stop_token_ids=())
    penalised = greedy(max_new_tokens=20, stop_token_ids=(), repetition_penalty=3.0)
    # the penalty changes this prompt's greedy output, so a row given the wrong seen tokens would show
    assert engine.generate([PROMPTS[3]], penalised)[0] != engine.generate([PROMPTS[3]], plain)[0]
    for running, joining in (([PROMPTS[0]], [PROMPTS[3]]), ([PROMPTS[3]], [PROMPTS[0]])):
        params = {PROMPTS[0]: plain, PROMPTS[3]: penalised}
        batch = engine.prefill(running, params[running[0]])
        rows = list(batch.rows)
        engine.step(batch)
        newcomer = engine.prefill(joining, params[joining[0]], first_index=1)
        rows += newcomer.rows
        batch.join(newcomer)
        while batch.rows:
            engine.step(batch)
        for row, prompt in zip(rows, running + joining):
            assert row.completion() == engine.generate([prompt], params[prompt])[0]


# ---- fused and compiled decode steps ------------------------------------------------------------------
def tiny_model(tok, seed: int, **overrides) -> GPT:
    """Like the `model` fixture (a fresh one, so a test may change its weights); norm weights and biases
    get noise too, so every weight the fused decoder re-lays out matters."""
    torch.manual_seed(seed)
    sizes = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 16, "intermediate_size": 128,
             "max_seq_len": 96}
    config = GPTConfig(vocab_size=tok.vocab_size, **(sizes | overrides))
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model


RAGGED = [greedy(max_new_tokens=n, stop_token_ids=()) for n in (30, 7, 22, 15)]  # rows leave one by one


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "attn_bias": True}], ids=["llama", "qwen"])
def test_fused_decode_equals_forward_decode(variant, tok):
    model = tiny_model(tok, 1, **variant)
    fused, plain = Engine(model, tok), Engine(model, tok, fused_decode=False)
    got = fused.generate(PROMPTS, RAGGED)  # ragged prompts: left padding and a key mask
    assert fused._decoder is not None and plain._decoder is None
    assert got == plain.generate(PROMPTS, RAGGED)
    beam = SamplingParams(max_new_tokens=12, num_beams=3, stop_token_ids=())
    assert fused.generate(PROMPTS[:2], beam) == plain.generate(PROMPTS[:2], beam)
    # step by step the logits agree to float32 rounding (the transposed weights sum in another order)
    a, b = fused.prefill(PROMPTS, RAGGED[0]), plain.prefill(PROMPTS, RAGGED[0])
    for _ in range(10):
        fused.step(a)
        plain.step(b)
        scale = b.logits.abs().max()
        assert scale > 1 and (a.logits - b.logits).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True, "attn_bias": True}], ids=["llama", "qwen"])
def test_fused_decode_at_batch_1_with_two_threads(variant, tok, monkeypatch):
    """With more than one torch thread a one-row step splits each projection's outputs in two halves
    for bmm (`_Projection`): the same dot products, summed by another kernel, so the logits agree with the
    one-thread step's to float32 rounding and the greedy tokens are the same."""
    model = tiny_model(tok, 2, **variant)
    engine = Engine(model, tok)
    calls, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or bmm(*a))
    logits, tokens = {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            before = len(calls)
            batch = engine.prefill(PROMPTS[:1], RAGGED[0])
            row, steps = batch.rows[0], []
            for _ in range(8):
                engine.step(batch)
                steps.append(batch.logits.clone())
            tokens[threads] = list(row.token_ids)
            assert (len(calls) > before) == (threads > 1)  # the split runs only with several threads
        finally:
            torch.set_num_threads(1)
        logits[threads] = torch.stack(steps)
    scale = logits[1].abs().max()
    assert scale > 1 and (logits[1] - logits[2]).abs().max() <= 1e-5 * scale
    assert tokens[1] == tokens[2]


def test_fused_norm_and_rotary_give_the_models_bits(tok):
    """The decoder's RMSNorm and rotary, written with fewer op calls (fused.py), give exactly the bits of
    F.rms_norm and model.apply_rotary: rows of very different scales, a strided q/k view as the step
    slices it from the fused projection's output, float32 and bfloat16."""
    g = torch.Generator().manual_seed(0)
    rope = tiny_model(tok, 0).rope
    scalars = (torch.tensor(64.0), torch.tensor(1e-5))
    for B in (1, 3):
        for _ in range(20):
            x = torch.randn(B, 64, generator=g) * 10.0 ** torch.randint(-4, 4, (B, 1), generator=g)
            w = torch.randn(64, generator=g)
            assert torch.equal(_rms_norm(x, w, 1e-5, scalars), F.rms_norm(x, (64,), w, 1e-5))
        cos, sin = (t[:, :, 0] for t in rotary_cos_sin(torch.randint(0, 90, (B, 1), generator=g), rope))
        signed_sin = torch.cat([-sin[..., :8], sin[..., 8:]], dim=-1)
        qkv = torch.randn(B, 8 * 16, generator=g)
        qk = qkv[:, :6 * 16].view(B, 6, 16)  # strided when B > 1, as in the step
        assert torch.equal(_rotate(qk, cos, signed_sin), apply_rotary(qk, cos, sin))
        half = qk.to(torch.bfloat16)
        assert torch.equal(_rotate(half, cos, signed_sin), apply_rotary(half, cos, sin))


def test_fused_decoder_follows_weight_updates(tok):
    """A model trained between generate calls (RL) must not decode with a stale copy of its weights."""
    model = tiny_model(tok, 2)
    engine, p = Engine(model, tok), greedy(max_new_tokens=15, stop_token_ids=())
    before = engine.generate(PROMPTS[:2], p)
    with torch.no_grad():  # in place, as an optimizer step does
        for w in model.parameters():
            w.add_(torch.randn_like(w))
    after = engine.generate(PROMPTS[:2], p)
    assert after != before
    assert after == Engine(model, tok, fused_decode=False).generate(PROMPTS[:2], p)


def test_models_with_lora_layers_decode_through_forward(model, tok):
    adapted = copy.deepcopy(model)
    add_lora(adapted, rank=2, alpha=4.0)
    engine = Engine(adapted, tok)
    got = engine.generate(PROMPTS, RAGGED)
    assert engine._decoder is None
    # LoRA's B matrices start at zero, so the adapted model still computes the base model's function
    assert got == Engine(model, tok).generate(PROMPTS, RAGGED)


def test_default_batch_size_is_the_callers_on_cpu(model):
    # the CPU batch sizes every figure in docs/ was measured with (a GPU model gets 256; CI has no GPU)
    assert default_batch_size(model, cpu=16) == 16 and default_batch_size(None, cpu=32) == 32


def test_compiled_decode_equals_eager(tok):
    """compile=True: a static-shape step through torch.compile; a batch of two whose rows leave at different
    steps exercises the batched graph, the single-row graph and the cache trimming in between. One layer:
    compile time grows with the unrolled graph."""
    model, params = tiny_model(tok, 3, n_layer=1), RAGGED[:2]
    compiled = Engine(model, tok, compile=True)
    expected = Engine(model, tok, fused_decode=False).generate(PROMPTS[:2], params)
    assert compiled.generate(PROMPTS[:2], params) == expected
    assert compiled._decoder._compiled is not None
    with pytest.raises(GptlabError, match="fused_decode"):
        Engine(model, tok, fused_decode=False, compile=True)


def test_text_stream_holds_partial_characters_and_stop_prefixes(tok):
    text = "ab 日本語🙂é end"
    stream = TextStream(stop=("end",))
    deltas = []
    for token in tok.encode(text):
        stopped = stream.push(tok.id_to_bytes(token))
        deltas.append(stream.take(final=stopped))
        if stopped:
            break
    assert "".join(deltas) == "ab 日本語🙂é " and stream.matched == "end"
    assert all("\ufffd" not in d for d in deltas)
    byte_stream = TextStream()
    assert [(byte_stream.push(bytes([b])), byte_stream.take())[1] for b in "日".encode()] == ["", "", "日"]
    held = TextStream(stop=("STOP",))
    held.push(b"xx ST")
    assert held.take() == "xx " and held.take(final=True) == "ST"


def test_streaming_equals_generate(engine, tok):
    for seed in range(3):
        params = SamplingParams(max_new_tokens=40, temperature=1.3, seed=seed, stop=("e, ",))
        deltas = list(engine.stream(PROMPTS[1], params))
        completion = engine.generate([PROMPTS[1]], params)[0]
        assert "".join(deltas) == completion.text
        if completion.stop is None:
            assert completion.text == tok.decode(completion.token_ids)
    # a prompt ending mid-way through multi-byte text makes the random model produce non-ASCII bytes
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5, stop_token_ids=())
    prompt = engine.encode(MULTILINGUAL)[:-3]
    events = list(engine.stream_batch([prompt, PROMPTS[0]], params))
    for row in (0, 1):
        completion = engine.generate([prompt, PROMPTS[0]], params)[row]
        assert "".join(e.text for e in events if e.row == row) == completion.text == tok.decode(completion.token_ids)
        assert [e.token_id for e in events if e.row == row] == completion.token_ids


def test_score_matches_float64_log_softmax(engine, model, tok):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    conts = [" return self", "y = 1", tok.encode(" end")]
    scores = engine.score(prompts, conts)
    for prompt, cont, got in zip(prompts, conts, scores):
        p_ids = engine.encode(prompt)
        c_ids = tok.encode(cont) if isinstance(cont, str) else cont
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + c_ids]))[0].double()
        logprobs = logits.log_softmax(-1)[len(p_ids) - 1:-1]
        expected = [logprobs[j, t].item() for j, t in enumerate(c_ids)]
        assert got.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert got.logprob == pytest.approx(sum(expected), abs=1e-4)
        assert got.is_greedy == all(logprobs[j].argmax().item() == t for j, t in enumerate(c_ids))
    greedy_cont = engine.generate([PROMPTS[0]], greedy(max_new_tokens=8, stop_token_ids=()))[0].token_ids
    assert engine.score([PROMPTS[0]], [greedy_cont])[0].is_greedy


def test_context_window_policy(engine, model, tok, caplog):
    window = model.config.max_seq_len
    long_ids = (tok.encode(inspect.getsource(json.decoder)) * 2)[:window + 20]
    params = greedy(max_new_tokens=10, stop_token_ids=())
    with caplog.at_level(logging.WARNING, logger="gptlab.infer.engine"):
        got = engine.generate([long_ids], params)[0]
    assert "exceeds the context window" in caplog.text
    assert got.prompt_tokens == window - 10
    assert got == engine.generate([long_ids[-(window - 10):]], params)[0]
    # a long max_new_tokens reserves at most half the window and generation stops when the window is full
    got = engine.generate([long_ids], greedy(max_new_tokens=500, stop_token_ids=()))[0]
    assert got.prompt_tokens == window // 2 and len(got.token_ids) == window - window // 2
    assert got.finish_reason == "length"
    strict = Engine(model, tok, strict_context=True)
    with pytest.raises(GptlabError, match="context window"):
        strict.generate([long_ids], params)
    with pytest.raises(GptlabError, match="context window"):
        strict.score([long_ids], [[1, 2]])
    assert strict.generate([long_ids[:20]], params)[0] == engine.generate([long_ids[:20]], params)[0]


def test_bad_input_is_a_clear_error(engine):
    for bad in [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"stop": ("",)}]:
        with pytest.raises(GptlabError):
            SamplingParams(**bad)
    with pytest.raises(GptlabError, match="list of prompts"):
        engine.generate("hello")
    with pytest.raises(GptlabError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(GptlabError, match="cannot stream"):
        list(engine.stream("x", SamplingParams(num_beams=2)))


def test_sample_cli_streams_the_completion(engine, model, tok, tmp_path, capsys):
    save_model_dir(tmp_path / "m", model, tok)
    code = cli_main(["sample", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--temperature", "0",
                     "--max-new-tokens", "15", "--stop-token", "<|user_end|>"])
    assert code == 0
    expected = engine.generate([PROMPTS[0]], greedy(max_new_tokens=15, stop_token_ids=(tok.special_id("<|user_end|>"),)))
    assert capsys.readouterr().out == expected[0].text + "\n"
    assert cli_main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
