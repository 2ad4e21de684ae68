"""Build an :class:`Algorithm` from its validated config section: the one place names become classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedexperts.algorithms.aggregation import ServerOptimizer
from fedexperts.algorithms.base import Algorithm, LoraSettings, SharedScope
from fedexperts.algorithms.fedavg import FedAvg, FedProx, MoEAsDense
from fedexperts.algorithms.fedmoe import FedMoE, RandomMoE
from fedexperts.algorithms.flex import FLEx
from fedexperts.algorithms.local import LocalOnly
from fedexperts.algorithms.random_expert import RandomExpert
from fedexperts.errors import FedExpertsError

if TYPE_CHECKING:
    from fedexperts.config import AlgorithmConfig


def build_algorithm(config: AlgorithmConfig, *, client_ids: Sequence[str] | None = None) -> Algorithm:
    """The algorithm named by ``config.name`` with its scope, LoRA and server-optimizer settings.

    ``client_ids`` (the federation's clients, in order) give per-client settings their owners:
    FedMoE's ``budgets``. Without them (``fedexperts plan``) FedMoE uses ``budget_fraction``.
    """
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
    if name == "random-expert":
        return RandomExpert(lora=lora, server=server)
    if name in ("fedmoe", "random-moe"):
        section = config.fedmoe
        budgets = None
        if section.budgets is not None and client_ids is not None:
            if len(section.budgets) != len(client_ids):
                raise FedExpertsError(
                    f"algorithm.fedmoe.budgets has {len(section.budgets)} entries for {len(client_ids)} clients"
                )
            budgets = dict(zip(client_ids, section.budgets, strict=True))
        options: dict[str, Any] = {
            "lora": lora_or_none,
            "server": server,
            "budget_fraction": section.budget_fraction,
            "budgets": budgets,
            "full_budget_clients": (client_ids or [])[:: section.full_budget_every]
            if section.full_budget_every
            else (),
            "warmup_rounds": section.warmup_rounds,
            "patience": section.patience,
            "top_k_neighbours": section.top_k_neighbours,
            "measure_examples": section.measure_examples,
        }
        if name == "fedmoe":
            return FedMoE(config.scope, **options)
        return RandomMoE(config.scope, seed=section.seed, **options)
    raise ValueError(f"no algorithm is registered under {name!r}")
