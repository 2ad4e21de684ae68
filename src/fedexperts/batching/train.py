"""Local training of several clients at once: one forward and backward per step over their concatenated batches.

Each client keeps what :func:`fedexperts.training.train_local` gives it alone: its own float32
copies of the trainable tensors, its own AdamW and gradient clipping, its own data order and dropout
stream, the same learning-rate schedule, and its loss averaged over its own tokens. The step's
objective is the sum of the clients' objectives; since no frozen operation mixes rows, each client's
gradient is what its objective alone would give (up to float rounding: the matmuls run at other
shapes). A client that diverges leaves the batch with its error; the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedexperts.batching.groups import ClientRandom, RowGroups, concatenate, grouped_forwards
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
    check_growth,
    diverged_loss,
    load_balancing_loss,
    set_learning_rate,
    weights_rms,
)


def client_copies(named: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Leaf copies of a client's trainable tensors (what its optimizer steps), keeping the no-weight-decay mark."""
    copies = {}
    for name, param in named.items():
        copy = param.detach().clone().requires_grad_(True)
        if getattr(param, NO_WEIGHT_DECAY, False):
            setattr(copy, NO_WEIGHT_DECAY, True)
        copies[name] = copy
    return copies


@dataclass
class BatchMember:
    """One client of a batched training run."""

    description: str
    tensors: dict[str, torch.Tensor]
    """Its trainable tensors by parameter name (:func:`client_copies`), trained in place."""
    batches: Iterator[dict[str, torch.Tensor]]
    random: ClientRandom
    proximal: ProximalTerm | None = None
    error: DivergenceError | None = None
    """Set when the client diverged; it left the batch then."""
    loss_sum: float = field(default=0.0, init=False)
    batch_count: int = field(default=0, init=False)
    tokens: int = field(default=0, init=False)


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
    optimizers = [build_optimizer(member.tensors, settings) for member in members]
    start_rms = [weights_rms(member.tensors.values()) for member in members]
    device = next(iter(members[0].tensors.values())).device
    autocast = autocast_for(model, bf16=settings.bf16)
    aux = settings.router_aux_loss_coef > 0
    model.train()
    start = time.perf_counter()
    try:
        for step in range(settings.steps_per_round):
            active = [index for index, member in enumerate(members) if member.error is None]
            if not active:
                break
            for index in active:
                set_learning_rate(
                    optimizers[index], settings, round_index * settings.steps_per_round + step, total_rounds
                )
                optimizers[index].zero_grad(set_to_none=True)
            for _ in range(settings.grad_accumulation):
                chosen = [members[index] for index in active]
                joined, groups = concatenate([next(member.batches) for member in chosen], pad_token_id)
                batch = {key: value.to(device) for key, value in joined.items()}
                labels = batch.pop("labels")
                tensors = [member.tensors for member in chosen]
                with (
                    autocast,
                    captured_router_logits(model, aux) as router_logits,
                    grouped_forwards(model, tensors, groups, [member.random for member in chosen]),
                ):
                    logits = model(**batch).logits
                    objective = _objective(chosen, logits, labels, batch, router_logits, groups, settings, step)
                if objective is not None:
                    (objective / settings.grad_accumulation).backward()
            for index in active:
                member = members[index]
                if member.error is not None:
                    continue
                params = list(member.tensors.values())
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizers[index].step()
                try:
                    check_growth(member.description, params, start_rms[index], step, settings)
                except DivergenceError as error:
                    member.error = error
    finally:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        model.eval()
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


def _objective(
    members: Sequence[BatchMember],
    logits: torch.Tensor,
    labels: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    router_logits: list[tuple[torch.Tensor, int]],
    groups: RowGroups,
    settings: TrainConfig,
    step: int,
) -> torch.Tensor | None:
    """The sum of every member's objective over its own rows (a member whose objective is not finite leaves)."""
    total: torch.Tensor | None = None
    mask = batch.get("attention_mask")
    for member, rows in zip(members, groups.slices(), strict=True):
        loss = CAUSAL.loss(logits[rows], labels[rows], settings.label_smoothing)
        objective = loss
        if router_logits:
            tokens = slice(rows.start * groups.width, rows.stop * groups.width)
            own = [(layer.reshape(-1, layer.shape[-1])[tokens], top_k) for layer, top_k in router_logits]
            balance = load_balancing_loss(own, None if mask is None else mask[rows], settings.router_aux_loss)
            objective = objective + settings.router_aux_loss_coef * balance
        if member.proximal is not None:
            objective = objective + member.proximal(member.tensors)
        if not torch.isfinite(objective):
            member.error = DivergenceError(diverged_loss(member.description, objective.item(), step, settings))
            continue
        member.loss_sum += loss.item()
        member.batch_count += 1
        member.tokens += CAUSAL.target_count(labels[rows])
        total = objective if total is None else total + objective
    return total
