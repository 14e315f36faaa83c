"""The LLM as a compressor: arithmetic (range) coding driven by a model's next-token distribution
(Delétang et al. 2023, "Language Modeling Is Compression"; the coder is `constriction`'s range coder).

An ideal entropy coder spends -log2 p(token | context) bits per token, so the compressed size is the model's
cross-entropy on the file, plus a few bytes of coder overhead and a header.

Design decisions
- Bytes -> symbols (lossless for every byte string, stated rule): the input is decoded as UTF-8 with
  `surrogateescape`; each text run between invalid bytes is tokenized with the model's tokenizer and kept if
  its tokens give back exactly its bytes, otherwise it is tokenized one character at a time. A byte that is
  not covered this way (an invalid UTF-8 byte, or a character the vocabulary cannot spell: SmolLM2 has no
  token for 0x04) is coded as the vocabulary's single-byte token when there is one, else as one of 256 escape
  symbols appended after the vocabulary (ids V..V+255), which get the floor probability (24 bits each) and
  are shown to the model as its document-start token. The decoder never tokenizes: it concatenates the
  symbols' bytes, so the tokenization need not be canonical, only recorded.
- Encoder and decoder compute bit-identical probabilities because they run one function
  (`_code_symbols`) whose only difference is a callback that writes or reads a symbol: the same
  batch-of-1 KV-cache steps, the same window restarts, fp32 on the CPU with a fixed thread count (recorded
  in the header). The distribution is then quantised deterministically: softmax in float64 of the float32
  logits, frequencies floor(p * (2^24 - n)) + 1 (every symbol codable), the remainder added to the most
  likely symbol, total exactly 2^24. They reach constriction as exact dyadic float64s, which it quantises
  to its own 24-bit fixed point deterministically (`perfect=False`: identical floats in, identical model
  out). The same machine and library versions decode what they encoded; another CPU or torch build may
  round the logits differently, which the length and CRC-32 check after decoding reports.
- Context window W tokens (default min(1024, model context)): the model sees the document-start token and
  the symbols so far; when W positions are filled, the cache restarts from the start token plus the last
  W/2 symbols (one prefill, identical in both directions), so no prediction sees more than W positions.
- Stored mode: when the model's code is not shorter than the input (random bytes, a script the model never
  saw, a nearly untrained model), the payload is the input itself and `precision_bits` 0 marks it, so a
  .glz is never larger than its input + the header; decoding a stored file runs no model. (An older
  gptlab reading one reports "0-bit probabilities" instead of producing wrong bytes.)
- File format: b"GLZ" + format version byte + a fixed binary header (model and tokenizer sha256 cut to 128
  bits, settings, original length and CRC-32, payload length and CRC-32, the header's own CRC-32; 78 bytes in
  all) + the coder's u32 words (little-endian). A wrong model or tokenizer, a truncated file, a corrupted
  payload each fail with one line before the (slow) model runs.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..common import GptlabError, atomic_write_bytes, sha256_file
from ..model import GPT, KVCache
from ..tokenizer import Tokenizer

MAGIC = b"GLZ"
FORMAT_VERSION = 1
PRECISION_BITS = 24  # constriction's default range coder works in 24-bit fixed point
N_ESCAPES = 256
STORED = 0  # precision_bits of a file whose payload is the input itself (stored mode, module docstring)
DEFAULT_WINDOW = 1024
_INVALID_BYTE = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for undecodable bytes


@dataclass(frozen=True)
class CodecSettings:
    window: int | None = None  # positions the model sees at most, start token included (None: min(1024, context))
    threads: int = 1  # torch CPU threads: part of what makes the float results reproducible


# ---- bytes <-> symbols ----------------------------------------------------------------------------------


class SymbolTable:
    """The coding alphabet of a tokenizer: its V token ids, then 256 escape symbols (one per byte value)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.size = self.vocab_size + N_ESCAPES
        specials = set(tokenizer.special_tokens.values())
        self.byte_token: dict[int, int] = {}
        for i in range(self.vocab_size):
            piece = tokenizer.id_to_bytes(i)
            if len(piece) == 1 and i not in specials:
                self.byte_token.setdefault(piece[0], i)
        start = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.special_tokens.get(
            tokenizer.bos_token or "")
        if start is None:
            raise GptlabError("the tokenizer has neither <|endoftext|> nor a bos token to start a context with")
        self.start_id = start

    def encode(self, data: bytes) -> list[int]:
        """Symbols whose bytes are exactly `data` (the rule in the module docstring)."""
        text = data.decode("utf-8", errors="surrogateescape")
        symbols: list[int] = []
        pos = 0
        for match in _INVALID_BYTE.finditer(text):
            symbols += self._encode_text(text[pos:match.start()])
            symbols += self._encode_bytes(bytes([ord(match.group()) - 0xDC00]))
            pos = match.end()
        symbols += self._encode_text(text[pos:])
        return symbols

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.tokenizer.encode(text)
        if self.tokenizer.decode_bytes(ids) == text.encode("utf-8"):
            return ids
        out = []
        for char in text:  # rare: something in this run does not round-trip; find it char by char
            ids = self.tokenizer.encode(char)
            raw = char.encode("utf-8")
            out += ids if self.tokenizer.decode_bytes(ids) == raw else self._encode_bytes(raw)
        return out

    def _encode_bytes(self, raw: bytes) -> list[int]:
        return [self.byte_token.get(b, self.vocab_size + b) for b in raw]

    def symbol_bytes(self, symbol: int) -> bytes:
        if symbol >= self.vocab_size:
            return bytes([symbol - self.vocab_size])
        return self.tokenizer.id_to_bytes(symbol)

    def model_input(self, symbol: int) -> int:
        """The token the model reads for a symbol: an escape is shown as the start token."""
        return self.start_id if symbol >= self.vocab_size else symbol


