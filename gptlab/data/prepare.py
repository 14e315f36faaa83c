"""`gptlab data prepare`: tokenize a mixture into memory-mapped shards (format in shards.py).

Design decisions
- Encoding runs in tiktoken's native threads (`Tokenizer.encode_batch`), which release the GIL: no
  process pool, no pickling of documents, all cores busy.
- Shards hold whole documents and are cut at the first document boundary past `shard_tokens`, so the
  shard layout is a pure function of (mixture, tokenizer, shard size). That is what makes an interrupted
  run resumable: meta.json lists the finished shards and the index of the first document not yet written;
  a rerun with the same inputs continues from there. Different inputs in an existing folder are refused
  (nothing already written is touched) unless `--force`.
- Per-source token counts are recorded per shard, so the statistics table survives a resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..common import GptlabError, get_logger
from ..config import add_config_args, build_config
from ..tokenizer import Tokenizer
from .mixture import STRICT_UTF8_HELP, Document, Mixture, MixtureOptions, load_mixture
from .shards import FORMAT_VERSION, SPLITS, shard_name, token_dtype, write_meta, write_shard

log = get_logger("data")


@dataclass
class PrepareConfig:
    mixture: str = field(default="default", metadata={"help": "mixture name or .toml path"})
    tokenizer: str = field(default="runs/default/tokenizer.json", metadata={"help": "tokenizer.json to encode with"})
    out: str = field(default="runs/default/data", metadata={"help": "output folder for shards and meta.json"})
    max_bytes: int | None = field(default=None, metadata={"help": "cap on text read from the mixture"})
    shard_tokens: int = field(default=1 << 24, metadata={"help": "tokens per shard (cut at a document boundary)"})
    batch_docs: int = field(default=256, metadata={"help": "documents per encode batch"})
    threads: int = field(default=0, metadata={"help": "encoding threads (0 = all cores)"})
    strict_utf8: bool = field(default=False, metadata={"help": STRICT_UTF8_HELP})
    force: bool = field(default=False, metadata={"help": "overwrite a folder prepared from other inputs"})


def fingerprint(mixture: Mixture, tokenizer: Tokenizer, cfg: PrepareConfig) -> str:
    """What the shard contents depend on: the mixture's documents, the tokenizer, the shard size."""
    h = hashlib.sha256()
    h.update(tokenizer.sha256.encode())
    h.update(str(cfg.shard_tokens).encode())
    for split in SPLITS:
        for d in mixture.documents(split):
            h.update(d.digest)
        h.update(split.encode())
    return h.hexdigest()


def _load_previous(out: Path, fp: str, force: bool) -> dict | None:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    if meta.get("fingerprint") == fp and meta.get("format") == FORMAT_VERSION:
        return meta
    if not force:
        raise GptlabError(f"{out} already holds a dataset prepared from other inputs; use --force to replace it "
                          "or choose another --out")
    for split in SPLITS:  # replacing: drop the old shards so none outlives the meta.json that listed it
        for old in out.glob(f"{split}_*.bin"):
            old.unlink()
    return None


def prepare(cfg: PrepareConfig, mixture: Mixture | None = None) -> Path:
    """Tokenize the mixture into `cfg.out`; returns the folder. Resumes an interrupted run.
    `mixture` passes an already loaded mixture (then cfg.mixture/max_bytes/strict_utf8 are not used)."""
    tokenizer = Tokenizer.load(cfg.tokenizer)
    if tokenizer.eot_id is None:
        raise GptlabError(f"tokenizer {cfg.tokenizer} has no <|endoftext|> token to open documents with")
    if mixture is None:
        mixture = load_mixture(cfg.mixture, max_bytes=cfg.max_bytes, strict_utf8=cfg.strict_utf8)
    docs = {split: list(mixture.documents(split)) for split in SPLITS}
    if not docs["train"]:
        raise GptlabError(f"mixture {mixture.name!r} has no training documents")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(mixture, tokenizer, cfg)
    meta = _load_previous(out, fp, cfg.force)
    if meta and meta.get("complete"):
        log.info("%s is already prepared from these inputs; nothing to do", out)
        return out
    dtype = token_dtype(tokenizer.vocab_size)
    if meta is None:
        meta = {"format": FORMAT_VERSION, "fingerprint": fp, "complete": False, "mixture": mixture.name,
                "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
                "bos_id": tokenizer.eot_id, "config": asdict(cfg),
                "splits": {s: {"shards": [], "tokens": 0, "docs": 0, "bytes": 0} for s in SPLITS}}
    else:
        log.info("resuming %s: %s", out, ", ".join(f"{s} {len(meta['splits'][s]['shards'])} shards done" for s in SPLITS))
    start = time.perf_counter()
    total_bytes = sum(len(d.text.encode("utf-8", "surrogatepass")) for s in SPLITS for d in docs[s])
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True) as bar:
        for split in SPLITS:
            _prepare_split(split, docs[split], tokenizer, dtype, cfg, out, meta, bar)
    meta["complete"] = True
    write_meta(out, meta)
    seconds = time.perf_counter() - start
    tokens = {src: {s: sum(sh["sources"].get(src, 0) for sh in meta["splits"][s]["shards"]) for s in SPLITS}
              for src in (spec.name for spec in mixture.sources)}
    print(mixture.stats_table(tokens))
    n_tokens = sum(meta["splits"][s]["tokens"] for s in SPLITS)
    disk = sum((out / sh["file"]).stat().st_size for s in SPLITS for sh in meta["splits"][s]["shards"])
    log.info("prepared %s tokens (%.1f MB of text) in %.1f s: %.2f MB/s, %.2f bytes on disk per token -> %s",
             f"{n_tokens:,}", total_bytes / 1e6, seconds, total_bytes / 1e6 / seconds, disk / max(n_tokens, 1), out)
    if meta["splits"]["val"]["tokens"] == 0:
        log.warning("the val split is empty: raise val_fraction in the mixture or read more text")
    return out


