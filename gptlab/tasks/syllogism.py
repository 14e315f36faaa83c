"""Syllogisms over invented names and categories ("Marton is a wug. All wugs are fuzzy." -> "Marton is
fuzzy"), in the affirmative (All A are P) and negative (No A are P) forms, so only logic can answer."""

from __future__ import annotations

import random
import re

from . import Example, Task, register
from .checks import EVASIVE, denied, hedged, hedges

SYLLABLES = ["mar", "ton", "ze", "lia", "quo", "rin", "ba", "dor", "fi", "nel", "ka", "vu", "sen", "tro", "li", "pax"]
CATEGORIES = [("man", "men"), ("wug", "wugs"), ("blicket", "blickets"), ("dax", "daxes"), ("glorp", "glorps"),
              ("fep", "feps"), ("zorb", "zorbs"), ("toma", "tomas"), ("kiki", "kikis"), ("bouba", "boubas")]
PROPERTIES = ["mortal", "fuzzy", "green", "nocturnal", "brave", "tall", "silent", "clever", "heavy", "ancient",
              "striped", "warm-blooded", "curious", "invisible", "loud"]
YES_NO = "{premises} Is {name} {prop}?"
PHRASINGS = ["{premises} What can we conclude about {name}?", YES_NO, "Premises: {premises} Conclusion about {name}?"]


# a category said to have (or lack) a property, as the premises say it ("all wugs are mortal", "no dax is
# mortal", "wugs are not mortal"): a repeated premise, whatever its category, concludes nothing about the name
_CATEGORY = "|".join(rf"{plural}\s+are|{singular}\s+is" for singular, plural in CATEGORIES)
_PREMISE = rf"\b(?:(?:all|no|every|each|any|some)\s+)?(?:{_CATEGORY})\s+(?:not\s+)?"


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
        """Right when the reply concludes the property of the name, with the right polarity, and commits to
        it. The rule: no hedge ("we cannot conclude"); premises repeated back are set aside ("All wugs are
        mortal." alone concludes nothing about Marton); every remaining mention of the property is affirmed
        (affirmative form) or denied (negative form: "is not", "isn't", "cannot be", "is never") and none is
        hedged ("may be mortal", "mortal or not", "mortal?"); the yes/no phrasing may instead open with the
        right verdict ("No." / "Yes, ...") but then must not also give the other ("Yes and no.")."""
        prop, negative = example.metadata["property"], example.metadata["negative"]
        if hedges(response_text):
            return False
        text = re.sub(_PREMISE + re.escape(prop) + r"\b", " ", response_text, flags=re.IGNORECASE)
        mentions = [m.span() for m in re.finditer(rf"\b{re.escape(prop)}\b", text, re.IGNORECASE)]
        if any(hedged(text, *span) or denied(text, *span) != negative for span in mentions):
            return False
        verdict = re.match(r"\s*(yes|no)\b", text, re.IGNORECASE)
        if example.metadata["yes_no"] and verdict:
            right, wrong = ("no", "yes") if negative else ("yes", "no")
            return verdict.group(1).lower() == right and not re.search(
                rf"\b{wrong}\b(?=\s*(?:[.,;:!?]|$|and\b|or\b))", text, re.IGNORECASE)
        return bool(mentions)

    def _bad_responses(self, example: Example, rng: random.Random):
        m = example.metadata
        opposite = f"{m['name']} is {m['property']}." if m["negative"] else f"{m['name']} is not {m['property']}."
        yield opposite
        yield f"We cannot conclude whether {m['name']} is {m['property']}."
        yield f"{m['name']} is a {m['category']}."
        yield rng.choice(EVASIVE)
