"""Rope scaling (linear, dynamic NTK, llama3, yarn): imported Hugging Face checkpoints of each type give
transformers' logits past their original context, decode through the engine as transformers' cached
`generate` does, and export back with the same scaling; unsupported types are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from gptlab.checkpoint import load_model_dir, save_model_dir
from gptlab.common import GptlabError
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.interop import export_hf, import_model
from gptlab.model import GPT, GPTConfig, RopeScaling

VOCAB = 300
ORIGINAL = 16  # the "pretraining" context of every test model; inputs run to 3x that
SEQ_LEN = 48
HF_NAMES = {"type": "rope_type"}  # transformers 4.x's old key -> the one export writes

# name -> (HF model type, rope scaling as the checkpoint's config.json has it, window after import)
CASES = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}, 4 * ORIGINAL),
    # transformers' dynamic NTK reads max_position_embeddings as the original length
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 3.0}, 3 * ORIGINAL),
    # original 32, theta 500, 16-dim heads: wavelengths 6.3, 14, 30, 64, ...: one pair kept, two blended, five divided
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}, 4 * ORIGINAL),
    # Qwen2.5's long-context recipe, in its config.json's transformers 4.x layout (see hf_checkpoint)
    "yarn_qwen2": ("qwen2", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
                   4 * ORIGINAL),
    "yarn_tuned": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                             "beta_fast": 8.0, "beta_slow": 0.5, "truncate": False, "mscale": 1.0,
                             "mscale_all_dim": 0.5}, 4 * ORIGINAL),
}


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    """A tiny byte-level BPE vocabulary of exactly VOCAB tokens (the engine never samples an id outside the
    vocabulary; no special tokens, so greedy decoding never stops early)."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "rotary positions stretch to longer contexts, past what pretraining saw: linear, dynamic NTK, llama3, YaRN"
    tk.train_from_iterator([text * 20], trainer)
    assert tk.get_vocab_size() == VOCAB
    return tk.to_str()


def hf_checkpoint(case: str, tokenizer_json: str, folder) -> AutoModelForCausalLM:
    """A random HF model of `case`, saved with its tokenizer into `folder` as a checkpoint would be."""
    kind, rope_scaling, _ = CASES[case]
    config_class = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    window = ORIGINAL if case == "dynamic" else 4 * ORIGINAL
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=window,
                          rms_norm_eps=1e-6, rope_theta=500.0, rope_scaling=dict(rope_scaling),
                          tie_word_embeddings=False)
    torch.manual_seed(len(case))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than the init's 0.02 so that attention, hence rotary, shapes the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder)
    if case == "yarn_qwen2":  # as Qwen2.5's config.json has it: 4.x's rope_scaling (with "type"), rope_theta apart
        path = folder / "config.json"
        saved = json.loads(path.read_text())
        saved.pop("rope_parameters")
        path.write_text(json.dumps({**saved, "rope_scaling": rope_scaling, "rope_theta": 500.0}))
    PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer_json)).save_pretrained(folder)
    return model


