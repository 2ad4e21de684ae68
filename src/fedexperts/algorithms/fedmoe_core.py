"""The model-free core of FedMoE (Mei et al., "FedMoE: Personalized Federated Learning via
Heterogeneous Mixture of Experts", arXiv 2408.11304).

FedMoE fine-tunes in two stages. Stage 1 profiles which experts each client's data activates and
searches, heuristically, for a sub-MoE per client that fits its memory; stage 2 trains those
heterogeneous sub-MoEs federatedly, aggregates them module by module (an expert is averaged only
among the clients that hold it), and progressively adjusts each client's structure with experts
recommended from clients whose activation patterns look alike.

Only the paper's abstract and introduction could be read (the method sections were not
available), so the concrete rules below are this project's reading, each stated where it is
implemented: the coverage-threshold search of :func:`choose_sub_moe`, the data-size-weighted
estimate of :func:`estimate_activation`, the holder-only example-weighted mean of
:func:`modular_average`, the cosine-similarity neighbours of :func:`recommend` and the
patience / trial / revert-and-freeze rule of :class:`RecommendationState`.

Everything here works on plain tensors and index lists, so it is tested without a model; the
:class:`~fedexperts.algorithms.base.Algorithm` subclass moves tensors between models and these
functions. Expert indices are always *global* (indices into the full model's layer).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from fedexperts.algorithms.aggregation import State, weighted_average
from fedexperts.errors import FedExpertsError
from fedexperts.moe.families import ExpertLayout, moe_layers, unwrap_model

# ---------------------------------------------------------------------------------------------
# Memory of a sub-MoE
# ---------------------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _resolve(module: nn.Module, dotted: str) -> torch.Tensor | None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    value = getattr(owner, leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def expert_and_dense_bytes(model: nn.Module) -> tuple[int, list[int]]:
    """``(dense bytes, bytes of one routed expert of each MoE layer)`` of a loaded model.

    A routed expert costs its rows of every tensor with one row per expert: the fused expert
    tensors (or its own module, for Switch Transformers) and its router rows, router bias and
    DeepSeek-V3's score-correction bias. Everything else (attention, embeddings, norms, dense MLPs,
    shared experts, buffers) is dense. Layers are in :func:`~fedexperts.moe.moe_layers` order.
    """
    base = unwrap_model(model)
    total = sum(_tensor_bytes(p) for _, p in base.named_parameters()) + sum(
        _tensor_bytes(b) for _, b in base.named_buffers()
    )
    per_expert: list[int] = []
    expert_total = 0
    for layer in moe_layers(base):
        family = layer.family
        count = layer.num_experts
        row_tensors: list[tuple[str, torch.Tensor]] = []
        for name in family.router_expert_tensors:
            tensor = _resolve(layer.router, name)
            if tensor is not None:
                row_tensors.append((f"{layer.router_name}.{name}", tensor))
        layer_bytes = 0
        if family.layout is ExpertLayout.MODULE_PER_EXPERT:
            module_bytes = sum(_tensor_bytes(p) for p in layer.experts.parameters())
            if module_bytes % count:
                raise FedExpertsError(f"{layer.experts_name}: experts of unequal size ({module_bytes} bytes, {count})")
            layer_bytes += module_bytes // count
        else:
            for name in family.expert_tensors:
                tensor = _resolve(layer.experts, name)
                if tensor is not None:
                    row_tensors.append((f"{layer.experts_name}.{name}", tensor))
        for name, tensor in row_tensors:
            if tensor.dim() == 0 or tensor.shape[0] != count:
                raise FedExpertsError(
                    f"{name}: expected {count} rows (one per expert), got shape {tuple(tensor.shape)}"
                )
            layer_bytes += _tensor_bytes(tensor) // count
        per_expert.append(layer_bytes)
        expert_total += layer_bytes * count
    return total - expert_total, per_expert


# ---------------------------------------------------------------------------------------------
# Stage 1: sub-MoE search
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubMoEChoice:
    """The chosen coverage threshold, the kept global experts of each layer (sorted) and the memory."""

    theta: float
    kept: tuple[tuple[int, ...], ...]
    memory_bytes: int

    @property
    def counts(self) -> list[int]:
        return [len(experts) for experts in self.kept]

    def keep(self, layer_names: Sequence[str]) -> dict[str, list[int]]:
        """The choice as ``select_experts``' argument, given the MoE layers' names in order."""
        if len(layer_names) != len(self.kept):
            raise FedExpertsError(f"{len(layer_names)} layer names for a choice over {len(self.kept)} layers")
        return {name: list(experts) for name, experts in zip(layer_names, self.kept, strict=True)}


@dataclass(frozen=True)
class _Coverage:
    """One layer's experts by decreasing activation, and the cumulative share they cover."""

    order: tuple[int, ...]
    """Expert indices by decreasing probability, ties by lower index."""
    cumulative: tuple[float, ...]
    """``cumulative[m - 1]``: share covered by the first ``m`` experts of ``order``; ends at exactly 1.0."""
    minimum: int

    @classmethod
    def of(cls, probabilities: torch.Tensor, minimum: int, layer: int) -> _Coverage:
        p = _probabilities(probabilities, f"layer {layer}")
        if not 1 <= minimum <= len(p):
            raise FedExpertsError(f"layer {layer}: min_experts {minimum} must be between 1 and {len(p)}")
        order = tuple(sorted(range(len(p)), key=lambda i: (-p[i], i)))
        running, sums = 0.0, []
        for index in order:
            running += p[index]
            sums.append(running)
        # partial <= total and x / x == 1.0 exactly, so the shares are non-decreasing and end at 1.0
        return cls(order, tuple(value / running for value in sums), minimum)

    def count(self, theta: float) -> int:
        """Smallest number of top experts covering ``theta`` (at least ``minimum``).

        ``bisect_left`` finds the first prefix whose share is >= theta; theta <= 0 is covered by
        no expert at all, theta > 1 only by all of them.
        """
        needed = 0 if theta <= 0 else min(bisect.bisect_left(self.cumulative, theta) + 1, len(self.order))
        return max(needed, self.minimum)

    def kept(self, count: int) -> tuple[int, ...]:
        return tuple(sorted(self.order[:count]))


