"""Decode batch state: the rows decoded together, their KV cache and sampling state, and each row's text.

Design decisions
- The unit of work is a `DecodeBatch`: rows decoded together, with their KV cache, key mask, next rotary
  position per row, last logits and per-row sampling state. `Engine.prefill` builds one, `Engine.step`
  advances every row by one token and drops the rows that finished. `generate`, `stream` and
  `stream_batch` are just `prefill` + a `while batch.rows: step(batch)` loop. A continuous-batching server
  uses the same two calls: between steps it removes finished/cancelled rows (`DecodeBatch.keep`) and adds
  new requests by prefilling them into their own batch and joining it (`DecodeBatch.join`), which
  right-aligns both caches (more left padding for the shorter one) so every row keeps its own positions.
- Stops: a stop token (default `<|endoftext|>` and `<|assistant_end|>`) ends a row and is not part of the
  output; a stop string is matched on decoded text and the text is cut before it. `token_ids` are the
  tokens the model produced (no stop token; a stop string's tokens stay, since a token can straddle it).
- Streaming yields text deltas. Bytes are decoded with an incremental UTF-8 decoder, so a character split
  across tokens is held back until complete, and text that might be the start of a stop string is held
  back until it is known not to be one (`TextStream`). The concatenated deltas are exactly
  `Completion.text`.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..model import KVCache
from .constraints import ConstraintState
from .sampling import SamplingParams, SamplingTensors


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token, stop string, or the constraint complete) or "length" (max_new_tokens
    #                     or context window; a constrained row's text is then unfinished), or "error" (the
    #                     row's constraint failed: `error` says why)
    prompt_tokens: int  # prompt length actually used, after any left truncation
    stop: str | int | None = None  # the stop string or stop token id that ended it (None: the constraint did)
    error: str | None = None  # with finish_reason "error"


@dataclass
class StreamEvent:
    row: int  # index of the prompt in the call (stable while other rows come and go)
    text: str  # new text; "" while a partial character or a possible stop string is held back
    token_id: int  # the token sampled this step (a stop token is reported here but not in the output)
    finish_reason: str | None  # set on the row's last event
    error: str | None = None  # with finish_reason "error": the row's constraint failed (constraints.py)


class TextStream:
    """Token bytes in, text deltas out, with stop strings cut off (see the module docstring)."""

    def __init__(self, stop: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(stop)
        self._longest = max(map(len, self.stop), default=0)
        self.text = ""
        self.matched: str | None = None
        self._emitted = 0

    def push(self, data: bytes, final: bool = False) -> bool:
        """Append bytes; True when a stop string appeared (the text is then cut before it)."""
        # a new match must end in the new text, so it starts at most len(stop) - 1 characters back
        start = max(0, len(self.text) - self._longest + 1)
        self.text += self._decoder.decode(data, final)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, self.matched = min(hits)
            self.text = self.text[:i]
            return True
        return False

    def take(self, final: bool = False) -> str:
        """The text not yet handed out, minus (unless final) a tail that could begin a stop string."""
        end = len(self.text)
        if not final:
            for n in range(min(self._longest - 1, end), 0, -1):
                if any(s.startswith(self.text[end - n:]) for s in self.stop):
                    end -= n
                    break
        delta = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta


# ---- batch state --------------------------------------------------------------------------------------
@dataclass
class Row:
    index: int
    params: SamplingParams
    prompt_len: int
    stop_ids: frozenset[int]
    max_new: int  # max_new_tokens, capped by the context window
    stream: TextStream
    generator: torch.Generator | None
    constraint: ConstraintState | None = None  # the row's grammar matcher (constraints.py)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop: str | int | None = None
    error: str | None = None

    def completion(self) -> Completion:
        return Completion(self.stream.text, list(self.token_ids), self.finish_reason or "length",
                          self.prompt_len, self.stop, self.error)


@dataclass
class DecodeBatch:
    """Rows decoded together. Row r's keys/values live in cache row r; `key_mask[r, s]` says whether cache
    slot s of row r holds a real token (None: no row has padding); `next_pos[r]` is the rotary position
    of row r's next token; `logits[r]` the distribution of that token."""

    rows: list[Row]
    cache: KVCache
    key_mask: torch.Tensor | None
    next_pos: torch.Tensor
    logits: torch.Tensor
    seen: torch.Tensor | None  # (B, V) tokens in prompt/output, for the repetition penalty
    sampling: SamplingTensors

    @torch.inference_mode()
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given rows (by current position), e.g. to drop finished or cancelled requests."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.next_pos.device)
        self.rows = [self.rows[i] for i in rows]
        self.cache.reorder(index)
        self.key_mask = self.key_mask[index] if self.key_mask is not None else None
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]
        self.seen = self.seen[index] if self.seen is not None else None
        self.sampling = SamplingTensors.from_params([r.params for r in self.rows], self.next_pos.device)
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop leading cache slots that are padding in every remaining row. A continuous-batching server
        may never let its batch empty; without this the shared cache length would grow by one slot per
        step forever (memory and attention cost with it), long after the rows that filled it have left."""
        if self.key_mask is None or not self.rows:
            return
        used = self.key_mask[:, :self.cache.length].any(dim=0)
        first = int(used.int().argmax()) if bool(used.any()) else self.cache.length
        if first:
            # copies, not views: the dropped slots' memory is freed, and a compiled decode step sees the
            # same (contiguous) layout as before instead of compiling again for a strided one
            fresh = torch.contiguous_format  # `.contiguous()` would keep the old strides of size-1 dims
            self.cache.k = self.cache.k[..., first:, :].clone(memory_format=fresh)
            self.cache.v = self.cache.v[..., first:, :].clone(memory_format=fresh)
            self.cache.length -= first
            self.key_mask = self.key_mask[:, first:].clone(memory_format=fresh)

    @torch.inference_mode()
    def join(self, other: DecodeBatch) -> None:
        """Append the rows of `other` (e.g. newly prefilled requests) to this batch. The caches are
        right-aligned: the one with fewer filled slots gets extra left padding, masked out."""
        a, b = self.cache, other.cache
        length = max(a.length, b.length)
        capacity = length + max(a.capacity - a.length, b.capacity - b.length)
        n_a = a.k.shape[1]
        shape = (a.k.shape[0], n_a + b.k.shape[1], a.k.shape[2], capacity, a.k.shape[4])
        # one allocation, and only the filled slots of each cache are copied (not their empty capacity)
        k, v = a.k.new_zeros(shape), a.v.new_zeros(shape)
        mask = torch.ones(shape[1], capacity, dtype=torch.bool, device=k.device)  # slots to come: attended
        for rows, cache, old_mask in ((slice(0, n_a), a, self.key_mask), (slice(n_a, None), b, other.key_mask)):
            shift = length - cache.length
            k[:, rows, :, shift:length] = cache.k[:, :, :, :cache.length]
            v[:, rows, :, shift:length] = cache.v[:, :, :, :cache.length]
            mask[rows, :shift] = False
            if old_mask is not None:
                mask[rows, shift:length] = old_mask[:, :cache.length]
        a.k, a.v, a.length = k, v, length
        self.key_mask = mask
        if self.seen is not None or other.seen is not None:
            def seen_of(batch):
                if batch.seen is not None:
                    return batch.seen
                return torch.zeros_like(batch.logits, dtype=torch.bool)
            # before the logits are joined: a batch without seen tokens gets one zero row per own row
            self.seen = torch.cat([seen_of(self), seen_of(other)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        self.sampling = SamplingTensors.from_params([r.params for r in self.rows], self.next_pos.device)

