"""Test-only references: router logits masked to -inf, computed independently of fedexperts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fedexperts.moe import moe_layer_by_name


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
