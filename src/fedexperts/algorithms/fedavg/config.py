"""Settings of FedAvg, FedProx and MoE-as-dense."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from fedexperts.algorithms.settings import (
    AlgorithmSettings,
    ExpertWeightingSettings,
    FederatedSettings,
    ServerConfig,
    SharedScope,
)


class _ScopedExperts(ExpertWeightingSettings, FederatedSettings):
    """FedAvg and FedProx share routed experts with scope ``everything``, routers also with ``non-expert``."""

    def unshared_experts(self) -> str | None:
        if self.scope in (SharedScope.EVERYTHING, SharedScope.NON_EXPERT):
            return None
        return f"scope {self.scope.value!r} shares none (scope everything or non-expert does)"


class FedAvgConfig(_ScopedExperts):
    name: Literal["fedavg"] = "fedavg"
    builder: ClassVar[str] = "fedexperts.algorithms.fedavg.algorithm:FedAvg"


class FedProxConfig(_ScopedExperts):
    name: Literal["fedprox"] = "fedprox"
    builder: ClassVar[str] = "fedexperts.algorithms.fedavg.algorithm:FedProx"
    mu: float = Field(0.01, ge=0)
    """FedProx's proximal weight: ``mu/2 ||w - w_global||^2`` is added to every local loss."""


class DenseConfig(ExpertWeightingSettings, AlgorithmSettings):
    """MoE as a dense model: every weight is trained and averaged, so there is no scope or LoRA to choose."""

    name: Literal["dense"] = "dense"
    builder: ClassVar[str] = "fedexperts.algorithms.fedavg.algorithm:MoEAsDense"
    server: ServerConfig = Field(default_factory=ServerConfig)
