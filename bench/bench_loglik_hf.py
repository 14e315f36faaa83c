"""Log-likelihood classification: gptlab's scoring (`LLM.chat_logprobs`, what `gptlab pipeline sentiment` and
`prompt eval --techniques loglik` use) vs the same scoring done the way Hugging Face's
`pipeline("zero-shot-classification")` does it: one transformers forward pass per (text, label) pair.

HF's zero-shot pipeline scores each candidate label as an NLI hypothesis with an entailment model
(bart-large-mnli, not available offline here); what is comparable on a causal LM is its scheme: one model
call per (text, label) pair, label log-likelihood as the score. Both sides get the same model
(SmolLM2-135M-Instruct: ours from `gptlab models get`, transformers' from `gptlab export` of it), the same
token ids (the chat prompt rendered by gptlab, the label as the assistant's first words) and the task suite's
sentiment test questions; questions alternate between the two sides so machine load hits both alike.

    python bench/bench_loglik_hf.py --n 50 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptlab.apps.llm import open_llm  # noqa: E402
from gptlab.apps.models import resolve_model_dir  # noqa: E402
from gptlab.interop import export_hf  # noqa: E402
from gptlab.tasks import sample_examples  # noqa: E402

LABELS = ["positive", "negative"]


def hf_scores(model, prompt_ids: list[int], label_ids: list[list[int]]) -> list[float]:
    """Summed log p(label | prompt), one forward per label (the zero-shot pipeline's per-pair calls)."""
    scores = []
    for ids in label_ids:
        full = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0, :-1].float(), dim=-1)
        targets = full[0, 1:]
        picked = logp[torch.arange(len(targets)), targets][-len(ids):]
        scores.append(float(picked.sum()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/loglik_hf.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(args.model)
    llm = open_llm(str(model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model_dir, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    examples = sample_examples(["sentiment"], args.n, "test", seed=0)
    label_ids = [llm.tokenizer.encode(label) for label in LABELS]
    load = os.getloadavg()[0]
    ours_s, hf_s, ours_right, hf_right, agree, max_diff = [], [], 0, 0, 0, 0.0
    for i, ex in enumerate(examples):
        prompt_ids = llm._chat_ids(ex.messages)
        order = [0, 1] if i % 2 == 0 else [1, 0]
        results = {}
        for side in order:
            t = time.perf_counter()
            if side == 0:
                results[0] = llm.chat_logprobs(ex.messages, LABELS)
                ours_s.append(time.perf_counter() - t)
            else:
                results[1] = hf_scores(hf, prompt_ids, label_ids)
                hf_s.append(time.perf_counter() - t)
        ours_pick = LABELS[max(range(2), key=results[0].__getitem__)]
        hf_pick = LABELS[max(range(2), key=results[1].__getitem__)]
        ours_right += ours_pick == ex.answer_text
        hf_right += hf_pick == ex.answer_text
        agree += ours_pick == hf_pick
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(results[0], results[1])))
    n = len(examples)
    text = "\n".join([
        "# Log-likelihood classification: gptlab vs the zero-shot pipeline's per-pair scoring in transformers", "",
        f"Command: `python bench/bench_loglik_hf.py --n {n} --threads {args.threads}`", "",
        f"Machine: {os.cpu_count()}-core CPU, torch threads {args.threads}; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end. Model: {args.model}; task-suite sentiment, {n} test questions, labels "
        f"{LABELS}, chat prompt, zero-shot.", "",
        "| scorer | accuracy | median s/question | mean s/question |", "|---|---:|---:|---:|",
        f"| gptlab `chat_logprobs` (one batched call for both labels) | {ours_right / n:.3f} | "
        f"{statistics.median(ours_s):.3f} | {statistics.mean(ours_s):.3f} |",
        f"| transformers, one forward per (text, label) pair | {hf_right / n:.3f} | {statistics.median(hf_s):.3f} | "
        f"{statistics.mean(hf_s):.3f} |", "",
        f"Same label picked on {agree}/{n} questions; largest |score difference| {max_diff:.2e} nats "
        f"(float32 on both sides). Speed ratio (HF median / ours): {statistics.median(hf_s) / statistics.median(ours_s):.2f}x.",
    ]) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
