"""A small real dataset for the pretraining and checkpoint tests: Python stdlib source files, tokenized
with a tokenizer trained on them, written in the prepared-dataset format (shards + meta.json)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from gptlab.data import shards
from gptlab.tokenizer import train_tokenizer

STDLIB_FILES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "calendar.py", "difflib.py",
                "argparse.py", "heapq.py", "bisect.py", "colorsys.py", "graphlib.py"]


def make_dataset(root: Path, vocab_size: int = 400) -> Path:
    """Write root/tokenizer.json and root/data (train: all files but the last, val: the last two);
    returns the data dir."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text(encoding="utf-8") for name in STDLIB_FILES]
    tok = train_tokenizer(docs, vocab_size)
    tok.save(root / "tokenizer.json")
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = shards.token_dtype(tok.vocab_size)
    splits = {}
    for split, texts in (("train", docs[:-2]), ("val", docs[-2:])):
        ids = np.array([t for text in texts for t in [tok.eot_id, *tok.encode(text)]], dtype=np.int64)
        name = shards.shard_name(split, 0)
        shards.write_shard(data_dir / name, ids, dtype)
        info = {"tokens": int(ids.size), "docs": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
        splits[split] = {"shards": [{"file": name, **info}], **info}
    shards.write_meta(data_dir, {"format": 1, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                                 "dtype": dtype.name, "bos_id": tok.eot_id, "splits": splits})
    return data_dir
