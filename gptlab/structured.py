"""Defensive JSON out of model replies: find it, repair it, coerce it to a schema, and say what was done.

    parsed = parse_json(reply, schema)          # ParsedJSON: value, repairs, coercions, errors
    parsed = parse_json(reply, schema, strict=True)   # well-formed and schema-valid as is, or GptlabError
    for value in iter_partial_json(llm.stream_chat(...)): ...   # the object as it fills in

Design decisions
- Constrained decoding (infer/constraints.py) makes a local model's output valid by construction; this
  module is for everything else: servers without structured output, prompting-only pipelines, and
  measuring how often unconstrained replies need help (bench/bench_structured.py).
- Finding the JSON: a ```json fenced block if there is one (an unterminated fence counts: the reply may
  have been cut), else the text from the first "{" or "[" (the schema's top-level type picks which).
  A well-formed value followed by prose is taken with `json.JSONDecoder.raw_decode`, so prose after it
  (which may itself contain braces) is never glued onto the value.
- Repairs are the `json-repair` library's (trailing commas, single quotes, comments, Python literals
  True/None, missing quotes/brackets after truncation, ...); its log becomes the report. Coercions are
  its schema mode ("42" -> 42 for an integer field). We do not write a JSON repairer of our own.
- Validation is the reference `jsonschema` validator; errors are "$.path: message" lines. Non-strict mode
  always returns (check `ok`); strict mode accepts fences and prose around one well-formed value, and
  nothing else: any repair, coercion or schema error is a GptlabError naming the first reason.
- Streaming (`iter_partial_json`): each prefix is parsed with `partial-json-parser`, with partial numbers
  held back (a number is shown once a character after it proves it complete). Measured on all 1,124
  prefixes of three documents, compact and indented (bench/bench_structured.py,
  bench/results/structured.md): every value it shows is a state the final document passes through
  (strings are prefixes, keys complete, numbers and literals exact; tests/test_structured.py checks this
  on every prefix). json-repair's parser showed a wrong value on 242 of them: it repairs, it does not
  track a prefix, so a cut key `{"t` reads as the list ["t"], a key whose value has not started gets the
  value "", and a cut literal `fal` the string "fal". partial-json-parser with its defaults was wrong on
  12, all partial numbers (-1, -12, -125 on the way to -1250.0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .common import GptlabError

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


@dataclass
class ParsedJSON:
    value: Any  # None (with found False) when the text holds no JSON value
    found: bool
    repairs: list[str] = field(default_factory=list)  # what was done to the text to read a value from it
    coercions: list[str] = field(default_factory=list)  # values changed to fit the schema
    errors: list[str] = field(default_factory=list)  # schema violations left ("$.path: message")

    @property
    def ok(self) -> bool:
        return self.found and not self.errors


def _candidate(text: str, schema) -> tuple[str, list[str]] | None:
    """The part of `text` that should be the JSON value, and how it was located."""
    stripped = text.strip()
    fence = _FENCE.search(text)
    if fence is not None and fence.group(1).strip():
        return fence.group(1).strip(), ["took the JSON from a ``` fenced block"]
    top = schema.get("type") if isinstance(schema, dict) else None
    openers = {"object": "{", "array": "["}.get(top, "{[")
    starts = [i for i in (stripped.find(c) for c in openers) if i >= 0]
    if not starts:
        return (stripped, []) if stripped else None
    start = min(starts)
    return stripped[start:], ["skipped prose before the JSON"] if start else []


def _validate(value, schema) -> list[str]:
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{e.json_path}: {e.message}" for e in sorted(validator.iter_errors(value), key=lambda e: e.path)]


def _repair(candidate: str, schema=None) -> tuple[Any, list[str]]:
    from json_repair import repair_json

    kwargs = {"schema": schema} if schema is not None else {}
    value, log = repair_json(candidate, return_objects=True, logging=True, **kwargs)
    return value, [entry["text"] for entry in log]


def check_schema(schema) -> None:
    """Metaschema check with the reference validator (`jsonschema`): a GptlabError naming where the schema is
    wrong. Shared by parse_json and the engine's grammar constraints."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise GptlabError(f"invalid JSON schema at {e.json_path}: {e.message}") from None


