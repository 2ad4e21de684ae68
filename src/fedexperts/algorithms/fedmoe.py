"""FedMoE (Mei et al., arXiv 2408.11304) and its randomMoE baseline on the :class:`Algorithm` interface.

The model-free rules (sub-MoE search, activation estimate, modular average, recommendation) are in
:mod:`fedexperts.algorithms.fedmoe_core`; this module moves tensors between them and the models.

**What is trained and sent.** The global state is the dense shared part (``scope``, attention LoRA
by default) plus every *expert-row* tensor: each MoE layer's fused expert tensors and its router's
per-expert rows (weight, and bias where the router has one). A client in stage 2 holds a sub-MoE
(sorted global expert indices per layer); its downlink is the dense tensors plus only the rows of
the experts it holds, under the full tensors' names, with the held indices in the metadata; its
uplink is the same slice after training. The server averages the dense tensors over every reply
and each expert row over the replies that hold it (:func:`aggregate_fedmoe`), then applies the
server optimizer; a row no sampled client held keeps its value under every server rule (its
optimizer moments still decay).

**Stage 1 and a client's first round** (every round stays downlink -> client step -> uplink ->
aggregate). A client's memory budget is its entry of ``budgets``, else the full model's bytes for
the ``full_budget_clients``, else ``budget_fraction`` of the full model's bytes (weights, LoRA and
buffers, as :func:`expert_and_dense_bytes` counts them).

* A client whose budget holds the full model *profiles*: its steps are LoRA-on-the-full-MoE steps
  (the dense part only; the pretrained experts stay frozen, nothing of them is sent). The first
  ``warmup_rounds`` of them only train; in the next one the client measures the activation ``p``
  of every expert (:class:`RoutingRecorder` over its first ``measure_examples`` training rows,
  before it trains) and sends ``p`` as tensors with its reply. The server then chooses its sub-MoE
  with :func:`choose_sub_moe`; since the whole model fits, that is the whole model.
* A client whose budget is smaller cannot run the full model, so its ``p`` is estimated
  (:func:`estimate_activation`) from the measured ``p`` of the clients of its category (its
  majority category, which clients report with every reply), weighted by their data. The server
  learns a client's category only from its first reply, so that first round uses a provisional
  estimate: the mean of every measured client, or, while no client has measured, the uniform
  prior (every expert alike: the search then keeps the lowest-indexed experts). After each round a
  provisional sub-MoE is re-chosen when a better estimate exists (prior -> every measured client
  -> the client's category), until the recommendation has changed it.

With every budget below the full model (e.g. a uniform ``budget_fraction`` < 1) no client can
measure and every sub-MoE comes from the uniform prior; a warning says so.

**Stage 2 recommendation.** The score is the client's ``eval_rouge_l``, measured before it
trains; rounds without it are skipped. After ``patience`` scores without improvement the server
proposes :func:`recommend`'s structure (neighbours by cosine similarity of the clients' stage-1
``p``; clients with only the prior take no part), shrunk if needed to the client's budget by
dropping the added experts its own ``p`` ranks lowest, and sends it from the next round; the next
score keeps it or reverts to the old one for good (:class:`RecommendationState`).

**The client model.** One base model is shared by every client of a process. A stage-2 client
trains a pruned *view* of it: ``copy.deepcopy`` with a memo that maps every parameter, buffer and
tensor attribute to itself copies only the module objects and config, then :func:`select_experts`
replaces the view's expert-row tensors by sliced copies (it assigns new tensors to the view's own
modules and never writes into the old ones), which are then filled with the received rows. So
attention, embeddings, norms and the LoRA tensors are the base model's own objects (the received
dense tensors are loaded into them, as FedAvg loads them into the base model), while the base
model's experts, routers and config are never touched: profiling always sees the pretrained
experts.

**randomMoE** (:class:`RandomMoE`): the same stages, but each sub-MoE is a seeded random choice of
exactly the sizes FedMoE's search picks, and there is no recommendation.

All server knowledge (each client's ``p`` and its source, structure, category, example count,
profiling count and recommendation state) is in :meth:`FedMoE.server_state`, as tensors and JSON.
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.algorithms.aggregation import ServerOptimizer, State
from fedexperts.algorithms.base import (
    EXAMPLES_KEY,
    Algorithm,
    ClientInfo,
    ClientUpdate,
    LocalData,
    LoraSettings,
    SharedScope,
    majority_category,
    scope_rules,
)
from fedexperts.algorithms.fedmoe_core import (
    Action,
    ExpertUpdate,
    RecommendationState,
    aggregate_fedmoe,
    choose_sub_moe,
    estimate_activation,
    expert_and_dense_bytes,
    random_sub_moe,
    recommend,
)
from fedexperts.errors import FedExpertsError
from fedexperts.federation.payload import Payload, PayloadError, validate_update
from fedexperts.moe.families import ExpertLayout, moe_layers, unwrap_model
from fedexperts.moe.params import ParamKind, Role, RoleRules, parameter_kinds
from fedexperts.moe.routing import RoutingRecorder
from fedexperts.moe.surgery import expert_map, select_experts

logger = logging.getLogger(__name__)

PHASE_KEY = "fedmoe_phase"
CLIENT_KEY = "fedmoe_client"
HELD_KEY = "fedmoe_held"
"""Metadata: ``{MoE layer name: sorted global indices}`` of the experts whose rows travel."""
MEASURE_KEY = "fedmoe_measure"
CATEGORY_KEY = "fedmoe_category"
SCORE_KEY = "eval_rouge_l"
ACTIVATION_PREFIX = "activation/"
"""Uplink tensors ``activation/<MoE layer name>``: a profiling client's measured ``p``."""

