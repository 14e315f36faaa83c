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
- Rope scaling (`GPTConfig.rope_scaling`, None = plain rope): the frequency stretches long-context checkpoints
  ship with, as transformers computes them: `linear`, `dynamic` (NTK), `llama3`, `yarn` (see `RopeScaling`).
  `GPT.rope` holds the frequencies of the model's config, computed once; `rotary_cos_sin` turns positions into
  cos/sin tables with it. Plain rope keeps its original float32 expression, so unscaled models compute
  bit-identical outputs. Dynamic NTK depends on the length seen: each row of a batch is scaled for its own
  length so far (its largest position + 1), which is transformers' rule for a single sequence (its
  `dynamic_rope_update` takes the largest position of the call). With a KV cache, keys keep the rotation they
  were written with and each new token is rotated for the length at its step, as in transformers' cached
  decode; so a cached decode and one full forward over the same tokens differ once past the original length.
- Attention goes through `F.scaled_dot_product_attention` (flash / cuDNN kernels on GPU).
- One dial: `GPTConfig.from_depth(depth)` derives width = 64 * depth, heads of 64 dims, MLP = 8/3 width
  rounded to 64 (the SwiGLU size that keeps parameters equal to a 4x GELU MLP). Same as nanochat's dial.
- The KV cache (`KVCache`) keeps keys/values per layer for prefill + decode; rows of a batch may hold
  prompts of different lengths, left-padded and masked with `attn_mask`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# the fields of `RopeScaling` each type reads besides type and factor: (required, optional)
