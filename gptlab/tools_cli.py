"""`gptlab tools`: list the built-in tools, or run one directly (the sandbox's front door for tests too).

    gptlab tools list
    gptlab tools run calculator --args '{"expression": "12 * 34"}'
    gptlab tools run python --args '{"code": "print(2 ** 100)"}' --workspace work/
    gptlab tools run search --args '{"query": "taxes"}' --search-folder docs/

`run` prints the tool's output, the observation a model would see, and exits 0; a failed call (an
"error: ..." observation: bad arguments, a crash, a limit reached) is printed the same way and exits 1.
Files a tool wrote are listed on stderr. The workspace defaults to the current folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .apps.toolset import BUILTIN_TOOLS, make_toolbox


def _cmd_list(args: argparse.Namespace) -> None:
    width = max(map(len, BUILTIN_TOOLS))
    for name, description in BUILTIN_TOOLS.items():
        print(f"{name:<{width}}  {description}")


def _cmd_run(args: argparse.Namespace) -> int:
    box = make_toolbox([args.name], Path(args.workspace), search_index=args.search_index,
                       search_folder=args.search_folder, unsafe_local=args.unsafe_local)
    result = box.call(args.name, args.args)
    print(result.output)
    for name in result.files:
        print(f"wrote {Path(args.workspace) / name}", file=sys.stderr)
    return 0 if result.ok else 1


def register(sub) -> None:
    parser = sub.add_parser("tools", help="list the built-in tools or run one directly",
                            description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="tool names and what they do").set_defaults(func=_cmd_list)
    run = actions.add_parser("run", help="run one tool on JSON arguments and print its output")
    run.add_argument("name", help=f"the tool: {', '.join(BUILTIN_TOOLS)}")
    run.add_argument("--args", default="{}", help="the arguments as a JSON object (default: {})")
    run.add_argument("--workspace", default=".", help="the folder the file, chart and python tools work in")
    run.add_argument("--unsafe-local", action="store_true",
                     help="let `python` run code as a plain local process where no sandbox is available")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--search-index", type=Path, help="a RAG index folder (`gptlab rag index`) for `search`")
    source.add_argument("--search-folder", type=Path, help="a folder of text files `search` ranks with BM25")
    run.set_defaults(func=_cmd_run)