Structure = list[list[int]]
"""Sorted global expert indices per MoE layer, in :func:`moe_layers` order."""


class Phase(StrEnum):
    PROFILE = "profile"
    """LoRA on the full MoE with frozen pretrained experts (and, when asked, measuring ``p``)."""
    TRAIN = "train"
    """Stage 2: the client's sub-MoE."""


class Source(StrEnum):
    """Where a client's stage-1 ``p`` (and so its first sub-MoE) came from, weakest first."""

    PRIOR = "prior"
    FEDERATION = "federation"
    CATEGORY = "category"
    MEASURED = "measured"
    ASSIGNED = "assigned"
    """Set by :meth:`FedMoE.assign`."""


_RANK = {Source.PRIOR: 0, Source.FEDERATION: 1, Source.CATEGORY: 2, Source.MEASURED: 3, Source.ASSIGNED: 3}
_PROVISIONAL = (Source.PRIOR, Source.FEDERATION)


# -- model helpers ------------------------------------------------------------------------------------


def sub_moe_view(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> PreTrainedModel:
    """A pruned copy of ``model`` whose every tensor except the kept experts' rows is ``model``'s own.

    ``keep`` maps MoE layer names to the *local* expert indices of ``model`` to keep. The deep copy
    gets a memo mapping each parameter, buffer and tensor attribute to itself, so it copies module
    objects and the config only; :func:`select_experts` then gives the view's own modules new,
    sliced expert and router tensors. Nothing of ``model`` is modified.
    """
    base = unwrap_model(model)
    memo: dict[int, Any] = {}
    for module in base.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                memo[id(tensor)] = tensor
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
    view = copy.deepcopy(base, memo)
    select_experts(view, keep)
    return view


@torch.no_grad()
def measure_activation(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], max_examples: int
) -> list[torch.Tensor]:
    """Per MoE layer, the fraction of real tokens routed to each expert, over at most ``max_examples`` rows."""
    base = unwrap_model(model)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    seen = 0
    try:
        with RoutingRecorder(base) as recorder:
            for batch in batches:
                if seen >= max_examples:
                    break
                take = min(int(batch["input_ids"].shape[0]), max_examples - seen)
                ids = batch["input_ids"][:take].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask[:take].to(device)
                with recorder.mask(mask):
                    base(input_ids=ids, attention_mask=mask)
                seen += take
    finally:
        base.train(was_training)
    if seen == 0:
        raise FedExpertsError("cannot measure expert activation: the client has no training rows")
    activation = recorder.activation()
    return [activation[layer.name].to(torch.float64) for layer in moe_layers(base)]


