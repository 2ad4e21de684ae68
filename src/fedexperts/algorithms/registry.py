"""Build an :class:`Algorithm` from its validated config section: the one place names become classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedexperts.algorithms.aggregation import ServerOptimizer
from fedexperts.algorithms.base import Algorithm, LoraSettings, SharedScope
from fedexperts.algorithms.fedavg import FedAvg, FedProx, MoEAsDense
from fedexperts.algorithms.flex import FLEx
from fedexperts.algorithms.local import LocalOnly

if TYPE_CHECKING:
    from fedexperts.config import AlgorithmConfig


def build_algorithm(config: AlgorithmConfig) -> Algorithm:
    """The algorithm named by ``config.name`` with its scope, LoRA and server-optimizer settings."""
    name = str(config.name)
    lora = LoraSettings(config.lora.rank, config.lora.alpha, config.lora.dropout)
    lora_or_none = lora if config.scope is SharedScope.ATTENTION_LORA else None
    server = ServerOptimizer(
        rule=config.server.rule,
        lr=config.server.lr,
        momentum=config.server.momentum,
        beta1=config.server.beta1,
        beta2=config.server.beta2,
        tau=config.server.tau,
    )
    if name == "local":
        return LocalOnly(config.scope, lora=lora_or_none)
    if name == "fedavg":
        return FedAvg(config.scope, lora=lora_or_none, server=server)
    if name == "fedprox":
        return FedProx(config.mu, config.scope, lora=lora_or_none, server=server)
    if name == "dense":
        return MoEAsDense(server=server)
    if name == "flex":
        return FLEx(
            config.scope,
            lora=lora_or_none,
            server=server,
            top_n=config.flex.top_n,
            refresh_every=config.flex.refresh_every,
            share_gate=config.flex.share_gate,
            calibration_batches=config.flex.calibration_batches,
        )
    raise ValueError(f"no algorithm is registered under {name!r}")
