"""Per-layer, per-expert routing statistics read from the routers' own outputs.

Forward hooks on every router record what the router returned (chosen experts and their weights),
so families that do not route by plain top-k of logits (DeepSeek-V3's corrected group-limited
sigmoid routing, PhiMoE's SparseMixer, Switch's capacity-limited top-1) are counted as they
actually route. Padding tokens are excluded with the batch's attention mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from fedexperts.errors import FedExpertsError
from fedexperts.moe.families import MoELayer, RoutingDecision, moe_layers


@dataclass
class LayerRouting:
    """Accumulated routing of one MoE layer over the real tokens seen so far."""

    name: str
    num_experts: int
    tokens: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    weight_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    token_indices: list[torch.Tensor] = field(default_factory=list)
    token_weights: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_experts, dtype=torch.long)
        self.weight_sums = torch.zeros(self.num_experts, dtype=torch.float64)

    @property
    def activation(self) -> torch.Tensor:
        """Fraction of real tokens that chose each expert (the p[i][j] of FedMoE)."""
        return self.counts.double() / max(self.tokens, 1)

    @property
    def mean_weight(self) -> torch.Tensor:
        """Average routing weight each expert received per real token (0 when not chosen)."""
        return self.weight_sums / max(self.tokens, 1)


class RoutingRecorder:
    """Record routing decisions of every MoE layer of a model.

    Use as a context manager around forward passes; give each batch's attention mask with
    :meth:`mask` (and the decoder's for Switch Transformers) so padding is not counted::

        with RoutingRecorder(model) as recorder:
            for batch in batches:
                with recorder.mask(batch["attention_mask"]):
                    model(**batch)
        probabilities = recorder.activation()
    """

    def __init__(self, model: PreTrainedModel, *, keep_tokens: bool = False) -> None:
        self.layers: list[MoELayer] = moe_layers(model)
        self.keep_tokens = keep_tokens
        self.stats: dict[str, LayerRouting] = {
            layer.name: LayerRouting(layer.name, layer.num_experts) for layer in self.layers
        }
        self._encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self._masks: dict[str, torch.Tensor | None] = {"encoder": None, "decoder": None}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> RoutingRecorder:
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook_for(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def mask(
        self, attention_mask: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Mark which tokens of the next forward are real (1) or padding (0).

        Decoder-only models take ``attention_mask``; encoder-decoder models take the encoder's
        ``attention_mask`` and the ``decoder_attention_mask`` (``None``: every token is real).
        """
        decoder_mask = decoder_attention_mask if self._encoder_decoder else attention_mask
        self._masks = {"encoder": attention_mask, "decoder": decoder_mask}
        try:
            yield
        finally:
            self._masks = {"encoder": None, "decoder": None}

    def _hook_for(self, layer: MoELayer) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(layer, layer.family.decisions(output, module))

        return hook

    def _record(self, layer: MoELayer, decision: RoutingDecision) -> None:
        indices = decision.indices.detach()
        weights = decision.weights.detach().to(torch.float64)
        mask = self._masks[layer.stack]
        if mask is not None:
            real = mask.reshape(-1).to(device=indices.device, dtype=torch.bool)
            if real.numel() != indices.shape[0]:
                raise FedExpertsError(
                    f"{layer.name}: attention mask covers {real.numel()} tokens but the router saw "
                    f"{indices.shape[0]}; pass the mask of the batch being run"
                )
            indices, weights = indices[real], weights[real]
        stats = self.stats[layer.name]
        stats.tokens += indices.shape[0]
        chosen = indices >= 0
        flat = indices[chosen].cpu()
        stats.counts += torch.bincount(flat, minlength=stats.num_experts)
        stats.weight_sums.index_add_(0, flat, weights[chosen].cpu())
        if self.keep_tokens:
            stats.token_indices.append(indices.cpu())
            stats.token_weights.append(weights.cpu())

    def counts(self) -> dict[str, torch.Tensor]:
        """Per layer: how many real tokens chose each expert."""
        return {name: stats.counts.clone() for name, stats in self.stats.items()}

    def activation(self) -> dict[str, torch.Tensor]:
        """Per layer: fraction of real tokens that chose each expert."""
        return {name: stats.activation for name, stats in self.stats.items()}

    def decisions(self, layer_name: str) -> RoutingDecision:
        """All recorded per-token choices of one layer (needs ``keep_tokens=True``)."""
        if not self.keep_tokens:
            raise FedExpertsError("per-token decisions were not kept; create the recorder with keep_tokens=True")
        stats = self.stats[layer_name]
        return RoutingDecision(torch.cat(stats.token_indices), torch.cat(stats.token_weights))
