"""Sub-MoE pruning: keep a subset of routed experts per layer, and map it back to the full model.

transformers' configs hold one expert count for the whole model, so a sub-MoE with different
counts per layer is made by slicing the live modules (router rows and biases, fused expert
tensors, per-expert modules) and fixing every cached count; the kept global indices are recorded
in an :class:`ExpertMap` so that updates can be scattered back into the full model, and are saved
beside a pruned checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel

from fedexperts.atomic import atomic_directory
from fedexperts.errors import SurgeryError
from fedexperts.moe.experts import check_expert_indices
from fedexperts.moe.families import (
    ExpertLayout,
    MoELayer,
    family_for,
    moe_layer_by_name,
    moe_layers,
)
from fedexperts.moe.wrappers import text_config_of

logger = logging.getLogger(__name__)

EXPERT_MAP_FILE = "fedexperts_experts.json"
WEIGHTS_FILE = "fedexperts_model.safetensors"
_MAP_ATTRIBUTE = "_fedexperts_expert_map"


@dataclass(frozen=True)
class ExpertMap:
    """For each MoE layer: the global index of every local expert, and the global expert count."""

    local_to_global: dict[str, tuple[int, ...]]
    num_global: dict[str, int]
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    """DeepSeek layers whose router groups changed: ``(num_group, topk_group)`` after pruning."""
    flat_routing: tuple[str, ...] = field(default=())
    """Layers whose group-limited routing had to become plain top-k (see :func:`select_experts`)."""

    def global_index(self, layer: str, local: int) -> int:
        return self.local_to_global[layer][local]

    def holds(self, layer: str) -> set[int]:
        return set(self.local_to_global[layer])

    def to_json(self) -> dict[str, Any]:
        return {
            "local_to_global": {name: list(indices) for name, indices in self.local_to_global.items()},
            "num_global": self.num_global,
            "groups": {name: list(plan) for name, plan in self.groups.items()},
            "flat_routing": list(self.flat_routing),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExpertMap:
        return cls(
            local_to_global={name: tuple(int(i) for i in idx) for name, idx in data["local_to_global"].items()},
            num_global={name: int(n) for name, n in data["num_global"].items()},
            groups={name: (int(plan[0]), int(plan[1])) for name, plan in data.get("groups", {}).items()},
            flat_routing=tuple(data.get("flat_routing", ())),
        )


def expert_map(model: PreTrainedModel) -> ExpertMap:
    """The model's current local-to-global expert map (the identity for an unpruned model)."""
    recorded = getattr(model, _MAP_ATTRIBUTE, None)
    if isinstance(recorded, ExpertMap):
        return recorded
    layers = moe_layers(model)
    return ExpertMap(
        local_to_global={layer.name: tuple(range(layer.num_experts)) for layer in layers},
        num_global={layer.name: layer.num_experts for layer in layers},
    )


def _replace_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_path, _, name = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if name in owner._parameters:
        old = owner._parameters[name]
        assert old is not None
        owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        raise SurgeryError(f"{dotted} is neither a parameter nor a buffer")
    if hasattr(owner, "out_features") and isinstance(owner, nn.Linear):
        owner.out_features = value.shape[0]


def _tensor(root: nn.Module, dotted: str) -> torch.Tensor:
    owner_path, _, name = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    value = getattr(owner, name)
    assert isinstance(value, torch.Tensor)
    return value


def _existing(module: nn.Module, names: Sequence[str]) -> list[str]:
    present = []
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if getattr(owner, leaf, None) is not None:
            present.append(name)
    return present


def _group_plan(layer: MoELayer, keep: Sequence[int]) -> tuple[int, int] | None:
    """New ``(num_group, topk_group)`` if ``keep`` preserves DeepSeek's expert groups, else ``None``.

    Groups survive when the kept experts come group by group, the same number from each kept
    group, with enough groups for ``topk_group`` and enough experts per group for top-k.
    """
    router = layer.router
    groups = int(router.num_group)
    size = layer.num_experts // groups
    runs: list[tuple[int, int]] = []
    for expert in keep:
        group = expert // size
        if runs and runs[-1][0] == group:
            runs[-1] = (group, runs[-1][1] + 1)
        else:
            runs.append((group, 1))
    kept_groups = [group for group, _ in runs]
    per_group = {count for _, count in runs}
    if len(set(kept_groups)) != len(runs) or len(per_group) != 1:
        return None
    (members,) = per_group
    topk_group = min(int(router.topk_group), len(runs))
    if members < layer.family.group_scored_by or layer.top_k > members * topk_group:
        return None
    return len(runs), topk_group


