"""Prompting techniques on any LLM backend (`gptlab.apps.llm`: a local model directory or an
OpenAI-compatible server): few-shot prompts as documents or chat turns, chain of thought, self-consistency,
"check your work", log-likelihood multiple choice, and the answer extraction they all share.

    from gptlab.apps.llm import open_llm
    from gptlab.apps.prompting import Prompter, prompt_task, chain_of_thought, self_consistency
    llm = open_llm("smollm2-135m-instruct")
    task = prompt_task("word_problems")
    example = task.examples("test", 1)[0]
    samples = self_consistency(Prompter(llm), task, example, k=5)
    vote([s.key for s in samples])          # -> ("12", 0.8): majority answer and agreement

Design decisions
- Two prompt shapes, as `gptlab eval` builds them (its pieces are reused, not copied): a base model gets a
  document it can continue (`format` "qa": "Q: ..\\nA: ..", or "assistant": the fake assistant document,
  `eval.report.STYLES` / `ASSISTANT_HEADER`), a tuned model gets chat turns ("chat"). Shots are drawn from
  the train split with `eval.report.draw_shots` and shown with `shot_answer`; in chat they are plain
  user/assistant text turns (not the reference's tool-call messages: a remote backend or a model without
  the tool tokens cannot read those).
- Chain of thought: zero-shot (Kojima et al. 2022: "Let's think step by step.", at the start of the
  answer in a document, as a request in the user turn in chat, where the reply cannot be prefilled) and
  few-shot (Wei et al. 2022: shots whose answers are the task's worked chains). When the reasoning states
  no final answer, a second call asks for it ("Therefore, the answer is", Kojima's answer-extraction step).
- Answer extraction, in order: the last `\\boxed{..}`, the last "answer is X" / "Answer: X", then a
  per-kind fallback: the last number (number tasks), the one label the reply names (label tasks; a reply
  naming several labels gives none, as the suite's checker reads it), the first
  JSON object, or the last line. The extracted span is what the task's own checker grades (a reasoning
  chain's intermediate numbers must not be read as the answer); a reply with no span is graded whole.
  Answers are normalised per kind for voting: numbers by value (15.0 == 15), labels and text folded
  (case, accents, punctuation, articles), JSON with sorted keys, Game of 24 expressions without spaces.
- Self-consistency (Wang et al. 2022): k samples at temperature 0.7 in one `n=k` call, majority vote over
  normalised answers (ties go to the answer sampled first), agreement = votes / k as the confidence. The
  vote is graded by the checker on the first sample that gave the winning answer. Accuracy at every
  k' <= k comes from the first k' samples of the same draw, so one run gives the whole k curve.
- Check your work: the model is shown its answer and asked whether it is correct; on "wrong" it answers
  again (sampled, temperature 0.7) up to `retries` times. The last answer stands either way.
- Log-likelihood multiple choice: `{a|b|c}` items as in `gptlab/evals/choices.toml`
  (`eval.report.parse_choice_item`), each alternative scored as a continuation with `llm.logprobs`;
  `normalise="bytes"` divides by the continuation's UTF-8 length (lm-evaluation-harness `acc_norm`), so a
  long alternative is not punished for its length, "tokens" by its token count.
- Context window: a prompt with demonstrations that does not fit the model's window drops demonstrations
  from the end until it fits (`Prompter.generate_fitting`; the sample records how many it kept), since a
  tiny model (the speedrun's 256 tokens) cannot take three worked examples. A question that does not fit
  alone raises `ContextOverflow`, which `gptlab prompt eval` reports per question instead of stopping. A
  chain of thought that fills the window gets no answer-extraction call (no room): it is graded as it is.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chat import response_text
from ..common import GptlabError
from ..eval.choice import parse_choice_item
from ..eval.gold import STYLES, distinct_examples, draw_shots, eval_examples, shot_answer
from ..tasks import TASKS, Example
from ..tasks.checks import final_number, find_json_object, fold
from .games import GAME24, extract_expression
from .llm_base import ContextOverflow

FORMATS = ("chat", "qa", "assistant")
COT_TRIGGER = "Let's think step by step."
COT_REQUEST = "Think step by step, then finish with 'The answer is X.'"
ANSWER_TRIGGER = "Therefore, the answer is"
SAMPLING_TEMPERATURE = 0.7  # self-consistency and retries (Wang et al. 2022 sample at T=0.5-0.7)
KINDS = ("number", "label", "json", "expression", "text")
# answer kinds of the suite's tasks (others are free text)
TASK_KINDS = {"arithmetic": "number", "word_problems": "number", "calculator": "number", "sentiment": "label",
              "extraction": "json", "game24": "expression"}
TASK_LABELS = {"sentiment": ("positive", "negative")}


# ---------------------------------------------------------------------------------------------------------
# Answer extraction and normalisation


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
# "the answer is X." / "Final answer: X": X runs to a sentence end (a period not inside a number) or line end
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:|=)\s*:?\s*(.+?)\s*(?=\.\s|\.?\s*\n|\.?\s*$)", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def final_answer_span(text: str) -> str | None:
    """The answer a reply commits to: its last `\\boxed{..}`, else its last "answer is X" / "Answer: X";
    None when it states neither."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    stated = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    return stated[-1].strip().strip("*").strip() if stated else None


