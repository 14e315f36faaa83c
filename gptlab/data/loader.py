"""The batch loader: B x T rows of packed documents, deterministic, shardable by rank, exactly resumable.

Design decision: packing, not BOS-aligned rows. The split's token stream (documents joined, each opened by
`<|endoftext|>`) is cut into non-overlapping windows of T+1 tokens (inputs are the first T, targets the
last T). Each epoch visits every window once in an order drawn from `(seed, epoch)`. Nothing is cropped
or padded, so every token prepared is trained on; a row may span a document boundary, which the model
sees as `<|endoftext|>` and learns to treat as a reset. nanochat measured that such cross-document context
is harmless (varlen attention gave no gain) and that BOS-aligned cropping wastes about a third of the
tokens; on the small corpora a CPU user trains on, wasting a third of the data matters more. The measured
waste of the alternative on our mixture is in docs/LOG.md.

Rows are numbered globally: micro-step m of rank r gets rows [m*B*W + r*B, m*B*W + (r+1)*B) for batch size
B and world size W. So W ranks with batch B see exactly the rows that one process with gradient
accumulation over W micro-batches of B sees, which makes distributed training equal to single-process
training. The whole state is the number of rows consumed (`state_dict`), so resume is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..common import GptlabError
from .shards import open_split


class PackedLoader:
    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool | None = None):
        if batch_size < 1 or seq_len < 1:
            raise GptlabError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise GptlabError(f"rank {rank} outside world size {world_size}")
        self.tokens, self.meta = open_split(data_dir, split)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise GptlabError(f"split {split!r} has {len(self.tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
        self.rows_consumed = 0  # global rows, all ranks together
        self._epoch_order: tuple[int, np.ndarray] | None = None

    @property
    def bytes_per_token(self) -> float:
        return self.tokens.bytes / max(1, len(self.tokens))

    def _window(self, row: int) -> int:
        """Index of the window that global row `row` reads."""
        epoch, pos = divmod(row, self.n_windows)
        if not self.shuffle:
            return pos
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch_order = (epoch, order)
        return int(self._epoch_order[1][pos])

    def rows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (count, T) int64 for global rows first .. first+count-1."""
        T = self.seq_len
        buf = np.empty((count, T + 1), dtype=np.int64)
        for i in range(count):
            start = self._window(first + i) * T
            buf[i] = self.tokens.slice(start, start + T + 1)
        data = torch.from_numpy(buf)
        return data[:, :-1], data[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch; advances the global row counter by B * world_size."""
        first = self.rows_consumed + self.rank * self.batch_size
        x, y = self.rows(first, self.batch_size)
        self.rows_consumed += self.batch_size * self.world_size
        return x, y

    @property
    def epoch(self) -> float:
        return self.rows_consumed / self.n_windows

    def state_dict(self) -> dict:
        return {"rows_consumed": self.rows_consumed, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise GptlabError(f"loader state has {key}={state[key]}, this run uses {getattr(self, key)}")
        self.rows_consumed = int(state["rows_consumed"])
