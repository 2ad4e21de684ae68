"""Knowledge probes: the MMLU of the ExpertBench world.

One multiple-choice question per fact, scored by the log-likelihood the model gives each choice
after ``Question: ...\\nAnswer:``. Pretraining teaches this format, so a drop in probe accuracy
after fine-tuning measures knowledge the fine-tuning destroyed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedexperts.data.expertbench.world import Fact, World

NUM_CHOICES = 4


@dataclass(frozen=True)
class KnowledgeProbe:
    fact: Fact
    prompt: str
    choices: tuple[str, ...]
    """Continuations of ``prompt``, each with its leading space (`` salt``)."""
    answer_index: int


def probe_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def knowledge_probes(world: World, *, seed: int = 0) -> list[KnowledgeProbe]:
    """One probe per fact of ``world``: the true value and three seeded distractors of the same kind."""
    rng = random.Random(seed)
    probes = []
    for fact in world.facts:
        others = [value for value in world.values(fact.relation) if value != fact.value]
        values = [fact.value, *rng.sample(others, NUM_CHOICES - 1)]
        rng.shuffle(values)
        probes.append(
            KnowledgeProbe(
                fact=fact,
                prompt=probe_prompt(fact.question),
                choices=tuple(f" {value}" for value in values),
                answer_index=values.index(fact.value),
            )
        )
    return probes