def labels_named(text: str, labels: Sequence[str]) -> list[str]:
    """The labels a text mentions as words (any case or accents), the one mentioned last first."""
    last = {}
    for label in labels:
        found = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(fold(label))}(?!\w)", fold(text))]
        if found:
            last[label] = found[-1]
    return sorted(last, key=last.get, reverse=True)


def named_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a text names: the only one it mentions, else the one mentioned last ("not sure... likely")."""
    named = labels_named(text, labels)
    return named[0] if named else None


def normalise_text(text: str) -> str:
    """Folded case and accents, no punctuation, no articles, single spaces: 'The Paris.' == 'paris'."""
    text = re.sub(r"[^\w\s]", " ", fold(text))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_key(text: str, kind: str = "text", labels: Sequence[str] = (),
               numbers: Sequence[int] = ()) -> str | None:
    """The normalised answer of a reply, for voting and caching: None when it gives no answer of `kind`."""
    span = final_answer_span(text)
    source = span if span is not None else text
    if kind == "number":
        value = final_number(span) if span is not None else None
        if value is None:  # no number in the stated answer: the reply's last number
            value = final_number(text)
        return None if value is None else format(value.normalize(), "f")
    if kind == "label":  # as the suite's checkers read labels: a reply naming several commits to none
        for candidate in ([span] if span is not None else []) + [text]:
            named = labels_named(candidate, labels)
            if named:
                return named[0] if len(named) == 1 else None
        return None
    if kind == "json":
        found = find_json_object(source) or find_json_object(text)
        return None if found is None else json.dumps(found, sort_keys=True, ensure_ascii=False)
    if kind == "expression":
        found = extract_expression(text, list(numbers))
        return None if found is None else found.replace(" ", "")
    if kind == "text":
        lines = [line for line in text.splitlines() if line.strip()]
        key = normalise_text(span if span is not None else (lines[-1] if lines else ""))
        return key or None
    raise GptlabError(f"unknown answer kind {kind!r} (expected one of {', '.join(KINDS)})")


def vote(keys: Sequence[str | None]) -> tuple[str | None, float]:
    """Majority answer among `keys` (None = no answer, never wins over an answer) and its agreement
    (votes / len(keys)); a tie goes to the answer that came first."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, 0.0
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return winner, best / len(keys)


# ---------------------------------------------------------------------------------------------------------
# Tasks as prompting sees them


Checker = Callable[[Example, str], float]


@dataclass
class PromptTask:
    """A task to prompt for: where its examples come from, how a reply is graded (1/0, or a score in
    [0, 1] for metrics such as F1) and what kind of answer it has. `prompt_task(name)` builds one for a
    suite task or game24; `prompt_search.data_task` for a user's JSONL file."""

    name: str
    check: Checker
    draw: Callable[[str, int, int | str], list[Example]]  # (split, n, seed) -> distinct examples
    kind: str = "text"
    labels: tuple[str, ...] = ()
    suite: bool = False  # a task of gptlab.tasks: shots come from eval.report.draw_shots

    def examples(self, split: str, n: int, seed: int | str = 0) -> list[Example]:
        return self.draw(split, n, seed)

    def shots(self, example: Example, k: int, seed: int = 0, index: int = 0) -> list[Example]:
        """k train examples to show before `example` (a fresh seeded draw per question index)."""
        if self.suite:
            return draw_shots(example, k, seed, index)
        shots = self.examples("train", k, f"shots:{seed}:{index}") if k else []
        if len(shots) < k:
            raise GptlabError(f"task {self.name!r} has only {len(shots)} train examples, fewer than shots={k}")
        return shots

    def key(self, example: Example, text: str) -> str | None:
        return answer_key(text, self.kind, self.labels, example.metadata.get("numbers", ()))

    def grade(self, example: Example, text: str) -> float:
        """The checker's verdict on the answer the reply commits to (the whole reply if it names none)."""
        span = final_answer_span(text) if self.kind != "expression" else None  # 24: "... = 24" is no answer
        return float(self.check(example, text if span is None else span))


