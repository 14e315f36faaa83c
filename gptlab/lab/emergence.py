"""`gptlab lab emergence`: task accuracy against model size across a scaling sweep, measured with a
discontinuous metric and two continuous ones, side by side, so a user sees whether a jump survives the
metric change.

    gptlab lab emergence --sweep runs/scaling --out runs/scaling/emergence

Design decisions
- Wei et al. 2022 ("Emergent abilities of large language models") plot exact-match accuracy against scale
  and see sudden jumps; Schaeffer et al. 2023 ("Are emergent abilities a mirage?") show that the same
  models measured with a continuous metric improve smoothly, because exact match of a k-token answer is
  roughly the per-token accuracy to the k-th power. So each (model, question) is measured three ways from
  one forward pass over prompt + gold answer (teacher forcing):
    exact match      every answer token is the model's greedy choice (what greedy decoding of the answer
                     would produce; the all-or-nothing metric),
    token accuracy   the fraction of answer tokens that are the greedy choice,
    log-likelihood   the mean log-probability per answer token of the gold answer (nats).
- Questions are the embedded task suite's test-split questions (the same for every model, seeded), prompted
  as a base model reads them: a Q/A document with `--shots` solved train-split questions first
  (`gptlab.eval.gold`'s "qa" style), the short gold answer as the continuation. The prompt is encoded and
  fitted to the context as `Engine.score` encodes it (BOS first; a prompt too long is cut from the left),
  so the log-likelihood equals the engine's continuation score (tests check it).
- One point per model size: its longest-trained run (the grid's largest token budget; the target run is its
  own size). All runs' figures are in emergence.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import load_model_dir
from ..common import GptlabError, atomic_write_json, get_logger, save_figure
from ..eval.gold import STYLES, draw_shots, eval_examples
from ..infer.engine import Engine
from ..model import GPT
from ..tasks import Example
from ..tokenizer import Tokenizer
from .scaling import finished_runs

log = get_logger("lab.emergence")

TASKS = ("arithmetic", "knowledge", "sentiment", "syllogism", "spelling")
METRICS = (("exact_match", "exact match (all answer tokens greedy)"),
           ("token_accuracy", "per-token accuracy of the answer"),
           ("loglik", "log-likelihood of the answer (nats/token)"))


def answer_prompt(example: Example, shots: Sequence[Example]) -> tuple[str, str]:
    """(prompt, continuation): a Q/A document ending in "A:", and " " + the short gold answer."""
    return STYLES["qa"].prompt(example.question, [(s.question, s.answer_text) for s in shots]), " " + example.answer_text


@torch.inference_mode()
def score_answer(engine: Engine, prompt: str, answer: str) -> dict[str, float]:
    """The three metrics (module docstring) of one gold answer after its prompt, by teacher forcing. The
    prompt is encoded and fitted to the context as `Engine.score` does (BOS first, cut from the left)."""
    answer_ids = engine.tokenizer.encode(answer)
    ids = engine.fit_context(engine.encode(prompt), room=len(answer_ids)) + answer_ids
    logits = engine.model(torch.tensor([ids], device=engine.device))[0, len(ids) - len(answer_ids) - 1:-1].float()
    logits[:, engine.n_real_tokens:] = -float("inf")  # padding rows of the vocabulary are never predicted
    target = torch.tensor(answer_ids, device=engine.device)
    logprobs = logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
    hits = (logits.argmax(-1) == target).float()
    return {"exact_match": float(hits.min()), "token_accuracy": float(hits.mean()), "loglik": float(logprobs.mean()),
            "answer_tokens": len(answer_ids)}


def task_items(tasks: Sequence[str], n: int, shots: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Per task, n (prompt, answer) pairs: test questions after `shots` train-split demonstrations."""
    examples = eval_examples(tasks, n, seed)
    return {task: [answer_prompt(e, draw_shots(e, shots, seed, i)) for i, e in enumerate(items)]
            for task, items in examples.items()}


def measure(model: GPT, tokenizer: Tokenizer, items: dict[str, list[tuple[str, str]]]) -> dict[str, dict[str, float]]:
    """Per task, the mean of each metric over its items."""
    model.eval()
    engine = Engine(model, tokenizer)
    out = {}
    for task, pairs in items.items():
        rows = [score_answer(engine, p, a) for p, a in pairs]
        out[task] = {key: float(np.mean([r[key] for r in rows])) for key in (*dict(METRICS), "answer_tokens")}
    return out


def longest_per_size(runs: list[dict]) -> list[dict]:
    """Per model size, its run with the most training tokens, smallest size first."""
    best: dict[int, dict] = {}
    for run in runs:
        if run["n_params"] not in best or run["tokens"] > best[run["n_params"]]["tokens"]:
            best[run["n_params"]] = run
    return [best[n] for n in sorted(best)]


def plot_emergence(results: list[dict[str, Any]], tasks: Sequence[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    sizes = [r["n_params"] for r in results]
    for ax, (key, title) in zip(axes, METRICS):
        for task in tasks:
            ax.plot(sizes, [r["tasks"][task][key] for r in results], marker="o", ms=3, label=task)
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_title(title, fontsize=9)
        if key != "loglik":  # accuracies on one scale, so a flat zero reads as one
            ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("mean over test questions")
    axes[0].legend(fontsize=7)
    fig.suptitle("the same models and questions, three metrics (Schaeffer et al. 2023)", fontsize=10)
    return save_figure(fig, out / "emergence.png", dpi=90)


def run_emergence(sweep: str | Path, out: str | Path, tasks: Sequence[str] = TASKS, n: int = 40,
                  shots: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    out = Path(out)
    runs = longest_per_size(finished_runs(sweep))
    if not runs:
        raise GptlabError(f"{sweep} has no finished runs to measure")
    items = task_items(tasks, n, shots, seed)
    results = []
    for run in tqdm(runs, unit="model", dynamic_ncols=True):
        model, tokenizer = load_model_dir(run["model_dir"])
        results.append({"run": run["name"], "n_params": run["n_params"], "tokens": run["tokens"],
                        "tasks": measure(model, tokenizer, items)})
    atomic_write_json(out / "emergence.json", {"tasks": list(tasks), "n": n, "shots": shots, "results": results})
    plot_emergence(results, tasks, out)
    for key, title in METRICS:
        print(f"\n{title}")
        print(f"{'run':>22} " + " ".join(f"{t:>11}" for t in tasks))
        for r in results:
            print(f"{r['run']:>22} " + " ".join(f"{r['tasks'][t][key]:>11.3f}" for t in tasks))
    print(f"\nwrote {out / 'emergence.png'} and {out / 'emergence.json'}")
    return results


def _cmd(args: argparse.Namespace) -> None:
    run_emergence(args.sweep, args.out, args.tasks.split(","), args.n, args.shots)


def register_lab(commands) -> None:
    p = commands.add_parser("emergence", help="task accuracy vs model size, discontinuous and continuous metrics",
                            description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="a sweep folder of `gptlab lab scaling`")
    p.add_argument("--out", required=True, help="folder for emergence.png and emergence.json")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task-suite tasks (default: %(default)s)")
    p.add_argument("--n", type=int, default=40, help="test questions per task (default: 40)")
    p.add_argument("--shots", type=int, default=2, help="solved demonstrations before each question (default: 2)")
    p.set_defaults(func=_cmd)
