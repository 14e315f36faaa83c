"""Extracting fields from a sentence as JSON. A reply is right when it contains a JSON object (anywhere,
e.g. in a ```json fence) and every top-level JSON object in it has every asked field with the right value
(text case- and accent-insensitively, numbers by value, "34" for 34; extra keys allowed): a second object
with other values, a key given two values or a list of candidates is a hedge, not an extraction."""

from __future__ import annotations

import json
import random

from . import Example, Task, register
from .checks import EVASIVE, fold, json_objects

FIRST = ["Maria", "Kenji", "Amara", "Lucas", "Sofia", "Arjun", "Elena", "Tomasz", "Aisha", "Liam", "Mei", "Pedro"]
LAST = ["Lopez", "Tanaka", "Okafor", "Martin", "Rossi", "Patel", "Novak", "Kowalski", "Haddad", "Murphy", "Chen"]
CITIES = ["Lisbon", "Osaka", "Lagos", "Lyon", "Milan", "Pune", "Prague", "Krakow", "Beirut", "Cork", "Taipei"]
JOBS = ["engineer", "teacher", "nurse", "chef", "architect", "pilot", "librarian", "photographer"]
PRODUCTS = ["desk lamp", "coffee mug", "notebook", "backpack", "water bottle", "keyboard", "umbrella", "scarf"]

SCHEMAS = {"person": ["name", "age", "city"], "order": ["product", "quantity", "unit_price"]}


def _person(rng: random.Random) -> tuple[str, dict]:
    fields = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 80), "city": rng.choice(CITIES)}
    job = rng.choice(JOBS)
    text = rng.choice([
        "{name} is a {age}-year-old {job} living in {city}.",
        "Born {age} years ago, {name} now works as a {job} in {city}.",
        "Our new {job}, {name} ({age}), moved here from {city} last spring.",
    ]).format(job=job, **fields)
    return text, fields


def _order(rng: random.Random) -> tuple[str, dict]:
    fields = {"product": rng.choice(PRODUCTS), "quantity": rng.randint(2, 12),
              "unit_price": rng.randint(200, 9999) / 100}
    text = rng.choice([
        "Please send {quantity} units of the {product} at {unit_price:.2f} dollars each.",
        "I would like to order {quantity} of your {product}, listed at ${unit_price:.2f} per item.",
        "Order: {product}, quantity {quantity}, price per unit {unit_price:.2f} USD.",
    ]).format(**fields)
    return text, fields


KINDS = {"person": _person, "order": _order}


def _same(expected, got) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and fold(got.strip()) == fold(expected)
    if isinstance(got, str):  # "34" for 34 is still the right value
        try:
            got = float(got.strip().lstrip("$"))
        except ValueError:
            return False
    return isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - expected) < 1e-6


@register
class Extraction(Task):
    name = "extraction"
    description = "pull named fields out of a sentence into a JSON object"

    def _draw(self, rng: random.Random) -> Example:
        kind = rng.choice(sorted(KINDS))
        text, fields = KINDS[kind](rng)
        keys = SCHEMAS[kind]
        question = (f"Extract {', '.join(keys[:-1])} and {keys[-1]} from the text below. Reply with a JSON object "
                    f"with exactly these keys.\n\nText: {text}")
        answer = json.dumps(fields)
        return Example(self.name, [{"role": "user", "content": question}], answer,
                       [answer, f"```json\n{json.dumps(fields, indent=2)}\n```"], {"kind": kind, "fields": fields})

    def split_key(self, example: Example) -> str:
        return example.question.rsplit("Text: ", 1)[1]

    def check(self, example: Example, response_text: str) -> bool:
        objects, expected = json_objects(response_text), example.metadata["fields"]
        return bool(objects) and all(k in got and _same(v, got[k]) for got in objects for k, v in expected.items())

    def _bad_responses(self, example: Example, rng: random.Random):
        fields = dict(example.metadata["fields"])
        key = rng.choice(sorted(fields))
        missing = {k: v for k, v in fields.items() if k != key}
        yield json.dumps(missing)
        wrong = dict(fields)
        wrong[key] = wrong[key] + 1 if not isinstance(wrong[key], str) else wrong[key][::-1] + "x"
        yield json.dumps(wrong)
        yield json.dumps(fields).replace('"', "'")  # Python-style quotes: not JSON
        yield json.dumps(fields)[:-1]  # cut off before the closing brace
        yield ", ".join(f"{k}: {v}" for k, v in fields.items())  # prose, no JSON
        yield rng.choice(EVASIVE)
