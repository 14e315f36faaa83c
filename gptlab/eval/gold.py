"""Gold accuracy on the embedded task suite (base models prompted as documents, tuned models in the chat
format; the task's checker decides), and the held-out pairwise accuracy of a reward model (the package
docstring, 3.)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..chat import Message, completion_text, render_for_completion, response_text
from ..common import GptlabError
from ..infer.engine import Engine, default_batch_size
from ..infer.sampling import SamplingParams
from ..infer.rollout import generate_chat
from ..model import GPT
from ..tasks import Example, Task, get_task, task_names
from ..tokenizer import Tokenizer
from .stats import accuracy_stats

MODES = ("base", "chat")
_DRAWS_PER_EXAMPLE = 50  # draw budget when collecting distinct questions (identity has only 31 in train)


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


def distinct_examples(task: str | Task, split: str, n: int, rng: random.Random) -> list[Example]:
    """Up to n examples with distinct questions, within a bounded number of draws; `task` is a registered
    task's name or any Task (the application layer's Game of 24 is not registered)."""
    task, seen, out = get_task(task), set(), []
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
    return {name: distinct_examples(name, split, n_per_task, random.Random(f"{prefix}:{seed}:{name}"))
            for name in task_names(tasks)}


def draw_shots(example: Example, k: int, seed: int, index: int) -> list[Example]:
    """k distinct train-split examples of the example's task, seeded by (seed, task, index)."""
    if k < 0:
        raise GptlabError(f"shots must be >= 0, got {k}")
    if k == 0:
        return []
    shots = distinct_examples(example.task, "train", k, random.Random(f"shots:{seed}:{example.task}:{index}"))
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
        result["tasks"][name] = {**accuracy_stats(sum(verdicts), len(verdicts)), "shots_dropped": dropped}
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
    per_task = {name: accuracy_stats(sum(c), len(c)) for name, c in credit.items()}
    return {"tasks": per_task, **accuracy_stats(sum(sum(c) for c in credit.values()), len(pairs))}

