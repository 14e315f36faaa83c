"""GPU correctness checks (the test suite runs on CPU only, CI has no GPU): run on a CUDA machine.

1. Decoding: greedy tokens of the fused decode step (eager, and compiled with CUDA graphs) equal
   `GPT.forward` decoding, fp32, for a batch of prompts of different lengths, twice in a row (the second
   call replays recorded graphs with a new cache); bf16 agreement reported.
2. Seeded sampling (temperature, top-k, top-p) is reproducible.
3. HF parity: `transformers.LlamaForCausalLM` with our weights gives the same logits (fp32).
4. Grammar-constrained decoding (infer/constraints.py, llguidance): one batch holding a JSON-schema row, a
   regex row, a choice row and two unconstrained rows, greedy and sampled: every constrained output matches
   its constraint (jsonschema / re.fullmatch / the option list), greedy accept-first tokens equal
   mask-first tokens, and each unconstrained row equals the same row generated alone without constraints.
5. Prefix cache (infer/prefix_cache.py): a second request sharing a ~200-token prefix computes only what
   follows the cached blocks (engine counters, exact) and gives the tokens of an engine without the cache;
   one call of five such prompts; finished replies cached for a multi-turn follow-up (greedy and seeded).
6. int8 weight-only (quant.py): a model directory quantized by `gptlab quantize` and one quantized at load,
   on the device. The kernel the code picks is printed. Asserted: both routes give the same greedy tokens;
   int8 logits lie within 2% of the logit range of a float32 model whose weights are the dequantized int8
   rows (int8pack, the kernel off x86 CPUs, differs from it only by rounding each projection's input and
   output to bf16; fbgemm also quantizes the activations); the fused
   int8 decode step gives `GPT.forward`'s greedy tokens; the first 8 greedy tokens of every row equal the
   float32 model's (agreement over 40 tokens reported); compiled with CUDA graphs (CUDA only), the first 8
   tokens of every row equal eager int8's; a column-major (transposed) 2-d input gives what its contiguous
   copy gives; quantize_model on a model already on the device gives the CPU's rows (within one step) and
   scales and the same tokens; LoRA with an int8 base (`gptlab sft --lora-base-dtype int8`) on the device
   runs forward and backward (logits within 2% of the range of fp32's, finite grads). Reported, not asserted: int8 vs fp32 decode speed, one 2048 x 8192 projection's time through
   each kernel, and what torch's own CUDA kernel does with a column-major input.
Every check runs (a failure or an exception in one does not stop the others); exits non-zero if any failed.

    python bench/check_gpu.py                 # CUDA
    python bench/check_gpu.py --device cpu    # the same checks on CPU (compiled / CUDA-graph parts skipped)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import json.decoder
import json.encoder
import re
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_decode import hf_twin  # bench/, beside this script

from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        FAILED.append(name)
    return bool(ok)


def scaled_model(tokenizer, max_seq_len: int, device: torch.device) -> GPT:
    """The tests' small GPT (tests/test_structured.py, test_prefix_cache.py): random init on the CPU (the
    same weights on every device), weights x20 for clear argmaxes, then moved to `device`."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16,
                       intermediate_size=128, max_seq_len=max_seq_len)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model.to(device)


def divergence(engine: Engine, prompts, reference: list[list[int]], other: list[list[int]]) -> str:
    """Where two token lists first differ, and the reference's top-1 minus top-2 logit there (unconstrained
    logits of `engine.model`): a small gap means a rounding tie, a large one a real difference."""
    notes = []
    for r, (a, b) in enumerate(zip(reference, other)):
        if a == b:
            continue
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prompt = prompts[r]
        ids = (engine.encode(prompt) if isinstance(prompt, str) else list(prompt)) + a[:i]
        with torch.no_grad():
            top = engine.model(torch.tensor([ids], device=engine.device))[0, -1].float().topk(2).values
        notes.append(f"row {r} first differs at token {i} of {len(a)}/{len(b)} (ref gap {float(top[0] - top[1]):.3g})")
    return "; ".join(notes) or "equal"