def prompt_task(name: str) -> PromptTask:
    """A suite task (gold checker, test questions as `gptlab eval` draws them) or "game24"."""
    if name == GAME24.name:
        # the evaluation's distinct-question sampler, on a task outside the suite's registry
        return PromptTask(name, GAME24.check, lambda split, n, seed: distinct_examples(
            GAME24, split, n, random.Random(f"prompting:{seed}:{name}:{split}")), "expression")
    if name not in TASKS:
        raise GptlabError(f"unknown task {name!r} (available: {', '.join(sorted(TASKS))}, {GAME24.name})")
    task = TASKS[name]
    return PromptTask(name, task.check, lambda split, n, seed: eval_examples([name], n, seed, split)[name],
                      TASK_KINDS.get(name, "text"), TASK_LABELS.get(name, ()), suite=True)


def cot_answer(example: Example) -> str:
    """A worked answer for a few-shot chain-of-thought shot: the task's longest reference text, ending in
    "The answer is X." if it does not say so already."""
    text = max((response_text(r) for r in example.reference), key=len)
    return text if final_answer_span(text) else f"{text.rstrip()} The answer is {example.answer_text}."


# ---------------------------------------------------------------------------------------------------------
# Prompts and samples


@dataclass
class Program:
    """A prompt as data: an instruction and demonstrations (question, answer) for one task, in one format.
    `gptlab prompt search` writes the winner as JSON; `gptlab prompt eval --prompt FILE` reads it back."""

    task: str
    instruction: str = ""
    demos: list[tuple[str, str]] = field(default_factory=list)
    format: str = "chat"
    cot: bool = False
    notes: dict[str, Any] = field(default_factory=dict)  # provenance and scores; not used to prompt

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "demos": [{"question": q, "answer": a} for q, a in self.demos]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> Program:
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise GptlabError(f"{where}: a prompt file needs a JSON object with a 'task' string")
        demos = data.get("demos", [])
        if not isinstance(demos, list) or not all(isinstance(d, dict) and isinstance(d.get("question"), str)
                                                  and isinstance(d.get("answer"), str) for d in demos):
            raise GptlabError(f"{where}: 'demos' must be a list of {{question, answer}} strings")
        fmt = data.get("format", "chat")
        if fmt not in FORMATS:
            raise GptlabError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        return cls(data["task"], str(data.get("instruction", "")), [(d["question"], d["answer"]) for d in demos],
                   fmt, bool(data.get("cot", False)), dict(data.get("notes", {})))


@dataclass
class Sample:
    """One reply, as graded: its full text (reasoning included), normalised answer and score."""

    text: str
    key: str | None
    score: float
    completion_tokens: int
    prompt_tokens: int
    shots: int | None = None  # demonstrations the prompt kept (None: none were asked for)


