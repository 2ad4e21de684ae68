"""Test-only references computed independently of fedexperts: router logits masked to -inf, top-k of logits."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fedexperts.moe import RoutingRecorder, moe_layer_by_name, moe_layers


@contextmanager
def masked_router_logits(model: torch.nn.Module, dropped: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Make the routers of the named layers see -inf logits for the dropped experts.

    Every family's router computes its logits with ``F.linear`` on its own weight; this swaps
    ``torch.nn.functional.linear`` for one that adds the mask when that weight is a router weight.
    """
    layers = moe_layer_by_name(model, dropped)
    masks = {}
    for name, experts in dropped.items():
        weight = layers[name].family.router_weight(layers[name].router)
        mask = torch.zeros(weight.shape[0])
        mask[list(experts)] = float("-inf")
        masks[id(weight)] = mask
    original = F.linear

    def linear(input, weight, bias=None):
        out = original(input, weight, bias)
        mask = masks.get(id(weight))
        return out if mask is None else out + mask.to(out)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def recorded_and_top_k_counts(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[RoutingRecorder, dict]:
    """The recorder of one forward over ``batch``, and per layer the expert counts that the top-k of the
    router's own (biased) logits, recomputed from the router's input on the real tokens, gives."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        layer.router.register_forward_pre_hook(
            lambda module, args, name=layer.name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in moe_layers(model)
    ]
    recorder = RoutingRecorder(model)
    try:
        with recorder, recorder.mask(batch["attention_mask"], batch.get("decoder_attention_mask")), torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    expected = {}
    for layer in moe_layers(model):
        router = layer.router
        scores = inputs[layer.name].float() @ layer.family.router_weight(router).float().T
        if getattr(router, "bias", None) is not None:
            scores = scores + router.bias.float()
        chosen = scores[real].topk(layer.top_k, dim=-1).indices
        expected[layer.name] = torch.bincount(chosen.reshape(-1), minlength=layer.num_experts)
    return recorder, expected
