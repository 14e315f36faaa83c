"""Val loss and bits per byte of a model on a prepared dataset: how well it models text.

`evaluate` is the one loop for it, shared by pretraining's periodic evaluation (over a `PackedLoader`,
all-reduced across ranks) and `gptlab eval` (`val_bits_per_byte`, from a data directory). Bits per byte
compares models across tokenizers; the loss in nats/token is what training minimises."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..common import GptlabError, read_json
from ..data.loader import PackedLoader
from ..model import GPT
from ..tokenizer import Tokenizer


@torch.no_grad()
def evaluate(model: GPT, loader: PackedLoader, num_batches: int, token_bytes: torch.Tensor,
             autocast, device: torch.device) -> dict[str, float]:
    """Mean val loss (nats/token) and bits per byte over `num_batches` batches from the start of the split;
    sums are all-reduced, so every rank returns the figure over all ranks' rows.

    Bits per byte counts only targets that are text: a special token (the `<|endoftext|>` opening the next
    document) has no bytes, and guessing where a document ends is not modelling its text (nanochat's
    evaluation makes the same exclusion). The loss in nats/token is over every target, as trained."""
    model.eval()
    loader.rows_consumed = 0
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats on text targets, bytes
    for _ in range(num_batches):
        x, y = (t.to(device) for t in loader.next_batch())
        with autocast:
            logits = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
        nbytes = token_bytes[y.flatten()]
        sums += torch.stack([nats.sum(), torch.tensor(y.numel(), device=device, dtype=torch.float64),
                             nats[nbytes > 0].sum(), nbytes.sum().double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    nats, tokens, text_nats, nbytes = sums.tolist()
    return {"val/loss": nats / tokens, "val/bpb": text_nats / math.log(2) / max(1.0, nbytes)}


def val_bits_per_byte(model: GPT, tokenizer: Tokenizer, data_dir: str | Path, num_batches: int = 8,
                      batch_size: int = 8, seq_len: int | None = None) -> dict[str, float]:
    """Val loss (nats/token) and bits per byte over the first `num_batches` batches of the val split of a
    prepared dataset (fewer when the split is smaller: windows are never repeated)."""
    data_dir = Path(data_dir)
    meta = read_json(data_dir / "meta.json", "dataset metadata (run `gptlab data prepare` first)")
    if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise GptlabError(f"{data_dir} was tokenized with a different tokenizer than the model's")
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise GptlabError(f"seq_len {seq_len} exceeds the model's context window ({model.config.max_seq_len})")
    loader = PackedLoader(data_dir, "val", 1, seq_len)
    batch_size = min(batch_size, loader.n_windows)
    loader = PackedLoader(data_dir, "val", batch_size, seq_len)
    num_batches = max(1, min(num_batches, loader.n_windows // batch_size))
    device = next(model.parameters()).device
    token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(device)
    was_training = model.training
    result = evaluate(model, loader, num_batches, token_bytes, nullcontext(), device)
    model.train(was_training)  # evaluate() leaves the model in train mode
    return {"loss": result["val/loss"], "bpb": result["val/bpb"], "batches": num_batches,
            "tokens": num_batches * batch_size * seq_len, "seq_len": seq_len}

