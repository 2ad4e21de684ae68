"""FLEx's own baseline: FedAvg of attention LoRA plus one randomly chosen routed expert per MoE layer.

The FLEx code compares against FedAvg that also fine-tunes one random expert per layer (chosen
once, the same for every client). Routed experts are fused ``[E, ...]`` tensors, so the chosen
expert is a row slice: the whole tensor is made trainable, a gradient hook zeroes every other
row, and those tensors get no weight decay, which leaves the other rows bit-identical under AdamW
(their moments stay zero). Only the chosen rows are sent, under the names ``TENSOR@expert=J``.

With ``personal`` the chosen rows are the client's own instead: the fused expert tensors get
:attr:`Role.PERSONAL`, the same ``TENSOR@expert=J`` row slices are what :meth:`personal_state`
keeps (and only they: the other rows are the frozen pretrained ones every client shares), and a new
client starts from the pretrained rows; only attention LoRA is sent and averaged.

Where each expert is a module of its own (Switch Transformers) the chosen expert is that module: its
parameters are shared (or personal) whole tensors under their own names, and every other expert's
module is frozen, so no row mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedexperts.algorithms.base import BaseAlgorithm, scope_rules
from fedexperts.algorithms.random_expert.config import RandomExpertConfig
from fedexperts.algorithms.settings import SharedScope
from fedexperts.errors import FedExpertsError
from fedexperts.interface import EXAMPLES_KEY, ClientContext, LocalData, Payload, State, row_key
from fedexperts.moe.families import ExpertLayout, moe_layers, unwrap_model
from fedexperts.moe.params import NO_WEIGHT_DECAY, ExpertSlot, ParamKind, Role, RoleRules, expert_slots


class RandomExpert(BaseAlgorithm):
    """The expert row of each layer is drawn once, by a generator seeded 0: the same for every client."""

    name = "random-expert"

    def __init__(
        self, config: RandomExpertConfig | None = None, *, client_ids: Sequence[str] | None = None, seed: int = 0
    ) -> None:
        config = config or RandomExpertConfig()
        rules = scope_rules(SharedScope.ATTENTION_LORA)
        shared = RoleRules(base={ParamKind.ROUTED_EXPERT: Role.SHARED}, adapters=dict(rules.adapters))
        super().__init__(shared, lora=config.lora, server=config.server, expert_weighting=config.expert_weighting)
        self.personal = config.personal
        self.seed = 0
        self.chosen: dict[str, int] = {}
        """Parameter name of each fused expert tensor -> the expert row trained."""
        self.chosen_modules: dict[str, bool] = {}
        """Parameter name of each expert stored as a module -> whether it is the chosen expert's."""

    @property
    def batching_refusal(self) -> str | None:
        return "random-expert trains expert rows through a gradient hook on the shared tensors, which copies lack"

    def prepare(self, model: nn.Module) -> None:
        base = unwrap_model(model)
        generator = torch.Generator().manual_seed(self.seed)
        slots = expert_slots(base)
        for layer in moe_layers(base):
            expert = int(torch.randint(layer.num_experts, (1,), generator=generator))
            if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT:
                owned = {name: slot.expert for name, slot in slots.items() if slot.layer == layer.name}
                self.chosen_modules.update({name: e == expert for name, e in owned.items() if e is not None})
                continue
            for tensor in layer.family.expert_tensors:
                self.chosen[f"{layer.experts_name}.{tensor}"] = expert
        super().prepare(model)  # the expert tensors are shared here, so no whole-tensor copy is kept
        if self.personal:
            self.roles.update(dict.fromkeys(self.chosen, Role.PERSONAL))
            self._by_role.clear()
            self._initial_personal = {key: row.detach().clone() for key, row in self._chosen_rows(model).items()}
        params = dict(base.named_parameters())
        for name, expert in self.chosen.items():
            parameter = params[name]
            mask = torch.zeros(parameter.shape[0], *([1] * (parameter.dim() - 1)), dtype=parameter.dtype)
            mask[expert] = 1
            parameter.register_hook(_masker(mask))
            setattr(parameter, NO_WEIGHT_DECAY, True)

    def _assign_roles(self, model: nn.Module) -> dict[str, Role]:
        """By kind, except that where experts are modules only the chosen expert's trains (shared, or personal)."""
        roles = super()._assign_roles(model)
        chosen_role = Role.PERSONAL if self.personal else Role.SHARED
        roles.update({name: chosen_role if chosen else Role.FROZEN for name, chosen in self.chosen_modules.items()})
        return roles

    def _shared_expert_slots(self, model: nn.Module) -> dict[str, ExpertSlot]:
        """Each shared chosen row is its expert's whole tensor (none when the rows are personal)."""
        if self.personal:
            return {}
        slots = expert_slots(model)
        rows = {row_key(name, e): ExpertSlot(slots[name].layer, e) for name, e in self.chosen.items()}
        return rows | {name: slots[name] for name, chosen in self.chosen_modules.items() if chosen}

    def _chosen_rows(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The chosen expert row of every fused expert tensor (views), under ``TENSOR@expert=J``, and the
        chosen expert modules' parameters under their own names."""
        params = self._params(model, Role.PERSONAL if self.personal else Role.SHARED)
        rows = {row_key(name, e): params[name][e] for name, e in self.chosen.items()}
        return rows | {name: params[name] for name, chosen in self.chosen_modules.items() if chosen}

    def _rows(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What is shared: attention LoRA, plus the chosen rows unless they are personal."""
        shared = self._params(model, Role.SHARED)
        rows: dict[str, torch.Tensor] = {name: p for name, p in shared.items() if name not in self.chosen}
        if not self.personal:
            rows.update(self._chosen_rows(model))
        return rows

    def initial_global_state(self, model: nn.Module) -> State:
        return {name: tensor.detach().clone() for name, tensor in self._rows(model).items()}

    @torch.no_grad()
    def setup_client(
        self, model: nn.Module, received: Payload, personal: Payload | None, data: LocalData
    ) -> ClientContext:
        for name, target in self._rows(model).items():
            if name not in received.tensors:
                raise FedExpertsError(f"{self.name}: the client did not receive shared tensor {name}")
            target.copy_(received.tensors[name])
        if self.personal:
            kept = personal.tensors if personal is not None else {}
            for key, row in self._chosen_rows(model).items():
                row.copy_(kept.get(key, self._initial_personal[key]))
        return ClientContext(data.client, model, received, data.round)

    def uplink(self, context: ClientContext) -> Payload:
        tensors = {name: tensor.detach().clone() for name, tensor in self._rows(context.model).items()}
        return Payload(tensors, {EXAMPLES_KEY: context.client.num_examples, **self._tokens_metadata(context)})

    def personal_state(self, context: ClientContext) -> Payload | None:
        if not self.personal:
            return None
        return Payload({key: row.detach().clone() for key, row in self._chosen_rows(context.model).items()})


def _masker(mask: torch.Tensor) -> Any:
    def keep_chosen_row(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(grad.device)

    return keep_chosen_row
