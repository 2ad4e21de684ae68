"""Local training of several clients at once: one forward and backward per step over their concatenated batches.

Each client keeps what :func:`fedexperts.training.train_local` gives it alone: its own float32
copies of the trainable tensors, its own AdamW moments and gradient clipping, its own data order
and dropout stream, the same learning-rate schedule, and its loss averaged over its own tokens. The
step's objective is the sum of the clients' objectives; since no frozen operation mixes rows, each
client's gradient is what its objective alone would give (up to float rounding: the matmuls run at
other shapes). A client that diverges leaves the batch with its error; the others go on.

The clients' tensors of one name are stacked into one ``(k, ...)`` leaf, so the loop's per-client
work is vectorized rather than repeated k times: one AdamW over the stacks (AdamW is elementwise and
every client steps at the same rate, so each slice moves as that client's own optimizer would move
it), gradient clipping and the divergence check by norms per client (``clip_grad_norm_``'s
arithmetic, per slice), and one loss over every row summed per client. Only the proximal term and
the router auxiliary loss are computed client by client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedexperts.batching.groups import ClientRandom, RowGroups, concatenate, grouped_forwards, units
from fedexperts.config import TrainConfig
from fedexperts.data.layout import CAUSAL
from fedexperts.interface import ProximalTerm
from fedexperts.moe.params import NO_WEIGHT_DECAY
from fedexperts.moe.precision import autocast_for
from fedexperts.training import (
    DivergenceError,
    TrainResult,
    build_optimizer,
    captured_router_logits,
    diverged_loss,
    growth_error,
    load_balancing_loss,
    set_learning_rate,
)


def client_copies(named: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Copies of a client's trainable tensors (stacked to train, then written back), keeping the no-decay mark."""
    copies = {}
    for name, param in named.items():
        copy = param.detach().clone()
        if getattr(param, NO_WEIGHT_DECAY, False):
            setattr(copy, NO_WEIGHT_DECAY, True)
        copies[name] = copy
    return copies


@dataclass
class BatchMember:
    """One client of a batched training run."""

    description: str
    tensors: dict[str, torch.Tensor]
    """Its trainable tensors by parameter name (:func:`client_copies`): the trained values are written back."""
    batches: Iterator[dict[str, torch.Tensor]]
    random: ClientRandom
    proximal: ProximalTerm | None = None
    error: DivergenceError | None = None
    """Set when the client diverged; it left the batch then (and its tensors are left as they were)."""
    loss_sum: float = field(default=0.0, init=False)
    batch_count: int = field(default=0, init=False)
    tokens: int = field(default=0, init=False)


def stacked_leaves(members: Sequence[BatchMember]) -> dict[str, torch.Tensor]:
    """Every member's tensors of one name as one trainable ``(k, ...)`` leaf, keeping the no-weight-decay mark."""
    stacked = {}
    for name, first in members[0].tensors.items():
        leaf = torch.stack([member.tensors[name] for member in members]).requires_grad_(True)
        if getattr(first, NO_WEIGHT_DECAY, False):
            setattr(leaf, NO_WEIGHT_DECAY, True)
        stacked[name] = leaf
    return stacked


def train_batched(
    model: nn.Module,
    members: Sequence[BatchMember],
    settings: TrainConfig,
    *,
    pad_token_id: int,
    total_rounds: int = 1,
    round_index: int = 0,
) -> list[TrainResult | DivergenceError]:
    """Run ``settings.steps_per_round`` steps for every member together; each member's result or its divergence.

    Every member's seconds are the batch's wall time divided by the members (their share of the machine).
    """
    stacked = stacked_leaves(members)
    optimizer = build_optimizer(stacked, settings)
    owners = units(model, list(stacked))
    start_rms = _member_rms(stacked)
    device = next(iter(stacked.values())).device
    autocast = autocast_for(model, bf16=settings.bf16)
    aux = settings.router_aux_loss_coef > 0
    model.train()
    start = time.perf_counter()
    try:
        for step in range(settings.steps_per_round):
            active = [index for index, member in enumerate(members) if member.error is None]
            if not active:
                break
            set_learning_rate(optimizer, settings, round_index * settings.steps_per_round + step, total_rounds)
            optimizer.zero_grad(set_to_none=True)
            chosen = [members[index] for index in active]
            own = _rows_of(stacked, active, len(members))
            for _ in range(settings.grad_accumulation):
                joined, groups = concatenate([next(member.batches) for member in chosen], pad_token_id)
                batch = {key: value.to(device) for key, value in joined.items()}
                labels = batch.pop("labels")
                with (
                    autocast,
                    captured_router_logits(model, aux) as router_logits,
                    grouped_forwards(model, own, groups, [member.random for member in chosen], owners=owners),
                ):
                    logits = model(**batch).logits
                    objective = _objective(chosen, own, logits, labels, batch, router_logits, groups, settings, step)
                if objective is not None:
                    (objective / settings.grad_accumulation).backward()
            if settings.max_grad_norm is not None:
                _clip_per_member(stacked, settings.max_grad_norm)
            optimizer.step()
            for member, rms, first in zip(members, _member_rms(stacked), start_rms, strict=True):
                if member.error is None:
                    member.error = growth_error(member.description, rms, first, step, settings)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    _write_back(stacked, members)
    seconds = (time.perf_counter() - start) / len(members)
    return [
        member.error
        or TrainResult(
            loss=member.loss_sum / max(member.batch_count, 1),
            steps=settings.steps_per_round,
            tokens=member.tokens,
            seconds=seconds,
        )
        for member in members
    ]