def select_experts(model: PreTrainedModel, keep: Mapping[str, Sequence[int]]) -> ExpertMap:
    """Keep only the listed experts (local indices, in the given order) of each named MoE layer.

    Layers not named keep all their experts. Everything is checked before anything changes: an
    empty, duplicate or out-of-range subset, or fewer kept experts than the router's top-k, is a
    :class:`SurgeryError` and leaves the model as it was. DeepSeek's group-limited routing keeps its
    groups when the subset allows (see :func:`_group_plan`); otherwise that layer routes by plain
    top-k over the kept experts, which is logged and recorded in ``ExpertMap.flat_routing``. A
    per-expert token capacity (Switch) is scaled to the kept count (:func:`_scale_capacity`).
    """
    layers = moe_layer_by_name(model, keep)
    checked: dict[str, list[int]] = {}
    for name, indices in keep.items():
        layer = layers[name]
        chosen = check_expert_indices(layer, indices)
        if len(chosen) < layer.top_k:
            raise SurgeryError(
                f"{name}: keeping {len(chosen)} experts but the router picks top-{layer.top_k}; "
                f"keep at least {layer.top_k}"
            )
        checked[name] = chosen

    previous = expert_map(model)
    local_to_global = dict(previous.local_to_global)
    groups = dict(previous.groups)
    flat = list(previous.flat_routing)
    for name, chosen in checked.items():
        layer = layers[name]
        if layer.family.group_routing and int(layer.router.num_group) > 1:
            plan = _group_plan(layer, chosen)
            if plan is None:
                logger.warning("%s: kept experts break DeepSeek's expert groups; routing by plain top-k", name)
                plan = (1, 1)
                flat.append(name)
            layer.router.num_group, layer.router.topk_group = plan
            groups[name] = plan
        slice_layer(model, layer, chosen)
        local_to_global[name] = tuple(previous.local_to_global[name][i] for i in chosen)
        _scale_capacity(model, layer, previous.num_global[name], len(chosen))

    new_map = ExpertMap(local_to_global, dict(previous.num_global), groups, tuple(dict.fromkeys(flat)))
    setattr(model, _MAP_ATTRIBUTE, new_map)
    _fix_model_counts(model)
    return new_map


def slice_layer(model: nn.Module, layer: MoELayer, chosen: list[int]) -> None:
    """Keep rows ``chosen`` of one layer's router and experts and fix its cached counts (no checks, no map).

    ``model`` is the module that ``layer.name`` is relative to; structural discovery slices a copy of
    one block this way (:mod:`fedexperts.moe.discovery`).
    """
    family = layer.family
    count = len(chosen)
    device = family.router_weight(layer.router).device
    index = torch.tensor(chosen, dtype=torch.long, device=device)
    for full in _existing(model, layer.expert_row_names()):
        _replace_tensor(model, full, _tensor(model, full).detach().index_select(0, index))
    for full in _existing(model, layer.expert_column_names()):
        _replace_tensor(model, full, _tensor(model, full).detach().index_select(-1, index))
    if family.layout is ExpertLayout.MODULE_PER_EXPERT:
        experts = layer.experts
        kept = [experts[f"expert_{i}"] for i in chosen]
        for key in list(experts.keys()):
            del experts[key]
        for local, module in enumerate(kept):
            experts[f"expert_{local}"] = module
    else:
        for tensor_name in _existing(layer.experts, family.expert_tensors):
            full = f"{layer.experts_name}.{tensor_name}"
            _replace_tensor(model, full, _tensor(model, full).detach().index_select(0, index))
    for module in (layer.block, layer.router, layer.experts):
        if hasattr(module, "num_experts"):
            module.num_experts = count


def _scale_capacity(model: PreTrainedModel, layer: MoELayer, full: int, kept: int) -> None:
    """Switch's per-expert capacity for ``kept`` of ``full`` experts: the config's (full-model) value times
    ``full / kept``, rounded up. The kept experts then have as many slots in all as the full layer (the
    capacity factor is kept): the tokens of pruned experts go to the kept ones and are not dropped for
    want of room that the full model had."""
    attribute = layer.family.expert_capacity
    if attribute is None:
        return
    capacity = int(getattr(text_config_of(model.config), attribute))
    setattr(layer.router, attribute, math.ceil(capacity * full / kept))


def _fix_model_counts(model: Any) -> None:
    """Set the model-level cached expert count used by the router auxiliary loss.

    With different counts per layer no single count is right, so the model-level aux loss (which
    concatenates all layers' logits) is switched off in the config.
    """
    counts = {layer.num_experts for layer in moe_layers(model)}
    if not hasattr(model, "num_experts"):
        return
    if len(counts) == 1:
        model.num_experts = counts.pop()
    else:
        model.num_experts = None
        model.config.output_router_logits = False


def scatter_expert_rows(full: torch.Tensor, local: torch.Tensor, local_to_global: Sequence[int]) -> torch.Tensor:
    """A copy of ``full`` with rows ``local_to_global`` replaced by the rows of ``local``."""
    if local.shape[0] != len(local_to_global) or local.shape[1:] != full.shape[1:]:
        raise SurgeryError(
            f"cannot scatter a {tuple(local.shape)} expert tensor into {tuple(full.shape)} "
            f"with {len(local_to_global)} global indices"
        )
    index = torch.tensor(list(local_to_global), dtype=torch.long, device=full.device)
    return full.index_copy(0, index, local.to(device=full.device, dtype=full.dtype))


