"""World-knowledge questions from a hand-written fact table (capitals, currencies, authors, planets).

A model can only know these from pretraining text; SFT teaches the answer format (State of GPT: the
knowledge is in the base model, fine-tuning unlocks it). So the table also renders as encyclopedic prose,
`fact_pages`, a source of the default pretraining mixture covering every fact of both splits, and the split
is by fact: test facts are never seen in SFT or preference data in any phrasing, so a test question
measures whether the chat model answers from what pretraining taught it. The wrong answers of bad
responses (the rejected side of preference data) are train facts' answers only, so a test answer appears in
no fine-tuning data at all: drawn from every fact, a test answer such as Kyiv appeared there only as a
rejected answer ("The capital of France is Kyiv."), and the reward model learned to score the word itself
down (docs/LOG.md, session 7). A reply is right when it states the answer (any accepted alias, any case,
with or without accents; never denied, hedged or asked: "not Paris", "maybe Paris", "Paris?"), names no
other answer of the same kind ("Paris or Berlin") and no other subject of the same kind ("Paris is the
capital of Germany" asked about France: the right name inside a wrong sentence), and does not hedge.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from . import Example, Task, register, split_of
from .checks import EVASIVE, fold, hedges, mention_pattern, states

CAPITALS = """France: Paris; Germany: Berlin; Italy: Rome; Spain: Madrid; Portugal: Lisbon; Denmark: Copenhagen;
Norway: Oslo; Sweden: Stockholm; Finland: Helsinki; Iceland: Reykjavík; Ireland: Dublin;
the United Kingdom: London; Belgium: Brussels; Austria: Vienna; Switzerland: Bern | Berne; Poland: Warsaw;
the Czech Republic: Prague; Slovakia: Bratislava; Hungary: Budapest; Romania: Bucharest; Bulgaria: Sofia;
Greece: Athens; Croatia: Zagreb; Serbia: Belgrade; Slovenia: Ljubljana; Ukraine: Kyiv | Kiev; Lithuania: Vilnius;
Latvia: Riga; Estonia: Tallinn; Russia: Moscow; Turkey: Ankara; Egypt: Cairo; Morocco: Rabat; Algeria: Algiers;
Tunisia: Tunis; Kenya: Nairobi; Ethiopia: Addis Ababa; Nigeria: Abuja; Ghana: Accra; Senegal: Dakar;
Uganda: Kampala; Zimbabwe: Harare; Zambia: Lusaka; Angola: Luanda; Japan: Tokyo; China: Beijing | Peking;
South Korea: Seoul; India: New Delhi; Pakistan: Islamabad; Bangladesh: Dhaka; Nepal: Kathmandu;
Thailand: Bangkok; Vietnam: Hanoi; the Philippines: Manila; Indonesia: Jakarta; Iran: Tehran; Iraq: Baghdad;
Saudi Arabia: Riyadh; Afghanistan: Kabul; Mongolia: Ulaanbaatar | Ulan Bator; Australia: Canberra;
New Zealand: Wellington; Canada: Ottawa; the United States: Washington, D.C. | Washington; Mexico: Mexico City;
Cuba: Havana; Jamaica: Kingston; Brazil: Brasília; Argentina: Buenos Aires; Chile: Santiago; Peru: Lima;
Colombia: Bogotá; Venezuela: Caracas; Ecuador: Quito; Uruguay: Montevideo; Paraguay: Asunción"""
CURRENCIES = """Japan: yen; the United Kingdom: pound sterling | pound; the United States: US dollar | dollar;
India: rupee; China: renminbi | yuan; Russia: ruble | rouble; Mexico: peso; Switzerland: Swiss franc | franc;
Poland: złoty | zloty; Sweden: krona; Turkey: lira; Thailand: baht; South Africa: rand"""
AUTHORS = """Hamlet: William Shakespeare | Shakespeare; Pride and Prejudice: Jane Austen | Austen;
Nineteen Eighty-Four: George Orwell | Orwell; The Hobbit: J. R. R. Tolkien | Tolkien;
War and Peace: Leo Tolstoy | Tolstoy; Don Quixote: Miguel de Cervantes | Cervantes; The Odyssey: Homer;
Frankenstein: Mary Shelley | Shelley; Moby-Dick: Herman Melville | Melville; Les Misérables: Victor Hugo | Hugo;
Crime and Punishment: Fyodor Dostoevsky | Dostoevsky | Dostoyevsky; Oliver Twist: Charles Dickens | Dickens"""
PLANETS = """the largest in the Solar System: Jupiter; the closest to the Sun: Mercury; known as the Red Planet: Mars;
famous for its bright rings: Saturn; the third from the Sun: Earth; the hottest in the Solar System: Venus;
the farthest from the Sun: Neptune"""

# relation: (fact table, question phrasings, reference answer)
RELATIONS = {
    "capital": (CAPITALS, ["What is the capital of {s}?", "The capital of {s} is", "Which city is the capital of {s}?",
                           "Name the capital city of {s}."], "The capital of {s} is {a}."),
    "currency": (CURRENCIES, ["What is the currency of {s}?", "Which currency is used in {s}?"],
                 "The currency of {s} is the {a}."),
    "author": (AUTHORS, ["Who wrote {s}?", "Who is the author of {s}?"], "{s} was written by {a}."),
    "planet": (PLANETS, ["Which planet is {s}?", "Name the planet that is {s}."], "{a} is {s}."),
}


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    answers: tuple[str, ...]  # canonical answer first, then accepted aliases


def _parse(relation: str, table: str) -> list[Fact]:
    facts = []
    for entry in table.replace("\n", " ").split(";"):
        subject, answers = entry.split(":", 1)
        facts.append(Fact(relation, subject.strip(), tuple(a.strip() for a in answers.split("|"))))
    return facts


def _fact_key(relation: str, subject: str) -> str:
    return f"{relation}: {subject}"


FACTS = [fact for relation, (table, _, _) in RELATIONS.items() for fact in _parse(relation, table)]


# Declarative sentences for the pretraining prose ({S}: the subject with a capital first letter). Only true
# statements: "{a}, the largest city of {s}" would be false for Canberra or Ottawa.
PROSE = {
    "capital": ["The capital of {s} is {a}.", "{a} is the capital of {s}.", "{a} is the capital city of {s}.",
                "{S} has its capital in {a}.", "The government of {s} sits in {a}, the capital.",
                "{S}'s capital is {a}."],
    "currency": ["The currency of {s} is the {a}.", "In {s}, prices are paid in the {a}.",
                 "{S} uses the {a} as its currency.", "The {a} is the currency of {s}."],
    "author": ["{s} was written by {a}.", "{a} wrote {s}.", "The author of {s} is {a}.",
               "{a} is the author of {s}.", "{s} is a work by {a}."],
    "planet": ["The planet that is {s} is {a}.", "{a} is the planet that is {s}.",
               "Of all the planets, {a} is {s}.", "{a} is {s}."],
}


def _state(template: str, subject: str, answer: str) -> str:
    """A template filled in as a sentence: first letter upper case, one final period ("Washington, D.C.")."""
    text = template.format(s=subject, S=subject[:1].upper() + subject[1:], a=answer)
    return text[:1].upper() + text[1:-1] if text.endswith("..") else text[:1].upper() + text[1:]


def fact_pages(pages: int = 4000, seed: int = 0) -> str:
    """Encyclopedic prose stating every fact of the table: `pages` paragraphs (blank-line separated) of 3-6
    sentences about one relation (drawn in proportion to its facts), phrasings drawn at random, the
    canonical answer 9 times in 10 and an alias otherwise. The default pretraining mixture reads it as its
    `facts` source. 4,000 pages are 0.73 MB, 2.4% of the mixture: each fact is stated ~160 times an epoch,
    ~1,000 times in the GPU preset's ~6 epochs, while the CPU preset's 100 steps (5% of an epoch) spend
    only ~2% of their tokens on it. Measured on the 5M-parameter model (docs/LOG.md, session 8; the right
    answer ranked first among its relation's answers by log-likelihood, chance 4%): at 100 steps nothing
    even at a 14% share; at 500 steps chance at 5%, 17% of facts at 14% (~230 statements each). So the CPU
    preset does not learn the facts (to it they are familiar words); a larger model that sees each ~1,000
    times should."""
    rng = random.Random(seed)
    by_relation = {r: [f for f in FACTS if f.relation == r] for r in RELATIONS}
    paragraphs = []
    relations, sizes = list(by_relation), [len(facts) for facts in by_relation.values()]
    for _ in range(pages):
        relation = rng.choices(relations, sizes)[0]  # weighted by facts, so every fact is stated as often
        facts = rng.sample(by_relation[relation], min(len(by_relation[relation]), rng.randint(3, 6)))
        sentences = []
        for f in facts:
            answer = f.answers[0] if len(f.answers) == 1 or rng.random() < 0.9 else rng.choice(f.answers[1:])
            sentences.append(_state(rng.choice(PROSE[relation]), f.subject, answer))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


@functools.cache
def _train_facts(task_name: str, test_fraction: float, relation: str) -> tuple[Fact, ...]:
    return tuple(f for f in FACTS if f.relation == relation
                 and split_of(task_name, _fact_key(f.relation, f.subject), test_fraction) == "train")


@functools.cache
def _rivals(relation: str, subject: str) -> re.Pattern[str]:
    """Matches, in `fold`ed text, the answers (with aliases) of the other facts of `relation` that are not
    also an answer of `subject`'s, and those facts' subjects (without a leading "the": "the United Kingdom"
    is named as "United Kingdom" too). One compiled pattern per fact: every RL reward goes through it."""
    own = {a for f in FACTS if f.relation == relation and f.subject == subject for a in f.answers}
    others = [f for f in FACTS if f.relation == relation and f.subject != subject]
    phrases = [a for f in others for a in f.answers if a not in own] + [f.subject.removeprefix("the ") for f in others]
    return re.compile(mention_pattern(*phrases))


@register
class Knowledge(Task):
    name = "knowledge"
    description = f"{len(FACTS)} facts: capitals, currencies, authors of classics, planets"

    def _draw(self, rng: random.Random) -> Example:
        fact = rng.choice(FACTS)
        _, phrasings, reference = RELATIONS[fact.relation]
        question = rng.choice(phrasings).format(s=fact.subject)
        answer = fact.answers[0]
        return Example(self.name, [{"role": "user", "content": question}], answer,
                       [_state(reference, fact.subject, answer), answer],
                       {"relation": fact.relation, "subject": fact.subject, "answers": list(fact.answers)})

    def split_key(self, example: Example) -> str:
        return _fact_key(example.metadata["relation"], example.metadata["subject"])

    def train_facts(self, relation: str) -> tuple[Fact, ...]:
        """The facts of `relation` whose questions are in the train split (hashed once per relation: every
        bad response asks, and a GPU-preset preference set is 20,000 of them)."""
        return _train_facts(self.name, self.test_fraction, relation)

    def check(self, example: Example, response_text: str) -> bool:
        """See the module docstring: an accepted answer stated, no rival answer or subject named, no hedge."""
        meta = example.metadata
        return (any(states(response_text, a) for a in meta["answers"])
                and _rivals(meta["relation"], meta["subject"]).search(fold(response_text)) is None
                and not hedges(response_text))

    def _bad_responses(self, example: Example, rng: random.Random):
        meta = example.metadata
        reference = RELATIONS[meta["relation"]][2]
        wrong = rng.choice([f for f in self.train_facts(meta["relation"]) if f.subject != meta["subject"]])
        yield _state(reference, meta["subject"], wrong.answers[0])
        yield f"It is either {wrong.answers[0]} or {example.answer_text}."
        yield wrong.answers[0]
        yield rng.choice(EVASIVE)
