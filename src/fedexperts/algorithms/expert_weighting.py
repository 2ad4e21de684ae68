"""Activation-aware expert aggregation (``algorithm.expert_weighting = "tokens"``).

Averaging a routed expert over every client by example counts pulls it towards the copies of
clients that barely routed to it: their copy is the global one, hardly trained. In the spirit of
FLAME (arXiv 2506.16600) and FedAlign-MoE (arXiv 2603.21276), without their code: each client
reports, per MoE layer, how many real tokens its router sent to each expert during local training
(:data:`EXPERT_TOKENS_KEY`, counted by :class:`~fedexperts.moe.routing.RoutingRecorder`), and each
expert's tensors (its rows of the fused expert tensors and of the router) are averaged over the
clients that routed tokens to it, weighted by those counts. An expert no client routed to keeps its
global value, under every server rule (:func:`keep_rows`). Every other tensor stays example-weighted.

Model-free: the model side is :func:`fedexperts.moe.expert_slots`, which says which expert of which
layer each tensor holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from fedexperts.algorithms.aggregation import weighted_average
from fedexperts.errors import FedExpertsError
from fedexperts.interface import PayloadError, State

if TYPE_CHECKING:
    from fedexperts.moe.params import ExpertSlot

EXPERT_TOKENS_KEY = "expert_tokens"
"""Reply metadata: ``{MoE layer name: [real tokens routed to each of the client model's experts]}``, counted
over the client's local training (FedMoE: its held experts, in the order their rows travel)."""

ExpertTokens = Mapping[str, Sequence[int]]


def reported_tokens(metadata: Mapping[str, object], lengths: Mapping[str, int], *, sender: str) -> dict[str, list[int]]:
    """The per-expert token counts a reply reports, checked against ``{layer: expected expert count}``.

    Refused (:class:`PayloadError`): absent, a layer missing or unexpected, a count that is not a
    non-negative integer, or a list of the wrong length.
    """
    reported = metadata.get(EXPERT_TOKENS_KEY)
    if not isinstance(reported, Mapping):
        raise PayloadError(f"{sender}: reports no {EXPERT_TOKENS_KEY!r} (per-expert token counts) with its update")
    if set(reported) != set(lengths):
        strays = sorted(set(reported) ^ set(lengths))[:3]
        raise PayloadError(f"{sender}: {EXPERT_TOKENS_KEY} must name exactly the MoE layers (differs on {strays})")
    counts: dict[str, list[int]] = {}
    for layer, expected in lengths.items():
        values = reported[layer]
        if not isinstance(values, list) or len(values) != expected:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise PayloadError(f"{sender}: {EXPERT_TOKENS_KEY}[{layer!r}] must list {expected} counts, got {size}")
        if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values):
            raise PayloadError(f"{sender}: {EXPERT_TOKENS_KEY}[{layer!r}] must hold non-negative integers")
        counts[layer] = list(values)
    return counts


def _weights(slot: ExpertSlot, tokens: ExpertTokens, rows: int) -> torch.Tensor:
    """One client's weight for each expert row of a tensor (one weight for a whole-expert tensor)."""
    counts = torch.tensor(list(tokens[slot.layer]), dtype=torch.float64)
    if slot.expert is not None:
        return counts[slot.expert].reshape(1)
    if counts.numel() != rows:
        raise FedExpertsError(f"{slot.layer}: {counts.numel()} token counts for a tensor of {rows} expert rows")
    return counts


def token_weighted_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float, ExpertTokens]],
    slots: Mapping[str, ExpertSlot],
) -> tuple[State, dict[str, torch.Tensor]]:
    """Expert tensors averaged per expert by routed tokens, the rest by examples; and which experts nobody used.

    ``updates`` hold each client's tensors, example count and checked token counts; ``slots`` the
    expert tensors among the global state's keys. The second result maps each expert tensor to a
    boolean mask of its experts no client routed to (per row, or 0-d for a whole-expert tensor):
    they keep their global value here, and :func:`keep_rows` keeps it through the server step.
    Accumulated in float64; results in each global tensor's dtype, on the CPU.
    """
    plain = [key for key in global_state if key not in slots]
    averaged = weighted_average([({key: t[key] for key in plain}, n) for t, n, _ in updates]) if plain else {}
    unrouted: dict[str, torch.Tensor] = {}
    for key, slot in slots.items():
        full = global_state[key].detach().to(device="cpu", dtype=torch.float64)
        rows = full if slot.expert is None else full.unsqueeze(0)
        shape = (-1,) + (1,) * (rows.dim() - 1)
        sums = torch.zeros_like(rows)
        total = torch.zeros(rows.shape[0], dtype=torch.float64)
        for tensors, _, tokens in updates:
            weights = _weights(slot, tokens, rows.shape[0])
            value = tensors[key].detach().to(device="cpu", dtype=torch.float64)
            sums += (value if slot.expert is None else value.unsqueeze(0)) * weights.reshape(shape)
            total += weights
        used = total > 0
        result = rows.clone()
        result[used] = sums[used] / total[used].reshape(shape)
        averaged[key] = (result if slot.expert is None else result[0]).to(global_state[key].dtype)
        unrouted[key] = ~used if slot.expert is None else ~used[0]
    return averaged, unrouted


def keep_rows(before: Mapping[str, torch.Tensor], stepped: State, masks: Mapping[str, torch.Tensor]) -> State:
    """``stepped`` with the experts ``masks`` mark (rows, or a whole tensor for a 0-d mask) put back as in ``before``.

    A server rule with momentum would otherwise move an expert nobody trained this round.
    """
    for key, mask in masks.items():
        if not bool(mask.any()):
            continue
        if mask.dim() == 0:
            stepped[key] = before[key]
            continue
        kept = stepped[key].clone()
        kept[mask] = before[key][mask].to(device=kept.device, dtype=kept.dtype)
        stepped[key] = kept
    return stepped
