"""Inference engine: prefill + KV-cache decode, sampling, beam search, streaming, scoring of continuations.

Every later stage (chat, SFT/RL rollouts, serving, evaluation) samples through this module. It sees only a
`GPT` and a `Tokenizer`, so our models and imported HF/GGUF ones behave identically.

Design decisions
- The unit of work is a `DecodeBatch`: rows decoded together, with their KV cache, key mask, next rotary
  position per row, last logits and per-row sampling state. `Engine.prefill` builds one, `Engine.step`
  advances every row by one token and drops the rows that finished. `generate`, `stream` and
  `stream_batch` are just `prefill` + a `while batch.rows: step(batch)` loop. A continuous-batching server
  uses the same two calls: between steps it removes finished/cancelled rows (`DecodeBatch.keep`) and adds
  new requests by prefilling them into their own batch and joining it (`DecodeBatch.join`), which
  right-aligns both caches (more left padding for the shorter one) so every row keeps its own positions.
- Prompts of different lengths are left-padded. Padding keys are hidden with the key mask, and each row
  carries its own rotary positions (0 at its first real token), so a row's logits do not depend on its
  neighbours: batched output equals generating each prompt alone (tested with greedy decoding).
- Randomness: every row owns a `torch.Generator` seeded with `seed + row` (or from OS entropy when no seed
  is given), and a token is drawn with the exponential race argmax(p_i / E_i), E_i ~ Exp(1), which picks
  i with probability p_i. So a row's samples depend only on its own seed, never on the batch it shares.
- Logit processing order (as in CTRL and HF): repetition penalty -> temperature -> top-k -> top-p.
  Repetition penalty (Keskar et al. 2019): a logit of a token already in the prompt or output is divided by
  the penalty when positive and multiplied by it when negative. Top-p keeps the smallest set of most likely
  tokens whose mass reaches p (Holtzman et al. 2019). Temperature 0 (or top_k = 1) is greedy.
- Stops: a stop token (default `<|endoftext|>` and `<|assistant_end|>`) ends a row and is not part of the
  output; a stop string is matched on decoded text and the text is cut before it. `token_ids` are the
  tokens the model produced (no stop token; a stop string's tokens stay, since a token can straddle it).
- Streaming yields text deltas. Bytes are decoded with an incremental UTF-8 decoder, so a character split
  across tokens is held back until complete, and text that might be the start of a stop string is held
  back until it is known not to be one. The concatenated deltas are exactly `Completion.text`.
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
- Prefill and scoring run `GPT.forward`; decode steps (one token per row) run `FusedDecoder`, the same
  math with fused, transposed weight copies and fewer, larger ops, because at small batch a decode step
  is bound by per-op overhead and weight reads, not arithmetic. `compile=True` also runs it through
  torch.compile (on CUDA as one CUDA graph per step). Both are checked token for token against
  `GPT.forward` decoding (on CUDA by bench/check_gpu.py). Measured vs HF `generate`: 3.4x at batch 1 on
  a 2-core CPU (depth 4), 8.1x at batch 1 and 7.1x at batch 32 on an H100 (depth 12, bf16).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..common import GptlabError, get_logger
from ..model import GPT, KVCache, apply_rotary, rotary_cos_sin
from ..tokenizer import Tokenizer

log = get_logger("engine")

Prompt = str | Sequence[int]  # text (encoded with a leading BOS) or token ids used verbatim


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text
    stop_token_ids: tuple[int, ...] | None = None  # None = the tokenizer's end tokens; () = none
    seed: int | None = None  # row r uses seed + r; None = fresh OS entropy
    num_beams: int = 1  # > 1: beam search (ignores temperature, top_k, top_p, seed)
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    early_stopping: bool = True  # beam search ends once num_beams hypotheses have finished

    def __post_init__(self):
        if isinstance(self.stop, str):  # a lone string would otherwise become a tuple of characters
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise GptlabError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_new_tokens or context window)
    prompt_tokens: int  # prompt length actually used, after any left truncation
    stop: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class StreamEvent:
    row: int  # index of the prompt in the call (stable while other rows come and go)
    text: str  # new text; "" while a partial character or a possible stop string is held back
    token_id: int  # the token sampled this step (a stop token is reported here but not in the output)
    finish_reason: str | None  # set on the row's last event


@dataclass
class ContinuationScore:
    logprob: float  # sum of the continuation's token logprobs
    token_logprobs: list[float]
    is_greedy: bool  # every continuation token was the argmax given what precedes it


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


# ---- logit processing (public so tests can check each against a hand computation) -----------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL penalty: for seen tokens, positive logits / penalty, negative logits * penalty. penalty (B, 1)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Set logits below each row's k-th largest to -inf; top_k (B,) with 0 = keep all."""
    kmax = min(int(top_k.max()), logits.shape[-1])
    if kmax == 0:
        return logits
    values = logits.topk(kmax, dim=-1).values
    kth = values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])
    kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
    return logits.masked_fill(logits < kth, -float("inf"))


def filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their mass reaches p (always at least one).
    top_p (B, 1); rows with p = 1 are unchanged."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p) & (top_p < 1), -float("inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


@dataclass
class _SamplingTensors:
    """Per-row sampling parameters as (B,)/(B, 1) tensors, so one batch may mix requests."""

    all_greedy: bool
    greedy: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor | None  # None when no row uses a repetition penalty
    any_top_p: bool  # known on the host, so a step without nucleus rows does no device sync for it

    @classmethod
    def from_params(cls, params: list[SamplingParams], device) -> _SamplingTensors:
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        use_penalty = any(p.repetition_penalty != 1 for p in params)
        return cls(all_greedy=all(p.greedy for p in params),
                   greedy=column([p.greedy for p in params], torch.bool)[:, 0],
                   temperature=column([p.temperature if not p.greedy else 1.0 for p in params], torch.float32),
                   top_k=column([p.top_k for p in params], torch.long)[:, 0],
                   top_p=column([p.top_p for p in params], torch.float32),
                   penalty=column([p.repetition_penalty for p in params], torch.float32) if use_penalty else None,
                   any_top_p=any(p.top_p < 1 for p in params))


def sample_tokens(logits: torch.Tensor, sampling: _SamplingTensors, generators: list[torch.Generator | None],
                  seen: torch.Tensor | None) -> torch.Tensor:
    """One token id per row from float32 logits (B, V)."""
    if sampling.penalty is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.penalty)
    greedy_tokens = logits.argmax(dim=-1)
    if sampling.all_greedy:
        return greedy_tokens
    logits = filter_top_k(logits / sampling.temperature, sampling.top_k)
    if sampling.any_top_p:
        logits = filter_top_p(logits, sampling.top_p)
    probs = logits.softmax(dim=-1)
    race = torch.ones_like(probs)
    for i, generator in enumerate(generators):
        if generator is not None:
            race[i].exponential_(generator=generator)
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(sampling.greedy, greedy_tokens, sampled)


# ---- batch state --------------------------------------------------------------------------------------
@dataclass
class _Row:
    index: int
    params: SamplingParams
    prompt_len: int
    stop_ids: frozenset[int]
    max_new: int  # max_new_tokens, capped by the context window
    stream: TextStream
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop: str | int | None = None

    def completion(self) -> Completion:
        return Completion(self.stream.text, list(self.token_ids), self.finish_reason or "length",
                          self.prompt_len, self.stop)


