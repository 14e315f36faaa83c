"""Byte-level BPE tokenizer: text <-> integers, lossless for every string.

Design decisions
- Training uses `rustbpe` (Rust, parallel): on the default mixture it trained a 32k vocabulary ~2x faster
  than HF `tokenizers` (docs/benchmarks.md). Encoding uses `tiktoken` with the same merges: it is the
  fastest BPE encoder we measured. Neither library is reimplemented here; tests/bpe_reference.py holds a
  short pure-Python BPE used only as a test oracle.
- The file format is Hugging Face's `tokenizer.json`, so `tokenizers.Tokenizer.from_file` and
  `transformers.PreTrainedTokenizerFast` load our tokenizer and encode identically (tests check it). Merges
  are written in rank order with `ignore_merges=True`, which is exactly tiktoken's algorithm: a pre-token
  that is itself in the vocabulary is emitted whole, otherwise the lowest-rank pair is merged first.
- Pre-tokenization splits text with the GPT-4 (cl100k) regex before BPE, so merges never cross a
  word/number/punctuation boundary; digits are grouped 1-3.
- Special tokens (document boundary, chat roles, tool calls, reserved) take the last ids and are reserved
  at training time. They are NEVER produced from user text unless the caller allows them: the string
  "<|endoftext|>" inside a user message encodes as ordinary characters. This blocks prompt injection of
  control tokens. (HF's loaders match special-token strings in text by default; set
  `tokenizer.encode_special_tokens = True` / `split_special_tokens=True` to get our behaviour there.)
- A tokenizer.json written by someone else (e.g. an imported SmolLM2) is loaded with the HF `tokenizers`
  backend instead, because its merge order need not match tiktoken's rank rule. Both backends share
  this class's API.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from .common import GptlabError, atomic_write_text, get_logger

log = get_logger("tokenizer")

# GPT-4's pre-tokenization regex (as published in tiktoken's cl100k_base), in the non-possessive spelling
# that both tiktoken/rustbpe (fancy-regex) and HF tokenizers (Oniguruma) evaluate identically.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [
    EOT,  # opens every document (acts as BOS) and separates packed documents
    "<|pad|>",
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|tool_call_start|>", "<|tool_call_end|>",
    "<|tool_output_start|>", "<|tool_output_end|>",
    *(f"<|reserved_{i}|>" for i in range(4)),
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies: printable
    Latin-1 bytes map to themselves, the other 68 bytes to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _to_chars(token: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in token)


def _to_bytes(chars: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in chars)
    except KeyError:
        raise GptlabError(f"token {chars!r} is not a byte-level BPE token (only byte-level BPE is supported)") from None


def _merge_pair(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens that BPE merges to make `token`: run BPE on its bytes using only ranks below its own
    rank; what remains is exactly two parts (the standard tiktoken -> merges conversion)."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise GptlabError(f"token {token!r} cannot be built from lower-ranked tokens; the ranks are not BPE merges")
    return parts[0], parts[1]


def _hf_json_from_ranks(ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    """Build a Hugging Face tokenizer.json (as text) from tiktoken-style ranks, using the `tokenizers` API
    so the format always matches the installed library."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken

    vocab = {_to_chars(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            a, b = _merge_pair(ranks, tok)
            merges.append((_to_chars(a), _to_chars(b)))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    for name, _ in sorted(specials.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    added = hf.get_added_tokens_decoder()
    if {tok.content: i for i, tok in added.items()} != specials:
        raise AssertionError("special token ids were not assigned at the end of the vocabulary")
    return hf.to_str(pretty=False)


class Tokenizer:
    """One tokenizer API over two backends: tiktoken (our own tokenizers) or HF tokenizers (foreign ones)."""

    def __init__(self, json_text: str, source: str = "<memory>"):
        self.json_text = json_text
        self.source = source
        try:
            spec = json.loads(json_text)
        except json.JSONDecodeError as e:
            raise GptlabError(f"tokenizer {source} is not valid JSON: {e}") from None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise GptlabError(f"tokenizer {source} is not a BPE tokenizer.json (model type {model.get('type')!r})")
        self.special_tokens: dict[str, int] = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        id_to_bytes: dict[int, bytes] = {}
        for chars, i in model["vocab"].items():
            if chars not in self.special_tokens:
                id_to_bytes[i] = _to_bytes(chars)
        for name, i in self.special_tokens.items():
            id_to_bytes[i] = name.encode("utf-8")
        self.vocab_size = max(id_to_bytes) + 1
        self._id_to_bytes = [id_to_bytes.get(i, b"") for i in range(self.vocab_size)]
        self.eot_id = self.special_tokens.get(EOT)
        # An imported model's own chat format (HF convention: a Jinja template and the token that ends a
        # turn), set by `checkpoint.load_model_dir` from imported.json. None: gptlab's format (gptlab.chat).
        self.chat_template: str | None = None
        self.bos_token: str | None = None
        self.eos_token: str | None = None
        self.backend = "tiktoken" if self._is_ours(spec) else "hf"
        if self.backend == "tiktoken":
            import tiktoken

            ranks = {id_to_bytes[i]: i for chars, i in model["vocab"].items() if chars not in self.special_tokens}
            self._enc = tiktoken.Encoding(name=f"gptlab-{self.sha256[:8]}", pat_str=SPLIT_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)
        else:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(json_text)
            self._hf_plain = HFTokenizer.from_str(json_text)
            self._hf_plain.encode_special_tokens = True  # special strings in text are ordinary text

    @staticmethod
    def _is_ours(spec: dict) -> bool:
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [])
        return (spec["model"].get("ignore_merges") is True and len(steps) == 2
                and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == SPLIT_PATTERN
                and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex") is False)

    # ---- construction and persistence -------------------------------------------------------------
    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], special_names: Sequence[str] = SPECIAL_TOKENS) -> "Tokenizer":
        first = max(ranks.values()) + 1
        specials = {name: first + i for i, name in enumerate(special_names)}
        return cls(_hf_json_from_ranks(ranks, specials))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"tokenizer not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise GptlabError(f"tokenizer {path} is not UTF-8 text") from None
        return cls(text, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.json_text)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()

    # ---- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: Iterable[str] | str = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token strings are ordinary text unless named in `allowed_special`
        (or `allowed_special="all"`)."""
        if self.backend == "tiktoken":
            if not allowed_special:
                return self._enc.encode_ordinary(text)
            allowed = "all" if allowed_special == "all" else set(allowed_special)
            return self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        hf = self._hf if allowed_special else self._hf_plain
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Ordinary encoding of many texts in parallel threads (0 = all cores)."""
        if self.backend == "tiktoken":
            return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)
        return [e.ids for e in self._hf_plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self._id_to_bytes[i] for i in ids)
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise GptlabError(f"token id {bad} outside the vocabulary (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- vocabulary facts -------------------------------------------------------------------------
    def special_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise GptlabError(f"tokenizer has no special token {name!r}")
        return self.special_tokens[name]

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of each id (0 for special tokens): the denominator of bits per byte."""
        lengths = np.array([len(b) for b in self._id_to_bytes], dtype=np.int64)
        lengths[list(self.special_tokens.values())] = 0
        return lengths

    def id_to_bytes(self, i: int) -> bytes:
        return self._id_to_bytes[i]


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    special_names: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train byte-level BPE with `vocab_size` ids in total (256 bytes + merges + special tokens)."""
    import rustbpe

    n_special = len(special_names)
    if vocab_size < 256 + n_special:
        raise GptlabError(f"vocab size {vocab_size} is smaller than 256 byte tokens + {n_special} special tokens")
    if vocab_size > 1 << 32:
        raise GptlabError(f"vocab size {vocab_size} is too large")
    trainer = rustbpe.Tokenizer()
    seen = Counter()

    def counted(it):
        for text in it:
            seen["docs"] += 1
            seen["bytes"] += len(text)
            yield text

    trainer.train_from_iterator(counted(iter(texts)), vocab_size - n_special, pattern=SPLIT_PATTERN)
    if seen["docs"] == 0 or seen["bytes"] == 0:
        raise GptlabError("no text to train the tokenizer on (the mixture yielded no documents)")
    ranks = dict(trainer.get_mergeable_ranks())
    if len(ranks) < vocab_size - n_special:
        log.warning("the corpus only supports %d merges: vocabulary is %d, not %d", len(ranks) - 256,
                    len(ranks) + n_special, vocab_size)
    return Tokenizer.from_ranks(ranks, special_names)


# ---- CLI ------------------------------------------------------------------------------------------------