def _probabilities(vector: torch.Tensor, where: str) -> list[float]:
    """A 1-D non-negative vector with a positive sum, as Python floats (not yet normalised)."""
    if vector.dim() != 1 or vector.numel() == 0:
        raise FedExpertsError(f"{where}: activation must be a non-empty 1-D vector, got shape {tuple(vector.shape)}")
    values = [float(v) for v in vector.detach().to(device="cpu", dtype=torch.float64).tolist()]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise FedExpertsError(f"{where}: activation probabilities must be finite and non-negative")
    if sum(values) <= 0:
        raise FedExpertsError(f"{where}: activation is all zero (no token was routed in this layer)")
    return values


class _Search:
    """Shared set-up and memory accounting of the bisection and the exact search."""

    def __init__(
        self,
        activation: Sequence[torch.Tensor],
        budget_bytes: int,
        dense_bytes: int,
        expert_bytes: Sequence[int],
        min_experts: Sequence[int],
    ) -> None:
        if not activation:
            raise FedExpertsError("no MoE layer to choose experts for")
        if not len(activation) == len(expert_bytes) == len(min_experts):
            raise FedExpertsError(
                f"activation, expert_bytes and min_experts must cover the same layers; got "
                f"{len(activation)}, {len(expert_bytes)} and {len(min_experts)}"
            )
        if dense_bytes < 0 or any(size < 0 for size in expert_bytes):
            raise FedExpertsError("byte sizes must be non-negative")
        self.layers = [
            _Coverage.of(vector, int(minimum), index)
            for index, (vector, minimum) in enumerate(zip(activation, min_experts, strict=True))
        ]
        self.budget = int(budget_bytes)
        self.dense = int(dense_bytes)
        self.sizes = [int(size) for size in expert_bytes]

    def memory(self, counts: Sequence[int]) -> int:
        return self.dense + sum(count * size for count, size in zip(counts, self.sizes, strict=True))

    def counts(self, theta: float) -> list[int]:
        return [layer.count(theta) for layer in self.layers]

    def fits(self, theta: float) -> bool:
        return self.memory(self.counts(theta)) <= self.budget

    def choice(self, theta: float) -> SubMoEChoice:
        counts = self.counts(theta)
        kept = tuple(layer.kept(count) for layer, count in zip(self.layers, counts, strict=True))
        return SubMoEChoice(theta, kept, self.memory(counts))

    def trivial(self) -> SubMoEChoice | None:
        """The whole model if it fits; an error if not even the smallest sub-MoE fits; else ``None``."""
        full = self.memory([len(layer.order) for layer in self.layers])
        if self.budget >= full:
            return SubMoEChoice(1.0, tuple(tuple(range(len(layer.order))) for layer in self.layers), full)
        minimum = self.memory([layer.minimum for layer in self.layers])
        if self.budget < minimum:
            raise FedExpertsError(
                f"memory budget of {self.budget} bytes is too small: the dense part alone is {self.dense} bytes "
                f"and the smallest sub-MoE (the minimum experts of every layer) needs {minimum} bytes"
            )
        return None

    def breakpoints(self, low: float, high: float) -> list[float]:
        """Every theta in ``[low, high)`` where some layer's kept set can change, plus 0 and 1."""
        values = {0.0, 1.0}
        for layer in self.layers:
            values.update(layer.cumulative)
        return sorted(value for value in values if low <= value < high)


