"""Reinforcement learning on chat rollouts: GRPO or PPO with a KL penalty to the frozen SFT model.

    gptlab rl --policy runs/X/sft/model --tasks arithmetic,sentiment --out runs/X/rl          # GRPO, verifier
    gptlab rl --algorithm ppo --reward runs/X/rm/model --policy runs/X/sft/model --out runs/X/rl-ppo

Design decisions
- One step = sample, score, update. `prompts_per_step` prompts are drawn (task suite train split, a fresh
  seeded draw per step, or slices of seeded permutations of a messages JSONL file: both pure functions of
  (seed, step)), each is answered `group_size` times by `gptlab.infer.rollout.generate_chat` (the loop eval uses,
  here sampling at `temperature`/`top_k` with one seed per sample, tool calls run in line), the answers are
  rewarded, and the policy takes `ppo_epochs` passes of minibatch updates over them. Nothing reads global
  RNG state, so a resumed run repeats an uninterrupted one exactly on the CPU (fp32; bf16 autocast on CUDA).
- Actions are the tokens the policy sampled (`Turn.generated`), closing `<|assistant_end|>` included; tool
  outputs are inserted by the environment and get no policy gradient, KL or entropy, the same split as the
  SFT loss mask (`chat.render`). Log-probs are of the sampling distribution softmax(logits / temperature)
  (as TRL does); top-k truncation is not modelled in them, so keep `top_k` 0 (the default) for an exact
  ratio. They are recomputed by a teacher-forced forward pass after sampling, not taken from the decoder
  (whose cached arithmetic rounds differently), so the ratio of the first update is 1 up to rounding.
  Only the hidden states of action positions go through the head: no (batch x length x vocabulary)
  logits tensor is ever built.
- Rewards: `verifier` is the task's gold checker (1.0 right, 0.0 wrong; task prompts only); otherwise
  `reward` is a reward-model directory (`gptlab rm`) scoring prompt + answer with `<|assistant_end|>`
  (added to a truncated answer so the readout sits where it was trained). `truncation_penalty` is
  subtracted from answers that hit the token budget without ending. Task prompts also get the checker's
  verdict logged as `rollout/correct` whatever the reward, so reward hacking shows next to it; also per task
  (`rollout/correct/<task>`, over the step's answers to that task's prompts: sampled accuracy, next to the
  greedy `gold/<task>`).
- GRPO (Shao et al. 2024, DeepSeekMath): advantage of a sample = (r - mean of its group) /
  (std of its group + 1e-4), std over the group (ddof 0), the same for each of its action tokens;
  `grpo_std false` drops the division (Dr. GRPO, Liu et al. 2025: it upweights questions whose rewards
  barely differ, those nearly always or nearly never solved). Loss per token:
  -min(ratio A, clip(ratio, 1 +- clip_eps) A) + kl_coef * k3, where k3 = exp(ref - logp) - (ref - logp) - 1
  (Schulman 2020, "Approximating KL divergence": unbiased for KL(pi || ref) under pi's samples and never
  negative), averaged over the action tokens of a minibatch.
- Dynamic sampling (`oversample` > 1, GRPO only; DAPO, Yu et al. 2025): a group whose answers all get the
  same reward (all right or all wrong) has zero advantage, so it spends sampling and update time on nothing
  but its KL term. With `oversample` k, k x `prompts_per_step` prompts are answered and the step trains on
  `prompts_per_step` groups, those with differing rewards first (draw order, then the rest). Sampling costs k
  times more, the update the same. On the CPU speedrun's SFT model 75% of the groups had no signal (most
  tasks are solved always or never at that size); with k = 3 about 30% of the drawn groups had signal and
  the trained batch was nearly all signal (docs/LOG.md). Reward, accuracy and truncation are logged over all
  drawn answers (the trained groups are a biased selection); `rollout/signal_drawn` is the drawn fraction
  with signal.
- Task probe (`probe_per_task` > 0, task prompts): before step 1 the policy answers `probe_per_task`
  train-split prompts of each task once greedily and `group_size` times sampled; RL then draws prompts only
  from tasks it can still raise (greedy accuracy below `solved_accuracy`, at least one right answer),
  `probe_tasks` says why. The others stay in the gold-accuracy curve, and `ptx_coef` replays the solved
  ones. The probe is stored in the checkpoints, so a resumed run trains on the same tasks.
- PPO (Schulman et al. 2017; RLHF as in Ziegler et al. 2019 and InstructGPT): per-token reward
  -kl_coef * (logp_old - logp_ref) on every action plus the scalar reward on the last action; GAE(gamma,
  lambda) backwards over the action tokens only (a tool block between two actions is part of the
  environment's transition); returns = advantages + old values; advantages whitened over the batch;
  clipped policy loss plus vf_coef * 0.5 * max((V - R)^2, (V_clipped - R)^2) with V clipped to
  old +- value_clip. A truncated answer counts as terminal (its reward already carries the penalty).
  The value function is a linear head (zero init) on the policy trunk's final hidden states, trained
  through the trunk, as in the PPO paper's shared-parameter setup (L = L_clip - c1 L_VF): one forward
  pass gives logits and values, and a laptop holds two models (policy and reference), not three. Its
  weights live in the training checkpoints (`value_head.safetensors`), not in the output model.
- Replay (`ptx_coef`): every update also takes `ptx_coef` x the SFT loss on a few task-suite reference
  conversations, InstructGPT's PPO-ptx with SFT data in place of pretraining data, meant for tasks whose
  prompts give GRPO no signal (all answers right, or all wrong) while the shared weights move under them.
  Replaying every task did not help the 5M-parameter CPU model (23.0% vs 25.6% without, one seed: it also
  pulls on the tasks RL is raising); with the task probe it replays only the tasks the probe found solved,
  which is what the presets do (ptx 0.3; docs/LOG.md, session 5).
- Checkpoint selection (`val_per_task` > 0): RL on a small model is noisy and, through the shared weights,
  can unlearn tasks it gets no signal from; so, as early stopping, every gold-accuracy step also measures
  greedy accuracy on validation questions (train-split questions drawn apart from RL's prompts by their
  own seed; the train split is large enough that few coincide) and `out/model` is the checkpoint after
  step 0 with the best of them (the earliest on a tie), kept in `out/best`. It never looks at the test
  questions that `gptlab eval` reports, and step 0 (the SFT model) is not a candidate, so the output is
  always a model RL trained. `rl.json` names the selected step.
- Reference: a frozen copy of the policy (or `--reference DIR`, same tokenizer). Divergence: before every
  update, a NaN/inf loss or gradient norm, or a mean KL above `max_kl` nats per answer, stops the run with
  the step, the figure and the last good checkpoint (`optim.raise_if_diverged`); nothing after it is saved.
- Metrics per step (metrics.jsonl, TensorBoard): reward, KL to the reference (k1, per token and per
  answer), policy entropy at action tokens, answer length, fraction truncated, losses, clip fraction,
  groups without signal (GRPO); every `eval_every` steps greedy gold accuracy on the task suite's test
  split (`eval.gold_accuracy`, chat mode, the rollout token budget). `rl.png` draws reward and gold
  accuracy side by side with KL, entropy and length: reward rising while gold accuracy falls is reward
  hacking, and it shows.
- Output like `gptlab sft`: `out/model` (a model dir every stage loads), `out/rl.json` (gold accuracy
  before/after per task, reward/KL/entropy/length at the start and end, wall time, config),
  `metrics.jsonl`, `rl.png`, and checksummed training checkpoints (policy, value head, optimizer, RNG,
  step) with exact `--resume`; Ctrl-C/SIGTERM save one and stop.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..chat import render, render_for_completion
from ..checkpoint import load_model_dir, load_training_checkpoint, rng_state, save_model_dir, save_training_checkpoint
from ..common import GptlabError, atomic_write_json, get_logger
from ..config import register_config_command
from ..eval.gold import chat_messages, gold_accuracy
from ..infer.engine import Engine
from ..infer.generation_config import greedy_generation_config
from ..infer.rollout import Turn, generate_chat
from ..lora import add_lora, fold_lora, lora_layers, merge_lora, unmerge_lora
from ..model import GPT
from ..reward_model import RewardModel, check_same_tokenizer
from ..tasks import sample_examples
from ..tokenizer import Tokenizer
from .loop import (checkpoint_to_resume, clipped_step, device_and_autocast, due, existing_checkpoints,
                   set_lr_scale, stop_if_requested, training_loop)
from .metrics import MetricsLogger, plot_panels, read_metrics
from .optim import build_optimizers, lr_multiplier, raise_if_diverged
from .rl_config import PRESETS, RLConfig
from .rl_objectives import (clipped_policy_loss, clipped_value_loss, gae, group_advantages, k3_kl, ppo_token_rewards,
                            whiten)
from .rl_rollouts import (PromptSource, RLPrompt, Sample, action_forward, action_targets, groups_with_signal,
                          pad_samples, sample_seed, scatter_rows, select_groups, verdicts)

log = get_logger("rl")

VALUE_HEAD_FILE = "value_head.safetensors"
# options that may change on --resume: they do not alter the trajectory of the run
_RESUMABLE_CHANGES = {"num_steps", "resume", "progress", "tensorboard", "checkpoint_every", "keep_checkpoints",
                      "eval_every", "gold_per_task", "device"}
BEST_DIR = "best"  # out/best: the checkpoint chosen on validation questions so far (val_per_task > 0)


def probe_tasks(cfg: RLConfig, policy: GPT, tokenizer: Tokenizer, names: list[str], autocast) -> dict[str, dict]:
    """Which tasks RL can raise: per task, on `probe_per_task` train-split prompts (seeded apart from the
    steps' prompts), the policy's greedy accuracy and the fraction of `group_size` sampled answers (the
    rollout temperature and budget) that are right. A task is solved when its greedy accuracy reaches
    `solved_accuracy`, and trained on when it is not solved and at least one answer was right. Why: gold accuracy is measured greedily, so a task
    already solved greedily can only lose (on the 5M-parameter CPU model, RL on sentiment, 100% greedy but
    70% sampled, taught a label bias that flipped a quarter of the unseen positive reviews), and a task with
    no right answer gives GRPO groups without signal (Polaris / Skywork-OR1 filter prompts by pass rate
    for the same reasons); docs/LOG.md has the measurements."""
    result = {}
    engine = Engine(policy, tokenizer, strict_context=True)
    for t, name in enumerate(names):
        examples = sample_examples([name], cfg.probe_per_task, "train", seed=f"rl-probe-{cfg.seed}-{name}")
        prompts = [RLPrompt(render_for_completion(tokenizer, chat_messages(e)), e) for e in examples]
        repeated = [p for p in prompts for _ in range(cfg.group_size)]
        first_seed = t * len(repeated)
        with autocast:
            greedy = generate_chat(engine, [p.ids for p in prompts], cfg.max_new_tokens)
            sampled = generate_chat(engine, [p.ids for p in repeated], cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_k=cfg.top_k, seeds=[sample_seed(cfg.seed, -1, first_seed + i)
                                                            for i in range(len(repeated))])
        greedy_right, sampled_right = verdicts(prompts, greedy, tokenizer), verdicts(repeated, sampled, tokenizer)
        greedy_acc, sampled_acc = sum(greedy_right) / len(prompts), sum(sampled_right) / len(repeated)
        solved = greedy_acc >= cfg.solved_accuracy
        result[name] = {"greedy": greedy_acc, "sampled": sampled_acc, "solved": solved,
                        "trained": not solved and any(greedy_right + sampled_right)}
    return result


RewardFn = Callable[[list[RLPrompt], list[Turn]], list[float]]


def build_reward(cfg: RLConfig, tokenizer: Tokenizer, device: torch.device) -> RewardFn:
    """The scalar reward of each (prompt, turn), per `cfg.reward` (module docstring)."""
    if cfg.reward == "verifier":
        if cfg.prompts != "tasks":
            raise GptlabError("--reward verifier needs task prompts (--prompts tasks): a prompts file has no gold "
                              "answers; pass a reward model directory as --reward")
        return lambda prompts, turns: [float(v) for v in verdicts(prompts, turns, tokenizer)]
    if not Path(cfg.reward).is_dir():
        raise GptlabError(f"--reward must be 'verifier' or a reward model directory; not found: {cfg.reward}")
    model = RewardModel.load(cfg.reward, device=device)
    model.check_policy(tokenizer)
    end = tokenizer.special_id("<|assistant_end|>")

    def score(prompts: list[RLPrompt], turns: list[Turn]) -> list[float]:
        return model.score_ids([p.ids + t.body + [end] for p, t in zip(prompts, turns)]).tolist()

    return score



# ---------------------------------------------------------------------------------------------------------
# The loop


def _value_head_bytes(head: nn.Module) -> bytes:
    return save({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()})


def _gold(model: GPT, tokenizer: Tokenizer, names: list[str], n_per_task: int, cfg: RLConfig, autocast,
          split: str = "test") -> dict[str, float]:
    with autocast:
        result = gold_accuracy(model, tokenizer, names, n_per_task, mode="chat", max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed, split=split)
    return {"mean": result["accuracy"], **{name: r["accuracy"] for name, r in result["tasks"].items()}}


def _trend(records: list[dict], key: str) -> dict[str, float] | None:
    """Mean of `key` over the first and the last tenth of the steps (at least one step each)."""
    values = [r[key] for r in records if key in r and r.get("step", 0) > 0]
    if not values:
        return None
    k = max(1, len(values) // 10)
    return {"start": sum(values[:k]) / k, "end": sum(values[-k:]) / k}


def plot_rl(metrics_path: Path, png_path: Path, task_keys: list[str]) -> Path:
    """Reward next to gold accuracy (also in one panel: reward hacking is the two parting), then per-task
    gold accuracy, KL, entropy, length and losses."""
    panels = [("reward (samples) and gold accuracy (test, validation)",
               ["rollout/reward", "rollout/correct", "gold/mean", "val/mean"]),
              ("gold accuracy (test, greedy)", task_keys),
              ("KL to reference (nats/answer)", ["rollout/kl_seq"]), ("entropy (nats/token)", ["rollout/entropy"]),
              ("answer length (tokens)", ["rollout/length"]),
              ("losses", ["loss/policy", "loss/value", "loss/kl"])]
    return plot_panels(metrics_path, png_path, panels)


def train_rl(cfg: RLConfig) -> Path:
    """Run RL per `cfg`; return the improved policy's model directory (`out/model`)."""
    started = time.perf_counter()
    out_dir = Path(cfg.out)
    ckpt_root = out_dir / "checkpoints"
    existing = existing_checkpoints(ckpt_root, cfg.resume)
    for what, path in (("policy", cfg.policy), ("reference", cfg.reference)):
        if path is not None and not Path(path).is_dir():
            raise GptlabError(f"{what} model directory not found: {path}")
    device, autocast = device_and_autocast(cfg)
    policy, tokenizer = load_model_dir(cfg.policy, device)
    reference, ref_tokenizer = load_model_dir(cfg.reference or cfg.policy, device)
    check_same_tokenizer(ref_tokenizer.sha256, tokenizer, f"the reference model {cfg.reference}")
    reference.requires_grad_(False)
    window = policy.config.max_seq_len
    reward_fn = build_reward(cfg, tokenizer, device)
    source = PromptSource(cfg, tokenizer, window)
    gold_names = source.names if cfg.gold_per_task else []
    pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eot_id)

    resuming = bool(cfg.resume and existing)
    probe = probe_tasks(cfg, policy, tokenizer, source.names, autocast) if cfg.probe_per_task and not resuming else {}
    if cfg.lora_rank:
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha)
    value_head = None
    optimizers = build_optimizers(policy, cfg)
    if cfg.algorithm == "ppo":
        value_head = nn.Linear(policy.config.n_embd, 1).to(device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        optimizers[0].add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0,
                                       "lr": cfg.lr, "base_lr": cfg.lr})
    params = [p for p in policy.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])

    step, meta = 0, {}
    if resuming:
        ckpt = checkpoint_to_resume(ckpt_root, existing, log)  # `resuming`: there are checkpoints, so never None
        meta = load_training_checkpoint(ckpt, policy, tokenizer, optimizers)
        changed = sorted(k for k, v in asdict(cfg).items()
                         if k not in _RESUMABLE_CHANGES and meta["config"].get(k) != v)
        if changed:
            raise GptlabError(f"checkpoint {ckpt} belongs to a run with other options ({', '.join(changed)}); "
                              "resume with the same options or choose another --out")
        if value_head is not None:
            try:
                value_head.load_state_dict({k: v.to(device) for k, v in load_file(ckpt / VALUE_HEAD_FILE).items()})
            except (SafetensorError, OSError, RuntimeError) as e:
                raise GptlabError(f"cannot load the value head of {ckpt}: {e}") from None
        step = meta["step"]
        probe = meta.get("probe", {})  # the first start's probe: the policy has moved since
        log.info("resumed from %s at step %d", ckpt, step)
    if probe:
        trained = [name for name, r in probe.items() if r["trained"]]
        log.info("probe (%d prompts per task; greedy / sampled accuracy): %s", cfg.probe_per_task, ", ".join(
            f"{name} {r['greedy']:.2f} / {r['sampled']:.2f}{'' if r['trained'] else ' (left out)'}"
            for name, r in probe.items()))
        solved = [name for name, r in probe.items() if r["solved"]]
        if solved:  # what RL leaves out as solved is what the shared weights can unlearn: replay that
            source.replay_names = solved
        if trained:
            source.train_names = trained
        else:
            log.warning("the probe found no task RL can raise (every task solved or never answered right): "
                        "training on all of them")
    metrics = MetricsLogger(out_dir, tensorboard=cfg.tensorboard, resume_step=step if meta else None)
    gold_keys = ["gold/mean"] + [f"gold/{n}" for n in gold_names]

    # checkpoint selection on validation questions: early stopping on held-out accuracy (rather than on the
    # reward, which RL optimises and can hack), never on the test questions `gptlab eval` reports
    best: dict[str, Any] = meta.get("best", {"step": None, "val": -1.0}) if meta else {"step": None, "val": -1.0}

    def measure_gold(at_step: int) -> dict[str, float]:
        gold = {}
        if gold_names:
            gold = _gold(policy, tokenizer, gold_names, cfg.gold_per_task, cfg, autocast)
            metrics.log(at_step, **{f"gold/{k}": v for k, v in gold.items()})
            log.info("step %d: gold accuracy %s", at_step, ", ".join(f"{k} {v:.2f}" for k, v in gold.items()))
        if cfg.val_per_task:
            val = _gold(policy, tokenizer, source.names, cfg.val_per_task, cfg, autocast, split="train")
            metrics.log(at_step, **{f"val/{k}": v for k, v in val.items()})
            log.info("step %d: validation accuracy %.3f", at_step, val["mean"])
            if at_step > 0 and val["mean"] > best["val"]:
                save_model_dir(out_dir / BEST_DIR, plain_model(policy), tokenizer)
                best.update(step=at_step, val=val["mean"])
        return gold

    gold_before = meta.get("gold_before") if meta else measure_gold(0)
    wall_before = meta.get("wall_seconds", 0.0)

    def save(at_step: int) -> Path:
        extra = {VALUE_HEAD_FILE: _value_head_bytes(value_head)} if value_head is not None else {}
        info = {"config": asdict(cfg), "gold_before": gold_before, "best": best, "probe": probe,
                "wall_seconds": wall_before + time.perf_counter() - started}
        return save_training_checkpoint(ckpt_root, at_step, policy, tokenizer, optimizers=optimizers,
                                        rng_states=[rng_state()], meta=info, keep_last=cfg.keep_checkpoints,
                                        extra_files=extra)

    log.info("%s on %s: %d steps of %d prompts x %d answers; reward %s; device %s", cfg.algorithm.upper(),
             cfg.policy, cfg.num_steps, cfg.prompts_per_step, cfg.group_size, cfg.reward, device)
    with training_loop(cfg.num_steps, step, progress=cfg.progress, metrics=metrics, logger=log) as (bar, stop):
        while step < cfg.num_steps:
            record = rl_step(cfg, step, policy, reference, value_head, tokenizer, source, reward_fn, optimizers,
                             params, pad_id, device, autocast, ckpt_root)
            step += 1
            metrics.log(step, **record)
            bar.set_postfix({"reward": f"{record['rollout/reward']:.3f}",
                             "kl": f"{record['rollout/kl_seq']:.3f}"}, refresh=False)
            bar.update(1)
            stop_if_requested(stop.requested, save, step, log)
            if due(step, cfg.eval_every, cfg.num_steps):
                measure_gold(step)
            if due(step, cfg.checkpoint_every, cfg.num_steps):
                save(step)
        gold_after = measure_gold(step)
        save(step)

    records = read_metrics(metrics.path)
    if best["step"] is not None and best["step"] != step:
        chosen, _ = load_model_dir(out_dir / BEST_DIR, device)
        log.info("out/model: step %d, the best validation accuracy (%.3f)", best["step"], best["val"])
        gold_after = {k.removeprefix("gold/"): v for r in records if r["step"] == best["step"]
                      for k, v in r.items() if k.startswith("gold/")}
    else:
        chosen = plain_model(policy)
    final = save_model_dir(out_dir / "model", chosen, tokenizer, extra_files=greedy_generation_config())
    summary: dict[str, Any] = {
        "algorithm": cfg.algorithm, "policy": cfg.policy, "reference": cfg.reference or cfg.policy,
        "reward": cfg.reward, "prompts": cfg.prompts, "tasks": source.names, "trained_tasks": source.train_names,
        "probe": probe, "steps": step,
        "answers_per_step": cfg.prompts_per_step * cfg.group_size,
        "gold_accuracy": {"before": gold_before, "after": gold_after},  # after: of out/model
        "selected_step": best["step"] if best["step"] is not None else step,
        "validation_accuracy": best["val"] if best["step"] is not None else None,
        **{name: _trend(records, key) for name, key in (
            ("reward_trend", "rollout/reward"), ("correct_trend", "rollout/correct"),
            ("kl_seq_trend", "rollout/kl_seq"), ("entropy_trend", "rollout/entropy"),
            ("length_trend", "rollout/length"))},
        "wall_seconds": round(wall_before + time.perf_counter() - started, 1), "config": asdict(cfg)}
    atomic_write_json(out_dir / "rl.json", summary)
    plot_rl(metrics.path, out_dir / "rl.png", gold_keys)
    if gold_after:
        before = gold_before or {}
        log.info("gold accuracy before -> after: %s", ", ".join(
            f"{k} {before.get(k, float('nan')):.2f} -> {v:.2f}" for k, v in gold_after.items()))
    log.info("RL model: %s (%s)", final, out_dir / "rl.json")
    return final