# ---- 1-3: decoding, seeded sampling, HF parity ------------------------------------------------------------
def check_decoding(device: torch.device) -> None:
    tokenizer = train_tokenizer([inspect.getsource(json.decoder)], 1024)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(4, tokenizer.vocab_size, max_seq_len=256, kv_ratio=2)).to(device).eval()
    prompts = ["def scan", "class JSONDecoder(object):\n    ", "import re", "x = {"]
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=())

    def tokens(engine: Engine, params: SamplingParams = greedy) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, params)]

    forward_engine = Engine(model, tokenizer, fused_decode=False)
    reference = tokens(forward_engine)
    fused = tokens(Engine(model, tokenizer))
    check("1 fp32 fused == forward", fused == reference, divergence(forward_engine, prompts, reference, fused))
    if device.type == "cuda":
        compiled_engine = Engine(model, tokenizer, compile=True)
        compiled = [tokens(compiled_engine) for _ in range(2)]
        single = [c.token_ids for c in compiled_engine.generate(prompts[:1], greedy)]
        check("1 fp32 compiled (CUDA graphs) == forward, two calls", all(c == reference for c in compiled),
              "; ".join(divergence(forward_engine, prompts, reference, c) for c in compiled))
        check("1 fp32 compiled batch 1 == forward", single == reference[:1])
    else:
        print("skip 1 compiled (CUDA graphs): CUDA only")

    bf16 = GPT(model.config).to(device).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16_ref = tokens(Engine(bf16, tokenizer, fused_decode=False))
    bf16_fused = tokens(Engine(bf16, tokenizer))
    agree = sum(a == b for r, f in zip(bf16_ref, bf16_fused) for a, b in zip(r, f)) / sum(map(len, bf16_ref))
    print(f"info 1 bf16 fused vs forward: {agree:.1%} of greedy tokens agree (rounding differs in bf16)")

    sampled = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.95, seed=123, stop_token_ids=())
    engine = Engine(model, tokenizer)
    first, second = tokens(engine, sampled), tokens(engine, sampled)
    check("2 seeded sampling reproducible, differs from greedy", first == second and first != reference,
          f"reproducible {first == second}, differs from greedy {first != reference}")

    hf = hf_twin(model).to(device)  # our weights in transformers' Llama (asserts every weight maps)
    ids = torch.randint(0, model.config.vocab_size, (2, 100), device=device)
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    check("3 HF Llama logits, fp32, max abs diff <= 1e-4", diff <= 1e-4, f"{diff:.2e}")


# ---- 4: grammar-constrained decoding ----------------------------------------------------------------------
# tests/test_structured.py's schema: bounded fields, so even a random model closes the object in 200 tokens
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 99},
                         "tag": {"enum": ["red", "green", "blue"]}, "name": {"type": "string", "maxLength": 6},
                         "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "maxItems": 3}},
          "required": ["ok", "n", "tag", "name", "xs"], "additionalProperties": False}


@contextlib.contextmanager
def mask_first():
    """Every constrained row masks its logits before sampling (accept-first off), as the test does."""
    original = SamplingParams.__dict__["accept_first"]
    SamplingParams.accept_first = property(lambda self: False)
    try:
        yield
    finally:
        SamplingParams.accept_first = original


