"""Standalone routed experts, computed with each family's own code.

A copy of some experts of a fused block is a fresh instance of the family's own experts class
built with the expert count set to ``n``, so it runs through the same ``experts_implementation``
(``grouped_mm`` / ``eager``) and layout handling (GPT-OSS's transposed, interleaved, biased
weights) as the model itself: nothing about the layout is re-implemented here. For Switch
Transformers an expert already is a module, so a copy is a deep copy of it. Llama 4's experts module
is not transformers' standard one (no expert-count config, no routing arguments: it runs every expert
on every token, pre-scaled): its copy is a deep copy of the module with the kept rows, and it is run
through its own forward on unscaled tokens, each expert's output then weighted (FLEx's graft weights
the output, where Llama 4's own block scales the input).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from fedexperts.errors import SurgeryError
from fedexperts.moe.families import ExpertLayout, MoELayer


def check_expert_indices(layer: MoELayer, indices: Sequence[int]) -> list[int]:
    """The indices as ints, or a :class:`SurgeryError` if empty, duplicated or out of range."""
    chosen = [int(i) for i in indices]
    if not chosen:
        raise SurgeryError(f"{layer.name}: empty expert list")
    bad = [i for i in chosen if not 0 <= i < layer.num_experts]
    if bad:
        raise SurgeryError(
            f"{layer.name}: expert indices {bad} out of range; the layer has {layer.num_experts} experts"
        )
    if len(set(chosen)) != len(chosen):
        raise SurgeryError(f"{layer.name}: duplicate expert indices in {chosen}")
    return chosen


def copy_experts(layer: MoELayer, indices: Sequence[int]) -> nn.Module:
    """A new module holding copies of the given experts of ``layer``, in that order."""
    chosen = check_expert_indices(layer, indices)
    family = layer.family
    source = layer.experts
    if family.layout is ExpertLayout.MODULE_PER_EXPERT:
        return nn.ModuleList(copy.deepcopy(source[f"expert_{i}"]) for i in chosen)
    index = torch.tensor(chosen, device=source.get_parameter(family.expert_tensors[0]).device)
    if not family.experts_interface:
        return _sliced_deep_copy(source, family.expert_tensors, index)
    config = copy.deepcopy(source.config)
    setattr(config, family.num_experts_field, len(chosen))
    with torch.device("meta"):
        clone = type(source)(config)
    for tensor_name in family.expert_tensors:
        original = source.get_parameter(tensor_name)
        sliced = original.detach().index_select(0, index).clone()
        setattr(clone, tensor_name, nn.Parameter(sliced, requires_grad=original.requires_grad))
    listed = set(family.expert_tensors)
    unset = [name for name, _ in clone.named_parameters() if name not in listed]
    if not index.is_meta:  # on the meta device (sizing) every buffer is meta anyway
        unset += [name for name, tensor in clone.named_buffers() if tensor.is_meta]
    if unset:
        raise SurgeryError(
            f"{layer.experts_name}: {type(source).__name__} has tensors {unset} this family does not list"
        )
    return clone


def _sliced_deep_copy(source: Any, tensors: Sequence[str], index: torch.Tensor) -> nn.Module:
    """A deep copy of ``source`` whose expert tensors hold only the ``index`` rows (the full ones are not copied)."""
    memo: dict[int, object] = {}
    for name in tensors:
        original = source.get_parameter(name)
        memo[id(original)] = nn.Parameter(
            original.detach().index_select(0, index).clone(), requires_grad=original.requires_grad
        )
    clone: Any = copy.deepcopy(source, memo)
    if hasattr(clone, "num_experts"):
        clone.num_experts = int(index.numel())
    return clone


def _every_expert(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(E, T, H): every expert of a Llama-4-style experts module on the same tokens, through its own forward."""
    count = int(module.get_parameter("gate_up_proj").shape[0])
    out: torch.Tensor = module(hidden.repeat(count, 1))
    return out.view(count, hidden.shape[0], -1)


