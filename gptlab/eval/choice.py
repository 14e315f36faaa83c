"""Multiple choice by log-likelihood: minimal pairs such as "The keys to the cabinet {are|is} on the table."
scored as continuations, the sum of token log-probs and its per-byte version (the package docstring, 2.)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..common import GptlabError
from ..infer.engine import Engine
from ..model import GPT
from ..tokenizer import Tokenizer
from .stats import accuracy_stats


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

        return {**accuracy_stats(sum(r["credit"] for r in rows), n), "accuracy_norm": mean("credit_norm"),
                "chance": sum(1 / len(r["logprobs"]) for r in rows) / n,
                "baseline": mean("baseline"), "baseline_norm": mean("baseline_norm")}

    return {"categories": {c: summary(rows) for c, rows in by_category.items()}, "overall": summary(scored),
            "items": scored}

