"""Task pipelines in the manner of Hugging Face `pipeline(...)`, on any LLM backend (a local model or an
OpenAI-compatible server): sentiment, classify, extract, qa, summarize, translate.

    from gptlab.apps.pipelines import pipeline
    classify = pipeline("classify", llm, labels=["sport", "politics", "science"])
    classify(["The striker scored twice.", "Parliament passed the bill."])  # -> [{"label": "sport", ...}, ...]

    gptlab pipeline sentiment "I loved it." "Never again." --model smollm2-135m-instruct
    gptlab pipeline extract --base-url http://127.0.0.1:8000/v1 --fields name,age --input people.jsonl \\
        --field bio --out people.out.jsonl

Design decisions
- One prompt per text, written here (plain instructions; the text is quoted after them); chat turns by
  default, or a base-model document with `--format qa|assistant` (`prompting.Prompter`). Decoding is greedy.
- Classification (sentiment is classification with the labels positive, negative) scores every label as
  the continuation of the prompt when the backend gives log-probabilities (`prompting.choice_scores`;
  `normalise` none/bytes/tokens), and reports the likeliest label with the softmax over the labels as
  probabilities: the answer is always a label, and no generated text has to be parsed. A backend without
  log-probabilities (or a server whose chat template the client does not know) generates instead; the
  reply maps to the label it names, or to the most similar label (difflib ratio) if it names none. The
  record says which: `method` "loglik" or "generate", and for generation the raw reply and whether the
  label was named exactly, so nothing is silently coerced.
- Extraction asks for a JSON object with the given keys and parses the first object in the reply
  (`tasks.checks.find_json_object`); a reply without one keeps the raw text and an `error` field.
- Inputs: texts as arguments, lines of a text file, or a field of a JSONL file (`--field`); `-` reads
  standard input. Output: one JSON object per input, in order, to `--out` or standard output. A JSONL line
  that is not an object or lacks the field is a one-line error naming the file and line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import GptlabError, atomic_write_text, get_logger, iter_jsonl
from ..tasks.checks import find_json_object
from .prompting import NORMALISATIONS, Prompter, choice_scores, named_label, normalise_text

log = get_logger("pipeline")

PIPELINES = ("sentiment", "classify", "extract", "qa", "summarize", "translate")
SENTIMENT_LABELS = ("positive", "negative")


def nearest_label(reply: str, labels: Sequence[str]) -> tuple[str, bool]:
    """The label a generated reply names (exact=True), else the most similar label by difflib ratio."""
    named = named_label(reply, labels)
    if named is not None:
        return named, True
    first_line = normalise_text(next((line for line in reply.splitlines() if line.strip()), ""))
    ratios = [difflib.SequenceMatcher(None, first_line, normalise_text(label)).ratio() for label in labels]
    return labels[max(range(len(labels)), key=ratios.__getitem__)], False


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


class Pipeline:
    """Callable on one text or a list of texts; returns one record (dict) per text."""

    def __init__(self, task: str, llm: Any, *, labels: Sequence[str] | None = None, fields: Sequence[str] | None = None,
                 question: str | None = None, target_language: str | None = None, source_language: str | None = None,
                 format: str = "chat", max_tokens: int = 128, normalise: str = "none"):
        if task not in PIPELINES:
            raise GptlabError(f"unknown pipeline {task!r} (expected one of {', '.join(PIPELINES)})")
        if task == "sentiment":
            labels = labels or SENTIMENT_LABELS
        if task in ("sentiment", "classify") and (not labels or len(set(labels)) < 2):
            raise GptlabError(f"{task} needs two or more distinct labels (--labels a,b,...)")
        if task == "extract" and not fields:
            raise GptlabError("extract needs the fields to extract (--fields name,age,...)")
        if task == "translate" and not target_language:
            raise GptlabError("translate needs a target language (--to French)")
        if normalise not in NORMALISATIONS:
            raise GptlabError(f"unknown normalisation {normalise!r} (expected one of {', '.join(NORMALISATIONS)})")
        self.task, self.llm, self.prompter = task, llm, Prompter(llm, format, max_tokens)
        self.labels, self.fields, self.question = list(labels or ()), list(fields or ()), question
        self.target_language, self.source_language, self.normalise = target_language, source_language, normalise
        self.scoring_failure: str | None = None if getattr(llm, "supports_logprobs", False) else \
            f"backend {getattr(llm, 'name', '?')} gives no log-probabilities"

    def request(self, text: str) -> str:
        """The instruction and text the model is given."""
        if self.task == "sentiment":
            return (f"What is the sentiment of this text? Answer with one word: {' or '.join(self.labels)}.\n\n"
                    f"Text: {text}")
        if self.task == "classify":
            return (f"Classify the text into exactly one of these labels: {', '.join(self.labels)}. Answer with "
                    f"the label only.\n\nText: {text}")
        if self.task == "extract":
            return (f"Extract these fields from the text as a JSON object with the keys {', '.join(self.fields)} "
                    f"(null for a field the text does not give). Reply with the JSON object only.\n\nText: {text}")
        if self.task == "qa":
            if self.question:
                return f"Answer the question using the context. Be brief.\n\nContext: {text}\n\nQuestion: {self.question}"
            return f"Answer the question briefly.\n\nQuestion: {text}"
        if self.task == "summarize":
            return f"Summarize the following text in one or two sentences.\n\n{text}"
        source = f" from {self.source_language}" if self.source_language else ""
        return f"Translate the following text{source} into {self.target_language}. Reply with the translation only.\n\n{text}"

    def _generate(self, text: str) -> str:
        return self.prompter.generate(self.prompter.render(self.request(text)))[0].text.strip()

    def _classify(self, text: str) -> dict[str, Any]:
        prompt = self.prompter.render(self.request(text))
        if self.scoring_failure is None:
            continuations = self.labels if self.prompter.chat else [f" {label}" for label in self.labels]
            try:
                scores = choice_scores(self.llm, prompt, continuations, self.normalise)
            except GptlabError as e:  # e.g. a server whose chat template this client does not know
                self.scoring_failure = str(e)
                log.warning("classifying by generation: %s", e)
            else:
                probabilities = softmax(scores)
                best = max(range(len(scores)), key=scores.__getitem__)
                return {"label": self.labels[best], "method": "loglik", "normalise": self.normalise,
                        "scores": dict(zip(self.labels, scores)), "probabilities": dict(zip(self.labels, probabilities))}
        reply = self.prompter.generate(prompt)[0].text.strip()
        label, exact = nearest_label(reply, self.labels)
        return {"label": label, "method": "generate", "raw": reply, "exact": exact,
                "why_not_loglik": self.scoring_failure}

    def run_one(self, text: str) -> dict[str, Any]:
        if self.task in ("sentiment", "classify"):
            return {"input": text, **self._classify(text)}
        reply = self._generate(text)
        if self.task == "extract":
            found = find_json_object(reply)
            if found is None:
                return {"input": text, "fields": None, "raw": reply, "error": "no JSON object in the reply"}
            return {"input": text, "fields": {f: found.get(f) for f in self.fields},
                    "missing": [f for f in self.fields if f not in found], "raw": reply}
        key = {"qa": "answer", "summarize": "summary", "translate": "translation"}[self.task]
        return {"input": text, key: reply}

    def __call__(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        return [self.run_one(t) for t in ([texts] if isinstance(texts, str) else texts)]


def pipeline(task: str, llm: Any, **options) -> Pipeline:
    """A pipeline for `task` (one of PIPELINES) on `llm`; options as `Pipeline` takes them."""
    return Pipeline(task, llm, **options)


# ---------------------------------------------------------------------------------------------------------
# Command line


def read_inputs(texts: Sequence[str], path: str | None, field: str) -> list[tuple[str, str]]:
    """(source, text) pairs: arguments first, then the file's lines or JSONL records' `field`."""
    out = [(f"argument {i + 1}", t) for i, t in enumerate(texts)]
    if path is None:
        return out
    if path == "-":
        return out + [(f"stdin:{i}", line.rstrip("\n")) for i, line in enumerate(sys.stdin, 1) if line.strip()]
    if path.endswith(".jsonl"):
        for where, record in iter_jsonl(path, "input file"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise GptlabError(f"{where}: expected a JSON object with a string field {field!r} (--field)")
            out.append((where, record[field]))
        return out
    if not Path(path).is_file():
        raise GptlabError(f"input file not found: {path}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GptlabError(f"input file {path} is not UTF-8 text") from None
    return out + [(f"{path}:{i}", line) for i, line in enumerate(lines, 1) if line.strip()]


def _csv(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def run_cli(args: argparse.Namespace) -> None:
    from .llm import llm_from_args

    inputs = read_inputs(args.texts, args.input, args.field)
    if not inputs:
        raise GptlabError("no texts: give them as arguments or with --input FILE")
    pipe = pipeline(args.task, llm_from_args(args), labels=_csv(args.labels), fields=_csv(args.fields),
                    question=args.question, target_language=args.to, source_language=args.source,
                    format=args.format, max_tokens=args.max_tokens, normalise=args.normalise)
    lines = [json.dumps({"source": source, **pipe.run_one(text)}, ensure_ascii=False) for source, text in inputs]
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(args.out)
    else:
        print("\n".join(lines))


def register(sub) -> None:
    from .llm import add_llm_args

    parser = sub.add_parser("pipeline", help="task pipelines on any LLM: sentiment, classify, extract, qa, "
                                             "summarize, translate", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=PIPELINES)
    parser.add_argument("texts", nargs="*", help="texts to process, right after the task name (or --input)")
    parser.add_argument("--input", default=None, help="a text file (one text per line), a .jsonl file (see --field) or -")
    parser.add_argument("--field", default="text", help="the JSONL field holding the text (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output JSONL file (default: standard output)")
    parser.add_argument("--labels", default=None, help="classify (and sentiment): comma-separated labels")
    parser.add_argument("--fields", default=None, help="extract: comma-separated field names")
    parser.add_argument("--question", default=None, help="qa: the question; each text is its context")
    parser.add_argument("--to", default=None, help="translate: target language")
    parser.add_argument("--source", default=None, help="translate: source language (optional)")
    parser.add_argument("--format", default="chat", help="chat, qa or assistant (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per reply (default: %(default)s)")
    parser.add_argument("--normalise", default="none", choices=NORMALISATIONS,
                        help="classification by log-likelihood: divide each label's score by its bytes or tokens")
    add_llm_args(parser)
    parser.set_defaults(func=run_cli)
