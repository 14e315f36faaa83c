"""Spelling a word letter by letter and counting a letter in it ("How many r in strawberry?"): easy for a
person, hard for a model that sees tokens instead of letters."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import CLAUSE_END, EVASIVE, NUMBER_WORDS, denied_or_hedged, final_number_match, fold, states_number

WORDS = """strawberry banana apple cherry orange lemon mango papaya potato tomato carrot pepper garlic
onion cucumber broccoli spinach avocado coconut pineapple raspberry blueberry elephant giraffe kangaroo
penguin dolphin octopus squirrel rabbit turtle butterfly mosquito hippopotamus crocodile chimpanzee
library mississippi committee accommodate necessary occurrence embarrass parallel millennium bookkeeper
balloon coffee address success possession assessment tennessee bookshelf umbrella calendar february
wednesday restaurant chocolate vanilla caramel cinnamon marshmallow spaghetti lasagna macaroni
telephone computer keyboard internet algorithm variable function triangle rectangle hexagon diameter
mountain volcano glacier desert river ocean island peninsula waterfall thunder lightning rainbow
tomorrow yesterday afternoon midnight sunrise seventeen hundred thousand million separate definitely
rhythm queue colonel lieutenant pharaoh silhouette questionnaire mayonnaise referee bubble puzzle
jazz pizza zigzag kayak level racecar banana assassin address grammar beginning""".split()
WORDS = sorted(set(WORDS))
COUNT_PHRASINGS = ["How many {letter} in {word}?", "How many times does the letter '{letter}' appear in '{word}'?",
                   "Count the letter {letter} in the word {word}."]
SPELL_PHRASINGS = ["Spell '{word}' letter by letter.", "How do you spell {word}? Give each letter separately.",
                   "Spell the word {word}, one letter at a time."]
# runs of at least two single letters with one separator throughout: "b-a-n-a-n-a", "B A N", "b, a, n"
_LETTER_RUN = re.compile(r"(?<![A-Za-z])[A-Za-z](?P<sep>\s*[,.\-]\s*|\s+)[A-Za-z](?![A-Za-z])"
                         r"(?:(?P=sep)[A-Za-z](?![A-Za-z]))*")


def spelled_letters(text: str) -> str | None:
    """The letters of the last letter-by-letter spelling in `text`, lower case, or None."""
    runs = spellings(text)
    return _letters(runs[-1].group()) if runs else None


def spellings(text: str) -> list[re.Match[str]]:
    """Every letter-by-letter spelling in `text`, in order."""
    return list(_LETTER_RUN.finditer(text))


def _letters(run: str) -> str:
    return re.sub(r"[^A-Za-z]", "", run).lower()


# what a count may be said to be "in" besides the word itself
_IN_THE_WORD = {"it", "total", "all", "the word", "this word", "that word"}


def _spelled(word: str) -> str:
    return "-".join(word)


@register
class Spelling(Task):
    name = "spelling"
    description = "spell a word letter by letter, or count how often a letter occurs in it"

    def _draw(self, rng: random.Random) -> Example:
        word = rng.choice(WORDS)
        if rng.random() < 0.5:
            question = rng.choice(SPELL_PHRASINGS).format(word=word)
            return Example(self.name, [{"role": "user", "content": question}], _spelled(word),
                           [f"{word.capitalize()} is spelled {_spelled(word)}.", " ".join(word.upper())],
                           {"kind": "spell", "word": word})
        # letters present in the word are asked more often than absent ones (count 0)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice(COUNT_PHRASINGS).format(letter=letter, word=word)
        times = "time" if count == 1 else "times"
        chain = f"Spelling it out: {_spelled(word)}. The letter {letter} appears {count} {times}. The answer is {count}."
        direct = f"There is 1 {letter} in {word}." if count == 1 else f"There are {count} {letter}'s in {word}."
        return Example(self.name, [{"role": "user", "content": question}], str(count), [chain, direct],
                       {"kind": "count", "word": word, "letter": letter})

    def split_key(self, example: Example) -> str:
        meta = example.metadata
        return f"spell {meta['word']}" if meta["kind"] == "spell" else f"count {meta['letter']} {meta['word']}"

    def check(self, example: Example, response_text: str) -> bool:
        """Spelling: right when the reply spells the word letter by letter, every spelling it shows is the
        word's (a second, different spelling is a hedge) and the last is not denied ("not b-a-n-a-n-a").
        Counting: right when the reply commits to the count (`checks.states_number`, number words
        allowed), the count is of the asked letter ("3 r's", "the letter r") in the asked word ("in
        strawberry", "in it"; "There is 1 a in to p." counts another word), and any spelling it shows to
        work the count out is the word's."""
        word = example.metadata["word"]
        runs = spellings(response_text)
        if any(_letters(run.group()) != word for run in runs):
            return False
        if example.metadata["kind"] == "spell":
            return bool(runs) and not denied_or_hedged(response_text, *runs[-1].span())
        # the word itself may be a number word ("seventeen"): it is not the count; masked, not removed, so
        # positions in the masked text are positions in the reply
        masked = re.sub(rf"\b{word}\b", lambda m: "#" * len(m.group()), response_text, flags=re.IGNORECASE)
        if not states_number(masked, example.answer_text, words=True):
            return False
        letter = example.metadata["letter"]
        named = re.findall(r"\bletter\s+['\"]?([a-z])\b", response_text, re.IGNORECASE)
        rest_of_clause = CLAUSE_END.split(response_text[final_number_match(masked, words=True).end():])[0]
        counted = re.match(r"\s+['\"]?([a-z])['\"]?(?:'s)?\b", rest_of_clause, re.IGNORECASE)
        if counted:
            named.append(counted.group(1))
        place = re.search(r"\bin\s+(.*)", rest_of_clause, re.IGNORECASE)
        place_named = place.group(1).strip(" '\"").lower() if place else word
        return all(x.lower() == letter for x in named) and (
            fold(place_named) in _IN_THE_WORD or re.search(rf"\b{word}\b", place_named) is not None)

    def _bad_responses(self, example: Example, rng: random.Random):
        word = example.metadata["word"]
        if example.metadata["kind"] == "spell":
            i = rng.randrange(len(word))
            yield f"{word.capitalize()} is spelled {_spelled(word[:i] + word[i + 1:])}."  # a letter dropped
            yield f"{word.capitalize()} is spelled {_spelled(word[:i] + word[i] + word[i:])}."  # a letter doubled
            yield f"It is spelled {word}."  # not letter by letter
        else:
            count, letter = int(example.answer_text), example.metadata["letter"]
            wrong = count + 1 if count == 0 or rng.random() < 0.5 else count - 1
            yield f"There are {wrong} {letter}'s in {word}."
            yield f"The letter {letter} appears {list(NUMBER_WORDS)[count + 1]} times."
        yield rng.choice(EVASIVE)
