"""Constrained decoding: a grammar per row masks the logits, so the output always matches it.

    params = SamplingParams(constraint=Constraint.json_schema({"type": "object", ...}))
    Constraint.json_object() | .regex(r"[0-9]+") | .lark(open("g.lark").read()) | .choice(["yes", "no"])

Design decisions
- The grammar engine is llguidance (Microsoft's Rust Earley parser + lexer over a token trie; the one used
  by vLLM, SGLang and llama.cpp): JSON Schema, regex and Lark grammars all compile to one grammar format,
  and an `LLMatcher` answers "which tokens may come next" as a bitmask in microseconds. gptlab only adapts
  its `Tokenizer` (`_TokenizerAdapter`: every id's bytes, the special ids, the encoder) and applies masks.
- Stop tokens vs the grammar: the matcher sees the tokenizer plus one extra pseudo id (`vocab_size`) as its
  end-of-sequence token, so "the grammar may end here" (`is_accepting`) never mixes with a real token's
  bit. A row's stop tokens are allowed exactly where the grammar may end: a stop token can never cut an
  unfinished object short. When the grammar admits nothing more (`is_stopped`, e.g. after the closing
  brace) the row ends with finish_reason "stop" (stop = None) without another model step. Hitting
  max_new_tokens first gives "length" and the partial text, as for any row.
- Unconstrained rows are never touched: masks are computed and applied only to the constrained rows'
  logits, and sampling is per row (sampling.py), so they produce exactly what they would alone (tested).
- Errors are GptlabErrors, never hangs: a schema or grammar llguidance cannot compile (bad syntax, an
  unsupported JSON Schema keyword such as "not", an unsatisfiable schema) fails the prefill; a matcher
  that fails mid-way (llguidance's per-step limits, e.g. a grammar with no finite string) or a step where
  the grammar admits no token the row may produce (e.g. it needs a token the row treats as a stop, or one
  past the model's vocabulary) ends that row only, with finish_reason "error" and the message
  (`mask_constrained_logits` reports such rows instead of raising), so the other rows of a server's
  batch go on; `generate` and `stream_batch` then raise it.
- Limits: a constraint's source text is at most MAX_SOURCE_BYTES (100 KB) and at most MAX_CHOICES
  options; beyond that llguidance's own `LLParserLimits` defaults apply (grammar size 500k symbols,
  lexer fuel, 50k Earley items per step), and their errors are reported the same way.
- JSON is generated compactly: ", " and ": " separators and no other whitespace. With flexible whitespace a
  small model can emit newlines until max_new_tokens (a known failure of grammar-constrained small
  models); here every token is content. JSON Schema is checked first against its metaschema with
  `jsonschema` (the error names the path), then compiled.
- Compile cache: compiling is building an `LLMatcher` (grammar -> lexer + parser tables); the result is kept
  in an LRU (`GrammarCache`, 64 entries, keyed by tokenizer hash + constraint) and each row gets a
  `deep_copy` of it. The llguidance tokenizer (a token trie, ~0.3 s for a 49k vocabulary) is cached per
  tokenizer the same way.
- llguidance is imported on first use, so unconstrained decoding never pays for it; torch only where masks
  are applied, so an HTTP client can build and send constraints without it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from ..common import GptlabError
from ..structured import check_schema

if TYPE_CHECKING:
    import torch

MAX_SOURCE_BYTES = 100_000
MAX_CHOICES = 10_000
KINDS = ("json_schema", "regex", "lark", "choice")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for response_format json_schema.name
# compact JSON (see the module docstring); llguidance's JsonCompileOptions
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match. `kind` is one of KINDS; `source` the schema (JSON text), regex, Lark
    grammar or JSON list of choices. Frozen and hashable (the compile cache key); build one with the
    classmethods below, which check the input."""

    kind: str
    source: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GptlabError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        size = len(self.source.encode("utf-8"))
        if size > MAX_SOURCE_BYTES:
            raise GptlabError(f"{self.kind} constraint is {size} bytes; the limit is {MAX_SOURCE_BYTES}")
        if not self.source.strip():
            raise GptlabError(f"empty {self.kind} constraint")

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GptlabError(f"JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GptlabError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        check_schema(schema)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """The whole output matches `pattern` (Rust regex syntax; anchors are implied)."""
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """A Lark grammar (llguidance's dialect; the rule `start` is the output)."""
        return cls("lark", grammar)

    @classmethod
    def choice(cls, options) -> Constraint:
        """The output is exactly one of `options` (strings)."""
        options = list(options)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GptlabError("choices must be a non-empty list of non-empty strings")
        if len(options) > MAX_CHOICES:
            raise GptlabError(f"{len(options)} choices; the limit is {MAX_CHOICES}")
        return cls("choice", json.dumps(options, ensure_ascii=False))

    @classmethod
    def from_response_format(cls, response_format: dict | None) -> Constraint | None:
        """OpenAI's `response_format`: {"type": "text"} (None), {"type": "json_object"}, or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise GptlabError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
            name, strict = spec.get("name", "output"), spec.get("strict", False)
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise GptlabError(f"response_format json_schema.name must be 1-64 letters, digits, _ or -, got {name!r}")
            if not isinstance(strict, bool) and strict is not None:
                raise GptlabError(f"response_format json_schema.strict must be a boolean, got {strict!r}")
            # strict or not, the output is constrained to the schema: decoding enforces it either way
            return cls.json_schema(spec["schema"])
        raise GptlabError(f"response_format type must be text, json_object or json_schema, got {kind!r}")

    def response_format(self) -> dict:
        """This constraint as OpenAI's `response_format` (JSON Schema only: the API has no other kinds)."""
        if self.kind != "json_schema":
            raise GptlabError(f"a {self.kind} constraint has no OpenAI response_format (only JSON Schema does)")
        schema = json.loads(self.source)
        if schema == {"type": "object"}:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}

    def describe(self) -> str:
        text = " ".join(self.source.split())
        return f"{self.kind} {text[:60]!r}" + ("..." if len(text) > 60 else "")

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint (not yet checked: see `compile`)."""
        import llguidance

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
        return llguidance.grammar_from(self.kind, self.source)


# ---- tokenizer adapter and compile cache ---------------------------------------------------------------
class _TokenizerAdapter:
    """gptlab's Tokenizer in the shape `llguidance.TokenizerWrapper` reads: each id's bytes, the special ids
    (llguidance never lets grammar text produce them) and a text encoder. One pseudo id past the vocabulary
    is the end-of-sequence token (module docstring)."""

    def __init__(self, tokenizer):
        self.end_id = tokenizer.vocab_size
        self.tokens = [tokenizer.id_to_bytes(i) for i in range(tokenizer.vocab_size)] + [b"<|grammar_end|>"]
        self.special_token_ids = sorted(tokenizer.special_tokens.values()) + [self.end_id]
        self.eos_token_id = self.end_id
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text):
        if not isinstance(text, str):  # tells TokenizerWrapper to pass str, not bytes
            raise TypeError("the adapter encodes text")
        return self._tokenizer.encode(text)


class GrammarCache:
    """LRU of compiled matchers keyed by (tokenizer hash, constraint), plus one llguidance tokenizer per
    tokenizer hash. Thread-safe (a server may compile from several threads)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._matchers: OrderedDict = OrderedDict()
        self._tokenizers: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _lookup(self, table: OrderedDict, key, make, size: int):
        with self._lock:
            if key in table:
                table.move_to_end(key)
                return table[key], True
        value = make()
        with self._lock:
            table[key] = value
            while len(table) > size:
                table.popitem(last=False)
        return value, False

    def lltokenizer(self, tokenizer):
        import llguidance

        value, _ = self._lookup(self._tokenizers, tokenizer.sha256,
                                lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerAdapter(tokenizer))),
                                size=4)
        return value

    def matcher(self, tokenizer, constraint: Constraint):
        """A fresh matcher (a copy of the cached compiled one) for one row."""
        template, hit = self._lookup(self._matchers, (tokenizer.sha256, constraint),
                                     lambda: _compile(self.lltokenizer(tokenizer), constraint), self.size)
        with self._lock:
            self.hits, self.misses = self.hits + hit, self.misses + (not hit)
        return template.deep_copy()

    def clear(self) -> None:
        with self._lock:
            self._matchers.clear()
            self._tokenizers.clear()


