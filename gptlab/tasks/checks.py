"""Answer-reading helpers shared by the checkers: numbers, names, JSON and hedges, read as a person would.

A checker judges the whole reply, not one token of it: a reply that contains the right answer but denies it
("not 7"), offers it among alternatives ("6 or 7", "Paris or Lyon"), asks it ("7?") or backs it with a false
equation ("3 + 4 = 8, so 7") has not answered, and RL would otherwise learn to list candidates. The tests
are cheap regular expressions and exact arithmetic (every reward and eval verdict goes through them), and
only look near the answer, so a right answer with reasoning around it still passes.
"""

from __future__ import annotations

import json
import re
import unicodedata
from decimal import Decimal
from fractions import Fraction
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


# a clause ends at sentence punctuation followed by a space (not inside "15.0" or "1,234") or a line break
CLAUSE_END = re.compile(r"[.!?;:](?=\s|$)|\n")
# words that, among the few just before an answer, deny it ("not 7", "isn't Paris") or hedge it ("maybe 7",
# "6 or 7", "about 7", "might be mortal")
_DENIAL = re.compile(r"\bnot\b|n't\b|\bnever\b|\bcannot\b", re.IGNORECASE)
_HEDGE = re.compile(r"\b(?:or|either|maybe|perhaps|possibly|probably|likely|may|might|could|about|around|"
                    r"approximately|roughly|nearly|almost|between|least|most|than)\b", re.IGNORECASE)
_WORDS_BEFORE = 4
# what may follow an answer to take it back ("7 is wrong", "Paris isn't right") or to hedge it ("7 or 8",
# "Paris, maybe", "7?": asked, not stated)
_RETRACTED = re.compile(r"\s*(?:(?:is|was|'s|would be)\s+(?:not|never|wrong|incorrect|false|mistaken)\b"
                        r"|(?:isn't|wasn't)\b)", re.IGNORECASE)
_ALTERNATIVE = re.compile(r"\s*(?:,?\s*(?:or|maybe|perhaps|possibly)\b|\?)", re.IGNORECASE)


def _clause_start(text: str, position: int) -> int:
    ends = [m.end() for m in CLAUSE_END.finditer(text, 0, position)]
    return ends[-1] if ends else 0


def _words_before(text: str, start: int) -> str:
    return " ".join(re.findall(r"[\w']+", text[_clause_start(text, start):start])[-_WORDS_BEFORE:])


def denied(text: str, start: int, end: int) -> bool:
    """Whether the phrase at `text[start:end]` is denied: a denial word among the few words before it in its
    clause ("not 7", "isn't really Paris", "cannot be mortal") or a retraction right after it ("7 is wrong")."""
    return _DENIAL.search(_words_before(text, start)) is not None or _RETRACTED.match(text, end) is not None


def hedged(text: str, start: int, end: int) -> bool:
    """Whether the phrase at `text[start:end]` is hedged: a hedge word among the few words before it in its
    clause ("maybe 7", "6 or 7", "about 7", "might be mortal"), or an alternative or a question mark right
    after it ("7 or 8", "Paris, maybe", "7?")."""
    return _HEDGE.search(_words_before(text, start)) is not None or _ALTERNATIVE.match(text, end) is not None


def denied_or_hedged(text: str, start: int, end: int) -> bool:
    return denied(text, start, end) or hedged(text, start, end)


def final_number(text: str, words: bool = False) -> Decimal | None:
    """The last number stated in `text` (with thousands separators; number words zero..twenty if
    `words`), or None if there is none. Decimal, so large integers compare exactly."""
    last = final_number_match(text, words)
    return None if last is None else _number_value(last.group())


def final_number_match(text: str, words: bool = False) -> re.Match[str] | None:
    """Where the last number of `text` is (see `final_number`), or None."""
    found = list(re.finditer(_NUMBER_OR_WORD if words else _NUMBER, text, flags=re.IGNORECASE))
    return found[-1] if found else None


# an arithmetic statement with at least one operator: "3 + 8 = 11", "4 x 5 = 20", "12,345 * 3 = 37,035"
_OPERATOR = r"\s*(?:[-+*/×÷]|\bx\b)\s*"
_EQUATION = re.compile(rf"(?<![\w.,])(?P<left>{_NUMBER}(?:{_OPERATOR}{_NUMBER})+)\s*=\s*(?P<right>{_NUMBER})"
                       r"(?![\d,]\d)")


