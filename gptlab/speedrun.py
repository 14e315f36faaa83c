"""`gptlab speedrun`: the whole recipe on the embedded default mixture, one stage after another.

Stages implemented so far: tokenizer -> data -> pretrain -> samples. Later stages (SFT, reward model, RL,
eval, report) are appended here as they land. Every stage skips or resumes work whose outputs already
exist with the same inputs, so rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load_model_dir
from .common import get_logger
from .config import add_config_args, build_config
from .data.mixture import load_mixture
from .data.prepare import PrepareConfig, prepare
from .engine import Engine, SamplingParams
from .pretrain import PRESETS as PRETRAIN_PRESETS
from .pretrain import pretrain
from .tokenizer import Tokenizer, train_tokenizer

log = get_logger("speedrun")

SAMPLE_PROMPTS = ["The king said", "Shares in the company", "def parse(", "The capital of France is"]


@dataclass
class SpeedrunConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "where every stage writes"})
    mixture: str = field(default="default", metadata={"help": "mixture name or .toml path"})
    max_bytes: int | None = field(default=None, metadata={"help": "cap on text read from the mixture"})
    vocab_size: int = field(default=8192, metadata={"help": "tokenizer vocabulary, specials included"})
    pretrain_preset: str = field(default="tiny", metadata={"help": "preset of `gptlab pretrain`"})
    pretrain_steps: int | None = field(default=None, metadata={"help": "override the preset's step count"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})


PRESETS = {
    # CPU: a small vocabulary and model that a 2-core laptop trains in minutes
    "cpu": SpeedrunConfig(vocab_size=8192, pretrain_preset="tiny"),
    # GPU: GPT-2-like vocabulary and the GPT-2 small shape
    "gpu": SpeedrunConfig(vocab_size=32768, pretrain_preset="gpt2"),
}


def speedrun(cfg: SpeedrunConfig) -> Path:
    if cfg.pretrain_preset not in PRETRAIN_PRESETS:
        raise ValueError(f"unknown pretrain preset {cfg.pretrain_preset!r}")
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
    data_dir = prepare(PrepareConfig(mixture=cfg.mixture, tokenizer=str(tok_path), out=str(run / "data"),
                                     max_bytes=cfg.max_bytes, force=True), mixture)
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    pre_cfg = dataclasses.replace(PRETRAIN_PRESETS[cfg.pretrain_preset], data_dir=str(data_dir),
                                  tokenizer=str(tok_path), out_dir=str(run / "pretrain"), resume=True,
                                  device=cfg.device)
    if cfg.pretrain_steps is not None:
        pre_cfg = dataclasses.replace(pre_cfg, num_steps=cfg.pretrain_steps,
                                      warmup_steps=min(pre_cfg.warmup_steps, max(1, cfg.pretrain_steps // 10)))
    base_dir = pretrain(pre_cfg)
    timings["pretrain"] = time.perf_counter() - start

    model, tokenizer = load_model_dir(base_dir)
    engine = Engine(model, tokenizer)
    # sampled, not greedy: a small base model's greedy text falls into loops ("to the to the ...")
    outputs = engine.generate(SAMPLE_PROMPTS, SamplingParams(max_new_tokens=32, temperature=0.8, top_k=50,
                                                             repetition_penalty=1.2, seed=0))
    for prompt, out in zip(SAMPLE_PROMPTS, outputs):
        log.info("base model sample: %r -> %r", prompt, out.text)
    log.info("speedrun stages done: %s; base model in %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
             base_dir)
    return run


def register(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe on the default mixture (stages implemented so far)")
    add_config_args(p, SpeedrunConfig, PRESETS)
    p.set_defaults(func=lambda args: speedrun(build_config(SpeedrunConfig, args, PRESETS)))
