"""Expert-activation vectors ``p``: checking and normalising them, and estimating them for small clients.

``p[l][e]`` is the share of layer ``l``'s routed tokens that expert ``e`` received (the routing
recorder's fractions, which sum to the router's top-k). Model-free: plain float64 tensors on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedexperts.errors import FedExpertsError


def probabilities(vector: torch.Tensor, where: str) -> list[float]:
    """A 1-D non-negative vector with a positive sum, as Python floats (not yet normalised)."""
    if vector.dim() != 1 or vector.numel() == 0:
        raise FedExpertsError(f"{where}: activation must be a non-empty 1-D vector, got shape {tuple(vector.shape)}")
    values = [float(v) for v in vector.detach().to(device="cpu", dtype=torch.float64).tolist()]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise FedExpertsError(f"{where}: activation probabilities must be finite and non-negative")
    if sum(values) <= 0:
        raise FedExpertsError(f"{where}: activation is all zero (no token was routed in this layer)")
    return values


def normalised(vector: torch.Tensor, where: str) -> torch.Tensor:
    """``vector`` checked by :func:`probabilities` and scaled to sum to 1 (float64)."""
    values = torch.tensor(probabilities(vector, where), dtype=torch.float64)
    return values / values.sum()


def normalised_layers(vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's vector as float64 on the CPU, divided by its sum (unchecked: replies were validated)."""
    out = []
    for vector in vectors:
        values = vector.detach().to(device="cpu", dtype=torch.float64)
        out.append(values / values.sum())
    return out


def uniform_prior(num_experts: Sequence[int]) -> list[torch.Tensor]:
    """Every expert alike, per layer: the estimate while no client has measured."""
    return [torch.full((count,), 1.0 / count, dtype=torch.float64) for count in num_experts]


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
            (normalised(vectors[layer], f"neighbour {i}, layer {layer}") * (examples / total))
            for i, (vectors, examples) in enumerate(neighbours)
        )
        assert isinstance(mean, torch.Tensor)
        estimate.append(mean / mean.sum())
    return estimate
