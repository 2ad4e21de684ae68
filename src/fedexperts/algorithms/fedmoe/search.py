"""Stage 1 of FedMoE: the sub-MoE search (and the random baseline's draw), on activation vectors alone.

FedMoE's paper (Mei et al., arXiv 2408.11304) describes the search only as a "heuristic search
based on observed activation patterns"; this module's reading is the coverage threshold of
:func:`choose_sub_moe`. Expert indices are *global* (indices into the full model's layer); memory is
counted from byte sizes given by the caller (:func:`~fedexperts.algorithms.fedmoe.views.expert_and_dense_bytes`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedexperts.algorithms.fedmoe.activation import probabilities
from fedexperts.errors import FedExpertsError


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
    def of(cls, activation: torch.Tensor, minimum: int, layer: int) -> _Coverage:
        p = probabilities(activation, f"layer {layer}")
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
