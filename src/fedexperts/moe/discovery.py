"""Structural discovery of an MoE family that has no descriptor, used only once confirmed.

For a built model whose ``model_type`` has no descriptor, the sparse blocks are read from the live
modules: in a decoder layer, a child module holding a *fused experts* module (transformers'
``use_experts_implementation`` class, whose parameters all have one leading row per expert) beside
exactly one *router* module (the only other child holding a parameter of shape (experts, hidden)).
Every other child of the block with parameters is taken as shared experts (always active).
Tensors of one row per expert are the router's (weight, bias, correction bias) and the experts';
one elsewhere in the block (AFMoE's ``expert_bias``) would be left unsliced by pruning, so it is a
refusal. The config fields of the expert count and top-k are found by building the experts and
router classes on ``meta`` with a candidate field changed.

The family built from that is used only after :mod:`fedexperts.moe.confirmation` has checked, on
one small forward, the identities the descriptors are tested on; any failure is the usual
:class:`~fedexperts.errors.UnsupportedModelError`, naming the check. A confirmed family is kept on
the model and per model class and config in this process, and logged once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedexperts.errors import UnsupportedModelError
from fedexperts.moe.confirmation import CheckFailed, confirm
from fedexperts.moe.families import supported_model_types
from fedexperts.moe.family import DiscoveredFamily, ExpertLayout, MoELayer, decoder_stacks
from fedexperts.moe.wrappers import text_config_of

logger = logging.getLogger(__name__)

STRUCTURE = "structure"
_ATTRIBUTE = "_fedexperts_discovered_family"
_CONFIRMED: dict[tuple[str, str, bool], DiscoveredFamily] = {}
"""(model class, config JSON, confirmed on meta) -> the family, for every model confirmed in this process."""


def _listed_layers(layers: tuple[int, ...], config: Any, stack: str, num_layers: int) -> list[int]:
    return list(layers)


def refusal(model_type: str, check: str, reason: str) -> UnsupportedModelError:
    """Today's refusal, saying which discovery check failed and what it saw."""
    return UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family: it has no descriptor, and structural "
        f"discovery failed the check {check!r}: {reason}; described: {', '.join(supported_model_types())}"
    )


@dataclass(frozen=True)
class _Block:
    """One sparse block as found in a decoder layer."""

    index: int
    attr: str
    module: nn.Module
    router_attr: str
    experts_attr: str
    router_weight: str
    num_experts: int


def _expert_rows(module: nn.Module) -> int | None:
    """The leading dimension all of a module's own parameters share, if one is 3-D and no child has weights."""
    own = list(module.parameters(recurse=False))
    if not own or not any(p.dim() == 3 for p in own) or any(True for _ in _child_parameters(module)):
        return None
    rows = {p.shape[0] for p in own}
    return rows.pop() if len(rows) == 1 and min(p.dim() for p in own) >= 2 else None


def _child_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for child in module.children() for p in child.parameters()]


def _blocks_in_layer(layer: nn.Module, index: int, hidden: int) -> list[_Block]:
    found = []
    for attr, child in layer.named_children():
        experts = [(name, sub, rows) for name, sub in child.named_children() if (rows := _expert_rows(sub))]
        if len(experts) != 1:
            continue
        experts_attr, _, rows = experts[0]
        routers = [
            (name, weights)
            for name, sub in child.named_children()
            if name != experts_attr
            and (weights := [n for n, p in sub.named_parameters() if tuple(p.shape) == (rows, hidden)])
        ]
        if len(routers) == 1 and len(routers[0][1]) == 1:
            (router_attr, (weight,)) = routers[0]
            found.append(_Block(index, attr, child, router_attr, experts_attr, weight, rows))
    return found


def _rows_of(module: nn.Module, rows: int) -> list[str]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.dim() >= 1 and tensor.shape[0] == rows]


