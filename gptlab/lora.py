"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), saved in PEFT's format.

A targeted linear layer y = W x + b becomes y = W x + b + (alpha / r) * B A x, with A (r x in) and B (out x r)
trainable and W, b frozen. B starts at zero, so the adapted model starts exactly equal to the base model and
training moves it away from there (paper, section 4.1).

Design decisions
- `LoRALinear` keeps the base layer's `weight` and `bias` under their own names and adds `lora_A.weight`,
  `lora_B.weight`, so the state dict of an adapted model is the base state dict plus the adapter tensors:
  training checkpoints need no special case, and PEFT's key for a tensor is ours with the prefix
  `base_model.model.` (PEFT wraps the HF model twice).
- Defaults: every projection of every block (q, k, v, o, gate, up, down); the paper adapts only q and v,
  but later work (e.g. QLoRA, Dettmers et al. 2023) found adapting all linear layers matches full
  fine-tuning more closely for little extra memory. A is initialised like an `nn.Linear` (Kaiming-uniform,
  as PEFT does); the paper's Gaussian works as well, what matters is B = 0.
- The frozen base can be kept in bfloat16 (`base_dtype`): the whole base model is cast, the adapters stay
  float32 (their updates are small and would be lost in bf16 rounding). Or in int8 (`base_dtype="int8"`):
  each adapted layer's weight is stored as int8 with one float32 scale per output row (symmetric absmax,
  the vector-wise quantization of LLM.int8, Dettmers et al. 2022, without its outlier decomposition) and
  dequantized on the fly, one layer at a time, in the forward pass: a quarter of the fp32 memory for the
  weights that dominate a model, at the cost of a dequantization per call. Plain PyTorch, so it runs on
  every device; int8 matmul kernels (bitsandbytes) and 4-bit bases (QLoRA) would be a dependency this
  project does not take. Layers that are not adapted (embeddings, norms) stay float32.
- `merge` folds (alpha / r) B A into W for inference at the speed of the base model; `unmerge` restores W
  bit for bit from a copy kept while merged, because W + D - D is not W in floating point. An int8 layer
  merges into a float32 weight held beside its int8 one (requantizing W + D would lose the update). `fold_lora`
  merges for good and puts plain `nn.Linear`s back (what a saved fine-tuned model dir holds).
- Files: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path, ...)
  and `adapter_model.safetensors` (PEFT key names), so `peft.PeftModel.from_pretrained` loads our adapters
  onto our HF export (`gptlab export`) and gives the same logits (tests/test_lora.py). The safetensors
  metadata also records the base model's config; loading an adapter onto a model with another config, or
  with tensors of other shapes, is a `GptlabError` rather than a silent mis-load. A saved adapter also gets a
  SHA256SUMS that loading verifies (`checkpoint.verify_checksums`); a PEFT adapter from elsewhere, without one,
  loads unverified.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .checkpoint import verify_checksums, write_checksums
from .common import GptlabError, atomic_write_bytes, atomic_write_json, read_json
from .model import GPT
from .quant import quantize_rows

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
BASE_CONFIG_KEY = "gptlab_base_config"  # safetensors metadata: the GPTConfig the adapter was trained on


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, int8: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = int8
        if int8:
            q, scale = quantize_int8(base.weight.detach())
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
        else:
            self.weight = base.weight
            self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # while merged: the original weight (float bases) or the merged float32 weight (int8 bases)
        self._unmerged_weight: torch.Tensor | None = None
        self._merged_weight: torch.Tensor | None = None

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None or self._merged_weight is not None

    def base_weight(self) -> torch.Tensor:
        """W as a float tensor: the stored weight, or the int8 weight dequantized (float32)."""
        return self.weight_int8.float() * self.weight_scale if self.quantized else self.weight

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A in float32: what the adapter adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged_weight is not None:
            return F.linear(x, self._merged_weight.to(x.dtype), self.bias)
        out = F.linear(x, self.base_weight().to(x.dtype) if self.quantized else self.weight, self.bias)
        if self.merged:
            return out
        # x A^T B^T costs r * (in + out) per token instead of forming B A (in * out)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.quantized:
            self._merged_weight = self.base_weight() + self.delta_weight()
        else:
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = self._merged_weight = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha:g}"
                + (", base int8" if self.quantized else ""))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row absmax quantization (quant.py's `quantize_rows`): (int8 weight, float32 scale of
    shape (out, 1)) with weight ~= q * scale and |error| <= scale / 2 per element."""
    q, scale = quantize_rows(weight)
    return q, scale[:, None]


# ---- adding, merging, removing --------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def add_lora(model: GPT, rank: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS, dropout: float = 0.0,
             base_dtype: torch.dtype | str | None = None) -> list[str]:
    """Freeze `model` and wrap every `nn.Linear` whose name ends with one of `targets` in a `LoRALinear`;
    returns the wrapped module names. `base_dtype`: None (keep), a torch dtype the whole base is cast to,
    or "int8" (the adapted layers' weights quantized, the rest kept)."""
    int8 = base_dtype == "int8"
    if isinstance(base_dtype, str) and not int8:
        raise GptlabError(f"unknown LoRA base dtype {base_dtype!r} (a torch dtype or 'int8')")
    targets = tuple(targets)
    if rank < 1:
        raise GptlabError(f"LoRA rank must be >= 1, got {rank}")
    if not targets:
        raise GptlabError("LoRA needs at least one target module")
    if lora_layers(model):
        raise GptlabError("the model already has LoRA adapters")
    if base_dtype is not None and not int8:
        model.to(dtype=base_dtype)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if model.config.tie_embeddings and "lm_head" in names:
        raise GptlabError("lm_head shares its weight with the embeddings (tie_embeddings); it cannot take a LoRA adapter")
    found = {n.split(".")[-1] for n in names}
    if missing := [t for t in targets if t not in found]:
        raise GptlabError(f"LoRA target(s) {missing} match no linear layer of the model "
                          f"(layers are named like {DEFAULT_TARGETS})")
    for name in names:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, int8=int8))
    return names


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


