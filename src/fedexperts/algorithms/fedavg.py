"""FedAvg and FedProx over a chosen scope of shared parameters, with any server optimizer.

FedAvg (McMahan et al., 2017): clients train the shared tensors from the global state; the server
takes their example-weighted average (or, with FedAvgM / FedAdagrad / FedAdam / FedYogi, steps
along it). FedProx (Li et al., 2020) adds ``mu / 2 * ||w - w_global||^2`` to every local loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedexperts.algorithms.aggregation import ServerOptimizer
from fedexperts.algorithms.base import Algorithm, LoraSettings, SharedScope, scope_rules
from fedexperts.errors import FedExpertsError
from fedexperts.federation.payload import Payload
from fedexperts.moe.params import Role


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(
        self,
        scope: SharedScope = SharedScope.ATTENTION_LORA,
        *,
        lora: LoraSettings | None = None,
        server: ServerOptimizer | None = None,
    ) -> None:
        if scope is SharedScope.ATTENTION_LORA and lora is None:
            lora = LoraSettings()
        if scope is not SharedScope.ATTENTION_LORA and lora is not None:
            raise FedExpertsError(f"LoRA settings given but the shared scope is {scope.value!r}, not attention-lora")
        super().__init__(scope_rules(scope), lora=lora, server=server)
        self.scope = scope


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(
        self,
        mu: float,
        scope: SharedScope = SharedScope.ATTENTION_LORA,
        *,
        lora: LoraSettings | None = None,
        server: ServerOptimizer | None = None,
    ) -> None:
        if mu < 0:
            raise FedExpertsError(f"fedprox mu must be >= 0, got {mu}")
        super().__init__(scope, lora=lora, server=server)
        self.mu = mu

    def proximal_term(self, model: nn.Module, received: Payload) -> Callable[[], torch.Tensor] | None:
        shared = self._params(model, Role.SHARED)
        anchors = {name: received.tensors[name].detach().to(param.device) for name, param in shared.items()}

        def term() -> torch.Tensor:
            total = sum(((param - anchors[name]) ** 2).sum() for name, param in shared.items())
            return 0.5 * self.mu * torch.as_tensor(total)

        return term


class MoEAsDense(FedAvg):
    """Every weight, all routed experts included, is trained and averaged: the costly baseline."""

    name = "dense"

    def __init__(self, *, server: ServerOptimizer | None = None) -> None:
        super().__init__(SharedScope.EVERYTHING, server=server)
