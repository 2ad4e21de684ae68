"""Confirming a structurally discovered MoE family: the identities the descriptors are tested on.

One small forward (16 tokens, eval mode, no gradient) records each sparse block's input; then,
block by block, with hooks on its router and experts:

(a) **router output**: the router returns ``(logits (T, E), top-k weights (T, k), top-k indices
    (T, k))`` and the experts are called once with exactly those indices and weights, so reading
    the router's output (routing statistics, FedMoE's activations) is reading what the experts use;
(b) **routing counts**: every token goes to ``router.top_k`` distinct experts, and the counts read
    from the router's output (the family's ``decisions``) equal the counts the experts received;
(c) **pruned == masked**, on the first block: a copy of that block alone (sharing every tensor it
    does not slice, so cheap for a big model) pruned by fedexperts' own surgery to ``top_k + 1``
    experts, dropping the most-used one, equals the original block with the dropped experts'
    logits at -inf, and the dropping changed its output (the check is not vacuous).

The -inf mask is added, while the router runs, to the output of the ``F.linear`` that is E wide
(the logits), through a ``TorchFunctionMode``; a router that computes its logits otherwise fails
(c). A model on the ``meta`` device has no weights to run: the checks then run on a copy of its
first block sliced to ``top_k + 2`` experts with random float32 weights and inputs from a fixed
seed (the global RNG is not touched), its experts run by transformers' ``eager`` implementation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fedexperts.moe.family import MoELayer
from fedexperts.moe.surgery import slice_layer

FORWARD = "forward"
ROUTER_OUTPUT = "(a) router output"
ROUTING_COUNTS = "(b) routing counts"
PRUNING = "(c) pruned == masked"
PROBE_TOKENS = 16
_SEED = 0


class CheckFailed(Exception):
    """One confirmation check failed; ``reason`` says what was seen."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


class _LogitMask(TorchFunctionMode):
    """Adds ``mask`` to the output of every E-wide ``F.linear`` computed while ``active`` (while the router runs)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask
        self.active = False
        self.masked = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.active and func is F.linear and isinstance(out, torch.Tensor) and out.shape[-1] == self.mask.numel():
            self.masked += 1
            out = out + self.mask.to(device=out.device, dtype=out.dtype)
        return out


@dataclass
class _Run:
    output: torch.Tensor
    router_outputs: list[Any] = field(default_factory=list)
    expert_inputs: list[list[torch.Tensor]] = field(default_factory=list)
    masked: int = 0


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]


def _run(layer: MoELayer, args: tuple[Any, ...], kwargs: dict[str, Any], dropped: Sequence[int] = ()) -> _Run:
    """One forward of the block alone, recording its router's output and its experts' inputs."""
    mask = torch.zeros(layer.num_experts)
    mask[list(dropped)] = float("-inf")
    mode = _LogitMask(mask)
    routers: list[Any] = []
    experts: list[list[torch.Tensor]] = []

    def enter(module: nn.Module, inputs: Any) -> None:
        mode.active = bool(dropped)

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        mode.active = False
        routers.append(output)

    def called(module: nn.Module, inputs: Any, keywords: dict[str, Any]) -> None:
        experts.append(_tensors(inputs, keywords))

    handles = [
        layer.router.register_forward_pre_hook(enter),
        layer.router.register_forward_hook(leave),
        layer.experts.register_forward_pre_hook(called, with_kwargs=True),
    ]
    try:
        with torch.no_grad(), mode:
            output = layer.block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return _Run(layer.family.block_output(output), routers, experts, mode.masked)


def _failure(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tolerance = max(_tolerance(a.dtype), _tolerance(b.dtype))
    return bool(torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance))


def _parse(layer: MoELayer, run: _Run, tokens: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check (a); the router's top-k weights and indices."""
    router = type(layer.router).__name__
    if len(run.router_outputs) != 1:
        raise CheckFailed(ROUTER_OUTPUT, f"{name}: the router ran {len(run.router_outputs)} times in one block forward")
    output = run.router_outputs[0]
    if not (isinstance(output, tuple | list) and len(output) == 3 and all(isinstance(t, torch.Tensor) for t in output)):
        shape = [tuple(t.shape) for t in output] if isinstance(output, tuple | list) else type(output).__name__
        raise CheckFailed(
            ROUTER_OUTPUT, f"{name}: {router} returns {shape}, not (logits, top-k weights, top-k indices)"
        )
    logits, weights, indices = output
    experts = layer.num_experts
    if tuple(logits.shape) != (tokens, experts) or not logits.is_floating_point():
        raise CheckFailed(
            ROUTER_OUTPUT, f"{name}: {router}'s logits are {tuple(logits.shape)}, not ({tokens}, {experts})"
        )
    if (
        indices.is_floating_point()
        or indices.dim() != 2
        or indices.shape[0] != tokens
        or weights.shape != indices.shape
    ):
        raise CheckFailed(
            ROUTER_OUTPUT,
            f"{name}: {router}'s weights {tuple(weights.shape)} and indices {tuple(indices.shape)} ({indices.dtype}) "
            f"are not both ({tokens}, k) with integer indices",
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= experts):
        raise CheckFailed(ROUTER_OUTPUT, f"{name}: {router} returns expert indices outside [0, {experts})")
    if len(run.expert_inputs) != 1:
        raise CheckFailed(ROUTER_OUTPUT, f"{name}: the experts ran {len(run.expert_inputs)} times in one block forward")
    received = run.expert_inputs[0]
    if not any(t.shape == indices.shape and torch.equal(t, indices) for t in received):
        raise CheckFailed(
            ROUTER_OUTPUT, f"{name}: the experts are not given the router's top-k indices as it returns them"
        )
    if not any(t.shape == weights.shape and t.is_floating_point() and _close(t, weights) for t in received):
        raise CheckFailed(
            ROUTER_OUTPUT,
            f"{name}: the experts are not given the router's top-k weights as it returns them "
            "(the block changes them in between)",
        )
    return weights, indices


