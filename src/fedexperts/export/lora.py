"""The LoRA layers peft put into a prepared model: merged into their base layers, or taken out as an adapter.

fedexperts injects LoRA with ``peft.inject_adapter_in_model`` (adapter ``"default"``), so the model
holds peft's LoRA layers in place of its linears. An export either folds each one into its base
weight (``merge``, peft's own merge) or reads its adapter tensors and settings and puts the plain
base layer back (``take_adapter``), for :mod:`fedexperts.export.hf` to save as a PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedexperts.algorithms.lora import DEFAULT_ADAPTER, lora_layers
from fedexperts.errors import FedExpertsError

ADAPTER = DEFAULT_ADAPTER


@dataclass(frozen=True)
class LoraAdapter:
    """One rank/alpha/dropout over named target modules, and each target's ``lora_A`` and ``lora_B`` weight."""

    rank: int
    alpha: int
    dropout: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Target module name -> (``lora_A`` weight, ``lora_B`` weight)."""

    @property
    def targets(self) -> list[str]:
        return sorted(self.weights)


def keep_one_adapter(model: nn.Module, who: str, *, client: bool) -> None:
    """Leave only the ``default`` adapter: a model with two adapters mixed per example is no single model.

    FedDPA's client model weighs its global and local adapter per example (fedexperts' hooks), which
    no checkpoint of plain weights reproduces: a client is refused. The global model is the shared
    (``default``) adapter alone, so its other adapters are deleted.
    """
    others = sorted({name for _, layer in lora_layers(model) for name in layer.lora_A if name != ADAPTER})
    if not others:
        return
    if client:
        raise FedExpertsError(
            f"{who} mixes its LoRA adapters ({', '.join([ADAPTER, *others])}) per example (FedDPA): no folder of "
            "plain weights reproduces that mix yet; export --global for the shared adapter"
        )
    for _, layer in lora_layers(model):
        for name in others:
            layer.delete_adapter(name)


def _put_back(model: nn.Module, name: str, layer: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer.get_base_layer())


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer into its base layer (peft's merge) and put the base layer back; how many."""
    found = list(lora_layers(model))
    for name, layer in found:
        layer.merge(adapter_names=[ADAPTER])
        _put_back(model, name, layer)
    return len(found)


@torch.no_grad()
def take_adapter(model: nn.Module) -> LoraAdapter | None:
    """Read every LoRA layer's adapter and put the unmerged base layers back; ``None`` without LoRA."""
    found: list[tuple[str, Any]] = list(lora_layers(model))  # peft's per-adapter dicts are untyped
    if not found:
        return None
    settings = set()
    weights = {}
    for name, layer in found:
        dropout = layer.lora_dropout[ADAPTER]
        settings.add(
            (layer.r[ADAPTER], layer.lora_alpha[ADAPTER], dropout.p if isinstance(dropout, nn.Dropout) else 0.0)
        )
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        weights[name] = (a.detach().clone(), b.detach().clone())
        _put_back(model, name, layer)
    if len(settings) != 1:
        raise FedExpertsError(f"the model's LoRA layers differ in rank, alpha or dropout ({sorted(settings)})")
    rank, alpha, dropout = settings.pop()
    return LoraAdapter(int(rank), int(alpha), float(dropout), weights)
