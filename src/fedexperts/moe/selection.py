"""FLEx's grafting choice: which pretrained expert best reconstructs each full MoE layer.

For every MoE layer, on a client's calibration tokens X with full-layer output Z (routed experts,
shared experts and all), the loss of routed expert j is, by criterion:

- ``pooled``: ``||Z - E_j(X)||_F`` over all real tokens of all calibration batches at once;
- ``per-batch``: ``sum_b ||Z_b - E_j(X_b)||_F``, one Frobenius norm per calibration batch b, summed
  in float64: Lu et al.'s expert-pruning criterion (arXiv 2402.14800), which FLEx's code runs
  through their ``Expert_Sparsity`` submodule. The two differ when batches differ in size or error.

Padding tokens are left out under both. The one-pass method evaluates every expert of a layer in a
single batched experts call; the per-expert method runs one forward per expert and exists as the
reference it is tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from fedexperts.errors import FedExpertsError
from fedexperts.moe.experts import each_expert_output, one_expert_output
from fedexperts.moe.families import MoELayer, moe_layers
from fedexperts.moe.precision import autocast_for


class SelectionMethod(StrEnum):
    ONE_PASS = "one-pass"
    PER_EXPERT = "per-expert"


class SelectionCriterion(StrEnum):
    POOLED = "pooled"
    """One Frobenius norm over every calibration token."""
    PER_BATCH = "per-batch"
    """The sum over calibration batches of each batch's Frobenius norm (Lu et al., FLEx's code)."""


@dataclass(frozen=True)
class GraftChoice:
    """Reconstruction losses of every expert of one layer, best first."""

    layer: str
    losses: torch.Tensor
    """Per expert j, the Frobenius norm of ``Z - E_j(X)`` over the calibration tokens, or the sum of
    one such norm per calibration batch (:class:`SelectionCriterion`)."""

    @property
    def ranking(self) -> list[int]:
        return [int(i) for i in torch.argsort(self.losses, stable=True)]

    @property
    def best(self) -> int:
        return self.ranking[0]

    def top(self, n: int) -> list[int]:
        if not 1 <= n <= self.losses.numel():
            raise FedExpertsError(f"{self.layer}: cannot graft top-{n} of {self.losses.numel()} experts")
        return self.ranking[:n]


def _squared_errors(
    layer: MoELayer, hidden: torch.Tensor, target: torch.Tensor, method: SelectionMethod, chunk: int
) -> torch.Tensor:
    """Per expert, the summed squared error against the layer output over these tokens."""
    errors = torch.zeros(layer.num_experts, dtype=torch.float64, device=hidden.device)
    if method is SelectionMethod.PER_EXPERT:
        for expert in range(layer.num_experts):
            output = one_expert_output(layer, expert, hidden).float()
            errors[expert] = output.sub_(target.float()).pow_(2).sum().double()
        return errors
    for start in range(0, hidden.shape[0], chunk):
        x, z = hidden[start : start + chunk], target[start : start + chunk].float()
        outputs = each_expert_output(layer, x).float()
        errors += outputs.sub_(z.unsqueeze(0)).pow_(2).sum(dim=(1, 2)).double()
    return errors


@torch.no_grad()
def reconstruction_losses(
    model: PreTrainedModel,
    batches: Iterable[Mapping[str, Any]],
    *,
    method: SelectionMethod | str = SelectionMethod.ONE_PASS,
    criterion: SelectionCriterion | str = SelectionCriterion.POOLED,
    tokens_per_chunk: int = 128,
) -> dict[str, GraftChoice]:
    """Run ``model`` on calibration batches and score every routed expert of every MoE layer.

    ``batches`` are keyword arguments for the model's forward; their ``attention_mask`` (and
    ``decoder_attention_mask`` for encoder-decoder models) exclude padding tokens. The one-pass
    method evaluates ``tokens_per_chunk`` tokens at a time, so its memory stays at ``experts x chunk
    x max(hidden, 2 x intermediate)`` per layer; 128 was fastest on a 2-core CPU for 32-128 experts.
    ``criterion`` says how the batches' errors combine (pooled, or Lu et al.'s sum of per-batch norms).
    """
    method = SelectionMethod(method)
    per_batch = SelectionCriterion(criterion) is SelectionCriterion.PER_BATCH
    layers = moe_layers(model)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    totals = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    real: dict[str, torch.Tensor | None] = {}

    def hook_for(layer: MoELayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden = args[0] if args else next(iter(kwargs.values()))
            hidden = hidden.reshape(-1, hidden.shape[-1])
            target = layer.family.block_output(output).reshape(-1, hidden.shape[-1])
            mask = real.get(layer.stack)
            if mask is not None:
                hidden, target = hidden[mask], target[mask]
            errors = _squared_errors(layer, hidden, target, method, tokens_per_chunk).cpu()
            totals[layer.name] += errors.sqrt() if per_batch else errors

        return hook

    handles = [layer.block.register_forward_hook(hook_for(layer), with_kwargs=True) for layer in layers]
    seen = False
    try:
        was_training = model.training
        model.eval()
        for batch in batches:
            masks = {"encoder": batch.get("attention_mask"), "decoder": batch.get("attention_mask")}
            if encoder_decoder:
                masks["decoder"] = batch.get("decoder_attention_mask")
            real.clear()
            real.update({stack: None if m is None else m.reshape(-1).bool() for stack, m in masks.items()})
            with autocast_for(model):  # as the client trains: float32 LoRA over a half-precision base
                model(**batch)
            seen = True
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise FedExpertsError("grafting selection needs at least one calibration batch")
    return {name: GraftChoice(name, errors if per_batch else errors.sqrt()) for name, errors in totals.items()}
