"""`gptlab eval`: every evaluation of one model together (`evaluate_model`), its JSON and markdown report,
and the command line (the package docstring says what each evaluation measures and why)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..chat import Message
from ..common import GptlabError, atomic_write_json, atomic_write_text, get_logger, torch_device, torch_dtype
from ..config import option, register_config_command
from ..model import GPT
from ..tasks import task_names
from ..tokenizer import Tokenizer
from .choice import multiple_choice_accuracy
from .gold import MODES, STYLES, ConversationScorer, gold_accuracy, pairwise_accuracy
from .loss import val_bits_per_byte

log = get_logger("eval")

# ---------------------------------------------------------------------------------------------------------
# Everything together, and the report


def evaluate_model(model: GPT, tokenizer: Tokenizer, mode: str = "base", tasks: Sequence[str] | None = None,
                   n_per_task: int = 20, shots: int | None = None, *, styles: Sequence[str] = ("qa", "assistant"),
                   data_dir: str | Path | None = None, val_batches: int = 8, batch_size: int = 16,
                   choices: bool = True, max_new_tokens: int = 64, samples: int = 2, seed: int = 0,
                   reward_scorer: ConversationScorer | None = None) -> dict[str, Any]:
    """All evaluations of one model as a JSON-ready dict. `tasks=[]` skips gold accuracy, `data_dir=None`
    skips bits per byte, `choices=False` skips multiple choice. `shots` defaults to 3 in base mode and 0
    in chat mode; base mode runs every prompt style in `styles`."""
    if mode not in MODES:
        raise GptlabError(f"unknown mode {mode!r} (expected base or chat)")
    shots = (3 if mode == "base" else 0) if shots is None else shots
    names = task_names(tasks)
    for style in styles if mode == "base" else ():
        if style not in STYLES:
            raise GptlabError(f"unknown prompt style {style!r} (expected one of {', '.join(STYLES)})")
    model.eval()
    result: dict[str, Any] = {"mode": mode, "params": model.num_params(), "config": model.config.to_dict(),
                              "seed": seed, "timings_s": {}}

    def timed(key: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        result[key] = fn()
        result["timings_s"][key] = round(time.perf_counter() - start, 2)

    if data_dir is not None:
        timed("val", lambda: val_bits_per_byte(model, tokenizer, data_dir, val_batches, batch_size))
        log.info("val: loss %.4f, %.4f bits/byte", result["val"]["loss"], result["val"]["bpb"])
    if choices:
        timed("choices", lambda: multiple_choice_accuracy(model, tokenizer, batch_size=batch_size))
        log.info("multiple choice: %.3f (chance %.3f)", result["choices"]["overall"]["accuracy"],
                 result["choices"]["overall"]["chance"])
    if names:
        runs = [(s, mode) for s in styles] if mode == "base" else [("chat", mode)]
        start = time.perf_counter()
        result["gold"] = []
        for style, run_mode in runs:
            gold = gold_accuracy(model, tokenizer, names, n_per_task, mode=run_mode, shots=shots, style=style,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples, seed=seed)
            log.info("gold accuracy (%s, %d-shot): %.3f", gold["style"], shots, gold["accuracy"])
            result["gold"].append(gold)
        result["timings_s"]["gold"] = round(time.perf_counter() - start, 2)
    if reward_scorer is not None:
        timed("reward", lambda: pairwise_accuracy(reward_scorer, names or None, n_per_task, seed))
        log.info("reward model pairwise accuracy: %.3f", result["reward"]["accuracy"])
    return result


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def render_markdown(result: dict[str, Any]) -> str:
    """The human-readable report of `evaluate_model`'s result."""
    lines = [f"# Evaluation of {result.get('model_dir', 'a model')}", "",
             f"Mode: {result['mode']}; {result['params'] / 1e6:.2f}M parameters; seed {result['seed']}.", ""]
    if "val" in result:
        v = result["val"]
        lines += ["## Validation", "", (f"Loss {v['loss']:.4f} nats/token, **{v['bpb']:.4f} bits per byte** "
                                        f"({v['tokens']:,} tokens, {v['batches']} batches of context "
                                        f"{v['seq_len']})."), ""]
    if "choices" in result:
        lines += ["## Multiple choice (log-likelihood)", "",
                  ("| category | n | chance | token baseline | accuracy (sum logprob) | per-byte baseline | "
                   "accuracy (per byte) |"), "|---|---|---|---|---|---|---|"]
        rows = [*result["choices"]["categories"].items(), ("**all**", result["choices"]["overall"])]
        for name, c in rows:
            lines.append(f"| {name} | {c['n']} | {_pct(c['chance'])} | {_pct(c['baseline'])} | "
                         f"{_pct(c['accuracy'])} ± {_pct(c['stderr'])} | {_pct(c['baseline_norm'])} | "
                         f"{_pct(c['accuracy_norm'])} |")
        lines += ["", ("Baselines: the score of a model that pays the same for every token (fewer tokens, or "
                       "fewer tokens per byte, wins); a random-init model lands near them, not at chance."), ""]
    for gold in result.get("gold", []):
        lines += [f"## Gold accuracy: {gold['style']} prompts, {gold['shots']}-shot", "",
                  "| task | n | accuracy | shots dropped to fit |", "|---|---|---|---|"]
        for name, t in gold["tasks"].items():
            lines.append(f"| {name} | {t['n']} | {_pct(t['accuracy'])} ± {_pct(t['stderr'])} | {t['shots_dropped']} |")
        lines += [f"| **mean over tasks** | | {_pct(gold['accuracy'])} | |", ""]
    if "reward" in result:
        r = result["reward"]
        lines += ["## Reward model: held-out pairwise accuracy", "", "| task | n | accuracy |", "|---|---|---|"]
        lines += [f"| {name} | {t['n']} | {_pct(t['accuracy'])} |" for name, t in r["tasks"].items()]
        lines += [f"| **all** | {r['n']} | {_pct(r['accuracy'])} ± {_pct(r['stderr'])} |", ""]
    for gold in result.get("gold", []):
        if gold["samples"]:
            lines += [f"## Sample transcripts: {gold['style']} prompts", ""]
        for s in gold["samples"]:
            verdict = "correct" if s["correct"] else "wrong"
            lines += [f"**{s['task']}** ({verdict}; gold answer: `{s['gold']}`)", "", "````text",
                      s["prompt"] + s["response"], "````", ""]
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items())
    lines += [f"Time: {timings}." if timings else ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write eval.json and eval.md atomically; returns their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, render_markdown(result))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class EvalConfig:
    model: str = option("", "model directory (required)")
    data: str | None = option(None, "prepared dataset for val bits per byte (skipped if not given)")
    out: str | None = option(None, "report directory (default: eval/ beside the model directory)")
    mode: str = option("base", "base (text prompts) or chat (chat format)")
    tasks: str = option("all", "comma-separated task names, all, or none")
    n_per_task: int = option(20, "test questions per task")
    shots: int | None = option(None, "worked examples per prompt (default: 3 in base mode, 0 in chat mode)")
    styles: str = option("qa,assistant", "base-mode prompt styles: qa and/or assistant (fake assistant document)")
    choices: bool = option(True, "multiple choice by log-likelihood")
    max_new_tokens: int = option(64, "tokens per generated answer")
    batch_size: int = option(16, "rows per forward pass")
    val_batches: int = option(8, "val batches for bits per byte")
    samples: int = option(2, "sample transcripts per task in the report")
    seed: int = option(0, "seed for the questions and shots")
    reward_model: str | None = option(None, "reward model directory (gptlab rm): report held-out pairwise accuracy")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = option("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")