def run_experts(layer: MoELayer, module: nn.Module, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the experts of ``module`` (from :func:`copy_experts`) for every token.

    ``hidden`` is (T, H); ``weights`` is (T, n), one weight per expert of the module.
    """
    if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT:
        assert isinstance(module, nn.ModuleList)
        out = torch.zeros_like(hidden)
        for slot, expert in enumerate(module):
            out = out + expert(hidden).to(hidden.dtype) * weights[:, slot : slot + 1].to(hidden.dtype)
        return out
    if not layer.family.experts_interface:
        outputs = _every_expert(module, hidden)
        return (outputs * weights.transpose(0, 1).unsqueeze(-1).to(outputs.dtype)).sum(dim=0)
    count = weights.shape[1]
    index = torch.arange(count, device=hidden.device).expand(hidden.shape[0], count)
    return module(hidden, index, weights.to(hidden.dtype))


@dataclass(frozen=True)
class FusedMath:
    """How a fused experts module stores its weights: the layout flags transformers uses."""

    transposed: bool
    """Weights stored (E, in, out) rather than ``nn.Linear``'s (E, out, in)."""
    has_bias: bool


def fused_math(layer: MoELayer, experts: nn.Module) -> FusedMath:
    """The flags transformers sets on a standard experts module, or the family's layout for a non-standard one."""
    if layer.family.experts_interface:
        if not experts.has_gate or getattr(experts, "has_post_expert_norm", False):
            raise SurgeryError(f"{layer.name}: experts without a gated projection are not supported")
        return FusedMath(bool(experts.is_transposed), bool(experts.has_bias))
    if layer.family.layout is ExpertLayout.FUSED_TRANSPOSED:
        return FusedMath(transposed=True, has_bias=False)
    raise SurgeryError(f"{layer.name}: no fused-expert math for layout {layer.family.layout}")


def apply_gate(experts: Any, gate_up: torch.Tensor) -> torch.Tensor:
    """The module's own gated activation (``_apply_gate``), or SwiGLU on ``[gate | up]`` where it has none (Llama 4)."""
    own = getattr(experts, "_apply_gate", None)
    if own is not None:
        return cast(torch.Tensor, own(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return cast(torch.Tensor, experts.act_fn(gate)) * up


def dense_projection(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """Every expert's projection of every token in one batched matmul: (T, in) -> (E, T, out), or (E, T, in) ->
    (E, T, out) when each expert has tokens of its own."""
    out = torch.matmul(hidden, weight if transposed else weight.transpose(1, 2))
    return out if bias is None else out + bias.unsqueeze(1)


def each_expert_output(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Output of every routed expert of ``layer`` on every token, unweighted: (E, T, H).

    Fused experts are evaluated densely with two batched matmuls over the expert dimension, reading
    the layout flags (``is_transposed``, ``has_bias``) that transformers sets on the experts module
    and applying the module's own ``_apply_gate`` (SwiGLU, GPT-OSS's clamped interleaved variant).
    transformers has no "all experts on all tokens" forward, so this part is written here.
    """
    experts = layer.experts
    if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT:
        return torch.stack([experts[f"expert_{j}"](hidden) for j in range(layer.num_experts)])
    math = fused_math(layer, experts)
    gate_up_bias = experts.gate_up_proj_bias if math.has_bias else None
    down_bias = experts.down_proj_bias if math.has_bias else None
    gate_up = dense_projection(hidden, experts.gate_up_proj, gate_up_bias, math.transposed)
    return dense_projection(apply_gate(experts, gate_up), experts.down_proj, down_bias, math.transposed)


def one_expert_output(layer: MoELayer, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """Output of one routed expert on every token, unweighted: (T, H). One forward per call."""
    if layer.family.layout is ExpertLayout.MODULE_PER_EXPERT:
        return layer.experts[f"expert_{expert}"](hidden)
    if not layer.family.experts_interface:  # its own forward, with every other expert's tokens zero
        routed = torch.zeros(layer.num_experts, *hidden.shape, dtype=hidden.dtype, device=hidden.device)
        routed[expert] = hidden
        out: torch.Tensor = layer.experts(routed.view(-1, hidden.shape[-1]))
        return out.view(layer.num_experts, hidden.shape[0], -1)[expert]
    index = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
    ones = torch.ones(index.shape, dtype=hidden.dtype, device=hidden.device)
    return layer.experts(hidden, index, ones)
