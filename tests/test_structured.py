"""Structured output: constrained decoding (llguidance masks in the engine) on a small random-init GPT and a
tiny BPE tokenizer trained on real text, checked against jsonschema / re / the choice list over many seeds;
defensive JSON parsing (gptlab.structured) against json.loads and jsonschema."""

from __future__ import annotations

import inspect
import json
import json.decoder
import json.encoder
import re

import jsonschema
import pytest
import torch

from gptlab.common import GptlabError
from gptlab.infer.constraints import GRAMMARS, MAX_SOURCE_BYTES, Constraint
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

PROMPTS = ["def decode(self, s):", "class JSONDecoder", "x", "    return _w(s, end).end() == len(s) and ok"]
SEEDS = range(6)
HELLO_MESSAGES = [{"role": "user", "content": "Hi"}]

# bounded fields, so a random model finishes the object within max_new_tokens (200): at most ~150 bytes
# even with every name character a \u escape, and every token is at least one byte
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 99},
                         "tag": {"enum": ["red", "green", "blue"]}, "name": {"type": "string", "maxLength": 6},
                         "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "maxItems": 3}},
          "required": ["ok", "n", "tag", "name", "xs"], "additionalProperties": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    return train_tokenizer([text], vocab_size=400)


@pytest.fixture(scope="module")
def engine(tok):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=256)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than the init: clear argmaxes, far from uniform sampling
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return Engine(model, tok)


def sampled(constraint, n=200, **kw) -> list[SamplingParams]:
    """One row per seed (row r of a call uses seed + r, so every row samples differently)."""
    return [SamplingParams(max_new_tokens=n, temperature=1.0, seed=0, constraint=constraint, **kw) for _ in SEEDS]


# ---- constrained decoding ------------------------------------------------------------------------------
def test_json_schema_output_always_validates(engine):
    completions = engine.generate([PROMPTS[0]] * len(SEEDS), sampled(Constraint.json_schema(SCHEMA)))
    assert len({c.text for c in completions}) > 1  # really different samples, not one trajectory
    for c in completions:
        assert (c.finish_reason, c.stop) == ("stop", None), c
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_regex_lark_and_choices(engine):
    options = ["alpha", "beta", "gamma delta", "é"]
    lark = 'start: greeting " " NAME "!"\ngreeting: "hi" | "hello"\nNAME: /[a-z]{1,6}/'
    # (constraint, valid, max_new_tokens, bounded: every output finishes well within max_new_tokens)
    checks = [(Constraint.json_object(), lambda t: isinstance(json.loads(t), dict), 100, False),
              (Constraint.regex(r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t), 40, True),
              (Constraint.lark(lark), lambda t: re.fullmatch(r"(hi|hello) [a-z]{1,6}!", t), 40, True),
              (Constraint.choice(options), lambda t: t in options, 40, True)]
    for constraint, valid, n, bounded in checks:
        completions = engine.generate(PROMPTS[:2] * 3, sampled(constraint, n=n))
        finished = [c for c in completions if c.finish_reason == "stop"]
        # any JSON object has unbounded strings, which a random model may never close: those rows must be
        # honest "length" rows with n tokens
        assert len(finished) == len(completions) if bounded else finished, (constraint.kind, completions)
        for c in finished:
            # ended by the grammar (stop None) or, where it may end, by the stop token
            assert valid(c.text) and c.stop in (None, *engine.default_stop_ids), (constraint.kind, c)
        for c in completions:
            if c.finish_reason == "length":
                assert len(c.token_ids) == n


def test_unconstrained_rows_unchanged_by_constrained_neighbours(engine):
    constraint = Constraint.json_schema(SCHEMA)
    for temperature in (0.0, 1.0):
        free = SamplingParams(max_new_tokens=30, temperature=temperature, seed=100, stop_token_ids=())
        # rows 0 and 2 constrained; row r samples with seed + r, as it does alone with seed 100 + r
        params = [SamplingParams(max_new_tokens=200, temperature=temperature, seed=100, constraint=constraint),
                  free, SamplingParams(max_new_tokens=150, temperature=temperature, seed=100,
                                          constraint=Constraint.regex("[a-c]{5,40}")), free]
        batched = engine.generate(PROMPTS, params)
        for r in (1, 3):
            alone = engine.generate([PROMPTS[r]], SamplingParams(max_new_tokens=30, temperature=temperature,
                                                                 seed=100 + r, stop_token_ids=()))[0]
            assert batched[r] == alone
        assert batched[1].text and not batched[1].text.startswith("{")
        jsonschema.validate(json.loads(batched[0].text), SCHEMA)
        assert re.fullmatch("[a-c]{5,40}", batched[2].text)


