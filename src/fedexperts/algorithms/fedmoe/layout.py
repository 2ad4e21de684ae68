"""What FedMoE knows of the model, as names and numbers: its MoE layers, expert-row tensors and byte sizes.

Learnt once per process from the prepared model (:func:`~fedexperts.algorithms.fedmoe.views.layout_of`)
and read by both sides: the server plans and aggregates with it, the client checks and slices with
it. Model-free, so scheduling is tested on a hand-made :class:`Layout`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from fedexperts.errors import FedExpertsError

Structure = list[list[int]]
"""Sorted global expert indices per MoE layer, in :func:`~fedexperts.moe.moe_layers` order."""


@dataclass(frozen=True)
class Layout:
    """The model's MoE layers and expert-row tensors (an empty layout before ``prepare``)."""

    layer_names: list[str] = field(default_factory=list)
    num_experts: list[int] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    """Expert-row tensor name -> index of its MoE layer."""
    dense: list[str] = field(default_factory=list)
    """The shared tensors every client trains whole (the scope: attention LoRA by default)."""
    dense_bytes: int = 0
    """What the dense part costs a client under the budget's counting (``algorithm.fedmoe.budget_counts``)."""
    expert_bytes: list[int] = field(default_factory=list)
    """What one routed expert of each MoE layer (its rows of every expert-row tensor) costs a client, likewise."""
    dense_elements: int = 0
    """Elements of every dense tensor (parameters and buffers), trained or frozen."""
    expert_elements: list[int] = field(default_factory=list)
    """Elements of one routed expert of each MoE layer."""

    def memory(self, structure: Sequence[Collection[int]]) -> int:
        """Bytes of a sub-MoE: the dense part plus its experts' rows."""
        sizes = self.expert_bytes
        return self.dense_bytes + sum(len(kept) * size for kept, size in zip(structure, sizes, strict=True))

    def float32_bytes(self, structure: Sequence[Collection[int]]) -> int:
        """Bytes of a sub-MoE's every weight in float32: one direction of a round as the FedMoE paper counts it."""
        sizes = self.expert_elements
        experts = sum(len(kept) * size for kept, size in zip(structure, sizes, strict=True))
        return 4 * (self.dense_elements + experts)

    @property
    def full(self) -> Structure:
        """Every expert of every layer."""
        return [list(range(count)) for count in self.num_experts]

    @property
    def smallest(self) -> Structure:
        """The router's top-k experts per layer: the smallest sub-MoE that still routes."""
        return [list(range(k)) for k in self.top_k]

    def held(self, structure: Structure) -> dict[str, list[int]]:
        """``{MoE layer name: global indices}``: a structure as the wire's metadata names it."""
        return {name: list(kept) for name, kept in zip(self.layer_names, structure, strict=True)}

    def checked_structure(self, structure: Sequence[Sequence[int]], where: str) -> Structure:
        """``structure`` sorted, after checking it names distinct experts, at least top-k, in every layer."""
        if len(structure) != len(self.layer_names):
            raise FedExpertsError(
                f"{where}: structure covers {len(structure)} layers, the model has {len(self.layer_names)}"
            )
        checked: Structure = []
        for name, kept, count, top_k in zip(self.layer_names, structure, self.num_experts, self.top_k, strict=True):
            indices = sorted(int(i) for i in kept)
            if len(set(indices)) != len(indices) or any(not 0 <= i < count for i in indices) or len(indices) < top_k:
                raise FedExpertsError(
                    f"{where}: {name} experts {list(kept)} must be distinct, in [0, {count}) and at least top-{top_k}"
                )
            checked.append(indices)
        return checked
