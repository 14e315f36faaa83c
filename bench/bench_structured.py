"""Structured output on SmolLM2-135M-Instruct (49,152-token vocabulary): mask cost, decode speed, grammar
compile time, schema validity with and without constrained decoding, and defensive parsing.

The schemas and prompts are bench/data/structured_schemas.json: 21 JSON Schemas of increasing difficulty
(enums, numbers with bounds, patterns, arrays with bounds, optional keys, nested objects, anyOf) x 10
prompts each.

1. Mask time per token and decode tokens/s at batch 1 and 8, in one run: constrained rows (a different
   schema per row) as the engine runs them (next mask computed in a worker thread beside the forward pass,
   accept-first sampling: the mask applied only to a row whose sampled token it refuses), the same with
   the mask applied to every row before sampling (session 11's engine), and unconstrained rows of exactly
   the same lengths (stop tokens off). Mask time = everything the engine does for the constraints in a
   decode step's critical path (`Engine._mask_first` + `Engine._resample_rejected`: waiting for the
   prefetched bitmask, fix-ups, bit tests, and on refused tokens the mask applied and the row sampled
   again), per row-token; "redrawn" = share of constrained row-steps whose first draw was refused.
   Decode steps only (prefill excluded).
2. Grammar compile time: the first request for each schema (fresh cache) and a cached one (a copy of the
   compiled matcher); the llguidance tokenizer build (once per tokenizer) separately.
3. Validity: chat requests (greedy; the JSON Schema in the system prompt) for --prompts prompts of every
   schema: constrained (a different schema per row), unconstrained + json.loads of the whole reply,
   unconstrained + structured.parse_json (extraction, repair, coercion). Valid = jsonschema-valid.
4. Defensive parsing: the malformed replies of bench/data/json_replies.jsonl (collect_json_corpus.py) and
   hand-made edge cases: json.loads vs parse_json; partial JSON on every prefix of valid documents.

    python bench/bench_structured.py --prompts 10 --max-new-tokens 128 --reps 3    # full size
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import torch

from collect_json_corpus import chat_ids
from gptlab.apps.llm import open_llm
from gptlab.structured import is_partial_of, parse_json, parse_partial
from gptlab.infer import constraints as constraints_module
from gptlab.infer.constraints import Constraint, GrammarCache
from gptlab.infer.sampling import SamplingParams

DATA = Path(__file__).parent / "data"
ACCEPT_FIRST = SamplingParams.__dict__["accept_first"]  # the property, restored after the "mask every row" arm
ENTRIES = json.loads((DATA / "structured_schemas.json").read_text())
SCHEMAS = {e["name"]: e["schema"] for e in ENTRIES}
PROMPTS = {e["name"]: e["prompts"] for e in ENTRIES}
PARTIAL_DOCS = [*SCHEMAS.values(), {"tasks": [{"title": "buy milk", "done": True}, {"title": "é\"\\", "done": False}],
                                    "n": -12.5e2, "x": None}, [1, 22, "s", [], {}]]
# malformed shapes seen in the wild, written by hand: (reply, the value meant)
EDGE_CASES = [
    ('```json\n{"a": 1}\n```', {"a": 1}), ('Sure! Here it is: {"a": 1} Hope that helps.', {"a": 1}),
    ('{"a": 1,}', {"a": 1}), ("{'a': 'x'}", {"a": "x"}), ('{"a": True, "b": None}', {"a": True, "b": None}),
    ('{"a": 1 // one\n}', {"a": 1}), ('{"a": [1, 2, 3', {"a": [1, 2, 3]}), ('{"a": "unterminated', {"a": "unterminated"}),
    ('{a: 1}', {"a": 1}), ('{"a": 1} {"b": 2}', {"a": 1}), ('[1, 2,]', [1, 2]), ('{"a": "x" "b": 2}', {"a": "x", "b": 2}),
    ('```\n{"a": {"b": [true, false]}}\n```', {"a": {"b": [True, False]}}), ('{"a": 1}\n```', {"a": 1}),
    ('The answer:\n```json\n{"a": "q\\"x"}', {"a": 'q"x'}), ('{"a": .5}', {"a": 0.5}),
    ('{"a":\n  "line\nbreak"}', {"a": "line\nbreak"}), ("{'a': [\"x\", 'y']}", {"a": ["x", "y"]}), ('{"a": 1}}', {"a": 1}),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mask_and_speed(llm, args) -> list[str]:
    """Section 1: per arm and batch size, mask µs per token (mean, p99), redrawn share, decode tokens/s."""
    engine = llm.engine
    mask_times, forward_times = [], []

    def timing(function, into):
        def timed(*a):
            start = time.perf_counter()
            result = function(*a)
            into.append(time.perf_counter() - start)
            return result
        return timed

    engine._mask_first = timing(engine._mask_first, mask_times)
    engine._resample_rejected = timing(engine._resample_rejected, mask_times)
    engine._decode = timing(engine._decode, forward_times)
    names = list(SCHEMAS)
    rows = []
    try:
        for batch_size in (1, 8):
            results = {"constrained, accept-first (default)": [], "constrained, mask every row first": [],
                       "unconstrained, same lengths": []}
            for rep in range(args.reps):
                # from the 7th schema on: the first ones close in a handful of tokens
                chosen = [names[(6 + rep * batch_size + k) % len(names)] for k in range(batch_size)]
                ids = [chat_ids(llm.tokenizer, SCHEMAS[n], PROMPTS[n][0], "schema") for n in chosen]
                lengths = None
                for arm in results:
                    SamplingParams.accept_first = ACCEPT_FIRST if "accept-first" in arm else property(lambda _: False)
                    if arm.startswith("constrained"):
                        params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                                                 constraint=Constraint.json_schema(SCHEMAS[n])) for n in chosen]
                    else:
                        params = [SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=()) for n in lengths]
                    mask_times.clear()
                    forward_times.clear()
                    counted = engine.constrained_tokens, engine.constrained_resampled
                    batch = engine.prefill(ids, params)
                    all_rows, seconds = list(batch.rows), 0.0
                    while batch.rows:
                        start = time.perf_counter()
                        engine.step(batch)
                        seconds += time.perf_counter() - start
                    lengths = lengths or [len(r.token_ids) for r in all_rows]
                    tokens = sum(len(r.token_ids) for r in all_rows)
                    # per row-token: one step's two calls, shared by the batch's constrained rows
                    steps = [(a + b) / batch_size for a, b in zip(mask_times[::2], mask_times[1::2])]
                    redrawn = (engine.constrained_resampled - counted[1], engine.constrained_tokens - counted[0])
                    results[arm].append((tokens, seconds, sum(forward_times), steps, redrawn))
            for arm, runs in results.items():
                tokens = sum(r[0] for r in runs)
                seconds, forward = sum(r[1] for r in runs), sum(r[2] for r in runs)
                masks = [t * 1e6 for r in runs for t in r[3]]
                mask = f"{statistics.mean(masks):.0f} | {percentile(masks, 0.99):.0f}" if masks else "- | -"
                refused, checked = sum(r[4][0] for r in runs), sum(r[4][1] for r in runs)
                redrawn = f"{refused}/{checked}" if checked else "-"
                rows.append(f"| {batch_size} | {arm} | {mask} | {redrawn} | {tokens / seconds:.1f} | "
                            f"{seconds / tokens * 1e3:.1f} | {(seconds - forward) / tokens * 1e3:.2f} | {tokens} |")
    finally:
        SamplingParams.accept_first = ACCEPT_FIRST
        for name in ("_mask_first", "_resample_rejected", "_decode"):
            delattr(engine, name)
    return ["| batch | arm | mask µs/token mean | p99 | redrawn | decode tokens/s | ms per token | of which outside "
            "the forward pass | tokens |", "|---|---|---|---|---|---|---|---|---|", *rows]


def mask_walk(llm, args) -> list[str]:
    """The masking step alone, without the model (so a loaded machine's forward-pass swings stay out):
    each schema's grammar walked for up to --max-new-tokens steps, each step's token drawn (seeded) from
    the allowed ones. Per step, timed apart: llguidance computing the bitmask (`_fill_masks`, one
    call per matcher and the fix-ups, run in the worker thread as the engine does and waited for),
    taking it and one token's bit test (`StepMasks` + `allows`: every constrained step pays it), and applying the mask
    to the 49k logits (`StepMasks.apply`: paid only on a step whose first draw the grammar refuses)."""
    import random

    from gptlab.infer.batch import TextStream

    engine = llm.engine
    rng, compute, check, apply = random.Random(0), [], [], []
    real_fill = constraints_module._fill_masks

    def timed_fill(states, bitmask):
        start = time.perf_counter()
        result = real_fill(states, bitmask)
        compute.append((time.perf_counter() - start) * 1e6)
        return result

    constraints_module._fill_masks = timed_fill
    try:
        for name, schema in SCHEMAS.items():
            state = constraints_module.ConstraintState(Constraint.json_schema(schema), llm.tokenizer,
                                                       engine.default_stop_ids, engine.n_real_tokens)
            row = SimpleNamespace(constraint=state, params=SamplingParams(), stop_ids=engine.default_stop_ids,
                                  stream=TextStream())
            fresh = torch.randn(1, engine.n_real_tokens)
            for _ in range(args.max_new_tokens):
                logits = fresh.clone()
                job = constraints_module.prefetch_masks([state], [row])  # as the engine's step does
                job.future.result()
                first_draw = int(logits[0].argmax())  # sampling's work, done with or without constraints
                start = time.perf_counter()
                masks = constraints_module.StepMasks.of([row], job)
                masks.allows(0, first_draw)
                middle = time.perf_counter()
                masks.apply(logits, masks.live)
                apply.append((time.perf_counter() - middle) * 1e6)
                check.append((middle - start) * 1e6)
                allowed = torch.isfinite(logits[0]).nonzero()[:, 0].tolist()
                allowed = [t for t in allowed if t not in row.stop_ids]
                if not allowed or state.consume(rng.choice(allowed)):
                    break
    finally:
        constraints_module._fill_masks = real_fill
    lines = ["| measure (per token) | steps | mean µs | median µs | p99 µs |", "|---|---|---|---|---|"]
    for label, times in (("llguidance computes the bitmask + fix-ups (worker thread, beside the forward pass)", compute),
                         ("gptlab: take the mask, bit test of the sampled token (every step)", check),
                         ("gptlab: mask applied to the logits (only when the first draw is refused)", apply),
                         ("all three (session 11's engine paid this on every step)",
                          [c + k + a for c, k, a in zip(compute, check, apply)])):
        ordered = sorted(times)
        lines.append(f"| {label} | {len(times)} | {statistics.mean(times):.0f} | {ordered[len(ordered) // 2]:.0f} | "
                     f"{percentile(times, 0.99):.0f} |")
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


def validity(llm, args) -> list[str]:
    engine = llm.engine
    jobs = [(name, prompt) for name in SCHEMAS for prompt in PROMPTS[name][:args.prompts]]
    # replies are cached per (schema, prompt, arm, max_new_tokens) in --validity-cache, so an interrupted
    # run resumes (greedy decoding: a cached reply is the one a rerun would produce)
    cache_path = Path(args.validity_cache)
    cached = {}
    if cache_path.exists():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            cached[(r["schema"], r["prompt"], r["arm"], r["max_new_tokens"])] = SimpleNamespace(**r)
    start, generated = time.perf_counter(), 0
    for arm in ("constrained", "free"):
        todo = [job for job in jobs if (*job, arm, args.max_new_tokens) not in cached]
        for k in range(0, len(todo), args.batch):
            chunk = todo[k:k + args.batch]
            ids = [chat_ids(llm.tokenizer, SCHEMAS[name], prompt, "schema") for name, prompt in chunk]
            params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                                     constraint=Constraint.json_schema(SCHEMAS[name]) if arm == "constrained" else None)
                      for name, _ in chunk]
            with cache_path.open("a", encoding="utf-8") as f:
                for (name, prompt), reply in zip(chunk, engine.generate(ids, params)):
                    record = {"schema": name, "prompt": prompt, "arm": arm, "max_new_tokens": args.max_new_tokens,
                              "text": reply.text, "finish_reason": reply.finish_reason}
                    cached[(name, prompt, arm, args.max_new_tokens)] = SimpleNamespace(**record)
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            generated += len(chunk)
            print(f"validity: {arm} {k + len(chunk)}/{len(todo)}, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    constrained = [cached[(*job, "constrained", args.max_new_tokens)] for job in jobs]
    free = [cached[(*job, "free", args.max_new_tokens)] for job in jobs]

    def valid(value, name) -> bool:
        return jsonschema.validators.validator_for(SCHEMAS[name])(SCHEMAS[name]).is_valid(value)

    def loads(text):
        try:
            return json.loads(text), True
        except json.JSONDecodeError:
            return None, False

    counts = {arm: [0, 0] for arm in ("constrained", "json.loads", "parse_json")}  # [parsed, schema-valid]
    cut = [f"{name} / {prompt!r}" for (name, prompt), c in zip(jobs, constrained) if c.finish_reason == "length"]
    examples = []
    for (name, prompt), c, f in zip(jobs, constrained, free):
        for arm, text in (("constrained", c.text), ("json.loads", f.text)):
            value, parsed_ok = loads(text)
            counts[arm][0] += parsed_ok
            counts[arm][1] += parsed_ok and valid(value, name)
        repaired = parse_json(f.text, SCHEMAS[name])
        counts["parse_json"][0] += repaired.found
        counts["parse_json"][1] += repaired.ok
        if prompt == PROMPTS[name][0] and len(examples) < 6:
            examples.append(f"- {name} / {prompt!r}: constrained `{c.text[:90]}`; unconstrained "
                            f"`{' '.join(f.text.split())[:90]}` -> parse_json ok={repaired.ok}")
    n = len(jobs)
    finished = n - len(cut)
    return [f"{n} requests ({len(SCHEMAS)} schemas x {args.prompts} prompts), greedy, max_new_tokens "
            f"{args.max_new_tokens}, batches of {args.batch}: {generated} replies (both arms) generated now in "
            f"{seconds:.0f} s, the rest from {cache_path.name}", "",
            "| arm | parsed | schema-valid |", "|---|---|---|"] + [
        f"| {label} | {counts[arm][0]}/{n} | {counts[arm][1]}/{n} ({counts[arm][1] / n:.0%}) |"
        for arm, label in (("constrained", "constrained decoding"), ("json.loads", "unconstrained + json.loads"),
                           ("parse_json", "unconstrained + parse_json"))] + [
        "", f"constrained rows that hit max_new_tokens (finish_reason length, counted invalid): {len(cut)} "
        f"{'(' + '; '.join(cut) + ')' if cut else ''}; schema-valid among the {finished} that finished: "
        f"{counts['constrained'][1]}/{finished}", "", "Examples (first prompt of the first schemas):", *examples]


def defensive_corpus(path: Path) -> list[str]:
    """json.loads vs parse_json on the collected malformed replies and the hand-made edge cases."""
    replies = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    lines = ["| corpus | replies | json.loads parses | parse_json finds a value | parse_json schema-valid |",
             "|---|---|---|---|---|"]
    groups = []
    for model in sorted({r.get("model", "smollm2") for r in replies}):
        mine = [r for r in replies if r.get("model", "smollm2") == model]
        groups += [(f"{model} malformed replies, all", mine),
                   ("  of which the reply holds a { or [", [r for r in mine if "{" in r["reply"] or "[" in r["reply"]])]
    groups.append(("all models", replies))
    for label, items in groups:
        loads = found = ok = 0
        for r in items:
            try:
                json.loads(r["reply"])
                loads += 1
            except json.JSONDecodeError:
                pass
            parsed = parse_json(r["reply"], SCHEMAS[r["schema"]])
            found += parsed.found
            ok += parsed.ok
        lines.append(f"| {label} | {len(items)} | {loads} | {found} | {ok} |")
    loads = right = 0
    for reply, meant in EDGE_CASES:
        try:
            json.loads(reply)
            loads += 1
        except json.JSONDecodeError:
            pass
        parsed = parse_json(reply)
        right += parsed.found and parsed.value == meant
    lines.append(f"| hand-made edge cases | {len(EDGE_CASES)} | {loads} | {right} (the value meant) | - |")
    lines += ["", "json.loads fails on every collected reply by construction (only replies it rejects are kept); "
              "'parse_json finds a value' is the failure rate's complement for ours."]
    styles = {}
    for r in replies:
        styles.setdefault(r["style"], [0, 0])
        styles[r["style"]][0] += 1
        styles[r["style"]][1] += parse_json(r["reply"], SCHEMAS[r["schema"]]).ok
    lines += ["", "By prompt style (malformed replies, parse_json schema-valid): " +
              ", ".join(f"{s} {ok}/{n}" for s, (n, ok) in sorted(styles.items())),
              "Finish reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(
                  {f: sum(r["finish_reason"] == f for r in replies) for f in {r["finish_reason"] for r in replies}}.items()))]
    return lines


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
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2, help="runs per batch size in the speed section")
    parser.add_argument("--prompts", type=int, default=10, help="prompts per schema in the validity section")
    parser.add_argument("--batch", type=int, default=21, help="rows per generate call in the validity section")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corpus", default=str(DATA / "json_replies.jsonl"))
    parser.add_argument("--validity-cache", default=str(DATA / "validity_replies.jsonl"),
                        help="the validity section's replies (resumable)")
    parser.add_argument("--sections", default="partial,corpus,compile,walk,speed,validity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = args.sections.split(",")
    llm = open_llm(args.model) if {"compile", "walk", "speed", "validity"} & set(wanted) else None
    started = time.perf_counter()
    sections = {"partial": ("Partial JSON parsers on every prefix", partial_parsers),
                "corpus": ("Defensive parsing: json.loads vs parse_json", lambda: defensive_corpus(Path(args.corpus))),
                "compile": ("Grammar compile time", lambda: compile_times(llm)),
                "walk": ("Mask step alone (no model)", lambda: mask_walk(llm, args)),
                "speed": ("Mask time and decode speed", lambda: mask_and_speed(llm, args)),
                "validity": ("Schema validity, the JSON Schema in the system prompt", lambda: validity(llm, args))}
    for key in wanted:
        title, run = sections[key]
        print(f"## {title}\n\n" + "\n".join(run()) + "\n", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s, torch threads {args.threads}")


if __name__ == "__main__":
    main()
