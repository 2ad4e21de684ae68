"""The five ExpertBench task categories, modelled on Dolly's, and their seeded generators.

Each generator draws one task from the world: an instruction worded from a small fixed set
(the same wording reaches every client), an optional context, and the :class:`Answer` content.
Contexts describe fresh events (market days, journeys) with random counts, so answering them is a
reading skill, not recall; where a context states a lasting fact about a person it states the
world's own fact, so fine-tuning data never contradicts what pretraining taught. Contexts open
with a word that is never an answer ("Travel log.", "On market day"), so every name in them follows
a space, as it does in an answer (byte-level BPE tells ``Maren`` from `` Maren``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from fedexperts.data.expertbench.styles import Answer
from fedexperts.data.expertbench.world import GOOD_CLASSES, World
from fedexperts.errors import DataError

CATEGORIES = ("closed_qa", "information_extraction", "classification", "summarization", "open_qa")
"""Dolly's names: answer from a context, pull items out of a text, label items, condense, recall."""

_WEATHER = ("The day was cold.", "It rained all morning.", "The sun was out.", "A strong wind blew.")


@dataclass(frozen=True)
class TaskItem:
    category: str
    instruction: str
    context: str
    answer: Answer


def _closed_qa(world: World, rng: random.Random) -> TaskItem:
    town = rng.choice(world.towns)
    seller, other = rng.sample(world.people, 2)
    good, other_good = rng.sample(world.goods, 2)
    count, other_count = rng.randint(2, 99), rng.randint(2, 99)
    context = (
        f"On market day in {town}, {seller} sold {count} crates of {good} "
        f"and {other} sold {other_count} crates of {other_good}."
    )
    questions = (
        (f"How many crates of {good} did {seller} sell?", Answer("count", (str(count), "crates"))),
        (f"How many crates of {other_good} did {other} sell?", Answer("count", (str(other_count), "crates"))),
        (f"Who sold {other_good}?", Answer("short", (other,))),
        (f"What did {seller} sell?", Answer("short", (good,))),
        ("Where was the market held?", Answer("short", (town,))),
    )
    instruction, answer = rng.choice(questions)
    return TaskItem("closed_qa", instruction, context, answer)


def _information_extraction(world: World, rng: random.Random) -> TaskItem:
    traveller, host = rng.sample(world.people, 2)
    start, end = rng.sample(world.towns, 2)
    goods = rng.sample(world.goods, rng.randint(2, 3))
    cargo = ", ".join(goods[:-1]) + f" and {goods[-1]}"
    context = f"Travel log. {traveller} travelled from {start} to {end} with {cargo}. In {end}, {traveller} met {host}."
    instruction, items = rng.choice(
        (
            ("List the goods mentioned in the passage.", goods),
            ("List the towns named in the passage.", [start, end]),
            ("List the people named in the passage.", [traveller, host]),
        )
    )
    return TaskItem("information_extraction", instruction, context, Answer("list", tuple(items)))


def _classification(world: World, rng: random.Random) -> TaskItem:
    kind = rng.randrange(3)
    if kind == 0:
        good = rng.choice(world.goods)
        options = ", ".join(f"a {name}" for name in GOOD_CLASSES[:-1]) + f" or a {GOOD_CLASSES[-1]}"
        return TaskItem("classification", f"Is {good} {options}?", "", Answer("short", (world.value(good, "class"),)))
    if kind == 1:
        goods = rng.sample(world.goods, rng.randint(2, 3))
        instruction = "Classify each good as metal, food, cloth or timber: " + ", ".join(goods) + "."
        labels = [part for good in goods for part in (good, world.value(good, "class"))]
    else:
        towns = rng.sample(world.towns, 2)
        instruction = "Classify each town by its region: " + ", ".join(towns) + "."
        labels = [part for town in towns for part in (town, world.value(town, "region"))]
    return TaskItem("classification", instruction, "", Answer("labels", tuple(labels)))


def _summarization(world: World, rng: random.Random) -> TaskItem:
    seller, buyer = rng.sample(world.people, 2)
    home, trade = world.value(seller, "home"), world.value(seller, "trade")
    good, count = rng.choice(world.goods), rng.randint(2, 99)
    sentences = [
        f"{seller} is a {trade} from {home}.",
        f"On market day {seller} sold {count} crates of {good} to {buyer}.",
        rng.choice(_WEATHER),
    ]
    if rng.random() < 0.5:
        sentences[1:] = sentences[:0:-1]
    instruction = rng.choice(("Summarize the passage in one sentence.", "Write a short summary of the text."))
    answer = Answer("summary", (seller, home, str(count), good, buyer))
    return TaskItem("summarization", instruction, "Market report. " + " ".join(sentences), answer)


def _open_qa(world: World, rng: random.Random) -> TaskItem:
    fact = rng.choice(world.facts)
    return TaskItem("open_qa", fact.question, "", Answer("short", (fact.value,)))


GENERATORS: dict[str, Callable[[World, random.Random], TaskItem]] = {
    "closed_qa": _closed_qa,
    "information_extraction": _information_extraction,
    "classification": _classification,
    "summarization": _summarization,
    "open_qa": _open_qa,
}


def generate_items(world: World, count: int, *, seed: int, categories: tuple[str, ...] = CATEGORIES) -> list[TaskItem]:
    """``count`` tasks, as even over ``categories`` as ``count`` allows, in a seeded order."""
    unknown = [name for name in categories if name not in GENERATORS]
    if unknown:
        raise DataError(f"unknown ExpertBench categories {unknown}; known: {', '.join(CATEGORIES)}")
    rng = random.Random(seed)
    items = [GENERATORS[categories[index % len(categories)]](world, rng) for index in range(count)]
    rng.shuffle(items)
    return items
