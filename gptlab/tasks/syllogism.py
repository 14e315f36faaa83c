"""Syllogisms over invented names and categories ("Marton is a wug. All wugs are fuzzy." -> "Marton is
fuzzy"), in the affirmative (All A are P) and negative (No A are P) forms, so only logic can answer."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import EVASIVE, hedges

SYLLABLES = ["mar", "ton", "ze", "lia", "quo", "rin", "ba", "dor", "fi", "nel", "ka", "vu", "sen", "tro", "li", "pax"]
CATEGORIES = [("man", "men"), ("wug", "wugs"), ("blicket", "blickets"), ("dax", "daxes"), ("glorp", "glorps"),
              ("fep", "feps"), ("zorb", "zorbs"), ("toma", "tomas"), ("kiki", "kikis"), ("bouba", "boubas")]
PROPERTIES = ["mortal", "fuzzy", "green", "nocturnal", "brave", "tall", "silent", "clever", "heavy", "ancient",
              "striped", "warm-blooded", "curious", "invisible", "loud"]
YES_NO = "{premises} Is {name} {prop}?"
PHRASINGS = ["{premises} What can we conclude about {name}?", YES_NO, "Premises: {premises} Conclusion about {name}?"]


def _negated(prop: str) -> str:
    # "is not P", "isn't P", "cannot be P", "is never P"
    return rf"(?:\bnot|\bcannot|n't|\bnever)\s+(?:be\s+)?{re.escape(prop)}\b"


@register
class Syllogism(Task):
    name = "syllogism"
    description = "one-step deductions about invented names, affirmative or negative"

    def _draw(self, rng: random.Random) -> Example:
        name = "".join(rng.sample(SYLLABLES, rng.randint(2, 3))).capitalize()
        (singular, plural), prop = rng.choice(CATEGORIES), rng.choice(PROPERTIES)
        article = "an" if singular[0] in "aeiou" else "a"
        negative = rng.random() < 0.4
        major = f"No {plural} are {prop}." if negative else f"All {plural} are {prop}."
        minor = f"{name} is {article} {singular}."
        premises = f"{minor} {major}" if rng.random() < 0.5 else f"{major} {minor}"
        conclusion = f"{name} is not {prop}." if negative else f"{name} is {prop}."
        because = f"Since {name} is {article} {singular} and {'no' if negative else 'all'} {plural} are {prop}, "
        phrasing = rng.choice(PHRASINGS)
        question = phrasing.format(premises=premises, name=name, prop=prop)
        references = [because + conclusion, conclusion]
        if phrasing == YES_NO:
            references.append(f"{'No' if negative else 'Yes'}, {conclusion}")
        return Example(self.name, [{"role": "user", "content": question}], conclusion, references,
                       {"name": name, "category": singular, "property": prop, "negative": negative,
                        "yes_no": phrasing == YES_NO})

    def split_key(self, example: Example) -> str:
        m = example.metadata
        return f"{m['name']} {m['category']} {m['property']} {m['negative']}"

    def check(self, example: Example, response_text: str) -> bool:
        prop, negative = example.metadata["property"], example.metadata["negative"]
        if hedges(response_text):
            return False
        denied = re.search(_negated(prop), response_text, re.IGNORECASE) is not None
        asserted = re.search(rf"\b(?:is|must be)\s+{re.escape(prop)}\b", response_text, re.IGNORECASE) is not None
        contradicted = asserted if negative else denied
        verdict = re.match(r"\s*(yes|no)\b", response_text, re.IGNORECASE)
        if example.metadata["yes_no"] and verdict:  # "Yes." / "No, she is not." answer the yes/no phrasing
            return (verdict.group(1).lower() == "no") == negative and not contradicted
        if not re.search(rf"\b{re.escape(prop)}\b", response_text, re.IGNORECASE):
            return False
        return not contradicted and (denied or not negative)

    def _bad_responses(self, example: Example, rng: random.Random):
        m = example.metadata
        opposite = f"{m['name']} is {m['property']}." if m["negative"] else f"{m['name']} is not {m['property']}."
        yield opposite
        yield f"We cannot conclude whether {m['name']} is {m['property']}."
        yield f"{m['name']} is a {m['category']}."
        yield rng.choice(EVASIVE)
