"""GPU correctness checks (the test suite runs on CPU only, CI has no GPU): run on a CUDA machine.

1. Decoding: greedy tokens of the fused decode step (eager, and compiled with CUDA graphs) equal
   `GPT.forward` decoding, fp32, for a batch of prompts of different lengths, twice in a row (the second
   call replays recorded graphs with a new cache); bf16 agreement reported.
2. Seeded sampling (temperature, top-k, top-p) is reproducible on CUDA.
3. HF parity on CUDA: `transformers.LlamaForCausalLM` with our weights gives the same logits (fp32).
Exits non-zero on the first failed check.

    python bench/check_gpu.py
"""

from __future__ import annotations

import inspect
import json.decoder

import torch
from bench_decode import hf_twin  # bench/, beside this script

from gptlab.infer.engine import Engine
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare fp32 arithmetic
    tokenizer = train_tokenizer([inspect.getsource(json.decoder)], 1024)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(4, tokenizer.vocab_size, max_seq_len=256, kv_ratio=2)).cuda().eval()
    prompts = ["def scan", "class JSONDecoder(object):\n    ", "import re", "x = {"]
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=())

    def tokens(engine: Engine, params: SamplingParams = greedy) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, params)]

    reference = tokens(Engine(model, tokenizer, fused_decode=False))
    fused = tokens(Engine(model, tokenizer))
    compiled_engine = Engine(model, tokenizer, compile=True)
    compiled = [tokens(compiled_engine) for _ in range(2)]
    single = [c.token_ids for c in compiled_engine.generate(prompts[:1], greedy)]
    print("fp32 fused == forward:", fused == reference)
    print("fp32 compiled (CUDA graphs) == forward, two calls:", [c == reference for c in compiled])
    print("fp32 compiled batch 1 == forward:", single == reference[:1])
    assert fused == reference and all(c == reference for c in compiled) and single == reference[:1]

    bf16 = GPT(model.config).cuda().eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16_ref = tokens(Engine(bf16, tokenizer, fused_decode=False))
    bf16_fused = tokens(Engine(bf16, tokenizer))
    agree = sum(a == b for r, f in zip(bf16_ref, bf16_fused) for a, b in zip(r, f)) / sum(map(len, bf16_ref))
    print(f"bf16 fused vs forward: {agree:.1%} of greedy tokens agree (rounding differs in bf16)")

    sampled = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=50, top_p=0.95, seed=123, stop_token_ids=())
    engine = Engine(model, tokenizer)
    first, second = tokens(engine, sampled), tokens(engine, sampled)
    print("seeded sampling reproducible:", first == second, "differs from greedy:", first != reference)
    assert first == second and first != reference

    hf = hf_twin(model).cuda()  # our weights in transformers' Llama (asserts every weight maps)
    ids = torch.randint(0, model.config.vocab_size, (2, 100), device="cuda")
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"HF Llama logits on CUDA, fp32: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    print("ALL GPU CHECKS PASSED")


if __name__ == "__main__":
    main()
