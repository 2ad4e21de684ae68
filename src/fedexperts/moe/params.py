"""Parameter kinds and roles: which tensors are frozen, shared with the server, or kept personal.

Every parameter gets a *kind* from the module that owns it, found by structure (the family's
description of routers, experts, shared experts and attention, the model's input and output
embeddings, the grafted personal modules, and peft's own declaration of which submodules of a LoRA
layer are adapters), never from substrings of its name. An algorithm's :class:`RoleRules` turn
kinds into roles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from fedexperts.moe.families import ExpertLayout, family_for, moe_layers, unwrap_model
from fedexperts.moe.personal import PERSONAL_EXPERTS, PERSONAL_GATE
from fedexperts.moe.personal_lora import PERSONAL_LORA
from fedexperts.moe.wrappers import non_text_modules

NO_WEIGHT_DECAY = "_fedexperts_no_weight_decay"
"""Set to ``True`` on a parameter whose gradient-masked rows must not move (``algorithms.random_expert``)."""


class ParamKind(StrEnum):
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    """The feed-forward block of a layer that is not sparse (e.g. DeepSeek's first layers)."""
    ROUTER = "router"
    ROUTED_EXPERT = "routed_expert"
    SHARED_EXPERT = "shared_expert"
    PERSONAL_EXPERT = "personal_expert"
    """A grafted personal expert; with personal LoRA its adapters are this kind's adapter tensors."""
    PERSONAL_GATE = "personal_gate"
    NON_TEXT = "non_text"
    """A wrapper model's parts outside its text model (vision tower, projector, audio): never trained."""
    OTHER = "other"
    """Norms and anything else not named above."""


class Role(StrEnum):
    FROZEN = "frozen"
    SHARED = "shared"
    PERSONAL = "personal"


@dataclass(frozen=True)
class ParamInfo:
    kind: ParamKind
    adapter: bool
    """A LoRA adapter tensor (peft) attached to a module of this kind."""


@dataclass(frozen=True)
class RoleRules:
    """Roles by kind, separately for base weights and for LoRA adapters; unlisted kinds are frozen."""

    base: Mapping[ParamKind, Role] = field(default_factory=dict)
    adapters: Mapping[ParamKind, Role] = field(default_factory=dict)

    def role(self, info: ParamInfo) -> Role:
        table = self.adapters if info.adapter else self.base
        return table.get(info.kind, Role.FROZEN)


def _module_kinds(model: Any) -> dict[int, ParamKind]:
    family = family_for(model)
    kinds: dict[int, ParamKind] = {}
    for _stack, _prefix, layers in family.stacks(model):
        for layer in layers:
            for attention in family.attention_modules(layer):
                kinds[id(attention)] = ParamKind.ATTENTION
            _, block = family.block_in_layer(layer)
            if block is not None and not family.is_sparse_block(block):
                kinds[id(block)] = ParamKind.DENSE_MLP
    for moe in moe_layers(model):
        kinds[id(moe.router)] = ParamKind.ROUTER
        kinds[id(moe.experts)] = ParamKind.ROUTED_EXPERT
        for shared in moe.shared_experts:
            kinds[id(shared)] = ParamKind.SHARED_EXPERT
        for attr, kind in (
            (PERSONAL_EXPERTS, ParamKind.PERSONAL_EXPERT),
            (PERSONAL_GATE, ParamKind.PERSONAL_GATE),
            (PERSONAL_LORA, ParamKind.PERSONAL_EXPERT),  # its tensors are adapters (adapter_layer_names)
        ):
            personal = getattr(moe.block, attr, None)
            if isinstance(personal, nn.Module):
                kinds[id(personal)] = kind
    for _name, module in non_text_modules(model):
        kinds[id(module)] = ParamKind.NON_TEXT
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        kinds[id(head)] = ParamKind.LM_HEAD
    if isinstance(embeddings, nn.Module):
        kinds[id(embeddings)] = ParamKind.EMBEDDING
    return kinds


def _adapter_containers(module: nn.Module) -> tuple[str, ...]:
    """Names of a peft tuner layer's adapter submodules (``lora_A``, ``lora_B``, ...)."""
    names = getattr(module, "adapter_layer_names", None)
    return tuple(names) if isinstance(names, tuple | list) else ()


def parameter_kinds(model: nn.Module) -> dict[str, ParamInfo]:
    """Kind of every trainable-or-not parameter, by its name in the (unwrapped) model."""
    root = unwrap_model(model)
    kinds = _module_kinds(root)
    module_info: dict[str, ParamInfo] = {}
    adapter_modules: set[str] = set()
    for name, module in root.named_modules():
        parent = module_info.get(name.rpartition(".")[0]) if name else None
        kind = kinds.get(id(module), parent.kind if parent else ParamKind.OTHER)
        adapter = bool(parent and parent.adapter) or name in adapter_modules
        module_info[name] = ParamInfo(kind, adapter)
        adapter_modules.update(f"{name}.{child}" for child in _adapter_containers(module))
    return {name: module_info[name.rpartition(".")[0]] for name, _ in root.named_parameters()}


@dataclass(frozen=True)
class ExpertSlot:
    """Which routed experts of an MoE layer a parameter holds.

    ``expert is None``: its rows (dim 0) are the layer's experts in order (fused expert tensors,
    router rows and biases); else the whole tensor belongs to that one expert (one module per expert).
    """

    layer: str
    """The MoE layer's name (:attr:`~fedexperts.moe.families.MoELayer.name`)."""
    expert: int | None = None


def expert_slots(model: nn.Module) -> dict[str, ExpertSlot]:
    """Every parameter that belongs to routed experts, by name: what can be weighed per expert."""
    base = unwrap_model(model)
    params = dict(base.named_parameters())
    slots: dict[str, ExpertSlot] = {}
    for layer in moe_layers(base):
        family = layer.family
        rows = layer.expert_row_names()
        if family.layout is ExpertLayout.MODULE_PER_EXPERT:
            for expert in range(layer.num_experts):
                module = layer.experts[f"expert_{expert}"]
                prefix = f"{layer.experts_name}.expert_{expert}"
                owned = {f"{prefix}.{name}": ExpertSlot(layer.name, expert) for name, _ in module.named_parameters()}
                slots.update(owned)
        else:
            rows += [f"{layer.experts_name}.{tensor}" for tensor in family.expert_tensors]
        slots.update({name: ExpertSlot(layer.name) for name in rows if name in params})
    return slots


def parameter_roles(model: nn.Module, rules: RoleRules) -> dict[str, Role]:
    return {name: rules.role(info) for name, info in parameter_kinds(model).items()}


def apply_roles(model: nn.Module, roles: Mapping[str, Role]) -> None:
    """Train exactly the shared and personal parameters; freeze the rest."""
    for name, parameter in unwrap_model(model).named_parameters():
        parameter.requires_grad_(roles[name] is not Role.FROZEN)


def state_by_role(model: nn.Module, roles: Mapping[str, Role], role: Role) -> dict[str, torch.Tensor]:
    """The parameters of one role, by name, detached (views: no copy)."""
    return {name: p.detach() for name, p in unwrap_model(model).named_parameters() if roles[name] is role}


FLEX_ROLES = RoleRules(
    base={ParamKind.PERSONAL_EXPERT: Role.PERSONAL, ParamKind.PERSONAL_GATE: Role.PERSONAL},
    adapters={ParamKind.ATTENTION: Role.SHARED},
)
"""FLEx: attention LoRA is shared; personal experts and gates stay home; all else is frozen."""