def _layout(experts: nn.Module, model_type: str) -> ExpertLayout:
    flags = [getattr(experts, flag, None) for flag in ("has_gate", "is_transposed", "is_concatenated")]
    if any(not isinstance(flag, bool) for flag in flags):
        raise refusal(
            model_type,
            STRUCTURE,
            f"{type(experts).__name__} is not a transformers fused-experts module (no layout flags)",
        )
    has_gate, transposed, concatenated = flags
    names = {name for name, _ in experts.named_parameters()}
    if not has_gate or getattr(experts, "has_post_expert_norm", False) or not {"gate_up_proj", "down_proj"} <= names:
        raise refusal(
            model_type, STRUCTURE, f"{type(experts).__name__} is not a gated gate_up_proj/down_proj expert layout"
        )
    if not transposed and concatenated:
        return ExpertLayout.FUSED
    if transposed and not concatenated:
        return ExpertLayout.FUSED_TRANSPOSED_INTERLEAVED
    raise refusal(
        model_type,
        STRUCTURE,
        f"{type(experts).__name__}: a transposed, concatenated gate_up_proj has no handled layout",
    )


def _config_field(config: Any, value: int, build: Callable[[Any], nn.Module], measure: Callable[[Any], Any]) -> str:
    """The config field that, doubled, doubles what ``measure`` reads from a freshly built module ('' if none)."""
    for key, current in sorted(config.to_dict().items()):
        if type(current) is not int or current != value:
            continue
        trial = copy.deepcopy(config)
        try:
            setattr(trial, key, 2 * value)
            with torch.device("meta"):
                module = build(trial)
        except Exception:  # a value the class cannot be built with: not the field it reads
            continue
        if measure(module) == 2 * value:
            return key
    return ""


def _family(model: nn.Module, model_type: str, blocks: list[_Block]) -> DiscoveredFamily:
    first = blocks[0]
    shapes = {(b.attr, b.router_attr, b.experts_attr, b.router_weight, type(b.module)) for b in blocks}
    if len(shapes) != 1:
        raise refusal(
            model_type, STRUCTURE, f"sparse blocks differ between layers: {sorted(str(s[:4]) for s in shapes)}"
        )
    router = first.module.get_submodule(first.router_attr)
    experts = first.module.get_submodule(first.experts_attr)
    rows = first.num_experts
    extra = [
        name
        for name, tensor in [*first.module.named_parameters(recurse=False), *first.module.named_buffers(recurse=False)]
        if tensor.dim() >= 1 and tensor.shape[0] == rows
    ]
    if extra or any(True for _ in experts.buffers()):
        where = f"the block holds per-expert tensors {extra}" if extra else "the experts module holds buffers"
        raise refusal(
            model_type, STRUCTURE, f"{where} outside the router's and experts' parameters; pruning would not slice them"
        )
    layout = _layout(experts, model_type)
    config = getattr(experts, "config", None) or text_config_of(model.config)
    num_field = _config_field(config, rows, type(experts), lambda m: m.get_parameter("down_proj").shape[0])
    top_k = getattr(router, "top_k", None)
    top_k_field = (
        _config_field(config, top_k, type(router), lambda m: getattr(m, "top_k", None))
        if isinstance(top_k, int)
        else ""
    )
    if not num_field or not top_k_field:
        missing = "the expert count" if not num_field else "top-k (the router's top_k)"
        raise refusal(model_type, STRUCTURE, f"no config field of {type(config).__name__} sets {missing}")
    router_tensors = [first.router_weight, *(n for n in _rows_of(router, rows) if n != first.router_weight)]
    owner = first.router_weight.rpartition(".")[0]
    bias = f"{owner}.bias" if owner else "bias"
    biases = {name for name, tensor in router.named_parameters() if tensor.dim() == 1 and tensor.shape[0] == rows}
    shared = [
        name for name, child in first.module.named_children() if name not in (first.router_attr, first.experts_attr)
    ]
    return DiscoveredFamily(
        model_type=model_type,
        display_name=f"{model_type} (discovered)",
        num_experts_field=num_field,
        top_k_field=top_k_field,
        block_attr=first.attr,
        router_attr=first.router_attr,
        experts_attr=first.experts_attr,
        shared_expert_attrs=tuple(
            name for name in shared if any(True for _ in first.module.get_submodule(name).parameters())
        ),
        router_expert_tensors=tuple(router_tensors),
        router_bias=bias if bias in biases else None,
        expert_tensors=tuple(name for name, _ in experts.named_parameters()),
        layout=layout,
        routing="discovered: the router's own (logits, top-k weights, top-k indices), confirmed on one forward",
        sparse_layers=functools.partial(_listed_layers, tuple(block.index for block in blocks)),
    )


