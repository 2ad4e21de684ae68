"""FedAvg and FedProx over a chosen scope of shared parameters, with any server optimizer.

FedAvg (McMahan et al., 2017): clients train the shared tensors from the global state; the server
takes their example-weighted average (or, with FedAvgM / FedAdagrad / FedAdam / FedYogi, steps
along it). FedProx (Li et al., 2020) adds ``mu / 2 * ||w - w_global||^2`` to every local loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.fedavg.config import DenseConfig, FedAvgConfig, FedProxConfig
from fedexperts.algorithms.settings import SharedScope
from fedexperts.interface import ClientContext, ProximalTerm
from fedexperts.moe.params import Role


class FedAvg(BaseAlgorithm):
    name = "fedavg"

    def __init__(
        self,
        config: FedAvgConfig | FedProxConfig | None = None,
        *,
        client_ids: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        config = config or FedAvgConfig()
        super().__init__(
            scope_rules(config.scope),
            lora=config.lora_or_none,
            server=config.server,
            expert_weighting=config.expert_weighting,
        )
        self.scope = config.scope


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(
        self, config: FedProxConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or FedProxConfig()
        super().__init__(config)
        self.mu = config.mu

    def proximal_term(self, context: ClientContext) -> ProximalTerm | None:
        shared = self._params(context.model, Role.SHARED)
        received = context.received.tensors
        anchors = {name: received[name].detach().to(param.device) for name, param in shared.items()}

        def term(trainable: Mapping[str, torch.Tensor]) -> torch.Tensor:
            total = sum(((trainable[name] - anchor) ** 2).sum() for name, anchor in anchors.items())
            return 0.5 * self.mu * torch.as_tensor(total)

        return term


class MoEAsDense(BaseAlgorithm):
    """Every weight, all routed experts included, is trained and averaged: the costly baseline."""

    name = "dense"

    def __init__(
        self, config: DenseConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or DenseConfig()
        super().__init__(
            scope_rules(SharedScope.EVERYTHING), server=config.server, expert_weighting=config.expert_weighting
        )
        self.scope = SharedScope.EVERYTHING

    @property
    def batching_refusal(self) -> str | None:
        return "dense trains every weight: its clients share no frozen base to batch through"
