"""`gptlab prompt search`: prompt writing as program search. A program is an instruction plus
demonstrations (`prompting.Program`); the search proposes instructions and demonstration sets, scores each
candidate on a dev split, and reports the winner on a held-out test split it never saw.

    gptlab prompt search --task word_problems --model smollm2-135m-instruct --budget 8 --out runs/search
    gptlab prompt search --data qa.jsonl --metric f1 --base-url http://127.0.0.1:8000/v1 --out runs/search
    gptlab prompt eval --model smollm2-135m-instruct --prompt runs/search/prompt.json --techniques direct ...

Writes `prompt.json` (the winning program, reusable by `gptlab prompt eval --prompt`), `search.json` and
`search.md` (every candidate's dev score; winner and zero-shot baseline on the test split, with 95% Wilson
intervals), `search_curve.png` (dev score per candidate and best so far) and `answers.jsonl` (every
graded reply as it is made: a rerun with the same --out resumes; only the LLM's instruction proposals are
asked again, and with a seed they come out the same in process).

Design decisions (the anchors are DSPy's optimizers; this is our own, smaller code)
- Instructions come from two sources: hand-written templates, and the LLM itself, shown a few train
  questions with their gold answers and asked for a one-sentence instruction (DSPy's instruction proposal,
  as in COPRO/MIPRO, without their iterative refinement).
- Demonstrations are bootstrapped (DSPy BootstrapFewShot): the baseline program answers train questions,
  and the replies the task's checker (or the metric) accepts become demos, in the model's own words. When
  fewer than `max_demos` are correct, gold-answer demos fill the pool (BootstrapFewShot's labelled demos);
  each demo records its source.
- Candidates: the hand-written zero-shot baseline first (the question as the task states it, no
  instruction), then a seeded random sample of (instruction, demo subset of 0..max_demos) pairs
  (BootstrapFewShotWithRandomSearch's idea), `budget` candidates in all. Each is scored on the same dev
  questions with greedy decoding; the winner is the best dev score, the earliest on ties (so the baseline
  wins a tie). The test split is used exactly twice: winner and baseline, never to choose.
- Splits: suite tasks and game24 draw test questions as `gptlab eval` does, and dev and train questions
  from the train split with distinct seeds, dev questions removed from the train pool. A user's JSONL is
  split by a hash of each input (test 30%, dev 20%, train 50%), so adding lines never moves old ones.
- User data: one JSON object per line with an `input` (or `question`) and an `answer`; `--metric` exact
  (normalised text equality), contains (the gold answer appears as words in the reply), f1 (SQuAD-style
  token F1) or `module:function` (called as function(prediction, gold) -> bool or float in [0, 1]). A
  malformed line and a metric that raises are one-line errors naming the file and line / the example.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common import AnswerCache, GptlabError, atomic_write_json, atomic_write_text, get_logger, iter_jsonl, save_figure
from ..config import option
from ..tasks import Example
from ..eval.stats import wilson_interval
from .prompting import Program, Prompter, PromptTask, answer, normalise_text, prompt_task

log = get_logger("prompt")

TEMPLATES = [
    "Answer the question. Reply with the answer only.",
    "Solve the problem carefully and end your reply with 'The answer is X.'",
    "Read the question and give a short, exact answer.",
    "Think step by step, then give the final answer as 'The answer is X.'",
]
PROPOSE_INSTRUCTION = ("Here are examples of a task, each an input and its correct output.\n\n{examples}\n\n"
                       "Write one sentence that instructs an assistant how to do this task well. Reply with "
                       "the instruction only.")
SPLIT_SHARES = {"test": 3, "dev": 2, "train": 5}  # tenths of a user's data file


@dataclass
class PromptSearchConfig:
    task: str | None = option(None, "suite task or game24 (or give --data)")
    data: str | None = option(None, "JSONL file of {input, answer} lines to search on instead of a task")
    metric: str = option("exact", "for --data: exact, contains, f1 or module:function")
    budget: int = option(8, "candidate programs scored on the dev split, the baseline included")
    train: int = option(16, "train questions to bootstrap demonstrations from")
    dev: int = option(20, "dev questions that choose the winner")
    test: int = option(20, "held-out test questions for the winner and the baseline")
    max_demos: int = option(3, "demonstrations per program at most")
    instructions: int = option(3, "instructions the LLM proposes (plus the hand-written templates)")
    format: str = option("chat", "chat, qa or assistant")
    max_tokens: int = option(160, "tokens per reply")
    out: str = option("prompt-search", "output directory")
    seed: int = option(0, "seed for splits, demo subsets and the candidate order")
    progress: bool = option(True, "progress bar")


# ---------------------------------------------------------------------------------------------------------
# A user's data file and metric


def _words(text: str) -> list[str]:
    return normalise_text(text).split()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style F1 over normalised word tokens."""
    pred, ref = _words(prediction), _words(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact": lambda prediction, gold: float(normalise_text(prediction) == normalise_text(gold)),
    "contains": lambda prediction, gold: float(f" {normalise_text(gold)} " in f" {normalise_text(prediction)} "),
    "f1": token_f1,
}


