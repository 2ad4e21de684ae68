"""FedMoE's model side: the one place that touches models and moves tensors between them and payloads.

It learns the :class:`~fedexperts.algorithms.fedmoe.layout.Layout` from the prepared model
(:func:`layout_of`, :func:`expert_and_dense_bytes`), recognises a client model loaded with just
its experts (:func:`holds_exactly`) or else builds the client's sub-MoE as a view of the shared
base model (:func:`sub_moe_view`), measures expert activation (:func:`measure_activation`),
slices the held experts' rows for the downlink and uplink and loads received tensors. Everything
it decides with is in the model-free modules.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.algorithms.fedmoe.layout import Layout, Structure
from fedexperts.data.layout import batch_layout
from fedexperts.errors import FedExpertsError
from fedexperts.interface import Payload, State
from fedexperts.moe.families import ExpertLayout, MoELayer, moe_layers, unwrap_model
from fedexperts.moe.params import ParamKind, Role, parameter_kinds
from fedexperts.moe.precision import autocast_for, master_copy, to_master
from fedexperts.moe.routing import RoutingRecorder
from fedexperts.moe.rows import expert_row_tensors, own_expert_modules, read_rows, row_parameters, write_rows
from fedexperts.moe.surgery import expert_map, select_experts

# -- the model's sizes and layout --------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _resolve(module: nn.Module, dotted: str) -> torch.Tensor | None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    value = getattr(owner, leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def expert_and_dense_bytes(model: nn.Module) -> tuple[int, list[int]]:
    """``(dense bytes, bytes of one routed expert of each MoE layer)`` of a loaded model.

    A routed expert costs its rows of every tensor with one row per expert: the fused expert
    tensors (or its own module, for Switch Transformers) and its router rows, router bias,
    DeepSeek-V3's score-correction bias and LFM2-MoE's block-level expert bias. Everything else
    (attention, embeddings, norms, dense MLPs, shared experts, buffers) is dense. Layers are in
    :func:`~fedexperts.moe.moe_layers` order.
    """
    base = unwrap_model(model)
    total = sum(_tensor_bytes(p) for _, p in base.named_parameters()) + sum(
        _tensor_bytes(b) for _, b in base.named_buffers()
    )
    per_expert: list[int] = []
    expert_total = 0
    for layer in moe_layers(base):
        family = layer.family
        count = layer.num_experts
        row_tensors: list[tuple[str, torch.Tensor]] = []
        for name in layer.expert_row_names():
            tensor = _resolve(base, name)
            if tensor is not None:
                row_tensors.append((name, tensor))
        layer_bytes = 0
        if family.layout is ExpertLayout.MODULE_PER_EXPERT:
            module_bytes = sum(_tensor_bytes(p) for p in layer.experts.parameters())
            if module_bytes % count:
                raise FedExpertsError(f"{layer.experts_name}: experts of unequal size ({module_bytes} bytes, {count})")
            layer_bytes += module_bytes // count
        else:
            for name in family.expert_tensors:
                tensor = _resolve(layer.experts, name)
                if tensor is not None:
                    row_tensors.append((f"{layer.experts_name}.{name}", tensor))
        for name in layer.expert_column_names():
            tensor = _resolve(base, name)
            if tensor is not None:
                layer_bytes += _tensor_bytes(tensor) // count
        for name, tensor in row_tensors:
            if tensor.dim() == 0 or tensor.shape[0] != count:
                raise FedExpertsError(
                    f"{name}: expected {count} rows (one per expert), got shape {tuple(tensor.shape)}"
                )
            layer_bytes += _tensor_bytes(tensor) // count
        per_expert.append(layer_bytes)
        expert_total += layer_bytes * count
    return total - expert_total, per_expert


FLOAT32_BYTES = 4
TRAINING_STATE_BYTES = 12
"""Per trained parameter besides its float32 master: a float32 gradient and AdamW's two float32 moments."""


