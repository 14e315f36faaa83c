"""Structured output on SmolLM2-135M-Instruct (49,152-token vocabulary): mask cost, decode speed, grammar
compile time, and how often replies match their JSON Schema with and without constrained decoding.

1. Mask time per token: the engine's masking step (`mask_constrained_logits`: llguidance's bitmask for the
   row, unpacked, applied to the logits) timed on every step of greedy batch-1 generations under a JSON
   Schema; llguidance's `compute_bitmask` alone beside it. Mean and p99 in microseconds.
2. Decode tokens/s at batch 1: each constrained generation, and an unconstrained one of exactly the same
   number of tokens (stop tokens off), repetitions interleaved; decode steps only (prefill excluded).
   Each step is split into the model's forward pass and the rest, since on a shared machine the forward
   pass's time swings more from run to run than the whole constraint cost.
3. Grammar compile time: the first request for each schema (fresh cache) and a cached one (a copy of the
   compiled matcher); the llguidance tokenizer build (once per tokenizer) separately.
4. Validity: SCHEMAS x PROMPTS chat requests (greedy; the same system prompt for every arm: the JSON Schema
   itself, or its keys in words), one batch per arm: constrained (a different schema per row),
   unconstrained + json.loads of the whole reply, unconstrained + apps.structured.parse_json (extraction,
   repair, coercion). Valid = jsonschema-valid.
5. Partial JSON: every prefix of a few documents parsed by json-repair, partial-json-parser and
   `structured.parse_partial`; a value is wrong when the document never passes through it.

    python bench/bench_structured.py --max-new-tokens 96 --reps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
import torch

from gptlab.apps.llm import open_llm
from gptlab.structured import is_partial_of, parse_json, parse_partial
from gptlab.chat import render_for_completion
from gptlab.infer import constraints as constraints_module
from gptlab.infer import engine as engine_module
from gptlab.infer.constraints import Constraint, GrammarCache
from gptlab.infer.sampling import SamplingParams

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                "email": {"type": "string"}},
               "required": ["name", "age", "email"], "additionalProperties": False},
    "weather": {"type": "object", "properties": {"city": {"type": "string"}, "temperature_c": {"type": "number"},
                                                 "conditions": {"enum": ["sunny", "cloudy", "rainy", "snowy"]}},
                "required": ["city", "temperature_c", "conditions"], "additionalProperties": False},
    "todo": {"type": "object", "properties": {"tasks": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"title": {"type": "string"}, "done": {"type": "boolean"}},
        "required": ["title", "done"], "additionalProperties": False}}},
             "required": ["tasks"], "additionalProperties": False},
    "book": {"type": "object", "properties": {"title": {"type": "string"}, "author": {"type": "string"},
                                              "year": {"type": "integer"},
                                              "genres": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
             "required": ["title", "author", "year", "genres"], "additionalProperties": False},
    "sentiment": {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                                   "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
                  "required": ["label", "confidence"], "additionalProperties": False},
}
PROMPTS = {
    "person": ["Alice is a 30 year old engineer, alice@example.com.", "Make up a person.",
               "Bob Smith, 45, reachable at bob@mail.org."],
    "weather": ["It is 21 degrees and sunny in Paris.", "Describe the weather in Oslo in winter.",
                "Rain and 12 C in London today."],
    "todo": ["My tasks: buy milk (done), call mom, write report.", "Plan a small party.",
             "Things to do this weekend."],
    "book": ["1984 by George Orwell, published 1949, dystopian fiction.", "Recommend a fantasy book.",
             "Pride and Prejudice by Jane Austen."],
    "sentiment": ["I loved this movie, it was wonderful!", "The food was cold and late.",
                  "The package arrived on Tuesday."],
}
PARTIAL_DOCS = [SCHEMAS["todo"], {"tasks": [{"title": "buy milk", "done": True}, {"title": "é\"\\", "done": False}],
                                  "n": -12.5e2, "x": None}, [1, 22, "s", [], {}]]


def describe_keys(schema: dict) -> str:
    """The schema's top-level keys in words, e.g. 'name (string), age (integer)'."""
    def kind(spec):
        if "enum" in spec:
            return "one of " + "/".join(spec["enum"])
        if spec.get("type") == "array":
            items = spec["items"]
            return "array of " + ("objects with " + describe_keys(items) if "properties" in items else items["type"])
        return spec["type"]
    return ", ".join(f"{key} ({kind(spec)})" for key, spec in schema["properties"].items())


