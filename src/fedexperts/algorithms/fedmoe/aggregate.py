"""Stage 2 of FedMoE on the server: modular aggregation of heterogeneous sub-MoEs (model-free).

Reading of the paper's modular aggregation: an expert is a module; clients that pruned it neither
train nor send it, so each expert row is averaged, weighted by examples, over only the clients that
hold it, while the dense tensors (attention LoRA by default) are averaged over every client.
Tensors are named as in the full model; ``held`` gives each sent row's *global* expert index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedexperts.algorithms.aggregation import weighted_average
from fedexperts.algorithms.expert_weighting import keep_rows
from fedexperts.errors import FedExpertsError
from fedexperts.interface import State


@dataclass(frozen=True)
class ExpertUpdate:
    """One client's reply: its example count, its dense tensors, and the expert rows it holds.

    ``rows[name]`` has one row per held expert, in the order of ``held[name]``, which gives each
    row's *global* expert index (the sub-MoE's ``ExpertMap.local_to_global``). A tensor name the
    client does not send (it holds no expert of that layer) is simply absent from both.
    """

    weight: float
    rows: Mapping[str, torch.Tensor] = field(default_factory=dict)
    held: Mapping[str, Sequence[int]] = field(default_factory=dict)
    dense: Mapping[str, torch.Tensor] = field(default_factory=dict)
    row_weights: Mapping[str, Sequence[float]] = field(default_factory=dict)
    """Per tensor, a weight for each held row in ``held`` order (``algorithm.expert_weighting = "tokens"``: the
    tokens the client routed to that expert). Empty: every row weighs ``weight``."""

    def weights_of(self, name: str) -> torch.Tensor:
        """The weight of each held row of ``name`` (float64)."""
        if self.row_weights:
            return torch.tensor([float(w) for w in self.row_weights[name]], dtype=torch.float64)
        return torch.full((len(self.held[name]),), float(self.weight), dtype=torch.float64)


def _check_update(position: int, update: ExpertUpdate, global_rows: Mapping[str, torch.Tensor]) -> None:
    if not math.isfinite(update.weight) or update.weight <= 0:
        raise FedExpertsError(f"update {position}: weight (examples) must be positive, got {update.weight}")
    if set(update.rows) != set(update.held):
        raise FedExpertsError(
            f"update {position}: rows and held name different tensors: {sorted(set(update.rows) ^ set(update.held))}"
        )
    for name, rows in update.rows.items():
        if name not in global_rows:
            raise FedExpertsError(f"update {position}: {name!r} is not an expert-row tensor of the global model")
        full = global_rows[name]
        indices = [int(i) for i in update.held[name]]
        if rows.dim() == 0 or rows.shape[0] != len(indices) or rows.shape[1:] != full.shape[1:]:
            raise FedExpertsError(
                f"update {position}: {name} rows of shape {tuple(rows.shape)} do not fit {len(indices)} held experts "
                f"of a {tuple(full.shape)} tensor"
            )
        if len(set(indices)) != len(indices) or any(not 0 <= i < full.shape[0] for i in indices):
            raise FedExpertsError(
                f"update {position}: {name} held indices {indices} must be distinct and in [0, {full.shape[0]})"
            )
    if update.row_weights:
        if set(update.row_weights) != set(update.rows):
            raise FedExpertsError(f"update {position}: row weights must name exactly the tensors it sends")
        for name, weights in update.row_weights.items():
            values = [float(w) for w in weights]
            if len(values) != len(update.held[name]) or not all(math.isfinite(w) and w >= 0 for w in values):
                raise FedExpertsError(
                    f"update {position}: {name} needs one finite non-negative weight per held row, got {len(values)}"
                )


def modular_average(global_rows: Mapping[str, torch.Tensor], updates: Sequence[ExpertUpdate]) -> State:
    """Each expert row averaged, weighted by examples (or its row weights), over only the clients that hold it.

    Reading of the paper's modular aggregation: an expert is a module; clients that pruned it
    neither train nor send it, so they must not pull it towards their stale copy. A row nobody
    holds (or, with row weights, nobody routed to) keeps its global value. Accumulated in float64;
    results on the CPU in each global tensor's dtype (as :func:`weighted_average`).
    """
    for position, update in enumerate(updates):
        _check_update(position, update, global_rows)
    averaged: State = {}
    for name, full in global_rows.items():
        sums = torch.zeros(full.shape, dtype=torch.float64)
        weights = torch.zeros(full.shape[0], dtype=torch.float64)
        for update in updates:
            if name not in update.rows:
                continue
            index = torch.tensor([int(i) for i in update.held[name]], dtype=torch.long)
            rows = update.rows[name].detach().to(device="cpu", dtype=torch.float64)
            row_weights = update.weights_of(name)
            shape = (-1,) + (1,) * (full.dim() - 1)
            sums.index_add_(0, index, rows * row_weights.reshape(shape))
            weights.index_add_(0, index, row_weights)
        result = full.detach().to(device="cpu", dtype=torch.float64).clone()
        held = weights > 0
        shape = (-1,) + (1,) * (full.dim() - 1)
        result[held] = sums[held] / weights[held].reshape(shape)
        averaged[name] = result.to(full.dtype)
    return averaged


def aggregate_fedmoe(
    global_dense: Mapping[str, torch.Tensor],
    global_rows: Mapping[str, torch.Tensor],
    updates: Sequence[ExpertUpdate],
) -> State:
    """FedMoE's aggregate: dense tensors averaged over every client, expert rows over their holders.

    Every update must carry exactly the dense tensors of ``global_dense`` (all clients train the
    same dense part). With no update the global state comes back unchanged. The result is the
    new averaged state; a server optimizer, if any, is applied by the caller.
    """
    overlap = set(global_dense) & set(global_rows)
    if overlap:
        raise FedExpertsError(f"tensors both dense and expert-row: {sorted(overlap)[:5]}")
    if not updates:
        return {name: tensor.detach().clone() for name, tensor in {**global_dense, **global_rows}.items()}
    for position, update in enumerate(updates):
        if set(update.dense) != set(global_dense):
            raise FedExpertsError(
                f"update {position}: dense tensors differ from the global ones: "
                f"{sorted(set(update.dense) ^ set(global_dense))[:5]}"
            )
    dense = weighted_average([(update.dense, float(update.weight)) for update in updates]) if global_dense else {}
    return {**dense, **modular_average(global_rows, updates)}


def keep_unheld_rows(before: State, stepped: State, updates: Sequence[ExpertUpdate], names: Iterable[str]) -> State:
    """``stepped`` with every row of ``names`` no update held with a positive weight put back as in ``before``.

    A server optimizer with momentum would otherwise move a row nobody trained this round; rows no
    sampled client held keep their value under every server rule (their moments still decay).
    """
    masks: dict[str, torch.Tensor] = {}
    for name in names:
        touched = torch.zeros(before[name].shape[0], dtype=torch.bool)
        for update in updates:
            if name in update.held:
                index = torch.tensor([int(i) for i in update.held[name]], dtype=torch.long)
                touched[index[update.weights_of(name) > 0]] = True
        masks[name] = ~touched
    return keep_rows(before, stepped, masks)
