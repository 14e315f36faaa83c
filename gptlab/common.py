"""Small helpers every stage shares: the user-facing error type, atomic file writes, checksums, logging.

Design decision: every failure a user can cause (bad path, bad file, bad option) raises `GptlabError` with a
one-line message; the CLI prints it as `error: ...` and exits with status 2 instead of a traceback. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class GptlabError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""


def torch_device(name: str):
    """The torch device a `--device` option names: "auto" is CUDA where there is one, else the CPU. A
    malformed name, or CUDA on a machine without it, is a GptlabError. (torch is imported here, not at the
    top: this module is imported by light tools that never touch a model.)"""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise GptlabError(f"invalid device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"--device {name} requested but CUDA is not available")
    return device


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the weight dtypes a `--dtype` option may name


def torch_dtype(name: str, device=None, allowed: tuple[str, ...] = ("auto", *DTYPE_NAMES)):
    """The torch dtype a `--dtype` option names. "auto" is bfloat16 on a CUDA `device` and float32 anywhere
    else (most CPUs multiply bfloat16 slowly; None counts as the CPU). A name outside `allowed` (each
    caller's own set of choices) is a GptlabError."""
    import torch

    if name not in allowed:
        raise GptlabError(f"dtype must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {name!r}")
    if name == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one, never a part:
    write a temp file in the same directory, fsync it, rename over the target, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; these are ordinary data files others may read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Lay out a matplotlib figure, write it as a PNG atomically (folders created) and close it: every plot
    gptlab draws ends here, so a reader never sees half a PNG."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any) -> bytes:
    """`obj` as the JSON files gptlab writes: indented, UTF-8, one trailing newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or corrupt file into a GptlabError that names it."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{what} {path} is not valid JSON: {e}") from None


def iter_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed record) for each non-blank line of a JSONL file. A missing file, a line that is
    not UTF-8 or not JSON raises a GptlabError naming the file (and line); callers prefix their own
    validation errors with the `file:line` they get."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise GptlabError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n"))  # keeps column numbers on line 1
            except json.JSONDecodeError as e:
                raise GptlabError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


class AnswerCache:
    """A resumable job's finished answers: a JSONL file appended one record at a time (opened, written and
    closed per record, so a kill loses at most the answer being written), keyed by the record's `key_fields`.
    A rerun reads it back and asks only what is missing. A last line cut off by a kill is dropped with a
    warning (that answer is asked again); any other unreadable line is an error naming file and line, since
    skipping it would silently lose work."""

    def __init__(self, path: str | os.PathLike, key_fields: tuple[str, ...]):
        self.path, self.key_fields = Path(path), tuple(key_fields)
        self.done: dict[tuple, dict] = {}
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[:data.rfind(b"\n") + 1]
            get_logger("cache").warning("%s: dropping an unfinished last line (%d bytes)", self.path, len(data) - len(keep))
            self.path.write_bytes(keep)
        for where, record in iter_jsonl(self.path, "answer cache"):
            if not isinstance(record, dict) or not set(self.key_fields) <= set(record):
                raise GptlabError(f"{where}: not an answer record with fields {list(self.key_fields)} "
                                  f"(delete the file to start over)")
            self.done[self.key(record)] = record

    def key(self, record: dict) -> tuple:
        return tuple(record[k] for k in self.key_fields)

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.done[self.key(record)] = record


HF_PREFIX = "hf:"


def iter_records(source: str | os.PathLike, what: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a dataset given as a JSONL file (`where` = `file:line`), a
    Hugging Face dataset saved with `save_to_disk` (a folder), or `hf:NAME[:SPLIT]` (the Hub, split train by
    default; needs network and the `datasets` package). Dataset rows come back as plain dicts, with the
    None-valued keys that `datasets` adds to make struct columns uniform (a message without `tool_calls`
    gets `tool_calls: None`) removed, so they read exactly like the JSONL records they came from."""
    text = os.fspath(source)
    if not (text.startswith(HF_PREFIX) or Path(text).is_dir()):
        yield from iter_jsonl(text, what)
        return
    try:
        import datasets
    except ImportError:
        raise GptlabError(f"{what} {text} needs the `datasets` package: pip install datasets") from None
    try:
        if text.startswith(HF_PREFIX):
            name, _, split = text[len(HF_PREFIX):].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        else:
            ds = datasets.load_from_disk(text)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise GptlabError(f"{what} {text} has splits {sorted(ds)}, none named train")
                ds = ds["train"]
    except (OSError, ValueError, FileNotFoundError) as e:  # datasets' errors for missing/unreadable data
        raise GptlabError(f"cannot load {what} {text}: {e}") from None
    for index, row in enumerate(ds):
        yield f"{text}[{index}]", _drop_none(row)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def get_logger(name: str) -> logging.Logger:
    """Loggers write `gptlab.<stage>: message` lines to stderr, easy to grep in a run's output."""
    logger = logging.getLogger(f"gptlab.{name}")
    if not logging.getLogger("gptlab").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root = logging.getLogger("gptlab")
        root.addHandler(handler)
        root.setLevel(os.environ.get("GPTLAB_LOG", "INFO"))
    return logger
