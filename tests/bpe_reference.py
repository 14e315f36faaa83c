"""A short pure-Python byte-level BPE, used only as a test oracle for the fast libraries (minbpe-style).

`encode` follows the rank rule: split with the regex, emit a piece whole if it is a token, else repeatedly
merge the adjacent pair whose concatenation has the lowest rank. `most_frequent_pair` is the first step of
BPE training (Sennrich et al. 2016): count adjacent byte pairs inside every pre-token.
"""

from collections import Counter

import regex


def pretokenize(text: str, pattern: str) -> list[bytes]:
    return [piece.encode("utf-8") for piece in regex.findall(pattern, text)]


def encode_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        candidates = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        candidates = [(r, i) for r, i in candidates if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def encode(text: str, ranks: dict[bytes, int], pattern: str) -> list[int]:
    return [t for piece in pretokenize(text, pattern) for t in encode_piece(piece, ranks)]


def pair_counts(texts: list[str], pattern: str) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        for piece in pretokenize(text, pattern):
            for a, b in zip(piece, piece[1:]):
                counts[bytes([a, b])] += 1
    return counts
