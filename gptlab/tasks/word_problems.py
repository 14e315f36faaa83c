"""Short word problems: one or two everyday steps (buy, give away, share, pack in boxes)."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import EVASIVE, final_number_match, states_number

NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "coins", "cards"]


def _buy_then_give(rng: random.Random, who: str, item: str):
    start, bought = rng.randint(2, 20), rng.randint(1, 15)
    given = rng.randint(1, min(10, start + bought))
    question = (f"{who} has {start} {item}. {who} buys {bought} more and then gives {given} to a friend. "
                f"How many {item} does {who} have now?")
    answer = start + bought - given
    chain = (f"{who} starts with {start} {item}. After buying {bought} more, {who} has {start} + {bought} = "
             f"{start + bought}. After giving away {given}, {who} has {start + bought} - {given} = {answer}. "
             f"The answer is {answer}.")
    return question, answer, chain


def _boxes(rng: random.Random, who: str, item: str):
    boxes, per_box, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(0, 9)
    question = (f"{who} has {boxes} boxes with {per_box} {item} in each box, and {extra} loose {item}. "
                f"How many {item} does {who} have in total?")
    answer = boxes * per_box + extra
    chain = (f"The boxes hold {boxes} x {per_box} = {boxes * per_box} {item}. Adding the {extra} loose ones "
             f"gives {boxes * per_box} + {extra} = {answer}. The answer is {answer}.")
    return question, answer, chain


def _share(rng: random.Random, who: str, item: str):
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    total = friends * each
    question = (f"{who} shares {total} {item} equally among {friends} friends. "
                f"How many {item} does each friend get?")
    chain = f"Each friend gets {total} / {friends} = {each} {item}. The answer is {each}."
    return question, each, chain


KINDS = {"buy_then_give": _buy_then_give, "boxes": _boxes, "share": _share}


@register
class WordProblems(Task):
    name = "word_problems"
    description = "one- and two-step everyday arithmetic stories"

    def _draw(self, rng: random.Random) -> Example:
        kind = rng.choice(sorted(KINDS))
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        question, answer, chain = KINDS[kind](rng, who, item)
        return Example(self.name, [{"role": "user", "content": question}], str(answer),
                       [chain, f"The answer is {answer}."], {"kind": kind, "item": item})

    def check(self, example: Example, response_text: str) -> bool:
        """Right when the reply commits to the answer (`checks.states_number`: last number, not denied,
        hedged or listed, every equation true) and that number is not a count of something else the story
        counts: "Nora shares 12 cookies equally among 3 friends." repeated back ends on "3 friends", the
        right number for a share of 3 but a claim about friends, so a number followed by a word that
        follows a number in the question other than the item ("friends", "boxes", "more", "loose") fails."""
        if not states_number(response_text, example.answer_text):
            return False
        item = example.metadata["item"]
        other_counts = {w.lower() for w in re.findall(r"\d+ ([A-Za-z]+)", example.question)} - {item, item[:-1]}
        unit = re.match(r"\s+([A-Za-z]+)", response_text[final_number_match(response_text).end():])
        return unit is None or unit.group(1).lower() not in other_counts

    def _bad_responses(self, example: Example, rng: random.Random):
        answer = int(example.answer_text)
        yield f"The answer is {answer + rng.choice([-3, -1, 1, 2, 5])}."
        # the chain of thought with its final number changed
        yield example.reference[0][0]["content"].rsplit("The answer is", 1)[0] + f"The answer is {answer + 1}."
        yield rng.choice(EVASIVE)
        yield "We need to add and subtract the numbers in the story."