def test_packed_mask_matches_llguidance_bit_by_bit(tok):
    """StepMasks (word operations on the packed bitmask, one byte-table gather and add) against a per-id
    reference read from llguidance's own compute_bitmask bytes, prefetched (alone, and with the rows, the
    engine's way) and in line, with padding ids past the model's vocabulary, stop tokens allowed exactly
    where the grammar may end, and an unconstrained neighbour left untouched; the list of allowed ids kept
    where they fit in FEW_WORDS words is exactly that set."""
    from types import SimpleNamespace

    from gptlab.infer import constraints
    from gptlab.infer.batch import TextStream

    n_real, width = tok.vocab_size - 3, tok.vocab_size + 5  # the model lacks 3 ids and pads 5 more
    stop = tok.vocab_size - 10
    generator = torch.Generator().manual_seed(0)
    for overlap, with_rows in ((True, False), (True, True), (False, False)):
        constraints.OVERLAP_MASKS = overlap
        try:
            states = [constraints.ConstraintState(c, tok, {stop}, n_real, width)
                      for c in (Constraint.json_schema(SCHEMA), Constraint.regex("[a-c]{2,9}"))]
            rows = [SimpleNamespace(constraint=state, params=SamplingParams(), stop_ids={stop}, stream=TextStream())
                    for state in (states[0], None, states[1])]
            few_seen = 0
            for step in range(12):
                job = constraints.prefetch_masks(states, list(rows) if with_rows else None)
                logits = torch.randn(3, width, generator=generator)
                before = logits.clone()
                masks = constraints.StepMasks.of(rows, job)
                assert (job is not None and job.masks is masks) == with_rows  # the worker's StepMasks, used
                masks.apply(logits, masks.live)
                assert masks.failed == {} and masks.live == [0, 2]
                assert torch.equal(logits[1], before[1])
                for state, k in zip(states, (0, 2)):
                    packed = state.matcher.deep_copy().compute_bitmask()
                    expected = {t for t in range(min(tok.vocab_size, n_real)) if packed[t // 8] >> (t % 8) & 1}
                    expected = (expected | {stop}) if state.accepting else (expected - {stop})
                    finite = set(torch.isfinite(logits[k]).nonzero()[:, 0].tolist())
                    assert finite == expected and finite
                    few = len({t // 32 for t in expected}) <= constraints.FEW_WORDS
                    assert masks.few[k] == (tuple(sorted(expected)) if few else None)
                    few_seen += few
                    assert torch.equal(logits[k, sorted(finite)], before[k, sorted(finite)])
                    choice = sorted(finite - {stop})
                    if not choice or state.consume(choice[step * 7 % len(choice)]):
                        break
                else:
                    continue
                break
            assert few_seen  # the short list was exercised
        finally:
            constraints.OVERLAP_MASKS = True


def test_accept_first_greedy_matches_masking_first(engine, monkeypatch):
    """Greedy rows sample accept-first (the mask applied only when the argmax is refused); the outputs must
    be token for token those of masking every row before sampling."""
    from gptlab.infer.sampling import SamplingParams as Params

    constraints = [Constraint.json_schema(SCHEMA), Constraint.regex(r"[0-9]{3}-[a-z]{2,4}"),
                   Constraint.choice(["alpha", "beta", "gamma delta"])]
    params = [SamplingParams(max_new_tokens=120, temperature=0, constraint=c) for c in constraints] * 2
    prompts = [p for p in PROMPTS[:2] for _ in constraints]
    before = engine.constrained_resampled
    accept_first = engine.generate(prompts, params)
    assert engine.constrained_resampled > before  # the fallback really ran
    monkeypatch.setattr(Params, "accept_first", property(lambda self: False))
    assert engine.generate(prompts, params) == accept_first


def test_forced_tokens_of_sampled_rows_follow_the_grammar(engine):
    """A refused draw where the mask allows one token (StepMasks.few) takes that token without touching the
    logits: sampled rows (temperature 1.5, different seeds) held to one option write exactly it."""
    option = "gamma delta epsilon"
    params = [SamplingParams(max_new_tokens=40, temperature=1.5, seed=s, constraint=Constraint.choice([option]))
              for s in range(4)]
    before = engine.constrained_resampled
    outputs = engine.generate(PROMPTS[:1] * 4, params)
    assert engine.constrained_resampled > before
    assert [c.text for c in outputs] == [option] * 4


def test_accept_first_sampling_draws_the_masked_distribution(tok):
    """Sampling a constrained row accept-first (draw from the unmasked logits; when the token is refused,
    mask and draw again) must give the masked distribution p(a) / p(allowed). The first token of 3,000 rows
    (seeds 0..2999) against the exact masked softmax of the model's logits: every token's frequency within
    5 standard errors, and both the accepted and the redrawn path taken."""
    torch.manual_seed(1)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=64)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)  # a spread-out but not uniform next-token distribution
    engine = Engine(model, tok)
    prompt = PROMPTS[1]
    probe = engine.prefill([prompt], SamplingParams(max_new_tokens=1, temperature=0))
    probs = probe.logits[0].double().softmax(dim=-1)
    # choices: the most likely whole-token texts until they hold ~40% of the mass (the grammar also
    # allows their prefixes' tokens), so a good share of the draws is refused
    options, mass = [], 0.0
    for t in probs.argsort(descending=True).tolist():
        text = tok.decode([t])
        if t in engine.default_stop_ids or not text.strip() or "\ufffd" in text or text in options:
            continue
        options.append(text)
        mass += float(probs[t])
        if mass >= 0.4:
            break
    constraint = Constraint.choice(options)
    packed = GRAMMARS.matcher(tok, constraint).compute_bitmask()  # llguidance's own first mask
    allowed = [t for t in range(tok.vocab_size) if packed[t // 8] >> (t % 8) & 1]
    target = probs[allowed] / probs[allowed].sum()
    n = 3000
    before = (engine.constrained_tokens, engine.constrained_resampled)
    batch = engine.prefill([prompt] * n, SamplingParams(max_new_tokens=1, temperature=1.0, seed=0,
                                                        constraint=constraint))
    first = [event.token_id for event in engine.step(batch)]
    assert engine.constrained_tokens - before[0] == n
    redrawn = engine.constrained_resampled - before[1]
    assert 0.2 * n < redrawn < 0.9 * n, redrawn
    counts = torch.bincount(torch.tensor(first), minlength=tok.vocab_size).double() / n
    assert set(first) <= set(allowed)
    sigma = (target * (1 - target) / n).sqrt()
    assert ((counts[allowed] - target).abs() <= 5 * sigma + 1 / n).all()


def test_constrained_rows_join_and_leave_a_running_batch(engine):
    """The continuous-batching path: each row carries its own matcher through DecodeBatch.join / keep."""
    regex = SamplingParams(max_new_tokens=40, temperature=0, constraint=Constraint.regex("[a-z]{3}-[0-9]{3,9}"))
    schema = SamplingParams(max_new_tokens=200, temperature=1.0, seed=7, constraint=Constraint.json_schema(SCHEMA))
    batch = engine.prefill([PROMPTS[0]], schema)
    rows = list(batch.rows)
    for _ in range(3):
        engine.step(batch)
    newcomer = engine.prefill([PROMPTS[2]], regex, first_index=1)
    rows += newcomer.rows
    batch.join(newcomer)
    while batch.rows:
        engine.step(batch)
    assert rows[0].completion() == engine.generate([PROMPTS[0]], schema)[0]
    assert rows[1].completion() == engine.generate([PROMPTS[2]], regex)[0]
    assert re.fullmatch("[a-z]{3}-[0-9]{3,9}", rows[1].completion().text)


def test_streaming_and_stop_strings(engine, tok):
    constraint = Constraint.json_schema(SCHEMA)
    params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=3, constraint=constraint)
    assert "".join(engine.stream(PROMPTS[1], params)) == engine.generate([PROMPTS[1]], params)[0].text
    # a stop string ends a constrained row like any other (named in `stop`); the text is cut before it
    cut = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=40, temperature=0,
                                                       constraint=Constraint.regex("[0-9]{2},[a-z]{2}"),
                                                       stop=(",",)))[0]
    assert (cut.finish_reason, cut.stop) == ("stop", ",") and re.fullmatch("[0-9]{2}", cut.text)


def test_length_inside_an_object_is_reported(engine, tok):
    schema = {"type": "object", "properties": {"description": {"type": "string"}, "quantity": {"type": "integer"}},
              "required": ["description", "quantity"], "additionalProperties": False}
    shortest = '{"description": "", "quantity": 0}'
    longest_token = max(len(tok.id_to_bytes(i)) for i in range(tok.vocab_size - len(tok.special_tokens)))
    n = 2
    assert n * longest_token < len(shortest)  # 2 tokens cannot hold a complete object
    for c in engine.generate([PROMPTS[0]] * 3, sampled(Constraint.json_schema(schema), n=n)[:3]):
        assert c.finish_reason == "length" and len(c.token_ids) == n
        assert shortest.startswith(c.text[:2]) and c.text.startswith('{"')
        with pytest.raises(json.JSONDecodeError):
            json.loads(c.text)


def test_dead_end_grammars_raise_instead_of_hanging(engine):
    # after "a" the grammar needs <|endoftext|>, which is this row's stop token: allowed only where the
    # grammar may end, so no token is left
    with pytest.raises(GptlabError, match="admits no token"):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, constraint=Constraint.lark(
            'start: "a" <|endoftext|>')))
    # step by step (what the server's scheduler calls), only that row ends, with finish_reason "error"
    batch = engine.prefill([PROMPTS[0], PROMPTS[0]], [
        SamplingParams(max_new_tokens=20, constraint=Constraint.lark('start: "a" <|endoftext|>')),
        SamplingParams(max_new_tokens=6, temperature=0)])
    events = []
    while batch.rows:
        events += engine.step(batch)
    failed = [e for e in events if e.row == 0]
    assert [e.finish_reason for e in failed] == [None, "error"] and "admits no token" in failed[-1].error
    assert [e.finish_reason for e in events if e.row == 1] == [None] * 5 + ["length"]
    # a grammar with no finite string: llguidance's matcher fails, reported as an error
    with pytest.raises(GptlabError, match="constraint lark"):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50, constraint=Constraint.lark(
            'start: "a" x\nx: "b" x')))