@dataclass
class DecodeBatch:
    """Rows decoded together. Row r's keys/values live in cache row r; `key_mask[r, s]` says whether cache
    slot s of row r holds a real token (None: no row has padding); `next_pos[r]` is the rotary position
    of row r's next token; `logits[r]` the distribution of that token."""

    rows: list[_Row]
    cache: KVCache
    key_mask: torch.Tensor | None
    next_pos: torch.Tensor
    logits: torch.Tensor
    seen: torch.Tensor | None  # (B, V) tokens in prompt/output, for the repetition penalty
    sampling: _SamplingTensors

    @torch.inference_mode()
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the given rows (by current position), e.g. to drop finished or cancelled requests."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.next_pos.device)
        self.rows = [self.rows[i] for i in rows]
        self.cache.reorder(index)
        self.key_mask = self.key_mask[index] if self.key_mask is not None else None
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]
        self.seen = self.seen[index] if self.seen is not None else None
        self.sampling = _SamplingTensors.from_params([r.params for r in self.rows], self.next_pos.device)
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
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        if self.seen is not None or other.seen is not None:
            def seen_of(batch):
                if batch.seen is not None:
                    return batch.seen
                return torch.zeros_like(batch.logits, dtype=torch.bool)
            self.seen = torch.cat([seen_of(self), seen_of(other)])
        self.rows = self.rows + other.rows
        self.sampling = _SamplingTensors.from_params([r.params for r in self.rows], self.next_pos.device)


# ---- the decode step, re-laid out for one new token per row ----------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`model.RMSNorm` over the last dim in one call where that is exact (float32 and a (dim,) weight:
    F.rms_norm gives the same bits); otherwise as the module does it: normalise in float32, round to the
    input's dtype, then scale (`weight` may then be (heads, dim), one row per head)."""
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


@dataclass
class _LayerWeights:
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # (n_embd, (n_head + 2 n_kv_head) head_dim): q, k, v projections side by side
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # (n_head + n_kv_head, head_dim): the q_norm weight per q head, then k_norm
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # (n_embd, 2 intermediate): gate then up
    down: torch.Tensor


