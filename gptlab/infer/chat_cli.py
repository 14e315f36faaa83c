"""`gptlab chat`: talk to a model in the terminal, or ask one question from a script (`-p`).

Design decisions
- The conversation is kept as OpenAI-style messages and re-rendered with `chat.render_for_completion`
  every turn (the same format SFT trained on and the server uses), so `/save` writes exactly what the
  model saw, as a JSONL line that `gptlab` training and evaluation commands read back.
- Ctrl-C while an answer streams stops that answer only: the text shown so far stays in the history
  (the model should see what the user saw), and the session goes on. Ctrl-C at the prompt clears the
  line; Ctrl-D, `/quit` or `/exit` ends the session.
- When the history no longer fits the context window with room for an answer, the oldest
  user/assistant exchanges are dropped (the system prompt stays) instead of letting the engine cut the
  rendered tokens from the left, which would remove the system prompt and the conversation start token
  first.
- Sampling flags are the ones `gptlab sample` uses (`sample.add_sampling_args`). Settings not given
  come from the model's generation_config.json, else `CHAT_DEFAULTS` (temperature 0.8, top-p 0.95, as
  the server answers chat requests): at `gptlab sample`'s temperature 1 a small model's first answer is
  noise.
  The settings in effect are logged once at start (stderr).
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..chat import render_for_completion, write_messages_jsonl
from ..common import DTYPE_NAMES, GptlabError, get_logger, torch_device, torch_dtype
from ..quant import add_quantize_arg
from .engine import Engine
from .sampling import SamplingParams

log = get_logger("chat")

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /save FILE      write the conversation to FILE as one JSONL line {"messages": [...]}
  /system TEXT    set the system prompt (empty TEXT removes it) and reset
  /help           this text
  /quit, /exit    leave (Ctrl-D too); Ctrl-C stops the current answer"""


class ChatSession:
    """A conversation with one model: history, rendering within the context window, streamed answers."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine = engine
        self.params = params
        self.system = system or None
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self) -> list[int]:
        """The conversation rendered for the next answer, dropping the oldest exchanges until it leaves
        `min(max_new_tokens, window // 2)` positions free (the engine's room rule)."""
        room = min(self.params.max_new_tokens, self.engine.window // 2)
        while True:
            ids = render_for_completion(self.engine.tokenizer, self.messages())
            if len(ids) + room <= self.engine.window or len(self.history) <= 1:
                return ids
            self.history = self.history[2:]
            log.info("conversation too long for the context window: dropped the oldest exchange")

    def ask(self, text: str, out=None) -> tuple[str, str]:
        """Add a user message, stream the answer to `out`, record it; returns (answer, finish reason),
        finish reason "interrupted" after Ctrl-C."""
        out = out or sys.stdout
        self.history.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except GptlabError:
            self.history.pop()
            raise
        answer, finish = "", None
        try:
            for event in self.engine.stream_batch([ids], self.params):
                if event.text:
                    answer += event.text
                    out.write(event.text)
                    out.flush()
                finish = event.finish_reason or finish
        except KeyboardInterrupt:
            finish = "interrupted"
        if answer.strip():
            self.history.append({"role": "assistant", "content": answer})
        else:  # an empty assistant turn is not a valid message; forget the question instead
            self.history.pop()
        return answer, finish or "length"


def run_interactive(session: ChatSession, read=input, out=None) -> None:
    out = out or sys.stdout
    out.write("gptlab chat: /help for commands, Ctrl-C stops an answer, Ctrl-D quits\n")
    while True:
        try:
            line = read("you> ")
        except KeyboardInterrupt:
            out.write("\n")
            continue
        except EOFError:
            out.write("\n")
            return
        command, _, argument = line.strip().partition(" ")
        if not line.strip():
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            out.write(HELP + "\n")
        elif command == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
        elif command == "/system":
            session.system = argument.strip() or None
            session.reset()
            out.write("(system prompt set, conversation reset)\n")
        elif command == "/save":
            if not argument.strip():
                out.write("usage: /save FILE\n")
            else:
                try:
                    write_messages_jsonl(argument.strip(), [session.messages()])
                    out.write(f"(saved {len(session.messages())} messages to {argument.strip()})\n")
                except OSError as e:
                    out.write(f"error: cannot write {argument.strip()}: {e.strerror}\n")
        elif command.startswith("/") and " " not in command and len(command) > 1:
            out.write(f"unknown command {command}; /help lists them\n")
        else:
            out.write("assistant> ")
            out.flush()
            try:
                _, finish = session.ask(line, out)
            except GptlabError as e:
                out.write(f"error: {e}\n")
                continue
            out.write(" [stopped]\n" if finish == "interrupted" else "\n")
        out.flush()


def _cmd_chat(args: argparse.Namespace) -> None:
    from ..checkpoint import load_for_inference
    from .generation_config import CHAT_DEFAULTS
    from .sample import sampling_params_from_args

    if args.num_beams > 1:
        raise GptlabError("chat streams its answers; beam search (--num-beams > 1) cannot stream")
    question = None
    if args.prompt is not None:
        question = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not question.strip():
            raise GptlabError("empty prompt")
    model, tokenizer = load_for_inference(args.model, device=torch_device(args.device), dtype=torch_dtype(args.dtype),
                                          quantize=args.quantize)
    engine = Engine(model.eval(), tokenizer, strict_context=args.strict_context)
    session = ChatSession(engine, sampling_params_from_args(args, tokenizer, CHAT_DEFAULTS), args.system)
    if question is not None:
        _, finish = session.ask(question)
        sys.stdout.write("\n")
        log.debug("finish reason: %s", finish)
        return
    try:  # line editing and history at the prompt, where available
        import readline  # noqa: F401
    except ImportError:
        pass
    # Ctrl-C must stop an answer even when the chat was started from a context that ignores SIGINT
    # (a background job of a non-interactive shell passes SIG_IGN on, and Python then never raises
    # KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_interactive(session)


def register(sub) -> None:
    from .generation_config import CHAT_DEFAULTS
    from .sample import add_sampling_args

    p = sub.add_parser("chat", help="chat with a model in the terminal (or answer one question with -p)")
    p.add_argument("--model", required=True, help="model directory (gptlab.json + model.safetensors + tokenizer.json)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("-p", "--prompt", default=None,
                   help="answer this one question and exit ('-' reads it from stdin); only the answer is printed")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    add_quantize_arg(p)
    add_sampling_args(p, CHAT_DEFAULTS)
    p.set_defaults(func=_cmd_chat)
