"""Which adapter and which factor (A or B) each LoRA parameter is, read from peft's own layers.

peft's LoRA layer holds ``lora_A[adapter]`` (the down projection, Kaiming-initialised) and
``lora_B[adapter]`` (the up projection, zero-initialised) per adapter; the update is
``alpha / r * B A``. :func:`lora_tensors` finds them by those containers, never by parameter
names, so the LoRA methods can give the two factors different roles (FedSA-LoRA: A shared, B
personal; FFA-LoRA: A frozen, B shared) or tell two adapters apart (FedDPA: global and local).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from peft.tuners.lora import LoraLayer
from torch import nn

from fedexperts.moe.families import unwrap_model

DEFAULT_ADAPTER = "default"
"""The adapter peft injects unless told otherwise (every algorithm's attention LoRA)."""


class LoraFactor(StrEnum):
    A = "A"
    """``lora_A``: ``r x in``, Kaiming-uniform at init."""
    B = "B"
    """``lora_B``: ``out x r``, zero at init."""


@dataclass(frozen=True)
class LoraTensor:
    layer: str
    """The adapted module's name (``model.layers.0.self_attn.q_proj``)."""
    adapter: str
    factor: LoraFactor


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every peft LoRA layer of ``model`` (unwrapped), with its module name."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_tensors(model: nn.Module) -> dict[str, LoraTensor]:
    """Every LoRA parameter of ``model`` by its name: the layer it adapts, its adapter and its factor."""
    found: dict[int, LoraTensor] = {}
    for layer_name, layer in lora_layers(model):
        for factor, container in ((LoraFactor.A, layer.lora_A), (LoraFactor.B, layer.lora_B)):
            for adapter, module in container.items():
                for parameter in module.parameters():
                    found[id(parameter)] = LoraTensor(layer_name, adapter, factor)
    return {name: found[id(p)] for name, p in unwrap_model(model).named_parameters() if id(p) in found}