def layout_of(
    model: nn.Module,
    layers: Sequence[MoELayer],
    roles: Mapping[str, Role],
    name: str,
    *,
    counts: Literal["weights", "training"] = "weights",
) -> Layout:
    """The expert-row tensors (one row per expert: fused experts, router rows) and the dense shared ones.

    ``layers`` are the model's MoE layers (:func:`moe_layers`), ``roles`` the prepared roles; every
    shared router or expert parameter must be an expert-row tensor. Sizes follow ``counts``
    (``algorithm.fedmoe.budget_counts``): a client trains float32 masters of its held experts' rows
    and of the shared dense tensors and keeps the frozen rest in the checkpoint's dtype; ``training``
    adds a gradient and two AdamW moments per trained parameter.
    """
    base = unwrap_model(model)
    params = dict(base.named_parameters())
    index_of = {layer.name: index for index, layer in enumerate(layers)}
    rows = {each: index_of[layer] for each, layer in expert_row_tensors(base).items()}
    # an expert stored as a module: its parameters travel as rows of the stacked tensors (fedexperts.moe.rows)
    in_rows = {id(p) for each in rows for p in row_parameters(base, each)}
    by_rows = {each for each, p in params.items() if id(p) in in_rows}
    kinds = parameter_kinds(base)
    shared = [each for each, role in roles.items() if role is Role.SHARED]
    stray = [
        each
        for each in shared
        if kinds[each].kind in (ParamKind.ROUTER, ParamKind.ROUTED_EXPERT)
        and not kinds[each].adapter
        and each not in by_rows
    ]
    if stray:
        raise FedExpertsError(f"{name}: router/expert parameters without one row per expert: {stray[:3]}")
    dense = [each for each in shared if each not in by_rows]
    expert_elements = [0] * len(layers)
    for each, position in rows.items():
        elements = sum(p.numel() for p in row_parameters(base, each))
        expert_elements[position] += elements // layers[position].num_experts
    tensors = [*params.items(), *base.named_buffers()]
    dense_elements = sum(tensor.numel() for each, tensor in tensors if each not in by_rows)
    dense_bytes = sum(_tensor_bytes(tensor) for each, tensor in tensors if each not in by_rows)
    per_trained = FLOAT32_BYTES + (TRAINING_STATE_BYTES if counts == "training" else 0)
    if counts == "training":
        dense_bytes += TRAINING_STATE_BYTES * sum(params[each].numel() for each in dense)
    return Layout(
        layer_names=[layer.name for layer in layers],
        num_experts=[layer.num_experts for layer in layers],
        top_k=[layer.top_k for layer in layers],
        rows=rows,
        dense=dense,
        dense_bytes=dense_bytes,
        expert_bytes=[per_trained * elements for elements in expert_elements],
        dense_elements=dense_elements,
        expert_elements=expert_elements,
    )


# -- the client model --------------------------------------------------------------------------------


def sub_moe_view(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> PreTrainedModel:
    """A pruned copy of ``model`` whose every tensor except the kept experts' rows is ``model``'s own.

    ``keep`` maps MoE layer names to the *local* expert indices of ``model`` to keep. The deep copy
    gets a memo mapping each parameter, buffer and tensor attribute to itself, so it copies module
    objects and the config only; :func:`select_experts` then gives the view's own modules new,
    sliced expert and router tensors. Nothing of ``model`` is modified.
    """
    base = unwrap_model(model)
    memo: dict[int, Any] = {}
    for module in base.modules():
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                memo[id(tensor)] = tensor
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
    view = copy.deepcopy(base, memo)
    select_experts(view, keep)
    own_expert_modules(view)  # a kept expert module would still hold the base's parameters
    return view


def holds_exactly(model: nn.Module, held: Mapping[str, Sequence[int]]) -> bool:
    """Whether ``model`` holds exactly the ``held`` global experts of every layer, in that order (a loaded sub-MoE)."""
    mapping = expert_map(unwrap_model(model)).local_to_global
    return all(mapping.get(layer) == tuple(experts) for layer, experts in held.items())


def check_full_base(model: nn.Module, layout: Layout, name: str) -> None:
    """Sub-MoE views are cut from the full base model: refuse a pruned one."""
    mapping = expert_map(unwrap_model(model)).local_to_global
    counts = zip(layout.layer_names, layout.num_experts, strict=True)
    if any(mapping.get(layer) != tuple(range(count)) for layer, count in counts):
        raise FedExpertsError(f"{name}: the base model must hold every expert (it is pruned)")


@torch.no_grad()
def measure_activation(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], max_examples: int
) -> list[torch.Tensor]:
    """Per MoE layer, the fraction of real tokens routed to each expert, over at most ``max_examples`` rows."""
    base = unwrap_model(model)
    layout = batch_layout(base)  # an encoder-decoder's decoder layers are profiled on the responses
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    seen = 0
    try:
        with RoutingRecorder(base) as recorder:
            for batch in batches:
                if seen >= max_examples:
                    break
                take = min(int(batch["input_ids"].shape[0]), max_examples - seen)
                inputs = layout.model_inputs(base, {key: value[:take].to(device) for key, value in batch.items()})
                masks = recorder.mask(inputs["attention_mask"], inputs.get("decoder_attention_mask"))
                with masks, autocast_for(base):
                    base(**inputs)
                seen += take
    finally:
        base.train(was_training)
    if seen == 0:
        raise FedExpertsError("cannot measure expert activation: the client has no training rows")
    activation = recorder.activation()
    return [activation[layer.name].to(torch.float64) for layer in moe_layers(base)]


