"""LoRA: zero-initialised adapters leave the model unchanged, merge == adapter forward, unmerge restores the
base bit for bit, only adapters train, and the PEFT round trip (our adapter on our HF export through
`peft.PeftModel`, and back) gives the same logits. Bad adapters fail with one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptlab.checkpoint import CHECKSUMS, save_model_dir
from gptlab.common import GptlabError
from gptlab.interop import export_hf
from gptlab.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_TARGETS, LoRALinear, add_lora, fold_lora,
                         load_adapter, lora_layers, merge_lora, quantize_int8, save_adapter, unmerge_lora)
from gptlab.model import GPT, GPTConfig


def config(vocab_size: int, **overrides) -> GPTConfig:
    # grouped-query heads, q/k/v biases (Qwen2) and an untied head: every shape case of a LoRA target
    fields = dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                  intermediate_size=96, max_seq_len=64, attn_bias=True, tie_embeddings=False)
    return GPTConfig(**{**fields, **overrides})


def base_model(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(config(vocab_size, **overrides)).eval()


def trained_adapters(model: GPT, rank: int = 4, alpha: float = 8.0, seed: int = 1) -> GPT:
    """Add adapters and give B non-zero values, as training would (B = 0 would make every test trivial)."""
    add_lora(model, rank, alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return model


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))


def test_zero_init_is_the_base_model_and_only_adapters_train(small_tokenizer):
    v = small_tokenizer.vocab_size
    model = base_model(v)
    x = tokens(v)
    before = model(x)
    names = add_lora(model, rank=4, alpha=8.0)
    assert len(names) == 2 * len(DEFAULT_TARGETS)
    assert torch.equal(model(x), before)  # B = 0: W + (alpha/r) B A = W
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    # state dict = base names + adapter tensors (what training checkpoints rely on)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" in model.state_dict()
    _, loss = model(x, x)
    loss.backward()
    layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
    assert layer.weight.grad is None and layer.lora_B.weight.grad.abs().sum() > 0
    with pytest.raises(GptlabError, match="already has LoRA"):
        add_lora(model, 4, 8.0)


def test_merge_equals_adapter_forward_and_unmerge_restores_exactly(small_tokenizer):
    v = small_tokenizer.vocab_size
    model = trained_adapters(base_model(v))
    x = tokens(v)
    base_weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    adapted = model(x)
    assert not torch.allclose(adapted, base_model(v)(x), atol=1e-3)  # the adapters do change the model
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    merged = model(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not torch.equal(lora_layers(model)["model.layers.0.self_attn.q_proj"].weight,
                           base_weights["model.layers.0.self_attn.q_proj"])
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.weight, base_weights[name]), name
    assert torch.equal(model(x), adapted)
    folded = fold_lora(model)
    assert not lora_layers(folded) and isinstance(folded.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(folded(x), adapted, atol=1e-5, rtol=1e-5)


def test_bf16_frozen_base(small_tokenizer):
    v = small_tokenizer.vocab_size
    model = base_model(v)
    add_lora(model, 4, 8.0, targets=("q_proj", "v_proj"), base_dtype=torch.bfloat16)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    x = tokens(v)
    _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and layer.weight.grad is None
    assert not layer.lora_A.weight.grad.any()  # B = 0 blocks A's gradient at the first step
    assert layer.lora_B.weight.grad.abs().sum() > 0


def test_int8_frozen_base(small_tokenizer):
    """int8 base: per-row absmax quantization within half a step of the float weight, a forward within that
    error of the float model, adapters that train, merge/unmerge and fold consistent with the int8 base."""
    v = small_tokenizer.vocab_size
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48, 1) and q.abs().max() == 127
    assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-7).all() and not q[5].any()

    x = tokens(v)
    reference = base_model(v)
    with torch.no_grad():
        expected = reference(x)
    model = base_model(v)
    add_lora(model, 4, 8.0, base_dtype="int8")
    layer = lora_layers(model)["model.layers.0.mlp.down_proj"]
    assert layer.weight_int8.dtype == torch.int8 and not hasattr(layer, "weight")
    assert model.model.embed_tokens.weight.dtype == torch.float32  # layers without adapters keep their dtype
    assert any(k.endswith("down_proj.weight_int8") for k in model.state_dict())  # checkpoints keep it int8
    with torch.no_grad():
        quantized = model(x)
    error = (quantized - expected).abs().max().item()
    assert 0 < error < 0.05 * expected.abs().max().item()  # quantized, yet close

    _, loss = model(x, x)
    loss.backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0 and not any(p.grad is not None for n, p in
                                                                 model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for adapted in lora_layers(model).values():
            adapted.lora_B.weight.normal_(0, 0.05)
        adapted_out = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted_out, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        assert torch.equal(model(x), adapted_out)
        folded = fold_lora(model)
        assert folded.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
        torch.testing.assert_close(folded(x), adapted_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(GptlabError, match="int4"):
        add_lora(base_model(v), 4, 8.0, base_dtype="int4")


def test_bad_targets(small_tokenizer):
    v = small_tokenizer.vocab_size
    with pytest.raises(GptlabError, match=r"\['qkv'\] match no linear layer"):
        add_lora(base_model(v), 4, 8.0, targets=("q_proj", "qkv"))
    with pytest.raises(GptlabError, match="tie_embeddings"):
        add_lora(base_model(v, tie_embeddings=True), 4, 8.0, targets=("lm_head",))
    with pytest.raises(GptlabError, match="rank"):
        add_lora(base_model(v), 0, 8.0)


def test_peft_round_trip_matches_our_logits(small_tokenizer, tmp_path):
    import peft  # a dev dependency (pyproject), imported here so the other tests do not pay for it
    from transformers import AutoModelForCausalLM

    v = small_tokenizer.vocab_size
    save_model_dir(tmp_path / "base", base_model(v), small_tokenizer)
    export_hf(tmp_path / "base", tmp_path / "hf")
    ours = trained_adapters(base_model(v))
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "hf"))

    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
    assert cfg["target_modules"] == sorted(DEFAULT_TARGETS)
    assert cfg["base_model_name_or_path"] == str(tmp_path / "hf")
    keys = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * len(DEFAULT_TARGETS)

    x = tokens(v)
    with torch.no_grad():
        expected = ours(x)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
        torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)

        back = base_model(v)
        load_adapter(back, tmp_path / "adapter")
        assert torch.equal(back(x), expected)
        assert all(isinstance(m, LoRALinear) for m in lora_layers(back).values())


def test_adapter_for_another_base_is_a_clear_error(small_tokenizer, tmp_path):
    v = small_tokenizer.vocab_size
    save_adapter(trained_adapters(base_model(v)), tmp_path / "ours", base_model="base")
    other = base_model(v, n_layer=1)
    with pytest.raises(GptlabError, match=r"another base model.*n_layer"):
        load_adapter(other, tmp_path / "ours")
    assert not lora_layers(other)  # a refused adapter leaves the model untouched

    # a third-party PEFT adapter (no gptlab metadata) with the wrong width is caught by its shapes
    state = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    state[key] = torch.zeros(4, 32)
    (tmp_path / "foreign").mkdir()
    save_file(state, tmp_path / "foreign" / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (tmp_path / "foreign" / ADAPTER_CONFIG).write_text((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    model = base_model(v)
    with pytest.raises(GptlabError, match=r"up_proj.lora_A.weight has shape \(4, 32\), the model needs \(4, 64\)"):
        load_adapter(model, tmp_path / "foreign")
    assert not lora_layers(model)

    cfg = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    (tmp_path / "ours" / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(GptlabError, match=r"LoRA adapter file .*adapter_config\.json is corrupt"):
        load_adapter(base_model(v), tmp_path / "ours")  # our adapters carry SHA256SUMS
    (tmp_path / "ours" / CHECKSUMS).unlink()  # as a PEFT adapter from elsewhere: the config check still guards it
    with pytest.raises(GptlabError, match="only LORA"):
        load_adapter(base_model(v), tmp_path / "ours")
