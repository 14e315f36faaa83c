"""Spelling a word letter by letter and counting a letter in it ("How many r in strawberry?"): easy for a
person, hard for a model that sees tokens instead of letters."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import EVASIVE, NUMBER_WORDS, final_number_is

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
    runs = [m.group(0) for m in _LETTER_RUN.finditer(text)]
    return re.sub(r"[^A-Za-z]", "", runs[-1]).lower() if runs else None


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
        if example.metadata["kind"] == "spell":
            return spelled_letters(response_text) == example.metadata["word"]
        # the word itself may be a number word ("seventeen"): it is not the count
        without_word = re.sub(rf"\b{example.metadata['word']}\b", " ", response_text, flags=re.IGNORECASE)
        return final_number_is(without_word, example.answer_text, words=True)

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
