"""The decode step re-laid out for one new token per row: `FusedDecoder`.

Design decisions
- Prefill and scoring run `GPT.forward`; decode steps (one token per row) run `FusedDecoder`, the same
  math with fused, transposed weight copies and fewer, larger ops, because at small batch a decode step
  is bound by per-op overhead and weight reads, not arithmetic. `compile=True` also runs it through
  torch.compile (on CUDA as one CUDA graph per step). Both are checked token for token against
  `GPT.forward` decoding (on CUDA by bench/check_gpu.py). Measured vs HF `generate`: 2.5-3.4x at batch 1 on
  a 2-core CPU (depth 4; 1.1-1.2x at batch 32), 8.1x at batch 1 and 7.1x at batch 32 on an H100 (depth 12, bf16).
- How the step is laid out, and why, is in the `FusedDecoder` docstring. Its weights go stale when the
  model is trained: `weights_key` lets the engine notice and rebuild it.
- One copy of the weights, not two, for a model that is not being trained (no parameter requires grad:
  `checkpoint.load_for_inference`, which sample, chat, serve and LocalLLM use): the decoder builds its
  fused layout once and points the model's parameters at slices of it (`param.data = view`; same Parameter
  objects and values, (out, in) shape, transposed strides), so `GPT.forward` (prefill, scoring) reads the
  same storage. `load_for_inference` also reads the head's weight (the tied embedding table) already in
  the decoder's (in, out) layout, so building the decoder copies nothing of it: a copy made here, while
  the original still lived, was 113 MB of SmolLM2's peak. With that, the weights read into the process's
  memory rather than memory-mapped, and no torch._dynamo import at load (checkpoint.py), `gptlab sample` on
  SmolLM2-135M peaks at 0.98x the RSS of the same job in transformers (session 12, 1 thread; 1.12x
  before, 1.51x before sharing: bench/results/quant.md). A model that requires grad keeps a separate copy: a
  trainer's optimizer, compiled graphs and sharding expect its own contiguous parameters. A decoder built
  again over weights already laid out this way (a second Engine, a rebuild) finds them in place and copies
  nothing (`_enclosing`). int8 models (quant.py) are always shared: their weights are buffers, never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..model import GPT, KVCache, rotary_cos_sin
from ..quant import Int8Matmul, QuantLinear, QuantTiedHead, projections


# ---- the decode step, re-laid out for one new token per row ----------------------------------------------
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scalars: tuple[torch.Tensor, torch.Tensor]
              ) -> torch.Tensor:
    """`model.RMSNorm` over the last dim. float32 and a (dim,) weight: the ops of CPU `F.rms_norm` (a
    composite: square, mean, + eps, rsqrt, times x, times weight) written out, the same bits (checked on
    3,000 random rows and a model's logits), with the mean as a sum divided by the width and eps as
    `scalars` = (width, eps), 0-dim float32 tensors made once: a Python number is wrapped into a tensor
    and cast on every call, and `mean` divides that way. 7.5 us of CPU time a call against 10.4 for
    `F.rms_norm` (1 x 576, 1 thread, medians of 20 x 5,000 calls), 61 calls a SmolLM2 step. Otherwise as
    the module does it: normalise in float32, round to the input's dtype, then scale (`weight` may then be
    (heads, dim), one row per head)."""
    if x.dtype == torch.float32 and weight.dim() == 1:
        width, eps_tensor = scalars
        return (x * (x * x).sum(-1, keepdim=True).div_(width).add_(eps_tensor).rsqrt_()).mul_(weight)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`model.apply_rotary(x, cos, sin)` for x (B, heads, D), with `signed_sin` = sin with its first half
    negated: the rotated half cat(-x2, x1) * sin is then (x2, x1) * signed_sin, the same bits ((-a) b =
    a (-b)), and (x2, x1) is one flip of x seen as (.., 2, D/2): 4 ops a layer instead of 9 (slices, neg,
    cat and the float32 casts, no-ops in float32 but still dispatched)."""
    B, N, D = x.shape
    swapped = x.view(B, N, 2, D // 2).flip(2).view(B, N, D)
    if x.dtype == torch.float32:
        return x * cos + swapped * signed_sin
    return (x.float() * cos + swapped.float() * signed_sin).to(x.dtype)


@dataclass
class _Projection:
    """One fused projection. Float: weight (in, out), contiguous, `x @ weight` (+ bias). int8 (quant.py):
    weight (out, in) int8 rows, multiplied through `int8` (the kernel's packed form of them).

    One row with several torch threads (decode at batch 1): the (1, in) x (in, out) product runs on one
    thread in MKL (measured: no faster with 2 threads, 12-22 GB/s of a 37 GB/s read bandwidth), so it is
    run as a batched product over the two halves of the outputs, `halves` (a strided view of the same
    weight: no copy), which bmm spreads over the threads: 2 threads, cold cache, SmolLM2's shapes 19-32
    vs 13-22 GB/s. Each output is the same dot product, summed by another kernel: equal to float32
    rounding (tested). With one thread the split is slightly slower (bmm's overhead), so it is used only
    with more than one."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    int8: Int8Matmul | None = None
    int8_one_row: Int8Matmul | None = None  # compiled on CPU with threads > 1: frozen int8pack rows (FusedDecoder)

    def __post_init__(self):
        rows, cols = self.weight.shape
        self.halves = (self.weight.view(rows, 2, cols // 2).permute(1, 0, 2)
                       if self.int8 is None and cols % 2 == 0 else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            one_row = self.int8_one_row is not None and x.shape[0] == 1  # (static in each compiled graph)
            return (self.int8_one_row if one_row else self.int8)(x, self.bias)
        if (x.shape[0] == 1 and self.halves is not None and not torch.compiler.is_compiling()
                and torch.get_num_threads() > 1):  # (compiled code: inductor picks its own kernel)
            y = torch.bmm(x.expand(2, 1, x.shape[1]), self.halves).view(1, -1)  # (2, 1, out/2): out's order
            return y if self.bias is None else y + self.bias
        # mm, not `@`: matmul's dispatch to mm costs 3 more ops a call (resolve_conj), ~120 calls a step
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)


def _enclosing(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The contiguous tensor of which `parts` are consecutive slices along `dim` (2-d views of one storage,
    as `_fuse` leaves them), or None: a decoder built again over shared weights then copies nothing."""
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    storage = first.untyped_storage()
    if (first.storage_offset() + shape[0] * shape[1]) * first.element_size() > storage.nbytes():
        return None
    whole = first.new_empty(0).set_(storage, first.storage_offset(), shape, (shape[1], 1))
    start = 0
    for part in parts:
        expected = whole.narrow(dim, start, part.shape[dim])
        if (part.untyped_storage().data_ptr() != storage.data_ptr() or part.shape != expected.shape
                or part.storage_offset() != expected.storage_offset() or part.stride() != expected.stride()):
            return None
        start += part.shape[dim]
    return whole


def _fuse(linears: list[nn.Module], share: bool) -> _Projection:
    """The projections `linears` side by side along their outputs, as one `_Projection`. `share`: point the
    modules' float weights at slices of the fused tensor (views, same values), so the model and the decoder
    hold one copy; int8 weights are always shared (they are buffers, never trained)."""
    biases = [m.bias for m in linears]
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    int8 = all(isinstance(m, QuantLinear) for m in linears)
    if int8:  # (out, in) rows, stacked
        parts, dim = [m.weight for m in linears], 0
    else:  # (in, out) columns side by side
        parts, dim = [m.weight.detach().t() for m in linears], 1
    weight = _enclosing(parts, dim) if share or int8 else None
    if weight is None:
        weight = torch.cat(parts, dim=dim)
        if share or int8:
            start = 0
            for m, part in zip(linears, parts):
                view = weight.narrow(dim, start, part.shape[dim])
                if int8:
                    m.weight = view
                else:
                    m.weight.data = view.t()
                start += part.shape[dim]
    if not int8:
        return _Projection(weight, bias)
    # one module: its own kernel object (packed once, also used by forward); several: one for the stack
    if len(linears) == 1:
        matmul = linears[0].matmul()
    else:
        matmul = Int8Matmul(weight, torch.cat([m.weight_scale for m in linears]))
    return _Projection(weight, bias, matmul)


@dataclass
class _LayerWeights:
    attn_norm: torch.Tensor
    qkv: _Projection  # q, k, v projections side by side: (n_head + 2 n_kv_head) head_dim outputs
    qk_norm: torch.Tensor | None  # (n_head + n_kv_head, head_dim): the q_norm weight per q head, then k_norm
    o: _Projection
    mlp_norm: torch.Tensor
    gate_up: _Projection  # gate then up
    down: _Projection


class FusedDecoder:
    """`GPT.forward` for a decode step (one new token per row, KV cache, optional key mask), written for
    speed at small batch, where a step is ~30 tiny matmuls plus ~150 tiny elementwise ops and eager
    PyTorch's per-op cost, not arithmetic, sets the pace (bench/results/decode.md).

    - The weights in an inference layout, made once: q/k/v and gate/up projections concatenated (4
      matmuls per layer instead of 7), each stored transposed (in, out) and contiguous, a layout whose
      (B, in) x (in, out) product measured 1.4-2.5x faster at batch 1 than `F.linear`'s (out, in) one
      (MKL, 1 thread; at batch 32 within +-15%: bench/results/decode.md). int8 projections (quant.py)
      are stacked (out, in) rows, the layout their kernel reads. The model's parameter names, shapes and
      state dict are untouched; whether the model shares this storage or keeps its own copy is in the
      module docstring (`Engine(fused_decode=False)` decodes through `model.forward` instead).
    - Rotary cos/sin are computed once for every position of the window and indexed per step (same
      float32 values as `rotary_cos_sin`), q and k are normed/rotated together (`_rotate`), RMSNorm is
      one call.
    - The new keys/values are written into the preallocated `KVCache` slot in place, through per-layer
      views made once a step; attention is one SDPA call over the filled slots (mask only when some row
      has padding, as in `GPT.forward`).
    - Eager, every op counts: a SmolLM2-135M step at batch 1 was ~1,215 top-level op calls (~4,400 with
      their nested ones) around 121 matmuls; the layout above makes it ~800, with the same logits bit for
      bit (docs/LOG.md, session 12).
    - compile=True: the same step with static shapes (attention over the whole cache capacity, later
      slots masked) through torch.compile, which fuses the elementwise ops between the matmuls into a few
      generated kernels; on CUDA the step is also captured as a CUDA graph (4.4 -> 1.3 ms a step at batch
      1 on an H100, bench/results/gpu_h100.md); on CPU the float weights are frozen into the step and
      max-autotune may pick its C++ GEMM for them (SmolLM2 fp32 at batch 1: 1.35-1.55x eager, 75-85% of
      the read-bandwidth cap), and with more than one thread the single-row graph freezes int8 rows too
      (int8pack: SmolLM2 int8 128-143 tok/s at batch 1 and 2 threads; bench/results/quant.md, session
      13). Eager stays the default: compiling costs seconds to a minute or two per model (two graphs: one
      for a single row, one for any larger batch; the cache capacity is symbolic).
    Mathematically the same as `model.forward`; float32 results agree to rounding (the transposed
    layout sums in a different order), and greedy tokens are tested equal to the eager path.
    The copy goes stale if the weights change: `weights_key` fingerprints them (storage and in-place
    version of every parameter), and the engine rebuilds the decoder when it changed.
    """

    def __init__(self, model: GPT, compile: bool = False):
        c = self.config = model.config
        self.n_qk = (c.n_head + c.n_kv_head) * c.head_dim
        # share the weights' storage with the model unless it is being trained (module docstring)
        share = not any(p.requires_grad for p in model.parameters())
        fuse = partial(_fuse, share=share)
        with torch.no_grad():
            self.layers = []
            for block in model.model.layers:
                attn, mlp = block.self_attn, block.mlp
                qk_norm = None
                if c.qk_norm:
                    qk_norm = torch.cat([attn.q_norm.weight.expand(c.n_head, -1),
                                         attn.k_norm.weight.expand(c.n_kv_head, -1)])
                self.layers.append(_LayerWeights(
                    attn_norm=block.input_layernorm.weight.detach(),
                    qkv=fuse([attn.q_proj, attn.k_proj, attn.v_proj]), qk_norm=qk_norm,
                    o=fuse([attn.o_proj]), mlp_norm=block.post_attention_layernorm.weight.detach(),
                    gate_up=fuse([mlp.gate_proj, mlp.up_proj]), down=fuse([mlp.down_proj])))
            self.embed = model.model.embed_tokens  # a lookup: the module itself (float or int8 rows)
            self.final_norm = model.model.norm.weight.detach()
            if isinstance(model.lm_head, QuantTiedHead):
                table = model.lm_head.table
                self.head = _Projection(table.weight, int8=table.matmul())
            else:  # a tied float head shares the embedding's parameter, which then becomes the view too
                self.head = fuse([model.lm_head])
            device = model.model.norm.weight.device
            cos, sin = rotary_cos_sin(torch.arange(c.max_seq_len, device=device)[:, None], model.rope)
            cos, sin = cos[:, 0, 0], sin[:, 0, 0]
            signed_sin = torch.cat([-sin[:, :c.head_dim // 2], sin[:, c.head_dim // 2:]], dim=1)  # `_rotate`
            self.rotary = torch.stack([cos, signed_sin], dim=1)  # (window, 2, head_dim), a row per step
            self._layer_index = torch.arange(c.n_layer, device=device)[:, None]
            self._norm_scalars = (torch.tensor(float(c.n_embd), device=device),  # `_rms_norm`
                                  torch.tensor(c.norm_eps, device=device))
        self.weights_key = weights_key(model)  # after sharing: the views are the model's weights from now on
        # dynamic=False: nothing becomes symbolic unless marked (batch and capacity, in `step`); dynamo's
        # automatic dynamic shapes would otherwise turn the config's sizes symbolic once a second model
        # compiles the same method. CPU, cpp_wrapper: the generated code calls its ~30 kernels a step from
        # C++ rather than Python (5-10% more tokens/s at batch 1, for a few more seconds of compilation).
        # CUDA, mode reduce-overhead: the step is replayed as one CUDA graph, since at small batch a GPU
        # step is as long as its ~30 kernel launches, not its arithmetic or weight reads
        # CPU, frozen weights + max-autotune: inductor's `freezing` folds the weights into the compiled step
        # as constants, and only then does max-autotune offer its C++ GEMM template for the float products
        # (timed against MKL at the first compile, per shape): at one row it reads the weights at 22-30
        # GB/s where MKL's sgemm reads 12-22 on this AMD CPU, SmolLM2 fp32 decode 28 -> 43-50 tok/s at 1
        # thread (docs/LOG.md, session 13). Freezing folds nn.Parameters only, hence the float weights are
        # wrapped as Parameters (the same storage); and it is read from the global config when a graph
        # compiles, not from torch.compile's options, hence the patch around each call (~16 us). The price:
        # compiling takes longer (autotuning, ~1 min for SmolLM2) and memory: the frozen constants and
        # their packed forms sit beside the model's weights (`gptlab sample --compile` on SmolLM2 peaks at
        # 2.48 GB, against 1.11 GB compiled without freezing and 0.92 GB eager).
        self._compiled = None
        self._cuda_graphs = compile and device.type == "cuda"
        self._freezing = None
        if compile:
            if self._cuda_graphs:
                mode = {"mode": "reduce-overhead"}
            else:
                for projection in [self.head, *(p for layer in self.layers
                                                for p in (layer.qkv, layer.o, layer.gate_up, layer.down))]:
                    if projection.int8 is None:
                        projection.weight = nn.Parameter(projection.weight, requires_grad=False)
                    elif torch.get_num_threads() > 1:
                        # frozen int8 rows for the single-row graph: SmolLM2 int8 compiled at batch 1 and 2
                        # threads 92-101 -> 140-161 tok/s; slower at 1 thread (52-61 vs 75-82) and in the
                        # batched graph (batch 8: 217 vs 378 eager), where fbgemm stays
                        projection.int8_one_row = projection.int8.frozen_int8pack()
                mode = {"options": {"cpp_wrapper": True, "max_autotune": True,
                                    "max_autotune_gemm_backends": "CPP,ATEN"}}
                import torch._inductor.config as inductor_config  # here: loading a model imports no compiler

                self._freezing = partial(inductor_config.patch, freezing=True)
            self._compiled = torch.compile(self._static_step, fullgraph=True, dynamic=False, **mode)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Plain `GPT` with plain `nn.Linear` projections, or all of them int8 (quant.py); anything else
        (LoRA wrappers etc.) decodes through forward."""
        if type(model) is not GPT:
            return False
        kinds = {type(m) for m in projections(model).values()}
        return kinds == {nn.Linear} or kinds <= {QuantLinear, QuantTiedHead}

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
                with self._freezing():
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
        norm = self._norm_scalars
        cos, signed_sin = self.rotary[positions][:, :, None].unbind(1)  # (B, 1, D) each, broadcast over heads
        eager = isinstance(slot, int)
        if eager:
            # every layer's view of the new slot and of the filled slots, made once a step (4 unbinds): a
            # layer then writes with one copy_ and reads with no op, instead of 2 selects and a slice per
            # tensor; a plain slice copy, since indexing with tensors costs 5-20x more in eager
            new_k, new_v = cache_k[:, :, :, slot].unbind(0), cache_v[:, :, :, slot].unbind(0)
            keys, values = cache_k[:, :, :, :n_keys].unbind(0), cache_v[:, :, :, :n_keys].unbind(0)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            qk, v = layer.qkv(_rms_norm(x, layer.attn_norm, c.norm_eps, norm)).split([self.n_qk, KV * D], dim=1)
            qk = qk.view(B, H + KV, D)
            if layer.qk_norm is not None:
                qk = _rms_norm(qk, layer.qk_norm, c.norm_eps, norm)
            q, k = _rotate(qk, cos, signed_sin).split([H, KV], dim=1)
            v = v.view(B, KV, D)
            if eager:
                new_k[i].copy_(k)
                new_v[i].copy_(v)
                layer_keys, layer_values = keys[i], values[i]
            else:
                # written through the whole cache tensor, not the view `cache_k[i]`: inductor then stores
                # into the slot in place, where a mutated view made it copy the layer's cache every step
                layer_index = self._layer_index[i]
                cache_k[layer_index, :, :, slot], cache_v[layer_index, :, :, slot] = k[None], v[None]
                layer_keys, layer_values = cache_k[i, :, :, :n_keys], cache_v[i, :, :, :n_keys]
            y = F.scaled_dot_product_attention(q.unsqueeze(2), layer_keys, layer_values, attn_mask=mask,
                                               enable_gqa=KV != H)
            x = x + layer.o(y.view(B, H * D))
            gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm, c.norm_eps, norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return self.head(_rms_norm(x, self.final_norm, c.norm_eps, norm))


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced, moved or updated in place (optimizer steps bump the
    tensor version counter), so a copy of the weights can tell it is stale."""
    return tuple((p.data_ptr(), p.dtype, -1 if p.is_inference() else p._version)
                 for p in (*model.parameters(), *model.buffers()))

