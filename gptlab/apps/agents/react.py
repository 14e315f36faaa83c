"""The ReAct loop (Yao et al. 2022, "ReAct: Synergizing Reasoning and Acting in Language Models"): the
model thinks, picks a tool, reads its result, and loops until it answers.

    result = run_agent(llm, "What is 1234 * 5678?", Toolbox([calculator]), max_steps=6, trace=Trace("t.jsonl"))
    result.answer, result.finished, result.steps

Design decisions
- Two protocols, one loop. "text" works with any chat model: the system prompt lists the tools and the
  format (Thought / Action / Action Input / Observation ... Final Answer), generation stops before
  "Observation:" (the model must not write its own observations), and each observation goes back as a
  user message starting "Observation:" (every chat template has user turns; not every one has tool
  turns). "native" uses the backend's tool calls (`LLM.chat(..., tools=...)`: OpenAI `tools` over HTTP,
  gptlab's tool-call tokens in process): the call comes back structured and the output goes back as a
  `tool` message. "grammar" is the text protocol with each reply constrained to one well-formed step
  (grammar.py: a Lark grammar built from the toolbox), for backends that enforce grammars
  (`LLM.supports_grammar`: LocalLLM). "auto" is native where the backend says it supports tools (or may:
  HTTP, which falls back to text once if the server refuses `tools`), else grammar where the backend
  supports it and there are tools, else text.
- Malformed actions (text protocol) are repaired defensively: Action Input is read with
  `structured.parse_json` (fences, prose around the JSON, single quotes, trailing commas, truncation), a
  bare value for a tool with one required parameter becomes that parameter, a tool name is matched
  case-insensitively and without quotes/backticks, and an agent without tools may answer without the
  "Final Answer:" marker (there is nothing else its reply could be). What cannot be repaired (no Action and no Final
  Answer, an input that is no JSON object) is answered with a correction message naming the problem,
  and counted (`AgentResult.malformed`). With `repair=False` only exact JSON is accepted (the bench
  measures the difference).
- Tool output is untrusted text (it may come from a web page or a file an attacker wrote): before the
  model sees it, special-token strings ("<|im_start|>", "<|assistant_end|>", "</s>", "[INST]" ...) are
  defused by turning their delimiters into look-alike text, and the protocol's own markers
  ("Observation:", "Final Answer:", "Action:" ...) lose their colon, so an observation can neither end the
  turn, open a new role, nor forge an answer or an action. It is also cut to `max_observation_chars`.
- Tool errors, schema failures, unknown tools and crashes come back as "error: ..." observations
  (`Toolbox.call` never raises for them); a tool that runs past `tool_timeout` seconds is abandoned
  (its daemon thread is left to finish; tools with real work, like the sandboxed python tool, enforce
  their own limits) and the model observes a timeout error.
- Budget: `max_steps` model calls. Reaching it without a final answer ends the run with finished=False
  and a clear final message that says so; the trace keeps every step. With the grammar protocol,
  `answer_last_step=True` constrains the last step to a final answer (the grammar without tools), so a
  model that would keep calling tools must answer from what it has observed.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field

from ...common import GptlabError, get_logger
from ...structured import parse_json
from ...tools.base import Toolbox, ToolResult
from ..llm import LLM
from .grammar import fitted_grammar
from .trace import Trace

log = get_logger("agents")

PROTOCOLS = ("text", "grammar", "native", "auto")
MARKERS = ("Thought", "Action Input", "Action", "Observation", "Final Answer")

FORMAT = """Use this format:

Thought: what to do next
Action: the tool to use, one of [{names}]
Action Input: the tool's arguments as a JSON object
Observation: the tool's result (written for you; never write it yourself)
... (Thought / Action / Action Input / Observation may repeat)
Thought: I know the answer
Final Answer: the answer to the task"""

NO_TOOLS_FORMAT = "Think step by step, then write the answer on a last line starting with \"Final Answer:\"."


# ---- untrusted text ------------------------------------------------------------------------------------
_SPECIAL = re.compile(r"<\|([^<>|]{0,64})\|>|</?s>|\[/?INST\]|<\|?(?:im_start|im_end|endoftext)\|?>")
_LOOKALIKES = str.maketrans("<>|[]", "‹›¦⟦⟧")
_MARKER = re.compile(r"(?im)\b(" + "|".join(m.replace(" ", r"\s+") for m in MARKERS) + r")\s*:")


def neutralise(text: str, limit: int = 4000) -> str:
    """Tool output made safe to show the model (module docstring): special tokens defused, protocol
    markers without their colon, at most `limit` characters."""
    text = _SPECIAL.sub(lambda m: m.group(0).translate(_LOOKALIKES), text)
    text = _MARKER.sub(lambda m: m.group(1) + " -", text)
    if len(text) > limit:
        text = text[:limit] + f"\n[cut: {len(text) - limit} more characters]"
    return text


# ---- the text protocol ---------------------------------------------------------------------------------
def tool_lines(toolbox: Toolbox) -> str:
    """One line per tool: name, description, arguments schema (what the text protocol shows)."""
    return "\n".join(f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters.get('properties', {}))}"
                     for t in toolbox)


def text_system_prompt(role: str, toolbox: Toolbox) -> str:
    head = (role.strip() + "\n\n") if role.strip() else ""
    if not len(toolbox):
        return head + NO_TOOLS_FORMAT
    names = ", ".join(t.name for t in toolbox)
    return head + f"You can use these tools:\n{tool_lines(toolbox)}\n\n" + FORMAT.format(names=names)


@dataclass
class Parsed:
    """What one text-protocol reply asks for: a final answer, a tool call, or nothing usable (problem)."""

    final: str | None = None
    tool: str | None = None
    arguments: dict | None = None
    problem: str | None = None
    repairs: list[str] = field(default_factory=list)


def _field(text: str, marker: str) -> str | None:
    """The text after `marker:` up to the next protocol marker (None if absent)."""
    m = re.search(rf"(?im)^\s*\**{marker}\**\s*:\s*", text)
    if m is None:
        return None
    rest = text[m.end():]
    nxt = re.search(r"(?im)^\s*\**(" + "|".join(MARKERS) + r")\**\s*:", rest)
    return (rest[:nxt.start()] if nxt else rest).strip()


def _tool_name(raw: str, toolbox: Toolbox) -> str:
    name = raw.strip().splitlines()[0].strip().strip("`'\"*[]() ").strip()
    if name in toolbox:
        return name
    folded = {t.name.lower(): t.name for t in toolbox}
    return folded.get(name.lower(), name)


def parse_reply(text: str, toolbox: Toolbox, repair: bool = True) -> Parsed:
    """Read one reply of the text protocol (module docstring: defensive repairs)."""
    final, action = _field(text, "Final Answer"), _field(text, "Action")
    if final is not None and (action is None or text.find("Final Answer") < text.find("Action")):
        return Parsed(final=final)
    if action is None:
        if repair and not len(toolbox) and text.strip():  # with no tool to call, a plain reply is the answer
            return Parsed(final=text.strip(), repairs=["reply without 'Final Answer:' taken as the answer"])
        return Parsed(problem="no 'Action:' and no 'Final Answer:' line")
    name = _tool_name(action, toolbox) if repair else action.strip()
    raw = _field(text, "Action Input")
    if raw is None:
        return Parsed(problem=f"'Action: {name}' without an 'Action Input:' line")
    tool = toolbox.tools.get(name)
    if not repair:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            return Parsed(tool=name, problem=f"Action Input is not valid JSON ({e.msg})")
        if not isinstance(value, dict):
            return Parsed(tool=name, problem="Action Input must be a JSON object")
        return Parsed(tool=name, arguments=value)
    parsed = parse_json(raw, {"type": "object"})
    if parsed.found and isinstance(parsed.value, dict):
        return Parsed(tool=name, arguments=parsed.value, repairs=list(parsed.repairs))
    required = (tool.parameters.get("required") or []) if tool else []
    if tool is not None and len(required) == 1 and raw:
        value = raw.strip().strip("`").strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return Parsed(tool=name, arguments={required[0]: value},
                      repairs=[f"bare Action Input taken as {required[0]!r}"])
    return Parsed(tool=name, problem="Action Input is not a JSON object of the tool's arguments")


def correction(problem: str, toolbox: Toolbox) -> str:
    names = ", ".join(t.name for t in toolbox) or "none"
    return (f"Your reply could not be used: {problem}. Reply either with\nAction: <one of {names}>\n"
            "Action Input: {\"argument\": \"value\"}\nor with\nFinal Answer: <the answer>")


# ---- running tools -------------------------------------------------------------------------------------
def call_tool(toolbox: Toolbox, name: str, arguments, timeout: float | None) -> ToolResult:
    """`toolbox.call` with a wall-time limit: past `timeout` seconds the call is abandoned (module doc)."""
    if timeout is None:
        return toolbox.call(name, arguments)
    box: list[ToolResult] = []
    worker = threading.Thread(target=lambda: box.append(toolbox.call(name, arguments)), daemon=True,
                              name=f"tool-{name}")
    start = time.perf_counter()
    worker.start()
    worker.join(timeout)
    if not box:
        return ToolResult(False, f"error: tool {name!r} timed out after {timeout:g} s", time.perf_counter() - start)
    return box[0]


# ---- the loop ------------------------------------------------------------------------------------------
@dataclass
class AgentResult:
    answer: str
    finished: bool  # the model gave a final answer (False: budget reached)
    steps: int  # model calls
    tool_calls: int
    malformed: int  # replies the loop could not act on
    repaired: int  # replies acted on after a repair
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    messages: list[dict]  # the agent's context at the end
    files: list[str] = field(default_factory=list)  # files tools wrote (charts)
    reason: str = "final answer"


def _protocol(llm: LLM, protocol: str, toolbox: Toolbox) -> str:
    if protocol not in PROTOCOLS:
        raise GptlabError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "native" and getattr(llm, "supports_tools", False) is False:
        raise GptlabError(f"{llm.name} does not support native tool calls (its chat format has no tool tokens); "
                          "use --protocol text")
    if protocol == "grammar" and not getattr(llm, "supports_grammar", False):
        raise GptlabError(f"{llm.name} cannot enforce a grammar (over HTTP only JSON Schema is portable); "
                          "use --protocol text")
    if protocol == "auto":
        if len(toolbox) and getattr(llm, "supports_tools", False) is not False:
            return "native"
        return "grammar" if len(toolbox) and getattr(llm, "supports_grammar", False) else "text"
    return protocol


def run_agent(llm: LLM, task: str, toolbox: Toolbox, *, max_steps: int = 8, protocol: str = "auto",
              trace: Trace | None = None, agent: str = "agent", system: str = "", messages: list[dict] | None = None,
              max_tokens: int = 256, tool_timeout: float | None = 60.0, repair: bool = True,
              max_observation_chars: int = 4000, workspace: str | None = None, answer_last_step: bool = False,
              **sampling) -> AgentResult:
    """Run the loop on `task` (module docstring). `messages`: an existing context to continue (a team
    agent's memory; the task is appended as a user message); `system`: the agent's role, put before the
    protocol's instructions. Extra keywords go to `llm.chat` (temperature, seed ...)."""
    if max_steps < 1:
        raise GptlabError(f"max_steps must be >= 1, got {max_steps}")
    trace = trace or Trace(None)
    chosen = _protocol(llm, protocol, toolbox)
    start = time.perf_counter()
    result = AgentResult("", False, 0, 0, 0, 0, 0, 0, 0.0, [])
    context = list(messages or [])

    def add(message: dict) -> None:
        context.append(message)
        trace.event("message", agent=agent, **{k: v for k, v in message.items() if k != "tool_calls"})

    trace.event("start", agent=agent, task=task, model=llm.name, protocol=chosen, tools=[t.name for t in toolbox],
                max_steps=max_steps, workspace=workspace)
    if not context:
        add({"role": "system", "content": text_system_prompt(system, toolbox) if chosen != "native" else
             (system.strip() or "You are a helpful assistant. Use the tools when they help.")})
    add({"role": "user", "content": task})
    # the grammar ends each reply itself (after the JSON object or the answer line): no stop strings
    steering = {"constraint": fitted_grammar(toolbox, max_tokens)} if chosen == "grammar" else \
        {"stop": ["\nObservation:", "Observation:"]}
    while result.steps < max_steps:
        result.steps += 1
        if chosen == "grammar" and answer_last_step and result.steps == max_steps:
            steering = {"constraint": fitted_grammar(Toolbox([]), max_tokens)}  # only "Final Answer:" is left
        tools = toolbox.openai_specs() if chosen == "native" else None
        t0 = time.perf_counter()
        try:
            (gen,) = llm.chat(context, tools=tools, max_tokens=max_tokens, **sampling) if tools else \
                llm.chat(context, max_tokens=max_tokens, **steering, **sampling)
        except GptlabError as e:
            if result.steps > 1 and "context window" in str(e):  # the run outgrew the model: end it, keep it
                result.steps -= 1
                result.reason = f"context full: {e}"
                break
            if chosen == "native" and getattr(llm, "supports_tools", None) is False and protocol == "auto":
                log.warning("%s refused tools; falling back to the text protocol", llm.name)
                chosen = "text"
                context[0] = {"role": "system", "content": text_system_prompt(system, toolbox)}
                result.steps -= 1
                continue
            raise
        result.prompt_tokens += gen.prompt_tokens
        result.completion_tokens += gen.completion_tokens
        trace.event("llm", agent=agent, step=result.steps, reply=gen.text, tool_calls=gen.tool_calls,
                    finish_reason=gen.finish_reason, prompt_tokens=gen.prompt_tokens,
                    completion_tokens=gen.completion_tokens, seconds=round(time.perf_counter() - t0, 4))
        if chosen == "native":
            if not gen.tool_calls:
                result.answer, result.finished = gen.text.strip(), True
                add({"role": "assistant", "content": gen.text})
                break
            context.append({"role": "assistant", "content": gen.text or None, "tool_calls": gen.tool_calls})
            trace.event("message", agent=agent, role="assistant", content=gen.text, tool_calls=gen.tool_calls)
            for call in gen.tool_calls:
                fn = call["function"]
                observation = _run(toolbox, fn["name"], fn["arguments"], tool_timeout, max_observation_chars,
                                   trace, agent, result)
                add({"role": "tool", "tool_call_id": call["id"], "content": observation})
            continue
        reply = gen.text.strip()
        add({"role": "assistant", "content": reply or "(empty reply)"})
        parsed = parse_reply(reply, toolbox, repair=repair)
        if parsed.final is not None:
            result.answer, result.finished = parsed.final, True
            result.repaired += bool(parsed.repairs)
            break
        if parsed.problem is not None:
            result.malformed += 1
            trace.event("malformed", agent=agent, step=result.steps, problem=parsed.problem, reply=reply)
            add({"role": "user", "content": correction(parsed.problem, toolbox)})
            continue
        if parsed.repairs:
            result.repaired += 1
        observation = _run(toolbox, parsed.tool, parsed.arguments, tool_timeout, max_observation_chars, trace,
                           agent, result, repairs=parsed.repairs)
        add({"role": "user", "content": "Observation: " + observation})
    if not result.finished:
        full = result.reason.startswith("context full")
        why = "its conversation no longer fits the model's context window" if full else "the step budget"
        if not full:
            result.reason = f"budget reached: {max_steps} steps without a final answer"
        last = next((m["content"] for m in reversed(context) if m["role"] == "assistant" and m.get("content")), "")
        result.answer = f"No final answer: the agent stopped after {result.steps} steps ({why}). " + \
            (f"Its last reply was: {last[:500]}" if last else "")
    result.seconds = time.perf_counter() - start
    result.messages = context
    trace.event("final", agent=agent, answer=result.answer, finished=result.finished, reason=result.reason,
                steps=result.steps, tool_calls=result.tool_calls, malformed=result.malformed,
                repaired=result.repaired, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, seconds=round(result.seconds, 3), files=result.files)
    return result


def _run(toolbox: Toolbox, name: str, arguments, timeout: float | None, limit: int, trace: Trace, agent: str,
         result: AgentResult, repairs: list[str] | None = None) -> str:
    """Call one tool, trace it, and return its output as the model will see it."""
    outcome = call_tool(toolbox, name, arguments, timeout)
    result.tool_calls += 1
    result.files += [f for f in outcome.files if f not in result.files]
    observation = neutralise(outcome.output, limit)
    trace.event("tool", agent=agent, name=name, arguments=arguments, ok=outcome.ok, observation=observation,
                raw_changed=observation != outcome.output, seconds=round(outcome.seconds, 4),
                files=outcome.files, repairs=repairs or [])
    return observation
