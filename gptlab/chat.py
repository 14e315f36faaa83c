"""The chat format: OpenAI-style `messages` <-> token ids with a loss mask, plus the same format as a Jinja
chat template for Hugging Face exports.

A conversation is a list of messages `{"role": "system"|"user"|"assistant"|"tool", "content": str}`; an
assistant message may carry `"tool_calls": [{"name": ..., "arguments": {...}}]` (the OpenAI nesting
`{"type": "function", "function": {"name": ..., "arguments": "<json>"}}` is accepted too).

Design decisions
- Layout, in tokens (specials in angle brackets, everything else is `tokenizer.encode(text)`):
      <|endoftext|> [<|system_start|> text <|system_end|>] <|user_start|> text <|user_end|>
      <|assistant_start|> text [<|tool_call_start|> json <|tool_call_end|>
                                <|tool_output_start|> text <|tool_output_end|> text] <|assistant_end|> ...
  `<|endoftext|>` opens the conversation exactly as it opens every pretraining document (BOS).
- A tool call and its output live INSIDE one assistant turn (as in nanochat's calculator): the assistant
  message that makes the call does not close the turn, the tool message(s) follow inline, and the next
  assistant message continues the same turn without a new `<|assistant_start|>`. At inference the engine
  sees `<|tool_call_end|>`, runs the tool, appends the output block and lets the model continue: no role
  switch, and `render_for_completion` of a conversation that ends with a tool output simply stops there.
- Loss mask: 1 on what the assistant writes (its text, its tool-call blocks, and `<|assistant_end|>` so it
  learns to stop), 0 on everything else: the prompt, `<|assistant_start|>` (the engine writes it) and tool
  outputs (the environment writes them). Training targets are the ids shifted by one with -1 where the
  mask is 0, matching `ignore_index=-1` in `GPT.forward`.
- Every text field is encoded as ordinary text: a user who types "<|assistant_start|>" gets those
  characters, never the control token (prompt-injection defence; tests check it). The HF template below
  cannot offer this: text templates are re-tokenized with special-token matching, a known limitation of
  Jinja chat templates, so parity with it holds for content free of special-token strings.
- Validation is strict and fails with one-line `GptlabError`s naming the message: a malformed SFT file
  should stop a run at load time, not silently train on garbage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .common import GptlabError, atomic_write_text, iter_records
from .tokenizer import EOT, Tokenizer

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")

# The chat template for Hugging Face exports (tokenizer_config.json "chat_template"). It reproduces
# `render` (add_generation_prompt=False) and `render_for_completion` (True) character for character; the
# {% generation %} blocks mark exactly the tokens our loss mask marks, so HF's
# `return_assistant_tokens_mask=True` agrees with `Rendered.mask`. Written without newlines so Jinja's
# trim_blocks/lstrip_blocks settings cannot change it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}" + EOT + "{%- endif -%}"
    "{%- if message.role == 'system' -%}<|system_start|>{{ message.content }}<|system_end|>"
    "{%- elif message.role == 'user' -%}<|user_start|>{{ message.content }}<|user_end|>"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}<|assistant_start|>{%- endif -%}"
    "{%- generation -%}"
    "{%- if message.content -%}{{ message.content }}{%- endif -%}"
    "{%- if message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- set args = fn.arguments if fn.arguments is defined else {} -%}"
    '<|tool_call_start|>{"name": {{ fn.name | tojson }}, "arguments": '
    "{% if args is string %}{{ args }}{% else %}{{ args | tojson }}{% endif %}"
    "}<|tool_call_end|>"
    "{%- endfor -%}"
    "{%- else -%}<|assistant_end|>{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- elif message.role == 'tool' -%}<|tool_output_start|>{{ message.content }}<|tool_output_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (messages | length == 0 or messages[-1].role != 'tool') -%}"
    "<|assistant_start|>"
    "{%- endif -%}"
)


@dataclass
class Rendered:
    """Token ids of a conversation and the loss mask (1 = the model is trained to produce this token)."""

    ids: list[int]
    mask: list[int]

    def inputs_targets(self) -> tuple[list[int], list[int]]:
        """Next-token training pair: inputs ids[:-1], targets ids[1:] with -1 where the target is masked."""
        targets = [t if m else -1 for t, m in zip(self.ids[1:], self.mask[1:])]
        return self.ids[:-1], targets


# ---- validation -------------------------------------------------------------------------------------------
def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One tool call as {"name": str, "arguments": dict | JSON-object string}, from either accepted shape."""
    if not isinstance(call, dict):
        raise GptlabError(f"{where}: a tool call must be an object, got {type(call).__name__}")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name, arguments = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise GptlabError(f"{where}: a tool call needs a non-empty string 'name'")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise GptlabError(f"{where}: tool call {name!r} has arguments that are not a JSON object")
    elif not isinstance(arguments, dict):
        raise GptlabError(f"{where}: tool call {name!r} arguments must be an object, got {type(arguments).__name__}")
    return {"name": name, "arguments": arguments}