def plain_model(policy: GPT) -> GPT:
    """The policy as an ordinary model (LoRA adapters folded into a copy), for saving as a model dir."""
    return fold_lora(copy.deepcopy(policy)) if lora_layers(policy) else policy


def replay_loss(cfg: RLConfig, policy: GPT, tokenizer: Tokenizer, names: list[str], step: int, update: int,
                pad_id: int, device: torch.device, autocast) -> torch.Tensor:
    """SFT cross-entropy on `ptx_rows` task-suite train conversations with reference answers, drawn as a
    pure function of (seed, step, update): InstructGPT's PPO-ptx term (Ouyang et al. 2022, eq. 2) with SFT
    data in place of pretraining data, which keeps RL from unlearning what SFT taught on tasks whose
    prompts give the policy gradient no signal (all answers right, or all wrong)."""
    examples = sample_examples(names, cfg.ptx_rows, "train", seed=f"ptx-{cfg.seed}-{step}-{update}")
    pairs = [render(tokenizer, ex.conversation(0)).inputs_targets() for ex in examples]
    width = min(max(len(x) for x, _ in pairs), policy.config.max_seq_len)
    x = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), width), -1, dtype=torch.long)
    for row, (inputs, targets) in enumerate(pairs):
        x[row, :len(inputs[:width])] = torch.tensor(inputs[:width])
        y[row, :len(targets[:width])] = torch.tensor(targets[:width])
    with autocast:
        loss = policy.masked_loss(x.to(device), y.to(device))
    return loss.float()