def _normalised(vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for vector in vectors:
        values = vector.detach().to(device="cpu", dtype=torch.float64)
        out.append(values / values.sum())
    return out


# -- server-side records --------------------------------------------------------------------------------


@dataclass
class _Client:
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


@dataclass(frozen=True)
class _Plan:
    """What the client's next step is (a pure function of the server's state)."""

    phase: Phase
    structure: Structure | None = None
    source: Source | None = None
    activation: list[torch.Tensor] | None = None
    measure: bool = False


@dataclass
class _Pending:
    """Client side, between :meth:`FedMoE.setup_client` and :meth:`FedMoE.uplink`."""

    phase: Phase
    structure: Structure | None = None
    activation: list[torch.Tensor] | None = None
    category: str | None = None


@dataclass
class _Layout:
    """The model's MoE layers and expert-row tensors, learnt in :meth:`FedMoE.prepare`."""

    layer_names: list[str] = field(default_factory=list)
    num_experts: list[int] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    """Expert-row tensor name -> index of its MoE layer."""
    dense: list[str] = field(default_factory=list)
    dense_bytes: int = 0
    expert_bytes: list[int] = field(default_factory=list)


def fedmoe_rules(scope: SharedScope) -> RoleRules:
    """The scope's parameters plus every router and routed expert are shared (held rows travel)."""
    shared = scope_rules(scope)
    base = dict(shared.base)
    base[ParamKind.ROUTER] = Role.SHARED
    base[ParamKind.ROUTED_EXPERT] = Role.SHARED
    return RoleRules(base=base, adapters=dict(shared.adapters))


class FedMoE(Algorithm):
    """FedMoE: per-client sub-MoEs under memory budgets, modular aggregation, expert recommendation."""

    name = "fedmoe"
    recommends = True

    def __init__(
        self,
        scope: SharedScope = SharedScope.ATTENTION_LORA,
        *,
        lora: LoraSettings | None = None,
        server: ServerOptimizer | None = None,
        budget_fraction: float = 0.6,
        budgets: Mapping[str, int] | None = None,
        full_budget_clients: Collection[str] = (),
        warmup_rounds: int = 0,
        patience: int = 2,
        top_k_neighbours: int = 2,
        measure_examples: int = 64,
    ) -> None:
        if scope is SharedScope.EVERYTHING:
            raise FedExpertsError(
                f"{self.name}: scope 'everything' would send every expert; the held experts already travel, "
                "so choose attention-lora, attention or non-expert"
            )
        if scope is SharedScope.ATTENTION_LORA and lora is None:
            lora = LoraSettings()
        if scope is not SharedScope.ATTENTION_LORA and lora is not None:
            raise FedExpertsError(f"LoRA settings given but the shared scope is {scope.value!r}, not attention-lora")
        if not 0 < budget_fraction <= 1:
            raise FedExpertsError(f"{self.name}: budget_fraction must be in (0, 1], got {budget_fraction}")
        if warmup_rounds < 0 or patience < 1 or top_k_neighbours < 1 or measure_examples < 1:
            raise FedExpertsError(
                f"{self.name}: warmup_rounds ({warmup_rounds}) must be >= 0; patience ({patience}), "
                f"top_k_neighbours ({top_k_neighbours}) and measure_examples ({measure_examples}) >= 1"
            )
        bad = {client: size for client, size in (budgets or {}).items() if int(size) <= 0}
        if bad:
            raise FedExpertsError(f"{self.name}: memory budgets must be positive, got {bad}")
        super().__init__(fedmoe_rules(scope), lora=lora, server=server)
        self.scope = scope
        self.budget_fraction = budget_fraction
        self.full_budget_clients = frozenset(full_budget_clients)
        """Clients (without an explicit budget) whose memory holds the full model: they profile."""
        self.budgets = None if budgets is None else {client: int(size) for client, size in budgets.items()}
        self.warmup_rounds = warmup_rounds
        self.patience = patience
        self.top_k_neighbours = top_k_neighbours
        self.measure_examples = measure_examples
        self.full_bytes = 0
        """The full model's bytes (set by :meth:`prepare`)."""
        self.min_bytes = 0
        """The smallest sub-MoE's bytes: the dense part and top-k experts per layer (set by :meth:`prepare`)."""
        self._layout = _Layout()
        self._clients: dict[str, _Client] = {}
        self._pending: dict[str, _Pending] = {}

    # -- once per process --------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Inject LoRA, find the expert-row tensors, freeze them on the base model, check the budgets."""
        base = unwrap_model(model)
        layers = moe_layers(base)
        per_module = [layer.name for layer in layers if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT]
        if per_module:
            raise FedExpertsError(
                f"{self.name}: experts stored one module each ({per_module[0]}, Switch Transformers) are not "
                "supported; FedMoE needs fused expert tensors"
            )
        super().prepare(model)
        params = dict(base.named_parameters())
        rows: dict[str, int] = {}
        for index, layer in enumerate(layers):
            names = [f"{layer.router_name}.{name}" for name in layer.family.router_expert_tensors]
            names += [f"{layer.experts_name}.{name}" for name in layer.family.expert_tensors]
            rows.update({name: index for name in names if name in params})
        kinds = parameter_kinds(base)
        shared = [name for name, role in self.roles.items() if role is Role.SHARED]
        stray = [
            name
            for name in shared
            if kinds[name].kind in (ParamKind.ROUTER, ParamKind.ROUTED_EXPERT)
            and not kinds[name].adapter
            and name not in rows
        ]
        if stray:
            raise FedExpertsError(f"{self.name}: router/expert parameters without one row per expert: {stray[:3]}")
        for name in rows:
            params[name].requires_grad_(False)  # the base keeps its pretrained experts; views train copies
        dense_bytes, expert_bytes = expert_and_dense_bytes(base)
        self._layout = _Layout(
            layer_names=[layer.name for layer in layers],
            num_experts=[layer.num_experts for layer in layers],
            top_k=[layer.top_k for layer in layers],
            rows=rows,
            dense=[name for name in shared if name not in rows],
            dense_bytes=dense_bytes,
            expert_bytes=expert_bytes,
        )
        self.full_bytes = self.memory([list(range(count)) for count in self._layout.num_experts])
        self.min_bytes = self.memory([list(range(k)) for k in self._layout.top_k])
        self._check_budgets()

    def _check_budgets(self) -> None:
        needed = (
            f"the dense part alone is {self._layout.dense_bytes} bytes and the smallest sub-MoE (top-k experts "
            f"per layer) {self.min_bytes} bytes; the full model is {self.full_bytes} bytes"
        )
        if self.budgets is None:
            budget = self._fraction_budget()
            if budget < self.min_bytes:
                raise FedExpertsError(
                    f"{self.name}: algorithm.fedmoe.budget_fraction = {self.budget_fraction} gives every client "
                    f"{budget} bytes, too small: {needed}"
                )
            measurers = budget >= self.full_bytes or bool(self.full_budget_clients)
        else:
            for position, (client, budget) in enumerate(self.budgets.items()):
                if budget < self.min_bytes:
                    raise FedExpertsError(
                        f"{self.name}: the memory budget of {client} (algorithm.fedmoe.budgets[{position}] = "
                        f"{budget} bytes) is too small: {needed}"
                    )
            measurers = any(budget >= self.full_bytes for budget in self.budgets.values())
        if not measurers:
            logger.warning(
                "%s: no client's budget holds the full model (%d bytes), so no client can measure expert "
                "activation and every sub-MoE comes from the uniform prior",
                self.name,
                self.full_bytes,
            )

    # -- budgets and structures --------------------------------------------------------------------
    def _fraction_budget(self) -> int:
        return math.floor(self.budget_fraction * self.full_bytes)

    def budget(self, client_id: str) -> int:
        """The client's memory budget in bytes."""
        if self.budgets is None:
            return self.full_bytes if client_id in self.full_budget_clients else self._fraction_budget()
        if client_id not in self.budgets:
            raise FedExpertsError(f"{self.name}: no memory budget for {client_id} (algorithm.fedmoe.budgets)")
        return self.budgets[client_id]

    def memory(self, structure: Sequence[Collection[int]]) -> int:
        """Bytes of a sub-MoE: the dense part plus its experts' rows."""
        sizes = self._layout.expert_bytes
        return self._layout.dense_bytes + sum(len(kept) * size for kept, size in zip(structure, sizes, strict=True))

    def structure_of(self, client_id: str) -> Structure | None:
        """The sub-MoE the client's next downlink carries (``None``: it profiles the full model)."""
        plan = self._plan(client_id)
        return None if plan.structure is None else [list(layer) for layer in plan.structure]

    def source_of(self, client_id: str) -> Source | None:
        """Where the client's next sub-MoE came from (``None``: it profiles)."""
        return self._plan(client_id).source

    def assign(
        self,
        client_id: str,
        structure: Sequence[Sequence[int]],
        *,
        activation: Sequence[torch.Tensor] | None = None,
        category: str | None = None,
        examples: int = 0,
    ) -> None:
        """Pin a client's sub-MoE (and optionally its ``p``), as if stage 1 had chosen it.

        For experiments that fix structures by hand; checked against the model and the budget.
        """
        chosen = self._checked_structure(structure, client_id)
        if self.memory(chosen) > self.budget(client_id):
            raise FedExpertsError(
                f"{self.name}: {client_id}'s assigned sub-MoE needs {self.memory(chosen)} bytes, over its "
                f"budget of {self.budget(client_id)}"
            )
        record = self._record(client_id)
        record.structure, record.source, record.recommended = chosen, Source.ASSIGNED, False
        record.recommendation = RecommendationState(self.patience)
        if activation is not None:
            if [int(v.numel()) for v in activation] != self._layout.num_experts:
                raise FedExpertsError(f"{self.name}: activation of {client_id} does not match the expert counts")
            record.activation = _normalised(activation)
        if category is not None:
            record.category = category
        if examples:
            record.examples = int(examples)

    def _checked_structure(self, structure: Sequence[Sequence[int]], where: str) -> Structure:
        layout = self._layout
        if len(structure) != len(layout.layer_names):
            raise FedExpertsError(
                f"{where}: structure covers {len(structure)} layers, the model has {len(layout.layer_names)}"
            )
        checked: Structure = []
        for name, kept, count, top_k in zip(
            layout.layer_names, structure, layout.num_experts, layout.top_k, strict=True
        ):
            indices = sorted(int(i) for i in kept)
            if len(set(indices)) != len(indices) or any(not 0 <= i < count for i in indices) or len(indices) < top_k:
                raise FedExpertsError(
                    f"{where}: {name} experts {list(kept)} must be distinct, in [0, {count}) and at least top-{top_k}"
                )
            checked.append(indices)
        return checked

    def _record(self, client_id: str) -> _Client:
        if client_id not in self._clients:
            self._clients[client_id] = _Client(RecommendationState(self.patience))
        return self._clients[client_id]

    def _estimate(self, client_id: str, category: str | None) -> tuple[list[torch.Tensor], Source]:
        """The best stage-1 ``p`` the server has for a client that cannot measure, and its source."""
        measured: list[tuple[list[torch.Tensor], int, str | None]] = [
            (record.activation, record.examples, record.category)
            for cid, record in sorted(self._clients.items())
            if cid != client_id and record.source is Source.MEASURED and record.activation is not None
        ]
        same = [
            (vectors, examples) for vectors, examples, kind in measured if category is not None and kind == category
        ]
        if same:
            return estimate_activation(same), Source.CATEGORY
        if measured:
            return estimate_activation([(vectors, examples) for vectors, examples, _ in measured]), Source.FEDERATION
        prior = [torch.full((count,), 1.0 / count, dtype=torch.float64) for count in self._layout.num_experts]
        return prior, Source.PRIOR

    def _choose(self, client_id: str, activation: Sequence[torch.Tensor]) -> Structure:
        """Stage 1: the largest coverage threshold whose sub-MoE fits the client's budget."""
        try:
            choice = choose_sub_moe(
                activation,
                budget_bytes=self.budget(client_id),
                dense_bytes=self._layout.dense_bytes,
                expert_bytes=self._layout.expert_bytes,
                min_experts=self._layout.top_k,
            )
        except FedExpertsError as error:
            raise FedExpertsError(f"{self.name}: {client_id}: {error}") from None
        return self._structure_from(client_id, [list(kept) for kept in choice.kept])

    def _structure_from(self, client_id: str, chosen: Structure) -> Structure:
        """The sub-MoE given the search's choice (FedMoE: the choice itself)."""
        return chosen

    def _plan(self, client_id: str) -> _Plan:
        record = self._clients.get(client_id)
        if record is not None and record.structure is not None:
            return _Plan(Phase.TRAIN, record.structure, record.source, record.activation)
        if self.budget(client_id) >= self.full_bytes:
            done = record.profiles if record is not None else 0
            return _Plan(Phase.PROFILE, measure=done >= self.warmup_rounds)
        activation, source = self._estimate(client_id, record.category if record is not None else None)
        return _Plan(Phase.TRAIN, self._choose(client_id, activation), source, activation)

    def _held(self, structure: Structure) -> dict[str, list[int]]:
        return {name: list(kept) for name, kept in zip(self._layout.layer_names, structure, strict=True)}

    # -- per client ----------------------------------------------------------------------------------
    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        """The dense tensors and, in stage 2, the rows of the client's experts only."""
        plan = self._plan(client.client_id)
        tensors = {name: global_state[name] for name in self._layout.dense}
        metadata: dict[str, Any] = {PHASE_KEY: plan.phase.value, CLIENT_KEY: client.client_id}
        if plan.structure is not None:
            for name, layer in self._layout.rows.items():
                full = global_state[name]
                index = torch.tensor(plan.structure[layer], dtype=torch.long, device=full.device)
                tensors[name] = full.index_select(0, index)
            metadata[HELD_KEY] = self._held(plan.structure)
        else:
            metadata[MEASURE_KEY] = plan.measure
        return Payload(tensors, metadata)

    @torch.no_grad()
    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData | None = None
    ) -> nn.Module:
        """Profile: the base model itself (and ``p`` measured). Stage 2: the client's sub-MoE view."""
        metadata = received.metadata
        try:
            phase = Phase(str(metadata.get(PHASE_KEY)))
        except ValueError:
            raise FedExpertsError(f"{self.name}: the downlink has no valid {PHASE_KEY!r}") from None
        client_id = str(metadata.get(CLIENT_KEY) or (data.client.client_id if data is not None else ""))
        category = majority_category(data.categories) if data is not None else None
        base = unwrap_model(model)
        if phase is Phase.PROFILE:
            self._load_dense(base, received)
            activation = None
            if metadata.get(MEASURE_KEY) and data is not None:
                activation = measure_activation(base, data.batches(), self.measure_examples)
            self._pending[client_id] = _Pending(phase, None, activation, category)
            return model
        held = metadata.get(HELD_KEY)
        if not isinstance(held, dict) or set(held) != set(self._layout.layer_names):
            raise FedExpertsError(f"{self.name}: the downlink's {HELD_KEY!r} does not name every MoE layer")
        structure = self._checked_structure([held[name] for name in self._layout.layer_names], client_id)
        mapping = expert_map(base).local_to_global
        counts = zip(self._layout.layer_names, self._layout.num_experts, strict=True)
        if any(mapping.get(name) != tuple(range(count)) for name, count in counts):
            raise FedExpertsError(f"{self.name}: the base model must hold every expert (it is pruned)")
        view = sub_moe_view(base, self._held(structure))
        self._load_dense(view, received)
        params = dict(view.named_parameters())
        for name in self._layout.rows:
            if name not in received.tensors:
                raise FedExpertsError(f"{self.name}: the client did not receive expert rows {name}")
            params[name].copy_(received.tensors[name])
            params[name].requires_grad_(True)
        self._pending[client_id] = _Pending(phase, structure, None, category)
        return view

    def _load_dense(self, model: nn.Module, received: Payload) -> None:
        params = dict(unwrap_model(model).named_parameters())
        for name in self._layout.dense:
            if name not in received.tensors:
                raise FedExpertsError(f"{self.name}: the client did not receive shared tensor {name}")
            params[name].copy_(received.tensors[name])

    def uplink(self, model: nn.Module, client: ClientInfo) -> Payload:
        """The dense tensors, and the held experts' rows (stage 2) or the measured ``p`` (profiling)."""
        pending = self._pending.pop(client.client_id, None)
        if pending is None:
            raise FedExpertsError(f"{self.name}: uplink of {client.client_id} without setup_client")
        base = unwrap_model(model)
        params = dict(base.named_parameters())
        tensors = {name: params[name].detach().clone() for name in self._layout.dense}
        metadata: dict[str, Any] = {EXAMPLES_KEY: client.num_examples, PHASE_KEY: pending.phase.value}
        if pending.category is not None:
            metadata[CATEGORY_KEY] = pending.category
        if pending.structure is not None:
            mapping = expert_map(base)
            for name, layer in self._layout.rows.items():
                local = mapping.local_to_global[self._layout.layer_names[layer]]
                missing = [g for g in pending.structure[layer] if g not in local]
                if missing:
                    raise FedExpertsError(f"{self.name}: the client model does not hold experts {missing} of {name}")
                tensor = params[name].detach()
                positions = torch.tensor([local.index(g) for g in pending.structure[layer]], device=tensor.device)
                tensors[name] = tensor.index_select(0, positions)
            metadata[HELD_KEY] = self._held(pending.structure)
        elif pending.activation is not None:
            for name, vector in zip(self._layout.layer_names, pending.activation, strict=True):
                tensors[ACTIVATION_PREFIX + name] = vector.detach().to(device="cpu", dtype=torch.float64)
        return Payload(tensors, metadata)

    # -- server --------------------------------------------------------------------------------------
    def check_update(self, update: Payload, global_state: State, client: ClientInfo) -> None:
        """The reply must be the slice the client was sent (same phase, experts and shapes), finite."""
        sender = client.client_id
        plan = self._plan(sender)
        phase = update.metadata.get(PHASE_KEY)
        if phase != plan.phase.value:
            raise PayloadError(f"{sender}: replies to a {phase!r} step but was sent a {plan.phase.value!r} one")
        expected: dict[str, torch.Tensor] = {name: global_state[name] for name in self._layout.dense}
        if plan.structure is not None:
            if update.metadata.get(HELD_KEY) != self._held(plan.structure):
                raise PayloadError(f"{sender}: reports held experts {update.metadata.get(HELD_KEY)} it was not sent")
            for name, layer in self._layout.rows.items():
                shape = (len(plan.structure[layer]), *global_state[name].shape[1:])
                expected[name] = torch.empty(shape, device="meta")
        elif plan.measure:
            for name, count in zip(self._layout.layer_names, self._layout.num_experts, strict=True):
                expected[ACTIVATION_PREFIX + name] = torch.empty(count, device="meta")
        validate_update(update, expected, sender=sender)
        for name, tensor in update.tensors.items():
            if name.startswith(ACTIVATION_PREFIX) and (bool((tensor < 0).any()) or float(tensor.sum()) <= 0):
                raise PayloadError(f"{sender}: {name} must be non-negative with a positive sum")
        category = update.metadata.get(CATEGORY_KEY)
        if category is not None and not isinstance(category, str):
            raise PayloadError(f"{sender}: {CATEGORY_KEY} must be a string, got {category!r}")

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """Modular aggregation and the server step; then stage-1 choices and recommendations."""
        if not updates:
            return dict(global_state)
        global_state = {name: tensor.detach().cpu() for name, tensor in global_state.items()}  # averages are on CPU
        plans = {update.client.client_id: self._plan(update.client.client_id) for update in updates}
        layout = self._layout
        expert_updates = []
        for update in updates:
            plan, tensors = plans[update.client.client_id], update.payload.tensors
            rows: dict[str, torch.Tensor] = {}
            held: dict[str, list[int]] = {}
            if plan.structure is not None:
                rows = {name: tensors[name] for name in layout.rows}
                held = {name: plan.structure[layer] for name, layer in layout.rows.items()}
            dense = {name: tensors[name] for name in layout.dense}
            expert_updates.append(ExpertUpdate(float(update.client.num_examples), rows, held, dense))
        averaged = aggregate_fedmoe(
            {name: global_state[name] for name in layout.dense},
            {name: global_state[name] for name in layout.rows},
            expert_updates,
        )
        stepped = self.server.step(global_state, averaged)
        for name in layout.rows:  # rows no reply held stay as they were, whatever the server rule
            touched = torch.zeros(global_state[name].shape[0], dtype=torch.bool)
            for expert_update in expert_updates:
                if name in expert_update.held:
                    touched[list(expert_update.held[name])] = True
            kept = stepped[name].clone()
            kept[~touched] = global_state[name][~touched]
            stepped[name] = kept
        self._ingest(updates, plans)
        if self.recommends:
            self._recommend(updates, plans)
        self._rechoose()
        return stepped

    def _ingest(self, updates: Sequence[ClientUpdate], plans: Mapping[str, _Plan]) -> None:
        for update in updates:
            client_id = update.client.client_id
            plan, record = plans[client_id], self._record(client_id)
            record.examples = int(update.client.num_examples)
            category = update.payload.metadata.get(CATEGORY_KEY)
            record.category = category if isinstance(category, str) else record.category
            if plan.phase is Phase.PROFILE:
                record.profiles += 1
                measured = [update.payload.tensors.get(ACTIVATION_PREFIX + name) for name in self._layout.layer_names]
                if all(vector is not None for vector in measured):
                    record.activation = _normalised([v for v in measured if v is not None])
                    record.source = Source.MEASURED
                    record.structure = self._choose(client_id, record.activation)
            elif record.structure is None:  # its first sub-MoE (chosen at its downlink) is now on record
                record.structure, record.source = plan.structure, plan.source
                record.activation = None if plan.activation is None else _normalised(plan.activation)

    def _recommend(self, updates: Sequence[ClientUpdate], plans: Mapping[str, _Plan]) -> None:
        """Feed each evaluated stage-2 client's score to its schedule; switch structures it decides."""
        current = {cid: r.structure for cid, r in self._clients.items() if r.structure is not None}
        pool = {
            cid: r.activation
            for cid, r in sorted(self._clients.items())
            if cid in current and r.activation is not None and r.source is not Source.PRIOR
        }
        for update in sorted(updates, key=lambda u: u.client.client_id):
            client_id = update.client.client_id
            plan, record = plans[client_id], self._clients[client_id]
            score = update.payload.metadata.get(SCORE_KEY)
            if not isinstance(score, int | float) or isinstance(score, bool) or plan.structure is None:
                continue
            if client_id not in pool or record.structure != plan.structure:
                continue
            decision = record.recommendation.observe(
                float(score), plan.structure, partial(self._propose, client_id, pool, current)
            )
            if decision.action is not Action.KEEP and decision.structure is not None:
                record.structure = [sorted(layer) for layer in decision.structure]
                record.recommended = True

    def _propose(
        self, client_id: str, pool: Mapping[str, list[torch.Tensor]], current: Mapping[str, Structure]
    ) -> Structure:
        if len(pool) < 2:
            return current[client_id]
        proposal = recommend(
            client_id,
            pool,
            {cid: current[cid] for cid in pool},
            top_k_neighbours=self.top_k_neighbours,
            min_experts=self._layout.top_k,
        )
        return self._fit(client_id, proposal, current[client_id], pool[client_id])

    def _fit(self, client_id: str, proposal: Structure, now: Structure, own: Sequence[torch.Tensor]) -> Structure:
        """Drop added experts, those the client's own ``p`` ranks lowest first, until the budget holds."""
        budget = self.budget(client_id)
        kept = [set(layer) for layer in proposal]
        added = [(layer, e) for layer, experts in enumerate(proposal) for e in experts if e not in now[layer]]
        added.sort(key=lambda item: (float(own[item[0]][item[1]]), -item[1], item[0]))
        for layer, expert in added:
            if self.memory(kept) <= budget:
                break
            if len(kept[layer]) > self._layout.top_k[layer]:
                kept[layer].discard(expert)
        return [sorted(layer) for layer in kept]

    def _rechoose(self) -> None:
        """Re-choose provisional stage-1 sub-MoEs when a better estimate of ``p`` exists."""
        for client_id, record in sorted(self._clients.items()):
            if record.structure is None or record.recommended or record.source not in _PROVISIONAL:
                continue
            activation, source = self._estimate(client_id, record.category)
            assert record.source is not None
            if _RANK[source] > _RANK[record.source]:
                record.activation, record.source = activation, source
                record.structure = self._choose(client_id, activation)
                record.recommendation = RecommendationState(self.patience)

    def server_state(self) -> Payload:
        """Server-optimizer moments, every client's ``p`` (tensors) and the rest of its record (JSON)."""
        tensors = {f"optimizer/{key}": value for key, value in self.server.state().items()}
        clients: dict[str, Any] = {}
        for client_id, record in sorted(self._clients.items()):
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
            }
        return Payload(tensors, {"clients": clients})

    def load_server_state(self, state: Payload) -> None:
        optimizer = {k.removeprefix("optimizer/"): v for k, v in state.tensors.items() if k.startswith("optimizer/")}
        self.server.load_state(optimizer)
        self._clients = {}
        for client_id, saved in state.metadata.get("clients", {}).items():
            activation = None
            if saved.get("activation"):
                activation = [
                    state.tensors[f"activation/{client_id}/{layer}"].to(torch.float64)
                    for layer in range(len(self._layout.layer_names))
                ]
            structure = saved.get("structure")
            self._clients[client_id] = _Client(
                recommendation=RecommendationState.from_json(saved["recommendation"]),
                examples=int(saved.get("examples", 0)),
                category=saved.get("category"),
                profiles=int(saved.get("profiles", 0)),
                activation=activation,
                source=None if saved.get("source") is None else Source(saved["source"]),
                structure=None if structure is None else [[int(i) for i in layer] for layer in structure],
                recommended=bool(saved.get("recommended", False)),
            )


