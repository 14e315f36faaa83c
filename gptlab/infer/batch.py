"""Decode batch state: the rows decoded together, their KV cache and sampling state, and each row's text.

Design decisions
- The unit of work is a `DecodeBatch`: rows decoded together, with their KV cache, key mask, next rotary
  position per row, last logits and per-row sampling state. `Engine.prefill` builds one, `Engine.step`
  advances every row by one token and drops the rows that finished. `generate`, `stream` and
  `stream_batch` are just `prefill` + a `while batch.rows: step(batch)` loop. A continuous-batching server
  uses the same two calls: between steps it removes finished/cancelled rows (`DecodeBatch.keep`) and adds
  new requests by prefilling them into their own batch and joining it (`DecodeBatch.join`), which
  right-aligns both caches (more left padding for the shorter one) so every row keeps its own positions.
- Spare room for joins (`_Storage`): copying the whole batch's keys/values at every admission, every
  departure and every trim of leading padding made a serving step pay for several copies of a cache that
  is mostly unchanged (`bench/bench_batch_churn.py`, 48 rows: join + keep took 74% of a SmolLM2 step, 85%
  of the speedrun model's). The first `join` moves the cache into storage with rows and slots to spare,
  and the batch's cache and key mask become views of it: a later join writes only the newcomers' rows (a
  longer newcomer reuses slots that trimming freed on the left), `keep` fills the holes left by departed
  rows with rows from the end (row order changes: `keep` returns it) and trimming moves the view's start.
  Storage is reallocated (one copy of the filled part) only when a join does not fit. Batches that never
  join (`generate`, `stream_batch`) keep plain contiguous caches, the layout a compiled decode step was
  traced with.
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
    prompt_ids: tuple[int, ...] = ()  # the prompt as prefilled (the prefix cache stores a finished row's blocks)

    def completion(self) -> Completion:
        return Completion(self.stream.text, list(self.token_ids), self.finish_reason or "length",
                          self.prompt_len, self.stop, self.error)


@dataclass
class _Storage:
    """Keys/values (n_layer, rows, n_kv_head, slots, head_dim) and key mask (rows, slots) with room to spare;
    the batch's cache and key mask are views of rows [0, n) and slots [start, slots)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    start: int = 0


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
    _storage: _Storage | None = field(default=None, repr=False)  # set by the first `join` (module docstring)
    mask_job: object = None  # the next step's grammar masks being computed (constraints.prefetch_masks)

    @torch.inference_mode()
    def keep(self, rows: Sequence[int]) -> list[int]:
        """Keep only the given rows (by current position), e.g. to drop finished or cancelled requests.
        Returns the kept rows' former positions in their new order: `rows` itself, except for a batch
        that has joined others, where rows from the end move into the holes (no copy of the others)."""
        order = list(rows) if self._storage is None else self._fill_holes(rows)
        index = torch.tensor(order, dtype=torch.long, device=self.next_pos.device)
        self.rows = [self.rows[i] for i in order]
        if self._storage is None:
            self.cache.reorder(index)
            self.key_mask = self.key_mask[index] if self.key_mask is not None else None
        else:
            self._set_views()
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]
        self.seen = self.seen[index] if self.seen is not None else None
        self.sampling = SamplingTensors.from_params([r.params for r in self.rows], self.next_pos.device)
        self._trim_padding()
        return order

    def held(self, i: int) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
        """The tokens whose keys/values row i holds and those keys and values (n_layer, n_kv_head, n,
        head_dim): the last filled slots of its cache row, its prompt then the generated tokens that went
        through the model (not the last one sampled); the key mask counts them."""
        row, end = self.rows[i], self.cache.length
        n = end if self.key_mask is None else int(self.key_mask[i, :end].sum())
        ids = row.prompt_ids + tuple(row.token_ids[:n - row.prompt_len])
        if len(ids) != n:  # a Row made without its prompt ids (the field's default): nothing to store
            return (), self.cache.k[:, i, :, :0], self.cache.v[:, i, :, :0]
        return ids, self.cache.k[:, i, :, end - n:end], self.cache.v[:, i, :, end - n:end]

    def _fill_holes(self, rows: Sequence[int]) -> list[int]:
        """Move the kept rows that lie beyond the new row count into the places of departed rows."""
        kept, n = set(rows), len(rows)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in sorted(kept) if i >= n]  # as many as there are holes
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            s, device = self._storage, self.next_pos.device
            dst, src = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            filled = slice(s.start, s.start + self.cache.length)
            s.k[:, dst, :, filled] = s.k[:, src, :, filled]
            s.v[:, dst, :, filled] = s.v[:, src, :, filled]
            s.mask[dst, s.start:] = s.mask[src, s.start:]
        return order

    def _set_views(self) -> None:
        """Point the cache and key mask at the storage's first len(rows) rows, from its start slot on."""
        s, n = self._storage, len(self.rows)
        self.cache.k, self.cache.v = s.k[:, :n, :, s.start:], s.v[:, :n, :, s.start:]
        self.key_mask = s.mask[:n, s.start:]

    def _trim_padding(self) -> None:
        """Drop leading cache slots that are padding in every remaining row. A continuous-batching server
        may never let its batch empty; without this the shared cache length would grow by one slot per
        step forever (memory and attention cost with it), long after the rows that filled it have left."""
        if self.key_mask is None or not self.rows:
            return
        used = self.key_mask[:, :self.cache.length].any(dim=0)
        first = int(used.int().argmax()) if bool(used.any()) else self.cache.length
        if first and self._storage is not None:  # the slots stay in storage, as room for a longer newcomer
            self._storage.start += first
            self.cache.length -= first
            self._set_views()
        elif first:
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
        right-aligned: the one with fewer filled slots gets extra left padding, masked out. Only the new
        rows are copied while they fit in the storage's spare room (module docstring)."""
        a, b, s = self.cache, other.cache, self._storage
        n_a, n_b = len(self.rows), len(other.rows)
        shift = max(0, b.length - a.length)  # slots the running rows gain on the left
        right = max(a.capacity - a.length, b.capacity - b.length)  # slots the rows may still need
        if s is None or n_a + n_b > s.k.shape[1] or shift > s.start or right > a.capacity - a.length:
            self._move_to_new_storage(n_a + n_b, a.length + shift, right)
        elif shift:  # reuse slots trimmed earlier: padding for the running rows
            s.start -= shift
            s.mask[:n_a, s.start:s.start + shift] = False
            a.length += shift
        s, length = self._storage, a.length
        pad = s.start + length - b.length  # storage slot of the newcomers' first filled slot
        new = slice(n_a, n_a + n_b)
        s.k[:, new, :, pad:pad + b.length] = b.k[:, :, :, :b.length]
        s.v[:, new, :, pad:pad + b.length] = b.v[:, :, :, :b.length]
        s.mask[new, s.start:pad] = False
        s.mask[new, pad:pad + b.length] = other.key_mask[:, :b.length] if other.key_mask is not None else True
        s.mask[new, pad + b.length:] = True  # slots to come: attended once written
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
        self._set_views()

    def _move_to_new_storage(self, rows: int, length: int, right: int) -> None:
        """Copy the running rows' filled slots into new storage for `rows` rows (plus a quarter to spare)
        whose filled part is `length` slots (the running rows right-aligned in it) followed by `right`
        slots (plus a quarter of the length to spare, so the next joins fit)."""
        a, n_a = self.cache, len(self.rows)
        shape = (a.k.shape[0], rows + max(4, rows // 4), a.k.shape[2], length + right + max(32, length // 4),
                 a.k.shape[4])
        # zeros, not empty: a padding slot is masked, but a NaN bit pattern there would still poison SDPA
        s = _Storage(a.k.new_zeros(shape), a.v.new_zeros(shape),
                     torch.ones(shape[1], shape[3], dtype=torch.bool, device=a.k.device))
        pad = length - a.length
        s.k[:, :n_a, :, pad:length] = a.k[:, :, :, :a.length]
        s.v[:, :n_a, :, pad:length] = a.v[:, :, :, :a.length]
        s.mask[:n_a, :pad] = False
        if self.key_mask is not None:
            s.mask[:n_a, pad:length] = self.key_mask[:, :a.length]
        self._storage, a.length = s, length

