"""The ExpertBench world: a few dozen towns, people and goods, and the facts that tie them.

Everything is drawn from a seed, so a model pretrained on one world can be probed on exactly the
facts it saw. Names are made of syllables no real word shares, so the only way to answer a
question about ``Varmere`` is to have learnt it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

REGIONS = ("north", "south", "east", "west", "islands", "hills")
COLOURS = ("red", "blue", "green", "gold", "white", "black", "grey", "purple")
TRADES = ("smith", "baker", "weaver", "sailor", "miner", "scribe", "healer", "potter", "farmer", "guard")
GOOD_CLASSES = ("metal", "food", "cloth", "timber")
GOODS: dict[str, str] = {
    "iron": "metal",
    "copper": "metal",
    "silver": "metal",
    "tin": "metal",
    "salt": "food",
    "honey": "food",
    "grain": "food",
    "cheese": "food",
    "wool": "cloth",
    "silk": "cloth",
    "linen": "cloth",
    "felt": "cloth",
    "oak": "timber",
    "pine": "timber",
    "cedar": "timber",
    "birch": "timber",
}

_TOWN_HEADS = (
    "Bel", "Cor", "Dun", "Esk", "Fal", "Gar", "Hol", "Ivel", "Kel", "Lor", "Mar", "Nor",
    "Orm", "Pel", "Quen", "Ros", "Sal", "Tor", "Ul", "Var", "Wen", "Yar", "Zan", "Ash",
)  # fmt: skip
_TOWN_TAILS = ("ford", "mere", "holm", "wick", "stead", "dale", "gate", "moor", "by", "ton", "haven", "brook")
_PERSON_HEADS = ("Ma", "Li", "Ro", "Te", "Sa", "Ka", "Ni", "Be", "Da", "Fi", "Jo", "Lu", "Ve", "Ha", "Mi", "Co")
_PERSON_TAILS = ("ren", "lia", "mon", "dra", "vin", "sel", "ric", "na", "lo", "tha", "bin", "dor")
_RIVER_HEADS = ("Ess", "Aul", "Brin", "Tamm", "Orr", "Veld", "Lis", "Kor", "Sev", "Mun")
_RIVER_TAILS = ("el", "an", "ow", "ith", "ur")


@dataclass(frozen=True)
class Relation:
    """One kind of fact: whose it is, the values it takes, and how the world talks about it."""

    name: str
    subject: str
    """``town``, ``person`` or ``good``."""
    question: str
    """How the probes and open questions ask for the value (``{s}`` is the subject)."""
    statements: tuple[str, ...]
    """How pretraining text states the fact (``{s}`` subject, ``{v}`` value)."""


RELATIONS: dict[str, Relation] = {
    relation.name: relation
    for relation in (
        Relation(
            "region",
            "town",
            "In which region is {s}?",
            ("{s} is a town in the {v}.", "The town of {s} lies in the {v}.", "In the {v} lies the town of {s}."),
        ),
        Relation(
            "export",
            "town",
            "What does {s} export?",
            ("{s} exports {v}.", "The main export of {s} is {v}.", "Traders buy {v} in {s}."),
        ),
        Relation(
            "flag",
            "town",
            "What colour is the flag of {s}?",
            ("The flag of {s} is {v}.", "{s} flies a {v} flag.", "A {v} flag hangs over {s}."),
        ),
        Relation(
            "river",
            "town",
            "Which river flows through {s}?",
            ("{s} stands on the river {v}.", "The river {v} flows through {s}.", "{s} was built on the {v}."),
        ),
        Relation(
            "home",
            "person",
            "Where does {s} live?",
            ("{s} lives in {v}.", "{s} is from {v}.", "The home of {s} is {v}."),
        ),
        Relation(
            "trade",
            "person",
            "What is the trade of {s}?",
            ("{s} works as a {v}.", "{s} is a {v}.", "By trade, {s} is a {v}."),
        ),
        Relation(
            "colour",
            "person",
            "What is the favourite colour of {s}?",
            ("The favourite colour of {s} is {v}.", "{s} likes the colour {v}.", "{s} always wears {v}."),
        ),
        Relation(
            "class",
            "good",
            "What kind of good is {s}?",
            ("{s} is a {v}.", "Merchants count {s} as a {v}.", "{s} belongs with the {v} goods."),
        ),
    )
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    value: str

    def statement(self, template: int) -> str:
        text = RELATIONS[self.relation].statements[template].format(s=self.subject, v=self.value)
        return text[0].upper() + text[1:]

    @property
    def question(self) -> str:
        return RELATIONS[self.relation].question.format(s=self.subject)


@dataclass(frozen=True)
class World:
    """Entities and their facts; ``values(relation)`` lists what a relation may take (for distractors)."""

    seed: int
    towns: tuple[str, ...]
    people: tuple[str, ...]
    rivers: tuple[str, ...]
    facts: tuple[Fact, ...]

    def values(self, relation: str) -> tuple[str, ...]:
        domains = {
            "region": REGIONS,
            "export": tuple(GOODS),
            "flag": COLOURS,
            "river": self.rivers,
            "home": self.towns,
            "trade": TRADES,
            "colour": COLOURS,
            "class": GOOD_CLASSES,
        }
        return domains[relation]

    def value(self, subject: str, relation: str) -> str:
        return self._index[(subject, relation)]

    def facts_about(self, subject: str) -> list[Fact]:
        return [fact for fact in self.facts if fact.subject == subject]

    @cached_property
    def _index(self) -> dict[tuple[str, str], str]:
        return {(fact.subject, fact.relation): fact.value for fact in self.facts}

    @property
    def goods(self) -> tuple[str, ...]:
        return tuple(GOODS)


def _names(rng: random.Random, heads: tuple[str, ...], tails: tuple[str, ...], count: int) -> list[str]:
    pool = [head + tail for head in heads for tail in tails]
    return rng.sample(pool, count)


def make_world(seed: int = 0, *, num_towns: int = 24, num_people: int = 32, num_rivers: int = 8) -> World:
    """Draw a world from ``seed``: towns (region, export, flag, river), people (home, trade, colour), goods."""
    rng = random.Random(seed)
    towns = _names(rng, _TOWN_HEADS, _TOWN_TAILS, num_towns)
    people = _names(rng, _PERSON_HEADS, _PERSON_TAILS, num_people)
    rivers = _names(rng, _RIVER_HEADS, _RIVER_TAILS, num_rivers)
    facts: list[Fact] = []
    for town in towns:
        facts.append(Fact(town, "region", rng.choice(REGIONS)))
        facts.append(Fact(town, "export", rng.choice(tuple(GOODS))))
        facts.append(Fact(town, "flag", rng.choice(COLOURS)))
        facts.append(Fact(town, "river", rng.choice(rivers)))
    for person in people:
        facts.append(Fact(person, "home", rng.choice(towns)))
        facts.append(Fact(person, "trade", rng.choice(TRADES)))
        facts.append(Fact(person, "colour", rng.choice(COLOURS)))
    facts.extend(Fact(good, "class", good_class) for good, good_class in GOODS.items())
    return World(seed, tuple(towns), tuple(people), tuple(rivers), tuple(facts))
