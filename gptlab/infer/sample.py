"""`gptlab sample`: complete a prompt with a model directory, streaming the text to stdout.

Design decisions
- Everything happens in `gptlab.infer.engine`; this module only maps flags to `SamplingParams`.
  `add_sampling_args` / `sampling_params_from_args` are shared with `gptlab chat`, so both spell the
  sampling flags the same way.
- Flags are written out here rather than generated with `config.add_config_args`, because stop strings
  and stop tokens are lists (repeatable `--stop`), which that helper does not express.
- Temperature, top-k, top-p and repetition penalty not given on the command line come from the model's
  `generation_config.json`, else from the command's defaults (`generation_config.resolve_sampling`):
  `gptlab sample` keeps the model's untouched distribution (temperature 1, `BASE_DEFAULTS`), since seeing
  what a base model has learned is what it is for; `gptlab chat` answers with `CHAT_DEFAULTS`. The
  settings in effect are logged once, to stderr.
- Only the completion goes to stdout (pipe-friendly); the finish reason goes to stderr via the logger.
- Structured output: --json-schema FILE / --json-object / --regex R / --grammar FILE.lark / --choices a,b,c
  constrain the output (infer/constraints.py). --stream-json prints, one JSON line each, the object as
  it fills in (gptlab.structured.iter_partial_json) instead of the raw text. The constraint flags are their
  own group (`add_constraint_args`), so commands that do not constrain keep the plain sampling flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from ..common import DTYPE_NAMES, GptlabError, get_logger, torch_device, torch_dtype
from ..quant import add_quantize_arg
from .constraints import Constraint
from .engine import Engine
from .generation_config import BASE_DEFAULTS, SAMPLING_KEYS, read_generation_config, resolve_sampling
from .sampling import SamplingParams

log = get_logger("sample")


def add_sampling_args(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """The sampling flags; `defaults` (`CHAT_DEFAULTS` or `BASE_DEFAULTS`) are those of a model without a
    generation_config.json. Those four flags default to None, so an explicit value can be told apart."""
    d = SamplingParams()

    def fallback(key: str) -> str:
        return f"(default: the model's generation_config.json, else {defaults[key]})"

    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy {fallback('temperature')}")
    g.add_argument("--top-k", type=int, default=None, help=f"0 = off {fallback('top_k')}")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus mass, 1 = off {fallback('top_p')}")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"CTRL penalty, 1 = off {fallback('repetition_penalty')}")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable); the output ends before it")
    g.add_argument("--stop-token", action="append", default=None, metavar="NAME",
                   help="special token that ends the output (repeatable; default: <|endoftext|>, <|assistant_end|>)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random)")
    g.add_argument("--num-beams", type=int, default=d.num_beams, help="> 1: beam search (default: %(default)s)")
    g.add_argument("--length-penalty", type=float, default=d.length_penalty,
                   help="beam score = logprob / length**this (default: %(default)s)")
    g.add_argument("--strict-context", action="store_true",
                   help="error on prompts that do not fit the context window instead of cutting them from the left")


def sampling_params_from_args(args: argparse.Namespace, tokenizer, defaults: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from the flags, the model's generation_config.json (`args.model`) and `defaults`,
    in that order; the resolved settings are logged once."""
    explicit = {key: getattr(args, key) for key in SAMPLING_KEYS}
    resolved = resolve_sampling(explicit, read_generation_config(args.model), defaults)
    log.info("sampling: %s", resolved.describe())
    stop_ids = None if args.stop_token is None else tuple(tokenizer.special_id(n) for n in args.stop_token)
    return SamplingParams(max_new_tokens=args.max_new_tokens, **resolved.values, stop=tuple(args.stop),
                          stop_token_ids=stop_ids, seed=args.seed, num_beams=args.num_beams,
                          length_penalty=args.length_penalty)


def add_constraint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this JSON Schema file")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object (any)")
    g.add_argument("--regex", metavar="R", help="the whole output matches this regular expression")
    g.add_argument("--grammar", metavar="FILE", help="the output matches this Lark grammar (rule `start`)")
    g.add_argument("--choices", metavar="A,B,C", help="the output is exactly one of these comma-separated strings")


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"cannot read {what} {path}: {e}") from None


def constraint_from_args(args: argparse.Namespace) -> Constraint | None:
    if args.json_schema is not None:
        text = _read_text(args.json_schema, "JSON schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{args.json_schema}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return Constraint.json_schema(schema)
    if args.json_object:
        return Constraint.json_object()
    if args.regex is not None:
        return Constraint.regex(args.regex)
    if args.grammar is not None:
        return Constraint.lark(_read_text(args.grammar, "grammar"))
    if args.choices is not None:
        return Constraint.choice([c for c in args.choices.split(",") if c])
    return None


def _cmd_sample(args: argparse.Namespace) -> None:
    from ..checkpoint import load_for_inference

    constraint = constraint_from_args(args)  # a bad schema file fails before the model loads
    model, tokenizer = load_for_inference(args.model, device=torch_device(args.device), dtype=torch_dtype(args.dtype),
                                          quantize=args.quantize)
    engine = Engine(model, tokenizer, strict_context=args.strict_context, compile=args.compile)
    params = dataclasses.replace(sampling_params_from_args(args, tokenizer, BASE_DEFAULTS), constraint=constraint)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.stream_json:
        finish = _stream_json(engine, prompt, params)
    elif params.num_beams > 1:
        completion = engine.generate([prompt], params)[0]
        sys.stdout.write(completion.text + "\n")
        finish = completion.finish_reason
    else:
        finish = None
        for event in engine.stream_batch([prompt], params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            finish = event.finish_reason or finish
        sys.stdout.write("\n")
    log.info("finish reason: %s", finish)


def _stream_json(engine: Engine, prompt: str, params: SamplingParams) -> str | None:
    """Print each partial value as one JSON line while the completion streams."""
    from ..structured import iter_partial_json

    finish = None

    def deltas():
        nonlocal finish
        for event in engine.stream_batch([prompt], params):
            finish = event.finish_reason or finish
            yield event.text

    for value in iter_partial_json(deltas()):
        print(json.dumps(value, ensure_ascii=False), flush=True)
    return finish


def register(sub) -> None:
    p = sub.add_parser("sample", help="complete a prompt with a model directory (streams to stdout)")
    p.add_argument("--model", required=True, help="model directory (gptlab.json + model.safetensors + tokenizer.json)")
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    add_quantize_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (compiles first, then faster per token; for long outputs)")
    add_sampling_args(p, BASE_DEFAULTS)
    add_constraint_args(p)
    p.add_argument("--stream-json", action="store_true",
                   help="print the JSON value as it fills in, one JSON line per change (with --json-schema/--json-object)")
    p.set_defaults(func=_cmd_sample)