# ---- the shared coding loop -----------------------------------------------------------------------------


def quantised_probabilities(logits: np.ndarray, n_symbols: int, bits: int = PRECISION_BITS) -> np.ndarray:
    """Exact dyadic probabilities (integers / 2^bits) of `n_symbols` symbols; logits beyond the given ones
    (the escapes) count as -inf and get the floor of one unit."""
    z = np.full(n_symbols, -np.inf)
    z[:len(logits)] = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    total = 1 << bits
    freq = np.floor(p * (total - n_symbols)).astype(np.int64) + 1
    freq[np.argmax(freq)] += total - int(freq.sum())
    return freq / total


class _Predictor:
    """Batch-of-1 next-token logits with a KV cache of `window` positions (fp32, CPU)."""

    def __init__(self, model: GPT, window: int, vocab_size: int):
        self.model, self.window, self.vocab_size = model, window, vocab_size
        self.cache = KVCache(model.config, 1, window, "cpu", torch.float32)

    @property
    def full(self) -> bool:
        return self.cache.length >= self.window

    def restart(self, tokens: list[int]) -> np.ndarray:
        self.cache.length = 0
        return self._forward(tokens)

    def step(self, token: int) -> np.ndarray:
        return self._forward([token])

    def _forward(self, tokens: list[int]) -> np.ndarray:
        idx = torch.tensor([tokens], dtype=torch.long)
        logits = self.model(idx, kv_cache=self.cache, logits_to_keep=1)
        return logits[0, -1, :self.vocab_size].float().numpy()