@torch.no_grad()
def fold_lora(model: GPT) -> GPT:
    """Merge every adapter into its base weight for good and put plain `nn.Linear`s back (the model can
    then be saved as an ordinary model dir); parameters become trainable again, as in a fresh model."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        weight = layer.base_weight()  # an int8 base comes back as float32
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        plain.weight.copy_((weight.float() + layer.delta_weight()).to(weight.dtype))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        parent, child = _parent(model, name)
        setattr(parent, child, plain)
    return model.requires_grad_(True)


# ---- PEFT files -----------------------------------------------------------------------------------------
def save_adapter(model: GPT, path: str | Path, base_model: str) -> Path:
    """Write the adapters of `model` as a PEFT LoRA adapter directory; `base_model` is recorded as
    `base_model_name_or_path` (the model dir or HF export it applies to)."""
    layers = lora_layers(model)
    if not layers:
        raise GptlabError("the model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha) != (first.rank, first.alpha) for m in layers.values()):
        raise GptlabError("all adapters must share one rank and alpha to be saved in PEFT's format")
    path = Path(path)
    state = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            state[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().float().contiguous().cpu()
    dropout = first.dropout
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({n.split(".")[-1] for n in layers}), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }
    metadata = {"format": "pt", BASE_CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True)}
    atomic_write_bytes(path / ADAPTER_WEIGHTS, save(state, metadata=metadata))
    atomic_write_json(path / ADAPTER_CONFIG, config)
    write_checksums(path, [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
    return path


def load_adapter(model: GPT, path: str | Path, base_dtype: torch.dtype | str | None = None) -> list[str]:
    """Add the LoRA adapter saved in `path` (ours or any PEFT LoRA adapter for this architecture) to `model`.
    An adapter made for another base (different config, missing layers, other shapes) is a GptlabError."""
    path = Path(path)
    verify_checksums(path, "LoRA adapter")
    config = read_json(path / ADAPTER_CONFIG, "LoRA adapter config")
    if config.get("peft_type") != "LORA":
        raise GptlabError(f"{path}/{ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, only LORA is supported")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "modules_to_save") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise GptlabError(f"{path}/{ADAPTER_CONFIG} uses LoRA options gptlab does not implement: "
                          f"{unsupported or ['bias' if config.get('bias', 'none') != 'none' else 'fan_in_fan_out']}")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise GptlabError(f"{path}/{ADAPTER_CONFIG}: target_modules must be a list of module names, got {targets!r}")
    weights = path / ADAPTER_WEIGHTS
    try:
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, FileNotFoundError) as e:
        raise GptlabError(f"cannot read LoRA weights {weights}: {e}") from None
    if BASE_CONFIG_KEY in metadata:
        base = json.loads(metadata[BASE_CONFIG_KEY])
        if base != model.config.to_dict():
            diff = {k: (v, model.config.to_dict().get(k)) for k, v in base.items() if model.config.to_dict().get(k) != v}
            raise GptlabError(f"LoRA adapter {path} was trained on another base model (adapter base vs this "
                              f"model: {diff})")
    rank = int(config["r"])
    # check every tensor against the model before touching it, so a misfit leaves the model as it was
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets}
    expected = {}
    for name, m in linears.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, m.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, rank)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise GptlabError(f"LoRA adapter {path} does not fit this model: missing {missing[:2]}, unexpected "
                          f"{unexpected[:2]} (an adapter for another base model?)")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise GptlabError(f"LoRA adapter {path} does not fit this model: {key} has shape "
                              f"{tuple(state[key].shape)}, the model needs {shape} (an adapter for another base model?)")
    names = add_lora(model, rank, float(config["lora_alpha"]), targets, float(config.get("lora_dropout") or 0.0),
                     base_dtype)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return names
