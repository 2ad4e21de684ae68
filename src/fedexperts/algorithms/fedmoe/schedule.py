"""FedMoE's server-side planning: budgets, each client's next step, stage-1 choices and recommendations.

A :class:`Schedule` is the server's knowledge of the federation (one :class:`ClientRecord` per
client) and the rules that turn it into plans. Stage 1: a client whose budget holds the full model
profiles (``warmup_rounds`` of LoRA on the full MoE, then a measuring round). Stage 2: any other
client trains the sub-MoE :func:`choose_sub_moe` picks from the best ``p`` the server has for it
(its category's, else the federation's, else the uniform prior); with ``wait_for_stage_1`` it sits
out the rounds before every profiling client has measured, so it starts from the finished
estimate. After every round :meth:`Schedule.observe` records the replies, runs the recommendation
(FedMoE) on the clients' validation scores and re-chooses provisional sub-MoEs; :meth:`finish`
reverts trials no evaluation judged. Model-free: it sees the model only as a :class:`Layout`, and
replies only as :class:`Reply` records.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from fedexperts.algorithms.fedmoe.activation import estimate_activation, normalised_layers, uniform_prior
from fedexperts.algorithms.fedmoe.config import FedMoEOptions
from fedexperts.algorithms.fedmoe.layout import Layout, Structure
from fedexperts.algorithms.fedmoe.recommend import Action, RecommendationState, copies, recommend
from fedexperts.algorithms.fedmoe.records import (
    PROVISIONAL,
    RANK,
    ClientRecord,
    Phase,
    Plan,
    Reply,
    Source,
    records_from_state,
    records_to_state,
)
from fedexperts.algorithms.fedmoe.search import choose_sub_moe, random_sub_moe
from fedexperts.errors import FedExpertsError

logger = logging.getLogger(__name__)


def client_budgets(options: FedMoEOptions, client_ids: Sequence[str] | None) -> tuple[dict[str, int] | None, list[str]]:
    """``(budget per client id, or None; the clients whose budget is the full model)`` from the config.

    ``budgets`` are given in client order; without client ids (``fedexperts plan``) they are not
    used and ``budget_fraction`` applies. Without ``budgets``, every ``full_budget_every``-th client
    (0, n, 2n, ...) holds the full model.
    """
    budgets = None
    if options.budgets is not None and client_ids is not None:
        if len(options.budgets) != len(client_ids):
            raise FedExpertsError(
                f"algorithm.fedmoe.budgets has {len(options.budgets)} entries for {len(client_ids)} clients"
            )
        budgets = dict(zip(client_ids, options.budgets, strict=True))
    every = options.full_budget_every
    return budgets, list(client_ids or [])[::every] if every else []


class Schedule:
    """The server's records of every client and the plans they give (see the module docstring).

    ``seed`` ``None``: FedMoE (sub-MoEs chosen by activation, then recommended). A sequence of
    integers: randomMoE (random sub-MoEs of the sizes the search picks, drawn per client from a
    generator seeded by ``(*seed, client)``; no recommendation).
    """

    def __init__(
        self,
        *,
        name: str = "fedmoe",
        budget_fraction: float = 0.6,
        budgets: Mapping[str, int] | None = None,
        full_budget_clients: Collection[str] = (),
        warmup_rounds: int = 0,
        patience: int = 2,
        top_k_neighbours: int = 2,
        wait_for_stage_1: bool = False,
        seed: Sequence[int] | None = None,
    ) -> None:
        bad = {client: size for client, size in (budgets or {}).items() if int(size) <= 0}
        if bad:
            raise FedExpertsError(f"{name}: memory budgets must be positive, got {bad}")
        self.name = name
        self.budget_fraction = budget_fraction
        self.budgets = None if budgets is None else {client: int(size) for client, size in budgets.items()}
        self.full_budget_clients = frozenset(full_budget_clients)
        """Clients (without an explicit budget) whose memory holds the full model: they profile."""
        self.warmup_rounds = warmup_rounds
        self.patience = patience
        self.top_k_neighbours = top_k_neighbours
        self.wait_for_stage_1 = wait_for_stage_1
        self.seed = None if seed is None else tuple(int(part) for part in seed)
        self.layout = Layout()
        self.full_bytes = 0
        """The full model's bytes (set by :meth:`prepare`)."""
        self.min_bytes = 0
        """The smallest sub-MoE's bytes: the dense part and top-k experts per layer (set by :meth:`prepare`)."""
        self.clients: dict[str, ClientRecord] = {}
        self.training_over = False
        """Set by :meth:`finish`: the final evaluation gives a still-waiting client its best sub-MoE."""

    @classmethod
    def from_options(
        cls, options: FedMoEOptions, client_ids: Sequence[str] | None, *, name: str, seed: Sequence[int] | None = None
    ) -> Schedule:
        budgets, full_budget_clients = client_budgets(options, client_ids)
        return cls(
            name=name,
            budget_fraction=options.budget_fraction,
            budgets=budgets,
            full_budget_clients=full_budget_clients,
            warmup_rounds=options.warmup_rounds,
            patience=options.patience,
            top_k_neighbours=options.top_k_neighbours,
            wait_for_stage_1=options.wait_for_stage_1,
            seed=seed,
        )

    @property
    def recommends(self) -> bool:
        return self.seed is None

    # -- the model's sizes and the budgets -----------------------------------------------------------
    def prepare(self, layout: Layout) -> None:
        """Learn the model's layout and sizes; refuse a budget below the smallest sub-MoE."""
        self.layout = layout
        self.full_bytes = layout.memory(layout.full)
        self.min_bytes = layout.memory(layout.smallest)
        needed = (
            f"the dense part alone is {layout.dense_bytes} bytes and the smallest sub-MoE (top-k experts "
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
        return self.layout.memory(structure)

    # -- plans -------------------------------------------------------------------------------------
    def plan(self, client_id: str) -> Plan:
        """The client's next step: profile the full model, wait for stage 1, or train its sub-MoE (read-only)."""
        record = self.clients.get(client_id)
        if record is not None and record.structure is not None:
            return Plan(Phase.TRAIN, record.structure, record.source, record.activation)
        if self.budget(client_id) >= self.full_bytes:
            done = record.profiles if record is not None else 0
            return Plan(Phase.PROFILE, measure=done >= self.warmup_rounds)
        if self.wait_for_stage_1 and not self.stage_1_done and not self.training_over:
            return Plan(Phase.WAIT)
        activation, source, origin = self._estimate(client_id, record.category if record is not None else None)
        return Plan(Phase.TRAIN, self._choose(client_id, activation), source, activation, origin=origin)

    @property
    def profilers(self) -> list[str]:
        """The clients whose budget holds the full model (they profile in stage 1)."""
        if self.budgets is None:
            return sorted(self.full_budget_clients)
        return sorted(client for client, budget in self.budgets.items() if budget >= self.full_bytes)

    @property
    def stage_1_done(self) -> bool:
        """Every profiling client has measured ``p`` (trivially so when none can)."""
        return all(
            client in self.clients and self.clients[client].source is Source.MEASURED for client in self.profilers
        )

    def structure_of(self, client_id: str) -> Structure | None:
        """The sub-MoE the client's next downlink carries (``None``: it profiles the full model)."""
        plan = self.plan(client_id)
        return None if plan.structure is None else [list(layer) for layer in plan.structure]

    def source_of(self, client_id: str) -> Source | None:
        """Where the client's next sub-MoE came from (``None``: it profiles)."""
        return self.plan(client_id).source

    def _estimate(self, client_id: str, category: str | None) -> tuple[list[torch.Tensor], Source, tuple[str, ...]]:
        """The best stage-1 ``p`` the server has for a client that cannot measure, its source and origin."""
        measured = [
            (cid, record)
            for cid, record in sorted(self.clients.items())
            if cid != client_id and record.source is Source.MEASURED and record.activation is not None
        ]
        same = [(cid, record) for cid, record in measured if category is not None and record.category == category]
        for chosen, source in ((same, Source.CATEGORY), (measured, Source.FEDERATION)):
            if chosen:
                pairs = [(record.activation, record.examples) for _cid, record in chosen if record.activation]
                return estimate_activation(pairs), source, tuple(cid for cid, _record in chosen)
        return uniform_prior(self.layout.num_experts), Source.PRIOR, ()

    def _choose(self, client_id: str, activation: Sequence[torch.Tensor]) -> Structure:
        """Stage 1: the largest coverage threshold whose sub-MoE fits the client's budget."""
        try:
            choice = choose_sub_moe(
                activation,
                budget_bytes=self.budget(client_id),
                dense_bytes=self.layout.dense_bytes,
                expert_bytes=self.layout.expert_bytes,
                min_experts=self.layout.top_k,
            )
        except FedExpertsError as error:
            raise FedExpertsError(f"{self.name}: {client_id}: {error}") from None
        chosen = [list(kept) for kept in choice.kept]
        if self.seed is None:
            return chosen
        # randomMoE: per layer, as many experts as the search chose, drawn with a seed of (*seed, client)
        draw = np.random.SeedSequence([*self.seed, zlib.crc32(client_id.encode())]).generate_state(1)[0]
        return random_sub_moe(self.layout.num_experts, [len(kept) for kept in chosen], int(draw))

    # -- records -----------------------------------------------------------------------------------
    def _record(self, client_id: str) -> ClientRecord:
        if client_id not in self.clients:
            self.clients[client_id] = ClientRecord(RecommendationState(self.patience))
        return self.clients[client_id]

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

        For experiments that fix structures by hand; checked against the layout and the budget.
        """
        chosen = self.layout.checked_structure(structure, client_id)
        if self.memory(chosen) > self.budget(client_id):
            raise FedExpertsError(
                f"{self.name}: {client_id}'s assigned sub-MoE needs {self.memory(chosen)} bytes, over its "
                f"budget of {self.budget(client_id)}"
            )
        record = self._record(client_id)
        record.structure, record.source, record.recommended = chosen, Source.ASSIGNED, False
        record.recommendation = RecommendationState(self.patience)
        if activation is not None:
            if [int(v.numel()) for v in activation] != self.layout.num_experts:
                raise FedExpertsError(f"{self.name}: activation of {client_id} does not match the expert counts")
            record.activation = normalised_layers(activation)
        if category is not None:
            record.category = category
        if examples:
            record.examples = int(examples)

    def observe(self, replies: Sequence[Reply], plans: Mapping[str, Plan]) -> None:
        """After a round: record the replies (to the steps ``plans`` gave), recommend, re-choose."""
        self._ingest(replies, plans)
        if self.recommends:
            self._recommend(replies, plans)
        self._rechoose()

    def _ingest(self, replies: Sequence[Reply], plans: Mapping[str, Plan]) -> None:
        for reply in replies:
            client_id = reply.client_id
            plan, record = plans[client_id], self._record(client_id)
            record.examples = reply.examples
            record.category = reply.category if reply.category is not None else record.category
            if plan.phase is Phase.PROFILE:
                record.profiles += 1
                if reply.activation is not None:
                    record.activation = normalised_layers(reply.activation)
                    record.source = Source.MEASURED
                    record.structure = self._choose(client_id, record.activation)
            elif plan.phase is Phase.TRAIN and record.structure is None:  # its first sub-MoE is now on record
                record.structure, record.source = plan.structure, plan.source
                record.activation = None if plan.activation is None else normalised_layers(plan.activation)
                record.origin = plan.origin

    # -- stage 2 -----------------------------------------------------------------------------------
    def _recommend(self, replies: Sequence[Reply], plans: Mapping[str, Plan]) -> None:
        """Feed each evaluated stage-2 client's score to its schedule; switch structures it decides."""
        current = {cid: r.structure for cid, r in self.clients.items() if r.structure is not None}
        pool = {
            cid: r.activation
            for cid, r in sorted(self.clients.items())
            if cid in current and r.activation is not None and r.source is not Source.PRIOR
        }
        origins = {cid: self.clients[cid].origin for cid in pool}
        for reply in sorted(replies, key=lambda r: r.client_id):
            client_id = reply.client_id
            plan, record = plans[client_id], self.clients[client_id]
            if reply.score is None or plan.structure is None:
                continue
            if client_id not in pool or record.structure != plan.structure:
                continue
            decision = record.recommendation.observe(
                reply.score, plan.structure, partial(self._propose, client_id, pool, current, origins)
            )
            if decision.action is not Action.KEEP and decision.structure is not None:
                record.structure = [sorted(layer) for layer in decision.structure]
                record.recommended = True

    def _propose(
        self,
        client_id: str,
        pool: Mapping[str, list[torch.Tensor]],
        current: Mapping[str, Structure],
        origins: Mapping[str, tuple[str, ...]],
    ) -> Structure:
        peers = {
            cid: vectors for cid, vectors in pool.items() if cid == client_id or not copies(cid, client_id, origins)
        }
        if len(peers) < 2:
            return current[client_id]
        proposal = recommend(
            client_id,
            peers,
            {cid: current[cid] for cid in peers},
            top_k_neighbours=self.top_k_neighbours,
            min_experts=self.layout.top_k,
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
            if len(kept[layer]) > self.layout.top_k[layer]:
                kept[layer].discard(expert)
        return [sorted(layer) for layer in kept]

    def _rechoose(self) -> None:
        """Re-choose provisional stage-1 sub-MoEs when a better estimate of ``p`` exists."""
        for client_id, record in sorted(self.clients.items()):
            if record.structure is None or record.recommended or record.source not in PROVISIONAL:
                continue
            activation, source, origin = self._estimate(client_id, record.category)
            assert record.source is not None
            if RANK[source] > RANK[record.source]:
                record.activation, record.source, record.origin = activation, source, origin
                record.structure = self._choose(client_id, activation)
                record.recommendation = RecommendationState(self.patience)

    def finish(self) -> None:
        """After the last round: a structure still under trial was never judged, so it is reverted (and frozen)."""
        self.training_over = True
        for _client_id, record in sorted(self.clients.items()):
            reverted = record.recommendation.abandon_trial()
            if reverted is not None:
                record.structure = reverted

    # -- checkpoint --------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every client's ``p`` (tensors) and the rest of its record (JSON, by client id)."""
        return records_to_state(self.clients)

    def load_state(self, tensors: Mapping[str, torch.Tensor], clients: Mapping[str, Any]) -> None:
        """Replace the records by what :meth:`state` saved (after :meth:`prepare`: it needs the layer count)."""
        self.clients = records_from_state(tensors, clients, len(self.layout.layer_names))