@pytest.mark.parametrize("make, expected", [
    (lambda: Constraint.json_schema({"type": "strin"}), "invalid JSON schema at $.type"),
    (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.json_schema([1]), "is an object"),
    (lambda: Constraint.choice([]), "non-empty list"),
    (lambda: Constraint.regex("x" * (MAX_SOURCE_BYTES + 1)), f"the limit is {MAX_SOURCE_BYTES}"),
    (lambda: Constraint.from_response_format({"type": "xml"}), "response_format type"),
])
def test_bad_constraints_are_one_line_errors(make, expected):
    with pytest.raises(GptlabError, match=re.escape(expected)) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("constraint, expected", [
    (Constraint.json_schema({"not": {"type": "string"}}), 'Unimplemented keys: ["not"]'),
    (Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 2}), "Unsatisfiable schema"),
    (Constraint.regex("a[b"), "unclosed character class"),
    (Constraint.lark("start: foo"), 'unknown name: "foo"'),
])
def test_uncompilable_constraints_fail_at_prefill(engine, constraint, expected):
    with pytest.raises(GptlabError, match=re.escape(expected)) as info:
        engine.prefill([PROMPTS[0]], SamplingParams(constraint=constraint))
    assert "\n" not in str(info.value) and "cannot compile" in str(info.value)


