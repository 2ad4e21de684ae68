"""FedMoE and randomMoE on the :class:`~fedexperts.interface.Algorithm` contract (see the package docstring).

Thin: the server's planning and records are a :class:`~fedexperts.algorithms.fedmoe.schedule.Schedule`,
tensors move through :mod:`fedexperts.algorithms.fedmoe.views`, and a client's step lives in its
:class:`FedMoEContext`. This module turns those into payloads and back.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedexperts.algorithms.base import BaseAlgorithm, is_client_model, scope_rules
from fedexperts.algorithms.expert_weighting import reported_tokens
from fedexperts.algorithms.fedmoe.aggregate import ExpertUpdate, aggregate_fedmoe, keep_unheld_rows
from fedexperts.algorithms.fedmoe.config import FedMoEConfig, FedMoEOptions
from fedexperts.algorithms.fedmoe.layout import Layout, Structure
from fedexperts.algorithms.fedmoe.records import Phase, Plan, Reply, Source
from fedexperts.algorithms.fedmoe.schedule import Schedule
from fedexperts.algorithms.fedmoe.views import (
    check_full_base,
    dense_tensors,
    freeze_rows,
    held_rows,
    holds_exactly,
    initial_state,
    layout_of,
    load_dense,
    load_rows,
    measure_activation,
    sent_rows,
    sub_moe_view,
)
from fedexperts.algorithms.settings import SharedScope
from fedexperts.errors import FedExpertsError
from fedexperts.interface import (
    EXAMPLES_KEY,
    REPORT_KEY,
    ClientContext,
    ClientInfo,
    ClientUpdate,
    LocalData,
    Payload,
    PayloadError,
    State,
    majority_category,
    validate_update,
)
from fedexperts.moe.families import moe_layers, unwrap_model
from fedexperts.moe.params import ParamKind, Role, RoleRules

PHASE_KEY = "fedmoe_phase"
CLIENT_KEY = "fedmoe_client"
HELD_KEY = "fedmoe_held"
"""Metadata: ``{MoE layer name: sorted global indices}`` of the experts whose rows travel."""
MEASURE_KEY = "fedmoe_measure"
CATEGORY_KEY = "fedmoe_category"
SCORE_KEY = "val_rouge_l"
"""The reply metric the recommendation reads: ROUGE-L on the client's validation rows (never its test rows)."""
ACTIVATION_PREFIX = "activation/"
"""Uplink tensors ``activation/<MoE layer name>``: a profiling client's measured ``p``."""


def fedmoe_rules(scope: SharedScope) -> RoleRules:
    """The scope's parameters plus every router and routed expert are shared (held rows travel)."""
    shared = scope_rules(scope)
    base = dict(shared.base)
    base[ParamKind.ROUTER] = Role.SHARED
    base[ParamKind.ROUTED_EXPERT] = Role.SHARED
    return RoleRules(base=base, adapters=dict(shared.adapters))


@dataclass
class FedMoEContext(ClientContext):
    """One client's step, between :meth:`FedMoE.setup_client` and :meth:`FedMoE.uplink`.

    ``model`` is the full model while profiling, else the client's sub-MoE (loaded, or a view of the base).
    """

    phase: Phase = Phase.TRAIN
    structure: Structure | None = None
    """The held experts (stage 2); ``None`` while profiling."""
    activation: list[torch.Tensor] | None = None
    """The ``p`` measured before training (a profiling step asked to measure)."""
    category: str | None = None
    """The client's majority category, reported with its reply."""


