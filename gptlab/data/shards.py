"""Tokenized shards on disk: the format `gptlab data prepare` writes and the batch loader reads.

Layout of a prepared dataset directory:
    meta.json              format version, tokenizer checksum, dtype, bos id, per-split shard list
    train_00000.bin ...    raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    val_00000.bin ...

Each document is written as `<|endoftext|>` followed by its tokens, so document boundaries survive
packing and every document is generated from the same start token the model sees at inference.
Shards are memory-mapped (`numpy.memmap`), so a dataset larger than RAM costs nothing to open.
Every shard and `meta.json` is written atomically (temp file + fsync + rename): an interrupted run never
leaves a half-written file under a final name, and `meta.json` only lists shards that are complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import GptlabError, atomic_write_bytes, atomic_write_json, read_json

FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype) -> None:
    if tokens.size and int(tokens.max()) > np.iinfo(dtype).max:
        raise GptlabError(f"token id {int(tokens.max())} does not fit {dtype} in {path}")
    atomic_write_bytes(path, np.ascontiguousarray(tokens, dtype=dtype.newbyteorder("<")).tobytes())


def write_meta(data_dir: Path, meta: dict) -> None:
    atomic_write_json(Path(data_dir) / "meta.json", meta)


@dataclass
class SplitTokens:
    """All tokens of one split as a list of memory-mapped shards, indexable as one long array."""

    shards: list[np.memmap]
    bytes: int  # UTF-8 bytes of the text these tokens encode (for bits per byte)
    docs: int

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated split, crossing shard boundaries when needed."""
        pieces = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            local = start - int(self.offsets[i])
            take = min(stop - start, len(self.shards[i]) - local)
            pieces.append(self.shards[i][local:local + take])
            start += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def open_split(data_dir: str | Path, split: str) -> tuple[SplitTokens, dict]:
    """Open the shards of `split` in a prepared directory; returns the tokens and the parsed meta.json."""
    data_dir = Path(data_dir)
    meta = read_json(data_dir / "meta.json", "dataset metadata (run `gptlab data prepare` first)")
    if meta.get("format") != FORMAT_VERSION:
        raise GptlabError(f"{data_dir}/meta.json has format {meta.get('format')}, expected {FORMAT_VERSION}")
    if split not in meta.get("splits", {}):
        raise GptlabError(f"{data_dir} has no split {split!r} (has: {', '.join(meta.get('splits', {}))})")
    info = meta["splits"][split]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    shards = []
    for shard in info["shards"]:
        path = data_dir / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise GptlabError(f"shard {path} is missing or truncated (expected {expected} bytes)")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    if not shards or sum(len(s) for s in shards) == 0:
        raise GptlabError(f"split {split!r} in {data_dir} holds no tokens")
    return SplitTokens(shards, bytes=info["bytes"], docs=info["docs"]), meta