def _prepare_split(split: str, docs: list[Document], tokenizer: Tokenizer, dtype: np.dtype, cfg: PrepareConfig,
                   out: Path, meta: dict, bar: tqdm) -> None:
    info = meta["splits"][split]
    next_doc = info["shards"][-1]["end_doc"] if info["shards"] else 0
    bar.update(sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs[:next_doc]))
    pieces: list[np.ndarray] = []
    n_tokens = n_bytes = 0
    by_source: dict[str, int] = {}
    first = next_doc
    i = next_doc
    while i < len(docs):
        batch = docs[i:i + cfg.batch_docs]
        encoded = tokenizer.encode_batch([d.text for d in batch], num_threads=cfg.threads)
        for d, ids in zip(batch, encoded):
            i += 1
            row = np.empty(len(ids) + 1, dtype=np.int64)
            row[0] = tokenizer.eot_id
            row[1:] = ids
            pieces.append(row)
            n_tokens += len(row)
            size = len(d.text.encode("utf-8", "surrogatepass"))
            n_bytes += size
            bar.update(size)
            by_source[d.source] = by_source.get(d.source, 0) + len(row)
            if n_tokens >= cfg.shard_tokens:
                _flush(split, pieces, first, i, n_bytes, by_source, dtype, out, meta)
                pieces, n_tokens, n_bytes, by_source, first = [], 0, 0, {}, i
    if pieces:
        _flush(split, pieces, first, i, n_bytes, by_source, dtype, out, meta)


def _flush(split: str, pieces: list[np.ndarray], first: int, end: int, n_bytes: int, by_source: dict[str, int],
           dtype: np.dtype, out: Path, meta: dict) -> None:
    """Write one shard atomically, then record it in meta.json (also atomically): a crash between the two
    leaves an unlisted shard file that the resumed run simply rewrites."""
    info = meta["splits"][split]
    tokens = np.concatenate(pieces)
    name = shard_name(split, len(info["shards"]))
    write_shard(out / name, tokens, dtype)
    info["shards"].append({"file": name, "tokens": int(len(tokens)), "docs": end - first, "bytes": n_bytes,
                           "first_doc": first, "end_doc": end, "sources": dict(by_source)})
    info["tokens"] = sum(s["tokens"] for s in info["shards"])
    info["docs"] = sum(s["docs"] for s in info["shards"])
    info["bytes"] = sum(s["bytes"] for s in info["shards"])
    write_meta(out, meta)


def _cmd_prepare(args: argparse.Namespace) -> None:
    prepare(build_config(PrepareConfig, args))


def _cmd_stats(args: argparse.Namespace) -> None:
    print(build_config(MixtureOptions, args).load().stats_table())


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect data mixtures and tokenize them into shards")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="tokenize a mixture into memory-mapped shards (resumable)")
    add_config_args(prep, PrepareConfig)
    prep.set_defaults(func=_cmd_prepare)
    st = dsub.add_parser("stats", help="per-source statistics of a mixture (documents, bytes, duplicates...)")
    add_config_args(st, MixtureOptions)
    st.set_defaults(func=_cmd_stats)