ROPE_SCALING_FIELDS = {
    "linear": ((), ()),
    "dynamic": (("original_max_seq_len",), ()),
    "llama3": (("original_max_seq_len", "low_freq_factor", "high_freq_factor"), ()),
    "yarn": (("original_max_seq_len",),
             ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")),
}


@dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint stretches its rotary frequencies beyond its pretraining context (HF's `rope_scaling`).

    Fields a type does not read stay None; optional ones left None take the published default when used, so a
    config exports back exactly as it came. `original_max_seq_len` is the pretraining context length (HF's
    `original_max_position_embeddings`; for `dynamic`, HF's `max_position_embeddings`)."""
    type: str  # linear | dynamic | llama3 | yarn
    factor: float
    original_max_seq_len: int | None = None
    low_freq_factor: float | None = None  # llama3: wavelengths above original / low_freq_factor are interpolated
    high_freq_factor: float | None = None  # llama3: wavelengths below original / high_freq_factor are kept
    beta_fast: float | None = None  # yarn: dims turning more than this often over the context are kept (32)
    beta_slow: float | None = None  # yarn: dims turning less than this often are interpolated (1)
    attention_factor: float | None = None  # yarn: cos/sin multiplier (default 0.1 ln(factor) + 1)
    mscale: float | None = None  # yarn, DeepSeek's form of the attention factor (with mscale_all_dim)
    mscale_all_dim: float | None = None
    truncate: bool | None = None  # yarn: round the ramp's ends to whole dims (default True)

    def __post_init__(self):
        if self.type not in ROPE_SCALING_FIELDS:
            raise ValueError(f"rope scaling type {self.type!r} is not supported "
                             f"(supported: {', '.join(ROPE_SCALING_FIELDS)})")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        required, optional = ROPE_SCALING_FIELDS[self.type]
        for field in fields(self)[2:]:
            value = getattr(self, field.name)
            if value is not None and field.name not in required + optional:
                raise ValueError(f"rope scaling field {field.name} is not used by type {self.type!r}")
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"rope scaling type {self.type!r} needs {', '.join(missing)}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


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
    rope_scaling: RopeScaling | None = None  # None: plain rope (a dict is read as RopeScaling's fields)

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling.type == "dynamic" and self.head_dim < 4:
            raise ValueError("dynamic rope scaling needs head_dim >= 4")

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int = 512, head_dim: int = 64,
                   kv_ratio: int = 1, width: int | None = None, **overrides) -> "GPTConfig":
        """The single dial: everything but depth is derived (width 64*depth, 64-dim heads, SwiGLU 8/3).
        `width` replaces 64*depth (heads, MLP follow it) for sweeps that vary the two apart (lab/scaling)."""
        n_embd = width or 64 * depth
        n_head = max(1, n_embd // head_dim)
        hidden = int(8 * n_embd / 3)
        hidden = 64 * ((hidden + 63) // 64)
        fields = dict(vocab_size=vocab_size, n_layer=depth, n_embd=n_embd, n_head=n_head,
                      n_kv_head=max(1, n_head // kv_ratio), head_dim=head_dim, intermediate_size=hidden,
                      max_seq_len=max_seq_len)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        """The fields as JSON; `rope_scaling` only when set, so unscaled configs serialise as they always did."""
        out = asdict(self)
        out.pop("rope_scaling")
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling.to_dict()
        return out


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


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature as a cos/sin multiplier: sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023,
    sec. 3.4); DeepSeek-V2 weights the log term by `mscale`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[list[float], float]:
    """(inverse frequency of each rotary pair, cos/sin multiplier) for a static scaling type, in float64.

    Pair i of plain rope turns at theta_i = theta^(-2i/d) radians per position, wavelength 2 pi / theta_i."""
    inv_freq = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    s = scaling
    if s.type == "linear":
        # position interpolation (Chen et al. 2023, arXiv 2306.15595): position m becomes m / factor
        return [f / s.factor for f in inv_freq], 1.0
    if s.type == "llama3":
        # Llama 3.1 (Meta's reference `apply_scaling`, llama-models): wavelengths shorter than
        # original / high_freq_factor are kept, longer than original / low_freq_factor are divided by factor,
        # and in between the two are blended by how many times the wave fits into the original context
        out = []
        for f in inv_freq:
            wavelength = 2 * math.pi / f
            if wavelength < s.original_max_seq_len / s.high_freq_factor:
                out.append(f)
            elif wavelength > s.original_max_seq_len / s.low_freq_factor:
                out.append(f / s.factor)
            else:
                fits = s.original_max_seq_len / wavelength  # times the wave fits into the original context
                smooth = (fits - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
                out.append((1 - smooth) * f / s.factor + smooth * f)
        return out, 1.0
    # yarn (Peng et al. 2023, "YaRN", arXiv 2309.00071, sec. 3.2 "NTK-by-parts" + 3.4): pairs that turn more
    # than beta_fast times over the original context keep their frequency, pairs turning fewer than beta_slow
    # times are interpolated (f / factor), with a linear ramp between. As in the authors' code (and HF), the
    # ramp runs over the pair index: the pair that turns r times is i(r) = d ln(L / (2 pi r)) / (2 ln theta),
    # from L theta^(-2i/d) / (2 pi) = r; its ends are rounded outwards unless `truncate` is False
    def pair_index(rotations: float) -> float:
        return head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(s.beta_fast or 32.0), pair_index(s.beta_slow or 1.0)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001  # a one-dim ramp would divide by zero
    out = []
    for i, f in enumerate(inv_freq):
        interpolated = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(interpolated * f / s.factor + (1 - interpolated) * f)
    if s.attention_factor is not None:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention = _yarn_mscale(s.factor)
    return out, attention


class Rope:
    """The rotary frequencies of one config, computed once (`GPT.rope`); `rotary_cos_sin` applies them."""

    def __init__(self, config: GPTConfig):
        self.head_dim, self.theta, self.scaling = config.head_dim, config.rope_theta, config.rope_scaling
        self.inv_freq: tuple[float, ...] | None = None  # None: computed per call (plain rope, dynamic)
        self.attention_factor = 1.0
        if self.scaling is not None and self.scaling.type != "dynamic":
            inv_freq, self.attention_factor = scaled_inv_freq(self.head_dim, self.theta, self.scaling)
            self.inv_freq = tuple(inv_freq)

    def inverse_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 inverse frequencies, (head_dim/2,) or for dynamic NTK one row per batch row (B, head_dim/2)."""
        d, device = self.head_dim, positions.device
        if self.inv_freq is not None:
            return torch.tensor(self.inv_freq, dtype=torch.float32, device=device)
        exponents = torch.arange(0, d, 2, device=device, dtype=torch.float32) / d
        if self.scaling is None:
            return 1.0 / (self.theta ** exponents)
        # dynamic NTK (bloc97 and emozilla, r/LocalLLaMA 2023; YaRN paper sec. 3.3): at length L beyond the
        # original L0 the base grows to theta * (s L / L0 - (s - 1))^(d / (d - 2)); L is each row's largest
        # position + 1 (see the module docstring), float32 like transformers
        s = self.scaling
        length = positions.amax(dim=-1, keepdim=True).clamp(min=s.original_max_seq_len - 1) + 1  # (B, 1)
        base = self.theta * (s.factor * length / s.original_max_seq_len - (s.factor - 1)) ** (d / (d - 2))
        return 1.0 / (base ** exponents)


def rotary_cos_sin(positions: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, head_dim) for integer positions (B, T), HF "rotate half" layout."""
    inv_freq = rope.inverse_frequencies(positions)
    if inv_freq.dim() == 2:  # one set per row (dynamic NTK)
        inv_freq = inv_freq[:, None]
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    if rope.attention_factor != 1.0:  # YaRN's temperature, applied to q and k alike through cos/sin
        return emb.cos() * rope.attention_factor, emb.sin() * rope.attention_factor
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
        self.rope = Rope(config)
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
        cos, sin = rotary_cos_sin(positions, self.rope)
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
