"""Agent traces: one JSONL event per line, appended and flushed as it happens, and their rendering.

    with Trace("run.jsonl") as trace:
        trace.event("tool", agent="solver", name="calculator", arguments={...}, observation="4", seconds=0.01)
    print(render_text(read_trace("run.jsonl")))
    write_html(read_trace("run.jsonl"), "run.html")      # charts inline (base64 PNG)

Design decisions
- A trace is written while the run happens, one line per event, flushed at once: a run that crashes or is
  interrupted leaves every event up to that moment on disk (nothing is held back for a final write).
  Events: "start" (agent, task, model, protocol, tools, workspace), "message" (a message added to an
  agent's context: role, content), "llm" (one model call: reply, tool calls, tokens, seconds), "tool"
  (name, arguments, observation, ok, seconds, files), "malformed" (a reply the loop could not act on and
  the correction it sent), "route" (a team's mediator forwarding a message), "final" (answer, finished,
  steps, tokens, seconds). Every event has "t" (seconds since the trace was opened) and "agent".
- Reading is forgiving of the one thing a crash can leave: a torn last line is reported and skipped;
  a bad line elsewhere is a GptlabError naming file:line (the file is then not a trace).
- The HTML page is self-contained (one file to share): styles inline, chart PNGs named by tool events
  embedded as base64 data URIs, every text escaped (tool output is untrusted).
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path
from typing import Any

from ...common import GptlabError, atomic_write_text, get_logger

log = get_logger("agents")


class Trace:
    """Appends events to a JSONL file (None: events are only kept in memory, `events`)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.events: list[dict] = []
        self._start = time.perf_counter()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def event(self, kind: str, **fields: Any) -> dict:
        record = {"event": kind, "t": round(time.perf_counter() - self._start, 4), **fields}
        self.events.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trace(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path}: no such trace file")
    lines = path.read_text(encoding="utf-8").splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # a torn last line: the run was killed mid-write
                log.warning("%s:%d: torn last line skipped (%s)", path, number, e.msg)
                continue
            raise GptlabError(f"{path}:{number}: not a trace event ({e.msg})") from None
        if not isinstance(record, dict) or "event" not in record:
            raise GptlabError(f"{path}:{number}: not a trace event (an object with an 'event' field)")
        events.append(record)
    return events


def _short(text: Any, limit: int) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + f" ... [{len(text) - limit} more characters]"


def _line(e: dict, limit: int) -> str | None:
    """One event as terminal text (None: not shown)."""
    who = f"[{e.get('agent', '?')}]"
    kind = e["event"]
    if kind == "start":
        tools = ", ".join(e.get("tools") or []) or "none"
        return f"{who} start: model {e.get('model')}, protocol {e.get('protocol')}, tools {tools}\n  task: " + \
            _short(e.get("task", ""), limit)
    if kind == "llm":
        calls = "".join(f"\n  tool call: {c['function']['name']} {c['function']['arguments']}"
                        for c in e.get("tool_calls") or [])
        return (f"{who} step {e.get('step')}: {e.get('prompt_tokens', 0)}+{e.get('completion_tokens', 0)} tokens, "
                f"{e.get('seconds', 0):.2f} s\n  " + _short(e.get("reply", ""), limit).replace("\n", "\n  ") + calls)
    if kind == "tool":
        files = f" files: {', '.join(e['files'])}" if e.get("files") else ""
        status = "ok" if e.get("ok") else "failed"
        return (f"{who} tool {e.get('name')}({_short(e.get('arguments'), 200)}) {status} in "
                f"{e.get('seconds', 0):.2f} s{files}\n  -> " + _short(e.get("observation", ""), limit).replace("\n", "\n     "))
    if kind == "malformed":
        return f"{who} malformed reply ({e.get('problem')}); sent a correction"
    if kind == "route":
        return f"[mediator] {e.get('sender')} -> {e.get('recipient')}: " + _short(e.get("content", ""), limit)
    if kind == "final":
        status = "final answer" if e.get("finished") else "NO final answer (" + str(e.get("reason")) + ")"
        return (f"{who} {status} after {e.get('steps')} steps, {e.get('prompt_tokens', 0)}+"
                f"{e.get('completion_tokens', 0)} tokens, {e.get('seconds', 0):.1f} s:\n  " +
                _short(e.get("answer", ""), limit).replace("\n", "\n  "))
    if kind == "team_final":
        return (f"[mediator] team {'finished' if e.get('finished') else 'stopped: ' + str(e.get('reason'))} after "
                f"{e.get('turns')} turns, {e.get('tokens')} tokens, {e.get('seconds', 0):.1f} s; report: {e.get('report')}")
    return None  # "message" events repeat what llm/tool events show


def render_text(events: list[dict], limit: int = 600) -> str:
    """The trace as readable terminal text (long texts cut at `limit` characters)."""
    return "\n".join(line for line in (_line(e, limit) for e in events) if line is not None)


def _image_tags(e: dict, workspace: Path | None) -> str:
    tags = []
    for name in e.get("files") or []:
        path = Path(name) if Path(name).is_absolute() or workspace is None else workspace / name
        if path.suffix.lower() == ".png" and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            tags.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        else:
            tags.append(f"<p class=meta>file {html.escape(name)}{' (missing)' if not path.is_file() else ''}</p>")
    return "".join(tags)


_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
          ".ev{border-left:4px solid #ccc;margin:.6em 0;padding:.2em .8em}.llm{border-color:#48c}"
          ".tool{border-color:#4a4}.bad{border-color:#c44}.final{border-color:#a4a}.route{border-color:#c84}"
          "pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;margin:.3em 0}.meta{color:#666;font-size:90%}"
          "img{max-width:100%}")


def write_html(events: list[dict], out: str | os.PathLike, title: str = "gptlab agent trace") -> Path:
    """A self-contained HTML page of the trace, chart PNGs inline (module docstring)."""
    workspaces: dict[str, Path] = {}
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{_STYLE}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for e in events:
        agent = str(e.get("agent", ""))
        if e["event"] == "start" and e.get("workspace"):
            workspaces[agent] = Path(e["workspace"])
        text = _line(e, 100_000)
        if text is None:
            continue
        css = {"llm": "llm", "tool": "tool" if e.get("ok") else "tool bad", "malformed": "bad", "final": "final",
               "team_final": "final", "route": "route"}.get(e["event"], "")
        head, _, body = text.partition("\n")
        parts.append(f'<div class="ev {css}"><div class=meta>{e.get("t", 0):.2f} s · {html.escape(head)}</div>'
                     + (f"<pre>{html.escape(body)}</pre>" if body else "")
                     + (_image_tags(e, workspaces.get(agent)) if e["event"] == "tool" else "") + "</div>")
    out = Path(out)
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out
