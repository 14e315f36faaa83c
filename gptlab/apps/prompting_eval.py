"""`gptlab prompt eval`: a table of prompting techniques x tasks on one LLM, resumable.

    gptlab prompt eval --model smollm2-135m-instruct --tasks arithmetic,word_problems,game24 \\
        --techniques direct,fewshot,cot,self-consistency,tot --n 20 --k 1,5,10 --out runs/prompting
    gptlab prompt eval --base-url http://127.0.0.1:8000/v1 --prompt runs/search/prompt.json --out ...

Writes to `--out`: `answers.jsonl` (one line per technique, task and question: the graded reply, its
answer, tokens and seconds), `prompt_eval.json` and `prompt_eval.md` (accuracy with a 95% Wilson
interval, completion tokens and seconds per question), and `prompt_eval.png` (accuracy vs k for
self-consistency; accuracy vs completion tokens per technique).

Design decisions
- Techniques (`gptlab.apps.prompting`, `prompting_tot`): direct (zero-shot), fewshot (`--shots` train
  examples), loglik (label tasks only: the `--shots`-shot prompt's likeliest label by log-probability, no
  generation; `--normalise` per byte or token), cot (zero-shot chain of thought), fewshot-cot,
  self-consistency (one draw of max(k) sampled chains; the row for each k votes over the first k of
  them), verify (check your work, `--retries`), tot (tree of thoughts; Game of 24 and numeric tasks
  only), and `prompt` (a program from `gptlab prompt search`, on its own task). Every reply is graded by
  the task's own checker. A technique that does not apply to a task is listed as skipped.
- Questions are the test questions `gptlab eval` draws (same seed, same questions), so figures compare.
- Resumable: each finished question is appended to answers.jsonl at once, keyed by (technique, task,
  question index, question) and a fingerprint of everything that changes the answer (model name, format,
  max tokens, shots, seed and the technique's own settings). A rerun skips what is done, so an
  interrupted run loses at most the question in flight; a changed setting recomputes only what it changes.
- Context window: few-shot prompts keep as many demonstrations as fit (`Prompter.generate_fitting`; the
  table notes the mean kept); a question whose prompt does not fit the model's window even alone is
  recorded as over context (with the error), left out of its row's n and counted in the row's "over
  context" column, and the run goes on: a 256-token model must not stop the table, nor hide what it missed.
- Self-consistency's time per question at k < max(k) is the measured time of the max(k)-sample call
  scaled by k / max(k) (one batched call draws them all); its tokens are counted exactly per sample.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common import AnswerCache, GptlabError, atomic_write_json, atomic_write_text, get_logger, save_figure
from ..config import add_config_args, build_config, option
from ..eval.stats import wilson_interval
from .llm_base import ContextOverflow
from .prompting import (Program, Prompter, PromptTask, Sample, answer, check_your_work, choose_label, majority,
                        prompt_task, self_consistency, shot_pairs)
from .prompt_search import program_task
from .prompting_tot import TotConfig, supports_tot, tree_of_thoughts

log = get_logger("prompt")

TECHNIQUES = ("direct", "fewshot", "loglik", "cot", "fewshot-cot", "self-consistency", "verify", "tot")


@dataclass
class PromptEvalConfig:
    tasks: str = option("arithmetic,word_problems,sentiment,game24", "comma-separated suite tasks and/or game24")
    techniques: str = option("direct,fewshot,cot,self-consistency", f"comma-separated: {', '.join(TECHNIQUES)}")
    n: int = option(20, "test questions per task")
    k: str = option("1,5,10", "self-consistency sample counts (one draw of the largest)")
    shots: int = option(3, "train examples shown by fewshot, fewshot-cot and loglik")
    normalise: str = option("none", "loglik: label scores as summed log-probs (none), per byte or per token")
    format: str = option("chat", "chat (tuned models), qa or assistant (base-model documents)")
    max_tokens: int = option(256, "tokens per reply")
    retries: int = option(2, "verify: answers again at most this many times when the model says wrong")
    breadth: int = option(5, "tot: states kept per level")
    depth: int = option(3, "tot: levels")
    evaluations: int = option(3, "tot: sampled value calls per state")
    prompt: str | None = option(None, "a prompt file written by `gptlab prompt search` (adds technique 'prompt')")
    out: str = option("prompt-eval", "output directory (rerun with the same one to resume)")
    seed: int = option(0, "seed for questions, shots and sampling")
    progress: bool = option(True, "progress bar")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in _csv(text)})
    except ValueError:
        raise GptlabError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise GptlabError(f"--k needs integers >= 1, got {text!r}")
    return ks


def load_program(path: str | Path) -> Program:
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"prompt file {path} is not valid JSON: {e}") from None
    return Program.from_json(data, str(path))


ANSWER_KEY = ("technique", "task", "index", "question", "fingerprint")  # answers.jsonl


def _sample_record(sample: Sample) -> dict[str, Any]:
    record = {"text": sample.text, "answer": sample.key, "correct": sample.score,
              "completion_tokens": sample.completion_tokens, "prompt_tokens": sample.prompt_tokens}
    return record if sample.shots is None else {**record, "shots": sample.shots}


def run_technique(technique: str, prompter: Prompter, task: PromptTask, example, index: int,
                  cfg: PromptEvalConfig, ks: list[int], program: Program | None = None) -> dict[str, Any]:
    """One question under one technique: a record with the graded reply (and the samples, votes or
    search statistics the technique has)."""
    if technique == "direct":
        return _sample_record(answer(prompter, task, example)[0])
    if technique in ("fewshot", "fewshot-cot"):
        cot = technique == "fewshot-cot"
        shots = shot_pairs(task, example, cfg.shots, cfg.seed, index, cot=cot)
        return _sample_record(answer(prompter, task, example, shots=shots, cot=cot)[0])
    if technique == "loglik":
        shots = shot_pairs(task, example, cfg.shots, cfg.seed, index)
        return _sample_record(choose_label(prompter, task, example, shots, cfg.normalise))
    if technique == "cot":
        return _sample_record(answer(prompter, task, example, cot=True)[0])
    if technique == "self-consistency":
        samples = self_consistency(prompter, task, example, max(ks), seed=cfg.seed + index)
        best, agreement = majority(samples)
        return {**_sample_record(best), "agreement": agreement,
                "completion_tokens": sum(s.completion_tokens for s in samples),
                "prompt_tokens": sum(s.prompt_tokens for s in samples),
                "samples": [{"answer": s.key, "correct": s.score, "completion_tokens": s.completion_tokens,
                             "text": s.text} for s in samples]}
    if technique == "verify":
        attempts, verdicts = check_your_work(prompter, task, example, cfg.retries, seed=cfg.seed + index)
        return {**_sample_record(attempts[-1]), "verdicts": verdicts, "tries": len(attempts),
                "first_correct": attempts[0].score,
                "completion_tokens": sum(a.completion_tokens for a in attempts),
                "prompt_tokens": sum(a.prompt_tokens for a in attempts)}
    if technique == "tot":
        tot = TotConfig(breadth=cfg.breadth, depth=cfg.depth, evaluations=cfg.evaluations,
                        max_tokens=min(cfg.max_tokens, 160))
        sample, stats = tree_of_thoughts(prompter, task, example, tot)
        return {**_sample_record(sample), "calls": stats.calls, "proposed": stats.proposed,
                "rejected": stats.rejected, "levels": stats.levels, "shots_dropped": stats.shots_dropped,
                "over_context": stats.over_context}
    if technique == "prompt":
        return _sample_record(answer(prompter, task, example, instruction=program.instruction, shots=program.demos,
                                     cot=program.cot)[0])
    raise GptlabError(f"unknown technique {technique!r} (expected one of {', '.join(TECHNIQUES)})")


def _fingerprint(technique: str, llm_name: str, cfg: PromptEvalConfig, ks: list[int], program: Program | None) -> str:
    settings = {"model": llm_name, "format": cfg.format, "max_tokens": cfg.max_tokens, "seed": cfg.seed}
    own = {"fewshot": {"shots": cfg.shots}, "fewshot-cot": {"shots": cfg.shots},
           "loglik": {"shots": cfg.shots, "normalise": cfg.normalise},
           "self-consistency": {"k": max(ks)}, "verify": {"retries": cfg.retries},
           "tot": {"breadth": cfg.breadth, "depth": cfg.depth, "evaluations": cfg.evaluations},
           "prompt": {"program": program.to_json() if program else None}}
    settings.update(own.get(technique, {}))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def summarise(records: list[dict], ks: list[int]) -> list[dict[str, Any]]:
    """Table rows (technique, task, n, accuracy, Wilson interval, tokens and seconds per question) from
    answer records, with self-consistency expanded into one row per k, and a pooled row per technique."""
    groups: dict[tuple[str, str], list[dict]] = {}
    over: dict[tuple[str, str], int] = {}
    for r in records:
        if "overflow" in r:
            sc = r["technique"] == "self-consistency"
            techniques = [f"self-consistency@{k}" for k in ks] if sc else [r["technique"]]
            for technique in techniques:
                over[technique, r["task"]] = over.get((technique, r["task"]), 0) + 1
                groups.setdefault((technique, r["task"]), [])
        elif r["technique"] == "self-consistency":
            kmax = len(r["samples"])
            for k in (k for k in ks if k <= kmax):
                first = r["samples"][:k]
                best, agreement = majority([Sample(s["text"], s["answer"], s["correct"], s["completion_tokens"], 0)
                                            for s in first])
                groups.setdefault((f"self-consistency@{k}", r["task"]), []).append(
                    {"correct": best.score, "completion_tokens": sum(s["completion_tokens"] for s in first),
                     "seconds": r["seconds"] * k / kmax, "agreement": agreement})
        else:
            groups.setdefault((r["technique"], r["task"]), []).append(r)
    rows = []
    for technique in dict.fromkeys(t for t, _ in groups):
        per_task = [(task, rs) for (t, task), rs in groups.items() if t == technique]
        pooled = [r for _, rs in per_task for r in rs]
        for task, rs in per_task + ([("all (pooled)", pooled)] if len(per_task) > 1 else []):
            n, correct = len(rs), sum(r["correct"] for r in rs)
            skipped = (sum(over.get((technique, t), 0) for t, _ in per_task) if task == "all (pooled)"
                       else over.get((technique, task), 0))
            row = {"technique": technique, "task": task, "n": n, "correct": correct, "over_context": skipped}
            if n:  # every question over context: no accuracy to report
                low, high = wilson_interval(correct, n)
                row.update(accuracy=correct / n, wilson_low=low, wilson_high=high,
                           tokens_per_question=sum(r["completion_tokens"] for r in rs) / n,
                           seconds_per_question=sum(r["seconds"] for r in rs) / n)
            if n and "agreement" in rs[0]:
                row["mean_agreement"] = sum(r["agreement"] for r in rs) / n
            kept = [r["shots"] for r in rs if "shots" in r]
            if kept:
                row["mean_shots_kept"] = sum(kept) / len(kept)
            rows.append(row)
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Prompting techniques on {result['model']}", "",
             f"Format {result['format']}; {result['n']} test questions per task; seed {result['seed']}; "
             f"max {result['max_tokens']} tokens per reply. Accuracy with its 95% Wilson interval; tokens are "
             "completion tokens per question (every call the technique makes).", "",
             "| technique | task | n | accuracy | 95% interval | tokens/question | s/question | over context |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["n"]:
            figures = (f"{100 * r['accuracy']:.1f}% | {100 * r['wilson_low']:.1f}-{100 * r['wilson_high']:.1f}% | "
                       f"{r['tokens_per_question']:.0f} | {r['seconds_per_question']:.2f}")
        else:
            figures = "- | - | - | -"
        lines.append(f"| {r['technique']} | {r['task']} | {r['n']} | {figures} | {r['over_context']} |")
    if any(r["over_context"] for r in result["rows"]):
        lines += ["", "Over context: questions whose prompt did not fit the model's context window even without "
                      "demonstrations; they are not in n (the error is in answers.jsonl)."]
    cut = [r for r in result["rows"] if r.get("mean_shots_kept", result["config"]["shots"]) < result["config"]["shots"]]
    if cut:
        lines += ["", f"Demonstrations dropped to fit the window ({result['config']['shots']} asked; mean kept): "
                  + ", ".join(f"{r['technique']} on {r['task']} {r['mean_shots_kept']:.1f}" for r in cut) + "."]
    if result["skipped"]:
        lines += ["", "Skipped (technique does not apply): " + ", ".join(f"{t} on {k}" for t, k in result["skipped"]) + "."]
    lines += ["", "Self-consistency rows at k < max(k) vote over the first k samples of one draw; their seconds "
                  "are the draw's time scaled by k / max(k).", "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: self-consistency accuracy vs k per task (Wilson bars); right: accuracy vs completion tokens
    per question, one point per technique pooled over its tasks (self-consistency as a line over k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = [r for r in rows if r["n"]]  # a row with every question over context has no point to draw
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sc = [r for r in rows if r["technique"].startswith("self-consistency@")]
    for task in dict.fromkeys(r["task"] for r in sc):
        rs = sorted((r for r in sc if r["task"] == task), key=lambda r: int(r["technique"].split("@")[1]))
        ks = [int(r["technique"].split("@")[1]) for r in rs]
        acc = [r["accuracy"] for r in rs]
        err = [[a - r["wilson_low"] for a, r in zip(acc, rs)], [r["wilson_high"] - a for a, r in zip(acc, rs)]]
        pooled = task == "all (pooled)"
        left.errorbar(ks, acc, yerr=err, marker="o", capsize=3, label=task, color="black" if pooled else None,
                      linewidth=2.5 if pooled else 1.2)
    left.set(title="Self-consistency: accuracy vs k", xlabel="samples k", ylabel="accuracy", ylim=(-0.02, 1.02))
    left.set_xticks(sorted({int(r["technique"].split("@")[1]) for r in sc}))
    if sc:
        left.legend(fontsize=8)
    by_technique: dict[str, list[dict]] = {}
    for r in rows:
        by_technique.setdefault(r["technique"], []).append(r)
    tasks = {r["task"] for r in rows} - {"all (pooled)"}
    # one point per technique: its pooled row, or its only row when it ran on one task
    overall = [next((r for r in rs if r["task"] == "all (pooled)"), rs[0]) for rs in by_technique.values()]
    for r in overall:
        if not r["technique"].startswith("self-consistency@"):
            where = "" if r["task"] == "all (pooled)" or len(tasks) == 1 else f" ({r['task']} only)"
            right.scatter(r["tokens_per_question"], r["accuracy"], label=r["technique"] + where)
    curve = sorted((r for r in overall if r["technique"].startswith("self-consistency@")),
                   key=lambda r: r["tokens_per_question"])
    if curve:
        right.plot([r["tokens_per_question"] for r in curve], [r["accuracy"] for r in curve], marker="s",
                   label="self-consistency (k)")
    right.set(title="Accuracy vs tokens spent (pooled over tasks)", xlabel="completion tokens per question",
              ylabel="accuracy", ylim=(-0.02, 1.02))
    if overall and min(r["tokens_per_question"] for r in overall) > 0:  # loglik spends none: then a linear axis
        right.set_xscale("log")
        right.xaxis.set_major_formatter(ScalarFormatter())
        right.xaxis.set_minor_formatter(NullFormatter())
    if overall:
        right.legend(fontsize=8)
    save_figure(fig, path, dpi=110)


def prompt_eval(llm: Any, cfg: PromptEvalConfig, command: str = "") -> dict[str, Any]:
    """Run (or resume) the technique table; writes answers.jsonl, prompt_eval.{json,md,png} under cfg.out."""
    from tqdm import tqdm

    ks = parse_ks(cfg.k)
    techniques = _csv(cfg.techniques)
    unknown = [t for t in techniques if t not in TECHNIQUES]
    if unknown:
        raise GptlabError(f"unknown techniques {unknown} (expected some of {', '.join(TECHNIQUES)})")
    if cfg.n < 1:
        raise GptlabError(f"--n must be >= 1, got {cfg.n}")
    tasks = {name: prompt_task(name) for name in _csv(cfg.tasks)}
    program = load_program(cfg.prompt) if cfg.prompt else None
    jobs, skipped = [], []
    for technique in techniques:
        for name, task in tasks.items():
            if (technique == "tot" and not supports_tot(task)) or (technique == "loglik" and not task.labels):
                skipped.append((technique, name))
            else:
                jobs.append((technique, task, cfg.format))
    if program is not None:
        jobs.append(("prompt", tasks.get(program.task) or program_task(program), program.format))
    out = Path(cfg.out)
    cache = AnswerCache(out / "answers.jsonl", ANSWER_KEY)
    work = [(technique, task, fmt, i, example) for technique, task, fmt in jobs
            for i, example in enumerate(task.examples("test", cfg.n, cfg.seed))]
    fingerprints = {t: _fingerprint(t, llm.name, cfg, ks, program) for t, _, _ in jobs}
    records = []
    todo = [w for w in work if (w[0], w[1].name, w[3], w[4].question, fingerprints[w[0]]) not in cache.done]
    bar = tqdm(total=len(work), initial=len(work) - len(todo), disable=not cfg.progress, unit="q", dynamic_ncols=True)
    prompters = {fmt: Prompter(llm, fmt, cfg.max_tokens) for fmt in {f for _, _, f in jobs}}
    for technique, task, fmt, index, example in todo:
        bar.set_description(f"{technique} {task.name}")
        start = time.perf_counter()
        try:
            record = run_technique(technique, prompters[fmt], task, example, index, cfg, ks, program)
        except ContextOverflow as e:
            log.warning("%s on %s question %d: over the context window (%s)", technique, task.name, index, e)
            record = {"overflow": str(e), "correct": 0.0, "completion_tokens": 0, "prompt_tokens": 0}
        cache.add({"technique": technique, "task": task.name, "index": index, "question": example.question,
                   "fingerprint": fingerprints[technique], "gold": example.answer_text,
                   "seconds": time.perf_counter() - start, **record})
        bar.update(1)
    bar.close()
    for technique, task, fmt, index, example in work:
        records.append(cache.done[(technique, task.name, index, example.question, fingerprints[technique])])
    for r in records:
        r["technique"] = f"prompt:{Path(cfg.prompt).stem}" if r["technique"] == "prompt" else r["technique"]
    rows = summarise(records, ks)
    result = {"model": llm.name, "format": cfg.format, "n": cfg.n, "seed": cfg.seed, "max_tokens": cfg.max_tokens,
              "ks": ks, "config": asdict(cfg), "rows": rows, "skipped": skipped, "command": command}
    atomic_write_json(out / "prompt_eval.json", result)
    atomic_write_text(out / "prompt_eval.md", render_markdown(result))
    plot(rows, out / "prompt_eval.png")
    return result


# ---------------------------------------------------------------------------------------------------------
# Command line: `gptlab prompt eval` and `gptlab prompt search`


def _command(argv_hint: str) -> str:
    import shlex
    import sys

    return "gptlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else argv_hint


def register(sub) -> None:
    from .llm import add_llm_args, llm_from_args
    from .prompt_search import PromptSearchConfig, run_search_cli

    parser = sub.add_parser("prompt", help="prompting techniques (eval) and prompt search on any LLM backend",
                            description="Prompting techniques and prompt search on a local model or an "
                                        "OpenAI-compatible server.")
    commands = parser.add_subparsers(dest="prompt_command", required=True, metavar="{eval,search}")
    evaluate = commands.add_parser("eval", help="table of techniques x tasks: accuracy, tokens, seconds",
                                   description=__doc__.splitlines()[0])
    add_llm_args(evaluate)
    add_config_args(evaluate, PromptEvalConfig)

    def run_eval(args) -> None:
        cfg = build_config(PromptEvalConfig, args)
        prompt_eval(llm_from_args(args), cfg, _command("gptlab prompt eval"))
        print(Path(cfg.out) / "prompt_eval.md")

    evaluate.set_defaults(func=run_eval)
    search = commands.add_parser("search", help="search instructions and demonstrations on a dev split")
    add_llm_args(search)
    add_config_args(search, PromptSearchConfig)
    search.set_defaults(func=lambda args: run_search_cli(args, build_config(PromptSearchConfig, args),
                                                         llm_from_args, _command("gptlab prompt search")))