def chat_ids(llm, schema_name: str, prompt: str, style: str = "schema") -> list[int]:
    """The chat prompt: the JSON Schema itself in the system prompt, or (style "keys") its keys in words."""
    schema = SCHEMAS[schema_name]
    if style == "schema":
        system = "Reply with only a JSON object matching this JSON schema: " + json.dumps(schema)
    else:
        system = "Reply with only a JSON object with the keys " + describe_keys(schema) + "."
    return render_for_completion(llm.tokenizer, [{"role": "system", "content": system},
                                                 {"role": "user", "content": prompt}])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_steps(engine, ids, params) -> tuple[list[float], int]:
    """Per-step seconds of one generation (prefill excluded) and its token count."""
    batch = engine.prefill([ids], params)
    row, times = batch.rows[0], []
    while batch.rows:
        start = time.perf_counter()
        engine.step(batch)
        times.append(time.perf_counter() - start)
    return times, len(row.token_ids)


def mask_and_speed(llm, args) -> list[str]:
    engine = llm.engine
    mask_times, bitmask_times, forward_times = [], [], []

    def timing(function, into):
        def timed(*a):
            start = time.perf_counter()
            result = function(*a)
            into.append(time.perf_counter() - start)
            return result
        return timed

    real_mask, real_fill = engine_module.mask_constrained_logits, constraints_module.ConstraintState.fill_bitmask
    engine_module.mask_constrained_logits = timing(real_mask, mask_times)
    constraints_module.ConstraintState.fill_bitmask = timing(real_fill, bitmask_times)
    engine._decode = timing(engine._decode, forward_times)  # the model's forward pass of a decode step
    runs = {"unconstrained": [], "constrained": []}  # (tokens, step seconds, forward seconds) per run
    try:
        for rep in range(args.reps):
            for name in ("person", "book"):
                ids = chat_ids(llm, name, PROMPTS[name][0])
                constrained = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                                             constraint=Constraint.json_schema(SCHEMAS[name]))
                n = None
                for arm, params in (("constrained", constrained), ("unconstrained", None)):
                    params = params or SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
                    forward_times.clear()
                    times, n = timed_steps(engine, ids, params)
                    runs[arm].append((n, sum(times), sum(forward_times)))
    finally:
        engine_module.mask_constrained_logits = real_mask
        constraints_module.ConstraintState.fill_bitmask = real_fill
        del engine._decode
    us = [t * 1e6 for t in mask_times]
    bus = [t * 1e6 for t in bitmask_times]
    lines = ["| measure | mean µs | p99 µs | steps |", "|---|---|---|---|",
             f"| whole mask step (bitmask + unpack + apply) | {statistics.mean(us):.0f} | {percentile(us, 0.99):.0f} | {len(us)} |",
             f"| llguidance compute_bitmask alone | {statistics.mean(bus):.0f} | {percentile(bus, 0.99):.0f} | {len(bus)} |",
             "", "| decode at batch 1 | tokens/s (median of runs) | ms per step | of which model forward | rest of the step (sampling, mask, matcher) | runs |",
             "|---|---|---|---|---|---|"]
    for arm, results in runs.items():
        per_step = [(step / n * 1e3, forward / n * 1e3) for n, step, forward in results]
        lines.append(f"| {arm} | {statistics.median(n / step for n, step, _ in results):.1f} | "
                     f"{statistics.median(s for s, _ in per_step):.1f} | {statistics.median(f for _, f in per_step):.1f} | "
                     f"{statistics.median(s - f for s, f in per_step):.2f} | {len(results)} |")
    return lines


def compile_times(llm) -> list[str]:
    cache = GrammarCache()
    start = time.perf_counter()
    cache.lltokenizer(llm.tokenizer)
    lines = [f"llguidance tokenizer for the 49,152-token vocabulary: {time.perf_counter() - start:.2f} s (once per "
             "tokenizer)", "", "| schema | first request ms | cached ms |", "|---|---|---|"]
    for name, schema in SCHEMAS.items():
        constraint = Constraint.json_schema(schema)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            cache.matcher(llm.tokenizer, constraint)
            times.append((time.perf_counter() - start) * 1e3)
        lines.append(f"| {name} | {times[0]:.1f} | {times[1]:.2f} |")
    return lines


