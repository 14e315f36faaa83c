"""Tool calls (OpenAI "function calling") <-> gptlab's chat format.

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
  Forcing a call ("required", or a named function) is refused with a 400: nothing in decoding could
  enforce it, and an answer that ignores it would look right and be wrong.
- One call per response: the format puts the tool's output right after `<|tool_call_end|>`, so decoding
  stops there and the response ends with `finish_reason: "tool_calls"` and that one call
  (`parallel_tool_calls` is accepted and has no effect). Request messages may carry several calls.
- A call is returned as a tool call only when its text is a JSON object with a `name` among the offered
  tools and object `arguments`; anything else (bad JSON, an unknown tool, the token budget running out
  inside the call) is returned as plain content, markers included, exactly as the model wrote it, with
  finish_reason "stop" (or "length"): the client sees what happened instead of a 500 or a call it cannot
  dispatch. `arguments` is re-serialized with `json.dumps`, the form `chat.render` writes dict
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

from ..tokenizer import Tokenizer
from ..tools import tool_system_prompt

CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"
TOOL_CHOICES = ("auto", "none")


class ToolRequestError(ValueError):
    """Invalid tool fields or tool messages in a request (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def supports_tools(tokenizer: Tokenizer) -> bool:
    """gptlab's own chat format has tool-call tokens; an imported model's Jinja template is not given tools."""
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


def check_tool_choice(tool_choice: Any, has_tools: bool) -> str:
    if tool_choice is None:
        return "auto"
    if tool_choice not in TOOL_CHOICES:
        raise ToolRequestError(f"tool_choice {tool_choice!r} is not supported (only 'auto' and 'none'; this "
                               "server cannot force a tool call)", "tool_choice")
    if not has_tools:
        raise ToolRequestError("tool_choice is only allowed when tools are specified", "tool_choice")
    return tool_choice


def to_chat_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI request messages (role, content text, tool_calls, tool_call_id) -> gptlab chat messages:
    tool calls as {"name", "arguments"}, tool outputs in the order of their calls, the tool list in the
    system prompt. Structure (alternation, one output per call) is left to `chat.validate_messages`."""
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
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": tool_system_prompt(out[0]["content"], tools)}
        else:
            out.insert(0, {"role": "system", "content": tool_system_prompt(None, tools)})
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
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in self.tool_names:
            return None
        arguments = call.get("arguments", {})
        return openai_tool_call(call["name"], arguments) if isinstance(arguments, dict) else None
