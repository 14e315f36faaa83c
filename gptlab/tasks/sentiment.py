"""Sentiment of short product and restaurant reviews built from word lists: positive or negative."""

from __future__ import annotations

import random

from . import Example, Task, register
from .checks import EVASIVE, mentions, states

SUBJECTS = ["The pasta", "The service", "This phone", "The hotel room", "This movie", "The coffee", "This laptop",
            "The concert", "The staff", "This book", "The delivery", "This headset", "The pizza", "This game"]
WORDS = {
    "positive": {"adjectives": ["wonderful", "excellent", "delightful", "fantastic", "superb", "lovely",
                                "great", "impressive", "charming", "reliable"],
                 "endings": ["I would definitely come back.", "Highly recommended!", "Worth every penny.",
                             "I loved it.", "Five stars from me.", "I will buy it again."]},
    "negative": {"adjectives": ["terrible", "awful", "disappointing", "dreadful", "horrible", "poor",
                                "mediocre", "unreliable", "boring", "rude"],
                 "endings": ["I would never come back.", "Avoid it.", "A complete waste of money.",
                             "I regret it.", "One star, and that is generous.", "Never again."]},
}
INTENSIFIERS = ["", "really ", "truly ", "absolutely ", "quite "]
PHRASINGS = ["Is the sentiment of this review positive or negative?\n\nReview: {review}",
             "Review: {review}\n\nIs this review positive or negative?",
             "Classify the sentiment of the following review as positive or negative.\n\n{review}"]
LABELS = ("positive", "negative")
# verdicts between the two labels: a reply naming one of them has not picked a label
UNDECIDED = ("neutral", "mixed")


def stated_label(text: str) -> str | None:
    """The one label a reply commits to, or None. The rule: it names exactly one label and no undecided
    verdict ("positive and negative", "mixed, leaning positive" name two), and never denies, hedges or asks
    it where it names it ("not positive", "isn't really positive", "maybe positive", "positive?"): the
    answer is one word, so a reply that carries the word without committing to it must not score."""
    named = [label for label in LABELS + UNDECIDED if mentions(text, label)]
    return named[0] if len(named) == 1 and named[0] in LABELS and states(text, named[0]) else None


@register
class Sentiment(Task):
    name = "sentiment"
    description = "label generated reviews as positive or negative"

    def _draw(self, rng: random.Random) -> Example:
        label = rng.choice(LABELS)
        words = WORDS[label]
        first, second = rng.sample(words["adjectives"], 2)
        review = (f"{rng.choice(SUBJECTS)} was {rng.choice(INTENSIFIERS)}{first} and "
                  f"{rng.choice(['the price', 'the experience', 'the quality', 'the whole thing'])} felt {second}. "
                  f"{rng.choice(words['endings'])}")
        return Example(self.name, [{"role": "user", "content": rng.choice(PHRASINGS).format(review=review)}], label,
                       [f"The review is {label}.", label.capitalize()], {"review": review})

    def split_key(self, example: Example) -> str:
        return example.metadata["review"]

    def check(self, example: Example, response_text: str) -> bool:
        return stated_label(response_text) == example.answer_text

    def _bad_responses(self, example: Example, rng: random.Random):
        other = LABELS[1 - LABELS.index(example.answer_text)]
        yield f"The review is {other}."
        yield f"The review is not {example.answer_text}."
        yield "The review is neutral."
        yield "It is both positive and negative."
        yield rng.choice(EVASIVE)
