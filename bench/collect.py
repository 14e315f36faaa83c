"""Assemble docs/benchmarks.md from the per-topic results in bench/results/ (each written by its bench
script or by hand from its output, with command, machine and load), under a hand-written summary.

    python bench/collect.py
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECTIONS = [
    ("tokenizer.md", "Tokenizer: training, encoding, compression, `data prepare` (issue: foundation)"),
    ("train_cpu.md", "Pretraining throughput on CPU vs transformers (issue: model and pretraining)"),
    ("decode.md", "Decoding with the KV cache vs transformers `generate` (issue: model and pretraining)"),
    ("fsdp_cpu.md", "FSDP vs DDP: per-rank state and step time, 2 CPU ranks (issue: model and pretraining)"),
    ("gpu_h100.md", "GPU: correctness, pretraining MFU, decoding on an H100 (issue: model and pretraining)"),
    ("interop.md", "Loading SmolLM2 from GGUF (issue: model and pretraining)"),
    ("sft.md", "SFT steps vs TRL SFTTrainer (issue: assistant recipe)"),
    ("preferences.md", "Reward model accuracy (issue: assistant recipe)"),
    ("trl_rm_dpo.md", "Reward model and DPO vs TRL RewardTrainer / DPOTrainer (issue: assistant recipe)"),
    ("trl_grpo.md", "GRPO vs TRL GRPOTrainer (issue: assistant recipe)"),
    ("speedrun.md", "The speedrun: wall time per stage and gold accuracy per model (issue: assistant recipe)"),
    ("speedrun_gpu.md", "The GPU speedrun preset on an H100 (issue: assistant recipe)"),
    ("serve.md", "Serving: continuous batching (issue: serving)"),
    ("structured.md", "Structured output: constrained decoding, mask cost, schema validity (issue: structured output)"),
    ("compression.md", "The LLM as a compressor: bits per byte vs gzip/bz2/xz/zstd/brotli (issue: Lab I)"),
    ("rag.md", "Retrieval-augmented generation: recall, answer F1, indexing, latency (issue 18)"),
]


def main() -> None:
    parts = [(RESULTS / "SUMMARY.md").read_text().strip() + "\n"]
    for name, title in SECTIONS:
        text = re.sub(r"^# .*\n", "", (RESULTS / name).read_text(), count=1)  # the section title replaces it
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)  # one level deeper
        parts.append(f"## {title}\n\nSource: `bench/results/{name}`.\n\n{text.strip()}\n")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