def check_constraints(device: torch.device) -> None:
    import jsonschema

    from gptlab.infer.constraints import Constraint

    tokenizer = train_tokenizer([inspect.getsource(json.decoder) + inspect.getsource(json.encoder)], vocab_size=400)
    model = scaled_model(tokenizer, 256, device)
    engine = Engine(model, tokenizer)
    prompts = ["def decode(self, s):", "class JSONDecoder", "x", "    return _w(s, end).end() == len(s) and ok",
               "import re"]
    pattern, options = r"[0-9]{3}-[a-z]{2,4}", ["alpha", "beta", "gamma delta"]

    def valid_json(text):
        jsonschema.validate(json.loads(text), SCHEMA)
        return True

    valid = {0: ("json_schema", valid_json), 2: ("regex", lambda t: re.fullmatch(pattern, t) is not None),
             3: ("choice", lambda t: t in options)}
    free_rows = (1, 4)
    for temperature in (0.0, 1.0):
        kind = "greedy" if temperature == 0 else "sampled t=1"
        free = SamplingParams(max_new_tokens=30, temperature=temperature, seed=100, stop_token_ids=())
        # row r samples with seed + r, as it does alone with seed 100 + r
        params = [SamplingParams(max_new_tokens=200, temperature=temperature, seed=100, constraint=Constraint.json_schema(SCHEMA)),
                  free,
                  SamplingParams(max_new_tokens=40, temperature=temperature, seed=100, constraint=Constraint.regex(pattern)),
                  SamplingParams(max_new_tokens=40, temperature=temperature, seed=100, constraint=Constraint.choice(options)),
                  free]
        tokens_before, resampled_before = engine.constrained_tokens, engine.constrained_resampled
        batched = engine.generate(prompts, params)
        refused = engine.constrained_resampled - resampled_before
        print(f"info 4 {kind}: outputs {[c.text for c in batched]}; constrained row-steps "
              f"{engine.constrained_tokens - tokens_before}, refused and redrawn {refused}")
        for r, (name, ok) in valid.items():
            c = batched[r]
            try:
                good = c.finish_reason == "stop" and ok(c.text)
            except Exception as e:  # json / jsonschema errors: the output does not match
                good = False
                print(f"  row {r}: {type(e).__name__}: {e}")
            check(f"4 {kind}: {name} row matches its constraint", good, f"{c.text!r} ({c.finish_reason})")
        for r in free_rows:
            alone = engine.generate([prompts[r]], SamplingParams(max_new_tokens=30, temperature=temperature,
                                                                 seed=100 + r, stop_token_ids=()))[0]
            check(f"4 {kind}: unconstrained row {r} == the same row alone", batched[r] == alone,
                  divergence(engine, [prompts[r]], [alone.token_ids], [batched[r].token_ids]))
        if temperature == 0:
            with mask_first():
                masked = engine.generate(prompts, params)
            check("4 greedy: accept-first tokens == mask-first tokens (a refused argmax was redrawn)",
                  [c.token_ids for c in masked] == [c.token_ids for c in batched] and refused > 0,
                  f"{refused} refused; " + divergence(engine, prompts, [c.token_ids for c in masked],
                                                      [c.token_ids for c in batched]))
            if device.type != "cpu":
                on_cpu = Engine(copy.deepcopy(model).cpu(), tokenizer).generate(prompts, params)
                same = sum(a.token_ids == b.token_ids for a, b in zip(on_cpu, batched))
                print(f"info 4 greedy: {same}/{len(prompts)} rows give the CPU's tokens")


