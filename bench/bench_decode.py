"""Decode throughput of gptlab.engine vs Hugging Face `generate` on the same weights (CPU).

Both sides get the same GPT (random init; speed does not depend on the values), loaded into
`transformers.LlamaForCausalLM` built from our config, the same prompt (repeated `batch` times, so neither
side pads), greedy decoding, exactly `new_tokens` new tokens (no stop token). Repetitions are interleaved
(ours, HF, ours, HF, ...) so load from other work on the machine hits both alike; the median is reported.
The generated token ids are compared, so the two sides are known to do the same work. Timings include
the prompt's prefill; every step ends with a host sync on both sides (`.tolist()`), so GPU timings are exact.

    python bench/bench_decode.py --depths 4 8 --batches 1 32 --new-tokens 64 --reps 5
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import json.encoder
import os
import statistics
import textwrap
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gptlab.engine import Engine, SamplingParams
from gptlab.model import GPT, GPTConfig
from gptlab.tokenizer import train_tokenizer


def hf_twin(model: GPT) -> LlamaForCausalLM:
    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                         head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
                         rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings, attention_bias=c.attn_bias)
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ours with no stop token
    hf.generation_config.pad_token_id = 0
    return hf


def bench(depth: int, batch: int, prompt_len: int, new_tokens: int, reps: int, tokenizer, device: str,
          dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    config = GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, max_seq_len=512)
    model = GPT(config).eval()
    hf = hf_twin(model).to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode(inspect.getsource(json.decoder))[:prompt_len]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=())
    input_ids = torch.tensor([prompt] * batch, device=device)

    def run_ours():
        return [c.token_ids for c in engine.generate([prompt] * batch, params)]

    def run_hf():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          do_sample=False)
        return out[:, prompt_len:].tolist()

    same = run_ours() == run_hf()  # also the warm-up of both
    times = {"ours": [], "hf": []}
    for _ in range(reps):
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["hf"])
    return {"depth": depth, "params_m": model.num_params() / 1e6, "batch": batch, "ours_tps": batch * new_tokens / ours,
                "hf_tps": batch * new_tokens / theirs, "ratio": theirs / ours, "same_tokens": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a CPU shared with other jobs, OpenMP "
                             "regions wait on descheduled threads and 2 threads ran 10-1000x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder) + inspect.getsource(textwrap)
    tokenizer = train_tokenizer([text], args.vocab_size)
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"load: {os.getloadavg()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.reps} "
          f"interleaved reps, vocab {tokenizer.vocab_size}")
    print("| depth | params | batch | gptlab tok/s | HF generate tok/s | speedup | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for depth in args.depths:
        for batch in args.batches:
            r = bench(depth, batch, args.prompt_len, args.new_tokens, args.reps, tokenizer, args.device,
                      getattr(torch, args.dtype))
            print(f"| {r['depth']} | {r['params_m']:.1f}M | {r['batch']} | {r['ours_tps']:.0f} | {r['hf_tps']:.0f} "
                  f"| {r['ratio']:.2f}x | {r['same_tokens']} |", flush=True)


if __name__ == "__main__":
    main()
