"""`gptlab chat`: one-shot answers equal the engine's, multi-turn history, /reset, /save, /system, the
context-window policy, and a real Ctrl-C (SIGINT) that stops an answer but not the session."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from _serve_helpers import load_engine, make_model_dir
from gptlab.chat import read_messages_jsonl, render_for_completion
from gptlab.infer.chat_cli import ChatSession, run_interactive
from gptlab.cli import main as cli_main
from gptlab.infer.sampling import SamplingParams
from gptlab.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


def expected_answer(engine, messages) -> str:
    return engine.generate([render_for_completion(engine.tokenizer, messages)], GREEDY)[0].text


def test_one_shot_prints_only_the_answer(model_dir, engine, capsys):
    assert cli_main(["chat", "--model", str(model_dir), "-p", "def dedent(text):", "--system", "be brief",
                     "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def dedent(text):"}]
    assert out == expected_answer(engine, messages) + "\n"


def test_one_shot_errors_are_one_line(model_dir, capsys):
    assert cli_main(["chat", "--model", str(model_dir), "-p", "   "]) == 2
    assert capsys.readouterr().err.strip() == "error: empty prompt"
    assert cli_main(["chat", "--model", str(model_dir), "-p", "x", "--num-beams", "2"]) == 2


def test_interactive_history_reset_save_system(engine, tmp_path):
    session = ChatSession(engine, GREEDY, system="be brief")
    lines = iter(["first question", "second question", f"/save {tmp_path / 'a.jsonl'}", "/reset", "/help",
                  "third question", f"/save {tmp_path / 'b.jsonl'}", "/system you are a parrot",
                  "fourth", f"/save {tmp_path / 'c.jsonl'}", "/nonsense", "/save"])

    def read(prompt):
        assert prompt == "you> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    run_interactive(session, read=read, out=out)
    system = {"role": "system", "content": "be brief"}
    turn1 = [system, {"role": "user", "content": "first question"}]
    a1 = expected_answer(engine, turn1)
    turn2 = [*turn1, {"role": "assistant", "content": a1}, {"role": "user", "content": "second question"}]
    a2 = expected_answer(engine, turn2)  # the second answer sees the whole first exchange
    assert list(read_messages_jsonl(tmp_path / "a.jsonl")) == [[*turn2, {"role": "assistant", "content": a2}]]
    turn3 = [system, {"role": "user", "content": "third question"}]  # /reset forgot the first two
    assert list(read_messages_jsonl(tmp_path / "b.jsonl")) == [
        [*turn3, {"role": "assistant", "content": expected_answer(engine, turn3)}]]
    turn4 = [{"role": "system", "content": "you are a parrot"}, {"role": "user", "content": "fourth"}]
    assert list(read_messages_jsonl(tmp_path / "c.jsonl")) == [
        [*turn4, {"role": "assistant", "content": expected_answer(engine, turn4)}]]
    text = out.getvalue()
    assert f"assistant> {a1}\n" in text and "/reset" in text  # streamed answers; /help printed
    assert "unknown command /nonsense" in text and "usage: /save FILE" in text


def test_long_history_drops_oldest_exchanges_keeps_system(tmp_path):
    engine = load_engine(make_model_dir(tmp_path / "small", max_seq_len=96))
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=16), system="sys")
    questions = [f"question {i}: " + "words " * 8 for i in range(8)]
    for q in questions:
        session.ask(q, out=io.StringIO())
        ids = render_for_completion(engine.tokenizer, session.messages()[:-1])  # the prompt just answered
        assert len(ids) + 16 <= engine.window
    messages = session.messages()
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[-2]["content"] == questions[-1]
    assert questions[0] not in [m["content"] for m in messages]  # the oldest exchange was dropped


def test_ctrl_c_stops_the_answer_not_the_session(tmp_path):
    """The answer is still being written when SIGINT arrives, whatever the machine's speed: the test stops
    reading stdout once the answer has started, so the chat blocks on a full pipe (shrunk to one page)
    long before its 16,000-token budget (>= 16,000 bytes) is written. Reading resumes after the signal;
    the backlog is at most a pipe's worth, read in chunks."""
    model_dir = make_model_dir(tmp_path / "long", max_seq_len=16384)
    saved = tmp_path / "conv.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w+b") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "chat", "--model", str(model_dir),
                                 "--temperature", "0", "--max-new-tokens", "16000"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        fd = proc.stdout.fileno()
        pipe_size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096) if hasattr(fcntl, "F_SETPIPE_SZ") else 65536
        # while the test does not read, the chat can write at most the pipe plus the reader's last chunk
        assert 16000 > 2 * (pipe_size + 1024)
        output = bytearray()
        reading = threading.Event()
        reading.set()

        def answer_started() -> bool:  # more than 20 characters shown ("ignore": a chunk may end mid-character)
            return len(output.partition(b"assistant> ")[2].decode("utf-8", "ignore")) > 20

        def read_stdout():
            while chunk := os.read(fd, 1024):
                output.extend(chunk)
                if answer_started() and b" [stopped]" not in output:
                    reading.wait()  # paused until the signal has been sent

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()

        def wait_for(predicate, timeout=120):  # a guard against hanging forever, not a speed requirement
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    proc.wait()
                    stderr.seek(0)
                    pytest.fail(f"chat never reached the expected state; stdout: {bytes(output)!r}; "
                                f"stderr: {stderr.read()!r}")
                time.sleep(0.05)

        try:
            wait_for(lambda: b"you> " in output)
            reading.clear()
            proc.stdin.write(b"tell me everything\n")
            proc.stdin.flush()
            wait_for(answer_started)  # the reader has paused: the chat fills the pipe and blocks
            proc.send_signal(signal.SIGINT)
            reading.set()
            wait_for(lambda: b" [stopped]\nyou> " in output)
            proc.stdin.write(f"/save {saved}\n".encode())
            proc.stdin.close()
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (conversation,) = read_messages_jsonl(saved)
    assert conversation[0] == {"role": "user", "content": "tell me everything"}
    partial = conversation[1]["content"]
    assert len(partial) > 20
    shown = output.decode("utf-8", errors="replace").partition("assistant> ")[2].partition(" [stopped]")[0]
    # the history holds what was shown before Ctrl-C (the signal may land between printing a token's
    # text and recording it, so the two may differ by that last piece)
    assert shown.startswith(partial) or partial.startswith(shown)
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    longest_piece = max(len(tok.id_to_bytes(i)) for i in range(tok.vocab_size))  # e.g. a run of spaces
    assert abs(len(shown) - len(partial)) <= longest_piece
