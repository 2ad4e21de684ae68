"""Federated algorithms: what is shared or personal, how clients are built, how the server aggregates."""

from fedexperts.algorithms.aggregation import ServerOptimizer, ServerRule, weighted_average
from fedexperts.algorithms.base import (
    Algorithm,
    ClientInfo,
    ClientUpdate,
    LocalData,
    LoraSettings,
    SharedScope,
    attention_linear_names,
    scope_rules,
)
from fedexperts.algorithms.fedavg import FedAvg, FedProx, MoEAsDense
from fedexperts.algorithms.fedmoe import FedMoE, RandomMoE
from fedexperts.algorithms.flex import FLEx, grafted_experts
from fedexperts.algorithms.local import LocalOnly
from fedexperts.algorithms.random_expert import RandomExpert
from fedexperts.algorithms.registry import build_algorithm

__all__ = [
    "Algorithm",
    "ClientInfo",
    "ClientUpdate",
    "FLEx",
    "FedAvg",
    "FedMoE",
    "FedProx",
    "LocalData",
    "LocalOnly",
    "LoraSettings",
    "MoEAsDense",
    "RandomExpert",
    "RandomMoE",
    "ServerOptimizer",
    "ServerRule",
    "SharedScope",
    "attention_linear_names",
    "build_algorithm",
    "grafted_experts",
    "scope_rules",
    "weighted_average",
]
