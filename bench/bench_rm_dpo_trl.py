"""Reward model and DPO step time and held-out figures: `gptlab rm` / `gptlab dpo` vs TRL's `RewardTrainer` /
`DPOTrainer` on the same starting model, data and budget.

    python bench/bench_rm_dpo_trl.py --model /tmp/trl/sft/model [--steps 40] [--dpo-steps 12] [--reps 2]

Both sides: one gptlab model (exported with `gptlab.interop.export_hf` for TRL: same weights and tokenizer,
gptlab's chat template), task-suite preferences (`default_preferences`, train split for training, test split
held out) with every set whose longest completion exceeds the model's context dropped on both sides.
gptlab trains on whole ranked sets (all of a set's pairs in one batch, each completion forwarded once); TRL
takes pairs, so every set is expanded into its (better, worse) pairs in TRL's explicit-prompt conversational
format, and TRL's batch holds as many pairs as gptlab's batch of sets holds on average, so both see the same
number of pairs per step and over the run. The token ids TRL feeds its model (rendered by the exported chat
template) are checked against gptlab's `render` for every pair before training. Same lr, warmup + cosine
decay to 10% of the peak, AdamW (0.9, 0.95, eps 1e-8, no weight decay), gradient clipping at 1.0, fp32,
one thread per run (TRL's defaults bf16 and gradient checkpointing are switched off, as in
bench_sft_trl.py). DPO: equal beta, reference log-probs precomputed once on both sides (TRL:
`precompute_ref_log_probs=True`). TRL's reward head (random-normal init) is zeroed like gptlab's, so both
start from the same function (loss ln 2).

Speed: seconds per optimizer step (gptlab: its logged `train/step_s`; TRL: time between consecutive
`on_step_end` callbacks, so batch collation is inside both), median over the steps after 3 warm-up steps,
and pairs per second over those steps. Repetitions are interleaved (gptlab, TRL, gptlab, TRL), each run in
a fresh process.
Held-out figures are computed by one piece of code for both sides on the same token ids: reward models
score each held-out completion (gptlab: `RewardModel.score_ids`; TRL: its sequence-classification output,
which reads the last non-pad token, the same `<|assistant_end|>`) and every held-out pair is judged; DPO
policies (TRL's saved and read back with `gptlab.interop.load_hf`) give each completion's summed log-prob
over gptlab's completion mask, minus the starting model's, times beta. Each trainer's own evaluation is
reported next to it. Needs `pip install trl` (not a gptlab dependency).
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
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptlab.chat import render_for_completion
from gptlab.checkpoint import load_model_dir
from gptlab.train.dpo import DPOConfig, reference_logprobs, train_dpo
from gptlab.interop import export_hf, load_hf
from gptlab.train.metrics import read_metrics
from gptlab.train.preferences import EncodedSet, default_preferences, encode_set, row_offsets
from gptlab.reward_model import RewardModel
from gptlab.train.loop import batch_indices
from gptlab.train.preference_fit import pairwise_accuracy
from gptlab.train.reward import RewardConfig, train_reward_model
from trl_step_clock import step_clock  # bench/, beside this script

WARMUP, SEED, TASKS = 3, 0, "all"


# ---- data shared by both sides -------------------------------------------------------------------------------
def preference_data(tokenizer, window: int, n: int, split: str) -> tuple[list, list[EncodedSet]]:
    """Task-suite sets of `split` that fit in `window`, exactly those `gptlab rm/dpo --data tasks` keeps
    (`encode_sets` drops a set whose longest completion is longer than the window), and their encodings."""
    sets = default_preferences(TASKS, n, split, SEED)
    encoded = [encode_set(tokenizer, s) for s in sets]
    kept = [(s, e) for s, e in zip(sets, encoded) if max(map(len, e.ids)) <= window and e.pairs]
    return [s for s, _ in kept], [e for _, e in kept]


def trl_pairs(tokenizer, sets, encoded: list[EncodedSet]) -> list[dict]:
    """Every (better, worse) pair of every set in TRL's explicit-prompt conversational format, with the
    token ids gptlab renders for it (checked against TRL's tokenization, then dropped)."""
    rows = []
    for pset, enc in zip(sets, encoded):
        completions = pset.completions()
        prompt_len = len(render_for_completion(tokenizer, pset.prompt))
        for better, worse in enc.pairs:
            rows.append({"prompt": pset.prompt, "chosen": completions[better], "rejected": completions[worse],
                         "_chosen": enc.ids[better], "_rejected": enc.ids[worse], "_prompt_len": prompt_len})
    return rows


def pair_margins(values: torch.Tensor, sets: list[EncodedSet]) -> torch.Tensor:
    """value(better) - value(worse) for every pair; `values` holds one number per completion, sets in order."""
    offsets = row_offsets(sets)
    index = torch.tensor([(offsets[i] + a, offsets[i] + b) for i, s in enumerate(sets) for a, b in s.pairs])
    return values[index[:, 0]] - values[index[:, 1]]


def heldout(margins: torch.Tensor) -> dict[str, float]:
    return {"accuracy": pairwise_accuracy(margins), "margin": margins.mean().item(), "pairs": len(margins)}


# ---- one contender per process ------------------------------------------------------------------------------
def trl_args(config_cls, out: Path, a: argparse.Namespace, lr: float, pairs_per_step: int, window: int, **extra):
    return config_cls(output_dir=str(out), max_length=window, per_device_train_batch_size=pairs_per_step,
                      per_device_eval_batch_size=pairs_per_step, max_steps=a.steps, learning_rate=lr,
                      lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                      warmup_steps=a.warmup, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
                      max_grad_norm=1.0, optim="adamw_torch", logging_steps=10**6, report_to=[],
                      save_strategy="no", eval_strategy="no", use_cpu=True, seed=SEED, disable_tqdm=True,
                      dataloader_num_workers=0, bf16=False, gradient_checkpointing=False, **extra)


def run_trl(stage: str, a: argparse.Namespace, work: Path, out: Path, window: int, pairs_per_step: int,
            val: list[EncodedSet]) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    data = json.loads((work / "trl_pairs.json").read_text())
    datasets = {split: Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
                for split, rows in data.items()}
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    clock = step_clock()
    if stage == "rm":
        from trl import RewardConfig as TRLRewardConfig
        from trl import RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(work / "hf", num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        torch.nn.init.zeros_(model.score.weight)
        trainer = RewardTrainer(model=model, args=trl_args(TRLRewardConfig, out, a, a.rm_lr, pairs_per_step, window),
                                train_dataset=datasets["train"], eval_dataset=datasets["val"],
                                processing_class=tokenizer, callbacks=[clock])
        for split, prepared in (("train", trainer.train_dataset), ("val", trainer.eval_dataset)):
            if (prepared["chosen_ids"] != [r["_chosen"] for r in data[split]]
                    or prepared["rejected_ids"] != [r["_rejected"] for r in data[split]]):
                raise SystemExit(f"TRL's {split} token ids differ from gptlab's rendering")
    else:
        from trl import DPOConfig as TRLDPOConfig
        from trl import DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=trl_args(TRLDPOConfig, out, a, a.dpo_lr, pairs_per_step, window,
                                                        beta=a.beta, precompute_ref_log_probs=True),
                             train_dataset=datasets["train"], eval_dataset=datasets["val"],
                             processing_class=tokenizer, callbacks=[clock])
        for split, prepared in (("train", trainer.train_dataset), ("val", trainer.eval_dataset)):
            if len(prepared) != len(data[split]) or any(
                    p + c != r["_chosen"] or p + rej != r["_rejected"] or len(p) != r["_prompt_len"]
                    for r, p, c, rej in zip(data[split], prepared["prompt_ids"], prepared["chosen_ids"],
                                            prepared["rejected_ids"])):
                raise SystemExit(f"TRL's {split} token ids differ from gptlab's rendering")
    trainer.train()
    own = {k: v for k, v in trainer.evaluate().items() if k.removeprefix("eval_") in
           ("loss", "accuracy", "margin", "rewards/accuracies", "rewards/margins")}
    model = trainer.model.eval()
    if stage == "rm":
        pad = tokenizer.pad_token_id
        rows = [ids for s in val for ids in s.ids]
        scores = []
        with torch.no_grad():
            for start in range(0, len(rows), 32):
                chunk = rows[start:start + 32]
                ids = torch.full((len(chunk), max(map(len, chunk))), pad)
                for i, r in enumerate(chunk):
                    ids[i, :len(r)] = torch.tensor(r)
                scores.append(model(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, 0].float())
        common = heldout(pair_margins(torch.cat(scores), val))
    else:
        trainer.save_model(str(out / "model"))
        policy, _, _ = load_hf(out / "model")
        common = dpo_heldout(policy, work, val, a.beta)
    return {"step_s": clock.times(), "own": own, "heldout": common}


def dpo_heldout(policy, work: Path, val: list[EncodedSet], beta: float) -> dict[str, float]:
    """Implicit-reward margins of every held-out pair: beta * (log pi - log ref) over gptlab's completion mask."""
    start, tokenizer = load_model_dir(json.loads((work / "meta.json").read_text())["model"])
    pad = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)
    cpu = torch.device("cpu")
    log_ratio = (reference_logprobs(policy, val, 16, pad, cpu, nullcontext())
                 - reference_logprobs(start, val, 16, pad, cpu, nullcontext()))
    return heldout(beta * pair_margins(log_ratio, val))