def _compile(lltokenizer, constraint: Constraint):
    import llguidance

    # the constructor compiles; on a bad grammar it does not raise but starts in an error state
    matcher = llguidance.LLMatcher(lltokenizer, constraint.grammar(), log_level=0)
    if matcher.is_error():
        raise GptlabError(f"cannot compile {constraint.describe()}: {_one_line(matcher.get_error())}")
    return matcher


def _one_line(message: str, limit: int = 300) -> str:
    """llguidance's multi-line messages (error, then parser state or grammar excerpt) as one line."""
    text = " ".join(message.split()) or "unknown error"
    return text if len(text) <= limit else text[:limit] + "..."


GRAMMARS = GrammarCache()
OVERLAP_MASKS = True  # compute masks beside the forward pass (`ConstraintState.prefetch`); the benchmark toggles it
_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()
_MINUS_INF: dict = {}  # a -inf scalar tensor per device, made once


def _mask_pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="gptlab-mask"))
        return _POOL[0]


# ---- per-row state and masking -------------------------------------------------------------------------
class ConstraintState:
    """One row's matcher: the mask of allowed tokens before each step, and the tokens it sampled."""

    def __init__(self, constraint: Constraint, tokenizer, cache: GrammarCache = GRAMMARS):
        self.constraint = constraint
        self.matcher = cache.matcher(tokenizer, constraint)
        self.vocab_size = tokenizer.vocab_size
        self._next: Future | None = None  # the next step's mask, being computed (`prefetch`)

    def _check(self, when: str) -> None:
        if self.matcher.is_error():
            raise GptlabError(f"constraint {self.constraint.describe()} failed {when}: "
                              f"{_one_line(self.matcher.get_error())}")

    def _compute(self, out: np.ndarray) -> np.ndarray:
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        self._check("computing the next-token mask")
        return out

    def prefetch(self) -> None:
        """Start computing the next mask in a worker thread (the engine calls this right before the
        model's forward pass, which the mask does not depend on; llguidance releases the GIL)."""
        if OVERLAP_MASKS and self._next is None and not self.matcher.is_stopped():
            words = (self.vocab_size + 1 + 31) // 32
            self._next = _mask_pool().submit(self._compute, np.zeros(words, dtype=np.int32))

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the grammar's allowed-token bitmask (one bit per id, plus the end bit) into `out`."""
        if self._next is not None:
            pending, self._next = self._next, None
            out[:] = pending.result()
        else:
            self._compute(out)

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def consume(self, token: int) -> bool:
        """Feed a sampled (non-stop) token; True when the grammar is complete (admits nothing more)."""
        if self._next is not None:  # a mask still computing must not race the matcher's update
            self._next.exception()
            self._next = None
        if not self.matcher.consume_token(token):
            self._check(f"on token {token}")
        return self.matcher.is_stopped()