def choose_sub_moe(
    activation: Sequence[torch.Tensor],
    *,
    budget_bytes: int,
    dense_bytes: int,
    expert_bytes: Sequence[int],
    min_experts: Sequence[int],
    tolerance: float = 1e-4,
) -> SubMoEChoice:
    """Stage 1: the largest coverage threshold theta whose sub-MoE fits the memory budget.

    Reading of the paper's "heuristic search based on observed activation patterns": for a
    threshold theta, every layer keeps its most-activated experts until their activation shares
    sum to at least theta (ties by lower index, never fewer than ``min_experts``, the router's
    top-k); one theta for all layers, so layers whose tokens spread over many experts keep more.
    ``activation[l]`` needs only be non-negative with a positive sum: it is normalised here (the
    routing recorder's fractions sum to top-k). When the whole model fits it is kept whole
    (theta = 1) even if some experts were never activated.

    Memory is monotone in theta, so theta is bisected on [0, 1] until the bracket is narrower than
    ``tolerance``; the kept sets are step functions of theta, so the answer is then made exact by
    checking the few breakpoints left in the bracket: the result equals
    :func:`choose_sub_moe_exact`'s, whatever ``tolerance`` is.
    """
    # Monotonicity, which the bisection relies on. For theta1 <= theta2 and any layer, every
    # prefix of the layer's order whose share is >= theta2 also has share >= theta1, so the
    # smallest covering prefix for theta1 is no longer than the one for theta2; taking the max
    # with the fixed minimum keeps that order. So kept_l(theta) is non-decreasing (and the kept
    # sets are nested, being prefixes of one fixed order), and memory = dense + sum_l kept_l *
    # expert_bytes[l] with expert_bytes[l] >= 0 is non-decreasing in theta.
    # Steps. kept_l is constant on every interval (c_i, c_{i+1}] between consecutive breakpoints
    # (the layers' cumulative shares, with 0 and 1), so the largest fitting theta is a breakpoint.
    if not 0 < tolerance <= 1:
        raise FedExpertsError(f"tolerance must be in (0, 1], got {tolerance}")
    search = _Search(activation, budget_bytes, dense_bytes, expert_bytes, min_experts)
    trivial = search.trivial()
    if trivial is not None:
        return trivial
    if search.fits(1.0):
        return search.choice(1.0)
    low, high = 0.0, 1.0  # invariant: low fits (the minimum fits, checked above), high does not
    while high - low > tolerance:
        middle = (low + high) / 2
        if not low < middle < high:  # the floats ran out
            break
        if search.fits(middle):
            low = middle
        else:
            high = middle
    # low lies in some step (c_i, c_{i+1}] (or is 0); c_{i+1} has low's memory, so it fits, and it
    # is < high because high is in a later step. Every fitting breakpoint is < high, so the best one
    # is the largest fitting breakpoint in [low, high); memory is monotone, so scan from the top.
    for theta in reversed(search.breakpoints(low, high)):
        if search.fits(theta):
            return search.choice(theta)
    raise AssertionError("bisection lost its invariant")  # pragma: no cover - proven above