def fresh_hf(folder) -> AutoModelForCausalLM:
    """transformers' dynamic NTK keeps state between calls (it only grows the base), so every reference
    forward gets a model that has seen nothing yet."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_imported_scaling_matches_transformers_and_exports_back(case, tokenizer_json, tmp_path):
    hf_checkpoint(case, tokenizer_json, tmp_path / "hf")
    import_model(tmp_path / "hf", tmp_path / "ours")
    model, _ = load_model_dir(tmp_path / "ours")
    _, rope_scaling, window = CASES[case]
    assert model.config.rope_scaling.type == rope_scaling.get("rope_type", rope_scaling.get("type"))
    assert model.config.rope_scaling.factor == rope_scaling["factor"]
    assert model.config.max_seq_len == window
    tokens = ids(seed=1)
    with torch.no_grad():
        ours, reference = model(tokens), fresh_hf(tmp_path / "hf")(tokens).logits
        assert max_diff(ours, reference) <= 1e-4
        # the scaling matters at this length: the same weights with plain rope are far off
        plain = GPT(GPTConfig(**{**model.config.to_dict(), "rope_scaling": None}))
        plain.load_state_dict(model.state_dict())
        assert max_diff(plain(tokens), reference) > 1e-2
        # up to the original length dynamic NTK is plain rope; the other types stretch every length
        short = tokens[:, :ORIGINAL]
        if case == "dynamic":
            assert max_diff(model(short), plain(short)) <= 1e-5
        else:
            assert max_diff(model(short), plain(short)) > 1e-3

    export_hf(tmp_path / "ours", tmp_path / "again")
    exported = json.loads((tmp_path / "again" / "config.json").read_text())
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    source_rope = source.get("rope_parameters") or {**source["rope_scaling"], "rope_theta": source["rope_theta"]}
    assert exported["rope_parameters"] == {HF_NAMES.get(k, k): v for k, v in source_rope.items()}
    assert exported["max_position_embeddings"] == source["max_position_embeddings"]
    with torch.no_grad():
        assert max_diff(fresh_hf(tmp_path / "again")(tokens).logits, ours) <= 1e-4
    import_model(tmp_path / "again", tmp_path / "twice")
    assert load_model_dir(tmp_path / "twice")[0].config == model.config


@pytest.mark.parametrize("case", ["dynamic", "yarn_qwen2"])
def test_engine_decode_matches_forward_and_transformers_generate(case, tokenizer_json, tmp_path):
    """Greedy decode from a prompt inside the original context to well past it: the fused decoder, the
    model's own cached forward and transformers' cached `generate` pick the same tokens (for dynamic NTK
    each step is rotated for the length reached at that step, keys keeping their rotation)."""
    hf_checkpoint(case, tokenizer_json, tmp_path / "hf")
    import_model(tmp_path / "hf", tmp_path / "ours")
    model, tok = load_model_dir(tmp_path / "ours")
    prompt = ids(seed=2)[0, :10].tolist()
    params = SamplingParams(max_new_tokens=24, temperature=0)
    fused = Engine(model, tok, add_bos=False).generate([prompt], params)[0].token_ids
    forward = Engine(model, tok, add_bos=False, fused_decode=False).generate([prompt], params)[0].token_ids
    with torch.no_grad():
        reference = fresh_hf(tmp_path / "hf").generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                        min_new_tokens=24, pad_token_id=0)[0, 10:].tolist()
    assert len(fused) == 24 and fused == forward == reference


def test_model_dir_keeps_scaling_and_unscaled_config_is_unchanged(tokenizer_json, tmp_path):
    from gptlab.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_json)
    plain = GPTConfig(vocab_size=VOCAB, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, head_dim=16,
                      intermediate_size=64, max_seq_len=64)
    assert "rope_scaling" not in plain.to_dict()  # existing model dirs and checkpoints compare equal
    scaled = GPTConfig(**{**plain.to_dict(), "rope_scaling": {"type": "yarn", "factor": 2.0,
                                                              "original_max_seq_len": 32}})
    assert scaled.to_dict()["rope_scaling"] == {"type": "yarn", "factor": 2.0, "original_max_seq_len": 32}
    save_model_dir(tmp_path / "m", GPT(scaled), tok)
    assert load_model_dir(tmp_path / "m")[0].config.rope_scaling == scaled.rope_scaling

    with pytest.raises(ValueError, match="rope scaling type 'longrope' is not supported"):
        RopeScaling(type="longrope", factor=2.0)
    with pytest.raises(ValueError, match="needs low_freq_factor, high_freq_factor"):
        RopeScaling(type="llama3", factor=8.0, original_max_seq_len=32)
    with pytest.raises(ValueError, match="field beta_fast is not used by type 'linear'"):
        RopeScaling(type="linear", factor=2.0, beta_fast=32.0)


def test_import_refuses_unsupported_rope_by_name(tokenizer_json, tmp_path):
    hf_checkpoint("linear", tokenizer_json, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    original = json.loads(config_path.read_text())
    longrope = {"rope_type": "longrope", "rope_theta": 500.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": ORIGINAL}
    bad = {
        "rope scaling type 'longrope' is not supported": {"rope_parameters": longrope, "rope_scaling": None},
        "partial rotary embeddings are not supported": {"partial_rotary_factor": 0.5},
        "rope scaling type 'llama3' lacks its factor": {
            "rope_parameters": {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
        "rope scaling type 'llama3' needs low_freq_factor": {
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
    }
    for message, change in bad.items():
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(GptlabError, match=message):
            import_model(tmp_path / "hf", tmp_path / "out")