def parse_json(text: str, schema: dict | None = None, strict: bool = False) -> ParsedJSON:
    """The JSON value in a model reply (module docstring); `schema` is a JSON Schema to coerce to and
    validate against."""
    if schema is not None:
        check_schema(schema)
    located = _candidate(text, schema)
    if located is None:
        return _finish(ParsedJSON(None, False, errors=["no JSON value"]), strict)
    candidate, how = located
    try:
        value, end = json.JSONDecoder().raw_decode(candidate)
        parsed = ParsedJSON(value, True, how)
        if candidate[end:].strip():
            parsed.repairs.append(f"ignored {len(candidate[end:].strip())} characters after the JSON")
        clean = True
    except json.JSONDecodeError as e:
        value, log = _repair(candidate)
        if value == "" and not candidate.startswith('"'):  # json-repair's answer for "nothing found"
            return _finish(ParsedJSON(None, False, how, errors=[f"no JSON value ({e.msg})"]), strict)
        parsed = ParsedJSON(value, True, how + [f"not valid JSON ({e.msg} at char {e.pos}); repaired"] + log)
        clean = False
    if schema is not None:
        parsed.errors = _validate(parsed.value, schema)
        if parsed.errors and not strict:
            try:
                coerced, log = _repair(candidate if clean else json.dumps(parsed.value), schema)
            except ValueError:  # json-repair's schema mode found no coercion that fits (e.g. a missing key)
                coerced, log = None, []
            coercions = [line for line in log if line.startswith("Coerced")]
            if coercions:
                parsed.value, parsed.coercions = coerced, coercions
                parsed.errors = _validate(coerced, schema)
    if strict and not clean:
        raise GptlabError(f"reply is not well-formed JSON: {parsed.repairs[len(how)]}")
    return _finish(parsed, strict)


def _finish(parsed: ParsedJSON, strict: bool) -> ParsedJSON:
    if strict and not parsed.found:
        raise GptlabError(f"reply holds {parsed.errors[0]}")
    if strict and parsed.errors:
        more = f" (and {len(parsed.errors) - 1} more)" if len(parsed.errors) > 1 else ""
        raise GptlabError(f"reply does not match the schema: {parsed.errors[0]}{more}")
    return parsed


def parse_partial(text: str) -> Any:
    """The value a prefix of a JSON document shows so far (None when nothing is complete yet): strings and
    containers may be partial, numbers and literals only once complete."""
    import partial_json_parser
    from partial_json_parser.core.options import Allow

    try:
        return partial_json_parser.loads(text, Allow.ALL & ~Allow.NUM)
    except (partial_json_parser.MalformedJSON, partial_json_parser.PartialJSON, ValueError, IndexError):
        return None


def iter_partial_json(chunks: Iterable[str]) -> Iterator[Any]:
    """Yield the JSON value as text streams in: a new value each time a chunk changes what is known (the
    last one is the whole document's). Prose or a fence before the JSON is skipped."""
    text, last, started = "", None, False
    for chunk in chunks:
        text += chunk
        if not started:
            starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
            if not starts:
                continue
            text, started = text[min(starts):], True
        value = parse_partial(text)
        if value is not None and value != last:
            last = value
            yield value
    if started:
        final = parse_json(text)
        if final.found and final.value != last:
            yield final.value


def is_partial_of(partial: Any, final: Any) -> bool:
    """Whether `partial` is a state `final` passes through while streaming: the invariant iter_partial_json
    keeps (objects: complete keys, each value partial; arrays: a prefix, items partial; strings: a prefix;
    numbers, booleans and null: exact)."""
    if isinstance(final, dict):
        return (isinstance(partial, dict) and partial.keys() <= final.keys()
                and all(is_partial_of(v, final[k]) for k, v in partial.items()))
    if isinstance(final, list):
        return (isinstance(partial, list) and len(partial) <= len(final)
                and all(is_partial_of(p, f) for p, f in zip(partial, final)))
    if isinstance(final, str):
        return isinstance(partial, str) and final.startswith(partial)
    return type(partial) is type(final) and partial == final