def run_ours(stage: str, a: argparse.Namespace, meta: dict, out: Path, train: list[EncodedSet],
             val: list[EncodedSet]) -> dict:
    common = dict(model=meta["model"], out=str(out), data="tasks", tasks=TASKS, train_prompts=a.train_sets,
                  val_prompts=a.val_sets, batch_size=a.batch_sets, num_steps=a.steps, warmup_steps=a.warmup,
                  eval_every=0, checkpoint_every=0, keep_checkpoints=1, weight_decay=0.0, beta1=0.9, beta2=0.95,
                  grad_clip=1.0, schedule="cosine", min_lr_frac=0.1, optimizer="adamw", device="cpu",
                  dtype="float32", tensorboard=False, progress=False, seed=SEED)
    if stage == "rm":
        final = train_reward_model(RewardConfig(lr=a.rm_lr, **common))
        rm = RewardModel.load(final)
        own = json.loads((final / "reward.json").read_text())
        own = {"accuracy": own["held_out_pairwise_accuracy"], "loss": own["held_out_loss"]}
        scores = rm.score_ids([ids for s in val for ids in s.ids])
        figures = heldout(pair_margins(scores, val))
    else:
        final = train_dpo(DPOConfig(lr=a.dpo_lr, beta=a.beta, gold_prompts=0, **common))
        own = json.loads((out / "dpo.json").read_text())
        own = {"accuracy": own["held_out_implicit_reward_accuracy"], "margin": own["held_out_implicit_reward_margin"],
               "loss": own["held_out_loss"]}
        figures = dpo_heldout(load_model_dir(final)[0], out.parent, val, a.beta)
    step_s = [r["train/step_s"] for r in read_metrics(out / "metrics.jsonl") if "train/step_s" in r]
    if len(step_s) != a.steps or len(train) != meta["train_sets"]:
        raise SystemExit(f"gptlab ran {len(step_s)} steps on {len(train)} sets, expected {a.steps} on "
                         f"{meta['train_sets']}")
    return {"step_s": step_s, "own": own, "heldout": figures}


