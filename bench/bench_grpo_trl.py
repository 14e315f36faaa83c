"""GRPO step time and final figures: `gptlab rl --algorithm grpo` vs TRL's `GRPOTrainer` on the same starting
model, prompts, reward and hyperparameters.

    python bench/bench_grpo_trl.py --model /tmp/trlgrpo/sft_model [--steps 30] [--reps 2] [--gold-per-task 50]

Both sides: one gptlab SFT model (TRL loads its `gptlab.interop.export_hf` copy: same weights, gptlab's chat
template), the prompts gptlab's `PromptSource` draws for each step (task-suite train split, conversational
format for TRL, in the same order, `shuffle_dataset=False`, so both see the same 8 questions at every step),
and gptlab's gold checker as the reward (TRL: a reward function that reads the completion ids TRL passes it
and judges `chat.completion_text` of them, as `gptlab rl --reward verifier` does). The prompt ids TRL
renders with the exported template are checked equal to gptlab's `render_for_completion` before training.
Tasks without tool calls only: TRL's GRPO has no in-line execution of gptlab's calculator tool.

Matched: prompts per step x group size, sampling temperature (top-k/top-p off), answer budget (gptlab
`max_new_tokens` N counts sampled tokens before the closing `<|assistant_end|>`, TRL's
`max_completion_length` counts the closing token too, so TRL gets N + 1), KL weight (both: k3 estimator,
added per token), ratio clip, std-normalised group advantages, token-mean loss over the whole batch
(gptlab's only aggregation = TRL `loss_type="bnpo"`), one optimizer update per step on all answers (gptlab
`minibatch_size` = answers per step, `ppo_epochs` 1; TRL batch = answers per step, `num_iterations` 1),
constant lr, AdamW (0.9, 0.95, eps 1e-8, no weight decay), clip 1.0, fp32, one thread (TRL's defaults bf16 and
gradient checkpointing off).

Speed: seconds per step (sample + reward + update; gptlab: its logged `time/step_s`; TRL: time between
consecutive `on_step_end` callbacks), median after 2 warm-up steps, generated tokens per second of step time
over those steps (sampled tokens including the closing one), and sampling alone (the generation call of
each side). Repetitions are interleaved (gptlab, TRL, gptlab, TRL), each in a fresh process.
Final figures: the per-step mean reward of the sampled answers, and greedy gold accuracy on the test split
by one piece of code for both (`gptlab.eval.gold.gold_accuracy`, chat mode, the rollout budget; TRL's model saved
and read back with `gptlab.interop.load_hf`). Needs `pip install trl` (not a gptlab dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trl_step_clock import step_clock  # bench/, beside this script

from gptlab.train import rl
from gptlab.train.rl_rollouts import PromptSource
from gptlab.chat import completion_text
from gptlab.checkpoint import load_model_dir
from gptlab.eval.gold import chat_messages, gold_accuracy
from gptlab.interop import export_hf, load_hf
from gptlab.train.metrics import read_metrics
from gptlab.tasks import get_task

WARMUP, SEED = 2, 0


def rl_config(a: argparse.Namespace, out: Path) -> rl.RLConfig:
    answers = a.prompts_per_step * a.group_size
    return rl.RLConfig(policy=a.model, reward="verifier", algorithm="grpo", prompts="tasks", tasks=a.tasks,
                       out=str(out), num_steps=a.steps, prompts_per_step=a.prompts_per_step, group_size=a.group_size,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=0, kl_coef=a.beta,
                       clip_eps=a.clip_eps, ppo_epochs=1, minibatch_size=answers, grpo_std=a.scale_rewards,
                       lr=a.lr, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0, warmup_steps=0,
                       min_lr_frac=1.0, gold_per_task=0, eval_every=0, checkpoint_every=0, keep_checkpoints=1,
                       device="cpu", dtype="float32", tensorboard=False, progress=False, seed=SEED)


def gold(model, tokenizer, a: argparse.Namespace) -> dict[str, float]:
    result = gold_accuracy(model, tokenizer, a.tasks.split(","), a.gold_per_task, mode="chat",
                           max_new_tokens=a.max_new_tokens, seed=SEED)
    return {"mean": result["accuracy"], **{name: r["accuracy"] for name, r in result["tasks"].items()}}


class GenerationMeter:
    """Seconds and sampled tokens of each generation call (one per step on both sides)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.tool_turns = 0

    def wrap(self, fn, count):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds.append(time.perf_counter() - t0)
            self.tokens.append(count(out))
            return out
        return timed


