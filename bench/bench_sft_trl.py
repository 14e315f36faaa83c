"""SFT step time: `gptlab sft` vs TRL's `SFTTrainer` on the same model, data and token budget, full and LoRA.

    python bench/bench_sft_trl.py [--steps 16] [--reps 2] [--depth 2]

Both sides: a random depth-D gptlab model (exported to HF for TRL; identical weights and tokenizer), the
same task-suite conversations (tool calls included; HF's rendering of them through gptlab's chat template
was checked to give our token ids), rows
of 256 tokens packed from whole conversations, 8 rows per step, loss on assistant tokens only (TRL reads
the assistant mask from gptlab's chat template, `assistant_only_loss=True`), AdamW, fp32 on CPU (TRL's
own defaults, bf16 autocast and gradient checkpointing, are switched off: on CPU they made its steps about
10x slower, which would measure a setting rather than the trainer). LoRA: r=8,
alpha=16 on q,k,v,o,gate,up,down (TRL through PEFT). Reported: median seconds per optimizer step after 3
warm-up steps, repetitions interleaved (ours, TRL, ours, TRL) to spread the noise of a shared machine.
Needs `pip install trl` (not a gptlab dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptlab.chat import CHAT_TEMPLATE
from gptlab.checkpoint import save_model_dir
from gptlab.interop import export_hf
from gptlab.lora import DEFAULT_TARGETS
from gptlab.train.metrics import read_metrics
from gptlab.model import GPT, GPTConfig
from gptlab.train.sft import SFTConfig, sft, task_conversations
from gptlab.tokenizer import train_tokenizer

SEQ_LEN, BATCH, WARMUP = 256, 8, 3


def ours(model_dir: Path, jsonl: Path, out: Path, steps: int, lora: bool) -> list[float]:
    cfg = SFTConfig(model=str(model_dir), data=str(jsonl), out=str(out), seq_len=SEQ_LEN, batch_size=BATCH,
                    num_steps=steps, val_conversations=8, warmup_steps=2, eval_every=0, gold_per_task=0,
                    checkpoint_every=0, keep_checkpoints=1, tensorboard=False, progress=False,
                    lora_rank=8 if lora else 0, lora_alpha=16.0)
    sft(cfg)
    return [BATCH * SEQ_LEN / r["train/tokens_per_s"] for r in read_metrics(out / "metrics.jsonl")
            if "train/tokens_per_s" in r][WARMUP:]


def trl(hf_dir: Path, conversations: list, out: Path, steps: int, lora: bool, packing: str) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    args = TRLConfig(output_dir=str(out), max_length=SEQ_LEN, packing=True, packing_strategy=packing,
                     per_device_train_batch_size=BATCH,
                     max_steps=steps, learning_rate=2e-3 if lora else 3e-4, lr_scheduler_type="cosine",
                     warmup_steps=2, logging_steps=50, report_to=[], save_strategy="no", use_cpu=True,
                     assistant_only_loss=True, optim="adamw_torch", seed=0, disable_tqdm=True,
                     dataloader_num_workers=0, bf16=False, gradient_checkpointing=False)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM") \
        if lora else None
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
                         processing_class=AutoTokenizer.from_pretrained(hf_dir), peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    return timer.times[WARMUP:]


def one(kind: str, mode: str, work: Path, steps: int, rep: int, packing: str) -> list[float]:
    conversations = json.loads((work / "conversations.json").read_text())
    out = work / f"{kind}-{mode}-{rep}"
    if kind == "ours":
        return ours(work / "model", work / "data.jsonl", out, steps, mode == "lora")
    return trl(work / "hf", conversations, out, steps, mode == "lora", packing)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--trl-packing", default="bfd", choices=["bfd", "wrapped"],
                        help="TRL packing: bfd (its default, padding-free) or wrapped (fixed rows, cuts conversations)")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "MODE", "WORK", "REP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        kind, mode, work, rep = args.child
        print(json.dumps(one(kind, mode, Path(work), args.steps, int(rep), args.trl_packing)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text() for n in ("argparse.py", "textwrap.py", "csv.py", "difflib.py", "random.py")]
    tokenizer = train_tokenizer(texts, 2048)
    torch.manual_seed(0)
    save_model_dir(work / "model", GPT(GPTConfig.from_depth(args.depth, tokenizer.vocab_size, max_seq_len=SEQ_LEN)),
                   tokenizer)
    export_hf(work / "model", work / "hf", chat_template=CHAT_TEMPLATE)
    conversations = task_conversations(None, 2000, "train", seed=0)
    (work / "conversations.json").write_text(json.dumps(conversations))
    (work / "data.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))

    results: dict[tuple[str, str], list[float]] = {}
    for mode in ("full", "lora"):
        for rep in range(args.reps):
            for kind in ("ours", "trl"):  # interleaved; each run in a fresh process (no shared warm caches)
                proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--trl-packing",
                                       args.trl_packing, "--child", kind, mode, str(work), str(rep)],
                                      capture_output=True, text=True, check=True)
                times = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault((kind, mode), []).extend(times)
                print(f"{mode} {kind} rep {rep}: median {statistics.median(times):.3f} s/step", flush=True)
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}")
    print("| mode | gptlab s/step | TRL s/step | TRL / gptlab |\n|---|---|---|---|")
    for mode in ("full", "lora"):
        a, b = statistics.median(results[("ours", mode)]), statistics.median(results[("trl", mode)])
        print(f"| {mode} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