# -- tensors between payloads and models -------------------------------------------------------------


def held_rows(global_state: State, layout: Layout, structure: Structure) -> State:
    """The rows of the held experts of every expert-row tensor, under the full tensors' names (downlink)."""
    tensors: State = {}
    for name, layer in layout.rows.items():
        full = global_state[name]
        index = torch.tensor(structure[layer], dtype=torch.long, device=full.device)
        tensors[name] = full.index_select(0, index)
    return tensors


@torch.no_grad()
def load_dense(model: nn.Module, received: Payload, layout: Layout, name: str) -> None:
    """Copy the received dense tensors into ``model``'s own parameters."""
    params = dict(unwrap_model(model).named_parameters())
    for each in layout.dense:
        if each not in received.tensors:
            raise FedExpertsError(f"{name}: the client did not receive shared tensor {each}")
        params[each].copy_(received.tensors[each])


@torch.no_grad()
def load_rows(view: nn.Module, received: Payload, layout: Layout, name: str) -> None:
    """Fill a sub-MoE view's expert-row tensors with the received rows and make them trainable.

    The view's rows are its own sliced copies; they become float32 masters (the base's stay in the
    checkpoint's dtype) so the received float32 rows load without rounding and train in float32.
    """
    base = unwrap_model(view)
    for each in layout.rows:
        if each not in received.tensors:
            raise FedExpertsError(f"{name}: the client did not receive expert rows {each}")
        for parameter in row_parameters(base, each):
            to_master(parameter)
            parameter.requires_grad_(True)
        write_rows(base, each, received.tensors[each])


def initial_state(model: nn.Module, layout: Layout) -> State:
    """The global state: master copies of the dense shared tensors and of every expert-row tensor
    (experts stored one module each: stacked, :mod:`fedexperts.moe.rows`)."""
    base = unwrap_model(model)
    params = dict(base.named_parameters())
    dense = {each: master_copy(params[each]) for each in layout.dense}
    return dense | {each: master_copy(read_rows(base, each)) for each in layout.rows}


def freeze_rows(model: nn.Module, layout: Layout) -> None:
    """Every parameter behind an expert-row tensor stops training (the base keeps its pretrained experts)."""
    base = unwrap_model(model)
    for each in layout.rows:
        for parameter in row_parameters(base, each):
            parameter.requires_grad_(False)


def dense_tensors(model: nn.Module, layout: Layout) -> State:
    """Copies of the model's dense shared tensors (uplink)."""
    params = dict(unwrap_model(model).named_parameters())
    return {each: params[each].detach().clone() for each in layout.dense}


def sent_rows(model: nn.Module, layout: Layout, structure: Structure, name: str) -> State:
    """The trained rows of the held experts, in ``structure``'s (global, sorted) order (uplink)."""
    base = unwrap_model(model)
    mapping = expert_map(base)
    tensors: State = {}
    for each, layer in layout.rows.items():
        local = mapping.local_to_global[layout.layer_names[layer]]
        missing = [g for g in structure[layer] if g not in local]
        if missing:
            raise FedExpertsError(f"{name}: the client model does not hold experts {missing} of {each}")
        tensor = read_rows(base, each)
        positions = torch.tensor([local.index(g) for g in structure[layer]], device=tensor.device)
        tensors[each] = tensor.index_select(0, positions)
    return tensors