# ---- one contender per process ------------------------------------------------------------------------------
def run_ours(a: argparse.Namespace, out: Path) -> dict:
    meter = GenerationMeter()

    def count(turns):
        meter.tool_turns += sum(0 in t.generated for t in turns)  # a tool output was inserted
        return sum(sum(t.generated) for t in turns)

    rl.generate_chat = meter.wrap(rl.generate_chat, count)  # instrumentation only: the loop is gptlab's
    final = rl.train_rl(rl_config(a, out))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "time/step_s" in r]
    if len(records) != a.steps:
        raise SystemExit(f"gptlab logged {len(records)} steps, expected {a.steps}")
    model, tokenizer = load_model_dir(final)
    return {"step_s": [r["time/step_s"] for r in records], "gen_s": meter.seconds, "tokens": meter.tokens,
            "reward": [r["rollout/reward"] for r in records], "kl_token": [r["rollout/kl_token"] for r in records],
            "truncated": [r["rollout/truncated"] for r in records], "tool_turns": meter.tool_turns,
            "gold": gold(model, tokenizer, a)}


def run_trl(a: argparse.Namespace, work: Path, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    _, tokenizer = load_model_dir(a.model)
    window = json.loads((work / "meta.json").read_text())["window"]
    source = PromptSource(rl_config(a, out), tokenizer, window)
    rl_prompts = [p for step in range(a.steps) for p in source.at(step)]  # gptlab's prompts, step after step
    tool_start = tokenizer.special_id("<|tool_call_start|>")
    tool_turns = 0

    def verifier(prompts, completions, completion_ids, index, **kwargs) -> list[float]:
        nonlocal tool_turns
        tool_turns += sum(tool_start in ids for ids in completion_ids)
        examples = [rl_prompts[i].example for i in index]
        return [float(get_task(e.task).check(e, completion_text(tokenizer, ids)))
                for e, ids in zip(examples, completion_ids)]

    dataset = Dataset.from_list([{"prompt": chat_messages(p.example), "index": i} for i, p in enumerate(rl_prompts)])
    answers = a.prompts_per_step * a.group_size
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=answers, gradient_accumulation_steps=1,
        num_generations=a.group_size, steps_per_generation=1, num_iterations=1, shuffle_dataset=False,
        max_completion_length=a.max_new_tokens + 1, temperature=a.temperature, top_k=0, top_p=1.0,
        beta=a.beta, epsilon=a.clip_eps, loss_type="bnpo", scale_rewards="group" if a.scale_rewards else "none",
        mask_truncated_completions=False, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", max_steps=a.steps, logging_steps=1, report_to=[], save_strategy="no",
        eval_strategy="no", use_cpu=True, seed=SEED, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
        gradient_checkpointing=False, log_completions=False)
    hf_tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    clock = step_clock()
    trainer = GRPOTrainer(model=model, reward_funcs=verifier, args=args, train_dataset=dataset,
                          processing_class=hf_tokenizer, callbacks=[clock])
    trl_ids = trainer._tokenize_prompts([row["prompt"] for row in dataset])[0]  # what TRL feeds generate
    if [list(ids) for ids in trl_ids] != [p.ids for p in rl_prompts]:
        raise SystemExit("TRL's prompt token ids differ from gptlab's render_for_completion")
    meter = GenerationMeter()
    trainer._generate_single_turn = meter.wrap(trainer._generate_single_turn, lambda out: sum(map(len, out[0])))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    if len(logs) != a.steps or len(clock.ends) != a.steps + 1:
        raise SystemExit(f"TRL logged {len(logs)} steps, expected {a.steps}")
    trainer.save_model(str(out / "model"))
    policy = load_hf(out / "model")[0]
    return {"step_s": clock.times(), "gen_s": meter.seconds,
            "tokens": meter.tokens, "reward": [h["reward"] for h in logs], "kl_token": [h.get("kl") for h in logs],
            "truncated": [h["completions/clipped_ratio"] for h in logs], "tool_turns": tool_turns,
            "gold": gold(policy, tokenizer, a)}