class RandomMoE(FedMoE):
    """randomMoE: random sub-MoEs of exactly the sizes FedMoE's search chooses; no recommendation."""

    name = "random-moe"
    recommends = False

    def __init__(
        self,
        scope: SharedScope = SharedScope.ATTENTION_LORA,
        *,
        seed: int = 0,
        lora: LoraSettings | None = None,
        server: ServerOptimizer | None = None,
        budget_fraction: float = 0.6,
        budgets: Mapping[str, int] | None = None,
        full_budget_clients: Collection[str] = (),
        warmup_rounds: int = 0,
        measure_examples: int = 64,
        patience: int = 2,
        top_k_neighbours: int = 2,
    ) -> None:
        """As :class:`FedMoE` (``patience`` and ``top_k_neighbours`` are accepted and unused), plus ``seed``."""
        super().__init__(
            scope,
            lora=lora,
            server=server,
            budget_fraction=budget_fraction,
            budgets=budgets,
            full_budget_clients=full_budget_clients,
            warmup_rounds=warmup_rounds,
            patience=patience,
            top_k_neighbours=top_k_neighbours,
            measure_examples=measure_examples,
        )
        self.seed = seed

    def _structure_from(self, client_id: str, chosen: Structure) -> Structure:
        """Per layer, as many experts as the search chose, drawn with a seed of ``(seed, client)``."""
        draw = np.random.SeedSequence([self.seed, zlib.crc32(client_id.encode())]).generate_state(1)[0]
        return random_sub_moe(self._layout.num_experts, [len(kept) for kept in chosen], int(draw))
