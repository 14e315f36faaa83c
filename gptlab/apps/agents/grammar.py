"""The grammar protocol: the text protocol (react.py) with every reply constrained, token by token, to
one well-formed step, so a malformed action cannot be written.

    constraint = action_grammar(toolbox)       # an infer.constraints.Constraint (a Lark grammar)
    llm.chat(messages, constraint=constraint)  # backends with `supports_grammar` (LocalLLM)

A reply is an optional bounded "Thought: <one line>\\n", then EITHER "Action: <a tool name>\\nAction Input:
<a JSON object valid for THAT tool's parameters schema>" OR "Final Answer: <one line>".

Design decisions
- One Lark grammar (llguidance's dialect) with one alternative per tool: the name is a literal and its
  arguments an embedded `%json {schema}` of that tool's own parameters schema, so the name and the input
  agree by construction (a name-then-any-object grammar would let a schema failure through). JSON is
  compact (llguidance's options in infer/constraints.py), the grammar ends after the closing brace, so
  generation stops there without a stop string.
- Bounded free text: the Thought line is at most `max_thought_chars` and the answer at most
  `max_answer_chars` characters of one line without control characters (a regex lexeme with a repetition bound), so a model cannot
  ramble inside the grammar forever and the action has room within the reply's token budget. Neither may
  be empty or start with a space (a small model otherwise pads with spaces). String arguments without a
  bound of their own get maxLength `max_string_chars` in the grammar's copy of the schema (the tool
  itself still validates the call against its own schema).
- What the grammar cannot bound is token count: a reply cut by `max_tokens` before the grammar completes
  is incomplete. The loop therefore sizes the bounds from its token budget (`fitted_grammar`: a quarter
  of `max_tokens` characters for the Thought, half for the answer and for each string argument), since
  an ASCII character is at most one token: a Thought plus one string argument then fit, with room for
  the markers. Measured (docs/benchmarks.md, agents): with fixed bounds of 160/200 characters and 96 tokens,
  SmolLM2-135M looped inside a Thought or a string until cut. What still does not fit (several long
  string arguments, huge numbers, non-ASCII text) is read like a text-protocol reply: with repairs a
  truncated object is closed (`structured.parse_json`) and counted as repaired, else it is malformed and
  corrected.
- Only in-process backends can enforce it: over HTTP, OpenAI's API carries only JSON Schema
  (`response_format`), so HttpLLM keeps the plain text protocol and its repairs (react.py).
"""

from __future__ import annotations

import json

from ...common import GptlabError
from ...infer.constraints import JSON_OPTIONS, Constraint
from ...tools.base import Toolbox

MAX_THOUGHT_CHARS = 160
MAX_ANSWER_CHARS = 200
MAX_STRING_CHARS = 200


def bounded(schema, max_string_chars: int = MAX_STRING_CHARS):
    """A copy of a JSON schema where every string without its own bound has maxLength `max_string_chars`
    (module docstring: a string argument otherwise runs to max_tokens)."""
    if isinstance(schema, list):
        return [bounded(s, max_string_chars) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v, max_string_chars) for k, v in schema.items()}
    free = not {"maxLength", "enum", "const", "pattern", "format"} & set(schema)
    if schema.get("type") == "string" and free:
        out["maxLength"] = max_string_chars
    return out


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON escapes are Lark escapes


def action_grammar(toolbox: Toolbox, max_thought_chars: int = MAX_THOUGHT_CHARS,
                   max_answer_chars: int = MAX_ANSWER_CHARS, max_string_chars: int = MAX_STRING_CHARS) -> Constraint:
    """The Lark grammar of one reply of the grammar protocol (module docstring) for `toolbox`."""
    if min(max_thought_chars, max_answer_chars, max_string_chars) < 1:
        raise GptlabError("max_thought_chars, max_answer_chars and max_string_chars must be >= 1")
    rules = [f"THOUGHT_TEXT: /[^\\x00-\\x20][^\\x00-\\x1f]{{0,{max_thought_chars - 1}}}/",
             f"ANSWER_TEXT: /[^\\x00-\\x20][^\\x00-\\x1f]{{0,{max_answer_chars - 1}}}/",
             'thought: "Thought: " THOUGHT_TEXT "\\n"',
             'final: "Final Answer: " ANSWER_TEXT']
    actions = []
    for i, t in enumerate(toolbox):
        schema = json.dumps({**bounded(t.parameters, max_string_chars), "x-guidance": JSON_OPTIONS}, ensure_ascii=False)
        rules.append(f"args_{i}: %json {schema}")
        actions.append(f'{_literal("Action: " + t.name + chr(10) + "Action Input: ")} args_{i}')
    step = "final" if not actions else "action | final"
    if actions:
        rules.append("action: " + " | ".join(actions))
    rules.insert(0, f"start: thought? ({step})")
    return Constraint.lark("\n".join(rules) + "\n")


def fitted_grammar(toolbox: Toolbox, max_tokens: int) -> Constraint:
    """`action_grammar` with bounds sized to a reply of `max_tokens` tokens (module docstring), never above
    the defaults."""
    quarter, half = max(1, max_tokens // 4), max(1, max_tokens // 2)
    return action_grammar(toolbox, min(MAX_THOUGHT_CHARS, quarter), min(MAX_ANSWER_CHARS, half),
                          min(MAX_STRING_CHARS, half))