def load_metric(spec: str) -> Callable[[Example, str], float]:
    """A checker from a metric name or `module:function`; a metric that raises or returns a non-number is
    a GptlabError naming the metric and the example."""
    if spec in METRICS:
        metric = METRICS[spec]
    elif ":" in spec:
        module, _, name = spec.partition(":")
        try:
            metric = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise GptlabError(f"metric {spec!r} cannot be loaded: {type(e).__name__}: {e}") from None
    else:
        raise GptlabError(f"unknown metric {spec!r} (expected exact, contains, f1 or module:function)")

    def check(example: Example, prediction: str) -> float:
        try:
            score = metric(prediction, example.answer_text)
            return float(score)
        except Exception as e:  # a user's metric may raise anything: report it in one line
            raise GptlabError(f"metric {spec!r} failed on {example.metadata.get('where', 'an example')} "
                              f"(prediction {prediction[:60]!r}): {type(e).__name__}: {e}") from None

    return check


def _share(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket < SPLIT_SHARES["test"] else "dev" if bucket < 10 - SPLIT_SHARES["train"] else "train"


def load_data(path: str | Path) -> dict[str, list[Example]]:
    """A user's JSONL as examples per split (see the module docstring)."""
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for where, record in iter_jsonl(path, "data file"):
        if not isinstance(record, dict):
            raise GptlabError(f"{where}: expected a JSON object with 'input' and 'answer'")
        question = record.get("input", record.get("question"))
        gold = record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise GptlabError(f"{where}: needs an 'input' (or 'question') string")
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(gold, str):
            raise GptlabError(f"{where}: needs an 'answer' string or number")
        example = Example(f"data:{Path(path).name}", [{"role": "user", "content": question}], gold, [gold],
                          {"where": where})
        splits[_share(question)].append(example)
    if not any(splits.values()):
        raise GptlabError(f"data file {path} has no examples")
    return splits


def data_task(path: str | Path, metric: str) -> PromptTask:
    """A PromptTask over a user's JSONL file, graded by `metric`; splits train, dev and test."""
    splits, check = load_data(path), load_metric(metric)

    def draw(split: str, n: int, seed: int | str) -> list[Example]:
        pool = list(splits["dev" if split == "dev" else split])
        random.Random(f"data:{seed}:{split}").shuffle(pool)
        return pool[:n]

    return PromptTask(f"data:{Path(path).name}", check, draw, "text")


# ---------------------------------------------------------------------------------------------------------
# The search


def search_splits(task: PromptTask, cfg: PromptSearchConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, dev, test) examples; dev questions never appear in train (see the module docstring)."""
    test = task.examples("test", cfg.test, cfg.seed)
    if task.name.startswith("data:"):
        return task.examples("train", cfg.train, cfg.seed), task.examples("dev", cfg.dev, cfg.seed), test
    dev = task.examples("train", cfg.dev, f"dev:{cfg.seed}")
    seen = {e.question for e in dev}
    train = [e for e in task.examples("train", cfg.train + cfg.dev, f"train:{cfg.seed}") if e.question not in seen]
    return train[:cfg.train], dev, test


def propose_instructions(prompter: Prompter, train: list[Example], n: int, seed: int) -> list[str]:
    """Up to n distinct one-line instructions the LLM writes after seeing up to 3 train examples."""
    if n <= 0 or not train:
        return []
    shown = "\n\n".join(f"Input: {e.question}\nOutput: {e.answer_text}" for e in train[:3])
    gens = prompter.generate(prompter.render(PROPOSE_INSTRUCTION.format(examples=shown)), n=n, temperature=0.9,
                             max_tokens=60, seed=seed)
    out = []
    for gen in gens:
        line = next((s.strip().strip('"').strip() for s in gen.text.splitlines() if s.strip()), "")
        if line and line not in out:
            out.append(line)
    return out


def bootstrap_demos(prompter: Prompter, task: PromptTask, train: list[Example], k: int,
                    cache: AnswerCache) -> list[dict[str, str]]:
    """Demos from the model's own correct zero-shot replies on train questions, gold answers filling up
    to k when too few are correct."""
    baseline = Program(task.name, "", [], prompter.format)
    demos = [{"question": example.question, "answer": reply["text"].strip(), "source": "bootstrapped"}
             for example, reply in zip(train, replies(prompter, task, baseline, train, "train", cache))
             if reply["score"] >= 1.0]
    labelled = [{"question": e.question, "answer": e.answer_text, "source": "labelled"}
                for e in train if e.question not in {d["question"] for d in demos}]
    return demos + labelled[:max(0, k - len(demos))]


SEARCH_KEY = ("split", "program", "index", "question")  # answers.jsonl


def replies(prompter: Prompter, task: PromptTask, program: Program, examples: list[Example], split: str,
            cache: AnswerCache) -> list[dict[str, Any]]:
    """The program's graded greedy reply to each example ({"text", "score"}), each asked once: answers.jsonl
    under --out keeps them, so a rerun with the same --out resumes where it stopped. A program is known by
    a hash of what changes its replies (model, reply budget, format, instruction, demos, chain of thought)."""
    identity = {"model": prompter.llm.name, "max_tokens": prompter.max_tokens, "format": prompter.format,
                "instruction": program.instruction, "demos": [list(d) for d in program.demos], "cot": program.cot}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    out = []
    for index, example in enumerate(examples):
        key = (split, fingerprint, index, example.question)
        if key not in cache.done:
            sample = answer(prompter, task, example, instruction=program.instruction, shots=program.demos,
                            cot=program.cot)[0]
            cache.add(dict(zip(SEARCH_KEY, key), text=sample.text, score=sample.score))
        out.append(cache.done[key])
    return out


def score(prompter: Prompter, task: PromptTask, program: Program, examples: list[Example], split: str,
          cache: AnswerCache) -> list[float]:
    return [reply["score"] for reply in replies(prompter, task, program, examples, split, cache)]


def candidates(task_name: str, fmt: str, instructions: list[str], pool: list[dict[str, str]], budget: int,
               max_demos: int, seed: int) -> list[Program]:
    """The baseline, then a seeded random sample of distinct (instruction, demo subset) programs."""
    rng = random.Random(f"search:{seed}")
    baseline = Program(task_name, "", [], fmt, notes={"source": "baseline (zero-shot, no instruction)"})
    out, seen = [baseline], {("", ())}
    options = [""] + instructions
    for _ in range(50 * budget):
        if len(out) >= budget:
            break
        instruction = rng.choice(options)
        size = rng.randint(0, min(max_demos, len(pool)))
        demos = tuple(sorted(rng.sample(range(len(pool)), size)))
        if (instruction, demos) not in seen:
            seen.add((instruction, demos))
            out.append(Program(task_name, instruction, [(pool[i]["question"], pool[i]["answer"]) for i in demos], fmt,
                               notes={"demo_sources": [pool[i]["source"] for i in demos]}))
    return out


def _interval(scores: list[float]) -> dict[str, float]:
    n, total = len(scores), sum(scores)
    low, high = wilson_interval(total, n)
    return {"n": n, "score": total / n if n else 0.0, "wilson_low": low, "wilson_high": high}


def prompt_search(llm: Any, task: PromptTask, cfg: PromptSearchConfig, command: str = "") -> dict[str, Any]:
    """Run the search (see the module docstring); writes its files under cfg.out and returns the summary."""
    from tqdm import tqdm

    if cfg.budget < 1 or cfg.dev < 1 or cfg.test < 1:
        raise GptlabError("--budget, --dev and --test must be >= 1")
    prompter = Prompter(llm, cfg.format, cfg.max_tokens)
    train, dev, test = search_splits(task, cfg)
    if not dev or not test:
        raise GptlabError(f"task {task.name}: the dev and test splits need examples (dev {len(dev)}, test {len(test)})")
    instructions = list(dict.fromkeys(TEMPLATES + propose_instructions(prompter, train, cfg.instructions, cfg.seed)))
    cache = AnswerCache(Path(cfg.out) / "answers.jsonl", SEARCH_KEY)
    pool = bootstrap_demos(prompter, task, train, cfg.max_demos, cache)
    programs = candidates(task.name, cfg.format, instructions, pool, cfg.budget, cfg.max_demos, cfg.seed)
    scored = []
    for program in tqdm(programs, disable=not cfg.progress, unit="program", desc="dev"):
        dev_scores = score(prompter, task, program, dev, "dev", cache)
        scored.append((program, _interval(dev_scores)))
    best_index = max(range(len(scored)), key=lambda i: (scored[i][1]["score"], -i))
    winner, winner_dev = scored[best_index]
    baseline_test = _interval(score(prompter, task, scored[0][0], test, "test", cache))
    winner_test = baseline_test if best_index == 0 else _interval(score(prompter, task, winner, test, "test", cache))
    winner.notes.update({"dev": winner_dev, "test": winner_test, "baseline_test": baseline_test, "model": llm.name,
                         "candidate": best_index, "data": cfg.data, "metric": cfg.metric if cfg.data else None})
    out = Path(cfg.out)
    result = {"task": task.name, "model": llm.name, "format": cfg.format, "config": asdict(cfg), "command": command,
              "splits": {"train": len(train), "dev": len(dev), "test": len(test)},
              "demo_pool": pool, "instructions": instructions,
              "candidates": [{**p.to_json(), "dev": s} for p, s in scored],
              "winner": best_index, "winner_test": winner_test, "baseline_test": baseline_test}
    atomic_write_json(out / "prompt.json", winner.to_json())
    atomic_write_json(out / "search.json", result)
    atomic_write_text(out / "search.md", render_markdown(result))
    plot_curve([s["score"] for _, s in scored], out / "search_curve.png", task.name)
    return result


def _pct(r: dict[str, float]) -> str:
    return f"{100 * r['score']:.1f}% ({100 * r['wilson_low']:.1f}-{100 * r['wilson_high']:.1f}%, n={r['n']})"


def render_markdown(result: dict[str, Any]) -> str:
    winner = result["candidates"][result["winner"]]
    lines = [f"# Prompt search: {result['task']} on {result['model']}", "",
             f"Format {result['format']}; splits: {result['splits']['train']} train, {result['splits']['dev']} dev, "
             f"{result['splits']['test']} test; {len(result['candidates'])} candidates; demo pool "
             f"{sum(d['source'] == 'bootstrapped' for d in result['demo_pool'])} bootstrapped + "
             f"{sum(d['source'] == 'labelled' for d in result['demo_pool'])} labelled.", "",
             "| held-out test split | score (95% Wilson interval) |", "|---|---|",
             f"| zero-shot baseline | {_pct(result['baseline_test'])} |",
             f"| search winner (candidate {result['winner']}) | {_pct(result['winner_test'])} |", "",
             f"Winner: instruction {winner['instruction']!r}, {len(winner['demos'])} demos.", "",
             "| candidate | instruction | demos | dev score |", "|---|---|---|---|"]
    for i, c in enumerate(result["candidates"]):
        instruction = (c["instruction"] or "(none)").replace("|", "\\|")
        lines.append(f"| {i} | {instruction} | {len(c['demos'])} | {_pct(c['dev'])} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot_curve(dev_scores: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = [max(dev_scores[:i + 1]) for i in range(len(dev_scores))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(range(len(dev_scores)), dev_scores, label="candidate dev score")
    ax.step(range(len(best)), best, where="post", color="C1", label="best so far")
    ax.set(title=f"Prompt search: {title}", xlabel="candidate (0 = zero-shot baseline)", ylabel="dev score",
           ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    save_figure(fig, path, dpi=110)


def program_task(program: Program) -> PromptTask:
    """The task a saved program was searched on: a suite task or game24, or the user's data file and
    metric its notes name (the path as given to the search, relative to where it ran)."""
    if program.task.startswith("data:"):
        if not program.notes.get("data"):
            raise GptlabError(f"prompt for {program.task} does not name its data file (notes.data)")
        return data_task(program.notes["data"], program.notes.get("metric") or "exact")
    return prompt_task(program.task)


def run_search_cli(args, cfg: PromptSearchConfig, llm_from_args, command: str) -> None:
    if (cfg.task is None) == (cfg.data is None):
        raise GptlabError("give exactly one of --task (a suite task or game24) and --data (a JSONL file)")
    task = data_task(cfg.data, cfg.metric) if cfg.data else prompt_task(cfg.task)
    result = prompt_search(llm_from_args(args), task, cfg, command)
    log.info("winner on test %s, baseline %s", _pct(result["winner_test"]), _pct(result["baseline_test"]))
    print(Path(cfg.out) / "search.md")
