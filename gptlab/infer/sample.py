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
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from ..common import DTYPE_NAMES, get_logger, torch_device, torch_dtype
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


def _cmd_sample(args: argparse.Namespace) -> None:
    from ..checkpoint import load_model_dir

    model, tokenizer = load_model_dir(args.model, device=torch_device(args.device), dtype=torch_dtype(args.dtype))
    engine = Engine(model, tokenizer, strict_context=args.strict_context, compile=args.compile)
    params = sampling_params_from_args(args, tokenizer, BASE_DEFAULTS)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if params.num_beams > 1:
        completion = engine.generate([prompt], params)[0]
        sys.stdout.write(completion.text)
        finish = completion.finish_reason
    else:
        finish = None
        for event in engine.stream_batch([prompt], params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            finish = event.finish_reason or finish
    sys.stdout.write("\n")
    log.info("finish reason: %s", finish)


def register(sub) -> None:
    p = sub.add_parser("sample", help="complete a prompt with a model directory (streams to stdout)")
    p.add_argument("--model", required=True, help="model directory (gptlab.json + model.safetensors + tokenizer.json)")
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (compiles first, then faster per token; for long outputs)")
    add_sampling_args(p, BASE_DEFAULTS)
    p.set_defaults(func=_cmd_sample)