class FedMoE(BaseAlgorithm):
    """FedMoE: per-client sub-MoEs under memory budgets, modular aggregation, expert recommendation.

    The shared object holds what every process learns in :meth:`prepare` (roles, :attr:`layout`) and
    the server's knowledge (:attr:`schedule`, the server optimizer); a client step writes to neither.
    """

    name = "fedmoe"
    client_sub_moes = True

    def __init__(
        self, config: FedMoEConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or FedMoEConfig()
        if config.scope is SharedScope.EVERYTHING:
            raise FedExpertsError(
                f"{self.name}: scope 'everything' would send every expert; the held experts already travel, "
                "so choose attention-lora, attention or non-expert"
            )
        lora, server, weighting = config.lora_or_none, config.server, config.expert_weighting
        super().__init__(fedmoe_rules(config.scope), lora=lora, server=server, expert_weighting=weighting)
        self.scope = config.scope
        self.measure_examples = config.fedmoe.measure_examples
        self.layout = Layout()
        """The model's MoE layers and expert-row tensors (set by :meth:`prepare`)."""
        self.budget_counts = config.fedmoe.budget_counts
        self.schedule = Schedule.from_options(
            config.fedmoe, client_ids, name=self.name, seed=self._random_seed(config.fedmoe, seed)
        )

    @property
    def batching_refusal(self) -> str | None:
        return f"{self.name}: each client trains its own sub-MoE's expert rows (no per-group router mask yet)"

    def _random_seed(self, options: FedMoEOptions, seed: int) -> tuple[int, ...] | None:
        """``None``: sub-MoEs chosen by activation, then recommended (randomMoE: its draws' seed)."""
        return None

    # -- once per process --------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Inject LoRA, find the expert-row tensors, freeze them on the base model, check the budgets."""
        super().prepare(model)
        self.schedule.prepare(self.layout)

    def _learn(self, model: nn.Module) -> None:
        """Learn the layout (sizes in the checkpoint's dtype)."""
        base = unwrap_model(model)
        self.layout = layout_of(base, moe_layers(base), self.roles, self.name, counts=self.budget_counts)

    def _settle_base(self, model: nn.Module) -> None:
        """Freeze the expert rows (kept in their dtype); a client trains float32 copies of the held ones (load_rows)."""
        freeze_rows(model, self.layout)

    def initial_global_state(self, model: nn.Module) -> State:
        return initial_state(model, self.layout)

    # -- budgets and structures (the server's schedule) -----------------------------------------------
    @property
    def recommends(self) -> bool:
        """Whether stage 2 recommends structures (randomMoE: no)."""
        return self.schedule.recommends

    @property
    def full_bytes(self) -> int:
        """The full model's bytes (set by :meth:`prepare`)."""
        return self.schedule.full_bytes

    @property
    def min_bytes(self) -> int:
        """The smallest sub-MoE's bytes: the dense part and top-k experts per layer (set by :meth:`prepare`)."""
        return self.schedule.min_bytes

    def budget(self, client_id: str) -> int:
        """The client's memory budget in bytes."""
        return self.schedule.budget(client_id)

    def memory(self, structure: Sequence[Collection[int]]) -> int:
        """Bytes of a sub-MoE: the dense part plus its experts' rows."""
        return self.schedule.memory(structure)

    def structure_of(self, client_id: str) -> Structure | None:
        """The sub-MoE the client's next downlink carries (``None``: it profiles the full model)."""
        return self.schedule.structure_of(client_id)

    def source_of(self, client_id: str) -> Source | None:
        """Where the client's next sub-MoE came from (``None``: it profiles)."""
        return self.schedule.source_of(client_id)

    def assign(
        self,
        client_id: str,
        structure: Sequence[Sequence[int]],
        *,
        activation: Sequence[torch.Tensor] | None = None,
        category: str | None = None,
        examples: int = 0,
    ) -> None:
        """Pin a client's sub-MoE (and optionally its ``p``), as if stage 1 had chosen it."""
        self.schedule.assign(client_id, structure, activation=activation, category=category, examples=examples)

    # -- per client ----------------------------------------------------------------------------------
    def downlink(self, global_state: State, client: ClientInfo) -> Payload:
        """The dense tensors and, in stage 2, the rows of the client's experts only."""
        plan = self.schedule.plan(client.client_id)
        tensors = {name: global_state[name] for name in self.layout.dense}
        metadata: dict[str, Any] = {PHASE_KEY: plan.phase.value, CLIENT_KEY: client.client_id}
        if plan.phase is Phase.WAIT:
            return Payload({}, metadata)
        if plan.structure is not None:
            tensors.update(held_rows(global_state, self.layout, plan.structure))
            metadata[HELD_KEY] = self.layout.held(plan.structure)
        else:
            metadata[MEASURE_KEY] = plan.measure
        return Payload(tensors, metadata)

    def client_experts(self, received: Payload) -> dict[str, list[int]] | None:
        """Stage 2: the held experts; profiling: every expert (the full model); waiting: none (no model)."""
        phase, structure = self._step_of(received, "")
        if phase is Phase.WAIT:
            return None
        return self.layout.held(self.layout.full if structure is None else structure)

    def _step_of(self, received: Payload, client_id: str) -> tuple[Phase, Structure | None]:
        """The downlink's phase and, in stage 2, its checked structure."""
        metadata = received.metadata
        try:
            phase = Phase(str(metadata.get(PHASE_KEY)))
        except ValueError:
            raise FedExpertsError(f"{self.name}: the downlink has no valid {PHASE_KEY!r}") from None
        if phase in (Phase.PROFILE, Phase.WAIT):
            return phase, None
        held = metadata.get(HELD_KEY)
        if not isinstance(held, dict) or set(held) != set(self.layout.layer_names):
            raise FedExpertsError(f"{self.name}: the downlink's {HELD_KEY!r} does not name every MoE layer")
        where = str(metadata.get(CLIENT_KEY) or client_id or self.name)
        return phase, self.layout.checked_structure([held[name] for name in self.layout.layer_names], where)

    @torch.no_grad()
    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> FedMoEContext:
        """Profile: ``model`` itself, which must be the full model (and ``p`` measured).

        Stage 2: ``model`` itself when it is a client model (:meth:`prepare_client_model`) holding
        exactly the client's experts (loaded for :meth:`client_experts`), else a sub-MoE view of the
        full ``model``, which stays as it was (the shared base).
        """
        phase, structure = self._step_of(received, data.client.client_id)
        category = majority_category(data.categories)
        base = unwrap_model(model)
        if phase is Phase.WAIT:
            return FedMoEContext(data.client, model, received, data.round, idle=True, phase=phase, category=category)
        if structure is None:
            check_full_base(base, self.layout, self.name)
            load_dense(base, received, self.layout, self.name)
            activation = None
            if received.metadata.get(MEASURE_KEY) and data.batches is not None:
                activation = measure_activation(base, data.batches(), self.measure_examples)
            return FedMoEContext(
                data.client, model, received, data.round, phase=phase, activation=activation, category=category
            )
        held = self.layout.held(structure)
        if is_client_model(base) and holds_exactly(base, held):
            client = base
        else:
            check_full_base(base, self.layout, self.name)
            client = sub_moe_view(base, held)
        load_dense(client, received, self.layout, self.name)
        load_rows(client, received, self.layout, self.name)
        return FedMoEContext(
            data.client, client, received, data.round, phase=phase, structure=structure, category=category
        )

    def uplink(self, context: ClientContext) -> Payload:
        """The dense tensors, and the held experts' rows (stage 2) or the measured ``p`` (profiling)."""
        if not isinstance(context, FedMoEContext):
            raise FedExpertsError(f"{self.name}: uplink of {context.client.client_id} without setup_client")
        metadata: dict[str, Any] = {EXAMPLES_KEY: context.client.num_examples, PHASE_KEY: context.phase.value}
        if context.category is not None:
            metadata[CATEGORY_KEY] = context.category
        if context.phase is Phase.WAIT:
            return Payload({}, metadata)
        tensors = dense_tensors(context.model, self.layout)
        structure = context.structure if context.structure is not None else self.layout.full
        metadata[REPORT_KEY] = {
            "experts": sum(len(layer) for layer in structure),
            "paper_bytes": self.layout.float32_bytes(structure),
        }
        if context.structure is not None:
            tensors.update(sent_rows(context.model, self.layout, context.structure, self.name))
            metadata[HELD_KEY] = self.layout.held(context.structure)
            metadata.update(self._tokens_metadata(context))  # the sub-MoE's experts are the held ones, in order
        elif context.activation is not None:
            for name, vector in zip(self.layout.layer_names, context.activation, strict=True):
                tensors[ACTIVATION_PREFIX + name] = vector.detach().to(device="cpu", dtype=torch.float64)
        return Payload(tensors, metadata)

    def personal_state(self, context: ClientContext) -> Payload | None:
        """Nothing: a FedMoE client keeps no tensors between rounds (its structure is the server's)."""
        return None

    # -- server --------------------------------------------------------------------------------------
    def check_update(self, update: Payload, global_state: State, client: ClientInfo) -> None:
        """The reply must be the slice the client was sent (same phase, experts and shapes), finite."""
        sender = client.client_id
        plan = self.schedule.plan(sender)
        phase = update.metadata.get(PHASE_KEY)
        if phase != plan.phase.value:
            raise PayloadError(f"{sender}: replies to a {phase!r} step but was sent a {plan.phase.value!r} one")
        if plan.phase is Phase.WAIT:
            validate_update(update, {}, sender=sender)
            return
        expected: dict[str, torch.Tensor] = {name: global_state[name] for name in self.layout.dense}
        if plan.structure is not None:
            if update.metadata.get(HELD_KEY) != self.layout.held(plan.structure):
                raise PayloadError(f"{sender}: reports held experts it was not sent", rule="experts")
            for name, layer in self.layout.rows.items():
                shape = (len(plan.structure[layer]), *global_state[name].shape[1:])
                rows = update.tensors.get(name)
                if rows is not None and rows.shape[:1] != shape[:1]:  # rows of experts it does not hold
                    carried = rows.shape[0] if rows.dim() else 0
                    raise PayloadError(f"{sender}: {name} has {carried} expert rows, not {shape[0]}", rule="experts")
                expected[name] = torch.empty(shape, device="meta", dtype=global_state[name].dtype)
            if self.weighs_tokens:
                self._routed_tokens(update.metadata, plan.structure, sender)
        elif plan.measure:
            for name, count in zip(self.layout.layer_names, self.layout.num_experts, strict=True):
                expected[ACTIVATION_PREFIX + name] = torch.empty(count, device="meta", dtype=torch.float64)
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
        plans = {update.client.client_id: self.schedule.plan(update.client.client_id) for update in updates}
        layout = self.layout
        trained = [update for update in updates if plans[update.client.client_id].phase is not Phase.WAIT]
        expert_updates = [self._expert_update(update, plans[update.client.client_id]) for update in trained]
        averaged = aggregate_fedmoe(
            {name: global_state[name] for name in layout.dense},
            {name: global_state[name] for name in layout.rows},
            expert_updates,
        )
        stepped = (
            keep_unheld_rows(global_state, self.server.step(global_state, averaged), expert_updates, layout.rows)
            if expert_updates
            else dict(global_state)
        )
        self.schedule.observe([self._reply(update) for update in updates], plans)
        return stepped

    def _expert_update(self, update: ClientUpdate, plan: Plan) -> ExpertUpdate:
        tensors = update.payload.tensors
        rows: dict[str, torch.Tensor] = {}
        held: dict[str, list[int]] = {}
        row_weights: dict[str, list[int]] = {}
        if plan.structure is not None:
            rows = {name: tensors[name] for name in self.layout.rows}
            held = {name: plan.structure[layer] for name, layer in self.layout.rows.items()}
            if self.weighs_tokens:  # each held expert's rows (experts and router) weigh the tokens routed to it
                tokens = self._routed_tokens(update.payload.metadata, plan.structure, update.client.client_id)
                row_weights = {name: tokens[self.layout.layer_names[layer]] for name, layer in self.layout.rows.items()}
        dense = {name: tensors[name] for name in self.layout.dense}
        return ExpertUpdate(float(update.client.num_examples), rows, held, dense, row_weights)

    def _routed_tokens(self, metadata: dict[str, Any], structure: Structure, sender: str) -> dict[str, list[int]]:
        """The reply's checked token counts: one per held expert of each layer, in held order."""
        lengths = {name: len(kept) for name, kept in self.layout.held(structure).items()}
        return reported_tokens(metadata, lengths, sender=sender)

    def _reply(self, update: ClientUpdate) -> Reply:
        """What the schedule reads of a (checked) reply."""
        metadata, tensors = update.payload.metadata, update.payload.tensors
        category = metadata.get(CATEGORY_KEY)
        measured = [tensors.get(ACTIVATION_PREFIX + name) for name in self.layout.layer_names]
        score = metadata.get(SCORE_KEY)
        return Reply(
            update.client.client_id,
            int(update.client.num_examples),
            category if isinstance(category, str) else None,
            [v for v in measured if v is not None] if all(v is not None for v in measured) else None,
            float(score) if isinstance(score, int | float) and not isinstance(score, bool) else None,
        )

    def finish(self) -> None:
        """Revert structures still under trial (:meth:`Schedule.finish`) before the final evaluation."""
        self.schedule.finish()

    def server_state(self) -> Payload:
        """Server-optimizer moments, every client's ``p`` (tensors) and the rest of its record (JSON)."""
        tensors = {f"optimizer/{key}": value for key, value in self.server.state().items()}
        activations, clients = self.schedule.state()
        return Payload({**tensors, **activations}, {"clients": clients})

    def load_server_state(self, state: Payload) -> None:
        optimizer = {k.removeprefix("optimizer/"): v for k, v in state.tensors.items() if k.startswith("optimizer/")}
        self.server.load_state(optimizer)
        self.schedule.load_state(state.tensors, state.metadata.get("clients", {}))
