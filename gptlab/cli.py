"""The `gptlab` command: a thin layer that parses arguments and calls one stage module per subcommand.

Each stage module exposes `register(subparsers)`, adding its subcommand(s) with `set_defaults(func=...)`.
Modules are listed here, not discovered, so `gptlab --help` shows exactly what exists.
User errors (`GptlabError`) print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import GptlabError

STAGES = [
    "gptlab.tokenizer_cli",
    "gptlab.data.prepare",
    "gptlab.tasks_cli",
    "gptlab.train.pretrain",
    "gptlab.train.sft",
    "gptlab.speedrun",
    "gptlab.infer.sample",
    "gptlab.interop",
    "gptlab.quantize_cli",
    "gptlab.infer.chat_cli",
    "gptlab.serve",
    "gptlab.eval.report",
    "gptlab.train.reward",
    "gptlab.train.dpo",
    "gptlab.train.rl",
    "gptlab.apps.models",
    "gptlab.apps.prompting_eval",
    "gptlab.apps.pipelines",
    "gptlab.lab.compress",
    "gptlab.lab.cli",
    "gptlab.apps.rag.cli",
    "gptlab.tools_cli",
    "gptlab.agent_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
