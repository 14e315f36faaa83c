"""int8 weight-only quantization (quant.py): error bounds against float64, a quantized tiny model against its
float32 self, quantized model directories (round trip, format errors), unsupported layers, the CLI flags, and
the fused decoder on int8 weights and on weights it shares with the model."""

from __future__ import annotations

import copy
import inspect
import json
import json.decoder

import pytest
import torch

from gptlab.checkpoint import CHECKSUMS, load_for_inference, load_model_dir, read_checksums, save_model_dir
from gptlab.cli import build_parser, main as cli_main
from gptlab.common import GptlabError
from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.lora import add_lora
from gptlab.model import GPT, GPTConfig
from gptlab.quant import (Int8Matmul, QuantEmbedding, QuantLinear, QuantTiedHead, dequantize_rows, int8_kernel_name,
                          quantize_model, quantize_rows)
from gptlab.tokenizer import train_tokenizer

PROMPTS = ["def decode(self, s):", "class JSONDecoder", "x"]
BF16_EPS = 2.0 ** -8  # relative rounding of a bfloat16 value


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([inspect.getsource(json.decoder)], vocab_size=320)


def tiny_model(tok, seed: int = 0, **overrides) -> GPT:
    """Widths that are multiples of 32 (the int8 kernel's path) unless overridden."""
    torch.manual_seed(seed)
    sizes = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=128, max_seq_len=96)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, **(sizes | overrides))).eval()


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=())


