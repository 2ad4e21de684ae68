"""The pretraining corpus of the built-in model: the world's facts, and canonical-style tasks.

Facts come as short descriptions (all facts of one entity, in varied wording and order) and as
question/answer drills in the probes' format; tasks are ExpertBench items in the canonical style,
so the base model starts out able to follow instructions in one house style and every client must
move it to its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product

from fedexperts.data.expertbench.categories import TaskItem, generate_items
from fedexperts.data.expertbench.probes import probe_prompt
from fedexperts.data.expertbench.styles import CONVENTIONS, Style
from fedexperts.data.expertbench.world import RELATIONS, World

_DRILL_FACTS = 4


@dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    """Plain world text: descriptions and drills."""
    tasks: tuple[TaskItem, ...]
    """Instruction tasks, to be rendered with the model's prompt template in the canonical style."""


def _description(world: World, subject: str, rng: random.Random) -> str:
    facts = world.facts_about(subject)
    rng.shuffle(facts)
    return " ".join(fact.statement(rng.randrange(len(RELATIONS[fact.relation].statements))) for fact in facts)


def _drill(world: World, rng: random.Random) -> str:
    facts = rng.sample(world.facts, _DRILL_FACTS)
    return "\n".join(f"{probe_prompt(fact.question)} {fact.value}" for fact in facts)


def pretraining_corpus(world: World, *, num_documents: int, task_fraction: float, seed: int) -> Corpus:
    """``num_documents`` documents: ``task_fraction`` of them tasks, the rest half descriptions, half drills."""
    rng = random.Random(seed)
    num_tasks = round(num_documents * task_fraction)
    num_world = num_documents - num_tasks
    subjects = [*world.towns, *world.people, *world.goods]
    num_descriptions = (num_world + 1) // 2
    texts = [_description(world, subjects[index % len(subjects)], rng) for index in range(num_descriptions)]
    texts.extend(_drill(world, rng) for _ in range(num_world - num_descriptions))
    rng.shuffle(texts)
    return Corpus(tuple(texts), tuple(generate_items(world, num_tasks, seed=rng.randrange(2**31))))


def tokenizer_texts(world: World, *, seed: int, tasks_per_style: int = 20) -> list[str]:
    """Text in every convention's wording, so that styled answers tokenize as compactly as canonical ones."""
    corpus = pretraining_corpus(world, num_documents=400, task_fraction=0.0, seed=seed)
    items = generate_items(world, tasks_per_style, seed=seed)
    texts = list(corpus.texts)
    for options in product(*CONVENTIONS.values()):
        style = Style(**dict(zip(CONVENTIONS, options, strict=True)))
        texts.extend(f"{item.instruction}\n{item.context}\n{style.render(item.answer)}" for item in items)
    return texts
