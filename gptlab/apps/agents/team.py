"""L3 agent teams: several ReAct agents, each with its own role, context, tools and model, and a mediator
that routes their messages to each other and to the user, under step, token and time budgets.

    config = load_team("team.toml")
    result = run_team(config, "How often ...?", llm_for=..., toolbox_for=..., trace=Trace("team.jsonl"))

A team file (TOML):

    [team]
    entry = "planner"          # who receives the user's task
    max_turns = 12             # agent turns in all (each turn is one ReAct run of at most its max_steps)
    max_tokens = 100000        # prompt + completion tokens in all
    max_seconds = 1800
    model = "smollm2-135m-instruct"   # default backend: a model dir/name, or base_url (+ model_name)

    [agents.planner]
    system = "You plan ..."    # required
    tools = []                 # tool names (apps/toolset.py)
    next = "researcher"        # where its answer goes when it names no recipient ("user" ends the run)
    talks_to = ["researcher", "user"]   # recipients it may name (default: every agent and the user)
    max_steps = 4              # ReAct steps per turn
    model = "..." | base_url = "..."    # its own backend (optional)

Design decisions
- The mediator is plain code, not a model: it reads the recipient from the first line of an agent's final
  answer ("To: analyst"), checks it against that agent's `talks_to`, and falls back to the agent's `next`
  when the line is missing or names someone it may not reach; a small model that forgets the convention
  still moves the work along the configured pipeline. A message to "user" ends the run.
- Termination is checked when the file is loaded: following the `next` routes from the entry agent must
  reach "user"; a cycle there would leave only the budgets to stop the team, so it is a config error
  (naming the file and the key). Budgets stop the run too, with a report that says which one ran out.
- Each agent keeps its own context across turns (its memory); a message it receives is prefixed with the
  sender and, on its first turn, the team's task, so every agent knows what the work is for. Messages
  between agents are model output and pass through `neutralise` like tool output.
- The final report (report.md in the workspace) states the answer, who did what (turns, steps, tool calls,
  tokens, seconds per agent), the files the tools wrote (charts linked), and why the run ended.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...common import GptlabError, atomic_write_text
from ...tools.base import Toolbox
from ..llm import LLM
from .react import PROTOCOLS, neutralise, run_agent
from .trace import Trace

USER = "user"
BACKEND_KEYS = ("model", "base_url", "model_name", "api_key_env")


@dataclass
class AgentSpec:
    name: str
    system: str
    tools: list[str]
    next: str
    talks_to: list[str]
    backend: dict  # model / base_url / model_name / api_key_env
    max_steps: int = 4
    max_tokens: int = 256  # per reply
    protocol: str = "auto"


@dataclass
class TeamConfig:
    path: Path
    entry: str
    agents: dict[str, AgentSpec]
    max_turns: int = 12
    max_tokens: int = 100_000
    max_seconds: float = 1800.0
    workspace: Path | None = None
    search_folder: Path | None = None


def _get(table: dict, key: str, kind, where: str, default=...):
    if key not in table:
        if default is ...:
            raise GptlabError(f"{where}.{key}: missing (required)")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise GptlabError(f"{where}.{key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def load_team(path: str | os.PathLike, known_tools: set[str] | None = None) -> TeamConfig:
    """Read and check a team file (module docstring); every error names the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{path}: no such team file") from None
    except tomllib.TOMLDecodeError as e:
        raise GptlabError(f"{path}: not valid TOML ({e})") from None
    try:
        return _parse(path, data, known_tools)
    except GptlabError as e:
        raise GptlabError(f"{path}: {e}") from None


