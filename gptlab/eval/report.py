"""Evaluation: val bits per byte, multiple choice by log-likelihood, and gold accuracy on the task suite.

    gptlab eval --model runs/X/pretrain/model --data runs/X/data            # a base model, few-shot
    gptlab eval --model runs/X/sft/model --mode chat --tasks arithmetic,knowledge

Writes `eval.json` (every figure, per-item scores, sample transcripts) and `eval.md` (tables + transcripts)
to `--out` (default: `eval/` beside the model directory). The Python API (`evaluate_model`,
`gold_accuracy`, `multiple_choice_accuracy`, `val_bits_per_byte`, `pairwise_accuracy`) is what the
speedrun calls.

Design decisions
- Three views of a model, cheapest first, because each answers a different question:
  1. Val loss and bits per byte on a prepared dataset (`pretrain.evaluate`, reused): how well it models
     text. Bits per byte compares across tokenizers.
  2. Multiple choice by log-likelihood (`gptlab/evals/choices.toml`, written for gptlab): minimal pairs
     such as "The keys to the cabinet {are|is} on the table." in six categories (grammar, lexical
     semantics, world knowledge, sentiment, translation, arithmetic). Each alternative is scored as the
     continuation "alternative + rest of the sentence" given the text before the braces, so agreement that
     shows only later in the sentence counts; whitespace before the braces moves into the continuation
     because BPE tokens carry their leading space. Two rules: the sum of token log-probs (which alternative
     the model would rather write), and the sum divided by the continuation's UTF-8 bytes (the
     lm-evaluation-harness `acc_norm` idea: long alternatives are not punished for being long). No
     generation is needed, so this measures a base model from the first steps on, long before it can
     follow a prompt. Most items come in mirrored pairs (cat/chat and dog/chien, puppy -> dog and kitten
     -> cat), so a model that merely prefers the more frequent word scores chance on them. The rest are not
     neutral: a wrong form ("goodest") is rarer and splits into more tokens, so the report also gives the
     token-count baselines (fewest tokens wins), which is where a model that knows nothing lands (a
     uniform model exactly, a random-init one nearly). Ties count 1/k (the expected score of a random tie-break): a model that scores every
     alternative equally gets chance, not the credit of the correct alternative being listed first.
  3. Gold accuracy on the embedded task suite (`gptlab.tasks`, test split; the task's checker decides).
     Base models are prompted (Karpathy, State of GPT 2023: a base model completes documents, so make the
     answer the likely continuation of a document): style `qa` is a plain few-shot document, style
     `assistant` a "fake assistant document" that frames the text as a conversation with a helpful AI
     assistant. Base prompts start with `<|endoftext|>`, as every pretraining document does. Tuned models get the chat format
     (`chat.render_for_completion`), zero-shot by default; shots become earlier conversation turns.
     Decoding is greedy (the answer the model is most sure of; no sampling noise in a figure).
     The exact prompts (strings compared in tests/test_eval.py):
         qa:          "Q: <question>\\nA: <answer>\\n\\n" per shot, then "Q: <question>\\nA:"
         assistant:   ASSISTANT_HEADER, then "User: <question>\\nAssistant: <answer>\\n\\n" per shot,
                      then "User: <question>\\nAssistant:"
     A shot's answer is the assistant text of the task's first reference response
     (`chat.response_text`). System messages (the calculator's tool hint) are left out of base prompts:
     a base model cannot call tools. Generation stops at a blank line or the next "Q:"/"User:" label.
- Chat generation runs tool calls in line (`gptlab.infer.rollout.generate_chat`, shared with RL): decoding stops
  at `<|tool_call_end|>`, the call runs through `tasks.tools.execute_tool_call`, and the output block is
  appended before decoding continues (the same layout `chat.render` trains on), at most
  `rollout.MAX_TOOL_CALLS` times per answer. The checker reads `chat.completion_text` (assistant text
  without tool blocks).
- Examples are distinct test questions drawn with a per-task seed, so every model sees the same questions
  and figures are comparable across runs. Shots are drawn from the train split (disjoint by
  construction), a fresh seeded set per question so the figure averages over the choice of shots. A
  task whose train split has fewer distinct questions than `shots` is an error, not a silent repeat.
  When a prompt would not leave `max_new_tokens` of room in the context window, its oldest shots are
  dropped (counted in the report as `shots_dropped`) rather than cutting a shot in half.
- Every accuracy comes with n and its binomial standard error sqrt(p(1-p)/n), because n is small (tens)
  on a laptop and differences of a few points are noise.
- Reward models plug in through `pairwise_accuracy(scorer)`: any callable that scores conversations, so
  the figure does not depend on how a reward model is stored; `--reward-model DIR` passes
  `reward.RewardModel.load(DIR).score`. Pairs are held out: test questions, reference vs a bad response.
"""