def child(a: argparse.Namespace, stage: str, kind: str, work: Path, rep: int) -> dict:
    torch.set_num_threads(1)
    meta = json.loads((work / "meta.json").read_text())
    tokenizer = load_model_dir(meta["model"])[1]
    train = preference_data(tokenizer, meta["window"], a.train_sets, "train")[1]
    val = preference_data(tokenizer, meta["window"], a.val_sets, "test")[1]
    out = work / f"{stage}-{kind}-{rep}"
    if stage == "dpo" and a.dpo_steps:
        a = argparse.Namespace(**{**vars(a), "steps": a.dpo_steps})
    if kind == "ours":
        result = run_ours(stage, a, meta, out, train, val)
        batches = [[train[i] for i in batch_indices(step, a.batch_sets, len(train), SEED)] for step in range(a.steps)]
        pairs = [sum(len(s.pairs) for s in b) for b in batches]
        sequences = [sum(len(s.ids) for s in b) for b in batches]
    else:
        result = run_trl(stage, a, work, out, meta["window"], meta["pairs_per_step"], val)
        pairs = [meta["pairs_per_step"]] * a.steps
        sequences = [2 * p for p in pairs]
    timed, seconds = slice(WARMUP, None), sum(result["step_s"][WARMUP:])
    result["median_step_s"] = statistics.median(result["step_s"][timed])
    result["pairs_per_s"] = sum(pairs[timed]) / seconds
    result["sequences_per_s"] = sum(sequences[timed]) / seconds
    return result