def _exact_value(expression: str) -> Fraction | None:
    """The exact value of numbers joined by + - * x / (usual precedence), or None on division by zero."""
    terms: list[Fraction] = []  # products, summed at the end
    for m in re.finditer(rf"(?P<op>{_OPERATOR})?(?P<number>{_NUMBER})", expression):
        value, op = Fraction(m.group("number").replace(",", "")), (m.group("op") or "+").strip()
        if op in "+-":
            terms.append(value if op == "+" else -value)
        elif op == "/" or op == "÷":
            if value == 0:
                return None
            terms[-1] /= value
        else:
            terms[-1] *= value
    return sum(terms, Fraction(0))


def false_equation(text: str) -> bool:
    """Whether `text` states an arithmetic equation that is false ("3 + 4 = 8"): the working shown must hold,
    not only the final number."""
    return any(_exact_value(m.group("left")) != Fraction(m.group("right").replace(",", ""))
               for m in _EQUATION.finditer(text))


def states_number(text: str, answer: int | str, words: bool = False) -> bool:
    """Whether `text` answers `answer` and nothing else. The rule, for every number task: the last number
    stated is the answer (so working before it is allowed, and "8? No: it is 7." corrects itself), it is not
    denied, hedged, asked or listed with another number ("not 7", "6 or 7", "about 7", "7?", "6, 7"), the
    reply does not hedge ("I'm not sure"), and every equation it writes is true ("3 + 4 = 8. The answer is
    7." fails: right number, wrong working). 15.0 counts as 15."""
    last = final_number_match(text, words)
    if last is None or _number_value(last.group()) != Decimal(str(answer)):
        return False
    previous = final_number_match(text[:last.start()], words)
    listed = previous is not None and re.fullmatch(r"\s*(?:,|;|&|\band\b|\bor\b)\s*",
                                                   text[previous.end():last.start()], re.IGNORECASE)
    return not (listed or hedges(text) or denied_or_hedged(text, last.start(), last.end()) or false_equation(text))


def _number_value(token: str) -> Decimal:
    token = token.lower()
    return Decimal(NUMBER_WORDS[token]) if token in NUMBER_WORDS else Decimal(token.replace(",", ""))


def fold(text: str) -> str:
    """Case- and accent-insensitive form of text (Brasília == brasilia)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words, ignoring case and accents."""
    return re.search(mention_pattern(phrase), fold(text)) is not None


def mention_pattern(*phrases: str) -> str:
    """A regular expression for any of `phrases` as whole words in `fold`ed text."""
    return r"(?<!\w)(?:" + "|".join(re.escape(fold(p)) for p in phrases) + r")(?!\w)"


def states(text: str, phrase: str) -> bool:
    """Whether `text` names `phrase` (as `mentions` does) and never denies, hedges or takes it back where it
    names it ("Paris", "It is Paris." pass; "Not Paris.", "Paris or Lyon", "Maybe Paris", "Paris?" fail)."""
    folded = fold(text)
    spans = [m.span() for m in re.finditer(mention_pattern(phrase), folded)]
    return bool(spans) and not any(denied_or_hedged(folded, start, end) for start, end in spans)


def hedges(text: str) -> bool:
    return HEDGES.search(text) is not None


def _object_with_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, where a key given several different values ({"age": 34, "age": 35}) maps to
    the tuple of them: such an object states no single value for it (json.loads would keep the last)."""
    values: dict[str, list[Any]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)
    return {k: v[0] if all(x == v[0] for x in v) else tuple(v) for k, v in values.items()}


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every top-level JSON object embedded in `text` (e.g. inside a ```json fence), in order; an object
    nested in another is part of it, not a separate one. Repeated keys as in `_object_with_repeats`."""
    decoder = json.JSONDecoder(object_pairs_hook=_object_with_repeats)
    objects, position = [], 0
    while (brace := text.find("{", position)) != -1:
        try:
            value, end = decoder.raw_decode(text, brace)
        except json.JSONDecodeError:
            position = brace + 1
            continue
        objects.append(value)
        position = end
    return objects


def find_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object embedded anywhere in `text`, or None."""
    objects = json_objects(text)
    return objects[0] if objects else None