# ---- the quantizer and the matmul --------------------------------------------------------------------------
def test_quantize_rows_error_is_at_most_half_a_step():
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 40)[:, None]
    w[7] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and not q[7].any() and scale[7] == 1
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)  # scales are bf16-exact (module docstring)
    absmax = w.abs().amax(dim=1)
    assert ((absmax / 127 <= scale) & (scale <= absmax / 127 * (1 + 2 * BF16_EPS)))[absmax > 0].all()  # one bf16 ulp
    error = (q.double() * scale.double()[:, None] - w.double()).abs()
    assert (error <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(dequantize_rows(q, scale), q.float() * scale[:, None])


def test_quantize_rows_stays_on_the_weights_device():
    """Nothing CPU-only or data-dependent inside: weights on another device (meta here; CUDA in
    bench/check_gpu.py) quantize there. A CPU tensor in bf16_ceil made CUDA weights fail (quantize_model on a
    GPU model, LoRA SFT with an int8 base on a GPU)."""
    q, scale = quantize_rows(torch.empty(40, 96, device="meta"))
    assert (q.device.type, q.dtype, tuple(q.shape)) == ("meta", torch.int8, (40, 96))
    assert (scale.device.type, scale.dtype, tuple(scale.shape)) == ("meta", torch.float32, (40,))


# the kernels a test can run here: the one this CPU picks, and the fallback every CPU has
KERNELS = sorted({int8_kernel_name(), "int8pack"})


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [64, 48])
def test_int8_matmul_against_float64(kernel, k):
    """Against float64 on the dequantized weight. int8pack rounds x and the result to bf16: within 2^-7 of
    sum |x| |w|. fbgemm quantizes each row of x to 8 bits over a range within [-max|x|, max|x|]: each
    element off by at most one step, 2 max|x| / 255, so the result by at most that times sum |w|."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(5, 3, k, generator=g), torch.randn(24, k, generator=g)
    x[0, 0] *= 100  # rows of very different ranges: each is quantized over its own
    bias = torch.randn(24, generator=g)
    q, scale = quantize_rows(w)
    w64 = q.double() * scale.double()[:, None]

    def expected_and_bound(x):
        expected = x.double() @ w64.T + bias.double()
        if kernel == "fbgemm":
            row_max = x.double().abs().amax(dim=-1, keepdim=True)
            return expected, 2 * row_max / 255 * w64.abs().sum(dim=1) * (1 + 1e-4) + 1e-5
        return expected, 2 * BF16_EPS * (x.double().abs() @ w64.abs().T) + 1e-6

    matmul = Int8Matmul(q, scale, kernel)
    # several rows and one (fbgemm: the row is the whole input), 3-d and 2-d (the decode step's shape), and
    # 2-d rows laid out column-major (a transposed view: int8pack needs each row contiguous)
    for batch in (x, x[:1, :1], x[0], x[0, :1], x[0].T.contiguous().T):
        got = matmul(batch, bias)
        expected, bound = expected_and_bound(batch)
        assert got.shape == (*batch.shape[:-1], 24) and got.dtype == torch.float32
        assert ((got.double() - expected).abs() <= bound).all()
    # the bound is not loose enough to pass a wrong result: the float32 product without the weight's scales
    expected, bound = expected_and_bound(x)
    assert not ((x.double() @ q.double().T + bias.double() - expected).abs() <= bound).all()


def test_int8_kernel_choice(monkeypatch):
    """fbgemm's dynamic linear wherever PyTorch's quantized engine is fbgemm's and the CPU has AVX512-VNNI
    (without it fbgemm needs 7-bit activations: module docstring); the bf16 kernel everywhere else."""
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    assert engines  # every CPU build has one (qnnpack on ARM, x86/fbgemm/onednn on x86)
    for engine in engines:
        monkeypatch.setattr(torch.backends.quantized, "engine", engine)
        for vnni in (True, False):
            monkeypatch.setattr(torch.cpu, "get_capabilities", lambda vnni=vnni: {"avx512_vnni": vnni})
            expected = "fbgemm" if vnni and engine in ("x86", "fbgemm") else "int8pack"
            assert int8_kernel_name() == expected, (engine, vnni)
            assert int8_kernel_name("meta") == "int8pack"
            assert Int8Matmul(torch.ones(4, 32, dtype=torch.int8), torch.ones(4)).kernel == expected


def test_quantized_model_logits_close_to_float32(tok):
    """Tolerance: every next-token log-probability within 0.02 nats of float32's (measured 0.006-0.007 over
    three seeds: mostly the bf16 rounding of activations around the kernel), and the same greedy token at
    >= 95% of positions."""
    model = tiny_model(tok)
    x = torch.randint(0, tok.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).log_softmax(-1)
        got = quantize_model(copy.deepcopy(model))(x).log_softmax(-1)
    assert (got - expected).abs().max() <= 0.02
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_quantize_model_replaces_every_projection_and_ties_the_head(tok):
    model = quantize_model(tiny_model(tok))
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.Linear not in kinds and {QuantLinear, QuantEmbedding, QuantTiedHead} <= kinds
    assert model.lm_head.table is model.model.embed_tokens
    untied = quantize_model(tiny_model(tok, tie_embeddings=False))
    assert type(untied.lm_head) is QuantLinear and type(untied.model.embed_tokens) is torch.nn.Embedding


def test_unsupported_layers_are_named(tok):
    model = tiny_model(tok)
    add_lora(model, rank=2, alpha=4.0, targets=("q_proj",))
    with pytest.raises(GptlabError, match=r"model\.layers\.0\.self_attn\.q_proj \(LoRALinear\)"):
        quantize_model(model)
    with pytest.raises(GptlabError, match="unknown quantization 'int3'"):
        quantize_model(tiny_model(tok), "int3")


# ---- model directories ------------------------------------------------------------------------------------
def test_quantized_dir_round_trip(tok, tmp_path):
    model = quantize_model(tiny_model(tok))
    save_model_dir(tmp_path / "q", model, tok)
    meta = json.loads((tmp_path / "q" / "gptlab.json").read_text())
    assert meta["format"] == 2 and meta["quantization"]["bits"] == 8
    assert set(read_checksums(tmp_path / "q")) == {"model.safetensors", "tokenizer.json", "gptlab.json"}
    loaded, _ = load_model_dir(tmp_path / "q")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.lm_head.table is loaded.model.embed_tokens
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the size on disk: int8 projections and table, a quarter of float32 (plus scales and norms)
    save_model_dir(tmp_path / "f", tiny_model(tok), tok)
    ratio = (tmp_path / "q" / "model.safetensors").stat().st_size / (tmp_path / "f" / "model.safetensors").stat().st_size
    assert 0.25 < ratio < 0.32


def test_format_errors(tok, tmp_path):
    save_model_dir(tmp_path / "q", quantize_model(tiny_model(tok)), tok)
    meta_file = tmp_path / "q" / "gptlab.json"
    meta = json.loads(meta_file.read_text())
    (tmp_path / "q" / CHECKSUMS).unlink()  # edited below on purpose
    # a reader from before quantization accepted format 1 only: a format-2 directory is refused by its number
    assert meta["format"] != 1
    meta_file.write_text(json.dumps(meta | {"format": 3}))
    with pytest.raises(GptlabError, match=r"gptlab\.json has format 3, written by a newer gptlab"):
        load_model_dir(tmp_path / "q")
    meta_file.write_text(json.dumps(meta | {"quantization": {"method": "nf4", "bits": 4}}))
    with pytest.raises(GptlabError, match="quantization .* is not supported"):
        load_model_dir(tmp_path / "q")


# ---- decoding ---------------------------------------------------------------------------------------------
def test_int8_fused_decode_equals_forward_decode(tok):
    model = quantize_model(tiny_model(tok, 1)).requires_grad_(False)
    fused, plain = Engine(model, tok), Engine(model, tok, fused_decode=False)
    got = fused.generate(PROMPTS, greedy())
    assert fused._decoder is not None and fused._decoder.head.int8 is not None
    assert got == plain.generate(PROMPTS, greedy())


@pytest.mark.skipif(int8_kernel_name() != "fbgemm", reason="fbgemm's dynamic int8 linear needs x86 + AVX512-VNNI")
def test_fbgemm_custom_op_and_compiled_int8_decode(tok):
    """torch.compile reaches fbgemm's packed weights through the op `gptlab::fbgemm_linear` (quant.py): the
    op gives the eager kernel's bits, passes torch.library's checks, compiles alone to the same bits, and a
    compiled int8 decoder runs it (rows leave at different steps: the batched and the single-row graph).
    Tokens are not compared with eager decoding: fbgemm quantizes its input at run time, so the rounding
    differences of compiled code elsewhere in the step move its output by quantization steps (docs/LOG.md)."""
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(24, 64, generator=g))
    matmul = Int8Matmul(q, scale)
    for x in (torch.randn(1, 64, generator=g), torch.randn(3, 64, generator=g)):
        expected = matmul(x)
        assert torch.equal(torch.ops.gptlab.fbgemm_linear(x, matmul.handle), expected)
        torch.library.opcheck(torch.ops.gptlab.fbgemm_linear.default, (x, matmul.handle))
        assert torch.equal(torch.compile(matmul, fullgraph=True)(x), expected)
    model = quantize_model(tiny_model(tok, 4, n_layer=1)).requires_grad_(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with more threads the compiled decoder takes frozen int8pack rows (next test)
    try:
        engine = Engine(model, tok, compile=True)
        params = [greedy(n) for n in (9, 4)]
        got = engine.generate(PROMPTS[:2], params)
    finally:
        torch.set_num_threads(threads)
    assert [len(c.token_ids) for c in got] == [9, 4]
    assert engine._decoder._compiled is not None and engine._decoder.layers[0].qkv.int8_one_row is None


def test_compiled_int8_with_threads_runs_frozen_int8pack_rows(tok):
    """With more than one torch thread a compiled CPU decoder's single-row graph multiplies by its int8 rows
    through int8pack, the rows and scales wrapped as Parameters over the same storage
    (`Int8Matmul.frozen_int8pack`), so the step freezes them and max-autotune may pick inductor's
    weight-only-int8 GEMM: compiled that way (frozen, autotuned) the product equals eager int8pack's to bf16
    rounding, and a decoder built with 2 threads has it and decodes (rows leave at different steps: the
    batched graph, which keeps the model's kernel, and the single-row graph)."""
    import torch._inductor.config as inductor_config

    g = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(48, 64, generator=g))
    eager = Int8Matmul(q, scale, kernel="int8pack")
    frozen = Int8Matmul(q, scale).frozen_int8pack()
    assert isinstance(frozen.q, torch.nn.Parameter) and frozen.q.data_ptr() == q.data_ptr()
    compiled = torch.compile(frozen, fullgraph=True, options={"max_autotune": True,
                                                             "max_autotune_gemm_backends": "CPP,ATEN"})
    for x in (torch.randn(1, 64, generator=g), torch.randn(3, 64, generator=g)):
        expected = eager(x)
        assert torch.equal(frozen(x), expected)
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            got = compiled(x)
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    model = quantize_model(tiny_model(tok, 4, n_layer=1)).requires_grad_(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(model, tok, compile=True)
        got = engine.generate(PROMPTS[:2], [greedy(n) for n in (9, 4)])
    finally:
        torch.set_num_threads(threads)
    assert [len(c.token_ids) for c in got] == [9, 4]
    layer = engine._decoder.layers[0]
    for projection in (layer.qkv, layer.o, layer.gate_up, layer.down, engine._decoder.head):
        one_row = projection.int8_one_row  # the single-row graph's; the batched graph keeps the model's kernel
        assert one_row.kernel == "int8pack" and isinstance(one_row.q, torch.nn.Parameter)
        assert projection.int8.kernel == int8_kernel_name()
    assert model.model.layers[0].mlp.down_proj.matmul().kernel == int8_kernel_name()  # the model's own: unchanged


def test_decoder_shares_the_weights_of_a_model_not_being_trained(tok, tmp_path):
    save_model_dir(tmp_path / "m", tiny_model(tok, 2), tok)
    model, _ = load_for_inference(tmp_path / "m")
    expected = Engine(copy.deepcopy(model), tok, fused_decode=False).generate(PROMPTS, greedy())
    engine = Engine(model, tok)
    assert engine.generate(PROMPTS, greedy()) == expected
    d, layer = engine._decoder, model.model.layers[0]
    fused_storages = {p.weight.untyped_storage().data_ptr() for lw in d.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down)}
    model_storages = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    assert model_storages == fused_storages  # one copy: the model's weights are views of the fused layout
    assert layer.self_attn.k_proj.weight.shape == (32, 64)
    assert model.model.embed_tokens.weight.data_ptr() == d.head.weight.data_ptr()
    # the model still computes the same function through forward, and a second engine copies nothing
    assert Engine(model, tok, fused_decode=False).generate(PROMPTS, greedy()) == expected
    second = Engine(model, tok)
    assert second.generate(PROMPTS, greedy()) == expected
    assert second._decoder.layers[0].qkv.weight.data_ptr() == d.layers[0].qkv.weight.data_ptr()
    # a model that requires grad (being trained) keeps its own parameters
    trained = tiny_model(tok, 2)
    before = trained.model.layers[0].mlp.up_proj.weight.data_ptr()
    Engine(trained, tok).generate(PROMPTS[:1], greedy(3))
    assert trained.model.layers[0].mlp.up_proj.weight.data_ptr() == before


