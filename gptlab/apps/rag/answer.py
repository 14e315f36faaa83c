"""`answer()`: retrieve, build a token-budgeted prompt with numbered sources, generate (streaming), and map
the [n] citations in the reply back to their sources.

Design decisions
- Relevance gate: when no retrieved chunk has cosine similarity >= `min_similarity` with the question,
  the answer is "I don't know" and the model is not called: a small model given unrelated passages
  answers anyway. The default, 0.30 for all-MiniLM-L6-v2, was calibrated on SQuAD-shifts questions
  (bench/bench_rag.py, bench/results/rag.md): 96% of 300 answerable new_wiki questions have a top-1
  similarity >= 0.30 with the indexed articles, and 72% of 300 Amazon-review questions asked of the same
  index fall below it (0.40 would refuse 97% of those, but also 14% of the answerable ones). Another
  embedder needs its own threshold (`--min-similarity`).
- Budget: the prompt must fit the model's context window (llm.context_window) minus `max_tokens` for the
  reply and a margin for the chat template's role markers (`TEMPLATE_MARGIN` per message). Sources go in
  rank order while they fit; the first one is cut at a word boundary if even it does not fit whole (the
  best passage, partly, beats none). A question that does not fit without any source is a GptlabError
  naming both numbers. An endpoint that does not report its window is budgeted at 4096 tokens.
- Citations: sources are numbered [1]..[n] in the prompt; `Answer.cited` lists the numbers the reply
  uses that name a real source (a model may invent [7] from 3 sources: such numbers are dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ...common import GptlabError
from ..llm import LLM
from .store import Hit, RagIndex

MIN_SIMILARITY = 0.30
TEMPLATE_MARGIN = 8  # tokens per chat message for role markers and separators
UNKNOWN_WINDOW = 4096
DONT_KNOW = "I don't know: nothing in the index is relevant to this question."
INSTRUCTIONS = ("Answer the question using only the numbered sources. Cite the sources you use as [1], [2]. "
                "If the sources do not contain the answer, say that you do not know.")
SHORT_INSTRUCTIONS = ("Answer the question with a short phrase taken from the sources, without explanation.")
CLOSED_BOOK_INSTRUCTIONS = "Answer the question with a short phrase, without explanation."


@dataclass
class Answer:
    text: str
    sources: list[Hit] = field(default_factory=list)  # sources[i] is [i + 1] in the prompt
    cited: list[int] = field(default_factory=list)  # source numbers the reply cites, in order of first use
    known: bool = True  # False: retrieval found nothing relevant, the model was not asked
    prompt_tokens: int = 0


def format_source(number: int, hit: Hit, text: str | None = None) -> str:
    return f"[{number}] {hit.title}\n{hit.text if text is None else text}"


def cited_numbers(text: str, n_sources: int) -> list[int]:
    """Source numbers cited as [n] or [n, m] in `text`, first use first, only 1..n_sources."""
    seen: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for number in (int(x) for x in group.split(",")):
            if 1 <= number <= n_sources and number not in seen:
                seen.append(number)
    return seen


def _truncate_to(llm: LLM, text: str, budget: int) -> str:
    """The longest word-boundary prefix of `text` that takes at most `budget` tokens (binary search)."""
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if llm.count_tokens(" ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def build_messages(llm: LLM, question: str, hits: list[Hit], instructions: str = INSTRUCTIONS,
                   max_tokens: int = 256) -> tuple[list[dict], list[Hit]]:
    """Chat messages with as many of `hits` as fit the window, and the hits used (numbered from 1)."""
    window = llm.context_window or UNKNOWN_WINDOW
    head = f"{instructions}\n\nSources:\n"
    tail = f"\n\nQuestion: {question}"
    fixed = llm.count_tokens(head + tail) + 2 * TEMPLATE_MARGIN
    budget = window - max_tokens - fixed
    if budget < 0:
        raise GptlabError(f"the question takes {fixed} tokens with the instructions, and the reply {max_tokens}: "
                          f"more than the model's context window of {window} tokens")
    blocks, used = [], []
    for hit in hits:
        block = format_source(len(used) + 1, hit)
        cost = llm.count_tokens(block + "\n\n")
        if cost > budget:
            if used:
                continue  # a later, shorter source may still fit
            header = llm.count_tokens(format_source(1, hit, "") + "\n\n")
            if budget - header < 16:
                continue
            block = format_source(1, hit, _truncate_to(llm, hit.text, budget - header))
            cost = llm.count_tokens(block + "\n\n")
        blocks.append(block)
        used.append(hit)
        budget -= cost
    content = head + "\n\n".join(blocks) + tail
    return [{"role": "user", "content": content}], used


def answer(index: RagIndex, llm: LLM, question: str, *, k: int = 5, retriever: str = "hybrid",
           source: str | None = None, min_similarity: float = MIN_SIMILARITY, max_tokens: int = 256,
           instructions: str = INSTRUCTIONS, on_text: Callable[[str], None] | None = None,
           hits: list[Hit] | None = None, **sampling) -> Answer:
    """A grounded answer to `question` from `index` by `llm`; streams text deltas to `on_text` if given.
    `hits` skips retrieval (the caller already searched)."""
    if not question.strip():
        raise GptlabError("the question is empty")
    hits = index.search(question, k=k, retriever=retriever, source=source) if hits is None else hits
    if not hits or max(hit.similarity for hit in hits) < min_similarity:
        if on_text is not None:
            on_text(DONT_KNOW)
        return Answer(DONT_KNOW, known=False)
    messages, used = build_messages(llm, question, hits, instructions, max_tokens)
    prompt_tokens = llm.count_tokens(messages[0]["content"])
    if on_text is None:
        text = llm.chat(messages, max_tokens=max_tokens, **sampling)[0].text
    else:
        parts = []
        for delta in llm.stream_chat(messages, max_tokens=max_tokens, **sampling):
            parts.append(delta)
            on_text(delta)
        text = "".join(parts)
    return Answer(text, used, cited_numbers(text, len(used)), True, prompt_tokens)


def closed_book(llm: LLM, question: str, max_tokens: int = 32,
                instructions: str = CLOSED_BOOK_INSTRUCTIONS, **sampling) -> str:
    """The same model's answer without any source (the baseline RAG is measured against)."""
    messages = [{"role": "user", "content": f"{instructions}\n\nQuestion: {question}"}]
    return llm.chat(messages, max_tokens=max_tokens, **sampling)[0].text
