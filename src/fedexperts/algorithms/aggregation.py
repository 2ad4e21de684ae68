"""Server-side aggregation: example-weighted averaging and the adaptive server optimizers.

The server optimizers follow Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2: the pseudo-gradient is the weighted mean client change ``delta = avg(x_i) - x``;
FedAvgM (Hsu et al., 2019) keeps server momentum ``v = beta * v + delta; x += lr * v``; FedAdagrad,
FedAdam and FedYogi keep ``m = beta1 * m + (1 - beta1) * delta`` and a second moment started at
``tau**2`` (``v_{-1} >= tau^2`` in the paper), and step ``x += lr * m / (sqrt(v) + tau)`` without bias
correction. Written here because torch's optimizers do not take pseudo-gradients from averaged
client models and Flower's strategies do not run in the in-process runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedexperts.algorithms.settings import ServerConfig, ServerRule
from fedexperts.errors import FedExpertsError
from fedexperts.interface import State


def weighted_average(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> State:
    """Per-key average of client tensors weighted by example counts (accumulated in float64).

    Every update must carry the same keys; keys held by only some clients are averaged by the
    caller among their holders (FedMoE's modular aggregation).
    """
    if not updates:
        raise FedExpertsError("cannot average zero updates")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise FedExpertsError(f"client weights must sum to a positive number, got {total}")
    keys = set(updates[0][0])
    for tensors, _ in updates[1:]:
        if set(tensors) != keys:
            raise FedExpertsError(f"updates disagree on keys: {sorted(keys ^ set(tensors))[:5]}")
    averaged: State = {}
    for key in updates[0][0]:
        reference = updates[0][0][key]
        accumulator = torch.zeros(reference.shape, dtype=torch.float64)
        for tensors, weight in updates:
            accumulator += tensors[key].detach().to(device="cpu", dtype=torch.float64) * (weight / total)
        averaged[key] = accumulator.to(reference.dtype)
    return averaged


@dataclass
class ServerOptimizer:
    """Applies the averaged client result to the global state with one of :class:`ServerRule`.

    With ``FEDAVG`` and ``lr=1`` the new global state is the weighted average itself.
    """

    config: ServerConfig = field(default_factory=ServerConfig)
    first_moment: State = field(default_factory=dict)
    second_moment: State = field(default_factory=dict)

    def step(self, global_state: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> State:
        """The next global state from the current one and the clients' weighted average."""
        updated: State = {}
        for key, current in global_state.items():
            if key not in averaged:
                updated[key] = current
                continue
            x = current.detach().to(torch.float64)
            delta = averaged[key].detach().to(torch.float64) - x
            updated[key] = (x + self._direction(key, delta)).to(current.dtype)
        return updated

    def _direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.rule is ServerRule.FEDAVG:
            return c.lr * delta
        if c.rule is ServerRule.FEDAVGM:
            velocity = self.first_moment.get(key, torch.zeros_like(delta)) * c.momentum + delta
            self.first_moment[key] = velocity
            return c.lr * velocity
        m = self.first_moment.get(key, torch.zeros_like(delta)) * c.beta1 + (1 - c.beta1) * delta
        v = self.second_moment.get(key, torch.full_like(delta, c.tau**2))
        squared = delta * delta
        if c.rule is ServerRule.FEDADAGRAD:
            v = v + squared
        elif c.rule is ServerRule.FEDADAM:
            v = c.beta2 * v + (1 - c.beta2) * squared
        else:  # FedYogi
            v = v - (1 - c.beta2) * squared * torch.sign(v - squared)
        self.first_moment[key], self.second_moment[key] = m, v
        return c.lr * m / (v.sqrt() + c.tau)

    def state(self) -> State:
        """Moments as named tensors, for checkpoints."""
        return {
            **{f"first_moment/{key}": value for key, value in self.first_moment.items()},
            **{f"second_moment/{key}": value for key, value in self.second_moment.items()},
        }

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.first_moment, self.second_moment = {}, {}
        for name, value in tensors.items():
            kind, _, key = name.partition("/")
            if kind == "first_moment":
                self.first_moment[key] = value.to(torch.float64)
            elif kind == "second_moment":
                self.second_moment[key] = value.to(torch.float64)
            else:
                raise FedExpertsError(f"not a server-optimizer tensor: {name!r}")
