"""The GPT: a decoder-only transformer that is exactly a Hugging Face Llama / Qwen2 / Qwen3 model.

Design decisions
- Architecture: token embedding -> N x [RMSNorm -> causal self-attention (rotary positions, grouped-query
  heads, optional QK-norm) -> residual, RMSNorm -> gated MLP (SwiGLU) -> residual] -> RMSNorm -> head.
  That is Llama (Touvron et al. 2023); `qk_norm` makes it Qwen3, `attn_bias` makes it Qwen2. Nothing here
  is outside what those HF classes compute, so export and import are lossless.
- Parameter names are the HF Llama names (`model.layers.0.self_attn.q_proj.weight`, ...), so export and
  import are a copy of the state dict, not a renaming table that can drift.
- Rotary embedding uses HF's "rotate half" layout (first half of each head pairs with the second half),
  computed in float32 (Su et al. 2021, RoFormer).
- Attention goes through `F.scaled_dot_product_attention` (flash / cuDNN kernels on GPU).
- One dial: `GPTConfig.from_depth(depth)` derives width = 64 * depth, heads of 64 dims, MLP = 8/3 width
  rounded to 64 (the SwiGLU size that keeps parameters equal to a 4x GELU MLP). Same as nanochat's dial.
- The KV cache (`KVCache`) keeps keys/values per layer for prefill + decode; rows of a batch may hold
  prompts of different lengths, left-padded and masked with `attn_mask`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    head_dim: int = 64
    intermediate_size: int = 704
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # Qwen3: RMSNorm on each query/key head before rotary
    attn_bias: bool = False  # Qwen2: bias on q/k/v projections
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int = 512, head_dim: int = 64,
                   kv_ratio: int = 1, **overrides) -> "GPTConfig":
        """The single dial: everything but depth is derived (width 64*depth, 64-dim heads, SwiGLU 8/3)."""
        n_embd = 64 * depth
        n_head = max(1, n_embd // head_dim)
        hidden = int(8 * n_embd / 3)
        hidden = 64 * ((hidden + 63) // 64)
        fields = dict(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, n_head=n_head,
                      n_kv_head=max(1, n_head // kv_ratio), head_dim=head_dim, intermediate_size=hidden,
                      max_seq_len=max_seq_len)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Per-layer key/value buffers of shape (B, n_kv_head, capacity, head_dim) and the filled length.

    All rows share one length: a batch of prompts of different lengths is left-padded, and the padding is
    hidden from attention with a key mask (see `GPT.forward(attn_mask=...)`)."""

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for one layer and return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.capacity}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search reorders hypotheses between steps)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in float32 like HF Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, head_dim) for integer positions (B, T), HF "rotate half" layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x, cos, sin, layer: int, kv_cache: KVCache | None, mask: torch.Tensor | None):
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        gqa = c.n_kv_head != c.n_head
        if mask is None:  # plain causal attention over this chunk only (training, first prefill)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layer, kv_cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """The part HF calls `model` (embeddings, blocks, final norm); kept as a submodule for identical names."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; the projections into the residual stream scaled by 1/sqrt(2 * n_layer)
        so the residual's variance does not grow with depth (GPT-2, Radford et al. 2019)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12 * L * H * Dh * T for attention scores
        (Kaplan et al. 2020; PaLM appendix B). Used for MFU."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:  # the lookup is free but the (shared) head matmul is not
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, logits_to_keep: int = 0, return_hidden: bool = False):
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets` also the mean cross-entropy
        over positions whose target is not -1 (the ignore index used for masked tokens).

        `positions` (B, T): rotary positions (default: cache length + 0..T-1, the same for every row).
        `attn_mask` (B, S): True for keys that may be attended (S = cache length + T); left padding is False.
        `logits_to_keep` > 0: logits of the last that many positions only (a prefill needs just the last
        one; the head over the whole prompt would cost B * T * vocab floats). Same meaning as in HF.
        `return_hidden`: return the final-norm hidden states (B, T, n_embd) the head would read, for a
        reward or value head (gptlab.train.reward); `targets` is then ignored.
        """
        B, T = idx.shape
        offset = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=idx.device).expand(B, T)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        mask = None
        if attn_mask is not None or (offset > 0 and T > 1):
            # key j (absolute slot in the cache) is visible to query i (slot offset + i) iff j <= offset + i;
            # a single new token (decode step, mask None) sees every cached slot, so it needs no mask at all
            S = offset + T
            query_slot = torch.arange(offset, S, device=idx.device)[:, None]
            key_slot = torch.arange(S, device=idx.device)[None, :]
            mask = (key_slot <= query_slot)[None, None]
            if attn_mask is not None:
                # a query always sees its own slot: a left-padding query would otherwise have every key
                # masked, a softmax over all -inf that some kernels return as NaN, and NaN values leak
                # into real rows through their 0-weighted padding keys
                mask = mask & (attn_mask[:, None, None, :S].bool() | (key_slot == query_slot))
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, i, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.length += T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.model.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def masked_loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The cross-entropy of `forward(idx, targets)` with the head run only at the positions whose target
        is not -1. Fine-tuning trains on a fraction of the positions (the assistant's tokens: ~45% in the
        CPU SFT preset), and the head is the largest matmul of a small model (8192 x 256 of the CPU model's
        5.3M parameters): measured 29% off a CPU SFT step. The selection makes the number of positions
        data-dependent, which torch.compile would recompile for, so pretraining (every target valid) keeps
        `forward`. Same loss; gradients equal up to float rounding (the head's reduction runs over fewer rows).
        `reduction="none"`: one loss per kept position, flat, in row-major order (DPO sums them per row)."""
        keep = targets != -1
        hidden = self(idx, return_hidden=True)[keep]
        return F.cross_entropy(self.lm_head(hidden).float(), targets[keep], reduction=reduction)