# ---- driver -------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="gptlab model directory both sides start from")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dpo-steps", type=int, default=12,
                        help="DPO steps (0 = --steps): TRL's DPO steps are slow on CPU")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--stages", default="rm,dpo")
    parser.add_argument("--batch-sets", type=int, default=4, help="gptlab: preference sets per step")
    parser.add_argument("--train-sets", type=int, default=100)
    parser.add_argument("--val-sets", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rm-lr", type=float, default=3e-4)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--work", help="work directory (default: a new temporary one)")
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "KIND", "WORK", "REP"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        stage, kind, work, rep = a.child
        print(json.dumps(child(a, stage, kind, Path(work), int(rep))))
        return

    work = Path(a.work or tempfile.mkdtemp(prefix="bench_rm_dpo_"))
    work.mkdir(parents=True, exist_ok=True)
    start, tokenizer = load_model_dir(a.model)
    window = start.config.max_seq_len
    export_hf(a.model, work / "hf")
    data, sets_kept = {}, {}
    for split, n, name in (("train", a.train_sets, "train"), ("test", a.val_sets, "val")):
        sets, encoded = preference_data(tokenizer, window, n, split)
        data[name], sets_kept[name] = trl_pairs(tokenizer, sets, encoded), encoded
    (work / "trl_pairs.json").write_text(json.dumps(data))
    train = sets_kept["train"]
    pairs_per_set = sum(len(s.pairs) for s in train) / len(train)
    rows_per_set = sum(len(s.ids) for s in train) / len(train)
    meta = {"model": str(Path(a.model).resolve()), "window": window, "train_sets": len(train),
            "pairs_per_step": round(a.batch_sets * pairs_per_set)}
    (work / "meta.json").write_text(json.dumps(meta))
    print(f"train: {len(train)} of {a.train_sets} sets fit in {window} tokens, {len(data['train'])} pairs "
          f"({pairs_per_set:.2f} pairs, {rows_per_set:.2f} completions per set); held out: "
          f"{len(sets_kept['val'])} sets, {len(data['val'])} pairs")
    print(f"per step: gptlab {a.batch_sets} sets (~{a.batch_sets * pairs_per_set:.1f} pairs, "
          f"~{a.batch_sets * rows_per_set:.1f} sequences); TRL {meta['pairs_per_step']} pairs "
          f"({2 * meta['pairs_per_step']} sequences)", flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    flags = [x for name in ("model", "steps", "dpo_steps", "batch_sets", "train_sets", "val_sets", "warmup", "rm_lr",
                            "dpo_lr", "beta") for x in ("--" + name.replace("_", "-"), str(getattr(a, name)))]
    results: dict[tuple[str, str], list[dict]] = {}
    for stage in a.stages.split(","):
        for rep in range(a.reps):
            for kind in ("ours", "trl"):  # interleaved, each in a fresh process
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, *flags, "--child", stage, kind, str(work), str(rep)],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{stage} {kind} rep {rep} failed:\n{proc.stderr[-4000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["process_s"] = time.perf_counter() - t0
                results.setdefault((stage, kind), []).append(r)
                print(f"{stage} {kind:4} rep {rep}: {r['median_step_s']:.3f} s/step, {r['pairs_per_s']:.1f} pairs/s, "
                      f"{r['sequences_per_s']:.1f} sequences/s, "
                      f"process {r['process_s']:.0f} s; held-out (common) {json.dumps(r['heldout'])}; "
                      f"own eval {json.dumps(r['own'])}", flush=True)
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()}")
    print("| stage | rep | gptlab s/step | TRL s/step | gptlab pairs/s | TRL pairs/s | pairs/s gptlab/TRL "
          "| sequences/s gptlab/TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in a.stages.split(","):
        ratios, seq_ratios = [], []
        for rep, (o, t) in enumerate(zip(results[(stage, "ours")], results[(stage, "trl")])):
            ratios.append(o["pairs_per_s"] / t["pairs_per_s"])
            seq_ratios.append(o["sequences_per_s"] / t["sequences_per_s"])
            print(f"| {stage} | {rep} | {o['median_step_s']:.3f} | {t['median_step_s']:.3f} | {o['pairs_per_s']:.1f} "
                  f"| {t['pairs_per_s']:.1f} | {ratios[-1]:.2f} | {seq_ratios[-1]:.2f} |")
        print(f"| {stage} | median | | | | | {statistics.median(ratios):.2f} | {statistics.median(seq_ratios):.2f} |")


if __name__ == "__main__":
    main()
