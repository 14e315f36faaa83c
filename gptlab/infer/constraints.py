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
  (`StepMasks.failed` reports such rows instead of raising), so the other rows of a server's
  batch go on; `generate` and `stream_batch` then raise it.
- Limits: a constraint's source text is at most MAX_SOURCE_BYTES (100 KB) and at most MAX_CHOICES
  options; beyond that llguidance's own `LLParserLimits` defaults apply (grammar size 500k symbols,
  lexer fuel, 50k Earley items per step), and their errors are reported the same way.
- JSON is generated compactly: ", " and ": " separators and no other whitespace. With flexible whitespace a
  small model can emit newlines until max_new_tokens (a known failure of grammar-constrained small
  models); here every token is content. JSON Schema is checked first against its metaschema with
  `jsonschema` (the error names the path), then compiled.
- Mask cost: a row's mask is llguidance's int32 bitmask (one bit per token id), computed into a preallocated
  buffer; the fix-ups (stop tokens, ids past the model's vocabulary, "no token allowed") are word
  operations on it (`StepMasks`). Turning it into additive logit biases (0 or -inf, a 256-entry byte table,
  one gather and one in-place add over the whole vocabulary: `StepMasks.apply`) is the expensive part
  (memory traffic: ~100-200 us a row on SmolLM2's 49k vocabulary), so the engine samples accept-first:
  it samples from the unmasked logits, tests the token's bit, and masks and samples that row again only
  when the token is not allowed. This is exact, not an approximation. Greedy: if the argmax is allowed it
  is the argmax of the masked logits. Sampling from p with allowed set A: P(token a) = p(a) (accepted at
  once) + (1 - p(A)) p(a) / p(A) (rejected, then drawn from the masked distribution with fresh, independent
  randomness) = p(a) / p(A), the masked distribution. Repetition penalty and temperature commute with the
  mask (they keep -inf at -inf); top-k and top-p do not (the k best tokens are not the k best allowed
  ones), so rows using them are masked before sampling as before. A small model asked for JSON mostly
  wants an allowed token: on the structured benchmark the second draw happens on a minority of steps
  (bench/results/structured.md gives the measured rate).
  The next step's masks of all the batch's constrained rows are computed in one job in a worker thread
  while the model runs its forward pass (`prefetch_masks`): the mask depends only on the tokens already
  sampled, never on the logits. The worker also keeps the allowed ids of a mask with few of them
  (`StepMasks.few`; most refused draws are forced tokens), so most redraws read a few logits, not 49k,
  and builds the step's `StepMasks` itself, so the main thread, whose Python runs cold after a forward
  pass, only picks it up: on SmolLM2 at batch 1 a constrained token costs the critical path 33-36 us
  (bench/results/structured.md, session 13).
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
from concurrent.futures import ThreadPoolExecutor
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
# A mask whose allowed ids fit in this many 32-bit words keeps them as a list (`_fill_masks`): on the
# structured benchmark 39 of 44 refused draws at batch 1 had at most 29 allowed ids (31 had exactly one, a
# forced token), so the redraw reads a few logits instead of masking 49k (bench/results/structured.md).
FEW_WORDS = 2
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
OVERLAP_MASKS = True  # compute masks beside the forward pass (`prefetch_masks`); the benchmark toggles it
_SHARED: dict = {}  # made once: the worker thread, the byte-bias table, word masks
_SHARED_LOCK = threading.Lock()


def _shared(key: str, make):
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make()
        return _SHARED[key]


def _byte_biases() -> np.ndarray:
    """(256, 8) float32: row b holds the additive logit bias of the 8 tokens a mask byte b covers (bit j of
    the byte, little-endian, allows token 8 * index + j): 0.0 where allowed, -inf where not."""
    table = _SHARED.get("byte_biases")
    if table is None:
        bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool)
        table = _shared("byte_biases", lambda: np.where(bits, 0.0, -np.inf).astype(np.float32))
    return table


def _fill_masks(states: list, bitmask: np.ndarray) -> tuple[np.ndarray, list[str | None], list[tuple[int, ...] | None]]:
    """Every row's final next-token mask into row k of `bitmask` (int32, C-contiguous), row by row:
    llguidance's `fill_next_token_bitmask` call (it drops the GIL), then the row's fix-ups on the packed
    words (ids past the model's vocabulary and stop ids cleared; stop ids set where the grammar may end)
    and the dead-end test. Returns the mask; per row, None or why the row cannot go on (its matcher
    failed, or nothing is allowed); and per row, the allowed ids when they fit in FEW_WORDS words of the
    mask (else None): the engine redraws a refused token among those without touching the whole
    vocabulary (`StepMasks.few`). Done here, in the worker thread beside the forward pass, the fix-ups
    also read the words while they are in this core's cache (measured on the main thread after the
    hand-over: ~10-15 us a row of cross-core cache misses, the largest part of its constrained work).
    Not llguidance's batch `LLExecutor` (`fill_next_token_bitmask_par`): measured in the engine on the
    shared 2-core machine, handing a step's masks to it cost 2.3 ms median per step at batch 1 (waking its
    thread pool) against 0.1 ms this way, and no less at batch 8 (bench/results/structured.md, session 11)."""
    size = bitmask.shape[1] * 4
    bits32 = bitmask.view(np.uint32)  # bit j of word w is token 32 w + j
    problems: list[str | None] = []
    few: list[tuple[int, ...] | None] = []
    for k, state in enumerate(states):
        state.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data + k * size, size)
        few.append(None)
        if state.matcher.is_error():
            problems.append(f"constraint {state.constraint.describe()} failed computing the next-token mask: "
                            f"{_one_line(state.matcher.get_error())}")
            continue
        row = bits32[k]
        row &= state.keep_words
        if state.matcher.is_accepting():
            row |= state.stop_words
        words = np.flatnonzero(row)
        problems.append(None if len(words) else
                        f"constraint {state.constraint.describe()} admits no token this row can produce")
        if 0 < len(words) <= FEW_WORDS:
            few[k] = tuple(32 * w + j for w in words.tolist() for j in range(32) if row.item(w) >> j & 1)
    return bitmask, problems, few