def validate_messages(messages: Any, *, complete: bool = True) -> list[Message]:
    """Check a conversation and return normalized copies of its messages (tool calls as name/arguments,
    `None` content of a tool-calling assistant message as "").

    Order: an optional system message first; then user and assistant alternate, starting with the user; an
    assistant message with tool calls is followed by exactly one tool message per call and then by an
    assistant message that continues the turn. `complete=True` (training) requires the conversation to end
    with a finished assistant turn; `complete=False` (prompting) requires it to end where the assistant
    speaks next: after a user message or after all tool outputs."""
    if not isinstance(messages, list) or not messages:
        raise GptlabError("a conversation must be a non-empty list of messages")
    out: list[Message] = []
    expect = {"system", "user"}  # roles allowed next
    pending_tools = 0
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            raise GptlabError(f"message {i}: must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise GptlabError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        where = f"message {i} ({role})"
        if role not in expect:
            if role == "system":
                raise GptlabError(f"{where}: a system message may only come first")
            if role == "tool":
                raise GptlabError(f"{where}: a tool message must answer a tool call of the assistant message before it")
            if pending_tools:
                raise GptlabError(f"{where}: expected {pending_tools} more tool message(s) answering the tool calls")
            previous = out[-1]["role"] if out else "nothing"
            raise GptlabError(f"{where}: expected {' or '.join(sorted(expect))} after {previous} "
                              "(user and assistant messages must alternate)")
        content = msg.get("content")
        calls = msg.get("tool_calls") or []
        if role == "assistant" and content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise GptlabError(f"{where}: content must be a string, got {type(content).__name__}")
        if calls and role != "assistant":
            raise GptlabError(f"{where}: only assistant messages may have tool_calls")
        if not isinstance(calls, list):
            raise GptlabError(f"{where}: tool_calls must be a list")
        norm: Message = {"role": role, "content": content}
        if calls:
            norm["tool_calls"] = [_tool_call(c, where) for c in calls]
        elif role == "assistant" and not content.strip():
            raise GptlabError(f"{where}: empty assistant message (no text and no tool call)")
        out.append(norm)
        if role == "system":
            expect = {"user"}
        elif role == "user":
            expect = {"assistant"}
        elif role == "assistant":
            pending_tools = len(calls)
            expect = {"tool"} if calls else {"user"}
        else:  # tool
            pending_tools -= 1
            expect = {"tool"} if pending_tools else {"assistant"}
    last = out[-1]
    if complete and (last["role"] != "assistant" or last.get("tool_calls")):
        raise GptlabError(f"conversation ends with a {'tool call' if last.get('tool_calls') else last['role'] + ' message'}"
                          ", not a finished assistant turn (nothing to train on; prompts go to render_for_completion)")
    if not complete and (last["role"] not in ("user", "tool") or pending_tools):
        ending = "unanswered tool calls" if pending_tools or last.get("tool_calls") else f"the {last['role']} message"
        raise GptlabError(f"a prompt must end with a user message or with every tool output, not with {ending}")
    return out


# ---- rendering --------------------------------------------------------------------------------------------
def tool_call_json(call: dict[str, Any]) -> str:
    """The text between <|tool_call_start|> and <|tool_call_end|>; string arguments are kept verbatim so
    the Jinja template (which cannot re-serialize them) renders the same characters."""
    arguments = call["arguments"]
    args_json = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return '{"name": ' + json.dumps(call["name"], ensure_ascii=False) + ', "arguments": ' + args_json + "}"


def _render(tokenizer: Tokenizer, messages: list[Message]) -> Rendered:
    sp = tokenizer.special_id
    ids: list[int] = [tokenizer.eot_id]
    mask: list[int] = [0]

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(trained)] * len(tokens))

    for i, msg in enumerate(messages):
        role, text = msg["role"], msg["content"]
        if role in ("system", "user"):
            add([sp(f"<|{role}_start|>"), *tokenizer.encode(text), sp(f"<|{role}_end|>")], False)
        elif role == "tool":
            add([sp("<|tool_output_start|>"), *tokenizer.encode(text), sp("<|tool_output_end|>")], False)
        else:
            if i == 0 or messages[i - 1]["role"] != "tool":
                add([sp("<|assistant_start|>")], False)
            add(tokenizer.encode(text), True)
            for call in msg.get("tool_calls", []):
                add([sp("<|tool_call_start|>"), *tokenizer.encode(tool_call_json(call)), sp("<|tool_call_end|>")], True)
            if not msg.get("tool_calls"):
                add([sp("<|assistant_end|>")], True)
    return Rendered(ids, mask)


