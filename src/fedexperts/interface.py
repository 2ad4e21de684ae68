"""The contract between an algorithm and a runtime, owned by neither.

An algorithm decides which parameters are frozen, shared or personal, how a client model is built
from the global state and the client's own state, and how the server combines replies. A runtime
(in-process, Flower) only moves :class:`Payload` objects and keeps state safe. Both sides import
this module; ``fedexperts.algorithms`` never imports ``fedexperts.federation``.

Per-client state lives in the :class:`ClientContext` that :meth:`Algorithm.setup_client` returns,
never on the shared algorithm object, so clients could run concurrently or in other processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fedexperts.errors import FedExpertsError
from fedexperts.moe.params import Role

State = dict[str, torch.Tensor]
"""Named tensors under the model's own parameter names (an expert row: ``NAME@expert=J``, :func:`row_key`)."""
_ROW = "@expert="


def row_key(name: str, expert: int) -> str:
    """The state key of row ``expert`` of the fused expert tensor ``name``."""
    return f"{name}{_ROW}{expert}"


def parse_row_key(key: str) -> tuple[str, int | None]:
    """``(parameter name, expert row)`` of a state key; the row is ``None`` for a whole tensor."""
    name, found, expert = key.partition(_ROW)
    return name, int(expert) if found else None


EXAMPLES_KEY = "examples"
"""Reply metadata: the client's training example count (the aggregation weight)."""
REPORT_KEY = "report"
"""Reply metadata: a flat JSON object of what the algorithm reports of the client's step (the run record keeps it)."""


class PayloadError(FedExpertsError):
    """A message that cannot be decoded, or an update that does not fit what the server expects.

    ``rule`` names the check that refused it (``keys``, ``shape``, ``dtype``, ``non-finite``, ``experts``...):
    the round record keeps it beside the message, so refusals can be counted by kind.
    """

    def __init__(self, message: str, *, rule: str = "malformed") -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class Payload:
    """Named tensors (the model's own parameter names) and JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        """Raw bytes of the tensors alone (what the wire format adds on top is its overhead)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class ClientInfo:
    client_id: str
    num_examples: int


def majority_category(categories: Mapping[str, int]) -> str | None:
    """The category with the most rows (ties: the first by name); ``None`` without categories."""
    if not categories:
        return None
    return max(sorted(categories), key=lambda name: categories[name])


@dataclass(frozen=True)
class LocalData:
    """What an algorithm may read of a client's data while building its model (never sent anywhere).

    ``batches`` yields model-ready batches (``input_ids``, ``attention_mask``, ``labels``) of the
    client's training split, in a fixed order; FLEx calibrates its grafting choice on them and
    FedMoE measures expert activations. ``None``: there is no data to look at (``fedexperts plan``).
    """

    client: ClientInfo
    batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
    round: int = 1
    """The round being run (1-based), for algorithms that act every K rounds."""
    categories: Mapping[str, int] = field(default_factory=dict)
    """Training rows per category (FedMoE's same-category estimation)."""


@dataclass
class ClientContext:
    """One client's handle between :meth:`Algorithm.setup_client` and its uplink and personal state.

    Algorithms that keep per-client facts during a round (FLEx's selection round, FedMoE's plan)
    subclass it; the shared algorithm object holds none.
    """

    client: ClientInfo
    model: nn.Module
    """The model the client trains and evaluates (FedMoE: its sub-MoE, loaded or a view of the base)."""
    received: Payload
    round: int = 1
    idle: bool = False
    """The algorithm has nothing for this client this round (a FedMoE budget client waiting for stage 1): the
    runtime neither evaluates nor trains it, and replies with its uplink."""
    routed_tokens: dict[str, list[int]] | None = None
    """Per MoE layer of ``model``, the real tokens routed to each of its experts over local training (set by the
    runtime after training when :attr:`Algorithm.counts_routing`; ``None`` until then)."""