class _MaskJob:
    """The next masks of several rows, computed together in the worker thread into one buffer; given the
    batch's `rows`, the worker also builds the step's `StepMasks` of them (`StepMasks.of` picks it up)."""

    def __init__(self, states: list, rows: list | None = None):
        self.states, self.rows = states, rows
        self.buffer = np.empty((len(states), states[0].words), dtype=np.int32)
        self.done = None  # the result once computed: read without the future's lock (`result`)
        self.masks = None  # the StepMasks of `rows`, when given
        pool = _shared("pool", lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptlab-mask"))
        self.future = pool.submit(self._run, states)

    def _run(self, states: list):
        done = _fill_masks(states, self.buffer)
        if self.rows is not None:
            self.masks = StepMasks(self.rows, done)
        self.done = done
        return done

    def claim(self) -> bool:
        """Take this job's results for its states if every one is still attached to it (none consumed a
        token or took its mask since): detach them and wait for the job. False leaves them as they are."""
        if not all(state._job is self for state in self.states):
            return False
        for state in self.states:
            state._job = None
        self.result()
        return True

    def result(self):
        """(bitmask, problems, few), waiting if need be. The usual case, a job finished during the forward
        pass, reads `done` (an attribute set by the worker) instead of `Future.result`'s condition variable:
        ~14 us right after a forward pass (cold), measured."""
        return self.done if self.done is not None else self.future.result()


def prefetch_masks(states: list, rows: list | None = None) -> _MaskJob | None:
    """Start computing these rows' next masks in the worker thread. The engine calls this right before the
    model's forward pass, which the masks do not depend on, so the two overlap (llguidance computes
    without the GIL); `StepMasks` then only waits for what is not done yet. `rows`: the
    batch's rows (a list the caller no longer changes), whose constraints are `states` in order: the
    worker then builds the step's `StepMasks` too, since Python bookkeeping on the main thread right after
    a forward pass runs cold (~2 us a line, measured) and in the worker it is off the critical path."""
    waiting = [s for s in states if s._job is None and not s.matcher.is_stopped()]
    if OVERLAP_MASKS and waiting:
        job = _MaskJob(waiting, rows if len(waiting) == len(states) else None)
        for k, state in enumerate(waiting):
            state._job, state._row = job, k
        return job
    return None


# ---- per-row state and masking -------------------------------------------------------------------------
class ConstraintState:
    """One row's matcher: the mask of allowed tokens before each step, and the tokens it sampled."""

    def __init__(self, constraint: Constraint, tokenizer, stop_ids=frozenset(), n_real_tokens: int | None = None,
                 width: int | None = None, cache: GrammarCache = GRAMMARS):
        """`stop_ids`: the row's stop tokens (allowed where the grammar may end); `n_real_tokens`: ids the
        model really has (others never allowed); `width`: the logits' width (default: the tokenizer's)."""
        self.constraint = constraint
        self.matcher = cache.matcher(tokenizer, constraint)
        self.vocab_size = tokenizer.vocab_size
        self.words = (self.vocab_size + 1 + 31) // 32  # 32-bit words of the bitmask (+ 1: the end pseudo id)
        limit = min(self.vocab_size, self.vocab_size if n_real_tokens is None else n_real_tokens)
        self.keep_words, self.stop_words = _word_masks(self.words, limit, stop_ids, width or self.vocab_size)
        self._job: _MaskJob | None = None  # the next mask, being computed (`prefetch_masks`), at row `_row`
        self._row = 0

    def check(self, when: str) -> None:
        if self.matcher.is_error():
            raise GptlabError(f"constraint {self.constraint.describe()} failed {when}: "
                              f"{_one_line(self.matcher.get_error())}")

    def prefetch(self) -> None:
        prefetch_masks([self])

    def take_prefetched(self, out: np.ndarray) -> tuple[bool, str | None, tuple[int, ...] | None]:
        """Copy the prefetched mask (waiting for it) into `out`: (False, None, None) when none was
        prefetched, else (True, the row's problem or None, its few allowed ids or None)."""
        if self._job is None:
            return False, None, None
        job, self._job = self._job, None
        bitmask, problems, few = job.result()
        out[:] = bitmask[self._row]
        return True, problems[self._row], few[self._row]

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def consume(self, token: int) -> bool:
        """Feed a sampled (non-stop) token; True when the grammar is complete (admits nothing more)."""
        if self._job is not None:  # a mask still computing must not race the matcher's update
            self._job.future.exception()
            self._job = None
        if not self.matcher.consume_token(token):
            self.check(f"on token {token}")
        return self.matcher.is_stopped()


def _word_masks(words: int, limit: int, stop_ids, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, stops) as uint32 words, made once per (words, limit, stop ids, width): `keep` clears the ids
    from `limit` on (the end pseudo id, padding ids, ids the model lacks) and the stop ids; `stops` has the
    stop ids, OR-ed in where the grammar may end."""
    key = ("words", words, limit, frozenset(stop_ids), width)
    masks = _SHARED.get(key)
    if masks is None:
        bits = np.zeros(32 * words, dtype=bool)
        bits[:limit] = True
        stops = np.zeros(32 * words, dtype=bool)
        stops[[t for t in stop_ids if t < min(width, 32 * words)]] = True
        bits[stops] = False
        pack = lambda b: np.packbits(b, bitorder="little").view(np.uint32)  # noqa: E731 (host order: little-endian)
        masks = _SHARED[key] = (pack(bits), pack(stops))
    return masks


class StepMasks:
    """One decode step's masks of a batch's constrained rows (`rows` are all the batch's rows; a row's
    `constraint` is its ConstraintState or None): the final bitmasks the worker thread prefetched (or
    computes the missing ones now) and the rows whose constraint failed or admits no token they can
    produce (`failed`: {batch position: error}; the caller ends those rows with the error while the rest
    of the batch goes on). Then `allows` tests one token against a row's mask (a bit test) and `apply`
    sets the disallowed logits of some rows to -inf (the engine's accept-first sampling, module docstring,
    needs `apply` only on the steps where the sampled token was not allowed)."""

    def __init__(self, rows: list, computed: tuple | None = None):
        """`computed`: the constrained rows' (bitmask, problems, few) from `_fill_masks`; by default taken
        from the prefetched jobs, and the rows not prefetched computed now."""
        self.positions = [i for i, row in enumerate(rows) if row.constraint is not None]
        bitmask, problems, few = computed or self._collect([rows[i].constraint for i in self.positions])
        self.bitmask = bitmask
        self.row_of = dict(zip(self.positions, range(len(self.positions))))  # batch position -> row of `bitmask`
        self.failed = {i: f"{problem} after {rows[i].stream.text[-40:]!r}" + (
                           "" if "failed" in problem else
                           " (it may need a stop token or an id past the model's vocabulary)")
                       for i, problem in zip(self.positions, problems) if problem is not None} if any(problems) else {}
        # rows to mask or check
        self.live = [i for i in self.positions if i not in self.failed] if self.failed else self.positions
        self.few = dict(zip(self.positions, few))  # batch position -> its allowed ids, ascending, or None (FEW_WORDS)
        # rows masked before sampling: those whose sampling cannot go accept-first (SamplingParams.accept_first)
        self.before_sampling = [i for i in self.live if not rows[i].params.accept_first]

    @classmethod
    def of(cls, rows: list, job: _MaskJob | None) -> StepMasks:
        """This step's masks: the ones the worker built (`job`, what `prefetch_masks` returned) for exactly
        these rows (the usual step: a list of the same Row objects, each constraint still attached to
        that job), else made now."""
        return job.masks if job is not None and job.rows == rows and job.claim() else cls(rows)

    @staticmethod
    def _collect(states: list) -> tuple:
        job = states[0]._job
        # the usual step: this batch's rows, prefetched together (list equality compares identities here:
        # ConstraintState has no __eq__)
        if job is not None and job.states == states and job.claim():
            return job.result()
        bitmask = np.empty((len(states), states[0].words), dtype=np.int32)
        problems, few = [None] * len(states), [None] * len(states)
        late = []
        for k, state in enumerate(states):
            taken, problems[k], few[k] = state.take_prefetched(bitmask[k])
            if not taken:
                late.append(k)
        if late:  # rows with no mask prefetched (overlap off, or a row just joined): computed now, in one call
            fresh, late_problems, late_few = _fill_masks([states[k] for k in late],
                                                         np.empty((len(late), states[0].words), dtype=np.int32))
            bitmask[late] = fresh
            for k, problem, ids in zip(late, late_problems, late_few):
                problems[k], few[k] = problem, ids
        return bitmask, problems, few

    def allows(self, position: int, token: int) -> bool:
        """Does the mask of the row at batch `position` allow `token`?"""
        word = token >> 5  # `item`, not a numpy view and index: 3 vs ~30 us right after a forward pass (cold)
        return word < self.bitmask.shape[1] and (self.bitmask.item(self.row_of[position], word) >> (token & 31)) & 1 == 1

    def forced(self, position: int) -> int | None:
        """The one token the row's mask allows, if it allows one: a refused draw's redraw (the masked
        distribution is that token, whatever the sampling), without touching the logits."""
        ids = self.few[position]
        return ids[0] if ids is not None and len(ids) == 1 else None

    def redraw_greedy(self, logits: torch.Tensor, position: int) -> int:
        """The argmax of a row's masked logits: among its few allowed ids where it has them (ascending, so
        a tie goes to the lowest id, as the argmax of the masked row), else over the whole row masked in
        place (49k logits: ~4x the cost, measured)."""
        ids = self.few[position]
        if ids is None:
            self.apply(logits, [position])
            return int(logits[position].argmax())
        return ids[0] if len(ids) == 1 else ids[int(logits[position, list(ids)].argmax())]

    def apply(self, logits: torch.Tensor, positions: list[int]) -> None:
        """Set to -inf, in place, every logit that the masks of the rows at these batch positions (live
        rows) do not allow.

        Cost (measured, bench/results/structured.md): each mask byte is looked up in a 256 x 8 table of
        biases and the biases are added into the logits in place. llguidance.torch's
        apply_token_bitmask_inplace is not used: it is a torch.compile kernel (a minute of C++ build on
        first use on CPU, and again for each new batch size)."""
        if not positions:
            return
        width = logits.shape[-1]
        rows = [self.row_of[i] for i in positions]
        packed = self.bitmask if len(rows) == len(self.bitmask) else self.bitmask[rows]
        # little-endian hosts (x86, ARM): bit j of a 32-bit word is bit j % 8 of its byte j // 8, so byte b of
        # the mask covers tokens 8b..8b+7, and a 256 x 8 table turns each byte into the 8 additive biases (0
        # or -inf) of its tokens in one gather. Adding the bias is exact: x + 0.0 is x and x + -inf is -inf.
        # Measured on SmolLM2's 49k vocabulary (1 thread, quiet): 15 us a row, against 51 us for unpacking
        # to bools and torch.where, and 93 us for masked_fill.
        bias = np.take(_byte_biases(), packed.view(np.uint8), axis=0).reshape(len(rows), -1)
        if bias.shape[1] >= width:
            bias = bias[:, :width]
        else:  # a model with more ids than the tokenizer: those are never allowed
            bias = np.pad(bias, ((0, 0), (0, width - bias.shape[1])), constant_values=-np.inf)
        import torch  # here, not at the top: the HTTP LLM client builds Constraints without torch

        # the slice to `width` is a strided view: torch reads it as it is (no copy on CPU)
        bias_t = torch.from_numpy(bias).to(device=logits.device, dtype=logits.dtype)
        if len(positions) == logits.shape[0]:
            logits.add_(bias_t)
        else:
            logits.index_add_(0, torch.tensor(positions, device=logits.device), bias_t)