def _check_counts(layer: MoELayer, run: _Run, indices: torch.Tensor, tokens: int, name: str) -> None:
    """Check (b)."""
    top_k = getattr(layer.router, "top_k", None)
    if not isinstance(top_k, int):
        raise CheckFailed(ROUTING_COUNTS, f"{name}: {type(layer.router).__name__} has no integer top_k")
    decision = layer.family.decisions(run.router_outputs[0], layer.router).indices
    if decision.shape != (tokens, top_k):
        raise CheckFailed(
            ROUTING_COUNTS, f"{name}: tokens go to {decision.shape[-1]} experts; the router's top_k is {top_k}"
        )
    if top_k > 1 and bool((decision.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise CheckFailed(ROUTING_COUNTS, f"{name}: a token is routed to the same expert twice")
    counts = torch.bincount(decision.reshape(-1).cpu(), minlength=layer.num_experts)
    used = torch.bincount(indices.reshape(-1).cpu(), minlength=layer.num_experts)
    if not torch.equal(counts, used) or int(counts.sum()) != tokens * top_k:
        raise CheckFailed(ROUTING_COUNTS, f"{name}: counts read from the router differ from what the experts received")


def pruned_copy(layer: MoELayer, keep: list[int]) -> MoELayer:
    """A copy of one block keeping experts ``keep`` (fedexperts' surgery), sharing every tensor it does not slice."""
    block = layer.block
    memo: dict[int, Any] = {id(tensor): tensor for tensor in (*block.parameters(), *block.buffers())}
    clone = copy.deepcopy(block, memo)
    holder = nn.Module()
    holder.add_module("block", clone)
    family = layer.family
    probe = MoELayer(
        name="block",
        stack=layer.stack,
        layer_index=layer.layer_index,
        block=clone,
        router=clone.get_submodule(family.router_attr),
        experts=clone.get_submodule(family.experts_attr),
        shared_experts=tuple(clone.get_submodule(attr) for attr in family.shared_expert_attrs),
        family=family,
    )
    slice_layer(holder, probe, keep)
    return probe


def _check_pruning(
    layer: MoELayer, args: tuple[Any, ...], kwargs: dict[str, Any], plain: _Run, indices: torch.Tensor, name: str
) -> None:
    """Check (c), on a copy of this block only."""
    experts, top_k = layer.num_experts, layer.top_k
    if experts - 1 < top_k:
        raise CheckFailed(PRUNING, f"{name}: {experts} experts for top-{top_k}; none can be dropped")
    counts = torch.bincount(indices.reshape(-1).cpu(), minlength=experts)
    order = sorted(range(experts), key=lambda expert: (-int(counts[expert]), expert))
    rest = order[1:]  # the most-used expert is always dropped
    keep = sorted(rest[: max(top_k, min(len(rest), top_k + 1))], reverse=True)  # kept in a non-identity order
    dropped = [expert for expert in range(experts) if expert not in keep]
    try:
        masked = _run(layer, args, kwargs, dropped)
    except Exception as error:  # whatever fails here is this check's answer, named in the refusal
        raise CheckFailed(
            PRUNING, f"{name}: the block with experts {dropped} masked fails ({_failure(error)})"
        ) from error
    try:
        pruned = _run(pruned_copy(layer, keep), args, kwargs)
    except Exception as error:  # whatever fails here is this check's answer, named in the refusal
        raise CheckFailed(PRUNING, f"{name}: the block pruned to experts {keep} fails ({_failure(error)})") from error
    if masked.masked == 0:
        raise CheckFailed(
            PRUNING,
            f"{name}: {type(layer.router).__name__} computes no {experts}-wide linear output (its logits) "
            "that could be masked",
        )
    tolerance = _tolerance(plain.output.dtype) * max(1.0, float(masked.output.abs().max()))
    difference = float((pruned.output.float() - masked.output.float()).abs().max())
    if not difference <= tolerance:
        raise CheckFailed(
            PRUNING,
            f"{name}: the block pruned to experts {keep} differs from the original with experts {dropped} "
            f"masked to -inf (max difference {difference:.3g}, tolerance {tolerance:.3g})",
        )
    if float((plain.output.float() - masked.output.float()).abs().max()) <= tolerance:
        raise CheckFailed(PRUNING, f"{name}: dropping experts {dropped} changed nothing; the identity is not exercised")


def _check_block(layer: MoELayer, args: tuple[Any, ...], kwargs: dict[str, Any], *, pruning: bool, name: str) -> None:
    """Checks (a), (b) and, with ``pruning``, (c) on one block; ``name`` is the model's name for it."""
    width = layer.family.router_weight(layer.router).shape[1]
    hidden = next((t for t in _tensors(args, kwargs) if t.dim() >= 2 and t.shape[-1] == width), None)
    if hidden is None:
        raise CheckFailed(ROUTER_OUTPUT, f"{name}: the block's input has no hidden states {width} wide")
    try:
        plain = _run(layer, args, kwargs)
    except Exception as error:  # whatever fails here is this check's answer, named in the refusal
        raise CheckFailed(ROUTER_OUTPUT, f"{name}: the block does not run on its own ({_failure(error)})") from error
    tokens = hidden.numel() // width
    _, indices = _parse(layer, plain, tokens, name)
    _check_counts(layer, plain, indices, tokens, name)
    if pruning:
        _check_pruning(layer, args, kwargs, plain, indices, name)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(item) for item in value)
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    return value


def _block_inputs(model: nn.Module, layers: list[MoELayer]) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each block's input in one forward of the whole model on a few tokens."""
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.setdefault(name, (_clone(args), _clone(kwargs)))

        return hook

    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, nn.Embedding):
        raise CheckFailed(FORWARD, f"{type(model).__name__} has no token embedding to run a forward from")
    ids = (torch.arange(PROBE_TOKENS, device=embeddings.weight.device) * 7919 + 3) % embeddings.num_embeddings
    modes = {module: module.training for module in model.modules()}
    handles = [layer.block.register_forward_pre_hook(hook_for(layer.name), with_kwargs=True) for layer in layers]
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
    except Exception as error:  # whatever fails here is this check's answer, named in the refusal
        raise CheckFailed(
            FORWARD, f"{type(model).__name__} fails one forward on {PROBE_TOKENS} tokens ({_failure(error)})"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    missing = [layer.name for layer in layers if layer.name not in captured]
    if missing:
        raise CheckFailed(FORWARD, f"blocks {missing} did not run in the forward")
    return captured


def _random_probe(layer: MoELayer) -> tuple[MoELayer, tuple[torch.Tensor]]:
    """A float32 random-weight copy of a meta block, sliced to ``top_k + 2`` experts, and random hidden states."""
    probe = pruned_copy(layer, list(range(min(layer.num_experts, layer.top_k + 2))))
    generator = torch.Generator(device="cpu").manual_seed(_SEED)
    for module in probe.block.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                value = torch.empty(parameter.shape, dtype=torch.float32, device="cpu")
                value.normal_(0.0, value.shape[-1] ** -0.5 if value.dim() >= 2 else 0.1, generator=generator)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                dtype = torch.float32 if buffer.is_floating_point() else buffer.dtype
                module._buffers[name] = torch.zeros(buffer.shape, dtype=dtype, device="cpu")
    experts_config = getattr(probe.experts, "config", None)
    if experts_config is not None:  # the block's own copy: the reference loop runs on any device and dtype
        experts_config._experts_implementation = "eager"
    width = layer.family.router_weight(probe.router).shape[1]
    return probe, (torch.randn((1, PROBE_TOKENS, width), generator=generator, device="cpu"),)


def confirm(model: nn.Module, layers: list[MoELayer]) -> str:
    """Run checks (a)-(c) on ``model``'s sparse blocks; where they ran, or :class:`CheckFailed`."""
    if any(parameter.is_meta for parameter in model.parameters()):
        probe, hidden = _random_probe(layers[0])
        _check_block(probe, hidden, {}, pruning=True, name=f"{layers[0].name} (random-weight copy)")
        return "a random-weight copy of one sparse block (the model is on the meta device)"
    inputs = _block_inputs(model, layers)
    for position, layer in enumerate(layers):
        args, kwargs = inputs[layer.name]
        _check_block(layer, args, kwargs, pruning=position == 0, name=layer.name)
    return f"one forward of the model's own weights ({PROBE_TOKENS} tokens)"
