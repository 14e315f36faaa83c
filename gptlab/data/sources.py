"""Readers that turn a source spec (one `[[sources]]` table of a mixture file) into raw documents.

Kinds: `text` (files and globs), `jsonl` (a chosen field), `parquet` (a chosen column), `hf` (a Hugging
Face dataset by name, or saved with `save_to_disk`), `python` (a string attribute of an installed module,
e.g. the Penn Treebank inside the `treebank` package, or a function returning the text, e.g. gptlab's own
`gptlab.tasks.knowledge:fact_pages`), `wikidump` (a MediaWiki XML dump, .bz2 allowed).
Paths are resolved against `package` (the install directory of a Python package, or `@stdlib` for the
standard library) when given, else against the mixture file's directory.

Every reader yields `RawDoc(text, origin)`; `origin` names the file (and line) so errors can point at it.
Bytes that are not UTF-8 are replaced by U+FFFD exactly as `bytes.decode(errors="replace")` does, and
counted (files or records, and bytes) so the mixture can warn and show them; with `strict_utf8` the first
one is an error naming the file (and line or row) and its byte offset. Valid UTF-8 decodes as it always
did: the counting runs only after a strict decode has failed. Parquet and Hugging Face columns are read as
bytes for the same reason (Arrow's own conversion raises on a bad string instead). Lone surrogates in
already decoded text (JSON escapes, Python strings) are replaced, counted and refused the same way.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import importlib
import importlib.util
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree.ElementTree import ParseError

from ..common import GptlabError

KINDS = ("text", "jsonl", "parquet", "hf", "python", "wikidump")


@dataclass
class RawDoc:
    text: str
    origin: str


@dataclass
class SourceSpec:
    name: str
    kind: str
    weight: float = 1.0  # epochs of this source in the training split (0.5 = a stable half, 2 = twice)
    paths: list[str] = field(default_factory=list)
    package: str | None = None  # resolve paths inside this installed package ("@stdlib" = Python's stdlib)
    install_hint: str | None = None  # what to tell the user when the package is missing
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on paths relative to the root
    text_field: str = "text"  # jsonl field / parquet column / hf field
    dataset: str | None = None  # hf: dataset name on the Hub
    config: str | None = None  # hf: dataset configuration
    split: str = "train"  # hf: dataset split
    object: str | None = None  # python: "module:attribute"
    keys: list[str] = field(default_factory=list)  # python: keys of a dict attribute to read, in order
    doc_unit: str = "file"  # file | paragraph | line: what one unit of text is
    max_doc_chars: int = 0  # group consecutive units into documents of about this size (0 = one unit each)
    strict_utf8: bool = False
    licence: str = ""
    description: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GptlabError(f"source {self.name!r}: unknown kind {self.kind!r} (choose from {', '.join(KINDS)})")
        if self.weight < 0:
            raise GptlabError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.doc_unit not in ("file", "paragraph", "line"):
            raise GptlabError(f"source {self.name!r}: doc_unit must be file, paragraph or line")


@dataclass
class ReadCounters:
    files: int = 0
    non_utf8: int = 0  # files or records with bytes that were not valid UTF-8
    replaced: int = 0  # bytes (or lone surrogates) replaced by U+FFFD
    first_bad: str = ""  # where the first one was: origin and byte offset, for the warning


def _root(spec: SourceSpec, base_dir: Path) -> Path:
    if spec.package is None:
        return base_dir
    if spec.package == "@stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        hint = spec.install_hint or f"pip install {spec.package}"
        raise GptlabError(f"source {spec.name!r} needs the Python package {spec.package!r}: {hint}")
    return Path(list(found.submodule_search_locations)[0])


def _expand(spec: SourceSpec, base_dir: Path) -> list[Path]:
    if not spec.paths:
        raise GptlabError(f"source {spec.name!r} ({spec.kind}) needs `paths`")
    root = _root(spec, base_dir)
    files: list[Path] = []
    for pattern in spec.paths:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else root / full
        if full.is_dir():
            matches = sorted(p for p in full.rglob("*") if p.is_file())
        else:
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if not matches:
            raise GptlabError(f"source {spec.name!r}: no files match {full}")
        files.extend(p for p in matches if not _excluded(p, root, spec.exclude))
    return files


def _excluded(path: Path, root: Path, patterns: list[str]) -> bool:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        return False
    return any(fnmatch.fnmatch(rel, pattern) for pattern in patterns)


# one lone surrogate per undecodable byte (errors="surrogateescape"): a count that is exact and fast
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def decode_text(data: bytes, origin: str, strict: bool, counters: ReadCounters, offset: int = 0) -> str:
    """`data` as text; `offset` is where `data` starts in its file, so errors give a file byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{origin}: invalid UTF-8 byte 0x{data[e.start]:02x} at byte offset {offset + e.start} ({e.reason})"
        _count_invalid(where, lambda: len(_ESCAPED_BYTE.findall(data.decode("utf-8", "surrogateescape"))), strict,
                       counters)
        return data.decode("utf-8", errors="replace")


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str, origin: str, strict: bool, counters: ReadCounters) -> str:
    """Lone surrogates (from a JSON "\\udc80" escape or a Python string) are not characters and have no
    UTF-8 form: tiktoken would encode each as U+FFFD without a word, rustbpe would fail. They are replaced
    and counted here like undecodable bytes (or, strict, an error)."""
    if text.isascii():
        return text
    found = _SURROGATE.search(text)
    if found is None:
        return text
    where = f"{origin}: lone surrogate U+{ord(found.group()):04X} at character {found.start()} (not UTF-8 encodable)"
    _count_invalid(where, lambda: len(_SURROGATE.findall(text)), strict, counters)
    return _SURROGATE.sub("\ufffd", text)