PRESETS = {
    # a laptop CPU: a couple of minutes for a small model
    "quick": EvalConfig(),
    # a GPU: tighter error bars
    "full": EvalConfig(n_per_task=100, val_batches=40, batch_size=32, samples=3),
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_eval(cfg: EvalConfig) -> tuple[Path, Path]:
    """Load the model directory, evaluate it per `cfg`, write the report; returns (json, md) paths."""
    from ..checkpoint import load_model_dir

    if not cfg.model:
        raise GptlabError("--model is required (a model directory)")
    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise GptlabError(f"model directory not found: {model_dir}")
    if cfg.tasks.strip() == "none":
        tasks: list[str] | None = []
    else:
        tasks = None if cfg.tasks.strip() == "all" else _csv(cfg.tasks)
    device = torch_device(cfg.device)
    dtype = torch_dtype(cfg.dtype, device, allowed=("auto", "float32", "bfloat16"))
    model, tokenizer = load_model_dir(model_dir, device=device, dtype=dtype)
    reward_scorer: ConversationScorer | None = None
    if cfg.reward_model:
        from ..reward_model import RewardModel

        if not Path(cfg.reward_model).is_dir():
            raise GptlabError(f"reward model directory not found: {cfg.reward_model}")
        reward_model = RewardModel.load(cfg.reward_model, device=device, dtype=dtype)

        def reward_scorer(conversations: list[list[Message]]) -> list[float]:
            return reward_model.score(conversations, cfg.batch_size).tolist()
    result = evaluate_model(model, tokenizer, cfg.mode, tasks, cfg.n_per_task, cfg.shots, styles=_csv(cfg.styles),
                            data_dir=cfg.data, val_batches=cfg.val_batches, batch_size=cfg.batch_size,
                            choices=cfg.choices, max_new_tokens=cfg.max_new_tokens, samples=cfg.samples,
                            seed=cfg.seed, reward_scorer=reward_scorer)
    result = {"model_dir": str(model_dir), "data_dir": cfg.data, "reward_model_dir": cfg.reward_model, **result}
    paths = write_report(result, cfg.out or model_dir.parent / "eval")
    log.info("report: %s, %s", *paths)
    return paths


def register(sub) -> None:
    register_config_command(sub, "eval", "evaluate a model: bits per byte, multiple choice, task accuracy",
                            __doc__.splitlines()[0], EvalConfig, PRESETS, lambda cfg: run_eval(cfg)[1])
