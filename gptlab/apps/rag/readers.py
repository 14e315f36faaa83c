"""Documents from files: plain text, Markdown, HTML, JSONL, Parquet and PDF, found in files, folders and globs.

Design decisions
- One `Document` per file, except JSONL and Parquet, where each record's `--field` is a document of its own
  (`doc` = `file:line` or `file[row]`); chunks keep the file (for incremental re-indexing, which works per
  file) and the document (for citations).
- HTML text comes from selectolax (lexbor parser, a small binary wheel, no dependencies): script, style
  and similar elements are dropped, block elements become paragraph breaks so the chunker can respect
  them; the <title> becomes the document title. PDF text comes from pypdf, one paragraph break per page.
- Titles: HTML <title>, the first Markdown `# heading`, a record's `title` field, else the file name.
- Bad files never stop an index run: a file that is not UTF-8 text (or a PDF/Parquet that cannot be
  parsed) is skipped and counted, and its name and reason are reported with -v. A file whose text is
  empty is counted as empty. Unknown extensions are read as text if they decode as UTF-8 and contain no
  NUL byte (the usual test for binary data), so a README or a .rst works and a .png is skipped.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...common import GptlabError

HTML_EXTENSIONS = {".html", ".htm", ".xhtml"}
RECORD_EXTENSIONS = {".jsonl", ".parquet"}
_HTML_DROP = "script, style, noscript, template, svg, head, nav, footer"
_HTML_BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
                "blockquote", "pre", "table", "ul", "ol", "dd", "dt", "header", "main", "aside", "figure"}


@dataclass
class Document:
    file: str  # the file it came from (the unit of incremental re-indexing)
    doc: str  # what a citation names: the file, or file:line / file[row] for a record
    title: str
    text: str


class Unreadable(Exception):
    """A file that is skipped (binary, undecodable, unparsable), with the reason."""


def find_files(paths: list[str]) -> list[Path]:
    """Files named by `paths`: files as they are, folders walked recursively (hidden entries skipped), globs
    expanded (`**` allowed). A path that matches nothing is a GptlabError: a typo should not index nothing."""
    found: dict[str, Path] = {}
    for spec in paths:
        matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))] if glob.has_magic(spec) else [Path(spec)]
        if not matches or not all(m.exists() for m in matches):
            raise GptlabError(f"no such file or folder: {spec}")
        for match in matches:
            if match.is_dir():
                for root, dirs, files in os.walk(match):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    for name in sorted(files):
                        if not name.startswith("."):
                            path = Path(root) / name
                            found[str(path.resolve())] = path
            else:
                found[str(match.resolve())] = match
    return [found[key] for key in sorted(found)]


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise Unreadable("binary (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 text (byte {e.start})") from None


def html_to_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML page: visible text with block elements as paragraph breaks."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = title_node.text(strip=True) if title_node else ""
    for node in tree.css(_HTML_DROP):
        node.decompose()
    body = tree.body or tree.root
    if body is None:
        return title, ""
    parts: list[str] = []
    for node in body.traverse(include_text=True):
        if node.tag == "-text":
            parts.append(node.text_content or "")
        elif node.tag in _HTML_BLOCKS:
            parts.append("\n\n")
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parts))
    text = re.sub(r" ?\n ?", "\n", text)
    return title, re.sub(r"\n{3,}", "\n\n", text).strip()


def _markdown_title(text: str) -> str:
    match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, flags=re.M)
    return match.group(1) if match else ""


def _record_text(record, field: str, where: str) -> tuple[str, str]:
    if not isinstance(record, dict) or field not in record:
        raise GptlabError(f"{where}: no field {field!r} (use --field to name the text field)")
    value = record[field]
    if value is None:
        return "", ""
    if not isinstance(value, str):
        raise GptlabError(f"{where}: field {field!r} is {type(value).__name__}, expected text")
    title = record.get("title")
    return (title if isinstance(title, str) else ""), value


def _jsonl_documents(path: Path, data: bytes, field: str) -> Iterator[Document]:
    for lineno, raw in enumerate(_decode(data).splitlines(), 1):
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        title, text = _record_text(record, field, where)
        yield Document(str(path), where, title or f"{path.name}:{lineno}", text)


def _parquet_documents(path: Path, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise Unreadable(f"not a readable Parquet file ({type(e).__name__})") from None
    if field not in table.column_names:
        raise GptlabError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}; use --field)")
    for index, record in enumerate(table.to_pylist()):
        where = f"{path}[{index}]"
        title, text = _record_text(record, field, where)
        yield Document(str(path), where, title or f"{path.name}[{index}]", text)


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise Unreadable(f"not a readable PDF ({type(e).__name__}: {e})") from None
    return "\n\n".join(page.strip() for page in pages)


def read_documents(path: Path, data: bytes, field: str = "text") -> list[Document]:
    """The documents in one file whose bytes are `data` (read once by the caller, who also hashes them).
    Raises Unreadable for a file to skip, GptlabError for a record file with a bad record."""
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".jsonl":
        return list(_jsonl_documents(path, data, field))
    if suffix == ".parquet":
        return list(_parquet_documents(path, field))
    if suffix == ".pdf":
        return [Document(name, name, path.stem, _pdf_text(path))]
    text = _decode(data)
    if suffix in HTML_EXTENSIONS:
        title, text = html_to_text(text)
        return [Document(name, name, title or path.stem, text)]
    title = _markdown_title(text) if suffix in {".md", ".markdown"} else ""
    return [Document(name, name, title or path.stem, text.replace("\r\n", "\n"))]
