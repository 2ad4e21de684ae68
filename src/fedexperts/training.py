"""The local training loop every client runs: plain PyTorch, no trainer object rebuilt per round.

AdamW over the trainable parameters only (frozen experts are neither in the optimizer nor given
gradients), a cosine learning rate that runs across rounds (round r continues where round r-1
stopped), gradient accumulation, clipping, optional gradient checkpointing, label smoothing, a
proximal term (FedProx) and the router load-balancing loss. Forwards run under autocast to the
half dtype of the frozen base (float32 trainables over a bf16 base, :mod:`fedexperts.moe.precision`)
or, with ``train.bf16``, bf16 autocast over a float32 model.

The load-balancing loss (``train.router_aux_loss``) is computed here from the routers' captured logits,
in two forms: transformers' own (``load_balancing_loss_func``: expert counts and probabilities pooled
over the concatenated router logits of every layer), so that a model card's coefficient means the
same, and a per-layer mean (Switch Transformers' ``E * sum_i f_i P_i`` per layer, ``f`` divided by
top-k), which also handles sub-MoEs whose layers hold different numbers of experts, where the pooled
form is undefined. ``auto`` picks the pooled form whenever every layer has the same expert count and
top-k.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedexperts.config import TrainConfig
from fedexperts.data.layout import CAUSAL, batch_layout
from fedexperts.errors import FedExpertsError
from fedexperts.interface import ProximalTerm
from fedexperts.moe.families import MoELayer, moe_layers, unwrap_model
from fedexperts.moe.params import NO_WEIGHT_DECAY
from fedexperts.moe.precision import autocast_for
from fedexperts.moe.routing import RoutingRecorder


def cosine_learning_rate(
    step: int, *, peak: float, floor_fraction: float, warmup_steps: int, total_steps: int
) -> float:
    """Linear warm-up to ``peak``, then cosine down to ``floor_fraction * peak`` at ``total_steps``.

    The floor is a fraction of the peak so that the built-in model's pretraining (to a tenth of its peak)
    and federated training (to ``train.min_learning_rate``) share one schedule.
    """
    total = max(total_steps, 1)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (floor_fraction + (1 - floor_fraction) * cosine)


GROWTH_LIMIT = 100.0
"""Local training has diverged when the trainable weights' RMS exceeds ``max(GROWTH_LIMIT x`` its value at
the start, ``1.0)`` (see :func:`train_local`)."""


class DivergenceError(FedExpertsError):
    """Local training blew up: a non-finite loss or weight, or weights grown past :data:`GROWTH_LIMIT`."""


def weights_rms(params: Iterable[torch.Tensor]) -> float:
    """Root mean square over every element of ``params`` (float32 accumulation: half-precision weights never
    overflow it), ``inf``/``nan`` when one is not finite."""
    chosen = [param.detach() for param in params]
    norms = torch.stack([torch.linalg.vector_norm(param, dtype=torch.float32) for param in chosen])
    count = sum(param.numel() for param in chosen)
    return float(torch.linalg.vector_norm(norms)) / math.sqrt(max(count, 1))


@dataclass(frozen=True)
class TrainResult:
    loss: float
    """Mean task loss (without auxiliary terms) over the round's batches."""
    steps: int
    tokens: int
    """Supervised (label) tokens seen."""
    seconds: float


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not ``IGNORE_INDEX`` (:data:`CAUSAL`'s loss)."""
    return CAUSAL.loss(logits, labels, label_smoothing)


def load_balancing_loss(
    router_logits: Iterable[tuple[torch.Tensor, int]],
    attention_mask: torch.Tensor | None,
    formulation: Literal["auto", "pooled", "per-layer"] = "per-layer",
) -> torch.Tensor:
    """The router load-balancing loss on real tokens; ``router_logits`` holds ``(logits, top_k)`` per layer.

    ``per-layer``: the mean over MoE layers of ``E * sum_i f_i * P_i``, each layer with its own E and
    top-k, ``f_i`` the fraction of top-k slots routed to expert i (so it sums to 1). ``pooled``:
    transformers' ``load_balancing_loss_func``: ``f_i`` (top-k assignments per token, summing to k) and
    ``P_i`` are averaged over every layer's real tokens together, then ``E * sum_i f_i * P_i`` once; it
    needs one E and one top-k for all layers. ``auto``: pooled when the layers agree, else per-layer.
    """
    layers = [(logits.reshape(-1, logits.shape[-1]).float(), top_k) for logits, top_k in router_logits]
    if not layers:
        raise FedExpertsError("router auxiliary loss asked for, but no router ran")
    real = None if attention_mask is None else attention_mask.reshape(-1).bool()
    layers = [(flat[real] if real is not None and real.numel() == flat.shape[0] else flat, k) for flat, k in layers]
    uniform = len({(flat.shape[-1], k) for flat, k in layers}) == 1
    if formulation == "pooled" and not uniform:
        shapes = sorted({(flat.shape[-1], k) for flat, k in layers})
        raise FedExpertsError(
            f"train.router_aux_loss=pooled needs one expert count and top-k in every MoE layer; they have "
            f"(experts, top_k) {shapes} (use per-layer or auto)"
        )
    if formulation == "per-layer" or not uniform:
        losses = []
        for flat, top_k in layers:
            probabilities = flat.softmax(dim=-1)
            chosen = probabilities.topk(min(top_k, flat.shape[-1]), dim=-1).indices
            fraction = F.one_hot(chosen, flat.shape[-1]).float().sum(dim=1).mean(dim=0) / top_k
            losses.append(flat.shape[-1] * (fraction * probabilities.mean(dim=0)).sum())
        return torch.stack(losses).mean()
    experts, top_k = layers[0][0].shape[-1], layers[0][1]
    pooled = torch.cat([flat for flat, _ in layers])
    probabilities = pooled.softmax(dim=-1)
    chosen = probabilities.topk(min(top_k, experts), dim=-1).indices
    assignments = F.one_hot(chosen, experts).float().sum(dim=1).mean(dim=0)
    return experts * (assignments * probabilities.mean(dim=0)).sum()


@contextmanager
def captured_router_logits(
    model: nn.Module, enabled: bool, masks: Mapping[str, torch.Tensor | None] | None = None
) -> Iterator[list[tuple[torch.Tensor, int]]]:
    """Collect every MoE router's logits (with gradients) during the forwards inside the block.

    ``masks`` (per stack, :meth:`~fedexperts.data.layout.BatchLayout.stack_masks`) keeps each layer's
    real tokens only: an encoder-decoder's encoder and decoder have masks of their own.
    """
    captured: list[tuple[torch.Tensor, int]] = []
    if not enabled:
        yield captured
        return
    handles = []
    for layer in moe_layers(unwrap_model(model)):

        def hook(module: nn.Module, args: Any, output: Any, layer: MoELayer = layer) -> None:
            logits = layer.family.router_logits(output)
            mask = (masks or {}).get(layer.stack)
            if mask is not None and mask.numel() * logits.shape[-1] == logits.numel():
                logits = logits.reshape(-1, logits.shape[-1])[mask.reshape(-1).bool()]
            captured.append((logits, layer.top_k))

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recorded_routing(recorder: RoutingRecorder | None, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Count the real tokens the routers send to each expert in the forward inside the block.

    The recorder's hooks are on only for the forward itself: gradient checkpointing reruns the
    forward during the backward, which must not count twice.
    """
    if recorder is None:
        yield
        return
    with recorder, recorder.mask(batch.get("attention_mask"), batch.get("decoder_attention_mask")):
        yield


def trainable_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` (unwrapped), by the names the algorithms' roles use."""
    named = {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}
    if not named:
        raise FedExpertsError("the model has no trainable parameters: every role is frozen")
    return named


def build_optimizer(named: Mapping[str, torch.Tensor], settings: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``named`` (tensors of :data:`~fedexperts.moe.params.NO_WEIGHT_DECAY` parameters undecayed)."""
    decayed: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for tensor in named.values():
        (no_decay if getattr(tensor, NO_WEIGHT_DECAY, False) else decayed).append(tensor)
    groups: list[dict[str, Any]] = [{"params": decayed}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=settings.learning_rate, weight_decay=settings.weight_decay
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, settings: TrainConfig, step: int, total_rounds: int) -> None:
    """The cosine schedule's rate at global ``step`` (of ``settings.steps_per_round * total_rounds``)."""
    learning_rate = cosine_learning_rate(
        step,
        peak=settings.learning_rate,
        floor_fraction=settings.min_learning_rate / settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        total_steps=settings.steps_per_round * total_rounds,
    )
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def diverged_loss(description: str, value: float, step: int, settings: TrainConfig) -> str:
    return (
        f"{description} diverged: the loss became {value} at step {step + 1} of "
        f"{settings.steps_per_round}; lower train.learning_rate"
    )


def check_growth(
    description: str, params: Iterable[torch.Tensor], start_rms: float, step: int, settings: TrainConfig
) -> None:
    """Raise :class:`DivergenceError` when the weights' RMS passed ``max(GROWTH_LIMIT x start_rms, 1)`` (or is nan)."""
    error = growth_error(description, weights_rms(params), start_rms, step, settings)
    if error is not None:
        raise error


def growth_error(
    description: str, rms: float, start_rms: float, step: int, settings: TrainConfig
) -> DivergenceError | None:
    """The divergence of weights at RMS ``rms`` after ``step``, or ``None`` within the limit (:func:`check_growth`)."""
    limit = max(GROWTH_LIMIT * start_rms, 1.0)
    if rms <= limit:  # nan is not
        return None
    return DivergenceError(
        f"{description} diverged: the trainable weights' RMS went from {start_rms:.3g} to {rms:.3g} at "
        f"step {step + 1} of {settings.steps_per_round} (limit {limit:.3g}); lower train.learning_rate"
    )


def train_local(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    settings: TrainConfig,
    *,
    total_rounds: int = 1,
    round_index: int = 0,
    proximal: ProximalTerm | None = None,
    routing: RoutingRecorder | None = None,
    description: str = "train",
) -> TrainResult:
    """Run ``settings.steps_per_round`` optimizer steps on ``batches`` (cycled if it runs out).

    The learning rate follows :func:`cosine_learning_rate` across ``total_rounds`` rounds, so round
    ``round_index`` continues where the previous one stopped.

    Divergence stops the client with a :class:`DivergenceError` (never an "ok" update): a loss that is
    not finite, or after a step a trainable weight that is not finite or an RMS of the trainable weights
    above ``max(GROWTH_LIMIT x`` the RMS before the first step, ``1.0)`` (a learning rate far too large
    saturates the model: the weights explode while the loss stays flat).

    ``batches`` yield ``input_ids``, ``attention_mask`` and ``labels``; the model's
    :func:`~fedexperts.data.layout.batch_layout` turns them into its inputs and its loss. ``proximal``
    computes an extra loss term (FedProx's ``mu/2 ||w - w_global||^2``) from the trainable tensors by
    name. ``routing`` counts the tokens every training forward routes to each expert
    (:func:`recorded_routing`). The caller seeds torch for reproducibility; the loop itself draws no
    randomness besides the model's dropout.
    """
    named = trainable_by_name(model)
    params = list(named.values())
    optimizer = build_optimizer(named, settings)
    device = params[0].device
    checkpointing = _checkpointing_switches(model) if settings.gradient_checkpointing else None
    if checkpointing is not None:
        checkpointing[0]({"use_reentrant": False})  # first argument: torch.utils.checkpoint kwargs
    model.train()
    source = _cycle(batches)
    autocast = autocast_for(model, bf16=settings.bf16)
    layout = batch_layout(model)  # one sequence, or encoder and decoder (the model's config says which)
    total_loss, total_batches, tokens = 0.0, 0, 0
    start_rms = weights_rms(params)
    start = time.perf_counter()
    steps = range(settings.steps_per_round)
    try:
        for step in steps:
            set_learning_rate(optimizer, settings, round_index * settings.steps_per_round + step, total_rounds)
            optimizer.zero_grad(set_to_none=True)
            for _ in range(settings.grad_accumulation):
                batch = {key: value.to(device) for key, value in next(source).items()}
                labels, inputs = batch["labels"], layout.model_inputs(model, batch)
                masks = layout.stack_masks(inputs)
                with autocast, captured_router_logits(model, settings.router_aux_loss_coef > 0, masks) as router_logits:
                    with recorded_routing(routing, inputs):
                        outputs = model(**inputs)
                    loss = layout.loss(outputs.logits, labels, settings.label_smoothing)
                    objective = loss
                    if router_logits:  # already restricted to real tokens
                        aux = load_balancing_loss(router_logits, None, settings.router_aux_loss)
                        objective = objective + settings.router_aux_loss_coef * aux
                    if proximal is not None:
                        objective = objective + proximal(named)
                if not torch.isfinite(objective):
                    raise DivergenceError(diverged_loss(description, objective.item(), step, settings))
                (objective / settings.grad_accumulation).backward()
                total_loss += loss.item()
                total_batches += 1
                tokens += layout.target_count(labels)
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            check_growth(description, params, start_rms, step, settings)
    finally:  # the base model is shared by the next client, whether this one finished or diverged
        optimizer.zero_grad(set_to_none=True)
        if checkpointing is not None:
            checkpointing[1]()
        model.eval()
    return TrainResult(
        loss=total_loss / max(total_batches, 1),
        steps=settings.steps_per_round,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def _checkpointing_switches(model: nn.Module) -> tuple[Any, Any]:
    """transformers' enable/disable pair (renamed to ``activation_checkpointing_*`` in late v5)."""
    base = unwrap_model(model)
    for prefix in ("activation_checkpointing", "gradient_checkpointing"):
        enable, disable = getattr(base, f"{prefix}_enable", None), getattr(base, f"{prefix}_disable", None)
        if callable(enable) and callable(disable):
            return enable, disable
    raise FedExpertsError(f"{type(base).__name__} does not support gradient checkpointing")


def _cycle(batches: Iterable[Mapping[str, torch.Tensor]]) -> Any:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise FedExpertsError("no training batches: the client's training split is empty")