class FusedDecoder:
    """`GPT.forward` for a decode step (one new token per row, KV cache, optional key mask), written for
    speed at small batch, where a step is ~30 tiny matmuls plus ~150 tiny elementwise ops and eager
    PyTorch's per-op cost, not arithmetic, sets the pace (bench/results/decode.md).

    - An inference-only copy of the weights, made once: q/k/v and gate/up projections concatenated (4
      matmuls per layer instead of 7), each stored transposed (in, out) and contiguous, a layout whose
      (B, in) x (in, out) product measured 1.4-2.5x faster at batch 1 than `F.linear`'s (out, in) one
      (MKL, 1 thread; at batch 32 within +-15%: bench/results/decode.md). The model's parameters, state dict and HF names are untouched; the
      copy costs one more model's worth of memory (`Engine(fused_decode=False)` decodes through
      `model.forward` instead).
    - Rotary cos/sin are computed once for every position of the window and indexed per step (same
      float32 values as `rotary_cos_sin`), q and k are normed/rotated together, RMSNorm is one call.
    - The new keys/values are written into the preallocated `KVCache` slot in place; attention is one
      SDPA call over the filled slots (mask only when some row has padding, as in `GPT.forward`).
    - compile=True: the same step with static shapes (attention over the whole cache capacity, later
      slots masked) through torch.compile, which fuses the elementwise ops between the matmuls into a few
      generated kernels; on CUDA the step is also captured as a CUDA graph (4.4 -> 1.3 ms a step at batch
      1 on an H100, bench/results/gpu_h100.md). Eager stays the default: compiling costs seconds to a
      minute per model (two graphs: one for a single row, one for any larger batch; the cache capacity is
      symbolic).
    Mathematically the same as `model.forward`; float32 results agree to rounding (the transposed
    layout sums in a different order), and greedy tokens are tested equal to the eager path.
    The copy goes stale if the weights change: `weights_key` fingerprints them (storage and in-place
    version of every parameter), and the engine rebuilds the decoder when it changed.
    """

    def __init__(self, model: GPT, compile: bool = False):
        c = self.config = model.config
        self.weights_key = weights_key(model)
        self.n_qk = (c.n_head + c.n_kv_head) * c.head_dim

        def t(linear: nn.Linear) -> torch.Tensor:
            return linear.weight.t()

        with torch.no_grad():
            self.layers = []
            for block in model.model.layers:
                attn, mlp = block.self_attn, block.mlp
                projections = (attn.q_proj, attn.k_proj, attn.v_proj)
                bias = torch.cat([p.bias for p in projections]) if c.attn_bias else None
                qk_norm = None
                if c.qk_norm:
                    qk_norm = torch.cat([attn.q_norm.weight.expand(c.n_head, -1),
                                         attn.k_norm.weight.expand(c.n_kv_head, -1)])
                self.layers.append(_LayerWeights(
                    attn_norm=block.input_layernorm.weight.detach(),
                    qkv=torch.cat([t(p) for p in projections], dim=1).contiguous(), qkv_bias=bias,
                    qk_norm=qk_norm, o=t(attn.o_proj).contiguous(),
                    mlp_norm=block.post_attention_layernorm.weight.detach(),
                    gate_up=torch.cat([t(mlp.gate_proj), t(mlp.up_proj)], dim=1).contiguous(),
                    down=t(mlp.down_proj).contiguous()))
            self.embed = model.model.embed_tokens.weight.detach()  # a lookup: no copy needed
            self.final_norm = model.model.norm.weight.detach()
            self.head = t(model.lm_head).contiguous()
            device = self.embed.device
            cos, sin = rotary_cos_sin(torch.arange(c.max_seq_len, device=device)[:, None], model.rope)
            self.rotary = torch.stack([cos[:, 0, 0], sin[:, 0, 0]], dim=1)  # (window, 2, head_dim), a row per step
            self._layer_index = torch.arange(c.n_layer, device=device)[:, None]
        # dynamic=False: nothing becomes symbolic unless marked (batch and capacity, in `step`); dynamo's
        # automatic dynamic shapes would otherwise turn the config's sizes symbolic once a second model
        # compiles the same method. CPU, cpp_wrapper: the generated code calls its ~30 kernels a step from
        # C++ rather than Python (5-10% more tokens/s at batch 1, for a few more seconds of compilation).
        # CUDA, mode reduce-overhead: the step is replayed as one CUDA graph, since at small batch a GPU
        # step is as long as its ~30 kernel launches, not its arithmetic or weight reads
        self._compiled = None
        self._cuda_graphs = compile and device.type == "cuda"
        if compile:
            mode = {"mode": "reduce-overhead"} if self._cuda_graphs else {"options": {"cpp_wrapper": True}}
            self._compiled = torch.compile(self._static_step, fullgraph=True, dynamic=False, **mode)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Plain `GPT` with plain `nn.Linear` projections (LoRA wrappers etc. decode through forward)."""
        if type(model) is not GPT:
            return False
        linears = [model.lm_head]
        for block in model.model.layers:
            linears += [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                        block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj]
        return all(type(linear) is nn.Linear for linear in linears)

    def step(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row: tokens (B,), rotary positions (B,); the token goes
        into cache slot `cache.length` (key_mask (B, capacity) as in `GPT.forward(attn_mask=...)`)."""
        slot = cache.length
        if slot >= cache.capacity:
            raise ValueError(f"KV cache full: {slot + 1} positions > capacity {cache.capacity}")
        if self._compiled is not None:
            # batch size and capacity change between calls (rows finish, prompts differ): symbolic, so
            # they do not each cost a compilation (size 1 is still specialised by dynamo); an all-True
            # mask rather than None, which would be one more graph
            if key_mask is None:
                key_mask = torch.ones(len(tokens), cache.capacity, dtype=torch.bool, device=tokens.device)
            for tensor, dims in ((tokens, [0]), (positions, [0]), (cache.k, [1, 3]), (cache.v, [1, 3]),
                                 (key_mask, [0, 1])):
                torch._dynamo.maybe_mark_dynamic(tensor, dims)
            slot_index = torch.tensor([slot], device=tokens.device)
            if self._cuda_graphs:
                # the graph writes into the cache in place, which CUDA graphs allow only for inputs whose
                # address is fixed; and a replay reuses its output buffer, so the logits are copied out.
                # Each generate call's new cache is a new address, so the graph is recorded again once per
                # call; past torch's limit (128 recordings) the compiled step runs without graphs: still
                # right, slower. Long-lived callers (a server) would want one reused cache allocation.
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
                torch.compiler.cudagraph_mark_step_begin()
                logits = self._compiled(tokens, cache.k, cache.v, slot_index, positions, key_mask).clone()
            else:
                logits = self._compiled(tokens, cache.k, cache.v, slot_index, positions, key_mask)
        else:
            # a decode query sits in the newest slot, so it may see every slot the key mask allows
            mask = key_mask[:, None, None, :slot + 1] if key_mask is not None else None
            logits = self._forward(tokens, cache.k, cache.v, slot, positions, mask, slot + 1)
        cache.length = slot + 1
        return logits

    def _static_step(self, tokens, cache_k, cache_v, slot_index, positions, key_mask):
        """The step with shapes that do not change from step to step (for torch.compile): attend over the
        cache's whole capacity, with slots after the new one masked, instead of slicing the filled part."""
        capacity = cache_k.shape[3]
        mask = (torch.arange(capacity, device=tokens.device) <= slot_index) & key_mask
        return self._forward(tokens, cache_k, cache_v, slot_index, positions, mask[:, None, None], capacity)

    def _forward(self, tokens, cache_k, cache_v, slot: int | torch.Tensor, positions, mask,
                 n_keys: int) -> torch.Tensor:
        """slot: the cache slot of the new token, an int (eager) or a (1,) tensor (compiled: a Python int
        would be baked into the graph, one compilation per step)."""
        c = self.config
        B, H, KV, D = tokens.shape[0], c.n_head, c.n_kv_head, c.head_dim
        cos, sin = self.rotary[positions][:, :, None].unbind(1)  # (B, 1, D) each, broadcast over heads
        x = F.embedding(tokens, self.embed)
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, c.norm_eps)
            qkv = h @ layer.qkv if layer.qkv_bias is None else torch.addmm(layer.qkv_bias, h, layer.qkv)
            qk = qkv[:, :self.n_qk].view(B, H + KV, D)
            if layer.qk_norm is not None:
                qk = _rms_norm(qk, layer.qk_norm, c.norm_eps)
            qk = apply_rotary(qk, cos, sin)
            k, v = qk[:, H:], qkv[:, self.n_qk:].view(B, KV, D)
            if isinstance(slot, int):  # a plain slice copy; indexing with tensors costs 5-20x more in eager
                cache_k[i, :, :, slot], cache_v[i, :, :, slot] = k, v
            else:
                # written through the whole cache tensor, not the view `cache_k[i]`: inductor then stores
                # into the slot in place, where a mutated view made it copy the layer's cache every step
                layer_index = self._layer_index[i]
                cache_k[layer_index, :, :, slot], cache_v[layer_index, :, :, slot] = k[None], v[None]
            y = F.scaled_dot_product_attention(qk[:, :H, None], cache_k[i, :, :, :n_keys],
                                               cache_v[i, :, :, :n_keys], attn_mask=mask, enable_gqa=KV != H)
            x = x + y.view(B, H * D) @ layer.o
            gate, up = (_rms_norm(x, layer.mlp_norm, c.norm_eps) @ layer.gate_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down
        return _rms_norm(x, self.final_norm, c.norm_eps) @ self.head


def default_batch_size(model: nn.Module | None, cpu: int) -> int:
    """Rows per `generate` call where the caller did not choose: `cpu` on a CPU, where a decode step's
    time grows with the batch; 256 on a GPU, where a step costs about the same for 1 row as for 32 (its
    time is kernel launches: 4.4 vs 5.1 ms, bench/results/gpu_h100.md), so fewer, fuller calls win."""
    on_gpu = model is not None and next(model.parameters()).device.type == "cuda"
    return 256 if on_gpu else cpu


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced, moved or updated in place (optimizer steps bump the
    tensor version counter), so a copy of the weights can tell it is stale."""
    return tuple((p.data_ptr(), p.dtype, -1 if p.is_inference() else p._version) for p in model.parameters())


class Engine:
    """Sampling, beam search, streaming and scoring for one model + tokenizer.

    strict_context: reject (GptlabError) prompts that do not fit the context window instead of cutting
    them from the left. add_bos: text prompts start with `<|endoftext|>` (the token that opens every
    training document); token-id prompts are always used as given. fused_decode: run decode steps with a
    `FusedDecoder` (faster at small batch, holds a second copy of the weights; models it does not support,
    e.g. with LoRA layers, decode through `model.forward` either way). compile: torch.compile that step
    (the first single-row step and the first batched step each compile, seconds to a minute; it pays off
    for long generations with fixed weights, not when the weights change between calls, as in RL)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, strict_context: bool = False, add_bos: bool = True,
                 fused_decode: bool = True, compile: bool = False):
        if compile and not fused_decode:
            raise GptlabError("compile=True compiles the fused decode step; it needs fused_decode=True")
        self.model = model
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
        """(Re)build the fused decoder if the weights changed since it was made (checked once per prefill,
        so a model trained between generate calls, as in RL, never decodes with stale weights)."""
        if not self.fused_decode:
            return
        if self._decoder is None or self._decoder.weights_key != weights_key(self.model):
            self._decoder = FusedDecoder(self.model, self.compile) if FusedDecoder.supports(self.model) else None

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
        (chunked prefill, as in Sarathi / vLLM); the KV cache makes the result the same as in one piece."""
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
            rows.append(_Row(first_index + r, p, len(ids), stop_ids, min(p.max_new_tokens, self.window - len(ids)),
                             TextStream(p.stop), generator))
            seqs.append(ids)
        width = max(map(len, seqs))
        capacity = max(width + row.max_new for row in rows)
        ids, positions, key_mask = self._left_pad(seqs, capacity)
        cache = KVCache(self.model.config, len(seqs), capacity, self.device, self.dtype)
        step = width if chunk_tokens is None else max(1, chunk_tokens // len(seqs))
        for start in range(0, width, step):
            if start:
                yield None
            end = min(start + step, width)
            logits = self.model(ids[:, start:end], kv_cache=cache, positions=positions[:, start:end],
                                attn_mask=key_mask, logits_to_keep=1)
        sampling = _SamplingTensors.from_params(plist, self.device)
        seen = None
        if sampling.penalty is not None:
            seen = torch.zeros(len(seqs), logits.shape[-1], dtype=torch.bool, device=self.device)
            for r, s in enumerate(seqs):
                seen[r, s] = True
        yield DecodeBatch(rows, cache, key_mask, positions[:, -1] + 1,
                          self._mask_unknown(logits[:, -1].float()), seen, sampling)

    @torch.inference_mode()
    def step(self, batch: DecodeBatch) -> list[StreamEvent]:
        """Sample one token per row, emit its text, drop rows that finished, and run the model on the
        new tokens of the rest (so `batch.logits` is ready for the next step)."""
        tokens = sample_tokens(batch.logits, batch.sampling, [r.generator for r in batch.rows], batch.seen)
        events, alive = [], []
        for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist())):
            events.append(StreamEvent(row.index, self._advance(row, token), token, row.finish_reason))
            if row.finish_reason is None:
                alive.append(i)
        if len(alive) < len(batch.rows):
            batch.keep(alive)
            tokens = tokens[alive]
        if batch.rows:
            if batch.seen is not None:
                batch.seen.scatter_(1, tokens[:, None], True)
            batch.logits = self._decode(tokens, batch.cache, batch.next_pos, batch.key_mask)
            batch.next_pos += 1
        return events

    def _advance(self, row: _Row, token: int) -> str:
        """Record one sampled token for a row; return the text it releases."""
        stream = row.stream
        if token in row.stop_ids:
            row.finish_reason, row.stop = "stop", token
            stream.push(b"", final=True)
        else:
            row.token_ids.append(token)
            if stream.push(self.tokenizer.id_to_bytes(token)):
                row.finish_reason, row.stop = "stop", stream.matched
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
            yield from self.step(batch)

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
            self.step(batch)
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
