"""Tool calls (OpenAI "function calling") <-> gptlab's chat format, for the server and the in-process LLM
client alike (both render and parse calls here, so they behave the same).

The chat format (gptlab/chat.py) writes a call as `<|tool_call_start|>{"name": ..., "arguments": {...}}
<|tool_call_end|>` inside the assistant turn and a tool's output as a `<|tool_output_start|>` block after
it. This module converts the OpenAI request fields (`tools`, `tool_choice`, assistant `tool_calls`,
`tool` messages) into that format, and the model's output back into `message.tool_calls`.

Design decisions
- How the model learns which tools exist: the tool list is appended to the system prompt (a system
  message is created when the request has none), as one header line followed by one JSON object per
  tool, `{"name", "description", "parameters"}` (`parameters` is the request's JSON Schema, verbatim):

      <system text, if any>

      You can call these tools. Each line is one tool: its name, what it does and its arguments as JSON Schema.
      {"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", ...}}

  Plain text in the system prompt needs no new special tokens and keeps the SFT layout. The rendering is
  `gptlab.tools.tool_system_prompt`, the one the calculator task trains with and the agents prompt with,
  so a model fine-tuned on gptlab's tasks sees exactly what the server sends.
- `tool_choice`: "auto" (the default) lets the model call a tool or answer in text; "none" keeps the tool
  list in the prompt (the model may mention the tools) but decoding stops at `<|tool_call_start|>`, so no
  call and no half-written call is ever returned (the engine has no logit bias to forbid the token).
  "required" or a named function forces a call: the prompt ends with `<|tool_call_start|>` and the
  output is constrained (infer/constraints.py, llguidance) to `call_schema`, a {"name", "arguments"}
  object whose name is one of the allowed tools and whose arguments match that tool's `parameters`
  schema; the call ends when the grammar is complete.
- Models without tool tokens (imported ones with their own chat template, e.g. SmolLM2) get tools too,
  through their own template: the system message carries the same tool list plus
  `JSON_CALL_INSTRUCTION` (reply with only {"name", "arguments"} to call a tool), earlier calls become
  assistant text in that form and tool outputs a user turn "Output of NAME: ...". A forced call is the
  whole reply, constrained as above; with "auto" the reply is free, and one that starts with "{" or a
  ``` fence is read as a call by `JsonCallParser` when it names an offered tool; "none" leaves the
  tools out of the prompt.
- Calls are read defensively (`parse_call`: gptlab.structured.parse_json finds the JSON, repairs it with
  json-repair), since an unconstrained call from a small model is often almost JSON.
- One call per response: the format puts the tool's output right after `<|tool_call_end|>`, so decoding
  stops there and the response ends with `finish_reason: "tool_calls"` and that one call
  (`parallel_tool_calls` is accepted and has no effect). Request messages may carry several calls.
- A call is returned as a tool call only when its text reads (after repair) as a JSON object with a
  `name` among the offered tools and object `arguments`; anything else (no JSON, an unknown tool, the
  token budget running out inside the call) is returned as plain content, markers included, exactly as
  the model wrote it, with finish_reason "stop" (or "length"): the client sees what happened instead of
  a 500 or a call it cannot dispatch. `arguments` is re-serialized with `json.dumps`, the form `chat.render` writes dict
  arguments in, so sending the call back in the next request renders the same tokens as in training.
- OpenAI `tool` messages name their call by `tool_call_id`; our format has no ids, outputs follow their
  calls in order. So the outputs after an assistant message are put in the order of its calls, and an id
  that matches none of them (or repeats) is a 400.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..chat import tool_call_json
from ..structured import parse_json
from ..tokenizer import Tokenizer
from .base import tool_system_prompt

CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
JSON_CALL_INSTRUCTION = ('To call a tool, reply with only a JSON object {"name": <the tool\'s name>, "arguments": '
                         '{<its arguments>}}; otherwise reply in text.')


class ToolRequestError(ValueError):
    """Invalid tool fields or tool messages in a request (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def supports_tools(tokenizer: Tokenizer) -> bool:
    """gptlab's own chat format has tool-call tokens; other models get their tools in the prompt (docstring)."""
    return tokenizer.chat_template is None and {CALL_START, CALL_END} <= tokenizer.special_tokens.keys()


def parse_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `tools` as {"name", "description", "parameters"} (the part the model is shown)."""
    out, names = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ToolRequestError(f"tools[{i}].function.name must be a non-empty, unique string", "tools")
        description, parameters = fn.get("description", ""), fn.get("parameters", {"type": "object"})
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise ToolRequestError(f"tools[{i}]: description must be a string and parameters an object", "tools")
        names.add(name)
        out.append({"name": name, "description": description, "parameters": parameters})
    return out


@dataclass(frozen=True)
class ToolChoice:
    """The request's `tool_choice`: mode "auto", "none" or "required"; `forced` the names a required call
    may use (every offered tool, or the one named function)."""

    mode: str
    forced: tuple[str, ...] = ()


def check_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> ToolChoice:
    names = tuple(t["name"] for t in tools)
    if tool_choice is not None and not tools:
        raise ToolRequestError("tool_choice is only allowed when tools are specified", "tool_choice")
    if tool_choice is None or tool_choice in ("auto", "none"):
        return ToolChoice(tool_choice or "auto")
    if tool_choice == "required":
        return ToolChoice("required", names)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function":
        raise ToolRequestError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', "
                               f"'function': {{'name': ...}}}}, got {tool_choice!r}", "tool_choice")
    if fn.get("name") not in names:
        raise ToolRequestError(f"tool_choice names function {fn.get('name')!r}, which is not among the tools "
                               f"({', '.join(names)})", "tool_choice")
    return ToolChoice("required", (fn["name"],))


def call_schema(tools: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """JSON Schema of one call {"name", "arguments"} to one of the tools `names`, each call's arguments
    bound to its tool's `parameters`: the constraint of a forced call."""
    variants = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                  "arguments": _closed(t["parameters"])},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for t in tools if t["name"] in names]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _closed(schema: Any) -> Any:
    """`schema` with "additionalProperties": false on each object that lists its properties and says
    nothing about others. JSON Schema allows extra keys by default, and LangChain and pydantic tool
    schemas leave the keyword out; constrained to such a schema, SmolLM2 went on inventing keys until
    max_tokens (a manual run: no call came back). A function takes only the arguments it declares, as
    OpenAI's strict mode assumes."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if k in ("items", "anyOf", "oneOf", "allOf") else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions"):  # maps of name -> schema
        if isinstance(schema.get(key), dict):
            out[key] = {name: _closed(v) for name, v in schema[key].items()}
    if isinstance(schema.get("properties"), dict):
        out.setdefault("additionalProperties", False)
    return out


def to_chat_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     native: bool = True) -> list[dict[str, Any]]:
    """OpenAI request messages (role, content text, tool_calls, tool_call_id) -> gptlab chat messages:
    tool calls as {"name", "arguments"}, tool outputs in the order of their calls, the tool list in the
    system prompt. Structure (alternation, one output per call) is left to `chat.validate_messages`.
    Not `native` (a model without tool tokens): calls and outputs become text turns and the system prompt
    asks for a JSON call (`_as_text_turns`, module docstring)."""
    out: list[dict[str, Any]] = []
    call_ids: list[str] = []  # ids of the calls of the last assistant message, in order
    outputs: dict[str, dict] = {}  # their outputs so far, by id
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in call_ids or call_id in outputs:
                raise ToolRequestError(f"messages[{i}]: tool_call_id {call_id!r} does not name an unanswered call "
                                       "of the assistant message before it", "messages")
            outputs[call_id] = {"role": "tool", "content": m["content"]}
            if len(outputs) == len(call_ids):
                out += [outputs[c] for c in call_ids]
            continue
        if outputs and len(outputs) < len(call_ids):  # let validate_messages name what is missing
            out += list(outputs.values())
        call_ids, outputs = [], {}
        msg = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
                    raise ToolRequestError(f"messages[{i}]: a tool call must be {{'id', 'type': 'function', "
                                           "'function': {'name', 'arguments'}}", "messages")
                calls.append({"name": fn.get("name"), "arguments": fn.get("arguments", {})})
                call_ids.append(call["id"])
            if len(set(call_ids)) < len(call_ids):
                raise ToolRequestError(f"messages[{i}]: tool call ids must be unique", "messages")
            msg["tool_calls"] = calls
        out.append(msg)
    if outputs and len(outputs) < len(call_ids):
        out += list(outputs.values())
    if not native:
        out = _as_text_turns(out)
    if tools:
        def system(text):
            prompt = tool_system_prompt(text, tools)
            return prompt if native else prompt + "\n\n" + JSON_CALL_INSTRUCTION
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": system(out[0]["content"])}
        else:
            out.insert(0, {"role": "system", "content": system(None)})
    return out


def _as_text_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls and tool outputs as a model without tool tokens sees them: an assistant turn that ends with
    its calls' JSON (one per line, as the model is asked to write them), then one user turn with the
    outputs ("Output of NAME: ..."), merged with a user message that follows."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # names of the calls still waiting for their output
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            pending = [call["name"] for call in m["tool_calls"]]
            texts = [m["content"], *(tool_call_json(call) for call in m["tool_calls"])]
            out.append({"role": "assistant", "content": "\n".join(t for t in texts if t)})
            continue
        text = m["content"]
        role = m["role"]
        if role == "tool":
            role, text = "user", f"Output of {pending.pop(0) if pending else 'the tool'}: {text}"
        if role == "user" and out and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + (text or "")}
        else:
            out.append({"role": role, "content": text})
    return out


def openai_tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


@dataclass
class ToolCallParser:
    """Splits one choice's generated text into content and a tool call, event by event.

    `feed` takes each decode event (the sampled token id, the text it released, the finish reason) and
    returns the content to show now, the tool call (OpenAI shape) once the choice has finished with one,
    and the finish reason to report. Text after `<|tool_call_start|>` is held until the end decides
    whether it was a well-formed call."""

    start_id: int
    end_id: int
    tool_names: frozenset[str]
    in_call: bool = False
    call_text: str = ""  # what the model wrote after <|tool_call_start|>

    def feed(self, token_id: int, text: str, finish_reason: str | None) -> tuple[str, dict | None, str | None]:
        content = ""
        if self.in_call:
            self.call_text += text
        elif token_id == self.start_id:
            self.in_call = True
            before, marker, after = text.rpartition(CALL_START)
            content, self.call_text = (before, after) if marker else ("", text)
        else:
            content = text
        if finish_reason is None or not self.in_call:
            return content, None, finish_reason
        if token_id == self.end_id and finish_reason == "stop":
            call = self._parse(self.call_text)
            if call is not None:
                return content, call, "tool_calls"
            return content + CALL_START + self.call_text + CALL_END, None, finish_reason
        return content + CALL_START + self.call_text, None, finish_reason

    def _parse(self, text: str) -> dict | None:
        return parse_call(text, self.tool_names)


def parse_call(text: str, tool_names: frozenset[str]) -> dict | None:
    """A call {"name", "arguments"} read defensively (`structured.parse_json`: fences, prose after it,
    repairs), in OpenAI's shape; None unless it names one of `tool_names` with object arguments (a JSON
    object string is accepted too)."""
    call = parse_json(text, {"type": "object"}).value
    if not isinstance(call, dict) or call.get("name") not in tool_names:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = parse_json(arguments, {"type": "object"}).value
    return openai_tool_call(call["name"], arguments) if isinstance(arguments, dict) else None


@dataclass
class JsonCallParser:
    """`ToolCallParser` for models without tool tokens, which write a call as a JSON reply (module
    docstring). Same `feed` interface. A reply that starts with "{" or a ``` fence is held until the end
    decides whether it is a call; any other reply streams as content at once. `forced` (tool_choice
    required: the reply is a constrained call) holds everything."""

    tool_names: frozenset[str]
    forced: bool = False
    held: str = ""
    passing: bool = False  # the reply is known to be text, not a call

    def feed(self, token_id: int, text: str, finish_reason: str | None) -> tuple[str, dict | None, str | None]:
        if self.passing:
            return text, None, finish_reason
        self.held += text
        start = self.held.lstrip()[:1]
        if start and start not in "{`" and not self.forced:
            self.passing, text, self.held = True, self.held, ""
            return text, None, finish_reason
        if finish_reason is None:
            return "", None, None
        call = parse_call(self.held, self.tool_names) if finish_reason == "stop" else None
        return ("", call, "tool_calls") if call is not None else (self.held, None, finish_reason)