def _rows_of(stacked: Mapping[str, torch.Tensor], active: list[int], count: int) -> dict[str, torch.Tensor]:
    """The active members' slices of every stack (the stacks themselves while every member is active)."""
    if len(active) == count:
        return dict(stacked)
    index = torch.tensor(active, device=next(iter(stacked.values())).device)
    return {name: tensor.index_select(0, index) for name, tensor in stacked.items()}


def _member_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's float32 L2 norm over all of ``tensors`` (each ``(k, ...)``): shape ``(k,)``."""
    norms = [torch.linalg.vector_norm(tensor.flatten(1), dim=1, dtype=torch.float32) for tensor in tensors]
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


def _member_rms(stacked: Mapping[str, torch.Tensor]) -> list[float]:
    """Each member's RMS over its trainable tensors (:func:`~fedexperts.training.weights_rms`, per slice)."""
    tensors = [tensor.detach() for tensor in stacked.values()]
    count = sum(tensor[0].numel() for tensor in tensors)
    return (_member_norms(tensors) / max(count, 1) ** 0.5).tolist()


@torch.no_grad()
def _clip_per_member(stacked: Mapping[str, torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` for each member's slice on its own: scale by ``max_norm / (norm + 1e-6)``, capped at 1."""
    grads = [tensor.grad for tensor in stacked.values() if tensor.grad is not None]
    if not grads:
        return
    scale = (max_norm / (_member_norms(grads) + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.reshape(-1, *(1,) * (grad.dim() - 1)).to(grad.dtype))


@torch.no_grad()
def _write_back(stacked: Mapping[str, torch.Tensor], members: Sequence[BatchMember]) -> None:
    """Each member's trained slice into its own tensors (a diverged member's are left as they were)."""
    for index, member in enumerate(members):
        if member.error is None:
            for name, tensor in member.tensors.items():
                tensor.copy_(stacked[name][index])


def _objective(
    members: Sequence[BatchMember],
    own: Mapping[str, torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    router_logits: list[tuple[torch.Tensor, int]],
    groups: RowGroups,
    settings: TrainConfig,
    step: int,
) -> torch.Tensor | None:
    """The sum of every member's objective over its own rows (a member whose objective is not finite leaves).

    One cross-entropy over all rows, summed per member and divided by the member's own target count:
    the mean its loss alone takes.
    """
    per_token = CAUSAL.loss(logits, labels, settings.label_smoothing, reduction="none")
    owner = groups.owners(logits.device)
    count = len(members)
    row_sums = per_token.reshape(groups.total, -1).sum(dim=1)
    targets = CAUSAL.targets_per_row(labels)
    sums = row_sums.new_zeros(count).index_add_(0, owner, row_sums)
    counts = targets.new_zeros(count).index_add_(0, owner, targets)
    losses = sums / counts
    objectives = losses
    if router_logits or any(member.proximal is not None for member in members):
        objectives = losses + torch.stack(_extra_terms(members, own, router_logits, batch, groups, settings))
    values, totals, tokens = torch.stack([objectives.detach(), losses.detach(), counts.to(losses.dtype)]).tolist()
    keep = []
    for member, value, loss, targets_seen in zip(members, values, totals, tokens, strict=True):
        if member.error is None and not math.isfinite(value):
            member.error = DivergenceError(diverged_loss(member.description, value, step, settings))
        keep.append(member.error is None)
        if member.error is None:
            member.loss_sum += loss
            member.batch_count += 1
            member.tokens += int(targets_seen)
    if not any(keep):
        return None
    if all(keep):
        return objectives.sum()
    return objectives[torch.tensor(keep, device=objectives.device)].sum()


def _extra_terms(
    members: Sequence[BatchMember],
    own: Mapping[str, torch.Tensor],
    router_logits: list[tuple[torch.Tensor, int]],
    batch: Mapping[str, torch.Tensor],
    groups: RowGroups,
    settings: TrainConfig,
) -> list[torch.Tensor]:
    """Each member's router auxiliary loss (over its own tokens) plus its proximal term (over its own slices)."""
    mask = batch.get("attention_mask")
    extras = []
    for index, (member, rows) in enumerate(zip(members, groups.slices(), strict=True)):
        extra = torch.zeros((), device=next(iter(own.values())).device)
        if router_logits:
            tokens = slice(rows.start * groups.width, rows.stop * groups.width)
            layers = [(layer.reshape(-1, layer.shape[-1])[tokens], top_k) for layer, top_k in router_logits]
            balance = load_balancing_loss(layers, None if mask is None else mask[rows], settings.router_aux_loss)
            extra = extra + settings.router_aux_loss_coef * balance
        if member.proximal is not None:
            extra = extra + member.proximal({name: tensor[index] for name, tensor in own.items()})
        extras.append(extra)
    return extras