def test_compile_cache_and_beam_search_refused(engine):
    constraint = Constraint.regex("[0-9]{4}")  # a pattern no other test compiles
    misses, hits = GRAMMARS.misses, GRAMMARS.hits
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, temperature=0, constraint=constraint))
    assert (GRAMMARS.misses, GRAMMARS.hits) == (misses + 1, hits + 1)  # compiled once, copied for row 2
    assert Constraint.regex("[0-9]{4}") == constraint and hash(Constraint.regex("[0-9]{4}")) == hash(constraint)
    with pytest.raises(GptlabError, match="beam search"):
        SamplingParams(num_beams=2, constraint=constraint)


def test_response_format_round_trip():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert Constraint.from_response_format(fmt) == Constraint.json_schema(schema)
    assert Constraint.from_response_format({"type": "json_object"}) == Constraint.json_object()
    assert Constraint.from_response_format({"type": "text"}) is None
    assert Constraint.json_object().response_format() == {"type": "json_object"}
    assert Constraint.json_schema(schema).response_format()["json_schema"]["schema"] == schema
    with pytest.raises(GptlabError, match="no OpenAI response_format"):
        Constraint.regex("a").response_format()


# ---- defensive parsing ---------------------------------------------------------------------------------
MALFORMED = [  # (reply, the value meant); json.loads fails on every one
    ('```json\n{"a": 1, "b": "x"}\n```', {"a": 1, "b": "x"}),
    ('Here you go: {"a": [1, 2]} Let me know if you need {more}!', {"a": [1, 2]}),
    ('{"a": 1, "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
    ("{'a': 'x', 'b': 'it is'}", {"a": "x", "b": "it is"}),
    ('{"a": 1, // one\n "b": 2 /* two */}', {"a": 1, "b": 2}),
    ("{'a': True, 'b': None, 'c': False}", {"a": True, "b": None, "c": False}),
    ('{"a": "hel', {"a": "hel"}),
    ('Sure!\n```json\n{"a": [1, 2', {"a": [1, 2]}),
]


@pytest.mark.parametrize("reply, meant", MALFORMED)
def test_parse_json_repairs_what_json_loads_rejects(reply, meant):
    from gptlab.structured import parse_json

    with pytest.raises(json.JSONDecodeError):
        json.loads(reply)
    parsed = parse_json(reply)
    assert parsed.ok and parsed.value == meant and parsed.repairs
    if "```" not in reply and "Here you go" not in reply:  # only fences / prose around: still well-formed
        with pytest.raises(GptlabError, match="not well-formed JSON"):
            parse_json(reply, strict=True)


def test_parse_json_valid_input_matches_json_loads():
    from gptlab.structured import parse_json

    for doc in PARTIAL_DOCS:
        text = json.dumps(doc)
        parsed = parse_json(text, strict=True)
        assert parsed.value == json.loads(text) and not parsed.repairs and parsed.ok
    assert parse_json("no json at all").found is False
    with pytest.raises(GptlabError, match="no JSON value"):
        parse_json("no json at all", strict=True)


def test_parse_json_schema_report_and_coercion():
    from gptlab.structured import parse_json

    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["age"]}
    coerced = parse_json('{"age": "42", "ok": "true"}', schema)
    assert coerced.value == {"age": 42, "ok": True} and len(coerced.coercions) == 2 and coerced.ok
    jsonschema.validate(coerced.value, schema)
    with pytest.raises(GptlabError, match=re.escape("$.age: '42' is not of type 'integer' (and 1 more)")):
        parse_json('{"age": "42", "ok": "true"}', schema, strict=True)
    missing = parse_json('{"ok": true}', schema)  # nothing to coerce: the report names the violation
    assert not missing.ok and missing.errors == ["$: 'age' is a required property"]
    with pytest.raises(GptlabError, match="invalid JSON schema"):
        parse_json("{}", {"type": "strin"})