def rl_step(cfg: RLConfig, step: int, policy: GPT, reference: GPT, value_head: nn.Module | None,
            tokenizer: Tokenizer, source: PromptSource, reward_fn: RewardFn, optimizers: list[torch.optim.Optimizer],
            params: list[torch.Tensor], pad_id: int, device: torch.device, autocast,
            ckpt_root: Path) -> dict[str, float]:
    """One RL step at `step` (0-based): sample, score, update. Returns the step's metrics."""
    t0 = time.perf_counter()
    scale = lr_multiplier(step, cfg)
    set_lr_scale(optimizers, scale)

    # 1. sample: every prompt group_size times, one seed per answer
    prompts = [p for p in source.at(step, cfg.prompts_per_step * cfg.oversample) for _ in range(cfg.group_size)]
    policy.eval()
    merge_lora(policy)  # LoRA: sample at the base model's speed (unmerge restores the weights bit for bit)
    with autocast:
        turns = generate_chat(Engine(policy, tokenizer, strict_context=True), [p.ids for p in prompts],
                              cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              seeds=[sample_seed(cfg.seed, step, i) for i in range(len(prompts))])
    unmerge_lora(policy)
    rewards = reward_fn(prompts, turns)
    correct = verdicts(prompts, turns, tokenizer)
    truncated = [not t.finished for t in turns]
    rewards = [r - cfg.truncation_penalty * cut for r, cut in zip(rewards, truncated)]
    samples = [Sample(p, t, r, c) for p, t, r, c in zip(prompts, turns, rewards, correct)]
    by_task: dict[str, list[bool]] = {}  # the draw's verdicts per task: which tasks RL is moving
    for prompt, verdict in zip(prompts, correct):
        if verdict is not None:
            by_task.setdefault(prompt.example.task, []).append(verdict)
    drawn = {"reward": torch.tensor(rewards), "correct": [c for c in correct if c is not None], "by_task": by_task,
             "truncated": sum(truncated) / len(truncated),
             "signal": groups_with_signal(rewards, cfg.group_size) if cfg.oversample > 1 else []}
    if cfg.oversample > 1:
        samples = select_groups(samples, cfg.group_size, cfg.prompts_per_step)
    t_sample = time.perf_counter() - t0

    # 2. score: old and reference log-probs (and old values) of every action, in minibatch-sized chunks
    mb = min(cfg.minibatch_size, len(samples))
    old: dict[str, list[torch.Tensor]] = {"logp": [], "ref": [], "entropy": [], "values": []}
    with torch.no_grad():
        for start in range(0, len(samples), mb):
            chunk = samples[start:start + mb]
            ids, act = pad_samples(chunk, pad_id, device)
            targets = action_targets(chunk, device)
            cur = action_forward(policy, value_head, ids, act, targets, cfg.temperature, autocast)
            ref = action_forward(reference, None, ids, act, targets, cfg.temperature, autocast)
            counts = act.sum(dim=1).tolist()
            old["logp"] += cur["logp"].split(counts)
            old["entropy"] += cur["entropy"].split(counts)
            old["ref"] += ref["logp"].split(counts)
            if value_head is not None:
                old["values"] += cur["values"].split(counts)
    kl_token = torch.cat([lp - rf for lp, rf in zip(old["logp"], old["ref"])])
    kl_seq = torch.stack([(lp - rf).sum() for lp, rf in zip(old["logp"], old["ref"])]).mean().item()
    raise_if_diverged({"KL to the reference (nats/answer)": kl_seq}, step=step, checkpoints=ckpt_root,
                      limits={"KL to the reference (nats/answer)": cfg.max_kl},
                      hint="Lower --lr or raise --kl-coef")

    # 3. advantages (and PPO returns), per action token
    scores = torch.tensor([s.reward for s in samples], dtype=torch.float32, device=device)
    returns: list[torch.Tensor] = []
    record: dict[str, float] = {}
    if cfg.algorithm == "grpo":
        per_answer = group_advantages(scores, cfg.group_size, cfg.grpo_std)
        advantages = [per_answer[i].expand(len(lp)) for i, lp in enumerate(old["logp"])]
        signal = groups_with_signal([s.reward for s in samples], cfg.group_size)
        record["rollout/no_signal_groups"] = signal.count(False) / len(signal)
    else:
        counts = [len(lp) for lp in old["logp"]]
        act = torch.zeros(len(samples), max(counts), dtype=torch.bool, device=device)
        for r, n in enumerate(counts):
            act[r, :n] = True  # the actions of each answer, packed to the left: GAE only needs their order
        token_rewards = ppo_token_rewards(scores, scatter_rows(torch.cat(old["logp"]), act),
                                          scatter_rows(torch.cat(old["ref"]), act), act, cfg.kl_coef)
        adv, ret = gae(token_rewards, scatter_rows(torch.cat(old["values"]), act), act, cfg.gamma, cfg.lam)
        flat_adv = whiten(adv[act])
        advantages = list(flat_adv.split(counts))
        returns = list(ret[act].split(counts))

    # 4. update: ppo_epochs passes of minibatch steps over the answers
    sums = {"policy": 0.0, "value": 0.0, "kl": 0.0, "clip": 0.0, "grad_norm": 0.0}
    updates = 0
    policy.train()
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(
            sample_seed(cfg.seed, step, -1 - epoch))).tolist()
        for start in range(0, len(samples), mb):
            index = order[start:start + mb]
            chunk = [samples[i] for i in index]
            ids, act = pad_samples(chunk, pad_id, device)
            cur = action_forward(policy, value_head, ids, act, action_targets(chunk, device), cfg.temperature, autocast)

            def gather(parts: list[torch.Tensor]) -> torch.Tensor:
                return torch.cat([parts[i] for i in index])

            pg, clipped = clipped_policy_loss(cur["logp"], gather(old["logp"]), gather(advantages), cfg.clip_eps)
            loss = pg.mean()
            kl = k3_kl(cur["logp"], gather(old["ref"])).mean()
            value_loss = torch.zeros((), device=device)
            if cfg.ptx_coef:
                loss = loss + cfg.ptx_coef * replay_loss(cfg, policy, tokenizer, source.replay_names, step, updates,
                                                         pad_id, device, autocast)
            if cfg.algorithm == "grpo":
                loss = loss + cfg.kl_coef * kl
            else:
                value_loss = clipped_value_loss(cur["values"], gather(old["values"]), gather(returns),
                                                cfg.value_clip).mean()
                loss = loss + cfg.vf_coef * value_loss
            loss.backward()
            grad_norm = clipped_step(optimizers, params, cfg.grad_clip, {"RL loss": loss.item()}, step=step,
                                     checkpoints=ckpt_root,
                                     context=f" (epoch {epoch}, lr scale {scale:.4g}, peak lr {cfg.lr:g})",
                                     hint="Try a lower --lr, --grad-clip or a higher --kl-coef")
            updates += 1
            for key, value in (("policy", pg.mean().item()), ("value", value_loss.item()), ("kl", kl.item()),
                               ("clip", clipped.float().mean().item()), ("grad_norm", grad_norm)):
                sums[key] += value
    policy.eval()

    lengths = [sum(s.turn.generated) for s in samples]
    # reward, accuracy and truncation of every drawn answer: with oversampling the trained groups are a
    # selection, and only the draw measures the policy
    record.update({
        "rollout/reward": drawn["reward"].mean().item(), "rollout/reward_std": drawn["reward"].std(correction=0).item(),
        "rollout/kl_token": kl_token.mean().item(), "rollout/kl_seq": kl_seq,
        "rollout/entropy": torch.cat(old["entropy"]).mean().item(),
        "rollout/length": sum(lengths) / len(lengths),
        "rollout/truncated": drawn["truncated"],
        "loss/policy": sums["policy"] / updates,
        "train/clip_frac": sums["clip"] / updates, "train/grad_norm": sums["grad_norm"] / updates,
        "train/lr_scale": scale, "time/sample_s": t_sample, "time/step_s": time.perf_counter() - t0})
    if drawn["correct"]:
        record["rollout/correct"] = sum(drawn["correct"]) / len(drawn["correct"])
    for task, verdicts_of_task in drawn["by_task"].items():
        record[f"rollout/correct/{task}"] = sum(verdicts_of_task) / len(verdicts_of_task)
    if cfg.oversample > 1:
        record["rollout/signal_drawn"] = sum(drawn["signal"]) / len(drawn["signal"])
    # GRPO's loss has the k3 KL term; PPO's KL is in the rewards (rollout/kl_*)
    if cfg.algorithm == "grpo":
        record["loss/kl"] = sums["kl"] / updates
    else:
        record["loss/value"] = sums["value"] / updates
    return record


# ---------------------------------------------------------------------------------------------------------
# Command line


def register(sub) -> None:
    register_config_command(sub, "rl", "reinforcement learning (GRPO or PPO) on chat rollouts",
                            __doc__.splitlines()[0], RLConfig, PRESETS, train_rl)