def choose_sub_moe_exact(
    activation: Sequence[torch.Tensor],
    *,
    budget_bytes: int,
    dense_bytes: int,
    expert_bytes: Sequence[int],
    min_experts: Sequence[int],
) -> SubMoEChoice:
    """The same choice as :func:`choose_sub_moe`, by trying every breakpoint from the largest down.

    The kept sets only change where theta crosses a layer's cumulative share, so the maximum
    fitting theta is one of those finitely many values (with 0 and 1): a reference for the
    bisection, and cheap enough to use directly (one evaluation per expert at most).
    """
    search = _Search(activation, budget_bytes, dense_bytes, expert_bytes, min_experts)
    trivial = search.trivial()
    if trivial is not None:
        return trivial
    for theta in reversed(search.breakpoints(0.0, math.inf)):
        if search.fits(theta):
            return search.choice(theta)
    raise AssertionError("theta = 0 is the minimum sub-MoE, which fits")  # pragma: no cover


def random_sub_moe(num_experts: Sequence[int], counts: Sequence[int], seed: int) -> list[list[int]]:
    """A uniformly random sub-MoE with ``counts[l]`` of layer l's experts (the random baseline).

    Give it a :class:`SubMoEChoice`'s ``counts`` to compare activation-guided with random choice
    at equal memory. Deterministic per seed; each layer's indices are sorted.
    """
    if len(num_experts) != len(counts):
        raise FedExpertsError(f"{len(num_experts)} expert counts but {len(counts)} kept counts")
    generator = torch.Generator().manual_seed(int(seed))
    chosen: list[list[int]] = []
    for layer, (total, count) in enumerate(zip(num_experts, counts, strict=True)):
        if not 1 <= count <= total:
            raise FedExpertsError(f"layer {layer}: cannot keep {count} of {total} experts")
        chosen.append(sorted(torch.randperm(int(total), generator=generator)[: int(count)].tolist()))
    return chosen


# ---------------------------------------------------------------------------------------------
# Activation estimate for clients that cannot profile the full model
# ---------------------------------------------------------------------------------------------


def _normalised(vector: torch.Tensor, where: str) -> torch.Tensor:
    values = torch.tensor(_probabilities(vector, where), dtype=torch.float64)
    return values / values.sum()


def estimate_activation(neighbours: Sequence[tuple[Sequence[torch.Tensor], int]]) -> list[torch.Tensor]:
    """Per-layer activation for a client too small to run the full model for profiling.

    Reading: the estimate is the data-size-weighted mean of the activation of clients of the same
    category that could profile, each layer's vector normalised to sum to 1 before and after
    averaging (float64, on the CPU). ``neighbours`` holds ``(per-layer activation, examples)``.
    """
    if not neighbours:
        raise FedExpertsError(
            "cannot estimate expert activation: no client of the same category profiled the full model"
        )
    layer_count = len(neighbours[0][0])
    for position, (vectors, examples) in enumerate(neighbours):
        if len(vectors) != layer_count:
            raise FedExpertsError(f"neighbour {position} has {len(vectors)} layers, the first has {layer_count}")
        if examples < 0:
            raise FedExpertsError(f"neighbour {position} has a negative example count {examples}")
    total = float(sum(examples for _, examples in neighbours))
    if total <= 0:
        raise FedExpertsError("cannot estimate expert activation: the neighbours hold no examples")
    estimate: list[torch.Tensor] = []
    for layer in range(layer_count):
        sizes = {int(vectors[layer].numel()) for vectors, _ in neighbours}
        if len(sizes) != 1:
            raise FedExpertsError(f"layer {layer}: neighbours disagree on the expert count ({sorted(sizes)})")
        mean = sum(
            (_normalised(vectors[layer], f"neighbour {i}, layer {layer}") * (examples / total))
            for i, (vectors, examples) in enumerate(neighbours)
        )
        assert isinstance(mean, torch.Tensor)
        estimate.append(mean / mean.sum())
    return estimate