def _parse(path: Path, data: dict, known_tools: set[str] | None) -> TeamConfig:
    unknown = set(data) - {"team", "agents"}
    if unknown:
        raise GptlabError(f"unknown table(s) {', '.join(sorted(unknown))} (expected [team] and [agents.NAME])")
    team = _get(data, "team", dict, "file")
    agents_table = _get(data, "agents", dict, "file")
    if not agents_table:
        raise GptlabError("agents: no agents defined (add [agents.NAME] tables)")
    names = list(agents_table)
    if USER in names:
        raise GptlabError(f"agents.{USER}: 'user' is reserved for the person asking")
    allowed_team = {"entry", "max_turns", "max_tokens", "max_seconds", "workspace", "search_folder", *BACKEND_KEYS}
    for key in set(team) - allowed_team:
        raise GptlabError(f"team.{key}: unknown key (expected one of {', '.join(sorted(allowed_team))})")
    default_backend = {k: team[k] for k in BACKEND_KEYS if k in team}
    entry = _get(team, "entry", str, "team")
    if entry not in names:
        raise GptlabError(f"team.entry: unknown agent {entry!r} (agents: {', '.join(names)})")
    allowed_agent = {"system", "tools", "next", "talks_to", "max_steps", "max_tokens", "protocol", *BACKEND_KEYS}
    agents = {}
    for name, table in agents_table.items():
        where = f"agents.{name}"
        if not isinstance(table, dict):
            raise GptlabError(f"{where}: must be a table")
        for key in set(table) - allowed_agent:
            raise GptlabError(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(allowed_agent))})")
        tools = _get(table, "tools", list, where, [])
        for tool_name in tools:
            if not isinstance(tool_name, str) or (known_tools is not None and tool_name not in known_tools):
                raise GptlabError(f"{where}.tools: unknown tool {tool_name!r}"
                                  + (f" (available: {', '.join(sorted(known_tools))})" if known_tools else ""))
        talks_to = _get(table, "talks_to", list, where, [n for n in names if n != name] + [USER])
        nxt = _get(table, "next", str, where, USER)
        for key, targets in (("talks_to", talks_to), ("next", [nxt])):
            for target in targets:
                if target != USER and target not in names:
                    raise GptlabError(f"{where}.{key}: unknown agent {target!r} (agents: {', '.join(names)}, or 'user')")
                if target == name:
                    raise GptlabError(f"{where}.{key}: an agent cannot send messages to itself")
        if nxt not in talks_to:
            raise GptlabError(f"{where}.next: {nxt!r} is not in its talks_to")
        backend = {**default_backend, **{k: table[k] for k in BACKEND_KEYS if k in table}}
        if "model" not in backend and "base_url" not in backend:
            raise GptlabError(f"{where}.model: missing (give model or base_url here or in [team])")
        protocol = _get(table, "protocol", str, where, "auto")
        if protocol not in PROTOCOLS:
            raise GptlabError(f"{where}.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        steps, max_tokens = _get(table, "max_steps", int, where, 4), _get(table, "max_tokens", int, where, 256)
        if steps < 1 or max_tokens < 1:
            raise GptlabError(f"{where}: max_steps and max_tokens must be >= 1")
        agents[name] = AgentSpec(name, _get(table, "system", str, where), tools, nxt, talks_to, backend, steps,
                                 max_tokens, protocol)
    _check_routes_end(entry, agents)
    base = path.parent
    config = TeamConfig(path, entry, agents, _get(team, "max_turns", int, "team", 12),
                        _get(team, "max_tokens", int, "team", 100_000),
                        float(_get(team, "max_seconds", (int, float), "team", 1800.0)))
    if "workspace" in team:
        config.workspace = base / _get(team, "workspace", str, "team")
    if "search_folder" in team:
        config.search_folder = base / _get(team, "search_folder", str, "team")
    if config.max_turns < 1 or config.max_tokens < 1 or config.max_seconds <= 0:
        raise GptlabError("team: max_turns, max_tokens and max_seconds must be positive")
    return config


def _check_routes_end(entry: str, agents: dict[str, AgentSpec]) -> None:
    """The default routes from the entry agent must reach the user (module docstring)."""
    seen, name = [], entry
    while name != USER:
        if name in seen:
            loop = " -> ".join(seen[seen.index(name):] + [name])
            raise GptlabError(f"agents.{seen[-1]}.next: the default routes cycle ({loop}) and never reach 'user'; "
                              "the mediator could not end the run (route one agent's next to \"user\")")
        seen.append(name)
        name = agents[name].next


# ---- the mediator ----------------------------------------------------------------------------------------
_TO_LINE = re.compile(r"^\s*\**(?:to|@)\s*:?\s*\**\s*([A-Za-z_][\w-]*)\**\s*[:,.-]?\s*", re.IGNORECASE)


def route(spec: AgentSpec, answer: str) -> tuple[str, str, bool]:
    """(recipient, message, named): the recipient an answer names on its first line ("To: NAME"), if that
    agent may reach it, else its `next`."""
    m = _TO_LINE.match(answer)
    if m and m.group(1).lower() in {t.lower() for t in spec.talks_to}:
        recipient = next(t for t in spec.talks_to if t.lower() == m.group(1).lower())
        return recipient, answer[m.end():].strip() or answer.strip(), True
    return spec.next, answer.strip(), False


def routing_note(spec: AgentSpec) -> str:
    return (f"You are {spec.name}, one member of a team. When you are done, write your Final Answer as a "
            f"message: its first line \"To: NAME\" with NAME one of {', '.join(spec.talks_to)}, then the message. "
            f"Without that line it goes to {spec.next}.")


@dataclass
class AgentUsage:
    turns: int = 0
    steps: int = 0
    tool_calls: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class TeamResult:
    answer: str
    finished: bool  # an agent addressed the user (False: a budget ran out or an agent failed)
    reason: str
    turns: int
    tokens: int
    seconds: float
    usage: dict[str, AgentUsage]
    files: list[str] = field(default_factory=list)
    report: Path | None = None


def run_team(config: TeamConfig, task: str, *, llm_for: Callable[[AgentSpec], LLM],
             toolbox_for: Callable[[AgentSpec], Toolbox], workspace: str | os.PathLike,
             trace: Trace | None = None, **sampling) -> TeamResult:
    """Run the team on `task` (module docstring). `llm_for`/`toolbox_for` build an agent's backend and tools
    (the CLI shares one LLM per distinct backend)."""
    trace = trace or Trace(None)
    workspace = Path(workspace)
    start = time.perf_counter()
    usage = {name: AgentUsage() for name in config.agents}
    contexts: dict[str, list[dict]] = {}
    boxes = {name: toolbox_for(spec) for name, spec in config.agents.items()}
    files: list[str] = []
    sender, recipient, message = USER, config.entry, task
    trace.event("route", agent="mediator", sender=USER, recipient=config.entry, content=task)
    answer, finished, reason, turns = "", False, "", 0

    def spent() -> int:
        return sum(u.prompt_tokens + u.completion_tokens for u in usage.values())

    while True:
        if turns >= config.max_turns:
            reason = f"turn budget reached ({config.max_turns} turns)"
        elif spent() >= config.max_tokens:
            reason = f"token budget reached ({spent()} of {config.max_tokens} tokens)"
        elif time.perf_counter() - start >= config.max_seconds:
            reason = f"time budget reached ({config.max_seconds:g} s)"
        if reason:
            break
        spec = config.agents[recipient]
        first = recipient not in contexts
        prompt = (f"The team's task: {task}\n\n" if first and sender != USER else "") + \
            (f"Task from the user:\n{message}" if sender == USER else f"Message from {sender}:\n{message}")
        turns += 1
        try:
            result = run_agent(llm_for(spec), prompt, boxes[recipient], max_steps=spec.max_steps,
                               protocol=spec.protocol, trace=trace, agent=recipient,
                               system=spec.system + "\n\n" + routing_note(spec), messages=contexts.get(recipient),
                               max_tokens=spec.max_tokens, workspace=str(workspace), **sampling)
        except GptlabError as e:
            reason = f"agent {recipient} failed: {e}"
            trace.event("error", agent=recipient, message=str(e))
            break
        contexts[recipient] = result.messages
        u = usage[recipient]
        u.turns += 1
        u.steps += result.steps
        u.tool_calls += result.tool_calls
        u.malformed += result.malformed
        u.prompt_tokens += result.prompt_tokens
        u.completion_tokens += result.completion_tokens
        u.seconds += result.seconds
        files += [f for f in result.files if f not in files]
        target, content, named = route(spec, result.answer)
        content = neutralise(content)
        trace.event("route", agent="mediator", sender=recipient, recipient=target, content=content, named=named)
        sender, recipient, message = recipient, target, content
        answer = content
        if target == USER:
            finished = True
            reason = f"{sender} answered the user" + ("" if result.finished else
                                                      " without a final answer of its own (its step budget ran out)")
            break
    seconds = time.perf_counter() - start
    team_result = TeamResult(answer if finished else f"The team did not finish: {reason}. Last message "
                             f"({sender} -> {recipient}): {message[:1000]}", finished, reason, turns, spent(),
                             seconds, usage, files)
    team_result.report = write_report(team_result, task, workspace)
    trace.event("team_final", agent="mediator", answer=team_result.answer, finished=finished, reason=reason,
                turns=turns, tokens=spent(), seconds=round(seconds, 3), report=str(team_result.report), files=files)
    return team_result


def write_report(result: TeamResult, task: str, workspace: Path) -> Path:
    lines = [f"# Team report\n\n**Task:** {task}\n", f"**Outcome:** {'finished' if result.finished else 'stopped'}"
             f" ({result.reason}); {result.turns} turns, {result.tokens} tokens, {result.seconds:.1f} s.\n",
             "## Answer\n", result.answer + "\n", "## Agents\n",
             "| agent | turns | steps | tool calls | malformed replies | tokens (prompt + completion) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, u in result.usage.items():
        lines.append(f"| {name} | {u.turns} | {u.steps} | {u.tool_calls} | {u.malformed} | "
                     f"{u.prompt_tokens} + {u.completion_tokens} | {u.seconds:.1f} |")
    if result.files:
        lines += ["\n## Files\n", *(f"![{f}]({f})" if f.endswith(".png") else f"- {f}" for f in result.files)]
    workspace.mkdir(parents=True, exist_ok=True)
    path = workspace / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
