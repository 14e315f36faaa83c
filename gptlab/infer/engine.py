"""Inference engine: prefill + KV-cache decode, sampling, beam search, streaming, scoring of continuations.

Every later stage (chat, SFT/RL rollouts, serving, evaluation) samples through this module. It sees only a
`GPT` and a `Tokenizer`, so our models and imported HF/GGUF ones behave identically.

The pieces live beside it: `sampling` (SamplingParams, logit processing, the per-row sampler), `batch`
(DecodeBatch, the rows' state and streamed text, Completion, StreamEvent), `fused` (FusedDecoder, the
decode step). Each states its own design decisions; those of the engine itself:

Design decisions
- `Engine.prefill` turns prompts into a `DecodeBatch` and `Engine.step` advances it by one token per row
  (batch.py); every user-facing loop (generate, stream, stream_batch) and a continuous-batching server
  are built from those two calls.
- Prompts of different lengths are left-padded. Padding keys are hidden with the key mask, and each row
  carries its own rotary positions (0 at its first real token), so a row's logits do not depend on its
  neighbours: batched output equals generating each prompt alone (tested with greedy decoding).
- Context window policy (W = model max_seq_len): generation needs `room = min(max_new_tokens, W // 2)`
  free positions after the prompt; scoring needs room for the continuation. A prompt that does not leave
  that room is cut from the left to `W - room` tokens with a warning (the end of a prompt matters most for
  what comes next), or rejected with `GptlabError` when the engine is `strict_context=True`. Generation
  also ends (finish_reason "length") when prompt + output fill the window.
- Beam search (num_beams > 1) runs prompt by prompt with num_beams cache rows; `KVCache.reorder` moves
  the surviving hypotheses' keys/values between steps. Hypotheses are ranked by
  sum logprob / length ** length_penalty (Wu et al. 2016 use a smoothed variant; HF uses this form).
- All model calls run under `torch.inference_mode()` (no autograd bookkeeping); the cache and key mask are
  allocated once per batch at full size, and the prefill computes the head for the last position only.
- Prefill and scoring run `GPT.forward`; decode steps run `FusedDecoder` (fused.py) where the model
  supports it, rebuilt whenever the weights changed since the last prefill.
- Prefix caching (on by default; prefix_cache.py): a prefill computes each distinct prompt of the call
  once (n samples of one prompt cost one prompt), copies the cached keys/values of each prompt's longest
  cached prefix into its row instead of computing them, and first computes once any prefix that several
  of its prompts share; only the remaining columns run through the model. Computing a prompt's suffix
  over cached keys/values is what chunked prefill already does, so outputs are the same with the cache
  on or off (tested token for token, greedy and seeded sampling). A finished row's reply is stored too
  (`_store_finished`: its prompt + generated tokens, from its cache row), so the next turn of a chat or an
  agent, which sends the reply back, computes only what follows it. Those keys/values were computed one
  token at a time by the decode step rather than by a prefill: the same math, equal up to float rounding
  (tested: each stored block against a fresh prefill, and next-turn outputs token for token).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..common import GptlabError, get_logger
from ..model import GPT, KVCache
from ..tokenizer import Tokenizer
from .batch import Completion, DecodeBatch, Row, StreamEvent, TextStream
from .constraints import ConstraintState, StepMasks, prefetch_masks
from .fused import FusedDecoder, weights_key
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, SamplingTensors, apply_repetition_penalty, sample_tokens

log = get_logger("engine")

Prompt = str | Sequence[int]  # text (encoded with a leading BOS) or token ids used verbatim


@dataclass
class ContinuationScore:
    logprob: float  # sum of the continuation's token logprobs
    token_logprobs: list[float]
    is_greedy: bool  # every continuation token was the argmax given what precedes it


def default_batch_size(model: nn.Module | None, cpu: int) -> int:
    """Rows per `generate` call where the caller did not choose: `cpu` on a CPU, where a decode step's
    time grows with the batch; 256 on a GPU, where a step costs about the same for 1 row as for 32 (its
    time is kernel launches: 4.4 vs 5.1 ms, bench/results/gpu_h100.md), so fewer, fuller calls win."""
    on_gpu = model is not None and next(model.parameters()).device.type == "cuda"
    return 256 if on_gpu else cpu


class Engine:
    """Sampling, beam search, streaming and scoring for one model + tokenizer.

    strict_context: reject (GptlabError) prompts that do not fit the context window instead of cutting
    them from the left. add_bos: text prompts start with `<|endoftext|>` (the token that opens every
    training document); token-id prompts are always used as given. fused_decode: run decode steps with a
    `FusedDecoder` (faster at small batch; it shares the weights of a model that requires no grad and copies
    those of one being trained, fused.py; models it does not support, e.g. with LoRA layers, decode through
    `model.forward` either way). compile: torch.compile that step
    (the first single-row step and the first batched step each compile, seconds to a minute; it pays off
    for long generations with fixed weights, not when the weights change between calls, as in RL).
    prefix_cache: reuse the keys/values of prompt prefixes seen before and of identical prompts in one call
    (prefix_cache.py), keeping at most `prefix_cache_mb` MiB of them; outputs are the same either way."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, strict_context: bool = False, add_bos: bool = True,
                 fused_decode: bool = True, compile: bool = False, prefix_cache: bool = True,
                 prefix_cache_mb: float = 256):
        if compile and not fused_decode:
            raise GptlabError("compile=True compiles the fused decode step; it needs fused_decode=True")
        if prefix_cache_mb < 0:
            raise GptlabError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        self.model = model
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache else None
        self.prefill_tokens_computed = 0  # prompt tokens run through the model by prefills, ever
        # constrained row-steps sampled accept-first, ever, and those whose token the grammar refused
        self.constrained_tokens = self.constrained_resampled = 0
        self.fused_decode, self.compile = fused_decode, compile
        self._decoder: FusedDecoder | None = None
        self.tokenizer = tokenizer
        self.strict_context = strict_context
        self.window = model.config.max_seq_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.bos_id = tokenizer.eot_id if add_bos else None
        ends = [tokenizer.eot_id, tokenizer.special_tokens.get("<|assistant_end|>"),
                tokenizer.special_tokens.get(tokenizer.eos_token)]
        self.default_stop_ids = frozenset(i for i in ends if i is not None)
        # ids the model has but the tokenizer cannot decode (padded vocabularies) are never produced
        self.n_real_tokens = min(tokenizer.vocab_size, model.config.vocab_size)

    # ---- prompts ------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            return [self.bos_id, *ids] if self.bos_id is not None else ids
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < self.model.config.vocab_size for i in ids):
            raise GptlabError(f"prompt has token ids outside the vocabulary (size {self.model.config.vocab_size})")
        return ids

    def fit_context(self, ids: list[int], room: int) -> list[int]:
        """Apply the context window policy: `ids` must leave `room` positions free (module docstring)."""
        if not ids:
            raise GptlabError("empty prompt: give at least one token")
        limit = self.window - room
        if len(ids) <= limit:
            return ids
        what = f"prompt of {len(ids)} tokens + {room} tokens of room exceeds the context window ({self.window})"
        if limit < 1:
            raise GptlabError(what)
        if self.strict_context:
            raise GptlabError(what + "; shorten it or use the default left truncation")
        log.warning("%s: keeping its last %d tokens", what, limit)
        return ids[-limit:]

    def _refresh_decoder(self) -> None:
        """(Re)build the fused decoder and empty the prefix cache if the weights changed since they were
        made (checked once per prefill, so a model trained between generate calls, as in RL, never
        decodes with stale weights or reuses stale keys/values)."""
        key = weights_key(self.model)
        if self.fused_decode and (self._decoder is None or self._decoder.weights_key != key):
            self._decoder = FusedDecoder(self.model, self.compile) if FusedDecoder.supports(self.model) else None
            # building it may point an inference model's parameters into its fused layout (fused.py): the
            # key after that is the one later prefills see (before, the cache was emptied at the second one)
            key = weights_key(self.model)
        if self.prefix_cache is not None:
            self.prefix_cache.check_weights(key)

    def _decode(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits (B, vocab) of one new token per row (tokens and positions (B,))."""
        if self._decoder is not None:
            logits = self._decoder.step(tokens, cache, positions, key_mask)
        else:
            logits = self.model(tokens[:, None], kv_cache=cache, positions=positions[:, None],
                                attn_mask=key_mask, logits_to_keep=1)[:, -1]
        return self._mask_unknown(logits.float())

    def _mask_unknown(self, logits: torch.Tensor) -> torch.Tensor:
        if self.n_real_tokens < logits.shape[-1]:
            logits[..., self.n_real_tokens:] = -float("inf")
        return logits

    def _left_pad(self, seqs: list[list[int]], capacity: int):
        """(ids, positions, key mask or None) for left-padded rows; the mask spans `capacity` slots."""
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        pad = (width - lengths)[:, None]
        positions = (torch.arange(width, device=self.device)[None] - pad).clamp_min(0)
        key_mask = torch.arange(capacity, device=self.device)[None] >= pad if bool((pad > 0).any()) else None
        return ids, positions, key_mask

    # ---- the two calls a decode loop is made of -------------------------------------------------------
    def prefill(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                first_index: int = 0) -> DecodeBatch:
        """Run the prompts through the model (one row each) and return the batch ready for `step`.
        `params` may differ per row; rows are numbered first_index, first_index + 1, ... in events."""
        *_, batch = self.prefill_chunks(prompts, params, first_index)
        return batch

    @torch.inference_mode()  # on a generator function torch enters the mode around each resumption
    def prefill_chunks(self, prompts: Sequence[Prompt],
                       params: SamplingParams | Sequence[SamplingParams] | None = None, first_index: int = 0,
                       chunk_tokens: int | None = None) -> Iterator[DecodeBatch | None]:
        """`prefill` in pieces of at most `chunk_tokens` prompt tokens (all rows together, at least one
        column per piece): yields None after each piece but the last, then the batch. A server advances
        it between decode steps, so a long prompt does not stall the running rows for its whole prefill
        (chunked prefill, as in Sarathi / vLLM); the KV cache makes the result the same as in one piece.
        `prefill_tokens_computed` counts the prompt tokens the pieces run through the model."""
        prompts = _check_prompt_list(prompts)
        plist = _params_list(params, len(prompts))
        self._refresh_decoder()
        rows, seqs = [], []
        for r, (prompt, p) in enumerate(zip(prompts, plist)):
            ids = self.fit_context(self.encode(prompt), room=min(p.max_new_tokens, self.window // 2))
            generator = None
            if not p.greedy:
                generator = torch.Generator(device=self.device)
                if p.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(p.seed + r)
            stop_ids = self.default_stop_ids if p.stop_token_ids is None else frozenset(p.stop_token_ids)
            # compiled (or taken from the grammar cache) before any model work, so a bad grammar fails fast
            constraint = None if p.constraint is None else ConstraintState(
                p.constraint, self.tokenizer, stop_ids, self.n_real_tokens, self.model.config.vocab_size)
            if constraint is not None:
                constraint.prefetch()  # the first mask, computed beside the prefill
            rows.append(Row(first_index + r, p, len(ids), stop_ids, min(p.max_new_tokens, self.window - len(ids)),
                            TextStream(p.stop), generator, constraint, prompt_ids=tuple(ids)))
            seqs.append(ids)
        capacity = max(map(len, seqs)) + max(row.max_new for row in rows)
        computed_before = self.prefill_tokens_computed
        cache, logits = yield from self._prefill_rows(seqs, capacity, chunk_tokens, pieces=[0])
        if self.prefix_cache is not None:
            stats = self.prefix_cache.stats
            stats.prompt_tokens += sum(map(len, seqs))
            stats.computed_tokens += self.prefill_tokens_computed - computed_before
        _, positions, key_mask = self._left_pad(seqs, capacity)
        sampling = SamplingTensors.from_params(plist, self.device)
        seen = None
        if sampling.penalty is not None:
            seen = torch.zeros(len(seqs), logits.shape[-1], dtype=torch.bool, device=self.device)
            for r, s in enumerate(seqs):
                seen[r, s] = True
        yield DecodeBatch(rows, cache, key_mask, positions[:, -1] + 1,
                          self._mask_unknown(logits[:, -1].float()), seen, sampling)

    def _prefill_rows(self, seqs: list[list[int]], capacity: int, chunk_tokens: int | None, pieces: list[int]):
        """(KV cache with one left-padded row per seq, logits (rows, 1, vocab) after each seq's last token),
        computed in pieces (a generator; see `_forward_pieces`). With the prefix cache, identical seqs are
        computed once, cached prefixes are copied in rather than computed, and prefixes that several seqs
        share are computed once first (`_warm_shared_prefixes`); the new full blocks are stored.
        Rows run through the model in groups of similar uncomputed length (`_length_groups`): a group
        computes the columns its longest row needs, so a short (or mostly cached) prompt does not pay for a
        long one's columns."""
        pc = self.prefix_cache
        unique, source = seqs, list(range(len(seqs)))
        if pc is not None:
            first: dict[tuple[int, ...], int] = {}
            source = [first.setdefault(tuple(s), len(first)) for s in seqs]
            unique = [list(s) for s in first]  # in order of first appearance
            yield from self._warm_shared_prefixes(unique, chunk_tokens, pieces)
        matched = [pc.match(s) for s in unique] if pc is not None else [[] for _ in unique]
        todo = [len(s) - len(blocks) * (pc.block_tokens if pc else 0) for s, blocks in zip(unique, matched)]
        order = sorted(range(len(unique)), key=todo.__getitem__)  # cache row r holds unique[order[r]]
        ids, positions, key_mask = self._left_pad([unique[u] for u in order], capacity)
        width = ids.shape[1]
        cache = KVCache(self.model.config, len(unique), capacity, self.device, self.dtype)
        for r, u in enumerate(order):
            if matched[u]:
                slot, n = width - len(unique[u]), len(matched[u]) * pc.block_tokens
                cache.k[:, r, :, slot:slot + n] = torch.cat([b.k for b in matched[u]], dim=2)
                cache.v[:, r, :, slot:slot + n] = torch.cat([b.v for b in matched[u]], dim=2)
        logits = []
        for a, b in _length_groups([todo[u] for u in order]):
            # the group's rows of the cache, as a view: what the model writes lands in `cache`. The group
            # starts at the first column its longest uncomputed row needs: columns before are cached (or
            # padding) in every row of it; a row whose cached prefix ends later recomputes its last cached
            # columns, which leaves the stored blocks untouched
            part = copy.copy(cache)
            part.k, part.v, part.length = cache.k[:, a:b], cache.v[:, a:b], width - todo[order[b - 1]]
            step = width if chunk_tokens is None else max(1, chunk_tokens // (b - a))
            logits.append((yield from self._forward_pieces(
                ids[a:b], positions[a:b], key_mask[a:b] if key_mask is not None else None, part, part.length,
                step, pieces)))
        cache.length = width
        logits = torch.cat(logits)
        if pc is not None:
            for r, u in enumerate(order):
                slot = width - len(unique[u])
                pc.store(unique[u], cache.k[:, r, :, slot:width], cache.v[:, r, :, slot:width])
        row_of = {u: r for r, u in enumerate(order)}
        index = [row_of[u] for u in source]
        if index != list(range(len(unique))):  # back to the order of `seqs`, identical prompts copied
            index = torch.tensor(index, device=self.device)
            cache.reorder(index)
            logits = logits[index]
        return cache, logits

    def _warm_shared_prefixes(self, seqs: list[list[int]], chunk_tokens: int | None, pieces: list[int]):
        """Prefill (and store) once each block-aligned prefix that two or more of `seqs` share and the
        cache lacks, so a burst of requests with one system prompt computes it once, not once per row.
        Each seq contributes its longest such prefix; the warm-up prefills those the same way, so
        prefixes they share in turn are computed first (the recursion ends: they get shorter)."""
        pc = self.prefix_cache
        B = pc.block_tokens
        chains = []  # per seq: a hash per block-aligned prefix (leaving at least one token)
        for s in seqs:
            h, chain = 0, []
            for n in range(B, len(s), B):
                h = hash((h, tuple(s[n - B:n])))
                chain.append(h)
            chains.append(chain)
        shared = Counter(h for chain in chains for h in chain)
        warm: dict[tuple[int, ...], None] = {}
        for s, chain in zip(seqs, chains):
            # a hash collision could only pick a prefix that is not really shared: wasted work, not a wrong
            # result (blocks are stored and looked up by their exact tokens)
            deepest = max((i for i, h in enumerate(chain) if shared[h] > 1), default=None)
            if deepest is not None and not pc.contains(s[:(deepest + 1) * B]):
                warm[tuple(s[:(deepest + 1) * B])] = None
        if warm:
            prefixes = [list(w) for w in warm]
            yield from self._prefill_rows(prefixes, max(map(len, prefixes)), chunk_tokens, pieces)

    def _forward_pieces(self, ids, positions, key_mask, cache: KVCache, start: int, step: int, pieces: list[int]):
        """Run columns start.. of `ids` through the model, `step` columns at a time, into `cache` (filled up
        to `start`); returns the last piece's logits. Yields None before every piece but the first of the
        whole prefill (`pieces` counts them across the nested calls of one prefill)."""
        width = ids.shape[1]
        for begin in range(start, width, step):
            if pieces[0]:
                yield None
            pieces[0] += 1
            end = min(begin + step, width)
            logits = self.model(ids[:, begin:end], kv_cache=cache, positions=positions[:, begin:end],
                                attn_mask=key_mask, logits_to_keep=1)
            self.prefill_tokens_computed += ids.shape[0] * (end - begin)
        return logits

    @torch.inference_mode()
    def step(self, batch: DecodeBatch) -> list[StreamEvent]:
        """Sample one token per row, emit its text, drop rows that finished, and run the model on the
        new tokens of the rest (so `batch.logits` is ready for the next step)."""
        masks = self._mask_first(batch) if any(row.constraint is not None for row in batch.rows) else None
        tokens = sample_tokens(batch.logits, batch.sampling, [r.generator for r in batch.rows], batch.seen)
        sampled = tokens.tolist()
        failed = {}
        if masks is not None:
            failed = masks.failed
            tokens = self._resample_rejected(batch, masks, tokens, sampled)
        events, alive = [], []
        for i, (row, token) in enumerate(zip(batch.rows, sampled)):
            if i in failed:  # a dead end: this row ends with the error, the others go on
                row.finish_reason, row.error = "error", failed[i]
                text = row.stream.take(final=True)
            else:
                text = self._advance(row, token)
            events.append(StreamEvent(row.index, text, token, row.finish_reason, row.error))
            if row.finish_reason is None:
                alive.append(i)
        if len(alive) < len(batch.rows):
            if self.prefix_cache is not None:
                self._store_finished(batch, [i for i in range(len(batch.rows)) if i not in set(alive)])
            tokens = tokens[batch.keep(alive)]  # keep may reorder the rows (batch.py)
        if batch.rows:
            # the next masks, computed beside the forward pass (constraints.py)
            batch.mask_job = prefetch_masks([row.constraint for row in batch.rows if row.constraint is not None],
                                            list(batch.rows))
            if batch.seen is not None:
                batch.seen.scatter_(1, tokens[:, None], True)
            batch.logits = self._decode(tokens, batch.cache, batch.next_pos, batch.key_mask)
            batch.next_pos += 1
        return events

    def _store_finished(self, batch: DecodeBatch, finished: list[int]) -> None:
        """Keep the full blocks of finished rows' prompt + generated tokens in the prefix cache, so a next
        turn that sends the reply back (chat, an agent's next step) finds it cached, not computed again."""
        for i in finished:
            ids, k, v = batch.held(i)
            if len(ids) >= self.prefix_cache.block_tokens:
                self.prefix_cache.store(ids, k, v)

    def _mask_first(self, batch: DecodeBatch) -> StepMasks:
        """This step's grammar masks (constraints.py). Rows whose top-k or top-p must see only allowed tokens
        are masked now; the others sample accept-first (`_resample_rejected`; constraints.py says why that
        is exact)."""
        masks = StepMasks.of(batch.rows, batch.mask_job)
        masks.apply(batch.logits, masks.before_sampling)
        return masks

    def _resample_rejected(self, batch: DecodeBatch, masks: StepMasks, tokens: torch.Tensor,
                           sampled: list[int]) -> torch.Tensor:
        """Rows whose sampled token their grammar does not allow are drawn again from their masked logits
        (each with its own generator, so fresh randomness). `sampled` is `tokens` as a list, updated in place."""
        rejected = [i for i in masks.live if not masks.allows(i, sampled[i])]
        self.constrained_tokens += len(masks.live)
        self.constrained_resampled += len(rejected)
        if not rejected:
            return tokens
        rest = []
        for i in rejected:  # greedy without a penalty: an argmax, no SamplingTensors (~90 us); else a forced token
            greedy = batch.rows[i].params.greedy and batch.sampling.penalty is None
            sampled[i] = masks.redraw_greedy(batch.logits, i) if greedy else masks.forced(i)
            if sampled[i] is None:
                rest.append(i)
        if rest:
            masks.apply(batch.logits, rest)
            rows = [batch.rows[i] for i in rest]
            index = torch.tensor(rest, device=tokens.device)
            again = sample_tokens(batch.logits[index], SamplingTensors.from_params([r.params for r in rows], tokens.device),
                                  [r.generator for r in rows], None if batch.seen is None else batch.seen[index])
            for i, token in zip(rest, again.tolist()):
                sampled[i] = token
        return torch.tensor(sampled, dtype=tokens.dtype, device=tokens.device)

    def _advance(self, row: Row, token: int) -> str:
        """Record one sampled token for a row; return the text it releases."""
        stream = row.stream
        if token in row.stop_ids:
            row.finish_reason, row.stop = "stop", token
            stream.push(b"", final=True)
        else:
            row.token_ids.append(token)
            try:
                complete = row.constraint is not None and row.constraint.consume(token)
            except GptlabError as e:
                row.finish_reason, row.error = "error", str(e)
                return stream.take(final=True)
            if stream.push(self.tokenizer.id_to_bytes(token)):
                row.finish_reason, row.stop = "stop", stream.matched
            elif complete:  # the grammar admits nothing more: stop, with stop = None unless a stop string shows
                row.finish_reason = "stop"
                if stream.push(b"", final=True):
                    row.stop = stream.matched
            elif len(row.token_ids) >= row.max_new:
                row.finish_reason = "length"
                if stream.push(b"", final=True):
                    row.finish_reason, row.stop = "stop", stream.matched
        return stream.take(final=row.finish_reason is not None)

    # ---- user-facing loops ----------------------------------------------------------------------------
    def stream_batch(self, prompts: Sequence[Prompt],
                     params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Events of all rows, one step at a time (beam search cannot stream: its best hypothesis is only
        known at the end)."""
        if any(p.num_beams > 1 for p in _params_list(params, len(_check_prompt_list(prompts)))):
            raise GptlabError("beam search cannot stream; use generate()")
        batch = self.prefill(prompts, params)
        while batch.rows:
            for event in self.step(batch):
                if event.error is not None:
                    raise GptlabError(event.error)
                yield event

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one completion; never splits a UTF-8 character, never shows a stop string."""
        for event in self.stream_batch([prompt], params):
            if event.text:
                yield event.text

    def generate(self, prompts: Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """One completion per prompt; rows stop independently (finished rows leave the batch)."""
        prompts = _check_prompt_list(prompts)
        plist = _params_list(params, len(prompts))
        if any(p.num_beams > 1 for p in plist):
            return [self.beam_search(prompt, p) for prompt, p in zip(prompts, plist)]
        batch = self.prefill(prompts, plist)
        rows = list(batch.rows)
        while batch.rows:
            for event in self.step(batch):
                if event.error is not None:
                    raise GptlabError(event.error)
        return [row.completion() for row in rows]

    # ---- beam search --------------------------------------------------------------------------------
    @torch.inference_mode()
    def beam_search(self, prompt: Prompt, params: SamplingParams) -> Completion:
        beams = params.num_beams
        ids = self.fit_context(self.encode(prompt), room=min(params.max_new_tokens, self.window // 2))
        max_new = min(params.max_new_tokens, self.window - len(ids))
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        self._refresh_decoder()
        cache = KVCache(self.model.config, 1, len(ids) + max_new, self.device, self.dtype)
        prompt_tensor = torch.tensor([ids], device=self.device)
        logits = self.model(prompt_tensor, kv_cache=cache, logits_to_keep=1)[:, -1].float()
        cache.reorder(torch.zeros(beams, dtype=torch.long, device=self.device))
        logits = self._mask_unknown(logits.expand(beams, -1).clone())
        vocab = logits.shape[-1]
        seen = penalty = None
        if params.repetition_penalty != 1:
            penalty = torch.tensor([[params.repetition_penalty]], device=self.device)
            seen = torch.zeros(beams, vocab, dtype=torch.bool, device=self.device)
            seen[:, ids] = True
        # only beam 0 is live at first, so the first step expands one hypothesis, not `beams` copies
        scores = torch.full((beams,), -float("inf"), device=self.device)
        scores[0] = 0.0
        hyps: list[list[int]] = [[] for _ in range(beams)]
        finished: list[tuple[float, float, list[int], str]] = []  # (normalised, sum logprob, tokens, reason)

        def normalise(total: float, length: int) -> float:
            return total / length ** params.length_penalty

        for t in range(max_new):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, penalty)
            candidates = (scores[:, None] + logits.log_softmax(dim=-1)).view(-1)
            # 2 * beams candidates: even if `beams` of them end in a stop token, `beams` continue
            top_scores, top_index = candidates.topk(min(2 * beams, candidates.numel()))
            survivors = []
            for rank, (total, flat) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
                if total == -float("inf"):
                    break
                beam, token = divmod(flat, vocab)
                if token in stop_ids:
                    if rank < beams:  # a stop outside the top `beams` would not have survived anyway
                        finished.append((normalise(total, t + 1), total, hyps[beam], "stop"))
                    continue
                survivors.append((beam, token, total))
                if len(survivors) == beams:
                    break
            if not survivors:
                break
            if t == max_new - 1:
                finished += [(normalise(s, t + 1), s, hyps[b] + [tok], "length") for b, tok, s in survivors]
                break
            if len(finished) >= beams:
                if params.early_stopping:
                    break
                # HF's heuristic: stop once the best running beam, scored at its current length, cannot
                # beat the worst of the `beams` best finished hypotheses
                worst_kept = sorted(finished, key=lambda h: -h[0])[beams - 1][0]
                if normalise(max(s for _, _, s in survivors), t + 1) <= worst_kept:
                    break
            index = torch.tensor([b for b, _, _ in survivors], device=self.device)
            new_tokens = torch.tensor([tok for _, tok, _ in survivors], device=self.device)
            hyps = [hyps[b] + [tok] for b, tok, _ in survivors]
            scores = torch.tensor([s for _, _, s in survivors], device=self.device)
            cache.reorder(index)
            if seen is not None:
                seen = seen[index].scatter_(1, new_tokens[:, None], True)
            positions = torch.full_like(new_tokens, cache.length)
            logits = self._decode(new_tokens, cache, positions, None)
        _, _, tokens, reason = max(finished, key=lambda h: h[0])
        stream = TextStream(params.stop)
        stop = None
        if stream.push(self.tokenizer.decode_bytes(tokens), final=True):
            reason, stop = "stop", stream.matched
        return Completion(stream.text, tokens, reason, len(ids), stop)

    # ---- scoring ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], continuations: Sequence[Prompt],
              batch_size: int = 16) -> list[ContinuationScore]:
        """Log-probability of each continuation given its prompt (text continuations are encoded without
        BOS). Prompts are left-truncated per the context policy to leave room for the continuation."""
        prompts, continuations = _check_prompt_list(prompts), _check_prompt_list(continuations)
        if len(prompts) != len(continuations):
            raise GptlabError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        results = []
        for start in range(0, len(prompts), batch_size):
            conts = [self.tokenizer.encode(c) if isinstance(c, str) else self.encode(c)
                     for c in continuations[start:start + batch_size]]
            if not all(conts):
                raise GptlabError("empty continuation: nothing to score")
            seqs = [self.fit_context(self.encode(p), room=len(c)) + c
                    for p, c in zip(prompts[start:start + batch_size], conts)]
            ids, positions, key_mask = self._left_pad(seqs, max(map(len, seqs)))
            longest = max(map(len, conts))
            # the logits at slot s predict the token at slot s + 1; keep the slots before each continuation
            logits = self.model(ids, positions=positions, attn_mask=key_mask, logits_to_keep=longest + 1)
            logprobs = self._mask_unknown(logits[:, :-1].float()).log_softmax(dim=-1)
            for r, cont in enumerate(conts):
                rows = logprobs[r, longest - len(cont):]
                target = torch.tensor(cont, device=self.device)
                token_lp = rows.gather(1, target[:, None])[:, 0]
                greedy = bool((rows.argmax(dim=-1) == target).all())
                results.append(ContinuationScore(float(token_lp.double().sum()), token_lp.tolist(), greedy))
        return results


def _length_groups(lengths: list[int], floor: int = 32) -> list[tuple[int, int]]:
    """Split ascending lengths into runs [a, b) whose longest is at most twice the shortest (or than
    `floor`): a prefill group then computes at most about twice the columns its rows need."""
    groups, a = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] > 2 * max(lengths[a], floor):
            groups.append((a, i))
            a = i
    return groups


def _check_prompt_list(prompts) -> list:
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        raise GptlabError("expected a list of prompts (wrap a single prompt in a list)")
    if not len(prompts):
        raise GptlabError("no prompts given")
    return list(prompts)


def _params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise GptlabError(f"{n} prompts but {len(params)} sampling parameter sets")
    return params