# ---- 5: prefix cache --------------------------------------------------------------------------------------
def check_prefix_cache(device: torch.device) -> None:
    source = inspect.getsource(json.decoder)
    system = source[:500]  # a shared "system prompt" of ~200 tokens
    prompts = [system + f"\n# question {i}: " + "why " * i for i in range(5)]
    tokenizer = train_tokenizer([source], vocab_size=400)
    model = scaled_model(tokenizer, 512, device)
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=11)
    off = Engine(model, tokenizer, prefix_cache=False)

    def token_ids(engine, ps, params):
        return [c.token_ids for c in engine.generate(ps, params)]

    for kind, params in (("greedy", greedy), ("seeded", seeded)):
        on = Engine(model, tokenizer)
        B = on.prefix_cache.block_tokens
        first, second = on.encode(prompts[0]), on.encode(prompts[1])
        common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        a = token_ids(on, [prompts[0]], params)
        computed = on.prefill_tokens_computed
        b = token_ids(on, [prompts[1]], params)
        computed = on.prefill_tokens_computed - computed
        expected = len(second) - common // B * B
        check(f"5 {kind}: 2nd request computes only what follows the cached prefix",
              computed == expected and computed < len(second) / 2,
              f"{computed} of {len(second)} prompt tokens computed (expected {expected}; {common} shared)")
        ref = token_ids(off, prompts[:1], params) + token_ids(off, prompts[1:2], params)  # alone, as sent
        check(f"5 {kind}: both requests' tokens == cache off", a + b == ref,
              divergence(off, prompts[:2], ref, a + b))

        on = Engine(model, tokenizer)
        together = token_ids(on, prompts, params)
        stats = on.prefix_cache.stats
        ref = token_ids(off, prompts, params)
        check(f"5 {kind}: one call of 5 prompts sharing the prefix == cache off, prefix computed ~once",
              together == ref and stats.computed_tokens < stats.prompt_tokens / 2,
              f"computed {stats.computed_tokens} of {stats.prompt_tokens} prompt tokens; "
              + divergence(off, prompts, ref, together))

    # multi-turn: a finished row's prompt + reply is stored; the follow-up computes only what follows it
    on = Engine(model, tokenizer)
    B = on.prefix_cache.block_tokens
    lengths = [24, 40, 33]  # rows finishing at different steps of one batch
    params = [SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=()) for n in lengths]
    replies = on.generate(prompts[:3], params)
    ref = token_ids(off, prompts[:3], params)
    check("5 multi-turn: first turn == cache off", [c.token_ids for c in replies] == ref)
    tail = on.encode("\n# and then: why not")[1:]  # no second BOS
    for i, (prompt, reply) in enumerate(zip(prompts[:3], replies)):
        ids = on.encode(prompt) + reply.token_ids + tail
        cached = (len(ids) - len(tail) - 1) // B * B  # every full block of prompt + reply but its last token
        computed = on.prefill_tokens_computed
        follow = token_ids(on, [ids], greedy)
        computed = on.prefill_tokens_computed - computed
        ref = token_ids(off, [ids], greedy)
        seeded_on, seeded_off = token_ids(on, [ids], seeded), token_ids(off, [ids], seeded)
        check(f"5 multi-turn row {i}: follow-up computes only the new tokens, greedy and seeded == cache off",
              computed == len(ids) - cached and follow == ref and seeded_on == seeded_off,
              f"{computed} of {len(ids)} computed (expected {len(ids) - cached}); greedy "
              + divergence(off, [ids], ref, follow) + "; seeded " + divergence(off, [ids], seeded_off, seeded_on))


# ---- 6: int8 weight-only ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def info_safely(fn, *args) -> None:
    """Run a reporting-only step; an exception is printed, not counted as a failed check."""
    try:
        fn(*args)
    except Exception as e:
        print(f"info {getattr(fn, '__name__', fn)} raised {type(e).__name__}: {e}")


def _timed_tok_s(engine: Engine, prompt: str, n: int, device: torch.device) -> float:
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    engine.generate([prompt], params)  # warm-up
    sync(device)
    start = time.perf_counter()
    engine.generate([prompt], params)
    sync(device)
    return n / (time.perf_counter() - start)


def _time_int8_kernel(device: torch.device) -> None:
    """Info: one projection (2048 -> 8192, a 1B-class model's MLP) through Int8Matmul against F.linear in
    fp32 and bf16, at 1 and 32 rows (wall clock around each call with the device synchronized, median of 20
    after 5 warm-ups)."""
    import torch.nn.functional as F

    from gptlab.quant import Int8Matmul, quantize_rows

    w = torch.randn(8192, 2048, device=device)
    q, scale = quantize_rows(w)
    matmul, w16 = Int8Matmul(q, scale), w.to(torch.bfloat16)
    for m in (1, 32):
        x = torch.randn(m, 2048, device=device)
        x16 = x.to(torch.bfloat16)
        times = {}
        for name, fn in (("int8 " + matmul.kernel, lambda: matmul(x)), ("fp32 F.linear", lambda: F.linear(x, w)),
                         ("bf16 F.linear", lambda: F.linear(x16, w16))):
            runs = []
            for i in range(25):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if i >= 5:
                    runs.append((time.perf_counter() - start) * 1e6)
            times[name] = sorted(runs)[len(runs) // 2]
        print(f"info 6 2048x8192 projection, {m} row(s): " + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()))


