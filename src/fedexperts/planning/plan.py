"""Size a federation before anything is downloaded: parameters by role, bytes per round, client memory.

:func:`plan` builds the model on ``meta`` (:func:`~fedexperts.models.partial.meta_model`) from a
preset or config (:mod:`.presets`), then the algorithm does exactly what it does on a real model:
``prepare`` injects peft's LoRA in place and assigns roles, ``initial_global_state`` /
``downlink`` / ``setup_client`` / ``uplink`` / ``personal_state`` produce one client round's
payloads, and the wire sizes them
(:func:`fedexperts.federation.payload.payload_size`). Nothing here knows an algorithm's name: FLEx,
FedMoE or any later algorithm is planned through the same interface; one whose payload depends on
tensor *values* (not shapes) could not be planned this way, and the ones registered today do not.
The result is data only (:class:`Plan`); :mod:`fedexperts.reporting.plan_tables` renders it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedexperts.algorithms.registry import build_algorithm
from fedexperts.config import AlgorithmConfig
from fedexperts.errors import UnsupportedModelError
from fedexperts.federation.payload import payload_size
from fedexperts.interface import ClientInfo, LocalData
from fedexperts.models.partial import meta_model
from fedexperts.moe.families import family_for, model_note, moe_layers, unwrap_model
from fedexperts.moe.params import Role, parameter_kinds
from fedexperts.planning.presets import PlanError, load_plan_config, presets_hint, resolve_dtype


@dataclass(frozen=True)
class KindCount:
    """Parameters of one kind (LoRA adapters of a kind counted apart), split by role."""

    kind: str
    adapter: bool
    params: int
    by_role: Mapping[Role, int]

    @property
    def label(self) -> str:
        return f"{self.kind} LoRA" if self.adapter else self.kind


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training client holds, activations excluded.

    ``weights``: every parameter and buffer in its own dtype (trainable ones are float32 masters
    over a half-precision base, :mod:`fedexperts.moe.precision`; ``prepare`` casts them on the meta
    model too). ``gradients``: one per trainable parameter, in its dtype. ``optimizer``:
    ``torch.optim.AdamW`` as :mod:`fedexperts.training` uses it, ``exp_avg`` and ``exp_avg_sq`` in
    the parameter's dtype plus a 4-byte step per tensor. Autocast's per-forward half copies of the
    float32 weights count with the activations (excluded).
    """

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


@dataclass(frozen=True)
class Plan:
    """What one client of a federation holds, trains and sends, computed from the config alone."""

    model: str
    model_type: str
    family: str
    algorithm: str
    dtype: torch.dtype
    transfer_dtype: torch.dtype | None
    moe_layers: int
    num_experts: int
    top_k: int
    base_params: int
    """The checkpoint's parameters (before any adapter)."""
    active_params: int
    """Base parameters one token passes through: routed experts count ``top_k / num_experts``."""
    total_params: int
    """After ``prepare`` (LoRA adapters included)."""
    trainable_params: int
    by_role: Mapping[Role, int]
    by_kind: tuple[KindCount, ...]
    downlink_bytes: int
    uplink_bytes: int
    downlink_tensors: int
    uplink_tensors: int
    personal_bytes: int
    """Encoded size of the state a client keeps between rounds (not sent)."""
    memory: MemoryEstimate
    note: str | None = None
    """What of a wrapper's model trains, or that its family was discovered (:func:`~fedexperts.moe.model_note`)."""


def _active_params(model: nn.Module, base_params: int) -> int:
    inactive = 0.0
    for layer in moe_layers(unwrap_model(model)):
        routed = sum(parameter.numel() for parameter in layer.experts.parameters())
        inactive += routed * (layer.num_experts - layer.top_k) / layer.num_experts
    return base_params - round(inactive)


def plan(
    config_source: str | Path,
    algorithm_config: AlgorithmConfig,
    *,
    dtype: str | torch.dtype = torch.bfloat16,
    transfer_dtype: str | torch.dtype | None = None,
    examples: int = 1000,
) -> Plan:
    """Plan one federation of ``config_source`` (preset, config.json or folder) under an algorithm.

    One client round is played on the meta model: downlink of the initial global state, the
    client set up from it (no personal state yet), uplink and personal state after "training".
    ``examples`` is the client's example count, which the uplink metadata carries.
    """
    weights_dtype = resolve_dtype(dtype)
    wire_dtype = None if transfer_dtype is None else resolve_dtype(transfer_dtype, "transfer dtype")
    name, config = load_plan_config(config_source)
    try:
        model = meta_model(config, weights_dtype)
        family = family_for(model)  # a type without a descriptor: discovery on the meta model
    except UnsupportedModelError as error:
        raise PlanError(f"{name}: {error}; {presets_hint()}") from None
    except (ValueError, TypeError, RuntimeError) as error:  # transformers' checks of the config's values
        raise PlanError(f"{name}: cannot build the model from its config: {error}") from None
    try:
        layers = moe_layers(unwrap_model(model))
    except UnsupportedModelError as error:
        raise PlanError(f"{name}: {error}; {presets_hint()}") from None
    note = model_note(model)
    base_params = sum(parameter.numel() for parameter in model.parameters())
    active_params = _active_params(model, base_params)
    algorithm = build_algorithm(algorithm_config)
    algorithm.prepare(model)
    kinds = parameter_kinds(model)

    client = ClientInfo("client-0", examples)
    received = algorithm.downlink(algorithm.initial_global_state(model), client)
    context = algorithm.setup_client(model, received, None, LocalData(client))
    sent = algorithm.uplink(context)
    personal = algorithm.personal_state(context)

    parameters = dict(unwrap_model(model).named_parameters())
    by_role = dict.fromkeys(Role, 0)
    grouped: dict[tuple[str, bool], dict[Role, int]] = {}
    for param_name, parameter in parameters.items():
        role = algorithm.roles[param_name]
        by_role[role] += parameter.numel()
        info = kinds[param_name]
        counts = grouped.setdefault((info.kind.value, info.adapter), dict.fromkeys(Role, 0))
        counts[role] += parameter.numel()
    by_kind = tuple(
        KindCount(kind, adapter, sum(counts.values()), counts)
        for (kind, adapter), counts in sorted(grouped.items(), key=lambda item: -sum(item[1].values()))
    )
    trainable = [parameter for parameter in parameters.values() if parameter.requires_grad]
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in unwrap_model(model).buffers())
    trainable_bytes = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    memory = MemoryEstimate(
        weights=sum(parameter.numel() * parameter.element_size() for parameter in parameters.values()) + buffers,
        gradients=trainable_bytes,
        optimizer=2 * trainable_bytes + 4 * len(trainable),
    )
    return Plan(
        model=name,
        model_type=family.model_type,
        family=family.display_name,
        algorithm=algorithm.name,
        dtype=weights_dtype,
        transfer_dtype=wire_dtype,
        moe_layers=len(layers),
        num_experts=layers[0].num_experts,
        top_k=layers[0].top_k,
        base_params=base_params,
        active_params=active_params,
        total_params=sum(parameter.numel() for parameter in parameters.values()),
        trainable_params=sum(parameter.numel() for parameter in trainable),
        by_role=by_role,
        by_kind=by_kind,
        downlink_bytes=payload_size(received, dtype=wire_dtype),
        uplink_bytes=payload_size(sent, dtype=wire_dtype),
        downlink_tensors=len(received.tensors),
        uplink_tensors=len(sent.tensors),
        personal_bytes=0 if personal is None else payload_size(personal),
        memory=memory,
        note=note,
    )