PARTIAL_DOCS = [
    {"name": "Ann", "age": 31, "tags": ["a", "bc"], "ok": True, "x": None, "f": -1.5e3,
     "nested": {"k": [1, {"z": "é\"\\\n"}], "empty": {}, "list": []}},
    [1, 2.5, "s", False, [], {}, [[0]], "日本語"],
    {"": "", "t": True, "n": 0},
]


def test_iter_partial_json_on_every_prefix():
    from gptlab.structured import is_partial_of, iter_partial_json, parse_partial

    for doc in PARTIAL_DOCS:
        for text in (json.dumps(doc), json.dumps(doc, indent=2, ensure_ascii=False)):
            for i in range(1, len(text) + 1):  # every prefix shows a state the document passes through
                value = parse_partial(text[:i])
                assert value is None or is_partial_of(value, doc), (text[:i], value)
            for size in (1, 3, 7):
                chunks = ["Sure:\n```json\n"] + [text[i:i + size] for i in range(0, len(text), size)] + ["\n```"]
                values = list(iter_partial_json(chunks))
                assert values[-1] == doc and all(is_partial_of(v, doc) for v in values)
                assert all(a != b for a, b in zip(values, values[1:])) and len(values) >= 3
    # the invariant is not vacuous: wrong states are told apart
    assert not is_partial_of({"na": ""}, {"name": "x"}) and not is_partial_of("tr", True)
    assert not is_partial_of({"f": 1}, {"f": 15}) and is_partial_of({"s": "ab"}, {"s": "abc"})


