"""`gptlab agent run|show|team`: the ReAct loop, its traces and agent teams from the command line.

    gptlab agent run --task "What is 1234 * 5678?" --model smollm2-135m-instruct --tools calculator \
        --workspace ws --max-steps 6 [--trace ws/run.jsonl]
    gptlab agent show ws/run.jsonl [--html run.html]
    gptlab agent team --config examples/team_sotu/team.toml --task "How often ...? Chart it."

Design decisions
- Tools are built by name with `apps.toolset.make_toolbox` (the built-in tools, confined to the
  workspace); it is imported when a command runs, so `agent show` does not load the tools' libraries.
- The workspace must exist for `run` (a typo must not scatter files); a team's config may name its own
  workspace, which is created (it belongs to the team). Every run writes a trace, by default
  `WORKSPACE/trace-<time>.jsonl`, and prints its path, also when the run fails midway.
- A team shares one LLM per distinct backend (model, base_url, model_name) between its agents: a model
  used by three agents is loaded once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .apps.agents import Trace, load_team, read_trace, render_text, run_agent, run_team, write_html
from .apps.agents.react import PROTOCOLS
from .apps.llm import add_llm_args, llm_from_args, open_llm
from .common import GptlabError


def _workspace(path: str, create: bool = False) -> Path:
    workspace = Path(path)
    if create:
        workspace.mkdir(parents=True, exist_ok=True)
    if not workspace.is_dir():
        raise GptlabError(f"workspace {workspace} does not exist (create it first)")
    return workspace.resolve()


def _trace_path(args, workspace: Path) -> Path:
    return Path(args.trace) if args.trace else workspace / f"trace-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"


def _toolbox(names: list[str], workspace: Path, args):
    from .apps.toolset import make_toolbox

    return make_toolbox(names, workspace, search_index=args.search_index, search_folder=args.search_folder,
                        unsafe_local=args.unsafe_local)


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def _cmd_run(args: argparse.Namespace) -> int:
    workspace = _workspace(args.workspace)
    toolbox = _toolbox(_names(args.tools), workspace, args)
    llm = llm_from_args(args)
    path = _trace_path(args, workspace)
    try:
        with Trace(path) as trace:
            result = run_agent(llm, args.task, toolbox, max_steps=args.max_steps, protocol=args.protocol,
                               trace=trace, max_tokens=args.max_tokens, tool_timeout=args.tool_timeout,
                               workspace=str(workspace), temperature=args.temperature)
    finally:
        print(f"trace: {path}", file=sys.stderr)
    print(result.answer)
    return 0 if result.finished else 1


def _cmd_show(args: argparse.Namespace) -> None:
    events = read_trace(args.trace)
    print(render_text(events, limit=10**9 if args.full else 600))
    if args.html:
        print(f"wrote {write_html(events, args.html, title=f'gptlab agent trace: {Path(args.trace).name}')}",
              file=sys.stderr)


def _cmd_team(args: argparse.Namespace) -> int:
    from .apps.toolset import BUILTIN_TOOLS

    config = load_team(args.config, known_tools=set(BUILTIN_TOOLS))
    if args.workspace:
        workspace = _workspace(args.workspace)
    elif config.workspace is not None:
        workspace = _workspace(str(config.workspace), create=True)
    else:
        raise GptlabError(f"{config.path}: team.workspace: missing (or pass --workspace DIR)")
    if args.search_folder is None and config.search_folder is not None:
        args.search_folder = str(config.search_folder)
    llms: dict[tuple, object] = {}

    def llm_for(spec):
        b = spec.backend
        key = (b.get("model"), b.get("base_url"), b.get("model_name"))
        if key not in llms:
            api_key = os.environ.get(b["api_key_env"]) if b.get("api_key_env") else None
            llms[key] = open_llm(b.get("model"), base_url=b.get("base_url"), model_name=b.get("model_name"),
                                 api_key=api_key)
        return llms[key]

    path = _trace_path(args, workspace)
    try:
        with Trace(path) as trace:
            result = run_team(config, args.task, llm_for=llm_for, workspace=workspace, trace=trace,
                              toolbox_for=lambda spec: _toolbox(spec.tools, workspace, args),
                              temperature=args.temperature)
    finally:
        print(f"trace: {path}", file=sys.stderr)
    print(result.answer)
    print(f"report: {result.report}", file=sys.stderr)
    return 0 if result.finished else 1


def _add_tool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search-index", default=None, help="RAG index folder for the search tool (`gptlab rag index`)")
    p.add_argument("--search-folder", default=None, help="folder of documents for the search tool (BM25) "
                                                         "when no index is given")
    p.add_argument("--unsafe-local", action="store_true",
                   help="let the python tool run without a sandbox where none is available (read the threat model)")
    p.add_argument("--trace", default=None, help="trace file (JSONL; default: WORKSPACE/trace-<time>.jsonl)")
    p.add_argument("--temperature", type=float, default=0.0, help="default: %(default)s (greedy)")


def register(sub) -> None:
    parser = sub.add_parser("agent", help="ReAct agents with tools, their traces, and agent teams",
                            description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="agent_command", required=True)

    run = commands.add_parser("run", help="run one agent on a task")
    run.add_argument("--task", required=True)
    run.add_argument("--tools", default="calculator", help="comma-separated tool names (default: %(default)s)")
    run.add_argument("--workspace", required=True, help="folder the tools may read and write (must exist)")
    run.add_argument("--max-steps", type=int, default=8, help="model calls at most (default: %(default)s)")
    run.add_argument("--max-tokens", type=int, default=256, help="tokens per reply (default: %(default)s)")
    run.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                     help="text (ReAct format, any model), grammar (text format enforced by a grammar, in-process models), "
                     "native (tool calls), auto (default: native, else grammar, else text)")
    run.add_argument("--tool-timeout", type=float, default=60.0, help="seconds per tool call (default: %(default)s)")
    _add_tool_args(run)
    add_llm_args(run)
    run.set_defaults(func=_cmd_run)

    show = commands.add_parser("show", help="render a trace in the terminal (and as HTML with --html)")
    show.add_argument("trace")
    show.add_argument("--html", default=None, help="also write a self-contained HTML page, charts inline")
    show.add_argument("--full", action="store_true", help="do not cut long texts")
    show.set_defaults(func=_cmd_show)

    team = commands.add_parser("team", help="run an agent team from a TOML config")
    team.add_argument("--config", required=True, help="team file (see gptlab/apps/agents/team.py)")
    team.add_argument("--task", required=True)
    team.add_argument("--workspace", default=None, help="existing folder (default: the config's team.workspace)")
    _add_tool_args(team)
    team.set_defaults(func=_cmd_team)