@contextmanager
def _deterministic_cpu(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(before)


def _code_symbols(model: GPT, table: SymbolTable, n_symbols: int, settings: CodecSettings,
                  code_one: Callable[[np.ndarray], int], progress: Callable[[int], None] | None = None) -> list[int]:
    """Walk `n_symbols` positions: quantise the model's distribution, let `code_one` write or read the
    symbol there, feed it to the model. Encoder and decoder both run exactly this (module docstring)."""
    if model.config.vocab_size < table.vocab_size:
        raise GptlabError(f"the model has {model.config.vocab_size} outputs but its tokenizer "
                          f"{table.vocab_size} tokens")
    keep = settings.window // 2
    symbols: list[int] = []
    inputs: list[int] = []  # what the model read at each position
    with _deterministic_cpu(settings.threads):
        predictor = _Predictor(model, settings.window, table.vocab_size)
        logits = predictor.restart([table.start_id]) if n_symbols else None
        for i in range(n_symbols):
            symbol = code_one(quantised_probabilities(logits, table.size))
            symbols.append(symbol)
            inputs.append(table.model_input(symbol))
            if progress:
                progress(len(table.symbol_bytes(symbol)))
            if i + 1 == n_symbols:
                break
            if predictor.full:
                logits = predictor.restart([table.start_id] + inputs[-keep:])
            else:
                logits = predictor.step(inputs[-1])
    return symbols


# ---- files ----------------------------------------------------------------------------------------------


def model_sha256(model_dir: str | Path) -> str:
    """The identity of a model directory: sha256 over its config's and weights' sha256 (from SHA256SUMS,
    which `load_model_dir` verifies, else hashed here)."""
    from ..checkpoint import read_checksums

    model_dir = Path(model_dir)
    listed = read_checksums(model_dir) or {}
    parts = [f"{name} {listed.get(name) or sha256_file(model_dir / name)}\n"
             for name in ("gptlab.json", "model.safetensors")]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


@dataclass
class Header:
    """The fixed-size binary header (`_HEADER`, 78 bytes: a JSON one cost ~300, a tenth of a small file's
    compressed size). Hashes are cut to 128 bits: enough to tell models apart, not a security claim."""
    model_sha256: bytes  # first 16 bytes of `model_sha256`
    tokenizer_sha256: bytes  # first 16 bytes of the tokenizer file's sha256
    window: int
    threads: int
    precision_bits: int
    n_bytes: int
    n_symbols: int
    crc32: int  # of the original bytes
    payload_bytes: int
    payload_crc32: int


# magic, version, the Header fields in order, CRC-32 of everything before it
_HEADER = struct.Struct("<3sB16s16sIBBQQIQI")
_HEADER_CRC = struct.Struct("<I")


def compress(data: bytes, model: GPT, tokenizer: Tokenizer, model_id: str, settings: CodecSettings = CodecSettings(),
             progress: Callable[[int], None] | None = None) -> bytes:
    """The .glz bytes of `data` under `model` (`model_id`: its `model_sha256`)."""
    import constriction

    if settings.window is None:
        settings = replace(settings, window=min(DEFAULT_WINDOW, model.config.max_seq_len))
    if not 2 <= settings.window <= model.config.max_seq_len:
        raise GptlabError(f"the context window must be 2..{model.config.max_seq_len} tokens (the model's context), "
                          f"got {settings.window}")
    if not 1 <= settings.threads <= 255:
        raise GptlabError(f"threads must be 1..255, got {settings.threads}")
    table = SymbolTable(tokenizer)
    symbols = table.encode(data)
    if b"".join(map(table.symbol_bytes, symbols)) != data:  # guaranteed by construction; cheap to check
        raise AssertionError("symbol table does not reproduce the input")
    encoder = constriction.stream.queue.RangeEncoder()
    position = iter(symbols)

    def write(probabilities: np.ndarray) -> int:
        symbol = next(position)
        encoder.encode(symbol, constriction.stream.model.Categorical(probabilities, perfect=False))
        return symbol

    _code_symbols(model, table, len(symbols), settings, write, progress)
    payload = encoder.get_compressed().astype("<u4").tobytes()
    precision = PRECISION_BITS
    if data and len(payload) >= len(data):  # the model did no better than the raw bytes: store them
        payload, precision = data, STORED
    header = Header(bytes.fromhex(model_id)[:16], bytes.fromhex(tokenizer.sha256)[:16], settings.window,
                    settings.threads, precision, len(data), len(symbols), zlib.crc32(data), len(payload),
                    zlib.crc32(payload))
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, *astuple(header))
    return head + _HEADER_CRC.pack(zlib.crc32(head)) + payload


def read_header(blob: bytes, source: str = "input") -> tuple[Header, bytes]:
    """The header and payload of a .glz file; a file that is not one, truncated or corrupted is a GptlabError."""
    if blob[:3] != MAGIC:
        raise GptlabError(f"{source} is not a gptlab compressed file (no GLZ magic)")
    if len(blob) >= 4 and blob[3] != FORMAT_VERSION:
        raise GptlabError(f"{source} has format version {blob[3]}; this gptlab reads version {FORMAT_VERSION}")
    end = _HEADER.size + _HEADER_CRC.size
    if len(blob) < end:
        raise GptlabError(f"{source} is truncated: {len(blob)} bytes, shorter than the {end}-byte header")
    if zlib.crc32(blob[:_HEADER.size]) != _HEADER_CRC.unpack_from(blob, _HEADER.size)[0]:
        raise GptlabError(f"{source} is corrupted: the header's CRC-32 does not match")
    header = Header(*_HEADER.unpack_from(blob)[2:])
    payload = blob[end:]
    if len(payload) != header.payload_bytes:
        raise GptlabError(f"{source} is truncated or has trailing data: payload of {len(payload)} bytes, "
                          f"the header says {header.payload_bytes}")
    if zlib.crc32(payload) != header.payload_crc32:
        raise GptlabError(f"{source} is corrupted: the payload's CRC-32 does not match the header")
    return header, payload


def check_compatible(header: Header, tokenizer: Tokenizer, model_id: str, source: str = "input") -> None:
    """A GptlabError unless the file was compressed with this model, tokenizer and precision."""
    if header.model_sha256 != bytes.fromhex(model_id)[:16]:
        raise GptlabError(f"{source} was compressed with model {header.model_sha256.hex()[:12]}, "
                          f"not this one ({model_id[:12]}): pass the same --model")
    if header.tokenizer_sha256 != bytes.fromhex(tokenizer.sha256)[:16]:
        raise GptlabError(f"{source} was compressed with tokenizer {header.tokenizer_sha256.hex()[:12]}, "
                          f"not this one ({tokenizer.sha256[:12]})")
    if header.precision_bits not in (PRECISION_BITS, STORED):
        raise GptlabError(f"{source} uses {header.precision_bits}-bit probabilities; "
                          f"this gptlab codes {PRECISION_BITS}")


