"""FFA-LoRA: federated freeze-A LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated
Learning", ICLR 2024, arXiv 2403.12313).

Averaging A and B separately does not average their product (``mean(B) mean(A) != mean(B A)``).
FFA-LoRA removes the mismatch: every client's A is the same random matrix, frozen, and only the
zero-initialised B trains and is averaged, so the average of the clients' updates ``B_i A`` is
exactly ``mean(B_i) A``. Only B travels: half of LoRA's bytes at equal rank (when ``in == out``,
less for grouped-query k/v projections, whose B is smaller than their A).

A is never sent, so every process must draw the same one: :meth:`FFALoRA.prepare` re-draws each A
with peft's own init (Kaiming-uniform, ``a = sqrt(5)``: ``U(-1/sqrt(in), 1/sqrt(in))``) from a CPU
generator seeded by ``federation.seed``, in the model's parameter order, so the server, every
in-process client and every Flower node hold bit-identical A matrices whatever the global random
state, device or dtype (the values are drawn in float32, then cast to A's dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.ffa_lora.config import FFALoRAConfig
from fedexperts.algorithms.lora import LoraFactor, lora_tensors
from fedexperts.algorithms.settings import SharedScope
from fedexperts.moe.families import unwrap_model
from fedexperts.moe.params import Role


class FFALoRA(BaseAlgorithm):
    name = "ffa-lora"

    def __init__(
        self, config: FFALoRAConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or FFALoRAConfig()
        super().__init__(scope_rules(SharedScope.ATTENTION_LORA), lora=config.lora, server=config.server)
        self.seed = seed

    def _inject_lora(self, model: nn.Module) -> None:
        super()._inject_lora(model)
        seeded_lora_a(model, self.seed)

    def _assign_roles(self, model: nn.Module) -> dict[str, Role]:
        roles = super()._assign_roles(model)
        for name, tensor in lora_tensors(model).items():
            if tensor.factor is LoraFactor.A:
                roles[name] = Role.FROZEN
        return roles


@torch.no_grad()
def seeded_lora_a(model: nn.Module, seed: int) -> None:
    """Re-draw every LoRA A of ``model`` with peft's init from a generator seeded ``seed`` (not on ``meta``)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(unwrap_model(model).named_parameters())
    for name, tensor in lora_tensors(model).items():
        parameter = parameters[name]
        if tensor.factor is not LoraFactor.A or parameter.is_meta:
            continue
        values = torch.empty(parameter.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        parameter.copy_(values)
