"""Server-side aggregation: example-weighted averaging and the server rules.

The pseudo-gradient is the weighted mean client change ``delta = avg(x_i) - x``. FedAvg steps
``x += lr * delta``; FedAvgM (Hsu et al., 2019) keeps server momentum ``v = momentum * v + delta;
x += lr * v`` (Flower's FedAvgM is the same, with the pseudo-gradient's sign flipped). The adaptive
rules (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) come in two readings
(``algorithm.server.variant``):

* ``paper``, Algorithm 2 as written: ``m = beta1 * m + (1 - beta1) * delta`` for FedAdagrad, FedAdam
  and FedYogi, a second moment started at ``tau**2`` (``v_{-1} >= tau^2``), and the step
  ``x += lr * m / (sqrt(v) + tau)`` without bias correction.
* ``flower``, as ``flwr.serverapp.strategy`` (1.x) computes it: the second moment starts at 0; FedAdagrad
  has no first moment (``m = delta``: Flower fixes its ``beta_1`` at 0); FedAdam's step is
  ``lr * sqrt(1 - beta2**(t + 1)) / (1 - beta1**(t + 1))`` times ``m / (sqrt(v) + tau)``, with ``t`` the
  server round (1-based, so the first step already uses ``t + 1 = 2``: Flower's exponent, kept so the
  numbers agree). Here ``t`` counts the server's steps, which is the round when every round aggregates.

The second moments: FedAdagrad ``v += delta**2``, FedAdam ``v = beta2 * v + (1 - beta2) * delta**2``,
FedYogi ``v -= (1 - beta2) * delta**2 * sign(v - delta**2)``. Written here because torch's optimizers do
not take pseudo-gradients from averaged client models and Flower's strategies do not run in the
in-process runtime; ``tests/algorithms/test_server_rules_flower.py`` drives Flower's own strategies on the
same replies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedexperts.algorithms.settings import ServerConfig, ServerRule, ServerVariant
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
    steps: int = 0
    """Steps taken (FedAdam's bias correction under the ``flower`` variant reads it)."""

    def step(self, global_state: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> State:
        """The next global state from the current one and the clients' weighted average."""
        self.steps += 1
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
        lr = c.learning_rate
        if c.rule is ServerRule.FEDAVG:
            return lr * delta
        if c.rule is ServerRule.FEDAVGM:
            velocity = self.first_moment.get(key, torch.zeros_like(delta)) * c.momentum + delta
            self.first_moment[key] = velocity
            return lr * velocity
        flower = c.variant is ServerVariant.FLOWER
        beta1 = 0.0 if flower and c.rule is ServerRule.FEDADAGRAD else c.beta1
        m = self.first_moment.get(key, torch.zeros_like(delta)) * beta1 + (1 - beta1) * delta
        v = self.second_moment.get(key, torch.full_like(delta, 0.0 if flower else c.tau**2))
        squared = delta * delta
        if c.rule is ServerRule.FEDADAGRAD:
            v = v + squared
        elif c.rule is ServerRule.FEDADAM:
            v = c.beta2 * v + (1 - c.beta2) * squared
            if flower:
                t = self.steps + 1
                lr = lr * math.sqrt(1 - c.beta2**t) / (1 - c.beta1**t)
        else:  # FedYogi
            v = v - (1 - c.beta2) * squared * torch.sign(v - squared)
        self.first_moment[key], self.second_moment[key] = m, v
        return lr * m / (v.sqrt() + c.tau)

    def state(self) -> State:
        """Moments (and the step count) as named tensors, for checkpoints."""
        return {
            **{f"first_moment/{key}": value for key, value in self.first_moment.items()},
            **{f"second_moment/{key}": value for key, value in self.second_moment.items()},
            _STEPS: torch.tensor(self.steps, dtype=torch.int64),
        }

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.first_moment, self.second_moment, self.steps = {}, {}, 0
        for name, value in tensors.items():
            kind, _, key = name.partition("/")
            if name == _STEPS:
                self.steps = int(value)
            elif kind == "first_moment":
                self.first_moment[key] = value.to(torch.float64)
            elif kind == "second_moment":
                self.second_moment[key] = value.to(torch.float64)
            else:
                raise FedExpertsError(f"not a server-optimizer tensor: {name!r}")


_STEPS = "steps"