def discover_family(model: nn.Module) -> DiscoveredFamily:
    """Discover and confirm ``model``'s family from its modules, whether or not its type has a descriptor.

    Uncached; the lookup uses :func:`discovered_family`. Comparing with a descriptor is how the
    discovery itself is tested.
    """
    text = text_config_of(model.config)
    model_type = str(getattr(text, "model_type", None))
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int):
        raise refusal(model_type, STRUCTURE, f"{type(text).__name__} has no hidden_size")
    try:
        ((stack, prefix, layers),) = decoder_stacks(model, model_type)
    except UnsupportedModelError as error:
        raise refusal(model_type, STRUCTURE, str(error)) from None
    blocks: list[_Block] = []
    for index, layer in enumerate(layers):
        found = _blocks_in_layer(layer, index, hidden)
        if len(found) > 1:
            raise refusal(model_type, STRUCTURE, f"layer {index} holds {len(found)} router-and-experts blocks")
        blocks.extend(found)
    if not blocks:
        raise refusal(
            model_type,
            STRUCTURE,
            "no decoder layer holds a fused experts module (parameters with a leading expert dimension) "
            "beside one router with a row per expert",
        )
    family = _family(model, model_type, blocks)
    resolved = [
        MoELayer(
            name=f"{prefix}.{block.index}.{block.attr}",
            stack=stack,
            layer_index=block.index,
            block=block.module,
            router=block.module.get_submodule(family.router_attr),
            experts=block.module.get_submodule(family.experts_attr),
            shared_experts=tuple(block.module.get_submodule(attr) for attr in family.shared_expert_attrs),
            family=family,
        )
        for block in blocks
    ]
    try:
        where = confirm(model, resolved)
    except CheckFailed as failure:
        raise refusal(model_type, failure.check, failure.reason) from None
    return dataclasses.replace(family, confirmed_on=where)


def _is_meta(model: nn.Module) -> bool:
    return any(parameter.is_meta for parameter in model.parameters())


def discovered_family(model: nn.Module) -> DiscoveredFamily:
    """The confirmed structural family of ``model`` (a type with no descriptor), or a refusal naming the failed check.

    Discovery and its checks run once per model class and config in a process (on the model's own
    weights when it has them, else on a random-weight copy of one block) and are logged once.
    """
    cached = model.__dict__.get(_ATTRIBUTE)
    if isinstance(cached, DiscoveredFamily):
        return cached
    meta = _is_meta(model)
    config: Any = getattr(model, "config", None)
    key = (f"{type(model).__module__}.{type(model).__qualname__}", config.to_json_string())
    family = _CONFIRMED.get((*key, False)) or (_CONFIRMED.get((*key, True)) if meta else None)
    if family is None:
        family = discover_family(model)
        _CONFIRMED[(*key, meta)] = family
        layers = family.sparse_layers(config, "decoder", 0)
        logger.warning(
            "model_type %r has no descriptor: its MoE family was discovered structurally (%d sparse blocks "
            "'%s' with router '%s' and fused experts '%s'), not described; confirmed on %s",
            family.model_type,
            len(layers),
            family.block_attr,
            family.router_attr,
            family.experts_attr,
            family.confirmed_on,
        )
    setattr(model, _ATTRIBUTE, family)
    return family
