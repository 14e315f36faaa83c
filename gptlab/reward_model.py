"""The reward model: a GPT trunk with a scalar readout, score(conversation) -> float.

Trained by `gptlab rm` (gptlab.train.reward); read by RL (PPO rewards), `gptlab eval --reward-model` and the
speedrun, so it lives below all of them, beside the GPT it wraps.

Design decisions
- Architecture (InstructGPT, Ouyang et al. 2022): the SFT model (any model directory) with its language
  head left aside and a linear readout n_embd -> 1 on the final hidden state of the last token, which for
  a rendered conversation is the completion's `<|assistant_end|>`: the one position that has seen the whole
  prompt and the whole answer. Rows may be padded on either side; the readout takes the last real token
  of each row (`RewardModel.forward` takes a key mask), so padding never changes a score.
- Saved as a model directory (the trunk, reusable by anything that loads models) plus
  `reward_head.safetensors` and `reward.json` (format, tokenizer checksum, validation figures), both
  covered by the directory's SHA256SUMS, which loading verifies (`checkpoint.save_model_dir`).
  A reward model scores token ids, so pairing it with a policy of another tokenizer is an error:
  `check_same_tokenizer` / `RewardModel.check_policy` compare tokenizer checksums.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .chat import render
from .checkpoint import load_model_dir, save_model_dir
from .common import GptlabError, json_bytes, read_json
from .model import GPT
from .tokenizer import Tokenizer

HEAD_FILE = "reward_head.safetensors"
REWARD_META = "reward.json"
REWARD_FORMAT = 1


def check_same_tokenizer(expected_sha256: str, tokenizer: Tokenizer, what: str) -> None:
    """Raise unless `tokenizer` is the one `what` was trained with (token ids mean nothing across tokenizers)."""
    if tokenizer.sha256 != expected_sha256:
        raise GptlabError(f"{what} uses a different tokenizer (checksum {expected_sha256[:12]} != "
                          f"{tokenizer.sha256[:12]}): its scores of these token ids would be meaningless")


class RewardModel(nn.Module):
    def __init__(self, gpt: GPT, tokenizer: Tokenizer):
        super().__init__()
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of token rows `ids` (B, T); `attn_mask` (B, T) is True on real tokens (any padding
        side). The readout is the final hidden state of each row's last real token."""
        B, T = ids.shape
        if attn_mask is None:
            attn_mask = torch.ones_like(ids, dtype=torch.bool)
        attn_mask = attn_mask.bool()
        # right padding needs no key mask (causal attention never looks ahead) and keeps positions 0..T-1;
        # any other padding gets per-row positions that start at 0 on the first real token
        right_padded = bool((attn_mask[:, 1:] <= attn_mask[:, :-1]).all())
        positions = None if right_padded else (attn_mask.long().cumsum(1) - 1).clamp_min(0)
        hidden = self.gpt(ids, positions=positions, attn_mask=None if right_padded else attn_mask,
                          return_hidden=True)
        last = T - 1 - attn_mask.flip(1).long().argmax(dim=1)
        return self.head(hidden[torch.arange(B, device=ids.device), last].to(self.head.weight.dtype)).squeeze(-1)

    @torch.inference_mode()
    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """Rewards (N,) float32 on the CPU of token rows (each a whole rendered conversation). Rows are
        batched in order of length, so each batch pads little (the scores do not depend on the batching)."""
        device = self.head.weight.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = [seqs[i] for i in order[start:start + batch_size]]
            width = max(map(len, chunk))
            if width > self.gpt.config.max_seq_len:
                raise GptlabError(f"a conversation of {width} tokens exceeds the reward model's context "
                                  f"({self.gpt.config.max_seq_len})")
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool, device=device)
            for r, s in enumerate(chunk):
                ids[r, :len(s)] = torch.tensor(list(s), device=device)
                mask[r, :len(s)] = True
            out.append(self(ids, mask).float().cpu())
        scores = torch.empty(len(seqs))
        if order:
            scores[torch.tensor(order)] = torch.cat(out)
        return scores

    def score(self, conversations: Sequence[Sequence[dict[str, Any]]], batch_size: int = 16) -> torch.Tensor:
        """Rewards (N,) of complete conversations (prompt messages followed by the assistant's answer)."""
        return self.score_ids([render(self.tokenizer, c).ids for c in conversations], batch_size)

    def check_policy(self, policy_tokenizer: Tokenizer) -> None:
        """The check the RL stage makes before scoring a policy's samples with this reward model."""
        check_same_tokenizer(self.tokenizer.sha256, policy_tokenizer, "the reward model")

    def head_bytes(self) -> bytes:
        return save({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()})

    def load_head(self, path: Path) -> None:
        try:
            state = load_file(path)
            self.head.load_state_dict({k: v.to(self.head.weight) for k, v in state.items()})
        except (SafetensorError, OSError, RuntimeError, KeyError) as e:
            raise GptlabError(f"cannot load reward head {path}: {e}") from None

    def save(self, path: str | Path, info: dict[str, Any] | None = None) -> Path:
        meta = {"format": REWARD_FORMAT, "head": HEAD_FILE,
                "readout": "final hidden state of the last token (<|assistant_end|>)",
                "tokenizer_sha256": self.tokenizer.sha256, **(info or {})}
        return save_model_dir(path, self.gpt, self.tokenizer,
                              extra_files={HEAD_FILE: self.head_bytes(), REWARD_META: json_bytes(meta)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> RewardModel:
        path = Path(path)
        meta = read_json(path / REWARD_META, "reward model metadata (not a reward model directory?)")
        if meta.get("format") != REWARD_FORMAT:
            raise GptlabError(f"{path}/{REWARD_META} has format {meta.get('format')}, expected {REWARD_FORMAT}")
        gpt, tokenizer = load_model_dir(path, device, dtype)
        check_same_tokenizer(meta.get("tokenizer_sha256", ""), tokenizer, f"reward model {path}")
        model = cls(gpt, tokenizer).to(device)
        model.load_head(path / meta.get("head", HEAD_FILE))
        return model.eval()


