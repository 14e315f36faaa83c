"""Automatic prefix caching: keys/values of prompt prefixes seen before (and of finished replies: the
engine stores a finished row's prompt + generated tokens), reused by later prefills.

Applications send the same long prefix again and again (a system prompt, few-shot examples, a tool list, a
RAG preamble; self-consistency asks k samples of one prompt). vLLM's automatic prefix caching and SGLang's
RadixAttention keep the KV of such prefixes and skip recomputing them; this is the same idea laid out for
gptlab's KV cache, where each batch owns one dense (layers, rows, heads, slots, head_dim) tensor.

Design decisions
- Block-wise: a prompt's KV is stored in blocks of `block_tokens` tokens (16, vLLM's default). A block is
  identified by (id of the block before it, its token ids), so a lookup walks a prompt's blocks from the
  start and stops at the first one not stored: a block is only ever reused after exactly the same tokens,
  at exactly the same positions (rotary positions start at 0 at a row's first token, whatever its padding).
  The keys are compared exactly (dict keys), not by hash alone: a hash collision cannot hand out a wrong block.
- Immutable blocks, copy on read: a block's tensors are written once, when it is stored (cloned out of the
  batch cache that computed it), and only read afterwards: a prefill copies them into its own batch cache.
  Concurrent requests sharing a prefix therefore never write a shared block, and evicting a block never
  touches a running request. The copy costs memory bandwidth, not compute; the dense per-batch layout needs
  it anyway (paged attention over shared pages would avoid it, at the cost of a different attention kernel).
- Memory budget with LRU eviction: the stored blocks' bytes stay under `max_bytes`; storing past it evicts
  least recently used blocks (never fails: a prompt whose blocks do not fit is simply not kept whole). Every
  lookup and store refreshes its chain from the last block to the first, so a block is always more recently
  used than the blocks after it and eviction takes leaves first (a chain is never cut in the middle while
  its tail stays).
- Stale weights: the stored KV belongs to one set of weights; `check_weights` empties the cache when the
  engine's weights fingerprint changed (RL trains between generate calls).
- Thread-safe (one lock around each lookup and store): a server's decode thread and a caller of
  `Engine.generate` in another thread may share an engine.
- At least one prompt token is always computed: the prefill needs the logits after the last prompt token,
  so a lookup stops one token short of a prompt's end.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made (tokens are prompt tokens)."""

    prompt_tokens: int = 0  # prompt tokens of every prefilled row
    computed_tokens: int = 0  # prompt tokens run through the model (the rest came from the cache, or from
    #                           an identical prompt of the same prefill)
    stored_blocks: int = 0
    evicted_blocks: int = 0
    cleared: int = 0  # times the weights changed and the cache was emptied


@dataclass
class _Block:
    id: int
    k: torch.Tensor  # (n_layer, n_kv_head, block_tokens, head_dim)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


ROOT = -1  # the "block before" the first block of every prompt


class PrefixCache:
    def __init__(self, max_bytes: int, block_tokens: int = 16):
        if block_tokens < 1 or max_bytes < 0:
            raise ValueError("block_tokens must be >= 1 and max_bytes >= 0")
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._ids = itertools.count()
        self._weights_key = None
        self._lock = threading.Lock()
        self.bytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def contains(self, ids: Sequence[int]) -> bool:
        """Whether every full block of `ids` is stored (no LRU refresh)."""
        n = len(ids) // self.block_tokens
        with self._lock:
            return sum(1 for _ in self._chain_keys(ids, n)) == n

    def check_weights(self, key) -> None:
        """Empty the cache if the weights changed since the blocks were computed."""
        with self._lock:
            if key != self._weights_key:
                if self._blocks:
                    self.stats.cleared += 1
                self._blocks.clear()
                self.bytes = 0
                self._weights_key = key

    def _chain_keys(self, ids: Sequence[int], n_blocks: int):
        """Keys of the first blocks of `ids`, as long as they are stored (yields (key, block))."""
        parent, B = ROOT, self.block_tokens
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * B:(i + 1) * B]))
            block = self._blocks.get(key)
            if block is None:
                return
            yield key, block
            parent = block.id

    def match(self, ids: Sequence[int]) -> list[_Block]:
        """The stored blocks of the longest cached prefix of `ids` (leaving at least its last token)."""
        with self._lock:
            found = list(self._chain_keys(ids, (len(ids) - 1) // self.block_tokens))
            self._touch([key for key, _ in found])
        return [block for _, block in found]

    def store(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the full blocks of a computed prompt: k, v (n_layer, n_kv_head, len(ids), head_dim) are its
        keys/values, slot i holding token i. Blocks already stored are kept as they are."""
        with self._lock:
            self._store(ids, k, v)

    def _store(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        B = self.block_tokens
        parent, chain = ROOT, []
        for i in range(len(ids) // B):
            key = (parent, tuple(ids[i * B:(i + 1) * B]))
            block = self._blocks.get(key)
            if block is None:
                if self.max_bytes == 0:
                    break
                # clones: a view would keep the whole batch cache it came from alive
                block = _Block(next(self._ids), k[:, :, i * B:(i + 1) * B].clone(), v[:, :, i * B:(i + 1) * B].clone())
                self._blocks[key] = block
                self.bytes += block.nbytes
                self.stats.stored_blocks += 1
            chain.append(key)
            parent = block.id
        self._touch(chain)
        while self.bytes > self.max_bytes:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.stats.evicted_blocks += 1

    def _touch(self, chain: list) -> None:
        """Mark a chain used, its first block last: blocks before are then always fresher than blocks after."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)
