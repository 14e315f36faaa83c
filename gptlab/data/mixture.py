"""Data mixtures: several sources with weights, cleaned, deduplicated and split into train / val.

A mixture is a small TOML file users can copy and edit (see `gptlab/mixtures/default.toml`):

    name = "my-mixture"
    val_fraction = 0.02
    [[sources]]
    name = "books"
    kind = "text"
    paths = ["books/*.txt"]
    weight = 1.0

Design decisions
- `weight` is epochs: how many times a source's training documents enter the training split (0.5 keeps a
  stable half, 2.0 repeats it twice). That is how GPT-3 (Brown et al. 2020, table 2.2) and The Pile describe
  their mixtures, and it is exact and reproducible, unlike sampling probabilities.
- Bytes that are not UTF-8 are replaced by U+FFFD (sources.py), counted per source, logged as a warning
  and shown in the statistics table (`!utf8`: files or records, `!utf8 B`: bytes replaced);
  `strict_utf8` (a field of the source, or `--strict-utf8 true` for every source) makes them an error.
- Cleaning: newlines normalised to "\n", a leading byte-order mark dropped, whitespace-only documents
  dropped, exact duplicates (after cleaning, across all sources) removed, first occurrence kept.
- The train/val split is decided by a hash of each document's text, so it is stable when sources are
  added, reordered or capped: a document never moves between splits. Weights apply to train only; val keeps
  the natural distribution.
- Documents are held in memory once read: fine for the tens to hundreds of MB a CPU or single-GPU user
  works with. For more, prepare several mixtures into separate shard folders.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from ..common import GptlabError, get_logger
from ..config import option
from .sources import ReadCounters, SourceSpec, read_source, replace_surrogates

log = get_logger("data")


@dataclass
class Document:
    text: str
    source: str
    origin: str
    digest: bytes  # blake2b of the cleaned text: deduplication and the train/val split


@dataclass
class SourceStats:
    files: int = 0
    raw_docs: int = 0
    empty: int = 0
    duplicates: int = 0
    non_utf8: int = 0  # files or records with bytes that are not UTF-8
    replaced: int = 0  # bytes replaced by U+FFFD
    train_docs: int = 0
    val_docs: int = 0
    train_bytes: int = 0  # after weighting
    val_bytes: int = 0


def clean_text(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def digest_text(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def is_val(digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def weighted_copies(digest: bytes, weight: float) -> int:
    """How many times a document enters the training split: floor(weight), plus one more for a stable
    fraction (weight - floor(weight)) of documents chosen by hash."""
    whole = int(weight)
    frac = weight - whole
    u = int.from_bytes(digest[8:16], "little") / 2**64  # independent of the bits used for the split
    return whole + (1 if u < frac else 0)


@dataclass
class Mixture:
    name: str
    sources: list[SourceSpec]
    base_dir: Path
    val_fraction: float = 0.01
    max_bytes: int | None = None  # cap on text read, shared between sources in proportion to weight
    stats: dict[str, SourceStats] = field(default_factory=dict)
    _docs: dict[str, list[Document]] | None = None

    def _source_caps(self) -> dict[str, int | None]:
        if self.max_bytes is None:
            return {s.name: None for s in self.sources}
        total = sum(s.weight for s in self.sources) or 1.0
        return {s.name: int(self.max_bytes * s.weight / total) for s in self.sources}

    def load(self) -> dict[str, list[Document]]:
        """Read, clean and deduplicate every source once (cached)."""
        if self._docs is not None:
            return self._docs
        caps = self._source_caps()
        seen: set[bytes] = set()
        docs: dict[str, list[Document]] = {}
        for spec in self.sources:
            st = self.stats[spec.name] = SourceStats()
            counters = ReadCounters()
            kept: list[Document] = []
            size = 0
            for raw in read_source(spec, self.base_dir, counters):
                st.raw_docs += 1
                text = clean_text(replace_surrogates(raw.text, raw.origin, spec.strict_utf8, counters))
                if not text.strip():
                    st.empty += 1
                    continue
                digest = digest_text(text)
                if digest in seen:
                    st.duplicates += 1
                    continue
                seen.add(digest)
                kept.append(Document(text, spec.name, raw.origin, digest))
                size += len(text)
                if caps[spec.name] is not None and size >= caps[spec.name]:
                    break
            st.files, st.non_utf8, st.replaced = counters.files, counters.non_utf8, counters.replaced
            if counters.non_utf8:
                log.warning("source %r: %d file(s) or record(s) not valid UTF-8, %d byte(s) replaced by U+FFFD "
                            "(first: %s); --strict-utf8 true makes this an error", spec.name, counters.non_utf8,
                            counters.replaced, counters.first_bad)
            if not kept:
                raise GptlabError(f"source {spec.name!r} yielded no text ({st.raw_docs} documents read, "
                                  f"{st.empty} empty, {st.duplicates} duplicates)")
            for d in kept:
                n = len(d.text.encode("utf-8", errors="surrogatepass"))
                if is_val(d.digest, self.val_fraction):
                    st.val_docs += 1
                    st.val_bytes += n
                else:
                    copies = weighted_copies(d.digest, spec.weight)
                    st.train_docs += copies
                    st.train_bytes += copies * n
            docs[spec.name] = kept
        self._docs = docs
        return docs

    def _split_docs(self, spec: SourceSpec, docs: list[Document], split: str | None) -> Iterator[Document]:
        for d in docs:
            if split is None:
                yield d
            elif split == "val":
                if is_val(d.digest, self.val_fraction):
                    yield d
            elif not is_val(d.digest, self.val_fraction):
                for _ in range(weighted_copies(d.digest, spec.weight)):
                    yield d

    def documents(self, split: str | None = "train") -> Iterator[Document]:
        """Documents of `split` ("train" with weights applied, "val", or None for every unique document)."""
        for spec, docs in zip(self.sources, self.load().values()):
            yield from self._split_docs(spec, docs, split)

    def documents_by_source(self, split: str | None = "train") -> Iterator[tuple[str, list[Document]]]:
        for spec, docs in zip(self.sources, self.load().values()):
            yield spec.name, list(self._split_docs(spec, docs, split))

    def stats_total(self) -> dict[str, int]:
        self.load()
        return {"docs": sum(s.train_docs for s in self.stats.values()),
                "bytes": sum(s.train_bytes for s in self.stats.values())}

    def stats_table(self, tokens: dict[str, dict[str, int]] | None = None) -> str:
        """Per-source statistics; `tokens` ({source: {"train": n, "val": n}}) adds token columns."""
        self.load()
        total_train = sum(s.train_bytes for s in self.stats.values()) or 1
        head = (f"{'source':<14}{'weight':>7}{'files':>7}{'docs':>8}{'dups':>6}{'empty':>6}{'!utf8':>6}{'!utf8 B':>8}"
                f"{'train docs':>11}{'train MB':>10}{'share':>7}{'val docs':>9}{'val MB':>8}")
        if tokens:
            head += f"{'train tok':>12}{'val tok':>10}{'B/tok':>6}"
        lines = [f"mixture {self.name!r}", head]
        for spec in self.sources:
            s = self.stats[spec.name]
            line = (f"{spec.name:<14}{spec.weight:>7.2f}{s.files:>7}{s.raw_docs:>8}{s.duplicates:>6}{s.empty:>6}"
                    f"{s.non_utf8:>6}{s.replaced:>8}{s.train_docs:>11}{s.train_bytes / 1e6:>10.2f}"
                    f"{s.train_bytes / total_train:>7.1%}{s.val_docs:>9}{s.val_bytes / 1e6:>8.2f}")
            if tokens:
                t = tokens.get(spec.name, {})
                line += (f"{t.get('train', 0):>12,}{t.get('val', 0):>10,}"
                         f"{s.train_bytes / max(t.get('train', 0), 1):>6.2f}")
            lines.append(line)
        bad = [name for name, s in self.stats.items() if s.non_utf8]
        if bad:
            lines.append(f"warning: {sum(self.stats[n].replaced for n in bad)} byte(s) that are not UTF-8 were "
                         f"replaced by U+FFFD in {', '.join(bad)} (columns !utf8, !utf8 B; --strict-utf8 true fails)")
        return "\n".join(lines)


def _builtin_mixtures() -> dict[str, Path]:
    folder = resources.files("gptlab") / "mixtures"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def _read_spec(name_or_path: str | Path) -> tuple[Path, dict]:
    """The TOML file of a built-in mixture name (`default`, ...) or a path, and its parsed contents."""
    builtin = _builtin_mixtures()
    path = builtin.get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        raise GptlabError(f"mixture {name_or_path!r} not found: not a file and not one of {', '.join(sorted(builtin))}")
    try:
        return path, tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"mixture file {path} is not valid TOML: {e}") from None


def mixture_digest(name_or_path: str | Path) -> str:
    """sha256 of a mixture's parsed TOML (comments and layout do not count), so a speedrun notices that the
    file behind a mixture name was edited. Text made by code (a `python` source) is not covered."""
    return hashlib.sha256(json.dumps(_read_spec(name_or_path)[1], sort_keys=True).encode()).hexdigest()


def load_mixture(name_or_path: str | Path, *, max_bytes: int | None = None, strict_utf8: bool = False) -> Mixture:
    """A built-in mixture by name (`default`, ...) or a mixture TOML file by path. `strict_utf8` makes
    every source strict; False leaves each source's own setting."""
    path, spec = _read_spec(name_or_path)
    raw_sources = spec.get("sources", [])
    if not raw_sources:
        raise GptlabError(f"mixture {path} has no [[sources]]")
    known = {f.name for f in fields(SourceSpec)}
    sources = []
    for i, raw in enumerate(raw_sources):
        unknown = set(raw) - known
        if unknown:
            raise GptlabError(f"mixture {path}, source #{i + 1}: unknown keys {sorted(unknown)}")
        if "name" not in raw or "kind" not in raw:
            raise GptlabError(f"mixture {path}, source #{i + 1}: needs `name` and `kind`")
        if strict_utf8:
            raw = {**raw, "strict_utf8": True}
        sources.append(SourceSpec(**raw))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise GptlabError(f"mixture {path}: source names must be unique, got {names}")
    if all(s.weight == 0 for s in sources):
        raise GptlabError(f"mixture {path}: every source has weight 0")
    val_fraction = float(spec.get("val_fraction", 0.01))
    if not 0 <= val_fraction < 1:
        raise GptlabError(f"mixture {path}: val_fraction must be in [0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise GptlabError(f"max_bytes must be positive, got {max_bytes}")
    return Mixture(spec.get("name", path.stem), sources, path.parent, val_fraction, max_bytes)


STRICT_UTF8_HELP = ("fail on the first byte that is not UTF-8, naming file, line and byte offset (default: "
                    "replace it by U+FFFD, count it and warn)")


@dataclass
class MixtureOptions:
    """How a command that only reads a mixture (tokenizer train / stats, data stats) reads it; the same
    fields are in `PrepareConfig` and `SpeedrunConfig`."""
    mixture: str = option("default", "mixture name or .toml path")
    max_bytes: int | None = option(None, "cap on text read from the mixture")
    strict_utf8: bool = option(False, STRICT_UTF8_HELP)

    def load(self) -> Mixture:
        return load_mixture(self.mixture, max_bytes=self.max_bytes, strict_utf8=self.strict_utf8)
