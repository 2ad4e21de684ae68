"""FLEx's personal-expert graft: a client-owned copy of chosen experts joined through a sigmoid gate.

Each grafted sparse block computes ``moe(x) + sum_i sigmoid(gate_i(x)) * personal_i(x)``. The
personal experts are copies of pretrained routed experts (built with the family's own experts
class, see :mod:`fedexperts.moe.experts`) and each gate row starts as the router row of the expert
it copies, so the gate opens as much as the router would have chosen that expert. The graft adds
two children to the block, ``personal_experts`` and ``personal_gate``, and a forward hook; every
original parameter keeps its name.

:func:`add_personal_lora` switches a graft to LoRA training (FLEx's official way): the copied expert
and gate stay frozen at their pretrained values and low-rank adapters on them train
(:mod:`fedexperts.moe.personal_lora`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from fedexperts.atomic import save_tensors
from fedexperts.errors import SurgeryError
from fedexperts.moe.experts import check_expert_indices, copy_experts, fused_math, run_experts
from fedexperts.moe.families import ExpertLayout, MoELayer, moe_layer_by_name, moe_layers
from fedexperts.moe.personal_lora import PERSONAL_ADAPTER, PERSONAL_LORA, FusedExpertLora

PERSONAL_EXPERTS = "personal_experts"
PERSONAL_GATE = "personal_gate"
_GRAFT_ATTRIBUTE = "_fedexperts_graft"
_METADATA_KEY = "fedexperts_graft"


@dataclass(frozen=True)
class Graft:
    """The personal experts grafted onto one sparse block."""

    layer: str
    experts: tuple[int, ...]
    """Indices (in the block's current numbering) of the routed experts that were copied."""
    gate_bias: bool
    handle: RemovableHandle
    hook: Callable[..., Any]
    """The forward hook that adds the personal output (kept to re-register it after a suspension)."""


def grafts(model: PreTrainedModel) -> dict[str, Graft]:
    """The grafts currently attached to ``model``, by layer name."""
    found = {}
    for layer in moe_layers(model):
        graft = getattr(layer.block, _GRAFT_ATTRIBUTE, None)
        if isinstance(graft, Graft):
            found[layer.name] = graft
    return found


def graft_personal_experts(
    model: PreTrainedModel, choices: Mapping[str, int | Sequence[int]], *, gate_bias: bool = True
) -> dict[str, tuple[int, ...]]:
    """Attach personal experts copied from the chosen routed experts of each named layer.

    ``choices`` maps layer names to one expert index or several (top-n grafting). The gate of each
    copied expert starts as that expert's router row; with ``gate_bias`` it also gets a trainable
    bias, started from the router's bias for the expert where the router has one, else zero.
    """
    layers = moe_layer_by_name(model, choices)
    checked: dict[str, list[int]] = {}
    for name, choice in choices.items():
        if getattr(layers[name].block, _GRAFT_ATTRIBUTE, None) is not None:
            raise SurgeryError(f"{name} already has personal experts; remove them first")
        checked[name] = check_expert_indices(layers[name], [choice] if isinstance(choice, int) else choice)
    for name, chosen in checked.items():
        _attach(layers[name], chosen, gate_bias)
    return {name: tuple(chosen) for name, chosen in checked.items()}


@torch.no_grad()
def _init_gate(layer: MoELayer, gate: nn.Linear, chosen: list[int]) -> None:
    """Gate rows from the router rows of the copied experts (and the router's bias where it has one)."""
    family = layer.family
    router_weight = family.router_weight(layer.router)
    index = torch.tensor(chosen, dtype=torch.long, device=router_weight.device)
    gate.weight.copy_(router_weight.detach().index_select(0, index))
    if gate.bias is not None:
        gate.bias.zero_()
        router_bias = family.router_bias_of(layer.router)
        if router_bias is not None:
            gate.bias.copy_(router_bias.detach().index_select(0, index))


def _attach(layer: MoELayer, chosen: list[int], gate_bias: bool) -> None:
    router_weight = layer.family.router_weight(layer.router)
    gate = nn.Linear(router_weight.shape[1], len(chosen), bias=gate_bias)
    gate.to(device=router_weight.device, dtype=router_weight.dtype)
    _init_gate(layer, gate, chosen)
    block = layer.block
    block.add_module(PERSONAL_EXPERTS, copy_experts(layer, chosen))
    block.add_module(PERSONAL_GATE, gate)

    def add_personal_output(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = args[0] if args else next(iter(kwargs.values()))
        gate = module.get_submodule(PERSONAL_GATE)
        # The personal parts may be float32 masters over a bf16 base: under autocast the matmuls run
        # in bf16 anyway; without it they run in the masters' dtype instead of failing on mixed dtypes.
        flat = hidden.reshape(-1, hidden.shape[-1]).to(gate.weight.dtype)
        weights = torch.sigmoid(gate(flat))
        experts = module.get_submodule(PERSONAL_EXPERTS)
        lora = getattr(module, PERSONAL_LORA, None)
        personal = run_experts(layer, experts, flat, weights) if lora is None else lora(experts, flat, weights)
        main = output[0] if isinstance(output, tuple) else output
        combined = main + personal.reshape(main.shape).to(main.dtype)  # Llama 4's block returns (T, H) flat
        return (combined, *output[1:]) if isinstance(output, tuple) else combined

    handle = block.register_forward_hook(add_personal_output, with_kwargs=True)
    setattr(block, _GRAFT_ATTRIBUTE, Graft(layer.name, tuple(chosen), gate_bias, handle, add_personal_output))


def add_personal_lora(model: PreTrainedModel, *, rank: int, alpha: int, dropout: float) -> list[str]:
    """Put LoRA adapters on every graft's personal experts and gate; the grafted weights stay as they are.

    The gate (an ``nn.Linear``) and module-per-expert personal experts get peft's LoRA layers (adapter
    ``"default"``, see :data:`~fedexperts.moe.personal_lora.PERSONAL_ADAPTER`); fused personal experts
    get a :class:`~fedexperts.moe.personal_lora.FusedExpertLora` child ``personal_lora`` on the block.
    Returns the names of the modules peft wrapped.
    """
    attached = grafts(model)
    if not attached:
        raise SurgeryError("the model has no personal experts to put LoRA on")
    targets: list[str] = []
    layers = moe_layer_by_name(model, attached)
    for name in attached:
        layer = layers[name]
        block = layer.block
        if getattr(block, PERSONAL_LORA, None) is not None or isinstance(
            block.get_submodule(PERSONAL_GATE), peft.tuners.lora.LoraLayer
        ):
            raise SurgeryError(f"{name}: the personal experts already have LoRA")
        targets.append(f"{name}.{PERSONAL_GATE}")
        experts = block.get_submodule(PERSONAL_EXPERTS)
        if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT:
            prefix = f"{name}.{PERSONAL_EXPERTS}"
            targets += [f"{prefix}.{key}" for key, sub in experts.named_modules() if isinstance(sub, nn.Linear)]
        else:
            math = fused_math(layer, experts)
            lora = FusedExpertLora(experts, layer.family.expert_tensors, math, rank, alpha, dropout)
            block.add_module(PERSONAL_LORA, lora)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft.inject_adapter_in_model(config, model, adapter_name=PERSONAL_ADAPTER)
    return targets


@torch.no_grad()
def reset_personal_lora(block: nn.Module) -> None:
    """Fresh personal adapters on one grafted block (zero delta); nothing when it has none."""
    fused = getattr(block, PERSONAL_LORA, None)
    if isinstance(fused, FusedExpertLora):
        fused.reset()
    for part in (PERSONAL_GATE, PERSONAL_EXPERTS):
        for module in block.get_submodule(part).modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and PERSONAL_ADAPTER in module.lora_A:
                module.reset_lora_parameters(PERSONAL_ADAPTER, True)


def merge_personal_lora(model: PreTrainedModel) -> list[str]:
    """Fold every graft's fused-expert LoRA (:class:`FusedExpertLora`) into its personal experts; the layers done.

    The grafts then compute as before without the adapter module. LoRA that peft put on the gates
    (and module-per-expert personal experts) is peft's to merge, like any other peft layer.
    """
    done = []
    for name in grafts(model):
        block = model.get_submodule(name)
        lora = getattr(block, PERSONAL_LORA, None)
        if isinstance(lora, FusedExpertLora):
            lora.merge_into(block.get_submodule(PERSONAL_EXPERTS))
            delattr(block, PERSONAL_LORA)
            done.append(name)
    return done


def _base_key(key: str) -> str | None:
    """A grafted module's state key without peft's segments; ``None`` for a LoRA adapter tensor."""
    if ".lora_" in f".{key}":
        return None
    return key.replace("base_layer.", "")


@torch.no_grad()
def regraft(
    model: PreTrainedModel, choices: Mapping[str, int | Sequence[int]], *, reset_adapters: bool = True
) -> dict[str, tuple[int, ...]]:
    """Refill existing grafts in place with fresh copies of other routed experts (and their router rows).

    The personal modules keep their identity (and so their parameter names, roles and optimizer
    slots); only their values change. Used when one process serves many clients, each with its own
    choice, and when a grafting choice is refreshed. With personal LoRA, the adapters are reset
    (``reset_adapters``) or left for the caller to load (a client's saved adapters on its saved choice).
    """
    layers = moe_layer_by_name(model, choices)
    attached = grafts(model)
    done: dict[str, tuple[int, ...]] = {}
    for name, choice in choices.items():
        if name not in attached:
            raise SurgeryError(f"{name} has no personal experts to refill; graft them first")
        chosen = check_expert_indices(layers[name], [choice] if isinstance(choice, int) else choice)
        graft = attached[name]
        if len(chosen) != len(graft.experts):
            raise SurgeryError(f"{name}: grafted {len(graft.experts)} experts, cannot refill with {len(chosen)}")
        block = layers[name].block
        fresh = copy_experts(layers[name], chosen).state_dict()
        for key, tensor in block.get_submodule(PERSONAL_EXPERTS).state_dict().items():
            base_key = _base_key(key)
            if base_key is not None:
                tensor.copy_(fresh[base_key])
        _init_gate(layers[name], block.get_submodule(PERSONAL_GATE), chosen)
        if reset_adapters:
            reset_personal_lora(block)
        setattr(block, _GRAFT_ATTRIBUTE, replace(graft, experts=tuple(chosen)))
        done[name] = tuple(chosen)
    return done


def set_grafted_experts(model: PreTrainedModel, experts: Mapping[str, Sequence[int]]) -> None:
    """Record which routed experts the personal slots came from (after loading a client's saved values)."""
    attached = grafts(model)
    for name, chosen in experts.items():
        if name not in attached or len(chosen) != len(attached[name].experts):
            raise SurgeryError(f"{name}: saved grafting choice {list(chosen)} does not fit the grafted layer")
        block = model.get_submodule(name)
        setattr(block, _GRAFT_ATTRIBUTE, replace(attached[name], experts=tuple(int(i) for i in chosen)))


@contextmanager
def suspended_grafts(model: PreTrainedModel) -> Iterator[None]:
    """Run the model as if no personal experts were attached (e.g. to measure the pretrained layer output)."""
    attached = grafts(model)
    for graft in attached.values():
        graft.handle.remove()
    try:
        yield
    finally:
        for name, graft in attached.items():
            block = model.get_submodule(name)
            handle = block.register_forward_hook(graft.hook, with_kwargs=True)
            setattr(block, _GRAFT_ATTRIBUTE, replace(getattr(block, _GRAFT_ATTRIBUTE), handle=handle))


def remove_personal_experts(model: PreTrainedModel, layer_names: Iterable[str] | None = None) -> None:
    """Detach the grafts of the named layers (default: all), leaving them as before grafting."""
    wanted = None if layer_names is None else set(layer_names)
    for layer in moe_layers(model):
        if wanted is not None and layer.name not in wanted:
            continue
        graft = getattr(layer.block, _GRAFT_ATTRIBUTE, None)
        if graft is None:
            continue
        graft.handle.remove()
        delattr(layer.block, PERSONAL_EXPERTS)
        delattr(layer.block, PERSONAL_GATE)
        if hasattr(layer.block, PERSONAL_LORA):
            delattr(layer.block, PERSONAL_LORA)
        delattr(layer.block, _GRAFT_ATTRIBUTE)


def personal_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The grafted tensors alone, under their full names in ``model``."""
    state: dict[str, torch.Tensor] = {}
    for name in grafts(model):
        block = model.get_submodule(name)
        for part in (PERSONAL_EXPERTS, PERSONAL_GATE):
            for key, tensor in block.get_submodule(part).state_dict().items():
                state[f"{name}.{part}.{key}"] = tensor
    return state


def save_personal(model: PreTrainedModel, path: str | Path) -> Path:
    """Write the personal experts and gates (safetensors, with the graft layout in its metadata)."""
    attached = grafts(model)
    if not attached:
        raise SurgeryError("the model has no personal experts to save")
    if any(_base_key(key) != key for key in personal_state_dict(model)) or any(
        hasattr(model.get_submodule(name), PERSONAL_LORA) for name in attached
    ):
        raise SurgeryError("saving personal experts trained with LoRA to a file is not supported yet")
    layout = {name: {"experts": list(g.experts), "gate_bias": g.gate_bias} for name, g in attached.items()}
    return save_tensors(path, personal_state_dict(model), {_METADATA_KEY: json.dumps(layout)})


def load_personal(model: PreTrainedModel, path: str | Path) -> dict[str, tuple[int, ...]]:
    """Graft the personal parts saved at ``path`` onto ``model`` (a freshly loaded base model).

    The saved layout must name MoE layers of this model and expert indices it has; every saved
    tensor must match the graft's shape. On any mismatch nothing stays attached.
    """
    source = Path(path)
    if not source.is_file():
        raise SurgeryError(f"{source}: no such personal-state file")
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise SurgeryError(f"{source}: not a personal-state file (no {_METADATA_KEY!r} metadata)")
        layout = json.loads(metadata[_METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    by_bias: dict[bool, dict[str, list[int]]] = {}
    for name, entry in layout.items():
        by_bias.setdefault(bool(entry["gate_bias"]), {})[name] = [int(i) for i in entry["experts"]]
    attached: dict[str, tuple[int, ...]] = {}
    try:
        for gate_bias, choices in by_bias.items():
            attached.update(graft_personal_experts(model, choices, gate_bias=gate_bias))
        expected = personal_state_dict(model)
        if set(expected) != set(tensors):
            raise SurgeryError(
                f"{source}: tensors {sorted(set(tensors) ^ set(expected))[:4]} do not match the saved layout"
            )
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise SurgeryError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}"
                )
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key])
    except Exception:
        remove_personal_experts(model, attached)
        raise
    return attached
