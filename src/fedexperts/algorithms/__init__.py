"""Federated algorithms: what is shared or personal, how clients are built, how the server aggregates.

The public names load lazily, so importing an algorithm's config (``fedexperts.algorithms.flex.config``,
torch-free) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedexperts.algorithms.aggregation import ServerOptimizer, weighted_average
    from fedexperts.algorithms.base import BaseAlgorithm, attention_linear_names, scope_rules
    from fedexperts.algorithms.expert_weighting import token_weighted_average
    from fedexperts.algorithms.fedavg.algorithm import FedAvg, FedProx, MoEAsDense
    from fedexperts.algorithms.feddpa.algorithm import FedDPA
    from fedexperts.algorithms.fedmoe.algorithm import FedMoE
    from fedexperts.algorithms.fedmoe.random_moe import RandomMoE
    from fedexperts.algorithms.fedsa_lora.algorithm import FedSALoRA
    from fedexperts.algorithms.ffa_lora.algorithm import FFALoRA
    from fedexperts.algorithms.flex.algorithm import FLEx, grafted_experts
    from fedexperts.algorithms.local.algorithm import LocalOnly
    from fedexperts.algorithms.random_expert.algorithm import RandomExpert
    from fedexperts.algorithms.registry import AlgorithmConfig, build_algorithm
    from fedexperts.algorithms.settings import (
        ExpertWeighting,
        LoraConfig,
        ServerConfig,
        ServerRule,
        ServerVariant,
        SharedScope,
    )

_WHERE = {
    "ServerOptimizer": "aggregation",
    "weighted_average": "aggregation",
    "BaseAlgorithm": "base",
    "attention_linear_names": "base",
    "scope_rules": "base",
    "token_weighted_average": "expert_weighting",
    "FedAvg": "fedavg.algorithm",
    "FedProx": "fedavg.algorithm",
    "MoEAsDense": "fedavg.algorithm",
    "FedDPA": "feddpa.algorithm",
    "FedSALoRA": "fedsa_lora.algorithm",
    "FFALoRA": "ffa_lora.algorithm",
    "FedMoE": "fedmoe.algorithm",
    "RandomMoE": "fedmoe.random_moe",
    "FLEx": "flex.algorithm",
    "grafted_experts": "flex.algorithm",
    "LocalOnly": "local.algorithm",
    "RandomExpert": "random_expert.algorithm",
    "AlgorithmConfig": "registry",
    "build_algorithm": "registry",
    "ExpertWeighting": "settings",
    "LoraConfig": "settings",
    "ServerConfig": "settings",
    "ServerRule": "settings",
    "ServerVariant": "settings",
    "SharedScope": "settings",
}

__all__ = [
    "AlgorithmConfig",
    "BaseAlgorithm",
    "ExpertWeighting",
    "FFALoRA",
    "FLEx",
    "FedAvg",
    "FedDPA",
    "FedMoE",
    "FedProx",
    "FedSALoRA",
    "LocalOnly",
    "LoraConfig",
    "MoEAsDense",
    "RandomExpert",
    "RandomMoE",
    "ServerConfig",
    "ServerOptimizer",
    "ServerRule",
    "ServerVariant",
    "SharedScope",
    "attention_linear_names",
    "build_algorithm",
    "grafted_experts",
    "scope_rules",
    "token_weighted_average",
    "weighted_average",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