def decompress(blob: bytes, model: GPT, tokenizer: Tokenizer, model_id: str, source: str = "input",
               progress: Callable[[int], None] | None = None) -> bytes:
    """The original bytes of a .glz file; the model must be the one it was compressed with."""
    import constriction

    header, payload = read_header(blob, source)
    check_compatible(header, tokenizer, model_id, source)
    if header.precision_bits == STORED:
        return payload  # read_header checked its CRC; it is the original
    table = SymbolTable(tokenizer)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))

    def read(probabilities: np.ndarray) -> int:
        return int(decoder.decode(constriction.stream.model.Categorical(probabilities, perfect=False)))

    settings = CodecSettings(window=header.window, threads=header.threads)
    symbols = _code_symbols(model, table, header.n_symbols, settings, read, progress)
    data = b"".join(map(table.symbol_bytes, symbols)) if header.n_symbols else b""
    if len(data) != header.n_bytes or zlib.crc32(data) != header.crc32:
        raise GptlabError(f"decoding {source} did not reproduce the original (its CRC-32 differs): the model "
                          "computed different probabilities than when compressing (another CPU or torch build?)")
    return data


# ---- command line ---------------------------------------------------------------------------------------


class _Progress:
    """A bytes progress bar with the rate in KB/s, on stderr (tqdm)."""

    def __init__(self, total: int, what: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def load_codec_model(model: str) -> tuple[GPT, Tokenizer, str]:
    """(fp32 CPU model, tokenizer, model_sha256) of a model directory or registry name."""
    from ..apps.models import resolve_model_dir
    from ..checkpoint import load_model_dir

    path = resolve_model_dir(model)
    gpt, tokenizer = load_model_dir(path, device="cpu", dtype=torch.float32)
    return gpt, tokenizer, model_sha256(path)


def _read_input(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror}") from None


def _cmd_compress(args: argparse.Namespace) -> None:
    data = _read_input(args.file)
    gpt, tokenizer, model_id = load_codec_model(args.model)
    bar = _Progress(len(data), "compress", not args.quiet)
    start = time.perf_counter()
    blob = compress(data, gpt, tokenizer, model_id, CodecSettings(window=args.window, threads=args.threads), bar)
    bar.close()
    seconds = time.perf_counter() - start
    out = args.output or args.file + ".glz"
    atomic_write_bytes(out, blob)
    bpb = 8 * len(blob) / len(data) if data else 0.0
    print(f"{args.file}: {len(data)} -> {len(blob)} bytes ({bpb:.3f} bits/byte), "
          f"{len(data) / 1024 / max(seconds, 1e-9):.2f} KB/s, wrote {out}")


def _cmd_decompress(args: argparse.Namespace) -> None:
    blob = _read_input(args.file)
    header, _ = read_header(blob, args.file)  # fail fast, before loading the model
    gpt, tokenizer, model_id = load_codec_model(args.model)
    check_compatible(header, tokenizer, model_id, args.file)  # before the progress bar starts
    bar = _Progress(header.n_bytes, "decompress", not args.quiet)
    start = time.perf_counter()
    data = decompress(blob, gpt, tokenizer, model_id, args.file, bar)
    bar.close()
    seconds = time.perf_counter() - start
    out = args.output or (args.file[:-4] if args.file.endswith(".glz") else args.file + ".out")
    atomic_write_bytes(out, data)
    print(f"{args.file}: {len(blob)} -> {len(data)} bytes, {len(data) / 1024 / max(seconds, 1e-9):.2f} KB/s, "
          f"wrote {out}")


def register(sub) -> None:
    for name, func, help_text in (
            ("compress", _cmd_compress, "compress a file with a language model driving a range coder (.glz)"),
            ("decompress", _cmd_decompress, "decompress a .glz file with the model it was compressed with")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("file")
        p.add_argument("--model", required=True, help="model directory or registry name")
        p.add_argument("-o", "--output", default=None,
                       help="output file (default: FILE.glz / FILE without .glz)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "compress":
            p.add_argument("--window", type=int, default=None,
                           help=f"tokens the model sees at most (default min({DEFAULT_WINDOW}, model context))")
            p.add_argument("--threads", type=int, default=1,
                           help="torch CPU threads (recorded: decompression uses the same number)")
        p.set_defaults(func=func)