def _count_invalid(where: str, count, strict: bool, counters: ReadCounters) -> None:
    """One file or record with `count()` bytes (or characters) to replace, first at `where`: counted, or an
    error when strict."""
    if strict:
        raise GptlabError(f"{where}; without --strict-utf8 these are replaced by U+FFFD and counted") from None
    counters.non_utf8 += 1
    counters.replaced += count()
    counters.first_bad = counters.first_bad or where


def _units(text: str, unit: str) -> list[str]:
    if unit == "file":
        return [text]
    sep = "\n\n" if unit == "paragraph" else "\n"
    return text.split(sep)


def _group(units: list[str], unit: str, max_chars: int) -> Iterator[str]:
    """Join consecutive units (with the separator they were split on, so nothing is lost) into documents
    of about `max_chars` characters."""
    if max_chars <= 0 or unit == "file":
        yield from units
        return
    sep = "\n\n" if unit == "paragraph" else "\n"
    buf: list[str] = []
    size = 0
    for u in units:
        buf.append(u)
        size += len(u) + len(sep)
        if size >= max_chars:
            yield sep.join(buf)
            buf, size = [], 0
    if buf:
        yield sep.join(buf)


def _read_text(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    for path in _expand(spec, base_dir):
        counters.files += 1
        raw = path.read_bytes()
        if path.suffix == ".bz2":
            raw = bz2.decompress(raw)
        origin = f"{path} (decompressed)" if path.suffix == ".bz2" else str(path)
        text = decode_text(raw, origin, spec.strict_utf8, counters)
        for i, doc in enumerate(_group(_units(text, spec.doc_unit), spec.doc_unit, spec.max_doc_chars)):
            yield RawDoc(doc, f"{path}#{i}")


def _read_jsonl(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    for path in _expand(spec, base_dir):
        counters.files += 1
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                origin = f"{path}:{lineno}"
                line = decode_text(raw, origin, spec.strict_utf8, counters, offset).strip()
                offset += len(raw)
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GptlabError(f"{origin}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict) or spec.text_field not in record:
                    raise GptlabError(f"{origin}: no field {spec.text_field!r} in this record")
                value = record[spec.text_field]
                if not isinstance(value, str):
                    raise GptlabError(f"{origin}: field {spec.text_field!r} is {type(value).__name__}, not a string")
                yield RawDoc(value, origin)


def _read_parquet(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    for path in _expand(spec, base_dir):
        counters.files += 1
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise GptlabError(f"{path} is not a readable Parquet file: {e}") from None
        columns = pf.schema_arrow.names
        if spec.text_field not in columns:
            raise GptlabError(f"{path} has no column {spec.text_field!r} (columns: {', '.join(columns)})")
        row = 0
        for batch in pf.iter_batches(columns=[spec.text_field], batch_size=4096):
            for value in _as_bytes(batch.column(0)).to_pylist():
                row += 1
                if value is None:
                    continue
                if isinstance(value, bytes):
                    value = decode_text(value, f"{path} row {row}", spec.strict_utf8, counters)
                if not isinstance(value, str):
                    raise GptlabError(f"{path} row {row}: column {spec.text_field!r} is not text")
                yield RawDoc(value, f"{path} row {row}")


def _read_hf(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    """A Hugging Face dataset: from disk when `paths` names a `save_to_disk` folder, else from the Hub."""
    try:
        import datasets
    except ImportError:
        raise GptlabError(f"source {spec.name!r} needs the `datasets` package: pip install datasets") from None
    if spec.paths:
        location = _expand_dir(spec, base_dir)
        try:
            ds = datasets.load_from_disk(str(location))
        except (FileNotFoundError, ValueError) as e:
            raise GptlabError(f"{location} is not a dataset saved with save_to_disk: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise GptlabError(f"{location} has no split {spec.split!r} (has: {', '.join(ds)})")
            ds = ds[spec.split]
        origin = str(location)
    elif spec.dataset:
        try:
            ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
        except Exception as e:  # network, auth, missing dataset: all end the same way for the user
            raise GptlabError(f"cannot load Hugging Face dataset {spec.dataset!r}: {e}") from None
        origin = f"hf:{spec.dataset}"
    else:
        raise GptlabError(f"source {spec.name!r} (hf) needs `dataset` (a Hub name) or `paths` (a saved folder)")
    counters.files += 1
    if spec.text_field not in ds.column_names:
        raise GptlabError(f"{origin} has no field {spec.text_field!r} (fields: {', '.join(ds.column_names)})")
    i = 0
    for batch in ds.with_format("arrow").iter(batch_size=4096):
        column = batch[spec.text_field]
        if _is_text(column):  # other types hold no text and are skipped
            for value in _as_bytes(column).to_pylist():
                if value is not None:
                    yield RawDoc(decode_text(value, f"{origin}[{i}]", spec.strict_utf8, counters), f"{origin}[{i}]")
                i += 1


def _is_text(column) -> bool:
    import pyarrow as pa

    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _as_bytes(column):
    """An Arrow text column as binary (a zero-copy cast that skips validation), so each value is decoded by
    `decode_text`, which counts bad bytes, instead of by Arrow, which raises on them."""
    import pyarrow as pa

    if not _is_text(column):
        return column
    return column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())


def _expand_dir(spec: SourceSpec, base_dir: Path) -> Path:
    root = _root(spec, base_dir)
    location = Path(spec.paths[0]).expanduser()
    location = location if location.is_absolute() else root / location
    if not location.exists():
        raise GptlabError(f"source {spec.name!r}: {location} does not exist")
    return location


def _read_python(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    if not spec.object or ":" not in spec.object:
        raise GptlabError(f"source {spec.name!r} (python) needs object = \"module:attribute\"")
    module_name, attr = spec.object.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        hint = spec.install_hint or f"pip install {module_name}"
        raise GptlabError(f"source {spec.name!r} needs the Python package {module_name!r}: {hint}") from None
    value = getattr(module, attr, None)
    if value is None:
        raise GptlabError(f"source {spec.name!r}: {module_name} has no attribute {attr!r}")
    if callable(value):  # a function that makes its text (e.g. gptlab.tasks.knowledge:fact_pages)
        value = value()
    parts = [(f"{spec.object}[{k!r}]", value[k]) for k in spec.keys] if spec.keys else [(spec.object, value)]
    for origin, text in parts:
        if not isinstance(text, str):
            raise GptlabError(f"source {spec.name!r}: {origin} is {type(text).__name__}, not text")
        counters.files += 1
        for i, doc in enumerate(_group(_units(text, spec.doc_unit), spec.doc_unit, spec.max_doc_chars)):
            yield RawDoc(doc, f"{origin}#{i}")


def _read_wikidump(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    """Articles of a MediaWiki XML dump, markup stripped with gensim's `filter_wiki`, title as first line."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    for path in _expand(spec, base_dir):
        counters.files += 1
        opener = bz2.open if path.suffix == ".bz2" else open
        try:
            with opener(path, "rb") as f:
                for title, markup, page_id in extract_pages(f):
                    if markup.lstrip().lower().startswith("#redirect"):
                        continue
                    text = filter_wiki(markup)
                    text = re.sub(r"'{2,}", "", text)  # ''italic'' and '''bold''' marks survive filter_wiki
                    text = re.sub(r"\n{3,}", "\n\n", text).strip()
                    yield RawDoc(f"{title}\n\n{text}", f"{path}#page{page_id}")
        except (OSError, EOFError) as e:
            raise GptlabError(f"{path} is not a readable MediaWiki dump: {e}") from None
        except ParseError as e:  # XML must be well-formed: an invalid UTF-8 byte stops the parser here too
            raise GptlabError(f"{path}: not well-formed XML ({e})") from None


READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf,
           "python": _read_python, "wikidump": _read_wikidump}


def read_source(spec: SourceSpec, base_dir: Path, counters: ReadCounters) -> Iterator[RawDoc]:
    return READERS[spec.kind](spec, base_dir, counters)