from __future__ import annotations

import math
import random
import re
import time
import tomllib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..chat import Message, completion_text, render_for_completion, response_text
from ..common import GptlabError, atomic_write_json, atomic_write_text, get_logger, read_json, torch_device, torch_dtype
from ..config import add_config_args, build_config, option
from ..data.loader import PackedLoader
from ..infer.engine import Engine, default_batch_size
from ..infer.sampling import SamplingParams
from ..model import GPT
from ..train.pretrain import evaluate
from ..infer.rollout import generate_chat
from ..tasks import Example, get_task, task_names
from ..tokenizer import Tokenizer

log = get_logger("eval")

MODES = ("base", "chat")
_DRAWS_PER_EXAMPLE = 50  # draw budget when collecting distinct questions (identity has only 31 in train)


# ---------------------------------------------------------------------------------------------------------
# Small statistics


def _accuracy(correct: float, n: int) -> dict[str, float]:
    p = correct / n if n else 0.0
    return {"n": n, "correct": correct, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


# ---------------------------------------------------------------------------------------------------------
# 1. Val bits per byte


def val_bits_per_byte(model: GPT, tokenizer: Tokenizer, data_dir: str | Path, num_batches: int = 8,
                      batch_size: int = 8, seq_len: int | None = None) -> dict[str, float]:
    """Val loss (nats/token) and bits per byte over the first `num_batches` batches of the val split of a
    prepared dataset (fewer when the split is smaller: windows are never repeated)."""
    data_dir = Path(data_dir)
    meta = read_json(data_dir / "meta.json", "dataset metadata (run `gptlab data prepare` first)")
    if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise GptlabError(f"{data_dir} was tokenized with a different tokenizer than the model's")
    seq_len = seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise GptlabError(f"seq_len {seq_len} exceeds the model's context window ({model.config.max_seq_len})")
    loader = PackedLoader(data_dir, "val", 1, seq_len)
    batch_size = min(batch_size, loader.n_windows)
    loader = PackedLoader(data_dir, "val", batch_size, seq_len)
    num_batches = max(1, min(num_batches, loader.n_windows // batch_size))
    device = next(model.parameters()).device
    token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(device)
    was_training = model.training
    result = evaluate(model, loader, num_batches, token_bytes, nullcontext(), device)
    model.train(was_training)  # evaluate() leaves the model in train mode
    return {"loss": result["val/loss"], "bpb": result["val/bpb"], "batches": num_batches,
            "tokens": num_batches * batch_size * seq_len, "seq_len": seq_len}


# ---------------------------------------------------------------------------------------------------------
# 2. Multiple choice by log-likelihood


@dataclass(frozen=True)
class ChoiceItem:
    category: str
    text: str  # the item as written, e.g. "The keys to the cabinet {are|is} on the table."
    prompt: str  # text before the braces, trailing whitespace removed
    continuations: tuple[str, ...]  # whitespace + alternative + rest of the sentence, one per alternative
    answer: int = 0  # index of the correct continuation


_BRACES = re.compile(r"\{([^{}]*)\}")


def parse_choice_item(text: str, category: str, answer: int = 0) -> ChoiceItem:
    """'prefix {right|wrong|...} suffix' -> ChoiceItem (the first alternative is the correct one)."""
    found = _BRACES.findall(text)
    if len(found) != 1:
        raise GptlabError(f"choice item {text!r} ({category}): needs exactly one {{a|b}} group, found {len(found)}")
    alternatives = found[0].split("|")
    if len(alternatives) < 2 or not all(alternatives) or len(set(alternatives)) != len(alternatives):
        raise GptlabError(f"choice item {text!r} ({category}): needs two or more distinct non-empty alternatives")
    match = _BRACES.search(text)
    before, after = text[:match.start()], text[match.end():]
    prompt = before.rstrip()
    space = before[len(prompt):]
    return ChoiceItem(category, text, prompt, tuple(space + a + after for a in alternatives), answer)


def load_choice_items(path: str | Path | None = None, categories: Sequence[str] | None = None) -> list[ChoiceItem]:
    """Items of a choices TOML file (default: the embedded `gptlab/evals/choices.toml`): one table per
    category with `items = ["... {right|wrong} ...", ...]`."""
    source = Path(path) if path is not None else resources.files("gptlab") / "evals" / "choices.toml"
    try:
        spec = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"choices file not found: {source}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"choices file {source} is not valid TOML: {e}") from None
    unknown = sorted(set(categories or ()) - set(spec))
    if unknown:
        raise GptlabError(f"unknown choice categories {unknown} (available: {', '.join(spec)})")
    items = []
    for category, table in spec.items():
        if categories is None or category in categories:
            if not isinstance(table, dict) or not isinstance(table.get("items"), list):
                raise GptlabError(f"choices file {source}: [{category}] needs an `items` list")
            items += [parse_choice_item(text, category) for text in table["items"]]
    return items


def score_choices(engine: Engine, items: Sequence[ChoiceItem], batch_size: int = 16) -> list[dict[str, Any]]:
    """Per item: the summed log-prob of each continuation given the prompt, its length in tokens and in
    UTF-8 bytes."""
    prompts = [item.prompt for item in items for _ in item.continuations]
    continuations = [c for item in items for c in item.continuations]
    scores = iter(engine.score(prompts, continuations, batch_size=batch_size))
    out = []
    for item in items:
        logprobs = [next(scores).logprob for _ in item.continuations]
        out.append({"category": item.category, "text": item.text, "answer": item.answer, "logprobs": logprobs,
                    "tokens": [len(engine.tokenizer.encode(c)) for c in item.continuations],
                    "bytes": [len(c.encode("utf-8")) for c in item.continuations]})
    return out


def choice_credit(scores: Sequence[float], answer: int) -> float:
    """1 if the correct alternative scores highest, 1/k if it ties with k-1 others, else 0."""
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return 1.0 / len(winners) if answer in winners else 0.0


def _per_byte(values: Sequence[float], nbytes: Sequence[int]) -> list[float]:
    return [v / b for v, b in zip(values, nbytes)]


def multiple_choice_accuracy(model: GPT, tokenizer: Tokenizer, items: Sequence[ChoiceItem] | None = None,
                             batch_size: int = 16) -> dict[str, Any]:
    """Accuracy per category (summed and per-byte log-likelihood) next to chance and next to the
    token-count baselines: what a model that knows nothing but pays the same price for every token would
    score (fewest tokens wins; fewest tokens per byte for the per-byte rule). A random-init model lands on
    these baselines, not on chance, because rare and wrong forms ("goodest") split into more tokens."""
    items = load_choice_items() if items is None else list(items)
    if not items:
        raise GptlabError("no multiple-choice items to score")
    scored = score_choices(Engine(model, tokenizer), items, batch_size)
    by_category: dict[str, list[dict]] = {}
    for row in scored:
        answer, negative_tokens = row["answer"], [-t for t in row["tokens"]]
        row["credit"] = choice_credit(row["logprobs"], answer)
        row["credit_norm"] = choice_credit(_per_byte(row["logprobs"], row["bytes"]), answer)
        row["baseline"] = choice_credit(negative_tokens, answer)
        row["baseline_norm"] = choice_credit(_per_byte(negative_tokens, row["bytes"]), answer)
        by_category.setdefault(row["category"], []).append(row)

    def summary(rows: list[dict]) -> dict[str, float]:
        n = len(rows)

        def mean(key: str) -> float:
            return sum(r[key] for r in rows) / n

        return {**_accuracy(sum(r["credit"] for r in rows), n), "accuracy_norm": mean("credit_norm"),
                "chance": sum(1 / len(r["logprobs"]) for r in rows) / n,
                "baseline": mean("baseline"), "baseline_norm": mean("baseline_norm")}

    return {"categories": {c: summary(rows) for c, rows in by_category.items()}, "overall": summary(scored),
            "items": scored}


# ---------------------------------------------------------------------------------------------------------
# 3. Gold accuracy on the task suite


@dataclass(frozen=True)
class PromptStyle:
    """A plain-text document format for prompting a base model (see the module docstring)."""

    header: str
    question_label: str
    answer_label: str

    @property
    def stops(self) -> tuple[str, ...]:
        return ("\n\n", f"\n{self.question_label}")

    def prompt(self, question: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        turns = "".join(f"{self.question_label} {q}\n{self.answer_label} {a}\n\n" for q, a in shots)
        return f"{self.header}{turns}{self.question_label} {question}\n{self.answer_label}"


ASSISTANT_HEADER = ("The following is a conversation between a user and an AI assistant. The assistant is "
                    "helpful, honest and knowledgeable, and it answers every question correctly and "
                    "concisely.\n\n")
STYLES = {
    "qa": PromptStyle("", "Q:", "A:"),
    "assistant": PromptStyle(ASSISTANT_HEADER, "User:", "Assistant:"),
}


def _distinct_examples(task_name: str, split: str, n: int, rng: random.Random) -> list[Example]:
    """Up to n examples with distinct questions, within a bounded number of draws."""
    task, seen, out = get_task(task_name), set(), []
    for _ in range(_DRAWS_PER_EXAMPLE * n + 100):
        if len(out) == n:
            break
        example = task.generate(rng, split)
        if example.question not in seen:
            seen.add(example.question)
            out.append(example)
    return out


def eval_examples(tasks: Sequence[str] | None, n_per_task: int, seed: int = 0,
                  split: str = "test") -> dict[str, list[Example]]:
    """Distinct questions per task, the same for every model given the same seed: test-split questions,
    or train-split ones drawn as validation questions (for choosing a checkpoint without touching the test
    split; a training run may also draw them, so they measure held-out generalisation less strictly)."""
    if n_per_task < 1:
        raise GptlabError(f"n_per_task must be >= 1, got {n_per_task}")
    prefix = "eval" if split == "test" else f"eval-{split}"
    return {name: _distinct_examples(name, split, n_per_task, random.Random(f"{prefix}:{seed}:{name}"))
            for name in task_names(tasks)}


def draw_shots(example: Example, k: int, seed: int, index: int) -> list[Example]:
    """k distinct train-split examples of the example's task, seeded by (seed, task, index)."""
    if k < 0:
        raise GptlabError(f"shots must be >= 0, got {k}")
    if k == 0:
        return []
    shots = _distinct_examples(example.task, "train", k, random.Random(f"shots:{seed}:{example.task}:{index}"))
    if len(shots) < k:
        raise GptlabError(f"task {example.task!r} has only {len(shots)} distinct train examples, fewer than "
                          f"shots={k}; use fewer shots")
    return shots


def shot_answer(example: Example) -> str:
    """What a shot shows as the answer: the assistant text of the first reference response."""
    return response_text(example.reference[0])


def chat_messages(example: Example, shots: Sequence[Example] = ()) -> list[Message]:
    """The conversation a tuned model answers: the example's system message (if any), each shot as a user
    turn plus its full reference response (tool calls included), then the example's question."""
    system = [m for m in example.messages if m["role"] == "system"]
    rest = [m for m in example.messages if m["role"] != "system"]
    turns = [m for s in shots for m in ({"role": "user", "content": s.question}, *s.reference[0])]
    return system + turns + rest


def build_prompt(example: Example, shots: Sequence[Example], mode: str, style: str,
                 tokenizer: Tokenizer) -> str | list[int]:
    """The prompt for `example` after `shots`: a `style` document (text) in base mode, rendered chat token
    ids in chat mode."""
    if mode == "base":
        return STYLES[style].prompt(example.question, [(s.question, shot_answer(s)) for s in shots])
    return render_for_completion(tokenizer, chat_messages(example, shots))


def gold_accuracy(model: GPT | None, tokenizer: Tokenizer, tasks: Sequence[str] | None = None,
                  n_per_task: int = 20, *, mode: str = "base", shots: int = 0, style: str = "qa",
                  max_new_tokens: int = 64, batch_size: int | None = None, samples: int = 2, seed: int = 0,
                  responses: Callable[[Example], str] | None = None, split: str = "test") -> dict[str, Any]:
    """Fraction of test questions (or `split` questions, `eval_examples`) per task whose response the
    task's checker accepts.

    mode "base": greedy completion of a `style` document ("qa" or "assistant") with `shots` examples;
    mode "chat": greedy assistant turn after `chat.render_for_completion`, tools run in line.
    `responses` replaces generation with a function of the example (for testing the accounting: the
    model is then not used and may be None)."""
    if mode not in MODES:
        raise GptlabError(f"unknown mode {mode!r} (expected base or chat)")
    if mode == "base" and style not in STYLES:
        raise GptlabError(f"unknown prompt style {style!r} (expected one of {', '.join(STYLES)})")
    if model is None and responses is None:
        raise GptlabError("gold_accuracy needs a model or a responses function")
    examples = eval_examples(tasks, n_per_task, seed, split)
    engine = Engine(model, tokenizer) if model is not None else None
    batch_size = batch_size or default_batch_size(model, cpu=16)
    # room left for the prompt: the engine keeps min(max_new_tokens, window // 2) positions free
    limit = engine.window - min(max_new_tokens, engine.window // 2) if engine else 0
    result: dict[str, Any] = {"mode": mode, "style": style if mode == "base" else "chat", "shots": shots,
                              "tasks": {}, "samples": []}
    for name, task_examples in examples.items():
        prompts, dropped = [], 0
        for i, example in enumerate(task_examples):
            shot_examples = draw_shots(example, shots, seed, i)
            prompt = build_prompt(example, shot_examples, mode, style, tokenizer)
            cut = 0  # oldest shots dropped until the prompt leaves room for the answer
            while engine is not None and cut < shots and len(engine.encode(prompt)) > limit:
                cut += 1
                prompt = build_prompt(example, shot_examples[cut:], mode, style, tokenizer)
            prompts.append(prompt)
            dropped += cut
        if responses is not None:
            texts = [responses(e) for e in task_examples]
            transcripts = texts
        elif mode == "base":
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=STYLES[style].stops)
            completions = [c for start in range(0, len(prompts), batch_size)
                           for c in engine.generate(prompts[start:start + batch_size], params)]
            transcripts = [c.text for c in completions]
            texts = [t.strip() for t in transcripts]
        else:
            turns = [t for start in range(0, len(prompts), batch_size)
                     for t in generate_chat(engine, prompts[start:start + batch_size], max_new_tokens)]
            texts = [completion_text(tokenizer, t.ids) for t in turns]
            transcripts = [tokenizer.decode(t.body) for t in turns]
        verdicts = [get_task(name).check(e, text) for e, text in zip(task_examples, texts)]
        result["tasks"][name] = {**_accuracy(sum(verdicts), len(verdicts)), "shots_dropped": dropped}
        for example, prompt, transcript, ok in list(zip(task_examples, prompts, transcripts, verdicts))[:samples]:
            shown = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            result["samples"].append({"task": name, "prompt": shown, "response": transcript,
                                      "gold": example.answer_text, "correct": ok})
    per_task = [r["accuracy"] for r in result["tasks"].values()]
    result["accuracy"] = sum(per_task) / len(per_task)  # macro average: every task weighs the same
    return result


# ---------------------------------------------------------------------------------------------------------
# Reward models


ConversationScorer = Callable[[list[list[Message]]], Sequence[float]]


def preference_pairs(tasks: Sequence[str] | None = None, n_per_task: int = 20,
                     seed: int = 0) -> list[tuple[str, list[Message], list[Message]]]:
    """Held-out (task, chosen, rejected) conversations: a test question answered by its first reference
    response vs by one of the task's bad responses (seeded choice)."""
    pairs = []
    for name, examples in eval_examples(tasks, n_per_task, seed).items():
        rng = random.Random(f"pairs:{seed}:{name}")
        for example in examples:
            rejected = rng.choice(get_task(name).bad_responses(example, rng))
            pairs.append((name, example.conversation(0), example.messages + rejected))
    return pairs


def pairwise_accuracy(scorer: ConversationScorer, tasks: Sequence[str] | None = None, n_per_task: int = 20,
                      seed: int = 0) -> dict[str, Any]:
    """Held-out pairwise accuracy of a reward model given as `scorer(conversations) -> scores`: the
    fraction of `preference_pairs` where the chosen conversation scores higher (a tie counts half)."""
    pairs = preference_pairs(tasks, n_per_task, seed)
    scores = list(scorer([c for _, c, _ in pairs] + [r for _, _, r in pairs]))
    if len(scores) != 2 * len(pairs):
        raise GptlabError(f"reward scorer returned {len(scores)} scores for {2 * len(pairs)} conversations")
    credit: dict[str, list[float]] = {}
    for (name, _, _), chosen, rejected in zip(pairs, scores[:len(pairs)], scores[len(pairs):]):
        credit.setdefault(name, []).append(1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0)
    per_task = {name: _accuracy(sum(c), len(c)) for name, c in credit.items()}
    return {"tasks": per_task, **_accuracy(sum(sum(c) for c in credit.values()), len(pairs))}


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
        from ..train.reward import RewardModel

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
    parser = sub.add_parser("eval", help="evaluate a model: bits per byte, multiple choice, task accuracy",
                            description=__doc__.splitlines()[0])
    add_config_args(parser, EvalConfig, PRESETS)
    parser.set_defaults(func=lambda args: print(run_eval(build_config(EvalConfig, args, PRESETS))[1]))