# ---------------------------------------------------------------------------------------------
# Stage 2: modular aggregation
# ---------------------------------------------------------------------------------------------


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


def modular_average(global_rows: Mapping[str, torch.Tensor], updates: Sequence[ExpertUpdate]) -> State:
    """Each expert row averaged, weighted by examples, over only the clients that hold it.

    Reading of the paper's modular aggregation: an expert is a module; clients that pruned it
    neither train nor send it, so they must not pull it towards their stale copy. A row nobody
    holds keeps its global value. Accumulated in float64; results on the CPU in each global
    tensor's dtype (as :func:`weighted_average`).
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
            sums.index_add_(0, index, rows * update.weight)
            weights.index_add_(0, index, torch.full((len(index),), float(update.weight), dtype=torch.float64))
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


# ---------------------------------------------------------------------------------------------
# Stage 2: expert recommendation
# ---------------------------------------------------------------------------------------------


def _flattened(client: str, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([_normalised(v, f"client {client!r}, layer {i}") for i, v in enumerate(vectors)])


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def recommend(
    client: str,
    activations: Mapping[str, Sequence[torch.Tensor]],
    current: Mapping[str, Sequence[Sequence[int]]],
    *,
    top_k_neighbours: int,
    min_experts: Sequence[int],
) -> list[list[int]]:
    """A new structure for ``client`` (sorted global indices per layer) from similar clients.

    ``activations`` holds every client's per-layer activation over the *global* experts (zeros
    for experts a client does not hold; each layer normalised here), ``current`` every client's
    kept experts. Reading of the paper's global expert recommendation:

    * similarity: cosine between the client's concatenated per-layer vectors and each other
      client's; the ``top_k_neighbours`` most similar are its neighbours (ties by client id);
    * estimate: the client's activation of every expert is the mean of the neighbours' weighted
      by their similarity (non-negative, since activations are; a plain mean if all are zero);
    * size: per layer the target count is the neighbours' mean kept count rounded half up,
      clamped to ``[min_experts[l], layer size]``;
    * change: below the target, add the highest-estimated experts the client lacks; above it,
      drop its lowest-estimated ones (ties: add lower indices first, drop higher ones first).
    """
    if top_k_neighbours < 1:
        raise FedExpertsError(f"top_k_neighbours must be at least 1, got {top_k_neighbours}")
    missing = [name for name in [client, *activations] if name not in current]
    if client not in activations or missing:
        raise FedExpertsError(
            f"recommend: need the activation and structure of {client!r} and the structure of every client; "
            f"missing structures: {missing}"
        )
    own = activations[client]
    layer_sizes = [int(v.numel()) for v in own]
    if len(min_experts) != len(own):
        raise FedExpertsError(f"min_experts covers {len(min_experts)} layers, the activation {len(own)}")
    for name, vectors in activations.items():
        if [int(v.numel()) for v in vectors] != layer_sizes or len(current[name]) != len(layer_sizes):
            raise FedExpertsError(f"client {name!r} has a different layer structure from {client!r}")
    others = sorted(name for name in activations if name != client)
    if not others:
        raise FedExpertsError(f"recommend: {client!r} has no other client to learn from")

    target = _flattened(client, own)
    similarity = {
        name: float(torch.nn.functional.cosine_similarity(target, _flattened(name, activations[name]), dim=0))
        for name in others
    }
    neighbours = sorted(others, key=lambda name: (-similarity[name], name))[:top_k_neighbours]
    weights = [max(similarity[name], 0.0) for name in neighbours]
    if sum(weights) <= 0:
        weights = [1.0] * len(neighbours)
    total = sum(weights)

    structure: list[list[int]] = []
    for layer, size in enumerate(layer_sizes):
        estimate = sum(
            _normalised(activations[name][layer], f"client {name!r}, layer {layer}") * (weight / total)
            for name, weight in zip(neighbours, weights, strict=True)
        )
        assert isinstance(estimate, torch.Tensor)
        score = estimate.tolist()
        mean_count = sum(len(current[name][layer]) for name in neighbours) / len(neighbours)
        goal = min(max(_round_half_up(mean_count), int(min_experts[layer])), size)
        held = {int(i) for i in current[client][layer]}
        if len(held) < goal:
            candidates = sorted((i for i in range(size) if i not in held), key=lambda i: (-score[i], i))
            held.update(candidates[: goal - len(held)])
        elif len(held) > goal:
            ranked = sorted(held, key=lambda i: (score[i], -i))
            held.difference_update(ranked[: len(held) - goal])
        structure.append(sorted(held))
    return structure


class Action(StrEnum):
    KEEP = "keep"
    ADJUST = "adjust"
    """Try the proposed structure; the next evaluation decides whether it stays."""
    REVERT = "revert"
    """The trial did not beat the best score: go back to the previous structure, for good."""


@dataclass(frozen=True)
class Decision:
    action: Action
    structure: list[list[int]] | None = None
    """The structure to switch to (``None`` for KEEP)."""


@dataclass
class RecommendationState:
    """Per-client schedule of structure changes in stage 2.

    Reading of the paper's progressive adjustment: after every evaluation, :meth:`observe` is given
    the client's validation score. While it improves, nothing changes. After ``patience``
    evaluations without improvement (by more than ``min_delta``), a new structure is proposed
    (``propose``, normally :func:`recommend`) and the old one remembered. The next evaluation
    judges the trial: better than the best before it, and the new structure stays (and the cycle
    starts again); otherwise the client reverts to the remembered structure and its structure is
    frozen for the rest of training (no oscillation between structures).
    """

    patience: int
    higher_is_better: bool = True
    min_delta: float = 0.0
    best: float | None = None
    stale: int = 0
    previous: list[list[int]] | None = None
    """Structure before the adjustment under trial (``None``: no trial running)."""
    best_before_trial: float | None = None
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise FedExpertsError(f"patience must be at least 1, got {self.patience}")

    def _improves(self, score: float, reference: float | None) -> bool:
        if reference is None:
            return True
        return score > reference + self.min_delta if self.higher_is_better else score < reference - self.min_delta

    def observe(
        self, score: float, structure: Sequence[Sequence[int]], propose: Callable[[], list[list[int]]]
    ) -> Decision:
        """Record one evaluation of the client on its current ``structure`` and say what to do."""
        if not math.isfinite(score):
            raise FedExpertsError(f"validation score must be finite, got {score}")
        if self.frozen:
            return Decision(Action.KEEP)
        if self.previous is not None:  # judging a trial
            if self._improves(score, self.best_before_trial):
                self.best, self.stale = score, 0
                self.previous, self.best_before_trial = None, None
                return Decision(Action.KEEP)
            reverted = self.previous
            self.previous, self.frozen = None, True
            self.best = self.best_before_trial
            return Decision(Action.REVERT, reverted)
        if self._improves(score, self.best):
            self.best, self.stale = score, 0
            return Decision(Action.KEEP)
        self.stale += 1
        if self.stale < self.patience:
            return Decision(Action.KEEP)
        self.stale = 0
        proposal = [sorted(int(i) for i in layer) for layer in propose()]
        now = [sorted(int(i) for i in layer) for layer in structure]
        if proposal == now:  # nothing to try; wait another `patience` evaluations
            return Decision(Action.KEEP)
        self.previous, self.best_before_trial = now, self.best
        return Decision(Action.ADJUST, proposal)

    def to_json(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "higher_is_better": self.higher_is_better,
            "min_delta": self.min_delta,
            "best": self.best,
            "stale": self.stale,
            "previous": self.previous,
            "best_before_trial": self.best_before_trial,
            "frozen": self.frozen,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecommendationState:
        previous = data.get("previous")
        return cls(
            patience=int(data["patience"]),
            higher_is_better=bool(data.get("higher_is_better", True)),
            min_delta=float(data.get("min_delta", 0.0)),
            best=None if data.get("best") is None else float(data["best"]),
            stale=int(data.get("stale", 0)),
            previous=None if previous is None else [[int(i) for i in layer] for layer in previous],
            best_before_trial=None if data.get("best_before_trial") is None else float(data["best_before_trial"]),
            frozen=bool(data.get("frozen", False)),
        )
