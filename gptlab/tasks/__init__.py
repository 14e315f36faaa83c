"""Embedded task suite: seeded question generators with gold checkers, so SFT, reward modelling, RL and
evaluation can all be measured on a laptop with no downloads.

Every task produces `Example`s: the prompt `messages`, the short gold `answer_text`, one or more ideal
assistant responses in `reference` (best first; each a list of messages, because a tool-using answer is
an assistant tool call, the tool output and the final assistant text), and `metadata`. `check(example,
text)` judges the text of a response (`gptlab.chat.response_text` / `completion_text`) and
`bad_responses(example, rng)` returns plausible wrong, evasive or malformed responses, the rejected side
of reward-model preference pairs.

Design decisions
- Train/test splits are disjoint by construction: a question belongs to the test split when a hash of
  its `split_key` (the underlying problem, e.g. the expression or the country, not its phrasing) falls in
  the test fraction; `generate` draws until the question lands in the requested split. No list of seen
  questions is kept, so any number of examples can be drawn in any order, and a test question can never
  be memorized from training data however much is generated.
- Generators take a `random.Random`: one seed reproduces a whole mixture (`sample_examples`).
- Checkers read answers the way a person would (the final number in the text, a name in any case or
  accents, JSON anywhere in the reply) and judge the whole reply, not one token of it: a reply carrying the
  right answer but denying it, hedging it, listing it among candidates or pinning it to another claim (a
  false equation, another word, another country) is wrong, because RL rewards and eval both use `check`.
  Each task's `check` docstring states its rule; `checks.py` holds the shared tests, regular expressions and
  exact arithmetic, cheap and deterministic.

Adding a task: create `gptlab/tasks/<name>.py` with one `Task` subclass decorated with `@register`
(`from . import Example, Task, register`; answer-reading helpers are in `.checks`):

    @register
    class Doubling(Task):
        name = "doubling"

        def _draw(self, rng):  # one random question, whatever the split
            n = rng.randint(1, 999)
            return Example(self.name, [{"role": "user", "content": f"What is twice {n}?"}], str(2 * n),
                           [f"Twice {n} is {2 * n}."])

        def check(self, example, response_text):
            return final_number_is(response_text, example.answer_text)

        def _bad_responses(self, example, rng):  # strings or message lists
            yield f"It is {int(example.answer_text) + 2}."
            yield "I don't know."

Override `split_key` when one problem has several phrasings. Modules of this package are discovered
automatically, so nothing else needs editing, and tests/test_tasks.py runs its generic checks (determinism,
disjoint splits, references pass, bad responses fail) on every registered task.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..common import GptlabError

Message = dict[str, Any]
Response = list[Message]
SPLITS = ("train", "test")
_MAX_DRAWS = 10_000


def assistant(text: str) -> Response:
    """A one-message assistant response."""
    return [{"role": "assistant", "content": text}]


def as_response(response: str | Response) -> Response:
    return assistant(response) if isinstance(response, str) else list(response)


@dataclass
class Example:
    task: str
    messages: list[Message]  # the prompt: optional system message + user message
    answer_text: str  # the short gold answer ("15", "Copenhagen", a JSON object)
    reference: list[Response]  # ideal assistant responses, best first (strings are wrapped as messages)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reference = [as_response(r) for r in self.reference]

    def conversation(self, index: int = 0) -> list[Message]:
        """The prompt followed by reference response `index`: a complete conversation for SFT."""
        return self.messages + self.reference[index]

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def split_of(task_name: str, key: str, test_fraction: float) -> str:
    """'test' for a fixed pseudo-random `test_fraction` of keys, 'train' for the rest."""
    digest = hashlib.sha256(f"{task_name}\x00{key}".encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2**64 else "train"


class Task:
    """Base class: subclasses set `name` and implement `_draw`, `check` and `_bad_responses`."""

    name: str = ""
    description: str = ""
    test_fraction: float = 0.2

    def generate(self, rng: random.Random, split: str) -> Example:
        """A random example of `split` ('train' or 'test')."""
        if split not in SPLITS:
            raise GptlabError(f"unknown split {split!r} (expected train or test)")
        for _ in range(_MAX_DRAWS):
            example = self._draw(rng)
            if split_of(self.name, self.split_key(example), self.test_fraction) == split:
                example.metadata["split"] = split
                return example
        raise GptlabError(f"task {self.name!r} found no {split} example in {_MAX_DRAWS} draws")

    def split_key(self, example: Example) -> str:
        """What identifies a question for the train/test split; by default the user's text."""
        return example.question

    def bad_responses(self, example: Example, rng: random.Random) -> list[Response]:
        """Wrong, evasive or malformed responses to `example` (each fails `check`)."""
        return [as_response(r) for r in self._bad_responses(example, rng)]

    # ---- to implement ------------------------------------------------------------------------------
    def _draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def check(self, example: Example, response_text: str) -> bool:
        raise NotImplementedError

    def _bad_responses(self, example: Example, rng: random.Random) -> Iterator[str | Response]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add one instance of the task to `TASKS` under its `name`."""
    if not cls.name or cls.name in TASKS:
        raise ValueError(f"task class {cls.__name__} needs a unique name (got {cls.name!r})")
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise GptlabError(f"unknown task {name!r} (available: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def task_names(spec: str | Sequence[str] | None = None) -> list[str]:
    """The tasks a `--tasks` option names: None or 'all' for every registered task (in name order, which is
    also `TASKS`' order: modules are discovered sorted and named after their task), a comma-separated
    string or a list of names. Unknown names fail here, listing the available tasks. One parser for every
    stage, so `gptlab tasks export` and a stage given the same option draw the same examples."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return sorted(TASKS)
    names = [n.strip() for n in spec.split(",") if n.strip()] if isinstance(spec, str) else list(spec)
    for name in names:
        get_task(name)
    return names


def sample_examples(tasks: Sequence[str | Task] | Mapping[str, float] | None, n: int, split: str,
                    seed: int | str = 0) -> list[Example]:
    """`n` examples of `split` from a mixture of tasks: names (uniform), a {name: weight} mapping, or None
    for every registered task. The same arguments always give the same examples."""
    if isinstance(tasks, Mapping):
        chosen, weights = [get_task(t) for t in tasks], [float(w) for w in tasks.values()]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise GptlabError("task weights must be non-negative and not all zero")
    else:
        chosen = [get_task(t) for t in (TASKS if tasks is None else tasks)]
        weights = [1.0] * len(chosen)
    if not chosen:
        raise GptlabError("no tasks to sample from")
    rng = random.Random(seed)
    return [rng.choices(chosen, weights)[0].generate(rng, split) for _ in range(n)]


def task_conversations(names: list[str] | None, n: int, split: str, seed: int) -> list[list[dict]]:
    """`n` conversations of `split` from the task suite, each with a random one of its reference answers."""
    rng = random.Random(f"sft-reference-{seed}-{split}")
    examples = sample_examples(names, n, split, seed=f"sft-{seed}-{split}")
    return [ex.conversation(rng.randrange(len(ex.reference))) for ex in examples]


def _discover(names: Iterable[str]) -> None:
    for name in sorted(names):
        importlib.import_module(f"{__name__}.{name}")


_discover(m.name for m in pkgutil.iter_modules(__path__))

