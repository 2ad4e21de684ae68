"""What FedMoE's server knows of each client, what it tells a client to do next, and how that is saved.

Model-free: a client's record (its ``p`` and where it came from, structure, category, example and
profiling counts, recommendation state) is plain data; :func:`records_to_state` and
:func:`records_from_state` turn the records into tensors and JSON for the server checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from fedexperts.algorithms.fedmoe.layout import Structure
from fedexperts.algorithms.fedmoe.recommend import RecommendationState


class Phase(StrEnum):
    PROFILE = "profile"
    """LoRA on the full MoE with frozen pretrained experts (and, when asked, measuring ``p``)."""
    TRAIN = "train"
    """Stage 2: the client's sub-MoE."""
    WAIT = "wait"
    """A budget client sampled before stage 1 has finished: it sits the round out (nothing sent, nothing trained)."""


class Source(StrEnum):
    """Where a client's stage-1 ``p`` (and so its first sub-MoE) came from, weakest first."""

    PRIOR = "prior"
    FEDERATION = "federation"
    CATEGORY = "category"
    MEASURED = "measured"
    ASSIGNED = "assigned"
    """Set by :meth:`~fedexperts.algorithms.fedmoe.schedule.Schedule.assign`."""


RANK = {Source.PRIOR: 0, Source.FEDERATION: 1, Source.CATEGORY: 2, Source.MEASURED: 3, Source.ASSIGNED: 3}
"""How good an estimate of ``p`` each source gives (a provisional sub-MoE is re-chosen from a better one)."""
PROVISIONAL = (Source.PRIOR, Source.FEDERATION)


@dataclass
class ClientRecord:
    """What the server knows of one client."""

    recommendation: RecommendationState
    examples: int = 0
    category: str | None = None
    profiles: int = 0
    """Profiling steps done (warm-up and measurement)."""
    activation: list[torch.Tensor] | None = None
    """Stage-1 ``p`` per layer over the global experts (measured or estimated), normalised."""
    source: Source | None = None
    structure: Structure | None = None
    recommended: bool = False
    """The recommendation has changed the structure (stage-1 re-choices stop)."""
    origin: tuple[str, ...] = ()
    """The clients whose measured ``p`` this client's was estimated from (empty: measured itself, or the prior):
    a client and those it copies are not each other's neighbours in the recommendation."""


@dataclass(frozen=True)
class Plan:
    """What the client's next step is (a pure function of the server's state)."""

    phase: Phase
    structure: Structure | None = None
    source: Source | None = None
    activation: list[torch.Tensor] | None = None
    measure: bool = False
    origin: tuple[str, ...] = ()
    """The clients whose measured ``p`` gave ``activation`` (an estimate); empty otherwise."""


@dataclass(frozen=True)
class Reply:
    """What the schedule reads of one client's reply (the payload's metadata and measured ``p``)."""

    client_id: str
    examples: int
    category: str | None = None
    """The client's majority category, as it reported it (``None``: not reported)."""
    activation: list[torch.Tensor] | None = None
    """The measured ``p`` of every MoE layer (``None`` unless a profiling client sent all of them)."""
    score: float | None = None
    """Its validation score before training (``val_rouge_l``, never a test score), for the recommendation."""


def records_to_state(records: Mapping[str, ClientRecord]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every client's ``p`` as tensors ``activation/<client>/<layer>`` and the rest of its record as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    clients: dict[str, Any] = {}
    for client_id, record in sorted(records.items()):
        if record.activation is not None:
            for layer, vector in enumerate(record.activation):
                tensors[f"activation/{client_id}/{layer}"] = vector
        clients[client_id] = {
            "examples": record.examples,
            "category": record.category,
            "profiles": record.profiles,
            "source": None if record.source is None else record.source.value,
            "structure": record.structure,
            "recommended": record.recommended,
            "recommendation": record.recommendation.to_json(),
            "activation": record.activation is not None,
            "origin": list(record.origin),
        }
    return tensors, clients


def records_from_state(
    tensors: Mapping[str, torch.Tensor], clients: Mapping[str, Any], layers: int
) -> dict[str, ClientRecord]:
    """The records :func:`records_to_state` saved, for a model of ``layers`` MoE layers."""
    records: dict[str, ClientRecord] = {}
    for client_id, saved in clients.items():
        activation = None
        if saved.get("activation"):
            activation = [tensors[f"activation/{client_id}/{layer}"].to(torch.float64) for layer in range(layers)]
        structure = saved.get("structure")
        records[client_id] = ClientRecord(
            recommendation=RecommendationState.from_json(saved["recommendation"]),
            examples=int(saved.get("examples", 0)),
            category=saved.get("category"),
            profiles=int(saved.get("profiles", 0)),
            activation=activation,
            source=None if saved.get("source") is None else Source(saved["source"]),
            structure=None if structure is None else [[int(i) for i in layer] for layer in structure],
            recommended=bool(saved.get("recommended", False)),
            origin=tuple(str(each) for each in saved.get("origin", ())),
        )
    return records
