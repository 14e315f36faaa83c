"""Token-budgeted chunking with overlap that respects paragraph and sentence boundaries.

Design decisions
- The budget is in the EMBEDDING model's tokens (its tokenizer is passed in as `count_tokens`): the
  embedder truncates what does not fit (all-MiniLM-L6-v2 stops at 256 word pieces), so a chunk measured
  in any other unit could lose its tail silently. Default 200 tokens leaves room for special tokens and
  for the small error of summing per-sentence counts instead of counting the joined text.
- Units are sentences (split after . ! ? followed by space, or at a line break), inside paragraphs
  (split at blank lines). A sentence longer than the budget is cut between words; a "word" longer than
  the budget (a base64 blob, a URL) is cut between characters, so every chunk fits.
- Packing is greedy. A chunk stops at a paragraph boundary once it is at least half full (a paragraph is
  a natural topic unit; mixing two only to fill the budget dilutes both embeddings). When a chunk stops
  inside a paragraph, the next one starts with the last whole sentences of it, up to `overlap` tokens,
  so a fact that straddles the cut is whole in one of the two chunks.
- Each chunk is an exact slice of the document, text[start:end], so offsets can be shown and checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ...common import GptlabError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


@dataclass(frozen=True)
class ChunkSpan:
    start: int  # character offsets into the document text
    end: int
    tokens: int


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int
    paragraph: int


def _spans(text: str, pattern: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """Non-blank pieces of text[start:end] between matches of `pattern`, stripped of surrounding space."""
    pieces, cursor = [], start
    for match in pattern.finditer(text, start, end):
        pieces.append((cursor, match.start()))
        cursor = match.end()
    pieces.append((cursor, end))
    out = []
    for a, b in pieces:
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece.rstrip())
        if trail > lead:
            out.append((a + lead, a + trail))
    return out


def _split_long(text: str, start: int, end: int, max_tokens: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Cut text[start:end] (over budget) into pieces that fit: between words, or characters if must be."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[start:end])]
    pieces, piece_start, piece_end = [], None, None
    for a, b in words:
        a, b = a + start, b + start
        if piece_start is not None and count(text[piece_start:b]) <= max_tokens:
            piece_end = b
            continue
        if piece_start is not None:
            pieces.append((piece_start, piece_end))
        piece_start, piece_end = a, b
        while count(text[piece_start:piece_end]) > max_tokens:  # one word over budget: cut characters
            cut = piece_start + 1
            while cut < piece_end and count(text[piece_start:cut + 1]) <= max_tokens:
                cut += 1
            pieces.append((piece_start, cut))
            piece_start = cut
    if piece_start is not None and piece_end > piece_start:
        pieces.append((piece_start, piece_end))
    return pieces


def _units(text: str, max_tokens: int, count: Callable[[str], int]) -> list[_Unit]:
    units = []
    for index, (p_start, p_end) in enumerate(_spans(text, _PARAGRAPH_BREAK, 0, len(text))):
        for s_start, s_end in _spans(text, _SENTENCE_END, p_start, p_end):
            n = count(text[s_start:s_end])
            if n <= max_tokens:
                units.append(_Unit(s_start, s_end, n, index))
            else:
                for a, b in _split_long(text, s_start, s_end, max_tokens, count):
                    units.append(_Unit(a, b, count(text[a:b]), index))
    return units


def chunk_text(text: str, count_tokens: Callable[[str], int], max_tokens: int = 200,
               overlap: int = 40) -> list[ChunkSpan]:
    """Chunks of `text` of at most `max_tokens` tokens (as summed per sentence), see the module docstring."""
    if max_tokens < 8:
        raise GptlabError(f"chunk size must be at least 8 tokens, got {max_tokens}")
    if not 0 <= overlap < max_tokens // 2:
        raise GptlabError(f"chunk overlap must be in [0, {max_tokens // 2}) tokens, got {overlap}")
    units = _units(text, max_tokens, count_tokens)
    chunks: list[ChunkSpan] = []
    current: list[_Unit] = []

    def total(us: list[_Unit]) -> int:
        return sum(u.tokens for u in us)

    for unit in units:
        if current:
            full = total(current) + unit.tokens > max_tokens
            new_paragraph = unit.paragraph != current[-1].paragraph and total(current) >= max_tokens // 2
            if full or new_paragraph:
                chunks.append(ChunkSpan(current[0].start, current[-1].end, total(current)))
                carried: list[_Unit] = []
                if not new_paragraph and unit.paragraph == current[-1].paragraph:
                    for previous in reversed(current[1:]):  # never the whole chunk again
                        kept = total(carried) + previous.tokens
                        if kept > overlap or kept + unit.tokens > max_tokens:
                            break
                        carried.insert(0, previous)
                current = carried
        current.append(unit)
    if current:
        chunks.append(ChunkSpan(current[0].start, current[-1].end, total(current)))
    return chunks
