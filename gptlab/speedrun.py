"""`gptlab speedrun`: the whole recipe on the embedded default mixture, one stage after another.

Stages implemented so far: tokenizer -> data. Later stages (pretrain, SFT, reward model, RL, eval, report)
are appended here as they land. Every stage skips work whose outputs already exist with the same inputs,
so rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import get_logger
from .config import add_config_args, build_config
from .data.mixture import load_mixture
from .data.prepare import PrepareConfig, prepare
from .tokenizer import Tokenizer, train_tokenizer

log = get_logger("speedrun")


@dataclass
class SpeedrunConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "where every stage writes"})
    mixture: str = field(default="default", metadata={"help": "mixture name or .toml path"})
    max_bytes: int | None = field(default=None, metadata={"help": "cap on text read from the mixture"})
    vocab_size: int = field(default=8192, metadata={"help": "tokenizer vocabulary, specials included"})


PRESETS = {
    # CPU: a small vocabulary suits the small models a laptop can train in minutes
    "cpu": SpeedrunConfig(vocab_size=8192),
    # GPU: GPT-2-like vocabulary for a much larger model
    "gpu": SpeedrunConfig(vocab_size=32768),
}


def speedrun(cfg: SpeedrunConfig) -> Path:
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tok_path = run / "tokenizer.json"
    timings = {}
    start = time.perf_counter()
    mixture = load_mixture(cfg.mixture, max_bytes=cfg.max_bytes)
    if tok_path.is_file() and Tokenizer.load(tok_path).vocab_size == cfg.vocab_size:
        log.info("tokenizer: reusing %s", tok_path)
    else:
        log.info("tokenizer: training a %d-token vocabulary on mixture %r", cfg.vocab_size, mixture.name)
        train_tokenizer((d.text for d in mixture.documents("train")), cfg.vocab_size).save(tok_path)
    timings["tokenizer"] = time.perf_counter() - start
    start = time.perf_counter()
    prepare(PrepareConfig(mixture=cfg.mixture, tokenizer=str(tok_path), out=str(run / "data"),
                          max_bytes=cfg.max_bytes, force=True), mixture)
    timings["data"] = time.perf_counter() - start
    log.info("speedrun stages done: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return run


def register(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe on the default mixture (stages implemented so far)")
    add_config_args(p, SpeedrunConfig, PRESETS)
    p.set_defaults(func=lambda args: speedrun(build_config(SpeedrunConfig, args, PRESETS)))