def render(tokenizer: Tokenizer, messages: Any) -> Rendered:
    """Token ids and loss mask of a complete conversation (for SFT and reward modelling)."""
    return _render(tokenizer, validate_messages(messages, complete=True))


def render_for_completion(tokenizer: Tokenizer, messages: Any) -> list[int]:
    """Prompt ids that make the model write the next assistant turn: the conversation followed by
    `<|assistant_start|>`; after a tool output the turn is already open, so nothing is added.
    An imported model with its own chat template (`tokenizer.chat_template`) is prompted through it."""
    messages = validate_messages(messages, complete=False)
    if tokenizer.chat_template is not None:
        return render_template(tokenizer, messages, add_generation_prompt=True)
    ids = _render(tokenizer, messages).ids
    if messages[-1]["role"] != "tool":
        ids.append(tokenizer.special_id("<|assistant_start|>"))
    return ids


def response_text(response: Sequence[Message]) -> str:
    """What a checker reads from an assistant response given as messages: the assistant's own text, one
    segment per message, without tool-call JSON or tool outputs."""
    return "\n".join(m["content"] for m in response if m["role"] == "assistant" and m.get("content"))


def completion_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """`response_text` of a generated assistant turn given as token ids (what follows <|assistant_start|>):
    text outside tool-call and tool-output blocks, up to <|assistant_end|> or the end of `ids`."""
    sp = tokenizer.special_tokens
    skip_until = {sp["<|tool_call_start|>"]: sp["<|tool_call_end|>"],
                  sp["<|tool_output_start|>"]: sp["<|tool_output_end|>"]}
    stops = {sp["<|assistant_end|>"], tokenizer.eot_id}
    segments: list[list[int]] = [[]]
    closing = None
    for t in ids:
        if closing is not None:
            if t == closing:
                closing = None
                segments.append([])
        elif t in stops:
            break
        elif t in skip_until:
            closing = skip_until[t]
        elif t not in sp.values():
            segments[-1].append(t)
    return "\n".join(text for text in map(tokenizer.decode, segments) if text)


# ---- JSONL files ------------------------------------------------------------------------------------------
def read_messages_jsonl(path: str | os.PathLike, *, complete: bool = True) -> Iterator[list[Message]]:
    """Conversations from an OpenAI-style JSONL file: one `{"messages": [...]}` object per line (blank lines
    are skipped), or from a Hugging Face dataset with a `messages` column (`common.iter_records`: a
    `save_to_disk` folder or `hf:NAME[:SPLIT]`). Every error names `file:line` (or `dataset[row]`)."""
    for where, record in iter_records(path, "messages file"):
        if not isinstance(record, dict) or "messages" not in record:
            raise GptlabError(f"{where}: expected an object with a 'messages' list")
        try:
            yield validate_messages(record["messages"], complete=complete)
        except GptlabError as e:
            raise GptlabError(f"{where}: {e}") from None


def write_messages_jsonl(path: str | os.PathLike, conversations: Iterable[Sequence[Message]]) -> int:
    """Write conversations as OpenAI-style JSONL (atomically); returns how many were written."""
    lines = [json.dumps({"messages": list(c)}, ensure_ascii=False) for c in conversations]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def render_template(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """Render with the tokenizer's Jinja chat template (the variables `transformers.apply_chat_template`
    passes), then encode so that only the template's own markup may become special tokens.

    Each message's text is swapped for a sentinel before rendering; the rendered string is cut at the
    sentinels, template pieces are encoded with special tokens allowed and message text as ordinary text.
    So "<|im_end|>" typed by a user stays text, as it does in gptlab's own format."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks; for
        rendering a prompt its body is output as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    texts = [m.get("content") or "" for m in messages]
    sentinels = [f"\x00gptlab-message-{i}\x00" for i in range(len(texts))]
    masked = [{**m, "content": sentinel} for m, sentinel in zip(messages, sentinels)]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock])
    env.globals["raise_exception"] = raise_exception
    try:
        rendered = env.from_string(tokenizer.chat_template).render(
            messages=masked, add_generation_prompt=add_generation_prompt, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "")
    except TemplateError as e:
        raise GptlabError(f"the model's chat template failed: {e}") from None
    ids: list[int] = []
    for text, sentinel in zip(texts, sentinels):
        head, found, rendered = rendered.partition(sentinel)
        if not found:
            raise GptlabError("the model's chat template transforms message text; only templates that insert "
                              "it verbatim are supported")
        ids += tokenizer.encode(head, allowed_special="all") + tokenizer.encode(text)
    return ids + tokenizer.encode(rendered, allowed_special="all")
