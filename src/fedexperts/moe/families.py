"""Where the parts of each Hugging Face MoE family live: looking a model's family up and resolving its sparse blocks.

A family is found in this order (docs/families.md): the explicit description of the config's
``model_type`` (:class:`~fedexperts.moe.family.MoEFamily`, in :mod:`fedexperts.moe.descriptors`),
else that of the text model of a wrapper config (:mod:`fedexperts.moe.wrappers`), else, for a
built model only, structural discovery confirmed by the identity checks
(:mod:`fedexperts.moe.discovery`); otherwise a clear refusal. Nothing here is guessed from
substrings of parameter names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from fedexperts.errors import UnsupportedModelError
from fedexperts.moe.descriptors import DESCRIPTORS
from fedexperts.moe.family import (
    DiscoveredFamily,
    ExpertLayout,
    MoEFamily,
    MoELayer,
    RouterOutput,
    RoutingDecision,
    SwitchFamily,
)
from fedexperts.moe.wrappers import text_config_of, wrapper_note

__all__ = [
    "FAMILIES",
    "DiscoveredFamily",
    "ExpertLayout",
    "MoEFamily",
    "MoELayer",
    "RouterOutput",
    "RoutingDecision",
    "SwitchFamily",
    "described_family",
    "family_for",
    "model_note",
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


def described_family(config: Any) -> MoEFamily | None:
    """The descriptor of ``config``'s type, else of its text model's (a wrapper config); ``None`` if neither has one."""
    family = FAMILIES.get(str(getattr(config, "model_type", None)))
    if family is None:
        family = FAMILIES.get(str(getattr(text_config_of(config), "model_type", None)))
    return family


def family_for(model_or_config: nn.Module | Any) -> MoEFamily:
    """The family of a model (or config), or a clear error naming the type and the supported list.

    A built model whose type has no descriptor goes through structural discovery
    (:func:`fedexperts.moe.discovery.discovered_family`), which refuses with the check that failed;
    a config alone cannot be discovered: build the model (on the ``meta`` device is enough) first.
    """
    model = unwrap_model(model_or_config) if isinstance(model_or_config, nn.Module) else None
    config = getattr(model_or_config, "config", model_or_config)
    family = described_family(config)
    if family is not None:
        return family
    if model is not None and getattr(model, "config", None) is not None:
        from fedexperts.moe.discovery import discovered_family  # discovery runs surgery, which imports this module

        return discovered_family(model)
    model_type = getattr(config, "model_type", None)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family (no descriptor; structural discovery needs "
        "the built model, not its config); supported: " + ", ".join(supported_model_types())
    )


def model_note(model: nn.Module) -> str | None:
    """One line on how this model's MoE was found and what of it trains, where that is not the plain case.

    A wrapper config's model trains its text model only (:func:`~fedexperts.moe.wrappers.wrapper_note`);
    a family without a descriptor was found structurally. ``None`` for a described text model.
    """
    base = unwrap_model(model)
    family = family_for(base)
    notes = [wrapper_note(base)]
    if isinstance(family, DiscoveredFamily):
        notes.append(
            f"{family.model_type} has no descriptor: its MoE blocks were found structurally and confirmed on "
            f"{family.confirmed_on}"
        )
    text = "; ".join(note for note in notes if note)
    return text or None


def moe_layers(model: PreTrainedModel) -> list[MoELayer]:
    """Every sparse block of ``model``, in forward order (encoder before decoder).

    The layers that the config declares sparse must be exactly the layers that hold a router and
    experts; a mismatch means a model variant this family description does not cover.
    """
    family = family_for(model)
    config = text_config_of(model.config)
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
