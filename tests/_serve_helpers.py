"""Shared by the serving, chat CLI and web page tests: a tiny random-init model directory, a live
uvicorn server on a free localhost port, running in a background thread of the test process, and the app
`gptlab serve` builds from its command line."""

from __future__ import annotations

import socket
import sysconfig
import threading
import time
from pathlib import Path

import torch

from gptlab.checkpoint import load_model_dir, save_model_dir
from gptlab.infer.engine import Engine
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_model_dir(path: Path, max_seq_len: int = 2048) -> Path:
    """A 2-layer GPT over a BPE tokenizer trained on two stdlib modules. The rows of the (tied) output
    matrix of the special tokens are zeroed, so their logit is exactly 0 while the best of ~500 random
    logits is positive: greedy decoding writes ordinary text and never stops early, so length-based
    tests are deterministic."""
    text = "".join((STDLIB / name).read_text(encoding="utf-8") for name in ("textwrap.py", "json/decoder.py"))
    tok = train_tokenizer([text], vocab_size=512)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=max_seq_len)
    model = GPT(config).eval()
    with torch.no_grad():  # at init std 0.02 greedy text degenerates into "lololo"; larger weights vary it
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
        model.lm_head.weight[list(tok.special_tokens.values())] = 0
    return save_model_dir(path, model, tok)


def train_on_answers(examples: list[tuple[list[int], list[int]]], vocab_size: int,
                     max_seq_len: int) -> tuple[GPT, float]:
    """A 2-layer GPT trained (seed 0, AdamW, at most 400 full-batch steps, until the loss is < 0.01) on
    (prompt ids, answer ids) pairs with the loss on the answers only: tiny models that reproduce scripted
    replies (tool calls, answers after a tool's output) for the serving and agent tests. Returns (model in
    eval mode, final loss)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                          intermediate_size=128, max_seq_len=max_seq_len))
    width = max(len(prompt) + len(answer) for prompt, answer in examples)
    inputs = torch.zeros(len(examples), width - 1, dtype=torch.long)
    targets = torch.full_like(inputs, -1)  # loss on the answers only
    for i, (prompt, answer) in enumerate(examples):
        ids = prompt + answer
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(answer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(400):
        _, loss = model(inputs, targets)
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def load_engine(model_dir: Path) -> Engine:
    model, tok = load_model_dir(model_dir)
    return Engine(model.eval(), tok, strict_context=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_app(argv: list[str], monkeypatch):
    """The app `gptlab serve argv` would run (uvicorn is not started)."""
    import gptlab.serve.app as app_module
    from gptlab.cli import build_parser

    captured = {}
    monkeypatch.setattr(app_module, "run_server", lambda app, *args, **kwargs: captured.setdefault("app", app))
    args = build_parser().parse_args(argv)
    args.func(args)
    return captured["app"]