class Prompter:
    """Renders prompts in one format (chat turns or a base-model document) and calls the LLM."""

    def __init__(self, llm: Any, format: str = "chat", max_tokens: int = 256):
        if format not in FORMATS:
            raise GptlabError(f"unknown prompt format {format!r} (expected one of {', '.join(FORMATS)})")
        self.llm, self.format, self.max_tokens = llm, format, max_tokens

    @property
    def chat(self) -> bool:
        return self.format == "chat"

    def render(self, question: str, shots: Sequence[tuple[str, str]] = (), instruction: str = "",
               system: str = "", answer_prefix: str = "") -> str | list[dict]:
        """Chat messages (system = instruction + the task's system text; shots as earlier turns; a chain
        of thought requested in the last user turn) or a document ending where the answer starts."""
        if self.chat:
            head = "\n\n".join(t for t in (instruction, system) if t)
            turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            request = f"{question}\n\n{COT_REQUEST}" if answer_prefix else question
            return ([{"role": "system", "content": head}] if head else []) + turns + [{"role": "user", "content": request}]
        style = STYLES[self.format]
        if instruction:
            style = dataclasses.replace(style, header=f"{style.header}{instruction}\n\n")
        document = style.prompt(question, list(shots))
        return f"{document} {answer_prefix}" if answer_prefix else document

    def generate(self, prompt: str | list[dict], *, n: int = 1, temperature: float = 0.0,
                 max_tokens: int | None = None, seed: int | None = None) -> list:
        kw = dict(max_tokens=max_tokens or self.max_tokens, temperature=temperature, n=n, seed=seed)
        if isinstance(prompt, str):
            return self.llm.complete(prompt, stop=list(STYLES[self.format].stops), **kw)
        return self.llm.chat(prompt, **kw)

    def generate_fitting(self, question: str, shots: Sequence[tuple[str, str]] = (), instruction: str = "",
                         system: str = "", answer_prefix: str = "", **sampling) -> tuple[Any, list, int]:
        """(prompt, generations, demonstrations kept): `render` + `generate` with as many of `shots` as
        fit the context window, dropping them from the end on ContextOverflow (the question alone must fit)."""
        kept = list(shots)
        while True:
            prompt = self.render(question, kept, instruction, system, answer_prefix)
            try:
                return prompt, self.generate(prompt, **sampling), len(kept)
            except ContextOverflow:
                if not kept:
                    raise
                kept.pop()

    def follow_up(self, prompt: str | list[dict], reply: str, request: str, max_tokens: int = 32) -> Any:
        """One greedy continuation after `reply`: a new user turn in chat, the next words of a document."""
        if isinstance(prompt, str):
            return self.generate(f"{prompt}{reply}\n{request}", max_tokens=max_tokens)[0]
        turns = prompt + [{"role": "assistant", "content": reply}, {"role": "user", "content": request}]
        return self.generate(turns, max_tokens=max_tokens)[0]


def _system_text(example: Example) -> str:
    return "\n\n".join(m["content"] for m in example.messages if m["role"] == "system")


def answer(prompter: Prompter, task: PromptTask, example: Example, *, instruction: str = "",
           shots: Sequence[tuple[str, str]] = (), cot: bool = False, n: int = 1, temperature: float = 0.0,
           seed: int | None = None) -> list[Sample]:
    """n graded replies to `example` (one call with n=n). With `cot`, the reply reasons first; a chain
    that ends with no answer of the task's kind gets Kojima's second call ("Therefore, the answer is")."""
    prefix = COT_TRIGGER if cot and not prompter.chat else ""
    prompt, gens, kept = prompter.generate_fitting(example.question, shots, instruction, _system_text(example),
                                                   COT_TRIGGER if cot else "", n=n, temperature=temperature, seed=seed)
    samples = []
    for gen in gens:
        text, tokens, prompt_tokens = f"{prefix} {gen.text.strip()}".strip(), gen.completion_tokens, gen.prompt_tokens
        if cot and final_answer_span(text) is None and task.key(example, text) is None:
            request = ANSWER_TRIGGER if not prompter.chat else "What is the final answer? Reply 'The answer is X.'"
            try:
                extra = prompter.follow_up(prompt, gen.text if not prompter.chat else text, request)
                text = f"{text}\n{ANSWER_TRIGGER} {extra.text.strip()}"
                tokens, prompt_tokens = tokens + extra.completion_tokens, prompt_tokens + extra.prompt_tokens
            except ContextOverflow:  # the chain filled the window: no room to ask for its answer
                pass
        samples.append(Sample(text, task.key(example, text), task.grade(example, text), tokens, prompt_tokens,
                              kept if shots else None))
    return samples


def shot_pairs(task: PromptTask, example: Example, k: int, seed: int, index: int, cot: bool = False) -> list[tuple[str, str]]:
    """k train shots as (question, answer) pairs; worked chains when `cot` (few-shot chain of thought)."""
    return [(s.question, cot_answer(s) if cot else shot_answer(s)) for s in task.shots(example, k, seed, index)]


def run_program(prompter: Prompter, task: PromptTask, example: Example, program: Program) -> Sample:
    """The greedy reply of a searched or hand-written program."""
    return answer(prompter, task, example, instruction=program.instruction, shots=program.demos, cot=program.cot)[0]


def self_consistency(prompter: Prompter, task: PromptTask, example: Example, k: int,
                     shots: Sequence[tuple[str, str]] = (), temperature: float = SAMPLING_TEMPERATURE,
                     seed: int | None = None) -> list[Sample]:
    """k sampled chains of thought (Wang et al. 2022); `majority(samples[:k'])` gives the vote at k'."""
    return answer(prompter, task, example, shots=shots, cot=True, n=k, temperature=temperature, seed=seed)


