"""FedSA-LoRA: selective aggregation of LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025, arXiv 2410.01463; code: GitHub ``Pengxin-Guo/FedSA-LoRA``).

The paper finds that LoRA's A matrices learn what clients share and the B matrices what is
client-specific. So clients train both factors of attention LoRA; only the A matrices are sent
and the server averages them, weighted by example counts (the official code: FederatedScope's
FedAvg with ``personalization.local_param: ['lora_B']``); each client's B stays in its personal
state and never leaves it. A starts from the global state (peft's Kaiming-uniform init, drawn once
under ``federation.seed``); a client's B starts at zero (LoRA's init), so its first forward is
the base model's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.fedsa_lora.config import FedSALoRAConfig
from fedexperts.algorithms.lora import LoraFactor, lora_tensors
from fedexperts.algorithms.settings import SharedScope
from fedexperts.moe.params import Role


class FedSALoRA(BaseAlgorithm):
    name = "fedsa-lora"

    def __init__(
        self, config: FedSALoRAConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or FedSALoRAConfig()
        super().__init__(scope_rules(SharedScope.ATTENTION_LORA), lora=config.lora, server=config.server)

    def _assign_roles(self, model: nn.Module) -> dict[str, Role]:
        roles = super()._assign_roles(model)
        for name, tensor in lora_tensors(model).items():
            if tensor.factor is LoraFactor.B:
                roles[name] = Role.PERSONAL
        return roles
