"""A tiny randomly initialised model directory for the reward-model and DPO tests."""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab.checkpoint import save_model_dir
from gptlab.model import GPT, GPTConfig


def tiny_model_dir(path: Path, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, head_dim=16,
                       intermediate_size=64, max_seq_len=192)
    return save_model_dir(path, GPT(config), tokenizer)
