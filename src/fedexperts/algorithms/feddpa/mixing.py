"""Per-example weights on LoRA adapters: a forward hook on each adapter's ``lora_B`` scales its output.

peft sums a layer's active adapters, each scaled by its scalar ``alpha / r``
(``LoraLayer.forward``). It has no per-example weight: ``add_weighted_adapter`` merges adapters
into one static adapter, and mixed-batch inference (``adapter_names=``) picks one adapter per
example. FedDPA's ``W0 x + (1 - l_i) B_g A_g x + l_i B_l A_l x`` with a weight ``l_i`` per example
is therefore written here: the adapters stay peft's (both active), and a hook on
``lora_B[adapter]`` multiplies that adapter's output ``[batch, ..., out]`` by its weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedexperts.algorithms.lora import lora_layers
from fedexperts.errors import FedExpertsError
from fedexperts.moe.families import unwrap_model

Weight = float | torch.Tensor
"""One number for the whole batch, or one per example (``[batch]``)."""

_ATTRIBUTE = "_fedexperts_adapter_mix"


class AdapterMix:
    """The current weight of each named adapter on one model; 1 leaves an adapter as peft computes it.

    ``initial`` names every mixed adapter and the weights :meth:`reset` returns to.
    """

    def __init__(self, model: nn.Module, initial: Mapping[str, float]) -> None:
        self.initial = dict(initial)
        self.weights: dict[str, Weight] = dict(self.initial)
        for _name, layer in lora_layers(model):
            for adapter in self.initial:
                layer.lora_B[adapter].register_forward_hook(self._scaler(adapter))
        setattr(unwrap_model(model), _ATTRIBUTE, self)

    def reset(self) -> None:
        self.weights = dict(self.initial)

    def _scaler(self, adapter: str) -> Any:
        def scale(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            weight = self.weights[adapter]
            if isinstance(weight, float):
                return output if weight == 1.0 else output * weight
            if weight.shape[0] != output.shape[0]:
                raise FedExpertsError(
                    f"adapter {adapter!r} has weights for {weight.shape[0]} examples, the batch has {output.shape[0]}"
                )
            return output * weight.to(output.device, output.dtype).view(-1, *([1] * (output.dim() - 1)))

        return scale

    @contextmanager
    def fixed(self, weights: Mapping[str, Weight]) -> Iterator[None]:
        """These weights inside the block, the previous ones after it."""
        previous = dict(self.weights)
        self.weights.update(weights)
        try:
            yield
        finally:
            self.weights = previous


def adapter_mix(model: nn.Module) -> AdapterMix:
    """The :class:`AdapterMix` installed on ``model``."""
    mix = getattr(unwrap_model(model), _ATTRIBUTE, None)
    if not isinstance(mix, AdapterMix):
        raise FedExpertsError("this model has no adapter mix: prepare it with feddpa first")
    return mix