@pytest.mark.parametrize("tied", [True, False])
def test_inference_load_reads_the_head_in_the_decoders_layout(tok, tmp_path, tied):
    """load_for_inference reads the head's weight (the embedding table when tied) (in, out)-contiguous, so the
    fused decoder multiplies with it where it lies: no copy of it is made when the engine starts."""
    save_model_dir(tmp_path / "m", tiny_model(tok, 4, tie_embeddings=tied), tok)
    plain, _ = load_model_dir(tmp_path / "m")  # for training: weights as stored
    model, _ = load_for_inference(tmp_path / "m")
    head = model.lm_head.weight
    assert (head is model.model.embed_tokens.weight) == tied
    assert plain.lm_head.weight.is_contiguous() and head.t().is_contiguous() and not head.is_contiguous()
    assert torch.equal(head, plain.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    storage = head.untyped_storage().data_ptr()
    engine = Engine(model, tok)
    assert engine.generate(PROMPTS, greedy()) == Engine(plain, tok, fused_decode=False).generate(PROMPTS, greedy())
    assert engine._decoder.head.weight.untyped_storage().data_ptr() == storage == head.untyped_storage().data_ptr()
    bf16, _ = load_for_inference(tmp_path / "m", dtype=torch.bfloat16)  # the dtype cast keeps the layout
    assert bf16.lm_head.weight.t().is_contiguous() and bf16.lm_head.weight.dtype == torch.bfloat16


def test_cli_quantize_and_sample_flags(tok, tmp_path, capsys):
    save_model_dir(tmp_path / "m", tiny_model(tok, 3), tok)
    assert cli_main(["quantize", "--model", str(tmp_path / "m"), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    quantized, _ = load_model_dir(tmp_path / "q")
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(tok.special_id("<|user_end|>"),))
    expected = Engine(quantized, tok).generate([PROMPTS[0]], params)[0].text
    for model_dir, flags in ((tmp_path / "q", []), (tmp_path / "m", ["--quantize", "int8"])):
        capsys.readouterr()
        assert cli_main(["sample", "--model", str(model_dir), "--prompt", PROMPTS[0], "--temperature", "0",
                         "--max-new-tokens", "10", "--stop-token", "<|user_end|>", *flags]) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert cli_main(["quantize", "--model", str(tmp_path / "m"), "--bits", "4", "--out", str(tmp_path / "q4")]) == 2
    assert "--bits 4 is not supported" in capsys.readouterr().err
    for command in ("chat", "serve"):  # the flag exists wherever a model is loaded for inference
        assert build_parser().parse_args([command, "--model", "m", "--quantize", "int8"]).quantize == "int8"