def check_int8(device: torch.device) -> None:
    from gptlab.checkpoint import load_for_inference, load_model_dir, save_model_dir
    from gptlab.lora import add_lora
    from gptlab.quant import (QuantEmbedding, QuantLinear, dequantize_rows, int8_kernel_name, projections,
                              quantize_model)
    from gptlab.quantize_cli import quantize_dir

    tokenizer = train_tokenizer([inspect.getsource(json.decoder)], 1024)
    torch.manual_seed(0)
    # check 1's model, as initialised (scaled-up weights make this depth-4 model chaotic: on CPU, int8pack,
    # x4 weights already let int8 flip greedy tokens after ~10, x20 at the first)
    model = GPT(GPTConfig.from_depth(4, tokenizer.vocab_size, max_seq_len=256, kv_ratio=2)).eval()
    print(f"info 6 int8_kernel_name({device.type!r}) = {int8_kernel_name(device)!r}")
    prompts = ["def scan", "class JSONDecoder(object):\n    ", "import re", "x = {"]
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=())
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(Path(tmp) / "fp32", model, tokenizer)
        quantize_dir(Path(tmp) / "fp32", Path(tmp) / "int8")  # `gptlab quantize`, on the CPU
        fp32, _ = load_for_inference(Path(tmp) / "fp32", device)
        int8_dir, _ = load_for_inference(Path(tmp) / "int8", device)
        int8_load, _ = load_for_inference(Path(tmp) / "fp32", device, quantize="int8")
        on_device, _ = load_model_dir(Path(tmp) / "fp32", device)  # float32, to be quantized on the device
        lora, _ = load_model_dir(Path(tmp) / "fp32", device)

    def tokens(m, fused=True):
        return [c.token_ids for c in Engine(m, tokenizer, fused_decode=fused).generate(prompts, greedy)]

    ref = tokens(fp32)
    got = tokens(int8_dir)
    kernels = sorted({m.matmul().kernel for m in int8_dir.modules() if isinstance(m, QuantLinear)})
    print(f"info 6 int8 kernels used on {device.type}: {kernels}")
    check("6 int8: quantized directory and quantize-at-load give the same greedy tokens", got == tokens(int8_load))

    # the dequantized reference: float32 weights equal to the int8 rows times their scales
    deq = copy.deepcopy(fp32)
    with torch.no_grad():
        for name, m in projections(int8_dir).items():
            if isinstance(m, QuantLinear):
                deq.get_submodule(name).weight.copy_(dequantize_rows(m.weight, m.weight_scale))
        table = int8_dir.model.embed_tokens
        if isinstance(table, QuantEmbedding):
            deq.model.embed_tokens.weight.copy_(dequantize_rows(table.weight, table.weight_scale))
    ids = torch.randint(0, tokenizer.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        logits_int8, logits_deq, logits_fp32 = (m(ids).float() for m in (int8_dir, deq, fp32))
    span = (logits_deq.amax(-1) - logits_deq.amin(-1)).mean().item()
    kernel_err = (logits_int8 - logits_deq).abs().max().item()
    quant_err = (logits_int8 - logits_fp32).abs().max().item()
    check("6 int8 logits within 2% of the logit range of the dequantized float32 model", kernel_err <= 0.02 * span,
          f"max abs diff {kernel_err:.3g} (logit range {span:.3g}; int8 vs fp32 weights {quant_err:.3g})")
    forward = tokens(int8_dir, fused=False)
    check("6 int8: fused decode == GPT.forward greedy tokens", got == forward,
          divergence(Engine(int8_dir, tokenizer), prompts, forward, got))
    agree = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / sum(map(len, ref))
    check("6 int8 vs fp32: first 8 greedy tokens of every row equal", all(r[:8] == g[:8] for r, g in zip(ref, got)),
          f"{agree:.1%} of 40-token greedy outputs agree; " + divergence(Engine(fp32, tokenizer), prompts, ref, got))
    # quantized on the device itself (quantize_model on a model already there; `gptlab sft --lora-base-dtype
    # int8` quantizes the adapted layers of a model loaded on its device)
    quantize_model(on_device)
    mine, theirs = dict(on_device.named_buffers()), dict(int8_dir.named_buffers())
    rows = [n for n, b in mine.items() if b.dtype == torch.int8]
    steps = max((mine[n].int() - theirs[n].int()).abs().max().item() for n in rows)
    moved = sum(int((mine[n] != theirs[n]).sum()) for n in rows)
    scales = all(torch.equal(mine[n], theirs[n]) for n in mine if n.endswith("weight_scale"))
    same = tokens(on_device) == got
    check("6 int8: quantize_model on the device: rows within 1 step and scales equal to the CPU's, same tokens",
          set(mine) == set(theirs) and steps <= 1 and scales and same,
          f"{len(rows)} int8 tensors, {moved} entries differ (max {steps} steps), scales equal {scales}, "
          f"tokens equal {same}")
    add_lora(lora, rank=4, alpha=8.0, base_dtype="int8")
    logits_lora = lora(ids).float()
    logits_lora.logsumexp(-1).mean().backward()
    grads = [p.grad for p in lora.parameters() if p.requires_grad]
    finite = bool(grads) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    lora_err = (logits_lora.detach() - logits_fp32).abs().max().item()
    check("6 LoRA with an int8 base on the device: logits within 2% of the logit range of fp32, finite grads",
          finite and any(bool(g.any()) for g in grads) and lora_err <= 0.02 * span,
          f"max abs diff {lora_err:.3g}; {len(grads)} trainable tensors, grads finite {finite}")

    # a 2-d input laid out column-major (a transposed view) through each int8 matmul: the same as contiguous
    layer = int8_dir.model.layers[0].mlp.up_proj
    x = torch.randn(layer.in_features, 5, generator=torch.Generator().manual_seed(1)).to(device).T
    with torch.no_grad():
        diff = (layer(x) - layer(x.contiguous())).abs().max().item()
    check("6 int8 matmul of a transposed (column-major) 2-d input == of its contiguous copy", diff == 0,
          f"max abs diff {diff:.3g}")
    if device.type == "cuda":  # torch's own kernel, without gptlab's contiguous(): a finding, not a check
        q, scale = layer.weight, layer.weight_scale.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        try:
            raw = (torch.ops.aten._weight_int8pack_mm(xb, q, scale) - torch.ops.aten._weight_int8pack_mm(
                xb.contiguous(), q, scale)).abs().max().item()
            print(f"info 6 torch _weight_int8pack_mm on CUDA, column-major bf16 input (stride {tuple(xb.stride())}) "
                  f"vs contiguous: max abs diff {raw:.3g}")
        except Exception as e:
            print(f"info 6 torch _weight_int8pack_mm on CUDA, column-major input: {type(e).__name__}: {e}")
        info_safely(_time_int8_kernel, device)

    def decode_speed():
        n = 64
        speed = {name: _timed_tok_s(Engine(m, tokenizer), prompts[1], n, device) for name, m in
                 (("fp32", fp32), ("int8", int8_dir))}
        print(f"info 6 decode, batch 1, {n} tokens, depth-4 model: fp32 {speed['fp32']:.0f} tok/s, "
              f"int8 {speed['int8']:.0f} tok/s")

    info_safely(decode_speed)
    if device.type == "cuda":
        compiled = [c.token_ids for c in Engine(int8_dir, tokenizer, compile=True).generate(prompts, greedy)]
        same = sum(a == b for r, g in zip(got, compiled) for a, b in zip(r, g)) / sum(map(len, got))
        check("6 int8 compiled (CUDA graphs): first 8 greedy tokens of every row == eager int8",
              all(r[:8] == c[:8] for r, c in zip(got, compiled)), f"{same:.1%} of tokens agree")
    else:
        print("skip 6 int8 compiled (CUDA graphs): CUDA only")


SECTIONS = {"decode": check_decoding, "constraints": check_constraints, "prefix": check_prefix_cache,
            "int8": check_int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA device (or --device cpu)"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare fp32 arithmetic
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.only or SECTIONS:
        start = time.perf_counter()
        print(f"=== {name}", flush=True)
        try:
            SECTIONS[name](device)
        except Exception:
            traceback.print_exc()
            check(f"{name}: ran without an exception", False)
        print(f"--- {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if FAILED:
        print(f"FAILED {len(FAILED)} check(s): {FAILED}")
        raise SystemExit(1)
    print("ALL GPU CHECKS PASSED" if device.type == "cuda" else f"ALL CHECKS PASSED on {device.type}")


if __name__ == "__main__":
    main()