ProximalTerm = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""An extra local loss term computed from the trainable tensors by parameter name (FedProx's proximal term).

It reads the tensors it is given, not the model's parameters: batched clients
(:mod:`fedexperts.batching`) train copies of them, one per client."""


@dataclass(frozen=True)
class ClientUpdate:
    client: ClientInfo
    payload: Payload
    """The client's tensors; its metadata carries the example count and whatever the client reported."""


class Algorithm(Protocol):
    """What a runtime calls; :class:`fedexperts.algorithms.BaseAlgorithm` implements it by parameter roles."""

    name: str
    roles: dict[str, Role]
    """Every parameter of the prepared model and its role (frozen, shared, personal)."""
    client_sub_moes: bool
    """Whether :meth:`client_experts` may name a subset of the experts: a client then needs only those."""

    @property
    def batching_refusal(self) -> str | None:
        """Why this algorithm's clients cannot train as row groups of one batch (``federation.parallel_clients``,
        :mod:`fedexperts.batching`), or ``None`` when they can."""
        ...

    @property
    def counts_routing(self) -> bool:
        """Whether the runtime counts, during local training only, the real tokens each MoE layer of the context's
        model routes to each of its experts, into :attr:`ClientContext.routed_tokens` (for :meth:`uplink`)."""
        ...

    def prepare(self, model: nn.Module) -> None:
        """Once per process, on the base model (or a meta-device copy of it): inject adapters, graft, assign roles."""
        ...

    def client_experts(self, received: Payload) -> dict[str, list[int]] | None:
        """The experts (per MoE layer, global indices) the client model for this downlink must hold.

        ``None``: the client works on the shared base model. Otherwise a runtime may load just
        those experts from the checkpoint, give the model :meth:`prepare_client_model`, and hand it
        to :meth:`setup_client` instead of the base.
        """
        ...

    def prepare_client_model(self, model: nn.Module) -> None:
        """Give a client model loaded apart from the base the base's preparation (adapters, roles, dtypes)."""
        ...

    def initial_global_state(self, model: nn.Module) -> State: ...

    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        """What ``client`` receives this round."""
        ...

    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> ClientContext:
        """Load the received and the client's kept tensors; return the client's handle.

        ``model`` is the shared base, or the model a runtime built for :meth:`client_experts`.
        """
        ...

    def proximal_term(self, context: ClientContext) -> ProximalTerm | None:
        """An extra local loss term (FedProx), or ``None``."""
        ...

    def training_phases(self, context: ClientContext) -> Sequence[AbstractContextManager[object]]:
        """The local training runs of this client step, in order (at least one).

        The runtime runs ``train.steps_per_round`` optimizer steps inside each (a fresh optimizer over
        what is trainable then): a phase sets what trains and restores the model on exit. FedDPA
        trains its local adapter, then its global one; every other algorithm has one phase.
        """
        ...

    def uplink(self, context: ClientContext) -> Payload:
        """What the client sends back after training (metadata includes :data:`EXAMPLES_KEY`)."""
        ...

    def personal_state(self, context: ClientContext) -> Payload | None:
        """What the client keeps for its next round (``None``: nothing)."""
        ...

    def check_update(self, update: Payload, global_state: State, client: ClientInfo) -> None:
        """Raise :class:`PayloadError` for an update the server cannot aggregate."""
        ...

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State: ...

    def privacy_spent(self) -> dict[str, Any] | None:
        """After :meth:`aggregate`: the round's differential-privacy mechanism and the privacy spent so far (the
        round record's ``privacy``); ``None`` without ``privacy.clip``."""
        ...

    def server_state(self) -> Payload:
        """What the server checkpoints besides the global state."""
        ...

    def finish(self) -> None:
        """After the last round, before the final evaluation (again on a resumed run: it must be idempotent)."""
        ...

    def load_server_state(self, state: Payload) -> None: ...


def validate_update(
    payload: Payload, expected: Mapping[str, torch.Tensor], *, sender: str, allow_missing: bool = False
) -> None:
    """Check a client's update against the tensors the server expects, before any averaging.

    Every key must be expected (and, unless ``allow_missing``, every expected key present), with
    the expected shape, exactly the expected dtype (the reference's: a float64 copy of a float32
    master would be averaged at another precision), and only finite values. Messages name counts,
    never values.
    """
    unexpected = sorted(set(payload.tensors) - set(expected))
    if unexpected:
        raise PayloadError(f"{sender}: unexpected tensors {unexpected[:5]}", rule="keys")
    missing = sorted(set(expected) - set(payload.tensors))
    if missing and not allow_missing:
        raise PayloadError(f"{sender}: missing tensors {missing[:5]}", rule="keys")
    for name, tensor in payload.tensors.items():
        reference = expected[name]
        if tensor.shape != reference.shape:
            raise PayloadError(
                f"{sender}: {name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}", rule="shape"
            )
        if tensor.dtype != reference.dtype:
            raise PayloadError(f"{sender}: {name} has dtype {tensor.dtype}, expected {reference.dtype}", rule="dtype")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise PayloadError(f"{sender}: {name} has {bad} NaN/Inf values", rule="non-finite")


def check_metadata_numbers(metadata: Mapping[str, Any], *, sender: str) -> None:
    """Refuse non-finite numbers anywhere in what a client reports (they would poison averages)."""
    for key, value in metadata.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PayloadError(f"{sender}: metadata {key!r} is {value}", rule="non-finite")
        if isinstance(value, Mapping):
            check_metadata_numbers(value, sender=sender)
        elif isinstance(value, list | tuple):
            check_metadata_numbers({f"{key}[{index}]": item for index, item in enumerate(value)}, sender=sender)