def gather_expert_rows(full: torch.Tensor, local_to_global: Sequence[int]) -> torch.Tensor:
    """The rows of ``full`` that a sub-MoE holds, in its local order."""
    index = torch.tensor(list(local_to_global), dtype=torch.long, device=full.device)
    return full.index_select(0, index)


def save_pruned(model: PreTrainedModel, directory: str | Path) -> Path:
    """Save a (possibly pruned) model: config, weights in its in-memory naming, and its expert map.

    ``save_pretrained`` cannot be used: stock configs hold one expert count, and transformers
    converts fused experts back to the hub layout on save. The folder is written atomically.
    """
    target = Path(directory)
    with atomic_directory(target) as staging:
        write_pruned(model, staging)
    return target


def write_pruned(model: PreTrainedModel, folder: Path) -> None:
    """Write :func:`save_pruned`'s files into the existing ``folder`` (the caller makes it atomic)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / EXPERT_MAP_FILE).write_text(json.dumps(expert_map(model).to_json(), indent=2))


def stock_config(model: PreTrainedModel) -> Any | None:
    """A stock config that describes ``model`` as it is now, or ``None`` when no stock config can.

    A sub-MoE that keeps the same number of experts in every MoE layer, with unchanged expert
    groups, is a stock model of that expert count (its router rows are already sliced); per-layer
    counts, or DeepSeek groups changed by the pruning, have no stock config.
    """
    mapping = expert_map(model)
    counts = {len(indices) for indices in mapping.local_to_global.values()}
    if len(counts) > 1 or mapping.flat_routing:
        return None
    config = copy.deepcopy(model.config)
    family = family_for(model)
    text = text_config_of(config)  # a wrapper's expert count is its text model's
    if any(plan != (int(text.n_group), int(text.topk_group)) for plan in mapping.groups.values()):
        return None
    if counts:
        setattr(text, family.num_experts_field, counts.pop())
    config.architectures = [type(model).__name__]
    return config


def load_pruned(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    prepare: Callable[[PreTrainedModel], None] | None = None,
) -> PreTrainedModel:
    """Load a model saved by :func:`save_pruned`, with its per-layer expert counts and map.

    ``prepare`` changes the pruned model (on the meta device) before the weights load, e.g. grafts
    the personal experts the weights file also holds (:func:`fedexperts.export.load_personalized`).
    """
    source = Path(directory)
    for needed in ("config.json", WEIGHTS_FILE, EXPERT_MAP_FILE):
        if not (source / needed).is_file():
            raise SurgeryError(f"{source}: missing {needed}; not a folder written by save_pruned")
    config = transformers.AutoConfig.from_pretrained(source)
    try:
        mapping = ExpertMap.from_json(json.loads((source / EXPERT_MAP_FILE).read_text()))
    except (KeyError, TypeError, ValueError) as error:
        raise SurgeryError(f"{source / EXPERT_MAP_FILE}: malformed expert map ({error})") from error
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, str(architecture), None)
    if model_class is None:
        raise SurgeryError(f"{source / 'config.json'}: unknown architecture {architecture!r}")
    with torch.device("meta"):
        model = model_class(config)
    layers = moe_layer_by_name(model, mapping.local_to_global)
    structure = {name: list(range(len(idx))) for name, idx in mapping.local_to_global.items()}
    for name, indices in mapping.local_to_global.items():
        if len(indices) > layers[name].num_experts:
            raise SurgeryError(f"{source / EXPERT_MAP_FILE}: {name} holds more experts than the config")
    select_experts(model, structure)
    for name, (num_group, topk_group) in mapping.groups.items():
        layers[name].router.num_group, layers[name].router.topk_group = num_group, topk_group
    if prepare is not None:
        prepare(model)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage: tie them again
    initialise_non_persistent_buffers(model)
    try:
        missing, unexpected = load_model(model, str(source / WEIGHTS_FILE), strict=False)
    except RuntimeError as error:  # shape mismatches
        raise SurgeryError(
            f"{source / WEIGHTS_FILE} does not match the saved structure: {str(error).strip().splitlines()[-1]}"
        ) from error
    if missing or unexpected:
        raise SurgeryError(
            f"{source / WEIGHTS_FILE} does not match the saved structure: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    setattr(model, _MAP_ATTRIBUTE, mapping)
    model.eval()
    return model.to(dtype) if dtype is not None else model


def initialise_non_persistent_buffers(model: PreTrainedModel) -> None:
    """Recompute buffers that are not saved (rotary frequencies), as ``from_pretrained`` does."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)  # transformers' own initialiser computes them from the config