# ---- CLI --------------------------------------------------------------------------------------------------
def test_sample_cli_constraints_and_stream_json(engine, tmp_path, capsys):
    from gptlab.structured import is_partial_of
    from gptlab.checkpoint import save_model_dir
    from gptlab.cli import main as cli_main

    save_model_dir(tmp_path / "m", engine.model, engine.tokenizer)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    base = ["sample", "--model", str(tmp_path / "m"), "--prompt", PROMPTS[0], "--max-new-tokens", "200",
            "--seed", "5"]
    assert cli_main(base + ["--json-schema", str(tmp_path / "schema.json")]) == 0
    text = capsys.readouterr().out
    expected = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, seed=5,
                                                            constraint=Constraint.json_schema(SCHEMA)))[0].text
    assert text == expected + "\n"
    assert cli_main(base + ["--json-schema", str(tmp_path / "schema.json"), "--stream-json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == json.loads(expected) and all(is_partial_of(v, lines[-1]) for v in lines)
    assert cli_main(base + ["--choices", "yes,no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    (tmp_path / "g.lark").write_text('start: "n=" /[0-9]{2}/')
    assert cli_main(base + ["--grammar", str(tmp_path / "g.lark")]) == 0
    assert re.fullmatch(r"n=[0-9]{2}\n", capsys.readouterr().out)
    (tmp_path / "bad.json").write_text('{"type": "strin"}')
    assert cli_main(base + ["--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "invalid JSON schema at $.type" in capsys.readouterr().err


# ---- LLM client -------------------------------------------------------------------------------------------
def test_local_llm_enforces_response_format_and_constraints(tmp_path):
    from _serve_helpers import make_model_dir
    from gptlab.apps.llm import open_llm

    llm = open_llm(str(make_model_dir(tmp_path / "tiny", max_seq_len=256)))
    messages = [{"role": "user", "content": "Describe a colour."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    for reply in llm.chat(messages, max_tokens=200, temperature=1.0, seed=1, n=3, response_format=fmt):
        assert reply.finish_reason == "stop"
        jsonschema.validate(json.loads(reply.text), SCHEMA)
    streamed = "".join(llm.stream_chat(messages, max_tokens=20, constraint=Constraint.regex("[a-z]{3,8}")))
    assert re.fullmatch("[a-z]{3,8}", streamed)
    with pytest.raises(GptlabError, match="not both"):
        llm.chat(messages, response_format={"type": "json_object"}, constraint=Constraint.json_object())


def test_http_llm_sends_response_format(monkeypatch):
    import httpx
    import openai

    from gptlab.apps.llm import open_llm

    bodies = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                                          "owned_by": "x"}]})
        bodies.append(json.loads(request.content))
        choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if request.url.path.endswith("/chat/completions"):
            choice["message"] = {"role": "assistant", "content": '{"a": 1}'}
        else:
            choice["text"] = '{"a": 1}'
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                         "choices": [choice]})

    real = openai.OpenAI
    monkeypatch.setattr(openai, "OpenAI", lambda **kw: real(**kw, http_client=httpx.Client(
        transport=httpx.MockTransport(answer))))
    llm = open_llm(base_url="http://test.invalid/v1", max_retries=0)
    assert llm.chat(HELLO_MESSAGES, response_format={"type": "json_object"})[0].text == '{"a": 1}'
    assert bodies[-1]["response_format"] == {"type": "json_object"}
    llm.complete("x", constraint=Constraint.json_schema(SCHEMA))
    assert bodies[-1]["response_format"]["json_schema"]["schema"] == SCHEMA
    llm.chat(HELLO_MESSAGES)
    assert "response_format" not in bodies[-1]
    with pytest.raises(GptlabError, match="regex constraint has no OpenAI response_format"):
        llm.chat(HELLO_MESSAGES, constraint=Constraint.regex("[0-9]+"))

