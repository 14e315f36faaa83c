"""`gptlab export` / `gptlab import`: move models to and from Hugging Face folders and llama.cpp GGUF files.

Design decisions
- `GPT` uses the Hugging Face Llama parameter names and computes exactly what `LlamaForCausalLM`,
  `Qwen2ForCausalLM` and `Qwen3ForCausalLM` compute (see model.py), so an HF export is the state dict plus a
  config.json, and an HF import is the reverse; no renaming table. Which HF class a model becomes follows
  from its two switches: `qk_norm` -> Qwen3, else `attn_bias` -> Qwen2, else Llama.
- One mismatch is bridged with zeros: HF Llama's and Qwen3's `attention_bias` also biases `o_proj`, ours
  never does. Export writes a zero `o_proj.bias` where the HF class expects one; import accepts such a bias
  only if it is all zeros and otherwise refuses, rather than silently dropping weights.
- Anything our model cannot compute exactly (rope scaling types other than linear/dynamic/llama3/yarn, such
  as longrope; sliding windows, biased MLPs, partial rotary, other activations, other architectures,
  SentencePiece vocabularies) is refused with a `GptlabError` that names it: an import that "mostly works"
  is worse than none.
- Rope scaling (`GPTConfig.rope_scaling`) is read from config.json's `rope_parameters` (transformers 5.x) or
  `rope_scaling` (4.x) and written back as both. The context window (`max_seq_len`) is HF's
  `max_position_embeddings`, except for `dynamic`, where transformers reads that field as the original
  (pretraining) length: there the original length goes into the scaling and the window becomes
  factor x original, the length the scaling was made for (export writes the original back). From GGUF, the
  `linear` and `yarn` scalings llama.cpp records in its `rope.scaling.*` metadata are read; llama.cpp keeps
  Llama 3.x's scaling as a `rope_freqs` tensor of per-pair divisors instead, from which the llama3 parameters
  are recovered and checked (`_llama3_from_rope_freqs`); other divisors are refused.
- Export and HF import need only safetensors and JSON; `transformers` is used for nothing here except
  building a tokenizer from GGUF metadata (its converter knows each vocabulary's pre-tokenizer regex, and it
  is the reference our tokenization is tested against).
- GGUF (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is read with the `gguf`
  package (`GGUFReader`, `gguf.quants.dequantize`); every tensor is dequantized to float32. GGUF stores each
  tensor's dimensions innermost first, so a (rows, cols) matrix has shape [cols, rows] there. For the
  `llama` architecture, llama.cpp's converter reorders the rows of each q/k head from HF's "rotate half"
  layout (pairs i, i + d/2) to interleaved pairs (2i, 2i + 1), which its rotary kernel expects; import undoes
  that per head (`_unpermute_rotary`). qwen2/qwen3 files are stored without that reordering.
- The special tokens (bos/eos/pad, whether BOS is prepended) and the chat template of an imported model are
  kept in `imported.json` inside the model directory, so exporting it again to HF gives them back. A gptlab model
  exports our own special tokens and gptlab's chat template (`gptlab.chat.CHAT_TEMPLATE`), so
  `apply_chat_template` renders exactly what SFT trains on; `export_hf(chat_template=...)` overrides it.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .chat import CHAT_TEMPLATE
from .checkpoint import (IMPORTED_FILE, load_model_dir, model_from_state, save_model_dir, verify_checksums,
                         write_checksums)
from .common import (DTYPE_NAMES, GptlabError, atomic_write_bytes, atomic_write_json, get_logger, json_bytes, read_json,
                     torch_dtype)
from .infer.generation_config import GENERATION_CONFIG_FILE, read_generation_config
from .model import GPT, ROPE_SCALING_FIELDS, GPTConfig, RopeScaling, scaled_inv_freq
from .tokenizer import EOT, Tokenizer

log = get_logger("interop")

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
HF_ROPE_NAMES = {"type": "rope_type", "original_max_seq_len": "original_max_position_embeddings"}  # ours -> HF
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp tensor names -> ours (= HF's); "{i}" is the layer index
GGUF_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


# ---- shared helpers -------------------------------------------------------------------------------------
def hf_model_type(config: GPTConfig) -> str:
    """The HF architecture that computes exactly what `config` computes."""
    if config.qk_norm:
        return "qwen3"
    return "qwen2" if config.attn_bias else "llama"


def _drop_zero_o_proj_bias(state: dict[str, torch.Tensor], source: str) -> None:
    for name in [k for k in state if k.endswith("self_attn.o_proj.bias")]:
        if torch.count_nonzero(state.pop(name)):
            raise GptlabError(f"{source}: {name} is not zero; an output-projection bias is not supported")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _save_imported(out: Path, model: GPT, tokenizer: Tokenizer, source: Path, fmt: str,
                   specials: dict, chat_template: str | None) -> Path:
    imported = {"source": str(source), "format": fmt, **specials, "chat_template": chat_template}
    save_model_dir(out, model, tokenizer, extra_files={IMPORTED_FILE: json_bytes(imported)})
    c = model.config
    log.info("imported %s (%s, %d layers, width %d, vocab %d, %.1fM parameters) -> %s", source, fmt, c.n_layer,
             c.n_embd, c.vocab_size, model.num_params() / 1e6, out)
    return out


# ---- export to a Hugging Face folder --------------------------------------------------------------------
def hf_config(config: GPTConfig, bos_id: int | None, eos_id: int | None, pad_id: int | None,
              dtype: torch.dtype) -> dict:
    """config.json for the HF class that matches `config` (readable by transformers 4.x and 5.x: rope is
    written both as 4.x's `rope_theta` (+ `rope_scaling`) and as 5.x's `rope_parameters`)."""
    model_type = hf_model_type(config)
    rope = {"rope_type": "default"}
    max_positions = config.max_seq_len
    scaling = config.rope_scaling
    if scaling is not None:
        rope = {HF_ROPE_NAMES.get(name, name): value for name, value in scaling.to_dict().items()}
        if scaling.type == "dynamic":  # HF's dynamic NTK reads max_position_embeddings as the original length
            max_positions = rope.pop("original_max_position_embeddings")
    out = {
        "architectures": [HF_CLASSES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": max_positions,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {**rope, "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
    if scaling is not None:
        out["rope_scaling"] = rope
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    if model_type == "qwen3":
        out["attention_bias"] = config.attn_bias
    return out


def export_hf(model_dir: str | Path, out: str | Path, chat_template: str | None = None,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained` load unchanged.

    `chat_template` (Jinja, HF convention) goes into tokenizer_config.json; None keeps the template of an
    imported model, or gptlab's own chat template for a model trained here."""
    model_dir, out = Path(model_dir), Path(out)
    model, tokenizer = load_model_dir(model_dir)
    imported = read_json(model_dir / IMPORTED_FILE) if (model_dir / IMPORTED_FILE).is_file() else {}
    specials = tokenizer.special_tokens
    if imported:
        bos, eos, pad = imported.get("bos_token"), imported.get("eos_token"), imported.get("pad_token")
        eos_all = [eos]
    else:  # documents open with <|endoftext|>; a chat turn ends with <|assistant_end|>
        bos = EOT if EOT in specials else None
        eos_all = [t for t in (EOT, "<|assistant_end|>") if t in specials]
        eos = eos_all[-1] if eos_all else None
        pad = "<|pad|>" if "<|pad|>" in specials else eos
    if chat_template is None:
        chat_template = imported.get("chat_template") if imported else CHAT_TEMPLATE
    ids = {t: specials[t] for t in (bos, pad, *eos_all) if t in specials}

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    if hf_model_type(model.config) == "qwen3" and model.config.attn_bias:
        for i in range(model.config.n_layer):  # Qwen3's attention_bias includes o_proj (see module docstring)
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(model.config.n_embd, dtype=dtype)
    atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf_config(model.config, ids.get(bos), ids.get(eos), ids.get(pad), dtype))
    # sampling settings of the model dir's own generation_config.json (an HF import's) travel with it
    generation = read_json(model_dir / GENERATION_CONFIG_FILE) if (model_dir / GENERATION_CONFIG_FILE).is_file() else {}
    atomic_write_json(out / GENERATION_CONFIG_FILE, {
        **generation, "bos_token_id": ids.get(bos), "pad_token_id": ids.get(pad),
        "eos_token_id": [ids[t] for t in eos_all if t in ids]})
    tokenizer.save(out / "tokenizer.json")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "model_max_length": model.config.max_seq_len, "add_bos_token": bool(imported.get("add_bos_token")),
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    atomic_write_json(out / "tokenizer_config.json", tok_config)
    write_checksums(out, ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json"])  # last, as in a model dir (checkpoint.py)
    log.info("exported %s as %s -> %s", model_dir, HF_CLASSES[hf_model_type(model.config)], out)
    return out


# ---- import from a Hugging Face folder ------------------------------------------------------------------
def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    files = sorted(set(read_json(index, "weight index")["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise GptlabError(f"weights not found: {path} (only safetensors weights are supported)")
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise GptlabError(f"cannot read weights {path}: {e}") from None
    return state


def _hf_rope_scaling(cfg: dict, rope: dict, max_positions: int, source: str) -> RopeScaling | None:
    """Our rope scaling for an HF `rope_parameters` / `rope_scaling` dict, read the way transformers reads it."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALING_FIELDS:
        raise GptlabError(f"{source}: rope scaling type {rope_type!r} is not supported "
                          f"(supported: default, {', '.join(ROPE_SCALING_FIELDS)})")
    required, optional = ROPE_SCALING_FIELDS[rope_type]
    fields = {name: rope.get(HF_ROPE_NAMES.get(name, name)) for name in (*required, *optional)}
    if "original_max_seq_len" in fields:
        if rope_type == "dynamic":
            fields["original_max_seq_len"] = max_positions
        else:  # transformers prefers a top-level value (Phi-3's layout), then falls back to the window
            fields["original_max_seq_len"] = (cfg.get("original_max_position_embeddings")
                                              or fields["original_max_seq_len"] or max_positions)
    factor = rope.get("factor")
    if factor is None and rope_type == "yarn":  # transformers: the window over the original length
        factor = max_positions / fields["original_max_seq_len"]
    read = {"rope_type", "type", "rope_theta", "factor", "partial_rotary_factor",
            *(HF_ROPE_NAMES.get(name, name) for name in fields)}
    if rope_type == "dynamic":
        read.discard("original_max_position_embeddings")
    ignored = set(rope) - read
    if ignored:
        log.warning("%s: rope scaling fields %s are not read by type %r (transformers ignores them too)",
                    source, sorted(ignored), rope_type)
    if factor is None:
        raise GptlabError(f"{source}: rope scaling type {rope_type!r} lacks its factor")
    try:
        return RopeScaling(type=rope_type, factor=float(factor),
                           **{name: value for name, value in fields.items() if value is not None})
    except (TypeError, ValueError) as e:
        raise GptlabError(f"{source}: {e}") from None


def hf_to_gpt_config(cfg: dict, source: str) -> GPTConfig:
    """Our config for an HF config.json, refusing every setting our model would compute differently."""
    model_type = cfg.get("model_type")
    if model_type not in HF_CLASSES:
        raise GptlabError(f"{source}: model_type {model_type!r} is not supported (supported: {sorted(HF_CLASSES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise GptlabError(f"{source}: activation {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise GptlabError(f"{source}: mlp_bias is not supported")
    if cfg.get("use_sliding_window"):
        raise GptlabError(f"{source}: sliding-window attention is not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise GptlabError(f"{source}: partial rotary embeddings are not supported")
    max_positions = cfg.get("max_position_embeddings", 2048)
    scaling = _hf_rope_scaling(cfg, rope, max_positions, source)
    if scaling is not None and scaling.type == "dynamic":  # see the module docstring
        max_positions = round(scaling.factor * scaling.original_max_seq_len)
    n_head = cfg["num_attention_heads"]
    try:
        return GPTConfig(
            vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"], n_embd=cfg["hidden_size"],
            n_head=n_head, n_kv_head=cfg.get("num_key_value_heads") or n_head,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
            intermediate_size=cfg["intermediate_size"], max_seq_len=max_positions,
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0), rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), qk_norm=model_type == "qwen3",
            attn_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise GptlabError(f"{source}: config.json lacks {e}") from None
    except ValueError as e:
        raise GptlabError(f"{source}: {e}") from None


def load_hf(src: str | Path) -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, special tokens + chat template) from a local HF Llama/Qwen2/Qwen3 folder."""
    src = Path(src)
    verify_checksums(src, "Hugging Face model")  # our exports carry SHA256SUMS; other folders load unverified
    config = hf_to_gpt_config(read_json(src / "config.json", "HF config"), str(src))
    state = {k: v for k, v in _hf_weights(src).items() if not k.endswith("rotary_emb.inv_freq")}
    _drop_zero_o_proj_bias(state, str(src))
    model = model_from_state(config, state, str(src)).float().eval()
    tokenizer = Tokenizer.load(src / "tokenizer.json")
    tok_cfg = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    template = tok_cfg.get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():  # transformers >= 4.43 may save it apart
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    extra = {name: _token_text(tok_cfg.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
    return model, tokenizer, {**extra, "add_bos_token": bool(tok_cfg.get("add_bos_token", False)),
                              "chat_template": template}


# ---- import from GGUF -----------------------------------------------------------------------------------
def _field_value(field):
    """A GGUF metadata value as Python (str, int, float, bool, or a list of them)."""
    from gguf import GGUFValueType

    def one(index: int, kind):
        part = field.parts[index]
        return part.tobytes().decode("utf-8") if kind == GGUFValueType.STRING else part[0].item()

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])


def _unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, rows (2i, 2i + 1) go back to (i, i + d/2)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_tokenizer(meta: dict, architecture: str, source: str) -> Tokenizer:
    """Our tokenizer for a GGUF vocabulary, built by transformers' GGUF converter (so it tokenizes exactly as
    `AutoTokenizer.from_pretrained(..., gguf_file=...)`)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GptlabError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer  # transformers >= 5
    except ImportError:
        try:
            from transformers.integrations.ggml import convert_gguf_tokenizer  # transformers 4.x
        except ImportError:
            raise GptlabError("importing a GGUF tokenizer needs transformers: pip install 'gptlab[hf]'") from None
    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "merges": "merges",
            "token_type": "token_type", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id",
            "add_space_prefix": "add_prefix_space"}
    spec = {name: meta[f"tokenizer.ggml.{key}"] for key, name in keys.items() if f"tokenizer.ggml.{key}" in meta}
    backend, _ = convert_gguf_tokenizer(architecture, spec)
    return Tokenizer(backend.to_str(), source=source)


# llama.cpp's rope.scaling keys that change what yarn computes, with the value that changes nothing
GGUF_YARN_NEUTRAL = {"attn_factor": 1.0, "yarn_attn_factor": 1.0, "yarn_ext_factor": 1.0, "yarn_log_multiplier": 0.0}


def _gguf_rope_scaling(meta: dict, arch: str, source: str) -> RopeScaling | None:
    """Our rope scaling for llama.cpp's `{arch}.rope.scaling.*` metadata (types none, linear, yarn)."""
    def key(name: str):
        return meta.get(f"{arch}.rope.scaling.{name}")

    kind = key("type") or "none"
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise GptlabError(f"{source}: GGUF rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")
    if key("factor") is None:
        raise GptlabError(f"{source}: GGUF metadata lacks {arch}.rope.scaling.factor")
    if kind == "linear":
        return RopeScaling(type="linear", factor=float(key("factor")))
    for name, neutral in GGUF_YARN_NEUTRAL.items():
        if key(name) not in (None, neutral):
            raise GptlabError(f"{source}: GGUF {arch}.rope.scaling.{name} = {key(name)} is not supported")
    # llama.cpp's default original length is the training context
    original = key("original_context_length") or meta.get(f"{arch}.context_length")
    if original is None:
        raise GptlabError(f"{source}: GGUF metadata lacks {arch}.rope.scaling.original_context_length")
    beta_fast, beta_slow = key("yarn_beta_fast"), key("yarn_beta_slow")
    try:
        return RopeScaling(type="yarn", factor=float(key("factor")), original_max_seq_len=int(original),
                           beta_fast=None if beta_fast is None else float(beta_fast),
                           beta_slow=None if beta_slow is None else float(beta_slow))
    except ValueError as e:
        raise GptlabError(f"{source}: {e}") from None


LLAMA3_BAND_FACTORS = (1.0, 4.0)  # Meta's low_freq_factor and high_freq_factor, the same in every Llama 3.x


def _llama3_from_rope_freqs(divisors: torch.Tensor, head_dim: int, theta: float, source: str) -> RopeScaling | None:
    """Llama 3.x rope scaling from llama.cpp's `rope_freqs.weight`: its converter stores the llama3 formula as one
    divisor per rotary pair (pair i turns at theta^(-2i/d) / divisor_i). The factor is the largest divisor (the
    interpolated pairs); a pair of the blended band has divisor D = 1 / ((1 - s) / factor + s), so
    s = (1/D - 1/factor) / (1 - 1/factor), and s = (L / wavelength - low) / (high - low) gives the original
    length L, taking Meta's low/high factors. Accepted only if these parameters give back every divisor."""
    found = [float(x) for x in divisors.double().flatten()]
    if len(found) != head_dim // 2:
        raise GptlabError(f"{source}: rope_freqs.weight has {len(found)} values, expected {head_dim // 2}")
    if all(x == 1.0 for x in found):
        return None
    factor, (low, high) = max(found), LLAMA3_BAND_FACTORS
    blended = [i for i, x in enumerate(found) if 1.0 < x < factor]
    unknown = GptlabError(f"{source}: rope_freqs.weight is not Llama 3 rope scaling (low_freq_factor {low}, "
                          f"high_freq_factor {high}); per-pair rope frequency factors are not supported")
    if not blended:
        raise unknown
    i = blended[0]
    s = (1 / found[i] - 1 / factor) / (1 - 1 / factor)
    wavelength = 2 * math.pi * theta ** (2 * i / head_dim)
    original = round(wavelength * (s * (high - low) + low))
    scaling = RopeScaling(type="llama3", factor=factor, original_max_seq_len=original, low_freq_factor=low,
                          high_freq_factor=high)
    scaled, _ = scaled_inv_freq(head_dim, theta, scaling)
    expected = [theta ** (-2 * j / head_dim) / f for j, f in enumerate(scaled)]
    if any(abs(e - x) > 1e-5 * e for e, x in zip(expected, found)):
        raise unknown
    return scaling


def load_gguf(path: str | Path) -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, special tokens + chat template) from a GGUF file, weights dequantized to float32."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GptlabError(f"{path} is not a readable GGUF file: {e}") from None
    meta = {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GptlabError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {GGUF_ARCHITECTURES})")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GptlabError(f"{path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(value, list):
            raise GptlabError(f"{path}: per-layer {arch}.{key} is not supported")
        return value

    scaling = _gguf_rope_scaling(meta, arch, str(path))
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_kv_head = get("attention.head_count_kv", n_head)
    head_dim = get("attention.key_length", n_embd // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GptlabError(f"{path}: partial rotary embeddings are not supported")

    names = {}
    for i in range(get("block_count")):
        names.update({g.format(i=i): h.format(i=i) for g, h in GGUF_TENSOR_NAMES.items() if "{i}" in g})
    names.update({g: h for g, h in GGUF_TENSOR_NAMES.items() if "{i}" not in g})
    state = {}
    rope_freqs = None
    for tensor in reader.tensors:
        if tensor.name not in names and tensor.name != "rope_freqs.weight":
            raise GptlabError(f"{path}: tensor {tensor.name} is not supported for architecture {arch}")
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise GptlabError(f"{path}: tensor {tensor.name} has quantisation type {tensor.tensor_type.name}, "
                              "which the gguf package cannot dequantize") from None
        shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        # F32 tensors come back as read-only views of the memory-mapped file: copy those
        weight = torch.from_numpy(values if values.flags.writeable else values.copy())
        if tensor.name == "rope_freqs.weight":
            rope_freqs = weight
            continue
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            weight = _unpermute_rotary(weight, n_head if ".attn_q." in tensor.name else n_kv_head)
        elif arch == "llama" and tensor.name.endswith(("attn_q.bias", "attn_k.bias")):
            raise GptlabError(f"{path}: q/k biases in a llama-architecture GGUF are not supported")
        state[names[tensor.name]] = weight
    theta = float(get("rope.freq_base", 10000.0))
    if rope_freqs is not None:
        if scaling is not None:
            raise GptlabError(f"{path}: both rope_freqs.weight and {arch}.rope.scaling.type {scaling.type!r}")
        scaling = _llama3_from_rope_freqs(rope_freqs, head_dim, theta, str(path))
    try:
        config = GPTConfig(
            vocab_size=state["model.embed_tokens.weight"].shape[0], n_layer=get("block_count"), n_embd=n_embd,
            n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, intermediate_size=get("feed_forward_length"),
            max_seq_len=get("context_length", 2048), rope_theta=theta, rope_scaling=scaling,
            norm_eps=float(get("attention.layer_norm_rms_epsilon")), qk_norm=arch == "qwen3",
            attn_bias=any(k.endswith("q_proj.bias") for k in state), tie_embeddings="lm_head.weight" not in state)
    except (KeyError, ValueError) as e:
        raise GptlabError(f"{path}: inconsistent GGUF model ({e})") from None
    model = model_from_state(config, state, str(path)).float().eval()
    tokenizer = _gguf_tokenizer(meta, arch, f"{path} (GGUF vocabulary)")
    tokens = meta.get("tokenizer.ggml.tokens", [])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    extra = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
             "pad_token": token("padding_token_id"), "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token")),
             "chat_template": meta.get("tokenizer.chat_template")}
    return model, tokenizer, extra


# ---- dispatch and CLI -----------------------------------------------------------------------------------
def import_model(source: str | Path, out: str | Path) -> Path:
    """Convert an HF folder (config.json + safetensors + tokenizer.json) or a .gguf file into a model dir."""
    source, out = Path(source), Path(out)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise GptlabError(f"{source} is a directory without config.json: not a Hugging Face model folder")
        model, tokenizer, extra = load_hf(source)
        read_generation_config(source)  # sampling settings we cannot use are refused before anything is written
        fmt = "hf"
    elif source.is_file():
        with open(source, "rb") as f:
            if f.read(4) != b"GGUF":
                raise GptlabError(f"{source} is neither a GGUF file nor a Hugging Face model folder")
        model, tokenizer, extra = load_gguf(source)
        fmt = "gguf"
    else:
        raise GptlabError(f"model to import not found: {source}")
    chat_template = extra.pop("chat_template")
    _save_imported(out, model, tokenizer, source, fmt, extra, chat_template)
    if fmt == "hf" and (source / GENERATION_CONFIG_FILE).is_file():  # the author's sampling settings
        shutil.copyfile(source / GENERATION_CONFIG_FILE, out / GENERATION_CONFIG_FILE)
    return out


def _cmd_export(args: argparse.Namespace) -> None:
    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    export_hf(args.model, args.out, chat_template=template, dtype=torch_dtype(args.dtype))


def _cmd_import(args: argparse.Namespace) -> None:
    import_model(args.source, args.out)


def register(sub) -> None:
    e = sub.add_parser("export", help="write a model dir as a Hugging Face folder (transformers loads it)")
    e.add_argument("--model", required=True, help="gptlab model directory")
    e.add_argument("--format", choices=["hf"], default="hf", help="output format (default: %(default)s)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32",
                   help="weight dtype (default: %(default)s)")
    e.add_argument("--chat-template", default=None, help="Jinja chat template file for tokenizer_config.json")
    e.set_defaults(func=_cmd_export)

    i = sub.add_parser("import", help="convert a Hugging Face folder or a GGUF file into a model dir")
    i.add_argument("--from", dest="source", required=True, help="HF folder (Llama/Qwen2/Qwen3) or .gguf file")
    i.add_argument("--out", required=True, help="output model directory")
    i.set_defaults(func=_cmd_import)
