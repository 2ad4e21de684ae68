"""Where the parts of each Hugging Face MoE family live: looking a model's family up and resolving its sparse blocks.

The descriptions themselves (:class:`~fedexperts.moe.family.MoEFamily`, one per ``model_type``)
are in :mod:`fedexperts.moe.descriptors`; nothing here is guessed from substrings of parameter names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from fedexperts.errors import UnsupportedModelError
from fedexperts.moe.descriptors import DESCRIPTORS
from fedexperts.moe.family import ExpertLayout, MoEFamily, MoELayer, RouterOutput, RoutingDecision, SwitchFamily

__all__ = [
    "FAMILIES",
    "ExpertLayout",
    "MoEFamily",
    "MoELayer",
    "RouterOutput",
    "RoutingDecision",
    "SwitchFamily",
    "family_for",
    "moe_layer_by_name",
    "moe_layers",
    "supported_model_types",
    "unwrap_model",
]

FAMILIES: dict[str, MoEFamily] = {family.model_type: family for family in DESCRIPTORS}


def unwrap_model(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper (whose names are the model's own)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_or_config: nn.Module | Any) -> MoEFamily:
    """The family of a model (or config), or a clear error naming the type and the supported list."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family; supported: " + ", ".join(supported_model_types())
        )
    return family


def moe_layers(model: PreTrainedModel) -> list[MoELayer]:
    """Every sparse block of ``model``, in forward order (encoder before decoder).

    The layers that the config declares sparse must be exactly the layers that hold a router and
    experts; a mismatch means a model variant this family description does not cover.
    """
    family = family_for(model)
    config = model.config
    found: list[MoELayer] = []
    for stack, prefix, layers in family.stacks(model):
        expected = family.sparse_layers(config, stack, len(layers))
        actual = []
        for index, layer in enumerate(layers):
            relative, block = family.block_in_layer(layer)
            if not family.is_sparse_block(block):
                continue
            assert block is not None
            actual.append(index)
            found.append(
                MoELayer(
                    name=f"{prefix}.{index}.{relative}",
                    stack=stack,
                    layer_index=index,
                    block=block,
                    router=getattr(block, family.router_attr),
                    experts=getattr(block, family.experts_attr),
                    shared_experts=family.shared_experts_of(layer, block),
                    family=family,
                )
            )
        if actual != expected:
            raise UnsupportedModelError(
                f"{family.model_type} {stack}: config declares sparse layers {expected} "
                f"but the model has routers and experts in layers {actual}"
            )
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {family.model_type!r}) has no MoE layer: "
            "every layer is dense under this config"
        )
    return found


def moe_layer_by_name(model: PreTrainedModel, names: Iterable[str]) -> dict[str, MoELayer]:
    """Look up MoE layers by block path, with a clear error for a name that is not one."""
    layers = {layer.name: layer for layer in moe_layers(model)}
    unknown = [name for name in names if name not in layers]
    if unknown:
        raise UnsupportedModelError(f"not MoE layers of this model: {unknown}; MoE layers are: {list(layers)}")
    return layers