def child(a: argparse.Namespace, kind: str, work: Path, rep: int) -> dict:
    torch.set_num_threads(1)
    out = work / f"{kind}-{rep}"
    r = run_ours(a, out) if kind == "ours" else run_trl(a, work, out)
    timed = slice(WARMUP, None)
    r["median_step_s"] = statistics.median(r["step_s"][timed])
    r["tokens_per_s"] = sum(r["tokens"][timed]) / sum(r["step_s"][timed])
    r["sampling_tokens_per_s"] = sum(r["tokens"][timed]) / sum(r["gen_s"][timed])
    r["sampling_share"] = sum(r["gen_s"][timed]) / sum(r["step_s"][timed])
    return r


# ---- driver -------------------------------------------------------------------------------------------------
def first_last(values: list[float], k: int = 5) -> str:
    return f"{sum(values[:k]) / k:.3f} -> {sum(values[-k:]) / k:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="gptlab (SFT) model directory both sides start from")
    parser.add_argument("--tasks", default="sentiment,syllogism,identity,arithmetic")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (gptlab kl_coef, TRL beta)")
    parser.add_argument("--clip-eps", type=float, default=0.2)
    parser.add_argument("--scale-rewards", type=int, default=1, help="1: divide by the group std; 0: Dr. GRPO")
    parser.add_argument("--gold-per-task", type=int, default=50)
    parser.add_argument("--work", help="work directory (default: a new temporary one)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "WORK", "REP"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if a.child:
        kind, work, rep = a.child
        print(json.dumps(child(a, kind, Path(work), int(rep))))
        return

    torch.set_num_threads(1)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    start, tokenizer = load_model_dir(a.model)
    export_hf(a.model, work / "hf")
    (work / "meta.json").write_text(json.dumps({"window": start.config.max_seq_len}))
    before = gold(start, tokenizer, a)
    print(f"gold accuracy of the starting model ({a.gold_per_task} test questions per task, greedy): "
          f"{json.dumps(before)}", flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    flags = [x for name in ("model", "tasks", "steps", "prompts_per_step", "group_size", "max_new_tokens",
                            "temperature", "lr", "beta", "clip_eps", "scale_rewards", "gold_per_task")
             for x in ("--" + name.replace("_", "-"), str(getattr(a, name)))]
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for rep in range(a.reps):
        for kind in ("ours", "trl"):  # interleaved, each in a fresh process
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *flags, "--child", kind, str(work), str(rep)],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                sys.exit(f"{kind} rep {rep} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - t0
            results[kind].append(r)
            (work / f"{kind}-{rep}.json").write_text(json.dumps(r))
            print(f"{kind:4} rep {rep}: {r['median_step_s']:.2f} s/step, {r['tokens_per_s']:.0f} generated tokens/s "
                  f"of step time, sampling {r['sampling_tokens_per_s']:.0f} tokens/s ({100 * r['sampling_share']:.0f}% "
                  f"of the step), reward (first 5 -> last 5 steps) {first_last(r['reward'])}, truncated "
                  f"{first_last(r['truncated'])}, answers with a tool call {r['tool_turns']}, process "
                  f"{r['process_s']:.0f} s; gold after {json.dumps(r['gold'])}", flush=True)
            print(f"     rewards per step: {' '.join(f'{x:.2f}' for x in r['reward'])}", flush=True)
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}")
    print("| rep | gptlab s/step | TRL s/step | s/step TRL/gptlab | gptlab tok/s | TRL tok/s | tok/s gptlab/TRL "
          "| gold gptlab | gold TRL |")
    print("|---|---|---|---|---|---|---|---|---|")
    step_ratios, token_ratios = [], []
    for rep, (o, t) in enumerate(zip(results["ours"], results["trl"])):
        step_ratios.append(t["median_step_s"] / o["median_step_s"])
        token_ratios.append(o["tokens_per_s"] / t["tokens_per_s"])
        print(f"| {rep} | {o['median_step_s']:.2f} | {t['median_step_s']:.2f} | {step_ratios[-1]:.2f} | "
              f"{o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {token_ratios[-1]:.2f} | "
              f"{o['gold']['mean']:.3f} | {t['gold']['mean']:.3f} |")
    print(f"| median | | | {statistics.median(step_ratios):.2f} | | | {statistics.median(token_ratios):.2f} | | |")


if __name__ == "__main__":
    main()