def mask_constrained_logits(logits: torch.Tensor, rows: list, n_real_tokens: int) -> dict[int, str]:
    """Set to -inf, in place, every logit a constrained row's grammar does not allow; `rows` are the batch's
    rows (`Row.constraint`, `Row.stop_ids`). A row's stop tokens are allowed where its grammar may end.
    Returns {batch position: error} for the rows whose constraint failed or admits no token they can
    produce (a dead end): their logits are left as they were, and the caller ends those rows with the
    error while the rest of the batch goes on."""
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    vocab = rows[constrained[0]].constraint.vocab_size
    words = (vocab + 1 + 31) // 32  # + 1: the end pseudo id
    bitmask = np.zeros((len(constrained), words), dtype=np.int32)
    failed: dict[int, str] = {}
    for k, i in enumerate(constrained):
        try:
            rows[i].constraint.fill_bitmask(bitmask[k])
        except GptlabError as e:
            failed[i] = str(e)
    # bit j of 32-bit word w is token 32 w + j; on little-endian hosts (x86, ARM) that is bit j % 8 of byte 4 w + j // 8
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").view(bool)
    width = logits.shape[-1]
    if bits.shape[1] >= width:
        allowed = bits[:, :width]
    else:
        allowed = np.zeros((len(constrained), width), dtype=bool)
        allowed[:, :bits.shape[1]] = bits
    allowed[:, min(vocab, n_real_tokens):] = False  # the end pseudo id, padding ids, ids the model lacks
    for k, i in enumerate(constrained):
        row = rows[i]
        stops = [t for t in row.stop_ids if t < width]
        allowed[k, stops] = row.constraint.accepting
        if i not in failed and not allowed[k].any():
            text = row.stream.text[-40:]
            failed[i] = (f"constraint {row.constraint.constraint.describe()} admits no token this row can produce "
                         f"after {text!r} (it may need a stop token or an id past the model's vocabulary)")
        if i in failed:
            allowed[k] = True
    import torch  # here, not at the top: the HTTP LLM client builds Constraints without torch

    allowed_t = torch.from_numpy(allowed).to(logits.device)
    minus_inf = _MINUS_INF.get(logits.device)
    if minus_inf is None:
        minus_inf = _MINUS_INF[logits.device] = torch.tensor(-float("inf"), device=logits.device)
    if len(constrained) == len(rows):  # torch.where into the logits: measured faster than masked_fill on CPU
        torch.where(allowed_t, logits, minus_inf, out=logits)
    else:
        index = torch.tensor(constrained, device=logits.device)
        logits[index] = torch.where(allowed_t, logits[index], minus_inf)
    return failed