def validity(llm, args, style: str) -> list[str]:
    engine = llm.engine
    jobs = [(name, prompt) for name in SCHEMAS for prompt in PROMPTS[name]]
    ids = [chat_ids(llm, name, prompt, style) for name, prompt in jobs]
    start = time.perf_counter()
    constrained = engine.generate(ids, [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                                                       constraint=Constraint.json_schema(SCHEMAS[name]))
                                        for name, _ in jobs])
    free = engine.generate(ids, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0))
    seconds = time.perf_counter() - start

    def valid(value, name) -> bool:
        return jsonschema.validators.validator_for(SCHEMAS[name])(SCHEMAS[name]).is_valid(value)

    def loads(text):
        try:
            return json.loads(text), True
        except json.JSONDecodeError:
            return None, False

    counts = {"constrained": 0, "json.loads": 0, "parse_json": 0}
    cut = [f"{name} / {prompt!r}" for (name, prompt), c in zip(jobs, constrained) if c.finish_reason == "length"]
    examples = []
    for (name, prompt), c, f in zip(jobs, constrained, free):
        value, parsed_ok = loads(c.text)
        counts["constrained"] += parsed_ok and valid(value, name)
        value, parsed_ok = loads(f.text)
        counts["json.loads"] += parsed_ok and valid(value, name)
        repaired = parse_json(f.text, SCHEMAS[name])
        counts["parse_json"] += repaired.ok
        if prompt == PROMPTS[name][0]:
            examples.append(f"- {name} / {prompt!r}: constrained `{c.text[:100]}`; unconstrained "
                            f"`{' '.join(f.text.split())[:100]}` -> parse_json ok={repaired.ok}")
    n = len(jobs)
    return [f"{n} requests ({len(SCHEMAS)} schemas x {n // len(SCHEMAS)} prompts), greedy, max_new_tokens "
            f"{args.max_new_tokens}, two batches of {n}: {seconds:.0f} s", "",
            "| arm | schema-valid |", "|---|---|"] + [
        f"| {arm} | {k}/{n} ({k / n:.0%}) |" for arm, k in (("constrained decoding", counts["constrained"]),
                                                         ("unconstrained + json.loads", counts["json.loads"]),
                                                         ("unconstrained + parse_json", counts["parse_json"]))] + [
        "", f"constrained rows that hit max_new_tokens (finish_reason length, counted invalid): {len(cut)} "
        f"{'(' + '; '.join(cut) + ')' if cut else ''}", "", "First prompt of each schema:", *examples]


def partial_parsers() -> list[str]:
    from json_repair import repair_json
    import partial_json_parser

    parsers = {"json-repair `repair_json(return_objects=True)`": lambda s: repair_json(s, return_objects=True),
               "partial-json-parser `loads` (defaults)": partial_json_parser.loads,
               "structured.parse_partial (partial-json-parser, partial numbers held back)": parse_partial}
    lines = ["| parser | prefixes | value shown | wrong value | example of a wrong value |", "|---|---|---|---|---|"]
    for label, parse in parsers.items():
        total = shown = wrong = 0
        example = ""
        for doc in PARTIAL_DOCS:
            for text in (json.dumps(doc), json.dumps(doc, indent=2)):
                for i in range(1, len(text) + 1):
                    total += 1
                    try:
                        value = parse(text[:i])
                    except Exception:  # a parser that raises on a prefix shows nothing there
                        continue
                    if value is None or value == "":
                        continue
                    shown += 1
                    if not is_partial_of(value, doc):
                        wrong += 1
                        example = example or f"`{text[max(0, i - 12):i]}` -> `{json.dumps(value)[-40:]}`"
        lines.append(f"| {label} | {total} | {shown} | {wrong} | {example} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-validity", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = open_llm(args.model)
    started = time.perf_counter()
    sections = [("Partial JSON parsers on every prefix", partial_parsers()),
                ("Grammar compile time", compile_times(llm)),
                ("Mask time and decode speed (batch 1)", mask_and_speed(llm, args))]
    if not args.skip_validity:
        sections.append(("Schema validity, the JSON Schema in the system prompt", validity(llm, args, "schema")))
        sections.append(("Schema validity, the keys in words in the system prompt", validity(llm, args, "keys")))
    for title, lines in sections:
        print(f"## {title}\n\n" + "\n".join(lines) + "\n")
    print(f"total {time.perf_counter() - started:.0f} s, torch threads {args.threads}")


if __name__ == "__main__":
    main()
