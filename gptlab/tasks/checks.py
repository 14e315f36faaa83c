"""Answer-reading helpers shared by the checkers: numbers, names, JSON and hedges, read as a person would."""

from __future__ import annotations

import json
import re
import unicodedata
from decimal import Decimal
from typing import Any

# Replies that answer nothing; every task offers some of them as rejected responses.
EVASIVE = [
    "I'm not sure.",
    "I don't know the answer to that.",
    "I cannot answer that question.",
    "That is a difficult question. It depends on many factors.",
    "Could you rephrase the question?",
]

NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
# 1,234,567.5 or 1234567.5 or -3; a trailing sentence period is not a decimal point
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_OR_WORD = _NUMBER + r"|\b(?:" + "|".join(NUMBER_WORDS) + r")\b"

HEDGES = re.compile(r"\b(?:can ?not|can't|unable to|impossible to) (?:conclude|tell|know|say|determine|be sure)"
                    r"|\bnot enough information\b|\bI(?: do not|'m not| am not|'m unsure| don't) (?:know|sure)\b",
                    re.IGNORECASE)


def final_number(text: str, words: bool = False) -> Decimal | None:
    """The last number stated in `text` (with thousands separators; number words zero..twenty if
    `words`), or None if there is none. Decimal, so large integers compare exactly."""
    found = re.findall(_NUMBER_OR_WORD if words else _NUMBER, text, flags=re.IGNORECASE)
    if not found:
        return None
    last = found[-1].lower()
    return Decimal(NUMBER_WORDS[last]) if last in NUMBER_WORDS else Decimal(last.replace(",", ""))


def final_number_is(text: str, answer: int | str, words: bool = False) -> bool:
    """Whether the last number in `text` equals `answer` exactly (15.0 counts as 15)."""
    return final_number(text, words) == Decimal(str(answer))


def fold(text: str) -> str:
    """Case- and accent-insensitive form of text (Brasília == brasilia)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words, ignoring case and accents."""
    return re.search(r"(?<!\w)" + re.escape(fold(phrase)) + r"(?!\w)", fold(text)) is not None


def hedges(text: str) -> bool:
    return HEDGES.search(text) is not None


def find_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object embedded anywhere in `text` (e.g. inside a ```json fence), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None
