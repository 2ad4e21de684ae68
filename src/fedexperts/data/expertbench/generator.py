"""ExpertBench as datasets: canonical data, per-client restyling, and a federated split.

Rows follow the Dolly schema (instruction, context, response, category) plus ``answer``, the JSON
of the response's content, from which any client's style renders its own response. A federated
split partitions canonical rows by category (IID, Dirichlet or pathological, see
:mod:`fedexperts.data.partition`) and then renders every client's rows in that client's style:
clients share instruction wordings and skills but disagree on the expected text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import datasets

from fedexperts.data.expertbench.categories import CATEGORIES, TaskItem, generate_items
from fedexperts.data.expertbench.corpus import Corpus, pretraining_corpus
from fedexperts.data.expertbench.probes import KnowledgeProbe, knowledge_probes
from fedexperts.data.expertbench.styles import CANONICAL, Answer, Style, client_styles
from fedexperts.data.expertbench.world import World, make_world
from fedexperts.data.partition import ClientSplit, Partition, PartitionSpec, partition
from fedexperts.errors import DataError

ANSWER_COLUMN = "answer"


def items_dataset(items: Sequence[TaskItem], style: Style = CANONICAL) -> datasets.Dataset:
    """Tasks as a Dolly-schema dataset with responses in ``style``."""
    return datasets.Dataset.from_dict(
        {
            "instruction": [item.instruction for item in items],
            "context": [item.context for item in items],
            "response": [style.render(item.answer) for item in items],
            "category": [item.category for item in items],
            ANSWER_COLUMN: [item.answer.to_json() for item in items],
        }
    )


def restyle(dataset: datasets.Dataset, style: Style) -> datasets.Dataset:
    """The same rows with every response rendered in ``style`` from the ``answer`` column."""
    columns = dataset.to_dict()
    columns["response"] = [style.render(Answer.from_json(text)) for text in columns[ANSWER_COLUMN]]
    return datasets.Dataset.from_dict(columns, features=dataset.features)


@dataclass(frozen=True)
class FederatedBench:
    partition: Partition
    """Each client's train and test rows, already in that client's style."""
    styles: tuple[Style, ...]


@dataclass(frozen=True)
class ExpertBench:
    """One ExpertBench world and everything drawn from it; the world seed fixes what pretraining knows."""

    world: World

    @classmethod
    def from_seed(cls, world_seed: int = 0) -> ExpertBench:
        return cls(make_world(world_seed))

    def items(self, count: int, *, seed: int, categories: tuple[str, ...] = CATEGORIES) -> list[TaskItem]:
        return generate_items(self.world, count, seed=seed, categories=categories)

    def dataset(
        self, count: int, *, seed: int, style: Style = CANONICAL, categories: tuple[str, ...] = CATEGORIES
    ) -> datasets.Dataset:
        return items_dataset(self.items(count, seed=seed, categories=categories), style)

    def probes(self, *, seed: int = 0) -> list[KnowledgeProbe]:
        return knowledge_probes(self.world, seed=seed)

    def corpus(self, *, num_documents: int, task_fraction: float, seed: int) -> Corpus:
        return pretraining_corpus(self.world, num_documents=num_documents, task_fraction=task_fraction, seed=seed)

    def federated(self, count: int, spec: PartitionSpec, *, styles: Sequence[Style] | None = None) -> FederatedBench:
        """``count`` tasks split by ``spec``, each client's rows rendered in its style.

        ``styles`` defaults to :func:`client_styles`; the tasks are drawn with ``spec.seed``.
        """
        chosen = tuple(styles) if styles is not None else tuple(client_styles(spec.num_clients))
        if len(chosen) != spec.num_clients:
            raise DataError(f"{len(chosen)} styles given for {spec.num_clients} clients")
        split = partition(self.dataset(count, seed=spec.seed), spec)
        clients = tuple(
            ClientSplit(client.client, restyle(client.train, style), restyle(client.test, style))
            for client, style in zip(split.clients, chosen, strict=True)
        )
        return FederatedBench(replace(split, clients=clients), chosen)
