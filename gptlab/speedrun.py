"""`gptlab speedrun`: the whole State-of-GPT recipe on the embedded default mixture, one stage after another:
tokenizer -> data -> pretrain -> SFT -> reward model -> RL -> DPO -> evaluation -> `report.md`.

    gptlab speedrun                      # preset cpu: the README's main command (<= 20 minutes on 2 cores)
    gptlab speedrun --preset gpu         # one GPU: GPT-2-small shape (110M), ~20 minutes on an H100
    gptlab chat --model runs/default/rl/model      # talk to the result

Design decisions
- Each stage is the ordinary stage command's Python API (`pretrain`, `sft`, `train_reward_model`,
  `train_rl`, `train_dpo`, `evaluate_model`) called with that command's preset of the same name plus the
  run's paths: the speedrun adds no training code, so anything it does can be reproduced one stage at a
  time with `gptlab <stage> --preset cpu ...`. The few overrides a preset of the speedrun makes (step
  counts, learning rates tuned for its model size) are fields of `SpeedrunConfig` and are logged.
- Resume: `run_dir/speedrun.json` records, per stage, a fingerprint of its configuration and of the
  fingerprints of the stages it reads (the tokenizer's includes the mixture file's parsed contents), its
  output and its wall time. A rerun skips a stage whose fingerprint is unchanged and whose output exists,
  and resumes an unfinished stage from its newest valid checkpoint (every stage runs with `resume=True`),
  so Ctrl-C at any point loses at most one checkpoint interval. Changing an option reruns that stage and
  every stage downstream of it (a new base model retrains SFT, RM, RL, DPO and the evaluation).
- Stages measure nothing twice: the training stages' own end-of-run gold evaluations are switched off
  and one evaluation stage measures every model on the same test questions (`gptlab.eval.report`, seeded), so
  the report's columns are comparable: the base model few-shot in both prompt styles (plain Q/A document
  and State of GPT's "fake assistant document"), the tuned models zero-shot in the chat format. RL keeps
  its in-training gold-accuracy curve (small n), which is what makes reward hacking visible.
- RL's reward (`rl_reward`): `verifier` (the task checkers; what raises gold accuracy most directly) or
  `rm` (the reward model this run trained: classic RLHF). DPO starts from the SFT model, as in Rafailov
  et al. 2023, so the report compares RL and DPO as two answers to the same question. The RL presets
  probe the SFT model first and train only on the tasks whose greedy accuracy they can still raise
  (`rl.probe_tasks`); the report lists which, and why the others were left out.
- The chat model at the end is the RL policy (`run_dir/rl/model`); `report.md` says which model scored
  best, and whether base < SFT <= RL held on this run (an honest line, not an assertion).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import load_model_dir
from .common import (GptlabError, atomic_write_json, atomic_write_text, get_logger, read_json, save_figure,
                     torch_device)
from .config import add_config_args, build_config, option
from .data.mixture import STRICT_UTF8_HELP, load_mixture, mixture_digest
from .data.prepare import PrepareConfig, prepare
from .infer.engine import Engine, default_batch_size
from .infer.sampling import SamplingParams
from .tokenizer import Tokenizer, train_tokenizer

log = get_logger("speedrun")

SAMPLE_PROMPTS = ["The king said", "Shares in the company", "def parse(", "The capital of France is"]
STATE_FILE = "speedrun.json"
REPORT_FILE = "report.md"
MODELS = ("base", "sft", "rl", "dpo")  # the report's columns, in recipe order


@dataclass
class SpeedrunConfig:
    run_dir: str = option("runs/default", "where every stage writes")
    mixture: str = option("default", "mixture name or .toml path")
    max_bytes: int | None = option(None, "cap on text read from the mixture")
    strict_utf8: bool = option(False, STRICT_UTF8_HELP)
    vocab_size: int = option(8192, "tokenizer vocabulary, specials included")
    stage_preset: str = option("cpu", "preset of every stage command (cpu or gpu), pretrain aside")
    pretrain_preset: str = option("tiny", "preset of `gptlab pretrain`")
    pretrain_steps: int | None = option(None, "override the pretrain preset's step count")
    sft_steps: int | None = option(None, "override the SFT preset's step count")
    sft_lr: float | None = option(None, "override the SFT preset's learning rate")
    sft_conversations: int | None = option(None, "override the SFT preset's number of training conversations")
    pref_prompts: int | None = option(None, "override the training preference sets of the RM and DPO presets")
    pref_val_prompts: int | None = option(None, "override the held-out preference sets of the RM and DPO presets")
    pref_sample_prompts: int | None = option(None, "override the prompts the RM and DPO presets sample policy "
                                                   "completions for")
    rm_steps: int | None = option(None, "override the reward-model preset's step count")
    rl_steps: int | None = option(None, "override the RL preset's step count")
    rl_reward: str = option("verifier", "RL reward: verifier (task checkers) or rm (this run's reward model)")
    rl_gold_per_task: int | None = option(None, "override the RL preset's test questions per task for its "
                                                "in-training gold-accuracy curve")
    dpo_steps: int | None = option(None, "override the DPO preset's step count")
    stages: str = option("all", "comma-separated stages to run (tokenizer,data,pretrain,sft,rm,rl,dpo,eval) "
                                "or all; a skipped stage reuses its earlier output, and the run stops after "
                                "the selected stages when the next one has never run")
    eval_per_task: int = option(30, "test questions per task in the evaluation stage")
    eval_shots: int = option(3, "shots of the base model's few-shot prompts")
    eval_max_tokens: int = option(96, "max new tokens per evaluated answer")
    device: str = option("auto", "auto, cpu, cuda")

    def __post_init__(self):
        if self.rl_reward not in ("verifier", "rm"):
            raise ValueError(f"rl_reward must be verifier or rm, got {self.rl_reward!r}")
        unknown = set(self.stage_list()) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)} (stages: {', '.join(STAGES)})")

    def stage_list(self) -> list[str]:
        return list(STAGES) if self.stages == "all" else [s.strip() for s in self.stages.split(",") if s.strip()]


STAGES = ("tokenizer", "data", "pretrain", "sft", "rm", "rl", "dpo", "eval")

PRESETS = {
    # CPU (2 cores, <= 20 minutes): a depth-4 model (5.3M parameters). Pretraining is short because, at this
    # size, what the tasks need is learned in SFT (docs/LOG.md "The CPU recipe"); SFT gets the largest share.
    # RL 36 steps rather than 24: over six seeds mean gold 24.7% vs 24.0%, three task types raised on 4 vs 3
    # (docs/LOG.md, session 7), for ~70 s more.
    "cpu": SpeedrunConfig(vocab_size=8192, stage_preset="cpu", pretrain_preset="small", pretrain_steps=100,
                          sft_steps=500, pref_prompts=480, pref_val_prompts=100, rm_steps=60, rl_steps=36,
                          rl_gold_per_task=10, dpo_steps=30),
    # GPU (one H100, ~10 minutes, well inside the 30-minute goal): a 32k vocabulary and the GPT-2 small
    # shape (110M parameters); 80 steps of 0.5M tokens (42M tokens, ~1.5 minutes at the 450k tokens/s
    # measured) are ~6 epochs of the default mixture's 7M tokens, about as many repeats as still help
    # (Muennighoff et al. 2023): bring a larger mixture and more --pretrain-steps for a stronger base.
    "gpu": SpeedrunConfig(vocab_size=32768, stage_preset="gpu", pretrain_preset="gpt2", pretrain_steps=80,
                          eval_per_task=100),
}


# ---------------------------------------------------------------------------------------------------------
# Bookkeeping: which stages are done with which configuration


def _fingerprint(config: Any, upstream: dict[str, str]) -> str:
    options = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    payload = json.dumps({"options": options, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class RunState:
    """`speedrun.json`: per stage, its configuration fingerprint and status ("running" from its start,
    "done" with output and wall time at its end)."""

    def __init__(self, run: Path):
        self.path = run / STATE_FILE
        self.stages: dict[str, dict[str, Any]] = (read_json(self.path, "speedrun state")["stages"]
                                                  if self.path.is_file() else {})

    def finished(self, stage: str) -> dict[str, Any] | None:
        entry = self.stages.get(stage)
        return entry if entry and entry.get("status") == "done" and Path(entry["output"]).exists() else None

    def start(self, stage: str, fingerprint: str) -> None:
        self.stages[stage] = {"fingerprint": fingerprint, "status": "running"}
        self._save()

    def record(self, stage: str, fingerprint: str, output: Path, seconds: float) -> None:
        self.stages[stage] = {"fingerprint": fingerprint, "status": "done", "output": str(output),
                              "seconds": round(seconds, 1)}
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.path, {"format": 1, "stages": self.stages})


def run_stage(state: RunState, name: str, config: Any, work: Callable[[], Path], wanted: list[str],
              checkpoints: Path | None = None, after: Sequence[str] = ()) -> Path:
    """Run `work` unless the stage already finished with the same `config` and the same upstream stages
    `after` (the stages whose output it reads: their fingerprints are part of its own, so a new base model
    retrains SFT and everything after it), or is not `wanted` and has finished before. A stage interrupted
    with the same fingerprint resumes from its own `checkpoints`; one whose fingerprint changed since it
    started starts afresh (its old checkpoints are removed: resuming them would continue another run)."""
    fingerprint = _fingerprint(config, {stage: state.stages[stage]["fingerprint"] for stage in after})
    entry = state.finished(name)
    if name not in wanted and (entry is None or entry["fingerprint"] != fingerprint):
        if entry is None and STAGES.index(name) > max(STAGES.index(stage) for stage in wanted):
            raise _AfterLastSelected(name)
        if entry is None:
            raise GptlabError(f"stage {name!r} has not run in this run dir and a selected stage needs its output: "
                              "add it to --stages")
        log.warning("%s: not selected; using its earlier output %s (other options)", name, entry["output"])
        return Path(entry["output"])
    if entry is not None and entry["fingerprint"] == fingerprint:
        log.info("%s: done before (%.0f s), reusing %s", name, entry["seconds"], entry["output"])
        return Path(entry["output"])
    previous = state.stages.get(name)
    if previous is not None and previous["fingerprint"] != fingerprint and checkpoints and checkpoints.is_dir():
        log.warning("%s: options changed since it last ran; removing its checkpoints %s and starting afresh",
                    name, checkpoints)
        shutil.rmtree(checkpoints)
    log.info("=== %s ===", name)
    state.start(name, fingerprint)
    start = time.perf_counter()
    output = work()
    state.record(name, fingerprint, output, time.perf_counter() - start)
    log.info("%s: %.1f s", name, time.perf_counter() - start)
    return output


def _override(config, **fields):
    """`dataclasses.replace` with the fields whose value is not None."""
    return dataclasses.replace(config, **{k: v for k, v in fields.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------
# The recipe


class _AfterLastSelected(Exception):
    """A stage after the last one selected with --stages has never run: the recipe stops there."""


def speedrun(cfg: SpeedrunConfig) -> Path:
    """The recipe; returns the report, or the run dir when `--stages` stops before the evaluation (e.g.
    `--stages tokenizer,data` on a machine with the mixture's packages, the rest on a GPU machine)."""
    try:
        return _recipe(cfg)
    except _AfterLastSelected as stop:
        log.info("stopping before %s: it and the stages after it were not selected and have not run", stop)
        return Path(cfg.run_dir)


def _recipe(cfg: SpeedrunConfig) -> Path:
    # imported here: each stage module is heavy, and `gptlab --help` should not pay for them
    from .train.dpo import PRESETS as DPO_PRESETS
    from .train.dpo import train_dpo
    from .train.pretrain import PRESETS as PRETRAIN_PRESETS
    from .train.pretrain import pretrain
    from .train.reward import PRESETS as RM_PRESETS
    from .train.reward import train_reward_model
    from .train.rl_config import PRESETS as RL_PRESETS
    from .train.rl import train_rl
    from .train.sft import PRESETS as SFT_PRESETS
    from .train.sft import sft

    if cfg.pretrain_preset not in PRETRAIN_PRESETS:
        raise ValueError(f"unknown pretrain preset {cfg.pretrain_preset!r}")
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state, wanted = RunState(run), cfg.stage_list()
    preset = cfg.stage_preset

    tok_path = run / "tokenizer.json"
    # the mixture's digest too: an edited mixture file under the same name must retrain the tokenizer
    tok_cfg = {"mixture": cfg.mixture, "mixture_sha256": mixture_digest(cfg.mixture), "max_bytes": cfg.max_bytes,
               "vocab_size": cfg.vocab_size}

    def train_tok() -> Path:
        mixture = load_mixture(cfg.mixture, max_bytes=cfg.max_bytes, strict_utf8=cfg.strict_utf8)
        log.info("training a %d-token vocabulary on mixture %r", cfg.vocab_size, mixture.name)
        train_tokenizer((d.text for d in mixture.documents("train")), cfg.vocab_size).save(tok_path)
        return tok_path

    run_stage(state, "tokenizer", tok_cfg, train_tok, wanted)

    data_cfg = PrepareConfig(mixture=cfg.mixture, tokenizer=str(tok_path), out=str(run / "data"),
                             max_bytes=cfg.max_bytes, strict_utf8=cfg.strict_utf8, force=True)
    data_dir = run_stage(state, "data", {**dataclasses.asdict(data_cfg), "tokenizer_sha256": Tokenizer.load(tok_path).sha256},
                         lambda: prepare(data_cfg), wanted,
                         after=("tokenizer",))

    pre_cfg = dataclasses.replace(PRETRAIN_PRESETS[cfg.pretrain_preset], data_dir=str(data_dir),
                                  tokenizer=str(tok_path), out_dir=str(run / "pretrain"), resume=True,
                                  device=cfg.device)
    if cfg.pretrain_steps is not None:
        quarter = max(1, cfg.pretrain_steps // 4)  # a val curve of at least 5 points, whatever the step count
        pre_cfg = dataclasses.replace(pre_cfg, num_steps=cfg.pretrain_steps,
                                      warmup_steps=min(pre_cfg.warmup_steps, max(1, cfg.pretrain_steps // 10)),
                                      eval_every=min(pre_cfg.eval_every, quarter),
                                      checkpoint_every=min(pre_cfg.checkpoint_every, 2 * quarter))
    base_dir = run_stage(state, "pretrain", pre_cfg, lambda: _pretrain_and_sample(pretrain, pre_cfg, cfg.device),
                         wanted, run / "pretrain" / "checkpoints", after=("data",))

    def trained(name: str, after: tuple[str, ...], preset_cfg, train: Callable, **fields) -> Path:
        """A training stage writing to run/<name>, resumable from its own checkpoints there."""
        config = _override(preset_cfg, out=str(run / name), resume=True, device=cfg.device, **fields)
        return run_stage(state, name, config, lambda: train(config), wanted, run / name / "checkpoints", after)

    sft_dir = trained("sft", ("pretrain",), SFT_PRESETS[preset], sft, model=str(base_dir), gold_per_task=0,
                      num_steps=cfg.sft_steps, lr=cfg.sft_lr, num_conversations=cfg.sft_conversations)
    rm_dir = trained("rm", ("sft",), RM_PRESETS[preset], train_reward_model, model=str(sft_dir), num_steps=cfg.rm_steps,
                     train_prompts=cfg.pref_prompts, val_prompts=cfg.pref_val_prompts,
                     sample_prompts=cfg.pref_sample_prompts)
    by_rm = cfg.rl_reward != "verifier"
    rl_dir = trained("rl", ("sft", "rm") if by_rm else ("sft",), RL_PRESETS[preset], train_rl, policy=str(sft_dir),
                     num_steps=cfg.rl_steps, gold_per_task=cfg.rl_gold_per_task,
                     reward=str(rm_dir) if by_rm else "verifier")
    dpo_dir = trained("dpo", ("sft",), DPO_PRESETS[preset], train_dpo, model=str(sft_dir), gold_prompts=0,
                      num_steps=cfg.dpo_steps, train_prompts=cfg.pref_prompts, val_prompts=cfg.pref_val_prompts,
                      sample_prompts=cfg.pref_sample_prompts)

    models = {"base": base_dir, "sft": sft_dir, "rl": rl_dir, "dpo": dpo_dir}
    eval_cfg = {"models": {k: str(v) for k, v in models.items()}, "rm": str(rm_dir),
                "per_task": cfg.eval_per_task, "shots": cfg.eval_shots, "max_tokens": cfg.eval_max_tokens}
    eval_dir = run_stage(state, "eval", eval_cfg, lambda: evaluate_all(models, rm_dir, data_dir, run / "eval", cfg),
                         wanted, after=("data", "pretrain", "sft", "rm", "rl", "dpo"))

    report = write_report(run, state, eval_dir)
    log.info("report: %s; chat with the RL model: gptlab chat --model %s", report, rl_dir)
    return report


def _pretrain_and_sample(pretrain: Callable, pre_cfg, device: str) -> Path:
    base_dir = pretrain(pre_cfg)
    model, tokenizer = load_model_dir(base_dir, torch_device(device))
    # sampled, not greedy: a small base model's greedy text falls into loops ("to the to the ...")
    outputs = Engine(model, tokenizer).generate(
        SAMPLE_PROMPTS, SamplingParams(max_new_tokens=32, temperature=0.8, top_k=50, repetition_penalty=1.2, seed=0))
    for prompt, out in zip(SAMPLE_PROMPTS, outputs):
        log.info("base model sample: %r -> %r", prompt, out.text)
    return base_dir


def evaluate_all(models: dict[str, Path], rm_dir: Path, data_dir: Path, out: Path, cfg: SpeedrunConfig) -> Path:
    """One `eval/<model>.json` per model (same seeded test questions for all), plus the reward model's
    held-out pairwise accuracy in `eval/rm.json`."""
    from .eval.gold import pairwise_accuracy
    from .eval.report import evaluate_model
    from .reward_model import RewardModel

    out.mkdir(parents=True, exist_ok=True)
    # on the run's device (fp32: the report's figures should not depend on the precision of the machine)
    device = torch_device(cfg.device)
    for name, path in models.items():
        model, tokenizer = load_model_dir(path, device)
        mode = "base" if name == "base" else "chat"
        log.info("evaluating %s (%s, %s)", name, path, mode)
        result = evaluate_model(model, tokenizer, mode=mode, n_per_task=cfg.eval_per_task,
                                shots=cfg.eval_shots if mode == "base" else 0, data_dir=data_dir,
                                choices=mode == "base", max_new_tokens=cfg.eval_max_tokens, samples=1,
                                # all of a task's questions in one batch: a decode step costs about the
                                # same for 1 row as for 32 on a CPU, so fewer batches = fewer steps
                                batch_size=default_batch_size(model, cpu=min(64, cfg.eval_per_task)))
        result["model_dir"] = str(path)
        atomic_write_json(out / f"{name}.json", result)
    reward_model = RewardModel.load(rm_dir, device)
    atomic_write_json(out / "rm.json", pairwise_accuracy(reward_model.score, n_per_task=cfg.eval_per_task))
    return out


# ---------------------------------------------------------------------------------------------------------
# The report


def gold_columns(eval_dir: Path) -> dict[str, dict[str, Any]]:
    """{column label: gold result} in report order: the base model once per prompt style, then the tuned
    models."""
    columns = {}
    for name in MODELS:
        path = eval_dir / f"{name}.json"
        if not path.is_file():
            continue
        for gold in read_json(path, "evaluation result").get("gold", []):
            label = name if gold["mode"] == "chat" else f"base {gold['style']} {gold['shots']}-shot"
            columns[label] = gold
    return columns


def best_base(columns: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """The base model's better prompt style: the fair baseline for SFT."""
    base = {k: v["accuracy"] for k, v in columns.items() if k.startswith("base")}
    label = max(base, key=base.get)
    return label, base[label]


def recipe_verdict(columns: dict[str, dict[str, Any]]) -> str:
    """One honest sentence: did base < SFT <= RL hold on mean gold accuracy, and on how many tasks did RL
    beat SFT?"""
    if not {"sft", "rl"} <= columns.keys() or not any(k.startswith("base") for k in columns):
        return "Not every model was evaluated."
    base_label, base = best_base(columns)
    sft, rl = columns["sft"]["accuracy"], columns["rl"]["accuracy"]
    raised = [t for t in columns["rl"]["tasks"]
              if columns["rl"]["tasks"][t]["accuracy"] > columns["sft"]["tasks"][t]["accuracy"]]
    holds = base < sft <= rl
    return (f"base < SFT <= RL {'holds' if holds else 'does NOT hold'} on mean gold accuracy "
            f"({base_label} {100 * base:.1f}%, SFT {100 * sft:.1f}%, RL {100 * rl:.1f}%); RL beat SFT on "
            f"{len(raised)} task(s){': ' + ', '.join(raised) if raised else ''}.")


def plot_gold(columns: dict[str, dict[str, Any]], png: Path) -> Path:
    """Grouped bars: gold accuracy per task (x) for every column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for g in columns.values() for t in g["tasks"]})
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks)), 4), dpi=100)
    width = 0.8 / max(1, len(columns))
    for i, (label, gold) in enumerate(columns.items()):
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [gold["tasks"].get(t, {}).get("accuracy", 0.0) for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("gold accuracy (test split)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, png)


def _pct(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    return f"{100 * result['accuracy']:.0f} ± {100 * result['stderr']:.0f}"


def write_report(run: Path, state: RunState, eval_dir: Path) -> Path:
    columns = gold_columns(eval_dir)
    lines = [f"# gptlab speedrun report: `{run}`", "", recipe_verdict(columns), ""]
    if columns:
        plot_gold(columns, run / "gold.png")
        n = next(iter(columns.values()))["tasks"]
        n = next(iter(n.values()))["n"] if n else 0
        lines += ["## Gold accuracy per task (%, ± binomial standard error; test split, "
                  f"{n} questions per task, greedy)", "",
                  "| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for task in sorted({t for g in columns.values() for t in g["tasks"]}):
            lines.append(f"| {task} | " + " | ".join(_pct(g["tasks"].get(task)) for g in columns.values()) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{100 * g['accuracy']:.1f}**" for g in columns.values()) + " |")
        lines += ["", "![gold accuracy per task](gold.png)", ""] + rl_tasks_lines(run / "rl" / "rl.json")
    lines += ["## Other figures", "", "| model | val bits/byte | multiple choice | notes |", "|---|---|---|---|"]
    for name in MODELS:
        path = eval_dir / f"{name}.json"
        if path.is_file():
            result = read_json(path, "evaluation result")
            choices = result.get("choices", {}).get("overall")
            mc = f"{100 * choices['accuracy']:.1f}% (chance {100 * choices['chance']:.1f}%)" if choices else "-"
            lines.append(f"| {name} | {result['val']['bpb']:.3f} | {mc} | {result['params'] / 1e6:.2f}M params |")
    if (eval_dir / "rm.json").is_file():
        rm = read_json(eval_dir / "rm.json", "reward-model evaluation")
        lines += ["", f"Reward model held-out pairwise accuracy: **{100 * rm['accuracy']:.1f}%** "
                      f"({rm['n']} pairs: reference answer vs a wrong, evasive or malformed one)."]
    lines += ["", "## Stages", "", "| stage | wall time | output |", "|---|---|---|"]
    for stage in STAGES:
        entry = state.stages.get(stage)
        if entry:
            lines.append(f"| {stage} | {entry['seconds']:.0f} s | `{entry['output']}` |")
    total = sum(e["seconds"] for e in state.stages.values())
    lines += [f"| **total** | **{total / 60:.1f} min** | |", "", "## Training curves", ""]
    for stage, png in (("pretrain", "pretrain/loss.png"), ("sft", "sft/loss.png"), ("rm", "rm/loss.png"),
                       ("rl", "rl/rl.png"), ("dpo", "dpo/loss.png")):
        if (run / png).is_file():
            lines.append(f"![{stage}]({png})")
    lines += ["", "## Sample answers (first test question per task)", ""]
    for label, gold in columns.items():
        for sample in gold.get("samples", [])[:len(gold["tasks"])]:
            if label in ("sft", "rl"):
                verdict = "correct" if sample["correct"] else "wrong"
                lines.append(f"- **{label}**, {sample['task']} ({verdict}): "
                             f"`{_one_line(sample['prompt'])}` -> `{_one_line(sample['response'])}`")
    atomic_write_text(run / REPORT_FILE, "\n".join(lines) + "\n")
    return run / REPORT_FILE


def rl_tasks_lines(rl_json: Path) -> list[str]:
    """Which tasks RL trained on, and why the others were left out (its probe of the SFT model)."""
    if not rl_json.is_file():
        return []
    probe = read_json(rl_json, "RL summary").get("probe") or {}
    if not probe:
        return []
    solved = [t for t, r in probe.items() if r["solved"]]
    unreached = [t for t, r in probe.items() if not r["solved"] and not r["trained"]]
    trained = [f"{t} ({100 * r['greedy']:.0f}% greedy, {100 * r['sampled']:.0f}% sampled)"
               for t, r in probe.items() if r["trained"]]
    line = (f"RL trained on {', '.join(trained) or 'every task (none was left to raise)'}; it left out "
            f"{', '.join(solved) or 'no task'} as solved and {', '.join(unreached) or 'no task'} as out of reach "
            "(no right answer): accuracy of the SFT model on RL's probe prompts (`gptlab rl --probe-per-task`).")
    return [line, ""]


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.replace("`", "'").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def register(sub) -> None:
    p = sub.add_parser("speedrun", help="the whole recipe on the default mixture: tokenizer to report.md")
    add_config_args(p, SpeedrunConfig, PRESETS)
    p.set_defaults(func=lambda args: print(speedrun(build_config(SpeedrunConfig, args, PRESETS))))
