"""Expert-row tensors: one leading row per routed expert, whether the experts are fused or one module each.

What moves experts by index (FedMoE's downlink and uplink, its modular aggregation) reads a layer's
experts as tensors with one row per expert. Fused experts, router rows and router biases already
are such tensors. Where each expert is a module of its own (Switch Transformers' ``expert_{j}``),
each parameter of an expert module is seen as one *stacked* tensor named as a fused tensor would be,
``{experts}.{parameter}`` (``encoder.block.1.layer.1.mlp.experts.wi.weight``): its row ``j`` is the
parameter of the model's local expert ``j``. The name never clashes with a real parameter (the
experts container holds only the expert modules), and it is the same in the full model and in any
sub-MoE, whose modules are renumbered ``expert_0..`` in the kept order
(:func:`~fedexperts.moe.surgery.select_experts` keeps the global indices in its expert map).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.errors import SurgeryError
from fedexperts.moe.families import ExpertLayout, MoELayer, moe_layers
from fedexperts.moe.surgery import expert_map


def _stacked_parts(layer: MoELayer) -> list[str]:
    """The parameter names inside one expert module (``wi.weight``, ``wo.weight``)."""
    return [name for name, _ in layer.experts["expert_0"].named_parameters()]


def expert_row_tensors(model: PreTrainedModel) -> dict[str, str]:
    """Every expert-row parameter's name -> its MoE layer's name: router rows and biases, fused expert
    tensors, and the stacked tensors of experts stored one module each (buffers are not listed)."""
    params = dict(model.named_parameters())
    rows: dict[str, str] = {}
    for layer in moe_layers(model):
        names = [name for name in layer.expert_row_names() if name in params]
        if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT:
            names += [f"{layer.experts_name}.{part}" for part in _stacked_parts(layer)]
        else:
            fused = [f"{layer.experts_name}.{tensor}" for tensor in layer.family.expert_tensors]
            names += [name for name in fused if name in params]
        rows.update(dict.fromkeys(names, layer.name))
    return rows


def _stacked(model: PreTrainedModel, name: str) -> list[nn.Parameter] | None:
    """The per-expert parameters behind a stacked name, in local expert order; ``None`` for a real tensor."""
    for layer in moe_layers(model):
        prefix = f"{layer.experts_name}."
        if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT and name.startswith(prefix):
            part = name.removeprefix(prefix)
            if part in _stacked_parts(layer):
                return [layer.experts[f"expert_{j}"].get_parameter(part) for j in range(layer.num_experts)]
    return None


def row_parameters(model: PreTrainedModel, name: str) -> list[nn.Parameter]:
    """The parameters that hold an expert-row tensor: itself, or each expert module's (local order)."""
    stacked = _stacked(model, name)
    return stacked if stacked is not None else [model.get_parameter(name)]


def read_rows(model: PreTrainedModel, name: str) -> torch.Tensor:
    """An expert-row tensor, detached: the parameter itself (no copy), or its experts' parameters stacked."""
    stacked = _stacked(model, name)
    if stacked is None:
        return model.get_parameter(name).detach()
    return torch.stack([parameter.detach() for parameter in stacked])


@torch.no_grad()
def write_rows(model: PreTrainedModel, name: str, rows: torch.Tensor) -> None:
    """Copy ``rows`` (one per local expert) into the expert-row tensor ``name``."""
    stacked = _stacked(model, name)
    if stacked is None:
        model.get_parameter(name).copy_(rows)
        return
    if rows.shape[0] != len(stacked):
        raise SurgeryError(f"{name}: {rows.shape[0]} rows for {len(stacked)} experts")
    for parameter, row in zip(stacked, rows, strict=True):
        parameter.copy_(row)


def own_expert_modules(model: PreTrainedModel) -> None:
    """Give every expert module of ``model`` parameters of its own (copies, same flags).

    A sub-MoE view shares its tensors with the full model; fused rows are sliced into new tensors
    by the surgery, but a kept expert module still holds the full model's parameters, which training
    the view would then change.
    """
    for layer in moe_layers(model):
        if layer.family.layout is not ExpertLayout.MODULE_PER_EXPERT:
            continue
        for expert in layer.experts.values():
            for owner in expert.modules():
                for key, parameter in list(owner._parameters.items()):
                    if parameter is not None:
                        copied = nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad)
                        owner._parameters[key] = copied


def full_model_names(model: PreTrainedModel) -> dict[str, str]:
    """Each tensor of a per-expert module -> its name in the full model.

    A sub-MoE's module ``expert_{j}`` holds global expert ``g`` (its expert map), so its
    ``...experts.expert_{j}.wi.weight`` is the full model's ``...experts.expert_{g}.wi.weight``; what
    a sub-MoE loaded from a checkpoint reads, and the name the base's role of it is learnt under.
    Fused expert tensors keep their names and are not listed.
    """
    mapping = expert_map(model).local_to_global
    names: dict[str, str] = {}
    for layer in moe_layers(model):
        if layer.family.layout is not ExpertLayout.MODULE_PER_EXPERT:
            continue
        for local, held in enumerate(mapping[layer.name]):
            for part in layer.experts[f"expert_{local}"].state_dict():
                names[f"{layer.experts_name}.expert_{local}.{part}"] = f"{layer.experts_name}.expert_{held}.{part}"
    return names


def unheld_expert_modules(model: PreTrainedModel) -> tuple[str, ...]:
    """The name prefixes (``...experts.expert_{g}.``) of the full model's per-expert modules a sub-MoE lacks."""
    held = expert_map(model)
    return tuple(
        f"{layer.experts_name}.expert_{index}."
        for layer in moe_layers(model)
        if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT
        for index in range(held.num_global[layer.name])
        if index not in held.holds(layer.name)
    )