def majority(samples: Sequence[Sample]) -> tuple[Sample, float]:
    """The sample that stands for the majority answer (the first with it; the first sample when none has
    an answer) and the agreement (its votes / number of samples)."""
    winner, agreement = vote([s.key for s in samples])
    return next((s for s in samples if s.key == winner), samples[0]), agreement


VERIFY_REQUEST = ("Question: {question}\n\nProposed answer: {reply}\n\nIs the proposed answer correct? Check the "
                  "work step by step, then end with one word: correct or wrong.")
_VERDICTS = {"correct": "correct", "yes": "correct", "wrong": "wrong", "incorrect": "wrong", "no": "wrong"}


def verdict_of(text: str) -> str:
    """'correct', 'wrong' or 'unclear': the verdict word a verification reply names last."""
    word = named_label(text, tuple(_VERDICTS))
    return _VERDICTS[word] if word else "unclear"


def check_your_work(prompter: Prompter, task: PromptTask, example: Example, retries: int = 2,
                    shots: Sequence[tuple[str, str]] = (), seed: int = 0) -> tuple[list[Sample], list[str]]:
    """Answer (greedy chain of thought), ask the model to verify, answer again (sampled) while it says
    "wrong", at most `retries` times. Returns every answer (the last stands) and every verdict; the
    verification calls' tokens are added to the answer they judged."""
    attempts: list[Sample] = []
    verdicts: list[str] = []
    for attempt in range(retries + 1):
        temperature = 0.0 if attempt == 0 else SAMPLING_TEMPERATURE
        sample = answer(prompter, task, example, shots=shots, cot=True, temperature=temperature,
                        seed=None if attempt == 0 else seed + attempt)[0]
        attempts.append(sample)
        if attempt == retries:
            break
        check = prompter.generate(prompter.render(VERIFY_REQUEST.format(question=example.question, reply=sample.text)))[0]
        sample.completion_tokens += check.completion_tokens
        sample.prompt_tokens += check.prompt_tokens
        verdicts.append(verdict_of(check.text))
        if verdicts[-1] != "wrong":
            break
    return attempts, verdicts


# ---------------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood


NORMALISATIONS = ("none", "bytes", "tokens")


def choice_scores(llm: Any, prompt: str | list[dict], continuations: Sequence[str], normalise: str = "none") -> list[float]:
    """Summed log p(continuation | prompt) per continuation (a document prompt, or chat messages whose
    assistant reply the continuations start), divided by its UTF-8 bytes or tokens if `normalise` says so."""
    if normalise not in NORMALISATIONS:
        raise GptlabError(f"unknown normalisation {normalise!r} (expected one of {', '.join(NORMALISATIONS)})")
    if not getattr(llm, "supports_logprobs", False):
        raise GptlabError(f"backend {getattr(llm, 'name', llm)!r} gives no log-probabilities; "
                          "classify by generation instead")
    scores = llm.logprobs(prompt, list(continuations)) if isinstance(prompt, str) else \
        llm.chat_logprobs(prompt, list(continuations))
    if normalise == "bytes":
        return [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, continuations)]
    if normalise == "tokens":
        return [s / max(1, llm.count_tokens(c)) for s, c in zip(scores, continuations)]
    return list(scores)


def choose(llm: Any, item: str, normalise: str = "none") -> tuple[int, list[float]]:
    """The alternative of a "prefix {a|b|c} suffix" item the model finds likeliest, and every score."""
    parsed = parse_choice_item(item, "prompt")
    scores = choice_scores(llm, parsed.prompt, parsed.continuations, normalise)
    return max(range(len(scores)), key=scores.__getitem__), scores


def choose_label(prompter: Prompter, task: PromptTask, example: Example, shots: Sequence[tuple[str, str]] = (),
                 normalise: str = "none") -> Sample:
    """A label task answered without generating: each label scored as the start of the answer (a space
    before it in a document, where the answer label "A:" ends without one), the likeliest one graded."""
    if not task.labels:
        raise GptlabError(f"task {task.name!r} has no label set to score")
    prompt = prompter.render(example.question, shots, system=_system_text(example))
    continuations = list(task.labels) if prompter.chat else [f" {label}" for label in task.labels]
    scores = choice_scores(prompter.llm, prompt, continuations, normalise)
    label = task.labels[max(range(len(scores)), key=scores.__getitem__)]
    return Sample(label, label, task.grade(example, label), 0, 0)
